"""`create_api`: the FastAPI app of one API replica.

Routes only translate HTTP to calls (`service.api.routes`, one router per resource):
predictions go to the classifier of this replica (readiness, activate and /metrics to every
replica), training starts and cancels to the training controller (both through the protocols
of `service.api.clients`), and everything else reads or writes the volume through the training
contract (`DatasetStore`, `Registry`, `JobStore`) and the prediction store directly.
In front of every route, `RequestGuard` bounds requests in flight and body bytes; every error
has the shape `{"error": {"code", "message"}}` (`service.api.errors`).
"""

from __future__ import annotations

from fastapi import FastAPI

from service import schemas
from service.api.clients import ClassifierClient, ControllerClient
from service.api.deps import Services
from service.api.errors import install_error_handlers
from service.api.guard import RequestGuard
from service.api.metrics import Metrics
from service.api.routes import api_router
from service.predictions import PredictionStore
from service.settings import Settings
from training.dataset import DatasetStore
from training.jobs import JobStore
from training.registry import Registry


def create_api(settings: Settings, api_token: str, classifier: ClassifierClient,
               controller: ControllerClient, metrics: Metrics | None = None) -> FastAPI:
    home = settings.home.resolve()
    services = Services(
        settings=settings, api_token=api_token,
        store=DatasetStore(home, settings.max_pixels), registry=Registry(home),
        jobs=JobStore(home),
        predictions=PredictionStore.from_settings(settings, home),
        metrics=metrics or Metrics(), classifier=classifier, controller=controller)
    app = FastAPI(
        title="visionloop",
        summary="Image classification that retrains itself: Ray Serve + Ray Train.",
        version="1",
        responses={400: {"model": schemas.ErrorPublic}, 401: {"model": schemas.ErrorPublic}},
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(api_router)
    app.add_middleware(RequestGuard, max_in_flight=settings.max_in_flight,
                       max_body=settings.max_upload_bytes, metrics=services.metrics)
    return app
