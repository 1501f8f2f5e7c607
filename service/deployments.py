"""Ray Serve deployments: thin wrappers of the plain classes.

Two deployments:
- `Ingress` ("the API replicas"): the FastAPI app of `service.api` *and* a `Classifier`, in the
  same process. A prediction is decoded and classified in the replica that parsed the request:
  no second Serve call, no image bytes crossing the object store. A separate classifier
  deployment behind the ingress cost the ingress real CPU per request, most of it Serve's router
  and the handle call (measured: README, Performance); merged, that work is gone. Scale with
  `VISIONLOOP_CLASSIFIER_REPLICAS`; every replica serves the whole API.
- `TrainingController`: one replica, the single `TrainingController` of the application.

Work that concerns every replica (readiness, activate, /metrics) fans out over the replica's
own deployment handle with `broadcast`. Domain errors cross the handles as exceptions
(`DomainError`); Ray wraps them, `unwrap_domain_error` gives the original back.

Resource plan (README, Configuration): every Serve actor here asks for `num_cpus=0` by default
(the API replica's share is `VISIONLOOP_CLASSIFIER_CPUS`), so the cluster's logical CPUs stay
free for Ray Train workers (1 CPU each): on a 2-CPU machine a 2-worker job starts while the
service answers. The actors still use real cores; the classifier bounds its own use with
`torch.set_num_threads(VISIONLOOP_CLASSIFIER_THREADS)` and runs one inference batch at a time.
A replica asks for `VISIONLOOP_CLASSIFIER_GPUS` of a GPU when set.

How many replicas, how many threads each (`classifier_plan`): what the settings say, and where
they say nothing, what the machine has. One replica per core, one thread each, because a
replica runs one batch at a time and its request handling is Python (one core's worth); more
replicas use more cores where one replica with more threads leaves the decoding and HTTP work
on one. Capped at MAX_AUTO_REPLICAS and at one per REPLICA_MEMORY_ALLOWANCE of available memory
(each replica holds its own torch, model and engine); cores beyond the replicas go to their
threads. An explicit value wins and the other follows it: given replicas, threads are the
cores each gets; given threads, replicas are the cores over the threads. On a GPU
(`VISIONLOOP_CLASSIFIER_GPUS` set) one replica, the GPU's share, as before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from service.api import create_api
from service.api.clients import first_result
from service.api.metrics import Metrics
from service.classifier import Classifier, Prediction, Request
from service.controller import TrainingController
from service.security import ensure_api_token
from service.settings import Settings
from training.errors import DomainError

log = logging.getLogger(__name__)

T = TypeVar("T")


async def unwrap_domain_error(call: Awaitable[T]) -> T:
    """Await a handle call; a DomainError raised in the replica is raised here as itself
    (Ray delivers it wrapped in a RayTaskError whose message is the remote traceback)."""
    try:
        return await call
    except RayTaskError as exc:
        if isinstance(exc.cause, DomainError):
            raise exc.cause from None
        raise


# `classifier_plan`'s caps on the automatic replica count (see the module's docstring).
MAX_AUTO_REPLICAS = 8
REPLICA_MEMORY_ALLOWANCE = 2 * 1024**3


def machine_cores() -> int:
    """The CPU cores of this machine as Ray counts them (cgroup limits of a container
    included)."""
    from ray._private.utils import get_num_cpus

    return max(1, int(get_num_cpus()))


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def classifier_plan(settings: Settings, cores: int | None = None, memory: int | None = None
                    ) -> Settings:
    """`settings` with `classifier_replicas` and `classifier_threads` set: the explicit values,
    else the machine's (`cores`, `memory` in bytes: this machine's when not given). The rule is
    in the module's docstring; an explicit value always wins, the other one follows it."""
    if settings.classifier_replicas is not None and settings.classifier_threads is not None:
        return settings
    cores = machine_cores() if cores is None else cores
    replicas = settings.classifier_replicas
    if replicas is None:
        if settings.classifier_gpus > 0:
            replicas = 1
        else:
            memory = available_memory() if memory is None else memory
            per_core = cores // (settings.classifier_threads or 1)
            replicas = max(1, min(per_core, MAX_AUTO_REPLICAS,
                                  memory // REPLICA_MEMORY_ALLOWANCE))
    threads = settings.classifier_threads or max(1, cores // replicas)
    return settings.model_copy(update={"classifier_replicas": replicas,
                                       "classifier_threads": threads})


@serve.deployment(name="Ingress", health_check_period_s=5)
@serve.ingress()
class IngressDeployment:
    """One API replica: the FastAPI app, a `Classifier` (batched predictions with
    `@serve.batch`, decoding and inference in one worker thread off the event loop), CURRENT
    polled every `reload_poll_s` in a second thread, and `status` / `reload` / `metrics_text`
    for the broadcasts."""

    def __init__(self, settings: Settings, controller: DeploymentHandle):
        import torch

        self.settings = settings
        self.api_token, _ = ensure_api_token(settings.home, settings.api_token)
        self.controller = ServeControllerClient(controller)
        device = "cuda" if settings.classifier_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.classifier = Classifier(settings.home, device=device,
                                     max_pixels=settings.max_pixels,
                                     threads=settings.classifier_threads)
        self.classifier.sync()
        self.metrics = Metrics(settings)
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        batched: Any = self._predict_batch
        batched.set_max_batch_size(settings.max_batch_size)
        batched.set_batch_wait_timeout_s(settings.batch_wait_s)
        self._stop = threading.Event()
        self._poll_s = settings.reload_poll_s
        self._peers: DeploymentHandle | None = None
        threading.Thread(target=self._poll, name="reload-poll", daemon=True).start()

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self.settings, self.api_token, ReplicaClassifierClient(self),
                          self.controller, self.metrics)

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.classifier.sync()
            except Exception:
                log.exception("reload poll")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, items: list[Request]) -> list[Prediction | DomainError]:
        loop = asyncio.get_running_loop()
        return list(await loop.run_in_executor(self._inference,
                                               self.classifier.predict_requests, items))

    async def predict(self, data: bytes, top_k: int, version: str | None = None
                      ) -> Prediction:
        """One image's bytes -> its Prediction (batched with other calls); raises its
        ImageError, ModelNotLoaded, or for a named `version` VersionNotFound / InvalidVersion.

        A named version (`?version=`) is answered by this replica, still one Serve hop: it is
        loaded first in a thread of its own (`Classifier.model_for`: kept in a small LRU of
        other versions), so the inference thread never waits for that load; then the request
        joins the same `@serve.batch` as the others, and each batch runs one forward pass per
        version in it (`Classifier.predict_requests`)."""
        if version is not None:
            await asyncio.to_thread(self.classifier.model_for, version)
        return first_result([await self._predict_batch((data, top_k, version))])

    def peers(self) -> DeploymentHandle:
        """A handle on this deployment (every replica, this one included), for broadcasts."""
        if self._peers is None:
            ctx = serve.get_replica_context()
            self._peers = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        return self._peers

    def status(self) -> dict[str, Any]:
        return self.classifier.status()

    async def reload(self) -> dict[str, Any]:
        """Sync to CURRENT now (retrying a version that failed before); -> status."""
        await asyncio.to_thread(self.classifier.sync, True)
        return self.classifier.status()

    def metrics_text(self) -> str:
        """This replica's request metrics, Prometheus text (summed over replicas by /metrics)."""
        return self.metrics.replica_text()

    def __del__(self) -> None:
        self._stop.set()


class ReplicaClassifierClient:
    """`service.api.clients.ClassifierClient` for the classifier in this replica; the calls
    about every replica go through `broadcast` on the deployment's own handle."""

    def __init__(self, replica: IngressDeployment):
        self.replica = replica

    async def predict(self, data: bytes, top_k: int, version: str | None = None
                      ) -> Prediction:
        return await self.replica.predict(data, top_k, version)

    async def statuses(self) -> list[dict[str, Any]]:
        return await self.replica.peers().broadcast("status").results_async(timeout_s=10)

    async def reload_all(self) -> list[dict[str, Any]]:
        return await self.replica.peers().broadcast("reload").results_async(timeout_s=300)

    async def replica_metrics(self) -> list[str]:
        return await self.replica.peers().broadcast("metrics_text").results_async(timeout_s=10)


@serve.deployment(name="TrainingController", num_replicas=1,
                  ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class ControllerDeployment:
    """The single `TrainingController` of the application; its schedule runs in a thread.
    Its refusals (InvalidTrainRequest, DatasetTooSmall, InsufficientResources, JobRunning,
    JobNotFound, JobNotResumable) are raised to the caller as they are. On start it marks a
    job a crash interrupted and, with `VISIONLOOP_RESUME_INTERRUPTED`, resumes it."""

    def __init__(self, settings: Settings):
        self.controller = TrainingController(settings)
        self.controller.run_background(poll_s=1.0)

    async def start(self, overrides: dict[str, Any], source: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.controller.start, overrides, source)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.controller.cancel, job_id)

    async def resume(self, job_id: str, source: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.controller.resume, job_id, source)

    def __del__(self) -> None:
        self.controller.stop()


class ServeControllerClient:
    """`service.api.clients.ControllerClient` over the controller deployment's handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def start(self, overrides: dict[str, Any], source: str) -> dict[str, Any]:
        return await unwrap_domain_error(self.handle.start.remote(overrides, source))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await unwrap_domain_error(self.handle.cancel.remote(job_id))

    async def resume(self, job_id: str, source: str) -> dict[str, Any]:
        return await unwrap_domain_error(self.handle.resume.remote(job_id, source))
