"""Notify hooks: what a target runs after all of a job's files landed.

Hooks are configured on the target daemon only (``[hooks.NAME]`` in its TOML:
``command = [...]`` with an optional ``timeout``, or ``url = "http://127.0.0.1/..."``).
A job names a hook; it never carries a command line, so a job cannot make 50
machines run arbitrary commands.  The hook gets the job id and the installed
files in its environment (``FDSHIP_JOB``, ``FDSHIP_FILES`` newline-separated)
or, for a URL hook, as a JSON POST body.  Its outcome (exit status, duration,
last lines of stderr) becomes part of the machine's result.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fdship.errors import FdshipError
from fdship.httpclient import call

STDERR_TAIL_LINES = 20
DEFAULT_TIMEOUT = 60.0


@dataclass
class HookResult:
    name: str
    ok: bool
    exit_status: int | None = None
    seconds: float = 0.0
    stderr_tail: list[str] = field(default_factory=list)
    error: str = ""

    def summary(self) -> str:
        if self.ok:
            return f"hook {self.name} ok in {self.seconds:.2f} s"
        tail = ("; stderr: " + " | ".join(self.stderr_tail[-3:])) if self.stderr_tail else ""
        return f"hook {self.name} failed: {self.error}{tail}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "exit_status": self.exit_status,
                "seconds": round(self.seconds, 3), "stderr_tail": self.stderr_tail,
                "error": self.error or None}


class HookRunner:
    def __init__(self, hooks: dict[str, Any]) -> None:
        self.hooks = dict(hooks)

    async def run(self, name: str, job: str, files: list[str]) -> HookResult:
        spec = self.hooks.get(name)
        if spec is None:
            return HookResult(name, False, error=f"no hook named {name!r} is configured on this "
                                                 "daemon")
        timeout = float(spec.get("timeout", DEFAULT_TIMEOUT))
        t0 = time.monotonic()
        if "url" in spec:
            try:
                await call("POST", spec["url"], {"job": job, "files": files}, timeout=timeout)
                return HookResult(name, True, seconds=time.monotonic() - t0)
            except FdshipError as e:
                return HookResult(name, False, seconds=time.monotonic() - t0,
                                  error=f"POST {spec['url']}: {e}")
        cmd = [str(c) for c in spec["command"]]
        env = dict(os.environ, FDSHIP_JOB=job, FDSHIP_FILES="\n".join(files),
                   FDSHIP_HOOK=name)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        except OSError as e:
            return HookResult(name, False, error=f"cannot run {cmd[0]}: {e.strerror}")
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            await proc.wait()
            return HookResult(name, False, exit_status=proc.returncode,
                              seconds=time.monotonic() - t0,
                              error=f"timed out after {timeout:g} s (killed)")
        tail = err.decode(errors="replace").splitlines()[-STDERR_TAIL_LINES:]
        ok = proc.returncode == 0
        return HookResult(name, ok, exit_status=proc.returncode, seconds=time.monotonic() - t0,
                          stderr_tail=tail,
                          error="" if ok else f"exit status {proc.returncode}")
