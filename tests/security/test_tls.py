"""TLS between every part: center, daemons, peer fetches, the CLI; refusals at start.

Certificates are made for each session (``conftest.make_pki``): a CA, a
server certificate for 127.0.0.1 it signed, and an unrelated "rogue" CA with
its own certificate.  A TLS cluster ships a multi-chunk file end to end, so
every hop is encrypted and verified: daemon -> center (heartbeats, acks,
fins), center -> daemon (pulls, packs), daemon -> daemon (chunk fetches over
the buffered path, since sendfile cannot encrypt).  Then the ways it must
fail: an unknown CA, plain HTTP against TLS, a bad certificate or key at start.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from typing import Any

import pytest
import xxhash

from fdship.daemon.fetch import FetchError, PeerPool
from fdship.errors import Unavailable
from fdship.httpclient import call, client_ssl_context
from fdship.localcluster import free_port

from .conftest import PKI, TOKEN, Raw, wait_for, write_random

MiB = 1024 * 1024


def fdship(*args: str, env: dict[str, str],
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fdship", *args], check=False,
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def test_a_tls_cluster_ships_a_file_and_every_hop_is_encrypted(cluster_factory: Any,
                                                                 pki: PKI,
                                                                 tmp_path: Any) -> None:
    c = cluster_factory(4, pki=pki, center_args=["--chunk-size", "256K"])
    assert c.center.url.startswith("https://")
    src = str(tmp_path / "model.bin")
    write_random(src, 6 * MiB + 12345)
    res = c.request("POST", c.daemons[0].url + "/daemon/api",
                    {"files": [src], "machines": ["d1", "d2", "d3"]}, timeout=300)
    assert res["state"] == "done", json.dumps(res, indent=1)
    want = sha(src)
    for i in (1, 2, 3):
        assert sha(os.path.join(c.root(i), src.lstrip("/"))) == want
    # Chunks went out through the buffered path (sendfile cannot encrypt), peers
    # served each other (not only the source), and nothing went out unencrypted.
    stats = [c.request("GET", d.url + "/daemon/status") for d in c.daemons]
    assert sum(s["chunks_buffered"] for s in stats) >= 25, stats
    assert all(s["chunks_zero_copy"] == 0 for s in stats), stats
    assert sum(s["bytes_served"] for s in stats[1:]) > 0, "no peer served a chunk"
    # Plain HTTP to the TLS ports gets nowhere; the processes do not mind.
    for port in [c.center.port] + [d.port for d in c.daemons]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(10)
            s.sendall(b"GET /center/hosts HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = s.recv(4096)
            except ConnectionResetError:
                answer = b""
            assert b"200 OK" not in answer and b"hosts" not in answer
    assert not c.all_alive()
    # The token is still required over TLS.
    raw = Raw(c, c.center.port)
    assert raw.send("GET", "/center/hosts", token=None)[0] == 401
    assert raw.send("GET", "/center/hosts")[0] == 200
    raw.close()


def test_the_cli_verifies_with_the_ca_file(cluster_factory: Any, pki: PKI) -> None:
    c = cluster_factory(1, pki=pki)
    env = {k: v for k, v in os.environ.items() if k != "FDSHIP_TLS_CA"}
    env["FDSHIP_TOKEN"] = TOKEN
    r = fdship("hosts", "--center", c.center.url, env=dict(env, FDSHIP_TLS_CA=pki.ca))
    assert r.returncode == 0 and "d0" in r.stdout, r.stderr
    r = fdship("hosts", "--center", c.center.url, env=dict(env, FDSHIP_TLS_CA=pki.rogue_ca))
    assert r.returncode == 3, r
    assert "certificate" in r.stderr and "FDSHIP_TLS_CA" in r.stderr, r.stderr
    r = fdship("hosts", "--center", c.center.url.replace("https", "http"), env=env)
    assert r.returncode == 3, r


def test_a_daemon_that_does_not_trust_the_center_never_registers(cluster_factory: Any,
                                                                 pki: PKI) -> None:
    c = cluster_factory(2, pki=pki, start=False)
    # d1 verifies the center against the rogue CA: every heartbeat fails.
    c.daemon_args[1] = ["--tls-cert", pki.cert, "--tls-key", pki.key, "--tls-ca", pki.rogue_ca]
    c.start_center()
    c.start_daemon(0)
    c.wait_alive(30, names=["d0"])
    c.start_daemon(1)

    def failed_beats() -> list[str]:
        # The heartbeat's own warning: other lines can name the same TLS error
        # first (Tornado's server logs a client certificate it does not trust).
        return [line for line in c.daemons[1].log().splitlines()
                if "heartbeat to" in line and "CERTIFICATE_VERIFY_FAILED" in line]

    wait_for("d1 reports the certificate problem", failed_beats, timeout=30)
    assert all("tls_ca" in line for line in failed_beats()), failed_beats()
    assert "d1" not in c.hosts()
    assert c.daemons[1].alive()  # it keeps trying; it does not give up or crash


def test_a_peer_with_a_certificate_from_another_ca_is_refused(cluster_factory: Any,
                                                              pki: PKI) -> None:
    """Both the center's calls and peers' chunk fetches verify the daemon they reach."""
    c = cluster_factory(2, pki=pki, start=False)
    c.daemon_args[1] = ["--tls-cert", pki.rogue_cert, "--tls-key", pki.rogue_key,
                        "--tls-ca", pki.ca]
    c.start()
    ctx = client_ssl_context(pki.ca)

    async def probe() -> None:
        with pytest.raises(Unavailable, match="certificate"):
            await call("GET", c.daemons[1].url + "/daemon/status", token=TOKEN)
        # The good daemon is fine with the same client settings.
        from fdship import httpclient

        httpclient.configure_tls(pki.ca)
        try:
            st = await call("GET", c.daemons[0].url + "/daemon/status", token=TOKEN)
            assert st["name"] == "d0"
            with pytest.raises(Unavailable, match="certificate"):
                await call("GET", c.daemons[1].url + "/daemon/status", token=TOKEN)
        finally:
            httpclient.configure_tls("")
        pool = PeerPool(token=TOKEN, ssl=ctx, connect_timeout=10)
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            with pytest.raises(FetchError, match="TLS") as e:
                await pool.fetch(f"127.0.0.1:{c.daemons[1].port}", "J", 0, 0, 1,
                                 "0123456789abcdef", fd, 0, 10)
            assert e.value.kind == "connection"
        finally:
            os.close(fd)
            await pool.close()

    asyncio.run(probe())


def test_a_fetch_over_tls_streams_and_verifies(cluster_factory: Any, pki: PKI,
                                               tmp_path: Any) -> None:
    """The lean fetch client over TLS, byte for byte against a real TLS daemon."""
    c = cluster_factory(2, pki=pki, center_args=["--chunk-size", "64K"],
                        daemon_args={0: ["--upload-rate", "200K"]})
    src = str(tmp_path / "slow.bin")
    write_random(src, 1 * MiB)
    # A rate-capped source keeps the job running while we fetch a chunk ourselves.
    r = c.request("POST", c.daemons[0].url + "/daemon/api",
                  {"files": [src], "machines": ["d1"], "wait": False})
    job = r["job"]
    with open(src, "rb") as f:
        want = f.read(65536)
    out = str(tmp_path / "chunk0")

    async def fetch() -> int:
        pool = PeerPool(token=TOKEN, ssl=client_ssl_context(pki.ca), connect_timeout=10)
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            return await pool.fetch(f"127.0.0.1:{c.daemons[0].port}", job, 0, 0, len(want),
                                    xxhash.xxh3_64(want).hexdigest(), fd, 0, 60)
        finally:
            os.close(fd)
            await pool.close()

    assert asyncio.run(fetch()) == len(want)
    with open(out, "rb") as f:
        assert f.read() == want
    assert c.wait_job(job, 120)["state"] == "done"


@pytest.mark.parametrize("case", ["cert_without_key", "key_readable_by_others", "mismatch",
                                  "garbage", "missing_ca", "garbage_ca"])
@pytest.mark.parametrize("proc", ["center", "daemon"])
def test_bad_tls_settings_stop_the_process_with_one_line(tmp_path: Any, pki: PKI, case: str,
                                                         proc: str) -> None:
    key = str(tmp_path / "key.pem")
    shutil.copy(pki.key, key)
    os.chmod(key, 0o600)
    garbage = str(tmp_path / "garbage.pem")
    with open(garbage, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    args = {"cert_without_key": ["--tls-cert", pki.cert],
            "key_readable_by_others": ["--tls-cert", pki.cert, "--tls-key", key],
            "mismatch": ["--tls-cert", pki.cert, "--tls-key", pki.rogue_key],
            "garbage": ["--tls-cert", garbage, "--tls-key", key],
            "missing_ca": ["--tls-cert", pki.cert, "--tls-key", key, "--tls-ca",
                           str(tmp_path / "nope.pem")],
            "garbage_ca": ["--tls-cert", pki.cert, "--tls-key", key, "--tls-ca", garbage],
            }[case]
    if case == "key_readable_by_others":
        os.chmod(key, 0o604)
    base = ["center", "--data-dir", str(tmp_path / "c")] if proc == "center" else \
        ["daemon", "--center", "https://127.0.0.1:9", "--data-dir", str(tmp_path / "d")]
    env = {k: v for k, v in os.environ.items() if k not in ("FDSHIP_TOKEN", "FDSHIP_TLS_CA")}
    r = fdship(*base, "--listen", f"127.0.0.1:{free_port()}", *args, env=env, timeout=60)
    assert r.returncode != 0, (case, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert ("tls_" in lines[0]), lines[0]
    if case == "key_readable_by_others":
        assert "chmod 600" in lines[0]


def test_the_server_context_refuses_old_protocols(pki: PKI) -> None:
    from fdship.web import server_ssl_context

    ctx = server_ssl_context(pki.cert, pki.key)
    assert ctx is not None and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server_ssl_context("", "") is None
