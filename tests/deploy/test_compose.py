"""Deployment: the compose stack, end to end, as a user runs it.

The work is done by scripts/compose_e2e.py (runnable on its own); this wrapper streams its
output, fails on its failures and skips, with the script's reason, only when no Docker engine can
be had (not root and none running, or .ci/docker-setup.sh could not start one).

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
    """Build, up, predict with v0, label, train on a worker, hot swap, down, up: still served."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "compose_e2e.py")],
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
