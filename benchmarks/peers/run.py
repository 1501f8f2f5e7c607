"""Peers measured in the same run as ours: TorchServe and BentoML on the same model, images,
load generator and machine.

    python -m benchmarks.peers [--quick] [--duration 20] [--install-only]

What is the same as for our service, and how:
- model: the version directory our service publishes for v0 (`Registry.ensure_v0`:
  `manifest.json`, `model.safetensors`, `model.onnx` when ONNX Runtime won the engine check).
  A peer runs the engine that version serves with: when the manifest says `onnxruntime`, the
  very `model.onnx` (TorchServe loads it through `BaseHandler`'s own ONNX support, BentoML
  with onnxruntime); else a TorchScript trace of the same weights (`torch.jit.load` in both).
  Same engine on both sides is the fair choice, and the faster one on this machine, since that
  is how the manifest's engine was chosen;
- preprocessing: `benchmarks/peers/preprocess.py`, our decode (JPEG draft mode) and
  `EvalPreset` (256 -> 224, ImageNet mean/std), checked equal to ours by a test;
- load: `benchmarks.serving.load` (its asyncio HTTP/1.1 generator, keep-alive, requests built
  before the clock, a warm-up first) with the same multipart body (field `files`, one JPEG).
  BentoML's API is routed at /v1/predict so the requests are byte for byte ours. TorchServe
  serves a model only at /predictions/<name>: its requests are ours with that path in the
  request line (`predict_request` is swapped for the duration of its runs), nothing else;
- answer: top 5 labels with scores per image, as ours.

Each peer lives in its own virtual environment under ~/.cache/visionloop-bench (or
$VISIONLOOP_BENCH_CACHE), made here on first use with `python3 -m venv` and pip (torch and
torchvision from this machine's disk), never in ours. TorchServe also needs a Java runtime
(`java` on PATH or $JAVA_HOME; Debian: `apt-get install -y openjdk-17-jre-headless`).

Each peer is a subprocess in a session of its own on free loopback ports, waited for until a
real prediction answers 200, measured at each client count, then stopped: SIGTERM to its
process group, SIGKILL after 15 s, then SIGKILL to any process that still carries this run's
marker in its environment (TorchServe's Java frontend and its Python backends, BentoML's
workers), and a check that none is left.

TorchServe: token authorisation is off (`disable_token_authorization=true`: the benchmark's
client sends no token) and the management
API's model control stays off (`enable_model_api=false`; the model is loaded at start from the
model store). Everything else is TorchServe's default (its access and metrics logs, its
system metrics collector, netty threads = cores). Its layout (workers x threads per worker,
batch) is found by trying: each candidate serves a short 16-client run, the best one is then
measured at every client count, and the rows say what was tried. BentoML: the idiomatic
service (`bentoml_service.py`) with adaptive batching, as many workers as cores, one thread
each.

A peer that cannot run gets a row {"peer": ..., "not_measured": why} instead of figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
CACHE = Path(os.environ.get("VISIONLOOP_BENCH_CACHE", Path.home() / ".cache" / "visionloop-bench"))
MARKER = "VISIONLOOP_PEER_RUN"
TS_MODEL = "visionloop"
# Pinned so a rerun measures the same peer; torch/torchvision as on this machine's disk.
TORCH = ["torch==2.14.1", "torchvision==0.29.1", "onnxruntime==1.32.0", "pillow==13.0.0"]
PACKAGES: dict[str, list[str]] = {
    "torchserve": [*TORCH, "torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml"],
    "bentoml": [*TORCH, "bentoml==1.4.40"],
}
VERSIONED = {"torchserve": ["torchserve", "torch-model-archiver", "torch", "onnxruntime"],
             "bentoml": ["bentoml", "torch", "onnxruntime"]}
READY_TIMEOUT_S = 300


class PeerUnavailable(RuntimeError):
    """The peer cannot be measured here; the message says why (it goes into the row)."""


# -- environments --------------------------------------------------------------------------

def ensure_venv(peer: str) -> tuple[Path, float | None]:
    """The peer's virtual environment, made on first use -> (its python, seconds the install
    took now, None when it was there already). Reinstalls when the pinned packages changed."""
    venv = CACHE / f"{peer}-venv"
    python = venv / "bin" / "python"
    stamp = venv / "visionloop-packages.json"
    wanted = PACKAGES[peer]
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return python, None
    start = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        # the base interpreter, not ours: a venv made from inside a venv is still a clean one,
        # but this keeps the peer independent of our .venv's life
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", str(venv)], check=True, capture_output=True,
                       text=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        detail = getattr(exc, "stderr", "") or str(exc)
        raise PeerUnavailable(f"installing {' '.join(wanted)} failed: "
                              f"{detail.strip().splitlines()[-1][:300] if detail else exc}"
                              ) from None
    stamp.write_text(json.dumps(wanted))
    return python, time.perf_counter() - start


def versions(python: Path, packages: Sequence[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))")
    out = subprocess.run([str(python), "-c", code, *packages], check=True,
                         capture_output=True, text=True).stdout
    found: dict[str, str] = json.loads(out)
    return found


def java() -> tuple[str, str]:
    """-> (java executable, its version line); PeerUnavailable when there is none."""
    home = os.environ.get("JAVA_HOME")
    exe = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not exe or not Path(exe).exists():
        raise PeerUnavailable("no JDK: TorchServe's frontend needs Java 11+ (`java` on PATH or "
                              "$JAVA_HOME; Debian: apt-get install -y openjdk-17-jre-headless)")
    out = subprocess.run([exe, "-version"], capture_output=True, text=True)
    return exe, (out.stderr or out.stdout).splitlines()[0].strip()


# -- the model -----------------------------------------------------------------------------

def prepare_model(model_dir: Path, out: Path) -> str:
    """The served version's model as a peer loads it, into `out`: model.onnx (when the version
    serves with ONNX Runtime) or model.pt (TorchScript of the same weights), and classes.json.
    -> the engine ("onnxruntime" or "torchscript")."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    classes: list[str] = manifest["classes"]
    (out / "classes.json").write_text(json.dumps(classes))
    onnx = model_dir / "model.onnx"
    if manifest.get("inference", {}).get("engine") == "onnxruntime" and onnx.exists():
        shutil.copyfile(onnx, out / "model.onnx")
        return "onnxruntime"
    import torch
    from safetensors.torch import load_file

    from training.model import build_model

    crop = int(manifest["preprocessing"]["crop"])
    model = build_model(manifest["backbone"],
                        num_classes=None if len(classes) == 1000 else len(classes),
                        pretrained=False)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    with torch.inference_mode():
        traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, crop, crop))
    traced.save(str(out / "model.pt"))
    return "torchscript"


def ensure_v0(home: Path) -> Path:
    """Version 0 as our service publishes it (efficientnet_lite0, ImageNet head) -> its dir."""
    from training.registry import Registry

    registry = Registry(home)
    registry.ensure_v0("efficientnet_lite0")
    return registry.version_dir("v0")


# -- processes -----------------------------------------------------------------------------

@dataclass
class Server:
    """A peer server: its process (session leader), the marker its tree carries, its URL."""

    proc: subprocess.Popen[bytes]
    marker: str
    url: str
    log: Path
    stopped: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start(cmd: Sequence[str], cwd: Path, env: dict[str, str], url: str) -> Server:
    marker = uuid.uuid4().hex
    log = cwd / "server.log"
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it; closed when we exit
    proc = subprocess.Popen(list(cmd), cwd=cwd, env={**env, MARKER: marker}, stdout=fh,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    fh.close()
    return Server(proc, marker, url, log)


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries `marker` (every descendant of a peer server)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop(server: Server, grace: float = 15) -> None:
    """SIGTERM to the process group, SIGKILL after `grace` s; then SIGKILL to any marked
    process left (a child in a session of its own); raise if one survives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(grace)
    deadline = time.monotonic() + grace
    while marked_pids(server.marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    for pid in marked_pids(server.marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(10)
    deadline = time.monotonic() + 10
    while (left := marked_pids(server.marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        raise RuntimeError(f"peer processes left after stop: {left}")


def wait_predicting(server: Server, jpeg: bytes, path: str) -> None:
    """Until one real prediction answers 200 (the model loaded in every worker it started)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.alive():
            raise PeerUnavailable(f"exited ({server.proc.returncode}) before answering: "
                                  f"{server.log_tail(5)}")
        try:
            r = httpx.post(f"{server.url}{path}", files={"files": ("p.jpg", jpeg, "image/jpeg")},
                           timeout=30)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise PeerUnavailable(f"no 200 from {path} within {READY_TIMEOUT_S} s: {server.log_tail(5)}")


@contextlib.contextmanager
def request_path(path: str) -> Iterator[None]:
    """Our load generator's requests, with `path` in the request line instead of /v1/predict."""
    from benchmarks import serving

    original = serving.predict_request

    def rewritten(host: str, data: bytes) -> bytes:
        return original(host, data).replace(b"POST /v1/predict ", f"POST {path} ".encode(), 1)

    serving.predict_request = rewritten
    try:
        yield
    finally:
        serving.predict_request = original


def measure(url: str, jpegs: list[bytes], clients: int, duration: float) -> dict[str, Any]:
    """One run of our load generator (warm-up included) -> the row's figures."""
    from benchmarks.serving import load

    r = load(url, jpegs, clients, duration=duration)
    return {"clients": clients, "images_per_s": round(r["images_per_s"], 1),
            "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "p99_ms": r["p99_ms"],
            "failed": r["failed"]}


def free_port() -> int:
    from tests.support.waiting import free_port as free

    return free()


# -- TorchServe ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TsLayout:
    workers: int
    threads: int
    batch: int = 1
    delay_ms: int = 0

    def name(self) -> str:
        text = f"{self.workers} worker{'s' * (self.workers > 1)} x {self.threads} " \
               f"thread{'s' * (self.threads > 1)}"
        return text + (f", batch <= {self.batch}, {self.delay_ms} ms delay"
                       if self.batch > 1 else "")


def ts_layouts(quick: bool) -> list[TsLayout]:
    """The candidates: every core used, as processes or as threads (and, in the full run,
    TorchServe's server-side batching on the process layout)."""
    cpus = os.cpu_count() or 1
    layouts = [TsLayout(1, cpus), TsLayout(cpus, 1)]
    if not quick:
        layouts.append(TsLayout(cpus, 1, batch=8, delay_ms=5))
    return list(dict.fromkeys(layouts))  # one core: 1 x 1 once


def start_torchserve(python: Path, model: Path, work: Path, layout: TsLayout) -> Server:
    """Archive the model with this layout's config and start TorchServe in the foreground."""
    venv_bin = python.parent
    java_exe, _ = java()
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    store.mkdir(exist_ok=True)
    (work / "model-config.yaml").write_text(
        f"minWorkers: {layout.workers}\nmaxWorkers: {layout.workers}\n"
        f"batchSize: {layout.batch}\nmaxBatchDelay: {layout.delay_ms}\n"
        f"responseTimeout: 120\nhandler:\n  threads: {layout.threads}\n")
    serialized = model / ("model.onnx" if (model / "model.onnx").exists() else "model.pt")
    for name in ("torchserve_handler.py", "preprocess.py"):
        shutil.copyfile(HERE / name, work / name)
    shutil.copyfile(model / "classes.json", work / "classes.json")
    subprocess.run(
        [str(venv_bin / "torch-model-archiver"), "--model-name", TS_MODEL, "--version", "1.0",
         "--serialized-file", str(serialized), "--handler", str(work / "torchserve_handler.py"),
         "--extra-files", f"{work / 'preprocess.py'},{work / 'classes.json'}",
         "--config-file", str(work / "model-config.yaml"), "--export-path", str(store),
         "--force"], check=True, capture_output=True, text=True)
    port, mgmt, metrics = free_port(), free_port(), free_port()
    (work / "config.properties").write_text("\n".join([
        f"inference_address=http://127.0.0.1:{port}",
        f"management_address=http://127.0.0.1:{mgmt}",
        f"metrics_address=http://127.0.0.1:{metrics}",
        f"model_store={store}",
        f"load_models={TS_MODEL}.mar",
        f"default_workers_per_model={layout.workers}",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "install_py_dep_per_model=false",
    ]) + "\n")
    env = {**os.environ, "PATH": f"{venv_bin}:{Path(java_exe).parent}:{os.environ['PATH']}",
           "JAVA_HOME": str(Path(java_exe).resolve().parent.parent), "LOG_LOCATION": str(work),
           "METRICS_LOCATION": str(work), "OMP_NUM_THREADS": str(layout.threads),
           # TorchServe keeps its pid file in the temp folder (one server per folder)
           "TMPDIR": str(work), "TEMP": str(work)}
    env.pop("VIRTUAL_ENV", None)
    return start([str(venv_bin / "torchserve"), "--start", "--foreground", "--ncs",
                  "--ts-config", str(work / "config.properties"), "--model-store", str(store),
                  "--disable-token-auth"], work, env, f"http://127.0.0.1:{port}")


def measure_torchserve(model: Path, jpegs: list[bytes], clients: Sequence[int],
                       duration: float, quick: bool, work: Path) -> tuple[list[dict[str, Any]],
                                                                          dict[str, Any]]:
    _, java_version = java()  # before the install: no JDK, no point installing
    python, installed_s = ensure_venv("torchserve")
    details: dict[str, Any] = {"versions": {**versions(python, VERSIONED["torchserve"]),
                                            "java": java_version},
                               "install_s": None if installed_s is None else round(installed_s)}
    path = f"/predictions/{TS_MODEL}"
    work.mkdir(parents=True, exist_ok=True)
    trial_s = min(duration, 5.0 if quick else 10.0)

    def run(layout: TsLayout, counts: Sequence[int], seconds: float) -> list[dict[str, Any]]:
        server = start_torchserve(python, model, work / f"ts-{len(os.listdir(work))}", layout)
        try:
            t0 = time.perf_counter()
            wait_predicting(server, jpegs[0], path)
            details.setdefault("ready_s", round(time.perf_counter() - t0, 1))
            with request_path(path):
                return [measure(server.url, jpegs, c, seconds) for c in counts]
        finally:
            stop(server)

    tried = []
    for layout in ts_layouts(quick):
        (r,) = run(layout, [16], trial_s)
        tried.append({"layout": layout.name(), "seconds": trial_s, **r})
        print("torchserve trial", tried[-1], flush=True)
    best_i = max(range(len(tried)), key=lambda i: tried[i]["images_per_s"])
    best = ts_layouts(quick)[best_i]
    details["layouts_tried"] = tried
    rows = [{"peer": "torchserve", "layout": best.name(), **r}
            for r in run(best, clients, duration)]
    return rows, details


# -- BentoML -------------------------------------------------------------------------------

def measure_bentoml(model: Path, jpegs: list[bytes], clients: Sequence[int], duration: float,
                    work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    python, installed_s = ensure_venv("bentoml")
    details: dict[str, Any] = {"versions": versions(python, VERSIONED["bentoml"]),
                               "install_s": None if installed_s is None else round(installed_s)}
    cpus = os.cpu_count() or 1
    work.mkdir(parents=True, exist_ok=True)
    for name in ("bentoml_service.py", "preprocess.py"):
        shutil.copyfile(HERE / name, work / name)
    port = free_port()
    env = {**os.environ, "PATH": f"{python.parent}:{os.environ['PATH']}",
           "VISIONLOOP_PEER_MODEL_DIR": str(model), "VISIONLOOP_PEER_WORKERS": str(cpus),
           "VISIONLOOP_PEER_THREADS": "1", "OMP_NUM_THREADS": "1",
           "BENTOML_HOME": str(work / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("VIRTUAL_ENV", None)
    layout = f"{cpus} workers x 1 thread, adaptive batching <= 16"
    server = start([str(python.parent / "bentoml"), "serve", "bentoml_service:VisionloopPeer",
                    "--host", "127.0.0.1", "--port", str(port)], work, env,
                   f"http://127.0.0.1:{port}")
    try:
        t0 = time.perf_counter()
        wait_predicting(server, jpegs[0], "/v1/predict")
        details["ready_s"] = round(time.perf_counter() - t0, 1)
        rows = [{"peer": "bentoml", "layout": layout, **measure(server.url, jpegs, c, duration)}
                for c in clients]
    finally:
        stop(server)
    return rows, details


# -- the API -------------------------------------------------------------------------------

def measure_peers_detailed(model_dir: Path, jpegs: list[bytes], clients: Sequence[int],
                           duration: float, quick: bool) -> tuple[list[dict[str, Any]],
                                                                  dict[str, Any]]:
    """Every peer -> (rows, details: per peer its versions, install and start seconds,
    engine, and for TorchServe the layouts tried)."""
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="visionloop-peers-") as tmp:
        model = Path(tmp) / "model"
        engine = prepare_model(model_dir, model)
        peers: list[tuple[str, Callable[[Path], tuple[list[dict[str, Any]], dict[str, Any]]]]]
        peers = [
            ("torchserve", lambda w: measure_torchserve(model, jpegs, clients, duration, quick,
                                                        w)),
            ("bentoml", lambda w: measure_bentoml(model, jpegs, clients, duration, w)),
        ]
        for peer, fn in peers:
            try:
                peer_rows, peer_details = fn(Path(tmp) / peer)
            except Exception as exc:  # any failure of a peer is its row's reason, not ours
                why = str(exc) if isinstance(exc, PeerUnavailable) else \
                    f"{type(exc).__name__}: {exc}"[:500]
                rows.append({"peer": peer, "not_measured": why})
                details[peer] = {"not_measured": why}
                print(rows[-1], flush=True)
                continue
            for r in peer_rows:
                r["engine"] = engine
                print(r, flush=True)
            rows += peer_rows
            details[peer] = {"engine": engine, **peer_details}
    return rows, details


def measure_peers(model_dir: Path, jpegs: list[bytes], clients: Sequence[int], duration: float,
                  quick: bool) -> list[dict[str, Any]]:
    """TorchServe and BentoML serving `model_dir` (a version directory our registry published),
    loaded by our generator at each client count for `duration` s. -> one row per peer and
    client count ({"peer", "layout", "clients", "images_per_s", "p50_ms", "p95_ms",
    "p99_ms", "failed", "engine"}), or one {"peer", "not_measured": why} row for a peer that
    cannot run here."""
    return measure_peers_detailed(model_dir, jpegs, clients, duration, quick)[0]
