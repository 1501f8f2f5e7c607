"""The real API app (real stores on a volume, an in-process classifier and training
controller, as in tests/service/api/conftest.py) served by uvicorn over loopback in a thread,
for a real browser to load; and the browser: Debian's chromium driven by Playwright.

Used by tests/web/ and by benchmarks/web.py. Training in this process needs a Ray cluster in
this process (`ray.init`, the `ray_cluster` fixture); everything else does not.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.service import BACKBONE, in_process_app
from tests.support.waiting import free_port, wait_for

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def chromium_path() -> str | None:
    """Debian's chromium (Playwright's own browser downloads cannot be reached here)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return "no chromium on PATH (Debian: apt-get install -y chromium)"
    return None


@dataclass
class WebService:
    """A served app: its URL, volume, API token, settings and training controller."""

    url: str
    home: Path
    token: str
    settings: Any
    controller: Any
    app: Any
    port: int
    server: Any = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve `app` on `port` (again, after `halt`)."""
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
            lifespan="off", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, name=f"web-{self.port}",
                                       daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30, interval=0.05,
                 what="uvicorn to start")

    def halt(self) -> None:
        """Stop serving: open connections (event streams too) are cut, new ones refused. The
        app, its volume and controller stay, for `start()`."""
        self.server.should_exit = True
        self.server.force_exit = True
        assert self.thread is not None
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def client(self, token: str | None = "api") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if token == "api" else (
            {"Authorization": f"Bearer {token}"} if token else {})
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.halt()
        self.controller.stop()


def publish_v0(home: Path) -> None:
    """Version 0 (BACKBONE's ImageNet classifier) published on volume `home`."""
    from service.app import prepare_home
    from service.settings import load_settings

    prepare_home(load_settings(home=home, backbone=BACKBONE))


def serve_volume(home: Path, v0_from: Path | None = None, **overrides: Any) -> WebService:
    """The app on volume `home` (with the models of `v0_from` copied in first, when given),
    `overrides` as Settings fields, served on a free loopback port until `.stop()`."""
    if v0_from is not None and not (home / "models").exists():
        shutil.copytree(v0_from / "models", home / "models")
    made = in_process_app(home, **overrides)
    settings, token, controller, app = made.settings, made.token, made.controller, made.app
    port = free_port()
    service = WebService(f"http://127.0.0.1:{port}", settings.home, token, settings,
                         controller, app, port)
    service.start()
    return service


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium (Playwright `Browser`), closed on exit."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    assert path is not None, browser_missing()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def first_paint(page: Any, url: str) -> dict[str, Any]:
    """Load `url` in `page` (a fresh context: nothing cached) and read the Performance API:
    first paint, first contentful paint, DOMContentLoaded and load (ms from navigation
    start), and each resource's transfer and decoded size in bytes."""
    page.goto(url, wait_until="load")
    wait_for(lambda: page.evaluate(
        "performance.getEntriesByType('paint').length >= 2"), timeout=10, interval=0.05,
        what="paint entries")
    time.sleep(0.2)  # the modules the first view imports after load
    return dict(page.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const paint = Object.fromEntries(performance.getEntriesByType('paint')
            .map(e => [e.name, e.startTime]));
        const resources = [nav, ...performance.getEntriesByType('resource')].map(e => ({
            url: new URL(e.name).pathname, transfer_bytes: e.transferSize,
            decoded_bytes: e.decodedBodySize, duration_ms: e.duration}));
        return {first_paint_ms: paint['first-paint'],
                first_contentful_paint_ms: paint['first-contentful-paint'],
                dom_content_loaded_ms: nav.domContentLoadedEventEnd, load_ms: nav.loadEventEnd,
                resources};
    }"""))
