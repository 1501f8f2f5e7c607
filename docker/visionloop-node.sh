#!/usr/bin/env bash
# Container entrypoint: one image, two roles.
#
#   visionloop-node head     Ray head node, then `visionloop up` (Serve app + training controller)
#                            attached to it through RAY_ADDRESS; exits with the service's status.
#   visionloop-node worker   a Ray worker node that joins RAY_HEAD_ADDRESS and blocks; it exits
#                            (non-zero) when its raylet dies, e.g. when the head went away, so the
#                            container's restart policy brings it back and it joins again.
#   anything else            run as given (`docker compose run --rm head visionloop models`).
#
# Settings read here (the service validates its own VISIONLOOP_* settings at start; its error,
# naming the variable, is printed as is and makes this script exit non-zero):
#   VISIONLOOP_HOME            the data volume (default /data); must be writable
#   VISIONLOOP_PORT            HTTP port of the service (default 8000)
#   RAY_AUTH_MODE              token (default) or disabled
#   RAY_AUTH_TOKEN             the cluster's shared token; when given, it wins. When not, the
#                              token file below is used: the head generates it on first start
#                              (0600), so every node that mounts the same volume joins with it
#   RAY_AUTH_TOKEN_PATH        that file (default $VISIONLOOP_HOME/secrets/ray-token); Ray reads
#                              the same variable, so compose sets it for `docker compose exec`
#   RAY_HEAD_ADDRESS           worker only: the head's GCS (default head:6379)
#   VISIONLOOP_HEAD_NUM_CPUS   logical CPUs the head offers to Ray (default 0, Ray's advice for
#                              a head node): the Serve replicas reserve 0 CPUs
#                              (VISIONLOOP_CLASSIFIER_CPUS) and Ray Train's controller too, so
#                              they still run here, while every training worker (1 CPU each)
#                              lands on a worker node. Reserve classifier CPUs? Raise this to
#                              match, but below classifier CPUs + 1 to keep training off the head
#   VISIONLOOP_NODE_NUM_CPUS   logical CPUs a worker offers (default: what the container sees)
#   RAY_OBJECT_STORE_MEMORY    bytes of object store per node (default 1 GB; keep shm_size above)
#   VISIONLOOP_WORKER_WAIT_S   how long a worker waits for the head's GCS (default 180)
set -euo pipefail

log() { printf '[visionloop-node] %s\n' "$*" >&2; }
die() { log "error: $1"; exit "${2:-64}"; }

require_uint() { # NAME VALUE
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

check_common() {
  export VISIONLOOP_HOME="${VISIONLOOP_HOME:-/data}"
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  case "$RAY_AUTH_MODE" in
    token | disabled) ;;
    *) die "RAY_AUTH_MODE must be 'token' or 'disabled', got '$RAY_AUTH_MODE'" ;;
  esac
  OBJECT_STORE="${RAY_OBJECT_STORE_MEMORY:-1000000000}"
  require_uint RAY_OBJECT_STORE_MEMORY "$OBJECT_STORE"
  if ! mkdir -p "$VISIONLOOP_HOME/cache" 2>/dev/null || [ ! -w "$VISIONLOOP_HOME" ]; then
    die "VISIONLOOP_HOME=$VISIONLOOP_HOME is not writable by uid $(id -u); mount a volume there (the compose file does) or chown it to $(id -u):$(id -g)"
  fi
  TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$VISIONLOOP_HOME/secrets/ray-token}"
}

# The Ray token, in order: RAY_AUTH_TOKEN given to this node; the token file on the shared
# volume. A file that exists but is empty or unreadable is refused, not replaced: this script
# never leaves one (it writes under a temporary name first), so something else is wrong (an
# owner, a mount), and a new token would lock out the nodes that hold the old one.
# -> 0 and RAY_AUTH_TOKEN exported when found; 1 when neither is there.
load_ray_token() {
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    export RAY_AUTH_TOKEN
    return 0
  fi
  [ -e "$TOKEN_FILE" ] || return 1
  local token=""
  if [ -r "$TOKEN_FILE" ]; then
    token=$(tr -d '[:space:]' <"$TOKEN_FILE")
  fi
  if [ -z "$token" ]; then
    die "the Ray token file $TOKEN_FILE is empty or unreadable by uid $(id -u); remove it (the head then generates a new one; restart every node) or set RAY_AUTH_TOKEN" 78
  fi
  RAY_AUTH_TOKEN="$token"
  export RAY_AUTH_TOKEN
  return 0
}

# Head, no token given and none on the volume yet: generate one into TOKEN_FILE (0600). Written
# under a temporary name, fsynced, then hard-linked into place: the link is atomic and never
# replaces a file, so two heads starting on one volume end up with the same token (the first).
generate_ray_token() {
  python - "$TOKEN_FILE" <<'PY' || die "could not write the Ray token file $TOKEN_FILE (above)" 73
import os
import secrets
import sys

path = sys.argv[1]
folder = os.path.dirname(path) or "."
os.makedirs(folder, mode=0o700, exist_ok=True)
tmp = f"{path}.{os.getpid()}.tmp"
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
try:
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
finally:
    os.unlink(tmp)
dir_fd = os.open(folder, os.O_RDONLY)
try:
    os.fsync(dir_fd)
finally:
    os.close(dir_fd)
PY
}

# The service's own settings check, run before Ray starts so that a bad VISIONLOOP_* value
# stops the container within seconds, its message the last thing in the log. `visionloop up`
# checks again (the authority); where the package has no such function this check is skipped.
check_service_settings() {
  python - <<'PY' || die "invalid settings (above); fix them in .env or the environment" 78
import sys

try:
    from service.settings import SettingsError, load_settings
except ImportError:
    sys.exit(0)
try:
    load_settings()
except SettingsError as exc:
    print(f"visionloop: {exc}", file=sys.stderr)
    sys.exit(1)
PY
}

run_head() {
  check_common
  check_service_settings
  local port="${VISIONLOOP_PORT:-8000}" cpus="${VISIONLOOP_HEAD_NUM_CPUS:-0}"
  require_uint VISIONLOOP_PORT "$port"
  require_uint VISIONLOOP_HEAD_NUM_CPUS "$cpus"
  if [ "$RAY_AUTH_MODE" = token ]; then
    if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
      log "Ray token: RAY_AUTH_TOKEN from the environment"
    elif load_ray_token; then
      log "Ray token: $TOKEN_FILE"
    else
      generate_ray_token
      load_ray_token || die "the Ray token file $TOKEN_FILE vanished right after it was written" 73
      log "generated the cluster's Ray token into $TOKEN_FILE (mode 0600): every node that mounts this volume joins with it; set RAY_AUTH_TOKEN on every node to use your own"
    fi
  fi

  log "starting the Ray head (GCS :6379, ${cpus} logical CPU(s) offered to Ray, dashboard :8265)"
  # RAY_ADDRESS (compose sets `auto` for `docker compose exec head visionloop ...`) is for the
  # processes that join this cluster, not for the command that starts it.
  env -u RAY_ADDRESS ray start --head --port=6379 --num-cpus="$cpus" \
    --object-store-memory="$OBJECT_STORE" \
    --include-dashboard=true --dashboard-host=0.0.0.0 --dashboard-port=8265 \
    --resources='{"visionloop_head": 1}' --disable-usage-stats \
    || die "ray start --head failed (see the lines above)" 70

  # Run the service as a child, not with exec, so that after it stops the Ray head is stopped
  # too and the container exits with the service's own status (a settings error included).
  local child rc
  RAY_ADDRESS="${RAY_ADDRESS:-auto}" visionloop up --host 0.0.0.0 --port "$port" &
  child=$!
  # Forwarded as SIGINT: `ray.init` replaces a driver's SIGTERM handler with a plain exit; a CLI
  # that re-installs its handlers after ray.init stops gracefully on either, older ones only on
  # SIGINT, so SIGINT works with both.
  trap 'log "stopping: asking visionloop up to shut Serve down"; kill -INT "$child" 2>/dev/null || true' TERM INT
  rc=0
  # `wait` returns early when a trapped signal arrives; keep waiting until the child is gone.
  while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - TERM INT
  if [ "$rc" -ne 0 ]; then
    log "visionloop up exited with status $rc"
  fi
  ray stop --grace-period 10 >/dev/null 2>&1 || true
  exit "$rc"
}

run_worker() {
  check_common
  local head="${RAY_HEAD_ADDRESS:-head:6379}" wait_s="${VISIONLOOP_WORKER_WAIT_S:-180}"
  require_uint VISIONLOOP_WORKER_WAIT_S "$wait_s"
  local token_source="$TOKEN_FILE" cpu_args=()
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    token_source="RAY_AUTH_TOKEN from the environment"
  fi
  if [ -n "${VISIONLOOP_NODE_NUM_CPUS:-}" ]; then
    require_uint VISIONLOOP_NODE_NUM_CPUS "$VISIONLOOP_NODE_NUM_CPUS"
    cpu_args=(--num-cpus="$VISIONLOOP_NODE_NUM_CPUS")
  fi

  log "waiting for the Ray head at $head (up to ${wait_s} s)"
  local deadline=$((SECONDS + wait_s))
  # A TCP connect through bash, not `ray health-check` (that imports Ray, ~2 CPU-s a try, while
  # the head is starting on the same cores); `ray start` below then checks the token itself.
  until (exec 3<>"/dev/tcp/${head%:*}/${head##*:}") 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      if [ "$RAY_AUTH_MODE" = token ] && ! load_ray_token; then
        die "the Ray head at $head did not answer within ${wait_s} s (RAY_HEAD_ADDRESS), and this node has no Ray token: RAY_AUTH_TOKEN is not set and $TOKEN_FILE does not exist (the head writes it there on first start; mount its volume at VISIONLOOP_HOME, or set RAY_AUTH_TOKEN to the head's token)" 69
      fi
      die "the Ray head at $head did not answer within ${wait_s} s (RAY_HEAD_ADDRESS)" 69
    fi
    sleep 2
  done
  # The head writes a generated token before its GCS listens, so once the GCS answers, a node
  # that shares the head's volume finds the token there.
  if [ "$RAY_AUTH_MODE" = token ]; then
    if load_ray_token; then
      log "Ray token: $token_source"
    else
      die "no Ray token to join $head with: RAY_AUTH_TOKEN is not set and $TOKEN_FILE does not exist (the head writes it there on first start when no token is given). Mount the head's volume at VISIONLOOP_HOME (RAY_AUTH_TOKEN_PATH), or set RAY_AUTH_TOKEN to the head's token" 78
    fi
  fi

  log "joining $head"
  # --block: stay in the foreground and exit when a Ray process of this node dies; a raylet that
  # loses the head's GCS for longer than RAY_gcs_rpc_server_reconnect_timeout_s dies.
  exec ray start --address="$head" --block "${cpu_args[@]}" \
    --object-store-memory="$OBJECT_STORE" \
    --resources='{"visionloop_worker": 1}' --disable-usage-stats
}

role="${1:-head}"
case "$role" in
  head) run_head ;;
  worker) run_worker ;;
  *) exec "$@" ;;
esac
