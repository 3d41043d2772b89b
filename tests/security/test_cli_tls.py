"""The command line over TLS: ``--tls-ca FILE`` on submit, jobs, job, hosts and schedule.

Where it sits: beside test_tls.py (TLS between the processes).  A real center
and two daemons serve HTTPS with certificates made by the ``openssl`` command
for this module (``conftest._pki_openssl``: a CA, a certificate for localhost
and 127.0.0.1 it signed, and an unrelated "rogue" CA).  ``fdship`` runs as a
subprocess, exactly as a person runs it, with ``$FDSHIP_TLS_CA`` removed from
its environment unless a test sets it.

What must hold: https:// URLs work end to end (a file ships and lands byte for
byte, every watching command answers); the flag beats the variable and the
variable still works alone; a CA that did not sign the server's certificate
exits 3 with a sentence naming the CA file used and ``--tls-ca``; a CA file
that is missing, unreadable or no certificate exits 2 before any request.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from fdship.localcluster import free_port

from .conftest import (
    PKI,
    TOKEN,
    SecCluster,
    _pki_openssl,
    stop_cluster,
    wait_for,
    write_random,
)

MiB = 1024 * 1024


def openssl_pki(d: str) -> PKI:
    """A CA with a server certificate, and a rogue CA, all made with the openssl command."""
    os.makedirs(d, exist_ok=True)
    ca, cert, key = _pki_openssl(d, "")
    rca, rcert, rkey = _pki_openssl(d, "rogue-")
    return PKI(ca, cert, key, rca, rcert, rkey)


def fdship(*args: str, env: dict[str, str] | None = None, no_dac_override: bool = False,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fdship ARGS`` with the token and without $FDSHIP_TLS_CA (unless given).

    ``no_dac_override``: as root, without the capabilities that let root read any
    file, so a file of another user with mode 0600 is unreadable to it.
    """
    base = {k: v for k, v in os.environ.items() if k not in ("FDSHIP_TLS_CA", "FDSHIP_TOKEN")}
    base["FDSHIP_TOKEN"] = TOKEN
    return subprocess.run([sys.executable, "-m", "fdship", *args], check=False,
                          capture_output=True, text=True, timeout=timeout,
                          env=base | (env or {}), stdin=subprocess.DEVNULL, cwd="/",
                          preexec_fn=_drop_dac_override if no_dac_override else None)


def _drop_dac_override() -> None:
    # In the child before exec: leave CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2)
    # out of the bounding set, so the exec'd root process does not get them back.
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The command's stderr, which must be exactly one line (no log noise, no traceback)."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return openssl_pki(str(tmp_path_factory.mktemp("cli-pki")))


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[SecCluster]:
    """A center and two daemons serving HTTPS only, shared by this module's tests."""
    c = SecCluster(2, str(tmp_path_factory.mktemp("cli-tls")), pki=pki,
                   center_args=["--chunk-size", "256K"])
    try:
        c.start()
        yield c
    finally:
        stop_cluster(c)


def test_https_end_to_end_with_the_flag(tls_cluster: SecCluster, pki: PKI,
                                        tmp_path: Any) -> None:
    c = tls_cluster
    src = str(tmp_path / "model.bin")
    write_random(src, 2 * MiB + 4321)  # several chunks and a short last one
    r = fdship("submit", "--daemon", c.daemons[0].url, "--to", "d1", "--json",
               "--tls-ca", pki.ca, src)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["state"] == "done" and res["machines"]["d1"]["state"] == "done", res
    with open(src, "rb") as a, open(os.path.join(c.root(1), src.lstrip("/")), "rb") as b:
        assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()
    job = res["job"]

    # Every watching command, over https, verified with the flag's CA.
    r = fdship("jobs", "--center", c.center.url, "--tls-ca", pki.ca, "--json")
    assert r.returncode == 0, r.stderr
    assert job in [j["job"] for j in json.loads(r.stdout)["jobs"]]
    r = fdship("job", job, "--center", c.center.url, "--tls-ca", pki.ca)
    assert r.returncode == 0 and f"job {job}" in r.stdout and "d1" in r.stdout, r
    r = fdship("hosts", "--center", c.center.url, "--tls-ca", pki.ca, "--json")
    assert r.returncode == 0, r.stderr
    assert {h["name"] for h in json.loads(r.stdout)["hosts"]} == {"d0", "d1"}
    r = fdship("schedule", "add", "nightly", "--cron", "0 3 * * *", "--from", "d0",
               "--to", "d1", "--center", c.center.url, "--tls-ca", pki.ca, src)
    assert r.returncode == 0 and "schedule nightly added" in r.stdout, r
    r = fdship("schedule", "list", "--center", c.center.url, "--tls-ca", pki.ca, "--json")
    assert r.returncode == 0, r.stderr
    assert [s["name"] for s in json.loads(r.stdout)["schedules"]] == ["nightly"]
    r = fdship("schedule", "rm", "nightly", "--center", c.center.url, "--tls-ca", pki.ca)
    assert r.returncode == 0, r.stderr


def test_the_flag_beats_the_variable_and_the_variable_still_works(tls_cluster: SecCluster,
                                                                   pki: PKI) -> None:
    url = tls_cluster.center.url
    # The variable alone: honoured.
    r = fdship("hosts", "--center", url, env={"FDSHIP_TLS_CA": pki.ca})
    assert r.returncode == 0 and "d0" in r.stdout, r.stderr
    # A good flag over a wrong variable: the flag is used.
    r = fdship("hosts", "--center", url, "--tls-ca", pki.ca, env={"FDSHIP_TLS_CA": pki.rogue_ca})
    assert r.returncode == 0 and "d0" in r.stdout, r.stderr
    # A wrong flag over a good variable: the flag is used, and the message says so.
    r = fdship("hosts", "--center", url, "--tls-ca", pki.rogue_ca, env={"FDSHIP_TLS_CA": pki.ca})
    assert r.returncode == 3, r
    assert f"not signed by the CA in {pki.rogue_ca} (--tls-ca)" in one_line(r)
    # A wrong variable alone: the message names the variable.
    r = fdship("hosts", "--center", url, env={"FDSHIP_TLS_CA": pki.rogue_ca})
    assert r.returncode == 3, r
    assert f"the CA in {pki.rogue_ca} ($FDSHIP_TLS_CA)" in one_line(r)


@pytest.mark.parametrize("command", ["submit", "jobs", "hosts", "schedule"])
def test_a_wrong_ca_exits_3_naming_the_ca_and_the_flag(tls_cluster: SecCluster, pki: PKI,
                                                       tmp_path: Any, command: str) -> None:
    c = tls_cluster
    src = str(tmp_path / "f.txt")
    with open(src, "w") as f:
        f.write("never shipped\n")
    args = {"submit": ["submit", "--daemon", c.daemons[0].url, "--to", "d1", src],
            "jobs": ["jobs", "--center", c.center.url],
            "hosts": ["hosts", "--center", c.center.url],
            "schedule": ["schedule", "list", "--center", c.center.url]}[command]
    r = fdship(*args, "--tls-ca", pki.rogue_ca)
    assert r.returncode == 3, r
    line = one_line(r)
    assert line.startswith(f"fdship {command}: cannot reach https://127.0.0.1:"), line
    assert "CERTIFICATE_VERIFY_FAILED" in line
    assert f"not signed by the CA in {pki.rogue_ca} (--tls-ca): pass --tls-ca FILE" in line
    # Without any CA the system's trust store is used, and the message says that.
    r = fdship(*args)
    assert r.returncode == 3, r
    assert "system's trust store (no --tls-ca or $FDSHIP_TLS_CA given)" in one_line(r)
    if command == "submit":  # nothing was shipped
        assert not os.path.exists(os.path.join(c.root(1), src.lstrip("/")))


def test_a_certificate_for_another_name_is_explained(pki: PKI, tmp_path: Any) -> None:
    """A center whose certificate names only localhost, reached at 127.0.0.1."""
    d = os.path.dirname(pki.ca)
    key, csr, cert = (str(tmp_path / n) for n in ("only.key", "only.csr", "only.pem"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", csr, "-CA", pki.ca, "-CAkey", os.path.join(d, "ca.key"),
            "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", str(ext))
    os.chmod(key, 0o600)
    only = PKI(pki.ca, cert, key, pki.rogue_ca, pki.rogue_cert, pki.rogue_key)
    (tmp_path / "c").mkdir()
    c = SecCluster(0, str(tmp_path / "c"), pki=only)
    try:
        # Not c.start(): its readiness probe would itself be refused for 127.0.0.1.
        c.start_center()
        wait_for("the center listens", lambda: c.center.alive() and listening(c.center.port),
                 timeout=30)
        r = fdship("hosts", "--center", c.center.url, "--tls-ca", pki.ca)
        assert r.returncode == 3, r
        assert "not issued for the host in the URL" in one_line(r)
        # The name it was issued for works.
        r = fdship("hosts", "--center", f"https://localhost:{c.center.port}", "--tls-ca", pki.ca)
        assert r.returncode == 0 and "no daemons registered" in r.stdout, r.stderr
    finally:
        stop_cluster(c)


def test_scheme_mismatches_say_which_scheme_to_use(tls_cluster: SecCluster, pki: PKI,
                                                   tmp_path: Any) -> None:
    # http:// to a TLS center.
    r = fdship("hosts", "--center", tls_cluster.center.url.replace("https:", "http:"),
               "--tls-ca", pki.ca)
    assert r.returncode == 3, r
    assert "use an https:// URL" in one_line(r)
    # https:// to a plain center.
    (tmp_path / "plain").mkdir()
    plain = SecCluster(0, str(tmp_path / "plain"))
    try:
        plain.start()
        r = fdship("hosts", "--center", plain.center.url.replace("http:", "https:"),
                   "--tls-ca", pki.ca)
        assert r.returncode == 3, r
        assert "if the server serves plain HTTP, use an http:// URL" in one_line(r)
    finally:
        stop_cluster(plain)


@pytest.fixture(scope="module")
def bad_files(pki: PKI) -> Iterator[dict[str, str]]:
    """CA files that must be refused, in a directory every user may enter."""
    d = tempfile.mkdtemp(prefix="fdship-bad-ca-")
    os.chmod(d, 0o755)
    try:
        def write(name: str, data: bytes, mode: int = 0o644) -> str:
            path = os.path.join(d, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, mode)
            return path

        with open(pki.ca, "rb") as f:
            ca = f.read()
        with open(pki.key, "rb") as f:
            key = f.read()
        csr = os.path.join(os.path.dirname(pki.ca), "server.csr")
        with open(csr, "rb") as f:
            csr_bytes = f.read()
        os.mkdir(os.path.join(d, "a-directory"))
        files = {
            "missing": os.path.join(d, "nope.pem"),
            "directory": os.path.join(d, "a-directory"),
            "empty": write("empty.pem", b""),
            "private key": write("key.pem", key),
            "certificate request": write("req.pem", csr_bytes),
            "not PEM": write("notes.txt", b"just some text\n"),
            "damaged certificate": write("damaged.pem",
                                         b"-----BEGIN CERTIFICATE-----\nnot base64\n"
                                         b"-----END CERTIFICATE-----\n"),
            "unreadable": write("secret-ca.pem", ca, mode=0o600 if os.geteuid() == 0 else 0),
        }
        if os.geteuid() == 0:  # another user's file (see fdship(no_dac_override=True))
            os.chown(files["unreadable"], 65534, 65534)
        yield files
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(("case", "says"), [
    ("missing", ": no such file;"),
    ("directory", " is a directory, not a file;"),
    ("empty", " is not a CA certificate: it is empty;"),
    ("private key", " is not a CA certificate: it holds a private key, not a certificate;"),
    ("certificate request", " is not a CA certificate: it holds a certificate request"),
    ("not PEM", " is not a CA certificate: it holds no PEM certificate;"),
    ("damaged certificate", " is not a CA certificate: its certificate is damaged"),
    ("unreadable", ": cannot be read by this user (Permission denied)"),
])
def test_a_bad_ca_file_exits_2_before_any_request(bad_files: dict[str, str], case: str,
                                                  says: str) -> None:
    path = bad_files[case]
    # Nothing listens on this port: reaching for it would exit 3, so exit 2
    # proves the file was refused first.
    url = f"https://127.0.0.1:{free_port()}"
    # Root reads any file: for "unreadable" it runs without that power, and the
    # file belongs to another user.
    strip = case == "unreadable" and os.geteuid() == 0
    r = fdship("hosts", "--center", url, "--tls-ca", path, no_dac_override=strip)
    assert r.returncode == 2, r
    line = one_line(r)
    assert line.startswith(f"fdship hosts: --tls-ca {path}"), line
    assert says in line, line
    assert "give the PEM file of the CA" in line
    # The same file from the variable: refused too, naming the variable.
    r = fdship("jobs", "--center", url, env={"FDSHIP_TLS_CA": path}, no_dac_override=strip)
    assert r.returncode == 2, r
    assert one_line(r).startswith(f"fdship jobs: $FDSHIP_TLS_CA {path}")
