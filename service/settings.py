"""Settings: pydantic-settings models read from `VISIONLOOP_*` environment variables, the one
source of every `VISIONLOOP_*` value that the service and the CLI use.

    CommonSettings   what every process reads: the volume (`home`) and the log level
    Settings         the service (`visionloop up`, and `train`/`import` on the volume)
    ClientSettings   the CLI's HTTP commands: the service's URL and the token to send

Every setting has a default; `load_settings()` (any model: `read_settings(model)`) validates them
all at start and turns bad values into one `SettingsError` that names each variable, so a typo
fails the start, not a request. Explicit values (CLI flags, tests) override the environment.

Tokens are `SecretStr`: no repr, log line or settings error ever shows one (an error names the
variable and the rule only); code that needs the text calls `.get_secret_value()`. Each token can
come from a file instead (`VISIONLOOP_API_TOKEN_FILE`, `VISIONLOOP_PREDICT_TOKEN_FILE`: a Docker
secret such as /run/secrets/visionloop_api_token), read once at start; a file that cannot be read,
is empty or breaks the token's rule stops the start naming it. For the service, setting a token
and its file together is an error (which one was meant is not ours to guess); the CLI's
`ClientSettings` takes the file only when no token is given.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, TypeVar

from croniter import croniter
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.security import (
    API_TOKEN_MIN_LENGTH,
    PREDICT_TOKEN_MIN_LENGTH,
    TokenFileError,
    read_token,
)
from training.config import TrainConfig
from training.model import AUTO, Strategy, check_backbone
from training.resources import DEFAULT_PENDING_TIMEOUT_S

ENV_PREFIX = "VISIONLOOP_"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "WARN", "INFO", "DEBUG", "NOTSET")


class SettingsError(ValueError):
    """Invalid settings; the message names each bad variable (or explicit value)."""


# TrainConfig's own defaults: the deployment's training defaults start from them.
_TRAIN = TrainConfig.model_fields

# Settings that are a job's TrainConfig value unless its request says otherwise:
# `train_<field>` -> the TrainConfig field (the backbone's default is `backbone`, as before).
TRAIN_DEFAULT_FIELDS = ("workers", "gpu", "strategy", "epochs", "batch_size")


def _blank_is_unset(v: object) -> object:
    return None if isinstance(v, str) and not v.strip() else v


def _check_token_length(v: SecretStr | None, min_length: int) -> SecretStr | None:
    if v is not None and len(v.get_secret_value()) < min_length:
        raise PydanticCustomError("token_too_short", "must be at least {min_length} characters",
                                  {"min_length": min_length})
    return v


def _token_from_file(model: BaseSettings, name: str, min_length: int, refuse_both: bool
                     ) -> None:
    """Fill the token field `name` from the file its `<name>_file` field names, if set.
    Both set: refused (`refuse_both`), or the token given wins."""
    path = getattr(model, f"{name}_file")
    if path is None:
        return
    variable = f"{ENV_PREFIX}{name.upper()}"
    if getattr(model, name) is not None:
        if refuse_both:
            raise PydanticCustomError("token_and_file", "{message}", {
                "message": f"{variable} and {variable}_FILE are both set; set one of them"})
        return
    try:
        token = read_token(Path(path), min_length, f"{variable}_FILE:")
    except TokenFileError as exc:
        raise PydanticCustomError("token_file", "{message}", {"message": str(exc)}) from None
    setattr(model, name, SecretStr(token))


class CommonSettings(BaseSettings):
    """What every process reads, whatever it does: where the volume is, how much to log."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      validate_default=True)

    # A str default (validated into a Path), so that help texts show it as written.
    home: Path = Field("./visionloop-data", description="the data volume")  # type: ignore[assignment]
    log_level: str = Field("INFO", description="log level: DEBUG, INFO, WARNING, ERROR, CRITICAL")

    @field_validator("home", mode="before")
    @classmethod
    def _blank_home(cls, v: object) -> object:
        # An empty VISIONLOOP_HOME means the default, not the current directory.
        return cls.model_fields["home"].default if _blank_is_unset(v) is None else v

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        level = v.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {v!r}; expected one of {list(LOG_LEVELS)}")
        return level


class Settings(CommonSettings):
    """The service: every replica, the training controller, and the CLI's volume commands."""

    host: str = Field("127.0.0.1",
                      description="interface the HTTP server binds; 0.0.0.0 in a container")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    api_token: SecretStr | None = Field(
        None, description=f"bearer token for every /v1 endpoint (at least {API_TOKEN_MIN_LENGTH} "
                          "characters); generated into secrets/api-token when unset")
    api_token_file: Path | None = Field(
        None, description="a file holding the API token (a Docker secret), read at start")
    predict_token: SecretStr | None = Field(
        None, description="when set, POST /v1/predict needs it (or the API token); at least "
                          f"{PREDICT_TOKEN_MIN_LENGTH} characters")
    predict_token_file: Path | None = Field(
        None, description="a file holding the predict token (a Docker secret), read at start")
    backbone: str = Field(AUTO, description="backbone of v0 and the default for training")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024,
                                  description="largest request body, in bytes")
    max_pixels: int = Field(50_000_000, ge=1, description="largest image, width x height")
    max_files: int = Field(64, ge=1, le=10_000, description="most images in one request")
    max_in_flight: int = Field(64, ge=1, description="requests in flight before 503")
    retrain_schedule: str | None = Field(
        None, description="cron expression (5 fields, or 6 with seconds last); unset = never")
    retrain_min_new: int = Field(
        50, ge=1, description="new or relabelled images needed before a scheduled job starts")
    keep_versions: int = Field(10, ge=1, description="model versions kept (plus CURRENT, parent)")
    review_below: float = Field(0.5, ge=0.0, le=1.0,
                                description="GET /v1/review lists predictions scored below it")
    drift_threshold: float = Field(
        0.25, gt=0.0, le=10.0,
        description="drift score (population stability index) above which a version's live "
                    "answers count as drifted from its held-out split")
    drift_window: int = Field(1000, ge=10, le=1_000_000,
                              description="newest answers of a version that drift compares")
    drift_min_predictions: int = Field(
        100, ge=1, description="live answers needed before a drift score is given")
    predictions_keep: int = Field(1000, ge=0,
                                  description="predictions kept for feedback and review (0: none)")
    predictions_max_age_s: int = Field(7 * 24 * 3600, ge=60,
                                       description="prediction images older than this are removed")
    predictions_max_bytes: int = Field(
        1024**3, ge=0, description="bytes of prediction images and records kept (0: none)")
    min_free_bytes: int = Field(
        1024**3, ge=0,
        description="free space kept on the volume: below it predictions are answered but not "
                    "stored")
    classifier_replicas: int | None = Field(
        None, ge=1, le=64,
        description="API replicas, each with its own classifier; unset: one per CPU core of "
                    "the machine the service starts on (as Ray counts them, container limits "
                    "included) over the threads per replica, at most 8 and at most one per "
                    "2 GiB of available memory; 1 when VISIONLOOP_CLASSIFIER_GPUS is set")
    classifier_cpus: float = Field(
        0.0, ge=0.0, description="Ray CPUs reserved per API replica (0: share)")
    classifier_gpus: float = Field(0.0, ge=0.0, le=1.0,
                                   description="GPU share per API replica (its classifier)")
    classifier_threads: int | None = Field(
        None, ge=1, le=256,
        description="torch (and ONNX Runtime) threads per replica; unset: the cores left to "
                    "each replica (cores // replicas, at least 1)")
    max_batch_size: int = Field(
        8, ge=1, le=1024,
        description="@serve.batch size (the default suits a CPU: README, Performance)")
    batch_wait_s: float = Field(0.0, ge=0.0, le=5.0, description="@serve.batch wait")
    reload_poll_s: float = Field(1.0, gt=0.0, le=3600.0,
                                 description="how often replicas check models/CURRENT")
    ops_cache_s: float = Field(
        0.5, ge=0.0, le=60.0,
        description="/readyz and /metrics reuse their fan-out to every replica for this long "
                    "(seconds): at most one per period however many call")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of the embedded local Ray cluster (default: all)")
    # The training defaults of this deployment: what a job gets for every field its request
    # leaves out (the schedule's jobs, a bare POST /v1/train, `visionloop train` without flags).
    train_workers: int = Field(_TRAIN["workers"].default,
                               description="training workers (1 CPU each) unless asked")
    train_gpu: bool = Field(_TRAIN["gpu"].default,
                            description="one GPU per training worker unless asked")
    train_strategy: Strategy = Field(_TRAIN["strategy"].default,
                                     description="transfer-learning strategy unless asked")
    train_epochs: int = Field(_TRAIN["epochs"].default, description="epochs unless asked")
    train_batch_size: int = Field(_TRAIN["batch_size"].default,
                                  description="batch size per worker unless asked")
    train_pending_timeout_s: float = Field(
        DEFAULT_PENDING_TIMEOUT_S, ge=1.0, le=7 * 24 * 3600.0,
        description="a job whose workers the Ray cluster has not had free for this long fails "
                    "(reason `pending`)")
    resume_interrupted: bool = Field(
        True, description="on start, resume the job that a stop or crash interrupted (from its "
                          "last checkpoint, same config and dataset snapshot) instead of only "
                          "marking it failed (reason `interrupted`)")

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        check_backbone(v)
        return v

    @field_validator(*(f"train_{name}" for name in TRAIN_DEFAULT_FIELDS))
    @classmethod
    def _train_default(cls, v: object, info: ValidationInfo) -> object:
        # TrainConfig's constraints, from TrainConfig itself: a default that a job would refuse
        # stops the start instead.
        name = str(info.field_name).removeprefix("train_")
        try:
            TrainConfig.model_validate({name: v})
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"] for e in exc.errors())) from None
        return v

    @field_validator("retrain_schedule")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if not croniter.is_valid(v):
            raise ValueError(f"not a cron expression: {v!r}")
        return v.strip()

    @field_validator("classifier_replicas", "classifier_threads", mode="before")
    @classmethod
    def _blank_is_automatic(cls, v: object) -> object:
        # Compose passes an unset VISIONLOOP_CLASSIFIER_* as empty: the machine's default.
        return _blank_is_unset(v)

    @field_validator("api_token", "predict_token", "api_token_file", "predict_token_file",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return _blank_is_unset(v)

    @field_validator("api_token", "predict_token")
    @classmethod
    def _token_length(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        return _check_token_length(v, API_TOKEN_MIN_LENGTH if info.field_name == "api_token"
                                   else PREDICT_TOKEN_MIN_LENGTH)

    @model_validator(mode="after")
    def _tokens_from_files(self) -> Settings:
        _token_from_file(self, "api_token", API_TOKEN_MIN_LENGTH, refuse_both=True)
        _token_from_file(self, "predict_token", PREDICT_TOKEN_MIN_LENGTH, refuse_both=True)
        return self

    def train_defaults(self) -> dict[str, Any]:
        """The TrainConfig values a job takes where its request says nothing: the backbone
        (`backbone`) and the `train_*` settings."""
        return {"backbone": self.backbone,
                **{name: getattr(self, f"train_{name}") for name in TRAIN_DEFAULT_FIELDS}}

    @property
    def upload_limit_mib(self) -> float:
        return self.max_upload_bytes / (1024 * 1024)


class ClientSettings(CommonSettings):
    """The CLI against a running service (`predict`, `label`, `activate`)."""

    url: str = Field("http://127.0.0.1:8000", description="the running service")
    # Not Settings.api_token's constraints: the token sent may be the API token or the shorter
    # predict token, and the server is the one that judges it.
    api_token: SecretStr | None = Field(None, description="API token")
    api_token_file: Path | None = Field(
        None, description="a file holding the token to send (used when no token is given)")

    @field_validator("api_token", "api_token_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return _blank_is_unset(v)

    @model_validator(mode="after")
    def _token_from_file(self) -> ClientSettings:
        _token_from_file(self, "api_token", 1, refuse_both=False)
        return self


SettingsT = TypeVar("SettingsT", bound=CommonSettings)


def read_settings(model: type[SettingsT], **overrides: object) -> SettingsT:
    """Read and validate `model` from the environment, `overrides` (explicit values, e.g. CLI
    flags) winning. Raises one SettingsError naming every bad value: the variable when it came
    from the environment, the field's name when it was given explicitly. A secret's value is
    never shown: its line names the variable and the rule only."""
    try:
        return model(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a check across fields: its message names the variables
                lines.append(err["msg"])
                continue
            field = str(err["loc"][0])
            name = field if field in overrides else f"{ENV_PREFIX}{field.upper()}"
            value = "" if _is_secret(model, field) else f"={err.get('input')!r}"
            lines.append(f"{name}{value}: {err['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


def _is_secret(model: type[BaseSettings], field: str) -> bool:
    info = model.model_fields.get(field)
    # An unknown field (none is expected) counts as secret: when in doubt, show nothing.
    return info is None or SecretStr in (info.annotation, *typing.get_args(info.annotation))


def load_settings(**overrides: object) -> Settings:
    """The service's settings: the environment plus explicit overrides, validated."""
    return read_settings(Settings, **overrides)
