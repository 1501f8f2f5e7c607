"""Hostile and concurrent input on one real service (Ray local cluster, Serve, loopback HTTP):
the API fuzzed from its own OpenAPI description, a corpus of hostile images and forms (each
refused with its 4xx, quickly, with the service's memory flat), and many clients uploading
labels at once (every image stored exactly once, none lost or half-written).

Run: `timeout 600 .venv/bin/python -m pytest tests/reliability/test_inputs.py -s`
"""

from __future__ import annotations

import base64
import hashlib
import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support import hostile
from tests.support.dataset import added_counts, check_dataset_integrity, dataset_images
from tests.support.http import assert_error
from tests.support.images import noisy_image
from tests.support.processes import format_memory, memory_mib, serve_pids
from tests.support.service import RunningService, start_service

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = 25  # per operation and generation mode (valid, invalid)
FUZZ_CALL_TIMEOUT_S = 20
REFUSE_WITHIN_S = 3.0
CORPUS_ROUNDS = 5


@pytest.fixture(scope="module")
def svc(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    yield start_service(tmp_path_factory.mktemp("inputs-home"))


# -- fuzzing from the OpenAPI description ----------------------------------------------------------

@pytest.mark.timeout(300)
def test_fuzz_openapi_no_5xx_no_hang(svc: RunningService) -> None:
    """Every operation of /openapi.json, with valid and invalid generated requests (schemathesis
    strategies, hypothesis-bounded): never a 5xx, never a hang, every error in our shape."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{svc.url}/openapi.json")
    auth = {"Authorization": f"Bearer {svc.token}"}
    problems: list[str] = []
    statuses: Counter[int] = Counter()
    slowest = 0.0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    def fuzz(op: Any, mode: GenerationMode) -> None:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def call(case: Any) -> None:
            nonlocal slowest
            t0 = time.monotonic()
            try:
                r = case.call(base_url=svc.url, headers=auth, timeout=FUZZ_CALL_TIMEOUT_S)
            except requests.Timeout:
                problems.append(f"{op.label}: no answer within {FUZZ_CALL_TIMEOUT_S}s")
                return
            except requests.RequestException as exc:
                problems.append(f"{op.label}: {type(exc).__name__}: {exc}")
                return
            slowest = max(slowest, time.monotonic() - t0)
            statuses[r.status_code] += 1
            if r.status_code >= 500:
                problems.append(f"{op.label}: {r.status_code} {r.text[:200]}")
            elif r.status_code >= 400:
                try:
                    body = r.json()
                    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
                except (ValueError, AssertionError, TypeError):
                    problems.append(f"{op.label}: {r.status_code} not in the error shape: "
                                    f"{r.text[:200]}")

        try:
            call()
        except Unsatisfiable:  # e.g. no invalid request can be built for this operation
            skipped.append(f"{op.label} ({mode.value})")

    skipped: list[str] = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(op, mode)
    total = sum(statuses.values())
    print(f"\n[fuzz] {len(operations)} operations, {total} requests, statuses "
          f"{dict(sorted(statuses.items()))}, slowest answer {slowest:.2f}s; "
          f"no request generated for {skipped}")
    assert not problems, problems[:10]
    assert total >= len(operations) * 4
    assert httpx.get(f"{svc.url}/readyz", timeout=10).status_code == 200


# -- hostile images and forms --------------------------------------------------------------------

def _post_file(c: httpx.Client, path: str, name: str, data: bytes,
               label: str | None = None) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = c.post(path, files=[("files", (f"{name}.png", data, "image/png"))],
               data={"label": label} if label else None)
    return r, time.monotonic() - t0


@pytest.mark.timeout(240)
def test_hostile_images_refused_fast_with_flat_memory(svc: RunningService) -> None:
    corpus = hostile.refused_corpus()
    before_files = set(dataset_images(svc.home))
    pids = serve_pids()
    assert {"Ingress", "ProxyActor"} <= set(pids), pids
    with svc.client() as c:  # warm every path once, so the first round's allocations don't count
        for name, (data, _) in corpus.items():
            _post_file(c, "/v1/predict", name, data)
        mem_before = memory_mib(pids)
        slowest: dict[str, float] = {}
        for _ in range(CORPUS_ROUNDS):
            for name, (data, status) in corpus.items():
                for path, label in (("/v1/predict", None), ("/v1/labels", "hostile")):
                    r, took = _post_file(c, path, name, data, label)
                    assert_error(r, status)
                    slowest[name] = max(slowest.get(name, 0.0), took)
        mem_after = memory_mib(pids)
    requests_sent = CORPUS_ROUNDS * len(corpus) * 2
    print(f"\n[hostile] {len(corpus)} files x {CORPUS_ROUNDS} rounds x (predict, labels) = "
          f"{requests_sent} requests; slowest refusal {max(slowest.values()):.3f}s "
          f"({max(slowest, key=lambda k: slowest[k])})")
    print(f"[hostile] memory before: {format_memory(mem_before)}")
    print(f"[hostile] memory after:  {format_memory(mem_after)}")
    for role in mem_before:
        growth = mem_after[role]["rss"] - mem_before[role]["rss"]
        peak_growth = mem_after[role]["peak"] - mem_before[role]["peak"]
        print(f"[hostile] {role}: RSS {growth:+.1f} MiB, peak {peak_growth:+.1f} MiB")
        assert growth < 64, f"{role} grew {growth:.0f} MiB"
        assert peak_growth < 64, f"{role} peak grew {peak_growth:.0f} MiB: something decoded"
    assert max(slowest.values()) < REFUSE_WITHIN_S, slowest
    assert set(dataset_images(svc.home)) == before_files


@pytest.mark.timeout(120)
@pytest.mark.parametrize("data", [hostile.apng_many_frames(), hostile.animated_webp_many_frames()],
                         ids=["apng-2000-frames", "webp-1000-frames"])
def test_animated_allowed_formats_first_frame_only(svc: RunningService, data: bytes) -> None:
    with svc.client() as c:
        r, took = _post_file(c, "/v1/predict", "anim", data)
    assert r.status_code == 200, r.text
    assert took < REFUSE_WITHIN_S


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "vlboundary"
               ) -> tuple[bytes, dict[str, str]]:
    out = []
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data
                   + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.timeout(120)
def test_hostile_forms(svc: RunningService) -> None:
    image = noisy_image(1, (10, 10, 10))
    many_files = [("files", f"{i}.png", image) for i in range(5000)]
    many_fields = [(f"f{i}", None, b"x") for i in range(5000)]
    huge_field = [("label", None, b"a" * (10 * 1024 * 1024)), ("files", "a.png", image)]
    over_limit = [("label", None, b"a" * (svc.settings.max_upload_bytes + 1))]
    cases = {
        "5000 file parts": (many_files, 413),
        "5000 text fields": ([("label", None, b"x"), *many_fields], 400),
        "10 MiB text field": (huge_field, 400),
        "body over the byte limit": (over_limit, 413),
    }
    before = set(dataset_images(svc.home))
    with svc.client() as c:
        for case, (parts, status) in cases.items():
            body, headers = _multipart(parts)
            for path in ("/v1/labels", "/v1/predict"):
                t0 = time.monotonic()
                r = c.post(path, content=body, headers=headers)
                took = time.monotonic() - t0
                print(f"\n[forms] {path} {case}: {r.status_code} in {took:.2f}s")
                assert_error(r, status)
                assert took < 10, f"{case}: {took:.1f}s"
        big_json = {"images": [base64.b64encode(b"\x00" * (12 * 1024 * 1024)).decode()]}
        assert_error(c.post("/v1/predict", json=big_json), 415)  # 16 MiB: under the limit
    assert set(dataset_images(svc.home)) == before


# -- concurrent label uploads --------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_concurrent_label_uploads_store_each_image_exactly_once(svc: RunningService) -> None:
    images = [noisy_image(10_000 + i, (120, 60, 200)) for i in range(40)]
    contested = [noisy_image(20_000 + i, (20, 200, 90)) for i in range(10)]
    jobs: list[tuple[str, list[bytes]]] = []
    for data in images:  # every image three times, some inside two-file requests
        jobs += [("crowd", [data])] * 2
        jobs.append(("crowd", [data, random.Random(len(jobs)).choice(images)]))
    for data in contested:  # the same bytes under two labels at once
        jobs += [("crowd-a", [data]), ("crowd-b", [data])] * 2
    random.Random(7).shuffle(jobs)

    def send(job: tuple[str, list[bytes]]) -> tuple[int, list[dict[str, Any]]]:
        label, datas = job
        with svc.client() as c:
            r = c.post("/v1/labels", data={"label": label},
                       files=[("files", (f"{i}.png", d)) for i, d in enumerate(datas)])
        return r.status_code, (r.json().get("results", []) if r.status_code == 200 else [r.text])

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(send, jobs))
    took = time.monotonic() - t0
    assert [s for s, _ in answers] == [200] * len(jobs), [a for a in answers if a[0] != 200][:3]
    results = [r for _, rs in answers for r in rs]
    added = Counter(r["sha256"] for r in results if r["status"] == "added")
    sent = {hashlib.sha256(d).hexdigest() for d in images + contested}
    print(f"\n[concurrent] {len(jobs)} requests ({len(results)} files, {len(sent)} distinct) "
          f"from 12 threads in {took:.1f}s; statuses "
          f"{dict(Counter(r['status'] for r in results))}")
    assert set(added) == sent and set(added.values()) == {1}, added
    stored = check_dataset_integrity(svc.home)
    crowd = {hashlib.sha256(d).hexdigest() for d in images}
    assert {s for s, label in stored.items() if label == "crowd"} == crowd
    for data in contested:
        assert stored[hashlib.sha256(data).hexdigest()] in ("crowd-a", "crowd-b")
    ledger_added = added_counts(svc.home)
    assert all(ledger_added[s] == 1 for s in sent), ledger_added
    with svc.client() as c:
        counts = c.get("/v1/dataset").json()["labels"]
    assert counts["crowd"] == 40
    assert counts.get("crowd-a", 0) + counts.get("crowd-b", 0) == 10
