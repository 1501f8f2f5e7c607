# visionloop: one image for the Ray head (Serve app + training controller) and the Ray workers.
#
#   docker build -t visionloop:latest .
#   docker build --build-arg BASE_IMAGE=visionloop-base:bookworm --network host -t visionloop:latest .
#
# BASE_IMAGE must be Debian-like with python3 >= 3.11 (tomllib) and the venv module; the default
# is the public slim image. Where no registry can be reached, .ci/docker-setup.sh builds a local
# stand-in (debootstrap'd bookworm) and tags it visionloop-base:bookworm.
#
# Layers, slowest-changing first: the Python dependencies are installed from pyproject.toml
# alone (so editing training/ or service/ reuses that multi-GB layer), then the package itself
# with --no-deps. torch/torchvision/ray are pinned to the versions the test suite runs against.
# PyPI's Linux torch wheels are the CUDA builds (they also run on CPU); for a CPU-only image about
# 4 GB smaller, add the PyTorch CPU index:
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG RAY_VERSION=2.60.0
# Read by pip itself during the RUN steps below; empty means PyPI only.
ARG PIP_EXTRA_INDEX_URL=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Non-root user; /data is created here, owned by that user, so a new named volume mounted there
# starts out writable by it (Docker copies the image's ownership into an empty volume).
RUN groupadd --gid 1000 visionloop \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash visionloop \
    && mkdir -p /data /app \
    && chown visionloop:visionloop /data /app \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app

# Dependencies only: this layer is rebuilt when pyproject.toml or a pin changes, not for code.
COPY pyproject.toml ./
RUN printf 'torch==%s\ntorchvision==%s\nray==%s\n' \
        "$TORCH_VERSION" "$TORCHVISION_VERSION" "$RAY_VERSION" >/tmp/constraints.txt \
    && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' \
        >/tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm -f /tmp/requirements.txt /tmp/constraints.txt \
    && python -c 'import torch, torchvision, ray; print("torch", torch.__version__, "torchvision", torchvision.__version__, "ray", ray.__version__)'

# The package (fast): code only, dependencies already present.
COPY --chown=visionloop:visionloop training/ ./training/
COPY --chown=visionloop:visionloop service/ ./service/
COPY --chown=visionloop:visionloop pyproject.toml README.m[d] ./
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info

COPY docker/visionloop-node.sh /usr/local/bin/visionloop-node
COPY docker/healthcheck.py /usr/local/bin/visionloop-healthcheck

# Everything the service writes lives on the volume (VISIONLOOP_HOME); caches too.
ENV VISIONLOOP_HOME=/data \
    TORCH_HOME=/data/cache/torch \
    XDG_CACHE_HOME=/data/cache \
    RAY_USAGE_STATS_ENABLED=0

USER 1000:1000
# Run from home, not /app: the installed package in site-packages is the one that is imported.
WORKDIR /home/visionloop
# matplotlib's font cache, built once here instead of at every fresh start (about 8 s).
ENV MPLCONFIGDIR=/home/visionloop/.cache/matplotlib
RUN python -c 'import matplotlib.font_manager'
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["visionloop-node"]
CMD ["head"]
