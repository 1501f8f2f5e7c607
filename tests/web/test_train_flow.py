"""The loop in the browser with real training (Ray Train in this process, on the module's
local Ray cluster): sign in, start a tiny job from the Train view (two labels, 64 px, two
epochs, the gate's error-reduction bar at 0), watch its progress arrive over the event stream
until "succeeded", see the new version listed and serving, open its card, compare it with v0,
and activate v0 back. Writes docs/screenshots/train.png and version-card.png.

Run it under the Ray lock: `flock /tmp/visionloop-ray.lock .venv/bin/pytest tests/web -m slow`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.images import labelled_set
from tests.web.conftest import MakeWeb, PageWatch, only_origin, screenshot, sign_in
from tests.web.server import WebService
from training.dataset import DatasetStore
from training.pipeline import prepare_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def web(ray_cluster: None, make_web: MakeWeb) -> WebService:
    service = make_web()
    with service.client() as c:
        for label, data in labelled_set(["red", "blue"], 16, size=48, seed=3):
            r = c.post("/v1/labels", data={"label": label}, files=[("files", ("x.png", data))])
            assert r.status_code == 200, r.text
    prepare_data(DatasetStore(service.home))  # enough images in each held-out split
    return service


def test_train_from_the_page_then_activate_the_old_version_back(
        watched: tuple[Any, PageWatch], web: WebService) -> None:
    page, watch = watched
    started: list[Any] = []
    page.on("request", lambda r: started.append(r.post_data) if r.method == "POST"
            and r.url.endswith("/v1/train") else None)
    page.goto(f"{web.url}/#train")
    sign_in(page, web.token)
    page.wait_for_selector("#train-epochs")
    page.fill("#train-epochs", "2")
    page.fill("#train-image_size", "64")
    page.fill("#train-batch_size", "8")
    # augmentation's default follows the strategy: off for feature-extract (features cached)
    assert not page.is_checked("#train-augment")
    page.select_option("#train-strategy", "finetune")
    assert page.is_checked("#train-augment")
    page.select_option("#train-strategy", "feature-extract")
    assert not page.is_checked("#train-augment")
    page.click("#train-form details.gate summary")
    page.fill("#train-gate-min_error_reduction", "0")
    page.click("#train-start")
    page.wait_for_selector("#job-status")
    assert json.loads(started[0]) == {"epochs": 2, "batch_size": 8, "image_size": 64,
                                      "gate": {"min_error_reduction": 0}}
    page.wait_for_selector("#job-status:has-text('succeeded')", timeout=300_000)
    outcome = page.inner_text("#job-outcome")
    assert outcome.startswith("Published v1: promoted"), outcome
    assert page.inner_text("#job-epoch") == "2 / 2"
    assert page.locator("#job svg.chart polyline").count() == 4  # train and val, both charts
    page.wait_for_selector("#jobs-table:has-text('v1')")
    screenshot(page, "train", full_page=True)

    page.goto(f"{web.url}/#versions")
    page.wait_for_selector("#versions-table tr[data-version='v1']")
    assert "serving" in page.inner_text("#versions-table tr[data-version='v1']")
    page.locator("#versions-table tr[data-version='v1'] button", has_text="Card").click()
    page.wait_for_selector("#version-card:has-text('Per-class accuracy (test split)')")
    assert page.locator("#version-card table.confusion").count() == 1
    assert "Parent" in page.inner_text("#version-card")
    # a trained version's calibration and threshold records, and its (not yet judged) drift
    assert "Temperature" in page.inner_text("#card-calibration")
    assert "Target precision" in page.inner_text("#card-threshold")
    assert "Not judged yet" in page.inner_text("#card-drift")
    page.select_option("#compare-a", "v0")
    page.select_option("#compare-b", "v1")
    page.click("#compare button[type=submit]")
    page.wait_for_selector("#compare-table")
    screenshot(page, "version-card", full_page=True)

    page.locator("#versions-table tr[data-version='v0'] button.activate").click()
    page.wait_for_selector("#current-version:has-text('Serving v0')")
    with web.client() as c:
        assert c.get("/v1/models").json()["current"] == "v0"
    with web.client(token=None) as c:
        r = c.post("/v1/predict", files=[("files", ("x.png", labelled_set(["red"], 1)[0][1]))])
        assert r.headers["x-model-version"] == "v0"
    only_origin(watch, web.url)
