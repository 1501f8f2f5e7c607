"""The dataset: labelled uploads, removal, counts, browsing, and renaming and merging labels.

- `POST /v1/labels`, `DELETE /v1/labels/{sha256}`, `GET /v1/dataset`: add, remove, count.
- `GET /v1/dataset/labels/{label}/images?offset=&limit=`: a label's images, newest first, a
  page at a time (`limit` at most `MAX_PAGE_LIMIT`), each with the URLs of its thumbnail and
  original, so a wrong image can be found and deleted without the upload's answer.
- `GET /v1/dataset/images/{sha256}` (the original bytes) and `.../thumbnail` (a JPEG of at most
  256 pixels a side, made once and kept in the volume's `cache/`).
- `POST /v1/dataset/labels/{label}/rename` `{"to"}` (409 when `to` has images: merge) and
  `.../merge` `{"into"}` (an existing label): every image moves, recorded in the ledger,
  all or nothing (`training.dataset`, module docstring).

A `{label}` in a path is the display name, percent-encoded (`Golden%20Retriever`); an unknown
label, or one that could not exist, is 404 `label_not_found`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Response

from service import schemas
from service.api.deps import ApiToken, JobsDep, StoreDep
from service.api.errors import NotFound
from service.api.uploads import LabelUpload
from service.controller import new_since_last_job
from service.predictions import MEDIA_TYPES

router = APIRouter(tags=["dataset"], dependencies=[ApiToken])

MAX_PAGE_LIMIT = 200

_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["label", "files"], "properties": {
        "label": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": schemas.ErrorPublic}}
_IMAGE_HEADERS = {"X-Content-Type-Options": "nosniff",  # the type we say, never a sniffed one
                  "Cache-Control": "private, max-age=3600"}


def _image_not_found(sha256: str) -> NotFound:
    return NotFound(f"no image {sha256!r} in the dataset", code="image_not_found")


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
        raise _image_not_found(sha256)
    return {"sha256": sha256, "deleted": True}


@router.get("/v1/dataset", response_model=schemas.DatasetPublic)
async def dataset(store: StoreDep, jobs: JobsDep) -> schemas.DatasetPublic:
    counts = await asyncio.to_thread(store.counts)
    new = await asyncio.to_thread(new_since_last_job, store, jobs)
    return schemas.DatasetPublic(labels=counts, total=sum(counts.values()),
                                 new_since_last_job=new)


@router.get("/v1/dataset/labels/{label}/images", response_model=schemas.DatasetImagesPublic,
            responses=_NOT_FOUND)
async def label_images(label: str, store: StoreDep,
                       offset: int = Query(0, ge=0, description="images to skip"),
                       limit: int = Query(50, ge=1, le=MAX_PAGE_LIMIT,
                                          description="images in this page")
                       ) -> schemas.DatasetImagesPublic:
    """A page of `label`'s images, newest first (then by sha256); past the end, none."""
    page = await asyncio.to_thread(store.page, label, offset, limit)
    return schemas.DatasetImagesPublic(
        label=page.label, total=page.total, offset=page.offset, limit=page.limit,
        images=[schemas.DatasetImagePublic(
            sha256=i.sha256, bytes=i.bytes, added_at=i.added_at,
            thumbnail_url=f"/v1/dataset/images/{i.sha256}/thumbnail",
            image_url=f"/v1/dataset/images/{i.sha256}") for i in page.images])


@router.get("/v1/dataset/images/{sha256}", response_class=Response,
            responses={**_NOT_FOUND, 200: {"content": {"image/jpeg": {}, "image/png": {},
                                                       "image/webp": {}},
                                           "description": "the stored original"}})
async def dataset_image(sha256: str, store: StoreDep) -> Response:
    """A stored image, byte for byte (JPEG, PNG or WebP, as the decoder judged it)."""
    found = await asyncio.to_thread(store.read_image, sha256)
    if found is None:
        raise _image_not_found(sha256)
    item, data = found
    return Response(data, media_type=MEDIA_TYPES[item.path.suffix.lstrip(".")],
                    headers=_IMAGE_HEADERS)


@router.get("/v1/dataset/images/{sha256}/thumbnail", response_class=Response,
            responses={**_NOT_FOUND, 200: {"content": {"image/jpeg": {}},
                                           "description": "at most 256 pixels a side"}})
async def dataset_thumbnail(sha256: str, store: StoreDep) -> Response:
    """A stored image as a JPEG of at most 256 pixels a side (cached on the volume)."""
    data = await asyncio.to_thread(store.thumbnail, sha256)
    if data is None:
        raise _image_not_found(sha256)
    return Response(data, media_type="image/jpeg", headers=_IMAGE_HEADERS)


@router.post("/v1/dataset/labels/{label}/rename", response_model=schemas.LabelChangePublic,
             responses={**_NOT_FOUND, 409: {"model": schemas.ErrorPublic}})
async def rename_label(label: str, body: schemas.LabelRenameRequest,
                       store: StoreDep) -> schemas.LabelChangePublic:
    """Give `label` a new name; every image moves. 409 `label_exists` when the new name has
    images (merge instead); 400 `invalid_label` for a name that breaks the rules."""
    change = await asyncio.to_thread(store.rename_label, label, body.to, "api")
    return schemas.LabelChangePublic(label=change.label, old_label=change.old_label,
                                     moved=change.moved, total=change.total)


@router.post("/v1/dataset/labels/{label}/merge", response_model=schemas.LabelChangePublic,
             responses=_NOT_FOUND)
async def merge_label(label: str, body: schemas.LabelMergeRequest,
                      store: StoreDep) -> schemas.LabelChangePublic:
    """Move every image of `label` under the existing label `into`; `label` is gone after.
    404 when either label has no images."""
    change = await asyncio.to_thread(store.merge_label, label, body.into, "api")
    return schemas.LabelChangePublic(label=change.label, old_label=change.old_label,
                                     moved=change.moved, total=change.total)
