"""HTTP shapes of the /v1 API (README, "API at a glance"), one family per direction.

`*Request` models are what clients send, `*Public` what the service answers. They document the
API at /docs; routes build them from the training contract's plain dicts and dataclasses.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorPublic(BaseModel):
    """Every error: `{"error": {"code", "message"}}`."""

    error: ErrorBody


class ScoredLabel(BaseModel):
    label: str
    score: float


class PredictionPublic(BaseModel):
    prediction_id: str
    filename: str | None
    label: str = Field(description="the best label, or `unknown` when `unknown` is true")
    score: float = Field(description="the best label's calibrated score")
    unknown: bool = Field(False, description="the best score is below `threshold`: the "
                          "answer is `unknown`; `top_k` still has the model's labels")
    threshold: float = Field(0.0, description="the threshold applied: the request's "
                             "`min_score`, else the version's (chosen at publish)")
    top_k: list[ScoredLabel]


class PredictPublic(BaseModel):
    model_version: str
    predictions: list[PredictionPublic]


class PredictJsonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(..., description="base64-encoded image bytes")


class LabelResultPublic(BaseModel):
    sha256: str
    label: str
    status: Literal["added", "duplicate", "relabelled"]


class LabelsPublic(BaseModel):
    results: list[LabelResultPublic]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: str
    label: str


class FeedbackPublic(LabelResultPublic):
    prediction_id: str


class DatasetPublic(BaseModel):
    labels: dict[str, int]
    total: int
    new_since_last_job: int


class ReviewItemPublic(BaseModel):
    prediction_id: str
    created_at: float
    model_version: str
    label: str
    score: float
    top_k: list[ScoredLabel]
    margin: float = Field(description="top-1 minus top-2 score; small: nearly another answer")
    entropy: float = Field(description="entropy of the top-k scores in nats (the rest of the "
                                       "probability as one outcome); large: spread out")
    filename: str | None = None
    unknown: bool = Field(False, description="answered `unknown` (below its threshold): "
                          "such predictions come first in the queue; `label` is the model's "
                          "best label")
    image_url: str = Field(description="the image as uploaded (GET, API token)")


class ReviewPublic(BaseModel):
    below: float
    label: str | None = None
    order: Literal["margin", "entropy", "score"]
    items: list[ReviewItemPublic]


class ReviewStatePublic(BaseModel):
    """A prediction taken out of the review queue (dismissed or labelled)."""

    prediction_id: str
    state: Literal["pending", "labelled", "dismissed"]


class TrainStartedPublic(BaseModel):
    job_id: str
    status: str


class ProgressPublic(BaseModel):
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    fraction: float = 0.0
    eta_s: float | None = None


class JobPublic(BaseModel):
    """A training job; extra fields of the record (config, timings, dataset) pass through."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: ProgressPublic
    metrics: list[dict[str, Any]]
    version: str | None = None
    promoted: bool | None = None
    reason: str | None = None
    error: str | None = None


class JobsPublic(BaseModel):
    jobs: list[JobPublic]


class VersionPublic(BaseModel):
    """One version in the list (`GET /v1/models`); its classes are in its manifest
    (`GET /v1/models/{version}`)."""

    version: str
    created_at: float | None
    backbone: str | None
    class_count: int
    val_accuracy: float | None
    test_accuracy: float | None = Field(
        None, description="on its job's held-out test split (none for v0)")
    promoted: bool | None


class PolicyPublic(BaseModel):
    """The promotion policy (`models/POLICY`)."""

    mode: Literal["automatic", "pinned"] = Field(
        description="automatic: a job that passes the gate becomes CURRENT; pinned: jobs "
                    "publish but never promote")
    version: str | None = Field(None, description="the pinned version")
    changed_at: float | None = None
    by: str | None = None


class PolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["automatic", "pinned"] = Field(
        description="pinned pins the current version")


class TrialRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(description="the version to try (not the current one)")
    mode: Literal["shadow", "canary"] = Field(
        description="shadow: also classifies `share` of the requests, answers none; canary: "
                    "answers `share` of the requests that name no version")
    share: float = Field(gt=0.0, le=1.0, description="the share of requests, (0, 1]")


class TrialFeedbackPublic(BaseModel):
    count: int = Field(description="labelled predictions the trial version answered")
    trial_accuracy: float | None
    current_count: int
    current_accuracy: float | None = Field(
        description="the current version's accuracy on its labelled answers of the same period")


class TrialPublic(BaseModel):
    version: str
    mode: Literal["shadow", "canary"]
    share: float
    current: str | None = Field(None, description="the version current when it was set")
    set_at: float
    by: str | None = None
    answers: int = Field(0, description="live answers it gave (canary) or computed (shadow)")
    agreement: float | None = Field(
        None, description="shadow: share of its answers with the served answer's label")
    feedback: TrialFeedbackPublic | None = None
    replicas: list[str | None] = Field(
        default_factory=list, description="the trial version each replica follows (null: "
                                          "none, e.g. it could not load it)")


class ModelsPublic(BaseModel):
    current: str | None
    policy: PolicyPublic
    versions: list[VersionPublic]
    trial: TrialPublic | None = Field(None, description="the version on trial, if any")


class ActivatePublic(BaseModel):
    current: str
    replicas: list[str | None] = Field(
        default_factory=list, description="the version each replica now serves")
    policy: PolicyPublic


class DatasetImagePublic(BaseModel):
    """One stored image of a label, for browsing (`GET /v1/dataset/labels/{label}/images`)."""

    sha256: str
    bytes: int = Field(description="size of the stored original")
    added_at: float = Field(description="when its bytes were stored (seconds since the epoch; "
                                        "a relabel, rename or merge keeps it)")
    thumbnail_url: str = Field(description="a small JPEG (GET, API token)")
    image_url: str = Field(description="the original bytes (GET, API token)")


class DatasetImagesPublic(BaseModel):
    """A page of a label's images, newest first (then by sha256)."""

    label: str
    total: int
    offset: int
    limit: int
    images: list[DatasetImagePublic]


class LabelRenameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(description="the new name; it must not be a label already (merge then)")


class LabelMergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    into: str = Field(description="an existing label that takes every image")


class LabelChangePublic(BaseModel):
    """A finished rename or merge: `old_label`'s `moved` images are now under `label`, which
    holds `total` images."""

    label: str
    old_label: str
    moved: int
    total: int
