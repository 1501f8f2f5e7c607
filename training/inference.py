"""The CPU inference engine of a version, chosen by measurement when it is published.

On a CPU, efficientnet_lite0's depthwise convolutions run several times faster in ONNX Runtime
than in eager PyTorch (`benchmarks/pipeline.py`; figures in the README, Performance). So
publishing a version also exports `model.onnx` (a protobuf graph, not a pickle), checks that
its outputs equal eager's within `ATOL`, times both, and records the winner in the manifest's
`inference` field. The classifier then loads the recorded engine on a
CPU; on a GPU, or where onnxruntime is missing, it runs eager PyTorch.

The served pipeline and the benchmark's in-process limit are the same functions, so the
benchmark's best is what the service does: `draft_size(preset)` (JPEG draft size),
`preprocess_batch` (`preprocess_into` each image's row of one float32 batch) and `logits`
(the engine on that batch, ONNX Runtime on numpy without a torch round trip).

Draft decoding (a decision): JPEGs are decoded at the largest libjpeg reduction (1/2, 1/4, 1/8)
whose short side stays >= the preset's *resize* (`draft_size`), as training decodes its
validation images (`training.engine.make_datasets`), so the calibration temperature and the
confidence threshold fitted there hold for what is served. Decoding further, to the crop, would
save about half of the decode's CPU time on images whose short side lies just above 2x the
crop (640x480 among them; `benchmarks/pipeline.py`, decode section), but the resize then scales
up, and the probabilities of real photos move by several hundredths: not taken. The fast path
resamples with the same torchvision kernel as the preset and only reorders the float
arithmetic of the normalisation, so predictions keep the same top-1 and every class
probability within `PROBABILITY_TOLERANCE` of the previous pipeline on real photos
(`tests/training/test_fast_path.py`).

ONNX Runtime session options (`session_options`): `threads` intra-op threads, one inter-op
thread, sequential execution (the graph is a chain; the parallel executor only adds
scheduling), every graph optimisation, the CPU memory arena and memory patterns on (a fixed
input shape reuses one allocation plan). With more than one intra-op thread the pool's threads
do not spin while idle: replicas share the cores, and a spinning thread burns CPU another
replica needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as F

if TYPE_CHECKING:
    from training.presets import EvalPreset

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ATOL = 1e-3  # on logits; far above float32 rounding, far below a changed prediction
CHECK_BATCH = 4
# Max abs difference of a class probability between the fast path (`preprocess_batch`, ONNX
# Runtime) and the previous pipeline (the preset's transform, eager PyTorch): ATOL on logits.
PROBABILITY_TOLERANCE = 1e-3


def session_options(threads: int) -> Any:
    """ONNX Runtime's options for inference (see the module docstring)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = True
    opts.enable_mem_pattern = True
    if threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind nn.Module's call: (N, 3, H, W) float32 -> (N, C) logits."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        opts = session_options(threads or torch.get_num_threads())
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 C-contiguous numpy -> (N, C) logits, no torch in between."""
        return self.session.run(None, {self.input_name: x})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.run(x.numpy()))


def draft_size(preset: EvalPreset) -> int:
    """The short side JPEGs are draft-decoded to for inference (module docstring)."""
    return preset.resize


def preprocess_into(img: Image.Image, preset: EvalPreset, out: np.ndarray) -> np.ndarray:
    """RGB image -> `out` ((3, crop, crop) float32, e.g. one row of the engine's input batch):
    the preset's resize of the short side, centre crop and normalisation, with the fewest
    copies. The 8-bit pixels are viewed as a channels-last (3, H, W) tensor, which is the
    layout torchvision's antialiased uint8 resize kernel works in (the preset's contiguous CHW
    tensor is converted to it first); the resize is the preset's own call
    (`torchvision.transforms.v2.functional.resize`, same size, interpolation, antialias), the
    crop a view with `CenterCrop`'s offsets, and the normalisation one fused
    multiply-subtract from the 8-bit crop into `out`: x * (1 / (255 std)) - mean / std, which
    is (x / 255 - mean) / std up to float32 rounding."""
    crop = preset.crop
    if out.shape != (3, crop, crop) or out.dtype != np.float32:
        raise ValueError(f"out must be (3, {crop}, {crop}) float32, not {out.shape} "
                         f"{out.dtype}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    # np.asarray of a Pillow image is a fresh read-only copy; one more copy makes it writable
    # for torch (which warns on read-only arrays), at a fraction of the resize's cost.
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    resized = F.resize(pixels, [preset.resize], interpolation=_interpolation(preset),
                       antialias=True)
    h, w = resized.shape[-2:]
    top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)  # CenterCrop's offsets
    cropped = resized[:, top:top + crop, left:left + crop].numpy()
    std = np.asarray(preset.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
    shift = (np.asarray(preset.mean, dtype=np.float32) / std).reshape(3, 1, 1)
    np.multiply(cropped, scale, out=out, casting="unsafe")
    out -= shift
    return out


def _interpolation(preset: EvalPreset) -> F.InterpolationMode:
    return F.InterpolationMode(preset.interpolation)


def preprocess_batch(images: Sequence[Image.Image], preset: EvalPreset) -> np.ndarray:
    """RGB images -> (N, 3, crop, crop) float32, each row written in place by
    `preprocess_into`."""
    crop = preset.crop
    batch = np.empty((len(images), 3, crop, crop), dtype=np.float32)
    for row, img in zip(batch, images, strict=True):
        preprocess_into(img, preset, row)
    return batch


def logits(model: nn.Module, batch: np.ndarray, device: torch.device | None = None
           ) -> torch.Tensor:
    """The engine on a `preprocess_batch` batch -> (N, C) float32 logits (on `device`, else the
    CPU). ONNX Runtime reads the numpy batch directly; eager PyTorch shares its memory."""
    if isinstance(model, OnnxModule):
        out = torch.from_numpy(model.run(batch))
        return out if device is None else out.to(device)
    x = torch.from_numpy(batch)
    if device is not None:
        x = x.to(device)
    with torch.inference_mode():
        return model(x).float()


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model: nn.Module, path: Path, crop: int) -> None:
    """Export with a dynamic batch dimension."""
    model = model.eval()
    example = torch.zeros(1, 3, crop, crop)
    torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)


def _images_per_s(fn: Any, x: torch.Tensor, repeat: int = 2) -> float:
    with torch.inference_mode():
        fn(x)
        start = time.perf_counter()
        for _ in range(repeat):
            fn(x)
    return repeat * x.shape[0] / (time.perf_counter() - start)


def choose_engine(model: nn.Module, folder: Path, crop: int) -> dict[str, Any]:
    """Export `model` to folder/model.onnx, check it, time eager vs ONNX Runtime (this process's
    torch threads, batch CHECK_BATCH); -> the manifest's `inference` record. The ONNX file is
    removed again when it loses or fails its check."""
    record: dict[str, Any] = {"engine": "eager", "device": "cpu",
                              "threads": torch.get_num_threads()}
    if not onnxruntime_available():
        record["reason"] = "onnxruntime not installed"
        return record
    path = folder / ONNX_FILE
    model = model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_BATCH, 3, crop, crop, generator=g)
    try:
        export_onnx(model, path, crop)
        ort_model = OnnxModule(path)
        with torch.inference_mode():
            diff = float((ort_model(x) - model(x)).abs().max())
        # Interleaved, best of three: a busy machine slows one measurement, not the verdict.
        rates = [(_images_per_s(model, x), _images_per_s(ort_model, x)) for _ in range(3)]
        eager_ips = max(r[0] for r in rates)
        ort_ips = max(r[1] for r in rates)
    except Exception as exc:  # an architecture the exporter cannot handle: stay eager
        path.unlink(missing_ok=True)
        record["reason"] = f"ONNX export or check failed: {type(exc).__name__}: {exc}"[:300]
        log.warning("inference engine: %s", record["reason"])
        return record
    record.update({"max_abs_diff": diff, "eager_images_per_s": round(eager_ips, 1),
                   "onnxruntime_images_per_s": round(ort_ips, 1)})
    if diff > ATOL:
        record["reason"] = f"ONNX Runtime outputs differ from eager by {diff:.2e} > {ATOL}"
    elif ort_ips <= eager_ips:
        record["reason"] = "eager PyTorch measured faster"
    else:
        record.update(engine="onnxruntime", reason=f"measured {ort_ips / eager_ips:.2f}x "
                      "eager PyTorch, outputs equal within tolerance")
    if record["engine"] != "onnxruntime":
        path.unlink(missing_ok=True)
    log.info("inference engine: %s (%s)", record["engine"], record["reason"])
    return record
