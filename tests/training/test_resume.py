"""A training job resumed after the process running it was SIGKILLed mid-job, on a real local
Ray cluster: the job runs in a process of its own (as `visionloop train` does), killed once a
checkpoint is committed; the training controller, started afterwards with
`VISIONLOOP_RESUME_INTERRUPTED` on, resumes it (`training.pipeline.resume_job`) from that
checkpoint's epoch, on the job's dataset snapshot, keeping the metrics of the epochs already
done."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.controller import TrainingController
from service.settings import load_settings
from tests.support.images import labelled_set
from tests.support.processes import descendants
from tests.support.service import BACKBONE
from tests.support.waiting import wait_for
from training.config import TrainConfig
from training.dataset import DatasetStore
from training.jobs import ACTIVE, JobNotResumable, JobStore
from training.pipeline import RUN_STATE_FILE, latest_checkpoint_epoch, resume_job, run_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4
# Small and quick, but each epoch long enough to kill the job between two checkpoints. The gate
# is not what this tests: the candidate need only match the majority-class baseline.
CFG = TrainConfig(backbone=BACKBONE, strategy="finetune", epochs=EPOCHS, workers=1,
                  batch_size=4, image_size=64, lr=0.05, threads=1, max_failures=0,
                  gate={"min_error_reduction": 0.0})

# The killed process: `run_job` on its own local Ray cluster, as `visionloop train` runs it.
JOB_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import ray

    from training.config import TrainConfig
    from training.pipeline import run_job

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    cfg = TrainConfig.model_validate_json(sys.argv[2])
    run_job(Path(sys.argv[1]), cfg, source="cli",
            on_started=lambda job_id: print(job_id, flush=True))
    print("FINISHED", flush=True)
""")


def _kill_mid_job(home: Path) -> tuple[str, int, list[dict]]:
    """Run a job in a process of its own and SIGKILL that process once a checkpoint is
    committed and epochs remain; its Ray processes go with it (Ray ties them to their
    parent's life on Linux; any left over are ours and are killed too). -> (job id, the
    checkpoint epoch Ray Train would restore, the progress file's metrics at the kill)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", JOB_SCRIPT, str(home), CFG.model_dump_json()],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().strip()
        assert job_id and job_id != "FINISHED", "the job did not start"
        jobs = JobStore(home)

        def mid_job() -> bool:
            assert proc.poll() is None, "the job ended before it could be killed"
            epoch = latest_checkpoint_epoch(run_dir(home, job_id))
            return epoch is not None and epoch < EPOCHS - 1

        wait_for(mid_job, timeout=300, interval=0.02, what="a committed checkpoint")
        ours = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in ours)

    try:
        wait_for(gone, timeout=30, interval=0.2, what="the job's Ray processes to exit")
    except TimeoutError:
        for pid in ours:  # started by this test's job process: ours to end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    epoch = latest_checkpoint_epoch(run_dir(home, job_id))
    assert epoch is not None and 1 <= epoch < EPOCHS
    return job_id, epoch, jobs.progress_metrics(job_id)


@pytest.mark.timeout(900)
def test_a_job_killed_mid_way_resumes_from_its_last_checkpoint_on_restart(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = DatasetStore(tmp_path)
    for label, data in labelled_set(["red", "blue"], 12):
        store.ingest(data, label)
    job_id, epoch, at_kill = _kill_mid_job(tmp_path)
    jobs = JobStore(tmp_path)
    left = jobs.get(job_id)
    assert left["status"] == "running" and not jobs.is_locked()  # its lock died with it
    assert store.snapshot_ids() == [job_id]  # its dataset snapshot is still there
    # Ray Train's own record of the run names that checkpoint with the metrics reported with it
    state = json.loads((run_dir(tmp_path, job_id) / RUN_STATE_FILE).read_text())
    assert state["latest_checkpoint_result"]["metrics"]["epoch"] == epoch
    done_before = [m for m in at_kill if m["epoch"] <= epoch]
    assert [m["epoch"] for m in done_before] == list(range(1, epoch + 1))
    # the dataset changes meanwhile (a third label): the resumed job trains on its snapshot
    for label, data in labelled_set(["green"], 6, seed=1):
        store.ingest(data, label)

    request.getfixturevalue("ray_cluster")  # a Ray cluster for the service, started now
    started = time.monotonic()
    controller = TrainingController(load_settings(home=tmp_path, backbone=BACKBONE))
    try:
        assert controller.running()
        resumed = jobs.get(job_id)
        assert resumed["status"] in ACTIVE and resumed["resumed_from_epoch"] == epoch
        assert resumed["metrics"] == done_before  # kept while it waits to run
        controller.wait(timeout=600)
    finally:
        controller.stop()
    record = jobs.get(job_id)
    print(f"\n[resume] killed with epoch {epoch}/{EPOCHS} checkpointed; resumed on restart "
          f"and {record['status']} in {time.monotonic() - started:.0f}s")
    assert record["status"] == "succeeded", record
    assert record["resumed_from_epoch"] == epoch
    assert [m["epoch"] for m in record["metrics"]] == list(range(1, EPOCHS + 1))
    assert record["metrics"][:epoch] == done_before  # the epochs done before the kill, as they were
    assert record["source"] == "cli" and record["started_at"] == left["started_at"]
    [resume] = record["resumes"]
    assert (resume["source"], resume["from_epoch"]) == ("restart", epoch)
    assert (resume["after"]["status"], resume["after"]["reason"]) == ("failed", "interrupted")
    assert record["attempts"][0]["resumed_from_epoch"] is None
    assert record["attempts"][-1]["resumed_from_epoch"] == epoch
    assert record["dataset"]["label_counts"] == {"blue": 12, "red": 12}  # its snapshot
    assert record["version"] == "v1"
    assert store.snapshot_ids() == []  # removed once the resumed job ended
    # a job that succeeded has nothing to resume
    with pytest.raises(JobNotResumable, match="succeeded"):
        resume_job(tmp_path, job_id)
