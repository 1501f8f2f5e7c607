"""The web page (`/`), its static files (`/web/<name>`), and what only the page needs: its open
configuration, the deployment's training defaults, the weights' sizes, and live job progress
as server-sent events.

Decisions:
- The page is plain files in `service/web/` (HTML, ES modules, CSS): no build step, nothing
  fetched from another origin. Every page answer carries a Content-Security-Policy that allows
  only this origin (plus `blob:`/`data:` images, for images fetched with the token), so a
  third-party request cannot happen even by mistake, and `frame-ancestors 'none'`.
- Assets are served by an allow-list: a name of lower-case letters, digits, `-` and `_` with a
  known extension, that is a file directly in `service/web/`; anything else is 404 like any
  unknown path. `Cache-Control: no-cache` with a strong ETag: the browser revalidates each load
  (a new release is seen at once) and gets 304 while a file is unchanged.
- The API token is never in a URL: the page keeps it in `sessionStorage` and sends it as
  `Authorization: Bearer` on each call. The browser's `EventSource` cannot send a header, so
  the page reads the event stream with `fetch()`; the stream is ordinary `text/event-stream`
  that any SSE client with a header can read. No cookie is ever set, so there is no CSRF path.
- `GET /v1/train/{job_id}/events`: one `job` event at once with the job's whole view (what
  `GET /v1/train/{id}` answers: progress, metrics so far, ETA), then one each time it changes
  (the job files are looked at every `POLL_S`), a comment every `KEEPALIVE_S` so proxies keep
  the connection, and `end` once the job is `succeeded`, `failed` or `cancelled`. Every event
  carries the whole view, so a client that reconnects needs no `Last-Event-ID` replay: its first
  event is the current state. A stream is closed after `max_s` (default `STREAM_MAX_S`) without
  `end`; the client reconnects. Each open stream holds one of the replica's
  `VISIONLOOP_MAX_IN_FLIGHT` slots while it is open.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from service.api.deps import ApiToken, JobsDep, RegistryDep, SettingsDep
from service.api.errors import NotFound
from service.controller import train_config
from training.jobs import ACTIVE
from training.model import STRATEGIES
from training.registry import WEIGHTS

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"

POLL_S = 0.5
KEEPALIVE_S = 15.0
STREAM_MAX_S = 300.0

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
ASSET_NAME = re.compile(r"[a-z0-9_-]{1,64}\.(?:js|css|svg)")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["web"])
token_router = APIRouter(tags=["web"], dependencies=[ApiToken])


@lru_cache(maxsize=64)
def _read(path: Path, mtime_ns: int, size: int) -> tuple[bytes, str]:
    """The file's bytes and strong ETag; cached per (path, mtime, size), so an edited file is
    read again."""
    data = path.read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _file_response(request: Request, path: Path) -> Response:
    try:
        info = path.stat()
    except OSError:
        raise NotFound(f"no such page file {path.name[:64]!r}") from None
    data, etag = _read(path, info.st_mtime_ns, info.st_size)
    headers = {**PAGE_HEADERS, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=CONTENT_TYPES[path.suffix], headers=headers)


@router.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    return _file_response(request, WEB_DIR / "index.html")


@router.get("/web/config", summary="what the page needs before sign-in (open)")
async def web_config(settings: SettingsDep) -> dict[str, Any]:
    """Open, like predict: whether predict needs a token, and the upload limits, so the page
    can say what it can do before anyone signs in. Holds no secret."""
    return {"predict_open": settings.predict_token is None,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_files": settings.max_files, "max_pixels": settings.max_pixels}


@router.get("/web/{name}", include_in_schema=False)
async def asset(name: str, request: Request) -> Response:
    if not ASSET_NAME.fullmatch(name) or not (WEB_DIR / name).is_file():
        raise NotFound(f"no such page file {name[:64]!r}")
    return _file_response(request, WEB_DIR / name)


@token_router.get("/v1/web/train-defaults")
async def train_defaults(settings: SettingsDep) -> dict[str, Any]:
    """Every training option as a job started now with no overrides would take it (the
    deployment's `VISIONLOOP_TRAIN_*` defaults over TrainConfig's), and the strategies."""
    cfg = train_config({}, settings.train_defaults())
    return {"defaults": cfg.model_dump(), "strategies": list(STRATEGIES)}


@token_router.get("/v1/web/model-sizes")
async def model_sizes(registry: RegistryDep) -> dict[str, dict[str, int | None]]:
    """version -> the weights file's size in bytes (None when it is missing)."""
    def sizes() -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for v in registry.versions():
            try:
                out[v] = (registry.version_dir(v) / WEIGHTS).stat().st_size
            except OSError:
                out[v] = None
        return out
    return {"sizes": await asyncio.to_thread(sizes)}


def sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event; `data` as one line of JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def job_events(jobs: Any, job_id: str, max_s: float) -> AsyncIterator[bytes]:
    """The stream of one job's views (see the module docstring). The first view is read by
    the route before the stream starts, so an unknown job is a plain 404."""
    started = last_sent = time.monotonic()
    previous = None
    n = 0
    yield b"retry: 1000\n\n"
    while True:
        view = await asyncio.to_thread(jobs.view, job_id)
        text = json.dumps(view, sort_keys=True, default=str)
        now = time.monotonic()
        if text != previous:
            previous, last_sent, n = text, now, n + 1
            yield sse("job", view, n)
        if view.get("status") not in ACTIVE:
            yield sse("end", {"status": view.get("status")}, n)
            return
        if now - started >= max_s:
            return
        if now - last_sent >= KEEPALIVE_S:
            last_sent = now
            yield b": keep-alive\n\n"
        await asyncio.sleep(POLL_S)


@token_router.get("/v1/train/{job_id}/events", response_class=StreamingResponse,
                  responses={200: {"content": {"text/event-stream": {}},
                                   "description": "job events until the job ends"}})
async def train_events(job_id: str, jobs: JobsDep,
                       max_s: float = Query(STREAM_MAX_S, ge=1.0, le=3600.0,
                                            description="close the stream after this long")
                       ) -> StreamingResponse:
    await asyncio.to_thread(jobs.view, job_id)  # JobNotFound (404) before any byte is sent
    return StreamingResponse(job_events(jobs, job_id, max_s), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


router.include_router(token_router)
