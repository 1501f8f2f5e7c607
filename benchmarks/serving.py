"""Serving speed over real HTTP against the in-process pipeline, and hot reload.

    python -m benchmarks.serving [--duration 20] [--quick] [--haproxy]

Everything runs on this machine: a local Ray cluster, the real service (`service.app`) with
efficientnet_lite0 version 0, and a lean asyncio HTTP/1.1 load generator (keep-alive, requests
built beforehand) posting 640x480 photo-like JPEGs (multipart) over loopback. Sections:
1. baseline: the in-process pipeline (decode + preprocess + forward) in its fastest layout
   (processes x threads x batch, measured now by `benchmarks.pipeline`) and its batch-1 p50;
2. layouts: images/s and p50/p95/p99 at 1 and at 16 concurrent clients for several serving
   layouts (replicas x threads, batching on/off), plus a no-op Serve handler (the same ingress
   path, multipart parsing included, without the model): where the time goes;
   ratio = served images/s at 16 clients / best in-process images/s; added latency = served
   p50 at 1 client - in-process p50 at batch 1;
3. hot reload: with 2 replicas under load, seconds from CURRENT changing to every replica
   answering with the new version, and failed requests during the swap.
No peer (TorchServe, BentoML) is measured here yet, so no peer figure is printed: a figure
that no run of this benchmark produced is not quoted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, File, UploadFile
from ray import serve

from benchmarks.common import percentiles, photo_jpegs, write_results
from benchmarks.pipeline import best_layout, export_model, latency_batch1, pipeline_throughput
from service.app import serve_environment
from tests.support.load import Hammer
from tests.support.service import start_service
from tests.support.waiting import free_port, wait_for, wait_ready
from training.inference import onnxruntime_available

BOUNDARY = b"visionloop-bench"


def predict_request(host: str, data: bytes) -> bytes:
    """One complete HTTP/1.1 request: POST /v1/predict, multipart field `files`, one JPEG."""
    body = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="files"; '
            b'filename="p.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + data
            + b"\r\n--" + BOUNDARY + b"--\r\n")
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 response -> (status, body, the server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() != "close"


async def _load(url: str, jpegs: list[bytes], clients: int, duration: float | None,
                requests: int | None) -> dict[str, Any]:
    """`clients` concurrent keep-alive connections, each posting one image at a time; -> rate,
    latencies, failures. A minimal HTTP/1.1 client on asyncio streams with the requests built
    before the clock starts: the load generator shares the service's cores, and httpx's CPU
    cost per request is a sizeable share of the service's own."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    wire = [predict_request(f"{host}:{port}", j) for j in jpegs]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + duration if duration else None
    sent = 0

    async def client(k: int) -> None:
        nonlocal sent
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        i = k
        while True:
            if deadline and time.perf_counter() > deadline:
                break
            if requests is not None:
                if sent >= requests:
                    break
                sent += 1
            request = wire[i % len(wire)]
            i += clients
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                conn[1].write(request)
                code, _, keep = await read_response(conn[0])
                if not keep:
                    conn[1].close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                code = 0
                if conn is not None:
                    conn[1].close()
                conn = None
            latencies.append(time.perf_counter() - t)
            statuses[code] = statuses.get(code, 0) + 1
        if conn is not None:
            conn[1].close()

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    ok = statuses.get(200, 0)
    return {"images_per_s": ok / wall, "failed": sum(statuses.values()) - ok,
            "statuses": statuses, **percentiles(latencies)}


def load(url: str, jpegs: list[bytes], clients: int, duration: float | None = None,
         requests: int | None = None) -> dict[str, Any]:
    # warm-up: a few requests so every replica has compiled its kernels and filled its caches
    asyncio.run(_load(url, jpegs, min(clients, 4), None, 8))
    return asyncio.run(_load(url, jpegs, clients, duration, requests))


def start_noop() -> str:
    """The same Serve HTTP path (proxy, FastAPI ingress, multipart parsing), no model."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(NoopIngress.bind(), name="noop", route_prefix="/")  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout=180)
    return url


noop_app = FastAPI()


@noop_app.post("/v1/predict")
async def _noop_predict(files: list[UploadFile] = File(...)) -> dict[str, Any]:
    for f in files:
        await f.read()
    return {"model_version": "noop", "predictions": []}


@noop_app.get("/readyz")
async def _noop_readyz() -> dict[str, str]:
    return {"status": "ok"}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(noop_app)
class NoopIngress:
    pass


def stop() -> None:
    """Shut Serve down and wait until its controller is gone: a `serve.start` while the old
    controller is still being killed joins it, and dies with it."""
    import ray
    from ray import serve

    serve.shutdown()

    def controller_gone() -> bool:
        try:
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        except ValueError:
            return True
        return False

    wait_for(controller_gone, 60, what="the Serve controller to exit")


def hot_reload(url: str, home: Path, jpegs: list[bytes]) -> dict[str, Any]:
    """Publish a copy of the current version as a new one, point CURRENT at it under load
    (4 clients): -> seconds until every replica answers with it (60 at most), and the requests
    made meanwhile, failed and answered by the new version."""
    from training.registry import Registry

    registry = Registry(home)
    current = registry.current()
    assert current is not None
    version, staging = registry.allocate()
    shutil.rmtree(staging)
    shutil.copytree(registry.version_dir(current), staging)
    os.rename(staging, registry.root / version)
    registry.update_manifest(version, version=version, parent=current)

    def every_replica_on_new() -> bool:
        versions = httpx.get(f"{url}/readyz", timeout=10).json().get("model_versions", [])
        return bool(versions) and all(v == version for v in versions)

    with Hammer(url, jpegs, threads=4) as hammer:
        time.sleep(2)
        t0 = time.perf_counter()
        registry.set_current(version)
        with contextlib.suppress(TimeoutError):  # reported as a swap of 60 s
            wait_for(every_replica_on_new, 60, interval=0.05, what=f"every replica on {version}")
        swap_s = time.perf_counter() - t0
        time.sleep(2)
    return {"swap_s": round(swap_s, 2), "failed_requests": len(hammer.failures()),
            "requests": len(hammer.results), "answered_by_new": hammer.versions().count(version)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20, help="seconds per 16-client run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--haproxy", action="store_true",
                    help="Serve's HAProxy front end instead of its Python proxy (the default)")
    args = ap.parse_args(argv)
    import ray

    cpus = os.cpu_count() or 1
    jpegs = photo_jpegs(32)
    rows: list[dict[str, Any]] = []

    # 1. The in-process baseline, measured now, with the engine v0 serves with: the fastest
    # layout, and batch-1 latency at 1 thread and at all cores (compared with served layouts
    # of the same threads per replica).
    tmp_onnx = tempfile.TemporaryDirectory()
    onnx_path = export_model(Path(tmp_onnx.name)) if onnxruntime_available() else None
    _, best = best_layout(jpegs, onnx_path, quick=True)
    base_lat = {t: latency_batch1(jpegs, t, best["engine"], onnx_path) for t in {1, cpus}}
    rows.append({"section": "baseline", "layout": f"in-process {best['engine']}, "
                 f"{best['processes']} proc x {best['threads']} thr, batch {best['batch']}",
                 "clients": "-", "images_per_s": best["images_per_s"], "ratio": 1.0,
                 **base_lat[1]})

    layouts: list[tuple[str, dict[str, Any] | None]] = [
        ("no-op Serve handler", None),
        (f"{cpus} replicas x 1 thread, no batching",
         {"classifier_replicas": cpus, "classifier_threads": 1}),
        (f"{cpus} replicas x 1 thread, batch <= 8, no wait",
         {"classifier_replicas": cpus, "classifier_threads": 1, "max_batch_size": 8}),
        (f"{cpus} replicas x 1 thread, batch <= 16, 10 ms wait",
         {"classifier_replicas": cpus, "classifier_threads": 1, "max_batch_size": 16,
          "batch_wait_s": 0.01}),
        (f"1 replica x {cpus} threads, no batching",
         {"classifier_replicas": 1, "classifier_threads": cpus}),
    ]
    if args.quick:
        layouts = layouts[:2]
    results: dict[str, Any] = {"baseline": {"best_layout": best, "latency_batch1": base_lat}}
    if args.haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    serve_environment()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, overrides in layouts:
                home = Path(tmp) / name.replace(" ", "_")
                url = start_noop() if overrides is None else start_service(home, **overrides).url
                one = load(url, jpegs, 1, requests=60)
                many = load(url, jpegs, 16, duration=args.duration)
                threads = (overrides or {}).get("classifier_threads", 1)
                for clients, r in ((1, one), (16, many)):
                    rows.append({"section": "served", "layout": name, "clients": clients,
                                 "images_per_s": round(r["images_per_s"], 1),
                                 "ratio": round(r["images_per_s"] / best["images_per_s"], 2),
                                 "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"],
                                 "p99_ms": r["p99_ms"], "failed": r["failed"]})
                    if clients == 1 and overrides is not None:
                        rows[-1]["added_p50_ms"] = round(
                            r["p50_ms"] - base_lat[threads]["p50_ms"], 1)
                    print(rows[-1], flush=True)
                results[name] = {"1": one, "16": many}
                if overrides is not None and overrides["classifier_replicas"] > 1 \
                        and "reload" not in results:
                    results["reload"] = hot_reload(url, home, jpegs)
                    print("reload", results["reload"], flush=True)
                stop()
    finally:
        ray.shutdown()
    # The baseline once more, after the served runs: the faster of the two is the one the
    # ratios are taken against (noise on a shared machine only ever makes a run slower).
    again = pipeline_throughput(jpegs, best["processes"], best["threads"], best["batch"],
                                best["engine"], onnx_path)
    tmp_onnx.cleanup()
    if again > best["images_per_s"]:
        best = {**best, "images_per_s": round(again, 1)}
        rows[0]["images_per_s"] = best["images_per_s"]
        for r in rows[1:]:
            r["ratio"] = round(r["images_per_s"] / best["images_per_s"], 2)
    served = [r for r in rows if r["section"] == "served" and r["layout"] != layouts[0][0]]
    best16 = max((r for r in served if r["clients"] == 16), key=lambda r: r["images_per_s"])
    best1 = min((r for r in served if r["clients"] == 1), key=lambda r: r["added_p50_ms"])
    added = best1["added_p50_ms"]
    reload = results.get("reload", {})
    results["summary"] = {"best_16_clients": best16, "added_latency_ms": added}
    front = "HAProxy front end" if args.haproxy else "Python proxy (the default front end)"
    write_results("serving-haproxy" if args.haproxy else "serving", results, rows, [
        f"Serve's {front}",
        f"best served at 16 clients: {best16['images_per_s']} images/s ({best16['layout']}), "
        f"{best16['ratio']} x the best in-process layout measured in this run",
        "peers (TorchServe, BentoML): not measured by this benchmark",
        f"added latency at 1 client (served p50 - in-process batch-1 p50 at the same threads "
        f"per replica): {added} ms ({best1['layout']})",
        f"hot reload under load: every replica on the new version {reload.get('swap_s')} s "
        f"after CURRENT changed; failed requests: {reload.get('failed_requests')} of "
        f"{reload.get('requests')}",
        "the load generator runs on the same 2 cores as the service",
    ])


if __name__ == "__main__":
    main()
