"""What crosses the wire, defined once.

URL paths and JSON message shapes shared by the center, the daemons, the CLI
and the TUI.  Every message is a frozen dataclass with ``to_json()`` (a plain
dict ready for ``json.dumps``) and ``from_json(obj)`` which validates types and
raises :class:`~fdship.errors.ProtocolError` with a sentence naming the field.

This module imports nothing from tornado or asyncio so the pure core, the CLI
and the tests can all use it.  Message bodies are documented in
``docs/protocol.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

from fdship.errors import ProtocolError


def _no_constants(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and a number that is
    # not finite would end up in the center's state and answers.
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: str | bytes) -> Any:
    """Parse JSON as every fdship endpoint does: NaN and Infinity are refused (ValueError)."""
    return json.loads(raw, parse_constant=_no_constants)


# --- paths ------------------------------------------------------------------

CENTER_JOB = "/center/job"
CENTER_ACK = "/center/ack"
CENTER_DRAINING = "/center/draining"  # POST DrainBatch: fetches about to finish (soft)
CENTER_FIN = "/center/fin"
CENTER_HEARTBEAT = "/center/heartbeat"
# GET, upgraded to a WebSocket: a daemon's control channel (see fdship.channel).
CENTER_CHANNEL = "/center/channel"
CHANNEL_MAX_FRAME = 16 * 1024 * 1024  # one control message (a pull of many chunks fits)
CENTER_JOBS = "/center/jobs"  # GET list; GET /center/jobs/ID one job
CENTER_HOSTS = "/center/hosts"
CENTER_EVENTS = "/center/events"
# GET list / POST add; GET or DELETE /center/schedules/NAME; GET .../NAME/history
CENTER_SCHEDULES = "/center/schedules"
DAEMON_API = "/daemon/api"
DAEMON_PULL = "/daemon/pull"
DAEMON_DOWNLOAD = "/daemon/download"
DAEMON_PACK = "/daemon/pack"
DAEMON_STATUS = "/daemon/status"
DAEMON_DELTA = "/daemon/delta"  # POST: block hashes and byte ranges of a chunk (delta)
METRICS = "/metrics"

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024

# Reasons a fetch can fail.  The scheduler treats FATAL_KINDS as the machine's
# own fault (retrying on another peer cannot help); every other kind is retried
# from a different peer with backoff.
FAIL_HASH = "hash_mismatch"
FAIL_CONNECT = "connection"
FAIL_TIMEOUT = "timeout"
FAIL_HTTP = "http_error"
FAIL_MISSING = "peer_missing_chunk"
FAIL_LOCAL = "local"  # target-side: permission denied, disk full, dest is a directory
FAIL_KINDS = frozenset({FAIL_HASH, FAIL_CONNECT, FAIL_TIMEOUT, FAIL_HTTP, FAIL_MISSING, FAIL_LOCAL})
FATAL_KINDS = frozenset({FAIL_LOCAL})

T = TypeVar("T")


# --- validation helpers -----------------------------------------------------


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _get(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], what: str,
         default: Any = ..., ) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise ProtocolError(f"{what}: missing field '{key}'")
        return default
    v = d[key]
    # bool is an int subclass: refuse true/false where a number is expected.
    if isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise ProtocolError(f"{what}: field '{key}' must be {_tname(typ)}, not a boolean")
    if not isinstance(v, typ):
        raise ProtocolError(f"{what}: field '{key}' must be {_tname(typ)}")
    if isinstance(v, str):
        _text(v, what, key)
    return v


def _text(v: str, what: str, key: str) -> str:
    # JSON lets "\ud800" through; Python keeps it as a lone surrogate, which no
    # file name, log line or UTF-8 answer can hold.
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"{what}: field '{key}' is not valid Unicode text") from None
    return v


def _tname(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "an object"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _nonneg(d: Mapping[str, Any], key: str, what: str, default: Any = ...) -> int:
    v = _get(d, key, int, what, default)
    if v < 0 or v > 2**62:
        raise ProtocolError(f"{what}: field '{key}' must be between 0 and 2^62")
    return int(v)


def _num(d: Mapping[str, Any], key: str, what: str, default: Any = ...) -> float:
    v = _get(d, key, (int, float), what, default)
    # float(10**400) overflows, and NaN or infinity would poison every sum and
    # comparison the scheduler makes with it.
    if isinstance(v, int) and not -2**62 <= v <= 2**62 or not math.isfinite(v):
        raise ProtocolError(f"{what}: field '{key}' must be a finite number")
    return float(v)


def _strs(d: Mapping[str, Any], key: str, what: str, default: Any = ...) -> list[str]:
    v = _get(d, key, list, what, default)
    for item in v:
        if not isinstance(item, str):
            raise ProtocolError(f"{what}: every entry of '{key}' must be a string")
        _text(item, what, key)
    return list(v)


def _list(d: Mapping[str, Any], key: str, what: str, default: Any = ...) -> list[Any]:
    return list(_get(d, key, list, what, default))


def _hex(d: Mapping[str, Any], key: str, what: str) -> str:
    v = _get(d, key, str, what)
    if len(v) != 16 or any(c not in "0123456789abcdef" for c in v):
        raise ProtocolError(f"{what}: field '{key}' must be 16 lowercase hex digits (xxh3-64)")
    return v


# --- manifests ----------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    """One file of a job: where it came from, where it lands, and its chunk hashes.

    Chunk ``i`` covers bytes ``[i*chunk_size, min(size, (i+1)*chunk_size))``.
    An empty file has no chunks.
    """

    path: str
    dest: str
    size: int
    xxh3: str
    chunks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "dest": self.dest, "size": self.size, "xxh3": self.xxh3,
                "chunks": list(self.chunks)}

    @classmethod
    def from_json(cls, obj: Any) -> FileSpec:
        d = _obj(obj, "file")
        chunks = _strs(d, "chunks", "file")
        for c in chunks:
            if len(c) != 16:
                raise ProtocolError("file: every chunk hash must be 16 hex digits")
        return cls(path=_get(d, "path", str, "file"), dest=_get(d, "dest", str, "file"),
                   size=_nonneg(d, "size", "file"), xxh3=_hex(d, "xxh3", "file"),
                   chunks=tuple(chunks))


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def chunk_span(size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` of a file of ``size`` bytes."""
    off = index * chunk_size
    return off, max(0, min(chunk_size, size - off))


@dataclass(frozen=True)
class JobRequest:
    """POST /center/job: the source daemon asks the center to run a job."""

    source: str
    files: tuple[FileSpec, ...]
    machines: tuple[str, ...]
    chunk_size: int
    callback: str = ""
    notify: str = ""
    schedule: str = ""  # "NAME#RUN" when a schedule's run submits the job

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "files": [f.to_json() for f in self.files],
                "machines": list(self.machines), "chunk_size": self.chunk_size,
                "callback": self.callback, "notify": self.notify, "schedule": self.schedule}

    @classmethod
    def from_json(cls, obj: Any) -> JobRequest:
        d = _obj(obj, "job")
        files = tuple(FileSpec.from_json(f) for f in _list(d, "files", "job"))
        cs = _nonneg(d, "chunk_size", "job")
        if cs < 4096:
            raise ProtocolError("job: chunk_size must be at least 4096 bytes")
        for f in files:
            if len(f.chunks) != chunk_count(f.size, cs):
                raise ProtocolError(f"job: file {f.path} has {len(f.chunks)} chunk hashes, "
                                    f"expected {chunk_count(f.size, cs)}")
        return cls(source=_get(d, "source", str, "job"), files=files,
                   machines=tuple(_strs(d, "machines", "job")), chunk_size=cs,
                   callback=_get(d, "callback", str, "job", ""),
                   notify=_get(d, "notify", str, "job", ""),
                   schedule=_get(d, "schedule", str, "job", ""))


# --- submission (outside interface, CONTRACT) ------------------------------------


@dataclass(frozen=True)
class ApiRequest:
    """POST /daemon/api: what a user submits to the source daemon."""

    files: tuple[str, ...]
    machines: tuple[str, ...]
    callback: str = ""
    dest: str = ""
    notify: str = ""
    # False: answer 202 {"job": ID} at once without a callback (`fdship submit --no-wait`).
    wait: bool = True
    # Path -> xxh3 of the last shipped version: when every file still hashes to
    # it, answer 200 {"skipped": true, "reason": ...} and create no job
    # (a schedule's run whose files did not change).
    skip_if_unchanged: Mapping[str, str] = field(default_factory=dict)
    schedule: str = ""  # "NAME#RUN": set by the center for a schedule's run

    def to_json(self) -> dict[str, Any]:
        return {"files": list(self.files), "machines": list(self.machines),
                "callback": self.callback, "dest": self.dest, "notify": self.notify,
                "wait": self.wait, "skip_if_unchanged": dict(self.skip_if_unchanged),
                "schedule": self.schedule}

    @classmethod
    def from_json(cls, obj: Any) -> ApiRequest:
        d = _obj(obj, "request")
        files = _strs(d, "files", "request")
        machines = _strs(d, "machines", "request")
        if not files:
            raise ProtocolError("request: 'files' is empty: name at least one file to ship")
        if not machines:
            raise ProtocolError("request: 'machines' is empty: name at least one target "
                                "machine (a name, an address or @label)")
        skip = _get(d, "skip_if_unchanged", dict, "request", {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in skip.items()):
            raise ProtocolError("request: 'skip_if_unchanged' must map file paths to xxh3 "
                                "hex strings")
        return cls(files=tuple(files), machines=tuple(machines),
                   callback=_get(d, "callback", str, "request", ""),
                   dest=_get(d, "dest", str, "request", ""),
                   notify=_get(d, "notify", str, "request", ""),
                   wait=_get(d, "wait", bool, "request", True),
                   skip_if_unchanged=dict(skip),
                   schedule=_get(d, "schedule", str, "request", ""))


@dataclass(frozen=True)
class ScheduleRequest:
    """POST /center/schedules: ship ``paths`` from ``source`` to ``machines`` on a schedule.

    Exactly one of ``every`` (seconds, or a string like "10m") and ``cron`` (a
    5- or 6-field expression, UTC) is given; the core validates the values.
    """

    name: str
    source: str
    machines: tuple[str, ...]
    paths: tuple[str, ...]
    every: float | str | None = None
    cron: str = ""
    dest: str = ""
    notify: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "machines": list(self.machines),
                "files": list(self.paths), "every": self.every, "cron": self.cron,
                "dest": self.dest, "notify": self.notify}

    @classmethod
    def from_json(cls, obj: Any) -> ScheduleRequest:
        d = _obj(obj, "schedule")
        return cls(name=_get(d, "name", str, "schedule"),
                   source=_get(d, "source", str, "schedule"),
                   machines=tuple(_strs(d, "machines", "schedule")),
                   paths=tuple(_strs(d, "files", "schedule")),
                   every=_get(d, "every", (int, float, str), "schedule", None),
                   cron=_get(d, "cron", str, "schedule", ""),
                   dest=_get(d, "dest", str, "schedule", ""),
                   notify=_get(d, "notify", str, "schedule", ""))


# --- center -> daemon commands ---------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    """One assigned fetch: get chunk ``chunk`` of file ``file`` from ``peer``."""

    file: int
    chunk: int
    offset: int
    size: int
    xxh3: str
    peer: str  # advertised HOST:PORT of the peer to fetch from
    peer_name: str
    # The peer is itself still receiving this chunk (it relays it, cut-through):
    # its own pull may reach it a moment after this one reaches us, so the
    # download asks it to wait for the chunk's arrival rather than refuse.
    arriving: bool = False

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "chunk": self.chunk, "offset": self.offset,
                             "size": self.size, "xxh3": self.xxh3, "peer": self.peer,
                             "peer_name": self.peer_name}
        if self.arriving:  # absent means false: older daemons read the message unchanged
            d["arriving"] = True
        return d

    @classmethod
    def from_json(cls, obj: Any) -> Fetch:
        d = _obj(obj, "fetch")
        return cls(file=_nonneg(d, "file", "fetch"), chunk=_nonneg(d, "chunk", "fetch"),
                   offset=_nonneg(d, "offset", "fetch"), size=_nonneg(d, "size", "fetch"),
                   xxh3=_hex(d, "xxh3", "fetch"), peer=_get(d, "peer", str, "fetch"),
                   peer_name=_get(d, "peer_name", str, "fetch"),
                   arriving=_get(d, "arriving", bool, "fetch", False))


@dataclass(frozen=True)
class StagedFile:
    """What a target needs to open the staging file for one file of a job."""

    file: int
    dest: str
    size: int
    xxh3: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "dest": self.dest, "size": self.size, "xxh3": self.xxh3}

    @classmethod
    def from_json(cls, obj: Any) -> StagedFile:
        d = _obj(obj, "staged file")
        return cls(file=_nonneg(d, "file", "staged file"), dest=_get(d, "dest", str, "staged file"),
                   size=_nonneg(d, "size", "staged file"), xxh3=_hex(d, "xxh3", "staged file"))


@dataclass(frozen=True)
class PullRequest:
    """POST /daemon/pull: the center tells a target which chunks to fetch, from whom."""

    job: str
    files: tuple[StagedFile, ...]
    fetches: tuple[Fetch, ...]
    # The job's chunk size, which every staged file of the pull is laid out by.
    # 0 from centers that predate it: the daemon then works it out from the
    # fetches (``Daemon._job_chunk_size``).
    chunk_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "files": [f.to_json() for f in self.files],
                "fetches": [f.to_json() for f in self.fetches], "chunk_size": self.chunk_size}

    @classmethod
    def from_json(cls, obj: Any) -> PullRequest:
        d = _obj(obj, "pull")
        chunk_size = _nonneg(d, "chunk_size", "pull", 0)
        if chunk_size > 1024**3:
            raise ProtocolError("pull: 'chunk_size' must be at most 1 GiB")
        return cls(job=_get(d, "job", str, "pull"),
                   files=tuple(StagedFile.from_json(f) for f in _list(d, "files", "pull")),
                   fetches=tuple(Fetch.from_json(f) for f in _list(d, "fetches", "pull")),
                   chunk_size=chunk_size)


@dataclass(frozen=True)
class PackRequest:
    """POST /daemon/pack: every chunk of a file is on the target; verify and install it."""

    job: str
    file: StagedFile
    chunk_size: int
    # The job's notify hook, run by the target once every file of the job landed.
    notify: str = ""
    last: bool = False  # True when this is the job's last file for this target
    files_total: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "file": self.file.to_json(), "chunk_size": self.chunk_size,
                "notify": self.notify, "last": self.last, "files_total": self.files_total}

    @classmethod
    def from_json(cls, obj: Any) -> PackRequest:
        d = _obj(obj, "pack")
        # The target walks the job's files for the notify hook: a count beyond any
        # job (max_files) must not keep it busy.
        if _nonneg(d, "files_total", "pack", 1) > 1_000_000:
            raise ProtocolError("pack: field 'files_total' must be at most 1000000")
        return cls(job=_get(d, "job", str, "pack"), file=StagedFile.from_json(d.get("file")),
                   chunk_size=_nonneg(d, "chunk_size", "pack"),
                   notify=_get(d, "notify", str, "pack", ""), last=_get(d, "last", bool, "pack", False),
                   files_total=_nonneg(d, "files_total", "pack", 1))


# --- daemon -> center reports -------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """One fetch outcome.  ``ok`` False is a nack carrying the failure kind."""

    job: str
    file: int
    chunk: int
    peer: str  # peer *name* the chunk was fetched from
    ok: bool
    kind: str = ""
    error: str = ""
    nbytes: int = 0  # bytes that crossed the network for this chunk
    seconds: float = 0.0  # the whole fetch, waiting for a download slot included
    # The network transfer alone (connect, request, body), for the center's
    # link-speed estimates; 0 when nothing was fetched from the peer.
    wire_seconds: float = 0.0
    # The chunk was taken from the target's old copy of the file: nothing was
    # fetched (nbytes 0), so it must not count as the peer's upload.
    local: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "file": self.file, "chunk": self.chunk, "peer": self.peer,
                "ok": self.ok, "kind": self.kind, "error": self.error, "bytes": self.nbytes,
                "seconds": self.seconds, "wire_seconds": self.wire_seconds,
                "local": self.local}

    @classmethod
    def from_json(cls, obj: Any) -> Ack:
        d = _obj(obj, "ack")
        ok = _get(d, "ok", bool, "ack")
        kind = _get(d, "kind", str, "ack", "")
        if not ok and kind not in FAIL_KINDS:
            raise ProtocolError(f"ack: failure kind must be one of {sorted(FAIL_KINDS)}")
        return cls(job=_get(d, "job", str, "ack"), file=_nonneg(d, "file", "ack"),
                   chunk=_nonneg(d, "chunk", "ack"), peer=_get(d, "peer", str, "ack", ""),
                   ok=ok, kind=kind, error=_get(d, "error", str, "ack", "")[:2000],
                   nbytes=_nonneg(d, "bytes", "ack", 0), seconds=_num(d, "seconds", "ack", 0.0),
                   wire_seconds=max(0.0, _num(d, "wire_seconds", "ack", 0.0)),
                   local=_get(d, "local", bool, "ack", False))


@dataclass(frozen=True)
class AckBatch:
    """POST /center/ack: one or more fetch outcomes from one host."""

    host: str
    acks: tuple[Ack, ...]

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "acks": [a.to_json() for a in self.acks]}

    @classmethod
    def from_json(cls, obj: Any) -> AckBatch:
        d = _obj(obj, "ack batch")
        acks = tuple(Ack.from_json(a) for a in _list(d, "acks", "ack batch"))
        if len(acks) > 10_000:
            raise ProtocolError("ack batch: at most 10000 acks per request")
        return cls(host=_get(d, "host", str, "ack batch"), acks=acks)


@dataclass(frozen=True)
class Drain:
    """One fetch about to finish: the target has all but its last ``fetch_lead``
    seconds' worth of the chunk's bytes from ``peer`` (the peer's *name*).

    A hint, never a promise: the chunk is neither complete nor verified, and its
    ack still follows.  The center gives both ends their next transfer now
    (``FetchDraining``) instead of a round trip later.
    """

    job: str
    file: int
    chunk: int
    peer: str

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "file": self.file, "chunk": self.chunk, "peer": self.peer}

    @classmethod
    def from_json(cls, obj: Any) -> Drain:
        d = _obj(obj, "drain notice")
        job = _get(d, "job", str, "drain notice")
        peer = _get(d, "peer", str, "drain notice")
        if not job or len(job) > 255 or not peer or len(peer) > 255:
            raise ProtocolError("drain notice: 'job' and 'peer' must be 1-255 characters")
        return cls(job=job, file=_nonneg(d, "file", "drain notice"),
                   chunk=_nonneg(d, "chunk", "drain notice"), peer=peer)


@dataclass(frozen=True)
class DrainBatch:
    """POST /center/draining: one or more fetches of one host about to finish.

    Sent at once, not batched on a timer: a notice is only worth its lead while
    the fetch still runs.  A batch holds more than one only when notices queued
    behind the few requests a daemon keeps in flight.
    """

    host: str
    drains: tuple[Drain, ...]

    MAX: ClassVar[int] = 1000

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "drains": [d.to_json() for d in self.drains]}

    @classmethod
    def from_json(cls, obj: Any) -> DrainBatch:
        d = _obj(obj, "drain batch")
        items = _list(d, "drains", "drain batch")
        if not items:
            raise ProtocolError("drain batch: 'drains' is empty: send at least one notice")
        if len(items) > cls.MAX:
            raise ProtocolError(f"drain batch: at most {cls.MAX} notices per request")
        host = _get(d, "host", str, "drain batch")
        if not host or len(host) > 255:
            raise ProtocolError("drain batch: 'host' must be 1-255 characters")
        return cls(host=host, drains=tuple(Drain.from_json(i) for i in items))


@dataclass(frozen=True)
class Fin:
    """POST /center/fin: a target packed (or failed to pack) one file of a job.

    ``file`` is -1 for the machine-level outcome of the notify hook, which a
    target reports after the job's last file landed.
    """

    job: str
    host: str
    file: int
    ok: bool
    error: str = ""
    # "integrity" (whole-file hash mismatch: refetch) or "local" (the target cannot
    # install: the machine fails with ``error``).
    kind: str = ""
    hook: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "host": self.host, "file": self.file, "ok": self.ok,
                "error": self.error, "kind": self.kind,
                "hook": dict(self.hook) if self.hook else None}

    @classmethod
    def from_json(cls, obj: Any) -> Fin:
        d = _obj(obj, "fin")
        f = _get(d, "file", int, "fin")
        if f < -1 or f > 1_000_000:
            raise ProtocolError("fin: field 'file' out of range")
        hook = d.get("hook")
        if hook is not None and not isinstance(hook, Mapping):
            raise ProtocolError("fin: field 'hook' must be an object")
        return cls(job=_get(d, "job", str, "fin"), host=_get(d, "host", str, "fin"), file=f,
                      ok=_get(d, "ok", bool, "fin"), error=_get(d, "error", str, "fin", "")[:2000],
                   kind=_get(d, "kind", str, "fin", ""), hook=hook)


@dataclass(frozen=True)
class Load:
    """A daemon's load report (psutil), used to steer work toward idle hosts."""

    cpu: float = 0.0  # percent of all cores, 0-100
    loadavg: float = 0.0  # 1-minute load average divided by core count
    net_tx: float = 0.0  # bytes/s
    net_rx: float = 0.0  # bytes/s
    disk_busy: float = 0.0  # percent of time the busiest disk was busy
    uploads: int = 0
    downloads: int = 0
    bytes_served: int = 0
    bytes_received: int = 0
    # CPU of the processes the daemon watches (watch_pidfile, e.g. the bidder),
    # children included, in percent of ONE core like top: 250 = two and a half
    # cores.  0 when nothing is watched; absent from older daemons' reports.
    app_cpu: float = 0.0
    # The app CPU (same unit) at which this host counts as fully busy: the
    # daemon's watch_busy_cpu, so each host's app is judged on its own scale
    # (a bidder built to use eight cores is not busy at two).
    app_cpu_busy: float = 75.0

    def to_json(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "loadavg": self.loadavg, "net_tx": self.net_tx,
                "net_rx": self.net_rx, "disk_busy": self.disk_busy, "uploads": self.uploads,
                "downloads": self.downloads, "bytes_served": self.bytes_served,
                "bytes_received": self.bytes_received, "app_cpu": self.app_cpu,
                "app_cpu_busy": self.app_cpu_busy}

    @classmethod
    def from_json(cls, obj: Any) -> Load:
        d = _obj(obj if obj is not None else {}, "load")
        return cls(cpu=_num(d, "cpu", "load", 0.0), loadavg=_num(d, "loadavg", "load", 0.0),
                   net_tx=_num(d, "net_tx", "load", 0.0), net_rx=_num(d, "net_rx", "load", 0.0),
                   disk_busy=_num(d, "disk_busy", "load", 0.0),
                   uploads=_nonneg(d, "uploads", "load", 0),
                   downloads=_nonneg(d, "downloads", "load", 0),
                   bytes_served=_nonneg(d, "bytes_served", "load", 0),
                   bytes_received=_nonneg(d, "bytes_received", "load", 0),
                   app_cpu=max(0.0, _num(d, "app_cpu", "load", 0.0)),
                   app_cpu_busy=max(1.0, _num(d, "app_cpu_busy", "load", 75.0)))


@dataclass(frozen=True)
class Holding:
    """Inventory entry: the chunks of one job file a daemon holds verified on disk."""

    job: str
    file: int
    chunks: tuple[int, ...]
    packed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "file": self.file, "chunks": list(self.chunks),
                "packed": self.packed}

    @classmethod
    def from_json(cls, obj: Any) -> Holding:
        d = _obj(obj, "holding")
        chunks = _get(d, "chunks", list, "holding")
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**31
                   for c in chunks):
            raise ProtocolError("holding: 'chunks' must be a list of chunk indexes")
        return cls(job=_get(d, "job", str, "holding"), file=_nonneg(d, "file", "holding"),
                   chunks=tuple(chunks), packed=_get(d, "packed", bool, "holding", False))


@dataclass(frozen=True)
class Heartbeat:
    """POST /center/heartbeat: register (first beat after start) and report every ~1 s."""

    name: str
    address: str  # advertised HOST:PORT
    boot_id: str  # changes on every daemon start, so the center sees restarts
    labels: tuple[str, ...] = ()
    load: Load = field(default_factory=Load)
    free: Mapping[str, int] = field(default_factory=dict)  # allowed dest dir -> free bytes
    allow_dest: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()
    max_uploads: int = 4
    max_downloads: int = 4
    version: str = ""
    # Sent on registration and whenever the center asks for it.
    inventory: tuple[Holding, ...] | None = None
    # The daemon serves a chunk while it is still arriving (GET /daemon/download
    # streams the bytes as they land), so the center may name it as the peer for
    # a chunk it is fetching.  False from daemons that predate it: during a
    # rolling upgrade the center names them only for chunks they hold.
    streams: bool = False
    # The daemon's own rate caps (upload_rate / download_rate), bytes/s; 0: none.
    # A cap bounds the center's estimate of that link from the first chunk,
    # before any transfer has measured it.  Absent (0) from older daemons.
    upload_rate: int = 0
    download_rate: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "boot_id": self.boot_id,
                "streams": self.streams, "upload_rate": self.upload_rate,
                "download_rate": self.download_rate,
                "labels": list(self.labels), "load": self.load.to_json(), "free": dict(self.free),
                "allow_dest": list(self.allow_dest), "hooks": list(self.hooks),
                "max_uploads": self.max_uploads, "max_downloads": self.max_downloads,
                "version": self.version,
                "inventory": None if self.inventory is None else [h.to_json() for h in self.inventory]}

    @classmethod
    def from_json(cls, obj: Any) -> Heartbeat:
        d = _obj(obj, "heartbeat")
        free = _get(d, "free", dict, "heartbeat", {})
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                   and 0 <= v <= 2**62 for k, v in free.items()):
            raise ProtocolError("heartbeat: 'free' must map directories to byte counts")
        inv = d.get("inventory")
        if inv is not None and not isinstance(inv, list):
            raise ProtocolError("heartbeat: 'inventory' must be a list")
        name = _get(d, "name", str, "heartbeat")
        if not name or len(name) > 255:
            raise ProtocolError("heartbeat: 'name' must be 1-255 characters")
        return cls(name=name, address=_get(d, "address", str, "heartbeat"),
                   boot_id=_get(d, "boot_id", str, "heartbeat"),
                   labels=tuple(_strs(d, "labels", "heartbeat", [])),
                   load=Load.from_json(d.get("load")), free=dict(free),
                   allow_dest=tuple(_strs(d, "allow_dest", "heartbeat", [])),
                   hooks=tuple(_strs(d, "hooks", "heartbeat", [])),
                   max_uploads=max(1, _nonneg(d, "max_uploads", "heartbeat", 4)),
                   max_downloads=max(1, _nonneg(d, "max_downloads", "heartbeat", 4)),
                   version=_get(d, "version", str, "heartbeat", ""),
                   streams=_get(d, "streams", bool, "heartbeat", False),
                   upload_rate=_nonneg(d, "upload_rate", "heartbeat", 0),
                   download_rate=_nonneg(d, "download_rate", "heartbeat", 0),
                   inventory=None if inv is None else tuple(Holding.from_json(h) for h in inv))


@dataclass(frozen=True)
class HeartbeatReply:
    """The center's answer to a heartbeat."""

    chunk_size: int
    want_inventory: bool = False
    # Jobs the center still runs for this host; the daemon drops staging of any other.
    live_jobs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"chunk_size": self.chunk_size, "want_inventory": self.want_inventory,
                "live_jobs": list(self.live_jobs)}

    @classmethod
    def from_json(cls, obj: Any) -> HeartbeatReply:
        d = _obj(obj, "heartbeat reply")
        return cls(chunk_size=_nonneg(d, "chunk_size", "heartbeat reply"),
                   want_inventory=_get(d, "want_inventory", bool, "heartbeat reply", False),
                   live_jobs=tuple(_strs(d, "live_jobs", "heartbeat reply", [])))


def parse_many(cls: type[T], items: Sequence[Any]) -> list[T]:
    return [cls.from_json(i) for i in items]  # type: ignore[attr-defined]
