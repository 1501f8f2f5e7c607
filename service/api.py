"""The HTTP API (FastAPI), built per ingress replica by `create_api`.

Routes only translate HTTP to calls: predictions go to the classifier of this replica (and
readiness, activate and /metrics to every replica), training starts and cancels go to the
training controller (both through the small client protocols below, which `service.deployments`
implements), and everything else reads or writes the volume through the training contract
(`DatasetStore`, `Registry`, `JobStore`) directly.

In front of the routes, `RequestGuard` (pure ASGI) answers by itself:
- 503 + Retry-After when `max_in_flight` requests are already in flight in this replica;
- 413 when Content-Length exceeds `max_upload_bytes`, or when the body read so far does
  (a chunked upload without Content-Length), before any of it is parsed or decoded;
and counts requests and latency for /metrics. Every error, its answers included, has the shape
`{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import schemas
from service.controller import new_since_last_job
from service.predictions import PredictionNotFound, PredictionStore, new_prediction_id
from service.security import AuthError, authorize
from service.settings import Settings
from training.dataset import DatasetStore, InvalidLabel, VolumeFull, check_label
from training.imageio import ImageError, decode_image, probe_image
from training.job import job_view
from training.jobs import JobNotFound, JobStore
from training.registry import InvalidVersion, Registry, VersionNotFound

log = logging.getLogger(__name__)
disable_created_metrics()  # `_created` samples cannot be summed across replicas

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/healthz", "/readyz", "/metrics")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An answer other than success: HTTP status, error code, message (and extra headers)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


class ClassifierClient(Protocol):
    async def predict(self, data: bytes, top_k: int) -> dict[str, Any]:
        """One image -> {"version", "top_k", "batch_size"} or {"error": {...}}."""

    async def statuses(self) -> list[dict[str, Any]]:
        """Every replica's `Classifier.status()`."""

    async def reload_all(self) -> list[dict[str, Any]]:
        """Every replica syncs to CURRENT now; -> their statuses."""

    async def replica_metrics(self) -> list[str]:
        """Every replica's request metrics (`Metrics.registry`), Prometheus text."""


class ControllerClient(Protocol):
    async def start(self, overrides: dict[str, Any], source: str) -> dict[str, Any]:
        """-> {"record": job} or {"error": {"status", "code", "message"}}."""

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """-> {"record": job} or {"error": {...}}."""


class Metrics:
    """`registry`: what this replica counts (requests, latency, in flight, predictions, batch
    sizes), summed over every replica by /metrics (`merge_exposition`); `shared`: what /metrics
    computes once for the whole service when scraped (served versions, load failures, jobs)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("visionloop_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("visionloop_request_seconds", "HTTP request latency",
                                 ["route"], registry=r)
        self.in_flight = Gauge("visionloop_requests_in_flight", "requests in flight", registry=r)
        self.predictions = Counter("visionloop_predictions", "images classified", ["version"],
                                   registry=r)
        self.batch_size = Histogram("visionloop_inference_batch_size",
                                    "size of the inference batch each image was classified in",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.shared = s = CollectorRegistry()
        self.model = Gauge("visionloop_model_info", "served model version (1 per replica)",
                           ["version"], registry=s)
        self.reload_failures = Gauge("visionloop_model_reload_failures",
                                     "model versions that failed to load, summed over replicas",
                                     registry=s)
        self.jobs = Gauge("visionloop_training_jobs", "training jobs by status", ["status"],
                          registry=s)


class _Families:
    """A prometheus_client collector that yields fixed metric families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_exposition(texts: list[str]) -> bytes:
    """Prometheus texts of several replicas -> one text, every sample (same name and labels)
    summed: counters, histograms and the in-flight gauge all add up across replicas."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[family.name][key] = values[family.name].get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Bounded in-flight requests, the upload byte limit, request metrics. See module doc."""

    def __init__(self, app: ASGIApp, max_in_flight: int, max_body: int, metrics: Metrics):
        self.app, self.max_in_flight, self.max_body, self.metrics = (
            app, max_in_flight, max_body, metrics)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_seen: list[int] = []

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        open_path = scope.get("path", "") in OPEN_PATHS
        try:
            if not open_path and self.in_flight >= self.max_in_flight:
                await error_response(
                    503, "overloaded",
                    f"too many requests in flight (limit {self.max_in_flight}); retry shortly",
                    {"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send_counted)
                return
            self.in_flight += 1
            self.metrics.in_flight.inc()
            try:
                await self._guarded(scope, receive, send_counted)
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or ("other" if not open_path else scope["path"])
            self.metrics.requests.labels(name, scope.get("method", ""),
                                         str(status_seen[0] if status_seen else 500)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        too_large = error_response(
            413, "payload_too_large",
            f"request body exceeds the limit of {self.max_body} bytes")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    await too_large(scope, receive, send)
                    return
            except ValueError:
                await error_response(400, "bad_request", "invalid Content-Length")(
                    scope, receive, send)
                return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # the app's answer to the aborted read is replaced by ours
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await too_large(scope, receive, send)


def job_records(jobs: JobStore) -> list[dict[str, Any]]:
    """Job records, newest first. `JobStore.list` also returns the `<id>.progress.json` files
    that share its folder; only records with an id and a status are jobs."""
    return [r for r in jobs.list() if "job_id" in r and "status" in r]


def create_api(settings: Settings, api_token: str, classifier: ClassifierClient,
               controller: ControllerClient) -> FastAPI:
    home = Path(settings.home).resolve()
    store = DatasetStore(home, settings.max_pixels)
    registry = Registry(home)
    jobs = JobStore(home)
    predictions = PredictionStore(home, settings.predictions_keep,
                                  settings.predictions_max_age_s)
    metrics = Metrics()

    app = FastAPI(
        title="visionloop",
        summary="Image classification that retrains itself: Ray Serve + Ray Train.",
        version="1",
        responses={400: {"model": schemas.ErrorPublic}, 401: {"model": schemas.ErrorPublic}},
    )
    app.state.metrics = metrics

    # -- errors --------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(AuthError)
    async def _auth_error(_: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        return error_response(400, "bad_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_response(exc.status_code, codes.get(exc.status_code, "error"),
                              str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); "
                              "the service log has the details")

    def domain_error(exc: Exception) -> ApiError:
        """Exceptions of the training contract carry `.status` and `.code`."""
        if isinstance(exc, (ImageError, InvalidLabel, VolumeFull, PredictionNotFound)):
            return ApiError(exc.status, exc.code, str(exc))
        if isinstance(exc, VersionNotFound):
            return ApiError(404, "version_not_found", str(exc.args[0] if exc.args else exc))
        if isinstance(exc, InvalidVersion):
            return ApiError(500, "invalid_version", str(exc))
        if isinstance(exc, JobNotFound):
            return ApiError(404, "job_not_found", f"no such training job {exc}")
        raise exc

    # -- auth ----------------------------------------------------------------------------------
    def need(kind: Literal["api", "predict"]) -> Callable[[Request], None]:
        def check(request: Request) -> None:
            authorize(request.headers.get("authorization"), api_token,
                      settings.predict_token, kind)
        return check

    api_auth = [Depends(need("api"))]

    # -- uploads -------------------------------------------------------------------------------
    async def read_form(request: Request) -> tuple[list[tuple[str | None, bytes]], dict[str, str]]:
        """Multipart -> ([(filename, bytes) of field `files`], other text fields)."""
        try:
            form = await request.form(max_files=settings.max_files,
                                      max_fields=settings.max_files + 16)
        except StarletteHTTPException as exc:
            if "too many files" in str(exc.detail).lower():
                raise ApiError(413, "too_many_files",
                               f"more than {settings.max_files} files in one request") from None
            raise ApiError(400, "bad_request", f"unreadable form: {exc.detail}") from None
        files: list[tuple[str | None, bytes]] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key == "files":
                    files.append((value.filename, await value.read()))
            else:
                fields[key] = value
        return files, fields

    def check_count(files: list[Any]) -> None:
        if not files:
            raise ApiError(400, "no_images", "no images: send multipart field 'files' "
                           "(repeatable) or JSON {\"images\": [base64, ...]}")
        if len(files) > settings.max_files:
            raise ApiError(413, "too_many_files",
                           f"{len(files)} files in one request; the limit is {settings.max_files}")

    def probe(name: str | None, data: bytes, decode: bool = False) -> None:
        """Header check; with `decode`, a full decode too (a truncated file passes the header
        check, and one stored in the dataset would fail every training job)."""
        try:
            (decode_image if decode else probe_image)(data, settings.max_pixels)
        except ImageError as exc:
            raise ApiError(exc.status, exc.code,
                           f"{name}: {exc}" if name else str(exc)) from None

    async def predict_inputs(request: Request) -> list[tuple[str | None, bytes]]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in FORM_TYPES:
            files, _ = await read_form(request)
            return files
        if ctype == "application/json":
            try:
                body = schemas.PredictJsonRequest.model_validate_json(await request.body())
            except ValueError as exc:
                raise ApiError(400, "bad_request", f"invalid JSON body: {exc}") from None
            check_count(body.images)
            out: list[tuple[str | None, bytes]] = []
            for i, b64 in enumerate(body.images):
                try:
                    out.append((None, base64.b64decode(b64, validate=True)))
                except (binascii.Error, ValueError):
                    raise ApiError(400, "bad_request",
                                   f"images[{i}] is not valid base64") from None
            return out
        if not ctype and not await request.body():
            return []
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data (field 'files') or application/json")

    # -- open endpoints ------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": schemas.ErrorPublic}})
    async def readyz() -> dict[str, Any]:
        try:
            statuses = await asyncio.wait_for(classifier.statuses(), timeout=5)
        except Exception as exc:
            raise ApiError(503, "not_ready", f"classifier unavailable: {exc}") from None
        versions = [s.get("version") for s in statuses]
        if not versions or not all(versions):
            raise ApiError(503, "model_not_loaded", "no model loaded yet",
                           {"Retry-After": str(RETRY_AFTER_S)})
        answer: dict[str, Any] = {"status": "ready", "model_versions": versions}
        # Still ready (the previous model serves), but say which version failed to load and why.
        failures = [{"version": s["failed_version"], "error": s.get("last_error")}
                    for s in statuses if s.get("failed_version")]
        if failures:
            answer["load_failures"] = failures
        return answer

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus() -> Response:
        try:
            statuses = await asyncio.wait_for(classifier.statuses(), timeout=5)
            metrics.model.clear()
            for s in statuses:
                if s.get("version"):
                    metrics.model.labels(s["version"]).inc()
            metrics.reload_failures.set(sum(int(s.get("reload_failures", 0)) for s in statuses))
        except Exception:
            log.warning("metrics: classifier status unavailable", exc_info=True)
        counts: dict[str, int] = {}
        for record in await asyncio.to_thread(job_records, jobs):
            counts[record.get("status", "?")] = counts.get(record.get("status", "?"), 0) + 1
        metrics.jobs.clear()
        for status, n in counts.items():
            metrics.jobs.labels(status).set(n)
        try:
            texts = await asyncio.wait_for(classifier.replica_metrics(), timeout=5)
        except Exception:
            log.warning("metrics: other replicas unavailable; this replica's only", exc_info=True)
            texts = [generate_latest(metrics.registry).decode()]
        body = merge_exposition(texts) + generate_latest(metrics.shared)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- predict -------------------------------------------------------------------------------
    @app.post("/v1/predict", tags=["predict"], response_model=schemas.PredictPublic,
              dependencies=[Depends(need("predict"))],
              responses={413: {"model": schemas.ErrorPublic},
                         415: {"model": schemas.ErrorPublic},
                         503: {"model": schemas.ErrorPublic}},
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "files": {"type": "array",
                                "items": {"type": "string", "format": "binary"}}}}},
                  "application/json": {"schema": schemas.PredictJsonRequest
                                       .model_json_schema()}}}})
    async def predict(request: Request, response: Response,
                      top_k: int = Query(5, ge=1, le=1000)) -> schemas.PredictPublic:
        files = await predict_inputs(request)
        check_count(files)
        for name, data in files:
            probe(name, data)
        try:
            results = await asyncio.gather(*(classifier.predict(data, top_k)
                                              for _, data in files))
        except Exception as exc:
            log.warning("classifier call failed: %s", exc)
            raise ApiError(503, "unavailable", f"the classifier is unavailable: "
                           f"{type(exc).__name__}", {"Retry-After": str(RETRY_AFTER_S)}) from None
        out = []
        for (name, data), result in zip(files, results, strict=True):
            if "error" in result:
                err = result["error"]
                if err.get("code") == "model_not_loaded":
                    raise ApiError(503, "model_not_loaded", err["message"],
                                   {"Retry-After": str(RETRY_AFTER_S)})
                raise ApiError(int(err["status"]), err["code"],
                               f"{name}: {err['message']}" if name else err["message"])
            top = [schemas.ScoredLabel(label=label, score=score)
                   for label, score in result["top_k"]]
            pid = new_prediction_id()
            metrics.predictions.labels(result["version"]).inc()
            metrics.batch_size.observe(result["batch_size"])
            record = {"model_version": result["version"], "label": top[0].label,
                      "score": top[0].score, "top_k": [t.model_dump() for t in top],
                      "filename": name}
            try:
                await asyncio.to_thread(predictions.save, pid, data, record)
            except OSError as exc:  # feedback for this one will 404; the answer still stands
                log.warning("could not keep prediction %s: %s", pid, exc)
            out.append(schemas.PredictionPublic(prediction_id=pid, filename=name,
                                                label=top[0].label, score=top[0].score,
                                                top_k=top))
        version = results[0]["version"]
        response.headers["X-Model-Version"] = version
        return schemas.PredictPublic(model_version=version, predictions=out)

    # -- dataset -------------------------------------------------------------------------------
    @app.post("/v1/labels", tags=["dataset"], response_model=schemas.LabelsPublic,
              dependencies=api_auth,
              openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["label", "files"], "properties": {
                      "label": {"type": "string"},
                      "files": {"type": "array",
                                "items": {"type": "string", "format": "binary"}}}}}}}})
    async def add_labels(request: Request) -> schemas.LabelsPublic:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in FORM_TYPES:
            raise ApiError(415, "unsupported_media_type",
                           "send multipart/form-data with fields 'label' and 'files'")
        files, fields = await read_form(request)
        try:
            label = check_label(fields.get("label", ""))
        except InvalidLabel as exc:
            raise domain_error(exc) from None
        check_count(files)
        for name, data in files:  # all checked before any is stored
            await asyncio.to_thread(probe, name, data, True)
        results = []
        for _, data in files:
            try:
                r = await asyncio.to_thread(store.ingest, data, label, "upload")
            except (ImageError, InvalidLabel, VolumeFull) as exc:
                raise domain_error(exc) from None
            results.append(schemas.LabelResultPublic(sha256=r.sha256, label=r.label,
                                                     status=r.status))
        return schemas.LabelsPublic(results=results)

    @app.delete("/v1/labels/{sha256}", tags=["dataset"], dependencies=api_auth)
    async def delete_label(sha256: str) -> dict[str, Any]:
        if not await asyncio.to_thread(store.delete, sha256, "api"):
            raise ApiError(404, "image_not_found", f"no image {sha256!r} in the dataset")
        return {"sha256": sha256, "deleted": True}

    @app.post("/v1/feedback", tags=["dataset"], response_model=schemas.FeedbackPublic,
              dependencies=api_auth)
    async def feedback(body: schemas.FeedbackRequest) -> schemas.FeedbackPublic:
        try:
            check_label(body.label)
            stored = await asyncio.to_thread(predictions.get, body.prediction_id)
            data = await asyncio.to_thread(stored.image_bytes)
            r = await asyncio.to_thread(store.ingest, data, body.label, "feedback")
        except (ImageError, InvalidLabel, VolumeFull, PredictionNotFound) as exc:
            raise domain_error(exc) from None
        except OSError:
            raise ApiError(404, "prediction_not_found",
                           f"the image of prediction {body.prediction_id!r} is gone") from None
        return schemas.FeedbackPublic(prediction_id=body.prediction_id, sha256=r.sha256,
                                      label=r.label, status=r.status)

    @app.get("/v1/dataset", tags=["dataset"], response_model=schemas.DatasetPublic,
             dependencies=api_auth)
    async def dataset() -> schemas.DatasetPublic:
        counts = await asyncio.to_thread(store.counts)
        new = await asyncio.to_thread(new_since_last_job, store, jobs)
        return schemas.DatasetPublic(labels=counts, total=sum(counts.values()),
                                     new_since_last_job=new)

    @app.get("/v1/review", tags=["dataset"], response_model=schemas.ReviewPublic,
             dependencies=api_auth)
    async def review(limit: int = Query(50, ge=1, le=1000),
                     below: float | None = Query(None, ge=0.0, le=1.0)) -> schemas.ReviewPublic:
        threshold = settings.review_below if below is None else below
        items = await asyncio.to_thread(predictions.review, threshold, limit)
        return schemas.ReviewPublic(below=threshold, items=[
            schemas.ReviewItemPublic.model_validate(i) for i in items])

    # -- training ------------------------------------------------------------------------------
    def controller_answer(answer: dict[str, Any]) -> dict[str, Any]:
        if "error" in answer:
            e = answer["error"]
            raise ApiError(int(e["status"]), e["code"], e["message"])
        return answer["record"]

    @app.post("/v1/train", tags=["training"], status_code=202,
              response_model=schemas.TrainStartedPublic, dependencies=api_auth,
              responses={409: {"model": schemas.ErrorPublic}})
    async def start_training(overrides: dict[str, Any] | None = Body(None)
                             ) -> schemas.TrainStartedPublic:
        record = controller_answer(await controller.start(overrides or {}, "api"))
        return schemas.TrainStartedPublic(job_id=record["job_id"], status=record["status"])

    @app.get("/v1/train", tags=["training"], response_model=schemas.JobsPublic,
             dependencies=api_auth)
    async def list_jobs(limit: int = Query(100, ge=1, le=10_000)) -> schemas.JobsPublic:
        def views() -> list[dict[str, Any]]:
            return [job_view(jobs, r["job_id"]) if r.get("status") == "running" else r
                    for r in job_records(jobs)[:limit]]
        return schemas.JobsPublic(jobs=[schemas.JobPublic.model_validate(r)
                                        for r in await asyncio.to_thread(views)])

    @app.get("/v1/train/{job_id}", tags=["training"], response_model=schemas.JobPublic,
             dependencies=api_auth)
    async def get_job(job_id: str) -> schemas.JobPublic:
        try:
            return schemas.JobPublic.model_validate(await asyncio.to_thread(job_view, jobs,
                                                                            job_id))
        except JobNotFound as exc:
            raise domain_error(exc) from None

    @app.delete("/v1/train/{job_id}", tags=["training"], status_code=202,
                response_model=schemas.JobPublic, dependencies=api_auth)
    async def cancel_job(job_id: str) -> schemas.JobPublic:
        return schemas.JobPublic.model_validate(controller_answer(
            await controller.cancel(job_id)))

    # -- models --------------------------------------------------------------------------------
    def version_public(version: str) -> schemas.VersionPublic:
        m = registry.manifest(version)
        metrics_ = m.get("metrics") or {}
        return schemas.VersionPublic(
            version=version, created_at=m.get("created_at"), backbone=m.get("backbone"),
            classes=list(m.get("classes") or []),
            val_accuracy=metrics_.get("best_val_accuracy"),
            promoted=(m.get("promotion") or {}).get("promoted"))

    @app.get("/v1/models", tags=["models"], response_model=schemas.ModelsPublic,
             dependencies=api_auth)
    async def models() -> schemas.ModelsPublic:
        def read() -> schemas.ModelsPublic:
            versions = []
            for v in registry.versions():
                try:
                    versions.append(version_public(v))
                except (VersionNotFound, InvalidVersion):
                    continue  # removed by retention meanwhile, or unreadable
            return schemas.ModelsPublic(current=registry.current(), versions=versions)
        return await asyncio.to_thread(read)

    @app.get("/v1/models/{version}", tags=["models"], dependencies=api_auth)
    async def model_manifest(version: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(registry.manifest, version)
        except (VersionNotFound, InvalidVersion) as exc:
            raise domain_error(exc) from None

    @app.get("/v1/models/{version}/plots/{name}.png", tags=["models"], dependencies=api_auth,
             response_class=FileResponse)
    async def model_plot(version: str, name: str) -> FileResponse:
        try:
            manifest = await asyncio.to_thread(registry.manifest, version)
            folder = registry.version_dir(version)
        except (VersionNotFound, InvalidVersion) as exc:
            raise domain_error(exc) from None
        plots = manifest.get("plots") or []
        if name not in plots or not (folder / f"{name}.png").is_file():
            raise ApiError(404, "plot_not_found",
                           f"{version} has no plot {name!r}; it has {plots}")
        return FileResponse(folder / f"{name}.png", media_type="image/png")

    @app.get("/v1/models/{version}/weights", tags=["models"], dependencies=api_auth,
             response_class=FileResponse)
    async def model_weights(version: str) -> FileResponse:
        try:
            path = registry.version_dir(version) / "model.safetensors"
        except VersionNotFound as exc:
            raise domain_error(exc) from None
        return FileResponse(path, media_type="application/octet-stream",
                            filename=f"visionloop-{version}.safetensors")

    @app.post("/v1/models/{version}/activate", tags=["models"],
              response_model=schemas.ActivatePublic, dependencies=api_auth)
    async def activate(version: str) -> schemas.ActivatePublic:
        """Point CURRENT at `version` and have every replica load it before answering. If a
        replica cannot load it, CURRENT goes back to what it was and the answer is 500."""
        try:
            await asyncio.to_thread(registry.version_dir, version)
        except VersionNotFound as exc:
            raise domain_error(exc) from None
        previous = registry.current()
        await asyncio.to_thread(registry.set_current, version)
        statuses = await classifier.reload_all()
        served = [s.get("version") for s in statuses]
        if any(v != version for v in served):
            errors = [s.get("last_error") for s in statuses if s.get("version") != version]
            if previous is not None:
                await asyncio.to_thread(registry.set_current, previous)
                await classifier.reload_all()
            raise ApiError(500, "model_load_failed",
                           f"{version} could not be loaded by every replica ({errors}); "
                           f"CURRENT stays {previous}")
        log.info("activated %s (was %s)", version, previous)
        return schemas.ActivatePublic(current=version, replicas=served)

    app.add_middleware(RequestGuard, max_in_flight=settings.max_in_flight,
                       max_body=settings.max_upload_bytes, metrics=metrics)
    return app
