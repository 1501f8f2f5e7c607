#!/usr/bin/env bash
# The GPU check, one prepared script for a lent GPU machine (PyTorch there, no Ray, no network):
# the pure-torch training engine and the plain Classifier; fits in 8 minutes on one H100.
#   bash benchmarks/gpu.sh            results in $OUT (device tool) or benchmarks/results/
# Python packages that machine lacks travel as wheels in .whl/ (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export VISIONLOOP_BENCH_OUT="${OUT:-benchmarks/results}"
nvidia-smi -L || true
PYTHONUNBUFFERED=1 timeout 470 python3 -m benchmarks.gpu --budget-s 420 "$@"
