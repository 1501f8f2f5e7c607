"""Model versions: list, manifest, plots, weights, activate (rollback or pin), and the
promotion policy.

Every change of CURRENT and of the policy goes through the registry, under its cross-process
lock (`training.registry`): activate, `PUT /v1/models/policy`, a job's promotion and retention
never undo one another.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from service import schemas
from service.api.clients import ClassifierClient
from service.api.deps import (
    ApiToken,
    ClassifierDep,
    PredictionsDep,
    RegistryDep,
    SettingsDep,
    StoreDep,
)
from service.api.errors import ModelLoadFailed, NotFound
from service.drift import version_drift
from service.predictions import PredictionStore
from training.dataset import DatasetStore
from training.errors import DomainError
from training.registry import InvalidVersion, Registry, VersionNotFound

log = logging.getLogger(__name__)

router = APIRouter(tags=["models"], dependencies=[ApiToken])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": schemas.ErrorPublic},
                                            409: {"model": schemas.ErrorPublic}}


class ActivationSuperseded(DomainError):
    """Another activate (or a job's promotion) changed CURRENT while this one was loading."""

    code = "activation_superseded"
    status = 409


def version_public(registry: Registry, version: str) -> schemas.VersionPublic:
    """The list view of one version: counts and headline figures, not the class list (v0
    alone has 1000 classes); `GET /v1/models/{version}` has the whole manifest."""
    m = registry.manifest(version)
    metrics = m.get("metrics") or {}
    return schemas.VersionPublic(
        version=version, created_at=m.get("created_at"), backbone=m.get("backbone"),
        class_count=len(m.get("classes") or []), val_accuracy=metrics.get("best_val_accuracy"),
        test_accuracy=(metrics.get("test") or {}).get("accuracy"),
        promoted=(m.get("promotion") or {}).get("promoted"))


def trial_public(registry: Registry, predictions: PredictionStore, store: DatasetStore,
                 replicas: list[str | None]) -> schemas.TrialPublic | None:
    """The trial (`Registry.trial`) with its live figures (`PredictionStore.trial_stats`,
    feedback labels read from the dataset as it is now), or None."""
    trial = registry.trial()
    if trial is None:
        return None

    def label_of(sha256: str) -> str | None:
        item = store.find(sha256)
        return item.label if item else None

    stats = predictions.trial_stats(trial["version"], registry.current(),
                                    float(trial.get("set_at") or 0.0), label_of)
    return schemas.TrialPublic(**{**trial, **stats}, replicas=replicas)


async def _trial_replicas(classifier: ClassifierClient) -> list[str | None]:
    statuses = await classifier.statuses()
    return [(s.get("trial") or {}).get("version") for s in statuses]


@router.get("/v1/models", response_model=schemas.ModelsPublic)
async def models(registry: RegistryDep, predictions: PredictionsDep, store: StoreDep,
                 classifier: ClassifierDep) -> schemas.ModelsPublic:
    """Every version kept, the current one, the policy, and the version on trial (`trial`:
    its mode, share and live figures; `replicas`: the trial version each replica follows)."""
    replicas = await _trial_replicas(classifier)

    def read() -> schemas.ModelsPublic:
        versions = []
        for v in registry.versions():
            try:
                versions.append(version_public(registry, v))
            except (VersionNotFound, InvalidVersion):
                continue  # removed by retention meanwhile, or unreadable
        return schemas.ModelsPublic(current=registry.current(),
                                    policy=schemas.PolicyPublic(**registry.policy()),
                                    versions=versions,
                                    trial=trial_public(registry, predictions, store, replicas))
    return await asyncio.to_thread(read)


@router.get("/v1/models/trial", response_model=schemas.TrialPublic | None)
async def trial(registry: RegistryDep, predictions: PredictionsDep, store: StoreDep,
                classifier: ClassifierDep) -> schemas.TrialPublic | None:
    """The version on trial with its live figures; null when none."""
    replicas = await _trial_replicas(classifier)
    return await asyncio.to_thread(trial_public, registry, predictions, store, replicas)


@router.put("/v1/models/trial", response_model=schemas.TrialPublic,
            responses={400: {"model": schemas.ErrorPublic}, **_ERRORS})
async def set_trial(body: schemas.TrialRequest, registry: RegistryDep,
                    predictions: PredictionsDep, store: StoreDep, classifier: ClassifierDep
                    ) -> schemas.TrialPublic:
    """Try `version` on live traffic beside the current one: `shadow` (it also classifies
    `share` of the requests that name no version, answers none; its agreement with the served
    answers and its accuracy on the labels that come back through feedback are tracked) or
    `canary` (it answers `share` of those requests; each answer names its version). Replaces
    any trial. Every replica loads it before the answer (`replicas`: a replica that could not
    load it shows null and keeps serving without it). Promotion is by hand: `POST
    /v1/models/{version}/activate` (which ends the trial); rollback: `DELETE
    /v1/models/trial`. 400 `invalid_trial` for the current version (or none current), 404 for
    a version not there, 409 for one whose weights are gone."""
    await asyncio.to_thread(registry.set_trial, body.version, body.mode, body.share, "api")
    statuses = await classifier.reload_all()
    replicas = [(s.get("trial") or {}).get("version") for s in statuses]
    out = await asyncio.to_thread(trial_public, registry, predictions, store, replicas)
    assert out is not None  # just set; only another PUT or a DELETE changes it
    return out


@router.delete("/v1/models/trial", response_model=schemas.TrialPublic | None)
async def end_trial(registry: RegistryDep, classifier: ClassifierDep
                    ) -> schemas.TrialPublic | None:
    """End the trial (the rollback of a canary): every replica stops using it before the
    answer. -> the trial that ended (without figures), or null when there was none."""
    ended = await asyncio.to_thread(registry.end_trial)
    await classifier.reload_all()
    return schemas.TrialPublic(**ended) if ended else None


@router.get("/v1/models/policy", response_model=schemas.PolicyPublic)
async def policy(registry: RegistryDep) -> schemas.PolicyPublic:
    return schemas.PolicyPublic(**await asyncio.to_thread(registry.policy))


@router.put("/v1/models/policy", response_model=schemas.PolicyPublic, responses=_ERRORS)
async def set_policy(body: schemas.PolicyRequest, registry: RegistryDep
                     ) -> schemas.PolicyPublic:
    """`{"mode": "automatic"}`: a job that passes the gate becomes CURRENT. `{"mode":
    "pinned"}`: pin the current version; jobs publish but never promote until the mode is
    automatic again. (To pin another version, activate it: activate pins by default.)"""
    return schemas.PolicyPublic(**await asyncio.to_thread(registry.set_policy, body.mode,
                                                          "api"))


@router.get("/v1/models/{version}")
async def model_manifest(version: str, registry: RegistryDep, predictions: PredictionsDep,
                         settings: SettingsDep) -> dict[str, Any]:
    """The version's manifest, and `drift`: its live answers against its held-out split
    (`service.drift`; null for a version published without a reference, such as v0)."""
    def read() -> dict[str, Any]:
        manifest = registry.manifest(version)
        return {**manifest, "drift": version_drift(registry, predictions, version, settings)}
    return await asyncio.to_thread(read)


@router.get("/v1/models/{version}/plots/{name}.png", response_class=FileResponse)
async def model_plot(version: str, name: str, registry: RegistryDep) -> FileResponse:
    manifest = await asyncio.to_thread(registry.manifest, version)
    folder = registry.version_dir(version)
    plots = manifest.get("plots") or []
    if name not in plots or not (folder / f"{name}.png").is_file():
        raise NotFound(f"{version} has no plot {name[:64]!r}; it has {plots}",
                       code="plot_not_found")
    return FileResponse(folder / f"{name}.png", media_type="image/png")


@router.get("/v1/models/{version}/weights", response_class=FileResponse, responses=_ERRORS)
async def model_weights(version: str, registry: RegistryDep) -> FileResponse:
    path, info = await asyncio.to_thread(registry.weights_file, version)
    return FileResponse(path, media_type="application/octet-stream", stat_result=info,
                        filename=f"visionloop-{version}.safetensors")


@router.post("/v1/models/{version}/activate", response_model=schemas.ActivatePublic,
             responses=_ERRORS)
async def activate(version: str, registry: RegistryDep, classifier: ClassifierDep,
                   pin: bool = Query(True, description="pin it (jobs publish but do not "
                                     "promote until the policy is automatic again); false: "
                                     "the policy becomes automatic")
                   ) -> schemas.ActivatePublic:
    """Point CURRENT at `version` (and pin it, unless `pin=false`) under the registry lock,
    then have every replica load it before answering. A version that is not there is 404 and
    one whose weights file is gone 409, CURRENT untouched. If a replica cannot load it,
    CURRENT and the policy go back to what they were (unless something changed CURRENT
    meanwhile) and the answer is 500. If another activate or a job's promotion changed
    CURRENT while the replicas were loading, that later change stands: 409
    `activation_superseded`, naming what is current."""
    activation = await asyncio.to_thread(registry.activate, version, pin, "api")
    statuses = await classifier.reload_all()
    served = [s.get("version") for s in statuses]
    if all(v == version for v in served):
        log.info("activated %s (was %s)", version, activation.previous)
        return schemas.ActivatePublic(current=version, replicas=served,
                                      policy=schemas.PolicyPublic(**activation.policy))
    now = await asyncio.to_thread(registry.current)
    if now != version:
        raise ActivationSuperseded(f"CURRENT changed to {now} while {version} was loading "
                                   "(another activate or a job's promotion); that change "
                                   "stands")
    errors = [s.get("last_error") for s in statuses if s.get("version") != version]
    undone = await asyncio.to_thread(registry.undo_activation, activation)
    await classifier.reload_all()
    stays = activation.previous if undone else await asyncio.to_thread(registry.current)
    raise ModelLoadFailed(f"{version} could not be loaded by every replica ({errors}); "
                          f"CURRENT stays {stays}")
