"""`visionloop`: the command line.

On the volume (`--home`, default `VISIONLOOP_HOME` or ./visionloop-data):
    up        start the whole service (local Ray cluster, or join RAY_ADDRESS)
    train     run one training job here, with a progress bar (shares the job lock);
              `train --resume ID` continues an interrupted job from its last checkpoint
    import    an ImageFolder tree, or `import cifar10 --subset N [--from FOLDER]`
    models    the versions on the volume; the current one marked; the promotion policy
Against a running service (`--url`, `--token`):
    predict IMAGE...   label DIR   jobs   cancel ID   activate VERSION [--no-pin]   pin   unpin

`import` and `label` end in the same function, `DatasetStore.ingest` (here and in the server).

The token the HTTP commands send, first found of: `--token`, `VISIONLOOP_API_TOKEN`,
`VISIONLOOP_API_TOKEN_FILE`; `<home>/secrets/api-token` (home: `--home`, else
`VISIONLOOP_HOME`); `./visionloop-data/secrets/api-token` (unless `--home` was given: an explicit
volume is the only one looked at). A 401 or 403 says which places were looked at, what each
held, and names `--token` and `--home`; no message ever shows a token.

Quiet by default: the libraries' own INFO lines (httpx's line per request, Ray Serve's start-up
lines, among them "Connecting to existing Serve app ... will not be applied", logged because
`serve.run` calls `serve.start` again after ours) are turned off by raising those loggers'
levels to WARNING; their warnings and errors still show. torch's ONNX exporter's UserWarnings
(on each publish) are filtered by module. `-v/--verbose` leaves all of them on. Our own loggers
follow `VISIONLOOP_LOG_LEVEL`.

Settings and flags come from the models, in one direction. Every `VISIONLOOP_*` value is read by
a model of `service.settings` (`CommonSettings` for every command, `Settings` for the service,
`ClientSettings` for the HTTP commands); a flag that names a setting (`--home`, `--host`,
`--port`, `--url`, `--token`) defaults to None and, when given, is passed to that model as an
explicit value, so the default, the environment variable and the validation live in the model
alone. The `train` flags are one per `TrainConfig` field (`--gate-...` for `GateConfig`), named,
described and typed by the field: pydantic reads each string as the field's type (a value that
is not one is argparse's one-line error naming the flag, exit 2), and `TrainConfig` validates
the given values together, with the error that the HTTP API gives (`visionloop: ...`, exit 1).

Why argparse and not pydantic-settings' own CLI (`CliApp`, `CliSubCommand`; 2.16 here): it
would keep the subcommands, `--help` and `--gpu/--no-gpu`, but a nested model becomes
`--gate.min-val-accuracy` plus a JSON `--gate` (the old `--gate-min-val-accuracy` only as an
extra alias), help texts change (`--epochs int`, `{float,null}`), values that do not parse
become multi-line validation errors instead of argparse's exit 2, the `train` overrides would
come back with every default filled in (the backbone default is `VISIONLOOP_BACKBONE`, not
TrainConfig's), and `--home`'s default from the environment would need the settings read while
the parser is built. Driving argparse from the models keeps every flag and message as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from service.security import ClientToken
from service.settings import (
    ENV_PREFIX,
    ClientSettings,
    CommonSettings,
    Settings,
    SettingsError,
    SettingsT,
    read_settings,
)
from training.config import TrainConfig
from training.errors import DomainError

# Libraries whose INFO lines are noise on every call (`_quiet_libraries`).
CHATTY_LOGGERS = ("httpx", "httpcore", "ray.serve")


class CliError(Exception):
    """A failure to report in one line and exit 1."""


def _quiet_libraries(verbose: int) -> None:
    """Raise the chatty libraries' loggers to WARNING, or with `verbose` (-v) give them no
    level of their own (they follow their parents: the root's `VISIONLOOP_LOG_LEVEL`, Ray's
    own logger). Called again after `import ray.serve`, which sets its logger's level to INFO
    when first imported."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if not verbose:
        # torch's ONNX exporter warns about constant folding on every export (each publish,
        # v0's included): a note for exporter developers, not for the user.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx\.")


# -- flags from the models -----------------------------------------------------------------------

def _read(model: type[SettingsT], **flags: object) -> SettingsT:
    """`model` from the environment, with the flags that were given (not None) winning."""
    return read_settings(model, **{k: v for k, v in flags.items() if v is not None})


def _setting_option(parser: argparse.ArgumentParser, model: type[CommonSettings], name: str,
                    flag: str | None = None, otherwise: str | None = None) -> None:
    """`--name` (or `flag`) for the setting `name` of `model`, typed and described by the
    field; None unless given, so `_read` falls back to the environment, then the field's
    default (or what `otherwise` says)."""
    field = model.model_fields[name]
    flag = flag or "--" + name.replace("_", "-")
    fallback = otherwise or str(field.get_default())
    parser.add_argument(flag, dest=name, metavar=flag[2:].replace("-", "_").upper(),
                        type=_parse_as(field.annotation), default=None,
                        help=f"{field.description} (default: ${ENV_PREFIX}{name.upper()} or "
                             f"{fallback})")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
        else None


def _parse_as(annotation: Any) -> Callable[[str], Any]:
    """An argparse `type`: the string read by pydantic as `annotation`, without the field's
    constraints, which the model checks. Its ValueError becomes argparse's
    `argument --flag: invalid <type> value: 'text'`."""
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_strings(text)
        except ValidationError:
            raise ValueError(text) from None

    kinds = [a for a in typing.get_args(annotation) if a is not types.NoneType] or [annotation]
    parse.__name__ = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    return parse


def _model_options(parser: argparse.ArgumentParser, model: type[BaseModel],
                   prefix: str = "") -> None:
    """One flag per field of `model`, `--<prefix><field>` in kebab case (a nested model's
    fields: `--<field>-<subfield>`), described and typed by the field. Every flag defaults to
    None, so that only the flags given become values (`_model_values`) and the model applies
    its own defaults."""
    for name, field in model.model_fields.items():
        dest = prefix + name
        nested = _submodel(field.annotation)
        if nested is not None:
            _model_options(parser, nested, dest + "_")
            continue
        flag = "--" + dest.replace("_", "-")
        helptext = (field.description or "") + \
            f" (default: {field.get_default(call_default_factory=True)})"
        if typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, dest=dest, choices=typing.get_args(field.annotation),
                                default=None, help=helptext)
        elif field.annotation is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=dest, type=_parse_as(field.annotation), default=None,
                                help=helptext)


def _model_values(args: argparse.Namespace, model: type[BaseModel],
                  prefix: str = "") -> dict[str, Any]:
    """The values of `_model_options`' flags that were given, nested as `model` nests."""
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        nested = _submodel(field.annotation)
        value = _model_values(args, nested, prefix + name + "_") if nested is not None \
            else getattr(args, prefix + name, None)
        if value is not None and value != {}:
            values[name] = value
    return values


# -- up ------------------------------------------------------------------------------------------

def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join RAY_ADDRESS when set (its token from RAY_AUTH_TOKEN), else start a local cluster.
    `quiet` (the one-shot commands without -v: train, predict-dir): Ray's own start-up lines
    and its C++ warnings (e.g. about actor restarts in Ray Data's pool) are not printed; errors
    still are."""
    import ray

    from service.app import serve_environment

    if ray.is_initialized():
        return
    serve_environment()
    level = logging.INFO
    if quiet:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
        level = logging.ERROR
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=level)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=level)


# Set in the environment of the child that `visionloop up` runs the service in (`_supervise`).
UP_CHILD = "VISIONLOOP_UP_CHILD"


def cmd_up(args: argparse.Namespace) -> int:
    if os.environ.get(UP_CHILD) != "1":
        # bad settings, or a port another service holds: said here, in one line
        checked = _read(Settings, home=args.home, host=args.host, port=args.port)
        _check_port_free(checked.host, checked.port)
        return _supervise(args)
    import ray.serve  # noqa: F401  (first: importing it sets its logger to INFO, lowered below)

    from service.app import APP_NAME, build_app, prepare_home

    _quiet_libraries(args.verbose)  # again: importing ray.serve set its logger to INFO
    settings, token_file = prepare_home(
        _read(Settings, home=args.home, host=args.host, port=args.port))
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    # HAProxy is the front end of a local cluster unless the user says otherwise: with a no-op
    # handler it answers 11x the requests/s of Serve's Python proxy here (README, Performance).
    # Its start is checked through the service port, and a start that fails falls back to the
    # Python proxy (`_start_serve`), so a machine where HAProxy cannot start still gets a
    # service.
    haproxy_ours = (not os.environ.get("RAY_ADDRESS")
                    and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ)
    if haproxy_ours:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"

    def start() -> None:
        init_ray(settings.ray_num_cpus)
        # After ray.init, which installs its own fatal-signal handler for SIGTERM (abort + core).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        _start_serve(settings, build_app, APP_NAME)

    try:
        start()
    except Exception as exc:
        if not (haproxy_ours and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"):
            raise
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        logging.getLogger(__name__).warning(
            "Serve's HAProxy front end did not start (%s); starting again with Serve's Python "
            "proxy (slower; RAY_SERVE_ENABLE_HA_PROXY=0 skips the attempt)",
            lines[-1] if lines else type(exc).__name__)
        stop_service()
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
        start()
    url = f"http://{settings.host}:{settings.port}"
    print(f"visionloop is up at {url}  (API docs: {url}/docs)", flush=True)
    if token_file is not None:
        print(f"API token: in {token_file} (send 'Authorization: Bearer <token>')", flush=True)
    else:
        print("API token: from VISIONLOOP_API_TOKEN", flush=True)
    stop.wait()
    print("stopping...", flush=True)
    started = time.monotonic()
    stop_service()
    print(f"stopped ({time.monotonic() - started:.1f} s)", flush=True)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """CliError when nothing could listen on host:port now (another `visionloop up`, or any
    other server, holds it). Without this, Serve finds out after the cluster has started: the
    front end fails to bind, and the log ends in tracebacks. SO_REUSEADDR, as servers set it, so
    a port left in TIME_WAIT by a service that just stopped is not taken for a busy one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CliError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} (another `visionloop "
                f"up` or another server has it?); choose a port with --port or "
                f"VISIONLOOP_PORT") from None


# How long `visionloop up` waits for its front end to answer /healthz after `serve.run`.
FRONT_END_READY_S = 60.0


def _start_serve(settings: Settings, build_app: Callable[[Settings], Any], name: str) -> None:
    """serve.start + serve.run, then wait until the service port answers GET /healthz (Serve
    reports an app running before its front end routes to it; a HAProxy that failed to take
    over after a reload never does): RuntimeError after FRONT_END_READY_S."""
    import httpx
    from ray import serve

    # Only the head publishes the API port (compose, KubeRay): proxies on worker nodes would
    # serve nobody and keep those nodes from draining.
    serve.start(proxy_location="HeadOnly",
                http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=name, route_prefix="/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}/healthz"
    deadline = time.monotonic() + FRONT_END_READY_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url, timeout=5)
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {FRONT_END_READY_S:.0f} s ({last})")


def _supervise(args: argparse.Namespace) -> int:
    """Run the service (`visionloop up` itself, with UP_CHILD set) in a child and wait for it;
    -> its exit status (128 + N when signal N ended it).

    Why a child: Ray's local cluster (GCS, raylet, agents) is started by the process that calls
    `ray.init` and stays in its process group. A signal to that group (Ctrl-C in a terminal,
    `kill -- -PGID`) would reach the raylet and the GCS together with the driver, and the
    driver's stop would then talk to a cluster that is already going away (hangs, tracebacks,
    HAProxy left orphaned). The child runs in a session of its own, so only this process gets
    such signals; SIGTERM, SIGINT and SIGHUP are passed on to the child as SIGTERM, which stops
    everything in order (`stop_service`). And the child is tied to this process (prctl
    PR_SET_PDEATHSIG): a SIGKILL of `visionloop up` kills the child, Ray's processes go with it
    (Ray ties them to the child), and HAProxy with them (`service.app.guard_haproxy`)."""
    import subprocess

    argv = [sys.executable, "-m", "service.cli", "up"]
    for flag, value in (("--home", args.home), ("--host", args.host), ("--port", args.port)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["-v"] * args.verbose
    parent = os.getpid()

    def die_with_parent() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent is already gone
            os._exit(1)

    child = subprocess.Popen(argv, env={**os.environ, UP_CHILD: "1"}, start_new_session=True,
                             preexec_fn=die_with_parent if sys.platform.startswith("linux")
                             else None)

    def forward(*_: Any) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = child.wait()
    return 128 - status if status < 0 else status


# How long `stop_service` lets Serve stop its replicas and proxies. A replica's own stop is the
# longest part: with HAProxy it first stays up RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
# (3 s here, `service.app.SERVE_ENVIRONMENT`) for the front end to stop routing to it, then
# finishes its requests in flight; replicas stop in parallel. Past this bound the controller is
# killed and Ray's own shutdown ends the rest.
SERVE_STOP_TIMEOUT_S = 15.0


def stop_service(timeout_s: float = SERVE_STOP_TIMEOUT_S) -> bool:
    """Stop Serve (`stop_serve`), then this process's Ray: bounded and quiet. -> whether Serve
    stopped on its own within `timeout_s`."""
    import ray

    stopped = stop_serve(timeout_s)
    ray.shutdown()
    return stopped


def stop_serve(timeout_s: float = SERVE_STOP_TIMEOUT_S) -> bool:
    """Stop Serve and wait until its controller is gone, leaving Ray up (a later `serve.start`
    starts a fresh controller). -> whether Serve stopped on its own within `timeout_s`.

    Not `serve.shutdown()`: in Ray 2.60 it calls the controller's `graceful_shutdown` and waits
    on it until the controller kills itself; that call can never return (the controller's
    actor is created with infinite task retries), so every stop printed "(raylet) Task
    ServeController.graceful_shutdown failed. There are infinite retries remaining ...". Here
    the controller is only told to shut down (`graceful_shutdown(wait=False)`, which returns at
    once), and its name is polled until it is gone, i.e. until the controller has stopped every
    replica and proxy and then itself. Past `timeout_s` it is killed (a local cluster goes with
    `ray.shutdown()` anyway; on a joined cluster `ray stop` follows: docker/visionloop-node.sh)."""
    import ray
    from ray.serve import context
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    def controller() -> Any:
        try:
            return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # no such actor: Serve is down
            return None

    stopped = True
    client = context._global_client
    if client is not None:
        client.shutdown_cached_handles()
    handle = controller() if ray.is_initialized() else None
    if handle is not None:
        deadline = time.monotonic() + timeout_s
        try:
            ray.get(handle.graceful_shutdown.remote(False), timeout=timeout_s)
            while controller() is not None and time.monotonic() < deadline:
                time.sleep(0.2)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        if controller() is not None:
            stopped = False
            logging.getLogger(__name__).warning(
                "Serve did not stop within %.0f s; stopping it by force", timeout_s)
            ray.kill(handle, no_restart=True)
    if client is not None:
        client._shutdown = True
    context._set_global_client(None)
    return stopped


# -- train ---------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from service.controller import InvalidTrainRequest, train_config
    from training.dataset import DatasetStore, DatasetTooSmall
    from training.jobs import JobRunning, JobStore
    from training.pipeline import prepare_data, run_job

    settings = _read(Settings, home=args.home)
    home = Path(settings.home).resolve()
    if args.resume is not None:
        return _resume(args, settings, home)
    try:
        cfg = train_config(_model_values(args, TrainConfig), settings.train_defaults())
        prepare_data(DatasetStore(home, settings.max_pixels))
        if JobStore(home).is_locked():
            raise JobStore(home).job_running_error()  # names the job and how to cancel it
    except (InvalidTrainRequest, DatasetTooSmall, JobRunning) as exc:
        raise CliError(str(exc)) from None

    def start(on_started: Callable[[str], None]) -> dict[str, Any]:
        return run_job(home, cfg, source="cli", keep_versions=settings.keep_versions,
                       on_started=on_started,
                       pending_timeout_s=settings.train_pending_timeout_s)

    return _run_training(home, settings, cfg, start, "")


def _resume(args: argparse.Namespace, settings: Settings, home: Path) -> int:
    """`train --resume ID`: job ID again under its id, with its own configuration and dataset
    snapshot, from its last checkpoint (`training.pipeline.resume_job`), here with a progress
    bar. A training flag beside --resume is refused: the job's configuration is what its
    checkpoint was made with."""
    from training.pipeline import plan_resume, resume_job

    given = _model_values(args, TrainConfig)
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
        raise CliError(f"--resume continues job {args.resume} with its own configuration; "
                       f"drop {flags} (or start a new job without --resume)")
    plan = plan_resume(home, args.resume)  # JobNotFound / JobRunning / JobNotResumable, early
    job_id = args.resume

    def start(on_started: Callable[[str], None]) -> dict[str, Any]:
        return resume_job(home, job_id, source="cli", keep_versions=settings.keep_versions,
                          on_started=on_started,
                          pending_timeout_s=settings.train_pending_timeout_s)

    where = ("from the start" if plan.from_epoch is None
             else f"from its checkpoint of epoch {plan.from_epoch}")
    return _run_training(home, settings, plan.cfg, start, f" resumed {where}")


def _run_training(home: Path, settings: Settings, cfg: TrainConfig,
                  start: Callable[[Callable[[str], None]], dict[str, Any]], how: str) -> int:
    """Ray up (`init_ray`), the cluster checked for `cfg`, then `start(on_started)` (a job to
    its end: `run_job` or `resume_job`) in a thread while a progress bar follows its record.
    -> 0 when the job succeeded; a failed or cancelled job is a CliError naming why."""
    from tqdm import tqdm

    from training.jobs import JobStore
    from training.resources import InsufficientResources, check_cluster

    jobs = JobStore(home)
    init_ray(settings.ray_num_cpus, quiet=not logging.getLogger().isEnabledFor(logging.INFO))
    try:
        check_cluster(cfg)  # what this Ray cluster can hold, before a record is written
    except InsufficientResources as exc:
        raise CliError(str(exc)) from None
    started = threading.Event()
    job: dict[str, Any] = {}

    def on_started(job_id: str) -> None:
        job["id"] = job_id
        started.set()

    def target() -> None:
        try:
            job["record"] = start(on_started)
        except BaseException as exc:
            job["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=target, name="train", daemon=True)
    thread.start()
    started.wait()
    if "id" not in job:
        raise CliError(str(job.get("error") or "the job did not start"))
    print(f"training job {job['id']}{how}: {cfg.backbone}, {cfg.strategy}, {cfg.epochs} "
          f"epochs, {cfg.workers} worker(s){', GPU' if cfg.gpu else ''}", flush=True)
    with tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {postfix}") as bar:
        while thread.is_alive():
            thread.join(0.5)
            _show_progress(bar, jobs.view(job["id"]))
        record = job.get("record") or jobs.get(job["id"])
        _show_progress(bar, record)
    if "error" in job:
        raise CliError(str(job["error"]))
    status = record["status"]
    if status == "succeeded":
        print(f"{record['version']}: {'promoted' if record['promoted'] else 'not promoted'} "
              f"({record['reason']})")
        return 0
    raise CliError(f"job {record['job_id']} {status}: {record.get('error') or record['reason']}")


def _status_with_stage(record: dict[str, Any]) -> str:
    """"running: computing features": a job that has not ended shows the stage it is in (set
    from its creation: queued, preparing data, starting workers, computing features, training,
    evaluating, publishing); an ended one its status."""
    status = str(record.get("status", ""))
    stage = record.get("stage")
    from training.jobs import ACTIVE

    return f"{status}: {stage}" if stage and status in ACTIVE and stage != status else status


def _show_progress(bar: Any, record: dict[str, Any]) -> None:
    p = record.get("progress") or {}
    bar.n = round(100 * float(p.get("fraction") or 0.0))
    last = (record.get("metrics") or [{}])[-1]
    parts = [f"epoch {p.get('epoch', 0)}/{p.get('epochs', 0)}"]
    if "train_loss" in last:
        parts.append(f"loss {last['train_loss']:.3f}")
    if "val_accuracy" in last:
        parts.append(f"val acc {last['val_accuracy']:.3f}")
    if p.get("eta_s") is not None:
        parts.append(f"ETA {int(p['eta_s'])}s")
    bar.set_description(_status_with_stage(record))
    bar.set_postfix_str(", ".join(parts))


# -- import, models ------------------------------------------------------------------------------

SPLIT_FOLDERS = ("train", "val", "test")
NOT_IN_A_LABEL_FOLDER = "not in a label folder (DIR/<label>/<image>)"


def check_imagefolder(root: Path, command: str) -> list[Path]:
    """Refuse, before anything is read or sent, a DIR that is not an ImageFolder tree
    (`DIR/<label>/<image>`, or `DIR/train|val|test/<label>/<image>`, as `iter_imagefolder`
    walks it): not a directory, images directly in DIR (a flat folder), or no file in any label
    folder. The message shows the expected layout with an example made of DIR's own names.
    -> the files directly in DIR beside label folders, which are skipped (and reported)."""
    def example(name: str = "1.jpg", other: str = "2.jpg") -> str:
        return (f"{command} takes one folder per label, named after it: {root}/<label>/<image>, "
                f"e.g. {root}/cat/{name} and {root}/dog/{other}")

    if root.is_file():
        raise CliError(f"{root} is a file; {command} takes a folder with one folder per label, "
                       f"e.g. photos/cat/1.jpg and photos/dog/2.jpg (`visionloop {command} "
                       "photos`)" + ("; to classify images use `visionloop predict FILE...`"
                                     if command == "label" else ""))
    if not root.is_dir():
        raise CliError(f"{root} is not a directory; {example()}")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    loose = [p for p in entries if p.is_file()]
    subs = [p for p in entries if p.is_dir()]
    if subs and {p.name for p in subs} <= set(SPLIT_FOLDERS):
        subs = sorted(d for split in subs for d in split.iterdir() if d.is_dir())
    has_files = any(f.is_file() and not f.name.startswith(".")
                    for d in subs for f in d.rglob("*"))
    if not has_files and loose:
        names = [p.name for p in loose[:2]] + ["2.jpg"]
        shown = ", ".join(p.name for p in loose[:3]) + (", ..." if len(loose) > 3 else "")
        raise CliError(f"{root} holds {len(loose)} file(s) directly ({shown}) and no label "
                       f"folder; {example(names[0], names[1])} (move each image into the "
                       "folder of its label)")
    if not has_files:
        raise CliError(f"{root} has no images in label folders"
                       f"{' (its folders are empty)' if subs else ' (it is empty)'}; "
                       f"{example()}")
    return loose


def cmd_import(args: argparse.Namespace) -> int:
    from training.dataset import (
        DatasetStore,
        download_cifar10,
        imagefolder_conflicts,
        iter_cifar10,
        iter_imagefolder,
    )

    if args.source.lower().endswith((".csv", ".tar", ".tar.gz", ".tgz")):
        return _import_file(args)
    settings = _read(Settings, home=args.home)
    home = Path(settings.home).resolve()
    loose = [] if args.source == "cifar10" else check_imagefolder(Path(args.source), "import")
    store = DatasetStore(home, settings.max_pixels)
    conflicts: list[tuple[str, str]] = []
    if args.source == "cifar10":
        folder = Path(args.from_folder) if args.from_folder else None
        if folder is None:
            try:
                folder = download_cifar10(home / "cache" / "cifar10")
            except Exception as exc:
                raise CliError(f"could not download CIFAR-10 ({type(exc).__name__}: {exc}); "
                               "pass --from FOLDER with an extracted cifar-10-batches-py") from None
        files: Iterator[tuple[str, str, bytes]] = iter_cifar10(folder, args.subset)
        source = "import:cifar10"
    else:
        conflicts = imagefolder_conflicts(Path(args.source))
        files = iter_imagefolder(Path(args.source), exclude={p for p, _ in conflicts})
        source = "import"
    try:
        report = store.ingest_many(files, source)
    except (OSError, pickle.UnpicklingError, KeyError) as exc:
        raise CliError(f"cannot read {args.source}: {type(exc).__name__}: {exc}") from None
    report.skipped[:0] = [(str(p), NOT_IN_A_LABEL_FOLDER) for p in loose] + conflicts
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(report.summary())
    return 0


def cmd_predict_dir(args: argparse.Namespace) -> int:
    from training.batch import predict_dir

    settings = _read(Settings, home=args.home)
    init_ray(settings.ray_num_cpus, quiet=not args.verbose)
    report = predict_dir(Path(settings.home).resolve(), Path(args.dir), Path(args.out),
                         version=args.version, workers=args.workers, gpu=args.gpu,
                         batch_size=args.batch, top_k=args.top_k, threads=args.threads,
                         max_pixels=settings.max_pixels)
    print(report.summary())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.dataset import DatasetStore
    from training.exchange import export_dataset

    settings = _read(Settings, home=args.home)
    store = DatasetStore(Path(settings.home).resolve(), settings.max_pixels)
    count = export_dataset(store, Path(args.out))
    print(f"exported {count} images to {args.out}")
    return 0


def _import_file(args: argparse.Namespace) -> int:
    """`import X.csv` (path,label rows; paths relative to the CSV) or `import X.tar` (an
    export of this tool, or an ImageFolder tree as a tar)."""
    from training.dataset import DatasetStore
    from training.exchange import import_archive, import_csv, summarize

    settings = _read(Settings, home=args.home)
    store = DatasetStore(Path(settings.home).resolve(), settings.max_pixels)
    path = Path(args.source)
    if not path.is_file():
        raise CliError(f"{path} is not a file")
    results = (import_csv(store, path) if path.suffix.lower() == ".csv"
               else import_archive(store, path))
    for r in results:
        if r.error:
            print(f"skipped {r.error['message']}", file=sys.stderr)
    counts = summarize(results)
    print(f"added {counts['added']}, duplicate {counts['duplicate']}, relabelled "
          f"{counts['relabelled']}, skipped {counts['failed']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from training.registry import InvalidVersion, Registry

    registry = Registry(Path(_read(CommonSettings, home=args.home).home).resolve())
    current = registry.current()
    rows = [("", "VERSION", "BACKBONE", "CLASSES", "VAL ACC", "TEST ACC", "PROMOTED", "CREATED")]
    for v in registry.versions():
        try:
            m = registry.manifest(v)
        except InvalidVersion:
            rows.append(("", v, "?", "?", "?", "?", "?", "unreadable manifest"))
            continue
        acc = (m.get("metrics") or {}).get("best_val_accuracy")
        test = ((m.get("metrics") or {}).get("test") or {}).get("accuracy")
        promoted = (m.get("promotion") or {}).get("promoted")
        classes = m.get("classes") or []
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("created_at") or 0))
        rows.append(("*" if v == current else "", v, str(m.get("backbone")),
                     str(len(classes)) if len(classes) > 8 else ",".join(classes),
                     "-" if acc is None else f"{acc:.3f}", "-" if test is None else f"{test:.3f}",
                     "-" if promoted is None else ("yes" if promoted else "no"), created))
    if len(rows) == 1:
        print("no model versions yet (`visionloop up` or `visionloop train` publishes v0)")
        return 0
    _print_table(rows)
    print(policy_line(registry.policy()))
    print(trial_line(registry.trial()))
    return 0


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def trial_line(trial: dict[str, Any] | None) -> str:
    """The version on trial (`Registry.trial()`, or the API's `trial`) in one line, with its live
    figures when the API gave them."""
    if not trial:
        return "trial: none (`visionloop trial VERSION --mode shadow|canary --share 0.1`)"
    what = ("also classifies, answering none of," if trial.get("mode") == "shadow"
            else "answers")
    line = (f"trial: {trial.get('version')} in {trial.get('mode')} mode {what} "
            f"{float(trial.get('share') or 0):.0%} of the requests that name no version")
    if trial.get("answers") is not None:
        agreement = trial.get("agreement")
        line += f"; {trial['answers']} answers"
        if agreement is not None:
            line += f", agreement with the current version {float(agreement):.3f}"
    return line + " (`visionloop trial --end` ends it)"


def policy_line(policy: dict[str, Any]) -> str:
    """The promotion policy (`Registry.policy()`, or the API's `policy`) in one line, with the
    command that changes it."""
    if policy.get("mode") == "pinned":
        when = (time.strftime(" since %Y-%m-%d %H:%M", time.localtime(policy["changed_at"]))
                if policy.get("changed_at") else "")
        by = f" by {policy['by']}" if policy.get("by") else ""
        return (f"policy: pinned to {policy.get('version')}{when}{by}: jobs publish new "
                "versions but do not promote them (`visionloop unpin` lets them)")
    return ("policy: automatic: a job whose version passes the gate becomes current "
            "(`visionloop pin` keeps the current one)")


# -- HTTP commands -------------------------------------------------------------------------------

DEFAULT_HOME = Path(str(CommonSettings.model_fields["home"].default))
# Answers about one file of a batch (its bytes, size, format): the others still count.
FILE_ERRORS = (400, 413, 415)


def find_token(settings: ClientSettings, flag: bool, home_flag: bool) -> ClientToken:
    """The token to send (`security.find_client_token`): `--token` (`flag`: it was given),
    else `VISIONLOOP_API_TOKEN`, else `VISIONLOOP_API_TOKEN_FILE`'s content (all three arrive
    as `settings.api_token`); else `<home>/secrets/api-token`, then
    `./visionloop-data/secrets/api-token` unless `--home` was given (`home_flag`)."""
    from service.security import find_client_token

    if settings.api_token is None:
        source = f"--token, {ENV_PREFIX}API_TOKEN and {ENV_PREFIX}API_TOKEN_FILE"
    elif flag:
        source = "--token"
    elif (os.environ.get(f"{ENV_PREFIX}API_TOKEN") or "").strip():
        source = f"{ENV_PREFIX}API_TOKEN"
    else:
        source = f"{ENV_PREFIX}API_TOKEN_FILE ({settings.api_token_file})"
    volumes = [settings.home] if home_flag else [settings.home, DEFAULT_HOME]
    return find_client_token(settings.api_token, source, volumes)


class ServiceClient:
    """The running service over HTTP (`http`: an httpx client sending the token `find_token`
    chose). `request` answers the parsed JSON body; `check` turns an error answer into
    CliError "HTTP <status>: <message>", a 401/403 with the token's `hint`."""

    def __init__(self, args: argparse.Namespace):
        import httpx

        settings = _read(ClientSettings, home=args.home, url=args.url, api_token=args.api_token)
        self.token = find_token(settings, args.api_token is not None, args.home is not None)
        headers = {"Authorization": f"Bearer {self.token.token}"} if self.token.token else {}
        self.http = httpx.Client(base_url=settings.url, headers=headers, timeout=args.timeout)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.check(self.http.request(method, path, **kwargs))

    def check(self, response: Any) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            err = body.get("error") if isinstance(body, dict) else None
            message = err["message"] if err else response.text[:500]
            if response.status_code in (401, 403):
                message = f"{message.rstrip('.')}; {self.token.hint()}"
            raise CliError(f"HTTP {response.status_code}: {message}")
        return body


def cmd_predict(args: argparse.Namespace) -> int:
    """Every image classified that can be: the images go in batches of `--batch`; a batch
    refused because of one of its files (400, 413, 415) is sent again one file at a time, so
    each bad file gets its own reason and the others their predictions. A file that cannot be
    read is reported the same way. Predictions on stdout, in the order given; failures on
    stderr; exit 1 when any file failed. An answer about the whole call (401, 503, ...) stops
    it."""
    paths = [Path(p) for p in args.images]
    failed = 0
    shown_version: list[str] = []

    def report(path: Path, version: str | None, pred: dict[str, Any] | None, error: str) -> None:
        nonlocal failed
        if pred is None:
            failed += 1
            print(f"{path}: {error}", file=sys.stderr, flush=True)
            return
        if shown_version != [version]:
            shown_version[:] = [str(version)]
            print(f"model {version}", flush=True)
        tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in pred["top_k"])
        print(f"{path}: {pred['label']} ({pred['score']:.3f})  [{tops}]  "
              f"id {pred['prediction_id']}", flush=True)

    def classify(client: ServiceClient, batch: list[tuple[Path, bytes]]) -> None:
        response = client.http.post("/v1/predict", params={"top_k": args.top_k},
                                     files=[("files", (p.name, d)) for p, d in batch])
        if response.status_code in FILE_ERRORS and len(batch) > 1:
            for one in batch:
                classify(client, [one])
            return
        try:
            body = client.check(response)
        except CliError as exc:
            if response.status_code not in FILE_ERRORS:
                raise
            report(batch[0][0], None, None,
                   str(exc).replace(f": {batch[0][0].name}: ", ": ", 1))
            return
        for (path, _), pred in zip(batch, body["predictions"], strict=True):
            report(path, body["model_version"], pred, "")

    with ServiceClient(args) as client:
        batch: list[tuple[Path, bytes]] = []
        for path in paths:
            try:
                batch.append((path, path.read_bytes()))
            except OSError as exc:
                if batch:
                    classify(client, batch)
                    batch = []
                report(path, None, None, f"cannot read it ({exc.strerror or exc})")
                continue
            if len(batch) >= args.batch:
                classify(client, batch)
                batch = []
        if batch:
            classify(client, batch)
    if failed:
        raise CliError(f"{failed} of {len(paths)} file(s) could not be classified")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from training.dataset import imagefolder_conflicts, iter_imagefolder

    loose = check_imagefolder(Path(args.dir), "label")
    conflicts = imagefolder_conflicts(Path(args.dir))
    counts = {"added": 0, "duplicate": 0, "relabelled": 0}
    skipped: list[tuple[str, str]] = [(str(p), NOT_IN_A_LABEL_FOLDER) for p in loose] + conflicts
    batch: list[tuple[str, bytes]] = []
    batch_label: str | None = None

    def send(client: ServiceClient, label: str, files: list[tuple[str, bytes]]) -> None:
        response = client.http.post("/v1/labels", data={"label": label},
                                    files=[("files", (Path(n).name, d)) for n, d in files])
        if response.status_code in FILE_ERRORS and len(files) > 1:
            for one in files:  # find the bad file(s); the good ones still go in
                send(client, label, [one])
            return
        try:
            body = client.check(response)
        except CliError as exc:
            if response.status_code in FILE_ERRORS:
                skipped.append((files[0][0], str(exc)))
                return
            raise
        for r in body["results"]:
            counts[r["status"]] += 1

    with ServiceClient(args) as client:
        for name, label, data in iter_imagefolder(Path(args.dir),
                                                  exclude={p for p, _ in conflicts}):
            if batch and (label != batch_label or len(batch) >= args.batch):
                send(client, batch_label or label, batch)
                batch = []
            batch_label = label
            batch.append((name, data))
        if batch and batch_label:
            send(client, batch_label, batch)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(f"added {counts['added']}, duplicate {counts['duplicate']}, "
          f"relabelled {counts['relabelled']}, skipped {len(skipped)}")
    return 0


def _short(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 3] + "..."


def cmd_jobs(args: argparse.Namespace) -> int:
    """GET /v1/train as a table, newest first: a running job shows its epoch and ETA."""
    with ServiceClient(args) as client:
        body = client.request("GET", "/v1/train", params={"limit": args.limit})
    if not body["jobs"]:
        print("no training jobs yet (`visionloop train`, or POST /v1/train)")
        return 0
    rows: list[tuple[str, ...]] = [("JOB", "STATUS", "SOURCE", "STARTED", "VERSION", "PROMOTED",
                                    "REASON")]
    for j in body["jobs"]:
        status = _status_with_stage(j)
        p = j.get("progress") or {}
        if j["status"] == "running":
            status += f" {p.get('epoch', 0)}/{p.get('epochs', 0)}"
            if p.get("eta_s") is not None:
                status += f" ETA {int(p['eta_s'])}s"
        started = j.get("started_at") or j.get("created_at")
        rows.append((j["job_id"], status, str(j.get("source") or "-"),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if started
                     else "-",
                     j.get("version") or "-",
                     "-" if j.get("promoted") is None else str(j["promoted"]).lower(),
                     _short(j.get("reason") or j.get("error"), args.reason_width) or "-"))
    _print_table(rows)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """DELETE /v1/train/{id}: the job stops at its next check (before its workers start, or at
    the next step); the record turns `cancelled`. A job that had already ended is exit 1."""
    with ServiceClient(args) as client:
        record = client.request("DELETE", f"/v1/train/{args.job_id}")
    status = record["status"]
    if status in ("queued", "running"):
        print(f"job {record['job_id']}: cancel requested ({status}); it stops at its next "
              "check (`visionloop jobs` shows it cancelled)")
        return 0
    if status == "cancelled":
        print(f"job {record['job_id']}: cancelled")
        return 0
    raise CliError(f"job {record['job_id']} had already ended ({status}); nothing to cancel")


def cmd_activate(args: argparse.Namespace) -> int:
    with ServiceClient(args) as client:
        body = client.request("POST", f"/v1/models/{args.version}/activate",
                              params={"pin": str(args.pin).lower()})
    print(f"current: {body['current']} (replicas: {', '.join(map(str, body['replicas']))})")
    if body.get("policy"):
        print(policy_line(body["policy"]))
    return 0


def cmd_trial(args: argparse.Namespace) -> int:
    """`trial VERSION --mode M --share S`: PUT /v1/models/trial; `trial --end`: DELETE it;
    `trial` alone: GET it."""
    with ServiceClient(args) as client:
        if args.end:
            client.request("DELETE", "/v1/models/trial")
            print("trial ended")
            return 0
        if args.version is None:
            body = client.request("GET", "/v1/models")
            print(trial_line(body.get("trial")))
            return 0
        body = client.request("PUT", "/v1/models/trial", json={
            "version": args.version, "mode": args.mode, "share": args.share})
    print(trial_line(body))
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    """`pin` / `unpin`: PUT /v1/models/policy {"mode": "pinned" | "automatic"}."""
    with ServiceClient(args) as client:
        body = client.request("PUT", "/v1/models/policy", json={"mode": args.mode})
    print(policy_line(body))
    return 0


# -- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionloop", description="Self-hosted image classification that retrains itself.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, **kwargs)
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="also the libraries' INFO lines (each HTTP request, Ray Serve's "
                            "start-up)")
        return p

    def volume(p: argparse.ArgumentParser) -> None:
        _setting_option(p, CommonSettings, "home")

    def http(p: argparse.ArgumentParser) -> None:
        volume(p)
        _setting_option(p, ClientSettings, "url")
        _setting_option(p, ClientSettings, "api_token", flag="--token",
                        otherwise="$VISIONLOOP_API_TOKEN_FILE's content, else "
                                  "<home>/secrets/api-token, else "
                                  "./visionloop-data/secrets/api-token")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")

    p = command("up", help="start the whole service",
                description="Start Ray (local, or join RAY_ADDRESS), Serve and the API. "
                "Stops cleanly on SIGTERM/SIGINT.")
    volume(p)
    _setting_option(p, Settings, "host")
    _setting_option(p, Settings, "port")
    p.set_defaults(func=cmd_up)

    p = command("train", help="run one training job on the volume",
                description="Run one Ray Train job here with a progress bar. Fails if a "
                "job is already running on this volume. --resume ID continues a failed "
                "(interrupted) or cancelled job from its last checkpoint, with its own "
                "configuration and dataset snapshot.")
    volume(p)
    p.add_argument("--resume", metavar="JOB_ID", default=None,
                   help="resume that job (`visionloop jobs` lists them) instead of starting one")
    _model_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = command("import", help="import an ImageFolder tree, an export, a CSV or CIFAR-10",
                description="DIR: an ImageFolder tree (DIR/<label>/<image>, or "
                "DIR/train|val/<label>/<image>). X.tar: an export of `visionloop export` (same "
                "hashes, labels and splits) or an ImageFolder tree as a tar. X.csv: path,label "
                "rows, paths relative to the CSV. 'cifar10': the CIFAR-10 training images.")
    volume(p)
    p.add_argument("source", help="DIR, X.tar, X.csv, or the word cifar10")
    p.add_argument("--subset", type=int, default=None,
                   help="cifar10: at most N images per class")
    p.add_argument("--from", dest="from_folder", default=None,
                   help="cifar10: a local cifar-10-batches-py folder instead of downloading")
    p.set_defaults(func=cmd_import)

    p = command("predict-dir", help="classify every file under a folder on the Ray cluster",
                description="Batch inference with Ray Data: every file under DIR (recursively) "
                "into --out (.jsonl or .csv: path, label, score, top_k, version; a file that is "
                "not an image gets an error line). A rerun with the same --out resumes: paths "
                "already written are skipped. Joins RAY_ADDRESS, else starts a local Ray.")
    volume(p)
    p.add_argument("dir", help="the folder of images")
    p.add_argument("--out", required=True, help="preds.jsonl or preds.csv")
    p.add_argument("--version", default=None, help="v0, v1, ... (default: CURRENT)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="actors (default: every CPU of the cluster, or every GPU with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--batch", type=_positive, default=16, help="images per forward pass")
    p.add_argument("--top-k", type=_positive, default=5)
    p.add_argument("--threads", type=_positive, default=1, help="torch threads per actor")
    p.set_defaults(func=cmd_predict_dir)

    p = command("export", help="export the dataset as a tar",
                description="Write the dataset to OUT: an ImageFolder tree "
                "(visionloop-dataset/<split>/<label>/<sha256>.<ext>) and manifest.csv/.jsonl "
                "(sha256, label, split, source, path). `visionloop import OUT` reads it back.")
    volume(p)
    p.add_argument("out", help="the tar to write, e.g. dataset.tar")
    p.set_defaults(func=cmd_export)

    p = command("models", help="list model versions", description="List model versions "
                "on the volume; * marks the current one; then the promotion policy.")
    volume(p)
    p.set_defaults(func=cmd_models)

    p = command("predict", help="classify images with the running service",
                description="Classify each image; a file that cannot be classified is "
                "reported on stderr with its reason and the others are still classified "
                "(exit 1 when any failed).")
    http(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch", type=_positive, default=32, help="images per request")
    p.set_defaults(func=cmd_predict)

    p = command("label", help="upload an ImageFolder tree of labelled images",
                description="Upload DIR/<label>/<image> (one folder per label, named after "
                "it: photos/cat/1.jpg, photos/dog/2.jpg) to the running service, in batches of "
                "one label.")
    http(p)
    p.add_argument("dir")
    p.add_argument("--batch", type=_positive, default=32, help="images per request")
    p.set_defaults(func=cmd_label)

    p = command("jobs", help="list training jobs (newest first)",
                description="Training jobs with their status, who started them, when, the "
                "version each published and whether it was promoted, and why.")
    http(p)
    p.add_argument("--limit", type=_positive, default=20, help="at most this many jobs")
    p.add_argument("--reason-width", type=_positive, default=60,
                   help="characters of each reason shown")
    p.set_defaults(func=cmd_jobs)

    p = command("cancel", help="cancel a training job",
                description="Ask a queued or running job to stop (DELETE /v1/train/{id}).")
    http(p)
    p.add_argument("job_id", help="the job's id (`visionloop jobs`)")
    p.set_defaults(func=cmd_cancel)

    p = command("activate", help="serve another model version (rollback or pin)",
                description="Make VERSION current on every replica. By default it is pinned: "
                "jobs keep publishing versions but do not promote them until `visionloop "
                "unpin`; --no-pin leaves the policy automatic (the next job that passes the "
                "gate against VERSION replaces it).")
    http(p)
    p.add_argument("version", help="v0, v1, ...")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin VERSION (default: pin)")
    p.set_defaults(func=cmd_activate)

    p = command("pin", help="keep the current version: jobs publish but do not promote",
                description="Set the promotion policy to pinned (on the current version).")
    http(p)
    p.set_defaults(func=cmd_policy, mode="pinned")

    p = command("trial", help="try a version on live traffic (shadow or canary)",
                description="VERSION --mode shadow: it also classifies --share of the requests "
                "and answers none (agreement and feedback accuracy are tracked); --mode canary: "
                "it answers --share of the requests that name no version. Without VERSION: show "
                "the trial; --end: end it. `visionloop activate VERSION` promotes it.")
    http(p)
    p.add_argument("version", nargs="?", default=None, help="v1, v2, ...")
    p.add_argument("--mode", choices=["shadow", "canary"], default="shadow")
    p.add_argument("--share", type=float, default=0.1, help="0 < share <= 1 (default 0.1)")
    p.add_argument("--end", action="store_true", help="end the trial")
    p.set_defaults(func=cmd_trial)

    p = command("unpin", help="let jobs that pass the gate promote again",
                description="Set the promotion policy to automatic.")
    http(p)
    p.set_defaults(func=cmd_policy, mode="automatic")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        level = logging.getLevelName(_read(CommonSettings, home=args.home).log_level)
        if args.func is not cmd_up and not args.verbose:
            # A one-shot command shows its own output (a progress bar, a table), warnings and
            # errors; the service (`up`) logs at VISIONLOOP_LOG_LEVEL.
            level = max(level, logging.WARNING)
        logging.basicConfig(level=level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _quiet_libraries(args.verbose)
        return int(args.func(args))
    except (CliError, SettingsError, DomainError) as exc:
        print(f"visionloop: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `visionloop models | head`: the reader left; nothing to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return 0
    except Exception as exc:
        import httpx

        if not isinstance(exc, httpx.TransportError):
            raise
        print(f"visionloop: cannot reach the service{_where(exc)}: {exc or type(exc).__name__} "
              "(is it running? --url or VISIONLOOP_URL names another address)", file=sys.stderr)
        return 1


def _where(exc: Exception) -> str:
    """' at <url>' of the request a transport error belongs to, when it has one."""
    try:
        url = exc.request.url  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return ""
    return f" at {url.scheme}://{url.netloc.decode()}"


if __name__ == "__main__":
    sys.exit(main())
