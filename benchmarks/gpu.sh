#!/usr/bin/env bash
# The GPU check, one prepared script for a lent GPU machine (PyTorch there, no Ray, no network):
# the product's own training loop (training.loop.run_worker under torch.distributed with NCCL)
# and the served Classifier; sized to end inside the 470 s limit below (not yet run on a GPU).
#   bash benchmarks/gpu.sh            results in $OUT (device tool) or benchmarks/results/
# Python packages that machine lacks travel as wheels in .whl/ (ignored by git; carry it). It
# has torch, torchvision, numpy, pillow, filelock and safetensors; it lacks pydantic. Fetch here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
python3 -c "import pydantic" 2>/dev/null || {
  echo "pydantic is missing: put its wheels in .whl/ (see the top of $0)" >&2; exit 2; }
export VISIONLOOP_BENCH_OUT="${OUT:-benchmarks/results}"
nvidia-smi -L || true
PYTHONUNBUFFERED=1 timeout 470 python3 -m benchmarks.gpu "$@"
