"""Display-name labels, browsing the dataset (`GET /v1/dataset/labels/{label}/images`, an
image and its thumbnail) and renaming and merging labels, over the real app and store: shapes,
paging, the token, and every bad input answered with its status and nothing changed."""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import quote

import pytest
from PIL import Image

from tests.service.api.conftest import Api, MakeApi, dataset_files, files
from tests.support.dataset import ledger_events
from tests.support.http import assert_error
from tests.support.images import encode, noisy_image, noisy_picture


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    return make_api()


def label_path(label: str) -> str:
    return f"/v1/dataset/labels/{quote(label, safe='')}"


def upload(api: Api, label: str, *images: bytes) -> list[str]:
    r = api.client.post("/v1/labels", data={"label": label}, headers=api.headers(),
                        files=files(*[(f"{k}.png", data) for k, data in enumerate(images)]))
    assert r.status_code == 200, r.text
    return [res["sha256"] for res in r.json()["results"]]


def get_json(api: Api, path: str, **params: Any) -> dict[str, Any]:
    r = api.client.get(path, params=params, headers=api.headers())
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def counts(api: Api) -> dict[str, int]:
    labels: dict[str, int] = get_json(api, "/v1/dataset")["labels"]
    return labels


def test_feedback_can_use_the_name_v0_predicted(api: Api) -> None:
    c, auth = api.client, api.headers()
    r = c.post("/v1/predict", files=files(("p.png", noisy_image(11, (120, 60, 30)))))
    assert r.status_code == 200, r.text
    [p] = r.json()["predictions"]
    names = [p["label"]] + [t["label"] for t in p["top_k"]]
    r = c.post("/v1/feedback", json={"prediction_id": p["prediction_id"], "label": p["label"]},
               headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == p["label"]
    assert counts(api)[p["label"]] >= 1
    for name in [*names, "Golden Retriever", "Egyptian cat", "jack-o'-lantern"]:
        r = c.post("/v1/labels", data={"label": name}, headers=auth,
                   files=files(("x.png", noisy_image(12, (1, 2, 3)))))
        assert r.status_code == 200, (name, r.text)
        assert r.json()["results"][0]["label"] == name
    assert counts(api)["jack-o'-lantern"] == 1  # the last one took the image


def test_browse_a_label_page_by_page_and_delete_a_wrong_image(api: Api) -> None:
    images = [noisy_image(100 + k, (40, 160, 40)) for k in range(5)]
    shas = upload(api, "Golden Retriever", *images)
    by_sha = dict(zip(shas, images, strict=True))
    first = get_json(api, f"{label_path('Golden Retriever')}/images", limit=2)
    assert {k: first[k] for k in ("label", "total", "offset", "limit")} == \
        {"label": "Golden Retriever", "total": 5, "offset": 0, "limit": 2}
    assert len(first["images"]) == 2
    image = first["images"][0]
    assert set(image) == {"sha256", "bytes", "added_at", "thumbnail_url", "image_url"}
    assert image["bytes"] == len(by_sha[image["sha256"]]) and image["added_at"] > 0
    assert image["image_url"] == f"/v1/dataset/images/{image['sha256']}"
    assert image["thumbnail_url"] == f"/v1/dataset/images/{image['sha256']}/thumbnail"
    rest = get_json(api, f"{label_path('Golden Retriever')}/images", offset=2, limit=50)
    seen = [i["sha256"] for i in first["images"] + rest["images"]]
    assert sorted(seen) == sorted(shas)  # every image once across the pages
    default = get_json(api, f"{label_path('Golden Retriever')}/images")
    assert (default["offset"], default["limit"]) == (0, 50)
    assert [i["sha256"] for i in default["images"]] == seen  # a stable order
    assert [a["added_at"] for a in default["images"]] == \
        sorted((a["added_at"] for a in default["images"]), reverse=True)  # newest first
    past = get_json(api, f"{label_path('Golden Retriever')}/images", offset=99)
    assert past["total"] == 5 and past["images"] == []

    c, auth = api.client, api.headers()
    r = c.get(image["image_url"], headers=auth)
    assert r.status_code == 200 and r.content == by_sha[image["sha256"]]
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    r = c.get(image["thumbnail_url"], headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (64, 64)  # never enlarged

    r = c.delete(f"/v1/labels/{image['sha256']}", headers=auth)
    assert r.status_code == 200, r.text
    assert get_json(api, f"{label_path('Golden Retriever')}/images")["total"] == 4
    for url in (image["image_url"], image["thumbnail_url"]):
        assert_error(c.get(url, headers=auth), 404, "image_not_found")


def test_a_large_image_gets_a_small_thumbnail(api: Api) -> None:
    big = encode(noisy_picture((10, 10, 200), 3, size=400).resize((1200, 600)), "JPEG")
    [sha] = upload(api, "wide", big)
    r = api.client.get(f"/v1/dataset/images/{sha}/thumbnail", headers=api.headers())
    assert r.status_code == 200
    with Image.open(io.BytesIO(r.content)) as thumb:
        assert thumb.size == (256, 128)
    assert len(r.content) < len(big)
    r = api.client.get(f"/v1/dataset/images/{sha}", headers=api.headers())
    assert r.content == big and r.headers["content-type"] == "image/jpeg"
    assert (api.home / "cache" / "thumbnails" / "256" / f"{sha}.jpg").read_bytes() == \
        api.client.get(f"/v1/dataset/images/{sha}/thumbnail", headers=api.headers()).content


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"offset": -1},
                                    {"limit": "ten"}, {"offset": "1.5"}])
def test_bad_paging_is_400(api: Api, params: dict[str, Any]) -> None:
    upload(api, "paged", noisy_image(300, (5, 5, 5)))
    r = api.client.get(f"{label_path('paged')}/images", params=params, headers=api.headers())
    assert_error(r, 400, "bad_request")


@pytest.mark.parametrize("label", ["nobody", "golden retriever", "a%2Fb", "%2E%2E", "a..",
                                   "x" * 300, "tab%09x"])
def test_unknown_labels_and_images_are_404(api: Api, label: str) -> None:
    c, auth = api.client, api.headers()
    assert_error(c.get(f"/v1/dataset/labels/{label}/images", headers=auth), 404)
    assert_error(c.post(f"/v1/dataset/labels/{label}/rename", json={"to": "fresh"},
                        headers=auth), 404)
    assert_error(c.post(f"/v1/dataset/labels/{label}/merge", json={"into": "fresh"},
                        headers=auth), 404)


@pytest.mark.parametrize("sha", ["0" * 64, "F" * 64, "%2E%2E", "..%2F..%2Fledger.jsonl", "abc"])
def test_unknown_images_are_404(api: Api, sha: str) -> None:
    c, auth = api.client, api.headers()
    assert_error(c.get(f"/v1/dataset/images/{sha}", headers=auth), 404)
    assert_error(c.get(f"/v1/dataset/images/{sha}/thumbnail", headers=auth), 404)


def test_every_dataset_route_needs_the_api_token(api: Api) -> None:
    [sha] = upload(api, "guarded", noisy_image(400, (7, 7, 7)))
    c = api.client
    for method, path, body in (
            ("GET", f"{label_path('guarded')}/images", None),
            ("GET", f"/v1/dataset/images/{sha}", None),
            ("GET", f"/v1/dataset/images/{sha}/thumbnail", None),
            ("POST", f"{label_path('guarded')}/rename", {"to": "x"}),
            ("POST", f"{label_path('guarded')}/merge", {"into": "x"})):
        for headers in ({}, api.headers("not-the-token-at-all")):
            r = c.request(method, path, json=body, headers=headers)
            assert_error(r, 401)
    assert counts(api)["guarded"] == 1


def test_rename_and_merge(api: Api) -> None:
    c, auth = api.client, api.headers()
    cats = upload(api, "Egyptian cat", *[noisy_image(500 + k, (150, 120, 90)) for k in range(3)])
    tabby = upload(api, "tabby", *[noisy_image(600 + k, (160, 130, 100)) for k in range(2)])
    offset = len(ledger_events(api.home))

    r = c.post(f"{label_path('Egyptian cat')}/rename", json={"to": "Cat (Egyptian)"},
               headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"label": "Cat (Egyptian)", "old_label": "Egyptian cat", "moved": 3,
                        "total": 3}
    assert "Egyptian cat" not in counts(api) and counts(api)["Cat (Egyptian)"] == 3
    assert_error(c.get(f"{label_path('Egyptian cat')}/images", headers=auth), 404,
                 "label_not_found")
    page = get_json(api, f"{label_path('Cat (Egyptian)')}/images")
    assert sorted(i["sha256"] for i in page["images"]) == sorted(cats)

    r = c.post(f"{label_path('Cat (Egyptian)')}/merge", json={"into": "tabby"}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"label": "tabby", "old_label": "Cat (Egyptian)", "moved": 3, "total": 5}
    assert "Cat (Egyptian)" not in counts(api) and counts(api)["tabby"] == 5
    page = get_json(api, f"{label_path('tabby')}/images")
    assert sorted(i["sha256"] for i in page["images"]) == sorted(cats + tabby)

    events = ledger_events(api.home)[offset:]
    assert [e["event"] for e in events if e["sha256"] is None] == \
        ["label_renamed", "label_merged"]
    assert sum(e["event"] == "relabelled" for e in events) == 6
    assert get_json(api, "/v1/dataset")["new_since_last_job"] >= 5


def test_rename_and_merge_refusals_change_nothing(api: Api) -> None:
    c, auth = api.client, api.headers()
    upload(api, "apple", noisy_image(700, (200, 0, 0)))
    upload(api, "Pear Tree", noisy_image(701, (0, 200, 0)))
    before, ledger = dataset_files(api.home), len(ledger_events(api.home))
    apple = label_path("apple")

    body = assert_error(c.post(f"{apple}/rename", json={"to": "Pear Tree"}, headers=auth), 409,
                        "label_exists")
    assert "merge" in body["error"]["message"]
    for bad in ("a/b", "..", " x", "x" * 65, "a\u0000b", ""):
        body = assert_error(c.post(f"{apple}/rename", json={"to": bad}, headers=auth), 400,
                            "invalid_label")
        assert "Label rules:" in body["error"]["message"]
        assert_error(c.post(f"{apple}/merge", json={"into": bad}, headers=auth), 400,
                     "invalid_label")
    assert_error(c.post(f"{apple}/rename", json={"to": "apple"}, headers=auth), 400,
                 "invalid_label_change")
    assert_error(c.post(f"{apple}/merge", json={"into": "apple"}, headers=auth), 400,
                 "invalid_label_change")
    body = assert_error(c.post(f"{apple}/merge", json={"into": "plum"}, headers=auth), 404,
                        "label_not_found")
    assert "rename" in body["error"]["message"]
    bad_bodies: list[Any] = [{}, {"to": 3}, {"to": "x", "extra": 1}, {"into": "Pear Tree"}, [],
                             None]
    for bad_body in bad_bodies:
        assert_error(c.post(f"{apple}/rename", json=bad_body, headers=auth), 400, "bad_request")
    for bad_body in ({}, {"into": None}, {"to": "Pear Tree"}):
        assert_error(c.post(f"{apple}/merge", json=bad_body, headers=auth), 400, "bad_request")
    r = c.post(f"{apple}/rename", content=b"{not json", headers={
        **auth, "content-type": "application/json"})
    assert_error(r, 400, "bad_request")
    assert dataset_files(api.home) == before and len(ledger_events(api.home)) == ledger
    assert counts(api)["apple"] == 1 and counts(api)["Pear Tree"] == 1
