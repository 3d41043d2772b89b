"""Schedules end to end: a real center runs real pushes every second or two.

One cluster serves the module: the center, a source daemon (d0) and two
targets, one of which has a slow notify hook so a run can outlast the
interval.  Schedules are added with the ``fdship schedule`` CLI and through
the HTTP API; the tests read ``history`` and the copies on the targets, kill
the center with SIGKILL and check that schedules and history survive and that
the runs missed meanwhile collapse into one catch-up run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable
from typing import Any

import pytest

from fdship.localcluster import LocalCluster

MiB = 1024 * 1024


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("sched"))
    hook = os.path.join(base, "slow-reload.sh")
    with open(hook, "w") as f:
        f.write("#!/bin/sh\nsleep 3\necho reloaded >&2\n")
    os.chmod(hook, 0o755)
    cfg = os.path.join(base, "d2.toml")
    with open(cfg, "w") as f:
        f.write(f'[hooks.slowreload]\ncommand = ["{hook}"]\ntimeout = 20\n')
    c = LocalCluster(3, base, center_args=["--chunk-size", "256K"],
                     daemon_args={0: ["--heartbeat-interval", "0.3"],
                                  1: ["--heartbeat-interval", "0.3"],
                                  2: ["--heartbeat-interval", "0.3", "--config", cfg]})
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def src(cluster):
    d = os.path.join(cluster.tmp, "src")
    os.makedirs(d, exist_ok=True)
    return d


def fdship(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fdship", *args, "--center",
                           cluster.center.url], capture_output=True, text=True, timeout=60,
                          check=False)


def history(cluster: LocalCluster, name: str) -> list[dict[str, Any]]:
    return cluster.request("GET", f"{cluster.center.url}/center/schedules/{name}/history"
                                  "?limit=1000")["history"]


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except (urllib.error.URLError, OSError, KeyError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not after {timeout:.0f} s (last: {last!r})")


def received(cluster: LocalCluster, i: int) -> int:
    return int(cluster.request("GET", cluster.daemons[i].url + "/daemon/status")
               ["bytes_received"])


def test_every_second_ships_then_skips_unchanged_then_ships_the_change(cluster, src):
    path = os.path.join(src, "prices.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(MiB + 4321))
    r = fdship(cluster, "schedule", "add", "prices", "--every", "1s", "--from", "d0",
               "--to", "d1,d2", "--dest", "/srv/models", path)
    assert r.returncode == 0, r.stderr
    assert "schedule prices added: every 1s" in r.stdout
    done = wait_for("first run done", lambda: [e for e in history(cluster, "prices")
                                               if e["result"] == "done"])
    first = done[-1]
    assert first["run"] == 1 and first["bytes"] >= 2 * (MiB + 4321)
    job = cluster.job(first["job"])
    assert job["state"] == "done" and sorted(job["machines"]) == ["d1", "d2"]
    for i in (1, 2):
        assert sha(os.path.join(cluster.root(i), "srv/models/prices.bin")) == sha(path)
    rx = [received(cluster, i) for i in (1, 2)]
    # Unchanged files: runs are recorded as skipped and move nothing.
    skips = wait_for("two unchanged runs", lambda: [
        e for e in history(cluster, "prices") if e["result"] == "skipped"
        and e["run"] is not None][:2] if len([
            e for e in history(cluster, "prices") if e["result"] == "skipped"
            and e["run"] is not None]) >= 2 else None)
    for e in skips:
        assert e["bytes"] == 0 and e["job"] is None and "unchanged" in e["reason"]
    assert [received(cluster, i) for i in (1, 2)] == rx
    # A change ships at the next run.
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"new prices")
    changed = wait_for("a run after the change", lambda: [
        e for e in history(cluster, "prices") if e["result"] == "done" and e["run"] > 1])
    assert changed[0]["bytes"] > 0
    for i in (1, 2):
        assert sha(os.path.join(cluster.root(i), "srv/models/prices.bin")) == sha(path)
    # The CLI shows it; rm stops it.
    r = fdship(cluster, "schedule", "list")
    assert r.returncode == 0 and "prices" in r.stdout and "every 1s" in r.stdout
    r = fdship(cluster, "schedule", "history", "prices", "--limit", "5")
    assert r.returncode == 0 and "RESULT" in r.stdout and "unchanged" in r.stdout
    r = fdship(cluster, "schedule", "history", "prices", "--json")
    runs = [e["run"] for e in json.loads(r.stdout)["history"] if e["run"] is not None]
    assert runs == sorted(runs, reverse=True) and len(set(runs)) == len(runs)
    r = fdship(cluster, "schedule", "rm", "prices")
    assert r.returncode == 0, r.stderr
    after = json.loads(fdship(cluster, "schedule", "list", "--json").stdout)
    assert "prices" not in [s["name"] for s in after["schedules"]]
    r = fdship(cluster, "schedule", "history", "prices")
    assert r.returncode == 2 and "no schedule named 'prices'" in r.stderr


def test_a_run_never_overlaps_the_previous_one(cluster, src):
    path = os.path.join(src, "model.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(300 * 1024))
    res = cluster.request("POST", cluster.center.url + "/center/schedules",
                          {"name": "reloading", "every": 1, "source": "d0",
                           "machines": ["d2"], "files": [path], "notify": "slowreload"})
    assert res["name"] == "reloading" and res["every"] == 1.0
    # The hook takes 3 s: the runs due meanwhile are skipped, and say why.
    overlap = wait_for("an overlap skip", lambda: [
        e for e in history(cluster, "reloading") if e["result"] == "skipped"
        and "still running" in (e["reason"] or "")])
    assert overlap[0]["run"] is None and overlap[0]["bytes"] == 0
    assert "previous run 1" in overlap[0]["reason"]
    wait_for("run 1 done", lambda: [e for e in history(cluster, "reloading")
                                    if e["run"] == 1 and e["result"] == "done"])
    run1 = next(e for e in history(cluster, "reloading") if e["run"] == 1)
    hook = cluster.job(run1["job"])["machines"]["d2"]["hook"]
    assert hook["exit_status"] == 0 and hook["seconds"] >= 2.9
    runs = [e for e in history(cluster, "reloading") if e["run"] is not None]
    cluster.request("DELETE", cluster.center.url + "/center/schedules/reloading")
    spans = sorted((e["start"], e["end"]) for e in runs)
    for (_, e1), (s2, _) in itertools.pairwise(spans):
        assert e1 <= s2, spans


def test_schedules_survive_a_crash_and_missed_runs_collapse_into_one(cluster, src):
    path = os.path.join(src, "catalog.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(200 * 1024))
    r = fdship(cluster, "schedule", "add", "catalog", "--every", "1s", "--from", "d0",
               "--to", "d1", path)
    assert r.returncode == 0, r.stderr
    wait_for("first run done", lambda: [e for e in history(cluster, "catalog")
                                        if e["result"] == "done"])
    before = history(cluster, "catalog")
    last_run = max(e["run"] for e in before if e["run"] is not None)
    cluster.center.kill()  # SIGKILL: no final checkpoint, only the REDO log
    time.sleep(4.5)
    cluster.start_center()
    after = wait_for("a catch-up run", lambda: [
        e for e in history(cluster, "catalog") if e["run"] is not None
        and e["run"] > last_run and e["missed"] >= 2])
    catch_up = after[-1]
    assert catch_up["run"] == last_run + 1, catch_up  # one run for all that was missed
    assert catch_up["result"] == "skipped" and "unchanged" in catch_up["reason"]
    # The history from before the crash is still there.
    now = history(cluster, "catalog")
    assert {e["start"] for e in before} <= {e["start"] for e in now}
    listing = json.loads(fdship(cluster, "schedule", "list", "--json").stdout)
    (s,) = [s for s in listing["schedules"] if s["name"] == "catalog"]
    assert s["source"] == "d0" and s["machines"] == ["d1"] and s["files"] == [path]
    cluster.request("DELETE", cluster.center.url + "/center/schedules/catalog")


def test_cron_with_a_seconds_field_runs_on_its_seconds(cluster, src):
    path = os.path.join(src, "cron.bin")
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    cluster.request("POST", cluster.center.url + "/center/schedules",
                    {"name": "even", "cron": "*/2 * * * * *", "source": "d0",
                     "machines": ["d1"], "files": [path]})
    def two_runs() -> list[dict[str, Any]] | None:
        h = [e for e in history(cluster, "even") if e["run"] is not None]
        return h if len(h) >= 2 else None

    runs = wait_for("two runs", two_runs)
    for e in runs:
        assert int(e["due"][17:19]) % 2 == 0, e
    cluster.request("DELETE", cluster.center.url + "/center/schedules/even")


@pytest.mark.parametrize("args, text", [
    (["--every", "1s", "--from", "nobody", "--to", "d1", "/x/a"], "matches no registered"),
    (["--cron", "* * * * * * *", "--from", "d0", "--to", "d1", "/x/a"], "has 7 fields"),
    (["--every", "1s", "--from", "d0", "--to", "d1", "relative/a"], "not an absolute path"),
    (["--every", "1s", "--from", "d0", "--to", "d9", "/x/a"], "unknown machine"),
    (["--every", "1s", "--from", "d0", "--to", "d1", "--notify", "nope", "/x/a"],
     "no notify hook named 'nope'"),
])
def test_bad_schedules_are_refused_by_the_cli_with_a_sentence(cluster, args, text):
    r = fdship(cluster, "schedule", "add", "bad", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert text in r.stderr


def test_duplicate_names_conflict_and_unknown_names_are_404(cluster, src):
    body = {"name": "dup", "every": "1h", "source": "d0", "machines": ["d1"],
            "files": [os.path.join(src, "nothing-yet.bin")]}
    cluster.request("POST", cluster.center.url + "/center/schedules", body)
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            cluster.request("POST", cluster.center.url + "/center/schedules", body)
        assert e.value.code == 409
        assert "exists already" in json.loads(e.value.read())["error"]
        # Its first run (at once) fails: the file does not exist on the source.
        failed = wait_for("the failed run", lambda: [e for e in history(cluster, "dup")
                                                     if e["result"] == "failed"])
        assert "no such file" in failed[0]["reason"]
    finally:
        cluster.request("DELETE", cluster.center.url + "/center/schedules/dup")
    for method, path in (("GET", "/center/schedules/dup"),
                         ("GET", "/center/schedules/dup/history"),
                         ("DELETE", "/center/schedules/dup")):
        with pytest.raises(urllib.error.HTTPError) as e:
            cluster.request(method, cluster.center.url + path)
        assert e.value.code == 404
