"""Data and models in and out, and explanations (`training.exchange`, `training.explain`).

- `POST /v1/explain`: multipart `files` (one image), optional `label` and `version` (form
  fields or query): a Grad-CAM heat map as `image/png`, with `X-Model-Version`,
  `X-Explained-Label` (percent-encoded) and `X-Explained-Score`. Predict's token rules. It runs
  on the eager model of the version CURRENT names (or `version`), loaded by this replica
  beside its classifier: ONNX Runtime, which the classifier may run, has no gradients.
- `GET /v1/dataset/export`: the dataset as a tar stream (ImageFolder tree + manifest).
- `POST /v1/dataset/import`: multipart `archive` (a tar: an export, or an ImageFolder tree),
  or `csv` (`path,label` rows naming the uploaded file names) + `files`; answers per file like
  `/v1/labels`, plus counts. The request's byte limit applies (`VISIONLOOP_MAX_UPLOAD_BYTES`);
  `visionloop import` takes a tar or CSV of any size on the volume.
- `GET /v1/models/{version}/onnx` and `/v1/models/{version}/pt2`: downloads (the first
  request for a version without a published file exports and checks it; later ones are read
  from the volume's cache).

Batch prediction over a folder (`visionloop predict-dir`) is not offered as an API job: the
folder would have to be on the server's volume, and the CLI runs it on the cluster already.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import schemas
from service.api.deps import ApiToken, PredictToken, RegistryDep, SettingsDep, StoreDep
from service.api.errors import BadRequest, TooManyFiles, UnsupportedMediaType
from service.api.uploads import FORM_TYPES, check_count, content_type, probe
from training.exchange import (
    FileResult,
    InvalidImport,
    import_archive,
    import_csv_uploads,
    iter_export_tar,
    onnx_file,
    parse_label_csv,
    pt2_file,
    summarize,
)
from training.explain import Explainer

router = APIRouter(tags=["exchange"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorPublic} for code in (400, 404, 409, 413, 415)}


async def _form(request: Request, max_files: int) -> tuple[dict[str, list[tuple[str, bytes]]],
                                                           dict[str, str]]:
    """Multipart -> (file parts by field name: [(file name, bytes)], text fields)."""
    if content_type(request) not in FORM_TYPES:
        raise UnsupportedMediaType("send multipart/form-data")
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 16)
    except StarletteHTTPException as exc:
        if "too many files" in str(exc.detail).lower():
            raise TooManyFiles(f"more than {max_files} files in one request") from None
        raise BadRequest(f"unreadable form: {exc.detail}") from None
    files: dict[str, list[tuple[str, bytes]]] = {}
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.setdefault(key, []).append((value.filename or key, await value.read()))
        else:
            fields[key] = value
    return files, fields


def _explainer(request: Request, home: str, max_pixels: int) -> Explainer:
    explainer: Explainer | None = getattr(request.app.state, "explainer", None)
    if explainer is None:
        explainer = Explainer(home, max_pixels)
        request.app.state.explainer = explainer
    return explainer


@router.post("/v1/explain", response_class=Response, dependencies=[PredictToken],
             responses={**_ERRORS, 200: {"content": {"image/png": {}},
                                         "description": "the heat map over the image"}},
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["files"], "properties": {
                     "files": {"type": "string", "format": "binary"},
                     "label": {"type": "string"}, "version": {"type": "string"}}}}}}})
async def explain(request: Request, settings: SettingsDep,
                  label: str | None = Query(None, description="the label to explain "
                                            "(default: the top label)"),
                  version: str | None = Query(None, description="the version (default: "
                                              "CURRENT)")) -> Response:
    """A Grad-CAM heat map (PNG) of why the model gives the image `label`: 400 for an image
    refused or a label the version lacks, 404 for an unknown version."""
    files, fields = await _form(request, 1)
    images = files.get("files", [])
    check_count(len(images), 1)
    name, data = images[0]
    probe(name, data, settings.max_pixels)
    explainer = _explainer(request, str(settings.home.resolve()), settings.max_pixels)
    result = await asyncio.to_thread(explainer.explain, data, label or fields.get("label"),
                                     version or fields.get("version") or None)
    return Response(result.png, media_type="image/png", headers={
        "X-Model-Version": result.version, "X-Explained-Label": quote(result.label),
        "X-Explained-Score": f"{result.score:.6f}", "Cache-Control": "no-store"})


@router.get("/v1/dataset/export", response_class=StreamingResponse, dependencies=[ApiToken],
            responses={200: {"content": {"application/x-tar": {}},
                             "description": "ImageFolder tree + manifest.csv/.jsonl"}})
async def export_dataset(store: StoreDep) -> StreamingResponse:
    """The dataset as a tar, streamed: `visionloop-dataset/<split>/<label>/<sha256>.<ext>`,
    then `manifest.csv` and `manifest.jsonl` (sha256, label, split, source, path)."""
    return StreamingResponse(iter_export_tar(store), media_type="application/x-tar",
                             headers={"Content-Disposition":
                                      'attachment; filename="visionloop-dataset.tar"'})


def _import_answer(results: list[FileResult]) -> dict[str, Any]:
    return {"results": [r.to_dict() for r in results], **summarize(results)}


@router.post("/v1/dataset/import", dependencies=[ApiToken], responses=_ERRORS,
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                 "type": "object", "properties": {
                     "archive": {"type": "string", "format": "binary"},
                     "csv": {"type": "string", "format": "binary"},
                     "files": {"type": "array",
                               "items": {"type": "string", "format": "binary"}}}}}}}})
async def import_dataset(request: Request, store: StoreDep, settings: SettingsDep
                         ) -> dict[str, Any]:
    """Import a tar (`archive`) or a `csv` of path,label with the images as `files`. -> per
    file {name, sha256, label, split, status} or {name, error}, and the counts `added`,
    `duplicate`, `relabelled`, `failed`. 400 `invalid_import` when nothing can be imported."""
    files, _ = await _form(request, settings.max_files + 1)
    archives, csvs, images = files.get("archive", []), files.get("csv", []), files.get(
        "files", [])
    if len(archives) + len(csvs) != 1:
        raise InvalidImport("send exactly one of: 'archive' (a tar), or 'csv' (path,label "
                            "rows) with the images as 'files'")
    if archives:
        if images:
            raise InvalidImport("an 'archive' carries its own images; send no 'files'")
        import io

        results = await asyncio.to_thread(import_archive, store, io.BytesIO(archives[0][1]),
                                          "import:tar", settings.max_upload_bytes)
        return _import_answer(results)
    try:
        text = csvs[0][1].decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidImport("the CSV is not UTF-8 text") from None
    parse_label_csv(text)  # a malformed CSV is refused before the images are looked at
    check_count(len(images), settings.max_files)
    uploads = {}
    for name, data in images:
        if name in uploads:
            raise InvalidImport(f"two uploads are named {name!r}; the CSV names files by name")
        uploads[name] = data
    results = await asyncio.to_thread(import_csv_uploads, store, text, uploads, "import:csv")
    return _import_answer(results)


def _check_headers(record: dict[str, Any]) -> dict[str, str]:
    diff = record.get("max_abs_diff")
    return {"X-Export-Origin": str(record.get("origin")),
            "X-Max-Abs-Diff": "" if diff is None else f"{diff:.3e}",
            "X-Tolerance": str(record.get("atol"))}


@router.get("/v1/models/{version}/onnx", response_class=FileResponse, dependencies=[ApiToken],
            responses=_ERRORS)
async def model_onnx(version: str, registry: RegistryDep) -> FileResponse:
    """The version as ONNX (input (N, 3, crop, crop) float32 normalised as its manifest's
    `preprocessing` says; output logits in the order of its `classes`). `X-Max-Abs-Diff`: its
    largest logit difference from eager PyTorch on the check batch (`X-Tolerance` the bound)."""
    path, record = await asyncio.to_thread(onnx_file, registry, version)
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"visionloop-{version}.onnx", headers=_check_headers(record))


@router.get("/v1/models/{version}/pt2", response_class=FileResponse, dependencies=[ApiToken],
            responses=_ERRORS)
async def model_pt2(version: str, registry: RegistryDep) -> FileResponse:
    """The version as a `torch.export` program: `torch.export.load(f).module()` with torch
    alone; input (N, 3, crop, crop) float32 RGB in [0, 1] (normalisation inside), classes and
    preprocessing in its extra file `visionloop.json`."""
    path, record = await asyncio.to_thread(pt2_file, registry, version)
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"visionloop-{version}.pt2", headers=_check_headers(record))
