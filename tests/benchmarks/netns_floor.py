"""What moving the bytes alone costs on the shaped namespace network: a CPU floor.

Usage (as root, from the repository root)::

    python tests/benchmarks/netns_floor.py --targets 40 --size 64 --rate 80
    python tests/benchmarks/netns_floor.py --targets 20,40 --repeat 3

The swarm benchmark (``swarm_netns.py``) reports how many of the machine's
cores fdship used; on two cores, with 40 hosts' traffic all emulated by one
kernel, that can be the limit rather than the links.  This script measures how
much of that CPU any tool would pay: the same bytes over the same links
(``tests/netns.py``: tbf on both ends of every veth, one bridge) moved by the
leanest receiver Python can be.  Host 0 sends the file with ``sendfile`` to
host 1, which writes each piece to a file, hashes it (xxh3, as fdship
verifies) and passes it on to host 2, and so on: a chain, so every target
receives the file once and every host but the last sends it once, as in a
swarm where the source sends about one copy.  The receivers are plain
blocking loops (``recv_into`` into one buffer, ``SO_RCVLOWAT`` batches as
fdship's fetches use), no event loop, no HTTP, no control messages.

Reported: the chain's wall time over S/B, and the CPU seconds (user, system)
the relays used from their first byte to their last, summed, against which
the ``cores used by the tool`` of a swarm run of the same size can be read.
A chain's wall time is S/B plus one pipeline delay per hop; it is not a
schedule fdship could use (a slow or dead host stops everyone behind it),
only a floor for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.netns import Cluster  # noqa: E402

MiB = 1024 * 1024
PORT = 9000

# Both child programs connect to the next host, which may not listen yet.
CONNECT = r"""
import socket, sys, time


def connect(host):
    for _ in range(200):
        try:
            return socket.create_connection((host, %(port)d))
        except OSError:
            time.sleep(0.05)
    sys.exit("cannot reach the next host " + host)
""" % {"port": PORT}

# One relay: accept from the previous host, pass every piece on to the next.
RELAY = CONNECT + r"""
import json, os, resource, xxhash
me, nxt, out, lowat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((me, %(port)d))
ls.listen(1)
print("ready", flush=True)
c, _ = ls.accept()
r0 = resource.getrusage(resource.RUSAGE_SELF)
if lowat > 1:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
d = connect(nxt) if nxt != "-" else None
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
buf = memoryview(bytearray(1 << 20))
h = xxhash.xxh3_64()
pos = reads = 0
while True:
    n = c.recv_into(buf)
    if not n:
        break
    reads += 1
    v = buf[:n]
    os.pwrite(fd, v, pos)
    h.update(v)
    pos += n
    if d is not None:
        d.sendall(v)
if d is not None:
    d.close()
os.close(fd)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"user": r.ru_utime - r0.ru_utime, "sys": r.ru_stime - r0.ru_stime,
                  "bytes": pos, "reads": reads, "xxh3": h.hexdigest()}), flush=True)
""" % {"port": PORT}

SEND = CONNECT + r"""
import os
nxt, path = sys.argv[1], sys.argv[2]
d = connect(nxt)
with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    off = 0
    while off < size:
        off += os.sendfile(d.fileno(), f.fileno(), off, size - off)
d.close()
"""


def chain(targets: int, size_mib: int, rate: float, lowat: int) -> dict[str, float]:
    """One chain run on a cluster of its own; the cluster is always torn down."""
    import xxhash

    base = tempfile.mkdtemp(prefix="fdship-floor-")
    cl = Cluster(targets + 1, rate_mbit=rate, prefix="ffl")
    procs: list[subprocess.Popen[str]] = []
    try:
        cl.start()
        hosts = cl.hosts
        src = os.path.join(base, "src.bin")
        want = xxhash.xxh3_64()
        with open(src, "wb") as f:
            for _ in range(size_mib):
                block = os.urandom(MiB)
                want.update(block)
                f.write(block)
        # The last relay first, so each one's next host is listening when it connects.
        for i in range(targets, 0, -1):
            nxt = hosts[i + 1].addr if i < targets else "-"
            p = hosts[i].popen([sys.executable, "-c", RELAY, hosts[i].addr, nxt,
                                os.path.join(base, f"out{i}"), str(lowat)],
                               stdout=subprocess.PIPE, text=True)
            procs.append(p)
            line = p.stdout.readline().strip() if p.stdout else ""
            if line != "ready":
                raise RuntimeError(f"relay on host {i} did not start: {line!r}")
        t0 = time.monotonic()
        sender = hosts[0].popen([sys.executable, "-c", SEND, hosts[1].addr, src])
        procs.append(sender)
        results = []
        for p in procs[:-1]:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("a relay ended without reporting (see above)")
            results.append(json.loads(line))
        wall = time.monotonic() - t0
        sender.wait(30)
        for r in results:
            if r["bytes"] != size_mib * MiB or r["xxh3"] != want.hexdigest():
                raise RuntimeError(f"a relay received a wrong file: {r}")
        return {"wall": wall, "sb": size_mib * MiB / (rate * 1e6 / 8),
                "user": sum(r["user"] for r in results), "sys": sum(r["sys"] for r in results),
                "reads_per_mib": sum(r["reads"] for r in results) / targets / size_mib}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        cl.close()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="40", help="comma-separated target counts (40)")
    ap.add_argument("--size", type=int, default=64, help="file size in MiB (64)")
    ap.add_argument("--rate", type=float, default=80.0, help="link rate in Mbit/s (80)")
    ap.add_argument("--lowat", type=int, default=128 * 1024,
                    help="receive batch (SO_RCVLOWAT) in bytes, as fdship's receive_batch (128K)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("netns_floor.py builds network namespaces: run it as root")
    print("| targets | file | rate | chain wall / (S/B) | relays' CPU-s user + sys (median) "
          "| per target | reads per MiB | runs |")
    print("|---|---|---|---|---|---|---|---|")
    for t in (int(x) for x in args.targets.split(",")):
        runs = [chain(t, args.size, args.rate, args.lowat) for _ in range(args.repeat)]
        cpu = statistics.median(r["user"] + r["sys"] for r in runs)
        user = statistics.median(r["user"] for r in runs)
        sys_ = statistics.median(r["sys"] for r in runs)
        ratio = statistics.median(r["wall"] / r["sb"] for r in runs)
        reads = statistics.median(r["reads_per_mib"] for r in runs)
        print(f"| {t} | {args.size} MiB | {args.rate:g} Mbit/s | {ratio:.2f} | "
              f"{cpu:.2f} ({user:.2f} + {sys_:.2f}) | {cpu / t:.3f} | {reads:.1f} | "
              f"{args.repeat} |", flush=True)


if __name__ == "__main__":
    main()
