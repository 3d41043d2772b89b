"""The load sampler's app figure: real processes named by real pidfiles.

``LoadSampler(watch=(pidfile, ...))`` reports ``app_cpu``, the CPU the watched
processes and their children used between two samples in percent of one core.
Busy loops here are bounded ``python -c`` processes (a few seconds at most) and
are killed at the end of each test whatever happens.  A pidfile that is
missing, garbage, stale, a directory or a FIFO gives 0, never an exception, and
is logged once per change of its state.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from fdship import config as C
from fdship.daemon.load import AppWatch, LoadSampler, cpu_between, read_pidfile
from fdship.errors import ConfigError

# Spins until its deadline: one core's worth while the machine lets it.
BUSY = "import time\nend = time.monotonic() + {secs}\nwhile time.monotonic() < end:\n    pass\n"
# Idle itself, keeps one busy child running (and reaps it): children count.
PARENT = ("import subprocess, sys\n"
          "subprocess.run([sys.executable, '-c', {busy!r}])\n")
# Idle itself, runs short busy children one after the other, each reaped before
# the next starts: their time reaches the parent only as reaped-children time.
SERIAL = ("import subprocess, sys, time\n"
          "end = time.monotonic() + {secs}\n"
          "while time.monotonic() < end:\n"
          "    subprocess.run([sys.executable, '-c', {busy!r}])\n")


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start bounded child processes; every one (and its children) is killed afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            try:
                for c in psutil.Process(p.pid).children(recursive=True):
                    c.kill()
            except psutil.Error:
                pass
            p.kill()
            p.wait(10)


def pidfile(tmp_path: Path, pid: int, name: str = "app.pid") -> str:
    path = tmp_path / name
    path.write_text(f"{pid}\n")
    return str(path)


def proc_cpu(pid: int, reaped: bool = False) -> float:
    """CPU seconds of ``pid`` read straight from /proc (the oracle: no psutil), plus
    those of the children it reaped when ``reaped``; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    utime, stime, cutime, cstime = map(int, data[data.rindex(")") + 2:].split()[11:15])
    ticks = utime + stime + (cutime + cstime if reaped else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(name))
    return out


def tree_cpu(pid: int) -> float:
    """The oracle for a parent and its children: its own and reaped time, plus
    the time of the children still running."""
    kids = children_of(pid)
    return sum(proc_cpu(k, reaped=True) for k in kids) + proc_cpu(pid, reaped=True)


def window(sampler: LoadSampler, oracle: Callable[[], float], seconds: float,
           samples: int = 1) -> tuple[float, float]:
    """Sample over ``samples`` intervals; return (the sampler's CPU seconds, the
    oracle's) for the same stretch of time."""
    before = oracle()
    sampler.sample()
    got = 0.0
    t0 = last = sampler.app.last_t
    for _ in range(samples):
        time.sleep(seconds / samples)
        pct = sampler.sample()["app_cpu"]
        got += pct / 100.0 * (sampler.app.last_t - last)
        last = sampler.app.last_t
    after = oracle()
    assert last > t0
    return got, after - before


def close(got: float, truth: float) -> bool:
    # 10 ms clock ticks and the few microseconds between the oracle's reads and
    # the sampler's make the figures differ a little; double counting would not.
    return abs(got - truth) <= 0.05 + 0.1 * truth


def test_a_busy_process_reads_its_cpu_and_an_idle_one_next_to_nothing(tmp_path, spawn):
    busy = spawn(BUSY.format(secs=6))
    idle = spawn("import time\ntime.sleep(6)\n")
    time.sleep(0.2)
    s_busy = LoadSampler((pidfile(tmp_path, busy.pid, "busy.pid"),))
    s_idle = LoadSampler((pidfile(tmp_path, idle.pid, "idle.pid"),))
    got, truth = window(s_busy, lambda: proc_cpu(busy.pid), 2.0)
    got_idle, truth_idle = window(s_idle, lambda: proc_cpu(idle.pid), 1.0)
    print(f"\nbusy loop: sampler {got / 2.0 * 100:.1f}% of a core, /proc {truth / 2.0 * 100:.1f}%;"
          f" sleeping process: sampler {got_idle * 100:.1f}%")
    # The shared machine decides how much of a core the loop gets; whatever it
    # got, the sampler must say so, and it must have been something.
    assert truth >= 0.1, "the busy loop got no CPU at all"
    assert close(got, truth), (got, truth)
    assert got_idle <= 0.02 and close(got_idle, truth_idle), got_idle


def test_the_first_sample_is_a_baseline():
    assert LoadSampler(()).sample()["app_cpu"] == 0.0


def test_a_busy_child_counts_for_its_idle_parent(tmp_path, spawn):
    parent = spawn(PARENT.format(busy=BUSY.format(secs=5)))
    deadline = time.monotonic() + 5
    while not children_of(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = children_of(parent.pid)
    s = LoadSampler((pidfile(tmp_path, parent.pid),))
    got, truth = window(s, lambda: proc_cpu(child) + proc_cpu(parent.pid), 2.0)
    print(f"\nidle parent, busy child: sampler {got:.2f} s, /proc {truth:.2f} s over 2 s")
    assert truth >= 0.1 and proc_cpu(parent.pid) < 0.5  # the child did the work
    assert close(got, truth), (got, truth)


def test_short_lived_children_count_once(tmp_path, spawn):
    # Children of ~0.3 s, reaped in turn: each is seen alive by one sample and
    # then only in the parent's reaped-children time; counting it there in full
    # again would read more than /proc says.
    parent = spawn(SERIAL.format(secs=5, busy=BUSY.format(secs=0.3)))
    time.sleep(0.3)
    s = LoadSampler((pidfile(tmp_path, parent.pid),))
    got, truth = window(s, lambda: tree_cpu(parent.pid), 3.0, samples=6)
    print(f"\nparent running 0.3 s children back to back: sampler {got:.2f} s, "
          f"/proc {truth:.2f} s over 3 s")
    assert truth >= 0.1
    assert abs(got - truth) <= 0.1 + 0.1 * truth, (got, truth)


def test_two_pidfiles_naming_one_process_count_it_once(tmp_path, spawn):
    busy = spawn(BUSY.format(secs=4))
    time.sleep(0.2)
    s = LoadSampler((pidfile(tmp_path, busy.pid, "a.pid"), pidfile(tmp_path, busy.pid, "b.pid")))
    got, truth = window(s, lambda: proc_cpu(busy.pid), 1.5)
    assert truth >= 0.1 and close(got, truth), (got, truth)


def test_cpu_between_accounts_births_reaps_and_restarts_exactly():
    root, child, new, orphan = (10, 1.0), (11, 2.0), (12, 3.0), (13, 4.0)
    prev = {root: (None, 5.0), child: (root, 2.0), orphan: (root, 1.0)}
    # root ran 1 s more and reaped child (which had 2.0 s, then ran 0.5 s more:
    # its 2.5 s now sit in root's figure); a new child ran 0.25 s; the orphan
    # left the tree (reparented away) and is not taken off.
    now = {root: (None, 5.0 + 1.0 + 2.5), new: (root, 0.25)}
    prev_o = {**prev, orphan: (None, 1.0)}  # same, its parent unknown
    assert cpu_between(prev_o, now) == pytest.approx(1.0 + 0.5 + 0.25)
    # The app restarted under a new pid: only a baseline for next time.
    assert cpu_between(prev, {(20, 9.0): (None, 7.0)}) == 0.0
    # A new process whose parent is new too: born in between only if the chain
    # reaches a process seen before.
    grand = (14, 5.0)
    assert cpu_between(prev, {**prev, new: (root, 0.5), grand: (new, 0.25)}) == \
        pytest.approx(0.75)
    # ...and not when it hangs below a process that was not there either.
    assert cpu_between(prev, {**prev, (30, 1.0): (None, 4.0), (31, 1.0): ((30, 1.0), 2.0)}) \
        == 0.0


# --- bad pidfiles: 0, no exception, one log line per change ------------------------


def test_missing_garbage_stale_and_odd_pidfiles_read_as_nothing(tmp_path, spawn):
    (tmp_path / "empty.pid").write_text("")
    (tmp_path / "words.pid").write_text("hello\n")
    (tmp_path / "neg.pid").write_text("-5\n")
    (tmp_path / "huge.pid").write_text("99999999999999\n")
    (tmp_path / "long.pid").write_text("1" * 5000)
    (tmp_path / "binary.pid").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "dir.pid").mkdir()
    os.mkfifo(tmp_path / "fifo.pid")  # opening it must not block the heartbeat
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "stale.pid").write_text(f"{dead.pid}\n")
    # A pid recycled since: the process now running started after the file was
    # written (its mtime set back a day).
    live = spawn("import time\ntime.sleep(5)\n")
    reused = tmp_path / "reused.pid"
    reused.write_text(f"{live.pid}\n")
    past = time.time() - 86400
    os.utime(reused, (past, past))
    unreadable = tmp_path / "secret.pid"
    unreadable.write_text(f"{live.pid}\n")
    os.chmod(unreadable, 0)

    expect = {"missing.pid": "missing", "empty.pid": "holds no pid",
              "words.pid": "holds no pid", "neg.pid": "holds no pid",
              "huge.pid": "holds no pid", "long.pid": "holds no pid",
              "binary.pid": "holds no pid", "dir.pid": "not a regular file",
              "fifo.pid": "not a regular file", "stale.pid": f"stale: pid {dead.pid} is not",
              "reused.pid": "started after the pidfile"}
    for name, why in expect.items():
        pid, got = read_pidfile(str(tmp_path / name))
        assert pid is None and why in got, (name, got)
    if os.geteuid() != 0:  # root reads it anyway
        assert "unreadable" in read_pidfile(str(unreadable))[1]

    paths = tuple(str(tmp_path / n) for n in expect)
    s = LoadSampler(paths)
    t0 = time.monotonic()
    for _ in range(3):
        assert s.sample()["app_cpu"] == 0.0
    assert time.monotonic() - t0 < 5.0


def test_each_change_of_a_pidfile_is_logged_once(tmp_path, spawn, caplog):
    path = tmp_path / "bidder.pid"
    w = AppWatch((str(path),))
    with caplog.at_level(logging.INFO, logger="fdship.daemon"):
        for i in range(3):
            assert w.sample(float(i)) == 0.0
        app = spawn("import time\ntime.sleep(5)\n")
        path.write_text(f"{app.pid}\n")
        for i in range(3, 6):
            w.sample(float(i))
        app.kill()
        app.wait(10)
        for i in range(6, 9):
            assert w.sample(float(i)) == 0.0
    lines = [r.getMessage() for r in caplog.records if "watch_pidfile" in r.getMessage()]
    print("\n" + "\n".join(lines))
    assert len(lines) == 3, lines
    assert "missing" in lines[0] and "counts as 0" in lines[0]
    assert f"watching pid {app.pid}" in lines[1]
    assert f"stale: pid {app.pid} is not running" in lines[2]


def test_watch_pidfile_is_a_repeatable_absolute_path_setting(tmp_path):
    def parse(argv: list[str]) -> C.DaemonConfig:
        p = argparse.ArgumentParser()
        C.add_arguments(p, C.DaemonConfig)
        return C.load(C.DaemonConfig, p.parse_args(argv))  # type: ignore[no-any-return]

    assert parse([]).watch_pidfile == []
    cfg = parse(["--watch-pidfile", "/run/bidder.pid", "--watch-pidfile", "/run/helper.pid"])
    assert cfg.watch_pidfile == ["/run/bidder.pid", "/run/helper.pid"]
    f = tmp_path / "d.toml"
    f.write_text('watch_pidfile = ["/run/bidder.pid"]\n')
    assert parse(["--config", str(f)]).watch_pidfile == ["/run/bidder.pid"]
    with pytest.raises(ConfigError, match="must be an absolute path"):
        parse(["--watch-pidfile", "run/bidder.pid"])
    # The scale the app is judged on: percent of one core at which it is busy.
    assert parse([]).watch_busy_cpu == 75.0
    assert parse(["--watch-busy-cpu", "800"]).watch_busy_cpu == 800.0
    for bad in ("0", "-5", "1e9"):
        with pytest.raises(ConfigError, match="watch_busy_cpu .* must be between 1 and"):
            parse(["--watch-busy-cpu", bad])


def test_a_process_hidden_from_the_daemon_is_named_as_such(tmp_path, spawn):
    """A daemon running as its own user under ProtectProc=invisible (or /proc with
    hidepid) cannot see the bidder: say so instead of calling the pidfile stale.
    Run for real: a private mount namespace with a hidepid /proc, the reader as
    nobody."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "setpriv")):
        pytest.skip("needs root, unshare and setpriv to mount a hidepid /proc")
    app = spawn("import time\ntime.sleep(20)\n")
    # Somewhere nobody may read (pytest's own temp dirs are root's alone).
    shared = Path(tempfile.mkdtemp(prefix="fdship-hidden-"))
    try:
        _hidden_check(shared, app.pid)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _hidden_check(shared: Path, pid: int) -> None:
    os.chmod(shared, 0o755)
    path = pidfile(shared, pid)
    os.chmod(path, 0o644)
    code = ("import sys\nsys.path.insert(0, sys.argv[1])\n"
            "from fdship.daemon.load import read_pidfile\n"
            "print(read_pidfile(sys.argv[2])[1])\n")
    root = str(Path(__file__).resolve().parents[2])
    inner = (f"mount -t proc -o hidepid=invisible proc /proc && exec setpriv --reuid 65534 "
             f"--regid 65534 --clear-groups {sys.executable} -c \"$0\" \"$1\" \"$2\"")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner,
                        code, root, path], capture_output=True, text=True, timeout=60,
                       check=False)
    if r.returncode != 0 and "mount" in r.stderr:
        pytest.skip(f"cannot mount a hidepid /proc here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert f"pid {pid} is running but hidden from this daemon" in r.stdout, r.stdout
    assert "ProtectProc=default" in r.stdout
    # Seen by root, the same pidfile is fine.
    assert read_pidfile(path) == (pid, "")
