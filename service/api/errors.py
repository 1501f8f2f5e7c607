"""Errors in one shape, `{"error": {"code", "message"}}`, from one place.

Every refusal is a `training.errors.DomainError` (the training contract's own, and the few
below that only HTTP has); `install_error_handlers` answers each with its status, code, message
and headers. FastAPI's validation errors become 400 `bad_request`, Starlette's own (404 of an
unknown path, 405) keep their status, and anything else is a 500 that names only the
exception type (the log has the traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from training.errors import DomainError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class BadRequest(DomainError):
    code = "bad_request"
    status = 400


class NoImages(DomainError):
    code = "no_images"
    status = 400


class TooManyFiles(DomainError):
    code = "too_many_files"
    status = 413


class PayloadTooLarge(DomainError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(DomainError):
    code = "unsupported_media_type"
    status = 415


class NotFound(DomainError):
    code = "not_found"
    status = 404


class Unavailable(DomainError):
    """503 with Retry-After: overloaded, or a dependency (the classifier) not answering."""

    code = "unavailable"
    status = 503
    headers = {"Retry-After": str(RETRY_AFTER_S)}


class ModelLoadFailed(DomainError):
    code = "model_load_failed"
    status = 500


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status,
                        headers=dict(headers) if headers else None)


def domain_response(exc: DomainError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return domain_response(exc)

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
