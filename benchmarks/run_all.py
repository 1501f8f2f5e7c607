"""Every benchmark, one after another, each in its own process (each starts and stops its own
Ray cluster): `make bench`, or `python -m benchmarks.run_all [--quick]`.

    benchmarks.pipeline            the in-process pipeline: engines, layouts, batch-1 latency
    benchmarks.serving             served over HTTP, Serve's Python proxy (`visionloop up`)
    benchmarks.serving --haproxy   served over HTTP, Serve's HAProxy front end (compose)
    benchmarks.training            Ray Train against the plain PyTorch loop

Each writes its `benchmarks/results/<name>.json` and `.md`; a failing one is reported and the
rest still run; the exit status is non-zero if any failed. `benchmarks.gpu` is not in the set:
it needs a CUDA device (see benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

RUNS: list[list[str]] = [
    ["benchmarks.pipeline"],
    ["benchmarks.serving"],
    ["benchmarks.serving", "--haproxy"],
    ["benchmarks.training"],
]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="pass --quick to the benchmarks that have it (pipeline, serving)")
    args = ap.parse_args(argv)
    failed: list[str] = []
    for run in RUNS:
        cmd = [sys.executable, "-m", *run]
        if args.quick and run[0] in ("benchmarks.pipeline", "benchmarks.serving"):
            cmd.append("--quick")
        print(f"== {' '.join(cmd[2:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        print(f"== {' '.join(cmd[2:])}: exit {rc} after {time.monotonic() - t0:.0f} s",
              flush=True)
        if rc:
            failed.append(" ".join(run))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
