"""POST /v1/feedback, GET /v1/review, POST /v1/review/{id}/dismiss, GET /v1/review/{id}/image
over the real app and stores: a prediction's image joins the dataset under the true label and
leaves the queue; the queue is filtered by label and ordered by uncertainty; a reviewer sees the
image behind the API token; unknown or path-like ids are 404; identical images are stored once;
below the free-space floor predictions are answered, not stored, counted in /metrics, and
feedback says why it cannot use them."""

from __future__ import annotations

import hashlib
import shutil
from typing import Any

import pytest

from tests.service.api.conftest import Api, MakeApi, dataset_files, files
from tests.support.http import assert_error
from tests.support.images import image_bytes, noisy_image

BAD_IDS = ["f" * 32, "F" * 32, "f" * 31, "f" * 5000, "..", "%2e%2e", "..%2Fsecrets%2Fapi-token",
           "f" * 31 + "%00"]


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    return make_api()


def predict(api: Api, *images: tuple[str, bytes]) -> list[dict[str, Any]]:
    r = api.client.post("/v1/predict", files=files(*images))
    assert r.status_code == 200, r.text
    predictions: list[dict[str, Any]] = r.json()["predictions"]
    return predictions


def queue(api: Api, **params: Any) -> dict[str, Any]:
    r = api.client.get("/v1/review", params={"below": 1.0, "limit": 1000, **params},
                       headers=api.headers())
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def queued_ids(api: Api, **params: Any) -> list[str]:
    return [i["prediction_id"] for i in queue(api, **params)["items"]]


def test_feedback_labels_the_image_and_takes_it_out_of_the_queue(api: Api) -> None:
    c, auth = api.client, api.headers()
    data = noisy_image(5, (90, 90, 90))
    [p] = predict(api, ("x.png", data))
    [item] = [i for i in queue(api)["items"] if i["prediction_id"] == p["prediction_id"]]
    assert item["filename"] == "x.png" and item["label"] == p["label"]
    assert item["image_url"] == f"/v1/review/{p['prediction_id']}/image"
    assert 0 <= item["margin"] <= item["score"] and item["entropy"] >= 0

    r = c.post("/v1/feedback", json={"prediction_id": p["prediction_id"], "label": "grey"},
               headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"prediction_id": p["prediction_id"], "label": "grey", "status": "added",
                        "sha256": hashlib.sha256(data).hexdigest()}
    assert c.get("/v1/dataset", headers=auth).json()["labels"]["grey"] == 1
    assert p["prediction_id"] not in queued_ids(api)
    # Sent again with another label (a mistake corrected): the same contract, a relabel.
    r = c.post("/v1/feedback", json={"prediction_id": p["prediction_id"], "label": "silver"},
               headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "relabelled", r.text
    assert c.get(item["image_url"], headers=auth).content == data  # reviewed: still viewable


def test_bad_feedback_is_refused_and_stores_nothing(api: Api) -> None:
    c, auth = api.client, api.headers()
    [p] = predict(api, ("y.png", noisy_image(6, (9, 90, 9))))
    before = dataset_files(api.home)
    for bad in [*BAD_IDS, "../../secrets/api-token"]:
        assert_error(c.post("/v1/feedback", json={"prediction_id": bad, "label": "green"},
                            headers=auth), 404, "prediction_not_found")
    assert_error(c.post("/v1/feedback", json={"label": "green"}, headers=auth), 400,
                 "bad_request")
    assert_error(c.post("/v1/feedback", json={"prediction_id": p["prediction_id"],
                                              "label": "../green"}, headers=auth),
                 400, "invalid_label")
    assert_error(c.post("/v1/feedback", json={"prediction_id": p["prediction_id"],
                                              "label": "green"}), 401)
    assert dataset_files(api.home) == before
    assert p["prediction_id"] in queued_ids(api)  # refused feedback leaves it queued


def test_reviewer_sees_the_image_behind_the_api_token(api: Api) -> None:
    c, auth = api.client, api.headers()
    png, jpeg, webp = (noisy_image(7, (200, 9, 9)), image_bytes((9, 200, 9), "JPEG"),
                       image_bytes((9, 9, 200), "WEBP"))
    ps = predict(api, ("a.png", png), ("b.jpg", jpeg), ("c.webp", webp))
    for p, data, media in zip(ps, (png, jpeg, webp), ("image/png", "image/jpeg", "image/webp"),
                              strict=True):
        url = f"/v1/review/{p['prediction_id']}/image"
        r = c.get(url, headers=auth)
        assert r.status_code == 200, r.text
        assert r.content == data and r.headers["content-type"] == media
        assert r.headers["x-content-type-options"] == "nosniff"
        assert_error(c.get(url), 401)
        assert_error(c.get(url, headers=api.headers("not-the-token-at-all")), 401)
    for bad in BAD_IDS:
        assert_error(c.get(f"/v1/review/{bad}/image", headers=auth), 404)
    assert_error(c.get("/v1/review/../secrets/api-token/image", headers=auth), 404)


def test_dismiss_takes_an_item_out_of_the_queue(api: Api) -> None:
    c, auth = api.client, api.headers()
    [p, q] = predict(api, ("d.png", noisy_image(8, (9, 9, 9))),
                     ("e.png", noisy_image(9, (9, 9, 9))))
    url = f"/v1/review/{p['prediction_id']}/dismiss"
    assert_error(c.post(url), 401)
    assert p["prediction_id"] in queued_ids(api)  # refused: still queued
    r = c.post(url, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"prediction_id": p["prediction_id"], "state": "dismissed"}
    ids = queued_ids(api)
    assert p["prediction_id"] not in ids and q["prediction_id"] in ids
    assert c.post(url, headers=auth).json()["state"] == "dismissed"  # twice: harmless
    assert c.get(f"/v1/review/{p['prediction_id']}/image", headers=auth).status_code == 200
    # A reviewer who changes their mind can still label it.
    r = c.post("/v1/feedback", json={"prediction_id": p["prediction_id"], "label": "dark"},
               headers=auth)
    assert r.status_code == 200, r.text
    assert c.post(url, headers=auth).json()["state"] == "labelled"
    for bad in BAD_IDS:
        assert_error(c.post(f"/v1/review/{bad}/dismiss", headers=auth), 404)


def test_queue_filters_by_label_and_orders_by_uncertainty(api: Api) -> None:
    predict(api, *((f"q{i}.png", noisy_image(30 + i, (40 * i, 120, 200 - 30 * i)))
                   for i in range(6)))
    by_margin = queue(api)
    assert by_margin["order"] == "margin" and by_margin["below"] == 1.0
    margins = [i["margin"] for i in by_margin["items"]]
    assert len(margins) >= 6 and margins == sorted(margins)
    entropies = [i["entropy"] for i in queue(api, order="entropy")["items"]]
    assert entropies == sorted(entropies, reverse=True)
    scores = [i["score"] for i in queue(api, order="score")["items"]]
    assert scores == sorted(scores)
    label = by_margin["items"][0]["label"]  # an ImageNet class name of v0, spaces and all
    only = queue(api, label=label)
    assert only["label"] == label and only["items"]
    assert {i["label"] for i in only["items"]} == {label}
    assert queue(api, label="no-such-label")["items"] == []
    assert len(queue(api, limit=2)["items"]) == 2
    assert queue(api, below=0.0)["items"] == []
    # The default threshold is VISIONLOOP_REVIEW_BELOW.
    r = api.client.get("/v1/review", headers=api.headers())
    assert r.json()["below"] == api.settings.review_below
    assert all(i["score"] < api.settings.review_below for i in r.json()["items"])
    for params in ({"order": "random"}, {"below": 2}, {"limit": 0}, {"label": ""},
                   {"label": "x" * 300}):
        assert_error(api.client.get("/v1/review", params=params, headers=api.headers()),
                     400, "bad_request")
    assert_error(api.client.get("/v1/review"), 401)


def test_identical_images_are_stored_once(api: Api) -> None:
    data = noisy_image(11, (1, 2, 3))
    ps = predict(api, ("a.png", data), ("b.png", data)) + predict(api, ("c.png", data))
    assert len({p["prediction_id"] for p in ps}) == 3
    sha = hashlib.sha256(data).hexdigest()
    assert [f.name for f in (api.home / "predictions" / "images").iterdir()
            if f.name.startswith(sha)] == [f"{sha}.png"]
    for p in ps:
        assert api.client.get(f"/v1/review/{p['prediction_id']}/image",
                              headers=api.headers()).content == data


def test_feedback_whose_image_is_gone(api: Api) -> None:
    c, auth = api.client, api.headers()
    data = noisy_image(12, (9, 90, 9))
    [p] = predict(api, ("y.png", data))
    (api.home / "predictions" / "images" / f"{hashlib.sha256(data).hexdigest()}.png").unlink()
    body = assert_error(c.post("/v1/feedback", json={"prediction_id": p["prediction_id"],
                                                     "label": "green"}, headers=auth),
                        404, "prediction_not_found")
    assert "gone" in body["error"]["message"]
    assert_error(c.get(f"/v1/review/{p['prediction_id']}/image", headers=auth), 404)


def test_below_the_free_space_floor_predictions_are_answered_not_stored(
        make_api: MakeApi) -> None:
    floor = shutil.disk_usage("/tmp").free + 2**40  # more than this machine will ever have free
    api = make_api(min_free_bytes=floor)
    c, auth = api.client, api.headers()
    [p] = predict(api, ("z.png", noisy_image(13, (9, 9, 9))))
    assert p["label"] and p["prediction_id"]
    assert list((api.home / "predictions" / "images").iterdir()) == []
    assert 'visionloop_predictions_not_stored_total{reason="low_space"} 1.0' in \
        c.get("/metrics").text
    body = assert_error(c.post("/v1/feedback", json={"prediction_id": p["prediction_id"],
                                                     "label": "black"}, headers=auth),
                        404, "prediction_not_found")
    assert "VISIONLOOP_MIN_FREE_BYTES" in body["error"]["message"]
    assert_error(c.get(f"/v1/review/{p['prediction_id']}/image", headers=auth), 404)
    assert p["prediction_id"] not in queued_ids(api)
    assert dataset_files(api.home) == set()
