"""The training controller's schedule, without Ray (no tick here starts a job)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.controller import InvalidTrainRequest, TrainingController, train_config
from service.settings import load_settings
from tests.support.images import noisy_image
from training.config import TrainConfig
from training.dataset import DatasetStore


def test_schedule_tick_is_persisted_and_never_fires_twice(tmp_path: Path) -> None:
    """Ticks without enough new labels start nothing; a restart resumes from the persisted
    tick, so the same tick is not evaluated again."""
    settings = load_settings(home=tmp_path, retrain_schedule="0 * * * *", retrain_min_new=5)
    store = DatasetStore(tmp_path)
    for i in range(3):
        store.ingest(noisy_image(i, (200, 0, 0)), "red")
    t0 = 1_800_000_100.0  # 100 s past an hour; ticks are on the hour
    controller = TrainingController(settings)
    assert controller.tick(t0) is None  # first look: remembers the last due tick, fires nothing
    first = controller._last_tick()
    assert controller.tick(t0 + 10) is None and controller._last_tick() == first
    assert controller.tick(t0 + 3600) is None  # due, but 3 < 5 new images
    second = controller._last_tick()
    assert second is not None and first is not None and second == first + 3600
    restarted = TrainingController(settings)
    assert restarted._last_tick() == second
    assert restarted.tick(t0 + 3610) is None and restarted._last_tick() == second
    assert restarted.jobs.list() == []


def test_a_request_takes_the_deployments_training_defaults(tmp_path: Path) -> None:
    """What the request says wins; what it leaves out comes from the VISIONLOOP_TRAIN_* settings
    (the schedule's `start({})` is all defaults); the rest is TrainConfig's."""
    settings = load_settings(home=tmp_path, backbone="efficientnet_lite0", train_workers=3,
                             train_gpu=True, train_strategy="partial", train_epochs=7,
                             train_batch_size=16)
    bare = train_config({}, settings.train_defaults())
    assert (bare.backbone, bare.workers, bare.gpu, bare.strategy, bare.epochs,
            bare.batch_size) == ("efficientnet_lite0", 3, True, "partial", 7, 16)
    assert bare.lr == TrainConfig().lr
    asked = train_config({"workers": 1, "gpu": False, "epochs": 2}, settings.train_defaults())
    assert (asked.workers, asked.gpu, asked.epochs, asked.strategy) == (1, False, 2, "partial")
    with pytest.raises(InvalidTrainRequest, match="workers"):
        train_config({"workers": 0}, settings.train_defaults())
