from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.systemd import Notifier, child_environ

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A notify socket bound on a short path (AF_UNIX paths are limited to 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="edged-n-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready("serving 3 services")
    assert _recv(sock) == "READY=1\nSTATUS=serving 3 services"
    n.ready()
    assert _recv(sock) == "READY=1"
    n.status("line one\nFORGED=1")
    assert _recv(sock) == "STATUS=line one FORGED=1"
    n.watchdog()
    assert _recv(sock) == "WATCHDOG=1"
    n.stopping()
    assert _recv(sock) == "STOPPING=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", _recv(sock))
    assert m and before <= int(m.group(1)) <= after
    n.close()


def test_messages_reach_an_abstract_socket() -> None:
    name = f"edged-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled and "@" + name in repr(n)
        n.ready("up")
        assert _recv(sock) == "READY=1\nSTATUS=up"
        n.close()
    finally:
        sock.close()


def test_disabled_and_broken_sockets_never_raise(tmp_path: Path) -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}, {"NOTIFY_SOCKET": "@"}):
        n = Notifier(env)
        assert not n.enabled
        n.ready()
        n.watchdog()
        assert n.watchdog_interval() is None
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    for _ in range(3):
        n.ready("x")  # ENOENT each time, swallowed
        n.stopping()
    n.close()


def test_a_full_socket_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    for i in range(5000):  # nobody reads: the queue fills and sends fail with EAGAIN instead of blocking
        n.status(f"message {i}")
    assert _recv(sock) == "STATUS=message 0"
    n.close()


def test_watchdog_interval() -> None:
    sock_env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier({**sock_env, "WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    ours = {**sock_env, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(ours).watchdog_interval() == 15.0
    assert Notifier({**ours, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None
    assert Notifier({**ours, "WATCHDOG_PID": "x"}).watchdog_interval() is None
    assert Notifier({**sock_env, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier({**sock_env, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier(sock_env).watchdog_interval() is None


def test_watchdog_loop_pings_while_healthy(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    sock.setblocking(False)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})  # a ping every 20 ms
    healthy = [True]

    async def wait_for_pings(count: int) -> list[str]:
        loop = asyncio.get_running_loop()
        got = []
        while len(got) < count:
            got.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)).decode())
        return got

    async def main() -> None:
        task = asyncio.ensure_future(n.async_watchdog_loop(lambda: healthy[0]))
        try:
            assert await wait_for_pings(3) == ["WATCHDOG=1"] * 3
            healthy[0] = False
            await asyncio.sleep(0.05)
            while True:  # drain pings sent before the flip
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    break
            await asyncio.sleep(0.2)
            with pytest.raises(BlockingIOError):
                sock.recv(4096)
            healthy[0] = True
            assert await wait_for_pings(1) == ["WATCHDOG=1"]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    # No watchdog configured: the loop returns at once.
    asyncio.run(asyncio.wait_for(Notifier({"NOTIFY_SOCKET": path}).async_watchdog_loop(), 10))


_CHILD = "from edged.systemd import Notifier; Notifier().ready('child up')"


def test_a_real_process_notifies_with_its_own_credentials(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd does, for NotifyAccess=main
    env = {**os.environ, "NOTIFY_SOCKET": path}
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert data == b"READY=1\nSTATUS=child up"
    creds = [d for level, kind, d in ancillary if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds, ancillary
    assert struct.unpack("iII", creds[0][:12])[1] == os.getuid()


def test_child_environ_drops_our_systemd_variables() -> None:
    env = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "LISTEN_FDS": "1"}
    assert child_environ(env) == {"PATH": "/usr/bin"}


# --- the unit files ---


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNIT_DIR / "edged.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_declares_what_the_daemon_relies_on() -> None:
    s = _unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/local/bin/edged run --config /etc/edged/edged.toml",
        "ExecReload": "/usr/local/bin/edged reload --pid $MAINPID",
        "RestartPreventExitStatus": "78",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartSec": "2s",
        "User": "edged",
        "Group": "edged",
        "RuntimeDirectory": "edged",
        "RuntimeDirectoryMode": "0750",
        "StateDirectory": "edged",
        "ConfigurationDirectory": "edged",
        "TimeoutStopSec": "20s",
        "MemoryMax": "200M",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    families = set(" ".join(s["RestrictAddressFamilies"]).split())
    assert {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"} <= families
    assert "PrivateNetwork" not in s and "IPAddressDeny" not in s


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable stub: verify checks that the binary exists."""
    stub = tmp_path / "edged"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "edged.service"
    unit.write_text((UNIT_DIR / "edged.service").read_text().replace("/usr/local/bin/edged", str(stub)))
    return unit


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    unit = _unit_for_verify(tmp_path)
    done = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    ours = [line for line in done.stderr.splitlines() if "edged" in line]  # ignore the host's own units
    assert ours == [], done.stderr
    assert done.returncode == 0, done.stderr


@needs_analyze
def test_systemd_analyze_security_score(tmp_path: Path) -> None:
    unit = _unit_for_verify(tmp_path)
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--threshold=25", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for edged\.service: (\d+\.\d+)", done.stdout)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 2.5, done.stdout
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    conf = (UNIT_DIR / "edged.sysusers").read_text()
    done = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "-"], input=conf, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert "edged" in users and "edged" in groups
    assert users["edged"][3] == groups["edged"][2]  # primary group is edged
    assert users["edged"][5] == "/var/lib/edged"


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles is not installed")
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="the tmpfiles entries are owned by root")
def test_tmpfiles_creates_the_config_folders_for_group_edged_only(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for tool, conf in (("systemd-sysusers", "edged.sysusers"), ("systemd-tmpfiles", "edged.tmpfiles")):
        args = [tool, f"--root={tmp_path}", *(["--create"] if tool == "systemd-tmpfiles" else []), "-"]
        done = subprocess.run(args, input=(UNIT_DIR / conf).read_text(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    gid = next(
        int(line.split(":")[2])
        for line in (tmp_path / "etc/group").read_text().splitlines()
        if line.startswith("edged:")
    )
    for folder in ("etc/edged", "etc/edged/services.d"):
        st = (tmp_path / folder).stat()
        assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == (oct(0o750), 0, gid), folder


# --- scripts/install.sh (the whole install runs in scripts/systemd_e2e.py, in a booted container) ---

INSTALL = REPO / "scripts" / "install.sh"


def test_installer_parses_and_refuses_bad_options() -> None:
    assert subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, timeout=30).returncode == 0
    done = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--uninstall" in done.stdout and "--prefix" in done.stdout
    for args, says in ((["--prefix", "relative/dir"], "absolute path"), (["--frobnicate"], "unknown option")):
        done = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and says in done.stderr, done.stderr

