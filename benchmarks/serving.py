"""Serving speed over real HTTP against the in-process limit and peers, from one run.

    python -m benchmarks.serving [--duration 20] [--quick] [--front-end python-proxy|haproxy]

Everything runs on this machine: the real service (`service.app`) with the v0 model
`visionloop up` makes, and a lean asyncio HTTP/1.1 load generator (keep-alive, requests built
beforehand) posting 640x480 photo-like JPEGs (multipart) over loopback. It prints and writes
(results/serving.json, .md) one table from one run:
1. in-process limit: the in-process pipeline (decode + preprocess + forward) in its fastest
   layout (processes x threads x batch, measured now by `benchmarks.pipeline`) and its batch-1
   p50; measured again after the served runs, and the faster of the two is the one every ratio
   is taken against (noise on a shared machine only ever makes a run slower);
2. ours, the defaults: `visionloop up` itself, started as a subprocess on a fresh volume with
   nothing set but --home/--host/--port (no VISIONLOOP_* or RAY_SERVE_* variable passed on), at
   1 and 16 clients. With it: cold start (seconds from starting `visionloop up` to the first
   answered POST /v1/predict), and memory: RSS of each API replica and the whole service's RSS
   and PSS (every process under `visionloop up`: driver, Ray's GCS, raylet, workers, Serve
   actors, a front end) at idle and the peak under a 16-client load (a load run of its own,
   after the measured one: sampling costs CPU). RSS counts pages shared
   between processes once per process; PSS shares them out, so the sum of PSS is the service's
   honest total;
3. peers: `benchmarks.peers.measure_peers` on the same model, images, load generator and
   clients, in this run (Ray stopped meanwhile); a peer that cannot run is a "not measured"
   row with the reason, and so is the whole set when `benchmarks.peers` is missing or fails;
4. ours, other layouts on a Ray cluster of this process (replicas x threads, batching on/off),
   plus a no-op Serve handler (the same ingress path, multipart parsing included, without the
   model): where the time goes;
5. hot reload: with 2 replicas under load, seconds from CURRENT changing to every replica
   answering with the new version, and failed requests during the swap.
Ratios: vs_in_process = served images/s / the in-process limit's; vs_best_peer = images/s /
the best peer's at the same clients; added_p50_ms = served p50 at 1 client - the fastest
in-process batch-1 p50. The summary holds the three goals of issue 17 for the defaults at 16
clients (>= 0.8 x in-process, >= 2 x the best peer, added p50 <= 5 ms).
Sections 4 and 5 run on the front end the service's Serve environment picks for a cluster
that is not `visionloop up`'s (`service.app.serve_environment`: the Python proxy), named in
each row; `visionloop up` itself (section 2) starts HAProxy. `--front-end python-proxy` or `haproxy`
runs sections 1, 4 and 5 only, on that front end (results/serving-<front-end>.json): the other
front end, for comparison; the defaults, cold start, memory and peers are in serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, File, UploadFile
from ray import serve

from benchmarks.common import percentiles, photo_jpegs, write_results
from benchmarks.pipeline import best_layout, export_model, latency_batch1, pipeline_throughput
from service.app import serve_environment
from service.cli import stop_serve
from tests.support.load import Hammer
from tests.support.processes import descendants
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


# -- memory, cold start and the defaults of `visionloop up` ---------------------------------------

PEERS = ("TorchServe", "BentoML")
REPLICA_TITLE = re.compile(r"ray::ServeReplica:[^:]+:Ingress\b")


def _proc_kib(pid: int, name: str, field: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_snapshot(root: int) -> dict[str, Any]:
    """Memory of process `root` and every descendant (the whole service when `root` is
    `visionloop up`): RSS of each API replica (by its Ray process title), the sum of RSS and the
    sum of PSS over all of them, in MiB. A process that exits meanwhile is skipped."""
    replicas: list[float] = []
    rss = pss = 0
    count = 0
    for pid in [root, *descendants(root)]:
        try:
            r = _proc_kib(pid, "status", "VmRSS")
            p = _proc_kib(pid, "smaps_rollup", "Pss")
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, KeyError, ValueError):
            continue
        rss, pss, count = rss + r, pss + p, count + 1
        if REPLICA_TITLE.match(title):
            replicas.append(round(r / 1024, 1))
    return {"replica_rss_mib": sorted(replicas), "service_rss_mib": round(rss / 1024, 1),
            "service_pss_mib": round(pss / 1024, 1), "processes": count}


# Which part of the service a process is, by its Ray process title or command name (the CPU
# breakdown of `cpu_snapshot`), first match wins.
CPU_GROUPS: list[tuple[str, re.Pattern[str]]] = [
    ("API replicas", REPLICA_TITLE),
    ("front end", re.compile(r"haproxy|ray::ProxyActor|ray::HAProxyManager")),
    ("other Serve actors", re.compile(r"ray::Serve")),
]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_snapshot(root: int) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, start time) -> (CPU group, user + system CPU seconds so far) for process `root`
    and every descendant; processes that are not in CPU_GROUPS are "Ray and the rest" (GCS,
    raylet, agents, idle workers, `visionloop up` itself)."""
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for pid in [root, *descendants(root)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            continue
        group = next((g for g, pattern in CPU_GROUPS
                      if pattern.search(title) or pattern.search(comm)), "Ray and the rest")
        out[(pid, int(fields[19]))] = (group, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


def cpu_per_request(before: dict[tuple[int, int], tuple[str, float]],
                    after: dict[tuple[int, int], tuple[str, float]],
                    load_generator_s: float, requests: int) -> dict[str, float]:
    """CPU ms per answered request of each group between two `cpu_snapshot`s (a process that
    started meanwhile counts from 0), the load generator's (this process) and the total."""
    spent: dict[str, float] = {}
    for key, (group, seconds) in after.items():
        spent[group] = spent.get(group, 0.0) + seconds - before.get(key, (group, 0.0))[1]
    spent["load generator"] = load_generator_s
    out = {g: round(1000 * t / max(requests, 1), 2) for g, t in sorted(spent.items())}
    out["total"] = round(sum(1000 * t for t in spent.values()) / max(requests, 1), 2)
    return out


class MemorySampler(threading.Thread):
    """memory_snapshot(root) every `interval` s until stopped; `peak` is the snapshot with the
    largest service PSS, with each replica's largest RSS seen."""

    def __init__(self, root: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.halt = threading.Event()
        self.samples: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append(memory_snapshot(self.root))
            self.halt.wait(self.interval)

    def peak(self) -> dict[str, Any]:
        if not self.samples:
            self.samples.append(memory_snapshot(self.root))
        top = max(self.samples, key=lambda s: s["service_pss_mib"])
        widest = max(len(s["replica_rss_mib"]) for s in self.samples)
        replicas = [max(s["replica_rss_mib"][i] for s in self.samples
                        if len(s["replica_rss_mib"]) == widest) for i in range(widest)]
        return {**top, "replica_rss_mib": replicas, "samples": len(self.samples)}


def visionloop_exe() -> str:
    """The `visionloop` console script of this environment."""
    beside = Path(sys.executable).parent / "visionloop"
    return str(beside) if beside.exists() else shutil.which("visionloop") or "visionloop"


def predict_once(url: str, jpeg: bytes, timeout: float = 30) -> int:
    """POST one image to /v1/predict -> the status (0: no answer)."""
    try:
        return httpx.post(f"{url}/v1/predict", files={"files": ("p.jpg", jpeg, "image/jpeg")},
                          timeout=timeout).status_code
    except httpx.HTTPError:
        return 0


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot; None: exited): with the pid, it
    names one process, so a pid reused by another process is never taken for it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):  # exited, not reaped yet
        return None
    return int(fields[19])


def process_names(pids: Iterable[int]) -> set[str]:
    """The command names (/proc/PID/comm) of those of `pids` still running."""
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def record(root: int, seen: dict[int, int]) -> None:
    """Add `root`'s descendants to `seen` (pid -> start time)."""
    for pid in descendants(root):
        started = start_time(pid)
        if started is not None:
            seen.setdefault(pid, started)


def stop_group(proc: subprocess.Popen[bytes], seen: dict[int, int],
               grace: float = 30) -> list[str]:
    """SIGTERM to `visionloop up`'s process group, SIGKILL after `grace` s; then any process of
    `seen` (the service's processes recorded while it ran, pid -> start time) still alive
    `grace` s later is named and killed: -> the names of what outlived the service (reported,
    so a leak shows in the results)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def alive() -> list[int]:  # a pid naming another process now is not ours
        return [pid for pid, started in sorted(seen.items()) if start_time(pid) == started]

    deadline = time.monotonic() + grace  # Ray's own processes exit a little after the driver
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = []
    for pid in alive():
        with contextlib.suppress(OSError):
            left.append(f"{Path(f'/proc/{pid}/comm').read_text().strip()} ({pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def run_defaults(home: Path, jpegs: list[bytes], duration: float) -> dict[str, Any]:
    """`visionloop up --home home` as a new user starts it (no VISIONLOOP_* or RAY_SERVE_*
    variable passed on): cold start, memory at idle and under 16 clients, and the load at 1
    and 16 clients."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VISIONLOOP_", "RAY_SERVE_", "RAY_ADDRESS"))}
    log = home.parent / "visionloop-up.log"
    home.mkdir(parents=True, exist_ok=True)
    seen: dict[int, int] = {}
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([visionloop_exe(), "up", "--home", str(home), "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def answered() -> bool:
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"visionloop up exited ({proc.returncode}):\n{tail}")
                record(proc.pid, seen)
                return predict_once(url, jpegs[0]) == 200

            wait_for(answered, 600, interval=0.1, what="the first answered predict")
            cold_start_s = time.perf_counter() - t0
            wait_ready(url, timeout=120, alive=lambda: proc.poll() is None)
            time.sleep(3)
            idle = memory_snapshot(proc.pid)
            record(proc.pid, seen)
            front = "HAProxy" if "haproxy" in process_names(seen) else "Serve's Python proxy"
            one = load(url, jpegs, 1, requests=60)
            record(proc.pid, seen)
            cpu_before, own_before = cpu_snapshot(proc.pid), time.process_time()
            many = load(url, jpegs, 16, duration=duration)
            cpu = cpu_per_request(cpu_before, cpu_snapshot(proc.pid),
                                  time.process_time() - own_before,
                                  many["statuses"].get(200, 0))
            # Memory under load in a load run of its own: reading /proc/<pid>/smaps_rollup of
            # every process takes CPU the served figures above must not lose.
            sampler = MemorySampler(proc.pid)
            sampler.start()
            load(url, jpegs, 16, duration=min(duration, 8))
            sampler.halt.set()
            sampler.join()
            record(proc.pid, seen)
        finally:
            left = stop_group(proc, seen)
    n = len(idle["replica_rss_mib"])  # the API replicas' processes (/readyz lists versions)
    return {"layout": f"`visionloop up` defaults: {n} API replica{'' if n == 1 else 's'}, "
                      f"{front}",
            "replicas": n, "front_end": front, "cold_start_s": round(cold_start_s, 1),
            "memory": {"idle": idle, "under_16_clients": sampler.peak()},
            "left_behind_after_stop": left, "1": one, "16": many,
            "cpu_ms_per_request_16_clients": cpu}


def measure_peer_rows(model_dir: Path, jpegs: list[bytes], clients: Sequence[int],
                      duration: float, quick: bool) -> list[dict[str, Any]]:
    """benchmarks.peers.measure_peers, or one "not measured" row per peer saying why."""
    try:  # by name: the package is written beside this one and may not be there yet
        measure_peers = importlib.import_module("benchmarks.peers").measure_peers
    except (ImportError, AttributeError) as exc:
        return [{"peer": p, "not_measured": f"benchmarks.peers is not importable ({exc})"}
                for p in PEERS]
    try:
        return list(measure_peers(model_dir, jpegs, clients, duration, quick))
    except Exception as exc:  # any failure of a peer's harness is a row, not a lost run
        return [{"peer": p, "not_measured": f"measure_peers failed: {type(exc).__name__}: "
                 f"{exc}"} for p in PEERS]


def served_row(section: str, layout: str, clients: int, r: dict[str, Any]) -> dict[str, Any]:
    return {"section": section, "layout": layout, "clients": clients,
            "images_per_s": round(r["images_per_s"], 1), "p50_ms": r["p50_ms"],
            "p95_ms": r["p95_ms"], "p99_ms": r["p99_ms"], "failed": r["failed"]}


def add_ratios(rows: list[dict[str, Any]], in_process: float, batch1_p50: float) -> None:
    """vs_in_process, vs_best_peer (at the same clients) and added_p50_ms on every measured
    row of ours with the model; vs_in_process on the peers' and the no-op handler's too."""
    peers = [r for r in rows if r["section"] == "peer" and "images_per_s" in r]
    for r in rows:
        if "images_per_s" not in r or r["section"] == "in-process limit":
            continue
        r["vs_in_process"] = round(r["images_per_s"] / in_process, 2)
        if r["section"] == "peer" or "no-op" in r["layout"]:
            continue  # the no-op handler is no model server: no peer is like it
        same = [p["images_per_s"] for p in peers if p["clients"] == r["clients"]]
        if same and max(same) > 0:
            r["vs_best_peer"] = round(r["images_per_s"] / max(same), 2)
        if r["clients"] == 1 and "no-op" not in r["layout"]:
            r["added_p50_ms"] = round(r["p50_ms"] - batch1_p50, 1)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20, help="seconds per 16-client run")
    ap.add_argument("--quick", action="store_true",
                    help="shorter runs, fewer layouts (for development; not for the README)")
    ap.add_argument("--front-end", choices=("default", "python-proxy", "haproxy"),
                    default="default", help="the Ray layouts on this front end only (no "
                    "defaults, no peers): results/serving-<front-end>.json")
    ap.add_argument("--haproxy", dest="front_end", action="store_const", const="haproxy",
                    help="the same as --front-end haproxy")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 8)
    cpus = os.cpu_count() or 1
    jpegs = photo_jpegs(32)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    # 1. The in-process limit, measured now, with the engine v0 serves with: the fastest
    # layout, and batch-1 latency at 1 thread and at all cores.
    tmp_onnx = tempfile.TemporaryDirectory()
    onnx_path = export_model(Path(tmp_onnx.name)) if onnxruntime_available() else None
    _, best = best_layout(jpegs, onnx_path, quick=True)
    base_lat = {t: latency_batch1(jpegs, t, best["engine"], onnx_path) for t in {1, cpus}}
    batch1 = min(base_lat.values(), key=lambda r: r["p50_ms"])
    # its p50/p95/p99 are of batch 1 (the fastest of 1 thread and all cores): what a served
    # request at 1 client is held to
    rows.append({"section": "in-process limit", "layout": f"{best['engine']}, "
                 f"{best['processes']} proc x {best['threads']} thr, batch {best['batch']}",
                 "clients": "-", "images_per_s": best["images_per_s"], **batch1})
    results: dict[str, Any] = {"quick": args.quick, "duration_s": args.duration,
                               "baseline": {"best_layout": best, "latency_batch1": base_lat}}
    tmp = tempfile.TemporaryDirectory()
    try:
        if args.front_end == "default":
            # 2. What a user gets: `visionloop up` with its defaults.
            home = Path(tmp.name) / "defaults" / "home"
            d = run_defaults(home, jpegs, args.duration)
            results["defaults"] = d
            rows += [served_row("ours, defaults", d["layout"], 1, d["1"]),
                     served_row("ours, defaults", d["layout"], 16, d["16"])]
            print(results["defaults"]["memory"], d["cold_start_s"], flush=True)
            # 3. Peers, on the model that run served (v0), Ray stopped meanwhile.
            from training.registry import Registry

            registry = Registry(home)
            model_dir = registry.version_dir(registry.current() or "v0")
            peers = measure_peer_rows(model_dir, jpegs, (1, 16), args.duration, args.quick)
            results["peers"] = peers
            for p in peers:
                if "not_measured" in p:
                    rows.append({"section": "peer", "layout": p["peer"],
                                 "not_measured": p["not_measured"]})
                else:
                    rows.append({"section": "peer", "layout": f"{p['peer']}, {p['layout']}",
                                 **{k: p[k] for k in ("clients", "images_per_s", "p50_ms",
                                                      "p95_ms", "p99_ms", "failed")}})
            print(peers, flush=True)
        rows += run_layouts(args, cpus, jpegs, Path(tmp.name), results)
    finally:
        tmp.cleanup()
    # The in-process limit once more, after the served runs: the faster of the two counts.
    again = pipeline_throughput(jpegs, best["processes"], best["threads"], best["batch"],
                                best["engine"], onnx_path)
    tmp_onnx.cleanup()
    if again > best["images_per_s"]:
        best = {**best, "images_per_s": round(again, 1)}
        rows[0]["images_per_s"] = best["images_per_s"]
    add_ratios(rows, best["images_per_s"], batch1["p50_ms"])
    results["summary"] = summary(rows, results, best, batch1)
    results["wall_s"] = round(time.perf_counter() - t_start)
    name = "serving" if args.front_end == "default" else f"serving-{args.front_end}"
    write_results(name, results, rows, notes(results["summary"], results["front_end"],
                                             args.quick))


def run_layouts(args: argparse.Namespace, cpus: int, jpegs: list[bytes], tmp: Path,
                results: dict[str, Any]) -> list[dict[str, Any]]:
    """Section 4 and 5: the layouts on a Ray cluster of this process, and the hot reload."""
    import ray

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
    if args.front_end != "default":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if args.front_end == "haproxy" else "0"
    serve_environment()  # may turn HAProxy off where there is no binary for it
    front = "HAProxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Python proxy"
    results["front_end"] = front
    rows = []
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        for name, overrides in layouts:
            home = tmp / name.replace(" ", "_")
            url = start_noop() if overrides is None else start_service(home, **overrides).url
            one = load(url, jpegs, 1, requests=60)
            many = load(url, jpegs, 16, duration=args.duration)
            for clients, r in ((1, one), (16, many)):
                rows.append(served_row(f"ours, {front}", name, clients, r))
                print(rows[-1], flush=True)
            results[name] = {"1": one, "16": many}
            if overrides is not None and overrides["classifier_replicas"] > 1 \
                    and "reload" not in results:
                results["reload"] = hot_reload(url, home, jpegs)
                print("reload", results["reload"], flush=True)
            stop_serve()
    finally:
        ray.shutdown()
    return rows


def summary(rows: list[dict[str, Any]], results: dict[str, Any], best: dict[str, Any],
            batch1: dict[str, float]) -> dict[str, Any]:
    """The figures the README quotes, and issue 17's goals for the defaults."""
    ours = [r for r in rows if r["section"].startswith("ours") and "no-op" not in r["layout"]]
    peers = [r for r in rows if r["section"] == "peer" and "images_per_s" in r]
    best16 = max((r for r in ours if r["clients"] == 16), key=lambda r: r["images_per_s"])
    best1 = min((r for r in ours if r["clients"] == 1), key=lambda r: r["added_p50_ms"])
    peer16 = max((r for r in peers if r["clients"] == 16), key=lambda r: r["images_per_s"],
                 default=None)
    out: dict[str, Any] = {
        "in_process_images_per_s": best["images_per_s"], "in_process_batch1_p50_ms":
        batch1["p50_ms"], "best_16_clients": best16, "best_added_p50": best1,
        "best_peer_16_clients": peer16,
        "peers_not_measured": [r for r in rows if r["section"] == "peer"
                               and "not_measured" in r],
        "reload": results.get("reload")}
    if "defaults" in results:
        d = results["defaults"]
        d16 = next(r for r in rows if r["section"] == "ours, defaults" and r["clients"] == 16)
        d1 = next(r for r in rows if r["section"] == "ours, defaults" and r["clients"] == 1)
        out["defaults"] = {"layout": d["layout"], "images_per_s_16": d16["images_per_s"],
                           "p50_ms_1": d1["p50_ms"], "vs_in_process": d16["vs_in_process"],
                           "vs_best_peer": d16.get("vs_best_peer"),
                           "added_p50_ms": d1["added_p50_ms"],
                           "cold_start_s": d["cold_start_s"], "memory": d["memory"],
                           "left_behind_after_stop": d["left_behind_after_stop"],
                           "cpu_ms_per_request_16_clients":
                               d.get("cpu_ms_per_request_16_clients"),
                           # the in-process pipeline's CPU per image, stage by stage (its best
                           # layout): what an API replica's CPU per request is read against
                           "pipeline_cpu_ms_per_image": {
                               k.removesuffix("_cpu_ms"): best[k] for k in
                               ("decode_cpu_ms", "preprocess_cpu_ms", "engine_cpu_ms")
                               if k in best}}
        out["goals"] = {
            "served_vs_in_process_at_least_0.8": d16["vs_in_process"] >= 0.8,
            "served_vs_best_peer_at_least_2": (None if d16.get("vs_best_peer") is None
                                               else d16["vs_best_peer"] >= 2),
            "added_p50_at_most_5_ms": d1["added_p50_ms"] <= 5}
    return out


def notes(s: dict[str, Any], front: str, quick: bool) -> list[str]:
    out = [f"Ray layouts: Serve's {front}"]
    if quick:
        out.append("a --quick run: short, fewer layouts; not for the README")
    if "defaults" in s:
        d = s["defaults"]
        mem = d["memory"]
        out += [f"defaults ({d['layout']}): {d['images_per_s_16']} images/s at 16 clients, "
                f"{d['vs_in_process']} x in-process, {d['vs_best_peer']} x the best peer; "
                f"added p50 at 1 client {d['added_p50_ms']} ms; goals: {s['goals']}",
                f"cold start (`visionloop up` to the first answered predict): "
                f"{d['cold_start_s']} s",
                f"memory idle: {mem['idle']}; under 16 clients (peak): "
                f"{mem['under_16_clients']}",
                f"left behind after stopping `visionloop up`: "
                f"{d['left_behind_after_stop'] or 'nothing'}",
                f"CPU ms per answered request at 16 clients, by process group: "
                f"{d['cpu_ms_per_request_16_clients']}; the in-process pipeline per image: "
                f"{d['pipeline_cpu_ms_per_image']}"]
    for p in s["peers_not_measured"]:
        out.append(f"{p['layout']}: not measured ({p['not_measured']})")
    b = s["best_16_clients"]
    out.append(f"best of ours at 16 clients: {b['images_per_s']} images/s ({b['layout']}), "
               f"{b['vs_in_process']} x the in-process limit of this run")
    if s.get("reload"):
        r = s["reload"]
        out.append(f"hot reload under load: every replica on the new version {r['swap_s']} s "
                   f"after CURRENT changed; failed requests: {r['failed_requests']} of "
                   f"{r['requests']}")
    out.append("the load generator runs on the same cores as the service")
    return out


if __name__ == "__main__":
    main()
