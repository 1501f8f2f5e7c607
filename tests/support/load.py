"""Load while something else happens: clients predicting in a loop, every answer recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import httpx


class Answer(NamedTuple):
    """One prediction request: when it started and ended (time.monotonic() seconds), its HTTP
    status or the httpx exception's class name, the `model_version` of a 200 answer, and, for a
    failure, the start of the body or the exception's repr."""

    start: float
    end: float
    status: int | str
    version: str | None
    detail: str


class Hammer:
    """`threads` clients posting one image each to /v1/predict in a loop (no token) until the
    `with` block ends, `pause_s` apart; each answer is recorded in `results`.

    `images`: one image, or several taken in turn (client k sends images k, k + threads, ...).
    """

    def __init__(self, url: str, images: bytes | Sequence[bytes], threads: int = 3,
                 pause_s: float = 0.0, timeout_s: float = 60):
        self.url, self.pause_s, self.timeout_s = url, pause_s, timeout_s
        self.images = [images] if isinstance(images, bytes) else list(images)
        self.stop = threading.Event()
        self.results: list[Answer] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k, threads), daemon=True)
                        for k in range(threads)]

    def _run(self, first: int, step: int) -> None:
        i = first
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as c:
            while not self.stop.is_set():
                data = self.images[i % len(self.images)]
                i += step
                t0 = time.monotonic()
                version, detail = None, ""
                try:
                    r = c.post("/v1/predict", files=[("files", ("x.png", data))])
                    status: int | str = r.status_code
                    if status == 200:
                        version = r.json()["model_version"]
                    else:
                        detail = r.text[:200]
                except httpx.HTTPError as exc:
                    status, detail = type(exc).__name__, repr(exc)
                with self._lock:
                    self.results.append(Answer(t0, time.monotonic(), status, version, detail))
                if self.pause_s:
                    time.sleep(self.pause_s)

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout_s + 5)

    def failures(self) -> list[Answer]:
        """The answers that were not 200, in the order they came."""
        with self._lock:
            return [a for a in self.results if a.status != 200]

    def versions(self) -> list[str]:
        """The model version of every 200 answer, in the order they came."""
        with self._lock:
            return [a.version for a in self.results if a.version is not None]
