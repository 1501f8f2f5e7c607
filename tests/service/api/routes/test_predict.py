"""POST /v1/predict: every bad input refused with its status and code, every image mode a
client may send accepted, the answer's shape (multipart and JSON), and `?version=`: answered by
that version, 404 for one that is not there, 409 for one that cannot load."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from tests.service.api.conftest import Api, MakeApi, dataset_files, files
from tests.support.http import assert_error
from tests.support.images import IMAGE_MODES, image_bytes, noisy_image, png_declaring
from tests.support.versions import publish_broken_copy, publish_version
from training.registry import Registry

MAX_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    return make_api(max_files=3, max_upload_bytes=MAX_BYTES, max_pixels=4_000_000)


BAD_PREDICT = {
    "empty-file": (files(("a.png", b"")), 400, "invalid_image"),
    "truncated": (files(("a.png", image_bytes(size=(300, 300))[:150])), 400, "invalid_image"),
    "random-bytes": (files(("a.jpg", bytes(range(256)) * 8)), 415, "unsupported_media_type"),
    "gif-as-png": (files(("a.png", image_bytes(fmt="GIF"))), 415, "unsupported_media_type"),
    "tiff-as-jpg": (files(("a.jpg", image_bytes(fmt="TIFF"))), 415, "unsupported_media_type"),
    "bmp": (files(("a.bmp", image_bytes(fmt="BMP"))), 415, "unsupported_media_type"),
    "bomb": (files(("a.png", png_declaring(30000, 30000))), 413, "image_too_large"),
    "too-many-files": (files(*[(f"{i}.png", image_bytes()) for i in range(4)]), 413,
                       "too_many_files"),
    "no-files": ({"data": {"note": "x"}, "files": [("other", ("a.txt", b"hi"))]}, 400,
                 "no_images"),
}


@pytest.mark.parametrize("case", list(BAD_PREDICT), ids=list(BAD_PREDICT))
def test_predict_rejects(api: Api, case: str) -> None:
    payload, status, code = BAD_PREDICT[case]
    kwargs = payload if isinstance(payload, dict) else {"files": payload}
    body = assert_error(api.client.post("/v1/predict", **kwargs), status, code)
    if case in ("empty-file", "truncated", "gif-as-png"):  # the message names the file
        assert body["error"]["message"].startswith("a.png: ")


def test_predict_rejects_empty_and_odd_bodies(api: Api) -> None:
    c = api.client
    assert_error(c.post("/v1/predict"), 400, "no_images")
    assert_error(c.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}),
                 415)
    assert_error(c.post("/v1/predict", json={"images": ["%%%"]}), 400)
    assert_error(c.post("/v1/predict", json={"images": []}), 400, "no_images")
    r = c.post("/v1/predict", json={"pictures": []})
    assert_error(r, 400)
    message = r.json()["error"]["message"]
    assert "images: Field required" in message and '{"images"' in message, message
    assert "pydantic" not in message and "PredictJsonRequest" not in message, message
    assert_error(c.post("/v1/predict", content=b"{not json",
                        headers={"content-type": "application/json"}), 400, "bad_request")
    assert_error(c.post("/v1/predict", files=files(("a.png", image_bytes())),
                        params={"top_k": 0}), 400)


def test_body_over_limit_is_413_before_decoding(api: Api) -> None:
    big = b"\x89PNG" + b"\x00" * (MAX_BYTES + 10)
    c = api.client
    assert_error(c.post("/v1/predict", files=files(("big.png", big))), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        boundary = b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; " \
                   b"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
        yield boundary
        for _ in range(MAX_BYTES // 8192 + 4):
            yield b"\x00" * 8192
        yield b"\r\n--xyz--\r\n"
    r = c.post("/v1/predict", content=chunks(),
               headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(r, 413, "payload_too_large")
    before = dataset_files(api.home)
    r = c.post("/v1/labels", data={"label": "big"}, files=files(("big.png", big)),
               headers=api.headers())
    assert_error(r, 413, "payload_too_large")
    assert dataset_files(api.home) == before


@pytest.mark.parametrize("data", IMAGE_MODES.values(), ids=IMAGE_MODES.keys())
def test_predict_accepts_modes(api: Api, data: bytes) -> None:
    r = api.client.post("/v1/predict", files=files(("img", data)), params={"top_k": 2})
    assert r.status_code == 200, r.text
    [p] = r.json()["predictions"]
    assert len(p["top_k"]) == 2 and p["label"] == p["top_k"][0]["label"]


def test_predict_shapes_json_and_multipart(api: Api) -> None:
    a, b = noisy_image(1, (200, 20, 20)), noisy_image(2, (20, 20, 200))
    c = api.client
    r = c.post("/v1/predict", json={"images": [base64.b64encode(a).decode(),
                                               base64.b64encode(b).decode()]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v0" and r.headers["x-model-version"] == "v0"
    assert len(body["predictions"]) == 2
    p = body["predictions"][0]
    assert set(p) == {"prediction_id", "filename", "label", "score", "unknown", "threshold",
                      "top_k"}
    # v0 has no threshold record: nothing is unknown
    assert not p["unknown"] and p["threshold"] == 0.0 and p["label"] == p["top_k"][0]["label"]
    assert len(p["top_k"]) == 5 and p["filename"] is None
    scores = [t["score"] for t in p["top_k"]]
    assert scores == sorted(scores, reverse=True) and p["score"] == scores[0]
    r = c.post("/v1/predict", files=files(("a.png", a), ("b.png", b)))
    assert [p["filename"] for p in r.json()["predictions"]] == ["a.png", "b.png"]
    # the prediction is kept for feedback and review: its id finds its image
    pid = r.json()["predictions"][1]["prediction_id"]
    assert c.get(f"/v1/review/{pid}/image", headers=api.headers()).content == b


def test_predict_with_a_named_version(api: Api) -> None:
    """v1 (classes blue, red) published beside the served v0: `?version=v1` answers with v1
    (each prediction, the body and the header say so), the served model still answers plain
    requests, and v1 stays loaded in this replica for the next comparison."""
    registry = Registry(api.home)
    v1 = publish_version(registry, ["blue", "red"])
    c = api.client
    image = noisy_image(3, (200, 20, 20))
    for _ in range(2):
        r = c.post("/v1/predict", files=files(("a.png", image), ("b.png", image)),
                   params={"version": v1, "top_k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == v1 and r.headers["x-model-version"] == v1
        assert all({t["label"] for t in p["top_k"]} == {"blue", "red"}
                   for p in body["predictions"])
    plain = c.post("/v1/predict", files=files(("a.png", image))).json()
    assert plain["model_version"] == "v0" and len(plain["predictions"][0]["top_k"]) == 5
    named_v0 = c.post("/v1/predict", files=files(("a.png", image)), params={"version": "v0"})
    assert named_v0.json()["model_version"] == "v0"
    status = c.app.state.services.classifier.classifier.status()  # type: ignore[attr-defined]
    assert status["version"] == "v0" and status["other_versions"] == [v1]
    # the prediction is kept like any other, with the version that made it
    pid = body["predictions"][0]["prediction_id"]
    assert c.get(f"/v1/review/{pid}/image", headers=api.headers()).content == image


@pytest.mark.parametrize("version", ["v99", "bogus", "v" + "9" * 3000, "..", "v1\x00", "",
                                     "v\u0661"])
def test_predict_with_a_version_that_is_not_there_is_404(api: Api, version: str) -> None:
    r = api.client.post(f"/v1/predict?version={quote(version, safe='')}",
                        files=files(("a.png", image_bytes())))
    body = assert_error(r, 404, "version_not_found")
    assert len(body["error"]["message"]) < 200 and not body["error"]["message"].startswith("a.png")


def test_predict_with_a_broken_version_is_409(api: Api) -> None:
    broken = publish_broken_copy(Registry(api.home))
    c = api.client
    for _ in range(2):  # refused every time it is asked for, nothing cached
        body = assert_error(c.post("/v1/predict", files=files(("a.png", image_bytes())),
                                   params={"version": broken}), 409, "invalid_version")
        assert body["error"]["message"].startswith(f"{broken}: model.safetensors does not "
                                                   "match its checksum")
    r = c.post("/v1/predict", files=files(("a.png", image_bytes())))
    assert r.status_code == 200 and r.json()["model_version"] == "v0"
    # an image refused by the decoder is still named, with a version given
    body = assert_error(c.post("/v1/predict", files=files(("t.png", b"")),
                               params={"version": "v0"}), 400, "invalid_image")
    assert body["error"]["message"].startswith("t.png: ")
