"""Config: defaults < TOML < flags, clear errors, token rules, docs list every key."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import dataclasses
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


# ---------------------------------------------------------------------- scheduling tunables

SCHEDULING = {"upload_budget": 1.0, "download_budget": 1.0, "source_extra": 0.1,
              "backoff_base": 0.2, "backoff_cap": 10.0, "stream_depth": 16}


def test_scheduling_keys_default_to_the_cores_tunables():
    """The config's defaults are the scheduler's own: leaving a key out changes nothing."""
    from fdship.center.runner import tunables_from
    from fdship.core.scheduler import Tunables

    cfg = parse(C.CenterConfig, [])
    core = Tunables()
    for name, value in SCHEDULING.items():
        assert getattr(cfg, name) == getattr(core, name) == value, name
    assert tunables_from(cfg) == Tunables(chunk_size=cfg.chunk_size)


def test_scheduling_keys_from_flags_and_file(tmp_path):
    from fdship.center.runner import tunables_from

    f = tmp_path / "c.toml"
    f.write_text('upload_budget = 2\ndownload_budget = "1.5"\nsource_extra = 0\n'
                 'backoff_base = "500ms"\nbackoff_cap = "1m"\nstream_depth = 2\n')
    cfg = parse(C.CenterConfig, ["--config", str(f), "--upload-budget", "3.5",
                                 "--backoff-cap", "90s"])
    assert (cfg.upload_budget, cfg.download_budget, cfg.source_extra, cfg.backoff_base,
            cfg.backoff_cap, cfg.stream_depth) == (3.5, 1.5, 0.0, 0.5, 90.0, 2)
    t = tunables_from(cfg)
    assert (t.upload_budget, t.download_budget, t.source_extra, t.backoff_base,
            t.backoff_cap, t.stream_depth) == (3.5, 1.5, 0.0, 0.5, 90.0, 2)
    assert tunables_from(parse(C.CenterConfig, ["--stream-depth", "0"])).stream_depth == 0


@pytest.mark.parametrize("argv,msg", [
    (["--upload-budget", "0.2"], "upload_budget must be between 0.25 and 100"),
    (["--upload-budget", "101"], "upload_budget must be between 0.25 and 100"),
    (["--download-budget", "0"], "download_budget must be between 0.25 and 100"),
    (["--download-budget", "-1"], "download_budget must be between 0.25 and 100"),
    (["--upload-budget", "lots"], "upload_budget: expected a number like 0.5"),
    (["--upload-budget", "nan"], "upload_budget: expected a finite number"),
    (["--download-budget", "inf"], "download_budget: expected a finite number"),
    (["--source-extra", "1.5"], "source_extra must be between 0"),
    (["--source-extra", "-0.1"], "source_extra must be between 0"),
    (["--source-extra", "half"], "source_extra: expected a number"),
    (["--backoff-base", "0"], "backoff_base must be more than 0 seconds"),
    (["--stream-depth", "-1"], r"stream_depth must be between 0 \(no cut-through"),
    (["--stream-depth", "65"], "stream_depth must be between 0"),
    (["--stream-depth", "deep"], "stream_depth"),
    (["--backoff-base", "soon"], "backoff_base: 'soon' is not a duration"),
    (["--backoff-cap", "-1"], "is not a duration"),
    (["--backoff-base", "20s"], r"backoff_cap \(10 s\) must be at least backoff_base \(20 s\)"),
    (["--backoff-base", "2s", "--backoff-cap", "1s"], "raise backoff_cap or lower"),
])
def test_bad_scheduling_values_are_refused_with_a_sentence(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse(C.CenterConfig, argv)


@pytest.mark.parametrize("toml,msg", [
    ("upload_budget = nan\n", "expected a finite number"),
    ("backoff_cap = inf\n", "expected a duration like 200ms"),
    ("source_extra = true\n", "expected a number"),
    ("download_budget = [1]\n", "expected a number"),
])
def test_bad_scheduling_values_in_a_file(tmp_path, toml, msg):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=msg):
        parse(C.CenterConfig, ["--config", str(f)])


def test_center_refuses_a_bad_scheduling_value_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fdship", "center", "--data-dir",
                        str(tmp_path / "c"), "--listen", "127.0.0.1:0", "--upload-budget",
                        "0.1"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "upload_budget must be between 0.25 and 100" in lines[0]
    assert not (tmp_path / "c").exists()  # refused before anything was created


def test_event_loop_choice(tmp_path):
    import asyncio

    import uvloop

    assert parse(C.DaemonConfig, ["--name", "n"]).event_loop == "auto"
    assert C.loop_runner("auto") is uvloop.run  # installed with fdship
    assert C.loop_runner("uvloop") is uvloop.run
    assert C.loop_runner("asyncio") is asyncio.run
    assert parse(C.CenterConfig, ["--event-loop", "asyncio"]).event_loop == "asyncio"
    with pytest.raises(ConfigError, match="event_loop must be auto, asyncio or uvloop, not 'tokio'"):
        parse(C.DaemonConfig, ["--name", "n", "--event-loop", "tokio"])


def test_write_behind_is_on_unless_turned_off(tmp_path):
    assert parse(C.DaemonConfig, ["--name", "n"]).write_behind is True
    assert parse(C.DaemonConfig, ["--name", "n", "--write-behind", "off"]).write_behind is False
    assert parse(C.DaemonConfig, ["--name", "n", "--write-behind", "on"]).write_behind is True
    f = tmp_path / "d.toml"
    f.write_text("write_behind = false\n")
    assert parse(C.DaemonConfig, ["--config", str(f), "--name", "n"]).write_behind is False
    with pytest.raises(ConfigError, match="write_behind: expected true or false, got 'sometimes'"):
        parse(C.DaemonConfig, ["--name", "n", "--write-behind", "sometimes"])


def test_receive_batch_takes_sizes_and_refuses_what_would_stall_relays(tmp_path):
    assert parse(C.DaemonConfig, ["--name", "n"]).receive_batch == 128 * 1024
    assert parse(C.DaemonConfig, ["--name", "n", "--receive-batch", "256K"]).receive_batch \
        == 256 * 1024
    assert parse(C.DaemonConfig, ["--name", "n", "--receive-batch", "0"]).receive_batch == 0
    with pytest.raises(ConfigError, match="receive_batch must be at most 4M .* got 8.0 MiB"):
        parse(C.DaemonConfig, ["--name", "n", "--receive-batch", "8M"])
    with pytest.raises(ConfigError, match="is not a size"):
        parse(C.DaemonConfig, ["--name", "n", "--receive-batch", "lots"])


def test_allow_hardlinked_sources_is_off_unless_asked(tmp_path):
    assert parse(C.DaemonConfig, ["--name", "n"]).allow_hardlinked_sources is False
    assert parse(C.DaemonConfig, ["--name", "n", "--allow-hardlinked-sources"]) \
        .allow_hardlinked_sources is True
    f = tmp_path / "d.toml"
    f.write_text("allow_hardlinked_sources = true\n")
    assert parse(C.DaemonConfig, ["--config", str(f), "--name", "n"]).allow_hardlinked_sources
    f.write_text('allow_hardlinked_sources = "maybe"\n')
    with pytest.raises(ConfigError, match="allow_hardlinked_sources: expected true or false"):
        parse(C.DaemonConfig, ["--config", str(f), "--name", "n"])


def _doc_rows(section: str) -> dict[str, tuple[str, str]]:
    """{key: (default, meaning)} from one table of docs/configuration.md."""
    text = DOC.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            key, default, meaning = (c.strip() for c in line.strip("|").split(" | ", 2))
            rows[key.strip("`")] = (default.strip("`"), meaning)
    return rows


@pytest.mark.parametrize("cls,section", [(C.CenterConfig, "Center"),
                                         (C.DaemonConfig, "Daemon")])
def test_documented_defaults_and_meanings_follow_the_dataclass(cls, section):
    """The page is kept by hand: every row's default and meaning must be the field's own."""
    rows = _doc_rows(section)
    assert list(rows) == [f.name for f in fields(cls)], "rows must follow the dataclass order"
    for f in fields(cls):
        if f.metadata.get("file_only"):
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = '""' if default == "" else str(default)
        assert rows[f.name] == (shown, f.metadata["help"]), f.name
