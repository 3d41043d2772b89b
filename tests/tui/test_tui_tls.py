"""fdship-tui against a REAL center serving HTTPS: ``--tls-ca``, and what a wrong CA shows.

Where it sits: beside test_tui_real_center.py (the same, over plain HTTP).  A
center and two daemons run as subprocesses with certificates the ``openssl``
command made for this module (tests/security/conftest.py ``_pki_openssl``: a
CA, a certificate for localhost and 127.0.0.1, and an unrelated "rogue" CA).

The TUI reads the center two ways, and both must verify against the given
CA: the event stream (tui.source's own asyncio reader) and the GETs
(fdship's CenterClient).  A CA that did not sign the center's certificate must
leave the screen empty and say on the status line what is wrong and what to
pass; a CA file that is missing or no certificate must stop ``fdship-tui``
with status 2 and a sentence, before it draws anything.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest
from tui_helpers import settled, status, table, wait_until

from fdship import httpclient
from fdship.errors import Unavailable
from fdship.localcluster import free_port
from tests.security.conftest import PKI, TOKEN, SecCluster, _pki_openssl, stop_cluster
from tui import app as tui_app
from tui.app import MonitorApp
from tui.screens import JobScreen, JobsScreen
from tui.source import LIVE, RECONNECTING, Backoff, Batch, HTTPSource, Snapshot, Status, Update

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = str(tmp_path_factory.mktemp("tui-pki"))
    ca, cert, key = _pki_openssl(d, "")
    rca, rcert, rkey = _pki_openssl(d, "rogue-")
    return PKI(ca, cert, key, rca, rcert, rkey)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[SecCluster]:
    c = SecCluster(2, str(tmp_path_factory.mktemp("tui-tls")), pki=pki,
                   center_args=["--chunk-size", "256K"],
                   daemon_args={i: ["--heartbeat-interval", "0.5"] for i in range(2)})
    try:
        c.start()
        yield c
    finally:
        stop_cluster(c)


@pytest.fixture(autouse=True)
def clean_tls(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CA from the environment unless a test sets one; the process's TLS reset after."""
    monkeypatch.delenv("FDSHIP_TLS_CA", raising=False)
    monkeypatch.delenv("FDSHIP_TOKEN", raising=False)
    httpclient.configure_tls("")
    yield
    httpclient.configure_tls("")


def source(url: str, **kw: Any) -> HTTPSource:
    kw.setdefault("backoff", Backoff(base=0.2, cap=1.0, jitter=0))
    kw.setdefault("connect_timeout", 5.0)
    return HTTPSource(url, TOKEN, **kw)


async def collect_until(it: Any, state: str, timeout: float = 30) -> list[Update]:
    """Updates of ``it`` up to the first Status with ``state``; fail after ``timeout``."""
    out: list[Update] = []

    async def run() -> None:
        async for u in it:
            out.extend(u.events if isinstance(u, Batch) else [u])
            if isinstance(u, Status) and u.state == state:
                return
        raise AssertionError(f"the source ended first; got {out}")

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise AssertionError(f"no {state} within {timeout}s; got {out}") from None
    return out


async def first_failure(src: HTTPSource) -> list[Any]:
    """Updates until the first 'reconnecting' (which must come before any snapshot)."""
    it = src.updates()
    try:
        return await collect_until(it, RECONNECTING)
    finally:
        await src.close()
        await it.aclose()


# --- on screen -------------------------------------------------------------------------


def test_tui_follows_a_tls_center_live_with_the_ca(cluster: SecCluster, pki: PKI,
                                                   tmp_path: Any) -> None:
    src_file = str(tmp_path / "model.bin")
    with open(src_file, "wb") as f:
        f.write(os.urandom(MiB + 777))

    async def main() -> None:
        app = MonitorApp(source(cluster.center.url, tls_ca=pki.ca), tick=0.5)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: "live" in status(app)
                             and "hosts 2/2 up" in status(app), timeout=30,
                             what="live with 2 hosts over https")
            res = await asyncio.to_thread(cluster.submit, [src_file], ["d1"])
            assert res["state"] == "done", res
            job = res["job"]
            await wait_until(pilot, lambda: job in table(app, "#jobs").keys
                             and table(app, "#jobs").cell_text(job, "state") == "done",
                             timeout=30, what="the job shown done")
            # It came over the TLS event stream: one connection, no re-fetch.
            assert isinstance(app.source, HTTPSource) and app.source.connections == 1
            assert app.view.events > 0
            # Opening the job fetches it with a GET, verified with the same CA.
            await pilot.press("enter")
            await settled(pilot, lambda: isinstance(app.screen, JobScreen)
                          and table(app, "#machines").keys == ["d1"], what="the job's machine")
            assert table(app, "#machines").cell_text("d1", "state") == "done"
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen), what="back")

    asyncio.run(main())


def test_a_wrong_ca_leaves_the_screen_empty_and_says_what_to_pass(cluster: SecCluster,
                                                                  pki: PKI) -> None:
    async def main() -> None:
        app = MonitorApp(source(cluster.center.url, tls_ca=pki.rogue_ca), tick=0.5)
        async with app.run_test(size=(200, 24)) as pilot:
            await wait_until(pilot, lambda: "reconnecting in" in status(app), timeout=30,
                             what="reconnecting shown")
            line = status(app)
            assert "certificate not trusted: pass --tls-ca FILE" in line, line
            assert pki.rogue_ca in line, line
            assert table(app, "#jobs").keys == []  # nothing unverified is shown
            assert app.view.hosts == {}

    asyncio.run(main())


# --- the data source: both readers verify ---------------------------------------------------


def test_stream_and_gets_verify_against_the_given_ca(cluster: SecCluster, pki: PKI) -> None:
    async def main() -> None:
        # The rogue CA: the event stream refuses the center before any snapshot...
        src = source(cluster.center.url, tls_ca=pki.rogue_ca)
        got = await first_failure(src)
        assert not [u for u in got if isinstance(u, Snapshot)], got
        err = got[-1].error
        assert err.startswith("certificate not trusted: pass --tls-ca FILE"), err
        assert f"checked against the CA in {pki.rogue_ca}" in err, err
        assert src.connections == 0
        # ...and so do the GETs (fdship's CenterClient, same CA).
        with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await src.snapshot()

        # The right CA: live, a full snapshot, and the GETs answer.
        src = source(cluster.center.url, tls_ca=pki.ca)
        it = src.updates()
        try:
            got = await collect_until(it, LIVE)
            (snap,) = [u for u in got if isinstance(u, Snapshot)]
            assert {h["name"] for h in snap.hosts} == {"d0", "d1"}
            assert src.connections == 1
            assert {h["name"] for h in (await src.snapshot()).hosts} == {"d0", "d1"}
        finally:
            await src.close()
            await it.aclose()

    asyncio.run(main())


def test_without_a_ca_the_system_store_is_named_and_the_variable_works(
        cluster: SecCluster, pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        got = await first_failure(source(cluster.center.url))
        assert "checked against the system's trust store" in got[-1].error, got[-1]
        # $FDSHIP_TLS_CA alone: honoured by the stream and the GETs.
        monkeypatch.setenv("FDSHIP_TLS_CA", pki.ca)
        httpclient.configure_tls("")  # forget the context made without it
        src = source(cluster.center.url)
        it = src.updates()
        try:
            got = await collect_until(it, LIVE)
            assert [u for u in got if isinstance(u, Snapshot)]
        finally:
            await src.close()
            await it.aclose()

    asyncio.run(main())


def test_scheme_mismatches_say_which_scheme_to_use(cluster: SecCluster, pki: PKI) -> None:
    async def main() -> None:
        # http:// to the TLS center: it hangs up on the plain request.
        plain_url = cluster.center.url.replace("https:", "http:")
        got = await first_failure(source(plain_url, tls_ca=pki.ca))
        assert "if it serves HTTPS, use an https:// URL" in got[-1].error, got[-1]
        # https:// to a server waiting for a plain request line, as an HTTP
        # server does: the TLS hello is never answered.
        port = free_port()
        held: list[asyncio.StreamWriter] = []  # keep connections open, silent
        server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", port)
        try:
            got = await first_failure(source(f"https://127.0.0.1:{port}", tls_ca=pki.ca,
                                             connect_timeout=1.0))
        finally:
            for w in held:
                w.close()
            server.close()
        assert "if it serves plain HTTP, use an http:// URL" in got[-1].error, got[-1]

    asyncio.run(main())


# --- command line ----------------------------------------------------------------------------


def test_tls_ca_precedence_flag_then_variable_then_config(tmp_path: Any, pki: PKI,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "daemon.toml"
    conf.write_text(f'center = "https://127.0.0.1:7070"\ntls_ca = "{pki.rogue_ca}"\n')
    opts = tui_app.parse_args(["--config", str(conf)])
    assert (opts.center, opts.tls_ca) == ("https://127.0.0.1:7070", pki.rogue_ca)
    assert opts.tls_ca_origin == f"tls_ca of {conf}"
    monkeypatch.setenv("FDSHIP_TLS_CA", pki.ca)
    opts = tui_app.parse_args(["--config", str(conf)])
    assert (opts.tls_ca, opts.tls_ca_origin) == (pki.ca, "$FDSHIP_TLS_CA")
    opts = tui_app.parse_args(["--config", str(conf), "--tls-ca", pki.rogue_ca])
    assert (opts.tls_ca, opts.tls_ca_origin) == (pki.rogue_ca, "--tls-ca")
    monkeypatch.delenv("FDSHIP_TLS_CA")
    assert tui_app.parse_args([]).tls_ca == ""


@pytest.mark.parametrize("case", ["missing", "private key", "text", "env", "config"])
def test_a_bad_ca_file_exits_2_with_a_sentence(tmp_path: Any, pki: PKI, case: str,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a certificate\n")
    missing = str(tmp_path / "nope.pem")
    conf = tmp_path / "tui.toml"
    conf.write_text(f'tls_ca = "{missing}"\n')
    argv, origin, path, says = {
        "missing": (["--tls-ca", missing], "--tls-ca", missing, "no such file"),
        "private key": (["--tls-ca", pki.key], "--tls-ca", pki.key,
                        "it holds a private key, not a certificate"),
        "text": (["--tls-ca", str(notes)], "--tls-ca", str(notes),
                 "it holds no PEM certificate"),
        "env": ([], "$FDSHIP_TLS_CA", missing, "no such file"),
        "config": (["--config", str(conf)], f"tls_ca of {conf}", missing, "no such file"),
    }[case]
    if case == "env":
        monkeypatch.setenv("FDSHIP_TLS_CA", missing)
    assert tui_app.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"fdship-tui: {origin} {path}"), err
    assert says in err and "give the PEM file of the CA" in err, err
