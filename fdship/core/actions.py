"""Actions: commands the scheduler core returns for the runner to carry out.

The core never performs I/O; it says what should happen.  The runner (the
center's single writer) carries actions out *after* the durable events that led
to them are fsynced to the REDO log, so no daemon is ever told something the
center could forget in a crash.
"""

from __future__ import annotations

from dataclasses import dataclass

from fdship.core.events import Event
from fdship.protocol import Fetch, StagedFile


@dataclass(frozen=True)
class Action:
    pass


@dataclass(frozen=True)
class AssignFetch(Action):
    """Tell ``target`` (at ``address``) to fetch these chunks: POST /daemon/pull."""

    job: str
    target: str
    address: str
    files: tuple[StagedFile, ...]
    fetches: tuple[Fetch, ...]
    chunk_size: int = 0  # the job's


@dataclass(frozen=True)
class Pack(Action):
    """Tell ``target`` to verify and install one file: POST /daemon/pack."""

    job: str
    target: str
    address: str
    file: StagedFile
    chunk_size: int
    notify: str
    last: bool
    files_total: int


@dataclass(frozen=True)
class Commit(Action):
    """A durable decision: log ``event`` and feed it back into the core."""

    event: Event


@dataclass(frozen=True)
class JobEnded(Action):
    """The job reached ``done`` or ``failed``: wake waiters, deliver the callback."""

    job: str
    state: str
