"""Notify hooks end to end: real daemons run real hook programs after a job landed.

One cluster serves the module: a source (d0) and three targets, each target
configured with hooks in its own TOML file.  The hook scripts log what they
saw (job id, the files and their sha256 at that moment) so the tests can
prove that every file was complete before the hook ran, that it ran once per
machine, and that its outcome (exit status, duration, stderr tail) is part of
the machine's result.  A small HTTP server in the test process plays the
local service a URL hook calls.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import ClassVar

import pytest

from fdship.localcluster import LocalCluster, free_port

MiB = 1024 * 1024
TARGETS = ["d1", "d2", "d3"]
# A marker in every hook's command line: it must never show up in the API.
MARKER = "hook-cmdline-marker-7f3a"


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """The local service a URL hook calls: records each POST, answers per path."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append((self.path, body))
        code = 500 if self.path.endswith("/broken") else 200
        reply = b"reload refused: model too old\n" if code == 500 else b"reloaded\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


def _script(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + text)
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("hooks"))
    hookdir = os.path.join(base, MARKER)
    os.makedirs(hookdir)
    logs = os.path.join(base, "hooklogs")
    os.makedirs(logs)
    # Logs who ran, which files it saw and their sha256: the files must be
    # complete (and at their final paths) when the hook starts.
    reload_sh = _script(os.path.join(hookdir, "reload.sh"), f"""
log="{logs}/$FDSHIP_HOOK-$1.log"
echo "job $FDSHIP_JOB" >> "$log"
printf '%s\\n' "$FDSHIP_FILES" | while read -r f; do
  [ -n "$f" ] && sha256sum "$f" >> "$log"
done
sleep "${{2:-0}}"
echo "reloaded bidder on $1" >&2
exit 0
""")
    broken_sh = _script(os.path.join(hookdir, "broken.sh"), """
echo "checking config" >&2
echo "bad config at line 3" >&2
exit 3
""")
    slow_sh = _script(os.path.join(hookdir, "slow.sh"), f"""
echo $$ > "{logs}/slow-$1.pid"
echo "starting slow reload" >&2
exec sleep 30
""")
    _Recorder.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    args = {0: ["--heartbeat-interval", "0.5"]}
    for i, name in enumerate(TARGETS, start=1):
        cfg = os.path.join(base, f"{name}.toml")
        with open(cfg, "w") as f:
            f.write(f'[hooks.reload]\ncommand = ["{reload_sh}", "{name}"]\ntimeout = 20\n'
                    f'[hooks.waitreload]\ncommand = ["{reload_sh}", "{name}", "2"]\n'
                    f'timeout = 20\n'
                    f'[hooks.web]\nurl = "http://127.0.0.1:{port}/reload"\ntimeout = 5\n'
                    f'[hooks.webbroken]\nurl = "http://127.0.0.1:{port}/broken"\n')
            if name != "d3":  # d3 lacks these two: naming them for d3 is a 4xx
                f.write(f'[hooks.broken]\ncommand = ["{broken_sh}"]\n'
                        f'[hooks.slow]\ncommand = ["{slow_sh}", "{name}"]\ntimeout = 1\n')
        args[i] = ["--config", cfg, "--heartbeat-interval", "0.5"]
    c = LocalCluster(4, base, center_args=["--chunk-size", "1M"], daemon_args=args)
    try:
        c.start()
        src = os.path.join(base, "src")
        os.makedirs(src)
        yield c, src, logs
    finally:
        c.stop()
        server.shutdown()
        server.server_close()


def _file(src: str, name: str, size: int) -> str:
    path = os.path.join(src, name)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def _runs(logs: str, hook: str, name: str, job: str) -> list[str]:
    try:
        with open(os.path.join(logs, f"{hook}-{name}.log")) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    # Entries of this job: the "job" line and the sha lines after it.
    out, on = [], False
    for line in text.splitlines():
        if line.startswith("job "):
            on = line == f"job {job}"
            if on:
                out.append(line)
        elif on:
            out.append(line)
    return out


def test_command_hook_runs_once_after_every_file_landed(env):
    c, src, logs = env
    a = _file(src, "model-a.bin", 3 * MiB + 17)
    b = _file(src, "model-b.bin", 2 * MiB)
    res = c.submit([a, b], TARGETS, notify="reload")
    assert res["state"] == "done", json.dumps(res, indent=1)
    assert res["notify"] == "reload"
    job = res["job"]
    for i, name in enumerate(TARGETS, start=1):
        m = res["machines"][name]
        assert m["state"] == "done" and m["error"] is None
        hook = m["hook"]
        assert hook["name"] == "reload" and hook["ok"] is True
        assert hook["exit_status"] == 0 and hook["timed_out"] is False
        assert 0 <= hook["seconds"] < 20
        assert hook["stderr_tail"] == [f"reloaded bidder on {name}"]
        entries = _runs(logs, "reload", name, job)
        assert entries[0] == f"job {job}"
        assert entries.count(f"job {job}") == 1, entries  # ran exactly once here
        # The hook saw both files at their final paths, complete.
        seen = {line.split()[1]: line.split()[0] for line in entries[1:]}
        for path in (a, b):
            final = os.path.join(c.root(i), path.lstrip("/"))
            assert seen[final] == sha(path), (name, path)


def test_failing_hook_fails_the_machine_with_exit_status_and_stderr(env):
    c, src, _ = env
    a = _file(src, "failing.bin", 1 * MiB)
    res = c.submit([a], ["d1", "d2"], notify="broken")
    assert res["state"] == "failed"
    for i, name in ((1, "d1"), (2, "d2")):
        m = res["machines"][name]
        assert m["state"] == "failed"
        assert "hook broken failed: exit status 3" in m["error"]
        assert "bad config at line 3" in m["error"]
        assert m["hook"]["exit_status"] == 3
        assert m["hook"]["stderr_tail"] == ["checking config", "bad config at line 3"]
        # The files did land: only the hook failed.
        assert sha(os.path.join(c.root(i), a.lstrip("/"))) == sha(a)


def test_timed_out_hook_is_killed_and_fails_the_machine(env):
    c, src, logs = env
    a = _file(src, "slow.bin", 512 * 1024)
    t0 = time.monotonic()
    res = c.submit([a], ["d1"], notify="slow")
    assert time.monotonic() - t0 < 25  # not the 30 s the hook wanted
    m = res["machines"]["d1"]
    assert res["state"] == "failed" and m["state"] == "failed"
    assert "timed out after 1 s" in m["error"]
    assert m["hook"]["timed_out"] is True
    assert 0.9 <= m["hook"]["seconds"] < 10
    assert m["hook"]["stderr_tail"] == ["starting slow reload"]
    with open(os.path.join(logs, "slow-d1.pid")) as f:
        pid = int(f.read())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed, and reaped by the daemon


def test_url_hook_posts_job_and_files_to_the_local_service(env):
    c, src, _ = env
    a = _file(src, "web.bin", 1 * MiB)
    _Recorder.calls.clear()
    res = c.submit([a], TARGETS, notify="web")
    assert res["state"] == "done", json.dumps(res, indent=1)
    calls = [body for path, body in _Recorder.calls if path == "/reload"]
    assert len(calls) == 3
    assert {body["job"] for body in calls} == {res["job"]}
    assert sorted(body["files"][0] for body in calls) == sorted(
        os.path.join(c.root(i), a.lstrip("/")) for i in (1, 2, 3))
    for name in TARGETS:
        hook = res["machines"][name]["hook"]
        assert hook["kind"] == "url" and hook["http_status"] == 200
        assert hook["stderr_tail"] == ["reloaded"]

    res = c.submit([a], ["d2"], notify="webbroken")
    m = res["machines"]["d2"]
    assert m["state"] == "failed" and "HTTP status 500" in m["error"]
    assert m["hook"]["stderr_tail"] == ["reload refused: model too old"]


def test_unknown_hook_is_a_422_at_submit_and_creates_no_job(env):
    c, src, _ = env
    a = _file(src, "unknown.bin", 1000)
    before = c.request("GET", c.center.url + "/center/jobs?limit=1000")["jobs"]
    for notify, machines, who in (("nosuchhook", ["d1"], "d1"), ("broken", TARGETS, "d3")):
        with pytest.raises(urllib.error.HTTPError) as e:
            c.submit([a], machines, notify=notify)
        assert e.value.code == 422
        msg = json.loads(e.value.read())["error"]
        assert f"machine {who} has no notify hook named {notify!r}" in msg
    after = c.request("GET", c.center.url + "/center/jobs?limit=1000")["jobs"]
    assert len(after) == len(before)


def test_the_api_never_carries_a_command_line(env):
    c, src, _ = env
    a = _file(src, "private.bin", 4096)
    res = c.submit([a], TARGETS, notify="reload")
    assert res["state"] == "done"
    texts = [json.dumps(c.job(res["job"])), json.dumps(c.hosts()),
             json.dumps(c.request("GET", c.center.url + "/center/jobs"))]
    texts += [json.dumps(c.request("GET", d.url + "/daemon/status")) for d in c.daemons]
    for t in texts:
        assert MARKER not in t and "reload.sh" not in t
    hosts = c.hosts()
    assert hosts["d1"]["hooks"] == ["broken", "reload", "slow", "waitreload", "web",
                                    "webbroken"]
    # Nor does the center keep one anywhere on disk (REDO log, checkpoints).
    for dirpath, _, files in os.walk(os.path.join(c.tmp, "center-data")):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert MARKER.encode() not in f.read(), name


def test_hook_runs_once_even_when_the_center_restarts_meanwhile(env):
    c, src, logs = env
    a = _file(src, "restart.bin", 1 * MiB)
    job = c.request("POST", c.daemons[0].url + "/daemon/api",
                    {"files": [a], "machines": ["d1"], "notify": "waitreload",
                     "wait": False})["job"]
    deadline = time.monotonic() + 30
    while not _runs(logs, "waitreload", "d1", job) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _runs(logs, "waitreload", "d1", job), "the hook never started"
    # The hook sleeps 2 s: restart the center under it.  The restarted center
    # sends the hook again; the daemon must report, not rerun.
    c.center.kill()
    c.start_center()
    res = c.wait_job(job, timeout=60)
    assert res["state"] == "done", json.dumps(res, indent=1)
    assert res["machines"]["d1"]["hook"]["exit_status"] == 0
    time.sleep(1.5)  # a second run, if any, would have logged by now
    assert _runs(logs, "waitreload", "d1", job).count(f"job {job}") == 1


def test_bad_hook_config_stops_the_daemon_with_a_reason(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[hooks.reload]\ncommand = ["systemctl", "reload", "bidder"]\n')
    r = subprocess.run([sys.executable, "-m", "fdship", "daemon", "--config", str(cfg),
                        "--listen", f"127.0.0.1:{free_port()}", "--center",
                        "http://127.0.0.1:9", "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2
    assert "must be an absolute path" in r.stderr and "reload" in r.stderr
    cfg.write_text('[hooks.web]\nurl = "http://10.1.2.3/reload"\n')
    r = subprocess.run([sys.executable, "-m", "fdship", "daemon", "--config", str(cfg),
                        "--listen", f"127.0.0.1:{free_port()}", "--center",
                        "http://127.0.0.1:9", "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2 and "not on this machine" in r.stderr


def test_cli_submit_shows_the_hook_outcome(env):
    c, src, _ = env
    a = _file(src, "cli.bin", 10_000)
    r = subprocess.run([sys.executable, "-m", "fdship", "submit", "--daemon", c.daemons[0].url,
                        "--to", "d1", "--notify", "reload", a],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "(hook reload ok in" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fdship", "submit", "--daemon", c.daemons[0].url,
                        "--to", "d1", "--notify", "broken", a],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1  # the job ran, the machine failed: the hook's reason shows
    assert "hook broken failed: exit status 3" in r.stdout
