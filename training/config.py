"""Training configuration: one pydantic model, shared by the CLI (`visionloop train --...`), the
HTTP API (`POST /v1/train` overrides use the same names) and the manifest (`training_config`)."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from training.model import AUTO, Strategy, check_backbone


class GateConfig(BaseModel):
    """Promotion gate: a candidate becomes CURRENT only if it passes every check, all judged on
    the held-out test split (`training.dataset.split_of`), which training never sees: the
    validation split picks the best epoch, so its score of that epoch is biased upward.

    - the minimum: test accuracy >= max(`min_accuracy`, b + `min_error_reduction` * (1 - b)),
      where b is the majority-class baseline of the test split (its no-information rate: the
      accuracy of always answering its most frequent label). A model that ignores the image
      scores at most b, so the default asks for a quarter of the baseline's errors to be
      gone: 0.625 on two balanced classes, 0.325 on ten, 0.925 when one class holds 90% of
      the images. It adapts to the number of classes and to imbalance, where an absolute
      floor cannot (0.6 is good on ten classes and worse than guessing on a 90/10 set). It
      applies to every job, also the first after v0 or after the classes changed, when no
      earlier model can be compared.
    - `max_regression`: the candidate may be at most this much worse than the current model
      evaluated on the same test split (0.0 = not worse). Skipped when the current model has
      other classes (version 0 has ImageNet's), since the two are not comparable.

    `min_val_accuracy`, the name before the test split, is still accepted for `min_accuracy`.
    """

    model_config = ConfigDict(extra="forbid")
    min_accuracy: float = Field(
        0.0, ge=0.0, le=1.0,
        validation_alias=AliasChoices("min_accuracy", "min_val_accuracy"),
        description="absolute floor on the candidate's test accuracy")
    min_error_reduction: float = Field(
        0.25, ge=0.0, le=1.0,
        description="share of the majority-class baseline's test errors the candidate must "
                    "avoid")
    max_regression: float = Field(
        0.0, ge=0.0, le=1.0,
        description="how much worse than the current model on the test split is allowed")

    def minimum(self, baseline: float) -> float:
        """The test accuracy a candidate needs, given the majority-class `baseline` in [0, 1]."""
        return max(self.min_accuracy, baseline + self.min_error_reduction * (1 - baseline))


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str = AUTO
    strategy: Strategy = "feature-extract"
    unfreeze_stages: int = Field(1, ge=1, description="partial: how many last stages train")
    epochs: int = Field(5, ge=1, le=1000)
    workers: int = Field(1, ge=1, le=256, description="Ray Train workers (DDP processes)")
    gpu: bool = False
    batch_size: int = Field(32, ge=1, le=4096, description="per worker")
    lr: float = Field(1e-2, gt=0, le=10, description="head learning rate")
    backbone_lr: float | None = Field(
        None, gt=0, le=10, description="default: lr/10 (finetune, partial)")
    weight_decay: float = Field(1e-4, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(0.5, ge=0, description="linear warm-up, then cosine")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    image_size: int = Field(224, ge=32, le=1024, description="crop size (train and eval)")
    # None (the default) resolves on validation: off for feature-extract, on for finetune and
    # partial. With a frozen backbone, augmentation means running the backbone on every image
    # every epoch; without it the backbone features are cached per image, a retrain runs the
    # backbone on the new images only, and a one-worker CPU job needs no Ray Train worker group
    # (training.pipeline.runs_in_process). `augment: true` asks for it anyway.
    augment: bool | None = Field(
        None, description="random resized crop + flip; default: off for feature-extract "
                          "(features cached), on for finetune and partial")
    num_data_workers: int = Field(
        0, ge=0, le=32, description="DataLoader workers per trainer (0 on a GPU: automatic, "
                                    "the worker's cores - 1, at most 8)")
    threads: int | None = Field(None, ge=1, le=256, description="torch threads per worker")
    seed: int = 0
    max_failures: int = Field(2, ge=0, le=100, description="Ray Train restarts after a failure")
    checkpoints_to_keep: int = Field(2, ge=1, le=100)
    use_feature_cache: bool = Field(
        True, description="feature-extract without augmentation: cache backbone features")
    amp: bool = Field(True, description="mixed precision when on GPU")
    channels_last: bool = Field(True, description="channels_last memory format when on GPU")
    gate: GateConfig = Field(default_factory=lambda: GateConfig.model_validate({}))

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        check_backbone(v)
        return v

    @model_validator(mode="after")
    def _resolve_augment(self) -> TrainConfig:
        if self.augment is None:
            self.augment = self.strategy != "feature-extract"
        return self

    @property
    def effective_backbone_lr(self) -> float:
        return self.backbone_lr if self.backbone_lr is not None else self.lr / 10

