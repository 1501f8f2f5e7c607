#!/opt/venv/bin/python
"""Container healthcheck, one per role: exit 0 when healthy, 1 with a one-line reason otherwise.

visionloop-healthcheck head     GET http://127.0.0.1:$VISIONLOOP_PORT/readyz answers 200
                                (the service is up and a model is loaded)
visionloop-healthcheck worker   this container's raylet is running and the head's GCS
                                (RAY_HEAD_ADDRESS) answers, i.e. this Ray node is alive and
                                has a cluster to be part of
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path


def check_head() -> str | None:
    port = os.environ.get("VISIONLOOP_PORT", "8000")
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return None
            return f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except OSError as exc:
        return f"{url} unreachable: {exc}"


def _process_names() -> set[str]:
    """Names (comm) of the processes in this container's PID namespace."""
    names = set()
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            names.add(comm.read_text().strip())
        except OSError:  # the process ended while we looked
            continue
    return names


def check_worker() -> str | None:
    if "raylet" not in _process_names():
        return "no raylet process: this Ray node is down"
    head = os.environ.get("RAY_HEAD_ADDRESS", "head:6379")
    host, _, port = head.rpartition(":")
    try:
        # A TCP connect, not `ray health-check`: that imports Ray (~2 CPU-seconds per check).
        # A raylet that loses the GCS exits on its own after RAY_gcs_rpc_server_reconnect_timeout_s.
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        return f"the head's GCS at {head} does not answer: {exc}"
    return None


def main(argv: list[str]) -> int:
    role = argv[1] if len(argv) > 1 else "head"
    checks = {"head": check_head, "worker": check_worker}
    if role not in checks:
        print(f"unknown role {role!r}; expected one of {sorted(checks)}", file=sys.stderr)
        return 2
    problem = checks[role]()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
