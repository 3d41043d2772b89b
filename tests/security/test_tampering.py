"""A center's data dir edited by hand: garbage is detected, never trusted.

``tests/integration/test_recovery.py`` covers what checksums catch (a torn
tail, a flipped byte mid-log, an edited checkpoint that is set aside).  Here
the edits that *pass* the checksums: a record or checkpoint re-framed with
correct checksums around content that is not a center's (what a tool or a
person rewriting the files produces).  A real ``fdship center`` must refuse to
start with one line naming the file and what to do, never a traceback, never
a center running on half a state.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from fdship.core.records import encode, encode_checkpoint
from fdship.localcluster import free_port

from .conftest import TOKEN, Raw, SecCluster


def run_center(data: str, wait: float = 0) -> subprocess.CompletedProcess[str] | None:
    """Start ``fdship center`` on ``data``; return its result if it exits within 30 s."""
    env = dict(os.environ, FDSHIP_TOKEN=TOKEN)
    p = subprocess.Popen([sys.executable, "-m", "fdship", "center", "--listen",
                          f"127.0.0.1:{free_port()}", "--data-dir", data],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = p.communicate(timeout=30)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
        return None


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: Any) -> str:
    """A data dir holding real records: two registered (fake) hosts, then a clean stop."""
    base = str(tmp_path_factory.mktemp("tamper"))
    c = SecCluster(0, base)
    try:
        c.start()
        raw = Raw(c, c.center.port)
        for name in ("h1", "h2"):
            st, body = raw.json("POST", "/center/heartbeat",
                                {"name": name, "address": f"{name}:1", "boot_id": "b"})
            assert st == 200, body
        raw.close()
    finally:
        c.stop()
    data = os.path.join(base, "center-data")
    assert glob.glob(os.path.join(data, "redo-*.log"))
    return data


def _copy(state_dir: str, tmp_path: Any, name: str) -> str:
    d = str(tmp_path / name)
    shutil.copytree(state_dir, d)
    return d


def _refused(r: subprocess.CompletedProcess[str] | None, *words: str) -> str:
    assert r is not None, "the center started on a tampered data dir"
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fdship center: "), r.stderr
    for w in words:
        assert w.lower() in last.lower(), last
    return last


@pytest.mark.parametrize("payload", [
    b"not json at all", b'{"t": 1.0}', b'{"t": 1.0, "e": {"type": "NoSuchEvent"}}',
    b'{"t": 1.0, "e": {"type": "HostRegistered"}}', b'[1, 2, 3]', b"\xff\xfe",
    b'{"t": "soon", "e": {"type": "JobsExpired", "jobs": [1]}}'])
def test_a_well_framed_record_that_is_not_a_center_record(state_dir: str, tmp_path: Any,
                                                          payload: bytes) -> None:
    data = _copy(state_dir, tmp_path, "rec")
    for ck in glob.glob(os.path.join(data, "checkpoint-*")):
        os.unlink(ck)  # replay the whole log, the appended record included
    seg = max(glob.glob(os.path.join(data, "redo-*.log")))
    size = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(encode(payload))
    _refused(run_center(data), "REDO log", "restore")
    assert os.path.getsize(seg) == size + len(encode(payload))  # nothing was cut or changed


@pytest.mark.parametrize("state", [b"garbage", b"{}", b'{"hosts": 5}', b"[]",
                                   b'{"hosts": {"h1": {}}, "jobs": {}}'])
def test_a_well_framed_checkpoint_that_is_not_a_center_state(state_dir: str, tmp_path: Any,
                                                             state: bytes) -> None:
    data = _copy(state_dir, tmp_path, "ckpt")
    ckpts = sorted(glob.glob(os.path.join(data, "checkpoint-*.ckpt")))
    assert ckpts, "a clean stop leaves a checkpoint"
    newest = ckpts[-1]
    lsn = int(os.path.basename(newest)[len("checkpoint-"):-len(".ckpt")])
    for ck in ckpts:
        with open(ck, "wb") as f:
            f.write(encode_checkpoint(state, lsn))
    # The LOCK file holds the pid of the last center that opened the dir, so
    # its size follows the pid's digits: it is not part of the state.
    def files() -> dict[str, int]:
        return {p: os.path.getsize(p) for p in glob.glob(os.path.join(data, "*"))
                if os.path.basename(p) != "LOCK"}
    before = files()
    _refused(run_center(data), "checkpoint", "restore")
    assert before and files() == before  # nothing renamed, cut or rewritten


def test_the_untouched_copy_still_starts(state_dir: str, tmp_path: Any) -> None:
    """The control: the same data dir, unedited, recovers both hosts."""
    data = _copy(state_dir, tmp_path, "good")
    port = free_port()
    env = dict(os.environ, FDSHIP_TOKEN=TOKEN)
    p = subprocess.Popen([sys.executable, "-m", "fdship", "center", "--listen",
                          f"127.0.0.1:{port}", "--data-dir", data], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        c = SecCluster(0, str(tmp_path / "x"))
        deadline = time.monotonic() + 30
        while True:
            try:
                st, body = Raw(c, port, timeout=5).json("GET", "/center/hosts")
                break
            except OSError:
                assert time.monotonic() < deadline and p.poll() is None
                time.sleep(0.1)
        assert st == 200 and sorted(h["name"] for h in body["hosts"]) == ["h1", "h2"]
    finally:
        p.terminate()
        p.wait(30)
