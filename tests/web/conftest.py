"""Fixtures of the web page's tests: the real app served over loopback (`make_web`, see
tests/web/server.py), a headless chromium (skipped, saying why, where Debian's chromium or
Playwright is missing), and a `page` that fails its test on any JavaScript error and on any
request that leaves the service's origin."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.web.server import (
    SCREENSHOTS,
    WebService,
    browser_missing,
    chromium,
    publish_v0,
    serve_volume,
)

MakeWeb = Callable[..., WebService]


@pytest.fixture(scope="session")
def v0_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume with version 0 published once per session (copied by `make_web`)."""
    home = tmp_path_factory.mktemp("web-v0")
    publish_v0(home)
    return home


@pytest.fixture(scope="module")
def make_web(v0_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeWeb]:
    made: list[WebService] = []

    def make(**overrides: Any) -> WebService:
        """The app on a fresh volume with v0; `overrides`: Settings fields."""
        service = serve_volume(tmp_path_factory.mktemp("web-home"), v0_from=v0_home,
                               **overrides)
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    with chromium() as b:
        yield b


class PageWatch:
    """What a page did that a test must not let pass: JavaScript errors, and requests to any
    origin but the service's."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []


@pytest.fixture
def watched(browser: Any) -> Iterator[tuple[Any, PageWatch]]:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    watch = PageWatch()
    page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
    context.on("request", lambda request: watch.requests.append(request.url))
    yield page, watch
    context.close()
    assert not watch.errors, f"JavaScript errors on the page: {watch.errors}"


def only_origin(watch: PageWatch, url: str) -> None:
    """Every request the page made went to `url`'s origin (blob: and data: stay local)."""
    away = [r for r in watch.requests
            if not (r.startswith(url + "/") or r == url or r.startswith(("blob:", "data:")))]
    assert not away, f"requests to another origin: {away}"


def screenshot(page: Any, name: str, full_page: bool = False) -> Path:
    """docs/screenshots/<name>.png of the page as it is now, reduced to a 128-colour palette
    (no dithering) so that the committed files stay small."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    if full_page:  # from the top: the sticky header where it belongs
        page.evaluate("window.scrollTo(0, 0)")
    page.evaluate("document.getElementById('status').textContent = ''")  # a passing toast
    shot = Image.open(io.BytesIO(page.screenshot(full_page=full_page))).convert("RGB")
    shot.quantize(colors=128, method=Image.Quantize.FASTOCTREE,
                  dither=Image.Dither.NONE).save(path, "PNG", optimize=True)
    return path


def sign_in(page: Any, token: str) -> None:
    page.click("#sign-in")
    page.fill("#token-input", token)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#sign-out", state="visible")
