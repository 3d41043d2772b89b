"""What TLS costs the data path: serve + fetch over loopback, plain and TLS, side by side.

With TLS on, a daemon cannot hand chunks to the kernel with ``sendfile(2)``
(the bytes must be encrypted in user space), so ``fdship.daemon.serve`` falls
back to its buffered path: ``pread`` 256 KiB slices and write them through
the TLS stream; and ``fdship.daemon.fetch`` decrypts before it hashes and
``pwrite``-s.  This measures what that costs.

Two source processes serve the same file (snapshotted into a real ``Store``,
warm in the page cache) through the real ``DownloadHandler`` behind
``fdship.web.make_server``: one plain, one with a certificate made for the run
(``cryptography`` if installed, else the ``openssl`` command).  The fetching
side is ``PeerPool.fetch`` -- stream, xxh3 verify, ``pwrite`` into a fresh
preallocated staging file -- with one and with four fetches in flight, over
plain TCP and over TLS verified against the run's CA.  Rounds are interleaved
(each round measures every variant once), medians are printed, with the CPU
seconds per GiB of the serving process and of the fetching one.

Figures depend on the machine and whatever else it does; nothing asserts on
them.

    python tests/benchmarks/tls.py                    # 256 MiB, 4 MiB chunks, 5 rounds
    python tests/benchmarks/tls.py --size 64 --runs 3 --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository root goes first.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.common import fetch_all, proc_cpu  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
JOB = "bench"


# --- certificates ------------------------------------------------------------------------


def make_certs(d: Path) -> tuple[str, str, str]:
    """(ca, cert, key) PEM paths: a CA and a certificate for 127.0.0.1 it signed
    (the TLS tests' own maker: the cryptography package, else the openssl command)."""
    from tests.security.conftest import make_pki

    pki = make_pki(str(d))
    return pki.ca, pki.cert, pki.key


# --- the serving process -------------------------------------------------------------------


def serve_main(data_dir: str, src: str, chunk: int, cert: str, key: str) -> None:
    """Child process: snapshot ``src`` into a store, serve it (TLS if ``cert``) until SIGTERM."""
    import tornado.netutil
    import tornado.web

    from fdship.daemon.serve import DownloadHandler, ServeStats
    from fdship.daemon.store import Store
    from fdship.protocol import DAEMON_DOWNLOAD
    from fdship.web import make_server

    store = Store(data_dir, "/")
    store.open()
    snap = store.snapshot(src, chunk)
    store.commit_snapshots(JOB, [snap.key])
    with open(store.source(JOB, 0).copy_path, "rb") as f:  # warm the page cache
        while f.read(8 * MiB):
            pass

    class Cfg:  # the settings make_server reads, as the daemon's config has them
        tls_cert, tls_key = cert, key
        max_body = 64 * MiB
        idle_timeout = 120.0
        body_timeout = 60.0

    async def main() -> None:
        stats = ServeStats()
        app = tornado.web.Application([(DAEMON_DOWNLOAD, DownloadHandler,
                                        {"store": store, "stats": stats})])
        server = make_server(app, Cfg, "")
        socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets(socks)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(json.dumps({"port": socks[0].getsockname()[1], "chunks": snap.chunks,
                          "size": snap.size}), flush=True)
        await stop.wait()
        server.stop()
        print(json.dumps({"zero_copy": stats.zero_copy, "buffered": stats.buffered}),
              file=sys.stderr, flush=True)

    asyncio.run(main())
    store.close()


# --- measurements ----------------------------------------------------------------------------


async def pool_fetch(port: int, chunks: list[str], size: int, chunk: int, fd: int,
                     parallel: int, tls: ssl.SSLContext | None) -> tuple[float, str]:
    from fdship.daemon.fetch import PeerPool

    pool = PeerPool(ssl=tls)
    dt = await fetch_all(pool, port, JOB, chunks, size, chunk, fd, parallel, 120.0)
    cipher = ""
    for q in pool._idle.values():  # what the connections negotiated, for the record
        for conn in q:
            if conn.transport is not None:
                c = conn.transport.get_extra_info("cipher")
                cipher = f"{c[1]} {c[0]}" if c else ""
    await pool.close()
    return size / dt / 1e6, cipher


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def start_server(tmp: Path, name: str, src: Path, chunk: int, cert: str,
                 key: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp / name), str(src),
                          str(chunk), cert, key], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise SystemExit(f"the {name} server did not start: {p.stderr.read() if p.stderr else ''}")
    return p, json.loads(line)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_main(*sys.argv[2:4], int(sys.argv[4]), *sys.argv[5:7])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="file size in MiB")
    ap.add_argument("--chunk", type=int, default=4096, help="chunk size in KiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()
    size, chunk = args.size * MiB, args.chunk * 1024

    with tempfile.TemporaryDirectory(prefix="fdship-tls-bench-") as t:
        tmp = Path(t)
        ca, cert, key = make_certs(tmp)
        src = tmp / "big.bin"
        with open(src, "wb") as f:
            f.writelines(os.urandom(MiB) for _ in range(args.size))
        plain, pinfo = start_server(tmp, "plain", src, chunk, "", "")
        tls, tinfo = start_server(tmp, "tls", src, chunk, cert, key)
        client_tls = ssl.create_default_context(cafile=ca)
        chunks = pinfo["chunks"]
        try:
            def fetch(port: int, parallel: int,
                      ctx: ssl.SSLContext | None) -> Callable[[], tuple[float, str]]:
                def run() -> tuple[float, str]:
                    path = tmp / "staging.part"
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                    try:
                        os.posix_fallocate(fd, 0, size)
                        return asyncio.run(pool_fetch(port, chunks, size, chunk, fd, parallel,
                                                      ctx))
                    finally:
                        os.close(fd)
                        path.unlink()  # its dirty pages are dropped, not written back later
                return run

            plan = [("plain HTTP (sendfile), 1 in flight", fetch(pinfo["port"], 1, None),
                     proc_cpu(plain.pid)),
                    ("TLS (buffered), 1 in flight", fetch(tinfo["port"], 1, client_tls),
                     proc_cpu(tls.pid)),
                    ("plain HTTP (sendfile), 4 in flight", fetch(pinfo["port"], 4, None),
                     proc_cpu(plain.pid)),
                    ("TLS (buffered), 4 in flight", fetch(tinfo["port"], 4, client_tls),
                     proc_cpu(tls.pid))]
            print(f"loopback, {args.size} MiB in {len(chunks)} chunks of {args.chunk} KiB, "
                  f"{args.runs} rounds; {platform.machine()}, {os.cpu_count()} cores, "
                  f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}; load average "
                  f"before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
            mbs: dict[str, list[float]] = {n: [] for n, _, _ in plan}
            srv: dict[str, list[float]] = {n: [] for n, _, _ in plan}
            cli: dict[str, list[float]] = {n: [] for n, _, _ in plan}
            cipher = ""
            for r in range(args.runs):
                for name, run, server_cpu in plan:
                    subprocess.run(["sync"], check=False)
                    s0, c0 = server_cpu(), self_cpu()
                    rate, negotiated = run()
                    cipher = negotiated or cipher
                    mbs[name].append(rate)
                    srv[name].append((server_cpu() - s0) / (size / GiB))
                    cli[name].append((self_cpu() - c0) / (size / GiB))
                print(f"  round {r + 1}: " + ", ".join(f"{v[-1]:.0f}" for v in mbs.values()),
                      file=sys.stderr)
        finally:
            for p in (plain, tls):
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        counts = {}
        for name, p in (("plain", plain), ("tls", tls)):
            err = p.stderr.read() if p.stderr else ""
            counts[name] = json.loads(err.strip().splitlines()[-1])
        med = {n: statistics.median(v) for n, v in mbs.items()}
        names = list(mbs)
        print(f"TLS cipher: {cipher}; chunks sent with sendfile / buffered: plain "
              f"{counts['plain']['zero_copy']}/{counts['plain']['buffered']}, TLS "
              f"{counts['tls']['zero_copy']}/{counts['tls']['buffered']}", file=sys.stderr)
        rows = [(n, med[n], statistics.median(srv[n]), statistics.median(cli[n]), mbs[n])
                for n in names]
        if args.markdown:
            print("| fetch path (serve + fetch + verify + pwrite) | median MB/s | "
                  "server CPU s/GiB | fetcher CPU s/GiB | runs (MB/s) |")
            print("|---|---:|---:|---:|---|")
            for n, m, s, c, v in rows:
                print(f"| {n} | {m:.0f} | {s:.2f} | {c:.2f} | "
                      f"{', '.join(f'{x:.0f}' for x in v)} |")
        else:
            for n, m, s, c, v in rows:
                print(f"{n:<40} {m:7.0f} MB/s  server {s:5.2f} s/GiB  fetcher {c:5.2f} s/GiB")
        for par in ("1", "4"):
            a = med[f"plain HTTP (sendfile), {par} in flight"]
            b = med[f"TLS (buffered), {par} in flight"]
            print(f"TLS / plain, {par} in flight: {b / a:.2f} of the throughput "
                  f"({(1 - b / a) * 100:.0f}% less)")


if __name__ == "__main__":
    main()
