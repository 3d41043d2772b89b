"""Ship only what changed: reuse the target's old copy of a file, fetch only new bytes.

Where it sits: a target daemon's fetch of one chunk (``Daemon._fetch`` in
:mod:`fdship.daemon.agent`) first asks :class:`DeltaFetcher` whether the file
it is about to replace already holds that chunk's bytes; only what is left is
fetched in full by :mod:`fdship.daemon.fetch`.  Every daemon also answers the
peer side, ``POST /daemon/delta`` (:class:`DeltaHandler`), from the same
verified chunks :mod:`fdship.daemon.serve` hands out.

How one chunk goes (a new version usually keeps its offsets: edits in place
and appended lines do)::

    1. local   copy the old file's bytes at the chunk's offsets into the staging
               file (copy_file_range: in the kernel, no bytes through Python)
               and hash them: the chunk's xxh3 matches -> done, nothing fetched
    2. sums    send the peer the xxh3 of each 4 KiB block of what we have; it
               answers which blocks differ and, for those, the xxh3 of each
               256-byte sub-block
    3. ranges  fetch just the differing sub-blocks (merged into ranges) and
               write them over the old bytes
    4. verify  hash the chunk in the staging file: it must match the chunk's
               xxh3, or the chunk is fetched in full as if nothing had happened

The whole file is verified at pack time as always, so this can only ever save
bytes, never install a wrong one.  Why two levels: a file edited in place at
scattered lines dirties nearly every 4 MiB chunk and a good share of its 4 KiB
blocks, but few 256-byte sub-blocks; sending 256-byte hashes for *every*
block would cost 3% of the file in hashes alone, while sending them only for
the blocks that differ costs a fraction of that.  Figures in docs/benchmarks.md.

Bytes that crossed the network (hashes both ways and the fetched ranges) are
reported in the chunk's ack; a chunk taken entirely from the old copy is
acked with zero bytes and ``local`` set, so the center's byte counts (and the
source's egress) stay honest.  Memory stays bounded: one 1 MiB buffer per
operation, and answers at most a fraction of a chunk.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass
from urllib.parse import quote

import xxhash
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from fdship import protocol as P
from fdship.daemon.arrivals import Arrivals
from fdship.daemon.ratelimit import RateLimiter
from fdship.daemon.serve import STALL_TIMEOUT, ServeStats
from fdship.daemon.store import Store, check_job_id, hash_range
from fdship.errors import BadRequest, NotFound
from fdship.httpclient import cluster_ssl_context, peer_url
from fdship.web import BaseHandler

log = logging.getLogger("fdship.daemon.delta")

BLOCK = 4096  # first-level block compared by hash
SUB = 256  # second-level block: the unit actually fetched
IO = 1024 * 1024  # read buffer (a multiple of BLOCK)
# Fetch the chunk in full (zero-copy) rather than in ranges when more than
# this share of it differs.
MAX_RANGE_SHARE = 0.5
# The peer refuses to describe more sub-blocks than this many bytes of hashes
# (only reachable with very large chunk sizes): the target then fetches in full.
MAX_SUMS_REPLY = 8 * 1024 * 1024
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass
class DeltaStats:
    """Plain counters for /daemon/status and /metrics."""

    chunks_local: int = 0  # taken whole from the old copy: no network at all
    chunks_patched: int = 0  # old copy plus fetched ranges
    chunks_full: int = 0  # tried, then fetched in full (too different, or a mismatch)
    bytes_reused: int = 0  # chunk bytes that did not cross the network
    bytes_network: int = 0  # bytes this daemon sent and received for deltas

    def to_json(self) -> dict[str, int]:
        return {"chunks_local": self.chunks_local, "chunks_patched": self.chunks_patched,
                "chunks_full": self.chunks_full, "bytes_reused": self.bytes_reused,
                "bytes_network": self.bytes_network}


@dataclass
class DeltaResult:
    """What :meth:`DeltaFetcher.fetch` achieved for one chunk."""

    ok: bool  # the chunk is in the staging file, verified
    nbytes: int  # bytes that crossed the network trying (counted even when not ok)
    local: bool = False  # ok without any network traffic


# ---------------------------------------------------------------------- blocking helpers


def _read_full(fd: int, mv: memoryview, offset: int) -> int:
    """pread until ``mv`` is full or the file ends; return bytes read."""
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy ``length`` bytes at ``offset`` from ``src`` to the same offset of ``dst``
    in the kernel; return bytes copied (fewer if ``src`` ends)."""
    pos = 0
    while pos < length:
        try:
            n = os.copy_file_range(src, dst, length - pos, offset + pos, offset + pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, min(IO, length - pos), offset + pos)
            n = len(data)
            if n:
                os.pwrite(dst, data, offset + pos)
        if n == 0:
            break
        pos += n
    return pos


def block_sums(fd: int, offset: int, length: int, block: int = BLOCK) -> tuple[str, list[int]]:
    """(xxh3 hex of the range, xxh3 of each ``block`` of it) in one streaming pass."""
    buf = memoryview(bytearray(max(block, IO - IO % block)))
    whole = xxhash.xxh3_64()
    sums: list[int] = []
    digest = xxhash.xxh3_64_intdigest
    pos = 0
    while pos < length:
        n = _read_full(fd, buf[:min(len(buf), length - pos)], offset + pos)
        if n == 0:
            break
        piece = buf[:n]
        whole.update(piece)
        sums.extend(digest(piece[i:i + block]) for i in range(0, n, block))
        pos += n
    return whole.hexdigest(), sums


def peer_sums(fd: int, offset: int, length: int, theirs: tuple[int, ...], block: int,
              sub: int) -> bytes:
    """The peer's answer to a sums request: status byte, dirty-block bitmap, and the
    sub-block hashes of every block that differs from ``theirs``.

    Status 1 (and nothing else) means "too many to describe": fetch in full.
    """
    nblocks = (length + block - 1) // block
    bitmap = bytearray((nblocks + 7) // 8)
    subs: list[int] = []
    digest = xxhash.xxh3_64_intdigest
    buf = memoryview(bytearray(max(block, IO - IO % block)))
    pos = 0
    limit = MAX_SUMS_REPLY // 8
    while pos < length:
        n = _read_full(fd, buf[:min(len(buf), length - pos)], offset + pos)
        if n == 0:
            break
        for i in range(0, n, block):
            b = buf[i:min(i + block, n)]
            idx = (pos + i) // block
            if idx < len(theirs) and digest(b) == theirs[idx]:
                continue
            bitmap[idx >> 3] |= 1 << (idx & 7)
            subs.extend(digest(b[j:j + sub]) for j in range(0, len(b), sub))
            if len(subs) > limit:
                return b"\x01"
        pos += n
    return b"\x00" + bytes(bitmap) + struct.pack(f">{len(subs)}Q", *subs)


def dirty_ranges(fd: int, offset: int, length: int, reply: bytes, block: int,
                 sub: int) -> list[tuple[int, int]] | None:
    """Ranges (relative to the chunk) whose sub-blocks differ between our bytes and
    the peer's, merged where adjacent; None if the reply does not fit the chunk."""
    nblocks = (length + block - 1) // block
    nmap = (nblocks + 7) // 8
    if len(reply) < 1 + nmap or reply[0] != 0:
        return None
    bitmap = reply[1:1 + nmap]
    dirty = [i for i in range(nblocks) if bitmap[i >> 3] & (1 << (i & 7))]
    # Sub-blocks the reply must describe: every sub-block of every dirty block.
    spans = [(i * block, min(block, length - i * block)) for i in dirty]
    want_n = sum((n + sub - 1) // sub for _, n in spans)
    if len(reply) != 1 + nmap + 8 * want_n:
        return None
    theirs = struct.unpack_from(f">{want_n}Q", reply, 1 + nmap)
    digest = xxhash.xxh3_64_intdigest
    ranges: list[tuple[int, int]] = []
    buf = bytearray(block)
    k = 0
    for start, blen in spans:
        mv = memoryview(buf)[:blen]
        got = _read_full(fd, mv, offset + start)
        for j in range(0, blen, sub):
            slen = min(sub, blen - j)
            want = theirs[k]
            k += 1
            if j + slen <= got and digest(mv[j:j + slen]) == want:
                continue
            off = start + j
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + slen)
            else:
                ranges.append((off, slen))
    return ranges


def open_old(path: str) -> tuple[int, int] | None:
    """(fd, size) of the regular file currently at ``path``, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        os.close(fd)
        return None
    return fd, st.st_size


# ---------------------------------------------------------------------- target side


class DeltaFetcher:
    """The target's side: try to build a chunk from the old copy plus fetched ranges."""

    def __init__(self, token: str = "", limiter: RateLimiter | None = None,
                 connect_timeout: float = 1.0) -> None:
        self.token = token
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        # The daemon's connect_timeout, as for full fetches: a peer that cannot
        # be reached this fast is not worth a delta, and the full fetch that
        # follows reports it.
        self.connect_timeout = connect_timeout
        self.stats = DeltaStats()

    async def fetch(self, job: str, f: P.Fetch, final_path: str, write_fd: int,
                    timeout: float) -> DeltaResult | None:
        """None: nothing to reuse here (no old file, or it ends before this chunk)."""
        old = open_old(final_path)
        if old is None:
            return None
        old_fd, old_size = old
        if old_size <= f.offset:
            os.close(old_fd)
            return None
        loop = asyncio.get_running_loop()
        try:
            # Our own reference to the staging file (the job may be dropped meanwhile).
            fd = os.dup(write_fd)
        except OSError:
            os.close(old_fd)
            return None
        spent = 0
        try:
            whole, sums = await loop.run_in_executor(None, self._local, old_fd, fd, f)
            if whole == f.xxh3:
                self.stats.chunks_local += 1
                self.stats.bytes_reused += f.size
                return DeltaResult(True, 0, local=True)
            body = struct.pack(f">{len(sums)}Q", *sums)
            q = (f"job={quote(job, safe='')}&file={f.file}&chunk={f.chunk}")
            reply = await self._post(f.peer, f"{q}&op=sums&block={BLOCK}&sub={SUB}", body,
                                     timeout)
            spent += len(body) + len(reply)
            ranges = await loop.run_in_executor(None, dirty_ranges, fd, f.offset, f.size,
                                                reply, BLOCK, SUB)
            need = sum(n for _, n in ranges) if ranges is not None else f.size
            if ranges is None or need > MAX_RANGE_SHARE * f.size:
                self.stats.chunks_full += 1
                return DeltaResult(False, spent)
            if ranges:
                req = b"".join(struct.pack(">II", o, n) for o, n in ranges)
                data = await self._post(f.peer, f"{q}&op=ranges", req, timeout)
                spent += len(req) + len(data)
                if len(data) != need:
                    self.stats.chunks_full += 1
                    return DeltaResult(False, spent)
                await loop.run_in_executor(None, _write_ranges, fd, f.offset, ranges, data)
            got = await loop.run_in_executor(None, hash_range, fd, f.offset, f.size)
            if got != f.xxh3:
                log.info("job=%s chunk %d/%d rebuilt from the old copy hashed to %s, not %s; "
                         "fetching it in full", job, f.file, f.chunk, got, f.xxh3)
                self.stats.chunks_full += 1
                return DeltaResult(False, spent)
            self.stats.chunks_patched += 1
            self.stats.bytes_reused += f.size - need
            return DeltaResult(True, spent)
        except _Skip as e:
            log.debug("job=%s chunk %d/%d: no delta from %s (%s)", job, f.file, f.chunk,
                      f.peer_name, e)
            self.stats.chunks_full += 1
            return DeltaResult(False, spent)
        except OSError as e:
            # Our side could not read or write: the full fetch will say so properly.
            log.info("job=%s chunk %d/%d: delta failed locally (%s); fetching in full", job,
                     f.file, f.chunk, e.strerror or e)
            self.stats.chunks_full += 1
            return DeltaResult(False, spent)
        finally:
            self.stats.bytes_network += spent
            os.close(fd)
            os.close(old_fd)

    @staticmethod
    def _local(old_fd: int, fd: int, f: P.Fetch) -> tuple[str, list[int]]:
        _copy_range(old_fd, fd, f.offset, f.size)
        return block_sums(fd, f.offset, f.size)

    async def _post(self, peer: str, query: str, body: bytes, timeout: float) -> bytes:
        url = f"{peer_url(peer)}{P.DAEMON_DELTA}?{query}"
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        req = HTTPRequest(url, method="POST", body=body, headers=headers,
                          request_timeout=timeout, connect_timeout=self.connect_timeout,
                          ssl_options=cluster_ssl_context() if url.startswith("https:") else
                          None, decompress_response=False)
        try:
            resp = await AsyncHTTPClient().fetch(req, raise_error=False)
        except OSError as e:
            raise _Skip(f"cannot reach {peer}: {e.strerror or e}") from None
        except HTTPClientError as e:
            # raise_error=False turns only HTTP statuses into answers: a connect or
            # request timeout (599) still raises, and must cost the delta, not the fetch.
            raise _Skip(f"no answer from {peer}: {e}") from None
        if resp.code != 200:
            raise _Skip(f"HTTP {resp.code}")
        data = resp.body or b""
        if self.limiter is not None:
            await self.limiter.acquire(len(data))
        return data


class _Skip(Exception):
    """The peer could not help with a delta; fetch the chunk in full instead."""


def _write_ranges(fd: int, offset: int, ranges: list[tuple[int, int]], data: bytes) -> None:
    mv = memoryview(data)
    pos = 0
    for off, n in ranges:
        part = mv[pos:pos + n]
        w = 0
        while w < n:
            w += os.pwrite(fd, part[w:], offset + off + w)
        pos += n


# ---------------------------------------------------------------------- peer side


class DeltaHandler(BaseHandler):
    """POST /daemon/delta?job=J&file=F&chunk=C&op=sums|ranges (binary bodies).

    ``op=sums&block=B&sub=S``: the body is the caller's xxh3 of each B-byte block
    of the chunk (big-endian u64); the answer is a status byte, a bitmap of the
    blocks that differ, and the S-byte sub-block hashes of each of those.
    ``op=ranges``: the body is (offset, length) pairs (big-endian u32) inside the
    chunk, ascending and disjoint; the answer is their bytes, concatenated.

    A center that relays a chunk through a daemon still fetching it (see
    :mod:`fdship.daemon.arrivals`) sends the downstream's delta request there
    too.  Block sums exist only for a whole, verified chunk, so such a request
    waits for the arrival to end instead of a 404, which would make the
    downstream fetch the whole chunk though it holds most of it already.  The
    wait ends after ``stall_timeout`` seconds without news from the fetch; a
    failed or stalled arrival then answers 404 as a chunk not held does.
    """

    def initialize(self, store: Store, limiter: RateLimiter | None = None,
                   stats: ServeStats | None = None, arrivals: Arrivals | None = None,
                   stall_timeout: float = STALL_TIMEOUT) -> None:
        self.store = store
        self.arrivals = arrivals
        self.stall_timeout = stall_timeout
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.stats = stats if stats is not None else ServeStats()

    def _int_arg(self, name: str, default: int | None = None) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            if default is not None:
                return default
            raise BadRequest(f"missing query parameter '{name}'")
        if not raw.isdigit() or len(raw) > 12:
            raise BadRequest(f"query parameter '{name}' must be a non-negative integer")
        return int(raw)

    async def post(self) -> None:
        job = self.get_query_argument("job", None) or ""
        check_job_id(job)
        file, chunk = self._int_arg("file"), self._int_arg("chunk")
        op = self.get_query_argument("op", "")
        arrival = self.arrivals.get((job, file, chunk)) if self.arrivals is not None else None
        if arrival is not None:
            await arrival.ended(self.stall_timeout)  # then the store says whether it is held
        src = self.store.chunk_source(job, file, chunk)
        if src is None:
            raise NotFound(f"chunk {chunk} of job {job} file {file} is not held verified by "
                           "this daemon")
        fd = os.dup(src[0])
        offset, length = src[1], src[2]
        body = self.request.body
        loop = asyncio.get_running_loop()
        try:
            if op == "sums":
                block, sub = self._int_arg("block", BLOCK), self._int_arg("sub", SUB)
                if not 64 <= sub <= block <= 1024 * 1024 or block % sub:
                    raise BadRequest("block and sub must satisfy 64 <= sub <= block <= 1 MiB "
                                     "with sub dividing block")
                nblocks = (length + block - 1) // block
                if len(body) % 8 or len(body) // 8 > nblocks:
                    raise BadRequest(f"sums body must hold at most {nblocks} 8-byte hashes")
                theirs = struct.unpack(f">{len(body) // 8}Q", body)
                reply = await loop.run_in_executor(None, peer_sums, fd, offset, length,
                                                   theirs, block, sub)
                self.stats.bytes_served += len(reply)
                self.set_header("Content-Type", "application/octet-stream")
                self.finish(reply)
            elif op == "ranges":
                await self._ranges(fd, offset, length, body)
            else:
                raise BadRequest("op must be sums or ranges")
        finally:
            os.close(fd)

    async def _ranges(self, fd: int, offset: int, length: int, body: bytes) -> None:
        if len(body) % 8:
            raise BadRequest("ranges body must be (offset, length) pairs of 4-byte integers")
        pairs = list(struct.iter_unpack(">II", body))
        end = 0
        for off, n in pairs:
            if off < end or n == 0 or off + n > length:
                raise BadRequest("ranges must be ascending, disjoint, non-empty and inside "
                                 "the chunk")
            end = off + n
        total = sum(n for _, n in pairs)
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Length", str(total))
        pending = 0
        for off, n in pairs:
            pos = 0
            while pos < n:
                step = min(IO, n - pos)
                data = os.pread(fd, step, offset + off + pos)
                if not data:
                    raise NotFound("the chunk ended early")  # pragma: no cover
                if self.limiter is not None:
                    await self.limiter.acquire(len(data))
                self.write(data)
                pending += len(data)
                pos += len(data)
                self.stats.bytes_served += len(data)
                if pending >= IO:  # bounded: never buffer more than ~1 MiB
                    await self.flush()
                    pending = 0
        self.finish()
