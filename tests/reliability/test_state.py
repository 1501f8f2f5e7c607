"""Stored state under abuse, on one real service (Ray local cluster, Serve, loopback HTTP):
a flood of distinct and repeated predictions stays within the prediction store's byte bound
with each image stored once; a flood of the open `/metrics` and `/readyz` costs predictions
little (their answers are reused for `ops_cache_s`); hostile path parameters on every route
that has one are a 4xx, never a 5xx. Figures are printed, not asserted as timings.

Run: `timeout 600 .venv/bin/python -m pytest tests/reliability/test_state.py -s`
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.images import image_bytes, noisy_image
from tests.support.service import RunningService, start_service

pytestmark = pytest.mark.slow

# Small enough that the flood below (about 2.6 MB of distinct images) is five times over it.
PREDICTIONS_MAX_BYTES = 512 * 1024
DISTINCT = 200  # distinct 64 x 64 noise PNGs, about 12 KiB each
REPEATS = 100  # copies of one more image
CLIENTS = 8


@pytest.fixture(scope="module")
def svc(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    yield start_service(tmp_path_factory.mktemp("state-home"),
                        predictions_max_bytes=PREDICTIONS_MAX_BYTES, predictions_keep=100_000,
                        ops_cache_s=0.5)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def metric(text: str, name: str) -> float:
    """The sum of every sample of `name` in a Prometheus exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_prediction_flood_stays_within_the_byte_bound(svc: RunningService) -> None:
    distinct = [noisy_image(50_000 + i, (40 + i % 150, 90, 200 - i % 150)) for i in range(DISTINCT)]
    repeated = image_bytes((10, 200, 10))
    bodies = distinct + [repeated] * REPEATS
    offered = sum(len(b) for b in bodies)

    def send(data: bytes) -> int:
        with httpx.Client(base_url=svc.url, timeout=60) as c:
            return c.post("/v1/predict", files=[("files", ("x.png", data))]).status_code

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        statuses = Counter(pool.map(send, bodies))
    elapsed = time.monotonic() - t0
    images = svc.home / "predictions" / "images"
    stored = folder_bytes(images)
    files = [p.name for p in images.iterdir()]
    index = {p.name.removeprefix("index.sqlite3") or "db": p.stat().st_size
             for p in (svc.home / "predictions").glob("index.sqlite3*")}
    with svc.client() as c:
        exposition = c.get("/metrics").text
    print(f"\n[state] prediction flood: {len(bodies)} requests ({offered / 1e6:.2f} MB offered, "
          f"{DISTINCT} distinct + {REPEATS} copies of one) in {elapsed:.1f} s, statuses "
          f"{dict(statuses)}; images on the volume {stored / 1024:.0f} KiB in {len(files)} files "
          f"(bound {PREDICTIONS_MAX_BYTES / 1024:.0f} KiB), index files "
          f"{ {k: f'{v / 1024:.0f} KiB' for k, v in index.items()} }; "
          f"not stored {metric(exposition, 'visionloop_predictions_not_stored_total'):.0f}")
    assert statuses == {200: len(bodies)}, statuses  # every prediction answered
    assert stored <= PREDICTIONS_MAX_BYTES, (stored, PREDICTIONS_MAX_BYTES)
    assert len(files) == len(set(files))  # content-addressed
    assert offered > 4 * PREDICTIONS_MAX_BYTES  # the flood really was over the bound
    # The repeated image is one file however often it was sent (it is the newest ones' image).
    import hashlib

    assert any(name.startswith(hashlib.sha256(repeated).hexdigest()) for name in files)


def test_ops_flood_costs_predictions_little(svc: RunningService) -> None:
    """Closed-loop predictions by 2 clients, three times: alone; while 16 clients call
    `/healthz` (answered by the ingress alone) as fast as they can; while 16 clients call
    `/metrics` and `/readyz` (each a fan-out to every replica, reused for `ops_cache_s`) as fast
    as they can. The `/healthz` flood is the baseline: the load generator's own threads and the
    HTTP path cost the same in both floods, so the ratio of the two floods' prediction p50s is
    what the fan-outs add. Every call must be answered; the figures are printed."""
    image = noisy_image(7, (120, 60, 30))

    def predict_for(seconds: float) -> list[float]:
        times: list[float] = []

        def one_client() -> None:
            with httpx.Client(base_url=svc.url, timeout=60) as c:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    r = c.post("/v1/predict", files=[("files", ("x.png", image))])
                    assert r.status_code == 200, r.text
                    times.append(time.monotonic() - t0)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: one_client(), range(2)))
        return times

    def during_flood(paths: list[str]) -> tuple[list[float], Counter[int], float]:
        answered: Counter[int] = Counter()
        stop = threading.Event()

        def flood(path: str) -> None:
            with httpx.Client(base_url=svc.url, timeout=60) as c:
                while not stop.is_set():
                    answered[c.get(path).status_code] += 1

        threads = [threading.Thread(target=flood, args=(p,), daemon=True)
                   for p in paths * (16 // len(paths))]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        try:
            times = predict_for(8)
        finally:
            stop.set()
            for t in threads:
                t.join(70)
        return times, answered, time.monotonic() - t0

    alone = predict_for(8)
    health, health_answers, health_s = during_flood(["/healthz"])
    ops, ops_answers, ops_s = during_flood(["/metrics", "/readyz"])
    p = {name: statistics.median(t) for name, t in
         [("alone", alone), ("healthz", health), ("ops", ops)]}
    print(f"\n[state] predict p50 alone {p['alone'] * 1000:.1f} ms ({len(alone)} requests); "
          f"during a /healthz flood ({sum(health_answers.values()) / health_s:.0f} calls/s) "
          f"{p['healthz'] * 1000:.1f} ms ({len(health)}); during a /metrics + /readyz flood "
          f"({sum(ops_answers.values()) / ops_s:.0f} calls/s) {p['ops'] * 1000:.1f} ms "
          f"({len(ops)}): {p['ops'] / p['healthz']:.2f}x the /healthz flood's, "
          f"{p['ops'] / p['alone']:.2f}x alone")
    assert set(health_answers) == {200} and set(ops_answers) == {200}, (health_answers,
                                                                        ops_answers)
    assert alone and health and ops


# A literal ".." is not here: the HTTP client resolves it before sending (".../images/.." is
# sent as ".../images", another route); its encoded form is.
HOSTILE = ["x" * 10_000, "%00", "a%00b", "%2e%2e", "%2e%2e%2fsecrets", "v1%0a", "%ff%fe",
           "-1", "v99999999999999999999", "%e2%80%ae", " "]


def test_hostile_path_parameters_are_4xx_never_5xx(svc: RunningService) -> None:
    """Every route of the OpenAPI description with a path parameter, each parameter replaced by
    each HOSTILE value (already URL-encoded), with the API token: a 4xx in our error shape."""
    with svc.client() as c:
        paths = c.get("/openapi.json").json()["paths"]
        answers: Counter[int] = Counter()
        slowest = 0.0
        for path, ops in paths.items():
            if "{" not in path:
                continue
            for method in ops:
                for value in HOSTILE:
                    url = "/".join(value if part.startswith("{") else part
                                   for part in path.split("/"))
                    t0 = time.monotonic()
                    r = c.request(method.upper(), url)
                    slowest = max(slowest, time.monotonic() - t0)
                    answers[r.status_code] += 1
                    assert 400 <= r.status_code < 500, (method, url[:120], r.status_code,
                                                        r.text[:200])
                    if r.headers.get("content-type", "").startswith("application/json"):
                        assert "error" in r.json() or "detail" in r.json(), r.text[:200]
    print(f"\n[state] hostile path parameters: {sum(answers.values())} requests, "
          f"{dict(sorted(answers.items()))}, slowest {slowest:.3f} s")
