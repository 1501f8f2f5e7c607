"""RequestGuard on a plain ASGI app: the in-flight bound answers 503 in our shape, open paths
are never refused."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from service.api.guard import RequestGuard
from service.api.metrics import Metrics
from tests.support.http import assert_error


def test_overload_answers_503_in_our_shape() -> None:
    app = FastAPI()
    release = asyncio.Event()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    guarded = RequestGuard(app, max_in_flight=2, max_body=1024, metrics=Metrics())

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            pending = [asyncio.create_task(c.get("/slow")) for _ in range(2)]
            await asyncio.sleep(0.1)
            third = await c.get("/slow")
            health = await c.get("/healthz")  # open paths are never refused
            release.set()
            return [third, health, *await asyncio.gather(*pending)]

    third, health, *done = asyncio.run(scenario())
    assert_error(third, 503, "overloaded")
    assert third.headers["retry-after"] == "1"
    assert health.status_code == 404  # not refused (this bare app has no /healthz)
    assert [r.status_code for r in done] == [200, 200]


def test_invalid_content_length_is_400() -> None:
    app = FastAPI()
    guarded = RequestGuard(app, max_in_flight=2, max_body=1024, metrics=Metrics())

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/x", content=b"abc", headers={"content-length": "nope"})

    assert_error(asyncio.run(scenario()), 400, "bad_request")
