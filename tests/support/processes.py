"""This test's own Serve processes, found under /proc (Linux), and their memory."""

from __future__ import annotations

import os
import re
from pathlib import Path

# The Serve actors by role, as their process titles name them.
SERVE_ROLES = ("Ingress", "TrainingController", "ProxyActor")


def descendants(root: int) -> list[int]:
    """Process ids of every descendant of process `root` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def serve_pids() -> dict[str, list[int]]:
    """The Serve actors' process ids by role (SERVE_ROLES): processes of this test's own Ray
    cluster (descendants of this process, so other clusters on the machine are never touched),
    recognised by the process title Ray gives each actor (`ray::ServeReplica:visionloop:Ingress`,
    `ray::ProxyActor`)."""
    out: dict[str, list[int]] = {}
    for pid in descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if not title.startswith("ray::"):
            continue
        for role in SERVE_ROLES:
            if re.match(rf"ray::(ServeReplica:[^:]+:)?{role}\b", title):
                out.setdefault(role, []).append(pid)
    return out


def proc_status_kib(pid: int, field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_mib(pids: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """role -> {"rss": MiB now, "peak": MiB peak}, summed over the role's processes."""
    out = {}
    for role, ids in pids.items():
        out[role] = {"rss": sum(proc_status_kib(p, "VmRSS") for p in ids) / 1024,
                     "peak": sum(proc_status_kib(p, "VmHWM") for p in ids) / 1024}
    return out


def format_memory(mem: dict[str, dict[str, float]]) -> str:
    """`memory_mib`'s answer on one line: "Role N MiB (peak M), ..."."""
    return ", ".join(f"{role} {m['rss']:.0f} MiB (peak {m['peak']:.0f})"
                     for role, m in sorted(mem.items()))
