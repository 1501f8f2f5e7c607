"""`visionloop`: the command line.

On the volume (`--home`, default `VISIONLOOP_HOME` or ./visionloop-data):
    up        start the whole service (local Ray cluster, or join RAY_ADDRESS)
    train     run one training job here, with a progress bar (shares the job lock)
    import    an ImageFolder tree, or `import cifar10 --subset N [--from FOLDER]`
    models    the versions on the volume; the current one marked
Against a running service (`--url`, `--token`):
    predict IMAGE...   label DIR   activate VERSION

`import` and `label` end in the same function, `DatasetStore.ingest` (here and in the server).

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
import logging
import os
import pickle
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from service.security import TokenFileError
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


class CliError(Exception):
    """A failure to report in one line and exit 1."""


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

def init_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS when set (its token from RAY_AUTH_TOKEN), else start a local cluster."""
    import ray

    from service.app import serve_environment

    if ray.is_initialized():
        return
    serve_environment()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def cmd_up(args: argparse.Namespace) -> int:
    from ray import serve

    from service.app import APP_NAME, build_app, prepare_home

    settings, token_file = prepare_home(
        _read(Settings, home=args.home, host=args.host, port=args.port))
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    init_ray(settings.ray_num_cpus)
    # After ray.init, which installs its own fatal-signal handler for SIGTERM (abort + core).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # Only the head publishes the API port (compose, KubeRay): proxies on worker nodes would
    # serve nobody and keep those nodes from draining.
    serve.start(proxy_location="HeadOnly",
                http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    url = f"http://{settings.host}:{settings.port}"
    print(f"visionloop is up at {url}  (API docs: {url}/docs)", flush=True)
    if token_file is not None:
        print(f"API token: in {token_file} (send 'Authorization: Bearer <token>')", flush=True)
    else:
        print("API token: from VISIONLOOP_API_TOKEN", flush=True)
    stop.wait()
    print("stopping...", flush=True)
    import ray

    serve.shutdown()
    ray.shutdown()
    print("stopped", flush=True)
    return 0


# -- train ---------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.controller import InvalidTrainRequest, train_config
    from training.dataset import DatasetStore, DatasetTooSmall
    from training.jobs import JobRunning, JobStore
    from training.pipeline import prepare_data, run_job
    from training.resources import InsufficientResources, check_cluster

    settings = _read(Settings, home=args.home)
    home = Path(settings.home).resolve()
    try:
        cfg = train_config(_model_values(args, TrainConfig), settings.train_defaults())
        prepare_data(DatasetStore(home, settings.max_pixels))
        jobs = JobStore(home)
        if jobs.is_locked():
            raise JobRunning("a training job is already running on this volume")
    except (InvalidTrainRequest, DatasetTooSmall, JobRunning) as exc:
        raise CliError(str(exc)) from None
    init_ray(settings.ray_num_cpus)
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
            job["record"] = run_job(home, cfg, source="cli",
                                    keep_versions=settings.keep_versions, on_started=on_started,
                                    pending_timeout_s=settings.train_pending_timeout_s)
        except BaseException as exc:
            job["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=target, name="train", daemon=True)
    thread.start()
    started.wait()
    if "error" in job:
        raise CliError(str(job["error"]))
    print(f"training job {job['id']}: {cfg.backbone}, {cfg.strategy}, {cfg.epochs} epochs, "
          f"{cfg.workers} worker(s){', GPU' if cfg.gpu else ''}", flush=True)
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
    bar.set_description(record.get("status", ""))
    bar.set_postfix_str(", ".join(parts))


# -- import, models ------------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> int:
    from training.dataset import DatasetStore, download_cifar10, iter_cifar10, iter_imagefolder

    settings = _read(Settings, home=args.home)
    home = Path(settings.home).resolve()
    store = DatasetStore(home, settings.max_pixels)
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
        if not Path(args.source).is_dir():
            raise CliError(f"{args.source} is not a directory (an ImageFolder tree: "
                           "DIR/<label>/<image>)")
        files = iter_imagefolder(Path(args.source))
        source = "import"
    try:
        report = store.ingest_many(files, source)
    except (OSError, pickle.UnpicklingError, KeyError) as exc:
        raise CliError(f"cannot read {args.source}: {type(exc).__name__}: {exc}") from None
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(report.summary())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from training.registry import InvalidVersion, Registry

    registry = Registry(Path(_read(CommonSettings, home=args.home).home).resolve())
    current = registry.current()
    rows = [("", "VERSION", "BACKBONE", "CLASSES", "VAL ACC", "PROMOTED", "CREATED")]
    for v in registry.versions():
        try:
            m = registry.manifest(v)
        except InvalidVersion:
            rows.append(("", v, "?", "?", "?", "?", "unreadable manifest"))
            continue
        acc = (m.get("metrics") or {}).get("best_val_accuracy")
        classes = m.get("classes") or []
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("created_at") or 0))
        rows.append(("*" if v == current else "", v, str(m.get("backbone")),
                     str(len(classes)) if len(classes) > 8 else ",".join(classes),
                     "-" if acc is None else f"{acc:.3f}",
                     str((m.get("promotion") or {}).get("promoted")), created))
    if len(rows) == 1:
        print("no model versions yet (`visionloop up` or `visionloop train` publishes v0)")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


# -- HTTP commands -------------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> Any:
    import httpx

    from service.security import read_token_file

    settings = _read(ClientSettings, home=args.home, url=args.url, api_token=args.api_token)
    token = (settings.api_token.get_secret_value() if settings.api_token
             else read_token_file(settings.home))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=settings.url, headers=headers, timeout=args.timeout)


def _check(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        err = body.get("error") if isinstance(body, dict) else None
        message = err["message"] if err else response.text[:500]
        raise CliError(f"HTTP {response.status_code}: {message}")
    return body


def cmd_predict(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise CliError(f"{p}: no such file")
    with _client(args) as client:
        body = _check(client.post("/v1/predict", params={"top_k": args.top_k},
                                  files=[("files", (p.name, p.read_bytes())) for p in paths]))
    print(f"model {body['model_version']}")
    for pred in body["predictions"]:
        tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in pred["top_k"])
        print(f"{pred['filename']}: {pred['label']} ({pred['score']:.3f})  [{tops}]  "
              f"id {pred['prediction_id']}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from training.dataset import iter_imagefolder

    if not Path(args.dir).is_dir():
        raise CliError(f"{args.dir} is not a directory (an ImageFolder tree: DIR/<label>/<image>)")
    counts = {"added": 0, "duplicate": 0, "relabelled": 0}
    skipped: list[tuple[str, str]] = []
    batch: list[tuple[str, bytes]] = []
    batch_label: str | None = None

    def send(client: Any, label: str, files: list[tuple[str, bytes]]) -> None:
        response = client.post("/v1/labels", data={"label": label},
                               files=[("files", (Path(n).name, d)) for n, d in files])
        if response.status_code in (400, 413, 415) and len(files) > 1:
            for one in files:  # find the bad file(s); the good ones still go in
                send(client, label, [one])
            return
        try:
            body = _check(response)
        except CliError as exc:
            if response.status_code in (400, 413, 415):
                skipped.append((files[0][0], str(exc)))
                return
            raise
        for r in body["results"]:
            counts[r["status"]] += 1

    with _client(args) as client:
        for name, label, data in iter_imagefolder(Path(args.dir)):
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


def cmd_activate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = _check(client.post(f"/v1/models/{args.version}/activate"))
    print(f"current: {body['current']} (replicas: {', '.join(map(str, body['replicas']))})")
    return 0


# -- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionloop", description="Self-hosted image classification that retrains itself.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def volume(p: argparse.ArgumentParser) -> None:
        _setting_option(p, CommonSettings, "home")

    def http(p: argparse.ArgumentParser) -> None:
        volume(p)
        _setting_option(p, ClientSettings, "url")
        _setting_option(p, ClientSettings, "api_token", flag="--token",
                        otherwise="the volume's secrets/api-token")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")

    p = sub.add_parser("up", help="start the whole service",
                       description="Start Ray (local, or join RAY_ADDRESS), Serve and the API. "
                       "Stops cleanly on SIGTERM/SIGINT.")
    volume(p)
    _setting_option(p, Settings, "host")
    _setting_option(p, Settings, "port")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("train", help="run one training job on the volume",
                       description="Run one Ray Train job here with a progress bar. Fails if a "
                       "job is already running on this volume.")
    volume(p)
    _model_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("import", help="import an ImageFolder tree or CIFAR-10",
                       description="DIR: an ImageFolder tree (DIR/<label>/<image>, or "
                       "DIR/train|val/<label>/<image>). 'cifar10': the CIFAR-10 training images.")
    volume(p)
    p.add_argument("source", help="DIR, or the word cifar10")
    p.add_argument("--subset", type=int, default=None,
                   help="cifar10: at most N images per class")
    p.add_argument("--from", dest="from_folder", default=None,
                   help="cifar10: a local cifar-10-batches-py folder instead of downloading")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("models", help="list model versions", description="List model versions "
                       "on the volume; * marks the current one.")
    volume(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("predict", help="classify images with the running service")
    http(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("label", help="upload an ImageFolder tree of labelled images",
                       description="Upload DIR/<label>/<image> to the running service, in "
                       "batches of one label.")
    http(p)
    p.add_argument("dir")
    p.add_argument("--batch", type=int, default=32, help="images per request")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("activate", help="serve another model version (rollback or pin)")
    http(p)
    p.add_argument("version", help="v0, v1, ...")
    p.set_defaults(func=cmd_activate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        logging.basicConfig(level=_read(CommonSettings, home=args.home).log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return int(args.func(args))
    except (CliError, SettingsError, TokenFileError) as exc:
        print(f"visionloop: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
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
