"""``fdship-tui``: the Textual app that follows a center live, and its ``main()``.

The app owns three things: the data source (:mod:`tui.source`, injected, so
tests and screenshots run on fixtures), the folded state
(:class:`tui.view.ClusterView`) and the connection status.  One exclusive
worker follows the source and posts each update to the app as a message; the
app folds it into the view and redraws the screen in front.

Redraws are coalesced: a job of 50 machines can produce hundreds of events a
second and a person reads a screen a few times a second at most, so the app
redraws at once after a quiet spell and otherwise at most every
``redraw_interval`` seconds.  That keeps the monitor's CPU small on a busy
center without adding visible delay.

Keys: ``j`` jobs, ``h`` hosts, ``enter`` open a job, ``f`` failures only,
``escape`` back, ``q`` quit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, NamedTuple

from textual import work
from textual.app import App, ScreenStackError
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.message import Message
from textual.reactive import reactive

from fdship.clitls import check_ca_file, resolve_ca
from fdship.config import read_token
from fdship.errors import FdshipError
from tui.screens import HostsScreen, JobScreen, JobsScreen, MonitorScreen
from tui.source import (
    CONNECTING,
    RECONNECTING,
    Batch,
    DataSource,
    Event,
    HTTPSource,
    Snapshot,
    Status,
    Update,
)
from tui.view import Changes, ClusterView
from tui.widgets import StatusLine

DEFAULT_CENTER = "http://127.0.0.1:7070"


class SourceUpdate(Message):
    """Worker -> app: one update from the data source."""

    def __init__(self, update: Update) -> None:
        super().__init__()
        self.update = update


class JobLoaded(Message):
    """Worker -> app: a job's full machine table arrived (or could not be had)."""

    def __init__(self, job_id: str, detail: dict[str, Any] | None, error: str = "") -> None:
        super().__init__()
        self.job_id = job_id
        self.detail = detail
        self.error = error


class MonitorApp(App[None]):
    """Follows one :class:`~tui.source.DataSource` and shows jobs, machines and hosts."""

    # Absolute, so subclasses defined elsewhere (benchmarks, tests) find it too.
    CSS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.tcss")
    TITLE = "fdship"
    MODES: ClassVar[dict[str, Any]] = {"jobs": JobsScreen, "hosts": HostsScreen}
    DEFAULT_MODE = "jobs"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "show_jobs", "Jobs"),
        Binding("h", "show_hosts", "Hosts"),
        Binding("f", "toggle_failures", "Failures"),
        Binding("q", "quit", "Quit"),
    ]
    # The palette's fuzzy finder is no use here and its key would clutter the footer.
    ENABLE_COMMAND_PALETTE = False

    failures_only: reactive[bool] = reactive(False)

    def __init__(self, source: DataSource, *, clock: Callable[[], float] = time.time,
                 redraw_interval: float = 0.1, tick: float = 1.0) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.redraw_interval = redraw_interval
        self.tick = tick
        self.view = ClusterView()
        self.status = Status(CONNECTING)
        self.status_at = clock()
        self.title = f"fdship · {source.description}"
        self._pending = Changes()
        self._redraw_scheduled = False
        self._last_redraw = 0.0
        # For tests and the latency benchmark: perf_counter of the last redraw
        # and of the newest event it showed.
        self.redraws = 0
        self.last_redraw_at = 0.0
        self.last_event_received = 0.0
        self._newest_event = 0.0
        self.applied = 0  # updates folded into the view
        self.drawn = 0  # value of `applied` at the last redraw: equal means up to date

    # -- lifecycle --------------------------------------------------------------------

    def on_mount(self) -> None:
        self.follow_source()
        if self.tick > 0:
            # Ages and the reconnect countdown move with the clock, not with events.
            self.set_interval(self.tick, self._on_tick)

    async def on_unmount(self) -> None:
        await self.source.close()

    @work(exclusive=True, group="source")
    async def follow_source(self) -> None:
        """The one worker that follows the source; it only posts messages."""
        async for update in self.source.updates():
            self.post_message(SourceUpdate(update))

    @work(exclusive=True, group="job")
    async def load_job(self, job_id: str) -> None:
        try:
            detail = await self.source.job(job_id)
        except FdshipError as e:
            self.post_message(JobLoaded(job_id, None, e.message))
            return
        self.post_message(JobLoaded(job_id, detail))

    # -- messages up --------------------------------------------------------------------

    def on_source_update(self, message: SourceUpdate) -> None:
        u = message.update
        if isinstance(u, Event):
            changes = self.view.apply(u.kind, u.data)
            self._newest_event = max(self._newest_event, u.received)
            self._changed(changes)
        elif isinstance(u, Batch):
            changes = Changes()
            for ev in u.events:
                changes.merge(self.view.apply(ev.kind, ev.data))
            self._newest_event = max(self._newest_event, u.events[-1].received)
            self._changed(changes)
        elif isinstance(u, Snapshot):
            self._changed(self.view.load_snapshot(u.jobs, u.hosts))
            # Machine events may have been missed while disconnected: re-read
            # the job on screen in full.
            front = self._front()
            if isinstance(front, JobScreen):
                self.load_job(front.job_id)
        elif isinstance(u, Status):
            self.status = u
            self.status_at = self.clock()
            self._update_status()

    def on_job_loaded(self, message: JobLoaded) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, JobScreen) and screen.job_id == message.job_id:
                screen.loading_error = message.error
        if message.detail is not None:
            self._changed(self.view.load_job(message.detail))
        else:
            self._changed(Changes(job_ids={message.job_id}))

    # -- attributes down ---------------------------------------------------------------

    def _changed(self, changes: Changes) -> None:
        self.applied += 1
        self._pending.merge(changes)
        if self._redraw_scheduled:
            return
        self._redraw_scheduled = True
        wait = self._last_redraw + self.redraw_interval - time.perf_counter()
        if wait <= 0:
            self.call_later(self._flush_changes)
        else:
            self.set_timer(wait, self._flush_changes)

    def _front(self) -> MonitorScreen | None:
        """The screen in front, if it is one of ours (None while starting or quitting)."""
        try:
            screen = self.screen
        except ScreenStackError:
            return None
        return screen if isinstance(screen, MonitorScreen) and screen.ready else None

    def _flush_changes(self) -> None:
        self._redraw_scheduled = False
        screen = self._front()
        if screen is None:
            # Between screens: keep the changes; the next screen draws on resume.
            return
        changes, self._pending = self._pending, Changes()
        if screen.wants(changes):
            self._redraw(screen)
        else:
            self.drawn = self.applied  # nothing this screen shows has moved
        self._update_status()

    def _redraw(self, screen: MonitorScreen) -> None:
        try:
            screen.redraw(self.view, self.clock(), self.failures_only)
        except NoMatches:
            # A timer fired while the screen was being torn down (quitting, or
            # popped): its widgets are gone and there is nothing left to draw.
            return
        self._last_redraw = time.perf_counter()
        self.redraws += 1
        self.drawn = self.applied
        self.last_redraw_at = self._last_redraw
        self.last_event_received = self._newest_event

    def redraw_now(self) -> None:
        """Redraw the screen in front in full (after switching screens or filters)."""
        screen = self._front()
        if screen is not None:
            self._redraw(screen)
        self._update_status()

    def _update_status(self) -> None:
        left = None
        if self.status.state == RECONNECTING and self.status.retry_in is not None:
            left = self.status.retry_in - (self.clock() - self.status_at)
        status = self.status
        if status.error:
            # The title bar already names the center; keep the line for the reason.
            status = replace(status, error=status.error.replace(
                f" at {self.source.description}", ""))
        screen = self._front()
        if screen is None:
            return
        for line in screen.query(StatusLine):
            line.show_status(status, left, self.view.totals(), self.failures_only)

    def _on_tick(self) -> None:
        self.redraw_now()

    def watch_failures_only(self) -> None:
        self.redraw_now()

    # -- actions ------------------------------------------------------------------------

    def open_job(self, job_id: str) -> None:
        # Shown at once from what we already hold (machine events fill a job's
        # table even before it is opened); the full table is fetched behind it.
        self.push_screen(JobScreen(job_id))
        self.load_job(job_id)

    def action_show_jobs(self) -> None:
        if self.current_mode != "jobs":
            self.switch_mode("jobs")
        while len(self.screen_stack) > 1:
            self.pop_screen()

    def action_show_hosts(self) -> None:
        self.switch_mode("hosts")

    def action_toggle_failures(self) -> None:
        self.failures_only = not self.failures_only


# --- command line ----------------------------------------------------------------------


def _config_file(path: str) -> dict[str, Any]:
    """Read ``center``, ``token_file`` and ``tls_ca`` from an fdship TOML config (e.g. the
    daemon's)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise FdshipError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise FdshipError(f"config file {path} is not valid TOML: {e}") from None
    out = {}
    for key in ("center", "token_file", "tls_ca"):
        v = data.get(key, data.get(key.replace("_", "-")))
        if v is not None:
            if not isinstance(v, str):
                raise FdshipError(f"config file {path}: {key} must be a string")
            out[key] = v
    return out


class Options(NamedTuple):
    """What the command line decided: where the center is, the token, the CA to trust."""

    center: str
    token: str
    tls_ca: str = ""  # "" : $FDSHIP_TLS_CA was not set either; the system's trust store
    tls_ca_origin: str = ""  # where tls_ca came from, for error messages


def parse_args(argv: list[str] | None = None) -> Options:
    """Flags -> Options.  For each setting: flag, then environment, then config, then default.

    The CA file is checked here (exists, readable, holds a certificate), so a
    bad one stops the TUI before it draws anything.
    """
    parser = argparse.ArgumentParser(
        prog="fdship-tui",
        description="Follow an fdship center live: jobs, each job's machines, hosts.  "
                    "Keys: j jobs, h hosts, enter open job, f failures only, escape back, "
                    "q quit.")
    parser.add_argument("--center", default=None,
                        help=f"URL of the center (default $FDSHIP_CENTER, else {DEFAULT_CENTER})")
    parser.add_argument("--token-file", default=None,
                        help="file holding the shared token ($FDSHIP_TOKEN beats it)")
    parser.add_argument("--tls-ca", default=None, metavar="FILE",
                        help="CA certificate (PEM) an https:// center is verified against "
                             "(default $FDSHIP_TLS_CA, else the config file's tls_ca, else "
                             "the system's trust store)")
    parser.add_argument("--config", default=None,
                        help="an fdship TOML config to take center, token_file and tls_ca from")
    args = parser.parse_args(argv)
    conf = _config_file(args.config) if args.config else {}
    center = (args.center or os.environ.get("FDSHIP_CENTER") or conf.get("center")
              or DEFAULT_CENTER)
    token_file = args.token_file or conf.get("token_file", "")
    ca, origin = resolve_ca(args.tls_ca, conf.get("tls_ca", ""),
                            f"tls_ca of {args.config}")
    if ca:
        check_ca_file(ca, origin)
    return Options(center, read_token(token_file), ca, origin)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
        source = HTTPSource(opts.center, opts.token, tls_ca=opts.tls_ca)
    except FdshipError as e:
        print(f"fdship-tui: {e}", file=sys.stderr)
        return 2
    # Tornado logs every failed TLS handshake of a GET; the status line already
    # says what failed and what to do, and the screen is no place for log lines.
    logging.getLogger("tornado.general").setLevel(logging.ERROR)
    MonitorApp(source).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
