"""Shared fixtures of the security tests: clusters with a token (and TLS), raw HTTP, state probes.

Everything runs for real: a center and daemons as subprocesses on 127.0.0.1
(:class:`fdship.localcluster.LocalCluster`), test certificates made on the
spot (with the ``cryptography`` package when it is installed, else the
``openssl`` command), and requests sent over plain sockets or ``http.client``
so a test controls every byte.  Every fixture stops what it started in a
``finally``, whether the test passed or not.

The probes answer the questions the hostile-input tests ask after every
request: is every process still alive, did the center's state change, did the
REDO log grow?
"""

from __future__ import annotations

import datetime
import glob
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest

from fdship.localcluster import LocalCluster, Proc

TOKEN = "fuzz-and-confine-token-0123456789"
MiB = 1024 * 1024


# ---------------------------------------------------------------------- certificates


@dataclass
class PKI:
    """A CA, a server certificate it signed (127.0.0.1, localhost), and an unrelated CA."""

    ca: str
    cert: str
    key: str
    rogue_ca: str
    rogue_cert: str
    rogue_key: str


def _write_key(path: str, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _pki_cryptography(d: str, prefix: str) -> tuple[str, str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fdship test CA {prefix}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = (os.path.join(d, f"{prefix}{n}") for n in
                                    ("ca.pem", "server.pem", "server.key"))
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return ca_path, cert_path, key_path


def _pki_openssl(d: str, prefix: str) -> tuple[str, str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor the openssl command is installed "
                    "(apt-get install -y openssl)")
    p = lambda n: os.path.join(d, prefix + n)  # noqa: E731

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", p("ca.key"), "-out", p("ca.pem"), "-days", "2",
        "-subj", f"/CN=fdship test CA {prefix}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", p("server.key"), "-out", p("server.csr"), "-subj", "/CN=localhost")
    ext = p("ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", p("server.csr"), "-CA", p("ca.pem"), "-CAkey", p("ca.key"),
        "-CAcreateserial", "-out", p("server.pem"), "-days", "2", "-extfile", ext)
    os.chmod(p("server.key"), 0o600)
    return p("ca.pem"), p("server.pem"), p("server.key")


def make_pki(d: str) -> PKI:
    os.makedirs(d, exist_ok=True)
    try:
        import cryptography  # noqa: F401

        make = _pki_cryptography
    except ImportError:
        make = _pki_openssl
    ca, cert, key = make(d, "")
    rca, rcert, rkey = make(d, "rogue-")
    return PKI(ca, cert, key, rca, rcert, rkey)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: Any) -> PKI:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


# ---------------------------------------------------------------------- clusters


class _SProc(Proc):
    """A process whose URL may be https."""

    @property
    def url(self) -> str:
        return f"{self.extra.get('scheme', 'http')}://127.0.0.1:{self.port}"


class SecCluster(LocalCluster):
    """A LocalCluster with a token, optional TLS, and the probes the security tests use."""

    def __init__(self, n: int, base: str, *, token: str = TOKEN, pki: PKI | None = None,
                 center_args: list[str] | None = None,
                 daemon_args: dict[int, list[str]] | None = None) -> None:
        self.pki = pki
        tls = [] if pki is None else ["--tls-cert", pki.cert, "--tls-key", pki.key,
                                      "--tls-ca", pki.ca]
        daemon_args = {i: tls + (daemon_args or {}).get(i, []) for i in range(n)}
        super().__init__(n, base, center_args=tls + (center_args or []),
                         daemon_args=daemon_args, token=token)
        scheme = "https" if pki else "http"
        self.center = _SProc(self.center.name, [], self.center.log_path, self.center.port,
                             extra={"scheme": scheme})
        self.daemons = [_SProc(d.name, [], d.log_path, d.port, extra={"scheme": scheme})
                        for d in self.daemons]
        self.ssl_ctx = ssl.create_default_context(cafile=pki.ca) if pki else None
        if pki:
            self.env["FDSHIP_TLS_CA"] = pki.ca

    def daemon_cmd(self, i: int) -> list[str]:
        cmd = super().daemon_cmd(i)
        cmd[cmd.index("--center") + 1] = self.center.url
        return cmd

    def start(self, wait: float = 30.0) -> SecCluster:
        self.start_center()
        deadline = time.monotonic() + wait
        while True:
            if not self.center.alive():
                raise RuntimeError("center exited:\n" + self.center.log()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", self.center.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("center not listening") from None
                time.sleep(0.02)
        for i in range(self.n):
            self.start_daemon(i)
        self.wait_alive(wait)
        return self

    def request(self, method: str, url: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_ctx) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def all_alive(self) -> list[str]:
        """Names of the processes that died (empty when all live)."""
        return [p.name for p in [self.center] + self.daemons if not p.alive()]

    # -- the center's state, as the fuzz tests compare it ----------------------------

    def redo_end(self) -> int:
        """LSN just past the last byte of the REDO log (segment start + size)."""
        ends = []
        for path in glob.glob(os.path.join(self.tmp, "center-data", "redo-*.log")):
            start = int(os.path.basename(path)[5:25])
            ends.append(start + os.path.getsize(path))
        return max(ends, default=0)

    def state(self, conn: Raw | None = None) -> dict[str, Any]:
        """The center's jobs (full results) and hosts, without what moves on its own."""
        raw = conn or Raw(self, self.center.port)
        st, jobs = raw.json("GET", "/center/jobs?limit=1000")
        assert st == 200, jobs
        out: dict[str, Any] = {"jobs": {}, "hosts": {}}
        for j in jobs["jobs"]:
            st, full = raw.json("GET", f"/center/jobs/{j['job']}")
            assert st == 200, full
            for m in full["machines"].values():
                m.pop("rate", None)
                m.pop("eta", None)
            full.pop("rate", None)
            out["jobs"][j["job"]] = full
        st, hosts = raw.json("GET", "/center/hosts")
        assert st == 200, hosts
        real = {d.name for d in self.daemons}
        for h in hosts["hosts"]:
            # Load figures and heartbeat ages move every second; fake hosts a
            # fuzzed heartbeat registered go dead on their own.
            out["hosts"][h["name"]] = {"address": h["address"], "labels": h["labels"],
                                       "alive": h["alive"] if h["name"] in real else None,
                                       "assigned": h["assigned"], "hooks": h["hooks"]}
        return out


class Raw:
    """One keep-alive HTTP(S) connection sending exactly the bytes a test gives it.

    Answers are parsed as *strict* JSON (no NaN or Infinity): what the center
    renders must be readable by any client, not only by Python.
    """

    def __init__(self, c: SecCluster, port: int, timeout: float = 30.0) -> None:
        self.c = c
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.conn is None:
            if self.c.ssl_ctx is not None:
                self.conn = http.client.HTTPSConnection("127.0.0.1", self.port,
                                                        timeout=self.timeout,
                                                        context=self.c.ssl_ctx)
            else:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=self.timeout)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, method: str, target: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, token: str | None = "default",
             read_body: bool = True) -> tuple[int, bytes]:
        h = {"Content-Type": "application/json"}
        tok = self.c.token if token == "default" else token
        if tok is not None:
            h["Authorization"] = "Bearer " + tok
        h.update(headers or {})
        for attempt in (0, 1):
            conn = self._connect()
            try:
                conn.request(method, target, body=body, headers=h)
                resp = conn.getresponse()
                # read_body False: a stream (/center/events) is only opened, but
                # an error answer is finite and read.
                streamed = not read_body and resp.status == 200
                data = b"" if streamed else resp.read()
                if streamed or resp.will_close:
                    self.close()
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server may close an idle keep-alive connection (or one whose
                # request it refused): only a fresh connection's failure counts.
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, target: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        st, raw = self.send(method, target, data, **kw)
        return st, strict_json(raw) if raw else None


def announce_body(port: int, path: str, length: int, token: str | None,
                  send: int = 1024) -> bytes:
    """POST headers announcing ``length`` body bytes, send only ``send`` of them, and
    return whatever the server answers before it hangs up (plain HTTP)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Connection: close\r\n{auth}Content-Length: {length}\r\n\r\n".encode()
                  + b"[" * send)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name} in an answer")


def strict_json(raw: bytes) -> Any:
    return json.loads(raw, parse_constant=_no_constants)


@pytest.fixture
def cluster_factory(tmp_path: Any) -> Iterator[Callable[..., SecCluster]]:
    """``make(n, pki=None, token=TOKEN, center_args=[], daemon_args={})`` -> started SecCluster."""
    made: list[SecCluster] = []

    def make(n: int, start: bool = True, **kw: Any) -> SecCluster:
        base = str(tmp_path / f"cluster{len(made)}")
        os.makedirs(base)
        c = SecCluster(n, base, **kw)
        made.append(c)
        if start:
            c.start()
        return c

    try:
        yield make
    finally:
        for c in made:
            stop_cluster(c)


def stop_cluster(c: SecCluster) -> None:
    for p in c.daemons + [c.center]:
        if p.popen is not None and p.popen.poll() is None:
            try:
                p.popen.send_signal(signal.SIGCONT)
            except OSError:
                pass
    try:
        c.stop()
    except Exception:
        for p in c.daemons + [c.center]:
            if p.alive():
                p.kill(signal.SIGKILL)


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 60.0,
             every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
            last = v
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            last = e
        time.sleep(every)
    raise TimeoutError(f"{what}: not after {timeout:.0f} s (last: {last!r})")


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(MiB, left)
            f.write(os.urandom(n))
            left -= n


def tree(base: str, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every path under ``base`` (not following links) -> (mode, size), minus ``skip`` dirs."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in skip]
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size if not os.path.isdir(p) else 0)
    return out
