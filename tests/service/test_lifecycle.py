"""The service's life cycle: `visionloop up` stops quietly within a bound on SIGTERM; a SIGTERM
or a SIGKILL of it leaves no process and no listener behind (HAProxy, Serve's default front end
here, included), so a fresh start on the same port answers; HAProxy's stats and metrics ports
listen on loopback only; the guard that makes this so (`service.app.HAPROXY_GUARD`) on a real
HAProxy whose parent is killed; and the rule that sizes the API replicas from the machine
(`service.deployments.classifier_plan`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import guard_haproxy
from service.cli import SERVE_STOP_TIMEOUT_S
from service.deployments import MAX_AUTO_REPLICAS, REPLICA_MEMORY_ALLOWANCE, classifier_plan
from service.settings import SettingsError, load_settings
from tests.support.images import encode, noisy_picture
from tests.support.service import BACKBONE
from tests.support.waiting import free_port, wait_for, wait_ready

GIB = 1024**3

# `visionloop up` after SIGTERM: Serve's own stop, bounded by SERVE_STOP_TIMEOUT_S, then
# `ray.shutdown()` of the local cluster (its processes get SIGTERM, then SIGKILL a few seconds
# later: Ray's own teardown), plus the interpreter's exit.
STOP_BOUND_S = SERVE_STOP_TIMEOUT_S + 15
# After a SIGKILL of `visionloop up`: the kernel kills the raylet (Ray's fate sharing), the
# workers notice their raylet is gone and exit, HAProxy gets its parent-death signal.
KILLED_GONE_S = 30
# What a clean stop must not print: Serve's failed shutdown call, or any traceback.
NOISE = ("graceful_shutdown failed", "Traceback", "infinite retries")


# -- the replica plan (no Ray) -------------------------------------------------------------------

def plan(cores: int, memory: int = 64 * GIB, **overrides: Any) -> tuple[int, int]:
    settings = classifier_plan(load_settings(**overrides), cores=cores, memory=memory)
    assert settings.classifier_replicas is not None and settings.classifier_threads is not None
    return settings.classifier_replicas, settings.classifier_threads


def test_replicas_follow_the_cores_one_thread_each() -> None:
    assert plan(1) == (1, 1)
    assert plan(2) == (2, 1)
    assert plan(6) == (6, 1)


def test_replicas_are_capped_and_the_cores_left_go_to_threads() -> None:
    assert plan(32) == (MAX_AUTO_REPLICAS, 32 // MAX_AUTO_REPLICAS)
    # one replica per memory allowance: 3 allowances of memory, 8 cores
    assert plan(8, memory=3 * REPLICA_MEMORY_ALLOWANCE) == (3, 2)
    assert plan(8, memory=REPLICA_MEMORY_ALLOWANCE // 2) == (1, 8)  # never none


def test_an_explicit_setting_wins_and_the_other_follows() -> None:
    assert plan(8, classifier_replicas=2) == (2, 4)
    assert plan(8, classifier_threads=3) == (2, 3)
    assert plan(2, classifier_threads=4) == (1, 4)
    assert plan(8, classifier_replicas=3, classifier_threads=5) == (3, 5)
    assert plan(2, classifier_replicas=4) == (4, 1)


def test_on_a_gpu_one_replica_as_before() -> None:
    assert plan(8, classifier_gpus=0.5) == (1, 8)
    assert plan(8, classifier_gpus=0.5, classifier_replicas=2) == (2, 4)


def test_blank_or_bad_replica_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONLOOP_CLASSIFIER_REPLICAS", "")  # compose's unset variable
    monkeypatch.setenv("VISIONLOOP_CLASSIFIER_THREADS", " ")
    settings = load_settings()
    assert settings.classifier_replicas is None and settings.classifier_threads is None
    monkeypatch.setenv("VISIONLOOP_CLASSIFIER_REPLICAS", "0")
    with pytest.raises(SettingsError, match="VISIONLOOP_CLASSIFIER_REPLICAS='0'"):
        load_settings()
    monkeypatch.setenv("VISIONLOOP_CLASSIFIER_REPLICAS", "many")
    with pytest.raises(SettingsError, match="VISIONLOOP_CLASSIFIER_REPLICAS='many'"):
        load_settings()


# -- listeners and processes, from /proc ---------------------------------------------------------

def listeners() -> dict[int, tuple[str, int]]:
    """Listening TCP sockets of this machine: socket inode -> (address, port)."""
    found: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                address, port = fields[1].split(":")
                ip = socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 \
                    else ("::" if set(address) == {"0"} else address)
                found[int(fields[9])] = (ip, int(port, 16))
    return found


def listening_on(port: int) -> list[tuple[str, int]]:
    return [addr for addr in listeners().values() if addr[1] == port]


def process_listeners(pid: int) -> list[tuple[str, int]]:
    """The listening sockets process `pid` holds."""
    sockets = listeners()
    held = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in sockets:
                    held.append(sockets[inode])
    except OSError:
        pass
    return held


def alive(pid: int) -> bool:
    """Running (a zombie is dead: it holds no socket and waits only to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def haproxy_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"haproxy") and alive(int(entry)):
            pids.add(int(entry))
    return pids


# -- the guard on a real HAProxy, no Ray ---------------------------------------------------------

def test_the_guard_binds_stats_to_loopback_and_dies_with_its_parent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent process starts HAProxy through the guard, as Ray's HAProxyManager does, with
    the stats and metrics bound on every interface as Ray 2.60 writes them; the guard moves
    those two to loopback, keeps the front end as written, and HAProxy dies with the parent's
    SIGKILL."""
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_HAPROXY_BINARY_PATH", "VISIONLOOP_HAPROXY_BINARY",
                 "VISIONLOOP_HAPROXY_CHOSEN_PORTS", "RAY_SERVE_ENABLE_HA_PROXY"):
        monkeypatch.delenv(name, raising=False)
    guard = guard_haproxy()
    assert guard is not None and os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(guard)
    stats, metrics = (int(os.environ[f"RAY_SERVE_HAPROXY_{n}_PORT"]) for n in ("STATS", "METRICS"))
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(textwrap.dedent(f"""\
        global
            maxconn 64
        defaults
            mode http
            timeout connect 1s
            timeout client 5s
            timeout server 5s
        frontend prometheus
            bind :{metrics}
            http-request use-service prometheus-exporter if {{ path /metrics }}
        frontend http_frontend
            bind 127.0.0.1:{front}
            http-request return status 200 content-type text/plain string ok
        listen stats
          bind *:{stats}
          stats enable
          stats uri /stats
        """))
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "p = subprocess.Popen([sys.argv[1], '-db', '-f', sys.argv[2]])\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(600)\n", str(guard), str(config)],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        bound = wait_for(lambda: (b if len(b := process_listeners(pid)) == 3 else None),
                         timeout=30, interval=0.2, what="HAProxy's three listeners")
        assert sorted(bound) == sorted([("127.0.0.1", stats), ("127.0.0.1", metrics),
                                        ("127.0.0.1", front)]), bound
        assert str(config) in Path(f"/proc/{pid}/cmdline").read_text()  # Ray finds it so
        assert httpx.get(f"http://127.0.0.1:{front}/", timeout=5).text == "ok"
        assert f"bind 127.0.0.1:{stats}" in config.read_text()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not alive(pid), timeout=10, interval=0.1, what="HAProxy to die")
        wait_for(lambda: listening_on(front) == [], timeout=10, interval=0.1,
                 what=f"nothing listening on {front} (HAProxy's port)")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# -- `visionloop up` for real --------------------------------------------------------------------

class Up:
    """`visionloop up` on `port` as a subprocess in a session (and process group) of its own,
    output to `log`."""

    def __init__(self, home: Path, port: int, log: Path, **extra_env: str):
        env = {**os.environ, "VISIONLOOP_BACKBONE": BACKBONE, "RAY_USAGE_STATS_ENABLED": "0",
               # One replica is all a life-cycle test needs; the shared machine thanks it.
               "VISIONLOOP_CLASSIFIER_REPLICAS": "1", **extra_env}
        env.pop("RAY_ADDRESS", None)
        # The front end `visionloop up` chooses (HAProxy; what must not outlive the service)
        env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.before = haproxy_pids()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "up", "--home", str(home),
                 "--port", str(port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def ready(self) -> set[int]:
        """Wait for /readyz; -> the HAProxy processes this service started."""
        def running() -> bool:
            assert self.proc.poll() is None, self.output()[-3000:]
            return True

        wait_ready(self.url, timeout=240, alive=running)
        assert httpx.get(f"{self.url}/healthz", timeout=10).status_code == 200
        return haproxy_pids() - self.before

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_up_stops_quietly_and_leaves_nothing_behind_then_starts_again(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()

    # 1. SIGTERM: a clean, quiet stop within the bound; the port is free.
    up = Up(home, port, tmp_path / "up1.log")
    try:
        haproxies = up.ready()
        assert haproxies, "HAProxy (asked for) is not running:\n" + up.output()
        for pid in haproxies:  # its stats and metrics: loopback only
            assert all(ip == "127.0.0.1" for ip, _ in process_listeners(pid)), \
                process_listeners(pid)
        t0 = time.monotonic()
        # To the whole process group, as a terminal's Ctrl-C or `kill -- -PGID` sends it.
        os.killpg(up.proc.pid, signal.SIGTERM)
        assert up.proc.wait(timeout=STOP_BOUND_S + 30) == 0
        took = time.monotonic() - t0
        output = up.output()
        assert took < STOP_BOUND_S, f"stop took {took:.1f} s:\n{output[-3000:]}"
        assert "stopped" in output
        tail = output[output.index("stopping..."):]
        assert not [n for n in NOISE if n in tail], tail
        assert listening_on(port) == []
        assert not [pid for pid in haproxies if alive(pid)]
    finally:
        up.kill()

    # 2. Same port again; then SIGKILL of `visionloop up`'s process group: nothing may keep the
    # port.
    up = Up(home, port, tmp_path / "up2.log")
    try:
        haproxies = up.ready()
        os.killpg(up.proc.pid, signal.SIGKILL)
        up.proc.wait()
        wait_for(lambda: listening_on(port) == [] and not any(alive(p) for p in haproxies),
                 timeout=KILLED_GONE_S, interval=0.5,
                 what=f"port {port} free and HAProxy {sorted(haproxies)} gone after SIGKILL")
    finally:
        up.kill()

    # 3. A fresh start on the same port answers.
    up = Up(home, port, tmp_path / "up3.log")
    try:
        up.ready()
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=STOP_BOUND_S + 30) == 0
        assert listening_on(port) == []
    finally:
        up.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{up.url}/healthz", timeout=2)


@pytest.mark.slow
def test_up_falls_back_to_the_python_proxy_when_haproxy_cannot_start(tmp_path: Path) -> None:
    """A HAProxy that exits at once (a real binary: /bin/false, through Ray's own setting for
    the binary): `visionloop up` says so in one warning, starts again on Serve's Python proxy,
    answers, and stops cleanly."""
    home, port = tmp_path / "home", free_port()
    up = Up(home, port, tmp_path / "up.log", RAY_SERVE_HAPROXY_BINARY_PATH="/bin/false")
    try:
        assert up.ready() == set()  # no HAProxy of this service
        output = up.output()
        assert output.count("HAProxy front end did not start") == 1, output[-3000:]
        assert "starting again with Serve's Python proxy" in output
        token = (home / "secrets" / "api-token").read_text().strip()
        image = encode(noisy_picture((200, 30, 30), 0))
        answer = httpx.post(f"{up.url}/v1/predict", files={"files": ("red.png", image)},
                            headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert answer.status_code == 200, answer.text
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=STOP_BOUND_S + 30) == 0
        assert listening_on(port) == []
    finally:
        up.kill()
