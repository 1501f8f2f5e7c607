"""Helpers of the reliability tests: the service's processes and their memory, the error shape,
and the dataset's integrity on disk. The service itself comes from `tests.conftest`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

SERVE_ROLES = ("Ingress", "TrainingController", "ProxyActor")


def _descendants(root: int) -> list[int]:
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
    """The Serve actors' process ids by role (Ingress, TrainingController,
    ProxyActor): processes of this test's own Ray cluster (descendants of this process, so
    other clusters on the machine are never touched), recognised by the process title Ray
    gives each actor (`ray::ServeReplica:visionloop:Ingress`, `ray::ProxyActor`)."""
    out: dict[str, list[int]] = {}
    for pid in _descendants(os.getpid()):
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
    return ", ".join(f"{role} {m['rss']:.0f} MiB (peak {m['peak']:.0f})"
                     for role, m in sorted(mem.items()))


def dataset_images(home: Path) -> dict[str, Path]:
    """Stored images on disk: relative path -> file (ledger, lock and temp folder excluded)."""
    root = home / "dataset"
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.name != "ledger.jsonl"}


def ledger_events(home: Path) -> list[dict[str, Any]]:
    """Every ledger line parsed; a cut or garbled line fails the calling test."""
    path = home / "dataset" / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_dataset_integrity(home: Path) -> dict[str, str]:
    """Every stored file is named by the sha256 of its own bytes, no temp file is left, every
    ledger line parses and the ledger's net state (added/relabelled minus deleted) is exactly
    the set of files. -> sha256 -> label."""
    stored: dict[str, str] = {}
    for rel, path in dataset_images(home).items():
        label, name = rel.split("/", 1)
        sha = name.split(".", 1)[0]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, f"{rel}: bytes differ"
        assert sha not in stored, f"{sha} stored twice ({stored[sha]} and {label})"
        stored[sha] = label
    tmp = home / "dataset" / ".tmp"
    leftovers = list(tmp.iterdir()) if tmp.exists() else []
    assert not leftovers, f"temp files left: {leftovers}"
    state: dict[str, str] = {}
    for e in ledger_events(home):
        if e["event"] in ("added", "relabelled"):
            state[e["sha256"]] = e["label"]
        elif e["event"] == "deleted":
            state.pop(e["sha256"], None)
    assert state == stored, "ledger and files disagree"
    return stored


def added_counts(home: Path) -> Counter[str]:
    return Counter(e["sha256"] for e in ledger_events(home) if e["event"] == "added")


class Hammer:
    """`threads` clients predicting in a loop until stopped; records each answer's status (or
    exception) with its time."""

    def __init__(self, url: str, data: bytes, threads: int = 3, pause_s: float = 0.0,
                 timeout_s: float = 60):
        self.url, self.data, self.pause_s, self.timeout_s = url, data, pause_s, timeout_s
        self.stop = threading.Event()
        self.results: list[tuple[float, float, int | str]] = []  # (start, end, status)
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    status: int | str = c.post("/v1/predict", files=[
                        ("files", ("x.png", self.data))]).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.results.append((t0, time.monotonic(), status))
                if self.pause_s:
                    time.sleep(self.pause_s)

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout_s + 5)

    def failures(self) -> list[tuple[float, float, int | str]]:
        return [r for r in self.results if r[2] != 200]
