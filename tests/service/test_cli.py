"""The `visionloop` command: --help everywhere, the volume commands, `up` as a real
subprocess that serves (predict, label, activate over HTTP), stays quiet and stops cleanly on
SIGTERM, and the HTTP commands against the real service on this module's Ray cluster (served
over loopback: `tests.support.service.start_service`): where the token comes from and what a 401
says, predict's per-file outcome, jobs and cancel, activate/pin/unpin, and `train --resume` of a
real cancelled job."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli import build_parser, main
from tests.support.images import noisy_image
from tests.support.service import BACKBONE, RunningService, start_service
from tests.support.waiting import free_port, wait_for, wait_ready
from training.config import GateConfig, TrainConfig

COMMANDS = ["up", "train", "import", "models", "predict", "label", "jobs", "cancel", "activate",
            "pin", "unpin", "predict-dir", "export", "trial"]


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


def test_export_then_import_the_tar_and_a_csv(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`export` writes the dataset as a tar that `import X.tar` reads back into another volume
    (the same images under the same labels); `import X.csv` takes path,label rows and reports a
    row it cannot take."""
    home, other = tmp_path / "home", tmp_path / "other"
    tree = make_tree(tmp_path / "tree")
    assert main(["import", str(tree), "--home", str(home)]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "d.tar"), "--home", str(home)]) == 0
    assert "exported 6 images" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "d.tar"), "--home", str(other)]) == 0
    assert "added 6, duplicate 0, relabelled 0, skipped 0" in capsys.readouterr().out
    for label in ("red", "blue"):
        assert sorted(p.name for p in (home / "dataset" / label).iterdir()) == \
            sorted(p.name for p in (other / "dataset" / label).iterdir())
    (tmp_path / "rows.csv").write_text("path,label\ntree/red/0.png,Golden Retriever\n"
                                       "tree/red/notes.txt,red\n")
    assert main(["import", str(tmp_path / "rows.csv"), "--home", str(other)]) == 0
    out = capsys.readouterr()
    assert "relabelled 1, skipped 1" in out.out and "skipped" in out.err
    assert main(["import", str(tmp_path / "missing.tar"), "--home", str(other)]) == 1


HOLD_THE_JOB_LOCK = """
import sys, time
from training.jobs import JobStore
jobs = JobStore(sys.argv[1])
record = jobs.create({"epochs": 3}, "api")
lock = jobs.acquire()
jobs.update(record["job_id"], status="running")
print(record["job_id"], flush=True)
time.sleep(120)
"""


def test_train_while_a_job_runs_names_it(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Another process holds the volume's job lock for a running job: `visionloop train` is
    refused before Ray starts, with the job's id, who started it and how to cancel it."""
    home = tmp_path / "home"
    make_tree(tmp_path / "tree", per_label=12)
    assert main(["import", str(tmp_path / "tree"), "--home", str(home)]) == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_JOB_LOCK, str(home)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        job_id = holder.stdout.readline().strip()
        capsys.readouterr()
        assert main(["train", "--home", str(home), "--epochs", "1"]) == 1
        err = capsys.readouterr().err
        assert job_id and job_id in err and "started by api" in err, err
        assert f"visionloop cancel {job_id}" in err, err
    finally:
        holder.kill()
        holder.wait()


def test_a_file_given_as_the_label_folder_says_what_to_give(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cat.jpg").write_bytes(noisy_image(1, (200, 10, 10)))
    assert main(["label", str(tmp_path / "cat.jpg"), "--home", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "visionloop predict FILE" in err, err


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
        # Quiet by default: Serve's start-up INFO lines (the "Connecting to existing Serve
        # app ... will not be applied" that serve.run logs after serve.start among them).
        assert "Connecting to existing Serve app" not in output, output
        assert "Started Serve" not in output, output
        assert "Constant folding" not in output, output  # torch's ONNX exporter, v0's publish
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


# -- without a service -----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["label", "import"])
def test_a_folder_that_is_not_one_folder_per_label_is_refused_with_the_layout(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Images directly in DIR, an empty DIR, empty label folders: refused before anything is
    read or sent (no service listens on the --url), the layout shown with DIR's own names."""
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "cat1.png").write_bytes(noisy_image(1, (200, 30, 30)))
    (flat / "cat2.png").write_bytes(noisy_image(2, (200, 30, 30)))
    empty, hollow = tmp_path / "empty", tmp_path / "hollow"
    empty.mkdir()
    (hollow / "cat").mkdir(parents=True)
    nowhere = ["--url", f"http://127.0.0.1:{free_port()}"] if command == "label" else []
    home = ["--home", str(tmp_path / "home")]
    cases = {flat: ["holds 2 file(s) directly (cat1.png, cat2.png)",
                    f"{flat}/<label>/<image>", f"e.g. {flat}/cat/cat1.png"],
             empty: ["has no images in label folders (it is empty)", f"{empty}/<label>/<image>"],
             hollow: ["(its folders are empty)", f"{hollow}/<label>/<image>"],
             tmp_path / "missing": ["is not a directory", "/<label>/<image>"]}
    for folder, expected in cases.items():
        assert main([command, str(folder), *nowhere, *home]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"visionloop: {folder}") and err.count("\n") == 1, err
        for text in expected:
            assert text in err, err
    assert not (tmp_path / "home" / "dataset").exists()  # import wrote nothing


def test_import_skips_files_beside_label_folders(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "loose.png").write_bytes(noisy_image(9, (9, 9, 9)))
    assert main(["import", str(tree), "--home", str(tmp_path / "home")]) == 0
    out = capsys.readouterr()
    assert "added 6, duplicate 0, relabelled 0, skipped 2" in out.out
    assert f"skipped {tree / 'loose.png'}: not in a label folder" in out.err


def test_import_skips_an_image_filed_under_two_labels(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same bytes in red/ and blue/: neither copy is imported (which label is right is the
    user's call, not the folder order's), each is reported naming the other; the rest goes in,
    and a copy under the same label (train/ and val/ of one label) is a plain duplicate."""
    tree = tmp_path / "tree"
    for split in ("train", "val"):
        for label, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            (tree / split / label).mkdir(parents=True)
            for i in range(2):
                (tree / split / label / f"{i}.png").write_bytes(
                    noisy_image(i + (10 if split == "val" else 0), color))
    twice = tree / "train" / "red" / "0.png"
    (tree / "val" / "blue" / "x.png").write_bytes(twice.read_bytes())
    (tree / "val" / "red" / "same.png").write_bytes(twice.read_bytes())  # same label: duplicate
    home = tmp_path / "home"
    assert main(["import", str(tree), "--home", str(home)]) == 0
    out = capsys.readouterr()
    assert "added 7, duplicate 0, relabelled 0, skipped 3" in out.out, out
    for path, other in ((twice, "val/blue/x.png"), (tree / "val" / "blue" / "x.png",
                                                    "train/red/0.png, val/red/same.png")):
        assert (f"skipped {path}: the same image is filed under 2 labels (blue, red; also "
                f"{other}); an image has one label: keep it in one folder") in out.err, out.err
    stored = sorted(p.name for p in (home / "dataset").rglob("*.*") if p.parent.name in
                    ("red", "blue"))
    assert len(stored) == 7


def test_train_resume_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume takes the job's own configuration (a training flag beside it is refused) and
    an unknown or finished job is refused before Ray starts."""
    from training.jobs import JobStore

    assert build_parser().parse_args(["train", "--resume", "20261129-000000-abcdef"]).resume \
        == "20261129-000000-abcdef"
    home = ["--home", str(tmp_path)]
    assert main(["train", "--resume", "j1", "--epochs", "3", "--no-gpu", *home]) == 1
    err = capsys.readouterr().err
    assert "--resume continues job j1 with its own configuration; drop --epochs, --gpu" in err
    assert main(["train", "--resume", "20261129-000000-abcdef", *home]) == 1
    assert "20261129-000000-abcdef" in capsys.readouterr().err
    jobs = JobStore(tmp_path)
    done = jobs.create(TrainConfig().model_dump(), "api")["job_id"]
    jobs.finish(done, "succeeded", "promoted", version="v1", promoted=True)
    assert main(["train", "--resume", done, *home]) == 1
    assert "nothing to resume" in capsys.readouterr().err


SECRET_SETTINGS = {
    "api token too short": ({"VISIONLOOP_API_TOKEN": "Sh0rtSecret"},
                            ["VISIONLOOP_API_TOKEN: must be at least 16 characters"]),
    "predict token too short": ({"VISIONLOOP_PREDICT_TOKEN": "pS3cr"},
                                ["VISIONLOOP_PREDICT_TOKEN: must be at least 8 characters"]),
    "both token and file": ({"VISIONLOOP_API_TOKEN": "EnvSecretEnvSecret-1234",
                             "VISIONLOOP_API_TOKEN_FILE": "file:FileSecretFileSecret-99"},
                            ["VISIONLOOP_API_TOKEN and VISIONLOOP_API_TOKEN_FILE are both set"]),
    "api token file too short": ({"VISIONLOOP_API_TOKEN_FILE": "file:FileSh0rt"},
                                 ["VISIONLOOP_API_TOKEN_FILE:", "shorter than 16 characters"]),
    "predict token file of two lines": (
        {"VISIONLOOP_PREDICT_TOKEN_FILE": "file:LineOneSecret\nLineTwoSecret\n"},
        ["VISIONLOOP_PREDICT_TOKEN_FILE:", "more than one line"]),
    "ray token beside a bad port": ({"RAY_AUTH_TOKEN": "RayAuthSecretRayAuthSecret",
                                     "VISIONLOOP_API_TOKEN": "ApiSecretApiSecretApiSecret",
                                     "VISIONLOOP_PORT": "eighty"},
                                    ["VISIONLOOP_PORT='eighty'"]),
}


@pytest.mark.parametrize("case", SECRET_SETTINGS)
def test_an_invalid_setting_names_the_variable_never_the_secret(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`visionloop up` refuses before anything starts, naming each variable and its rule; no
    secret (token, Ray token, a *_FILE's content) appears anywhere in what it prints."""
    env, expected = SECRET_SETTINGS[case]
    secrets = []
    for name, value in env.items():
        if value.startswith("file:"):
            path = tmp_path / name.lower()
            path.write_text(value[5:])
            value = str(path)
            secrets += [s for s in path.read_text().split() if s]
        elif "TOKEN" in name:
            secrets.append(value)
        monkeypatch.setenv(name, value)
    assert main(["up", "--home", str(tmp_path / "home")]) == 1
    out = capsys.readouterr()
    assert out.err.startswith("visionloop: invalid settings:"), out.err
    for text in expected:
        assert text in out.err, out.err
    for secret in secrets:
        assert secret not in out.err + out.out, (secret, out.err)
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("where", ["--token", "VISIONLOOP_API_TOKEN"])
@pytest.mark.parametrize("secret", ["HeaderSecret\x1b[2JHeaderSecret", "HeaderSecret\nsecond",
                                    "HeaderSecret-caf\u00e9"])
def test_a_token_no_header_can_carry_is_named_not_shown(
        where: str, secret: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--token", secret] if where == "--token" else []
    if where != "--token":
        monkeypatch.setenv(where, secret)
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["jobs", "--url", url, "--home", str(tmp_path), *flags]) == 1
    err = capsys.readouterr().err
    assert f"the token from {where} holds characters an HTTP header cannot carry" in err, err
    assert "HeaderSecret" not in err


# -- against the real service --------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[RunningService]:
    yield start_service(tmp_path_factory.mktemp("cli-home"))


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that is not the volume, as the working directory, and no token or home in the
    environment."""
    for name in ("VISIONLOOP_API_TOKEN", "VISIONLOOP_API_TOKEN_FILE", "VISIONLOOP_HOME",
                 "VISIONLOOP_URL"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.slow
def test_the_token_is_found_from_another_folder_and_a_401_says_where_it_looked(
        service: RunningService, elsewhere: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--url", service.url]
    local = elsewhere / "visionloop-data" / "secrets" / "api-token"
    assert main(["jobs", *url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("visionloop: HTTP 401: missing bearer token"), err
    assert "no API token was found: tried --token, VISIONLOOP_API_TOKEN and " \
           "VISIONLOOP_API_TOKEN_FILE (none set)" in err
    assert f"{local} (no such file)" in err and "--token" in err and "--home" in err

    monkeypatch.setenv("VISIONLOOP_HOME", str(service.home))  # the service's volume
    assert main(["jobs", *url]) == 0
    assert main(["jobs", *url, "--home", str(service.home)]) == 0
    monkeypatch.delenv("VISIONLOOP_HOME")

    # VISIONLOOP_HOME without a token file: ./visionloop-data's is next.
    monkeypatch.setenv("VISIONLOOP_HOME", str(tmp_path / "other-volume"))
    local.parent.mkdir(parents=True)
    local.write_text(service.token + "\n")
    local.chmod(0o600)
    assert main(["jobs", *url]) == 0
    # An explicit --home is the only volume looked at.
    capsys.readouterr()
    assert main(["jobs", *url, "--home", str(tmp_path / "other-volume")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "other-volume" / "secrets" / "api-token") in err
    assert str(local) not in err
    monkeypatch.delenv("VISIONLOOP_HOME")

    local.write_text("")  # unusable: passed over, and the 401 says why
    assert main(["jobs", *url]) == 1
    assert f"{local} (is empty)" in capsys.readouterr().err

    assert main(["jobs", *url, "--token", "wrong-token-wrong-token"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 401: wrong token" in err and "the token sent came from --token" in err
    token_file = tmp_path / "token"
    token_file.write_text(service.token)
    monkeypatch.setenv("VISIONLOOP_API_TOKEN_FILE", str(token_file))
    assert main(["jobs", *url]) == 0
    assert service.token not in capsys.readouterr().err


@pytest.mark.slow
def test_predict_classifies_what_it_can_and_reports_the_rest(
        service: RunningService, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # the root's level, as VISIONLOOP_LOG_LEVEL sets it
    good = [tmp_path / f"good{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        path.write_bytes(noisy_image(i, (30, 200, 30)))
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << >> endobj\n%%EOF\n")
    missing = tmp_path / "missing.jpg"
    # What the CLI builds on: the API refuses a mixed batch whole, naming the file.
    with service.client() as client:
        r = client.post("/v1/predict", files=[("files", ("good0.png", good[0].read_bytes())),
                                              ("files", ("a.pdf", pdf.read_bytes()))])
    assert r.status_code == 415 and "a.pdf" in r.json()["error"]["message"]
    caplog.clear()

    args = [str(good[0]), str(pdf), str(missing), str(good[1]), str(good[2]),
            "--url", service.url, "--home", str(service.home), "--batch", "2"]
    assert main(["predict", *args]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("model v0")
    assert [line.split(":")[0] for line in lines[1:]] == [str(p) for p in good]
    assert f"{pdf}: HTTP 415: " in out.err and "a.pdf: a.pdf" not in out.err
    assert f"{missing}: cannot read it (No such file or directory)" in out.err
    assert "visionloop: 2 of 5 file(s) could not be classified" in out.err
    assert not [r for r in caplog.records if r.name.startswith("httpx")]  # quiet by default

    assert main(["predict", *map(str, good), "--url", service.url, "--home",
                 str(service.home), "-v"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert [r for r in caplog.records if r.name == "httpx"]  # -v: each request's line


@pytest.mark.slow
def test_label_uploads_label_folders_and_skips_loose_files(
        service: RunningService, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "loose.png").write_bytes(noisy_image(77, (1, 2, 3)))
    (tree / "blue" / "also-red.png").write_bytes((tree / "red" / "0.png").read_bytes())
    assert main(["label", str(tree), "--url", service.url, "--home", str(service.home)]) == 0
    out = capsys.readouterr()
    # notes.txt (not an image), loose.png, and both copies of the image filed under two labels
    assert "skipped 4" in out.out
    assert f"skipped {tree / 'loose.png'}: not in a label folder" in out.err
    assert (f"skipped {tree / 'red' / '0.png'}: the same image is filed under 2 labels (blue, "
            "red; also blue/also-red.png)") in out.err


@pytest.mark.slow
def test_jobs_lists_and_cancel_cancels(service: RunningService, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Job records as the controller writes them on the service's volume: a queued job (no
    thread runs it, so a cancel ends it at once) and a finished one."""
    from training.jobs import JobStore

    jobs = JobStore(service.home)
    http = ["--url", service.url, "--home", str(service.home)]
    queued = jobs.create(TrainConfig().model_dump(), "api")["job_id"]
    done = jobs.create(TrainConfig().model_dump(), "schedule")["job_id"]
    long_reason = "not promoted: " + "the candidate did not beat the baseline " * 4
    jobs.finish(done, "succeeded", long_reason, version="v1", promoted=False)
    assert main(["jobs", *http]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["JOB", "STATUS", "SOURCE", "STARTED", "VERSION", "PROMOTED",
                              "REASON"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert rows[queued].split()[1:3] == ["queued", "api"]
    assert rows[done].split()[1:3] == ["succeeded", "schedule"]
    assert " v1 " in rows[done] and " false " in rows[done]
    assert rows[done].endswith("...") and long_reason not in rows[done]

    assert main(["cancel", queued, *http]) == 0
    assert capsys.readouterr().out == f"job {queued}: cancelled\n"
    assert jobs.get(queued)["status"] == "cancelled"
    assert main(["cancel", done, *http]) == 1
    assert "had already ended (succeeded); nothing to cancel" in capsys.readouterr().err
    assert main(["cancel", "20990101-000000-ffffff", *http]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert main(["jobs", *http, "--reason-width", "200"]) == 0
    assert long_reason.strip() in capsys.readouterr().out


@pytest.mark.slow
def test_activate_pin_and_unpin_show_the_policy(service: RunningService,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    http = ["--url", service.url, "--home", str(service.home)]
    volume = ["--home", str(service.home)]
    assert main(["unpin", *http]) == 0
    assert capsys.readouterr().out.startswith("policy: automatic")
    assert main(["models", *volume]) == 0
    assert "policy: automatic" in capsys.readouterr().out
    assert main(["activate", "v0", *http]) == 0
    out = capsys.readouterr().out
    assert out.startswith("current: v0 (replicas: v0)") and "policy: pinned to v0" in out
    assert main(["models", *volume]) == 0
    out = capsys.readouterr().out
    assert "policy: pinned to v0" in out and "by api" in out and "visionloop unpin" in out
    assert main(["activate", "v0", "--no-pin", *http]) == 0
    assert "policy: automatic" in capsys.readouterr().out
    assert main(["pin", *http]) == 0
    assert capsys.readouterr().out.startswith("policy: pinned to v0")
    assert main(["unpin", *http]) == 0
    assert main(["activate", "v9", *http]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert main(["trial", *http]) == 0
    assert capsys.readouterr().out.startswith("trial: none")
    assert main(["trial", "v0", "--mode", "canary", *http]) == 1  # the current version
    assert "HTTP 400" in capsys.readouterr().err
    assert main(["models", *volume]) == 0
    assert "trial: none" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_resume_continues_a_cancelled_job_from_its_checkpoint(
        ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real job started by `visionloop train` (on this module's Ray cluster), cancelled once
    a checkpoint is committed, then `visionloop train --resume ID`: it continues from that
    epoch under the same id, with the job's own configuration, and succeeds."""
    import threading

    from tests.support.images import labelled_set
    from training.dataset import DatasetStore
    from training.jobs import JobStore
    from training.pipeline import latest_checkpoint_epoch, run_dir

    store = DatasetStore(tmp_path)
    for label, data in labelled_set(["red", "blue"], 12):
        store.ingest(data, label)
    epochs = 6
    home = ["--home", str(tmp_path)]
    flags = ["--backbone", BACKBONE, "--strategy", "finetune", "--epochs", str(epochs),
             "--workers", "1", "--batch-size", "4", "--image-size", "64", "--lr", "0.05",
             "--threads", "1", "--max-failures", "0", "--gate-min-error-reduction", "0"]
    first: dict[str, int] = {}
    thread = threading.Thread(target=lambda: first.update(rc=main(["train", *flags, *home])))
    thread.start()
    jobs = JobStore(tmp_path)

    def checkpointed() -> str | None:
        assert thread.is_alive(), "the job ended before it could be cancelled"
        for record in jobs.list():
            epoch = latest_checkpoint_epoch(run_dir(tmp_path, record["job_id"]))
            if epoch is not None and epoch < epochs - 1:
                return str(record["job_id"])
        return None

    job_id = wait_for(checkpointed, timeout=400, interval=0.05, what="a committed checkpoint")
    jobs.request_cancel(job_id)  # what DELETE /v1/train/{id} does
    thread.join(300)
    assert first["rc"] == 1 and jobs.get(job_id)["status"] == "cancelled"
    epoch = latest_checkpoint_epoch(run_dir(tmp_path, job_id))
    capsys.readouterr()

    assert main(["train", "--resume", job_id, *home]) == 0
    out = capsys.readouterr().out
    assert f"training job {job_id} resumed from its checkpoint of epoch {epoch}" in out
    assert "v1: " in out
    record = jobs.get(job_id)
    assert record["status"] == "succeeded" and record["resumed_from_epoch"] == epoch
    assert [m["epoch"] for m in record["metrics"]] == list(range(1, epochs + 1))
    assert [(r["source"], r["from_epoch"]) for r in record["resumes"]] == [("cli", epoch)]


def test_a_job_in_progress_shows_its_stage() -> None:
    """The progress bar's label and `visionloop jobs`' STATUS: the stage of a job that has not
    ended (a job's first seconds are not a blank), the status of one that has."""
    from service.cli import _status_with_stage

    assert _status_with_stage({"status": "running", "stage": "computing features"}) == \
        "running: computing features"
    assert _status_with_stage({"status": "queued", "stage": "queued"}) == "queued"
    assert _status_with_stage({"status": "succeeded", "stage": "publishing"}) == "succeeded"
    assert _status_with_stage({"status": "running"}) == "running"
