"""Dependencies of the routes: the stores, the clients and the token checks, as `Annotated`
aliases (`StoreDep`, `RegistryDep`, ...), so a route declares what it uses in its signature.

`create_api` puts one `Services` on `app.state`; every alias reads from it. The token checks use
FastAPI's `HTTPBearer`, so the OpenAPI document has a bearer security scheme (and /docs an
Authorize button); who may call what is `service.security.authorize`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.clients import ClassifierClient, ControllerClient
from service.api.metrics import Metrics
from service.predictions import PredictionStore
from service.security import authorize
from service.settings import Settings
from training.dataset import DatasetStore
from training.jobs import JobStore
from training.registry import Registry


@dataclass(frozen=True)
class Services:
    """Everything the routes use, built once per app (per API replica)."""

    settings: Settings
    api_token: str
    store: DatasetStore
    registry: Registry
    jobs: JobStore
    predictions: PredictionStore
    metrics: Metrics
    classifier: ClassifierClient
    controller: ControllerClient


# The dependencies here are `async def` although they never await: FastAPI runs a plain `def`
# dependency in its thread pool, a thread hop per dependency per request (five on a predict),
# which cost the API replicas ~2 ms of CPU per request (py-spy, benchmarks/serving.py).
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _part(name: str) -> Callable[[Services], Any]:
    """A dependency that gives one field of the app's `Services`."""
    async def get(s: ServicesDep) -> Any:
        return getattr(s, name)
    return get


SettingsDep = Annotated[Settings, Depends(_part("settings"))]
StoreDep = Annotated[DatasetStore, Depends(_part("store"))]
RegistryDep = Annotated[Registry, Depends(_part("registry"))]
JobsDep = Annotated[JobStore, Depends(_part("jobs"))]
PredictionsDep = Annotated[PredictionStore, Depends(_part("predictions"))]
MetricsDep = Annotated[Metrics, Depends(_part("metrics"))]
ClassifierDep = Annotated[ClassifierClient, Depends(_part("classifier"))]
ControllerDep = Annotated[ControllerClient, Depends(_part("controller"))]

bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="APIToken",
    description="The API token (VISIONLOOP_API_TOKEN, or the volume's secrets/api-token). "
                "Predict also takes VISIONLOOP_PREDICT_TOKEN, and is open when that is unset.")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else None


def _predict_token(s: Services) -> str | None:
    secret = s.settings.predict_token
    return secret.get_secret_value() if secret is not None else None


async def require_api_token(credentials: BearerCredentials, s: ServicesDep) -> None:
    """Every /v1 endpoint but predict: the API token (401 without it, 403 for the predict
    token)."""
    authorize(_token(credentials), s.api_token, _predict_token(s), "api")


async def require_predict_token(credentials: BearerCredentials, s: ServicesDep) -> None:
    """Predict: open unless a predict token is configured; then it or the API token."""
    authorize(_token(credentials), s.api_token, _predict_token(s), "predict")


ApiToken = Depends(require_api_token)
PredictToken = Depends(require_predict_token)
