"""Real processes for tests, benchmarks and scenarios: backends (tests/backend.py) and the daemon itself.

Used by tests/conftest.py and by the scripts, so that the figures in the scripts come from the same
set-up the tests assert on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The edged under test is this tree's, unless EDGED_TEST_COMPILED=1 asks for the build installed in this
# interpreter (the compiled one: scripts/build-compiled --test); the tree then stays off the import path, here
# and in the daemons started below, or its .py files would shadow the installed extension modules.
TEST_INSTALLED = os.environ.get("EDGED_TEST_COMPILED") == "1"
if not TEST_INSTALLED:
    sys.path.insert(0, str(REPO))

from slowcpu import CpuThrottle, factor_from_env  # noqa: E402

from edged.client import ApiClient, ApiError  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll until `predicate()` is truthy; fail the test with `what` if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def imported_modules(log_text: str) -> list[str]:
    """The modules a process imported, in order, from the `-X importtime` lines in its log (a daemon started
    with PYTHONPROFILEIMPORTTIME=1 writes one per module to stderr, lazy imports included)."""
    return [
        line.rsplit("|", 1)[1].strip()
        for line in log_text.splitlines()
        if line.startswith("import time:") and "|" in line and "cumulative" not in line
    ]


class Backend:
    """tests/backend.py in its own process: SIGKILL, SIGSTOP and restart it like a real service."""

    def __init__(self, name: str, port: int, cwd: Path) -> None:
        self.name, self.port, self.cwd = name, port, cwd
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> Backend:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "backend.py"), str(self.port), self.name],
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def set_fault(self, fault: str | None) -> None:
        """Every request but /healthz gets `fault`: "503", "slow" or "reset" (tests/backend.py); None: no fault."""
        marker = self.cwd / f"{self.name}.fault"
        if fault:
            marker.write_text(fault)
        else:
            marker.unlink(missing_ok=True)

    def set_half_body(self, on: bool) -> None:
        """While on, every answer but /healthz breaks off after half its body (tests/backend.py)."""
        marker = self.cwd / f"{self.name}.half"
        if on:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def sleeps(self) -> int:
        """How many /sleep/MS calls have reached the backend (tests/backend.py): a test waits on it, not a clock."""
        try:
            return len((self.cwd / f"{self.name}.sleeps").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def set_healthy(self, healthy: bool) -> None:
        marker = self.cwd / f"{self.name}.unhealthy"
        if healthy:
            marker.unlink(missing_ok=True)
        else:
            marker.touch()


class Edged:
    """The daemon as a subprocess, with its config dir laid out in a temp folder.

    By default: local tier only, API on a free loopback port. `config_text` replaces the whole config
    (its API port is `port`); `netns` runs the daemon inside that network namespace (`ip netns exec`);
    `via_socket` talks to it over its Unix socket (which reaches into a namespace).
    """

    def __init__(
        self,
        root: Path,
        manifests: dict[str, str],
        extra_config: str = "",
        *,
        config_text: str | None = None,
        port: int | None = None,
        netns: str | None = None,
        via_socket: bool = False,
        source: Path | None = None if TEST_INSTALLED else REPO,
        python: str | None = None,
    ) -> None:
        self.root = root
        # The edged tree the daemon runs from (the benchmark also runs another version); None: the installed one.
        self.source = source
        self.python = python or sys.executable  # the benchmark runs a compiled build from its own venv too
        self.port = port or free_port()
        self.netns = netns
        self.services = root / "services.d"
        self.services.mkdir(parents=True, exist_ok=True)
        for name, text in manifests.items():
            self.write_manifest(name, text)
        self.config = root / "edged.toml"
        self.config.write_text(
            config_text
            if config_text is not None
            else textwrap.dedent(
                f"""
                [node]
                name = "test-node"
                [api]
                listen = "127.0.0.1:{self.port}"
                socket = "run/edged.sock"
                [services]
                dirs = ["services.d"]
                reload_interval = "200ms"
                [state]
                dir = "state"
                [mdns]
                enabled = false
                [ingress]
                listen = "127.0.0.1:{free_port()}"
                insecure = true  # the default daemon of the local-tier tests has no fleet certificate
                [log]
                format = "json"
                """
            )
            + textwrap.dedent(extra_config)
        )
        self.log = root / "edged.log"
        self.proc: subprocess.Popen | None = None
        self.socket = root / "run" / "edged.sock"
        self.api = ApiClient(f"unix:{self.socket}" if via_socket else f"http://127.0.0.1:{self.port}", timeout=10)
        # Over its Unix socket the daemon's own user is an admin (edged/access.py): for registering and policies.
        self.admin = ApiClient(f"unix:{self.socket}", timeout=10)
        self.started_at = 0.0
        self.slow_cpu = factor_from_env()  # EDGED_SLOW_CPU: run the daemon on a throttled CPU
        self.emulated_root = os.environ.get("EDGED_EMULATED_ROOT", "")  # or as arm64 code in this root
        self.throttle: CpuThrottle | None = None

    def write_manifest(self, name: str, text: str) -> None:
        (self.services / name).write_text(textwrap.dedent(text))

    def start(self, wait: bool = True) -> Edged:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(self.source or ""))
        if self.source is None:
            del env["PYTHONPATH"]
        argv = [self.python, "-m", "edged", "run", "--config", str(self.config)]
        if self.emulated_root:  # the daemon alone runs as arm64 code under QEMU (see scripts/arm64-root)
            argv = ["chroot", self.emulated_root, "/opt/venv/bin/python", *argv[1:]]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        if self.slow_cpu is not None and self.throttle is None:
            self.throttle = CpuThrottle(self.slow_cpu)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            cwd=self.root,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=None if self.throttle is None else self.throttle.enter,  # joins the cgroup before exec
        )
        if wait:
            wait_for(self.ready, 20, what=f"edged ready (log: {self.log})")
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"edged exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return self.api.request("GET", "/readyz")[0] == 200
        except ApiError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("edged did not stop in time") from None
        self.release()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no goodbye, no drain."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.release()

    def release(self) -> None:
        """Remove the CPU throttle's cgroup once the daemon is gone (a restart makes a new one)."""
        if self.throttle is not None and (self.proc is None or self.proc.poll() is not None):
            self.throttle.close()
            self.throttle = None

    def call(self, service: str, path: str = "/", method: str = "GET", body: bytes = b"", headers=None):
        return self.api.request(method, f"/svc/{service}{path}", body, headers)

    def get(self, path: str) -> dict:
        return self.api.get_json(path)

    def log_text(self) -> str:
        return self.log.read_text()


def manifest(service: str, endpoints: list[tuple[int, int]], extra: str = "") -> str:
    """A TOML manifest with local endpoints `[(port, priority), ...]` on 127.0.0.1, plus `extra` tables."""
    lines = [f'service_name = "{service}"']
    for port, priority in endpoints:
        lines += ["[[endpoints]]", 'type = "local"', f'url = "http://127.0.0.1:{port}"', f"priority = {priority}"]
    return "\n".join(lines) + "\n" + textwrap.dedent(extra)
