"""`/v1/predict-dir` jobs on a real Ray cluster: the route starts a detached actor that runs
`predict_dir` (Ray Data, 1 worker) over a folder of ~60 tiny images in the volume's inbox/;
every file is answered once, the output downloads, the status is right; a running job is
cancelled, keeping its whole lines; a resume skips them and answers the rest."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.service.api.conftest import Api, MakeApi
from tests.support.images import labelled_set
from tests.support.versions import publish_version
from training.batch import list_files
from training.registry import Registry

pytestmark = pytest.mark.slow

N_IMAGES = 60


@pytest.fixture(scope="module")
def api(make_api: MakeApi, ray_cluster: None) -> Api:
    """The API over a volume whose CURRENT is a small 3-class version (crop 64)."""
    api = make_api()
    registry = Registry(api.home)
    registry.set_current(publish_version(registry, ["red", "blue", "green"], crop=64))
    return api


def _folder(api: Api, name: str, n: int = N_IMAGES, seed: int = 0) -> Path:
    """inbox/<name>: n PNGs in two subfolders and a text file."""
    root = api.home / "inbox" / name
    for i, (label, data) in enumerate(labelled_set(["red", "blue", "green"], n // 3, size=32,
                                                   seed=seed)):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{label}-{i}.png").write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    return root


def _wait(api: Api, job_id: str, until: Any, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record = api.client.get(f"/v1/predict-dir/{job_id}", headers=api.headers()).json()
        if until(record):
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.05)


def _done(record: dict[str, Any]) -> bool:
    return record["status"] in ("succeeded", "failed", "cancelled")


def _output(api: Api, job_id: str) -> list[dict[str, Any]]:
    resp = api.client.get(f"/v1/predict-dir/{job_id}/output", headers=api.headers())
    assert resp.status_code == 200
    return [json.loads(line) for line in resp.text.splitlines()]


def test_a_job_answers_every_file_once(api: Api) -> None:
    folder = _folder(api, "shipment-42")
    files = list_files(folder)
    outside = api.home / "outside.png"
    outside.write_bytes((folder / files[0]).read_bytes())
    (folder / "leak.png").symlink_to(outside)  # a file linked out of inbox/: left out
    resp = api.client.post("/v1/predict-dir", json={"folder": "shipment-42", "workers": 1},
                           headers=api.headers())
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert (resp.json()["status"], resp.json()["version"]) == ("queued", "v1")

    second = api.client.post("/v1/predict-dir", json={"folder": "shipment-42"},
                             headers=api.headers())
    assert second.status_code == 409 and job_id in second.json()["error"]["message"]

    record = _wait(api, job_id, _done)
    assert record["status"] == "succeeded", record
    assert record["progress"] == {"lines": N_IMAGES + 1, "files": N_IMAGES + 1}
    assert (record["predicted"], record["errors"], record["skipped"]) == (N_IMAGES, 1, 0)
    assert record["error_codes"] == {"unsupported_media_type": 1}
    assert record["images_per_s"] > 0 and record["finished_at"] >= record["started_at"]

    lines = _output(api, job_id)
    assert sorted(r["path"] for r in lines) == files  # each once; leak.png not among them
    assert {r["version"] for r in lines} == {"v1"}
    good = [r for r in lines if "error" not in r]
    assert len(good) == N_IMAGES and all(r["label"] in ("red", "blue", "green") for r in good)
    assert (api.home / "batch" / job_id / "predictions.jsonl").is_file()
    listed = api.client.get("/v1/predict-dir", headers=api.headers()).json()["jobs"]
    assert [r["job_id"] for r in listed] == [job_id]
    _wait_actor_gone(f"visionloop-batch-{job_id}-0")


def _wait_actor_gone(name: str, timeout: float = 60) -> None:
    """The job's detached actor exits when the job ends."""
    import ray

    deadline = time.monotonic() + timeout
    while any(a["name"] == name for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.monotonic() < deadline, f"{name} still alive"
        time.sleep(0.2)


def test_cancel_then_resume_skips_the_finished_lines(api: Api) -> None:
    folder = _folder(api, "shipment-43", seed=1)
    files = list_files(folder)
    resp = api.client.post("/v1/predict-dir",
                           json={"folder": "shipment-43", "workers": 1, "format": "csv"},
                           headers=api.headers())
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    # Listed (the actor is past its start check), the Ray Data actor still starting: cancel.
    _wait(api, job_id, lambda r: (r["progress"] or {}).get("files") is not None or _done(r))
    cancel = api.client.delete(f"/v1/predict-dir/{job_id}", headers=api.headers())
    assert cancel.status_code == 202
    assert cancel.json()["status"] == "cancelled" or cancel.json()["cancel_requested"]

    record = _wait(api, job_id, _done)
    assert (record["status"], record["reason"]) == ("cancelled", "cancelled on request")
    out = api.home / "batch" / job_id / "predictions.csv"
    kept = out.read_bytes()
    lines_at_cancel = record["progress"]["lines"]
    assert kept.count(b"\n") == lines_at_cancel + 1  # the header
    assert 0 < lines_at_cancel < len(files)

    resumed = api.client.post(f"/v1/predict-dir/{job_id}/resume", headers=api.headers())
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["status"] == "queued"
    assert resumed.json()["resumes"][-1]["after"] == "cancelled"
    record = _wait(api, job_id, _done)
    assert record["status"] == "succeeded", record
    assert record["skipped"] == lines_at_cancel
    assert record["progress"] == {"lines": len(files), "files": len(files)}
    assert out.read_bytes().startswith(kept)  # the finished lines kept, none redone

    resp = api.client.get(f"/v1/predict-dir/{job_id}/output", headers=api.headers())
    assert resp.headers["content-type"].startswith("text/csv")
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(resp.text)))
    assert sorted(r["path"] for r in rows) == files  # every file exactly once
    assert sum(1 for r in rows if r["error"]) == 1


def test_cancel_while_the_cluster_is_busy(api: Api) -> None:
    """The cluster's CPUs are taken (as a training job takes them), so the job's Ray Data
    actor cannot start and no batch comes: the cancel watcher ends the job after its grace,
    and the actor (with the pool it was waiting for) goes."""
    import ray

    from training.batch_jobs import CANCEL_GRACE_S

    @ray.remote(num_cpus=2)
    class Busy:
        def ready(self) -> bool:
            return True

    busy = Busy.remote()  # type: ignore[attr-defined]
    ray.get(busy.ready.remote(), timeout=120)
    try:
        _folder(api, "shipment-44", n=9, seed=2)
        resp = api.client.post("/v1/predict-dir", json={"folder": "shipment-44", "workers": 1},
                               headers=api.headers())
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]
        _wait(api, job_id, lambda r: (r["progress"] or {}).get("files") is not None)
        time.sleep(1)
        assert api.client.get(f"/v1/predict-dir/{job_id}",
                              headers=api.headers()).json()["status"] == "running"
        cancel = api.client.delete(f"/v1/predict-dir/{job_id}", headers=api.headers())
        assert cancel.status_code == 202 and cancel.json()["cancel_requested"] is True
        record = _wait(api, job_id, _done, timeout=CANCEL_GRACE_S + 60)
        assert (record["status"], record["progress"]["lines"]) == ("cancelled", 0)
        _wait_actor_gone(f"visionloop-batch-{job_id}-0")
    finally:
        ray.kill(busy)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2:  # nothing of the job waits for CPUs
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
