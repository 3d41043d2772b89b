"""Benchmark of the daemon's data path on loopback, beside nginx and curl.

One source daemon process serves a 256 MiB file (warm in the page cache) in
4 MiB chunks (``--chunk``) through the real ``fdship.daemon.serve.DownloadHandler``; nginx
(``sendfile on``) serves the same bytes from a plain file.  Measured, each
in several rounds with the median printed:

1. serving: curl fetches every chunk over one keep-alive connection and
   discards it -- from our handler, and from nginx with the same byte ranges
   and as one whole-file request;
2. the full fetch path: ``PeerPool.fetch`` (sendfile serve, stream, xxh3
   verify, pwrite into a fresh staging file) sequentially over one connection
   and with 4 fetches in flight, beside curl from nginx to /dev/null and to a
   fresh file;
3. for the record, the same fetch done with Tornado's ``AsyncHTTPClient`` and a
   streaming callback that hashes and pwrites (what fetch.py chose not to use).

Figures depend on the machine and on whatever else it is doing; nothing
asserts on them.  Needs curl and nginx on PATH (``apt-get install curl
nginx-light``); nginx runs with its own temporary config on a loopback port and
is stopped at the end.

    python tests/benchmarks/loopback.py                 # 256 MiB, 7 rounds
    python tests/benchmarks/loopback.py --size 64 --runs 3 --markdown
    python tests/benchmarks/loopback.py --chunk 64 --only serve   # per-request cost
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

# Run from a checkout without installing: the repository root goes first.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.common import fetch_all, proc_cpu  # noqa: E402

import xxhash  # noqa: E402

MiB = 1024 * 1024
CHUNK = 4 * MiB
JOB = "bench"


# --- the source daemon process -------------------------------------------------------------


def serve_main(data_dir: str, src: str, chunk: int) -> None:
    """Child process: snapshot ``src`` into a store and serve it until SIGTERM."""
    import tornado.httpserver
    import tornado.ioloop
    import tornado.netutil
    import tornado.web

    from fdship.daemon.serve import DownloadHandler, ServeStats
    from fdship.daemon.store import Store
    from fdship.protocol import DAEMON_DOWNLOAD

    store = Store(data_dir, "/")
    store.open()
    snap = store.snapshot(src, chunk)
    store.commit_snapshots(JOB, [snap.key])
    with open(store.source(JOB, 0).copy_path, "rb") as f:  # warm the page cache
        while f.read(8 * MiB):
            pass

    async def main() -> None:
        stats = ServeStats()
        app = tornado.web.Application([(DAEMON_DOWNLOAD, DownloadHandler,
                                        dict(store=store, stats=stats))])
        server = tornado.httpserver.HTTPServer(app)
        socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets(socks)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(json.dumps({"port": socks[0].getsockname()[1], "chunks": snap.chunks,
                          "size": snap.size, "xxh3": snap.xxh3}), flush=True)
        await stop.wait()
        server.stop()
        print(json.dumps({"zero_copy": stats.zero_copy, "buffered": stats.buffered}),
              file=sys.stderr, flush=True)

    asyncio.run(main())
    store.close()


# --- nginx ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nginx(tmp: Path, www: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    temps = "\n".join(f"  {k}_temp_path {tmp}/{k};" for k in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
{temps}
  server {{
    listen 127.0.0.1:{port};
    root {www};
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-e", str(tmp / "nginx-error.log"), "-p", str(tmp),
                             "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"nginx did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("nginx did not start listening within 10 s")


# --- measurements ----------------------------------------------------------------------------


def nginx_worker(master: int) -> int:
    """The pid of nginx's single worker (the process that serves)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{master}/task").iterdir():
            kids = (task / "children").read_text().split()
            if kids:
                return int(kids[0])
        time.sleep(0.05)
    raise SystemExit("nginx started no worker process")


def curl(transfers: list[tuple[str, str, str]]) -> float:
    """Run one curl over ``(url, range, output)`` transfers; return MB/s of the transfers.

    One process, ``next`` between transfers: curl keeps its connection cache,
    so every transfer after the first reuses the keep-alive connection (checked).
    Time is the sum of curl's own per-transfer ``time_total``, so process start
    is not counted.
    """
    cfg = []
    for url, rng, out in transfers:
        cfg += [f'url = "{url}"', f'output = "{out}"', "silent", "show-error",
                'write-out = "%{size_download} %{time_total} %{num_connects} %{http_code}\\n"']
        if rng:
            cfg.append(f'range = "{rng}"')
        cfg.append("next")
    r = subprocess.run(["curl", "--config", "-"], input="\n".join(cfg[:-1]), text=True,
                       capture_output=True, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"curl failed: {r.stderr}")
    size = secs = 0.0
    connects = 0
    rows = [ln.split() for ln in r.stdout.strip().splitlines()]
    for b, t, c, code in rows:
        if code not in ("200", "206"):
            raise SystemExit(f"curl got HTTP {code}")
        size += float(b)
        secs += float(t)
        connects += int(c)
    if connects != 1:
        raise SystemExit(f"curl opened {connects} connections; expected one keep-alive")
    return size / secs / 1e6


async def pool_fetch(port: int, chunks: list[str], size: int, staging_fd: int,
                     parallel: int) -> float:
    from fdship.daemon.fetch import PeerPool

    pool = PeerPool()
    dt = await fetch_all(pool, port, JOB, chunks, size, CHUNK, staging_fd, parallel, 60.0)
    await pool.close()
    return size / dt / 1e6


async def tornado_fetch(port: int, chunks: list[str], size: int, staging_fd: int) -> float:
    import tornado.httpclient

    from fdship.protocol import DAEMON_DOWNLOAD, chunk_span

    client = tornado.httpclient.AsyncHTTPClient(max_body_size=2 * CHUNK)
    t0 = time.perf_counter()
    for c, h in enumerate(chunks):
        off, _ = chunk_span(size, CHUNK, c)
        hasher = xxhash.xxh3_64()
        pos = [off]

        def on_chunk(data: bytes, hasher: xxhash.xxh3_64 = hasher,
                     pos: list[int] = pos) -> None:
            hasher.update(data)
            os.pwrite(staging_fd, data, pos[0])
            pos[0] += len(data)

        await client.fetch(f"http://127.0.0.1:{port}{DAEMON_DOWNLOAD}?job={JOB}&file=0&chunk={c}",
                           streaming_callback=on_chunk)
        if hasher.hexdigest() != h:
            raise SystemExit("tornado client: hash mismatch")
    dt = time.perf_counter() - t0
    client.close()
    return size / dt / 1e6


def machine_notes() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ver = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    cv = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    return (f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, {ver.replace('nginx version: ', '')}, "
            f"{cv.split()[0]} {cv.split()[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="file size in MiB (default 256)")
    ap.add_argument("--runs", type=int, default=7, help="rounds of measurements (default 7)")
    ap.add_argument("--dir", default=None, help="where to put the temporary files")
    ap.add_argument("--staging-dir", default=None,
                    help="where the fetch path writes (default: the temporary directory)")
    ap.add_argument("--only", default="",
                    help="run only the measurements whose name starts with this (serve, fetch)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--chunk", type=int, default=4096,
                    help="chunk size in KiB (default 4096); small chunks expose per-request cost")
    ap.add_argument("--serve", nargs=2, metavar=("DATA_DIR", "SRC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global CHUNK
    CHUNK = args.chunk * 1024
    if args.serve:
        serve_main(args.serve[0], args.serve[1], CHUNK)
        return
    for tool in ("curl", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install curl nginx-light")

    tmp = Path(tempfile.mkdtemp(prefix="fdship-loopback-", dir=args.dir))
    os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user
    server = nginx = None
    try:
        www = tmp / "www"
        www.mkdir()
        src = www / "big.bin"
        size = args.size * MiB
        with open(src, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        os.chmod(src, 0o644)
        server = subprocess.Popen([sys.executable, __file__, "--chunk", str(args.chunk),
                                   "--serve", str(tmp / "daemon"), str(src)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.stdout is not None
        info = json.loads(server.stdout.readline() or "{}")
        if "port" not in info:
            raise SystemExit(f"the daemon process did not start: {server.stderr.read()}")
        port, chunks = info["port"], info["chunks"]
        nginx, nport = start_nginx(tmp, www)
        with open(src, "rb") as f:  # warm for nginx too
            while f.read(8 * MiB):
                pass

        ours = [(f"http://127.0.0.1:{port}/daemon/download?job={JOB}&file=0&chunk={c}", "",
                 "/dev/null") for c in range(len(chunks))]
        nginx_ranges = [(f"http://127.0.0.1:{nport}/big.bin",
                         f"{c * CHUNK}-{min(size, (c + 1) * CHUNK) - 1}", "/dev/null")
                        for c in range(len(chunks))]
        nginx_whole = [(f"http://127.0.0.1:{nport}/big.bin", "", "/dev/null")]
        out_file = tmp / "curl-out.bin"

        def curl_to_file() -> float:
            try:
                return curl([(f"http://127.0.0.1:{nport}/big.bin", "", str(out_file))])
            finally:
                # Unlinked at once, its dirty pages are dropped instead of being
                # written back while the next measurement runs.
                out_file.unlink(missing_ok=True)

        def with_staging(make: Callable[[int], Awaitable[float]]) -> Callable[[], float]:
            def run() -> float:
                # A fresh, preallocated file, as open_staging makes; removed right
                # after for the same reason as curl's output file.
                path = Path(args.staging_dir or tmp) / "fdship-bench-staging.part"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, size)
                    return asyncio.run(make(fd))
                finally:
                    os.close(fd)
                    path.unlink()
            return run

        def self_cpu() -> float:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            return ru.ru_utime + ru.ru_stime

        def children_cpu() -> float:
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            return ru.ru_utime + ru.ru_stime

        ours_cpu = proc_cpu(server.pid)
        ngx_cpu = proc_cpu(nginx_worker(nginx.pid))
        plan: list[tuple[str, Callable[[], float], Callable[[], float]]] = [
            ("serve: curl <- fdship DownloadHandler, chunk by chunk", lambda: curl(ours),
             ours_cpu),
            ("serve: curl <- nginx sendfile, same ranges", lambda: curl(nginx_ranges), ngx_cpu),
            ("serve: curl <- nginx sendfile, whole file", lambda: curl(nginx_whole), ngx_cpu),
            ("fetch: PeerPool.fetch verify+pwrite, 1 in flight",
             with_staging(lambda fd: pool_fetch(port, chunks, size, fd, 1)), self_cpu),
            ("fetch: PeerPool.fetch verify+pwrite, 4 in flight",
             with_staging(lambda fd: pool_fetch(port, chunks, size, fd, 4)), self_cpu),
            ("fetch: curl <- nginx, whole file to /dev/null", lambda: curl(nginx_whole),
             children_cpu),
            ("fetch: curl <- nginx, whole file to a fresh file", curl_to_file, children_cpu),
            ("fetch: Tornado AsyncHTTPClient streaming_callback",
             with_staging(lambda fd: tornado_fetch(port, chunks, size, fd)), self_cpu),
        ]
        plan = [p for p in plan if p[0].startswith(args.only)]
        print(f"loopback, {args.size} MiB in {len(chunks)} chunks of {args.chunk} KiB, "
              f"{args.runs} rounds; "
              f"{machine_notes()}; load average before: {os.getloadavg()[0]:.1f}",
              file=sys.stderr)
        # Rounds, not blocks: every round measures everything once, so a burst of
        # noise from the shared machine hits all contenders alike.
        vals: dict[str, list[float]] = {name: [] for name, _, _ in plan}
        cpus: dict[str, list[float]] = {name: [] for name, _, _ in plan}
        for _ in range(args.runs):
            for name, fn, cpu in plan:
                os.sync()  # start each measurement with no writeback in progress
                c0 = cpu()
                vals[name].append(fn())
                cpus[name].append((cpu() - c0) / (size / 2**30))
        results = [(name, statistics.median(v), v) for name, v in vals.items()]
        cpu_med = {name: statistics.median(v) for name, v in cpus.items()}
        print(f"  {'':<58} {'median':>8}        {'CPU s/GiB':>9}", file=sys.stderr)
        for name, med_, v in results:
            print(f"  {name:<58} {med_:8.0f} MB/s   {cpu_med[name]:6.2f}     runs: "
                  + " ".join(f"{x:.0f}" for x in v), file=sys.stderr)
        print(f"  load average after: {os.getloadavg()[0]:.1f}", file=sys.stderr)
        med = {name: m for name, m, _ in results}

        def ratio(a: str, b: str) -> float | None:
            keys = [k for k in med if k.startswith(a)], [k for k in med if k.startswith(b)]
            return med[keys[0][0]] / med[keys[1][0]] if keys[0] and keys[1] else None

        wanted = [
            ("serve / nginx same ranges (target >= 0.8)", "serve: curl <- fdship",
             "serve: curl <- nginx sendfile, same"),
            ("serve / nginx whole file", "serve: curl <- fdship",
             "serve: curl <- nginx sendfile, whole"),
            ("fetch 1 in flight / curl<-nginx to /dev/null (target >= 0.5)",
             "fetch: PeerPool.fetch verify+pwrite, 1", "fetch: curl <- nginx, whole file to /dev"),
            ("fetch 1 in flight / curl<-nginx to a file", "fetch: PeerPool.fetch verify+pwrite, 1",
             "fetch: curl <- nginx, whole file to a fresh"),
            ("fetch 4 in flight / curl<-nginx to /dev/null",
             "fetch: PeerPool.fetch verify+pwrite, 4", "fetch: curl <- nginx, whole file to /dev"),
            ("PeerPool / Tornado AsyncHTTPClient", "fetch: PeerPool.fetch verify+pwrite, 1",
             "fetch: Tornado"),
        ]
        ratios = [(name, r) for name, a, b in wanted if (r := ratio(a, b)) is not None]
        for name, r in ratios:
            print(f"  {name:<66} {r:5.2f}x", file=sys.stderr)
        if args.markdown:
            print("| measurement | median MB/s | CPU s/GiB | runs (MB/s) |")
            print("| --- | ---: | ---: | --- |")
            for name, m, v in results:
                print(f"| {name} | {m:.0f} | {cpu_med[name]:.2f} | "
                      f"{' '.join(f'{x:.0f}' for x in v)} |")
            print()
            print("| ratio | value |")
            print("| --- | ---: |")
            for name, r in ratios:
                print(f"| {name} | {r:.2f}x |")
    finally:
        for proc in (nginx, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM if proc is server else signal.SIGQUIT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if server is not None and server.stderr is not None:
            tail = server.stderr.read().strip().splitlines()
            if tail:
                print(f"  daemon: {tail[-1]}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
