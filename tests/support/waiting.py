"""Free loopback ports and polling: until a condition holds, or a URL answers ready."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T | None], timeout: float, interval: float = 0.5,
             what: str = "condition") -> T:
    """Call `predicate` every `interval` seconds until it returns a true value, and return
    that value; TimeoutError naming `what` after `timeout` seconds. Exceptions from
    `predicate` propagate (an assertion in it fails at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def wait_ready(url: str, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Until GET {url}/readyz answers 200; `alive()` (optional) must stay true meanwhile."""

    def ready() -> bool:
        assert alive is None or alive(), "the service exited before it was ready"
        try:
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, interval=0.5, what=f"{url}/readyz")
