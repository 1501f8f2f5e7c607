"""In-process inference: where the time goes and the fastest layout, without any serving.

    python -m benchmarks.pipeline [--images 64] [--quick]

Measures, on 640x480 photo-like JPEGs and efficientnet_lite0 (ImageNet head, version 0):
- decode: Pillow full decode vs Pillow draft mode (what the service uses) vs torchvision.io;
- engine: eager vs channels_last vs torch.compile (vs ONNX Runtime where installed), batch 16,
  with outputs checked equal to eager within tolerance;
- layout: processes x torch threads x batch size for the whole pipeline (decode + preprocess +
  forward), images/s; and the batch-1 latency (p50) that the serving benchmark compares against.
The baseline of each section is its first row; every row reports its ratio to it.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import percentiles, photo_jpegs, write_results
from training.inference import onnxruntime_available

MODEL = "efficientnet_lite0"

_state: dict[str, Any] = {}


def _init_worker(threads: int, engine: str = "eager", onnx_path: str | None = None) -> None:
    torch.set_num_threads(threads)
    from training.inference import OnnxModule
    from training.model import build_model
    from training.presets import EvalPreset

    model: torch.nn.Module
    if engine == "onnxruntime":
        assert onnx_path is not None
        model = OnnxModule(Path(onnx_path), threads=threads)
    else:
        model = build_model(MODEL, num_classes=None, pretrained=True).eval()
    _state.update(model=model, preset=EvalPreset(), engine=engine)


def export_model(folder: Path) -> str:
    """efficientnet_lite0 (v0) as ONNX, for the onnxruntime layouts."""
    from training.inference import export_onnx
    from training.model import build_model

    path = folder / "model.onnx"
    export_onnx(build_model(MODEL, num_classes=None, pretrained=True), path, 224)
    return str(path)


def _run_batch(batch: Sequence[bytes]) -> int:
    """decode + preprocess + forward for one batch; -> images done."""
    from training.imageio import decode_image

    preset = _state["preset"]
    x = torch.stack([preset(decode_image(b, draft_size=preset.resize)) for b in batch])
    with torch.inference_mode():
        _state["model"](x).softmax(1)
    return len(batch)


def pipeline_throughput(jpegs: list[bytes], processes: int, threads: int, batch: int,
                        engine: str = "eager", onnx_path: str | None = None,
                        rounds: int = 2) -> float:
    """images/s of the full pipeline with `processes` x `threads`, after a warm-up round."""
    batches = [jpegs[i:i + batch] for i in range(0, len(jpegs), batch)]
    init = (threads, engine, onnx_path)
    if processes == 1:
        _init_worker(*init)
        for b in batches[:2]:
            _run_batch(b)
        start = time.perf_counter()
        done = sum(_run_batch(b) for _ in range(rounds) for b in batches)
        return done / (time.perf_counter() - start)
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes, initializer=_init_worker, initargs=init) as pool:
        pool.map(_run_batch, batches[: processes * 2], chunksize=1)
        start = time.perf_counter()
        done = sum(pool.map(_run_batch, batches * rounds, chunksize=1))
        return done / (time.perf_counter() - start)


def latency_batch1(jpegs: list[bytes], threads: int, engine: str = "eager",
                   onnx_path: str | None = None, n: int = 40) -> dict[str, float]:
    _init_worker(threads, engine, onnx_path)
    for b in jpegs[:3]:
        _run_batch([b])
    samples = []
    for b in (jpegs * (n // len(jpegs) + 1))[:n]:
        t = time.perf_counter()
        _run_batch([b])
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


def best_layout(jpegs: list[bytes], onnx_path: str | None, quick: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sweep processes x threads x batch (x engine); the first row is the baseline."""
    cpus = os.cpu_count() or 1
    layouts = [(1, cpus, 1, "eager"), (1, cpus, 16, "eager")]
    if cpus > 1:
        layouts += [(cpus, 1, 1, "eager"), (cpus, 1, 16, "eager")]
    if onnx_path:
        layouts += [(1, cpus, 16, "onnxruntime")]
        if cpus > 1:
            layouts += [(cpus, 1, 1, "onnxruntime"), (cpus, 1, 8, "onnxruntime")]
    if not quick:
        layouts += [(1, 1, 16, "eager"), (cpus, 1, 8, "eager")]
    rows: list[dict[str, Any]] = []
    base = None
    for p, t, b, engine in layouts:
        ips = pipeline_throughput(jpegs, p, t, b, engine, onnx_path)
        base = base or ips
        rows.append({"section": "layout", "engine": engine, "processes": p, "threads": t,
                     "batch": b, "images_per_s": round(ips, 1), "ratio": round(ips / base, 2)})
        print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r["images_per_s"])
    return rows, best


def decode_rows(jpegs: list[bytes]) -> list[dict[str, Any]]:
    from PIL import Image
    from torchvision.io import decode_jpeg

    from training.imageio import decode_image
    from training.presets import EvalPreset

    preset = EvalPreset()

    def pil_full() -> None:
        for b in jpegs:
            Image.open(io.BytesIO(b)).convert("RGB").load()

    def pil_draft() -> None:
        for b in jpegs:
            decode_image(b, draft_size=preset.resize)

    def tv_io() -> None:
        for b in jpegs:
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))

    def preprocess() -> None:
        for b in jpegs:
            preset(decode_image(b, draft_size=preset.resize))

    torch.set_num_threads(1)
    rows, base = [], None
    for name, fn in (("pillow full decode", pil_full), ("pillow draft decode", pil_draft),
                     ("torchvision.io decode_jpeg", tv_io),
                     ("draft decode + EvalPreset", preprocess)):
        fn()
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) / len(jpegs) * 1000
        base = base or ms
        rows.append({"section": "decode (1 thread)", "variant": name,
                     "ms_per_image": round(ms, 2), "ratio": round(base / ms, 2)})
        print(rows[-1], flush=True)
    return rows


def engine_rows(batch: int = 16) -> list[dict[str, Any]]:
    from training.model import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    eager = build_model(MODEL, num_classes=None, pretrained=True).eval()
    with torch.inference_mode():
        reference = eager(x)
    variants: list[tuple[str, Any, torch.Tensor]] = [("eager", eager, x)]
    cl = build_model(MODEL, num_classes=None, pretrained=True).eval().to(
        memory_format=torch.channels_last)
    variants.append(("channels_last", cl, x.contiguous(memory_format=torch.channels_last)))
    try:
        compiled = torch.compile(build_model(MODEL, num_classes=None, pretrained=True).eval())
        variants.append(("torch.compile", compiled, x))
    except Exception as exc:  # compile needs a C++ toolchain; report, don't fail
        print("torch.compile unavailable:", exc)
    rows, base = [], None
    for name, model, inp in variants:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(inp)  # warm-up (and compile)
            first = time.perf_counter() - t0
            start = time.perf_counter()
            for _ in range(3):
                out = model(inp)
            ips = 3 * batch / (time.perf_counter() - start)
        err = float((out - reference).abs().max())
        base = base or ips
        rows.append({"section": f"engine (batch {batch})", "variant": name,
                     "images_per_s": round(ips, 1), "ratio": round(ips / base, 2),
                     "max_abs_diff_vs_eager": f"{err:.1e}", "first_call_s": round(first, 1)})
        print(rows[-1], flush=True)
    rows += _onnx_rows(eager, x, reference, base or 1.0, batch)
    return rows


def _onnx_rows(model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor, base: float,
               batch: int) -> list[dict[str, Any]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": x.numpy()})[0]
        start = time.perf_counter()
        for _ in range(3):
            out = sess.run(None, {"x": x.numpy()})[0]
        ips = 3 * batch / (time.perf_counter() - start)
    err = float((torch.from_numpy(out) - reference).abs().max())
    row = {"section": f"engine (batch {batch})", "variant": "onnxruntime",
           "images_per_s": round(ips, 1), "ratio": round(ips / base, 2),
           "max_abs_diff_vs_eager": f"{err:.1e}", "first_call_s": None}
    print(row, flush=True)
    return [row]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="fewer layouts, no compile")
    args = ap.parse_args(argv)
    jpegs = photo_jpegs(args.images)
    rows = decode_rows(jpegs)
    if not args.quick:
        rows += engine_rows()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_model(Path(tmp)) if onnxruntime_available() else None
        layout, best = best_layout(jpegs, onnx_path, args.quick)
        rows += layout
        engines = ["eager"] + (["onnxruntime"] if onnx_path else [])
        lat = {e: latency_batch1(jpegs, 1, e, onnx_path) for e in engines}
    for e, p in lat.items():
        rows.append({"section": "latency (batch 1, 1 thread, in-process)", "engine": e, **p})
    write_results("pipeline", {"best_layout": best, "latency_batch1": lat}, rows, [
        f"best in-process layout: {best['engine']}, {best['processes']} process(es) x "
        f"{best['threads']} thread(s), batch {best['batch']}: {best['images_per_s']} images/s",
        "ratios: decode = speed-up over Pillow full decode; engine/layout = images/s over the "
        "section's first row",
    ])


if __name__ == "__main__":
    main()
