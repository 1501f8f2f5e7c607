"""The peer benchmark's own parts that decide whether its figures are fair: the peers'
preprocessing equals ours, their requests are ours, and stopping a peer leaves no process."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.common import photo_jpegs
from benchmarks.peers import preprocess
from benchmarks.peers.run import PeerUnavailable, java, marked_pids, request_path, start, stop
from tests.support.images import encode
from training.imageio import decode_image
from training.presets import EvalPreset


def _ours(data: bytes) -> torch.Tensor:
    preset = EvalPreset()
    out: torch.Tensor = preset(decode_image(data, draft_size=preset.resize))
    return out


def _jpegs() -> list[bytes]:
    photo = Image.open(io.BytesIO(photo_jpegs(1)[0]))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    return [
        *photo_jpegs(3, seed=1),  # the benchmark's 640x480: libjpeg decodes at full scale
        *photo_jpegs(1, width=1600, height=1200, seed=2),  # draft: decoded at a reduced scale
        *photo_jpegs(1, width=300, height=500, seed=3),  # smaller than the resize
        encode(photo, "JPEG", exif=exif.tobytes()),
        encode(photo.convert("L"), "JPEG"),
    ]


@pytest.mark.parametrize("index", range(7))
def test_peer_preprocessing_equals_ours(index: int) -> None:
    data = _jpegs()[index]
    ours = _ours(data)
    assert ours.shape == (3, 224, 224)
    # TorchServe's handler decodes the bytes; BentoML's service gets an opened PIL image
    assert torch.equal(preprocess.to_tensor(preprocess.decode(data)), ours)
    opened = Image.open(io.BytesIO(data))
    assert torch.equal(preprocess.to_tensor(preprocess.from_opened(opened)), ours)


def test_draft_mode_is_what_makes_them_equal() -> None:
    """The comparison can fail: a full-size decode gives another tensor than ours."""
    data = photo_jpegs(1, width=1600, height=1200, seed=4)[0]
    full = Image.open(io.BytesIO(data)).convert("RGB")
    assert preprocess.decode(data).size != full.size
    assert not torch.equal(preprocess.to_tensor(full), _ours(data))


def test_top_k_is_our_answer_shape() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    out = preprocess.top_k(probs, ["a", "b", "c"], k=2)
    assert out == [[{"label": "b", "score": 0.6}, {"label": "c", "score": 0.3}],
                   [{"label": "a", "score": 0.5}, {"label": "c", "score": 0.3}]]


def test_torchserve_requests_are_ours_but_for_the_path() -> None:
    from benchmarks import serving

    jpeg = photo_jpegs(1)[0]
    ours = serving.predict_request("127.0.0.1:9", jpeg)
    with request_path("/predictions/visionloop"):
        theirs = serving.predict_request("127.0.0.1:9", jpeg)
    assert serving.predict_request("127.0.0.1:9", jpeg) == ours  # restored
    assert theirs.startswith(b"POST /predictions/visionloop HTTP/1.1\r\n")
    assert theirs.split(b"\r\n", 1)[1] == ours.split(b"\r\n", 1)[1]


def test_stop_leaves_no_process_even_one_in_its_own_session(tmp_path) -> None:
    """A server whose child leaves the process group (as a backend could) and ignores
    SIGTERM: stop() still ends both, found by the marker in their environment."""
    child = ("import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, "
             "signal.SIG_IGN); open('child.pid', 'w').write(str(os.getpid())); time.sleep(600)")
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]);"
              " time.sleep(600)")
    server = start([sys.executable, "-c", parent], tmp_path, dict(os.environ), "http://unused")
    deadline = time.monotonic() + 20
    while not (tmp_path / "child.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int((tmp_path / "child.pid").read_text())
    assert set(marked_pids(server.marker)) == {server.proc.pid, child_pid}
    assert os.getpgid(child_pid) != server.proc.pid  # outside the group a killpg reaches
    stop(server, grace=1)
    assert marked_pids(server.marker) == []
    assert server.proc.poll() is not None
    assert _gone(child_pid)


def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_no_jdk_is_a_reason_not_a_crash(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(PeerUnavailable, match="no JDK"):
        java()
