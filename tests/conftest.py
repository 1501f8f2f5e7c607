"""Shared test helpers: images made on the fly, and a real Ray local cluster + Serve app.

`serve_app(tmp_path_factory, **settings)` starts the whole service on loopback (a free port) on
a module's Ray cluster; modules that need Ray share one cluster through `ray_cluster`
(module-scoped), started with 2 logical CPUs like the CI machine.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BACKBONE = "efficientnet_lite0"


def image_bytes(color: tuple[int, ...] | int = (200, 30, 30), fmt: str = "PNG",
                size: tuple[int, int] = (64, 64), mode: str = "RGB", **save: Any) -> bytes:
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


# Images in every mode a client may send (the decoder turns each into RGB): (id, bytes).
IMAGE_MODES = {
    "cmyk-jpeg": image_bytes((10, 200, 30, 5), "JPEG", mode="CMYK"),
    "gray": image_bytes(128, "PNG", mode="L"),
    "rgba": image_bytes((10, 20, 200, 100), "PNG", mode="RGBA"),
    "16bit": image_bytes(40000, "PNG", mode="I;16"),
    "webp": image_bytes((1, 2, 3), "WEBP"),
}


def noisy_image(seed: int, base: tuple[int, int, int], size: int = 64) -> bytes:
    """A distinct image (distinct bytes, so distinct sha256) around colour `base`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(base) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    from service.app import serve_environment

    os.environ.pop("RAY_ADDRESS", None)
    serve_environment()  # the Serve front end `visionloop up` runs with
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@dataclass
class RunningService:
    url: str
    home: Path
    token: str
    settings: Any

    def client(self, token: str | None = "api", timeout: float = 60) -> httpx.Client:
        headers = {}
        if token == "api":
            headers["Authorization"] = f"Bearer {self.token}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def start_service(home: Path, **overrides: Any) -> RunningService:
    """The whole service (ingress, classifier replicas, controller) via serve.run, on a free
    loopback port; waits until /readyz answers 200 from every replica."""
    from ray import serve

    from service.app import APP_NAME, build_app, prepare_home
    from service.security import read_token_file
    from service.settings import load_settings

    port = free_port()
    settings, _ = prepare_home(load_settings(home=home, backbone=BACKBONE, port=port,
                                             **overrides))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout=120)
    token = settings.api_token or read_token_file(settings.home)
    assert token
    return RunningService(url, settings.home, token, settings)


def assert_error(r: httpx.Response, status: int | tuple[int, ...], code: str | None = None
                 ) -> dict[str, Any]:
    """The answer has `status` (or one of them) and the `{"error": {"code", "message"}}`
    shape."""
    allowed = (status,) if isinstance(status, int) else status
    assert r.status_code in allowed, f"{r.status_code} (expected {allowed}): {r.text[:300]}"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body


def wait_ready(url: str, timeout: float, alive: Any = None) -> None:
    """Until GET {url}/readyz answers 200; `alive()` (optional) must stay true meanwhile."""

    def ready() -> bool:
        assert alive is None or alive(), "the service exited before it was ready"
        try:
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, interval=0.5, what=f"{url}/readyz")


def wait_for(predicate: Any, timeout: float, interval: float = 0.5, what: str = "condition"
             ) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
