"""Open endpoints for operators and orchestrators: liveness, readiness, Prometheus.

/readyz and /metrics are open and never refused by the in-flight bound (an orchestrator must
always get an answer), and each needs a fan-out to every replica. So they answer from a short
cache (`SharedFetch`, one per replica for the replicas' statuses and one for the /metrics
body): while a fan-out is in flight every caller waits for that one, and for
`VISIONLOOP_OPS_CACHE_S` after it ends its answer is given at once. However many call, a replica
starts at most one fan-out of each kind per period: a flood costs O(1) per call. The price is
that an answer may be up to that many seconds old (0: no reuse after a fan-out ends; concurrent
callers still share one). /metrics takes its statuses from the same cache as /readyz.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import schemas
from service.api.deps import Services, ServicesDep
from service.api.errors import Unavailable
from service.api.metrics import merge_exposition

log = logging.getLogger(__name__)

router = APIRouter(tags=["ops"])

T = TypeVar("T")

FAN_OUT_TIMEOUT_S = 5


class SharedFetch(Generic[T]):
    """The answer of `fetch()` shared by its callers: a caller that comes while a fetch is in
    flight waits for it; one that comes less than `ttl_s` after it ended gets its answer (or
    its exception) at once; any other starts a new fetch. No lock is needed: the check and the
    start happen with no `await` between them, so on one event loop two callers cannot both
    start one. A fetch started on another event loop (a test client's per-request loop) is
    never awaited from this one.

    `fetches` counts the fetches started and `waiting` the callers waiting now (for /metrics
    and tests)."""

    def __init__(self, fetch: Callable[[], Awaitable[T]], ttl_s: float):
        self.fetch, self.ttl_s = fetch, ttl_s
        self.fetches = 0
        self.waiting = 0
        self._task: asyncio.Task[T] | None = None
        self._ended_at = -math.inf

    async def get(self) -> T:
        loop = asyncio.get_running_loop()
        task = self._task
        if (task is None or task.get_loop() is not loop
                or (task.done() and time.monotonic() - self._ended_at >= self.ttl_s)):
            task = self._task = loop.create_task(self._run())
            # Mark its exception retrieved even if every caller went away meanwhile.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self.fetches += 1
        self.waiting += 1
        try:
            # shield: a caller that disconnects does not cancel the fetch the others share
            return await asyncio.shield(task)
        finally:
            self.waiting -= 1

    async def _run(self) -> T:
        try:
            return await self.fetch()
        finally:
            self._ended_at = time.monotonic()


class OpsCache:
    """The two shared fan-outs of one API replica: every replica's classifier status, and the
    whole /metrics body."""

    def __init__(self, services: Services):
        self.services = services
        ttl = services.settings.ops_cache_s
        self.statuses: SharedFetch[list[dict[str, Any]]] = SharedFetch(self._statuses, ttl)
        self.metrics: SharedFetch[bytes] = SharedFetch(self._metrics_body, ttl)

    async def _statuses(self) -> list[dict[str, Any]]:
        return await asyncio.wait_for(self.services.classifier.statuses(),
                                      timeout=FAN_OUT_TIMEOUT_S)

    async def _metrics_body(self) -> bytes:
        s, metrics = self.services, self.services.metrics
        try:
            statuses = await self.statuses.get()
            metrics.model.clear()
            for status in statuses:
                if status.get("version"):
                    metrics.model.labels(status["version"]).inc()
            metrics.reload_failures.set(sum(int(status.get("reload_failures", 0))
                                            for status in statuses))
        except Exception:
            log.warning("metrics: classifier status unavailable", exc_info=True)
        counts = Counter(r.get("status", "?") for r in await asyncio.to_thread(s.jobs.list))
        metrics.jobs.clear()
        for status_name, n in counts.items():
            metrics.jobs.labels(status_name).set(n)
        try:
            texts = await asyncio.wait_for(s.classifier.replica_metrics(),
                                           timeout=FAN_OUT_TIMEOUT_S)
        except Exception:
            log.warning("metrics: other replicas unavailable; this replica's only",
                        exc_info=True)
            texts = [metrics.replica_text()]
        return merge_exposition(texts) + generate_latest(metrics.shared)


async def get_ops_cache(request: Request, services: ServicesDep) -> OpsCache:
    """This app's OpsCache, made on first use (no await in between: one per app)."""
    cache: OpsCache | None = getattr(request.app.state, "ops_cache", None)
    if cache is None:
        cache = request.app.state.ops_cache = OpsCache(services)
    return cache


OpsCacheDep = Annotated[OpsCache, Depends(get_ops_cache)]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": schemas.ErrorPublic}})
async def readyz(cache: OpsCacheDep) -> dict[str, Any]:
    try:
        statuses = await cache.statuses.get()
    except Exception as exc:
        raise Unavailable(f"classifier unavailable: {exc}", code="not_ready",
                          headers={}) from None
    versions = [s.get("version") for s in statuses]
    if not versions or not all(versions):
        raise Unavailable("no model loaded yet", code="model_not_loaded")
    answer: dict[str, Any] = {"status": "ready", "model_versions": versions}
    # Still ready (the previous model serves), but say which version failed to load and why.
    failures = [{"version": s["failed_version"], "error": s.get("last_error")}
                for s in statuses if s.get("failed_version")]
    if failures:
        answer["load_failures"] = failures
    return answer


@router.get("/metrics", response_class=Response)
async def prometheus(cache: OpsCacheDep) -> Response:
    return Response(await cache.metrics.get(), media_type=CONTENT_TYPE_LATEST)
