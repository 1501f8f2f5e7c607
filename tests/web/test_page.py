"""The page in a real headless chromium against the real app over loopback: sign-in keeps the
token in the tab's sessionStorage and sends it as a header only; predict by drop, picker and
paste with each file's own answer or the API's error beside it; feedback; the review queue
labelled by keyboard; the dataset (upload, browse, remove); versions (card, compare, pin,
weights); live job progress that says "reconnecting" while the stream is down and resumes;
the page's weight and first paint. Each view's screenshot goes to docs/screenshots/.

Every test fails on a JavaScript error and on any request to another origin (`watched`).
Training for real needs Ray: tests/web/test_train_flow.py."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest

from service.api.routes.web import WEB_DIR
from tests.support.images import image_bytes, labelled_set, noisy_image
from tests.support.waiting import wait_for
from tests.web.conftest import MakeWeb, PageWatch, only_origin, screenshot, sign_in
from tests.web.server import WebService, first_paint
from training.jobs import JobStore
from training.registry import WEIGHTS

MAX_UPLOAD = 100_000


@pytest.fixture(scope="module")
def web(make_web: MakeWeb) -> WebService:
    """Everything predicted goes to the review queue (`review_below` 1.0); uploads above
    MAX_UPLOAD bytes are refused."""
    service = make_web(review_below=1.0, max_upload_bytes=MAX_UPLOAD)
    with service.client() as c:
        for label, data in labelled_set(["blue", "red"], 2):
            r = c.post("/v1/labels", data={"label": label}, files=[("files", ("x.png", data))])
            assert r.status_code == 200, r.text
    return service


Page = tuple[Any, PageWatch]


def files_arg(*items: tuple[str, str, bytes]) -> list[list[str]]:
    return [[name, mime, base64.b64encode(data).decode()] for name, mime, data in items]


DROP = """([selector, files]) => {
  const dt = new DataTransfer();
  for (const [name, type, b64] of files) {
    dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, { type }));
  }
  const target = document.querySelector(selector);
  for (const kind of ["dragover", "drop"]) {
    const init = { dataTransfer: dt, bubbles: true, cancelable: true };
    target.dispatchEvent(new DragEvent(kind, init));
  }
}"""

PASTE = """([files]) => {
  const dt = new DataTransfer();
  for (const [name, type, b64] of files) {
    dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, { type }));
  }
  const init = { clipboardData: dt, bubbles: true, cancelable: true };
  document.body.dispatchEvent(new ClipboardEvent("paste", init));
}"""


def card(page: Any, filename: str) -> Any:
    return page.locator("article.prediction", has=page.locator(".filename", has_text=filename))


def review_count(web: WebService) -> int:
    with web.client() as c:
        return len(c.get("/v1/review", params={"limit": 1000}).json()["items"])


def dataset_counts(web: WebService) -> dict[str, int]:
    with web.client() as c:
        return dict(c.get("/v1/dataset").json()["labels"])


def test_sign_in_keeps_the_token_in_the_tab_and_out_of_urls(watched: Page,
                                                            web: WebService) -> None:
    page, watch = watched
    sent: list[tuple[str, str | None]] = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
    page.goto(web.url)
    page.wait_for_selector("#dropzone")
    page.click("#sign-in")
    page.fill("#token-input", "not-the-token")
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#sign-in-error:has-text('Refused')")
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#token-input", web.token)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#sign-out", state="visible")
    page.goto(f"{web.url}/#dataset")
    page.wait_for_selector("#dataset-summary:has-text('images in')")
    assert page.evaluate("Object.values(sessionStorage)") == [web.token]
    assert page.evaluate("localStorage.length") == 0
    assert page.context.cookies() == []
    assert all(web.token not in url for url, _ in sent)
    assert web.token not in page.url
    authorised = [url for url, header in sent if header == f"Bearer {web.token}"]
    assert any(url.endswith("/v1/dataset") for url in authorised)
    # a new tab (another session) is signed out
    other = page.context.new_page()
    other.goto(f"{web.url}/#dataset")
    other.wait_for_selector("text=Sign in to continue")
    assert other.evaluate("sessionStorage.length") == 0
    other.close()
    page.click("#sign-out")
    page.wait_for_selector("text=Sign in to continue")
    assert page.evaluate("sessionStorage.length") == 0
    only_origin(watch, web.url)


def test_predict_by_drop_picker_and_paste_with_errors_beside_each_file(
        watched: Page, web: WebService) -> None:
    """Predict is open: no sign-in. A non-image and an oversize file get the API's own error
    next to them; the images beside them are answered."""
    page, watch = watched
    page.goto(web.url)
    page.wait_for_selector("#dropzone")
    big = noisy_image(7, (100, 100, 100), size=300)
    assert len(big) > MAX_UPLOAD
    page.evaluate(DROP, ["#dropzone", files_arg(
        ("dropped.png", "image/png", noisy_image(1, (40, 40, 200))),
        ("notes.txt", "text/plain", b"not an image at all"),
        ("huge.png", "image/png", big))])
    dropped = card(page, "dropped.png")
    dropped.locator(".predicted-label").wait_for()
    assert dropped.locator(".verdict").inner_text().endswith("by v0")
    assert dropped.locator(".bar").count() == 5
    notes = card(page, "notes.txt").locator(".error")
    notes.wait_for()
    assert notes.inner_text().startswith("unsupported_media_type: notes.txt")
    huge = card(page, "huge.png").locator(".error")
    huge.wait_for()
    assert huge.inner_text().startswith("payload_too_large:")
    assert str(MAX_UPLOAD) in huge.inner_text()

    page.select_option("#top-k", "3")
    page.set_input_files("#predict-files", files=[
        {"name": "picked.webp", "mimeType": "image/webp",
         "buffer": image_bytes((30, 160, 30), "WEBP")}])
    card(page, "picked.webp").locator(".predicted-label").wait_for()
    assert card(page, "picked.webp").locator(".bar").count() == 3
    page.evaluate(PASTE, [files_arg(("image.png", "image/png", noisy_image(2, (200, 40, 40))))])
    card(page, "image.png").locator(".predicted-label").wait_for()
    assert "Sign in to send the correct label back" in card(page, "image.png").inner_text()
    screenshot(page, "predict")
    only_origin(watch, web.url)


def test_predict_fits_a_phone_and_takes_feedback(watched: Page, web: WebService) -> None:
    page, watch = watched
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(web.url)
    sign_in(page, web.token)
    page.set_input_files("#predict-files", files=[
        {"name": "phone.png", "mimeType": "image/png", "buffer": noisy_image(3, (40, 40, 200))}])
    answer = card(page, "phone.png")
    answer.locator(".predicted-label").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
    before = dataset_counts(web).get("blue", 0)
    answer.locator(".feedback input").fill("blue")
    answer.locator(".feedback button").click()
    answer.locator("text=Saved as “blue” (added)").wait_for()
    assert dataset_counts(web)["blue"] == before + 1
    answer.locator(".feedback input").fill("no/slashes")
    answer.locator(".feedback button").click()
    answer.locator(".feedback .error").wait_for()
    assert answer.locator(".feedback .error").inner_text().startswith("invalid_label")
    screenshot(page, "predict-phone")
    only_origin(watch, web.url)


def test_three_review_items_labelled_by_keyboard(watched: Page, web: WebService) -> None:
    with web.client(token=None) as c:
        for i in range(5):
            r = c.post("/v1/predict", files=[("files", (f"queued-{i}.png",
                                                        noisy_image(100 + i, (40, 40, 200))))])
            assert r.status_code == 200, r.text
    page, watch = watched
    page.goto(f"{web.url}/#review")
    sign_in(page, web.token)
    waiting = review_count(web)
    assert waiting >= 5
    page.wait_for_selector("#review-grid .tile img[src^='blob:']")
    page.wait_for_selector("#review-keys:has-text('1 blue')")
    screenshot(page, "review")
    counts = dataset_counts(web)
    first = page.get_attribute("#review-grid .tile.selected", "data-id")
    for n in range(3):
        page.keyboard.press("1")  # the first label in the legend: blue
        page.wait_for_selector(f"#review-count:has-text('{waiting - n - 1} waiting')")
    wait_for(lambda: review_count(web) == waiting - 3, timeout=10, what="three labelled")
    assert dataset_counts(web)["blue"] == counts["blue"] + 3
    with web.client() as c:
        left = {i["prediction_id"] for i in c.get("/v1/review").json()["items"]}
    assert first not in left
    page.keyboard.press("ArrowRight")  # skip one, then dismiss the next
    skipped = page.get_attribute("#review-grid .tile.selected", "data-id")
    page.keyboard.press("d")
    wait_for(lambda: review_count(web) == waiting - 4, timeout=10, what="one dismissed")
    with web.client() as c:
        left = {i["prediction_id"] for i in c.get("/v1/review").json()["items"]}
    assert skipped not in left
    # a new label typed after N
    page.keyboard.press("n")
    page.keyboard.type("purple")
    page.keyboard.press("Enter")
    wait_for(lambda: dataset_counts(web).get("purple") == 1, timeout=10, what="typed label")
    only_origin(watch, web.url)


def test_a_refused_label_puts_the_item_back_with_the_apis_error(watched: Page,
                                                                web: WebService) -> None:
    with web.client(token=None) as c:
        assert c.post("/v1/predict", files=[("files", ("q.png", noisy_image(300, (9, 9, 9))))]
                      ).status_code == 200
    page, watch = watched
    page.goto(f"{web.url}/#review")
    sign_in(page, web.token)
    page.wait_for_selector("#review-grid .tile.selected")
    waiting = review_count(web)
    page.fill("#review-new-label", "bad/label")
    page.press("#review-new-label", "Enter")
    page.wait_for_selector("#review-focus .error:has-text('invalid_label')")
    assert review_count(web) == waiting
    page.wait_for_selector(f"#review-count:has-text('{waiting} waiting')")
    only_origin(watch, web.url)


def test_dataset_upload_browse_and_remove(watched: Page, web: WebService,
                                          tmp_path: Path) -> None:
    """A folder's images (its hidden files left out) and picked files under one label; the
    file that is not an image is listed with the API's error, the others are stored."""
    page, watch = watched
    page.goto(f"{web.url}/#dataset")
    sign_in(page, web.token)
    page.wait_for_selector("#dataset-summary:has-text('images in')")
    page.fill("#upload-label", "green")
    greens = [d for _, d in labelled_set(["green"], 4, seed=9)]
    folder = tmp_path / "greens"
    folder.mkdir()
    (folder / "g0.png").write_bytes(greens[0])
    (folder / "g1.png").write_bytes(greens[1])
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    page.set_input_files("#upload-folder", folder)
    page.set_input_files("#upload-files", files=[
        {"name": "g2.png", "mimeType": "image/png", "buffer": greens[2]},
        {"name": "again.png", "mimeType": "image/png", "buffer": greens[0]},
        {"name": "readme.txt", "mimeType": "text/plain", "buffer": b"text"}])
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-result:has-text('3 added, 1 already there, 0 relabelled, "
                           "1 refused')")
    problems = page.inner_text("#upload-report .problems")
    assert "readme.txt" in problems and "unsupported_media_type" in problems
    assert ".DS_Store" not in problems
    assert dataset_counts(web)["green"] == 3
    row = page.locator("details.label-row[data-label='green']")
    row.locator("summary").click()
    row.locator(".sample img[src^='blob:']").nth(2).wait_for()
    screenshot(page, "dataset")
    sha = row.locator(".sample").first.get_attribute("data-sha256")
    remove = row.locator(".sample").first.locator("button")
    remove.click()
    assert remove.inner_text() == "Remove?"
    assert dataset_counts(web)["green"] == 3  # the first click only arms it
    remove.click()
    wait_for(lambda: dataset_counts(web).get("green") == 2, timeout=10, what="removed")
    with web.client() as c:
        assert c.get(f"/v1/dataset/images/{sha}").status_code == 404
    only_origin(watch, web.url)


def test_versions_card_compare_pin_and_weights(watched: Page, web: WebService) -> None:
    page, watch = watched
    page.goto(f"{web.url}/#versions")
    sign_in(page, web.token)
    row = page.locator("#versions-table tr[data-version='v0']")
    row.wait_for()
    assert "serving" in row.inner_text() and "1000" in row.inner_text()
    page.wait_for_selector("#policy:has-text('automatic')")
    row.locator("button.pin").click()
    page.wait_for_selector("#policy:has-text('pinned')")
    with web.client() as c:
        assert c.get("/v1/models").json()["policy"]["mode"] == "pinned"
    page.locator("#versions-table tr[data-version='v0'] button.unpin").click()
    page.wait_for_selector("#policy:has-text('automatic')")
    with web.client() as c:
        assert c.get("/v1/models").json()["policy"]["mode"] == "automatic"
    with page.expect_download() as download:
        page.locator("#versions-table tr[data-version='v0'] button", has_text="Weights").click()
    path = download.value.path()
    assert download.value.suggested_filename == "visionloop-v0.safetensors"
    assert path.read_bytes() == (web.home / "models" / "v0" / WEIGHTS).read_bytes()
    page.locator("#versions-table tr[data-version='v0'] button", has_text="Card").click()
    page.wait_for_selector("#version-card:has-text('Classes (1000)')")
    assert "pretrained ImageNet classifier" in page.inner_text("#card-promotion")
    page.click("#compare button[type=submit]")
    page.wait_for_selector("#compare-result:has-text('Neither version has per-class')")
    screenshot(page, "versions")
    only_origin(watch, web.url)


def test_job_progress_is_live_and_survives_a_lost_connection(watched: Page,
                                                             web: WebService) -> None:
    """A job run by another process (the CLI, holding the job lock) moves while the page
    watches; the service goes away (the open stream is cut, new connections refused) and the
    page says "reconnecting"; when it is back, the page picks up where the job is now."""
    page, watch = watched
    jobs = JobStore(web.home)
    lock = jobs.acquire()
    try:
        job_id = jobs.create({"epochs": 3}, "cli")["job_id"]
        page.goto(f"{web.url}/#train")
        sign_in(page, web.token)
        page.wait_for_selector("#train-epochs")
        assert page.input_value("#train-epochs") == str(web.settings.train_epochs)
        page.wait_for_selector("#job-status:has-text('queued')")
        page.wait_for_selector("#job-connection:has-text('live')")
        web.halt()
        page.wait_for_selector("#job-connection:has-text('reconnecting')")
        jobs.update(job_id, status="running", started_at=time.time(),
                    progress={"epoch": 2, "epochs": 3, "step": 6, "steps": 9,
                              "fraction": 0.67, "eta_s": 42.0},
                    metrics=[{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5 + e / 10,
                              "val_loss": 1.1 / e, "val_accuracy": 0.45 + e / 10}
                             for e in (1, 2)])
        time.sleep(1.5)
        assert "queued" in page.inner_text("#job-status")  # nothing new while it is away
        assert "reconnecting" in page.inner_text("#job-connection")
        web.start()
        page.wait_for_selector("#job-status:has-text('running')", timeout=20_000)
        page.wait_for_selector("#job-connection:has-text('live')")
        assert page.inner_text("#job-epoch") == "2 / 3"
        assert page.inner_text("#job-eta") == "42 s"
        assert page.locator("#job svg.chart polyline").count() == 4
        page.click("#job-cancel")
        wait_for(lambda: jobs.cancel_requested(job_id), timeout=10, what="cancel request")
        jobs.finish(job_id, "cancelled", "cancelled on request")
        page.wait_for_selector("#job-status:has-text('cancelled')")
        page.wait_for_selector(f"#jobs-table:has-text('{job_id}')")
    finally:
        lock.release()
    only_origin(watch, web.url)


def test_page_weight_and_first_paint(browser: Any, web: WebService) -> None:
    """No file of the page over 200 KB, and first paint under 1 s on the local service,
    measured by the browser's Performance API in a fresh context (nothing cached)."""
    for path in WEB_DIR.iterdir():
        assert path.stat().st_size < 200 * 1024, path.name
    context = browser.new_context()
    try:
        page = context.new_page()
        m = first_paint(page, web.url + "/")
    finally:
        context.close()
    assert m["first_paint_ms"] is not None and m["first_paint_ms"] < 1000, m
    assert m["first_contentful_paint_ms"] < 1000, m
    assert all(r["decoded_bytes"] < 200 * 1024 for r in m["resources"]), m["resources"]
    loaded = {r["url"] for r in m["resources"]}
    assert {"/", "/web/app.js", "/web/style.css", "/web/predict.js", "/web/config"} <= loaded


def test_with_a_predict_token_the_page_asks_to_sign_in_first(watched: Page,
                                                            make_web: MakeWeb) -> None:
    """Predict is closed when VISIONLOOP_PREDICT_TOKEN is set: the page says so instead of
    offering a drop zone that would answer 401; signed in with the API token, it predicts."""
    closed = make_web(predict_token="p" * 40)
    with closed.client(token=None) as c:
        assert c.get("/web/config").json()["predict_open"] is False
    page, watch = watched
    page.goto(closed.url)
    page.wait_for_selector("text=Sign in to continue")
    assert page.locator("#dropzone").count() == 0
    sign_in(page, closed.token)
    page.set_input_files("#predict-files", files=[
        {"name": "closed.png", "mimeType": "image/png", "buffer": noisy_image(5, (9, 90, 9))}])
    card(page, "closed.png").locator(".predicted-label").wait_for()
    only_origin(watch, closed.url)
