"""The container entrypoint's Ray-token rules for a worker, run on this machine (bash, no Docker).

A worker takes RAY_AUTH_TOKEN when given, else the token file on the shared volume
(RAY_AUTH_TOKEN_PATH, default $VISIONLOOP_HOME/secrets/ray-token) that the head generates; with
neither it refuses, naming both places. Only the refusals are run here: they end before
`ray start`, so no Ray node joins anything. The paths that do join (the head generating the
token, workers taking it from the volume, a given token winning) run for real in the compose
scenario (tests/deploy/compose_scenario.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docker" / "visionloop-node.sh"
EX_CONFIG = 78
EX_UNAVAILABLE = 69

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts TCP connections: where the worker looks for the head's
    GCS, which it only connects to before reading the token."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def run_worker(home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VISIONLOOP_"))}
    return subprocess.run(
        ["bash", str(SCRIPT), "worker"],
        env={**base, "VISIONLOOP_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_worker_without_token_or_token_file_refuses_naming_both(
    tmp_path: Path, listening_port: int
) -> None:
    result = run_worker(tmp_path, RAY_HEAD_ADDRESS=f"127.0.0.1:{listening_port}")
    assert result.returncode == EX_CONFIG, result.stderr
    assert "RAY_AUTH_TOKEN is not set" in result.stderr
    assert str(tmp_path / "secrets" / "ray-token") in result.stderr


def test_worker_names_the_token_path_it_was_given(tmp_path: Path, listening_port: int) -> None:
    elsewhere = tmp_path / "shared" / "token"
    result = run_worker(
        tmp_path,
        RAY_HEAD_ADDRESS=f"127.0.0.1:{listening_port}",
        RAY_AUTH_TOKEN_PATH=str(elsewhere),
    )
    assert result.returncode == EX_CONFIG, result.stderr
    assert str(elsewhere) in result.stderr


def test_worker_refuses_an_empty_token_file(tmp_path: Path, listening_port: int) -> None:
    """A token file that exists but holds nothing is refused, not replaced or joined with."""
    token_file = tmp_path / "secrets" / "ray-token"
    token_file.parent.mkdir()
    token_file.write_text("\n")
    result = run_worker(tmp_path, RAY_HEAD_ADDRESS=f"127.0.0.1:{listening_port}")
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"the Ray token file {token_file} is empty or unreadable" in result.stderr


def test_worker_with_no_head_and_no_token_names_the_head_and_both_places(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_worker(
        tmp_path, RAY_HEAD_ADDRESS=f"127.0.0.1:{port}", VISIONLOOP_WORKER_WAIT_S="0"
    )
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    for named in (f"127.0.0.1:{port}", "RAY_AUTH_TOKEN", str(tmp_path / "secrets" / "ray-token")):
        assert named in result.stderr
