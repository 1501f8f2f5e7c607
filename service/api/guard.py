"""`RequestGuard`, pure ASGI in front of every route. It answers by itself:

- 503 + Retry-After when `max_in_flight` requests are already in flight in this replica
  (`/healthz`, `/readyz` and `/metrics` are never refused);
- 413 when Content-Length exceeds `max_body`, or when the body read so far does (a chunked
  upload without Content-Length), before any of it is parsed or decoded;

and counts requests and latency for /metrics. Its answers have the API's error shape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.api.errors import RETRY_AFTER_S, error_response
from service.api.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/healthz", "/readyz", "/metrics")


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
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
