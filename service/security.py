"""Tokens: where the API token comes from, and who may call what.

- The API token opens every /v1 endpoint. It is `VISIONLOOP_API_TOKEN` (or the content of the
  file `VISIONLOOP_API_TOKEN_FILE` names, a Docker secret: `service.settings`), or else the
  content of `<home>/secrets/api-token`, generated on first start.
- The generated file is created atomically: the token is written and fsynced into a temporary
  file (0600) beside it, which is then hard-linked to `secrets/api-token`. A link never replaces
  an existing file, so two processes starting together agree on one token (the loser reads the
  winner's), and a crash at any point leaves either no token file or a complete one, never an
  empty one. (A crash may leave the temporary `.api-token.*` file: 0600, in the 0700 folder,
  never read.)
- A client (the CLI's HTTP commands) sends the first of: the token it was given (flag,
  environment, secret file), `<home>/secrets/api-token` of each volume it is pointed at
  (`find_client_token`); what it tried is what a 401 tells the user, never a token's text.
- A token file that exists but cannot be used (unreadable, empty, shorter than
  API_TOKEN_MIN_LENGTH, or more than one line) stops the start with `TokenFileError` naming the
  file and the rule, and never shows what it holds: guessing a replacement instead would give
  every replica a token nobody knows and answer every call 401.
- Predict is open unless `VISIONLOOP_PREDICT_TOKEN` is set; then it needs that token or the API
  token. The predict token on any other endpoint is 403 (valid token, not the right).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from training.dataset import fsync_dir
from training.errors import DomainError

log = logging.getLogger(__name__)

TOKEN_FILE = Path("secrets") / "api-token"
API_TOKEN_MIN_LENGTH = 16
PREDICT_TOKEN_MIN_LENGTH = 8


class AuthError(DomainError):
    """401 (no or wrong token; answered with `WWW-Authenticate: Bearer`) or 403 (a valid
    token without the right)."""

    code = "unauthorized"
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class TokenFileError(DomainError):
    """A token file that exists but cannot be used; the message names the file and what is
    wrong with it, never its content. Raised at start (`prepare_home`, settings), where it
    stops the service."""

    code = "token_file_invalid"
    status = 500


def token_path(home: Path | str) -> Path:
    return Path(home) / TOKEN_FILE


def read_token(path: Path, min_length: int, label: str, hint: str = "") -> str:
    """The token in the file `path`: its text with surrounding whitespace (a trailing newline)
    dropped. Raises TokenFileError "`label` `path` <problem>`hint`" when the file cannot be
    read, is not text, is empty, holds fewer than `min_length` characters, or holds more than
    one line or any control character (nothing a client could send in a header)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problem = "is not text"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or type(exc).__name__})"
    else:
        token = text.strip()
        if not token:
            problem = "is empty"
        elif any(c in token for c in "\r\n"):
            problem = "holds more than one line"
        elif not token.isprintable():
            problem = "holds control characters"
        elif len(token) < min_length:
            problem = f"holds a token shorter than {min_length} characters"
        else:
            return token
    raise TokenFileError(f"{label} {path} {problem}{hint}")


@dataclass
class ClientToken:
    """The token a client (the CLI's HTTP commands) sends, from `find_client_token`: `token`
    (None: none found), where it came from (`source`), and each place looked at with what it
    held (`tried`), for what a 401/403 says (`hint`). Its repr never shows the token."""

    token: str | None = field(default=None, repr=False)
    source: str | None = None
    tried: list[str] = field(default_factory=list)

    def hint(self) -> str:
        """Where the token sent came from, or where none was found, and the flags to fix it."""
        if self.token is not None:
            where = f"the token sent came from {self.source}"
        else:
            where = "no API token was found: tried " + "; ".join(self.tried)
        return (f"{where}. Pass --token TOKEN (or set VISIONLOOP_API_TOKEN), or --home with the "
                "service's data folder (or set VISIONLOOP_HOME), whose secrets/api-token holds it")


def find_client_token(configured: SecretStr | str | None, source: str,
                      volumes: Sequence[Path | str]) -> ClientToken:
    """The token a client sends: `configured` (a flag, the environment, a secret file; `source`
    names which) when given, else the first usable `<volume>/secrets/api-token` of `volumes`,
    in order. A file missing or unusable (`read_token`'s rules, those the service applies to
    it) is passed over and `tried` says why, never what it holds. Raises TokenFileError when
    `configured` holds line breaks, control or non-ASCII characters (no HTTP header carries
    them), naming `source` only. The service itself goes through `ensure_api_token`."""
    if isinstance(configured, SecretStr):
        configured = configured.get_secret_value()
    if configured:
        if not (configured.isascii() and configured.isprintable()):
            raise TokenFileError(f"the token from {source} holds characters an HTTP header "
                                 "cannot carry (line breaks, control or non-ASCII characters; "
                                 "not shown)")
        return ClientToken(configured, source)
    found = ClientToken(tried=[f"{source} (none set)"])
    seen: set[Path] = set()
    for volume in volumes:
        path = token_path(volume).absolute()
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if not path.exists() and not path.is_symlink():
            found.tried.append(f"{path} (no such file)")
            continue
        try:
            token = read_token(path, API_TOKEN_MIN_LENGTH, "the API token file")
            return ClientToken(token, str(path), found.tried)
        except TokenFileError as exc:
            found.tried.append(f"{path} ({str(exc).split(str(path), 1)[-1].strip()})")
    return found


def _create_token_file(path: Path) -> str | None:
    """Write a new token into `path` unless the file exists: -> the token, or None when
    another process created the file first (see the module docstring)."""
    token = secrets.token_urlsafe(32)
    fd, tmp = tempfile.mkstemp(prefix=".api-token.", dir=path.parent)  # mode 0600
    try:
        try:
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        fsync_dir(path.parent)
        return token
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_api_token(home: Path | str, configured: SecretStr | str | None
                     ) -> tuple[str, Path | None]:
    """-> (the API token, the file it lives in or None when configured). `configured`: the
    settings' token (environment or secret file), which wins over the volume. Otherwise the
    volume's `secrets/api-token`, generated when missing. Raises TokenFileError when that file
    exists but cannot be used."""
    if isinstance(configured, SecretStr):
        configured = configured.get_secret_value()
    if configured:
        return configured, None
    path = token_path(home)
    hint = ("; fix it, or delete it to have a new token generated, or set "
            "VISIONLOOP_API_TOKEN")
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        token = _create_token_file(path)
        if token is not None:
            log.warning("generated an API token into %s (mode 0600); send it as "
                        "'Authorization: Bearer <token>'", path)
            return token, path
    return read_token(path, API_TOKEN_MIN_LENGTH, "the API token file", hint), path


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def authorize(token: str | None, api_token: str, predict_token: str | None,
              need: Literal["api", "predict"]) -> None:
    """Raise AuthError (401/403) unless the bearer `token` (None: none sent) grants `need`."""
    if need == "predict" and predict_token is None:
        return
    if token is None:
        raise AuthError("missing bearer token (Authorization: Bearer ...)")
    if _same(token, api_token):
        return
    if _same(token, predict_token):
        if need == "predict":
            return
        raise AuthError("the predict token does not open this endpoint; use the API token",
                        code="forbidden", status=403, headers={})
    raise AuthError("wrong token")
