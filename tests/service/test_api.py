"""The HTTP API on a real Serve app: auth, every bad input (with the error shape, and nothing
reaching the dataset), accepted image modes, labels, feedback, review, models, metrics."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.api import Metrics, RequestGuard, merge_exposition
from tests.conftest import (
    IMAGE_MODES,
    RunningService,
    assert_error,
    image_bytes,
    noisy_image,
    start_service,
)

pytestmark = pytest.mark.slow

PREDICT_TOKEN = "predict-token-123"
MAX_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def svc(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    home = tmp_path_factory.mktemp("api-home")
    yield start_service(home, max_files=3, max_upload_bytes=MAX_BYTES,
                        predict_token=PREDICT_TOKEN, max_pixels=4_000_000)


def dataset_files(home: Path) -> set[str]:
    """Everything under dataset/ that is an image (ledger and lock excluded)."""
    root = home / "dataset"
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name != "ledger.jsonl"}


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (name, data)) for name, data in items]


# -- auth ----------------------------------------------------------------------------------------

def test_open_endpoints(svc: RunningService) -> None:
    with svc.client(token=None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["model_versions"] == ["v0"]
        assert "visionloop_requests_total" in c.get("/metrics").text


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("GET", "/v1/dataset"), ("GET", "/v1/review"), ("GET", "/v1/train"),
    ("POST", "/v1/train"), ("POST", "/v1/labels"), ("POST", "/v1/models/v0/activate"),
    ("DELETE", "/v1/labels/" + "0" * 64), ("GET", "/v1/models/v0/weights"),
])
def test_api_token_required(svc: RunningService, method: str, path: str) -> None:
    with svc.client(token=None) as c:
        assert_error(c.request(method, path), 401, "unauthorized")
    with svc.client(token="wrong-token-wrong-token") as c:
        assert_error(c.request(method, path), 401, "unauthorized")
    with svc.client(token=PREDICT_TOKEN) as c:  # a valid token without the right
        assert_error(c.request(method, path), 403, "forbidden")


def test_predict_token(svc: RunningService) -> None:
    body = files(("a.png", image_bytes()))
    with svc.client(token=None) as c:
        assert_error(c.post("/v1/predict", files=body), 401)
    for token in (PREDICT_TOKEN, "api"):
        with svc.client(token=token) as c:
            r = c.post("/v1/predict", files=body)
            assert r.status_code == 200 and r.headers["x-model-version"] == "v0"


# -- predict: bad inputs -------------------------------------------------------------------------

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
def test_predict_rejects(svc: RunningService, case: str) -> None:
    payload, status, code = BAD_PREDICT[case]
    with svc.client() as c:
        kwargs = payload if isinstance(payload, dict) else {"files": payload}
        assert_error(c.post("/v1/predict", **kwargs), status, code)


def test_predict_rejects_empty_and_odd_bodies(svc: RunningService) -> None:
    with svc.client() as c:
        assert_error(c.post("/v1/predict"), 400, "no_images")
        assert_error(c.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}),
                     415)
        assert_error(c.post("/v1/predict", json={"images": ["%%%"]}), 400)
        assert_error(c.post("/v1/predict", json={"images": []}), 400, "no_images")
        assert_error(c.post("/v1/predict", json={"pictures": []}), 400)
        assert_error(c.post("/v1/predict", files=files(("a.png", image_bytes())),
                            params={"top_k": 0}), 400)


def test_body_over_limit_is_413_before_decoding(svc: RunningService) -> None:
    big = b"\x89PNG" + b"\x00" * (MAX_BYTES + 10)
    with svc.client() as c:
        assert_error(c.post("/v1/predict", files=files(("big.png", big))), 413,
                     "payload_too_large")

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
        before = dataset_files(svc.home)
        r = c.post("/v1/labels", data={"label": "big"}, files=files(("big.png", big)))
        assert_error(r, 413, "payload_too_large")
        assert dataset_files(svc.home) == before


# -- predict: good inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("data", IMAGE_MODES.values(), ids=IMAGE_MODES.keys())
def test_predict_accepts_modes(svc: RunningService, data: bytes) -> None:
    with svc.client() as c:
        r = c.post("/v1/predict", files=files(("img", data)), params={"top_k": 2})
    assert r.status_code == 200, r.text
    [p] = r.json()["predictions"]
    assert len(p["top_k"]) == 2 and p["label"] == p["top_k"][0]["label"]


def test_predict_shapes_json_and_multipart(svc: RunningService) -> None:
    a, b = noisy_image(1, (200, 20, 20)), noisy_image(2, (20, 20, 200))
    with svc.client() as c:
        r = c.post("/v1/predict", json={"images": [base64.b64encode(a).decode(),
                                                   base64.b64encode(b).decode()]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "v0" and r.headers["x-model-version"] == "v0"
        assert len(body["predictions"]) == 2
        p = body["predictions"][0]
        assert set(p) == {"prediction_id", "filename", "label", "score", "top_k"}
        assert len(p["top_k"]) == 5 and p["filename"] is None
        r = c.post("/v1/predict", files=files(("a.png", a), ("b.png", b)))
        assert [p["filename"] for p in r.json()["predictions"]] == ["a.png", "b.png"]


# -- labels, feedback, review, dataset -----------------------------------------------------------

@pytest.mark.parametrize("label", ["../etc", "a/b", "", " x", ".hidden", "x" * 65, "a b",
                                   "..", "C:\\x", "ünïcode"])
def test_unsafe_labels_write_nothing(svc: RunningService, label: str) -> None:
    before = dataset_files(svc.home)
    with svc.client() as c:
        r = c.post("/v1/labels", data={"label": label}, files=files(("a.png", image_bytes())))
        assert_error(r, 400)
        assert_error(c.post("/v1/feedback", json={"prediction_id": "0" * 32, "label": label}),
                     400)
    assert dataset_files(svc.home) == before
    assert not (svc.home / "etc").exists() and not (svc.home / "dataset" / "a").exists()


def test_labels_batch_with_bad_file_writes_nothing(svc: RunningService) -> None:
    before = dataset_files(svc.home)
    with svc.client() as c:
        r = c.post("/v1/labels", data={"label": "cat"},
                   files=files(("good.png", noisy_image(7, (1, 1, 1))),
                               ("bad.png", image_bytes(fmt="GIF"))))
        assert_error(r, 415)
        assert_error(c.post("/v1/labels", data={"label": "cat"},
                            files=files(*[(f"{i}.png", noisy_image(i, (5, 5, 5)))
                                          for i in range(4)])), 413, "too_many_files")
        assert_error(c.post("/v1/labels", data={"label": "cat"},
                            files=files(("bomb.png", png_declaring(30000, 30000)))), 413)
        assert_error(c.post("/v1/labels", data={"label": "cat"}), 400, "no_images")
        assert_error(c.post("/v1/labels", json={"label": "cat"}), 415)
    assert dataset_files(svc.home) == before


def test_labels_idempotent_relabel_delete(svc: RunningService) -> None:
    data = noisy_image(99, (50, 150, 50))
    with svc.client() as c:
        r = c.post("/v1/labels", data={"label": "green"}, files=files(("g.png", data)))
        assert r.status_code == 200, r.text
        [res] = r.json()["results"]
        assert res["status"] == "added" and res["label"] == "green"
        sha = res["sha256"]
        r = c.post("/v1/labels", data={"label": "green"}, files=files(("g.png", data)))
        assert r.json()["results"][0]["status"] == "duplicate"
        r = c.post("/v1/labels", data={"label": "lime"}, files=files(("g.png", data)))
        assert r.json()["results"][0]["status"] == "relabelled"
        ds = c.get("/v1/dataset").json()
        assert ds["labels"].get("lime") == 1 and "green" not in ds["labels"]
        assert ds["total"] == sum(ds["labels"].values()) and ds["new_since_last_job"] >= 1
        assert c.delete(f"/v1/labels/{sha}").json() == {"sha256": sha, "deleted": True}
        assert_error(c.delete(f"/v1/labels/{sha}"), 404)
        assert_error(c.delete("/v1/labels/..%2F..%2Fetc"), 404)


def test_feedback_and_review(svc: RunningService) -> None:
    with svc.client() as c:
        r = c.post("/v1/predict", files=files(("x.png", noisy_image(5, (90, 90, 90)))))
        [p] = r.json()["predictions"]
        r = c.post("/v1/feedback", json={"prediction_id": p["prediction_id"], "label": "grey"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "added" and r.json()["label"] == "grey"
        assert c.get("/v1/dataset").json()["labels"]["grey"] == 1
        assert_error(c.post("/v1/feedback", json={"prediction_id": "f" * 32, "label": "grey"}),
                     404, "prediction_not_found")
        assert_error(c.post("/v1/feedback", json={"prediction_id": "../../secrets/api-token",
                                                  "label": "grey"}), 404)
        assert_error(c.post("/v1/feedback", json={"label": "grey"}), 400)
        review = c.get("/v1/review", params={"below": 1.0, "limit": 5}).json()
        scores = [i["score"] for i in review["items"]]
        assert review["below"] == 1.0 and 0 < len(scores) <= 5 and scores == sorted(scores)
        assert c.get("/v1/review", params={"below": 0.0}).json()["items"] == []


# -- models and training errors ------------------------------------------------------------------

def test_models_endpoints(svc: RunningService) -> None:
    with svc.client() as c:
        models = c.get("/v1/models").json()
        assert models["current"] == "v0"
        [v0] = models["versions"]
        assert v0["version"] == "v0" and v0["backbone"] == "efficientnet_lite0"
        assert len(v0["classes"]) == 1000 and v0["promoted"] is True
        assert c.get("/v1/models/v0").json()["classes"][:2] == ["tench", "goldfish"]
        weights = c.get("/v1/models/v0/weights")
        assert weights.status_code == 200 and len(weights.content) > 1_000_000
        for path in ("/v1/models/v99", "/v1/models/bogus", "/v1/models/v99/weights",
                     "/v1/models/v0/plots/curves.png", "/v1/models/v0/plots/..%2Fmanifest.png"):
            assert_error(c.get(path), 404)
        assert_error(c.post("/v1/models/v99/activate"), 404, "version_not_found")
        assert_error(c.post("/v1/models/..%2F..%2Fsecrets/activate"), 404)


def test_training_request_errors(svc: RunningService) -> None:
    with svc.client() as c:
        assert_error(c.get("/v1/train/nope"), 404, "job_not_found")
        assert_error(c.delete("/v1/train/nope"), 404)
        assert_error(c.post("/v1/train", json={"epochs": 0}), 400)
        assert_error(c.post("/v1/train", json={"no_such_option": 1}), 400)
        assert_error(c.post("/v1/train", json={"backbone": "nonet"}), 400)
        body = assert_error(c.post("/v1/train", json={"epochs": 1}), 400, "dataset_too_small")
        assert "label" in body["error"]["message"]
        assert c.get("/v1/train").json() == {"jobs": []}


def test_metrics_after_traffic(svc: RunningService) -> None:
    text = httpx.get(f"{svc.url}/metrics").text
    assert 'visionloop_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'visionloop_model_info{version="v0"} 1.0' in text
    assert "visionloop_inference_batch_size_count" in text
    assert "visionloop_model_reload_failures 0.0" in text


def test_metrics_of_replicas_are_summed() -> None:
    replicas = [Metrics(), Metrics()]
    for n, m in enumerate(replicas, start=1):
        m.requests.labels("/v1/predict", "POST", "200").inc(n)
        m.latency.labels("/v1/predict").observe(0.01 * n)
        m.in_flight.set(n)
    replicas[1].requests.labels("/v1/labels", "POST", "415").inc()
    text = merge_exposition([generate_latest(m.registry).decode() for m in replicas]).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    predict = (("method", "POST"), ("route", "/v1/predict"), ("status", "200"))
    assert samples[("visionloop_requests_total", predict)] == 3
    assert samples[("visionloop_requests_total", (("method", "POST"), ("route", "/v1/labels"),
                                                  ("status", "415")))] == 1
    assert samples[("visionloop_request_seconds_count", (("route", "/v1/predict"),))] == 2
    assert samples[("visionloop_request_seconds_sum", (("route", "/v1/predict"),))] == \
        pytest.approx(0.03)
    assert samples[("visionloop_requests_in_flight", ())] == 3
    assert not any(name.endswith("_created") for name, _ in samples)
    assert text.count("# TYPE visionloop_requests_total counter") == 1


# -- the overload guard, on a plain ASGI app -----------------------------------------------------

def test_overload_answers_503_in_our_shape() -> None:
    app = FastAPI()
    release = asyncio.Event()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    guarded = RequestGuard(app, max_in_flight=2, max_body=1024, metrics=Metrics())

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            pending = [asyncio.create_task(c.get("/slow")) for _ in range(2)]
            await asyncio.sleep(0.1)
            third = await c.get("/slow")
            health = await c.get("/healthz")  # open paths are never refused
            release.set()
            return [third, health, *await asyncio.gather(*pending)]

    third, health, *done = asyncio.run(scenario())
    assert_error(third, 503, "overloaded")
    assert third.headers["retry-after"] == "1"
    assert health.status_code == 404  # not refused (this bare app has no /healthz)
    assert [r.status_code for r in done] == [200, 200]
