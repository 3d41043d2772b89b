"""Escape attempts: every way a request could read or write outside what a daemon allows.

Real processes on 127.0.0.1 with a token: d0 ships only from ``--allow-source
A``; d1 writes only under ``--allow-dest ROOT1/data``; d2 has only its
``--root``.  A directory OUT outside every root holds a secret and victim
files.  Each attempt below is one way in: through the submission API (source
paths), through a job's destination, through a pull or pack a (compromised)
center could send, and through /daemon/download.  Every one must fail, and
after every one the secret was never shipped and the victims are unchanged.
The tally is written to ``$FDSHIP_FUZZ_REPORT`` (as "confinement") for
docs/reliability.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import xxhash

from .conftest import Raw, SecCluster, Tally, record_tallies, stop_cluster, wait_for

SECRET = b"the secret: must never leave OUT\n"
TALLY = Tally()


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Env:
    def __init__(self, c: SecCluster, base: str) -> None:
        self.c = c
        self.base = base
        self.allowed = os.path.join(base, "A")
        self.out = os.path.join(base, "OUT")
        self.secret = os.path.join(self.out, "secret")
        self.root = [c.root(i) for i in range(3)]
        self.api = Raw(c, c.daemons[0].port, timeout=120)
        self.victims: dict[str, str] = {}

    def victim(self, name: str) -> str:
        p = os.path.join(self.out, name)
        with open(p, "wb") as f:
            f.write(b"victim " + name.encode() + b"\n")
        self.victims[p] = sha(p)
        return p

    def submit(self, files: list[str], machines: list[str], **extra: Any) -> tuple[int, Any]:
        return self.api.json("POST", "/daemon/api", {"files": files, "machines": machines,
                                                     **extra})

    def daemon(self, i: int) -> Raw:
        return Raw(self.c, self.c.daemons[i].port)

    def intact(self) -> None:
        """OUT holds exactly what the test put there, unchanged."""
        assert sha(self.secret) == hashlib.sha256(SECRET).hexdigest()
        for p, h in self.victims.items():
            assert not os.path.islink(p) and sha(p) == h, f"{p} was changed"
        expected = {"secret", "dir"} | {os.path.basename(p) for p in self.victims}
        assert set(os.listdir(self.out)) == expected, os.listdir(self.out)
        assert os.listdir(os.path.join(self.out, "dir")) == []


@pytest.fixture(scope="module")
def env(tmp_path_factory: Any) -> Iterator[Env]:
    base = str(tmp_path_factory.mktemp("confine"))
    for d in ("A", "OUT", "OUT/dir"):
        os.makedirs(os.path.join(base, d))
    with open(os.path.join(base, "OUT", "secret"), "wb") as f:
        f.write(SECRET)
    c = SecCluster(3, base, center_args=["--chunk-size", "64K"],
                   daemon_args={0: ["--allow-source", os.path.join(base, "A")],
                                1: ["--allow-dest", os.path.join(base, "root1", "data")],
                                2: []})
    os.makedirs(os.path.join(c.root(1), "data"), exist_ok=True)
    try:
        c.start()
        e = Env(c, base)
        yield e
        e.api.close()
        record_tallies({"confinement escapes": TALLY})
    finally:
        stop_cluster(c)


def refused(e: Env, what: str, attempt: Callable[[], Any]) -> Any:
    """Run one escape attempt; it must be refused.  Counts it."""
    TALLY.tried += 1
    result = attempt()
    e.intact()
    TALLY.rejected += 1
    return result


def _err(st: int, body: Any, *status: int) -> str:
    assert st in status, (st, body)
    assert isinstance(body["error"], str) and len(body["error"]) > 15
    return str(body["error"])


# ---------------------------------------------------------------------- sources


@pytest.mark.parametrize("case", [
    "outside", "symlink_to_outside", "symlinked_dir", "dotdot", "relative", "nul",
    "sibling_prefix", "proc_root", "directory", "fifo", "device_link", "dev_zero"])
def test_source_escapes_are_refused(env: Env, case: str) -> None:
    A, out = env.allowed, env.out
    if case == "symlink_to_outside":
        path = os.path.join(A, "link")
        if not os.path.lexists(path):
            os.symlink(env.secret, path)
    elif case == "symlinked_dir":
        d = os.path.join(A, "dirlink")
        if not os.path.lexists(d):
            os.symlink(out, d)
        path = os.path.join(d, "secret")
    elif case == "fifo":
        path = os.path.join(A, "pipe")
        if not os.path.exists(path):
            os.mkfifo(path)
    elif case == "device_link":
        path = os.path.join(A, "zero")
        if not os.path.lexists(path):
            os.symlink("/dev/zero", path)
    else:
        path = {"outside": env.secret, "dotdot": os.path.join(A, "..", "OUT", "secret"),
                "relative": "OUT/secret", "nul": os.path.join(A, "x\0/../../OUT/secret"),
                "sibling_prefix": A + "-evil/secret", "directory": A, "dev_zero": "/dev/zero",
                "proc_root": "/proc/self/root" + env.secret}[case]
    if case == "sibling_prefix":
        os.makedirs(A + "-evil", exist_ok=True)
        with open(path, "wb") as f:
            f.write(SECRET)

    def attempt() -> None:
        st, body = env.submit([path], ["d1"])
        msg = _err(st, body, 400, 403)
        if case in ("directory", "fifo"):
            assert "regular file" in msg
    refused(env, case, attempt)


def test_a_link_flipped_during_submission_never_ships_the_secret(env: Env) -> None:
    """The source check runs on the file actually opened, not only on its name: a link
    flipped between inside and outside as fast as possible never gets the secret out."""
    inside = os.path.join(env.allowed, "ok.txt")
    with open(inside, "wb") as f:
        f.write(b"harmless\n")
    flip = os.path.join(env.allowed, "flip")
    stop = threading.Event()

    def flipper() -> None:
        tmp = flip + ".tmp"
        n = 0
        while not stop.is_set():
            target = env.secret if n % 2 else inside
            try:
                os.symlink(target, tmp)
                os.replace(tmp, flip)
            except OSError:
                pass
            n += 1

    secret_hash = xxhash.xxh3_64(SECRET).hexdigest()
    if not os.path.lexists(flip):
        os.symlink(inside, flip)  # it always exists from here on (replaced atomically)
    th = threading.Thread(target=flipper, daemon=True)
    th.start()
    shipped = refusals = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and shipped + refusals < 40:
            TALLY.tried += 1
            st, body = env.submit([flip], ["d1"], dest="/data", wait=True)
            if st == 200:
                assert body["files"][0]["xxh3"] != secret_hash, "the secret was shipped"
                shipped += 1
            else:
                _err(st, body, 403)
                refusals += 1
            TALLY.rejected += 1  # no escape: harmless file shipped or the secret refused
    finally:
        stop.set()
        th.join(5)
    assert shipped + refusals >= 5
    env.intact()
    copy = os.path.join(env.root[1], "data", "flip")
    if os.path.exists(copy):
        with open(copy, "rb") as f:
            assert f.read() == b"harmless\n"


def test_a_hard_link_to_a_file_outside_is_not_shipped(env: Env) -> None:
    """A hard link inside A is another name for the secret: the resolved path is inside,
    so only the link count tells.  Refused (the store has no opt-in here)."""
    hl = os.path.join(env.allowed, "hardlink")
    if not os.path.lexists(hl):
        os.link(env.secret, hl)
    assert os.stat(hl).st_nlink == 2

    def attempt() -> None:
        st, body = env.submit([hl], ["d1"], dest="/data")
        msg = _err(st, body, 403)
        assert "hard links" in msg and "allow_source" in msg
        assert not os.path.exists(os.path.join(env.root[1], "data", "hardlink"))
    refused(env, "hard link", attempt)


def test_skip_if_unchanged_cannot_confirm_a_guess_through_a_hard_link(env: Env) -> None:
    """The skip-if-unchanged check hashes in place: through a hard link in A to the secret
    it would answer "skipped" for the right guess of the secret's hash and ship for a wrong
    one, an oracle for a file that is never shipped.  Both guesses get the same refusal."""
    hl = os.path.join(env.allowed, "hardlink-skip")
    if not os.path.lexists(hl):
        os.link(env.secret, hl)
    right = xxhash.xxh3_64(SECRET).hexdigest()
    answers = []
    for guess in (right, "0123456789abcdef"):
        def attempt(guess: str = guess) -> None:
            st, body = env.submit([hl], ["d1"], dest="/data", skip_if_unchanged={hl: guess})
            msg = _err(st, body, 403)
            assert "hard links" in msg and not body.get("skipped"), body
            answers.append((st, msg))
        refused(env, f"hard link skip guess {guess[:4]}", attempt)
    assert answers[0] == answers[1], answers  # nothing tells the guesses apart
    assert not os.path.exists(os.path.join(env.root[1], "data", "hardlink-skip"))


# ---------------------------------------------------------------------- destinations


def test_destination_escapes_at_submission(env: Env) -> None:
    src = os.path.join(env.allowed, "payload.bin")
    with open(src, "wb") as f:
        f.write(b"payload\n")
    for dest, status in (("/etc", 422), ("/data/../etc", 400), ("data", 400),
                         ("/data/\0x", 400), ("/data/../../OUT", 400)):
        refused(env, dest, lambda dest=dest, status=status:
                _err(*env.submit([src], ["d1"], dest=dest), status))


def _job_failed_for(env: Env, dest: str, machine: str, words: str) -> None:
    src = os.path.join(env.allowed, "payload.bin")
    with open(src, "wb") as f:
        f.write(b"payload\n")
    st, body = env.submit([src], [machine], dest=dest, wait=True)
    assert st == 200, body
    m = body["machines"][machine]
    assert body["state"] == "failed" and m["state"] == "failed", body
    assert words in m["error"], m["error"]


def test_a_destination_directory_that_is_a_link_outside_is_refused(env: Env) -> None:
    link = os.path.join(env.root[1], "data", "escape")
    os.symlink(os.path.join(env.out, "dir"), link)
    refused(env, "dir link", lambda: _job_failed_for(env, "/data/escape", "d1", "allow_dest"))


def test_a_link_inside_the_root_cannot_lead_outside_it(env: Env) -> None:
    """d2 has no allow_dest, only --root: a link under the root still cannot lead out."""
    os.symlink(os.path.join(env.out, "dir"), os.path.join(env.root[2], "away"))
    refused(env, "root link", lambda: _job_failed_for(env, "/away", "d2", "outside the root"))


def test_an_absolute_destination_lands_under_the_root(env: Env) -> None:
    """OUT's own absolute path as a destination is mapped under d2's root."""
    src = os.path.join(env.allowed, "mapped.bin")
    with open(src, "wb") as f:
        f.write(b"mapped\n")

    def attempt() -> None:
        st, body = env.submit([src], ["d2"], dest="/" + os.path.join(env.out, "dir"), wait=True)
        assert st == 200 and body["state"] == "done", body
        landed = os.path.join(env.root[2], env.out.lstrip("/"), "dir", "mapped.bin")
        with open(landed, "rb") as f:
            assert f.read() == b"mapped\n"
    refused(env, "absolute dest", attempt)


@pytest.mark.parametrize("machine", ["d1", "d2"])
def test_a_planted_link_at_the_final_path_is_replaced_not_followed(env: Env,
                                                                   machine: str) -> None:
    i = int(machine[1])
    victim = env.victim(f"victim-{machine}")
    os.makedirs(os.path.join(env.root[i], "data"), exist_ok=True)
    final = os.path.join(env.root[i], "data", "planted.bin")
    if os.path.lexists(final):
        os.unlink(final)
    os.symlink(victim, final)
    src = os.path.join(env.allowed, "planted.bin")
    with open(src, "wb") as f:
        f.write(b"new content\n")

    def attempt() -> None:
        st, body = env.submit([src], [machine], dest="/data", wait=True)
        assert st == 200 and body["state"] == "done", body
        assert not os.path.islink(final)
        with open(final, "rb") as f:
            assert f.read() == b"new content\n"
    refused(env, "planted final link", attempt)


def _pull(env: Env, i: int, job: str, dest: str, size: int = 8) -> tuple[int, Any]:
    body = {"job": job, "files": [{"file": 0, "dest": dest, "size": size,
                                   "xxh3": "0123456789abcdef"}],
            "fetches": [{"file": 0, "chunk": 0, "offset": 0, "size": size,
                         "xxh3": "0123456789abcdef", "peer": "127.0.0.1:1",
                         "peer_name": "d0"}]}
    raw = env.daemon(i)
    try:
        return raw.json("POST", "/daemon/pull", body)
    finally:
        raw.close()


def _pack(env: Env, i: int, job: str, dest: str) -> tuple[int, Any]:
    # An empty file hashes to 2d06800538d394c2: this pack would install, if allowed.
    body = {"job": job, "file": {"file": 0, "dest": dest, "size": 0,
                                 "xxh3": "2d06800538d394c2"},
            "chunk_size": 65536, "notify": "", "last": True, "files_total": 1}
    raw = env.daemon(i)
    try:
        return raw.json("POST", "/daemon/pack", body)
    finally:
        raw.close()


def test_a_planted_link_at_the_temp_path_is_never_written_through(env: Env) -> None:
    """A compromised center names the job, so the temp name is predictable: plant it."""
    victim = env.victim("victim-temp")
    d = os.path.join(env.root[2], "data")
    os.makedirs(d, exist_ok=True)
    temp = os.path.join(d, ".t.bin.fdship-FZTEMP-0.part")
    os.symlink(victim, temp)

    def attempt() -> None:
        st, body = _pull(env, 2, "FZTEMP", "/data/t.bin")
        assert st == 200, body
        # The link was removed and a fresh file made in its place (or already dropped
        # again with the job): never written through.
        wait_for("the planted link gone", lambda: not os.path.islink(temp), timeout=10)
    refused(env, "planted temp link", attempt)


@pytest.mark.parametrize("dest", ["../x", "data/x", "/data/../../x", "/data/x\0y", "/",
                                  "/data/", "/data/.."])
@pytest.mark.parametrize("via", ["pull", "pack"])
def test_hostile_destinations_from_the_center_are_refused(env: Env, dest: str,
                                                          via: str) -> None:
    before = {p for p in os.listdir(env.base)}

    def attempt() -> None:
        if via == "pull":
            st, body = _pull(env, 2, "FZDEST", dest)
            assert st == 200 and body["accepted"] == 0, body  # nacked as a local failure
        else:
            st, body = _pack(env, 2, "FZDEST", dest)
            assert st == 200, body
            time.sleep(0.3)  # the pack runs in the background and reports to the center
        assert {p for p in os.listdir(env.base)} == before
        assert not os.path.exists(os.path.join(env.base, "x"))
    refused(env, f"{via} {dest!r}", attempt)


def test_an_allowed_directory_swapped_for_a_link_after_start(env: Env) -> None:
    """allow_dest was resolved at start; ROOT1/data replaced by a link to OUT is refused."""
    data = os.path.join(env.root[1], "data")
    moved = data + ".real"
    os.rename(data, moved)
    os.symlink(os.path.join(env.out, "dir"), data)
    try:
        for via in ("pull", "pack"):
            def attempt(via: str = via) -> None:
                if via == "pull":
                    st, body = _pull(env, 1, "FZSWAP", "/data/swapped.bin")
                    assert st == 200 and body["accepted"] == 0, body
                else:
                    st, _ = _pack(env, 1, "FZSWAP2", "/data/swapped.bin")
                    assert st == 200
                    time.sleep(0.3)
            refused(env, f"swapped allowed dir ({via})", attempt)
    finally:
        os.unlink(data)
        os.rename(moved, data)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _exchange(a: str, b: str) -> None:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE); two renames where missing."""
    if hasattr(_libc, "renameat2"):
        if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:
            return
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)


def test_a_directory_swapped_for_a_link_while_staging_and_installing(env: Env) -> None:
    """A local user swaps ROOT2/race/sub between a real directory and a link to OUT/dir as
    fast as a thread can, while pulls (which create the temp file) and packs (which create
    and install an empty file) name destinations under it: the daemon's path check may pass
    on a real directory and the write come a moment later, but the write goes through the
    directory descriptors it walked, so nothing ever lands in OUT."""
    race = os.path.join(env.root[2], "race")
    sub, other = os.path.join(race, "sub"), os.path.join(race, "sub.other")
    os.makedirs(sub)
    os.symlink(os.path.join(env.out, "dir"), other)
    stop = threading.Event()
    swaps = [0]
    errors: list[OSError] = []

    def swapper() -> None:
        deadline = time.monotonic() + 30
        try:
            while not stop.is_set() and time.monotonic() < deadline and swaps[0] < 10_000_000:
                _exchange(sub, other)
                swaps[0] += 1
        except OSError as e:  # surfaced below, never lost in the thread
            errors.append(e)

    th = threading.Thread(target=swapper, daemon=True)
    th.start()
    attempts = 0
    nacked = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and attempts < 80:
            job = f"FZRACE{attempts}"
            TALLY.tried += 1
            if attempts % 2:
                st, body = _pack(env, 2, job, f"/race/sub/e{attempts}.bin")
            else:
                st, body = _pull(env, 2, job, f"/race/sub/p{attempts}.bin")
            # Never a 500: when os.path.realpath in the daemon's path check meets
            # the link turning back into a directory (EINVAL), that is a refusal
            # of this destination with a sentence (a nack), not a server error.
            assert st == 200, (st, body)
            nacked += attempts % 2 == 0 and body["accepted"] == 0
            attempts += 1
            TALLY.rejected += 1  # counted as refused once OUT is found unchanged below
        time.sleep(1.0)  # packs run in the background: let the last ones finish
    finally:
        stop.set()
        th.join(10)
    assert not errors, errors
    assert swaps[0] > 100 and attempts >= 10, (swaps, attempts)
    env.intact()
    # What was installed is inside the root, in whichever name the real directory has.
    real = sub if not os.path.islink(sub) else other
    landed = [n for n in os.listdir(real) if n.startswith("e")]
    print(f"race: swaps={swaps[0]} requests={attempts} installed={len(landed)} "
          f"pulls refused={nacked}")
    os.unlink(sub if real == other else other)


# ---------------------------------------------------------------------- download


@pytest.mark.parametrize("query", [
    "job=../../OUT/secret&file=0&chunk=0", "job=..%2f..%2fOUT&file=0&chunk=0",
    "job=%2e%2e&file=0&chunk=0", "job=.&file=0&chunk=0", "job=/etc/passwd&file=0&chunk=0",
    "job=a%00b&file=0&chunk=0", "job=pending&file=0&chunk=0", "job=jobs&file=0&chunk=0",
    "job=FZTEMP&file=0&chunk=0", "job=FZTEMP&file=-1&chunk=0", "job=FZTEMP&file=0&chunk=-1",
    "job=FZTEMP&file=0x0&chunk=0", "job=FZTEMP&file=0&chunk=99999999999999999",
    "job=FZTEMP&file=0&chunk=0&chunk=../../x", "file=0&chunk=0", "path=/etc/passwd"])
def test_download_serves_only_held_chunks_by_id(env: Env, query: str) -> None:
    def attempt() -> None:
        for i in range(3):
            raw = env.daemon(i)
            try:
                st, data = raw.send("GET", "/daemon/download?" + query)
            finally:
                raw.close()
            assert st in (400, 404), (i, st, data[:200])
            assert SECRET not in data
            assert "error" in json.loads(data)
    refused(env, query, attempt)


def test_escape_tally(env: Env) -> None:
    """Every attempt counted above was refused (the docs quote this tally)."""
    assert TALLY.tried > 0 and TALLY.rejected == TALLY.tried, TALLY
