"""Tokens: where the API token comes from, and who may call what.

- The API token opens every /v1 endpoint. It is `VISIONLOOP_API_TOKEN`, or else the content of
  `<home>/secrets/api-token`, generated on first start (0600, created exclusively so two
  processes starting together agree on one token).
- Predict is open unless `VISIONLOOP_PREDICT_TOKEN` is set; then it needs that token or the API
  token. The predict token on any other endpoint is 403 (valid token, not the right).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Literal

from training.errors import DomainError

log = logging.getLogger(__name__)

TOKEN_FILE = Path("secrets") / "api-token"


class AuthError(DomainError):
    """401 (no or wrong token; answered with `WWW-Authenticate: Bearer`) or 403 (a valid
    token without the right)."""

    code = "unauthorized"
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


def token_path(home: Path | str) -> Path:
    return Path(home) / TOKEN_FILE


def read_token_file(home: Path | str) -> str | None:
    try:
        token = token_path(home).read_text().strip()
    except OSError:
        return None
    return token or None


def ensure_api_token(home: Path | str, configured: str | None) -> tuple[str, Path | None]:
    """-> (the API token, the file it lives in or None when configured by environment)."""
    if configured:
        return configured, None
    path = token_path(home)
    existing = read_token_file(home)
    if existing:
        return existing, path
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its token
        return read_token_file(home) or token, path
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.warning("generated an API token into %s (mode 0600); send it as "
                "'Authorization: Bearer <token>'", path)
    return token, path


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def authorize(authorization: str | None, api_token: str, predict_token: str | None,
              need: Literal["api", "predict"]) -> None:
    """Raise AuthError (401/403) unless the Authorization header grants `need`."""
    token = bearer(authorization)
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
