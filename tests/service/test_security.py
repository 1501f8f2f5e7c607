"""The API token on the volume: created atomically (a crash while creating it leaves no file,
never an empty one), agreed on by processes that start together, and a token file that cannot
be used stops the start naming it (`prepare_home`, `visionloop up`), never showing its content.

The crash is real: a subprocess creating the file is SIGKILLed by itself at the chosen system
call (a profile hook on `os.write`, `os.fsync` or `os.link`); nothing in the code under test is
replaced. The state an older version's crash left (an empty `secrets/api-token`) is written as
such a crash leaves it, since that code no longer exists to be killed.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.app import prepare_home
from service.cli import main
from service.security import (
    API_TOKEN_MIN_LENGTH,
    TokenFileError,
    ensure_api_token,
    find_client_token,
    token_path,
)
from service.settings import load_settings
from tests.support.waiting import free_port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_once_0600_and_kept(tmp_path: Path) -> None:
    token, path = ensure_api_token(tmp_path, None)
    assert path == token_path(tmp_path) and path.read_text() == token + "\n"
    assert len(token) >= API_TOKEN_MIN_LENGTH
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert ensure_api_token(tmp_path, None) == (token, path)
    assert find_client_token(None, "--token", [tmp_path]).token == token
    assert sorted(p.name for p in path.parent.iterdir()) == ["api-token"]  # no temp file left


def test_a_configured_token_wins_and_writes_nothing(tmp_path: Path) -> None:
    configured = "c" * API_TOKEN_MIN_LENGTH
    assert ensure_api_token(tmp_path, SecretStr(configured)) == (configured, None)
    assert ensure_api_token(tmp_path, configured) == (configured, None)
    assert not (tmp_path / "secrets").exists()


CREATE = textwrap.dedent("""
    import os, signal, sys
    from service.security import ensure_api_token

    target = getattr(os, sys.argv[2])

    def die_at(frame, event, arg):
        if event == "c_call" and arg is target:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(die_at)
    ensure_api_token(sys.argv[1], None)
    sys.setprofile(None)
    print("not killed")
""")


@pytest.mark.parametrize("call", ["write", "fsync", "link"])
def test_a_crash_while_creating_leaves_no_token_file(tmp_path: Path, call: str) -> None:
    """Killed after the temporary file is created (before its write), before its fsync, or
    just before it is linked into place: no `api-token` at all, so the next start generates
    a complete one."""
    proc = subprocess.run([sys.executable, "-c", CREATE, str(tmp_path), call],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    secrets_dir = tmp_path / "secrets"
    assert not token_path(tmp_path).exists()
    leftovers = list(secrets_dir.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".api-token.")
    assert mode(leftovers[0]) == 0o600  # what a crash leaves is private too
    token, path = ensure_api_token(tmp_path, None)
    assert path is not None and path.read_text() == token + "\n"
    assert len(token) >= API_TOKEN_MIN_LENGTH


def test_processes_starting_together_agree_on_one_token(tmp_path: Path) -> None:
    script = ("import sys; from service.security import ensure_api_token; "
              "print(ensure_api_token(sys.argv[1], None)[0])")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    tokens = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert tokens == {token_path(tmp_path).read_text().strip()}


SECRET = "visible-secret-do-not-print"


def _write(kind: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(path.parent / "nowhere")
    else:
        path.write_bytes({
            "empty": b"",  # what a crash between creating and writing left, before this fix
            "blank": b" \n\n",
            "short": b"short-token\n",
            "two lines": f"{SECRET}\n{SECRET}\n".encode(),
            "control characters": f"{SECRET}\x1b[2J".encode(),
            "not text": b"\xff\xfe" + SECRET.encode("utf-16-le"),
        }[kind])


BAD_FILES = {"empty": "is empty", "blank": "is empty",
             "short": f"shorter than {API_TOKEN_MIN_LENGTH} characters",
             "two lines": "more than one line", "control characters": "control characters",
             "not text": "is not text", "directory": "cannot be read",
             "dangling link": "cannot be read"}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_an_unusable_token_file_stops_the_start_naming_it(tmp_path: Path, kind: str) -> None:
    path = token_path(tmp_path)
    _write(kind, path)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(TokenFileError) as err:
        ensure_api_token(tmp_path, None)
    message = str(err.value)
    assert str(path) in message and BAD_FILES[kind] in message, message
    assert SECRET not in message and "short-token" not in message
    assert "VISIONLOOP_API_TOKEN" in message  # the way out
    # prepare_home refuses before it does anything else (no v0 published, nothing replaced)
    with pytest.raises(TokenFileError):
        prepare_home(load_settings(home=tmp_path))
    assert not (tmp_path / "models").exists()
    assert (path.read_bytes() if path.is_file() else None) == before
    client = find_client_token(None, "--token", [tmp_path])  # a client finds none to send
    assert client.token is None and BAD_FILES[kind] in client.hint(), client.hint()
    assert str(path) in client.hint() and SECRET not in client.hint()


def test_visionloop_up_refuses_in_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs in the service's child process (`visionloop up` supervises it), so the
    line is read from the file descriptors both write to."""
    monkeypatch.delenv("VISIONLOOP_API_TOKEN", raising=False)
    _write("empty", token_path(tmp_path))
    assert main(["up", "--home", str(tmp_path), "--port", str(free_port())]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("visionloop: the API token file ")
    assert str(token_path(tmp_path)) in err and "is empty" in err


def test_visionloop_up_on_a_busy_port_refuses_in_one_line_before_starting_anything(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Another server listens on the port (a second `visionloop up`, say): one line naming the
    address and what to do, exit 1, before Ray or the volume is touched."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["up", "--home", str(tmp_path / "home"), "--host", "127.0.0.1",
                     "--port", str(port)]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"visionloop: cannot listen on 127.0.0.1:{port}: "), err
    assert "--port" in err and "VISIONLOOP_PORT" in err
    assert not (tmp_path / "home").exists()  # nothing made on the volume


def test_a_configured_token_skips_a_bad_file(tmp_path: Path) -> None:
    """VISIONLOOP_API_TOKEN set: the volume's file is not the token, so it does not matter."""
    _write("empty", token_path(tmp_path))
    configured = SecretStr("k" * 20)
    assert ensure_api_token(tmp_path, configured) == ("k" * 20, None)
    assert os.path.getsize(token_path(tmp_path)) == 0
