"""What the routes call besides the volume: the classifier and the training controller.

The routes depend on two small protocols. `service.deployments` implements them on Ray Serve
(the classifier of the same replica, broadcasts to every replica, the controller deployment
through its handle); the in-process implementations below serve one process with one
classifier and a controller in the same process: the API without Serve, which the route tests
run on (real stores, real model, `TestClient`). Both raise `DomainError`s, never answer with
error values.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from service.api.metrics import Metrics
from service.classifier import Classifier, Prediction
from service.controller import TrainingController
from training.errors import DomainError


class ClassifierClient(Protocol):
    async def predict(self, data: bytes, top_k: int, version: str | None = None
                      ) -> Prediction:
        """One image -> its Prediction by the served model, or by `version` (loaded by this
        replica: `Classifier.model_for`); raises ImageError (refused image), ModelNotLoaded,
        VersionNotFound or InvalidVersion."""

    async def statuses(self) -> list[dict[str, Any]]:
        """Every replica's `Classifier.status()`."""

    async def reload_all(self) -> list[dict[str, Any]]:
        """Every replica syncs to CURRENT now; -> their statuses."""

    async def replica_metrics(self) -> list[str]:
        """Every replica's own metrics (`Metrics.replica_text`)."""


class ControllerClient(Protocol):
    async def start(self, overrides: dict[str, Any], source: str) -> dict[str, Any]:
        """-> the new job's record; raises InvalidTrainRequest, DatasetTooSmall,
        InsufficientResources (the cluster can never hold it), JobRunning."""

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """-> the job's record; raises JobNotFound."""

    async def resume(self, job_id: str, source: str) -> dict[str, Any]:
        """-> the resumed job's record (`queued`); raises JobNotFound, JobRunning,
        JobNotResumable, InsufficientResources."""


def first_result(results: list[Prediction | DomainError]) -> Prediction:
    """The one answer of a single-image call: the Prediction, or its refusal raised."""
    [result] = results
    if isinstance(result, DomainError):
        raise result
    return result


class InProcessClassifier:
    """`ClassifierClient` on one `Classifier` in this process (a replica of one)."""

    def __init__(self, classifier: Classifier, metrics: Metrics):
        self.classifier, self.metrics = classifier, metrics
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def predict(self, data: bytes, top_k: int, version: str | None = None
                      ) -> Prediction:
        """A named version is loaded (if it is not already) in a thread of its own, so the
        inference thread never waits for a load."""
        if version is not None:
            await asyncio.to_thread(self.classifier.model_for, version)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._inference, self.classifier.predict_requests,
                                             [(data, top_k, version)])
        return first_result(list(results))

    async def statuses(self) -> list[dict[str, Any]]:
        return [self.classifier.status()]

    async def reload_all(self) -> list[dict[str, Any]]:
        await asyncio.to_thread(self.classifier.sync, True)
        return [self.classifier.status()]

    async def replica_metrics(self) -> list[str]:
        return [self.metrics.replica_text()]


class InProcessController:
    """`ControllerClient` on a `TrainingController` in this process."""

    def __init__(self, controller: TrainingController):
        self.controller = controller

    async def start(self, overrides: dict[str, Any], source: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.controller.start, overrides, source)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.controller.cancel, job_id)

    async def resume(self, job_id: str, source: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.controller.resume, job_id, source)
