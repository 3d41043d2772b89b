"""The Textual app driven by keys (Pilot) against the in-memory fixture source."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import tui_fixtures as fx
from textual.pilot import Pilot
from tui_helpers import fixture_app, plain, ready, status, table, wait_until

from tui import app as tui_app
from tui.app import MonitorApp
from tui.screens import HostsScreen, JobScreen, JobsScreen
from tui.source import MemorySource
from tui.widgets import RowTable


def run(app: MonitorApp, body: Callable[[Pilot[Any]], Awaitable[None]],
        size: tuple[int, int] = (80, 24)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await ready(pilot)
            await body(pilot)

    asyncio.run(main())


def fits(app: Any, selector: str) -> None:
    """Every column of the table is visible without scrolling sideways."""
    t = table(app, selector)
    width = t.scrollable_content_region.width
    assert t.virtual_size.width <= width, (t.virtual_size.width, width)


def test_jobs_screen_newest_first_failures_red_fits_80x24() -> None:
    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app.screen, JobsScreen)
        t = table(app, "#jobs")
        assert t.keys == [fx.RUNNING, fx.FAILED, fx.DONE, fx.EMPTY_DONE]
        assert t.cell_text(fx.FAILED, "state") == "failed"
        assert "red" in str(t.cell(fx.FAILED, "state").style)
        assert "red" not in str(t.cell(fx.DONE, "state").style)
        assert t.cell_text(fx.RUNNING, "machines") == "2/12"
        assert t.cell_text(fx.RUNNING, "failed") == "2"
        assert t.cell_text(fx.RUNNING, "rate") == "612 MiB/s"
        assert t.cell_text(fx.RUNNING, "age") == "3m00s"
        fits(app, "#jobs")
        s = status(app)
        assert "live" in s and "1 failed" in s and "hosts 12/13 up, 1 dead" in s

    run(fixture_app(), body)


def test_enter_opens_job_failures_first_with_full_reason_and_escape_returns() -> None:
    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen)
                         and len(table(app, "#machines").keys) == 12, what="the job screen")
        t = table(app, "#machines")
        assert t.keys[:2] == ["web-04", "web-09"]
        assert t.keys[-2:] == ["web-01", "web-02"]
        assert "red" in str(t.cell("web-04", "state").style)
        assert "disk full on" in t.row_text("web-04")
        fits(app, "#machines")
        detail = app.screen.query_one("#machine-detail")
        assert fx.DISK_FULL in plain(detail)  # the whole reason, not a cut cell
        await pilot.press("down")
        await wait_until(pilot, lambda: fx.PERM in plain(detail), what="web-09's reason")
        assert "attempts 8" in plain(detail)
        header = plain(app.screen.query_one("#job-header"))
        assert fx.RUNNING in header and "2 done, 2 failed, 8 running of 12" in header
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen), what="back")

    run(fixture_app(), body)


def test_filter_failures_on_every_screen() -> None:
    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        await pilot.press("f")
        await wait_until(pilot, lambda: table(app, "#jobs").keys == [fx.RUNNING, fx.FAILED],
                         what="jobs filtered")
        assert "failures only" in status(app)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen)
                         and table(app, "#machines").keys == ["web-04", "web-09"],
                         what="machines filtered")
        await pilot.press("h")
        await wait_until(pilot, lambda: isinstance(app.screen, HostsScreen)
                         and table(app, "#hosts").keys == ["web-06"], what="dead hosts only")
        await pilot.press("f")
        await wait_until(pilot, lambda: len(table(app, "#hosts").keys) == 13, what="all hosts")
        assert "failures only" not in status(app)
        await pilot.press("j")
        await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen)
                         and len(table(app, "#jobs").keys) == 4, what="all jobs")

    run(fixture_app(), body)


async def open_hosts(pilot: Pilot[Any]) -> RowTable:
    app = pilot.app
    await pilot.press("h")
    await wait_until(pilot, lambda: isinstance(app.screen, HostsScreen)
                     and len(table(app, "#hosts").keys) == 13, what="hosts")
    return table(app, "#hosts")


def on_screen(t: RowTable, key: str | None = None) -> str:
    """What the table shows on its header line (key None) or a row's line right now:
    only the columns inside the terminal, not the ones scrolled out of sight."""
    y = 0 if key is None else t.keys.index(key) - t.scroll_offset.y + 1
    return t.render_line(y).text


def test_hosts_screen_dead_first_with_sparklines_and_keys_back() -> None:
    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        t = await open_hosts(pilot)
        assert t.keys[0] == "web-06"
        assert t.cell_text("web-06", "state") == "DEAD"
        assert "red" in str(t.cell("web-06", "state").style)
        spark = t.cell_text("web-01", "net")
        assert len(spark) == 12 and len(set(spark.strip())) > 2  # a shape, not a flat line
        assert t.cell_text("web-06", "net").strip() == "▁" * 12  # 14 samples, all zero
        assert t.cell_text("build-1", "tx") == "165M"  # the latest sample: 220M x 0.75
        fits(app, "#hosts")  # every column, the scheduler's included, in 120
        detail = plain(app.screen.query_one("#host-detail"))
        assert "10.0.0.16:7071" in detail and "last heartbeat 1m35s ago" in detail
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen), what="jobs")
        await pilot.press("h", "j")
        await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen), what="jobs via j")

    run(fixture_app(), body, size=(120, 30))


def test_hosts_screen_shows_app_cpu_busyness_and_learned_link() -> None:
    """Why a host gets fewer uploads (its app is busy) or is treated as slow."""
    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        t = await open_hosts(pilot)
        header = on_screen(t)
        for label in ("CPU", "APP", "BUSY", "LINK", "NET", "FREE", "I/O"):
            assert f" {label} " in header, (label, header)
        cols = ("cpu", "app", "busy", "link")
        # A busy bidder: yellow busyness, nothing else marked.
        assert [t.cell_text("web-03", c) for c in cols] == ["11%", "97%", "1.00", "↑112M ↓117M"]
        assert "yellow" in t.cell("web-03", "busy").style
        assert t.cell("web-03", "link").style == ""
        assert t.cell_text("web-04", "busy") == "0.54"
        assert "yellow" in t.cell("web-04", "busy").style
        # Below 0.5 the center still volunteers the host: plain.
        assert t.cell_text("web-02", "busy") == "0.30" and t.cell("web-02", "busy").style == ""
        # A slow link, marked in words and colour.
        assert t.cell_text("web-07", "link") == "↑9.35M ↓9.44M slow"
        assert "yellow" in t.cell("web-07", "link").style
        # Not measured yet, in either direction or one.
        assert t.cell_text("web-10", "link") == "↑? ↓?"
        assert t.cell_text("web-11", "link") == "↑? ↓96.0M"
        # No app CPU: nothing watched (web-08), or an old daemon without the field.
        assert [t.cell_text(k, "app") for k in ("web-08", "web-12", "build-1")] == ["-"] * 3
        assert t.cell_text("build-1", "link") == "↑230M ↓?"
        # The dead host's last report said busy and slow: history, not shown.
        assert [t.cell_text("web-06", c) for c in cols] == ["-"] * 4
        line = on_screen(t, "web-07")
        assert "15%" in line and "20%" in line and "0.00" in line and "slow" in line
        summary = plain(app.screen.query_one("#summary"))
        assert summary == "13 hosts · 12 up · 1 dead · 2 busy · 1 slow"
        # The panel says the same in words for the highlighted host.
        detail = app.screen.query_one("#host-detail")
        t.move_to("web-03")
        await wait_until(pilot, lambda: "busy: fewer uploads" in plain(detail), what="web-03")
        assert "app 97% (busy at 75%)  busyness 1.00  link ↑112M ↓117M" in plain(detail)
        t.move_to("web-07")
        await wait_until(pilot, lambda: "slow: common chunks, not first copies" in plain(detail),
                         what="web-07")
        assert "busy:" not in plain(detail)
        assert "caps" not in plain(detail)
        # A daemon's rate cap, and that its downlink is known only by it.
        t.move_to("web-11")
        await wait_until(pilot, lambda: "caps ↑- ↓96.0M (↓ not measured: the cap is the "
                         "estimate)" in plain(detail), what="web-11")
        t.move_to("web-12")
        await wait_until(pilot, lambda: "app -  busyness 0.00" in plain(detail), what="web-12")
        t.move_to("web-06")
        await wait_until(pilot, lambda: "DEAD" in plain(detail), what="web-06")
        assert "busyness" not in plain(detail)

    run(fixture_app(), body, size=(120, 30))


def test_hosts_at_80_columns_keep_the_scheduler_columns_in_view() -> None:
    """At 80x24 everything up to LINK is on screen; NET, FREE and I/O scroll in."""
    async def body(pilot: Pilot[Any]) -> None:
        t = await open_hosts(pilot)
        header = on_screen(t)
        assert "BUSY" in header and "LINK" in header and "FREE" not in header
        assert on_screen(t, "web-07").rstrip().endswith("↑9.35M ↓9.44M slow  ▆▇")
        assert "97%  1.00" in on_screen(t, "web-03")
        await pilot.press("ctrl+pagedown")
        await wait_until(pilot, lambda: t.scroll_offset.x > 0, what="scrolled sideways")
        assert "I/O" in on_screen(t) and "↑2 ↓3" in on_screen(t, "web-07")

    run(fixture_app(), body)


def test_a_host_event_updates_busyness_link_and_the_counts() -> None:
    src = fx.source()

    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        t = await open_hosts(pilot)
        assert t.cell_text("web-01", "busy") == "0.00"
        src.push("host", fx.host("web-01", 1, tx=fx.MiB, rx=fx.MiB, app_cpu=140.0,
                                 busyness=0.9, link=(20 * fx.MiB, 2 * fx.MiB, True)))
        await wait_until(pilot, lambda: t.cell_text("web-01", "busy") == "0.90", what="busy")
        assert [t.cell_text("web-01", c) for c in ("app", "link")] == \
            ["140%", "↑20.0M ↓2.00M slow"]
        summary = app.screen.query_one("#summary")
        await wait_until(pilot, lambda: "3 busy · 2 slow" in plain(summary), what="counts")

    run(fixture_app(src), body, size=(120, 30))


def test_live_events_update_the_open_job_and_keep_the_cursor_on_its_machine() -> None:
    src = fx.source()

    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen)
                         and len(table(app, "#machines").keys) == 12, what="job screen")
        t = table(app, "#machines")
        await pilot.press("down", "down")  # onto web-03
        await wait_until(pilot, lambda: t.selected_key() == "web-03", what="cursor")
        src.push("machine", {"job": fx.RUNNING, "machine": "web-10", "state": "failed",
                             "error": "connection reset by web-03 after 3 retries"})
        await wait_until(pilot, lambda: t.keys[:3] == ["web-04", "web-09", "web-10"],
                         what="web-10 failed moves up")
        assert t.selected_key() == "web-03"  # the reorder did not move the person's cursor
        assert t.cell_text("web-10", "state") == "failed"
        src.push("machine", {"job": fx.RUNNING, "machine": "web-03", "state": "fetching",
                             "bytes_done": 150 * fx.MiB, "bytes_total": 160 * 4 * fx.MiB,
                             "rate": 10 * fx.MiB, "eta": 49.0})
        await wait_until(pilot, lambda: t.cell_text("web-03", "eta") == "49s", what="eta")
        assert t.cell_text("web-03", "pct") == "23%"
        src.push("job", {"job": fx.RUNNING, "state": "failed", "finished": fx.NOW_ISO,
                         "machines": {"total": 12, "done": 9, "failed": 3, "running": 0}})
        header = app.screen.query_one("#job-header")
        await wait_until(pilot, lambda: "failed" in plain(header).split("\n")[0],
                         what="job header turns failed")
        assert "took 3m00s" in plain(header)

    run(fixture_app(src), body)


def test_reconnecting_is_shown_then_fresh_state_after_reconnect() -> None:
    src = fx.source()

    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        src.disconnect(retry_in=2.0, error="cannot reach the center: connection refused")
        await wait_until(pilot, lambda: "reconnecting in 2s…" in status(app),
                         what="reconnecting shown")
        assert "connection refused" in status(app)
        assert app.screen.query_one("#status").has_class("-reconnecting")
        # While away, the center finished the job; the snapshot on reconnect says so.
        src.jobs[fx.RUNNING] = {**src.jobs[fx.RUNNING], "state": "done",
                                "machines": {"total": 12, "done": 12, "failed": 0,
                                             "running": 0}}
        src.reconnect()
        await wait_until(pilot, lambda: "live" in status(app), what="live again")
        t = table(app, "#jobs")
        await wait_until(pilot, lambda: t.cell_text(fx.RUNNING, "state") == "done",
                         what="fresh state")
        assert not app.screen.query_one("#status").has_class("-reconnecting")

    run(fixture_app(src), body)


def test_reconnect_countdown_follows_the_clock() -> None:
    now = [fx.NOW]
    src = fx.source()
    app = fixture_app(src, clock=lambda: now[0], tick=0.05)

    async def body(pilot: Pilot[Any]) -> None:
        src.disconnect(retry_in=5.0)
        await wait_until(pilot, lambda: "reconnecting in 5s…" in status(app), what="5s")
        now[0] += 3.2
        await wait_until(pilot, lambda: "reconnecting in 2s…" in status(app), what="2s")

    run(app, body)


def test_reopening_a_job_refetches_and_snapshot_refetches_the_open_job() -> None:
    src = fx.source()

    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        await pilot.press("enter")
        await wait_until(pilot, lambda: src.job_requests == [fx.RUNNING], what="first fetch")
        src.reconnect()
        await wait_until(pilot, lambda: src.job_requests == [fx.RUNNING, fx.RUNNING],
                         what="refetch after reconnect")
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen), what="jobs")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(src.job_requests) == 3, what="refetch on reopen")

    run(fixture_app(src), body)


def test_job_that_cannot_be_loaded_says_why() -> None:
    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        await pilot.press("down", "down", "enter")  # the done job: no detail in fixtures
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen), what="job screen")
        assert isinstance(app.screen, JobScreen) and app.screen.job_id == fx.DONE
        panel = app.screen.query_one("#machine-detail")
        await wait_until(pilot, lambda: f"no job {fx.DONE}" in plain(panel), what="error")

    run(fixture_app(), body)


def test_empty_center_and_quit() -> None:
    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert app.screen.query_one("#empty").display
        await pilot.press("q")
        await wait_until(pilot, lambda: app.return_code is not None or not app.is_running,
                         what="quit")

    async def main() -> None:
        app = fixture_app(MemorySource())
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: "live" in status(app), what="live")
            await body(pilot)

    asyncio.run(main())


def test_100x30_gives_the_error_column_more_room() -> None:
    async def body(pilot: Pilot[Any]) -> None:
        app = pilot.app
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen)
                         and len(table(app, "#machines").keys) == 12, what="job screen")
        t = table(app, "#machines")
        row = t.row_text("web-04").rstrip()
        assert row.endswith("…") and fx.DISK_FULL[:30] in row
        assert t.cell_text("web-04", "error") == fx.DISK_FULL  # cut on screen only
        fits(app, "#machines")

    run(fixture_app(), body, size=(100, 30))


# --- command line -----------------------------------------------------------------------


def test_cli_defaults_and_precedence(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FDSHIP_CENTER", raising=False)
    monkeypatch.delenv("FDSHIP_TOKEN", raising=False)
    monkeypatch.delenv("FDSHIP_TLS_CA", raising=False)
    assert tui_app.parse_args([]) == ("http://127.0.0.1:7070", "", "", "")
    monkeypatch.setenv("FDSHIP_CENTER", "http://10.1.1.1:7070")
    assert tui_app.parse_args([])[0] == "http://10.1.1.1:7070"
    assert tui_app.parse_args(["--center", "http://c:1"])[0] == "http://c:1"
    tok = tmp_path / "token"
    tok.write_text("from-file\n")
    os.chmod(tok, 0o600)
    assert tui_app.parse_args(["--token-file", str(tok)])[1] == "from-file"
    monkeypatch.setenv("FDSHIP_TOKEN", "from-env")  # the CONTRACT: the variable wins
    assert tui_app.parse_args(["--token-file", str(tok)])[1] == "from-env"
    monkeypatch.delenv("FDSHIP_TOKEN")
    monkeypatch.delenv("FDSHIP_CENTER")
    conf = tmp_path / "daemon.toml"
    conf.write_text(f'center = "http://10.2.2.2:7070"\ntoken_file = "{tok}"\nlisten = "x"\n')
    opts = tui_app.parse_args(["--config", str(conf)])
    assert (opts.center, opts.token, opts.tls_ca) == ("http://10.2.2.2:7070", "from-file", "")


def test_cli_bad_input_exits_2_with_a_sentence(tmp_path: Any, capsys: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FDSHIP_TOKEN", raising=False)
    tok = tmp_path / "token"
    tok.write_text("t")
    os.chmod(tok, 0o644)
    assert tui_app.main(["--token-file", str(tok)]) == 2
    assert "chmod 600" in capsys.readouterr().err
    assert tui_app.main(["--center", "localhost:7070"]) == 2
    assert "must look like http://HOST:PORT" in capsys.readouterr().err
    assert tui_app.main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("center = [")
    assert tui_app.main(["--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
