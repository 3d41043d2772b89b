"""Configuration of the center and the daemons: documented defaults, TOML, flags.

Every key of a config file is also a command-line flag (``data_dir`` is
``--data-dir``) and a flag beats the file; ``FDSHIP_TOKEN`` beats a token file.
The dataclasses below are the single list of keys: the argument parser, the
TOML loader, ``docs/operations.md`` and the Ansible templates all follow them.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from fdship.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: str | int | float, what: str = "size") -> int:
    """'4M' -> 4194304.  Suffixes K, M, G, T (powers of 1024), optional 'iB'/'B'."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 4M, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what}: must not be negative")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: {value!r} is not a size; write e.g. 4194304, 4M or 512K")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': the inverse of parse_size, for people."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def parse_duration(value: str | int | float, what: str = "duration") -> float:
    """'10m' -> 600.0.  Suffixes ms, s, m, h, d; a bare number is seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration like 10s, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", str(value))
    if not m:
        raise ConfigError(f"{what}: {value!r} is not a duration; write e.g. 30s, 10m or 7d")
    mult = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
    return float(m.group(1)) * mult


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {value!r} must be HOST:PORT, e.g. 0.0.0.0:7070")
    return host.strip("[]") or "0.0.0.0", int(port)


def _opt(default: Any, help: str, parse: Callable[[Any, str], Any] | None = None,
         multiple: bool = False) -> Any:
    meta = {"help": help, "parse": parse, "multiple": multiple}
    if isinstance(default, (list, dict)):
        def fresh(d: Any = default) -> Any:
            return type(d)(d)
        return field(default_factory=fresh, metadata=meta)
    return field(default=default, metadata=meta)


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{what}: expected a string, got {v!r}")
    return v


def _int(v: Any, what: str) -> int:
    try:
        if isinstance(v, bool):
            raise ValueError
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a whole number, got {v!r}") from None


def _bool(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what}: expected true or false, got {v!r}")


def _float(v: Any, what: str) -> float:
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a number like 0.5, got {v!r}") from None
    if not math.isfinite(f):
        raise ConfigError(f"{what}: expected a finite number, got {v!r}")
    return f


def _finite_duration(v: Any, what: str) -> float:
    f = parse_duration(v, what)
    if not math.isfinite(f):
        raise ConfigError(f"{what}: expected a duration like 200ms or 10s, got {v!r}")
    return f


def _opt_size(v: Any, what: str) -> int | None:
    if v in (None, "", "none", 0, "0"):
        return None
    return parse_size(v, what)


def _strlist(v: Any, what: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{what}: expected a list of strings")
    out: list[str] = []
    for x in v:  # "a,b" on the command line means two entries
        out.extend(p for p in (s.strip() for s in x.split(",")) if p)
    return out


@dataclass
class CenterConfig:
    """Settings of `fdship center`."""

    listen: str = _opt("0.0.0.0:7070", "address to listen on, HOST:PORT")
    data_dir: str = _opt("/var/lib/fdship/center", "REDO log and checkpoints")
    chunk_size: int = _opt(4 * 1024 * 1024, "chunk size for new jobs (K, M suffixes)", parse_size)
    token_file: str = _opt("", "file holding the shared token (mode 0600)")
    heartbeat_timeout: float = _opt(5.0, "a daemon silent this long is dead", parse_duration)
    grace_period: float = _opt(60.0, "a dead target may come back this long before its part "
                               "of a job fails", parse_duration)
    max_uploads: int = _opt(4, "default concurrent uploads per host (daemons may report their own)",
                            _int)
    max_downloads: int = _opt(4, "default concurrent downloads per host", _int)
    max_attempts: int = _opt(8, "fetch attempts per chunk and machine before the machine fails",
                             _int)
    fetch_timeout: float = _opt(120.0, "an assigned fetch with no answer this long is retried",
                                parse_duration)
    # The scheduler's tunables (fdship.core.scheduler.Tunables); defaults are the core's.
    upload_budget: float = _opt(1.0, "how much of each host's uplink the scheduler fills, "
                                "counted in transfers that would each run at the link's full "
                                "rate (0.25 to 100; max_uploads still caps the count)", _float)
    download_budget: float = _opt(1.0, "how much of each host's downlink the scheduler fills, "
                                  "in full-rate transfers (0.25 to 100; max_downloads still "
                                  "caps the count)", _float)
    source_extra: float = _opt(0.1, "share of a file's chunks (0 to 1) the source may send a "
                               "second time in the end game, to targets waiting on the "
                               "rarest chunks", _float)
    stream_depth: int = _opt(16, "cut-through: how many hosts a chunk may pass through while "
                             "it is still arriving at each (daemons relay the bytes as they "
                             "land); 0 means only hosts holding a chunk verified serve it", _int)
    backoff_base: float = _opt(0.2, "wait before retrying a chunk after its first failed "
                               "fetch; it doubles with every further failure (times a random "
                               "0.5 to 1.5), up to backoff_cap", _finite_duration)
    backoff_cap: float = _opt(10.0, "longest wait before retrying a chunk after a failed fetch "
                              "(at least backoff_base)", _finite_duration)
    callback_attempts: int = _opt(8, "deliveries of a job's result to its callback URL before "
                                  "it is recorded as failed (backoff 0.5 s doubling, capped "
                                  "at 60 s)", _int)
    checkpoint_interval: float = _opt(30.0, "seconds between checkpoints", parse_duration)
    checkpoint_records: int = _opt(50_000, "also checkpoint after this many log records", _int)
    retention: float = _opt(7 * 86400.0, "how long finished jobs stay queryable", parse_duration)
    max_files: int = _opt(10_000, "most files in one job", _int)
    max_machines: int = _opt(10_000, "most machines in one job", _int)
    seed: int = _opt(0, "seed for the scheduler's tie-breaking (0: random per start)", _int)
    tls_cert: str = _opt("", "PEM certificate (chain) to serve HTTPS with; needs tls_key. "
                         "The center then also calls the daemons over HTTPS")
    tls_key: str = _opt("", "PEM private key of tls_cert (not readable by others)")
    tls_ca: str = _opt("", "PEM CA bundle that daemons' certificates are verified against "
                       "(default: the system's trust store)")
    max_body: int = _opt(64 * 1024 * 1024, "largest request body accepted (a request without "
                         "the token may send at most 64K)", parse_size)
    idle_timeout: float = _opt(300.0, "a connection that starts no request (or does not finish "
                               "its headers) this long is closed", parse_duration)
    body_timeout: float = _opt(60.0, "a request body that has not fully arrived this long after "
                               "its headers is dropped", parse_duration)
    event_loop: str = _opt("auto", "asyncio event loop: uvloop (written in C: far less CPU per "
                           "message and per read), asyncio (the standard library's), or auto "
                           "(uvloop where it is installed)")
    config: str = _opt("", "TOML config file")

    def validate(self) -> None:
        parse_hostport(self.listen, "listen")
        validate_transport(self)
        if not 4096 <= self.chunk_size <= 1024**3:
            raise ConfigError("chunk_size must be between 4K and 1G")
        for name in ("max_uploads", "max_downloads", "max_attempts", "callback_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.heartbeat_timeout <= 0 or self.grace_period < 0:
            raise ConfigError("heartbeat_timeout must be positive and grace_period not negative")
        validate_scheduling(self)


def validate_scheduling(cfg: CenterConfig) -> None:
    """The scheduler's tunables: ranges the core works in, each refusal saying what to give."""
    for name in ("upload_budget", "download_budget"):
        v = getattr(cfg, name)
        # The core counts a link as full once its load is within 0.25 of the
        # budget (FULL_ENOUGH): below that not even one transfer would start.
        if not 0.25 <= v <= 100:
            raise ConfigError(f"{name} must be between 0.25 and 100 full-rate transfers per "
                              f"link, got {v:g}; below 0.25 no transfer would ever start. "
                              "The default is 1 (one transfer at the link's full rate)")
    if not 0 <= cfg.source_extra <= 1:
        raise ConfigError(f"source_extra must be between 0 (the source sends every chunk once) "
                          f"and 1 (it may send each a second time), got {cfg.source_extra:g}; "
                          "the default is 0.1")
    if not 0 <= cfg.stream_depth <= 64:
        raise ConfigError(f"stream_depth must be between 0 (no cut-through: only hosts holding "
                          f"a chunk serve it) and 64 hosts per chain, got {cfg.stream_depth}; "
                          "the default is 16")
    if not cfg.backoff_base > 0:
        raise ConfigError(f"backoff_base must be more than 0 seconds, got "
                          f"{cfg.backoff_base:g}; give e.g. 200ms (the default)")
    if cfg.backoff_cap < cfg.backoff_base:
        raise ConfigError(f"backoff_cap ({cfg.backoff_cap:g} s) must be at least backoff_base "
                          f"({cfg.backoff_base:g} s): the wait after a failed fetch starts at "
                          "backoff_base and doubles up to backoff_cap; raise backoff_cap or "
                          "lower backoff_base")


@dataclass
class DaemonConfig:
    """Settings of `fdship daemon`."""

    center: str = _opt("http://127.0.0.1:7070", "URL of the center")
    listen: str = _opt("0.0.0.0:7071", "address to listen on, HOST:PORT")
    advertise: str = _opt("", "HOST:PORT peers and the center use (default: derived from listen)")
    name: str = _opt("", "this daemon's name (default: the host name)")
    label: list[str] = _opt([], "labels for targeting with @LABEL (repeatable)", _strlist, True)
    data_dir: str = _opt("/var/lib/fdship/daemon", "chunk store and staging records")
    root: str = _opt("/", "every destination path is written under this directory")
    allow_dest: list[str] = _opt([], "destinations must lie under one of these (repeatable)",
                                 _strlist, True)
    allow_source: list[str] = _opt([], "files shipped from here must lie under one of these",
                                   _strlist, True)
    allow_hardlinked_sources: bool = _opt(False, "ship files under allow_source that have more "
                                          "than one hard link (another of their names may lie "
                                          "outside allow_source); refused by default while "
                                          "allow_source is set", _bool)
    upload_rate: int | None = _opt(None, "upload cap in bytes/s (e.g. 50M); none by default",
                                   _opt_size)
    download_rate: int | None = _opt(None, "download cap in bytes/s; none by default", _opt_size)
    max_uploads: int = _opt(4, "concurrent chunk uploads this daemon serves", _int)
    max_downloads: int = _opt(4, "concurrent chunk downloads this daemon runs", _int)
    heartbeat_interval: float = _opt(1.0, "seconds between load reports", parse_duration)
    watch_pidfile: list[str] = _opt([], "pidfile of a process this host exists to run, e.g. "
                                    "the bidder (repeatable): its CPU, children included, "
                                    "goes into the load reports as app_cpu, and the center "
                                    "gives a host whose app is busy fewer uploads", _strlist,
                                    True)
    watch_busy_cpu: float = _opt(75.0, "app CPU (watch_pidfile, percent of one core, like top) "
                                 "at which the host counts as fully busy; from a third of it "
                                 "the host serves less. Raise it for a multi-threaded app, "
                                 "e.g. 800 for one that may use eight cores", _float)
    fetch_timeout: float = _opt(120.0, "a chunk fetch not finished this long fails and the "
                                "center reassigns it (keep it at most the center's "
                                "fetch_timeout)", parse_duration)
    write_timeout: float = _opt(30.0, "a peer that takes none of a chunk's bytes this long is "
                                "hung up on, freeing the upload slot", parse_duration)
    connect_timeout: float = _opt(1.0, "a peer that does not accept a chunk fetch's connection "
                                  "(TCP and TLS handshake) this fast fails the fetch, and the "
                                  "center gives the chunk to another holder at once",
                                  parse_duration)
    fetch_stall_timeout: float = _opt(10.0, "a peer that sends no byte of a chunk this long "
                                      "fails the fetch (timeout) even if it still heartbeats; "
                                      "keep it above 256K / the slowest peer's upload_rate",
                                      parse_duration)
    fetch_lead: float = _opt(0.05, "tell the center a fetch is about to finish when its last "
                             "bytes are due within this many seconds, so the next chunk starts "
                             "flowing a round trip earlier; 0 turns the notices off",
                             parse_duration)
    receive_batch: int = _opt(128 * 1024, "a chunk's bytes wake the daemon once this many have "
                              "arrived (SO_RCVLOWAT), not on every packet: fewer, larger reads "
                              "for the same bytes; a relayed chunk waits up to this much per "
                              "hop. 0: wake on every packet", parse_size)
    control_channel: bool = _opt(True, "send heartbeats, acks and drain notices, and take "
                                 "pulls, over one WebSocket to the center (far less CPU per "
                                 "chunk than a request each); HTTP whenever it is down. off: "
                                 "HTTP only", _bool)
    write_behind: bool = _opt(True, "hand each verified chunk to the disk's writeback at once, "
                              "so installing a file waits for little more than its last "
                              "chunk; off: the fsync before the install writes the whole "
                              "file", _bool)
    token_file: str = _opt("", "file holding the shared token (mode 0600)")
    tls_cert: str = _opt("", "PEM certificate (chain) to serve HTTPS with; needs tls_key. "
                         "Chunk fetches from peers then use TLS too")
    tls_key: str = _opt("", "PEM private key of tls_cert (not readable by others)")
    tls_ca: str = _opt("", "PEM CA bundle the center's and peers' certificates are verified "
                       "against (default: the system's trust store)")
    max_body: int = _opt(64 * 1024 * 1024, "largest request body accepted (a request without "
                         "the token may send at most 64K)", parse_size)
    idle_timeout: float = _opt(120.0, "a connection that starts no request (or does not finish "
                               "its headers) this long is closed", parse_duration)
    body_timeout: float = _opt(60.0, "a request body that has not fully arrived this long after "
                               "its headers is dropped", parse_duration)
    fault_inject: str = _opt("", "TESTING ONLY: corrupt=P or drop=P makes served chunks bad "
                             "with probability P; needs allow_fault_injection", )
    allow_fault_injection: bool = _opt(False, "permit fault_inject (never in production)", _bool)
    event_loop: str = _opt("auto", "asyncio event loop: uvloop (written in C: far less CPU per "
                           "message and per read), asyncio (the standard library's), or auto "
                           "(uvloop where it is installed)")
    config: str = _opt("", "TOML config file")
    # [hooks.NAME] tables in the TOML file: command = [...], timeout = 30, or url = "...".
    hooks: dict[str, Any] = field(default_factory=dict, metadata={"file_only": True})

    def validate(self) -> None:
        host, port = parse_hostport(self.listen, "listen")
        if self.advertise:
            parse_hostport(self.advertise, "advertise")
        if not self.center.startswith(("http://", "https://")):
            raise ConfigError(f"center: {self.center!r} must be a URL like http://10.0.0.1:7070")
        validate_transport(self)
        if self.fetch_timeout <= 0 or self.write_timeout <= 0:
            raise ConfigError("fetch_timeout and write_timeout must be positive")
        if self.connect_timeout <= 0 or self.fetch_stall_timeout <= 0:
            raise ConfigError("connect_timeout and fetch_stall_timeout must be positive "
                              "(seconds, e.g. 1s and 10s)")
        if not 0 <= self.fetch_lead <= 10:
            raise ConfigError(f"fetch_lead must be between 0 (no notices) and 10 seconds, got "
                              f"{self.fetch_lead:g}; the default is 0.05 (50 ms)")
        if self.receive_batch > 4 * 1024 * 1024:
            raise ConfigError(f"receive_batch must be at most 4M (every hop of a relayed chunk "
                              f"waits up to this much), got {human_bytes(self.receive_batch)}; "
                              "the default is 128K, 0 turns it off")
        if not os.path.isabs(self.root):
            raise ConfigError(f"root: {self.root!r} must be an absolute path")
        for d in self.allow_dest + self.allow_source:
            if not os.path.isabs(d):
                raise ConfigError(f"allowed directory {d!r} must be an absolute path")
        for p in self.watch_pidfile:
            if not os.path.isabs(p):
                raise ConfigError(f"watch_pidfile {p!r} must be an absolute path (the daemon "
                                  "may run in another directory than the app), e.g. "
                                  "/run/bidder.pid")
        if not 1.0 <= self.watch_busy_cpu <= 100_000.0:
            raise ConfigError(f"watch_busy_cpu {self.watch_busy_cpu:g} must be between 1 and "
                              "100000 (percent of one core: 75 is three quarters of a core, "
                              "800 is eight cores)")
        if self.fault_inject and not self.allow_fault_injection:
            raise ConfigError("fault_inject is set but allow_fault_injection is not: fault "
                              "injection corrupts data and is refused unless explicitly enabled")
        for name, spec in self.hooks.items():
            if not isinstance(spec, dict) or not (("command" in spec) ^ ("url" in spec)):
                raise ConfigError(f"hook {name!r}: give exactly one of command = [...] or url")
        if not self.name:
            self.name = socket.gethostname()
        if not self.advertise:
            if host in ("0.0.0.0", "", "::"):
                host = primary_address()
            self.advertise = f"{host}:{port}"


def validate_transport(cfg: Any) -> None:
    """Checks shared by both processes: TLS files, body limit, connection timeouts.

    The TLS files are only checked to exist here; ``fdship.web.server_ssl_context``
    loads them when the process starts, so a bad certificate also stops it
    with a one-line reason.
    """
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls_cert and tls_key go together: give both to serve HTTPS, or "
                          "neither")
    for name in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{name}: {path} is not a readable file; give the path of a PEM "
                              "file")
    if cfg.max_body < 64 * 1024:
        raise ConfigError("max_body must be at least 64K")
    if cfg.idle_timeout <= 0 or cfg.body_timeout <= 0:
        raise ConfigError("idle_timeout and body_timeout must be positive")
    if cfg.event_loop not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(f"event_loop must be auto, asyncio or uvloop, not {cfg.event_loop!r}")
    if cfg.event_loop == "uvloop" and loop_runner("uvloop") is None:
        raise ConfigError("event_loop is uvloop but uvloop is not installed; run: pip install "
                          "uvloop, or set event_loop to auto or asyncio")


def loop_runner(choice: str) -> Callable[[Any], Any] | None:
    """The function that runs the process's main coroutine: ``uvloop.run`` or ``asyncio.run``.

    None when ``choice`` is uvloop and uvloop cannot be imported.
    """
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                return None
        else:
            return uvloop.run  # type: ignore[no-any-return]
    import asyncio
    return asyncio.run


def primary_address() -> str:
    """The address this host uses to reach others (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks a route, sends nothing
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config key; defaults are None so we can tell 'not given'."""
    for f in fields(cls):
        if f.metadata.get("file_only"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata.get("help", "")}
        if f.metadata.get("multiple"):
            kw["action"] = "append"
        if f.type in ("bool", bool) or f.metadata.get("parse") is _bool:
            if f.default is True:
                kw["metavar"] = "on|off"  # on by default: the flag must be able to say off
            else:
                kw["action"] = "store_const"
                kw["const"] = True
        parser.add_argument(flag, **kw)


def load(cls: type, args: argparse.Namespace | dict[str, Any]) -> Any:
    """Defaults < TOML file < flags; then parse and validate every value."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    cfg_path = given.get("config")
    if cfg_path:
        try:
            with open(cfg_path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(f"cannot read config file {cfg_path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {e}") from None
        for k, v in data.items():
            key = k.replace("-", "_")
            if key == "labels":
                key = "label"
            if key not in names:
                raise ConfigError(f"config file {cfg_path}: unknown key {k!r}; known keys: "
                                  + ", ".join(sorted(n for n in names if n != "config")))
            values[key] = v
    for k, v in given.items():
        if k in names and v is not None:
            values[k] = v
    obj = cls()
    for k, v in values.items():
        f = names[k]
        parse = f.metadata.get("parse")
        if parse is not None:
            v = parse(v, k)
        elif f.name != "hooks":
            v = _str(v, k) if isinstance(f.default, str) else v
        setattr(obj, k, v)
    obj.validate()
    return obj


def read_token(token_file: str = "") -> str:
    """The shared token: $FDSHIP_TOKEN, else the token file, else '' (auth off).

    A token file readable by group or others is refused: anyone who can read
    it can write files on every machine of the fleet.
    """
    env = os.environ.get("FDSHIP_TOKEN")
    if env:
        return env.strip()
    if not token_file:
        return ""
    try:
        st = os.stat(token_file)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"token file {token_file} is readable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {token_file}")
        with open(token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read token file {token_file}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"token file {token_file} is empty")
    return token
