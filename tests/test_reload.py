"""Reload of edged.toml (live keys, pending restart, a broken file kept out), start-up errors as one line with
a documented exit code, and the checks on files that hold secrets. The daemon runs as a real subprocess."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, wait_for

from edged.config import Config, load_config, secret_file_warnings
from edged.errors import EXIT_CONFIG
from edged.http import server as http_server
from edged.reconfig import changed_keys, is_live, with_live_keys

NOTIFY = "edged-reload-test"


def edged_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


# -- which keys change live -------------------------------------------------------------------------------


def test_changed_keys_name_the_file_keys(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    a.write_text('[api]\nlisten = "127.0.0.1:7700"\n[log]\nlevel = "info"\n')
    b = tmp_path / "b.toml"
    b.write_text('[api]\nlisten = "127.0.0.1:7710"\n[log]\nlevel = "debug"\n[demo]\necho = true\n[tenants.x]\n')
    old, new = load_config(str(a)), load_config(str(b))
    keys = changed_keys(old, new)
    assert keys == ["api.listen", "tenants", "log.level", "demo.echo"]
    assert [k for k in keys if is_live(k)] == ["tenants", "log.level", "demo.echo"]
    running = with_live_keys(old, new)
    assert running.api == old.api and running.log == new.log and running.demo == new.demo
    assert changed_keys(running, new) == ["api.listen"]  # what stays pending until a restart
    assert changed_keys(Config(), Config()) == []
    # [mqtt]: the broker list, follow and credentials are live; the rest waits for a restart.
    c = tmp_path / "c.toml"
    c.write_text('[mqtt]\nenabled = true\nurl = ["mqtt://a:1883", "mqtt://b:1883"]\nfollow = ["*"]\nkeepalive = "9s"\n')
    d = tmp_path / "d.toml"
    d.write_text('[mqtt]\nenabled = true\nurl = ["mqtt://b:1883"]\nfollow = ["x"]\nkeepalive = "5s"\n')
    old, new = load_config(str(c)), load_config(str(d))
    assert changed_keys(old, new) == ["mqtt.url", "mqtt.follow", "mqtt.keepalive"]
    running = with_live_keys(old, new)
    assert running.mqtt.urls == ("mqtt://b:1883",) and running.mqtt.follow == ("x",)
    assert changed_keys(running, new) == ["mqtt.keepalive"]


# -- the daemon: SIGHUP / edged reload --------------------------------------------------------------------


def _status(d) -> dict:
    return d.api.get_json("/v1/status")


def test_reload_applies_live_keys_reports_pending_ones_and_keeps_a_running_config(edged) -> None:
    d = edged({})
    base = d.config.read_text()
    assert d.api.request("GET", "/svc/echo/x")[0] == 404  # no demo service yet

    # A live key (demo.echo) and a restart-only one (api.listen) change; `edged reload` waits for the outcome.
    d.config.write_text(base.replace(f"127.0.0.1:{d.port}", f"127.0.0.1:{free_port()}") + "[demo]\necho = true\n")
    done = edged_cli("reload", "--config", str(d.config), "--api", f"unix:{d.socket}", check=True)
    assert "demo.echo" in done.stdout and "pending restart: api.listen" in done.stdout
    assert d.api.request("GET", "/svc/echo/x")[0] == 200  # applied at once
    state = _status(d)["config"]
    assert state["pending_restart"] == ["api.listen"] and state["reloads"] == 1
    assert state["last_reload"]["applied"] == ["demo.echo"]
    text = edged_cli("status", "--api", f"unix:{d.socket}", check=True).stdout
    assert "pending restart: api.listen" in text
    wait_for(lambda: "pending restart" in d.log_text(), 5, what="pending restart in the log")

    # A broken file: the reload is refused with the file, line and key; the daemon keeps serving on the old one.
    d.config.write_text(base + "[demo]\necho = true\nechoo = 1\n")
    done = edged_cli("reload", "--api", f"unix:{d.socket}")
    assert done.returncode == EXIT_CONFIG
    assert "running config kept" in done.stderr and "demo.echoo" in done.stderr
    assert d.api.request("GET", "/svc/echo/x")[0] == 200
    last = _status(d)["config"]["last_reload"]
    assert not last["ok"] and "echoo" in last["error"]
    assert "last reload FAILED" in edged_cli("status", "--api", f"unix:{d.socket}").stdout

    # Back to the start: nothing pending any more, demo.echo off again.
    d.config.write_text(base)
    edged_cli("reload", "--api", f"unix:{d.socket}", check=True)
    assert _status(d)["config"]["pending_restart"] == []
    assert d.api.request("GET", "/svc/echo/x")[0] == 404


def test_reload_notifies_systemd_with_the_error_in_status(edged, tmp_path: Path) -> None:
    """RELOADING=1, then READY=1 with a STATUS= that names the refused key, on a real notify socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    os.environ["NOTIFY_SOCKET"] = str(path)
    try:
        d = edged({})
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert sock.recv(4096).startswith(b"READY=1")
        d.config.write_text(d.config.read_text() + "[demo]\necho = 3\n")
        edged_cli("reload", "--api", f"unix:{d.socket}")
        messages = [sock.recv(4096).decode() for _ in range(2)]
    finally:
        sock.close()
    assert messages[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert messages[1].startswith("READY=1\nSTATUS=reload failed, running config kept: ")
    assert "demo.echo" in messages[1]


# -- start-up errors ----------------------------------------------------------------------------------------


def test_a_bad_config_at_start_is_one_line_and_exit_78(tmp_path: Path) -> None:
    cfg = tmp_path / "edged.toml"
    cfg.write_text('[api]\nlisten = "127.0.0.1:99999"\n')
    done = edged_cli("run", "--config", str(cfg))
    assert done.returncode == EXIT_CONFIG == 78
    assert done.stderr.strip().splitlines() == [
        f"edged: bad config: {cfg}:2: api.listen: expected HOST:PORT like '127.0.0.1:7700' or '[::1]:7700' "
        "(port 0..65535), got '127.0.0.1:99999'"
    ]


def test_a_start_failure_is_one_line_and_exit_1(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cfg = tmp_path / "edged.toml"
    cfg.write_text(
        f'[api]\nlisten = "127.0.0.1:{port}"\nsocket = ""\n[state]\ndir = "state"\n[mdns]\nenabled = false\n'
        f"[ingress]\nenabled = false\n"
    )
    try:
        done = edged_cli("run", "--config", str(cfg))
    finally:
        taken.close()
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("edged:")]
    assert len(errors) == 1 and "cannot start" in errors[0] and str(port) in errors[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_the_socket_keeps_its_group_without_chown(tmp_path: Path, monkeypatch) -> None:
    """Under systemd the socket is born with group edged, and chown is denied (SystemCallFilter=~@privileged):
    listen_unix must not call it when the group is already right."""

    def denied(*args) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(http_server.os, "chown", denied)
    group = grp.getgrgid(os.getegid()).gr_name

    async def main() -> None:
        server = http_server.HttpServer(lambda req, resp: None)
        path = str(tmp_path / "api.sock")
        await server.listen_unix(path, 0o660, group)
        assert os.stat(path).st_gid == os.getegid()
        other = next((g for g in grp.getgrall() if g.gr_gid != os.getegid()), None)
        if other is not None:  # a real change of group still tries chown (and reports its failure)
            with pytest.raises(http_server.ListenError, match="Operation not permitted"):
                await http_server.HttpServer(lambda req, resp: None).listen_unix(
                    str(tmp_path / "b.sock"), 0o660, other.gr_name
                )
        await server.shutdown(1)

    asyncio.run(main())


# -- files that hold secrets --------------------------------------------------------------------------------


def test_world_readable_secret_files_are_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "garden.tokens"
    tokens.write_text("g-one\n")
    password = tmp_path / "mqtt.password"
    password.write_text("hunter2\n")
    cfg = tmp_path / "edged.toml"
    cfg.write_text('[tenants.garden]\ntoken_file = "garden.tokens"\n')
    for path in (tokens, password):
        path.chmod(0o644)
    done = edged_cli("check", "--config", str(cfg))
    assert done.returncode == 1
    assert f"tenants.garden.token_file: {tokens} holds a secret and every user may read it (mode 0644)" in done.stderr
    assert edged_cli("run", "--config", str(cfg)).returncode == EXIT_CONFIG
    cfg.write_text('[mqtt]\npassword_file = "mqtt.password"\n')
    done = edged_cli("check", "--config", str(cfg))
    assert done.returncode == 1 and "mqtt.password_file" in done.stderr and "chmod o-rwx" in done.stderr
    password.chmod(0o600)
    assert edged_cli("check", "--config", str(cfg)).returncode == 0


def test_group_readable_secrets_warn_when_the_group_has_other_members(tmp_path: Path) -> None:
    cfg = tmp_path / "edged.toml"
    cfg.write_text('[tenants.default]\ntokens = ["s3cret"]\n')
    cfg.chmod(0o644)
    config = load_config(str(cfg))
    assert config.secret_files == (str(cfg),)
    warnings = secret_file_warnings(config)
    assert len(warnings) == 1 and "every user may read it (mode 0644)" in warnings[0]
    done = edged_cli("check", "--config", str(cfg))
    assert done.returncode == 0 and f"warning: {cfg} holds secrets" in done.stderr
    cfg.chmod(0o600)
    assert secret_file_warnings(config) == []
    # Group-readable: a warning only when users other than the owner and the daemon are in the group.
    crowded = next((g for g in grp.getgrall() if g.gr_mem and g.gr_name not in g.gr_mem), None)
    if os.geteuid() == 0 and crowded is not None:
        os.chown(cfg, -1, crowded.gr_gid)
        cfg.chmod(0o640)
        (warning,) = secret_file_warnings(config)
        assert f"group {crowded.gr_name} may read it" in warning and crowded.gr_mem[0] in warning
    no_secrets = tmp_path / "plain.toml"
    no_secrets.write_text('[log]\nlevel = "info"\n')
    no_secrets.chmod(0o644)
    assert load_config(str(no_secrets)).secret_files == ()


def test_status_json_carries_the_config_state(edged) -> None:
    d = edged({})
    state = json.loads(edged_cli("status", "--json", "--api", f"unix:{d.socket}", check=True).stdout)["config"]
    assert state["file"] == str(d.config) and state["reloads"] == 0 and state["pending_restart"] == []
    assert state["pid"] == d.proc.pid


def test_access_rules_change_on_reload(edged) -> None:
    """[access] is live: anonymous loopback callers lose their rights at once; the socket's admin keeps them."""
    d = edged({})
    assert d.api.request("GET", "/v1/status")[0] == 200  # loopback TCP, no token: anonymous read + call
    d.config.write_text(d.config.read_text() + '[access]\nanonymous = "none"\n')
    done = edged_cli("reload", "--api", f"unix:{d.socket}", check=True)
    assert "access.anonymous" in done.stdout
    assert d.api.request("GET", "/v1/status")[0] == 401
