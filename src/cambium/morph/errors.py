"""Errors of morph's networked backends (Redis, SQL databases, S3 stores)."""

from __future__ import annotations

from cambium.core.errors import CambiumError

__all__ = ["BackendError", "redact"]


class BackendError(CambiumError):
    """A backend server (Redis, PostgreSQL, an S3-compatible store) is unreachable or refused a request.

    The message is always one line: it quotes driver errors and URLs from the environment, which may hold newlines."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"
