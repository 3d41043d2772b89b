"""The ``fdship`` command: center, daemon, submit, jobs, job, hosts, demo, simulate.

Each subcommand parses its flags, loads config where it has one, and hands
off to the module that does the work.  Exit statuses of ``submit`` follow the
CONTRACT: 0 every machine done, 1 some machine failed, 2 bad input, 3 the
daemon or center could not be reached.  The commands that talk to a center or
a daemon take ``--tls-ca FILE`` for https:// URLs (:mod:`fdship.clitls`): a bad
CA file is bad input (2), a certificate it does not trust is unreachable (3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from fdship import clitls
from fdship import config as C
from fdship.config import human_bytes
from fdship.errors import BadRequest, ConfigError, FdshipError, Unavailable

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3


def setup_logging(level: str = "INFO") -> None:
    """key=value lines on stderr, one event per line, greppable by job=ID."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S")
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def default_center() -> str:
    return os.environ.get("FDSHIP_CENTER", "http://127.0.0.1:7070")


def _token(args: argparse.Namespace) -> str:
    return C.read_token(getattr(args, "token_file", "") or "")


def add_tls_ca_argument(p: argparse.ArgumentParser) -> None:
    """``--tls-ca FILE`` for a command that talks to a center or daemon (see fdship.clitls)."""
    # dest differs from the center's and daemon's config key tls_ca: main()
    # tells client commands by this attribute.
    p.add_argument("--tls-ca", dest="client_tls_ca", default=None, metavar="FILE",
                   help="CA certificate (PEM) that https:// servers are verified against "
                        "(default $FDSHIP_TLS_CA, else the system's trust store)")


# ---------------------------------------------------------------------- center / daemon


def cmd_center(args: argparse.Namespace) -> int:
    from fdship.center.http import run_center

    cfg = C.load(C.CenterConfig, args)
    C.loop_runner(cfg.event_loop)(run_center(cfg))  # type: ignore[misc]
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from fdship.daemon.agent import run_daemon

    cfg = C.load(C.DaemonConfig, args)
    C.loop_runner(cfg.event_loop)(run_daemon(cfg))  # type: ignore[misc]
    return 0


# ---------------------------------------------------------------------- submit




def _progress_line(res: dict[str, Any]) -> str:
    ms = res.get("machines", {})
    done = sum(1 for m in ms.values() if m.get("state") == "done")
    failed = sum(1 for m in ms.values() if m.get("state") == "failed")
    total = len(ms)
    prog = res.get("progress", 0.0)
    width = 24
    fill = int(prog * width)
    rate = sum(m.get("rate") or 0 for m in ms.values())
    return (f"[{'#' * fill}{'.' * (width - fill)}] {prog * 100:5.1f}%  "
            f"{done}/{total} done, {failed} failed  {human_bytes(rate)}/s")


def summarize(res: dict[str, Any]) -> str:
    lines = [f"job {res['job']}: {res['state']}"]
    for f in res.get("files", []):
        lines.append(f"  file {f['path']} -> {f['dest']} ({human_bytes(f['size'])}, "
                     f"xxh3 {f['xxh3']})")
    for name, m in sorted(res.get("machines", {}).items()):
        secs = f" in {m['seconds']:.1f} s" if m.get("seconds") is not None else ""
        err = f": {m['error']}" if m.get("error") else ""
        hook = m.get("hook") or {}
        if hook.get("ok"):  # a failed hook already speaks through the error
            err += f" (hook {hook.get('name')} ok in {hook.get('seconds', 0):.2f} s)"
        lines.append(f"  {name:<24} {m['state']}{secs}{err}")
    return "\n".join(lines)


async def _submit(args: argparse.Namespace) -> int:
    from fdship.daemon.client import DaemonClient
    from fdship.protocol import ApiRequest

    token = _token(args)
    machines = [m.strip() for entry in args.to for m in entry.split(",") if m.strip()]
    files = [os.path.abspath(f) for f in args.files]
    wait = not (args.callback or args.no_wait)
    req = ApiRequest(files=tuple(files), machines=tuple(machines), callback=args.callback or "",
                     dest=args.dest or "", notify=args.notify or "", wait=False)
    client = DaemonClient(args.daemon, token)
    res = await client.api(req, timeout=3600)
    job = res["job"]
    if not wait:
        print(json.dumps(res) if args.json else job)
        return EXIT_OK
    tty = sys.stderr.isatty() and not args.json
    last_line = ""
    failures = 0
    while True:
        try:
            res = await client._call("GET", f"/daemon/jobs/{job}?wait=1", timeout=60)
            failures = 0
        except Unavailable:
            failures += 1
            if failures > 120:
                raise
            await asyncio.sleep(1)
            continue
        line = _progress_line(res)
        if tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif line.split("]")[-1] != last_line.split("]")[-1] and not args.json:
            sys.stderr.write(f"job {job}: {line}\n")
        last_line = line
        if res["state"] != "running":
            break
    if tty:
        sys.stderr.write("\n")
    print(json.dumps(res, indent=2) if args.json else summarize(res))
    return EXIT_OK if res["state"] == "done" else EXIT_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    if not args.to:
        raise BadRequest("name the target machines with --to MACHINE[,MACHINE...]")
    return asyncio.run(_submit(args))


# ---------------------------------------------------------------------- watching


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*map(str, r)) for r in rows])


def cmd_jobs(args: argparse.Namespace) -> int:
    from fdship.center.client import CenterClient

    res = asyncio.run(CenterClient(args.center, _token(args)).jobs(args.state or "", args.limit))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    rows = [[j["job"], j["state"], f"{j['progress'] * 100:.0f}%",
             f"{j['machines']['done']}/{j['machines']['total']}", str(j["machines"]["failed"]),
             human_bytes(j["bytes_total"]), j["created"] or ""] for j in res["jobs"]]
    print(_table(rows, ["JOB", "STATE", "PROGRESS", "DONE", "FAILED", "BYTES", "CREATED"])
          if rows else "no jobs")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from fdship.center.client import CenterClient

    res = asyncio.run(CenterClient(args.center, _token(args)).job(args.id))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"job {res['job']}  state {res['state']}  created {res['created']}  "
          f"finished {res['finished'] or '-'}  source {res.get('source')}")
    for f in res["files"]:
        print(f"  {f['path']} -> {f['dest']}  {human_bytes(f['size'])}  xxh3 {f['xxh3']}")
    rows = []
    for n, m in sorted(res["machines"].items()):
        eta = f"{m['eta']:.0f}s" if m.get("eta") is not None else "-"
        rows.append([n, m["state"], f"{m['chunks_done']}/{m['chunks_total']}",
                     human_bytes(m["bytes_done"]), f"{human_bytes(m.get('rate') or 0)}/s", eta,
                     str(m.get("attempts", 0)), m.get("error") or ""])
    print(_table(rows, ["MACHINE", "STATE", "CHUNKS", "BYTES", "RATE", "ETA", "RETRIES",
                        "ERROR"]))
    return 0 if res["state"] != "failed" else 1


def cmd_hosts(args: argparse.Namespace) -> int:
    from fdship.center.client import CenterClient

    res = asyncio.run(CenterClient(args.center, _token(args)).hosts())
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    rows = []
    for h in res["hosts"]:
        ld = h["load"]
        age = f"{h['heartbeat_age']:.1f}s" if h.get("heartbeat_age") is not None else "-"
        rows.append([h["name"], h["address"], ",".join(h["labels"]) or "-",
                     "alive" if h["alive"] else "DEAD", age, f"{ld['cpu']:.0f}%",
                     # The watched app's CPU (watch_pidfile; % of one core) and what
                     # the scheduler makes of the load (0 idle .. 1 busy: serves less).
                     f"{ld.get('app_cpu', 0.0):.0f}%", f"{h.get('busyness', 0.0):.2f}",
                     f"{human_bytes(ld['net_tx'])}/s", f"{human_bytes(ld['net_rx'])}/s",
                     f"{ld['uploads']}/{ld['downloads']}"])
    print(_table(rows, ["NAME", "ADDRESS", "LABELS", "STATE", "BEAT", "CPU", "APP", "BUSY",
                        "TX", "RX", "UP/DOWN"]) if rows else "no daemons registered")
    return 0


# ---------------------------------------------------------------------- schedules


def cmd_schedule(args: argparse.Namespace) -> int:
    from fdship.center.schedules import cli

    return asyncio.run(cli(args, _token(args)))


def add_schedule_parser(sub: Any) -> None:
    sc = sub.add_parser("schedule", help="push files on a schedule: add, list, rm, history")
    ssub = sc.add_subparsers(dest="schedule_cmd", required=True, metavar="ACTION")
    a = ssub.add_parser("add", help="ship FILE... from a daemon every interval or on a cron "
                        "expression")
    a.add_argument("name", help="a name for the schedule (letters, digits, . _ -)")
    when = a.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", metavar="INTERVAL",
                      help="run now and then every INTERVAL: 30s, 10m, 2h, 1d")
    when.add_argument("--cron", metavar="EXPR",
                      help='cron expression in UTC, 5 fields or 6 with seconds first, '
                           'e.g. "*/10 * * * *"')
    a.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                   help="the daemon (name or address) the files are on")
    a.add_argument("--to", action="append", required=True, metavar="MACHINE[,MACHINE...]",
                   help="targets: names, addresses or @label (repeatable)")
    a.add_argument("--dest", help="directory on the targets (default: each file's own)")
    a.add_argument("--notify", help="hook name configured on the target daemons")
    a.add_argument("files", nargs="+", metavar="FILE", help="absolute paths on the source")
    ls = ssub.add_parser("list", help="list schedules, their next run and last result")
    rm = ssub.add_parser("rm", help="remove a schedule (a run in progress finishes)")
    rm.add_argument("name")
    hi = ssub.add_parser("history", help="a schedule's runs, newest first")
    hi.add_argument("name")
    hi.add_argument("--limit", type=int, default=20)
    for p in (a, ls, rm, hi):
        p.add_argument("--center", default=default_center())
        p.add_argument("--token-file", default="")
        add_tls_ca_argument(p)
        p.add_argument("--json", action="store_true")
    sc.set_defaults(fn=cmd_schedule)


# ---------------------------------------------------------------------- demo / simulate


def cmd_demo(args: argparse.Namespace) -> int:
    from fdship.demo import run_demo

    return run_demo(hosts=args.hosts, size_mib=args.size, keep=args.keep)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fdship.simulate import run_simulation

    return run_simulation(args)


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdship", description="Ship files to a fleet, peer to peer.")
    p.add_argument("--log-level", default=os.environ.get("FDSHIP_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("center", help="run the center (scheduler, REDO log)")
    C.add_arguments(c, C.CenterConfig)
    c.set_defaults(fn=cmd_center)

    d = sub.add_parser("daemon", help="run a daemon (one per server)")
    C.add_arguments(d, C.DaemonConfig)
    d.set_defaults(fn=cmd_daemon)

    s = sub.add_parser("submit", help="ship files to machines")
    s.add_argument("--daemon", default=os.environ.get("FDSHIP_DAEMON", "http://127.0.0.1:7071"),
                   help="the source daemon (default http://127.0.0.1:7071)")
    s.add_argument("--to", action="append", default=[], metavar="MACHINE[,MACHINE...]",
                   help="targets: names, addresses or @label (repeatable)")
    s.add_argument("--dest", help="directory on the targets (default: each file's own)")
    s.add_argument("--notify", help="hook name configured on the target daemons")
    s.add_argument("--callback", help="URL the job result is POSTed to (returns at once)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.add_argument("--json", action="store_true", help="print the job result as JSON")
    s.add_argument("--token-file", default="")
    add_tls_ca_argument(s)
    s.add_argument("files", nargs="+", metavar="FILE")
    s.set_defaults(fn=cmd_submit)

    for name, fn, hlp in (("jobs", cmd_jobs, "list jobs"), ("job", cmd_job, "show one job"),
                          ("hosts", cmd_hosts, "list daemons")):
        w = sub.add_parser(name, help=hlp)
        w.add_argument("--center", default=default_center())
        w.add_argument("--token-file", default="")
        add_tls_ca_argument(w)
        w.add_argument("--json", action="store_true")
        if name == "jobs":
            w.add_argument("--state", choices=["running", "done", "failed"])
            w.add_argument("--limit", type=int, default=50)
        if name == "job":
            w.add_argument("id")
        w.set_defaults(fn=fn)

    add_schedule_parser(sub)

    m = sub.add_parser("demo", help="start a local cluster, ship a file, verify, clean up")
    m.add_argument("--hosts", type=int, default=4)
    m.add_argument("--size", type=int, default=64, help="file size in MiB")
    m.add_argument("--keep", action="store_true", help="keep the temporary directory")
    m.set_defaults(fn=cmd_demo)

    sim = sub.add_parser("simulate", help="run the real scheduler against simulated hosts")
    sim.add_argument("--hosts", type=int, default=50)
    sim.add_argument("--size", type=str, default="200M")
    sim.add_argument("--bandwidth", type=str, default="10M", help="per-host link, bytes/s")
    sim.add_argument("--chunk-size", type=str, default="4M")
    sim.add_argument("--slow-fraction", type=float, default=0.0)
    sim.add_argument("--slow-capped", action="store_true",
                     help="the slow hosts are slow by rate caps their daemons report "
                          "(upload_rate / download_rate), so the center knows them from the "
                          "start instead of timing their first transfers")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--latency", type=float, default=None,
                     help="one-way latency per hop in seconds (default: the simulator's)")
    sim.add_argument("--lead", type=float, default=None,
                     help="seconds before its last byte a fetch tells the center it is about "
                          "to finish (the daemon's fetch_lead; default 0.05, 0: never)")
    sim.add_argument("--stream-depth", type=int, default=None,
                     help="hosts a chunk may pass through while still arriving (the center's "
                          "stream_depth; default 16, 0: only hosts holding a chunk serve it)")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(fn=cmd_simulate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    ca, ca_origin = "", ""
    try:
        if hasattr(args, "client_tls_ca"):
            # Before any request: a bad CA file is bad input (exit 2), not an
            # unreachable server.
            ca, ca_origin = clitls.use_ca(args.client_tls_ca)
            # Tornado also logs a failed handshake; the one-line error below says
            # it better, and a command's stderr is for that line.
            logging.getLogger("tornado.general").setLevel(logging.ERROR)
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"fdship {args.cmd}: {e}", file=sys.stderr)
        return EXIT_INPUT
    except Unavailable as e:
        print(f"fdship {args.cmd}: {clitls.explain_tls_failure(str(e), ca, ca_origin)}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except BadRequest as e:
        print(f"fdship {args.cmd}: {e}", file=sys.stderr)
        return EXIT_INPUT
    except FdshipError as e:
        print(f"fdship {args.cmd}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
