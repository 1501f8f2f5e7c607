"""Answer quality on the page (issue 14), in a real headless chromium against the real app: a
version's card shows its calibration and threshold records and its live drift (or why there
is none: v0 has no records, a version with too few live answers is not judged); a shadow trial
is started from a version's row by keyboard, its live figures shown, and ended; the API's
refusal of a trial is shown beside the form; a prediction below the threshold reads
"unknown (below threshold X)" with its top-k bars still drawn.

Versions are published without training (tests/support/versions.py): a real network with a
random head, and records made by the publish step's own `training.pipeline.answer_quality`
from held-out logits made here. Writes docs/screenshots/versions-trial.png and
version-quality.png."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from tests.support.images import noisy_image
from tests.support.service import BACKBONE
from tests.support.versions import publish_version
from tests.web.conftest import MakeWeb, PageWatch, only_origin, screenshot, sign_in
from tests.web.server import WebService
from training.model import build_model
from training.pipeline import answer_quality
from training.presets import EvalPreset
from training.registry import WEIGHTS, Registry

CLASSES = ["blue", "red"]
MIN_ANSWERS = 5
STRICT = 0.99

Page = tuple[Any, PageWatch]


def held_out_records() -> dict[str, Any]:
    """`calibration`, `threshold` and `reference` of 40 made held-out answers: the answer's
    margin grows with i, and every other one of the 20 lowest-margin answers is wrong, so the
    temperature is not 1 and the threshold is above 0."""
    labels = torch.tensor([i % 2 for i in range(40)])
    logits = torch.zeros(40, 2)
    for i in range(40):
        margin = 0.2 + i * 0.15
        right = int(labels[i]) if (i >= 20 or i % 2) else 1 - int(labels[i])
        logits[i, right] = margin
    return answer_quality(CLASSES, logits, labels)


def publish_with(registry: Registry, records: dict[str, Any]) -> str:
    """A version (seed-0 weights, CLASSES) whose manifest holds `records`. -> its name."""
    torch.manual_seed(0)
    model = build_model(BACKBONE, num_classes=len(CLASSES), pretrained=False)
    version, staging = registry.allocate()
    registry.publish(version, staging, model.state_dict(), {
        "backbone": BACKBONE, "classes": CLASSES,
        "preprocessing": EvalPreset.for_size(64).to_dict(), "parent": registry.current(),
        "created_at": time.time(), "metrics": None,
        "promotion": {"promoted": True, "reason": "test"}, **records})
    return version


@pytest.fixture(scope="module")
def quality(make_web: MakeWeb) -> tuple[WebService, dict[str, str]]:
    """v0; `served`: records from `held_out_records`, activated, with MIN_ANSWERS live
    answers (drift is judged); `strict`: the same records but a threshold of STRICT (every
    answer of a random head is `unknown`) and no live answer; `gone`: its weights file
    removed."""
    service = make_web(drift_min_predictions=MIN_ANSWERS, drift_window=50)
    registry = Registry(service.home)
    records = held_out_records()
    assert records["calibration"]["temperature"] != pytest.approx(1.0)
    assert 0 < records["threshold"]["threshold"] < 1
    versions = {"served": publish_with(registry, records),
                "strict": publish_with(registry, {**records, "threshold": {
                    **records["threshold"], "threshold": STRICT}}),
                "gone": publish_version(registry, CLASSES)}
    (registry.version_dir(versions["gone"]) / WEIGHTS).unlink()
    with service.client() as c:
        r = c.post(f"/v1/models/{versions['served']}/activate")
        assert r.status_code == 200, r.text
        for seed in range(MIN_ANSWERS):
            r = c.post("/v1/predict", files=[("files", (f"{seed}.png", noisy_image(
                seed, (200, 40 * seed, 30))))])
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == versions["served"]
    return service, versions


def open_card(page: Any, version: str) -> None:
    page.locator(f"#versions-table tr[data-version='{version}'] button",
                 has_text="Card").click()
    page.wait_for_selector(f"#version-card h2:has-text('Version {version}')")


def test_card_shows_calibration_threshold_and_drift(watched: Page, quality: Any) -> None:
    page, watch = watched
    web, versions = quality
    with web.client() as c:
        manifest = c.get(f"/v1/models/{versions['served']}").json()
    cal, thr, drift = manifest["calibration"], manifest["threshold"], manifest["drift"]
    assert drift["score"] is not None and drift["count"] == MIN_ANSWERS
    page.goto(f"{web.url}/#versions")
    sign_in(page, web.token)
    open_card(page, versions["served"])
    text = page.inner_text("#card-calibration")
    assert f"{cal['temperature']:.3f}" in text
    assert f"{cal['ece_before']:.3f} before → {cal['ece_after']:.3f} after" in text
    assert "the test split (40 images)" in text
    text = page.inner_text("#card-threshold")
    assert f"{thr['threshold'] * 100:.1f}%" in text and thr["rule"] in text
    assert f"{thr['target_precision'] * 100:.1f}%" in text
    assert f"{thr['accepted_share'] * 100:.1f}% of held-out answers" in text
    text = page.inner_text("#card-drift")
    assert f"{drift['score']:.3f} (threshold {drift['threshold']:.2f})" in text
    assert f"PSI {drift['label_psi']:.3f}" in text
    assert f"PSI {drift['confidence_psi']:.3f}" in text
    assert f"{MIN_ANSWERS} (the newest up to 50)" in text
    verdict = "drifted" if drift["drifted"] else "not drifted"
    assert page.inner_text("#card-drift-verdict") == verdict
    rows = page.locator("#drift-labels tbody tr")
    assert rows.count() == len(CLASSES)
    screenshot(page, "version-quality", full_page=True)

    open_card(page, versions["strict"])  # a reference, but no live answer yet
    page.wait_for_selector(f"#card-drift:has-text('Not judged yet: 0 live answers of "
                           f"{versions['strict']}, {MIN_ANSWERS} needed')")
    assert f"{STRICT * 100:.1f}%" in page.inner_text("#card-threshold")

    open_card(page, "v0")
    assert "No calibration record: version 0 is the pretrained" in page.inner_text(
        "#card-calibration")
    assert "No threshold record" in page.inner_text("#card-threshold")
    assert "no held-out reference" in page.inner_text("#card-drift")
    only_origin(watch, web.url)


def test_trial_started_from_a_row_by_keyboard_shown_and_ended(watched: Page,
                                                               quality: Any) -> None:
    page, watch = watched
    web, versions = quality
    strict, served = versions["strict"], versions["served"]
    page.goto(f"{web.url}/#versions")
    sign_in(page, web.token)
    page.wait_for_selector("#trial-none")
    row = page.locator(f"#versions-table tr[data-version='{served}']")
    assert row.locator("button.try").count() == 0  # the current version is not tried
    # the API's refusal (weights gone) stays beside the form
    page.locator(f"#versions-table tr[data-version='{versions['gone']}'] button.try").click()
    page.click("tr.trial-form button[type=submit]")
    page.wait_for_selector("#trial-form-error:has-text('invalid_version')")
    assert "Could not start the trial" in page.inner_text("#trial-form-error")
    # Escape closes the form and gives the focus back to its button
    page.keyboard.press("Escape")
    assert page.locator("tr.trial-form").count() == 0
    assert page.evaluate("document.activeElement.classList.contains('try')")

    # by keyboard: focus the row's button, Enter opens the form with the focus on its mode
    page.locator(f"#versions-table tr[data-version='{strict}'] button.try").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "trial-mode"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "trial-share"
    page.keyboard.press("Control+A")
    page.keyboard.type("100")
    page.keyboard.press("Enter")
    page.wait_for_selector("#trial-end")
    with web.client() as c:
        trial = c.get("/v1/models/trial").json()
    assert trial["version"] == strict and trial["mode"] == "shadow" and trial["share"] == 1.0
    assert f"{strict} on shadow trial beside {served}" in page.inner_text("#trial")
    assert "on trial (shadow)" in page.inner_text(
        f"#versions-table tr[data-version='{strict}'] th")
    assert page.inner_text("#trial-replicas") == f"#1 follows {strict}"

    with web.client() as c:  # live traffic: the shadow classifies each, one label comes back
        ids = []
        for seed in range(10, 13):
            r = c.post("/v1/predict", files=[("files", (f"{seed}.png", noisy_image(
                seed, (30, 60, 200))))])
            assert r.status_code == 200, r.text
            ids.append(r.json()["predictions"][0])
        r = c.post("/v1/feedback", json={"prediction_id": ids[0]["prediction_id"],
                                         "label": "blue"})
        assert r.status_code == 200, r.text
        trial = c.get("/v1/models/trial").json()
    assert trial["answers"] == 3
    page.click("#trial-refresh")
    page.wait_for_selector("#trial-answers:text-is('3')")
    assert page.inner_text("#trial-agreement") == f"{trial['agreement'] * 100:.1f}%"
    fb = trial["feedback"]
    assert page.inner_text("#trial-current-accuracy") == (
        f"{fb['current_accuracy'] * 100:.1f}% of {fb['current_count']} labelled")
    screenshot(page, "versions-trial")

    page.click("#trial-end")
    page.wait_for_selector("#trial-none")
    with web.client() as c:
        assert c.get("/v1/models/trial").json() is None
    assert "on trial" not in page.inner_text("#versions-table")
    only_origin(watch, web.url)


def test_an_answer_below_the_threshold_reads_unknown_with_its_top_k(watched: Page,
                                                                     quality: Any) -> None:
    page, watch = watched
    web, versions = quality
    page.goto(f"{web.url}/#predict")
    sign_in(page, web.token)
    page.wait_for_selector(f"#predict-version option[value='{versions['strict']}']",
                           state="attached")
    page.select_option("#predict-version", versions["strict"])
    data = noisy_image(7, (120, 120, 20))
    page.set_input_files("#predict-files", files=[{"name": "dim.png", "mimeType": "image/png",
                                                   "buffer": data}])
    card = page.locator("article.prediction", has=page.locator(".filename",
                                                               has_text="dim.png"))
    card.locator(".verdict").wait_for()
    assert f"unknown (below threshold {STRICT * 100:.1f}%)" in card.inner_text()
    assert "unknown" in (card.get_attribute("class") or "")
    bars = card.locator(".bars > *")
    assert bars.count() == len(CLASSES)  # the top-k still drawn
    assert {card.locator(".bars").inner_text().count(c) for c in CLASSES} == {1}
    only_origin(watch, web.url)
