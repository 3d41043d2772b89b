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

import copy
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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

    now = datetime.datetime.now(datetime.UTC)
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
    p = lambda n: os.path.join(d, prefix + n)

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

    def probe_center(self, p: Proc) -> None:
        # A connection is enough here: /metrics may want the token and the CA.
        with socket.create_connection(("127.0.0.1", p.port), timeout=1):
            pass

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

    def quiesce(self, quiet: float = 1.5, timeout: float = 30.0) -> None:
        """Wait until the REDO log has not grown for ``quiet`` seconds (a restarted
        daemon's registration, a job's last records) so a baseline stays a baseline."""
        deadline = time.monotonic() + timeout
        end, since = self.redo_end(), time.monotonic()
        while time.monotonic() - since < quiet:
            assert time.monotonic() < deadline, "the REDO log never stopped growing"
            time.sleep(0.1)
            now = self.redo_end()
            if now != end:
                end, since = now, time.monotonic()

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
            except BaseException:
                self.close()  # a timeout leaves the connection mid-request
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
    except (OSError, subprocess.SubprocessError):
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


# ---------------------------------------------------------------------- fuzzing harness

#: Examples per endpoint: a few hundred in CI; FDSHIP_FUZZ_EXAMPLES=5000 for the docs' figures.
FUZZ_EXAMPLES = int(os.environ.get("FDSHIP_FUZZ_EXAMPLES", "150"))


@dataclass
class Req:
    """One request a fuzz case sends: every byte of it is the test's choice."""

    method: str
    target: str  # path and query, sent as is
    body: bytes | None = None
    headers: dict[str, str] | None = None
    auth: bool = True  # False: no Authorization header (must be 401, or 200 for /metrics)
    kind: str = ""  # what the case exercises (random JSON, mutated field, wrong method, ...)


@dataclass
class Tally:
    tried: int = 0
    rejected: int = 0  # 4xx
    accepted: int = 0  # 2xx/3xx: a valid request, accounted for by the test
    server_errors: int = 0  # 5xx: must stay 0

    def as_dict(self) -> dict[str, int]:
        return {"tried": self.tried, "rejected": self.rejected, "accepted": self.accepted,
                "5xx": self.server_errors}


class Fuzzer:
    """Sends fuzz cases to a live cluster and checks, after every one of them:

    * the answer is not a 5xx, and (for JSON endpoints) is strict JSON;
    * every process is alive;
    * the center's jobs and hosts are unchanged and its REDO log did not grow,
      unless the request was valid (2xx) and ``allow_change`` explains the
      difference (a heartbeat registering the fake host it names).
    """

    def __init__(self, c: SecCluster) -> None:
        self.c = c
        self.tallies: dict[str, Tally] = {}
        self.center_raw = Raw(c, c.center.port)
        self.state_raw = Raw(c, c.center.port)
        self.raws: dict[int, Raw] = {}
        c.quiesce()
        self.baseline = c.state(self.state_raw)
        self.lsn = c.redo_end()

    def raw(self, port: int) -> Raw:
        if port not in self.raws:
            self.raws[port] = Raw(self.c, port)
        return self.raws[port]

    def close(self) -> None:
        for r in list(self.raws.values()) + [self.center_raw, self.state_raw]:
            r.close()

    def check(self, label: str, port: int, req: Req,
              allow_change: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
              ) -> int:
        t = self.tallies.setdefault(label, Tally())
        t.tried += 1
        streamed = req.target.startswith("/center/events") and req.method == "GET"
        st, data = self.raw(port).send(req.method, req.target, req.body, headers=req.headers,
                                       token="default" if req.auth else None,
                                       read_body=not streamed)
        if st >= 500:
            t.server_errors += 1
        elif st >= 400:
            t.rejected += 1
        else:
            t.accepted += 1
        where = f"{req.method} {req.target[:200]!r} ({req.kind}) body {(req.body or b'')[:300]!r}"
        assert st < 500, f"{label}: {st} for {where}: {data[:500]!r}"
        if not req.auth and not req.target.startswith("/metrics") and st != 401:
            # Only a request Tornado refuses before any handler runs (a path that is
            # not UTF-8, an unknown method) may get another answer without the
            # token, and then the very same one with it.
            again, _ = self.raw(port).send(req.method, req.target, req.body,
                                           headers=req.headers, read_body=not streamed)
            assert st in (400, 405) and again == st, \
                f"{label}: {st} without the token (and {again} with it) for {where}"
        if st >= 400 and req.method != "HEAD":
            err = strict_json(data)["error"]
            assert isinstance(err, str) and err, where
        elif data and req.method != "HEAD" and not req.target.startswith(
                ("/metrics", "/daemon/download")):
            strict_json(data)
        dead = self.c.all_alive()
        assert not dead, f"{label}: {dead} died after {where}"
        self.verify(label, where, st, allow_change)
        return st

    def verify(self, label: str, where: str, status: int,
               allow_change: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
               ) -> None:
        after = self.c.state(self.state_raw)
        lsn = self.c.redo_end()
        if after == self.baseline and lsn == self.lsn:
            return
        if status < 400 and allow_change is not None and allow_change(self.baseline, after):
            self.baseline, self.lsn = after, lsn  # a valid request, legitimately applied
            return
        raise AssertionError(
            f"{label}: the center changed after {where} (answered {status}): REDO log end "
            f"{self.lsn} -> {lsn}; state diff: {diff(self.baseline, after)}")

    def settle(self, label: str, seconds: float = 1.5) -> None:
        """After a run: reports the daemons send late (nacks of fuzzed pulls) change nothing."""
        time.sleep(seconds)
        self.verify(label, "the run (late reports)", 400)


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}/{k} added")
            elif k not in b:
                out.append(f"{path}/{k} removed")
            else:
                out += diff(a[k], b[k], f"{path}/{k}")
        return out[:20]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def record_tallies(tallies: dict[str, Tally]) -> None:
    """Merge per-endpoint counts into $FDSHIP_FUZZ_REPORT (JSON) for docs/reliability.md."""
    path = os.environ.get("FDSHIP_FUZZ_REPORT")
    if not path:
        return
    try:
        with open(path) as f:
            have = json.load(f)
    except (OSError, ValueError):
        have = {}
    for label, t in tallies.items():
        prev = have.get(label, {"tried": 0, "rejected": 0, "accepted": 0, "5xx": 0})
        have[label] = {k: prev.get(k, 0) + v for k, v in t.as_dict().items()}
    with open(path, "w") as f:
        json.dump(have, f, indent=1, sort_keys=True)


# ---------------------------------------------------------------------- strategies

from urllib.parse import quote

from hypothesis import strategies as st

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]

WEIRD_STRINGS = [
    "", " ", ".", "..", "../..", "/", "//", "/..", "/../etc/passwd", "a/../../b", "/etc/passwd",
    "\x00", "a\x00b", "/x\x00/../y", "\ud800", "\udfff", "%00", "%2e%2e%2f", "\\..\\", "~",
    "x" * 300, "é", "\U0001f4a5", "\n", "\r\n", "-1", "1e400", "null", "true", "{}", "[]",
    "@", "@@", "*", "?", "#", "nosuch", "0" * 40, "0123456789abcdef", "ZZZZZZZZZZZZZZZZ",
]
JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
             | st.text(max_size=20))
JSON_ANY = st.recursive(JSON_LEAF, lambda ch: st.lists(ch, max_size=4)
                        | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=10)
WEIRD_INT = st.sampled_from([-1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**62 + 1,
                             2**63, 2**64, -2**63, 10**30, 10**400, -10**400]) | st.integers()
# NaN and Infinity go out as Python's non-standard tokens: the server must refuse them.
WEIRD_FLOAT = st.floats() | st.sampled_from([1e308, -0.0, 5e-324, float("nan"), float("inf")])
WEIRD_STR = st.sampled_from(WEIRD_STRINGS) | st.text(max_size=40)
WEIRD_ANY = (WEIRD_STR | WEIRD_INT | WEIRD_FLOAT | JSON_ANY | st.booleans()
             | st.lists(WEIRD_STR, max_size=3) | st.builds(dict) | st.builds(list))


# The values most likely to break a parser, tried in every field by ``sweep``.
EXTREMES: list[Any] = [
    None, True, False, 0, -1, 2**31, 2**62 + 1, 2**63, 2**64, -2**63, 10**30, 10**400,
    -10**400, 1e308, -0.0, 5e-324, float("nan"), float("inf"), float("-inf"), "", "..",
    "/../x", "a\x00b", "\ud800", "x" * 70_000, [], {}, [None], {"": None}, [[[[[]]]]],
]


def sweep(template: Any) -> Iterator[tuple[str, Any]]:
    """Every field of ``template`` replaced by every one of EXTREMES, and deleted.

    Systematic where hypothesis is random: each (field, value) pair is sent once.
    """
    for i, (_, key) in enumerate(_paths(template)):
        for value in EXTREMES + ["<delete>"]:
            obj = json.loads(json.dumps(template))
            container, k = _paths(obj)[i]
            if value == "<delete>":
                if isinstance(container, dict):
                    del container[k]
                else:
                    container.pop(k)
            else:
                container[k] = copy.deepcopy(value)
            shown = repr(value)[:20]
            yield f"{key}={shown}", obj


def _paths(obj: Any) -> list[tuple[Any, Any]]:
    """(container, key) for every value inside ``obj``, depth first."""
    out: list[tuple[Any, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            out += _paths(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            out += _paths(v)
    return out


@st.composite
def mutated(draw: Any, template: Any, weird: dict[str, Any] | None = None) -> Any:
    """A valid-shaped message with 1-3 fields broken: wrong type, out of range, gone, doubled.

    ``weird`` overrides the replacement values per field name (e.g. ``peer`` may
    only become addresses on loopback: a fuzzer must not send traffic elsewhere).
    """
    weird = weird or {}
    obj = json.loads(json.dumps(draw(template)))  # a private deep copy
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(obj)
        if not paths:
            break
        container, key = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "blowup"]))
        name = key if isinstance(key, str) else ""
        if op == "replace":
            pick = weird[name] if name in weird else st.one_of(st.sampled_from(EXTREMES),
                                                                 WEIRD_ANY)
            # A private copy: EXTREMES' lists and dicts are shared, and a later
            # mutation must not reach (or loop back into) them.
            container[key] = copy.deepcopy(draw(pick))
        elif op == "delete":
            if isinstance(container, dict):
                del container[key]
            else:
                container.pop(key)
        elif op == "add" and isinstance(container, dict):
            container[draw(st.text(max_size=12))] = draw(WEIRD_ANY)
        elif op == "blowup":
            # The same entry many times: big lists must be refused or handled, never
            # crash.  Kept under ~1 MB: a body over max_body is cut off unread instead.
            v = container[key]
            n = draw(st.sampled_from([2, 100, 5000]))
            if len(json.dumps(v)) * n < 1_000_000:
                # Copies, not n references to one object: a later mutation inside
                # one of them must not multiply the body again.
                container[key] = [copy.deepcopy(v) for _ in range(n)]
                if len(json.dumps(obj)) > 2_000_000:
                    container[key] = v
    return obj


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8", "surrogatepass")


@st.composite
def bodies(draw: Any, template: Any, weird: dict[str, Any] | None = None) -> tuple[str, bytes]:
    """(kind, body bytes): valid-shaped, mutated, random JSON, truncated, raw bytes, ..."""
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "mutated", "mutated", "random",
                                 "truncated", "bytes", "scalar", "encoding", "deep"]))
    if kind == "valid":
        return kind, encode(draw(template))
    if kind == "mutated":
        return kind, encode(draw(mutated(template, weird)))
    if kind == "random":
        return kind, encode(draw(JSON_ANY))
    if kind == "truncated":
        full = encode(draw(template))
        return kind, full[:draw(st.integers(0, max(0, len(full) - 1)))]
    if kind == "bytes":
        return kind, draw(st.binary(max_size=300))
    if kind == "scalar":
        return kind, encode(draw(WEIRD_STR | WEIRD_INT | WEIRD_FLOAT))
    if kind == "encoding":
        text = json.dumps(draw(template), ensure_ascii=False) + "\u00e9"
        return kind, text.encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1"])),
                                 errors="replace")
    depth = draw(st.sampled_from([100, 1000, 100_000]))
    return kind, b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))


@st.composite
def queries(draw: Any, params: dict[str, Any]) -> str:
    """A query string: the endpoint's own parameters with weird values, unknown ones, junk."""
    kind = draw(st.sampled_from(["good", "params", "params", "params", "junk", "none"]))
    if kind == "none":
        return ""
    if kind == "good":  # a valid query: the answer may be 200, and must be right
        return "?" + "&".join(f"{quote(k)}={quote(str(draw(v)), safe='')}"
                              for k, v in params.items())
    if kind == "junk":
        return "?" + quote(draw(st.text(max_size=60)), safe="=&%;+")
    pairs = []
    for name, good in params.items():
        if draw(st.booleans()):
            v = draw(st.one_of(good, WEIRD_STR, WEIRD_INT.map(str), WEIRD_FLOAT.map(repr)))
            pairs.append(f"{quote(name)}={quote(str(v), safe='', errors='surrogatepass')}")
            if draw(st.integers(0, 9)) == 0:
                pairs.append(pairs[-1])  # the same parameter twice
    if draw(st.integers(0, 4)) == 0:
        pairs.append(f"{quote(draw(st.text(max_size=8)))}={quote(draw(st.text(max_size=8)))}")
    return "?" + "&".join(pairs) if pairs else ""


def post_cases(path: str, template: Any, weird: dict[str, Any] | None = None) -> Any:
    """Fuzz cases for a POST endpoint: bodies (mostly), wrong methods, no token."""
    normal = bodies(template, weird).map(lambda kb: Req("POST", path, kb[1], kind=kb[0]))
    wrong = st.tuples(st.sampled_from([m for m in METHODS if m != "POST"]),
                      st.one_of(st.none(), bodies(template, weird).map(lambda kb: kb[1]))).map(
        lambda mb: Req(mb[0], path, mb[1], kind="wrong method"))
    # Bodies over 64K without the token are cut off unread (test_auth covers that).
    unauth = bodies(template, weird).filter(lambda kb: len(kb[1]) < 60_000).map(
        lambda kb: Req("POST", path, kb[1], auth=False, kind="no token"))
    return st.one_of(normal, normal, normal, normal, normal, normal, wrong, unauth)


def get_cases(path: Any, params: dict[str, Any], public: bool = False) -> Any:
    """Fuzz cases for a GET endpoint: query strings (mostly), wrong methods, no token.

    ``path`` is a string or a strategy of paths (ids in the path).
    """
    paths = path if not isinstance(path, str) else st.just(path)
    normal = st.tuples(paths, queries(params)).map(
        lambda pq: Req("GET", pq[0] + pq[1], kind="query"))
    wrong = st.tuples(st.sampled_from([m for m in METHODS if m != "GET"]), paths,
                      st.one_of(st.none(), st.binary(max_size=100))).map(
        lambda t: Req(t[0], t[1], t[2], kind="wrong method"))
    unauth = st.tuples(paths, queries(params)).map(
        lambda pq: Req("GET", pq[0] + pq[1], auth=False, kind="no token"))
    return st.one_of(normal, normal, normal, normal, normal, wrong, unauth)


def path_ids(prefix: str, real: list[str]) -> Any:
    """``prefix/ID`` with real ids, unknown ones, and hostile ones, percent-encoded."""
    ident = st.sampled_from(real) | WEIRD_STR | st.text(min_size=1, max_size=60)
    raw = st.sampled_from(["%2e%2e", "%2F..%2Fetc", "..%2f..%2f", "%00", "%ff%fe", "%", "a%zz",
                           "x" * 5000, ".", "..%5c"])
    return (ident.filter(lambda s: s not in ("", ".", ".."))
            .map(lambda s: prefix + quote(s, safe="", errors="surrogatepass"))
            | raw.map(lambda s: prefix + s))
