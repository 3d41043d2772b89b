"""Fast checks of the roll-out files that need no hosts: units, playbooks, Vagrantfile, lint.

Where it sits: beside test_deploy.py (the slow end-to-end run); these catch a
broken unit, playbook or inventory in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ansible.conftest import ensure_commands, read_unit

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
UNITS = ["fdship-center.service", "fdship-daemon.service"]
PLAYBOOKS = ["site.yml", "center.yml", "daemons.yml", "upgrade.yml", "uninstall.yml"]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is missing: pip install -e '.[test]'"
    return str(path)


def _ansible_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_HOME=str(tmp_path / "ansible-home"), LC_ALL="C.UTF-8", LANG="C.UTF-8",
               ANSIBLE_NOCOLOR="1")
    return env


def _unit_root(tmp_path: Path, with_executable: bool = True) -> Path:
    """A root file system holding the units, systemd's own units and the venv's fdship."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for u in UNITS:
        shutil.copy(REPO / "systemd" / u, root / "etc/systemd/system" / u)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    if with_executable:
        exe = root / "opt/fdship/venv/bin/fdship"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                           *[f"/etc/systemd/system/{u}" for u in UNITS]],
                          capture_output=True, text=True, timeout=120, check=False)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    ensure_commands({"systemd-analyze": "systemd"})
    proc = _verify(_unit_root(tmp_path))
    assert proc.returncode == 0 and "fdship" not in proc.stderr, proc.stderr


def test_verify_catches_a_unit_whose_executable_is_missing(tmp_path: Path) -> None:
    ensure_commands({"systemd-analyze": "systemd"})
    proc = _verify(_unit_root(tmp_path, with_executable=False))
    assert proc.returncode != 0
    assert "/opt/fdship/venv/bin/fdship" in proc.stderr


def test_units_are_static_and_hardened() -> None:
    for name in UNITS:
        unit = read_unit(REPO / "systemd" / name)
        role = name.split("-")[1].split(".")[0]
        one = {k: v[-1] for k, v in unit.items()}
        assert one["ExecStart"] == (f"/opt/fdship/venv/bin/fdship {role} "
                                    f"--config /etc/fdship/{role}.toml")
        assert one["User"] == one["Group"] == "fdship"
        assert one["StateDirectory"] == f"fdship/{role}"
        for key, value in {
            "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
            "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
            "ProtectControlGroups": "yes", "LockPersonality": "yes",
            "MemoryDenyWriteExecute": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "CapabilityBoundingSet": "", "Restart": "on-failure", "KillSignal": "SIGTERM",
            "TimeoutStopSec": "30", "LimitNOFILE": "65536",
        }.items():
            assert one.get(key) == value, f"{name}: {key}={one.get(key)!r}, want {value!r}"
        assert unit["SystemCallFilter"][0] == "@system-service"


@pytest.mark.parametrize("inventory", ["production", "vagrant"])
def test_playbooks_pass_syntax_check(tmp_path: Path, inventory: str) -> None:
    proc = subprocess.run([_bin("ansible-playbook"), "--syntax-check", "-i",
                           f"inventories/{inventory}", *PLAYBOOKS], cwd=ANSIBLE_DIR,
                          env=_ansible_env(tmp_path), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("inventory", ["production", "vagrant"])
def test_inventories_share_group_names_and_set_destinations(tmp_path: Path,
                                                           inventory: str) -> None:
    proc = subprocess.run([_bin("ansible-inventory"), "-i", f"inventories/{inventory}", "--list"],
                          cwd=ANSIBLE_DIR, env=_ansible_env(tmp_path), capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    inv = json.loads(proc.stdout)
    assert len(inv["fdship_center"]["hosts"]) == 1
    assert {"bidder", "builder"} <= set(inv["fdship_daemons"]["children"])
    for host, hv in inv["_meta"]["hostvars"].items():
        if host in inv["fdship_center"]["hosts"]:
            continue
        assert hv["fdship_daemon_allow_dest"], f"{host} has no allowed destination"


@pytest.mark.timeout(900)  # may first apt-get install vagrant (with Ruby)
def test_vagrantfile_validates(tmp_path: Path) -> None:
    ensure_commands({"vagrant": "vagrant"})
    # In a copy: validate writes .vagrant/ next to the Vagrantfile.
    shutil.copy(REPO / "Vagrantfile", tmp_path / "Vagrantfile")
    shutil.copytree(ANSIBLE_DIR, tmp_path / "ansible")
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant-home"),
               VAGRANT_CHECKPOINT_DISABLE="1")
    proc = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "validated successfully" in proc.stdout, \
        proc.stdout + proc.stderr


def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    lint = Path(sys.executable).parent / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed: pip install ansible-lint")
    env = _ansible_env(tmp_path)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run([str(lint), "--profile", "production", "--offline", "--nocolor"],
                          cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]


_GOOD = {
    "fdship_common_service_manager": "none",
    "fdship_common_wheelhouse_local": "",
    "fdship_common_pip_index_url": "http://127.0.0.1:9/simple",
    "fdship_daemon_allow_dest": ["/srv/fdship"],
}


@pytest.mark.parametrize(("change", "message"), [
    ({}, None),
    ({"fdship_common_pip_index_url": ""}, "Nothing to install from"),
    ({"fdship_daemon_allow_dest": []}, "must list at least one absolute directory"),
    ({"fdship_daemon_hooks": {"both": {"command": ["/bin/true"], "url": "http://x/"}}},
     "exactly one of command (a list"),
    ({"fdship_common_service_manager": "systemd"}, "is not run by systemd"),
    ({"fdship_common_service_manager": "upstart"}, "must be one of: systemd, none"),
    # TLS: a certificate without its key, a CA alone, files missing on the
    # controller, a center URL that does not match, TLS keys in extra config.
    ({"fdship_common_tls_cert_src": "@cert"}, "needs both fdship_common_tls_cert_src and"),
    ({"fdship_common_tls_ca_src": "@ca"}, "fdship_common_tls_ca_src alone is refused"),
    ({"fdship_common_tls_cert_src": "@cert", "fdship_common_tls_key_src": "/nonexistent/k.pem"},
     "TLS files for here missing on the controller: /nonexistent/k.pem."),
    ({"fdship_common_tls_cert_src": "@cert", "fdship_common_tls_key_src": "@key",
      "fdship_common_tls_ca_src": "@ca"}, None),
    ({"fdship_common_tls_cert_src": "@cert", "fdship_common_tls_key_src": "@key",
      "fdship_daemon_center_url": "http://127.0.0.1:7070"},
     "fdship_daemon_center_url must start with https://"),
    ({"fdship_daemon_extra_config": {"tls_ca": "/x.pem"}},
     "not in fdship_daemon_extra_config"),
    ({"fdship_center_extra_config": {"tls_cert": "/x.pem"}},
     "not there"),
    # The watched bidder: absolute pidfiles, a busy scale of at least 1 % of a core.
    ({"fdship_daemon_watch_pidfile": ["/run/bidder.pid"], "fdship_daemon_watch_busy_cpu": 800},
     None),
    ({"fdship_daemon_watch_pidfile": ["run/bidder.pid"]}, "fdship_daemon_watch_pidfile"),
    ({"fdship_daemon_watch_pidfile": ["/run/bidder.pid"], "fdship_daemon_watch_busy_cpu": 0},
     "fdship_daemon_watch_busy_cpu at least 1"),
])
def test_preflight_refuses_bad_settings_with_a_clear_message(
        tmp_path: Path, change: dict, message: str | None) -> None:
    """The preflight checks alone (tag always), on this machine over a local connection."""
    inv = tmp_path / "inventory.json"
    here = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inv.write_text(json.dumps({"all": {"children": {
        "fdship_center": {"hosts": {"here": here}},
        "fdship_daemons": {"hosts": {"here": here}}}}}))
    # "@name": a real (empty) file on the controller; the preflight only checks it exists.
    for name in ("cert", "key", "ca"):
        (tmp_path / f"{name}.pem").write_text("")
    change = {k: str(tmp_path / f"{v[1:]}.pem") if isinstance(v, str) and v.startswith("@")
              else v for k, v in change.items()}
    extra = _GOOD | change | {"fdship_common_token_local_file": str(tmp_path / "token")}
    proc = subprocess.run([_bin("ansible-playbook"), "-i", str(inv), "site.yml", "--tags",
                           "always", "-e", json.dumps(extra)], cwd=ANSIBLE_DIR,
                          env=_ansible_env(tmp_path), capture_output=True, text=True,
                          timeout=300, check=False)
    out = proc.stdout + proc.stderr
    if message is None:
        assert proc.returncode == 0, out[-3000:]
    else:
        assert proc.returncode != 0 and message in out, out[-3000:]
