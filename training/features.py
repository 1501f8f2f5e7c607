"""Derived data in `<home>/cache/`: resized copies of originals and backbone features.

Both are keyed by content hash and always safe to delete.

- Resized copies (`cache/resized/<short side>/<sha>.jpg`): training decodes a few-hundred-pixel
  JPEG every epoch instead of a 12-megapixel original. Made once per (image, size); originals
  whose short side is already within 1.5x of the target are used as they are.
- Features (`cache/features/<key>/<sha>.safetensors`): in `feature-extract` without augmentation
  the frozen backbone (eval mode, BatchNorm statistics frozen) is a pure function of
  (image, backbone + weights, eval preset), so its output is computed once and reused across
  epochs and across retrains; a retrain on newly labelled images runs the backbone on the new
  images only. `key` hashes the backbone name, its weights origin and the preset. Files are
  written atomically but not fsynced: the cache is derived data, and a file a crash left
  empty counts as missing and is computed again.
- The backbone's ONNX graph (`cache/graphs/<key>.onnx`): on a CPU the
  features are computed with ONNX Runtime (`cpu_extractor`), several times faster than eager
  PyTorch for the depthwise convolutions of efficientnet_lite0 (the same measurement that
  picks the served engine, `training.inference`). Exported once per key, and checked against
  eager once per process: outputs within `training.inference.ATOL`, else eager computes them.
  A cached feature may so come from either engine; they agree within that tolerance.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from training.dataset import Item, write_file_atomic
from training.imageio import decode_image
from training.presets import EvalPreset

log = logging.getLogger(__name__)

RESIZE_SLACK = 1.5
JPEG_QUALITY = 95
CHECK_IMAGES = 2  # random inputs the ONNX extractor is checked on against eager
# ONNX extractors checked in this process, by graph path: a long-lived process (the training
# controller) checks and loads each once, and its later jobs start warm.
_ENGINES: dict[Path, nn.Module] = {}


def resized_path(cache: Path, item: Item, short_side: int) -> Path:
    return cache / "resized" / str(short_side) / f"{item.sha256}.jpg"


def ensure_resized(items: Sequence[Item], cache: Path, short_side: int) -> dict[str, Path]:
    """sha256 -> the file training should read: a cached resized copy or the original."""
    out: dict[str, Path] = {}
    made = 0
    for item in items:
        target = resized_path(cache, item, short_side)
        if target.exists():
            out[item.sha256] = target
            continue
        with Image.open(item.path) as header:  # reads the header only: most need no copy
            if min(header.size) <= short_side * RESIZE_SLACK:
                out[item.sha256] = item.path
                continue
        image = decode_image(item.path.read_bytes(), draft_size=short_side)
        scale = short_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(target, buf.getvalue())
        out[item.sha256] = target
        made += 1
    if made:
        log.info("made %d resized copies (short side %d) in %s", made, short_side, cache)
    return out


def feature_key(backbone: str, weights_origin: str, preset: EvalPreset) -> str:
    blob = json.dumps({"backbone": backbone, "weights": weights_origin,
                       "preset": preset.to_dict()}, sort_keys=True)
    return f"{backbone}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class FeatureCache:
    """One safetensors file per image: {"features": (D,) float32}."""

    def __init__(self, cache: Path, key: str):
        self.root = cache / "features" / key
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def graph_path(self) -> Path:
        """The backbone's ONNX graph (`cpu_extractor`): (N, 3, crop, crop) -> (N, D)."""
        return self.root.parent.parent / "graphs" / f"{self.root.name}.onnx"

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.safetensors"

    def missing(self, shas: Sequence[str]) -> list[str]:
        """The shas with no features cached; an empty file (what a crash can leave of a
        write that was never fsynced) counts as none."""
        out = []
        for s in shas:
            try:
                if self.path(s).stat().st_size > 0:
                    continue
            except FileNotFoundError:
                pass
            out.append(s)
        return out

    def put(self, sha256: str, features: torch.Tensor) -> None:
        from safetensors.torch import save

        data = save({"features": features.detach().cpu().float().contiguous()})
        tmp = self.root / f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path(sha256))

    def get_many(self, shas: Sequence[str]) -> torch.Tensor:
        """-> (N, D) float32, in the order of `shas`."""
        from safetensors.torch import load_file

        return torch.stack([load_file(str(self.path(s)))["features"] for s in shas])


def cpu_extractor(extractor: nn.Module, cache: FeatureCache, crop: int) -> nn.Module:
    """`extractor` run by ONNX Runtime (this process's torch threads), from the graph exported
    once into the cache's folder, when onnxruntime is installed and the graph's outputs equal
    eager's within ATOL on random inputs; else `extractor` itself. (N, 3, crop, crop) float32
    -> (N, D) float32."""
    from training.inference import ATOL, OnnxModule, export_onnx, onnxruntime_available

    if not onnxruntime_available():
        return extractor
    path = cache.graph_path
    known = _ENGINES.get(path)
    if known is not None and path.exists():  # checked in this process already
        return known
    x = torch.randn(CHECK_IMAGES, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
            export_onnx(extractor.eval(), tmp, crop)
            os.replace(tmp, path)
        engine = OnnxModule(path)
        with torch.inference_mode():
            diff = float((engine(x).flatten(1) - extractor.eval()(x).flatten(1)).abs().max())
    except Exception as exc:  # an architecture the exporter cannot handle: stay eager
        log.warning("features: ONNX extractor unavailable (%s: %s); eager PyTorch",
                    type(exc).__name__, exc)
        return extractor
    if diff > ATOL:
        log.warning("features: the ONNX extractor differs from eager by %.2e > %s; eager "
                    "PyTorch (the graph is removed: the next job exports it)", diff, ATOL)
        path.unlink(missing_ok=True)
        return extractor
    _ENGINES[path] = engine
    return engine


def seed_graph(cache: FeatureCache, model_onnx: Path) -> bool:
    """Make the cache's extractor graph from a published version's `model.onnx` whose
    backbone is the cache's frozen one (v0, or a feature-extract version of the same backbone,
    weights and preprocessing): its graph up to the input of its last Gemm (the head), so a
    first job on a volume needs no export. `cpu_extractor` checks it against eager before any
    use. -> whether the cache has a graph now."""
    import onnx
    from onnx.utils import Extractor

    if cache.graph_path.exists():
        return True
    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(model_onnx)))
        gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
        if not gemms or model.graph.node[-1] is not gemms[-1]:
            return False
        cut = Extractor(model).extract_model([model.graph.input[0].name],
                                             [gemms[-1].input[0]])
        cache.graph_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.graph_path.parent / f".{cache.graph_path.name}.{os.getpid()}.tmp"
        onnx.save(cut, str(tmp))
        os.replace(tmp, cache.graph_path)
    except Exception as exc:  # a graph of another shape: the extractor is exported instead
        log.warning("features: no extractor graph from %s (%s: %s)", model_onnx,
                    type(exc).__name__, exc)
        return False
    return True


def graph_with_head(cache: FeatureCache, head: nn.Linear, out: Path) -> None:
    """Write to `out` the ONNX graph of backbone + `head` without exporting it again: the
    cache's extractor graph (`FeatureCache.graph_path`, made by `cpu_extractor`) with the
    head appended as one Gemm (logits = features @ W.T + b): (N, 3, crop, crop) float32 ->
    (N, C) logits. Raises FileNotFoundError when the cache has no graph; a graph whose output
    is not (N, D), D the head's input size, fails when run (callers check the outputs)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(cache.graph_path))
    graph = model.graph
    (output,) = graph.output
    weight = head.weight.detach().cpu().numpy().astype(np.float32)
    bias = head.bias.detach().cpu().numpy().astype(np.float32)
    graph.initializer.extend([numpy_helper.from_array(weight, "head.weight"),
                              numpy_helper.from_array(bias, "head.bias")])
    graph.node.append(helper.make_node("Gemm", [output.name, "head.weight", "head.bias"],
                                       ["class_logits"], transB=1))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(
        "class_logits", TensorProto.FLOAT, ["batch", head.out_features]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


@torch.no_grad()
def compute_features(extractor: nn.Module, files: Sequence[tuple[str, Path]],
                     preset: EvalPreset, cache: FeatureCache, device: torch.device,
                     batch_size: int = 32, channels_last: bool = False,
                     num_workers: int = 0) -> int:
    """Run the frozen backbone over (sha256, path) pairs and store each (D,) float32 feature
    vector. `num_workers`: DataLoader processes decoding the images (on a GPU the decoding,
    not the backbone, is the slow part). On a CPU the backbone runs in ONNX Runtime where it
    can (`cpu_extractor`). -> how many were computed."""
    from training.engine import ImageFileDataset

    if not files:
        return 0
    extractor.eval()
    if device.type == "cpu":
        extractor = cpu_extractor(extractor, cache, preset.crop)
    ds = ImageFileDataset([(str(p), i) for i, (_, p) in enumerate(files)], preset,
                          preset.resize)
    done = 0
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for x, idx in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = extractor(x).flatten(1)
        for f, i in zip(feats, idx.tolist(), strict=True):
            cache.put(files[i][0], f)
        done += len(idx)
    log.debug("computed %d feature vectors in %s (pid %d)", done, cache.root, os.getpid())
    return done
