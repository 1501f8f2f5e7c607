"""One exception type for every refusal the service can explain: `DomainError`.

Each domain exception (a bad image, an unknown version, a job already running, ...) is a
subclass that carries its API error `code` and HTTP `status` (and, rarely, `headers` such as
`Retry-After`); the service has one exception handler that turns any of them into
`{"error": {"code", "message"}}` with that status. The message is `str(exc)`.

Plain Python and picklable (instance overrides live in `__dict__`, which pickling keeps), so a
`DomainError` raised in one Ray actor reaches the caller of a Serve handle as the same type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class DomainError(Exception):
    """A refusal with an API error code and an HTTP status. Subclasses set both as class
    attributes; a raise site may override them (`DomainError(msg, code=..., status=...)`)."""

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 400
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, *args: Any, code: str | None = None, status: int | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(*args)
        # Instance attributes shadow the class defaults (and survive pickling in __dict__).
        if code is not None:
            self.__dict__["code"] = code
        if status is not None:
            self.__dict__["status"] = status
        if headers is not None:
            self.__dict__["headers"] = dict(headers)

    @property
    def message(self) -> str:
        return str(self)
