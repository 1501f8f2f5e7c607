"""The map of the service.

Request flow:

    client ─HTTP─▶ Serve proxy ─▶ API replicas (IngressDeployment: FastAPI app + Classifier; N)
                                  │ RequestGuard (service.api.guard): in-flight bound (503),
                                  │   body bytes (413), request metrics
                                  │ token checks (service.api.deps): API token; predict open or
                                  │   its token
                                  ├─ routes/predict ─▶ the Classifier in the same replica
                                  │     header probe (415/413), then one call per image;
                                  │     @serve.batch groups them; decode + inference in a
                                  │     worker thread; each answer names its model version;
                                  │     images kept in predictions/ for feedback and review
                                  ├─ routes/labels, routes/review ─▶ DatasetStore, PredictionStore
                                  ├─ routes/training: GET ─▶ JobStore (volume);
                                  │     POST, DELETE ─▶ TrainingController (one replica)
                                  │     run_job in a thread ─▶ Ray Train TorchTrainer workers
                                  │     schedule tick every second; retention every minute
                                  ├─ routes/ops: /readyz, /metrics ─▶ broadcast to every replica
                                  │     (status, request metrics summed)
                                  ├─ routes/models: list, manifest, plots, weights ─▶ Registry;
                                  │     activate ─▶ CURRENT (+ POLICY), then broadcast `reload`;
                                  │     trial ─▶ TRIAL, then broadcast `reload`
                                  ├─ routes/exchange: explain (Grad-CAM in the replica), dataset
                                  │     export/import, ONNX/pt2 downloads, predict-dir jobs
                                  │     ─▶ a detached Ray actor running Ray Data
                                  └─ routes/web: the page at / and job progress as SSE

    Every refusal is a `training.errors.DomainError` (code + status), raised where it is found
    (in a replica, in the controller behind its handle, in the stores) and answered by the one
    handler of `service.api.errors` as {"error": {"code", "message"}}.

    The classifier lives in the API replicas (no second Serve hop per image): see
    `service.deployments`. A published model reaches the classifiers through models/CURRENT:
    each replica polls it about every second (and reloads at once on the activate broadcast),
    loads and checks the new version, then swaps one reference.

Resource plan: see `service.deployments` (Serve actors take 0 CPUs; training takes the rest;
the number of API replicas and their threads follow the machine unless set).

Lifetime: `visionloop up` starts the local Ray cluster in its own process (Ray ties the
cluster's processes to it), with Serve's front end made unable to outlive it
(`guard_haproxy`), and stops it with `service.cli.stop_service`: bounded, and without Serve's
failed-call noise. A SIGKILL of `visionloop up` leaves no process and no bound port.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from ray.serve import Application

from service.deployments import ControllerDeployment, IngressDeployment, classifier_plan
from service.security import ensure_api_token
from service.settings import Settings
from training.registry import Registry

log = logging.getLogger(__name__)

APP_NAME = "visionloop"


# Ray Serve settings read from the environment of the Ray processes, so they must be in place
# before the local cluster starts (`serve_environment`), or in the environment of every
# `ray start` of an existing cluster (docker-compose.yml passes them). A value already set wins.
SERVE_ENVIRONMENT = {
    # Serve's HAProxy front end: with a no-op handler, 11x the requests/s of the Python proxy
    # here (benchmarks/serving.py; README, Performance). On in compose; `visionloop up` turns it on
    # for the local cluster it starts unless this variable is set (service.cli.cmd_up), made
    # safe first (`guard_haproxy`: it cannot outlive the service, and its stats page and
    # metrics listen on loopback only, on ports of their own), and falls back to the Python
    # proxy when it does not start (in test runs on a loaded 2-core machine two starts failed:
    # "HAProxy ... did not take over the admin socket within 30 seconds", and once its manager
    # actor was killed before it was ready). Off for the other local clusters (one-shot
    # commands such as `visionloop train` serve nothing; the tests' services).
    "RAY_SERVE_ENABLE_HA_PROXY": "0",
    # With HAProxy, a stopping API replica first waits this long for the front end to stop
    # routing to it (Ray 2.60's default: 30 s, on every stop); the front end runs beside the
    # replicas and learns of it at once. docker-compose.yml sets the same.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
    # Serve's controller gives a starting proxy actor this long to say it is ready before it
    # kills it (Ray 2.60: 5 s); the HAProxy front end's actor starts HAProxy and waits for it,
    # which a loaded 2-core machine did not do in 5 s once (a CI rehearsal: `visionloop up`
    # failed with "HAProxyManager ... killed by `ray.kill`"). docker-compose.yml sets the same.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}

# HAProxy's stats page and Prometheus metrics ports (Ray 2.60: 8404 and 9101 by default, bound
# on every interface). Chosen free per local cluster unless set by the user.
HAPROXY_PORT_VARIABLES = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# The binary the guard runs (Ray's own choice, resolved once by the process that starts Ray).
HAPROXY_REAL_BINARY = "VISIONLOOP_HAPROXY_BINARY"
# Which values of HAPROXY_PORT_VARIABLES were chosen by us (a child `visionloop up` chooses
# its own again instead of taking its parent's, which that parent's HAProxy may hold).
_CHOSEN_PORTS = "VISIONLOOP_HAPROXY_CHOSEN_PORTS"

# `RAY_SERVE_HAPROXY_BINARY_PATH` for a cluster `visionloop up` starts: Ray 2.60 starts HAProxy
# with a plain fork/exec from its HAProxyManager actor, so HAProxy is in a process group of its
# own and nothing kills it when that actor dies without its shutdown (a SIGKILL of the service,
# a crash): it kept the service port. This guard asks the kernel to SIGKILL it when its parent
# (the HAProxyManager actor) dies (prctl PR_SET_PDEATHSIG, kept across exec), and that actor
# dies with the raylet, which dies with `visionloop up` (Ray's own fate sharing): no HAProxy
# outlives the service. It also rewrites the `bind` lines of the stats and metrics ports in the
# configuration Ray wrote (under Ray's own lock on it) to 127.0.0.1, then execs the real binary
# with the same arguments (Ray finds its processes by the configuration path in their command
# line, which stays the same).
HAPROXY_GUARD = r'''#!{python} -I
"""visionloop's HAProxy guard (written by service.app.guard_haproxy; see there)."""
import ctypes, fcntl, os, re, signal, sys

ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() == 1:  # the parent died before prctl: nobody to serve
    sys.exit(1)
real = os.environ["VISIONLOOP_HAPROXY_BINARY"]
args = sys.argv[1:]
ports = [os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", "8404"),
         os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", "9101")]
if "-f" in args:
    path = args[args.index("-f") + 1]
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with open(path) as f:
            text = f.read()
        pattern = r"(?m)^(\s*bind\s+)(?:\*|0\.0\.0\.0|::|\[::\])?:(%s)\s*$" % "|".join(
            re.escape(p) for p in ports)
        loopback = re.sub(pattern, r"\g<1>127.0.0.1:\2", text)
        if loopback != text:
            with open(path, "w") as f:
                f.write(loopback)
os.execv(real, [real, *args])
'''


def serve_environment() -> None:
    """The Serve environment of a local cluster this process starts: SERVE_ENVIRONMENT's
    defaults, then, with HAProxy on, `guard_haproxy`. Call before `ray.init`."""
    for key, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        guard_haproxy()


def guard_haproxy() -> Path | None:
    """Make the HAProxy of the local cluster about to start safe (HAPROXY_GUARD): write the
    guard (per user, in the temporary folder; replaced atomically when its text changes), point
    `RAY_SERVE_HAPROXY_BINARY_PATH` at it and `VISIONLOOP_HAPROXY_BINARY` at the binary Ray
    would have run, and give the stats and metrics ports free loopback ports unless set (two
    services on one machine do not collide). No HAProxy binary, or not Linux (the guard needs
    prctl): HAProxy is turned off (the Python proxy serves), with a warning. -> the guard's
    path, or None when turned off."""
    if not sys.platform.startswith("linux"):
        log.warning("HAProxy is only made safe on Linux: Serve's Python proxy serves instead")
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
        return None
    text = HAPROXY_GUARD.replace("{python}", sys.executable)
    # One file per guard text (i.e. per Python): two installs on one machine (two checkouts,
    # a venv and a system install) never rewrite the guard the other's HAProxy is exec'ing.
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    guard = Path(tempfile.gettempdir()) / f"visionloop-{os.getuid()}" / f"haproxy-guard-{digest}"
    real = os.environ.get(HAPROXY_REAL_BINARY)
    if not real or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") != str(guard):
        from ray.serve._private.haproxy import _resolve_haproxy_binary

        try:
            real = _resolve_haproxy_binary()
        except FileNotFoundError as exc:
            log.warning("HAProxy is not available (%s): Serve's Python proxy serves instead", exc)
            os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
            return None
    guard.parent.mkdir(mode=0o700, exist_ok=True)
    if not guard.is_file() or guard.read_text() != text:
        tmp = guard.with_name(f"{guard.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, guard)
    os.environ[HAPROXY_REAL_BINARY] = real
    os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(guard)
    chosen = os.environ.get(_CHOSEN_PORTS, "")
    if all(os.environ.get(v) is None for v in HAPROXY_PORT_VARIABLES) or \
            chosen == ",".join(os.environ.get(v, "") for v in HAPROXY_PORT_VARIABLES):
        ports = [_free_loopback_port() for _ in HAPROXY_PORT_VARIABLES]
        os.environ.update(zip(HAPROXY_PORT_VARIABLES, map(str, ports), strict=True))
        os.environ[_CHOSEN_PORTS] = ",".join(map(str, ports))
    return guard


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_home(settings: Settings) -> tuple[Settings, Path | None]:
    """Before the replicas start: an absolute home (actors may run in another directory),
    the API token generated when none is configured, leftovers of killed publishers removed,
    version 0 published on a fresh volume. -> (settings, token file or None). Raises
    `service.security.TokenFileError` first thing when the volume's token file exists but
    cannot be used (empty, unreadable, ...): the start stops, naming it."""
    settings = settings.model_copy(update={"home": Path(settings.home).resolve()})
    settings.home.mkdir(parents=True, exist_ok=True)
    _, token_file = ensure_api_token(settings.home, settings.api_token)
    registry = Registry(settings.home)
    registry.remove_stale_partials()
    if registry.ensure_v0(settings.backbone):
        log.info("published version 0 (pretrained %s ImageNet classifier)",
                 registry.manifest("v0")["backbone"])
    return settings, token_file


def build_app(settings: Settings) -> Application:
    """The application: the controller and the API replicas, as many and with as many threads
    as `service.deployments.classifier_plan` gives (the settings, else the machine)."""
    settings = classifier_plan(settings)
    controller_d: Any = ControllerDeployment  # Serve deployments (mypy sees the classes)
    ingress_d: Any = IngressDeployment
    controller = controller_d.bind(settings)
    return ingress_d.options(
        num_replicas=settings.classifier_replicas,
        ray_actor_options={"num_cpus": settings.classifier_cpus,
                           "num_gpus": settings.classifier_gpus},
        max_ongoing_requests=settings.max_in_flight + 64,  # room above our bound: overload is
    ).bind(settings, controller)                           # ours (503), not Serve's
