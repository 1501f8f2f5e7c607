"""The dataset: labelled uploads, removal, counts."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from service import schemas
from service.api.deps import ApiToken, JobsDep, StoreDep
from service.api.errors import NotFound
from service.api.uploads import LabelUpload
from service.controller import new_since_last_job

router = APIRouter(tags=["dataset"], dependencies=[ApiToken])

_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["label", "files"], "properties": {
        "label": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


@router.post("/v1/labels", response_model=schemas.LabelsPublic, openapi_extra=_BODY)
async def add_labels(upload: LabelUpload, store: StoreDep) -> schemas.LabelsPublic:
    results = []
    for _, data in upload.files:
        r = await asyncio.to_thread(store.ingest, data, upload.label, "upload")
        results.append(schemas.LabelResultPublic(sha256=r.sha256, label=r.label,
                                                 status=r.status))
    return schemas.LabelsPublic(results=results)


@router.delete("/v1/labels/{sha256}")
async def delete_label(sha256: str, store: StoreDep) -> dict[str, Any]:
    if not await asyncio.to_thread(store.delete, sha256, "api"):
        raise NotFound(f"no image {sha256!r} in the dataset", code="image_not_found")
    return {"sha256": sha256, "deleted": True}


@router.get("/v1/dataset", response_model=schemas.DatasetPublic)
async def dataset(store: StoreDep, jobs: JobsDep) -> schemas.DatasetPublic:
    counts = await asyncio.to_thread(store.counts)
    new = await asyncio.to_thread(new_since_last_job, store, jobs)
    return schemas.DatasetPublic(labels=counts, total=sum(counts.values()),
                                 new_since_last_job=new)
