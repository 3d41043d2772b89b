"""Config: defaults < TOML < flags, clear errors, token rules, docs list every key."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
from dataclasses import fields

import pytest

from fdship import config as C
from fdship.errors import ConfigError

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def parse(cls, argv):
    p = argparse.ArgumentParser()
    C.add_arguments(p, cls)
    return C.load(cls, p.parse_args(argv))


def test_flag_beats_file_beats_default(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('listen = "127.0.0.1:9000"\nchunk_size = "1M"\ndata_dir = "/x"\n')
    cfg = parse(C.CenterConfig, ["--config", str(f), "--data-dir", "/y"])
    assert cfg.listen == "127.0.0.1:9000"
    assert cfg.chunk_size == 1024 * 1024
    assert cfg.data_dir == "/y"
    assert cfg.heartbeat_timeout == 5.0


def test_daemon_lists_hooks_and_derived_advertise(tmp_path):
    f = tmp_path / "d.toml"
    f.write_text('label = ["a"]\nallow_dest = ["/data"]\nlisten = "127.0.0.1:7171"\n'
                 'upload_rate = "50M"\n[hooks.reload]\ncommand = ["/bin/true"]\ntimeout = 5\n')
    cfg = parse(C.DaemonConfig, ["--config", str(f), "--label", "b,c", "--name", "n1"])
    assert cfg.label == ["b", "c"]  # the flag replaces the file's list
    assert cfg.allow_dest == ["/data"]
    assert cfg.upload_rate == 50 * 1024 * 1024
    assert cfg.hooks == {"reload": {"command": ["/bin/true"], "timeout": 5}}
    assert cfg.advertise == "127.0.0.1:7171"


@pytest.mark.parametrize("toml,msg", [
    ('bogus = 1\n', "unknown key 'bogus'"),
    ('chunk_size = "lots"\n', "is not a size"),
    ('listen = "nowhere"\n', "must be HOST:PORT"),
    ('heartbeat_timeout = "soon"\n', "is not a duration"),
    ('max_attempts = 0\n', "at least 1"),
    ('listen = \n', "not valid TOML"),
])
def test_bad_center_config_is_a_clear_error(tmp_path, toml, msg):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=msg):
        parse(C.CenterConfig, ["--config", str(f)])


def test_fault_injection_needs_explicit_permission():
    with pytest.raises(ConfigError, match="allow_fault_injection"):
        parse(C.DaemonConfig, ["--fault-inject", "corrupt=0.5"])
    cfg = parse(C.DaemonConfig, ["--fault-inject", "corrupt=0.5", "--allow-fault-injection"])
    assert cfg.fault_inject == "corrupt=0.5"


def test_token_file_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("FDSHIP_TOKEN", raising=False)
    t = tmp_path / "token"
    t.write_text("abc\n")
    os.chmod(t, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        C.read_token(str(t))
    os.chmod(t, 0o600)
    assert C.read_token(str(t)) == "abc"
    monkeypatch.setenv("FDSHIP_TOKEN", "from-env")
    assert C.read_token(str(t)) == "from-env"
    monkeypatch.delenv("FDSHIP_TOKEN")
    with pytest.raises(ConfigError, match="cannot read token file"):
        C.read_token(str(tmp_path / "missing"))


def test_processes_refuse_to_start_with_one_line_reasons(tmp_path):
    t = tmp_path / "token"
    t.write_text("abc")
    os.chmod(t, 0o640)
    env = {k: v for k, v in os.environ.items() if k != "FDSHIP_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "fdship", "center", "--data-dir", str(tmp_path / "c"),
                        "--listen", "127.0.0.1:0", "--token-file", str(t)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and "readable by group or others" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "fdship", "daemon", "--center", "ftp://x",
                        "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and "must be a URL" in r.stderr


def test_port_taken_is_a_clear_error(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "fdship", "center", "--data-dir",
                            str(tmp_path / "c"), "--listen", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cannot listen on" in r.stderr


def test_every_config_key_is_documented():
    text = DOC.read_text()
    for cls in (C.CenterConfig, C.DaemonConfig):
        for f in fields(cls):
            assert f"`{f.name}`" in text, f"docs/configuration.md misses {cls.__name__}.{f.name}"
