"""Benchmark of the center's REDO log: what group commit buys on this disk.

Appends ~200-byte records through the real ``fdship.center.redolog.RedoLog``
(real files, real fdatasync) in several modes -- one fsync per record, then
one per group of N records as the center does once per event-loop turn -- and
prints records/s, fsync count and fsync latency (median, p99) for each.  The
numbers depend on the disk and on whatever else the machine is doing: they are
figures to read, not goals (no test asserts on them).

    python tests/benchmarks/redolog.py                  # temp dir on the default temp filesystem
    python tests/benchmarks/redolog.py --dir /var/lib   # measure the disk the center will use
    python tests/benchmarks/redolog.py --seconds 2 --markdown
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout without installing: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PAYLOAD_BYTES = 200


def filesystem_of(path: str) -> str:
    """'ext4 on /dev/vda' for the mount holding path (best effort, Linux)."""
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(
                        best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_mode(parent: str, group: int, seconds: float, max_records: int) -> dict[str, float]:
    """Append records, syncing after every ``group`` of them, for ``seconds``.

    ``group`` 0 never syncs: the cost of framing and ``write`` alone, a ceiling.
    """
    from fdship.center.redolog import RedoLog

    workdir = tempfile.mkdtemp(prefix="redolog-bench-", dir=parent)
    try:
        log = RedoLog(workdir)
        log.open()
        payload = (b'{"t":"ChunkStored","job":"j-000123","host":"bidder-17",'
                   b'"file":3,"chunk":42,"pad":"') + b"x" * 200
        payload = payload[: PAYLOAD_BYTES - 2] + b'"}'
        base = log.fsync_count
        latencies: list[float] = []
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while n < max_records and time.perf_counter() < deadline:
            for _ in range(group or 100):
                log.append(payload)
            n += group or 100
            if group:
                log.sync()
                latencies.append(log.last_fsync_seconds)
        elapsed = time.perf_counter() - t0
        fsyncs = log.fsync_count - base
        log.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "group": group,
        "records": n,
        "seconds": elapsed,
        "records_per_s": n / elapsed,
        "fsyncs": fsyncs,
        "fsyncs_per_s": fsyncs / elapsed,
        "median_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="directory on the filesystem to measure (default: the temp dir)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="time budget per mode (default 4)")
    parser.add_argument("--max-records", type=int, default=200_000,
                        help="record budget per mode (default 200000)")
    parser.add_argument("--groups", default="1,10,100,0",
                        help="records per sync, comma separated; 0 = never sync "
                             "(default 1,10,100,0)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    parent = os.path.abspath(args.dir)
    groups = [int(g) for g in args.groups.split(",")]

    print(f"REDO log benchmark: {PAYLOAD_BYTES}-byte records, fdatasync, "
          f"{filesystem_of(parent)} ({parent}), {os.cpu_count()} CPUs, "
          f"up to {args.seconds:g} s per mode")
    rows = [run_mode(parent, g, args.seconds, args.max_records) for g in groups]
    head = ("records/sync", "records", "records/s", "fsyncs", "fsyncs/s",
            "fsync median ms", "fsync p99 ms")
    cells = [(f"{r['group']:.0f}" if r["group"] else "no sync", f"{r['records']:.0f}", f"{r['records_per_s']:,.0f}",
              f"{r['fsyncs']:.0f}", f"{r['fsyncs_per_s']:,.0f}", f"{r['median_ms']:.2f}",
              f"{r['p99_ms']:.2f}") for r in rows]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---:" for _ in head) + "|")
        for c in cells:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
        for c in cells:
            print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
