"""What a training job asks of the Ray cluster (`training.resources`).

Without Ray: the refusal messages, from node layouts like the ones users run (a CPU-only
laptop, the compose head with 0 CPUs, a GPU box with GPU workers, an autoscaling cluster).

On a real Ray cluster (2 logical CPUs, no GPU) with the whole service: a job the cluster can
never hold is refused with 400 by POST /v1/train and by `visionloop train`, writing nothing and
leaving the lock free; a job whose workers the cluster cannot give at once, because this test
holds one of the two CPUs with a placement group as another Ray job would, waits, then fails
with reason `pending` after `VISIONLOOP_TRAIN_PENDING_TIMEOUT_S`; such a pending job cancels at
once and the next one starts; the schedule starts jobs with the deployment's training defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.cli import main
from tests.support.http import assert_error
from tests.support.images import labelled_set
from tests.support.service import BACKBONE, RunningService, start_service
from tests.support.waiting import wait_for
from training.config import TrainConfig
from training.jobs import ACTIVE, CANCELLED_ON_REQUEST, JobStore
from training.resources import autoscaling_shortfall, shortfall, worker_resources

CPU, GPU = {"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}


# -- the refusal messages, without Ray -----------------------------------------------------------

def test_worker_resources_follow_the_gpu_option() -> None:
    assert worker_resources(TrainConfig(gpu=False)) == CPU
    assert worker_resources(TrainConfig(gpu=True)) == GPU


def test_a_gpu_job_on_a_cpu_only_cluster_names_the_missing_gpus() -> None:
    laptop = [("192.0.2.2", {"CPU": 2.0, "memory": 8e9, "node:192.0.2.2": 1.0})]
    problem = shortfall(laptop, GPU, 2)
    assert problem is not None
    assert "the cluster has 2 CPUs and 0 GPUs in all" in problem
    assert "1 CPU + 1 GPU per worker x 2 worker(s)" in problem
    assert "2 GPUs needed, 0 in the cluster" in problem
    assert '{"gpu": false}' in problem and "VISIONLOOP_TRAIN_GPU" in problem
    assert shortfall(laptop, CPU, 2) is None


def test_more_workers_than_cpus_says_how_many_fit() -> None:
    laptop = [("192.0.2.2", {"CPU": 2.0})]
    problem = shortfall(laptop, CPU, 3)
    assert problem is not None
    assert "3 CPUs needed, 2 in the cluster" in problem
    assert '{"workers": 2}' in problem and "VISIONLOOP_TRAIN_WORKERS" in problem
    assert "GPU" not in problem


def test_the_compose_head_alone_offers_no_cpu() -> None:
    problem = shortfall([("head", {"CPU": 0.0, "memory": 4e9})], CPU, 1)
    assert problem is not None
    assert "1 CPU needed, 0 in the cluster" in problem and "add Ray nodes with CPUs" in problem
    assert "at most" not in problem  # no worker fits: nothing smaller to suggest


def test_a_worker_needs_its_cpu_and_gpu_on_one_node() -> None:
    """Enough CPUs and GPUs in total, but the GPUs are on the head, which offers no CPU."""
    nodes = [("head", {"CPU": 0.0, "GPU": 1.0}), ("worker-1", {"CPU": 8.0})]
    problem = shortfall(nodes, GPU, 1)
    assert problem is not None
    assert "each worker's resources must be on one node" in problem
    assert "hold 0 such worker(s) at once" in problem
    assert "head: 0 CPUs, 1 GPU" in problem and "worker-1: 8 CPUs, 0 GPUs" in problem


def test_a_gpu_box_with_gpu_workers() -> None:
    nodes = [("head", {"CPU": 0.0, "GPU": 1.0}), ("w1", {"CPU": 8.0, "GPU": 1.0}),
             ("w2", {"CPU": 8.0, "GPU": 1.0})]
    assert shortfall(nodes, GPU, 2) is None
    problem = shortfall(nodes, GPU, 3)
    assert problem is not None
    assert "hold 2 such worker(s) at once" in problem and '{"workers": 2}' in problem
    fractional = [("w1", {"CPU": 8.0, "GPU": 0.5})]
    problem = shortfall(fractional, GPU, 1)
    assert problem is not None and "1 GPU needed, 0.5 in the cluster" in problem


def test_an_autoscaling_cluster_is_judged_by_what_it_can_grow_to() -> None:
    assert autoscaling_shortfall({"CPU": 64.0, "GPU": 4.0}, GPU, 4) is None
    problem = autoscaling_shortfall({"CPU": 64.0}, GPU, 2)
    assert problem is not None
    assert "2 GPUs needed, at most 0 in the cluster" in problem
    assert "autoscaling" in problem and '{"gpu": false}' in problem


# -- on a real Ray cluster, with the whole service -----------------------------------------------

MIN_NEW = 30  # above the 20 images the volume starts with: the schedule fires only in its test
PENDING_TIMEOUT_S = 20.0
SCHEDULE_DEFAULTS = {"workers": 2, "strategy": "finetune", "epochs": 3, "batch_size": 4}


def upload(c: httpx.Client, per_label: int, seed: int) -> None:
    for label, data in labelled_set(["red", "blue"], per_label, seed=seed):
        r = c.post("/v1/labels", data={"label": label}, files=[("files", ("x.png", data))])
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def svc(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """The service with training defaults of its own: 2 workers (both CPUs of this cluster),
    finetune, 3 epochs, batch 4; a pending bound of PENDING_TIMEOUT_S; a schedule every 2 s."""
    svc = start_service(tmp_path_factory.mktemp("resources-home"),
                        retrain_schedule="* * * * * */2", retrain_min_new=MIN_NEW,
                        train_pending_timeout_s=PENDING_TIMEOUT_S,
                        **{f"train_{k}": v for k, v in SCHEDULE_DEFAULTS.items()})
    with svc.client() as c:
        upload(c, 10, seed=1)
    yield svc


@pytest.fixture
def busy_cpu(ray_cluster: None) -> Iterator[None]:
    """One of the cluster's 2 CPUs held by this test's own placement group, as another Ray job
    would hold it: a 2-worker job cannot have both at once until the fixture ends."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=120)
    try:
        yield
    finally:
        remove_placement_group(pg)


def job(c: httpx.Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"/v1/train/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def ended(c: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    """The job's record once it is no longer queued or running."""
    return wait_for(lambda: (lambda r: r if r["status"] not in ACTIVE else None)(job(c, job_id)),
                    timeout=timeout, what=f"job {job_id} to end")


def waiting(c: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's record once it waits for resources (its workers have not started)."""
    record = wait_for(lambda: (lambda r: r if r.get("pending") or r["status"] not in ACTIVE
                               else None)(job(c, job_id)), timeout=180,
                      what=f"job {job_id} to wait for resources")
    assert record["status"] == "running" and record["pending"]["until"] is None, record
    return record


@pytest.mark.slow
def test_a_job_the_cluster_cannot_hold_is_refused_before_anything_is_written(
        svc: RunningService, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = JobStore(svc.home)
    with svc.client() as c:
        body = assert_error(c.post("/v1/train", json={"gpu": True}), 400,
                            "insufficient_resources")
        message = body["error"]["message"]
        assert "0 GPUs" in message and "2 GPUs needed, 0 in the cluster" in message, message
        assert '{"gpu": false}' in message
        body = assert_error(c.post("/v1/train", json={"workers": 3}), 400,
                            "insufficient_resources")
        assert "3 CPUs needed, 2 in the cluster" in body["error"]["message"]
        assert '{"workers": 2}' in body["error"]["message"]
        assert c.get("/v1/train").json() == {"jobs": []}
    assert jobs.list() == [] and not jobs.is_locked()

    capsys.readouterr()
    assert main(["train", "--home", str(svc.home), "--gpu", "--workers", "2", "--epochs", "1",
                 "--backbone", BACKBONE]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("visionloop: ") and "2 GPUs needed, 0 in the cluster" in err, err
    assert jobs.list() == [] and not jobs.is_locked()


@pytest.mark.slow
def test_a_job_still_pending_after_the_timeout_fails_saying_why(svc: RunningService,
                                                                busy_cpu: None) -> None:
    with svc.client() as c:
        r = c.post("/v1/train", json={})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        pending = waiting(c, job_id)["pending"]
        assert pending["timeout_s"] == PENDING_TIMEOUT_S
        assert pending["needs"] == "1 CPU per worker x 2 worker(s)"
        record = ended(c, job_id, timeout=PENDING_TIMEOUT_S + 120)
        assert record["status"] == "failed" and record["reason"] == "pending", record
        assert "waited 20 s for 1 CPU per worker x 2 worker(s)" in record["error"], record
        assert "1 of 2 CPUs free now" in record["error"], record
        assert record["metrics"] == [] and record["version"] is None
        # it never trained: its labels still count for the schedule's next tick
        assert record["ledger_offset"] is None
        assert c.get("/v1/dataset").json()["new_since_last_job"] == 20
    assert not JobStore(svc.home).is_locked()


@pytest.mark.slow
def test_cancel_ends_a_pending_job_at_once_and_frees_the_lock(svc: RunningService,
                                                               busy_cpu: None) -> None:
    with svc.client() as c:
        first = c.post("/v1/train", json={"epochs": 1})
        assert first.status_code == 202, first.text
        job_id = first.json()["job_id"]
        waiting(c, job_id)
        r = c.delete(f"/v1/train/{job_id}")
        assert r.status_code == 202, r.text
        # Without the cancel, this job would end `failed`/`pending` after PENDING_TIMEOUT_S.
        record = ended(c, job_id, timeout=PENDING_TIMEOUT_S + 120)
        assert record["status"] == "cancelled" and record["reason"] == CANCELLED_ON_REQUEST, \
            record
        # The next job starts (409 only for the moment the ended job's thread takes to exit):
        # it takes the job lock and reaches the wait for resources.
        def started() -> str | None:
            r = c.post("/v1/train", json={"epochs": 1})
            assert r.status_code in (202, 409), r.text
            return str(r.json()["job_id"]) if r.status_code == 202 else None

        next_id = wait_for(started, timeout=30, what="the next job to start")
        waiting(c, next_id)
        assert c.delete(f"/v1/train/{next_id}").status_code == 202
        assert ended(c, next_id, timeout=PENDING_TIMEOUT_S + 120)["status"] == "cancelled"


@pytest.mark.slow
def test_the_schedule_starts_jobs_with_the_deployments_defaults(svc: RunningService,
                                                                 busy_cpu: None) -> None:
    with svc.client() as c:
        before = {j["job_id"] for j in c.get("/v1/train").json()["jobs"]}
        assert c.get("/v1/dataset").json()["new_since_last_job"] < MIN_NEW
        upload(c, MIN_NEW // 2, seed=2)

        def scheduled() -> dict[str, Any] | None:
            new = [j for j in c.get("/v1/train").json()["jobs"] if j["job_id"] not in before]
            return new[0] if new else None

        record = wait_for(scheduled, timeout=60, what="a scheduled job")
        assert record["source"] == "schedule"
        config = record["config"]
        assert {k: config[k] for k in SCHEDULE_DEFAULTS} == SCHEDULE_DEFAULTS, config
        assert config["gpu"] is False and config["backbone"] == BACKBONE
        waiting(c, record["job_id"])  # 2 workers: this cluster's CPUs, one held by the test
        assert c.delete(f"/v1/train/{record['job_id']}").status_code == 202
        assert ended(c, record["job_id"], timeout=PENDING_TIMEOUT_S + 120)["status"] \
            == "cancelled"
