"""The TUI's pure view model: formatting, rows, sorting, filters, folding, bounds.

No Textual here: tui.view must stay importable and testable without it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import tui_fixtures as fixtures

from tui import view as v
from tui.view import (
    ClusterView,
    HostHistory,
    human_bytes,
    human_duration,
    human_percent,
    human_rate,
    job_row,
    machine_row,
    parse_time,
    progress_bar,
    sparkline,
)

NOW = fixtures.NOW


# --- formatting -------------------------------------------------------------------------


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"),
    (10 * 1024, "10.0 KiB"), (1023 * 1024, "1023 KiB"), (1024 * 1024 - 1, "1.00 MiB"),
    (640 * 1024**2, "640 MiB"), (1024**3, "1.00 GiB"), (1.5 * 1024**4, "1.50 TiB"),
    (5 * 1024**6, "5120 PiB"), (None, "-"), (float("nan"), "-"), (float("inf"), "-"),
    ("junk", "-"), (-2048, "-2.00 KiB"),
])
def test_human_bytes(n: object, text: str) -> None:
    assert human_bytes(n) == text  # type: ignore[arg-type]


def test_human_bytes_short_and_rates() -> None:
    assert human_bytes(1536, short=True) == "1.50K"
    assert human_bytes(999, short=True) == "999B"
    assert human_rate(81.2 * 1024**2) == "81.2 MiB/s"
    assert human_rate(81.2 * 1024**2, short=True) == "81.2M"
    assert human_rate(0) == "0 B/s"
    assert human_rate(None) == "-"


@pytest.mark.parametrize("s, text", [
    (0, "0s"), (0.9, "0s"), (9.99, "9s"), (59, "59s"), (60, "1m00s"), (65, "1m05s"),
    (3599, "59m59s"), (3600, "1h00m"), (7380, "2h03m"), (86399, "23h59m"),
    (86400, "1d00h"), (3 * 86400 + 4 * 3600, "3d04h"), (-5, "0s"), (None, "-"),
    (float("nan"), "-"),
])
def test_human_duration(s: object, text: str) -> None:
    assert human_duration(s) == text  # type: ignore[arg-type]


@pytest.mark.parametrize("f, text", [
    (0, "0%"), (0.423, "42%"), (0.999, "99%"), (0.9999999, "99%"), (1.0, "100%"),
    (1.7, "100%"), (-0.1, "0%"), (None, "-"),
])
def test_human_percent_never_claims_100_early(f: object, text: str) -> None:
    assert human_percent(f) == text  # type: ignore[arg-type]


def test_progress_bar() -> None:
    assert progress_bar(0, 4) == "    "
    assert progress_bar(1, 4) == "████"
    assert progress_bar(0.5, 4) == "██  "
    assert progress_bar(0.5625, 4) == "██▎ "  # 2.25 cells
    assert len(progress_bar(0.37, 13)) == 13
    assert progress_bar(None, 3) == "   "


def test_parse_time() -> None:
    assert parse_time("1970-01-01T00:00:10Z") == 10.0
    assert parse_time("1970-01-01T00:00:10.5+00:00") == 10.5
    assert parse_time("1970-01-01T01:00:10+01:00") == 10.0
    assert parse_time("1970-01-01T00:00:10") == 10.0  # no zone: the center writes UTC
    assert parse_time(12) == 12.0
    bad: list[object] = ["", "yesterday", None, True, []]
    for value in bad:
        assert parse_time(value) is None


def test_ellipsize() -> None:
    assert v.ellipsize("abcdef", 6) == "abcdef"
    assert v.ellipsize("abcdefg", 6) == "abcde…"
    assert v.ellipsize("abc", 0) == ""


# --- sparklines and history ---------------------------------------------------------------


def test_sparkline_scales_and_pads() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 10], 4) == "  ▅█"
    assert sparkline([0, 0, 0], 3) == "▁▁▁"  # idle, but there
    assert sparkline([], 3) == "   "
    assert sparkline(list(range(100)), 5) == "█████"  # 95..99 against a peak of 99
    # Only the newest `width` samples are drawn, scaled to their own peak.
    assert sparkline([1000, 1, 2], 2) == "▅█"
    assert sparkline([1, 2], 2, top=8) == "▂▃"
    assert sparkline([1, 2], 0) == ""


def test_host_history_is_bounded() -> None:
    h = HostHistory(5)
    for i in range(100):
        h.add(i, 2 * i)
    assert len(h) == 5
    assert list(h.tx) == [95, 96, 97, 98, 99]
    assert h.total() == [3 * i for i in range(95, 100)]
    assert len(h.spark(8)) == 8
    with pytest.raises(ValueError):
        HostHistory(0)


# --- rows ----------------------------------------------------------------------------------


def test_job_row_running_with_failures_is_marked_failed() -> None:
    job = fixtures.jobs()[0]
    row = job_row(job, NOW)
    assert row.state == "running"
    assert row.severity == v.FAIL  # a failed machine in a running job still needs a person
    assert (row.done, row.failed, row.running, row.total) == (2, 2, 8, 12)
    assert row.machines == "2/12"
    assert row.rate == "612 MiB/s"
    assert row.age == "3m00s"
    assert row.percent == f"{int(job['progress'] * 100)}%"


def test_job_row_states_and_missing_fields() -> None:
    done = job_row({"job": "a", "state": "done", "created": fixtures._ts(65),
                    "machines": {"total": 3, "done": 3}}, NOW)
    assert (done.severity, done.percent, done.rate, done.age) == (v.OK, "100%", "-", "1m05s")
    bare = job_row({"job": "b"}, NOW)
    assert (bare.state, bare.severity, bare.percent, bare.age, bare.machines) == \
        ("running", v.BUSY, "-", "-", "0/0")
    # Progress from bytes when the center gives no fraction.
    assert job_row({"job": "c", "bytes_total": 200, "bytes_done": 50}, NOW).percent == "25%"
    # Counts derived when 'total' is missing.
    assert job_row({"job": "d", "machines": {"done": 2, "failed": 1, "running": 1}},
                   NOW).total == 4


def test_machine_row_fetching_eta_from_rate() -> None:
    m = {"state": "fetching", "bytes_done": 100 * 1024**2, "bytes_total": 300 * 1024**2,
         "chunks_done": 25, "chunks_total": 75, "rate": 50 * 1024**2, "attempts": 2}
    row = machine_row("web-1", m)
    assert row.percent == "33%"
    assert row.eta == "4s"  # 200 MiB at 50 MiB/s
    assert row.rate == "50.0 MiB/s"
    assert row.chunks == "25/75"
    assert row.bytes == "100 MiB/300 MiB"
    assert row.severity == v.BUSY
    # The center's own ETA wins over ours.
    assert machine_row("web-1", {**m, "eta": 125}).eta == "2m05s"


def test_machine_row_failed_keeps_full_reason() -> None:
    row = machine_row("web-9", fixtures.running_machines()["web-09"])
    assert row.severity == v.FAIL
    assert row.error == fixtures.PERM  # never cut in the view
    assert row.eta == "-" and row.rate == "-"
    assert row.attempts == 8


def test_machine_row_done_pending_packing() -> None:
    ms = fixtures.running_machines()
    done = machine_row("web-01", ms["web-01"])
    assert (done.percent, done.eta, done.took, done.severity) == ("100%", "-", "1m12s", v.OK)
    pending = machine_row("web-12", ms["web-12"])
    assert (pending.severity, pending.percent, pending.rate) == (v.IDLE, "0%", "-")
    packing = machine_row("web-11", ms["web-11"])
    assert (packing.state, packing.rate) == ("packing", "-")
    assert machine_row("x", {}).chunks == "-"
    retrying = machine_row("web-07", ms["web-07"])
    assert (retrying.state, retrying.last_error, retrying.error) == \
        ("fetching", fixtures.RETRYING, "")
    # A failed machine's reason is its error; an old last_error is not repeated.
    assert machine_row("m", {"state": "failed", "error": "e", "last_error": "l"}).last_error == ""


def test_host_row_alive_and_dead() -> None:
    hist = HostHistory(10)
    hist.add(1.0, 1.0)
    hist.add(2.0, 2.0)
    live = v.host_row(fixtures.host("web-03", 3, tx=10 * 1024**2, rx=1024, cpu=12.4), hist,
                      NOW, spark_width=4)
    assert (live.status, live.severity, live.cpu, live.tx, live.rx) == \
        ("up", v.OK, "12%", "10.0M", "1.00K")
    assert live.spark == "  ▅█"  # 2 of 4 -> 3.5 of 7 -> rounds to 4
    assert live.free == "51.0G"  # the tightest: /var/lib/fdship, not /srv (173G)
    assert live.inflight == "↑2 ↓3"
    assert live.labels == "web"
    assert live.heartbeat == "0s"
    dead = v.host_row(fixtures.host("web-06", 6, alive=False, cpu=50), None, NOW)
    assert (dead.status, dead.severity, dead.cpu, dead.tx, dead.inflight) == \
        ("DEAD", v.FAIL, "-", "-", "-")
    assert dead.heartbeat == "1m35s"
    # Heartbeat age from the timestamp when the center sends no age.
    h = fixtures.host("a", 1)
    del h["heartbeat_age"]
    h["last_heartbeat"] = fixtures._ts(12)
    assert v.host_row(h, None, NOW).heartbeat == "12s"


def test_host_row_shows_app_cpu_busyness_and_link_of_a_live_host() -> None:
    """The example row of docs/protocol.md: a busy bidder with a measured link."""
    h = fixtures.host("web-7", 7, app_cpu=97.0, busyness=1.0,
                      link=(9_800_000, 9_900_000, False))
    r = v.host_row(h, None, NOW)
    assert (r.app_cpu, r.app_busy_at, r.busyness, r.busy_severity) == \
        ("97%", "75%", "1.00", v.BUSY)
    # Bytes/s in the binary units of the TX/RX columns: 9.8e6 B/s is 9.35 MiB/s.
    assert (r.link, r.slow, r.link_severity) == ("↑9.35M ↓9.44M", False, v.OK)
    assert r.steering == "busy: fewer uploads, no volunteering"
    # An app beyond one core reads like top: 250 is two and a half cores.
    assert v.host_row(fixtures.host("b", 1, app_cpu=250.4), None, NOW).app_cpu == "250%"


@pytest.mark.parametrize(("busyness", "text", "severity"), [
    (0.0, "0.00", v.OK),
    (0.35, "0.35", v.OK),
    (0.499, "0.50", v.OK),  # shown rounded, but below the line the center draws
    (0.5, "0.50", v.BUSY),  # from here the center stops volunteering the host
    (1.0, "1.00", v.BUSY),
])
def test_host_row_busy_severity_from_one_half(busyness: float, text: str,
                                              severity: str) -> None:
    r = v.host_row(fixtures.host("a", 1, busyness=busyness), None, NOW)
    assert (r.busyness, r.busy_severity) == (text, severity)
    assert ("busy:" in r.steering) == (severity == v.BUSY)


def test_host_row_link_unknown_directions_and_slow() -> None:
    def link(up: float, down: float, slow: bool) -> v.HostRow:
        return v.host_row(fixtures.host("a", 1, link=(up, down, slow)), None, NOW)

    # 0 is 'not measured yet', each direction on its own.
    assert link(0, 0, False).link == "↑? ↓?"
    assert link(0, 96 * 1024**2, False).link == "↑? ↓96.0M"
    assert link(230 * 1024**2, 0, False).link == "↑230M ↓?"
    slow = link(9_800_000, 512, True)
    assert (slow.link, slow.slow, slow.link_severity) == ("↑9.35M ↓512B slow", True, v.BUSY)
    assert slow.steering == "slow: common chunks, not first copies"
    # Busy and slow at once: both reasons, on one line that fits 80 columns.
    both = v.host_row(fixtures.host("a", 1, busyness=0.8, link=(1, 1, True)), None, NOW)
    assert both.steering == ("busy: fewer uploads, no volunteering; "
                             "slow: common chunks, not first copies")
    assert len(both.steering) <= 78
    # The widest link still fits the table's 20-cell column whole.
    widest = link(1023 * 1024**2, 1023 * 1024**2, True).link
    assert widest == "↑1023M ↓1023M slow" and len(widest) == 18


def test_host_row_caps_for_the_panel() -> None:
    """The daemon's rate caps reach the panel, saying when a direction's
    estimate is still only its cap; nothing when there are none."""
    h = fixtures.host("a", 1, link=(0, 1024**2, True))
    assert v.host_row(h, None, NOW).caps == ""
    h["link"] |= {"down_cap": 1024**2, "measured": {"up": False, "down": False}}
    row = v.host_row(h, None, NOW)
    assert row.link == "↑? ↓1.00M slow"
    assert row.caps == "caps ↑- ↓1.00M (↓ not measured: the cap is the estimate)"
    h["link"] |= {"up_cap": 50 * 1024**2, "up": 9_800_000,
                  "measured": {"up": True, "down": True}}
    assert v.host_row(h, None, NOW).caps == "caps ↑50.0M ↓1.00M"
    # A center from before caps were reported: no 'measured', no claim about it.
    del h["link"]["measured"]
    assert v.host_row(h, None, NOW).caps == "caps ↑50.0M ↓1.00M"


def test_host_row_dead_host_shows_no_scheduler_state() -> None:
    """A dead host's last report is history: no app CPU, busyness nor link."""
    h = fixtures.host("web-06", 6, alive=False, app_cpu=99.0, busyness=1.0,
                      link=(9_800_000, 9_900_000, True))
    r = v.host_row(h, None, NOW)
    assert (r.app_cpu, r.busyness, r.link) == ("-", "-", "-")
    assert (r.busy_severity, r.link_severity, r.slow, r.steering) == (v.IDLE, v.IDLE, False, "")


def test_host_row_older_daemon_and_center_and_no_watched_app() -> None:
    # An older daemon's heartbeat has no app_cpu: read as 0, shown as '-'.
    old_daemon = fixtures.host("a", 1, app_cpu=None)
    assert "app_cpu" not in old_daemon["load"]
    r = v.host_row(old_daemon, None, NOW)
    assert (r.app_cpu, r.app_busy_at, r.busyness) == ("-", "-", "0.00")
    # 0: nothing watched, or the pidfile names no running process.
    assert v.host_row(fixtures.host("a", 1, app_cpu=0.0), None, NOW).app_cpu == "-"
    # An older center sends neither busyness nor link.
    old_center = fixtures.host("a", 1, busyness=None, link=None)
    assert "busyness" not in old_center and "link" not in old_center
    r = v.host_row(old_center, None, NOW)
    assert (r.busyness, r.busy_severity, r.link, r.link_severity, r.slow) == \
        ("-", v.IDLE, "-", v.IDLE, False)


@pytest.mark.parametrize("bad", ["busy", "", float("nan"), float("inf"), -3.0, True, False,
                                 None, [1], {"x": 1}])
def test_host_row_malformed_scheduler_values_show_dash(bad: object) -> None:
    h = fixtures.host("a", 1)
    h["load"]["app_cpu"] = bad
    h["load"]["app_cpu_busy"] = bad
    h["busyness"] = bad
    h["link"] = {"up": bad, "down": bad, "slow": False}
    r = v.host_row(h, None, NOW)
    assert (r.app_cpu, r.app_busy_at, r.busyness, r.busy_severity) == ("-", "-", "-", v.IDLE)
    # A direction that is not a positive rate is as good as unmeasured.
    assert (r.link, r.slow, r.link_severity) == ("↑? ↓?", False, v.OK)


def test_host_row_numeric_strings_read_like_the_cpu_column() -> None:
    # The shared helper reads a number sent as a string, as it does for 'cpu'.
    h = fixtures.host("a", 1)
    h["load"].update(cpu="12", app_cpu="97")
    h["busyness"] = "0.6"
    r = v.host_row(h, None, NOW)
    assert (r.cpu, r.app_cpu, r.busyness, r.busy_severity) == ("12%", "97%", "0.60", v.BUSY)


@pytest.mark.parametrize("slow", ["true", "slow", 1, 1.0, [True], None])
def test_host_row_only_a_real_true_makes_a_host_slow(slow: object) -> None:
    h = fixtures.host("a", 1)
    h["link"]["slow"] = slow
    r = v.host_row(h, None, NOW)
    assert (r.slow, r.link, r.link_severity, r.steering) == (False, "↑? ↓?", v.OK, "")


@pytest.mark.parametrize("link", ["slow", 1, True, [9_800_000, 9_900_000], None])
def test_host_row_link_that_is_not_an_object_shows_dash(link: object) -> None:
    h = fixtures.host("a", 1)
    h["link"] = link
    r = v.host_row(h, None, NOW)
    assert (r.link, r.slow, r.link_severity) == ("-", False, v.IDLE)


def test_totals_count_busy_and_slow_live_hosts() -> None:
    cv = ClusterView()
    cv.load_snapshot([], [
        fixtures.host("idle", 1, busyness=0.2),
        fixtures.host("busy", 2, busyness=0.5),
        fixtures.host("slow", 3, link=(1, 1, True)),
        fixtures.host("both", 4, busyness=1.0, link=(1, 1, True)),
        # Dead hosts count as dead, not busy or slow: their report is history.
        fixtures.host("dead", 5, alive=False, busyness=1.0, link=(1, 1, True)),
        fixtures.host("old", 6, busyness=None, link=None),
        fixtures.host("junk", 7, busyness="busy", link=(1, 1, "yes")),  # type: ignore[arg-type]
    ])
    t = cv.totals()
    assert (t["hosts"], t["alive"], t["dead"], t["busy"], t["slow"]) == (7, 6, 1, 2, 2)


def test_job_header() -> None:
    d = fixtures.details()[fixtures.RUNNING]
    h = v.job_header(d, NOW)
    assert h.files == "2 files"
    assert h.machines == "2 done, 2 failed, 8 running of 12"
    assert h.created == "3m00s ago" and h.took == "-"
    assert h.callback.startswith("http://deploy.example:8080/done (pending)")
    f = v.job_header(fixtures.jobs()[1], NOW)
    assert (f.took, f.files, f.severity) == ("1m10s", "1 file", v.FAIL)


# --- sorting and filters --------------------------------------------------------------------


def test_jobs_newest_first_and_failure_filter() -> None:
    cv = ClusterView()
    cv.load_snapshot(fixtures.jobs(), [])
    rows = cv.job_rows(NOW)
    assert [r.job for r in rows] == [fixtures.RUNNING, fixtures.FAILED, fixtures.DONE,
                                     fixtures.EMPTY_DONE]
    assert [r.job for r in cv.job_rows(NOW, failures=True)] == [fixtures.RUNNING,
                                                                 fixtures.FAILED]


def test_machines_failures_first_then_in_flight() -> None:
    cv = ClusterView()
    cv.load_job(fixtures.details()[fixtures.RUNNING])
    rows = cv.machine_rows(fixtures.RUNNING)
    states = [r.state for r in rows]
    assert states[:2] == ["failed", "failed"]
    assert states.index("pending") > states.index("fetching")
    assert states[-2:] == ["done", "done"]
    assert [r.machine for r in rows[:2]] == ["web-04", "web-09"]
    assert [r.machine for r in cv.machine_rows(fixtures.RUNNING, failures=True)] == \
        ["web-04", "web-09"]
    assert cv.machine_rows("nope") == []


def test_hosts_dead_first() -> None:
    cv = ClusterView()
    cv.load_snapshot([], fixtures.hosts())
    rows = cv.host_rows(NOW)
    assert rows[0].name == "web-06" and not rows[0].alive
    assert [r.name for r in rows[1:4]] == ["build-1", "web-01", "web-02"]
    assert [r.name for r in cv.host_rows(NOW, failures=True)] == ["web-06"]


# --- folding --------------------------------------------------------------------------------


def test_fold_events_upserts_and_reports_changes() -> None:
    cv = ClusterView()
    cv.load_snapshot(fixtures.jobs(), fixtures.hosts())
    ch = cv.apply("job", {"job": fixtures.RUNNING, "state": "failed",
                          "machines": {"total": 12, "done": 10, "failed": 2, "running": 0}})
    assert ch.jobs and not ch.hosts and not ch.job_ids
    row = cv.job_rows(NOW)[0]
    assert (row.state, row.done, row.rate) == ("failed", 10, "-")
    assert row.source == "build-1"  # fields the event did not carry are kept

    ch = cv.apply("machine", {"job": fixtures.RUNNING, "machine": "web-05",
                              "state": "failed", "error": "boom"})
    assert ch.job_ids == {fixtures.RUNNING} and not ch.jobs
    (m,) = cv.machine_rows(fixtures.RUNNING, failures=True)
    assert (m.machine, m.error) == ("web-05", "boom")

    ch = cv.apply("host", {**fixtures.host("web-06", 6), "alive": True})
    assert ch.hosts
    assert cv.totals()["dead"] == 0
    assert cv.events == 3
    # Unknown kinds and malformed data change nothing.
    assert not cv.apply("compaction", {"x": 1})
    assert not cv.apply("job", ["not", "a", "dict"])
    assert not cv.apply("job", {"no": "id"})
    assert not cv.apply("machine", {"job": "x"})
    assert not cv.apply("host", {"name": 5})
    assert cv.events == 3 + 3  # the malformed job/machine/host ones counted as seen


def test_fold_is_idempotent() -> None:
    """Replaying an event (resume after reconnect) leaves the same picture."""
    a, b = ClusterView(), ClusterView()
    for cv in (a, b):
        cv.load_snapshot(fixtures.jobs(), fixtures.hosts())
    evs = [("machine", {"job": fixtures.RUNNING, "machine": f"web-{i:02d}", "state": "done",
                        "bytes_done": 1, "bytes_total": 1}) for i in range(1, 5)]
    for kind, data in evs:
        a.apply(kind, data)
    for kind, data in evs + evs:
        b.apply(kind, data)
    assert a.machine_rows(fixtures.RUNNING) == b.machine_rows(fixtures.RUNNING)
    assert a.job_rows(NOW) == b.job_rows(NOW)


def test_machine_event_name_field_variants() -> None:
    for key in ("machine", "name", "host"):
        cv = ClusterView()
        cv.apply("machine", {"job": "j", key: "m1", "state": "done"})
        assert [r.machine for r in cv.machine_rows("j")] == ["m1"]


def test_snapshot_replaces_jobs_and_hosts_but_keeps_history_of_known_hosts() -> None:
    cv = ClusterView()
    cv.load_snapshot(fixtures.jobs(), fixtures.hosts())
    for h in fixtures.host_history_events(5):
        cv.apply("host", h)
    assert len(cv.history["web-01"]) == 6
    cv.load_snapshot(fixtures.jobs()[:1], fixtures.hosts()[:3])
    assert list(cv.jobs) == [fixtures.RUNNING]
    assert set(cv.hosts) == {"build-1", "web-01", "web-02"}
    assert set(cv.history) == {"build-1", "web-01", "web-02"}
    assert len(cv.history["web-01"]) == 7


def test_dead_host_history_records_zero() -> None:
    cv = ClusterView(history_size=3)
    cv.apply("host", fixtures.host("a", 1, tx=100, rx=100))
    cv.apply("host", fixtures.host("a", 1, alive=False, tx=100, rx=100))
    assert cv.history["a"].total() == [200.0, 0.0]


def test_load_job_and_summary_merge() -> None:
    cv = ClusterView()
    cv.load_snapshot(fixtures.jobs(), [])
    assert not cv.has_detail(fixtures.RUNNING)
    ch = cv.load_job(fixtures.details()[fixtures.RUNNING])
    assert ch.job_ids == {fixtures.RUNNING}
    assert cv.has_detail(fixtures.RUNNING)
    assert len(cv.machine_rows(fixtures.RUNNING)) == 12
    # A job only known through its detail appears in the list with derived counts.
    cv2 = ClusterView()
    cv2.load_job(fixtures.details()[fixtures.FAILED])
    (row,) = cv2.job_rows(NOW)
    assert (row.total, row.failed, row.done) == (5, 1, 4)
    # A job event also refreshes the header of the detailed job.
    cv.apply("job", {"job": fixtures.RUNNING, "state": "done", "finished": fixtures.NOW_ISO})
    assert cv.header(fixtures.RUNNING, NOW).state == "done"
    assert cv.header(fixtures.RUNNING, NOW).took == "3m00s"
    assert not cv.load_job({"no": "id"})


def test_jobs_bounded_dropping_oldest_finished_first() -> None:
    cv = ClusterView(max_jobs=3)
    cv.apply("job", {"job": "a-old-running", "state": "running", "created": fixtures._ts(900)})
    for i in range(10):
        cv.apply("job", {"job": f"b-{i}", "state": "done", "created": fixtures._ts(800 - i)})
    assert len(cv.jobs) == 3
    assert "a-old-running" in cv.jobs
    assert set(cv.jobs) == {"a-old-running", "b-8", "b-9"}


def test_details_bounded_lru() -> None:
    cv = ClusterView(max_details=2)
    for j in ("j1", "j2", "j3"):
        cv.apply("machine", {"job": j, "machine": "m", "state": "pending"})
    assert list(cv.details) == ["j2", "j3"]
    cv.apply("machine", {"job": "j2", "machine": "m", "state": "done"})
    cv.apply("machine", {"job": "j4", "machine": "m", "state": "done"})
    assert list(cv.details) == ["j2", "j4"]


def test_view_imports_no_textual() -> None:
    code = ("import sys, tui.view, tui.source; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('textual', 'tornado')]; "
            "print(bad); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
