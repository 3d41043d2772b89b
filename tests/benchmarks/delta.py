"""Ship only what changed: bytes on the network and wall time, delta against full.

Starts a real center and 1 + N daemons on 127.0.0.1 (fdship.localcluster),
generates a text file of about ``--size`` MiB (lines of ~210 bytes: an id,
a campaign, a price, a features column), ships it to N targets in full, then
ships a series of new versions to the same destination, each target holding
the previous version:

* ``random``: ``--fraction`` of the lines, picked at random all over the file,
  rewritten in place (every byte after the line's id replaced, same length);
* ``field``: the same share of random lines, only the 8-byte price changed;
* ``contiguous``: the same share of lines, one contiguous run, rewritten;
* ``append``: the same share of lines appended at the end;
* ``full``: the last version again, to a fresh destination (nothing to reuse).

For each: wall time from submit to result, bytes on the network (full chunk
bodies fetched plus delta traffic in both directions: block hashes, sub-block
hashes, ranges), that over the bytes a full transfer moves (size x targets),
and how the chunks were obtained (taken whole from the old copy, patched with
ranges, fetched in full).  Every copy is checked against the source's xxh3.

    python tests/benchmarks/delta.py [--size 200] [--targets 10] [--chunk-size 4M]
                               [--fraction 0.01] [--rate 25M] [--json]

On loopback the network is free and eleven daemons share a couple of cores
and one disk, so wall time there mostly measures CPU and disk; ``--rate``
caps every daemon's upload and download to stand in for real links.

Nothing here asserts a speed: the machine may be shared; it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from array import array
from typing import Any

import xxhash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fdship.localcluster import LocalCluster

MiB = 1024 * 1024
ALNUM = b"abcdefghijklmnopqrstuvwxyz0123456789"


_POOL: list[bytes] = []


def _line(rng: random.Random, i: int) -> bytes:
    # Features are slices of one random pool: as varied as fresh random text
    # for the purpose (hashes differ everywhere) and much faster to make.
    if not _POOL:
        _POOL.append(bytes(random.Random(7).choices(ALNUM, k=1 << 20)))
    n = 150 + rng.randrange(40)
    at = rng.randrange(len(_POOL[0]) - n)
    return (b"%010d\tcampaign-%04d\tprice=%08.4f\tfeatures=%s\n"
            % (i, i % 977, rng.random() * 100, _POOL[0][at:at + n]))


def generate(path: str, size: int, seed: int = 1) -> array:
    """Write lines until ``size`` bytes; return the offset of every line start."""
    rng = random.Random(seed)
    offsets = array("Q")
    pos = 0
    i = 0
    with open(path, "wb") as f:
        batch: list[bytes] = []
        blen = 0
        while pos + blen < size:
            line = _line(rng, i)
            offsets.append(pos + blen)
            batch.append(line)
            blen += len(line)
            i += 1
            if blen >= MiB:
                f.write(b"".join(batch))
                pos += blen
                batch, blen = [], 0
        f.write(b"".join(batch))
    return offsets


def rewrite(path: str, offsets: array, lines: list[int], seed: int, field_only: bool) -> int:
    """Rewrite the given lines in place (same length); return bytes changed."""
    rng = random.Random(seed)
    changed = 0
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        for n in lines:
            start = offsets[n]
            end = offsets[n + 1] if n + 1 < len(offsets) else size
            old = os.pread(fd, end - start, start)
            if field_only:
                at = old.index(b"price=") + 6
                new = old[:at] + b"%08.4f" % (rng.random() * 100) + old[at + 8:]
            else:
                # Everything after the id column: new values, the same length.
                keep = old.index(b"\t")
                head = old[:keep] + b"\tcampaign-%04d\tprice=%08.4f\tfeatures=" % (
                    rng.randrange(10000), rng.random() * 100)
                new = head + bytes(rng.choices(ALNUM, k=len(old) - len(head) - 1)) + b"\n"
            assert len(new) == len(old)
            os.pwrite(fd, new, start)
            changed += sum(1 for a, b in zip(old, new) if a != b)
    finally:
        os.close(fd)
    return changed


def append(path: str, offsets: array, count: int, seed: int) -> None:
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        for k in range(count):
            line = _line(rng, len(offsets))
            offsets.append(size)
            f.write(line)
            size += len(line)


def xxh3_file(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def counters(c: LocalCluster) -> dict[str, Any]:
    out: dict[str, Any] = {"received": 0, "delta": 0, "served_source": 0, "local": 0,
                           "patched": 0, "full": 0}
    for i, d in enumerate(c.daemons):
        st = c.request("GET", d.url + "/daemon/status")
        if i == 0:
            out["served_source"] = st["bytes_served"]
        out["received"] += st["bytes_received"]
        ds = st.get("delta", {})
        out["delta"] += ds.get("bytes_network", 0)
        out["local"] += ds.get("chunks_local", 0)
        out["patched"] += ds.get("chunks_patched", 0)
        out["full"] += ds.get("chunks_full", 0)
    return out


def peak_rss(c: LocalCluster) -> int:
    peak = 0
    for p in c.daemons:
        if p.popen is None:
            continue
        try:
            with open(f"/proc/{p.popen.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return peak


def ship(c: LocalCluster, path: str, targets: list[str], dest: str) -> dict[str, Any]:
    before = counters(c)
    t0 = time.monotonic()
    res = c.submit([path], targets, dest=dest)
    wall = time.monotonic() - t0
    if res["state"] != "done":
        raise SystemExit(f"job failed: {json.dumps(res, indent=1)[:3000]}")
    after = counters(c)
    want = xxh3_file(path)
    for i in range(1, len(c.daemons)):
        copy = os.path.join(c.root(i), dest.lstrip("/"), os.path.basename(path))
        if xxh3_file(copy) != want:
            raise SystemExit(f"copy on d{i} differs from the source")
    size = os.path.getsize(path)
    net = (after["received"] - before["received"]) + (after["delta"] - before["delta"])
    return {"size": size, "seconds": round(wall, 2), "network_bytes": net,
            "ratio": round(net / (size * len(targets)), 4),
            "source_served": after["served_source"] - before["served_source"],
            "chunks_local": after["local"] - before["local"],
            "chunks_patched": after["patched"] - before["patched"],
            "chunks_full": after["full"] - before["full"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=200, help="file size in MiB")
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--chunk-size", default="4M")
    ap.add_argument("--fraction", type=float, default=0.01, help="share of lines changed")
    ap.add_argument("--rate", default="",
                    help="cap every daemon's upload and download (e.g. 25M bytes/s) to stand "
                         "in for a real network; default: loopback, no cap")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    caps = ["--upload-rate", args.rate, "--download-rate", args.rate] if args.rate else []
    c = LocalCluster(args.targets + 1, center_args=["--chunk-size", args.chunk_size],
                     daemon_args={i: caps for i in range(args.targets + 1)}, keep=args.keep)
    results: dict[str, Any] = {}
    try:
        c.start(wait=60)
        src = os.path.join(c.tmp, "src")
        os.makedirs(src)
        path = os.path.join(src, "features.txt")
        t = time.monotonic()
        offsets = generate(path, args.size * MiB)
        nlines = len(offsets)
        print(f"generated {os.path.getsize(path) / MiB:.1f} MiB, {nlines} lines in "
              f"{time.monotonic() - t:.1f} s; {args.targets} targets, chunks {args.chunk_size}"
              + (f", every daemon capped at {args.rate}B/s up and down" if args.rate else ""),
              file=sys.stderr)
        targets = [d.name for d in c.daemons[1:]]
        k = max(1, int(nlines * args.fraction))
        rng = random.Random(42)
        steps: list[tuple[str, Any]] = [
            ("full (nothing to reuse)", None),
            ("random lines rewritten", lambda: rewrite(path, offsets,
                                                       rng.sample(range(nlines), k), 1, False)),
            ("random lines, price field", lambda: rewrite(path, offsets,
                                                          rng.sample(range(nlines), k), 2,
                                                          True)),
            ("contiguous lines rewritten", lambda: rewrite(
                path, offsets, list(range(nlines // 3, nlines // 3 + k)), 3, False)),
            ("lines appended", lambda: append(path, offsets, k, 4)),
        ]
        for name, change in steps:
            if change is not None:
                change()
            r = ship(c, path, targets, "/srv/models")
            results[name] = r
            print(f"{name:<28} {r['seconds']:7.2f} s  network {r['network_bytes'] / MiB:8.1f} "
                  f"MiB = {r['ratio'] * 100:6.2f}% of a full transfer  (chunks: "
                  f"{r['chunks_local']} local, {r['chunks_patched']} patched, "
                  f"{r['chunks_full']} full)", file=sys.stderr)
        r = ship(c, path, targets, "/srv/fresh")
        results["full again (fresh dest)"] = r
        print(f"{'full again (fresh dest)':<28} {r['seconds']:7.2f} s  network "
              f"{r['network_bytes'] / MiB:8.1f} MiB = {r['ratio'] * 100:6.2f}%", file=sys.stderr)
        results["peak_rss_daemon_mib"] = round(peak_rss(c) / MiB, 1)
        print(f"peak RSS of a daemon: {results['peak_rss_daemon_mib']} MiB", file=sys.stderr)
    finally:
        c.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
