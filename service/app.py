"""The map of the service.

Request flow:

    client ─HTTP─▶ Serve proxy ─▶ API replicas (IngressDeployment: FastAPI app + Classifier; N)
                                  │ RequestGuard (service.api.guard): in-flight bound (503),
                                  │   body bytes (413), request metrics
                                  │ token checks (service.api.deps): API token; predict open or
                                  │   its token
                                  ├─ routes/predict ─▶ the Classifier in the same replica
                                  │     header probe (415/413), then one call per image;
                                  │     @serve.batch groups them; decode + inference in a
                                  │     worker thread; each answer names its model version;
                                  │     images kept in predictions/ for feedback and review
                                  ├─ routes/labels, routes/review ─▶ DatasetStore, PredictionStore
                                  ├─ routes/training: GET ─▶ JobStore (volume);
                                  │     POST, DELETE ─▶ TrainingController (one replica)
                                  │     run_job in a thread ─▶ Ray Train TorchTrainer workers
                                  │     schedule tick every second; retention every minute
                                  ├─ routes/ops: /readyz, /metrics ─▶ broadcast to every replica
                                  │     (status, request metrics summed)
                                  ├─ routes/models: list, manifest, plots, weights ─▶ Registry;
                                  │     activate ─▶ CURRENT (+ POLICY), then broadcast `reload`;
                                  │     trial ─▶ TRIAL, then broadcast `reload`
                                  ├─ routes/exchange: explain (Grad-CAM in the replica), dataset
                                  │     export/import, ONNX/pt2 downloads, predict-dir jobs
                                  │     ─▶ a detached Ray actor running Ray Data
                                  └─ routes/web: the page at / and job progress as SSE

    Every refusal is a `training.errors.DomainError` (code + status), raised where it is found
    (in a replica, in the controller behind its handle, in the stores) and answered by the one
    handler of `service.api.errors` as {"error": {"code", "message"}}.

    The classifier lives in the API replicas (no second Serve hop per image): see
    `service.deployments`. A published model reaches the classifiers through models/CURRENT:
    each replica polls it about every second (and reloads at once on the activate broadcast),
    loads and checks the new version, then swaps one reference.

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
    # in compose. It answers faster than the Python proxy (benchmarks/serving.py; figures in the
    # README, Performance), but Ray 2.60's HAProxy also binds its stats page (8404) and metrics
    # (9101) on every interface: against our rule that nothing but the API is exposed on a
    # host, and two services on one machine collide. Inside a compose network those ports are
    # not published, hence on there.
    "RAY_SERVE_ENABLE_HA_PROXY": "0",
    # With HAProxy, a stopping API replica first waits this long for the front end to stop
    # routing to it (Ray 2.60's default: 30 s, on every stop); the front end runs beside the
    # replicas and learns of it at once. docker-compose.yml sets the same.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
}


def serve_environment() -> None:
    for key, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def prepare_home(settings: Settings) -> tuple[Settings, Path | None]:
    """Before the replicas start: an absolute home (actors may run in another directory),
    the API token generated when none is configured, leftovers of killed publishers removed,
    version 0 published on a fresh volume. -> (settings, token file or None). Raises
    `service.security.TokenFileError` first thing when the volume's token file exists but
    cannot be used (empty, unreadable, ...): the start stops, naming it."""
    settings = settings.model_copy(update={"home": Path(settings.home).resolve()})
    settings.home.mkdir(parents=True, exist_ok=True)
    _, token_file = ensure_api_token(settings.home, settings.api_token)
    registry = Registry(settings.home)
    registry.remove_stale_partials()
    if registry.ensure_v0(settings.backbone):
        log.info("published version 0 (pretrained %s ImageNet classifier)",
                 registry.manifest("v0")["backbone"])
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
