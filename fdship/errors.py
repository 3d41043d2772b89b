"""One error tree for all of fdship.

Expected failures inside a running cluster (a peer timed out, a hash did not
match) are *events* for the scheduler core, not exceptions.  Exceptions are for
bugs, start-up faults and bad input at the edges.  Every error carries a
message written for the person who has to act on it, and an HTTP status so the
one base handler can render it as JSON.
"""

from __future__ import annotations


class FdshipError(Exception):
    """Base of every error fdship raises on purpose."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class ConfigError(FdshipError):
    """Bad configuration or flags: the process refuses to start."""

    status = 400


class BadRequest(FdshipError):
    """A request a person or script got wrong (HTTP 4xx)."""

    status = 400


class Unauthorized(BadRequest):
    status = 401


class NotFound(BadRequest):
    status = 404


class Conflict(BadRequest):
    status = 409


class Unprocessable(BadRequest):
    """Well-formed but impossible: an unknown machine, a destination not allowed."""

    status = 422


class TooLarge(BadRequest):
    status = 413


class ProtocolError(BadRequest):
    """A wire message that does not match its schema."""

    status = 400


class IntegrityError(FdshipError):
    """Bytes that do not match their recorded hash."""

    status = 500


class LogCorruptError(FdshipError):
    """A REDO log record or checkpoint that fails its checksum in the middle of a log."""

    status = 500


class Unavailable(FdshipError):
    """A peer, the center or a daemon could not be reached."""

    status = 503


class LocalIOError(FdshipError):
    """A target-side failure that retrying elsewhere cannot fix (disk full, permission)."""

    status = 500
