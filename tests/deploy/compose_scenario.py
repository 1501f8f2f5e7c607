"""End-to-end check of the compose deployment, doing what a user does.

    python -m tests.deploy.compose_scenario    # from the repository root, with the project's venv

1. make sure a Docker engine answers (on a root Debian machine without one, run
   .ci/docker-setup.sh, which installs and starts one and builds the local base image);
2. build the image (`docker build`; the local base image where one exists, since no registry
   may be reachable; cached layers are reused);
3. `docker compose config` of every variant (GPU, CPU-only, + the API-token secret file), and
   the secret file reaches the head, readable by its uid;
4. a fresh clone's `docker compose up -d --wait` (CPU-only override unless Docker has an NVIDIA
   runtime) with no token given anywhere (no RAY_AUTH_TOKEN, no VISIONLOOP_API_TOKEN) and
   `--scale worker=3`, each worker offering Ray 1 CPU, in a project of its own
   (`visionloop-e2e`, its own volume, ports on 127.0.0.1 only): the head generates the Ray token
   into the volume (0600), every worker joins with it; the API token is read from the volume;
5. a node with neither the token nor the volume is refused by itself, naming both places;
6. POST an image to /v1/predict: version v0 (the pretrained backbone) answers;
7. POST labelled images to /v1/labels (API token), POST /v1/train with 2 workers: a worker
   offers 1 CPU, so the two land on two different worker containers (Ray's state API on the
   head says which); once the job has a checkpoint, `docker kill` one of the two containers;
   the job resumes from that checkpoint (`resumed_from_epoch` > 0) on the two containers left
   (the killed one stays down: Docker does not restart a container it was told to kill) and
   succeeds; /v1/predict then answers with the new version;
8. `docker compose down`, `up` again on the same volume with both tokens given: the given Ray
   token wins over the volume's, the given API token over the generated one, and the promoted
   version still answers;
9. a bad setting stops the head at start with a message naming the variable;
10. `docker compose down -v` (unless VISIONLOOP_E2E_KEEP=1).

Prints the duration of each step and the total. Exit status: 0 passed, 1 failed, 77 no Docker
engine could be had (the pytest wrapper, tests/deploy/test_compose.py, turns that into a
skip).

Environment: VISIONLOOP_E2E_IMAGE (default visionloop:e2e), VISIONLOOP_E2E_BASE_IMAGE (default
visionloop-base:bookworm when that image exists, else the Dockerfile's default),
VISIONLOOP_E2E_BUILD_NETWORK (default host), VISIONLOOP_E2E_GPU (1/0; default: whether Docker
has an nvidia runtime), VISIONLOOP_E2E_KEEP=1 (leave the stack and volume up at the end).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from service.cli import SERVE_STOP_TIMEOUT_S
from tests.support.images import COLOURS, encode, labelled_set, noisy_picture
from tests.support.waiting import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
PROJECT = "visionloop-e2e"
SKIP = 77
LOCAL_BASE_IMAGE = "visionloop-base:bookworm"
HEALTHY_TIMEOUT_S = 600
TRAIN_TIMEOUT_S = 900
SWAP_TIMEOUT_S = 120
# The bound on `docker compose down`, from the stop settings, not from a measurement: compose
# stops the workers first, in parallel, each draining at most RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
# (10 s, docker-compose.yml); then the head: the service's own stop, bounded by
# SERVE_STOP_TIMEOUT_S (its replicas' drain, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S = 3 s,
# inside it), then `ray stop --grace-period 10` (docker/visionloop-node.sh); 10 s more for Ray's
# teardown and Docker removing the containers and the network.
DOWN_BOUND_S = 10 + SERVE_STOP_TIMEOUT_S + 10 + 10
IMAGES_PER_LABEL = 16
IMAGE_SIZE = 96
LABELS = ["red", "blue"]
SECRETS_FILE = "docker/compose.secrets.yml"
# Where the head writes a generated Ray token (docker-compose.yml: RAY_AUTH_TOKEN_PATH).
RAY_TOKEN_FILE = "/data/secrets/ray-token"
API_TOKEN_FILE = "/data/secrets/api-token"
# The multi-node job: every worker container offers Ray one CPU and each Ray Train worker takes
# one, so the job's two workers cannot share a container, whatever Ray Train's placement
# strategy. A third container stays free: the job can resume there when one of its two is
# killed. Enough epochs that the job is still running well after its first checkpoint.
WORKER_CONTAINERS = 3
WORKER_CPUS = 1
TRAIN_WORKERS = 2
EPOCHS = 16
# Ray Train 2.60 (re)writes this file in the run's folder each time it registers a checkpoint:
# once it exists, a restarted worker group resumes from a checkpoint, not from epoch 0.
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"

# Run in the head: how the Ray token file looks, and which token the GCS server was started with
# (sha256 of each, never the token itself).
TOKEN_FACTS = r"""
import hashlib, json, pathlib, sys

def digest(text):
    return hashlib.sha256(text.encode()).hexdigest()

facts = {}
path = pathlib.Path(sys.argv[1])
if path.exists():
    st = path.stat()
    facts.update(file_mode=oct(st.st_mode & 0o777), file_uid=st.st_uid,
                 file_sha256=digest(path.read_text().strip()))
for proc in pathlib.Path("/proc").glob("[0-9]*"):
    try:
        if (proc / "comm").read_text().strip() != "gcs_server":
            continue
        env = (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        continue
    given = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RAY_AUTH_TOKEN=")]
    facts["gcs_sha256"] = digest(given[0].decode()) if given else None
    break
print(json.dumps(facts))
"""


class Skip(Exception):
    """No Docker engine can be had here: nothing to test."""


class Timings:
    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []
        self.start = time.monotonic()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        say(f"--- {name}")
        t0 = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - t0
            self.steps.append((name, took))
            say(f"--- {name}: {took:.1f} s")

    def report(self, outcome: str, record: dict[str, object] | None = None) -> None:
        """Print the step durations; with VISIONLOOP_E2E_TIMINGS=FILE also write them (and
        `record`, e.g. the image's size) to FILE as JSON, the record the README's deploy
        figures come from."""
        say("")
        say(f"compose e2e {outcome}; step durations:")
        for name, took in self.steps:
            say(f"  {took:7.1f} s  {name}")
        total = time.monotonic() - self.start
        say(f"  {total:7.1f} s  total")
        target = os.environ.get("VISIONLOOP_E2E_TIMINGS")
        if target:
            Path(target).write_text(json.dumps({
                "outcome": outcome, "date": time.strftime("%Y-%m-%d"),
                "steps_s": {name: round(took, 1) for name, took in self.steps},
                "total_s": round(total, 1), **(record or {})}, indent=2) + "\n")


def say(message: str) -> None:
    print(message, flush=True)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run(
    args: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    capture: bool = False,
    quiet: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `args` from the repository root. `capture`: stdout and stderr together in
    `.stdout`; `quiet`: stdout alone in `.stdout` (stderr still shown), for output to parse."""
    say("$ " + " ".join(a if len(a) < 200 else a[:60] + "..." for a in args))
    result = subprocess.run(
        list(args),
        cwd=REPO,
        env=env,
        text=True,
        timeout=timeout,
        check=False,
        stdout=subprocess.PIPE if capture or quiet else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if check and result.returncode != 0:
        if capture or quiet:
            say(result.stdout[-4000:])
        raise AssertionError(
            f"{args[0]} {args[1] if len(args) > 1 else ''} failed: {result.returncode}"
        )
    return result


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return (
        subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False).returncode
        == 0
    )


def ensure_engine() -> None:
    """Make `docker info` and `docker compose` answer, starting an engine per the recipe."""
    if engine_answers() and _compose_available():
        return
    setup = REPO / ".ci" / "docker-setup.sh"
    if os.geteuid() != 0:
        raise Skip("no Docker engine answers and not root, so .ci/docker-setup.sh cannot start one")
    if shutil.which("apt-get") is None and shutil.which("dockerd") is None:
        raise Skip("no Docker engine answers and neither dockerd nor apt-get is here to get one")
    result = run(["bash", str(setup)], timeout=1200, check=False)
    if result.returncode != 0 or not engine_answers():
        raise Skip(
            f".ci/docker-setup.sh could not start a Docker engine (exit {result.returncode})"
        )
    if not _compose_available():
        raise Skip("the Docker Compose v2 plugin is missing and could not be installed")


def _compose_available() -> bool:
    return (
        subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=60, check=False
        ).returncode
        == 0
    )


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", tag], capture_output=True, timeout=60, check=False
        ).returncode
        == 0
    )


def has_nvidia_runtime() -> bool:
    out = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return "nvidia" in out


class Stack:
    """One compose project: `docker compose -p visionloop-e2e -f ... --env-file ...`.

    The env file holds what keeps this stack apart from others on the machine (image tag,
    ports) and the worker size; tokens only once `give_tokens` put them there. With
    `--env-file`, Compose never reads the checkout's own `.env`."""

    def __init__(self, image: str, gpu: bool, workdir: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.port = free_port()
        self.dashboard_port = free_port()
        self.env_file = workdir / "e2e.env"
        self.files = ["docker-compose.yml"] + ([] if gpu else ["docker-compose.cpu.yml"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens: dict[str, str] = {}
        self.write_env()

    def write_env(self, **extra: str) -> None:
        values = {
            "VISIONLOOP_IMAGE": self.image,
            "VISIONLOOP_PUBLISH": f"127.0.0.1:{self.port}",
            "RAY_DASHBOARD_PORT": str(self.dashboard_port),
            "VISIONLOOP_WORKER_NUM_CPUS": str(WORKER_CPUS),
            **self.tokens,
            **extra,
        }
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def give_tokens(self, ray_token: str, api_token: str) -> None:
        self.tokens = {"RAY_AUTH_TOKEN": ray_token, "VISIONLOOP_API_TOKEN": api_token}
        self.write_env()

    def compose(self, *args: str, files: Sequence[str] | None = None) -> list[str]:
        cmd = ["docker", "compose", "-p", PROJECT, "--env-file", str(self.env_file)]
        for f in self.files if files is None else files:
            cmd += ["-f", f]
        return cmd + list(args)

    def up(self, workers: int) -> None:
        result = run(
            self.compose(
                "up", "-d", "--no-build", "--scale", f"worker={workers}",
                "--wait", "--wait-timeout", str(HEALTHY_TIMEOUT_S),
            ),
            timeout=HEALTHY_TIMEOUT_S + 120,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            self.dump_logs()
            raise AssertionError("docker compose up --wait did not get a healthy stack")

    def dump_logs(self) -> None:
        run(self.compose("ps", "-a"), timeout=60, check=False)
        run(self.compose("logs", "--no-color", "--tail", "150"), timeout=120, check=False)

    def down(self, volumes: bool = False, bound_s: float | None = None) -> None:
        """`docker compose down`; with `bound_s`, it must take less than that."""
        t0 = time.monotonic()
        run(self.compose("down", *(["-v"] if volumes else []), "--timeout", "120"), timeout=300)
        took = time.monotonic() - t0
        assert bound_s is None or took < bound_s, (
            f"docker compose down took {took:.1f} s, more than its bound of {bound_s:.0f} s")

    def exec_head(self, *args: str) -> str:
        """stdout of `args` run in the head container (stderr shown, not returned)."""
        return run(self.compose("exec", "-T", "head", *args), timeout=180, quiet=True).stdout

    def ray_list(self, *args: str) -> list[dict[str, Any]]:
        """`ray list ARGS` on the head (Ray's state API), as JSON."""
        out = self.exec_head("ray", "list", *args, "--format", "json", "--limit", "10000")
        return list(json.loads(out))

    def alive_workers(self) -> list[dict[str, Any]]:
        """The cluster's live worker nodes (not the head), from Ray's state API."""
        nodes = self.ray_list("nodes", "--detail")
        return [n for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"]]

    def token_facts(self) -> dict[str, Any]:
        return dict(json.loads(self.exec_head("python", "-c", TOKEN_FACTS, RAY_TOKEN_FILE)))

    @property
    def network(self) -> str:
        return f"{PROJECT}_default"

    def worker_containers(self) -> dict[str, str]:
        """Running worker containers: their IP on the compose network -> container name."""
        ids = run(self.compose("ps", "-q", "worker"), timeout=60, quiet=True).stdout.split()
        assert ids, "no worker container runs"
        out = run(
            ["docker", "inspect", "-f",
             "{{.Name}} {{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", *ids],
            timeout=60, quiet=True,
        ).stdout  # fmt: skip
        containers = {}
        for line in out.splitlines():
            name, *ips = line.split()
            for ip in ips:
                containers[ip] = name.lstrip("/")
        return containers


def container_state(name: str) -> tuple[str, int]:
    """(Docker's status of container `name`, how often Docker restarted it)."""
    out = run(
        ["docker", "inspect", "-f", "{{.State.Status}} {{.RestartCount}}", name],
        timeout=60,
        quiet=True,
    ).stdout.split()
    return out[0], int(out[1])


def predict(client: Any, url: str, image: bytes) -> dict[str, Any]:
    response = client.post(
        f"{url}/v1/predict",
        files=[("files", ("probe.png", image, "image/png"))],
        params={"top_k": 3},
    )
    assert response.status_code == 200, f"predict: {response.status_code} {response.text[:500]}"
    body = response.json()
    assert body["model_version"] == response.headers.get("X-Model-Version"), (
        f"model_version {body['model_version']!r} != X-Model-Version "
        f"{response.headers.get('X-Model-Version')!r}"
    )
    assert len(body["predictions"]) == 1, body
    return dict(body)


def train_workers(stack: Stack, *state: str) -> list[dict[str, Any]]:
    """Ray Train's worker actors (all, or those in `state`), from Ray's state API."""
    filters = ["--filter", "class_name=RayTrainWorker"]
    for s in state:
        filters += ["--filter", f"state={s}"]
    return stack.ray_list("actors", "--detail", *filters)


def placement(
    stack: Stack, actors: list[dict[str, Any]], containers: dict[str, str]
) -> dict[str, str]:
    """actor id -> the worker container its node is (by the node's IP); asserts that none ran
    on the head and that every node is one of `containers`."""
    nodes = {n["node_id"]: n for n in stack.ray_list("nodes", "--detail")}
    where = {}
    for actor in actors:
        node = nodes.get(actor.get("node_id") or "")
        assert node is not None, f"actor {actor['actor_id']} has no known node: {actor}"
        assert not node.get("is_head_node"), f"a Ray Train worker ran on the head: {actor}"
        assert node["node_ip"] in containers, (
            f"a Ray Train worker ran on node {node['node_ip']}, not a worker container {containers}"
        )
        where[actor["actor_id"]] = containers[node["node_ip"]]
    return where


def main() -> int:
    # The stack's settings come from its own env file only, never from this shell.
    for name in list(os.environ):
        if name.startswith(("RAY_", "COMPOSE_")) or (
            name.startswith("VISIONLOOP_") and not name.startswith("VISIONLOOP_E2E_")
        ):
            del os.environ[name]
    timings = Timings()
    image = os.environ.get("VISIONLOOP_E2E_IMAGE", "visionloop:e2e")
    keep = os.environ.get("VISIONLOOP_E2E_KEEP") == "1"
    stack: Stack | None = None
    record: dict[str, object] = {}  # for VISIONLOOP_E2E_TIMINGS
    outcome = "FAILED"
    try:
        with timings.step("engine"):
            ensure_engine()
        gpu_env = os.environ.get("VISIONLOOP_E2E_GPU")
        gpu = has_nvidia_runtime() if gpu_env is None else gpu_env == "1"
        say(f"variant: {'GPU' if gpu else 'CPU-only (docker-compose.cpu.yml)'}")

        with timings.step("build image"):
            base = os.environ.get("VISIONLOOP_E2E_BASE_IMAGE") or (
                LOCAL_BASE_IMAGE if image_exists(LOCAL_BASE_IMAGE) else ""
            )
            network = os.environ.get("VISIONLOOP_E2E_BUILD_NETWORK", "host")
            cmd = ["docker", "build", "-t", image]
            if network:
                cmd += ["--network", network]
            if base:
                cmd += ["--build-arg", f"BASE_IMAGE={base}"]
            run([*cmd, "."], timeout=2400)
        size = run(["docker", "image", "inspect", "--format", "{{.Size}}", image],
                   timeout=60, check=False, quiet=True).stdout.strip()
        record["image_bytes"] = int(size) if size.isdigit() else None
        record["base_image"] = base or "python:3.11-slim-bookworm (the Dockerfile's default)"
        say(f"image {image}: {record['image_bytes']} bytes")

        workdir = Path(tempfile.mkdtemp(prefix="visionloop-e2e-"))
        stack = Stack(image, gpu, workdir)
        with timings.step("compose config; the API token secret file reaches the head"):
            for pick in (
                ["docker-compose.yml"],
                ["docker-compose.yml", "docker-compose.cpu.yml"],
                [*stack.files, SECRETS_FILE],
            ):
                run(stack.compose("config", "--quiet", files=pick), timeout=60)
            stack.down(volumes=True)  # a clean slate: no volume left from an aborted run
            # As docs/deploy.md says: a 0644 file in a 0700 folder; the container runs as uid
            # 1000, Compose bind-mounts the file as it is.
            secret_dir = workdir / "secrets"
            secret_dir.mkdir(mode=0o700)
            secret = secrets.token_hex(24)
            (secret_dir / "visionloop_api_token").write_text(secret + "\n")
            (secret_dir / "visionloop_api_token").chmod(0o644)
            stack.write_env(VISIONLOOP_API_TOKEN_SECRET=str(secret_dir / "visionloop_api_token"))
            mounted = run(
                stack.compose(
                    "run", "--rm", "-T", "--no-deps", "head", "sh", "-c",
                    'id -u; printenv VISIONLOOP_API_TOKEN_FILE; cat "$VISIONLOOP_API_TOKEN_FILE"',
                    files=[*stack.files, SECRETS_FILE],
                ),
                timeout=300, quiet=True,
            ).stdout.split()  # fmt: skip
            assert mounted[-3:] == ["1000", "/run/secrets/visionloop_api_token", secret], mounted
            stack.write_env()
            stack.down(volumes=True)

        with timings.step(
            f"up, fresh volume, no token given, {WORKER_CONTAINERS} workers: time to healthy"
        ):
            stack.up(workers=WORKER_CONTAINERS)

        with timings.step("the generated Ray token is shared through the volume"):
            facts = stack.token_facts()
            say(f"{RAY_TOKEN_FILE}: mode {facts.get('file_mode')}, uid {facts.get('file_uid')}")
            assert facts.get("file_mode") == "0o600" and facts.get("file_uid") == 1000, facts
            assert facts.get("gcs_sha256") == facts["file_sha256"], (
                f"the head's GCS does not run with the token in {RAY_TOKEN_FILE}: {facts}"
            )
            # A worker's healthcheck passes once its raylet runs; joining takes a little longer.
            wait_for(
                lambda: len(stack.alive_workers()) == WORKER_CONTAINERS,
                180,
                interval=5,
                what=f"{WORKER_CONTAINERS} worker nodes to join with the volume's token",
            )
            logs = run(stack.compose("logs", "--no-color", "worker"), timeout=120, quiet=True)
            joined = logs.stdout.count(f"Ray token: {RAY_TOKEN_FILE}")
            assert joined >= WORKER_CONTAINERS, (
                f"{joined} of {WORKER_CONTAINERS} workers say they took the volume's token"
            )
            generated_ray_token_sha = facts["file_sha256"]
            api_token = stack.exec_head("cat", API_TOKEN_FILE).strip()
            assert len(api_token) >= 16, "no generated API token in the volume"
            say(f"{WORKER_CONTAINERS} workers joined with the generated token; API token read")

        with timings.step("a node with neither the token nor the volume refuses, naming both"):
            # As a node on another host would: the head's network, its own empty /data.
            result = run(
                ["docker", "run", "--rm", "--network", stack.network,
                 "-e", "RAY_HEAD_ADDRESS=head:6379", "-e", "VISIONLOOP_WORKER_WAIT_S=60",
                 image, "worker"],
                timeout=180, check=False, capture=True,
            )  # fmt: skip
            say(result.stdout[-600:])
            assert result.returncode != 0, "a node with no token started"
            for place in ("RAY_AUTH_TOKEN", RAY_TOKEN_FILE):
                assert place in result.stdout, f"the refusal does not name {place}"

        client = httpx.Client(timeout=120)
        auth = {"Authorization": f"Bearer {api_token}"}
        probe = encode(noisy_picture(COLOURS["red"], seed=10_000, size=IMAGE_SIZE))

        with timings.step("predict with v0"):
            body = predict(client, stack.url, probe)
            assert body["model_version"] == "v0", f"a fresh volume should serve v0: {body}"
            top = body["predictions"][0]
            say(f"v0 says: {top['label']} ({top['score']:.2f})")

        with timings.step("upload labelled images"):
            for k, label in enumerate(LABELS):
                files = [
                    ("files", (f"{label}-{i}.png", data, "image/png"))
                    for i, (_, data) in enumerate(
                        labelled_set([label], IMAGES_PER_LABEL, size=IMAGE_SIZE, seed=k)
                    )
                ]
                response = client.post(
                    f"{stack.url}/v1/labels", files=files, data={"label": label}, headers=auth
                )
                assert response.status_code == 200, (
                    f"labels: {response.status_code} {response.text[:500]}"
                )
                statuses = [r["status"] for r in response.json()["results"]]
                assert statuses == ["added"] * IMAGES_PER_LABEL, statuses
            unauthorised = client.post(
                f"{stack.url}/v1/labels", files=files[:1], data={"label": "red"}
            )
            assert unauthorised.status_code == 401, unauthorised.text[:300]

        seen: list[str] = []

        def job_view(job_id: str) -> dict[str, Any]:
            job = client.get(f"{stack.url}/v1/train/{job_id}", headers=auth).json()
            line = (
                f"{job['status']} {json.dumps(job.get('progress'))} "
                f"resumed_from_epoch={job.get('resumed_from_epoch')}"
            )
            if not seen or seen[-1] != line:
                say(f"  {line}")
                seen.append(line)
            return dict(job)

        with timings.step(f"a {TRAIN_WORKERS}-worker job spreads over two worker containers"):
            containers = stack.worker_containers()
            assert len(containers) == WORKER_CONTAINERS, containers
            response = client.post(
                f"{stack.url}/v1/train",
                json={"epochs": EPOCHS, "workers": TRAIN_WORKERS, "gpu": gpu, "threads": 1,
                      # about placement and resume, not the gate's bar (tested elsewhere)
                      "gate": {"min_error_reduction": 0.0}},
                headers=auth,
            )
            assert response.status_code == 202, (
                f"train: {response.status_code} {response.text[:500]}"
            )
            job_id = response.json()["job_id"]
            say(f"job {job_id}")

            def training() -> dict[str, Any] | None:
                job = job_view(job_id)
                assert job["status"] in {"queued", "running"}, f"job ended: {json.dumps(job)}"
                return job if job["progress"].get("steps") else None

            wait_for(training, TRAIN_TIMEOUT_S, interval=2, what=f"job {job_id} to train")

            def both_alive() -> list[dict[str, Any]] | None:
                alive = train_workers(stack, "ALIVE")
                return alive if len(alive) >= TRAIN_WORKERS else None

            first = wait_for(both_alive, 120, interval=2, what="the job's live Ray Train workers")
            first_where = placement(stack, first, containers)
            say(f"Ray Train workers on: {sorted(first_where.values())}")
            assert len(set(first_where.values())) == TRAIN_WORKERS, (
                f"the job's {TRAIN_WORKERS} workers share a container: {first_where}"
            )

        with timings.step("docker kill one of the two containers after a checkpoint"):
            snapshot = f"/data/runs/{job_id}/{CHECKPOINT_SNAPSHOT}"

            def checkpointed() -> bool:
                job = job_view(job_id)
                assert job["status"] == "running", f"job ended before the kill: {json.dumps(job)}"
                return (
                    run(stack.compose("exec", "-T", "head", "test", "-f", snapshot),
                        timeout=60, check=False).returncode == 0
                )  # fmt: skip

            wait_for(checkpointed, TRAIN_TIMEOUT_S, interval=2, what=f"{snapshot}")
            victim = sorted(first_where.values())[-1]
            done = len(job_view(job_id)["metrics"])
            assert done < EPOCHS - 1, f"too late to kill: {done} of {EPOCHS} epochs done"
            restarts_before = container_state(victim)[1]
            run(["docker", "kill", victim], timeout=60)
            say(f"killed {victim} after {done} of {EPOCHS} epochs")

        with timings.step("the job resumes on the containers left and succeeds"):

            def finished() -> dict[str, Any] | None:
                job = job_view(job_id)
                return job if job["status"] in {"succeeded", "failed", "cancelled"} else None

            job = wait_for(finished, TRAIN_TIMEOUT_S, interval=3, what=f"job {job_id}")
            if job["status"] != "succeeded":
                stack.dump_logs()
            assert job["status"] == "succeeded", f"training job: {json.dumps(job)[:2000]}"
            assert (job.get("resumed_from_epoch") or 0) >= 1, (
                f"the job did not resume from a checkpoint: {json.dumps(job)[:2000]}"
            )
            assert len(job["metrics"]) == EPOCHS, job["metrics"]
            assert job["promoted"], f"the new version was not promoted: {job.get('reason')}"
            status, restarts = container_state(victim)
            say(f"{victim} after the kill: {status}, restarted {restarts - restarts_before} times")
            assert status != "running", f"{victim} came back: the resume was not forced away"
            later = [a for a in train_workers(stack) if a["actor_id"] not in first_where]
            ran = [a for a in later if a.get("pid")]
            later_where = placement(stack, ran, containers)
            say(f"after the kill, Ray Train workers on: {sorted(later_where.values())}")
            assert victim not in later_where.values(), later_where
            assert len(set(later_where.values())) == TRAIN_WORKERS, (
                f"the resumed job did not run on {TRAIN_WORKERS} containers: {later_where}"
            )
            # The job's own record says where each attempt's workers ran (host names are the
            # containers' hostnames).
            attempts = job.get("attempts") or []
            assert len(attempts) >= 2, f"the record has no resumed attempt: {attempts}"
            first_hosts = {w["host"] for w in attempts[0]["workers"]}
            last_hosts = {w["host"] for w in attempts[-1]["workers"]}
            victim_host = run(["docker", "inspect", "-f", "{{.Config.Hostname}}", victim],
                              timeout=60, quiet=True).stdout.strip()
            say(f"job record: first attempt on {sorted(first_hosts)}, last on "
                f"{sorted(last_hosts)} (killed: {victim_host})")
            assert len(first_hosts) == TRAIN_WORKERS and victim_host in first_hosts, attempts
            assert victim_host not in last_hosts, attempts
            new_version = job["version"]
            say(
                f"{new_version} promoted; resumed from epoch {job['resumed_from_epoch']}; "
                f"val accuracy {job['metrics'][-1].get('val_accuracy')}"
            )

        with timings.step("predict with the new version (hot swap)"):
            body = wait_for(
                lambda: (
                    (b := predict(client, stack.url, probe))["model_version"] == new_version and b
                ),
                SWAP_TIMEOUT_S,
                interval=2,
                what=f"/v1/predict to answer with {new_version}",
            )
            say(f"{new_version} says: {body['predictions'][0]['label']}")
            assert body["predictions"][0]["label"] in LABELS, body
            models = client.get(f"{stack.url}/v1/models", headers=auth).json()
            assert models["current"] == new_version, models

        with timings.step("down (volume kept)"):
            stack.down(bound_s=DOWN_BOUND_S)

        given_ray_token, given_api_token = secrets.token_hex(32), secrets.token_hex(24)
        stack.give_tokens(given_ray_token, given_api_token)
        with timings.step("up again, both tokens given: time to healthy (same volume)"):
            stack.up(workers=1)

        with timings.step("the given tokens win; the promoted version survives the restart"):
            facts = stack.token_facts()
            assert facts.get("gcs_sha256") == sha256(given_ray_token), (
                f"the head's GCS does not run with the given RAY_AUTH_TOKEN: {facts}"
            )
            assert facts.get("file_sha256") == generated_ray_token_sha, (
                f"the volume's generated token changed: {facts}"
            )
            wait_for(
                lambda: len(stack.alive_workers()) == 1,
                180,
                interval=5,
                what="the worker to join with the given token",
            )
            given = {"Authorization": f"Bearer {given_api_token}"}
            assert client.get(f"{stack.url}/v1/models", headers=given).status_code == 200
            assert client.get(f"{stack.url}/v1/models", headers=auth).status_code == 401
            body = predict(client, stack.url, probe)
            assert body["model_version"] == new_version, (
                f"after a restart the volume's {new_version} should answer: {body}"
            )

        with timings.step("down"):
            stack.down(bound_s=DOWN_BOUND_S)

        with timings.step("a bad setting stops the head at start, naming it"):
            result = run(
                stack.compose(
                    "run", "--rm", "--no-deps", "-e", "VISIONLOOP_MAX_FILES=lots", "head"
                ),
                timeout=300,
                check=False,
                capture=True,
            )
            say(result.stdout[-1500:])
            assert result.returncode != 0, "the head started with VISIONLOOP_MAX_FILES=lots"
            assert "VISIONLOOP_MAX_FILES" in result.stdout, "the error does not name the variable"

        outcome = "passed"
        return 0
    except Skip as exc:
        outcome = f"SKIPPED ({exc})"
        say(f"SKIP: {exc}")
        return SKIP
    except (AssertionError, TimeoutError, subprocess.TimeoutExpired, httpx.HTTPError) as exc:
        say(f"FAIL: {exc}")
        return 1
    finally:
        if stack is not None:
            if keep:
                stop = " ".join(stack.compose("down", "-v"))
                say(f"VISIONLOOP_E2E_KEEP=1: left running; stop with: {stop}")
            else:
                with timings.step("down -v (cleanup)"):
                    run(stack.compose("down", "-v", "--timeout", "60"), timeout=300, check=False)
        timings.report(outcome, record)


if __name__ == "__main__":
    sys.exit(main())
