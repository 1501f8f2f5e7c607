"""The map of the service.

Request flow:

    client ─HTTP─▶ Serve proxy ─▶ Ingress replicas (FastAPI, service.api; N of them)
                                  │ RequestGuard: in-flight bound (503), body bytes (413), metrics
                                  │ auth (service.security): API token; predict open or its token
                                  ├─ POST /v1/predict ─▶ the Classifier in the same replica
                                  │     header probe (415/413), then one call per image;
                                  │     @serve.batch groups them; decode + inference in a
                                  │     worker thread; each answer names its model version;
                                  │     images kept in predictions/ for feedback and review
                                  ├─ /v1/labels, /v1/feedback ─▶ DatasetStore.ingest (volume)
                                  ├─ /v1/dataset, /v1/review, GET /v1/train, /v1/models ─▶ volume
                                  ├─ POST, DELETE /v1/train ─▶ TrainingController (one replica)
                                  │     run_job in a thread ─▶ Ray Train TorchTrainer workers
                                  │     schedule tick every second; retention every minute
                                  ├─ /readyz, /metrics ─▶ broadcast to every replica (status,
                                  │     request metrics summed)
                                  └─ POST /v1/models/{v}/activate ─▶ CURRENT, then broadcast
                                        `reload` to every replica

    The classifier lives in the ingress replicas (no second Serve hop per image): see
    `service.deployments` for why and what it cost before.
    A published model reaches the classifiers through models/CURRENT: each replica polls it about
    every second (and reloads at once on the activate broadcast), loads and checks the new
    version, then swaps one reference.

Resource plan: see `service.deployments` (Serve actors take 0 CPUs; training takes the rest).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray.serve import Application

from service.deployments import ControllerDeployment, IngressDeployment
from service.security import ensure_api_token
from service.settings import Settings
from training.registry import Registry

log = logging.getLogger(__name__)

APP_NAME = "visionloop"


# Ray Serve settings read from the environment of the Ray processes, so they must be in place
# before the local cluster starts (`serve_environment`), or in the environment of every
# `ray start` of an existing cluster (docker-compose.yml passes them). A value already set wins.
SERVE_ENVIRONMENT = {
    # Serve's HAProxy front end is opt-in for `visionloop up` (RAY_SERVE_ENABLE_HA_PROXY=1) and on
    # in compose. Measured here (2 cores, benchmarks/serving.py, a no-op handler, 1 client) it
    # answers in 1.7 ms against 10.3 ms for the Python proxy, but Ray 2.60's HAProxy also binds
    # its stats page (8404) and metrics (9101) on every interface: against our rule that nothing
    # but the API is exposed on a host, and two services on one machine collide. Inside a
    # compose network those ports are not published, hence on there.
    "RAY_SERVE_ENABLE_HA_PROXY": "0",
}


def serve_environment() -> None:
    for key, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def prepare_home(settings: Settings) -> tuple[Settings, Path | None]:
    """Before the replicas start: an absolute home (actors may run in another directory),
    leftovers of killed publishers removed, version 0 published on a fresh volume, the API
    token generated when none is configured. -> (settings, token file or None)."""
    settings = settings.model_copy(update={"home": Path(settings.home).resolve()})
    settings.home.mkdir(parents=True, exist_ok=True)
    registry = Registry(settings.home)
    registry.remove_stale_partials()
    if registry.ensure_v0(settings.backbone):
        log.info("published version 0 (pretrained %s ImageNet classifier)",
                 registry.manifest("v0")["backbone"])
    _, token_file = ensure_api_token(settings.home, settings.api_token)
    return settings, token_file


def build_app(settings: Settings) -> Application:
    controller_d: Any = ControllerDeployment  # Serve deployments (mypy sees the classes)
    ingress_d: Any = IngressDeployment
    controller = controller_d.bind(settings)
    return ingress_d.options(
        num_replicas=settings.classifier_replicas,
        ray_actor_options={"num_cpus": settings.classifier_cpus,
                           "num_gpus": settings.classifier_gpus},
        max_ongoing_requests=settings.max_in_flight + 64,  # room above our bound: overload is
    ).bind(settings, controller)                           # ours (503), not Serve's
