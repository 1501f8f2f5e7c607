"""Assertions on the service's HTTP answers."""

from __future__ import annotations

from typing import Any

import httpx


def assert_error(r: httpx.Response, status: int | tuple[int, ...], code: str | None = None
                 ) -> dict[str, Any]:
    """The answer has `status` (or one of them) and the `{"error": {"code", "message"}}`
    shape, with `code` when given; -> the parsed body."""
    allowed = (status,) if isinstance(status, int) else status
    assert r.status_code in allowed, f"{r.status_code} (expected {allowed}): {r.text[:300]}"
    body: dict[str, Any] = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body
