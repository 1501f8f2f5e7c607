#!/usr/bin/env python3
"""End-to-end check of the compose deployment, doing what a user does.

    python scripts/compose_e2e.py            # from the repository root, with the project's venv

1. make sure a Docker engine answers (on a root Debian machine without one, run
   .ci/docker-setup.sh, which installs and starts one and builds the local base image);
2. build the image (`docker build`; the local base image where one exists, since no registry
   may be reachable; cached layers are reused);
3. `docker compose up -d --wait` (CPU-only override unless Docker has an NVIDIA runtime), in a
   project of its own (`visionloop-e2e`, its own volume, ports on 127.0.0.1 only);
4. POST an image to /v1/predict: version v0 (the pretrained backbone) answers;
5. POST labelled images to /v1/labels (API token), POST /v1/train {"epochs": 1, "workers": 1},
   poll GET /v1/train/{id} until it succeeded, check that its Ray Train workers ran on a worker
   node, and that /v1/predict now answers with the new version;
6. `docker compose down`, `up --scale worker=2` on the same volume: two worker nodes join, and
   the promoted version still answers;
7. a bad setting stops the head at start with a message naming the variable;
8. `docker compose down -v` (unless VISIONLOOP_E2E_KEEP=1).

Prints the duration of each step and the total. Exit status: 0 passed, 1 failed, 77 no Docker
engine could be had (the pytest wrapper turns that into a skip).

Environment: VISIONLOOP_E2E_IMAGE (default visionloop:e2e), VISIONLOOP_E2E_BASE_IMAGE (default
visionloop-base:bookworm when that image exists, else the Dockerfile's default),
VISIONLOOP_E2E_BUILD_NETWORK (default host), VISIONLOOP_E2E_GPU (1/0; default: whether Docker
has an nvidia runtime), VISIONLOOP_E2E_KEEP=1 (leave the stack and volume up at the end).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROJECT = "visionloop-e2e"
SKIP = 77
LOCAL_BASE_IMAGE = "visionloop-base:bookworm"
HEALTHY_TIMEOUT_S = 600
TRAIN_TIMEOUT_S = 900
SWAP_TIMEOUT_S = 120
IMAGES_PER_LABEL = 16
COLOURS = {"red": (200, 30, 30), "blue": (30, 40, 200)}


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

    def report(self, outcome: str) -> None:
        say("")
        say(f"compose e2e {outcome}; step durations:")
        for name, took in self.steps:
            say(f"  {took:7.1f} s  {name}")
        say(f"  {time.monotonic() - self.start:7.1f} s  total")


def say(message: str) -> None:
    print(message, flush=True)


def run(
    args: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    capture: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    say("$ " + " ".join(args))
    result = subprocess.run(
        list(args),
        cwd=REPO,
        env=env,
        text=True,
        timeout=timeout,
        check=False,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if check and result.returncode != 0:
        if capture:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project: `docker compose -p visionloop-e2e -f ... --env-file ...`."""

    def __init__(self, image: str, gpu: bool, workdir: Path) -> None:
        self.port = free_port()
        self.api_token = secrets.token_hex(16)
        self.env_file = workdir / "e2e.env"
        self.env_file.write_text(
            "\n".join(
                [
                    f"RAY_AUTH_TOKEN={secrets.token_hex(32)}",
                    f"VISIONLOOP_API_TOKEN={self.api_token}",
                    f"VISIONLOOP_IMAGE={image}",
                    f"VISIONLOOP_PUBLISH=127.0.0.1:{self.port}",
                    f"RAY_DASHBOARD_PORT={free_port()}",
                    "",
                ]
            )
        )
        self.files = ["docker-compose.yml"] + ([] if gpu else ["docker-compose.cpu.yml"])
        self.url = f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, files: Sequence[str] | None = None) -> list[str]:
        cmd = ["docker", "compose", "-p", PROJECT, "--env-file", str(self.env_file)]
        for f in self.files if files is None else files:
            cmd += ["-f", f]
        return cmd + list(args)

    def up(self, workers: int = 1) -> None:
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

    def down(self, volumes: bool = False) -> None:
        run(self.compose("down", *(["-v"] if volumes else []), "--timeout", "120"), timeout=300)

    def exec_head(self, *args: str) -> str:
        return run(self.compose("exec", "-T", "head", *args), timeout=120, capture=True).stdout


def make_image(rgb: tuple[int, int, int], seed: int, size: int = 96) -> bytes:
    """A PNG: the colour with per-pixel noise and a random bright square, so no two are alike."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(rgb, 25, size=(size, size, 3)), 0, 255).astype("uint8")
    x, y = rng.integers(0, size - 24, size=2)
    pixels[y : y + 24, x : x + 24] = rng.integers(180, 256, size=3)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def wait_for(what: str, timeout: float, probe: Callable[[], Any], every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


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


def train_workers_on_worker_nodes(stack: Stack) -> str:
    """Which nodes ran the job's Ray Train workers, asked from Ray's state API on the head."""
    nodes = json.loads(
        stack.exec_head("ray", "list", "nodes", "--format", "json", "--limit", "100")
    )
    head_ids = {n["node_id"] for n in nodes if n.get("is_head_node")}
    actors = json.loads(
        stack.exec_head(
            "ray",
            "list",
            "actors",
            "--format",
            "json",
            "--limit",
            "1000",
            "--detail",
            "--filter",
            "class_name=RayTrainWorker",
        )
    )
    assert actors, "Ray's state API lists no RayTrainWorker actor: did the job use Ray Train?"
    on_head = [a for a in actors if a.get("node_id") in head_ids]
    assert not on_head, f"{len(on_head)} of {len(actors)} Ray Train workers ran on the head node"
    return f"{len(actors)} Ray Train worker(s), none on the head"


def main() -> int:
    import httpx

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

        with timings.step("a worker without RAY_AUTH_TOKEN refuses to start, naming it"):
            result = run(
                ["docker", "run", "--rm", "--network", "none", image, "worker"],
                timeout=120,
                check=False,
                capture=True,
            )
            say(result.stdout[-500:])
            assert result.returncode != 0 and "RAY_AUTH_TOKEN" in result.stdout, result.stdout

        workdir = Path(tempfile.mkdtemp(prefix="visionloop-e2e-"))
        stack = Stack(image, gpu, workdir)
        with timings.step("compose config (GPU and CPU-only files)"):
            for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]):
                run(stack.compose("config", "--quiet", files=files), timeout=60)
            stack.down(volumes=True)  # a clean slate: no volume left from an aborted run

        with timings.step("up: time to healthy (fresh volume)"):
            stack.up()

        client = httpx.Client(timeout=120)
        auth = {"Authorization": f"Bearer {stack.api_token}"}
        probe = make_image(COLOURS["red"], seed=10_000)

        with timings.step("predict with v0"):
            body = predict(client, stack.url, probe)
            assert body["model_version"] == "v0", f"a fresh volume should serve v0: {body}"
            top = body["predictions"][0]
            say(f"v0 says: {top['label']} ({top['score']:.2f})")

        with timings.step("upload labelled images"):
            for label, rgb in COLOURS.items():
                files = [
                    (
                        "files",
                        (
                            f"{label}-{i}.png",
                            make_image(rgb, seed=i + 100 * len(label)),
                            "image/png",
                        ),
                    )
                    for i in range(IMAGES_PER_LABEL)
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

        with timings.step("train on the worker until succeeded"):
            response = client.post(
                f"{stack.url}/v1/train", json={"epochs": 1, "workers": 1}, headers=auth
            )
            assert response.status_code == 202, (
                f"train: {response.status_code} {response.text[:500]}"
            )
            job_id = response.json()["job_id"]
            say(f"job {job_id}")
            seen: list[str] = []

            def finished() -> dict[str, Any] | None:
                job = client.get(f"{stack.url}/v1/train/{job_id}", headers=auth).json()
                line = f"{job['status']} {json.dumps(job.get('progress'))}"
                if not seen or seen[-1] != line:
                    say(f"  {line}")
                    seen.append(line)
                return job if job["status"] in {"succeeded", "failed", "cancelled"} else None

            job = wait_for(f"job {job_id}", TRAIN_TIMEOUT_S, finished, every=3)
            if job["status"] != "succeeded":
                stack.dump_logs()
            assert job["status"] == "succeeded", f"training job: {json.dumps(job)[:2000]}"
            assert job["promoted"], f"the new version was not promoted: {job.get('reason')}"
            new_version = job["version"]
            say(f"{new_version} promoted; metrics {job.get('metrics')}")
            say(train_workers_on_worker_nodes(stack))

        with timings.step("predict with the new version (hot swap)"):
            body = wait_for(
                f"/v1/predict to answer with {new_version}",
                SWAP_TIMEOUT_S,
                lambda: (
                    (b := predict(client, stack.url, probe))["model_version"] == new_version and b
                ),
            )
            say(f"{new_version} says: {body['predictions'][0]['label']}")
            assert body["predictions"][0]["label"] in COLOURS, body
            models = client.get(f"{stack.url}/v1/models", headers=auth).json()
            assert models["current"] == new_version, models

        with timings.step("down (volume kept)"):
            stack.down()

        with timings.step("up again with --scale worker=2: time to healthy (same volume)"):
            stack.up(workers=2)
            nodes = json.loads(
                stack.exec_head("ray", "list", "nodes", "--format", "json", "--limit", "100")
            )
            alive = [n for n in nodes if n.get("state") == "ALIVE" and not n.get("is_head_node")]
            assert len(alive) == 2, f"expected 2 worker nodes in the Ray cluster: {nodes}"

        with timings.step("the promoted version survives the restart"):
            body = predict(client, stack.url, probe)
            assert body["model_version"] == new_version, (
                f"after a restart the volume's {new_version} should answer: {body}"
            )

        with timings.step("down"):
            stack.down()

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
    except (AssertionError, subprocess.TimeoutExpired) as exc:
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
        timings.report(outcome)


if __name__ == "__main__":
    sys.exit(main())
