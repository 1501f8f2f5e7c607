"""In-process inference: where the time goes and the fastest layout, without any serving.

    python -m benchmarks.pipeline [--images 64] [--quick]

Measures, on 640x480 photo-like JPEGs and efficientnet_lite0 (ImageNet head, version 0):
- decode (CPU ms per image, 1 thread): Pillow full decode; draft mode to a short side >= the
  preset's resize (what the service does, `training.inference.draft_size`), >= 2x the crop,
  >= the crop (not taken: see `training.inference`); torchvision.io;
- preprocess: the preset's torchvision transform vs the fast path the service runs
  (`training.inference.preprocess_into`: the preset's uint8 resize on a channels-last view of
  the pixels, the crop as a view, one numpy multiply-subtract straight into the input batch),
  with the max abs difference of the tensors;
- engine (1 thread, batch 1 and 8): eager PyTorch, ONNX Runtime with only the thread count set,
  and with the options the service uses (`training.inference.session_options`) plus variants of
  them (graph optimisation level, memory arena), outputs checked against eager;
- stages: CPU time per image (`time.process_time`) of decode, preprocess and engine in the
  served pipeline and in the one the service ran before, batch 1 and 8: the gap explained;
- layout: processes x threads x batch for the whole pipeline (decode + preprocess + engine),
  each process looping over its own copy of the images (no per-image IPC), started together;
  images/s and each stage's CPU ms per image (`time.process_time`, engine threads included).
  The best row of the served pipeline is "the best in-process pipeline" the serving benchmark
  compares against;
- latency: batch-1 p50/p95/p99 on 1 thread, the figure the serving 1-client p50 is held to.
The baseline of each section is its first row; every row reports its ratio to it.
--quick: fewer images and repetitions, no engine variants beyond the served one, fewer layouts.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import percentiles, photo_jpegs, write_results
from training.inference import onnxruntime_available

MODEL = "efficientnet_lite0"
STAGES = ("decode", "preprocess", "engine")

_state: dict[str, Any] = {}


def _init_worker(threads: int, engine: str = "onnxruntime", onnx_path: str | None = None,
                 pipeline: str = "served") -> None:
    """Load the engine in this process. `pipeline`: "served" (the service's fast path) or
    "before" (the preset's torchvision transform + torch.stack + the engine's torch call, as
    the service ran before); both draft-decode JPEGs to the preset's resize."""
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
    _state.update(model=model, preset=EvalPreset(), engine=engine, pipeline=pipeline,
                  cpu=dict.fromkeys(STAGES, 0.0), images=0)


def _reset_cpu() -> None:
    _state["cpu"] = dict.fromkeys(STAGES, 0.0)
    _state["images"] = 0


def _run_batch(batch: Sequence[bytes]) -> int:
    """decode + preprocess + engine (+ softmax) for one batch, each stage's CPU time (of the
    process, so that the engine's intra-op threads count) added to `_state["cpu"]`;
    -> images done."""
    from training.imageio import decode_image
    from training.inference import draft_size, logits, preprocess_batch

    preset, model, cpu = _state["preset"], _state["model"], _state["cpu"]
    t0 = time.process_time()
    if _state["pipeline"] == "served":
        images = [decode_image(b, draft_size=draft_size(preset)) for b in batch]
        t1 = time.process_time()
        x = preprocess_batch(images, preset)
        t2 = time.process_time()
        logits(model, x).softmax(1)
    else:
        images = [decode_image(b, draft_size=draft_size(preset)) for b in batch]
        t1 = time.process_time()
        xt = torch.stack([preset(img) for img in images])
        t2 = time.process_time()
        with torch.inference_mode():
            model(xt).softmax(1)
    t3 = time.process_time()
    cpu["decode"] += t1 - t0
    cpu["preprocess"] += t2 - t1
    cpu["engine"] += t3 - t2
    _state["images"] += len(batch)
    return len(batch)


def _cpu_ms_per_image() -> dict[str, float]:
    n = max(1, _state["images"])
    return {f"{s}_cpu_ms": round(_state["cpu"][s] / n * 1000, 2) for s in STAGES}


def _layout_worker(jpegs: list[bytes], init: tuple[Any, ...], batch: int, rounds: int,
                   barrier: Any, results: Any) -> None:
    _init_worker(*init)
    batches = [jpegs[i:i + batch] for i in range(0, len(jpegs), batch)]
    for b in batches[:2]:
        _run_batch(b)  # warm-up: arena, caches, lazy imports
    _reset_cpu()
    barrier.wait()
    start = time.perf_counter()
    done = sum(_run_batch(b) for _ in range(rounds) for b in batches)
    results.put((done, start, time.perf_counter(), _state["cpu"]))


def pipeline_throughput(jpegs: list[bytes], processes: int, threads: int, batch: int,
                        engine: str = "onnxruntime", onnx_path: str | None = None,
                        rounds: int = 2, pipeline: str = "served") -> float:
    """images/s of the whole pipeline (`pipeline_run`)."""
    return float(pipeline_run(jpegs, processes, threads, batch, engine, onnx_path, rounds,
                              pipeline)["images_per_s"])


def pipeline_run(jpegs: list[bytes], processes: int, threads: int, batch: int,
                 engine: str = "onnxruntime", onnx_path: str | None = None,
                 rounds: int = 2, pipeline: str = "served") -> dict[str, Any]:
    """images/s of the whole pipeline with `processes` x `threads`: each process loops over
    its own copy of the images `rounds` times, all released together after their warm-up;
    -> images_per_s (all images / first start to last end) and each stage's CPU ms/image."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    init = (threads, engine, onnx_path, pipeline)
    procs = [ctx.Process(target=_layout_worker,
                         args=(jpegs, init, batch, rounds, barrier, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    outs = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    done = sum(o[0] for o in outs)
    wall = max(o[2] for o in outs) - min(o[1] for o in outs)
    cpu = {f"{s}_cpu_ms": round(sum(o[3][s] for o in outs) / done * 1000, 2) for s in STAGES}
    return {"images_per_s": round(done / wall, 1), **cpu}


def latency_batch1(jpegs: list[bytes], threads: int, engine: str = "onnxruntime",
                   onnx_path: str | None = None, n: int = 40,
                   pipeline: str = "served", with_cpu: bool = False) -> dict[str, float]:
    """p50/p95/p99 of one image through the whole pipeline, in this process (`with_cpu`:
    and each stage's CPU ms per image)."""
    _init_worker(threads, engine, onnx_path, pipeline)
    for b in jpegs[:3]:
        _run_batch([b])
    _reset_cpu()
    samples = []
    for b in (jpegs * (n // len(jpegs) + 1))[:n]:
        t = time.perf_counter()
        _run_batch([b])
        samples.append(time.perf_counter() - t)
    return {**percentiles(samples), **(_cpu_ms_per_image() if with_cpu else {})}


def layouts_for(cpus: int, onnx: bool, quick: bool) -> list[tuple[int, int, int, str, str]]:
    """(processes, threads, batch, engine, pipeline) rows; the first is the baseline: the
    service's pipeline before, at its best layout of the old results."""
    engine = "onnxruntime" if onnx else "eager"
    rows = [(cpus, 1, 8, engine, "before"), (1, cpus, 1, engine, "served")]
    if cpus > 1:
        rows += [(cpus, 1, 1, engine, "served"), (cpus, 1, 8, engine, "served")]
    if not quick:
        rows += [(1, cpus, 8, engine, "served"), (1, 1, 1, engine, "served"),
                 (cpus, 1, 1, engine, "before")]
        if onnx:
            rows += [(1, cpus, 16, "eager", "served"), (cpus, 1, 8, "eager", "served")]
    return rows


def best_layout(jpegs: list[bytes], onnx_path: str | None, quick: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sweep processes x threads x batch; the best row is of the served pipeline."""
    cpus = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    base = None
    for p, t, b, engine, pipeline in layouts_for(cpus, onnx_path is not None, quick):
        r = pipeline_run(jpegs, p, t, b, engine, onnx_path, rounds=2 if quick else 4,
                         pipeline=pipeline)
        base = base or r["images_per_s"]
        rows.append({"section": "layout", "pipeline": pipeline, "engine": engine,
                     "processes": p, "threads": t, "batch": b, **r,
                     "ratio": round(r["images_per_s"] / base, 2)})
        print(rows[-1], flush=True)
    best = max((r for r in rows if r["pipeline"] == "served"), key=lambda r: r["images_per_s"])
    return rows, best


def _cpu_ms(fn: Callable[[], Any], items: int, repeat: int) -> float:
    """CPU ms per item of this thread for fn (after one warm-up call), best of `repeat`: the
    least-disturbed run on a shared machine."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best / items * 1000


def decode_rows(jpegs: list[bytes], repeat: int) -> list[dict[str, Any]]:
    from PIL import Image
    from torchvision.io import decode_jpeg

    from training.imageio import decode_image
    from training.inference import draft_size
    from training.presets import EvalPreset

    preset = EvalPreset()
    torch.set_num_threads(1)
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("pillow full decode",
         lambda: [Image.open(io.BytesIO(b)).convert("RGB").load() for b in jpegs]),
        (f"draft, short side >= resize {draft_size(preset)} (served)",
         lambda: [decode_image(b, draft_size=draft_size(preset)) for b in jpegs]),
        (f"draft, short side >= 2x crop {2 * preset.crop}",
         lambda: [decode_image(b, draft_size=2 * preset.crop) for b in jpegs]),
        (f"draft, short side >= crop {preset.crop} (not taken: changes answers)",
         lambda: [decode_image(b, draft_size=preset.crop) for b in jpegs]),
        ("torchvision.io decode_jpeg",
         lambda: [decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
                  for b in jpegs]),
    ]
    rows, base = [], None
    for name, fn in variants:
        ms = _cpu_ms(fn, len(jpegs), repeat)
        base = base or ms
        rows.append({"section": "decode (1 thread)", "variant": name,
                     "cpu_ms_per_image": round(ms, 2), "ms_per_image": round(ms, 2),
                     "ratio": round(base / ms, 2)})
        print(rows[-1], flush=True)
    return rows


def preprocess_rows(jpegs: list[bytes], repeat: int) -> list[dict[str, Any]]:
    from training.imageio import decode_image
    from training.inference import draft_size, preprocess_batch
    from training.presets import EvalPreset

    preset = EvalPreset()
    torch.set_num_threads(1)
    images = [decode_image(b, draft_size=draft_size(preset)) for b in jpegs]
    reference = torch.stack([preset(img) for img in images]).numpy()
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("EvalPreset (torchvision v2) + torch.stack (before)",
         lambda: torch.stack([preset(img) for img in images])),
        ("preprocess_into: channels-last uint8 resize, crop view, numpy into the batch "
         "(served)",
         lambda: preprocess_batch(images, preset)),
    ]
    rows, base = [], None
    for name, fn in variants:
        ms = _cpu_ms(fn, len(images), repeat)
        out = np.asarray(fn())
        base = base or ms
        rows.append({"section": "preprocess (1 thread)", "variant": name,
                     "cpu_ms_per_image": round(ms, 2), "ratio": round(base / ms, 2),
                     "max_abs_diff_vs_eager": f"{float(np.abs(out - reference).max()):.1e}"})
        print(rows[-1], flush=True)
    return rows


def _calls(fn: Callable[[np.ndarray], Any], x: np.ndarray, calls: int) -> Callable[[], Any]:
    return lambda: [fn(x) for _ in range(calls)]


def engine_rows(onnx_path: str | None, quick: bool, repeat: int) -> list[dict[str, Any]]:
    """CPU ms per image of the engine alone, 1 thread, batch 1 and 8."""
    from training.inference import OnnxModule, session_options
    from training.model import build_model

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    eager = build_model(MODEL, num_classes=None, pretrained=True).eval()
    variants: list[tuple[str, Callable[[np.ndarray], Any]]] = [
        ("eager", lambda x: eager(torch.from_numpy(x)))]
    if onnx_path:
        import onnxruntime as ort

        def session(opts: Any) -> Callable[[np.ndarray], Any]:
            sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
            return lambda x: sess.run(None, {"x": x})[0]

        threads_only = ort.SessionOptions()  # ONNX Runtime's defaults but one thread
        threads_only.intra_op_num_threads = 1
        basic = session_options(1)
        basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        no_arena = session_options(1)
        no_arena.enable_cpu_mem_arena = False
        if not quick:
            variants += [("onnxruntime, intra threads only", session(threads_only)),
                         ("onnxruntime, served options but ORT_ENABLE_BASIC", session(basic)),
                         ("onnxruntime, served options but no memory arena", session(no_arena))]
        module = OnnxModule(Path(onnx_path), threads=1)
        variants.append(("onnxruntime, served options (session_options)", module.run))
    rows: list[dict[str, Any]] = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224, generator=g).numpy()
        with torch.inference_mode():
            reference = eager(torch.from_numpy(x)).numpy()
        base = None
        for name, fn in variants:
            calls = max(1, 16 // batch)
            with torch.inference_mode():
                ms = _cpu_ms(_calls(fn, x, calls), calls * batch, repeat)
                out = np.asarray(fn(x))
            base = base or ms
            rows.append({"section": f"engine (1 thread, batch {batch})", "variant": name,
                         "cpu_ms_per_image": round(ms, 2),
                         "images_per_s": round(1000 / ms, 1), "ratio": round(base / ms, 2),
                         "max_abs_diff_vs_eager":
                             f"{float(np.abs(out - reference).max()):.1e}"})
            print(rows[-1], flush=True)
    return rows


def stage_rows(jpegs: list[bytes], onnx_path: str | None) -> list[dict[str, Any]]:
    """Each stage's CPU ms per image, 1 thread, in this process: served vs before."""
    engine = "onnxruntime" if onnx_path else "eager"
    rows = []
    for pipeline in ("before", "served"):
        for batch in (1, 8):
            _init_worker(1, engine, onnx_path, pipeline)
            batches = [jpegs[i:i + batch] for i in range(0, len(jpegs), batch)]
            for b in batches[:2]:
                _run_batch(b)
            _reset_cpu()
            for b in batches:
                _run_batch(b)
            cpu = _cpu_ms_per_image()
            rows.append({"section": "stages (CPU ms per image, 1 thread)", "pipeline": pipeline,
                         "engine": engine, "batch": batch, **cpu,
                         "total_cpu_ms": round(sum(cpu.values()), 2)})
            print(rows[-1], flush=True)
    return rows


def export_model(folder: Path) -> str:
    """efficientnet_lite0 (v0) as ONNX, for the onnxruntime rows."""
    from training.inference import export_onnx
    from training.model import build_model

    path = folder / "model.onnx"
    export_onnx(build_model(MODEL, num_classes=None, pretrained=True), path, 224)
    return str(path)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None, help="default 64 (32 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer images, repetitions, engine variants and layouts")
    args = ap.parse_args(argv)
    n = args.images or (32 if args.quick else 64)
    repeat = 2 if args.quick else 5
    jpegs = photo_jpegs(n)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_model(Path(tmp)) if onnxruntime_available() else None
        rows = decode_rows(jpegs, repeat) + preprocess_rows(jpegs, repeat)
        rows += engine_rows(onnx_path, args.quick, repeat)
        rows += stage_rows(jpegs, onnx_path)
        layout, best = best_layout(jpegs, onnx_path, args.quick)
        rows += layout
        engine = "onnxruntime" if onnx_path else "eager"
        lat = {"served": latency_batch1(jpegs, 1, engine, onnx_path,
                                        n=40 if args.quick else 200, with_cpu=True)}
        if not args.quick:
            lat["before"] = latency_batch1(jpegs, 1, engine, onnx_path, n=200,
                                           pipeline="before", with_cpu=True)
    for pipeline, p in lat.items():
        rows.append({"section": "latency (batch 1, 1 thread, in-process)", "pipeline": pipeline,
                     "engine": engine, **p})
    served = lat["served"]
    write_results("pipeline", {"best_layout": best, "latency_batch1": served,
                               "latency_batch1_by_pipeline": lat, "quick": args.quick}, rows, [
        f"best in-process pipeline: {best['engine']}, {best['processes']} process(es) x "
        f"{best['threads']} thread(s), batch {best['batch']}: {best['images_per_s']} images/s; "
        f"batch-1 p50 {served['p50_ms']} ms (1 thread)",
        "served = the service's pipeline (training.inference: draft decode to the resize, "
        "preprocess_into, ONNX Runtime with session_options on numpy); before = the same "
        "decode, EvalPreset's torchvision transform, torch.stack, the engine via torch",
        "ratios: decode/preprocess/engine = CPU-time speed-up over the section's first row; "
        "layout = images/s over the first row; *_cpu_ms = CPU time per image of a stage "
        "(time.process_time: the engine's threads included)",
    ])


if __name__ == "__main__":
    main()
