"""Every benchmark, one after another, each in its own process (each starts and stops its own
Ray cluster), then the README's performance table: `make bench`, or
`python -m benchmarks.run_all [--quick] [--only NAME ...]`.

    benchmarks.pipeline            the in-process pipeline: engines, layouts, batch-1 latency
    benchmarks.serving             one table from one run: the in-process limit, `visionloop
                                   up`'s defaults (cold start, memory), the peers, other
                                   layouts on the default front end, hot reload
    benchmarks.serving --front-end haproxy
                                   the layouts again on Serve's HAProxy front end (the
                                   front end of `visionloop up` and compose; the main run's
                                   layouts use the Python proxy)
    benchmarks.training            Ray Train against the plain PyTorch loop, feature cache
    benchmarks.retrain             POST /v1/train to the new version answering, by stage
    benchmarks.predict_dir         batch prediction (Ray Data) against the served path
    benchmarks.web                 the web page's weight and load times (headless chromium)
    benchmarks.readme              renders README.md's performance table from the results

The order: the in-process pipeline first (it is the reference the served figures are read
against, and the quickest to show a broken environment), serving next (its own run measures
the in-process limit and the peers again, so its ratios never mix runs), then training and
the rest, and the README last, from whatever the runs wrote. A benchmark whose module is not
there is skipped and named; a failing one is reported and the rest still run; the exit status
is non-zero if any failed (the README is rendered all the same: a row of a failed run keeps
its previous results file, with that file's date). `benchmarks.gpu` is not in the set: it
needs a CUDA device (see benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).parent

# (module and arguments, whether it takes --quick)
RUNS: list[tuple[list[str], bool]] = [
    (["benchmarks.pipeline"], True),
    (["benchmarks.serving"], True),
    (["benchmarks.serving", "--front-end", "haproxy"], True),
    (["benchmarks.training"], False),
    (["benchmarks.retrain"], True),
    (["benchmarks.predict_dir"], True),
    (["benchmarks.web"], False),
    (["benchmarks.readme"], False),
]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="pass --quick to the benchmarks that have it (for development: the "
                         "README table then says which rows come from a --quick run)")
    ap.add_argument("--only", nargs="+", metavar="NAME", default=None,
                    help="run only these (e.g. serving retrain readme)")
    args = ap.parse_args(argv)
    failed: list[str] = []
    t_all = time.monotonic()
    for run, takes_quick in RUNS:
        name = run[0].split(".", 1)[1]
        if args.only and name not in args.only:
            continue
        if not (HERE / f"{name}.py").exists():
            print(f"== {' '.join(run)}: skipped (no benchmarks/{name}.py)", flush=True)
            continue
        cmd = [sys.executable, "-m", *run]
        if args.quick and takes_quick:
            cmd.append("--quick")
        print(f"== {' '.join(cmd[2:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        print(f"== {' '.join(cmd[2:])}: exit {rc} after {time.monotonic() - t0:.0f} s",
              flush=True)
        if rc:
            failed.append(" ".join(run))
    print(f"== all: {time.monotonic() - t_all:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
