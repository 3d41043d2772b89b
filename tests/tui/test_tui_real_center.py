"""fdship-tui against a REAL center: `fdship center` and four `fdship daemon` processes.

Everything is real: the processes, their sockets on 127.0.0.1, the files
shipped, the REDO log the center replays after a kill -9.  The TUI runs in
this process (Textual's Pilot, 80x24) following the center over HTTP and
server-sent events exactly as `fdship-tui --center URL` does.

One target cannot take the file (its destination path is a directory), so the
job ends failed with that machine's reason, which the TUI must show.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from tui_helpers import plain, settled, status, table, wait_until

from fdship.localcluster import LocalCluster
from tui.app import MonitorApp
from tui.screens import HostsScreen, JobScreen, JobsScreen
from tui.source import Backoff, HTTPSource

MiB = 1024 * 1024
TARGETS = ["d1", "d2", "d3"]
BROKEN = "d3"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = str(tmp_path_factory.mktemp("tui-real"))
    c = LocalCluster(4, base, center_args=["--chunk-size", "1M"],
                     daemon_args={i: ["--heartbeat-interval", "0.5"] for i in range(4)})
    try:
        c.start()
        yield c
    finally:
        c.stop()


def source_file(cluster: LocalCluster, name: str, size: int) -> str:
    d = os.path.join(cluster.tmp, "src")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.writelines(os.urandom(MiB) for _ in range(size // MiB))
    # The broken target: a directory sits where the file must land.
    os.makedirs(os.path.join(cluster.root(3), path.lstrip("/")), exist_ok=True)
    return path


def make_app(cluster: LocalCluster) -> MonitorApp:
    src = HTTPSource(cluster.center.url, backoff=Backoff(base=0.2, cap=1.0, jitter=0))
    return MonitorApp(src, tick=0.5)


async def live_with_hosts(pilot: Any, n: int) -> None:
    app = pilot.app
    await wait_until(pilot, lambda: "live" in status(app) and f"hosts {n}/{n} up" in status(app),
                     timeout=30, what=f"live with {n} hosts up")


async def check_failed_job_on_screen(pilot: Any, job_id: str) -> None:
    """The Jobs row, then the Job screen with the failed machine's reason."""
    app = pilot.app
    await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen)
                     and job_id in table(app, "#jobs").keys
                     and table(app, "#jobs").cell_text(job_id, "state") == "failed",
                     timeout=30, what="the job shown failed")
    t = table(app, "#jobs")
    assert t.keys[0] == job_id  # newest first
    assert t.cell_text(job_id, "machines") == "2/3"
    assert t.cell_text(job_id, "failed") == "1"
    assert "red" in t.cell(job_id, "state").style
    await pilot.press("enter")
    await settled(pilot, lambda: isinstance(app.screen, JobScreen)
                  and len(table(app, "#machines").keys) == 3, what="the job's machines")
    m = table(app, "#machines")
    assert m.keys[0] == BROKEN  # failures first
    assert [m.cell_text(k, "state") for k in m.keys] == ["failed", "done", "done"]
    # The cursor stays on the machine it was on while rows re-sort, and the
    # machines may first arrive in another order: go to the top row (the
    # failure) before reading the detail of the selected machine.
    await pilot.press("home")
    await settled(pilot, lambda: m.selected_key() == BROKEN, what="the failed machine selected")
    detail = plain(app.screen.query_one("#machine-detail"))
    assert "is a directory" in detail and "remove it or choose another --dest" in detail
    header = plain(app.screen.query_one("#job-header"))
    assert "2 done, 1 failed, 0 running of 3" in header and "failed" in header
    await pilot.press("escape")
    await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen), what="back to jobs")


def test_tui_shows_a_real_job_with_a_failed_machine_and_its_reason(
        cluster: LocalCluster) -> None:
    path = source_file(cluster, "model.bin", 16 * MiB)

    async def main() -> None:
        app = make_app(cluster)
        async with app.run_test(size=(80, 24)) as pilot:
            await live_with_hosts(pilot, 4)
            res = await asyncio.to_thread(cluster.submit, [path], TARGETS)
            assert res["state"] == "failed", res
            await check_failed_job_on_screen(pilot, res["job"])
            # It all came over the event stream: one connection, no re-fetch.
            assert isinstance(app.source, HTTPSource) and app.source.connections == 1
            assert app.view.events > 0
            await pilot.press("h")
            await settled(pilot, lambda: isinstance(app.screen, HostsScreen)
                          and len(table(app, "#hosts").keys) == 4, what="hosts")
            h = table(app, "#hosts")
            assert [h.cell_text(k, "state") for k in h.keys] == ["up"] * 4
            assert h.cell_text("d1", "free") != "-"

    asyncio.run(main())


@pytest.mark.parametrize("reconnect", ["refused-first", "after-restart"])
def test_tui_rides_out_a_center_kill_and_follows_the_restarted_center(
        cluster: LocalCluster, reconnect: str) -> None:
    """kill -9 the center: 'reconnecting'; restart it: live again, the REDO-replayed job
    is still there, and a new job shows up live.

    Both ways a monitor can meet the new center are pinned down, not left to timing:
    a reconnect attempt refused by the dead center (the monitor then follows from
    "now"), or a backoff that outlasts the restart (it resumes with the old id, which
    the new center, numbering from its clock, answers with "reset": a full re-fetch).
    """
    first = source_file(cluster, f"before-{reconnect}.bin", 4 * MiB)
    second = source_file(cluster, f"after-{reconnect}.bin", 4 * MiB)
    restarted = asyncio.Event()

    async def sleep(delay: float) -> None:
        if reconnect == "after-restart":
            await restarted.wait()  # the backoff ends only once the new center is up
        await asyncio.sleep(delay)

    async def main() -> None:
        src = HTTPSource(cluster.center.url, backoff=Backoff(base=0.2, cap=1.0, jitter=0),
                         sleep=sleep)
        app = MonitorApp(src, tick=0.5)
        async with app.run_test(size=(80, 24)) as pilot:
            await live_with_hosts(pilot, 4)
            before = await asyncio.to_thread(cluster.submit, [first], TARGETS)
            await wait_until(pilot, lambda: before["job"] in app.view.jobs, timeout=30,
                             what="the first job")
            assert list(src.stream_paths) == ["/center/events"]
            old_id = src.last_event_id
            assert old_id is not None
            cluster.center.kill(signal.SIGKILL)
            await wait_until(pilot, lambda: "reconnecting in" in status(app), timeout=30,
                             what="reconnecting shown")
            if reconnect == "refused-first":
                await wait_until(pilot, lambda: not src.resumable, timeout=30,
                                 what="an attempt refused")
            cluster.start_center()
            await asyncio.to_thread(cluster.wait_alive, 30)
            restarted.set()
            await live_with_hosts(pilot, 4)
            assert src.connections == 2
            if reconnect == "refused-first":
                assert src.stream_paths[-1] == "/center/events"
            else:
                assert list(src.stream_paths)[1:] == [f"/center/events?since={old_id}"]
            t = table(app, "#jobs")
            assert before["state"] == "failed", before
            # The row may still be the one drawn before the kill (the job's last
            # event can be lost with the center): wait for the restarted
            # center's replayed state to reach it.
            await wait_until(pilot, lambda: before["job"] in t.keys and
                             t.cell_text(before["job"], "state") == "failed",
                             what="the replayed job, failed")
            after = await asyncio.to_thread(cluster.submit, [second], TARGETS)
            assert after["state"] == "failed", after
            await check_failed_job_on_screen(pilot, after["job"])
            assert src.connections == 2  # shown from events, not a re-fetch
            assert int(src.last_event_id or 0) > int(old_id)  # the new center's ids are higher

    asyncio.run(main())
