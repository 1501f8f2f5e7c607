"""Training configuration: one pydantic model, shared by the CLI (`visionloop train --...`), the
HTTP API (`POST /v1/train` overrides use the same names) and the manifest (`training_config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from training.model import STRATEGIES, check_backbone


class GateConfig(BaseModel):
    """Promotion gate: a candidate becomes CURRENT only if it passes both checks.

    - `min_val_accuracy`: absolute floor on the candidate's validation accuracy;
    - `max_regression`: the candidate may be at most this much worse than the current model on
      the same validation split (0.0 = not worse). Skipped when the class set changed, or when
      the current model is version 0 (ImageNet classes), since the two are not comparable.
    """

    model_config = ConfigDict(extra="forbid")
    min_val_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    max_regression: float = Field(0.0, ge=0.0, le=1.0)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str = "auto"
    strategy: Literal["feature-extract", "finetune", "partial"] = "feature-extract"
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
    augment: bool = True
    num_data_workers: int = Field(0, ge=0, le=32, description="DataLoader workers per trainer")
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

    @property
    def effective_backbone_lr(self) -> float:
        return self.backbone_lr if self.backbone_lr is not None else self.lr / 10


assert set(STRATEGIES) == {"feature-extract", "finetune", "partial"}
