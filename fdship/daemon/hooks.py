"""Notify hooks: what a target runs after all of a job's files landed.

Where it sits: :class:`fdship.daemon.agent.Daemon` builds one :class:`HookRunner`
from its ``[hooks.NAME]`` config tables and, when the center sends the job's
hook pack (after every file of the job was packed on this machine), calls
:meth:`HookRunner.run`; the :class:`HookResult` travels back to the center in
``Fin(file=-1, hook=...)`` and becomes part of this machine's job result.

Hooks are configured on the target daemon only (``[hooks.NAME]`` in its TOML:
``command = [...]`` with an optional ``timeout``, or
``url = "http://127.0.0.1:PORT/..."``).  A job names a hook; it never carries
a command line, and nothing here ever reports one back, so a job cannot make
50 machines run arbitrary commands and the API cannot leak what a hook runs.

A command hook gets the job id and the installed files in its environment
(``FDSHIP_JOB``, ``FDSHIP_FILES`` newline-separated, ``FDSHIP_HOOK``); a URL
hook gets them as a JSON POST body.  Its outcome (exit status or HTTP status,
duration, the last lines of stderr or of the response body) is the result.
Memory stays bounded whatever the hook prints: only the tail is kept.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fdship.errors import ConfigError

STDERR_TAIL_LINES = 20
MAX_LINE = 500  # characters kept of one stderr line: a tail, not a log
DEFAULT_TIMEOUT = 60.0
# After the hook's process exits, how long we keep reading its stderr: a
# background child that inherited the pipe must not hold the job hostage.
DRAIN_SECONDS = 1.0

_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass
class HookResult:
    """The outcome of one hook run, as reported in the machine's result."""

    name: str
    ok: bool
    kind: str = "command"  # "command" or "url"
    exit_status: int | None = None  # the process's exit status (negative: killed by signal)
    http_status: int | None = None  # for URL hooks
    seconds: float = 0.0
    stderr_tail: list[str] = field(default_factory=list)
    error: str = ""
    timed_out: bool = False

    def summary(self) -> str:
        if self.ok:
            return f"hook {self.name} ok in {self.seconds:.2f} s"
        tail = ("; stderr: " + " | ".join(self.stderr_tail[-3:])) if self.stderr_tail else ""
        return f"hook {self.name} failed: {self.error}{tail}"

    def to_json(self) -> dict[str, Any]:
        # Deliberately no command line and no environment: only the name the
        # job used and what happened.
        return {"name": self.name, "ok": self.ok, "kind": self.kind,
                "exit_status": self.exit_status, "http_status": self.http_status,
                "seconds": round(self.seconds, 3), "stderr_tail": list(self.stderr_tail),
                "timed_out": self.timed_out, "error": self.error or None}


def _check_spec(name: str, spec: Any) -> dict[str, Any]:
    """Validate one ``[hooks.NAME]`` table; raise ConfigError with what to fix."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"hook {name!r}: expected a table with command = [...] or url = \"...\"")
    unknown = set(spec) - {"command", "url", "timeout"}
    if unknown:
        raise ConfigError(f"hook {name!r}: unknown key(s) {', '.join(sorted(unknown))}; a hook "
                          "has command = [...] or url = \"...\", and optionally timeout")
    if ("command" in spec) == ("url" in spec):
        raise ConfigError(f"hook {name!r}: give exactly one of command = [...] or url")
    timeout = spec.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not 0 < timeout <= 86400:
        raise ConfigError(f"hook {name!r}: timeout must be a number of seconds between 0 and "
                          f"86400, got {timeout!r}")
    out: dict[str, Any] = {"timeout": float(timeout)}
    if "command" in spec:
        cmd = spec["command"]
        if isinstance(cmd, str):
            raise ConfigError(f"hook {name!r}: command must be a list of arguments, e.g. "
                              f"command = [\"/usr/bin/systemctl\", \"reload\", \"bidder\"]; "
                              "it is run without a shell")
        if not isinstance(cmd, list) or not cmd or \
                not all(isinstance(c, (str, int, float)) and not isinstance(c, bool)
                        for c in cmd):
            raise ConfigError(f"hook {name!r}: command must be a non-empty list of strings")
        out["command"] = [str(c) for c in cmd]
        if not os.path.isabs(out["command"][0]):
            raise ConfigError(f"hook {name!r}: the program {out['command'][0]!r} must be an "
                              "absolute path (hooks do not search $PATH)")
    else:
        url = spec["url"]
        if not isinstance(url, str):
            raise ConfigError(f"hook {name!r}: url must be a string")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"hook {name!r}: url {url!r} must look like "
                              "http://127.0.0.1:PORT/PATH")
        if not _is_local(parts.hostname):
            raise ConfigError(f"hook {name!r}: url {url!r} is not on this machine; a URL hook "
                              "may only call 127.0.0.1, ::1 or localhost")
        out["url"] = url
    return out


def _is_local(host: str) -> bool:
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Tail:
    """The last ``lines`` lines of a byte stream, each cut to ``MAX_LINE`` characters."""

    def __init__(self, lines: int = STDERR_TAIL_LINES) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        self.partial = bytearray()

    def feed(self, data: bytes) -> None:
        self.partial += data
        *full, rest = self.partial.split(b"\n")
        for line in full:
            self.lines.append(line[:MAX_LINE * 4].decode(errors="replace")[:MAX_LINE])
        # A line that never ends is cut too, so memory stays bounded.
        self.partial = bytearray(rest[-MAX_LINE * 4:])

    def result(self) -> list[str]:
        out = list(self.lines)
        if self.partial:
            out.append(self.partial.decode(errors="replace")[:MAX_LINE])
        keep = self.lines.maxlen or STDERR_TAIL_LINES
        return [line.rstrip("\r") for line in out][-keep:]


class HookRunner:
    """The hooks one daemon is configured with, and the way to run them."""

    def __init__(self, hooks: Mapping[str, Any]) -> None:
        self.hooks = {name: _check_spec(name, spec) for name, spec in dict(hooks).items()}

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.hooks))

    async def run(self, name: str, job: str, files: list[str]) -> HookResult:
        spec = self.hooks.get(name)
        if spec is None:
            return HookResult(name, False, error=f"no hook named {name!r} is configured on this "
                                                 "daemon")
        if "url" in spec:
            return await self._run_url(name, spec, job, files)
        return await self._run_command(name, spec, job, files)

    async def _run_url(self, name: str, spec: dict[str, Any], job: str,
                       files: list[str]) -> HookResult:
        from tornado.httpclient import AsyncHTTPClient, HTTPRequest

        timeout = spec["timeout"]
        body = json.dumps({"job": job, "files": files, "hook": name}).encode()
        req = HTTPRequest(spec["url"], method="POST", body=body,
                          headers={"Content-Type": "application/json"},
                          request_timeout=timeout, connect_timeout=min(timeout, 5.0),
                          follow_redirects=False)
        t0 = time.monotonic()
        try:
            resp = await AsyncHTTPClient().fetch(req, raise_error=False)
        except OSError as e:
            return HookResult(name, False, kind="url", seconds=time.monotonic() - t0,
                              error=f"cannot reach the hook's URL: {e.strerror or e}")
        secs = time.monotonic() - t0
        tail = _Tail()
        tail.feed((resp.body or b"")[-64 * 1024:])
        if resp.code == 599:
            timed_out = "timeout" in str(resp.error).lower()
            err = (f"timed out after {timeout:g} s" if timed_out
                   else f"cannot reach the hook's URL: {resp.error}")
            return HookResult(name, False, kind="url", seconds=secs, error=err,
                              timed_out=timed_out)
        ok = 200 <= resp.code < 300
        return HookResult(name, ok, kind="url", http_status=resp.code, seconds=secs,
                          stderr_tail=tail.result(),
                          error="" if ok else f"HTTP status {resp.code}")

    async def _run_command(self, name: str, spec: dict[str, Any], job: str,
                           files: list[str]) -> HookResult:
        cmd: list[str] = spec["command"]
        timeout: float = spec["timeout"]
        env = dict(os.environ, FDSHIP_JOB=job, FDSHIP_FILES="\n".join(files),
                   FDSHIP_HOOK=name)
        t0 = time.monotonic()
        try:
            # A session of its own, so a timeout kills the hook and every
            # child it started, and a signal to the daemon does not reach it.
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
                close_fds=True)
        except OSError as e:
            return HookResult(name, False, seconds=time.monotonic() - t0,
                              error=f"cannot run the hook's program: {e.strerror}")
        tail = _Tail()
        assert proc.stderr is not None
        reader = asyncio.ensure_future(self._read(proc.stderr, tail))
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            _killpg(proc.pid)
            await proc.wait()
        except asyncio.CancelledError:
            _killpg(proc.pid)
            reader.cancel()
            raise
        secs = time.monotonic() - t0
        try:
            await asyncio.wait_for(asyncio.shield(reader), DRAIN_SECONDS)
        except TimeoutError:
            reader.cancel()  # a child kept stderr open; we have what we need
        rc = proc.returncode
        if timed_out:
            return HookResult(name, False, exit_status=rc, seconds=secs,
                              stderr_tail=tail.result(), timed_out=True,
                              error=f"timed out after {timeout:g} s (killed)")
        if rc is not None and rc < 0:
            err = f"killed by signal {_signame(-rc)}"
        else:
            err = f"exit status {rc}"
        return HookResult(name, rc == 0, exit_status=rc, seconds=secs,
                          stderr_tail=tail.result(), error="" if rc == 0 else err)

    @staticmethod
    async def _read(stream: asyncio.StreamReader, tail: _Tail) -> None:
        while True:
            data = await stream.read(64 * 1024)
            if not data:
                return
            tail.feed(data)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)
