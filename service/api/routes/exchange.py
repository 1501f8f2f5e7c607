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

- Batch prediction over a folder (`visionloop predict-dir`) as a job (`training.batch_jobs`
  says where the folder comes from, how the job runs and where its state is; API token):
  `POST /v1/predict-dir` {"folder": a folder under `<VISIONLOOP_HOME>/inbox/`, "version"
  (default CURRENT, resolved now), "format": "jsonl" | "csv", "workers" (default every CPU)}
  -> 202, the record (`job_id`, `status` queued); 400 `invalid_batch_folder` (absolute, `..`,
  a symlink out of inbox/, a file), 404 `batch_folder_not_found`, 404 `version_not_found`,
  409 `no_current_version`, 409 `batch_job_running` (naming the job: one at a time per
  volume, independent of training), 503 `batch_unavailable` (no Ray cluster).
  `GET /v1/predict-dir` (records, newest first), `GET /v1/predict-dir/{job_id}` (status,
  `progress` {lines, files}, counts, images/s, error), `GET /v1/predict-dir/{job_id}/output`
  (the output's whole lines so far, streamed; `X-Job-Status`), `DELETE
  /v1/predict-dir/{job_id}` (202: cancel; the record, `cancel_requested` while it stops), `POST
  /v1/predict-dir/{job_id}/resume` (202: rerun into the same output, paths with a line
  skipped; 409 while a job is active). An unknown or malformed id is 404
  `batch_job_not_found`.
"""

from __future__ import annotations

import asyncio
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from service import schemas
from service.api.deps import ApiToken, PredictToken, RegistryDep, SettingsDep, StoreDep
from service.api.errors import UnsupportedMediaType
from service.api.uploads import FORM_TYPES, check_count, content_type, probe, read_multipart
from service.settings import Settings
from training import batch_jobs
from training.batch import resolve_version, whole_lines
from training.batch_jobs import BatchJobStore, resolve_inbox_folder
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
    """Multipart -> (file parts by field name: [(file name, bytes)], text fields); a part
    without a file name is named by its field."""
    if content_type(request) not in FORM_TYPES:
        raise UnsupportedMediaType("send multipart/form-data")
    parts, fields = await read_multipart(request, max_files)
    return {key: [(name or key, data) for name, data in items]
            for key, items in parts.items()}, fields


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


# -- batch prediction jobs ------------------------------------------------------------------------

class PredictDirCreate(BaseModel):
    """The body of `POST /v1/predict-dir`."""

    model_config = ConfigDict(extra="forbid")

    folder: str = Field(..., min_length=1, max_length=1024,
                        description="a folder under <VISIONLOOP_HOME>/inbox/, e.g. shipment-42")
    version: str | None = Field(None, max_length=128,
                                description="the model version (default: CURRENT)")
    format: Literal["jsonl", "csv"] = "jsonl"
    workers: int | None = Field(None, ge=1, le=1024,
                                description="Ray Data actors (default: every CPU)")


_JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorPublic} for code in (400, 404, 409, 503)}
_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def _batch_store(settings: Settings) -> BatchJobStore:
    return BatchJobStore(settings.home)


@router.post("/v1/predict-dir", status_code=202, dependencies=[ApiToken],
             responses=_JOB_ERRORS)
async def start_predict_dir(body: PredictDirCreate, settings: SettingsDep,
                            registry: RegistryDep) -> dict[str, Any]:
    """Start a batch job over a folder of the volume's inbox/ (202, its `queued` record)."""
    store = _batch_store(settings)

    def start() -> dict[str, Any]:
        resolve_inbox_folder(store.home, body.folder)
        version = resolve_version(registry, body.version)
        record = store.create(PurePosixPath(body.folder).as_posix(), body.format, version,
                              body.workers, max_pixels=settings.max_pixels)
        batch_jobs.launch(store.home, record)
        return record
    return await asyncio.to_thread(start)


@router.get("/v1/predict-dir", dependencies=[ApiToken])
async def list_predict_dir(settings: SettingsDep, limit: int = Query(100, ge=1, le=10_000)
                           ) -> dict[str, Any]:
    """Every batch job record, newest first (interrupted ones marked first)."""
    return {"jobs": await asyncio.to_thread(_batch_store(settings).views, limit)}


@router.get("/v1/predict-dir/{job_id}", dependencies=[ApiToken],
            responses={404: {"model": schemas.ErrorPublic}})
async def get_predict_dir(job_id: str, settings: SettingsDep) -> dict[str, Any]:
    """One job: status, `progress` {lines, files}, counts, images/s, error."""
    return await asyncio.to_thread(_batch_store(settings).view, job_id)


@router.get("/v1/predict-dir/{job_id}/output", response_class=StreamingResponse,
            dependencies=[ApiToken],
            responses={404: {"model": schemas.ErrorPublic},
                       200: {"content": {"application/x-ndjson": {}, "text/csv": {}},
                             "description": "the output's whole lines so far"}})
async def predict_dir_output(job_id: str, settings: SettingsDep) -> StreamingResponse:
    """The job's output, streamed: every whole line written so far (also while it runs)."""
    store = _batch_store(settings)
    record = await asyncio.to_thread(store.view, job_id)
    fmt = record["format"]
    return StreamingResponse(
        whole_lines(store.output_path(record)), media_type=_MEDIA[fmt],
        headers={"Content-Disposition":
                 f'attachment; filename="predictions-{job_id}.{fmt}"',
                 "X-Job-Status": record["status"], "Cache-Control": "no-store"})


@router.delete("/v1/predict-dir/{job_id}", status_code=202, dependencies=[ApiToken],
               responses={404: {"model": schemas.ErrorPublic}})
async def cancel_predict_dir(job_id: str, settings: SettingsDep) -> dict[str, Any]:
    """Cancel: a queued job at once, a running one at its next batch (`cancel_requested`)."""
    return await asyncio.to_thread(_batch_store(settings).request_cancel, job_id)


@router.post("/v1/predict-dir/{job_id}/resume", status_code=202, dependencies=[ApiToken],
             responses=_JOB_ERRORS)
async def resume_predict_dir(job_id: str, settings: SettingsDep, registry: RegistryDep
                             ) -> dict[str, Any]:
    """Rerun a finished job into its output: paths that have a line are skipped. Its folder
    and its version must still be there (404)."""
    store = _batch_store(settings)

    def resume() -> dict[str, Any]:
        record = store.view(job_id)
        resolve_inbox_folder(store.home, record["folder"])
        resolve_version(registry, record["version"])
        record = store.begin_resume(job_id)
        batch_jobs.launch(store.home, record)
        return record
    return await asyncio.to_thread(resume)
