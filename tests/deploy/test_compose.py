"""Deployment: the compose stack, end to end, as a user runs it.

The work is done by tests/deploy/compose_scenario.py (runnable on its own: `python -m
tests.deploy.compose_scenario`); this wrapper streams its output, fails on its failures and
skips, with the scenario's reason, only when no Docker engine can be had (not root and none
running, or .ci/docker-setup.sh could not start one).

    bash .ci/docker-setup.sh && python -m pytest -m docker tests/deploy -s
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_STATUS = 77

pytestmark = pytest.mark.docker


@pytest.mark.timeout(3000)
def test_compose_stack_end_to_end() -> None:
    """Build; a fresh `up` with no token given (generated, shared through the volume); predict
    with v0; label; a 2-worker job over two worker containers, one killed mid-job, resumed from
    its checkpoint on the others; hot swap; down (within a bound set by the stop settings:
    compose_scenario.DOWN_BOUND_S), up with given tokens (they win): still served; a bad
    setting refused."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.deploy.compose_scenario"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        tail = [*tail[-200:], line.rstrip("\n")]
    status = proc.wait(timeout=60)
    if status == SKIP_STATUS:
        reason = next((t[len("SKIP: ") :] for t in reversed(tail) if t.startswith("SKIP: ")), "")
        pytest.skip(f"no Docker engine can be started here: {reason}")
    assert status == 0, "compose e2e failed:\n" + "\n".join(tail[-60:])
