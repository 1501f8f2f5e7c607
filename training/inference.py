"""The CPU inference engine of a version, chosen by measurement when it is published.

On a CPU, efficientnet_lite0's depthwise convolutions run several times faster in ONNX Runtime
than in eager PyTorch (`benchmarks/pipeline.py`; figures in the README, Performance). So
publishing a version also exports `model.onnx` (a protobuf graph, not a pickle), checks that
its outputs equal eager's within `ATOL`, times both, and records the winner in the manifest's
`inference` field. The classifier then loads the recorded engine on a
CPU; on a GPU, or where onnxruntime is missing, it runs eager PyTorch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ATOL = 1e-3  # on logits; far above float32 rounding, far below a changed prediction
CHECK_BATCH = 4


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind nn.Module's call: (N, 3, H, W) float32 -> (N, C) logits."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


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
