"""The inference fast path (`training.inference`: `preprocess_into` into one float32 batch,
ONNX Runtime on numpy) against the pipeline it replaced (the preset's torchvision transform,
eager PyTorch), both decoding JPEGs in draft mode to the preset's resize: the same tensor up to
8-bit rounding, the same logits on the same input, and the same answers on real photos."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import sklearn.datasets
import torch
from PIL import Image

from tests.support.images import encode, noisy_picture
from tests.support.service import BACKBONE
from training.imageio import decode_image
from training.inference import (
    ATOL,
    PROBABILITY_TOLERANCE,
    OnnxModule,
    draft_size,
    logits,
    preprocess_batch,
    preprocess_into,
)
from training.presets import EvalPreset
from training.registry import LoadedModel, Registry

# The same resize kernel on the same pixels: only the float32 rounding of the normalisation
# differs.
FLOAT_ROUNDING = 1e-5

# Real photos that ship with the project's dependencies.
PHOTOS = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
          Path(sklearn.datasets.__file__).parent / "images" / "china.jpg",
          Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg"]


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photo_jpegs() -> list[bytes]:
    """The real photos as shipped and re-encoded at 640x480 and 480x640 (the benchmark's
    size)."""
    out = []
    for path in PHOTOS:
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        out += [data, _jpeg(img.resize((640, 480))), _jpeg(img.resize((480, 640)))]
    return out


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (301, 257), (256, 256), (97, 60),
                                  (1000, 230)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_preprocess_into_equals_the_preset(size: tuple[int, int], interpolation: str) -> None:
    preset = EvalPreset(interpolation=interpolation)
    img = noisy_picture((120, 80, 200), seed=size[0], size=max(size)).resize(size)
    out = np.full((3, preset.crop, preset.crop), np.nan, dtype=np.float32)
    assert preprocess_into(img, preset, out) is out
    assert float(np.abs(out - preset(img).numpy()).max()) <= FLOAT_ROUNDING


def test_preprocess_batch_other_presets_modes_and_bad_buffers() -> None:
    preset = EvalPreset.for_size(160)
    images = [noisy_picture((10, 200, 30), seed=i, size=300) for i in range(3)]
    images[1] = images[1].convert("L")  # converted to RGB first, as the preset's input is
    batch = preprocess_batch(images, preset)
    assert batch.shape == (3, 3, 160, 160) and batch.dtype == np.float32
    reference = torch.stack([preset(i.convert("RGB")) for i in images]).numpy()
    assert float(np.abs(batch - reference).max()) <= FLOAT_ROUNDING
    assert preprocess_batch([], preset).shape == (0, 3, 160, 160)
    with pytest.raises(ValueError, match="must be"):
        preprocess_into(images[0], preset, np.empty((3, 224, 224), dtype=np.float32))
    with pytest.raises(ValueError, match="must be"):
        preprocess_into(images[0], preset, np.empty((3, 160, 160), dtype=np.float64))


@pytest.mark.parametrize(("size", "decoded"), [
    ((640, 480), (640, 480)), ((480, 640), (480, 640)), ((1280, 960), (640, 480)),
    ((4000, 3000), (500, 375)), ((300, 225), (300, 225)), ((100, 80), (100, 80))])
def test_jpeg_draft_decode_stops_at_the_resize(size: tuple[int, int],
                                               decoded: tuple[int, int]) -> None:
    """libjpeg's largest reduction whose short side still covers the resize: what training
    decodes its validation images to, so the fitted calibration holds for served inputs."""
    preset = EvalPreset()
    assert draft_size(preset) == preset.resize
    data = encode(noisy_picture((90, 90, 90), seed=3, size=64).resize(size), "JPEG")
    img = decode_image(data, draft_size=draft_size(preset))
    assert img.size == decoded


@pytest.fixture(scope="module")
def v0(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedModel]:
    """v0 as served (ONNX Runtime, chosen at publish) and as eager PyTorch."""
    home = tmp_path_factory.mktemp("home")
    registry = Registry(home)
    registry.ensure_v0(BACKBONE)
    served = registry.load("v0")
    assert isinstance(served.model, OnnxModule), "v0 is expected to be served by ONNX Runtime"
    return served, registry.load("v0", engine="eager")


def test_the_engine_matches_eager_on_the_same_input(v0: tuple[LoadedModel, LoadedModel]
                                                    ) -> None:
    served, eager = v0
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d in photo_jpegs()[:4]]
    batch = preprocess_batch(images, served.preset)
    fast = logits(served.model, batch)
    with torch.inference_mode():
        reference = eager.model(torch.from_numpy(batch.copy()))
    assert fast.shape == reference.shape == (4, len(served.classes))
    assert float((fast - reference).abs().max()) <= ATOL


def test_real_photos_get_the_same_answers_as_before(v0: tuple[LoadedModel, LoadedModel]
                                                    ) -> None:
    """The fast path against the previous pipeline, each end to end on the same bytes: the
    same top-1, and every class probability within PROBABILITY_TOLERANCE."""
    served, eager = v0
    preset = served.preset
    images = [decode_image(d, draft_size=draft_size(preset)) for d in photo_jpegs()]
    with torch.inference_mode():
        before = eager.model(torch.stack([preset(i) for i in images])).softmax(1)
    now = logits(served.model, preprocess_batch(images, preset)).softmax(1)
    assert now.argmax(1).tolist() == before.argmax(1).tolist()
    assert float((now - before).abs().max()) <= PROBABILITY_TOLERANCE
    # real photos: mostly confident answers, so an agreeing top-1 means something
    assert int((before.max(1).values > 0.2).sum()) >= len(images) // 2
