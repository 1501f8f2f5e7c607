"""python -m benchmarks.peers [--quick] [--duration S] [--install-only]

Publishes version 0 (efficientnet_lite0) into a temporary registry as our service does, then
measures TorchServe and BentoML on it with our load generator at 1 and 16 clients, prints the
rows and writes benchmarks/results/peers.json (and .md). `--install-only` makes the peers'
virtual environments and stops (installing is slow and needs no quiet machine: run it outside
the benchmark lock). See `benchmarks.peers.run` for what is the same on both sides.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import photo_jpegs, write_results
from benchmarks.peers.run import (
    PACKAGES,
    PeerUnavailable,
    ensure_v0,
    ensure_venv,
    measure_peers_detailed,
)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--duration", type=float, default=20, help="seconds per measured run")
    ap.add_argument("--quick", action="store_true", help="5 s runs, fewer layouts tried")
    ap.add_argument("--install-only", action="store_true")
    args = ap.parse_args(argv)
    if args.install_only:
        for peer in PACKAGES:
            try:
                _, seconds = ensure_venv(peer)
                print(peer, "installed" if seconds is None else f"installed in {seconds:.0f} s")
            except PeerUnavailable as exc:
                print(peer, "not installed:", exc)
        return
    duration = 5.0 if args.quick else args.duration
    jpegs = photo_jpegs(32)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visionloop-peers-home-") as home:
        model_dir = ensure_v0(Path(home))
        rows, details = measure_peers_detailed(model_dir, jpegs, [1, 16], duration, args.quick)
    notes = [f"{r['peer']}: not measured: {r['not_measured']}" for r in rows
             if "not_measured" in r]
    for peer, d in details.items():
        if "versions" in d:
            notes.append(f"{peer}: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()))
    for t in details.get("torchserve", {}).get("layouts_tried", []):
        notes.append(f"torchserve layout tried: {t['layout']}: {t['images_per_s']} images/s "
                     f"at 16 clients ({t['seconds']} s)")
    notes.append("same model file, preprocessing, load generator (benchmarks.serving.load) and "
                 "machine as ours; TorchServe's requests differ only in their path")
    write_results("peers", {"peers": details, "duration_s": duration, "quick": args.quick,
                            "wall_s": round(time.perf_counter() - start)}, rows, notes)


if __name__ == "__main__":
    main()
