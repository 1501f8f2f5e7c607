"""The whole loop on a real Ray cluster (2 logical CPUs) with 2 classifier replicas: v0 answers,
labels go in, a 2-worker training job runs while the service serves (Serve actors take 0 CPUs),
a second start is refused (409), the new version is promoted and answers with no failed request
across the swap, activate rolls back on every replica, and the schedule fires once enough new
labels arrived and not before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.images import noisy_image
from tests.support.load import Hammer
from tests.support.service import RunningService, start_service
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

MIN_NEW = 50  # above the first upload, so the schedule never races the manual job
RED, BLUE = (220, 30, 30), (30, 30, 220)


@pytest.fixture(scope="module")
def svc(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    home = tmp_path_factory.mktemp("loop-home")
    yield start_service(home, classifier_replicas=2, retrain_schedule="* * * * * */2",
                        retrain_min_new=MIN_NEW, reload_poll_s=0.5)


def upload(c: httpx.Client, label: str, color: tuple[int, int, int], seeds: range) -> None:
    seeds_list = list(seeds)
    for i in range(0, len(seeds_list), 8):
        r = c.post("/v1/labels", data={"label": label},
                   files=[("files", (f"{s}.png", noisy_image(s, color)))
                          for s in seeds_list[i:i + 8]])
        assert r.status_code == 200, r.text


def replica_versions(svc: RunningService) -> list[str]:
    return httpx.get(f"{svc.url}/readyz", timeout=10).json()["model_versions"]


def test_full_loop(svc: RunningService) -> None:
    assert replica_versions(svc) == ["v0", "v0"]
    with svc.client() as c:
        r = c.post("/v1/predict", files=[("files", ("r.png", noisy_image(0, RED)))])
        assert r.json()["model_version"] == "v0"
        # Enough images that the held-out test split, which alone judges the gate against the
        # majority-class baseline, holds several of each label.
        upload(c, "red", RED, range(0, 20))
        upload(c, "blue", BLUE, range(100, 120))
        assert c.get("/v1/dataset").json() == {"labels": {"blue": 20, "red": 20}, "total": 40,
                                               "new_since_last_job": 40}
        with Hammer(svc.url, noisy_image(12345, RED), threads=1, pause_s=0.05) as hammer:
            r = c.post("/v1/train", json={"epochs": 10, "workers": 2, "image_size": 96,
                                          "batch_size": 4, "lr": 0.2, "augment": False})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            assert r.json()["status"] == "queued"
            second = c.post("/v1/train", json={"epochs": 1})
            assert second.status_code == 409 and second.json()["error"]["code"] == "job_running"

            seen: list[dict[str, Any]] = []

            def finished() -> bool:
                job = c.get(f"/v1/train/{job_id}").json()
                seen.append(job)
                return job["status"] in ("succeeded", "failed", "cancelled")

            wait_for(finished, timeout=300, interval=0.5, what="the training job")
            job = seen[-1]
            assert job["status"] == "succeeded", job
            assert any(s["status"] == "running" for s in seen)
            assert job["version"] == "v1" and job["promoted"] is True, job["reason"]
            assert [m["epoch"] for m in job["metrics"]][-1] == 10
            assert job["progress"]["fraction"] == 1.0
            assert {"train_loss", "val_accuracy"} <= set(job["metrics"][-1])
            wait_for(lambda: replica_versions(svc) == ["v1", "v1"], timeout=60,
                     what="both replicas on v1")
            time.sleep(1.0)  # some requests after the swap too
        assert not hammer.failures(), hammer.failures()[:5]
        versions = hammer.versions()
        assert "v0" in versions and versions[-1] == "v1"

        r = c.post("/v1/predict", files=[("files", ("b.png", noisy_image(999, BLUE)))])
        body = r.json()
        assert body["model_version"] == "v1" and r.headers["x-model-version"] == "v1"
        assert {t["label"] for t in body["predictions"][0]["top_k"]} == {"red", "blue"}
        models = c.get("/v1/models").json()
        assert models["current"] == "v1"
        v1 = models["versions"][-1]
        assert v1["class_count"] == 2 and v1["val_accuracy"] is not None
        assert c.get("/v1/models/v1").json()["classes"] == ["blue", "red"]
        assert c.get("/v1/models/v1/plots/curves.png").headers["content-type"] == "image/png"
        assert c.get("/v1/dataset").json()["new_since_last_job"] == 0


def test_activate_rolls_back_on_every_replica(svc: RunningService) -> None:
    with svc.client() as c:
        r = c.post("/v1/models/v0/activate")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["current"], body["replicas"]) == ("v0", ["v0", "v0"])
        assert body["policy"]["mode"] == "pinned" and body["policy"]["version"] == "v0"
        versions = {c.post("/v1/predict", files=[("files", ("x.png", noisy_image(i, RED)))]
                           ).json()["model_version"] for i in range(12)}
        assert versions == {"v0"}
        back = c.post("/v1/models/v1/activate", params={"pin": "false"}).json()
        assert back["replicas"] == ["v1", "v1"] and back["policy"]["mode"] == "automatic"
        assert c.get("/v1/models").json()["current"] == "v1"


def predictions_counted(svc: RunningService) -> float:
    """`visionloop_predictions_total` over every version, as /metrics reports it."""
    text = httpx.get(f"{svc.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("visionloop_predictions_total{"))


def test_metrics_count_every_replica(svc: RunningService) -> None:
    before = predictions_counted(svc)
    with svc.client() as c:
        for i in range(16):  # spread over both replicas by Serve's router
            r = c.post("/v1/predict", files=[("files", ("x.png", noisy_image(i, BLUE)))])
            assert r.status_code == 200, r.text
    # whichever replica answers the scrape, once its answer is newer than the predictions
    # (/metrics reuses a fan-out for VISIONLOOP_OPS_CACHE_S)
    wait_for(lambda: predictions_counted(svc) - before == 16, timeout=30, interval=0.2,
             what="the 16 predictions counted in /metrics")
    text = httpx.get(f"{svc.url}/metrics", timeout=10).text
    assert 'visionloop_model_info{version="v1"} 2.0' in text  # one per replica


def test_schedule_fires_once_enough_new_labels(svc: RunningService) -> None:
    with svc.client() as c:
        upload(c, "red", RED, range(200, 200 + MIN_NEW - 1))
        time.sleep(5)  # at least two ticks of "*/2 s" with too few new labels
        assert len(c.get("/v1/train").json()["jobs"]) == 1
        upload(c, "blue", BLUE, range(300, 301))

        def scheduled() -> dict[str, Any] | None:
            jobs = c.get("/v1/train").json()["jobs"]
            return jobs[0] if len(jobs) == 2 else None

        job = wait_for(scheduled, timeout=30, what="a scheduled job")
        assert job["source"] == "schedule"
        r = c.delete(f"/v1/train/{job['job_id']}")
        assert r.status_code == 202
        wait_for(lambda: c.get(f"/v1/train/{job['job_id']}").json()["status"]
                 in ("cancelled", "succeeded", "failed"), timeout=240, what="cancel")
        final = c.get(f"/v1/train/{job['job_id']}").json()
        assert final["status"] == "cancelled", final
        time.sleep(3)  # the schedule does not fire again for the same labels
        assert len(c.get("/v1/train").json()["jobs"]) == 2
