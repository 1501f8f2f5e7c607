"""The `visionloop` command: --help everywhere, the volume commands, and `up` as a real
subprocess that serves (predict, label, activate over HTTP) and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli import build_parser, main
from tests.support.images import noisy_image
from tests.support.service import BACKBONE
from tests.support.waiting import free_port, wait_for, wait_ready
from training.config import GateConfig, TrainConfig

COMMANDS = ["up", "train", "import", "models", "predict", "label", "activate"]


def make_tree(root: Path, per_label: int = 3) -> Path:
    for label, color, offset in (("red", (220, 20, 20), 0), ("blue", (20, 20, 220), 50)):
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            (root / label / f"{i}.png").write_bytes(noisy_image(offset + i, color))
    (root / "red" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: visionloop " + command in capsys.readouterr().out


def test_import_and_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    tree = make_tree(tmp_path / "tree")
    assert main(["import", str(tree), "--home", str(home)]) == 0
    out = capsys.readouterr()
    assert "added 6, duplicate 0, relabelled 0, skipped 1" in out.out
    assert "notes.txt" in out.err
    assert main(["import", str(tree), "--home", str(home)]) == 0
    assert "added 0, duplicate 6" in capsys.readouterr().out
    assert main(["models", "--home", str(home)]) == 0
    assert "no model versions yet" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "missing"), "--home", str(home)]) == 1
    assert main(["import", "cifar10", "--from", str(tmp_path), "--home", str(home)]) == 1


def test_train_refuses_too_small_dataset(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--home", str(tmp_path), "--epochs", "1"]) == 1
    assert "at least 2 labels" in capsys.readouterr().err
    assert main(["train", "--home", str(tmp_path), "--epochs", "0"]) == 1
    assert "epochs" in capsys.readouterr().err


def test_train_flags_are_the_config_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """One flag per TrainConfig field (`--gate-...` per GateConfig field), None unless given,
    read as the field's type; a value of the wrong type is argparse's error naming the flag."""
    args = vars(build_parser().parse_args(["train"]))
    assert {f for f in TrainConfig.model_fields if f != "gate"} <= args.keys()
    assert {"gate_" + f for f in GateConfig.model_fields} <= args.keys()
    assert all(args[f] is None for f in TrainConfig.model_fields if f != "gate")
    given = build_parser().parse_args(["train", "--epochs", "3", "--no-gpu", "--lr", "1e-3",
                                       "--strategy", "finetune", "--backbone-lr", "0.5",
                                       "--gate-min-accuracy", "0.25"])
    assert (given.epochs, given.gpu, given.lr, given.strategy, given.backbone_lr,
            given.gate_min_accuracy) == (3, False, 1e-3, "finetune", 0.5, 0.25)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "--epochs", "three"])
    assert exit_.value.code == 2
    assert "argument --epochs: invalid int value: 'three'" in capsys.readouterr().err


def test_settings_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VISIONLOOP_HOME", str(tmp_path / "home"))
    assert main(["import", str(make_tree(tmp_path / "tree"))]) == 0
    assert (tmp_path / "home" / "dataset" / "red").is_dir()
    monkeypatch.setenv("VISIONLOOP_HOME", "")  # empty: the default, as for the service
    monkeypatch.chdir(tmp_path)
    assert main(["models"]) == 0
    assert (tmp_path / "visionloop-data" / "models").is_dir()
    monkeypatch.setenv("VISIONLOOP_LOG_LEVEL", "chatty")
    capsys.readouterr()
    assert main(["models"]) == 1
    assert "VISIONLOOP_LOG_LEVEL='chatty'" in capsys.readouterr().err
    monkeypatch.setenv("VISIONLOOP_LOG_LEVEL", "debug")
    monkeypatch.setenv("VISIONLOOP_PORT", "0")  # a service setting: not read by `models`
    assert main(["models", "--home", str(tmp_path / "home")]) == 0
    assert main(["up", "--home", str(tmp_path / "home")]) == 1
    assert "VISIONLOOP_PORT='0'" in capsys.readouterr().err


@pytest.mark.slow
def test_up_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    env = {**os.environ, "VISIONLOOP_BACKBONE": BACKBONE, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "up.log", "w+") as log:
        run_up(tmp_path, home, port, env, log)


def run_up(tmp_path: Path, home: Path, port: int, env: dict[str, str], log: Any) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--home", str(home),
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def alive() -> bool:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            return True

        wait_ready(url, timeout=180, alive=alive)

        def printed() -> str | None:
            text = (tmp_path / "up.log").read_text()
            return text if f"visionloop is up at {url}" in text else None

        output = wait_for(printed, timeout=30, what="the URL printed")
        assert str(home / "secrets" / "api-token") in output
        assert oct((home / "secrets" / "api-token").stat().st_mode & 0o777) == "0o600"

        image = tmp_path / "x.png"
        image.write_bytes(noisy_image(1, (10, 200, 10)))
        http = ["--url", url, "--home", str(home)]
        assert main(["predict", str(image), *http]) == 0
        tree = make_tree(tmp_path / "tree")
        assert main(["label", str(tree), "--batch", "2", *http]) == 0
        assert main(["activate", "v0", *http]) == 0
        assert main(["activate", "v7", *http]) == 1
        assert main(["models", "--home", str(home)]) == 0
        assert main(["predict", str(image), "--url", url, "--token", "wrong-token-wrong",
                     "--home", str(tmp_path)]) == 0  # predict is open by default
        assert main(["activate", "v0", "--url", url, "--token", "wrong-token-wrong",
                     "--home", str(tmp_path)]) == 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert "stopped" in (tmp_path / "up.log").read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_unreachable_service_is_one_line_naming_the_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(noisy_image(1, (200, 30, 30)))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["predict", str(image), "--url", url, "--home", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"visionloop: cannot reach the service at {url}")
    assert "VISIONLOOP_URL" in err and "Traceback" not in err and err.count("\n") == 1
