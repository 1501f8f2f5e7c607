"""Service settings: one pydantic-settings model read from `VISIONLOOP_*` environment variables.

Every setting has a default; `load_settings()` validates them all at start and turns a bad value
into one `SettingsError` that names the variable, so a typo fails the start, not a request.
"""

from __future__ import annotations

from pathlib import Path

from croniter import croniter
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.model import check_backbone

ENV_PREFIX = "VISIONLOOP_"


class SettingsError(ValueError):
    """An invalid `VISIONLOOP_*` value; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      validate_default=True)

    home: Path = Field(Path("./visionloop-data"), description="the data volume")
    host: str = Field("127.0.0.1", description="interface the HTTP server binds")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    api_token: str | None = Field(
        None, min_length=16,
        description="bearer token for every /v1 endpoint; generated into "
                    "secrets/api-token when unset")
    predict_token: str | None = Field(
        None, min_length=8, description="when set, POST /v1/predict needs it (or the API token)")
    backbone: str = Field("auto", description="backbone of v0 and the default for training")
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
    predictions_keep: int = Field(1000, ge=0, description="prediction images kept for feedback")
    predictions_max_age_s: int = Field(7 * 24 * 3600, ge=60,
                                       description="prediction images older than this are removed")
    classifier_replicas: int = Field(
        1, ge=1, le=64, description="API replicas, each with its own classifier")
    classifier_cpus: float = Field(
        0.0, ge=0.0, description="Ray CPUs reserved per API replica (0: share)")
    classifier_gpus: float = Field(0.0, ge=0.0, le=1.0,
                                   description="GPU share per API replica (its classifier)")
    classifier_threads: int = Field(1, ge=1, le=256, description="torch threads per replica")
    max_batch_size: int = Field(8, ge=1, le=1024,
                                description="@serve.batch size (8: measured best on a CPU)")
    batch_wait_s: float = Field(0.0, ge=0.0, le=5.0, description="@serve.batch wait")
    reload_poll_s: float = Field(1.0, gt=0.0, le=3600.0,
                                 description="how often replicas check models/CURRENT")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of the embedded local Ray cluster (default: all)")

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        check_backbone(v)
        return v

    @field_validator("retrain_schedule")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if not croniter.is_valid(v):
            raise ValueError(f"not a cron expression: {v!r}")
        return v.strip()

    @field_validator("api_token", "predict_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def upload_limit_mib(self) -> float:
        return self.max_upload_bytes / (1024 * 1024)


def load_settings(**overrides: object) -> Settings:
    """Read and validate the environment (plus explicit overrides, e.g. from CLI flags)."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"{ENV_PREFIX}{field.upper()}={err.get('input')!r}: {err['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
