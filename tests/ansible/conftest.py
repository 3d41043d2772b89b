"""Fixtures for the Ansible roll-out test: ssh hosts made of network namespaces.

Where it sits: support for tests/ansible/test_deploy.py.  A :class:`Fleet` is a
:class:`tests.netns.Cluster` whose every host runs its own ``sshd`` on its own
address, accepting root with a throwaway key, plus a private directory per host
laid out like a root file system (``opt/``, ``etc/``, ``var/lib/``) because the
hosts share one file system.  Ansible reaches the hosts over real ssh.

Without systemd as PID 1 nothing can start the units, so :func:`service_argv`
turns an installed unit file into the command the test runs inside the host:
its ``ExecStart=`` with every absolute path put under the host's directory,
run the way the unit says where this machine can do it without systemd: as
``User=``/``Group=`` with ``NoNewPrivileges=`` and an empty capability bounding
set (setpriv), ``LimitNOFILE=`` (prlimit), ``UMask=`` and
``MemoryDenyWriteExecute=`` (prctl ``PR_SET_MDWE``, the kernel's own W^X switch),
and optionally under ``strace -c`` so the system calls used can be compared with
``SystemCallFilter=``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.netns import Cluster, Host, require_netns

#: Commands the test needs, and the Debian packages that provide them.
NEEDED = {
    "/usr/sbin/sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "systemd-analyze": "systemd",
    "setpriv": "util-linux",
    "prlimit": "util-linux",
    "strace": "strace",
}

_apt_updated = False


def ensure_commands(needed: dict[str, str] = NEEDED) -> None:
    """Install (apt-get) the packages of missing commands; fail with what to do if impossible."""
    global _apt_updated
    missing = sorted({pkg for cmd, pkg in needed.items()
                      if not (os.path.exists(cmd) if cmd.startswith("/") else shutil.which(cmd))})
    if not missing:
        return
    if not shutil.which("apt-get"):
        pytest.fail(f"this test needs the packages {', '.join(missing)}; install them first")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300,
                       check=False)
        _apt_updated = True
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"apt-get install {' '.join(missing)} failed; install them before the "
                    f"tests:\n{proc.stderr[-2000:]}")


@dataclass
class SshHost:
    """A namespace host with sshd and a private root-like directory."""

    host: Host
    root: Path  # this host's "/" for fdship's paths
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def addr(self) -> str:
        return self.host.addr

    def path(self, abspath: str) -> Path:
        """Where an absolute path of a real machine lives for this host."""
        return self.root / abspath.lstrip("/")


@dataclass
class Fleet:
    base: Path
    cluster: Cluster
    hosts: list[SshHost]
    client_key: Path
    known_hosts: Path
    #: The service user the roles create: one per run, so that parallel runs on one
    #: machine (one /etc/passwd) never share it.
    user: str = "fdship"
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ssh_args(self) -> str:
        return (f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                f"-o IdentitiesOnly=yes -o ConnectTimeout=10")

    def ansible_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update({
            "ANSIBLE_HOME": str(self.base / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-home" / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.base / "cp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
        })
        return env


def _sshd_config(base: Path, h: SshHost, host_key: Path, authorized: Path) -> Path:
    cfg = base / f"sshd-{h.name}.conf"
    cfg.write_text(f"""\
ListenAddress {h.addr}:22
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    return cfg


def _wait_port(h: SshHost, port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((h.addr, port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {h.addr}:{port} after {timeout}s")


@contextlib.contextmanager
def make_fleet(n: int) -> Iterator[Fleet]:
    """N ssh hosts; removes namespaces, processes and files whatever happens."""
    require_netns()
    ensure_commands()
    # /run/sshd is sshd's privilege-separation directory; a host without the
    # ssh service running may not have it yet.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    # Not tmp_path: the service user must traverse every parent directory, and
    # pytest's base temp directory is private to root.
    base = Path(tempfile.mkdtemp(prefix="fdship-ansible-"))
    base.chmod(0o755)
    user = ""
    try:
        with Cluster(n, prefix="fda") as cluster:
            user = f"fdship-{cluster.run_id}"
            keys = base / "keys"
            keys.mkdir(mode=0o700)
            host_key, client_key = keys / "host_ed25519", keys / "client_ed25519"
            for k in (host_key, client_key):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fdship-test",
                                "-f", str(k)], check=True, capture_output=True)
            authorized = keys / "authorized_keys"
            shutil.copy(client_key.with_suffix(".pub"), authorized)
            pub = host_key.with_suffix(".pub").read_text().split()
            known = keys / "known_hosts"
            known.write_text("".join(f"{h.addr} {pub[0]} {pub[1]}\n" for h in cluster.hosts))
            hosts = []
            for h in cluster.hosts:
                root = base / h.name
                root.mkdir(mode=0o755)
                sh = SshHost(host=h, root=root)
                cfg = _sshd_config(base, sh, host_key, authorized)
                sh.sshd = h.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                hosts.append(sh)
            for sh in hosts:
                try:
                    _wait_port(sh, 22)
                except AssertionError:
                    err = b""
                    if sh.sshd is not None and sh.sshd.poll() is not None and sh.sshd.stderr:
                        err = sh.sshd.stderr.read()
                    raise AssertionError(f"sshd did not start on {sh.addr}: {err.decode()}") \
                        from None
            yield Fleet(base=base, cluster=cluster, hosts=hosts, client_key=client_key,
                        known_hosts=known, user=user)
    finally:
        # The namespaces' processes are gone by now, so the user can go too (if a
        # failed test left it behind).
        if user:
            subprocess.run(["userdel", user], capture_output=True, check=False)
            subprocess.run(["groupdel", user], capture_output=True, check=False)
        # FDSHIP_TEST_KEEP=1 keeps the directory (ansible logs, service logs) for a look.
        if os.environ.get("FDSHIP_TEST_KEEP") == "1":
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


# ---- throwaway certificates ------------------------------------------------------------------


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, f"openssl {' '.join(args)} failed:\n{proc.stderr}"


def make_fleet_pki(d: Path, hosts: list[SshHost]) -> Path:
    """A CA (``ca.pem``) and, per host, ``NAME.pem`` + ``NAME.key`` for its name and address.

    Made with the openssl command, the way docs/operations.md ("TLS") tells an
    operator to: EC P-256 keys, the host's address and name in subjectAltName.
    """
    ensure_commands({"openssl": "openssl"})
    d.mkdir(mode=0o700)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2",
             "-subj", "/CN=fdship roll-out test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for h in hosts:
        issue_host_cert(d, h)
    return d


def issue_host_cert(d: Path, h: SshHost) -> None:
    """(Re)issue ``NAME.pem`` and a fresh ``NAME.key`` for host ``h``, signed by ``d/ca.pem``."""
    key, csr, cert, ext = (d / f"{h.name}{s}" for s in (".key", ".csr", ".pem", ".cnf"))
    ext.write_text(f"subjectAltName=IP:{h.addr},DNS:{h.name}\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={h.name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(d / "ca.pem"), "-CAkey",
             str(d / "ca.key"), "-CAcreateserial", "-out", str(cert), "-days", "2",
             "-extfile", str(ext))
    key.chmod(0o600)


# ---- running a unit without systemd -------------------------------------------------------

_SANDBOX = """\
# Applies what this machine can apply of a systemd unit without systemd, then execs.
import ctypes, os, sys
umask, mdwe = int(sys.argv[1], 8), sys.argv[2] == "yes"
os.umask(umask)
if mdwe:
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_MDWE) failed: " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[3], sys.argv[3:])
"""


def read_unit(path: Path) -> dict[str, list[str]]:
    """The [Service] settings of a unit file plus its drop-ins: name -> values in order."""
    out: dict[str, list[str]] = {}
    files = [path] + sorted((path.parent / (path.name + ".d")).glob("*.conf"))
    for f in files:
        section = ""
        for raw in f.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            if section == "Service" and "=" in line:
                k, v = line.split("=", 1)
                out.setdefault(k.strip(), []).append(v.strip())
    return out


def service_argv(unit_file: Path, host_root: Path, base: Path, strace_out: Path | None = None,
                 user: str | None = None) -> list[str]:
    """The command that runs ``unit_file``'s ExecStart for a host rooted at ``host_root``.

    ``user`` stands for the unit's User= and Group= when the roles were told to
    create another service user (fdship_common_user).
    """
    unit = read_unit(unit_file)
    exec_start = unit["ExecStart"][-1].split()
    # The unit is static and names real paths; this host keeps them under its root.
    argv = [str(host_root / a.lstrip("/")) if a.startswith("/") else a for a in exec_start]
    launcher = base / "unit-sandbox.py"
    if not launcher.exists():
        launcher.write_text(_SANDBOX)
        launcher.chmod(0o644)
    group = user or unit["Group"][-1]
    user = user or unit["User"][-1]
    if unit.get("CapabilityBoundingSet", [None])[-1] != "":
        raise AssertionError("the unit must keep an empty CapabilityBoundingSet=")
    cmd: list[str] = []
    if "LimitNOFILE" in unit:
        # Raising the hard limit needs CAP_SYS_RESOURCE, which a container may lack:
        # then the unit's number is capped at what this machine allows.
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        n = int(unit["LimitNOFILE"][-1])
        if hard != resource.RLIM_INFINITY:
            n = min(n, hard)
        cmd += ["prlimit", f"--nofile={n}:{n}", "--"]
    cmd += ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups",
            "--bounding-set=-all", "--inh-caps=-all"]
    if unit.get("NoNewPrivileges", ["no"])[-1] == "yes":
        cmd.append("--no-new-privs")
    cmd += ["--", "/usr/bin/python3", "-I", str(launcher), unit.get("UMask", ["0022"])[-1],
            unit.get("MemoryDenyWriteExecute", ["no"])[-1]]
    if strace_out is not None:
        cmd += ["strace", "-f", "-qq", "-c", "-o", str(strace_out), "--"]
    return cmd + argv


def direct_child(pid: int) -> int:
    """The one child of ``pid`` (the traced service when strace sits in between)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pid
    return int(kids[0]) if kids else pid


def strace_syscalls(path: Path) -> set[str]:
    """System call names from an ``strace -c`` summary."""
    names = set()
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1] != "total":
            names.add(parts[-1])
    return names


def syscall_groups() -> dict[str, set[str]]:
    """systemd's system call groups (``@system-service`` ...), each fully expanded."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True,
                         check=True).stdout
    raw: dict[str, list[str]] = {}
    group = ""
    for line in out.splitlines():
        if line.startswith("@"):
            group = line.split()[0]
            raw[group] = []
        elif group and line.startswith(" ") and not line.strip().startswith("#"):
            raw[group].append(line.strip())

    def expand(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        names: set[str] = set()
        for member in raw.get(name, []):
            if member.startswith("@"):
                if member not in seen:
                    names |= expand(member, seen | {name})
            else:
                names.add(member)
        return names

    return {g: expand(g) for g in raw}


def syscall_filter_allows(unit: dict[str, list[str]]) -> set[str]:
    """The system calls a unit's SystemCallFilter= lines allow (allow-list, then ~deny)."""
    groups = syscall_groups()

    def names(words: list[str]) -> set[str]:
        out: set[str] = set()
        for w in words:
            out |= groups[w] if w.startswith("@") else {w}
        return out

    allowed: set[str] = set()
    for value in unit.get("SystemCallFilter", []):
        if value.startswith("~"):
            allowed -= names(value[1:].split())
        else:
            allowed |= names(value.split())
    return allowed
