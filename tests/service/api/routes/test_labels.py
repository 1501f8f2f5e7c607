"""POST/DELETE /v1/labels and GET /v1/dataset: unsafe labels and bad batches write nothing;
uploads are idempotent by content, relabel, delete."""

from __future__ import annotations

import pytest

from tests.service.api.conftest import Api, MakeApi, dataset_files, files
from tests.support.http import assert_error
from tests.support.images import image_bytes, noisy_image, png_declaring


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    return make_api(max_files=3, max_pixels=4_000_000)


@pytest.mark.parametrize("label", ["../etc", "a/b", "", " x", ".hidden", "x" * 65, "a  b",
                                   "..", "C:\\x", "tab\tx", "a\u202eb", "50%"])
def test_unsafe_labels_write_nothing(api: Api, label: str) -> None:
    before = dataset_files(api.home)
    c, auth = api.client, api.headers()
    r = c.post("/v1/labels", data={"label": label}, files=files(("a.png", image_bytes())),
               headers=auth)
    assert "Label rules:" in assert_error(r, 400, "invalid_label")["error"]["message"]
    assert_error(c.post("/v1/feedback", json={"prediction_id": "0" * 32, "label": label},
                        headers=auth), 400)
    assert dataset_files(api.home) == before
    assert not (api.home / "etc").exists() and not (api.home / "dataset" / "a").exists()


def test_labels_batch_with_bad_file_writes_nothing(api: Api) -> None:
    before = dataset_files(api.home)
    c, auth = api.client, api.headers()
    r = c.post("/v1/labels", data={"label": "cat"}, headers=auth,
               files=files(("good.png", noisy_image(7, (1, 1, 1))),
                           ("bad.png", image_bytes(fmt="GIF"))))
    assert_error(r, 415)
    assert_error(c.post("/v1/labels", data={"label": "cat"}, headers=auth,
                        files=files(*[(f"{i}.png", noisy_image(i, (5, 5, 5)))
                                      for i in range(4)])), 413, "too_many_files")
    assert_error(c.post("/v1/labels", data={"label": "cat"}, headers=auth,
                        files=files(("bomb.png", png_declaring(30000, 30000)))), 413)
    truncated = noisy_image(8, (9, 9, 9), size=200)[:400]  # header fine, pixels missing
    assert_error(c.post("/v1/labels", data={"label": "cat"}, headers=auth,
                        files=files(("t.png", truncated))), 400, "invalid_image")
    assert_error(c.post("/v1/labels", data={"label": "cat"}, headers=auth), 400, "no_images")
    assert_error(c.post("/v1/labels", json={"label": "cat"}, headers=auth), 415)
    assert dataset_files(api.home) == before


def test_labels_idempotent_relabel_delete(api: Api) -> None:
    data = noisy_image(99, (50, 150, 50))
    c, auth = api.client, api.headers()
    r = c.post("/v1/labels", data={"label": "green"}, files=files(("g.png", data)), headers=auth)
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    assert res["status"] == "added" and res["label"] == "green"
    sha = res["sha256"]
    r = c.post("/v1/labels", data={"label": "green"}, files=files(("g.png", data)), headers=auth)
    assert r.json()["results"][0]["status"] == "duplicate"
    r = c.post("/v1/labels", data={"label": "lime"}, files=files(("g.png", data)), headers=auth)
    assert r.json()["results"][0]["status"] == "relabelled"
    ds = c.get("/v1/dataset", headers=auth).json()
    assert ds["labels"].get("lime") == 1 and "green" not in ds["labels"]
    assert ds["total"] == sum(ds["labels"].values()) and ds["new_since_last_job"] >= 1
    assert c.delete(f"/v1/labels/{sha}", headers=auth).json() == {"sha256": sha, "deleted": True}
    assert_error(c.delete(f"/v1/labels/{sha}", headers=auth), 404, "image_not_found")
    assert_error(c.delete("/v1/labels/..%2F..%2Fetc", headers=auth), 404)
