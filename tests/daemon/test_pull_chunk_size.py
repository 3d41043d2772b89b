"""A pull that stages several files lays them all out by the job's chunk size.

Seen in a full test run: a job of a 690 KiB file and a 166 KiB one, 256 KiB
chunks.  A pull after the center restarted carried chunk 0 of the small file
first; its daemon took that chunk's length (the whole small file) for the
job's chunk size, so the big file's existing staging (256 KiB chunks) no
longer matched the request and the machine failed with "the new request
differs".  The center now sends the chunk size with every pull; for a center
that does not, the daemon only trusts what the fetches prove.  Real daemon,
real store and files, real fetches from a real serving store over loopback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fdship import protocol as P
from fdship.daemon.store import Snapshot
from tests.daemon.conftest import run, serving, write_random
from tests.daemon.test_serve_fetch import StoreFactory
from tests.daemon.test_stream_through import JOB, daemon_p, until

KiB = 1024
CS = 256 * KiB


def fetch(snap: Snapshot, file: int, chunk: int, peer: str) -> P.Fetch:
    off = chunk * CS
    return P.Fetch(file=file, chunk=chunk, offset=off, size=min(CS, snap.size - off),
                   xxh3=snap.chunks[chunk], peer=peer, peer_name="up")


def staged(snap: Snapshot, file: int, name: str) -> P.StagedFile:
    return P.StagedFile(file=file, dest=f"/{name}", size=snap.size, xxh3=snap.xxh3)


@pytest.mark.parametrize("center_sends_it", [True, False], ids=["sent", "older center"])
def test_a_small_files_chunk_first_does_not_change_the_jobs_chunk_size(
        store_factory: StoreFactory, tmp_path: Path, center_sends_it: bool) -> None:
    up = store_factory("up")
    big_data = write_random(tmp_path / "big.bin", 690 * KiB + 126, 1)  # 3 chunks
    small_data = write_random(tmp_path / "small.bin", 166 * KiB, 2)  # 1 chunk, shorter than CS
    big, small = (up.snapshot(str(tmp_path / n), CS) for n in ("big.bin", "small.bin"))
    up.commit_snapshots(JOB, [big.key, small.key])  # files 0 and 1 of the job
    files = (staged(big, 0, "big.bin"), staged(small, 1, "small.bin"))
    cs = CS if center_sends_it else 0

    async def main() -> None:
        async with serving(up) as (peer, _), daemon_p(tmp_path) as (d, _p):
            # First pull: chunk 1 of the big file; its staging is made with 256 KiB chunks.
            await d.pull(P.PullRequest(job=JOB, files=files[:1], fetches=(fetch(big, 0, 1, peer),),
                                       chunk_size=cs))
            # The next pull names the small file's only chunk first, then the big
            # file's chunk 0, as a batch after a center restart did.
            n = await d.pull(P.PullRequest(
                job=JOB, files=(files[1], files[0]),
                fetches=(fetch(small, 1, 0, peer), fetch(big, 0, 0, peer)), chunk_size=cs))
            assert n == 2
            await d.pull(P.PullRequest(job=JOB, files=files[:1], fetches=(fetch(big, 0, 2, peer),),
                                       chunk_size=cs))
            await until(lambda: not d.active, "the fetches to end")
            acks = {(a.file, a.chunk): a for a in d.acks}
            assert {k: a.ok for k, a in acks.items()} == {
                (0, 0): True, (0, 1): True, (0, 2): True, (1, 0): True}, acks
            st0, st1 = d.store.staging(JOB, 0), d.store.staging(JOB, 1)
            assert st0 is not None and st1 is not None
            assert st0.chunk_size == st1.chunk_size == CS
            assert os.pread(st0.write_fd, big.size, 0) == big_data
            assert os.pread(st1.write_fd, small.size, 0) == small_data

    run(main())


def test_pull_chunk_size_on_the_wire() -> None:
    req = P.PullRequest(job="j", files=(), fetches=(), chunk_size=CS)
    assert P.PullRequest.from_json(req.to_json()).chunk_size == CS
    old = req.to_json()
    del old["chunk_size"]  # a center from before it was sent
    assert P.PullRequest.from_json(old).chunk_size == 0
    for bad in (-1, 2 * 1024**3, "256K"):
        with pytest.raises(P.ProtocolError, match="chunk_size"):
            P.PullRequest.from_json({**req.to_json(), "chunk_size": bad})
