"""What a training job asks of the Ray cluster: checked before the job is accepted, and waited
for, bounded and cancellable, before `TorchTrainer.fit()`.

Why: Ray Train 2.60 (Train V2, its default) starts a job by creating one placement group of
`workers` bundles of `worker_resources(cfg)` (strategy PACK), waits 60 s for it
(`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`), and retries that without end
(`FailureConfig.controller_failure_limit` is -1); its own feasibility check runs only on
autoscaling clusters that publish a cluster config. So a job the cluster cannot hold (`gpu` on a
CPU-only cluster, more workers than CPUs) or cannot hold *now* (others hold the CPUs) waited for
ever inside `fit()`: it held the volume's job lock, its workers, which poll the cancel file,
never started, so cancel could not stop it, and scheduled retraining stalled until a restart.

1. `check_cluster(cfg)` compares the job with what the cluster *has* (alive nodes, not what is
   free now): every worker's bundle must fit on one node (a worker's CPU and GPU are on the same
   machine), so the check packs bundles per node, not only against the totals. A shortfall is
   `InsufficientResources` (400) naming what is missing and what to change; the controller and
   `visionloop train` run it before a record is written. On an autoscaling cluster (one that
   publishes its cluster config, as Ray Train's own check reads it) the bound is the most the
   autoscaler can provide, and per-node packing is left to it. A process not connected to Ray
   has no cluster to ask (the in-process API of the route tests): the check is skipped there and
   runs again in `wait_for_resources` once the job runs on Ray.
2. `wait_for_resources(cfg, jobs, job_id, timeout_s)` runs right before `fit()`: it reserves the
   same bundles with a placement group of its own and waits for it in short slices, polling the
   job's cancel file. Ready: the group is removed and `fit()` creates Ray Train's (the few
   milliseconds between the two are the one window this cannot close; nothing in this service
   takes CPUs then: Serve's actors ask for none). Cancelled meanwhile: the job ends `cancelled`
   at once. Still pending after `timeout_s` (`VISIONLOOP_TRAIN_PENDING_TIMEOUT_S`): it ends
   `failed` with reason `pending` and an error saying what was missing. Either way the caller
   (`run_job`) returns, so the job lock is released. While it waits, the record carries
   `pending: {"since", "needs", "timeout_s", "until"}` (`until` null while waiting).

A job that failed pending never trained, so its `ledger_offset` is cleared: the labels it would
have used still count as new, and the next scheduled tick tries again. A cancelled job keeps it
(cancelling is a decision about those labels, as for a job cancelled while training).

Ray is imported inside the functions: importing this module costs nothing (the controller and
the settings import it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from training.config import TrainConfig
from training.errors import DomainError
from training.jobs import CANCELLED_ON_REQUEST, JobStore

log = logging.getLogger(__name__)

DEFAULT_PENDING_TIMEOUT_S = 600.0
PLACEMENT_STRATEGY = "PACK"  # Ray Train's default for its worker group: ours must match
POLL_S = 0.5  # how often a pending job looks at its cancel file
REASON_PENDING = "pending"
REASON_INSUFFICIENT = "insufficient_resources"

# Ray resource name -> the words a message uses (singular, plural).
_NAMES = {"CPU": ("CPU", "CPUs"), "GPU": ("GPU", "GPUs")}


class InsufficientResources(DomainError, ValueError):
    """The Ray cluster cannot hold this job's workers, however long it waits."""

    code = "insufficient_resources"
    status = 400


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """The Ray resources of one training worker: 1 CPU, plus 1 GPU when `cfg.gpu`."""
    return {"CPU": 1.0, **({"GPU": 1.0} if cfg.gpu else {})}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _amount(x: float, resource: str) -> str:
    """`2 CPUs`, `1 GPU`, `0.5 GPUs`, `3 memory`."""
    one, many = _NAMES.get(resource, (resource, resource))
    return f"{_num(x)} {one if x == 1 else many}"


def _per_worker(per_worker: Mapping[str, float]) -> str:
    return " + ".join(_amount(v, r) for r, v in per_worker.items())


def _fits(resources: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """How many workers of `per_worker` one node with `resources` holds at once."""
    counts = [int((resources.get(r, 0.0) + 1e-9) // need) for r, need in per_worker.items()
              if need > 0]
    return min(counts) if counts else 0


def _hint(per_worker: Mapping[str, float], workers: int, can_hold: int, short: list[str]
          ) -> str:
    options = []
    if "GPU" in short:
        options.append('train without a GPU ({"gpu": false}; the deployment\'s default is '
                       "VISIONLOOP_TRAIN_GPU)")
    if 0 < can_hold < workers:
        options.append(f'ask for at most {can_hold} worker(s) ({{"workers": {can_hold}}}; the '
                       "deployment's default is VISIONLOOP_TRAIN_WORKERS)")
    options.append("add Ray nodes with " + " and ".join(_NAMES.get(r, (r, r))[1] for r in
                                                         (short or list(per_worker))))
    return "; ".join(options)


def shortfall(nodes: Sequence[tuple[str, Mapping[str, float]]], per_worker: Mapping[str, float],
              workers: int) -> str | None:
    """Why `workers` workers of `per_worker` (Ray resources) can never run at once on `nodes`
    ((name, total resources) of each alive node), or None when they can. Pure: the message
    logic of `check_cluster`, testable without Ray."""
    totals = {r: sum(res.get(r, 0.0) for _, res in nodes) for r in per_worker}
    can_hold = sum(_fits(res, per_worker) for _, res in nodes)
    if can_hold >= workers:
        return None
    need = f"{_per_worker(per_worker)} per worker x {workers} worker(s)"
    short = [r for r, v in per_worker.items() if totals[r] + 1e-9 < v * workers]
    if short:
        missing = ", ".join(f"{_amount(per_worker[r] * workers, r)} needed, "
                            f"{_num(totals[r])} in the cluster" for r in short)
        what = (f"the cluster has {' and '.join(_amount(totals[r], r) for r in per_worker)} in "
                f"all; this job needs {need} ({missing})")
    else:
        layout = "; ".join(f"{name}: {', '.join(_amount(res.get(r, 0.0), r) for r in per_worker)}"
                           for name, res in nodes) or "no alive node"
        what = (f"this job needs {need}, and each worker's resources must be on one node; the "
                f"cluster's nodes hold {can_hold} such worker(s) at once ({layout})")
    return f"{what}. To run it: {_hint(per_worker, workers, can_hold, short)}"


def autoscaling_shortfall(max_resources: Mapping[str, float], per_worker: Mapping[str, float],
                          workers: int) -> str | None:
    """As `shortfall`, against the most an autoscaling cluster can provide (totals only: the
    autoscaler decides where nodes go)."""
    short = [r for r, v in per_worker.items() if max_resources.get(r, 0.0) + 1e-9 < v * workers]
    if not short:
        return None
    missing = ", ".join(f"{_amount(per_worker[r] * workers, r)} needed, at most "
                        f"{_num(max_resources.get(r, 0.0))} in the cluster" for r in short)
    return (f"this job needs {_per_worker(per_worker)} per worker x {workers} worker(s), more "
            f"than this autoscaling cluster can provide ({missing}). To run it: "
            f"{_hint(per_worker, workers, 0, short)}")


def _autoscaling_max() -> dict[str, float] | None:
    """The most each resource can reach on an autoscaling cluster, as Ray Train's own check
    reads it (Ray's state API, private in 2.60); None on a fixed-size cluster."""
    try:
        from ray._private import state

        found = state.state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: when it moves, fall back to the nodes alive now
        log.debug("no cluster config", exc_info=True)
        return None
    return {k: float(v) for k, v in found.items()} if found else None


def cluster_nodes() -> list[tuple[str, dict[str, float]]]:
    """(address, total resources) of every alive node of the connected Ray cluster."""
    import ray

    return [(str(n.get("NodeManagerAddress") or n.get("NodeID", "?")),
             {k: float(v) for k, v in (n.get("Resources") or {}).items()})
            for n in ray.nodes() if n.get("Alive")]


def check_cluster(cfg: TrainConfig) -> None:
    """Raise InsufficientResources (400) when the connected Ray cluster can never hold the
    job's workers at once; do nothing when it can, or when this process is not connected to
    Ray (see the module's docstring)."""
    import ray

    if not ray.is_initialized():
        return
    per_worker = worker_resources(cfg)
    max_resources = _autoscaling_max()
    problem = (autoscaling_shortfall(max_resources, per_worker, cfg.workers)
               if max_resources else shortfall(cluster_nodes(), per_worker, cfg.workers))
    if problem:
        raise InsufficientResources(f"this training job cannot run on this Ray cluster: "
                                    f"{problem}")


def _free_now(per_worker: Mapping[str, float]) -> str:
    """`1 of 2 CPUs free now`, for each resource a worker needs."""
    import ray

    free = ray.available_resources()
    total = ray.cluster_resources()
    return ", ".join(f"{_num(free.get(r, 0.0))} of {_amount(total.get(r, 0.0), r)} free now"
                     for r in per_worker)


def wait_for_resources(cfg: TrainConfig, jobs: JobStore, job_id: str,
                       timeout_s: float = DEFAULT_PENDING_TIMEOUT_S, poll_s: float = POLL_S
                       ) -> dict[str, Any] | None:
    """Wait until the cluster has the job's workers free at once, for at most `timeout_s`.
    -> None when they are (call `fit()` next), or the job's final record when it ended here:
    `cancelled` (asked for before or while waiting), or `failed` with reason `pending` (timed
    out) or `insufficient_resources` (the cluster can no longer hold it). Ray must be
    connected."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if jobs.cancel_requested(job_id):
        return jobs.finish(job_id, "cancelled", CANCELLED_ON_REQUEST)
    try:
        check_cluster(cfg)
    except InsufficientResources as exc:
        return jobs.finish(job_id, "failed", REASON_INSUFFICIENT, error=str(exc),
                           ledger_offset=None)
    per_worker = worker_resources(cfg)
    needs = f"{_per_worker(per_worker)} per worker x {cfg.workers} worker(s)"
    pg = placement_group([dict(per_worker)] * cfg.workers, strategy=PLACEMENT_STRATEGY)
    ready = pg.ready()
    since, deadline = time.time(), time.monotonic() + timeout_s
    pending: dict[str, Any] | None = None
    try:
        while True:
            done, _ = ray.wait([ready], timeout=poll_s)
            if done:
                if pending is not None:
                    jobs.update(job_id, pending={**pending, "until": time.time()})
                    log.info("job %s: resources free after %.0f s", job_id, time.time() - since)
                return None
            if pending is None:  # only a job that really waits says so in its record
                pending = {"since": since, "needs": needs, "timeout_s": timeout_s,
                           "until": None}
                jobs.update(job_id, pending=pending)
                log.info("job %s: waiting up to %.0f s for %s", job_id, timeout_s, needs)
            if jobs.cancel_requested(job_id):
                return jobs.finish(job_id, "cancelled", CANCELLED_ON_REQUEST)
            if time.monotonic() >= deadline:
                error = (f"waited {_num(round(timeout_s))} s for {needs} and the cluster never "
                         f"had them free at once ({_free_now(per_worker)}; "
                         "other work holds the rest). Try again later, ask for fewer workers, "
                         "or raise VISIONLOOP_TRAIN_PENDING_TIMEOUT_S")
                log.warning("job %s: %s", job_id, error)
                return jobs.finish(job_id, "failed", REASON_PENDING, error=error,
                                   ledger_offset=None)
    finally:
        remove_placement_group(pg)
