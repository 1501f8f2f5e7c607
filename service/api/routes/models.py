"""Model versions: list, manifest, plots, weights, and activate (rollback or pin)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service import schemas
from service.api.deps import ApiToken, ClassifierDep, RegistryDep
from service.api.errors import ModelLoadFailed, NotFound
from training.registry import WEIGHTS, InvalidVersion, Registry, VersionNotFound

log = logging.getLogger(__name__)

router = APIRouter(tags=["models"], dependencies=[ApiToken])


def version_public(registry: Registry, version: str) -> schemas.VersionPublic:
    m = registry.manifest(version)
    metrics = m.get("metrics") or {}
    return schemas.VersionPublic(
        version=version, created_at=m.get("created_at"), backbone=m.get("backbone"),
        classes=list(m.get("classes") or []), val_accuracy=metrics.get("best_val_accuracy"),
        promoted=(m.get("promotion") or {}).get("promoted"))


@router.get("/v1/models", response_model=schemas.ModelsPublic)
async def models(registry: RegistryDep) -> schemas.ModelsPublic:
    def read() -> schemas.ModelsPublic:
        versions = []
        for v in registry.versions():
            try:
                versions.append(version_public(registry, v))
            except (VersionNotFound, InvalidVersion):
                continue  # removed by retention meanwhile, or unreadable
        return schemas.ModelsPublic(current=registry.current(), versions=versions)
    return await asyncio.to_thread(read)


@router.get("/v1/models/{version}")
async def model_manifest(version: str, registry: RegistryDep) -> dict[str, Any]:
    return await asyncio.to_thread(registry.manifest, version)


@router.get("/v1/models/{version}/plots/{name}.png", response_class=FileResponse)
async def model_plot(version: str, name: str, registry: RegistryDep) -> FileResponse:
    manifest = await asyncio.to_thread(registry.manifest, version)
    folder = registry.version_dir(version)
    plots = manifest.get("plots") or []
    if name not in plots or not (folder / f"{name}.png").is_file():
        raise NotFound(f"{version} has no plot {name[:64]!r}; it has {plots}",
                       code="plot_not_found")
    return FileResponse(folder / f"{name}.png", media_type="image/png")


def weights_file(registry: Registry, version: str) -> tuple[Path, os.stat_result]:
    """The weights file of `version` and its stat, taken once here so that the response does
    not look again. Raises VersionNotFound (404) for a version that is not there, and
    InvalidVersion (409, naming the version) for one whose weights file is gone or is not a
    file: the version exists but cannot be downloaded (nor served)."""
    path = registry.version_dir(version) / WEIGHTS
    try:
        info = path.stat()
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise InvalidVersion(f"{version} is broken: its weights file {WEIGHTS} is missing from "
                             "the volume; activate or train another version")
    return path, info


@router.get("/v1/models/{version}/weights", response_class=FileResponse,
            responses={404: {"model": schemas.ErrorPublic}, 409: {"model": schemas.ErrorPublic}})
async def model_weights(version: str, registry: RegistryDep) -> FileResponse:
    path, info = await asyncio.to_thread(weights_file, registry, version)
    return FileResponse(path, media_type="application/octet-stream", stat_result=info,
                        filename=f"visionloop-{version}.safetensors")


@router.post("/v1/models/{version}/activate", response_model=schemas.ActivatePublic)
async def activate(version: str, registry: RegistryDep, classifier: ClassifierDep
                   ) -> schemas.ActivatePublic:
    """Point CURRENT at `version` and have every replica load it before answering. If a
    replica cannot load it, CURRENT goes back to what it was and the answer is 500. A version
    whose weights file is gone is refused first (409), CURRENT untouched."""
    await asyncio.to_thread(weights_file, registry, version)
    previous = registry.current()
    await asyncio.to_thread(registry.set_current, version)
    statuses = await classifier.reload_all()
    served = [s.get("version") for s in statuses]
    if any(v != version for v in served):
        errors = [s.get("last_error") for s in statuses if s.get("version") != version]
        if previous is not None:
            await asyncio.to_thread(registry.set_current, previous)
            await classifier.reload_all()
        raise ModelLoadFailed(f"{version} could not be loaded by every replica ({errors}); "
                              f"CURRENT stays {previous}")
    log.info("activated %s (was %s)", version, previous)
    return schemas.ActivatePublic(current=version, replicas=served)
