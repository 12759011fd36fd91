"""Fixtures of the cloud tier tests: a real Mosquitto broker on a free port, `edged bridge` processes, and
helpers to give the harness's daemons an `[mqtt]` section. Import the fixtures into a test module with
`from fixtures_mqtt import broker, bridges, topic_prefix  # noqa: F401`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from harness import Edged, wait_for  # noqa: E402


def mosquitto_path() -> str | None:
    """The mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """Mosquitto in its own process, with the config FIELD-NOTES found to work (TCP_NODELAY, stderr log)."""

    def __init__(self, root: Path, port: int | None = None, extra: str = "") -> None:
        binary = mosquitto_path()
        if binary is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
        self.binary = binary
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = root / "mosquitto.conf"
        self.log = root / "mosquitto.log"
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        return textwrap.dedent(
            f"""
                listener {self.port} 127.0.0.1
                allow_anonymous true
                set_tcp_nodelay true
                persistence false
                log_dest stderr
                """
        ) + textwrap.dedent(self.extra)

    def start(self, timeout: float = 10.0) -> Broker:
        self.conf.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=self.log.open("ab")
        )
        wait_for(self._listening, timeout, interval=0.01, what=f"mosquitto on {self.port} (log: {self.log})")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return "running" in self.log.read_text()

    def kill(self) -> None:
        """SIGKILL: no clean disconnects, the clients' sockets just break."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> Broker:
        """Start again on the same port (the clients' reconnect loop finds it there)."""
        self.kill()
        self.log.write_text("")
        return self.start()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A started Mosquitto on a free port on 127.0.0.1; ended by PID after the test."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator:
    """Brokers with extra config lines (TLS, passwords), started by the test."""
    made: list[Broker] = []

    def make(extra: str = "", name: str = "broker2") -> Broker:
        b = Broker(tmp_path / name, extra=extra)
        made.append(b)
        return b

    yield make
    for b in made:
        b.kill()


def mqtt_section(broker: Broker, prefix: str, **keys: object) -> str:
    """An `[mqtt]` table for a test config: enabled, this broker, this prefix, quick reconnects."""
    values: dict[str, object] = {
        "enabled": True,
        "url": broker.url,
        "topic_prefix": prefix,
        "reconnect_max": "500ms",
        "keepalive": "5s",
    }
    values.update(keys)
    lines = ["[mqtt]"]
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{key} = [{', '.join(repr(str(v)).replace(chr(39), chr(34)) for v in value)}]")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


def cloud_first_manifest(service: str, port: int, *, per_try: str, timeout: str) -> str:
    """A service this box serves over the cloud tier first, with a local endpoint (`port`) as the other one."""
    return f"""
service_name = "{service}"
endpoint_types = ["cloud", "local"]
[[endpoints]]
type = "cloud"
priority = 1
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
priority = 5
[policy]
per_try_timeout = "{per_try}"
timeout = "{timeout}"
"""


# A service this box reaches over the cloud tier only (calls fail at once when no live node serves it).
CLOUD_ONLY = """
service_name = "thermo"
endpoint_types = ["cloud"]
[policy]
per_try_timeout = "2s"
timeout = "4s"
retries = 1
"""


def site_broker_config(central_port: int, prefix: str, site: str = "site-1") -> str:
    """The lines of config/mosquitto/bridge.conf for a site broker bridged to a central one on this machine:
    only the central broker's address, the topic prefix and the site's name in the bridge's ids change."""
    lines = []
    for raw in (REPO / "config" / "mosquitto" / "bridge.conf").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("address "):
            line = f"address 127.0.0.1:{central_port}"
        elif line.startswith("topic hubmesh/"):
            line = line.replace("hubmesh/", f"{prefix}/", 1)
        elif line.startswith(("remote_clientid ", "notification_topic ")):
            line = line.replace("site-1", site)
        lines.append(line)
    return "\n".join(lines) + "\n"


def name_node(d: Edged, name: str) -> Edged:
    """Give a harness daemon (made with start=False) its own node name: the harness writes "test-node"."""
    d.config.write_text(d.config.read_text().replace('name = "test-node"', f'name = "{name}"', 1))
    return d


class BridgeProc:
    """`edged bridge` as a subprocess with its own config folder."""

    def __init__(self, root: Path, config: str, manifests: dict[str, str]) -> None:
        self.root = root
        (root / "services.d").mkdir(parents=True, exist_ok=True)
        for name, text in manifests.items():
            (root / "services.d" / name).write_text(textwrap.dedent(text))
        self.config = root / "bridge.toml"
        self.config.write_text(textwrap.dedent(config))
        self.log = root / "bridge.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> BridgeProc:
        self.log.write_text("")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edged", "bridge", "--config", str(self.config)],
            cwd=self.root,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        if wait:
            wait_for(self.ready, 15, what=f"bridge ready (log: {self.log})")
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"bridge exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return "bridge.ready" in self.log.read_text()

    def stop(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("bridge did not stop in time") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def bridge_config(
    broker: Broker, prefix: str, *, node: str = "cloud-1", group: str = "edged-bridge", tenants: str = ""
) -> str:
    """A bridge's config: its node name, the broker, and its manifests in services.d/; `tenants`: the TOML
    inline table of `[bridge] tenants` (who may call in which tenant), when given."""
    return f"""
[node]
name = "{node}"
[services]
dirs = ["services.d"]
reload_interval = "200ms"
[state]
dir = "state"
[bridge]
group = "{group}"
{f"tenants = {tenants}" if tenants else ""}
[log]
format = "json"
""" + mqtt_section(broker, prefix)


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator:
    """Factory of started bridges; each is ended by PID after the test."""
    started: list[BridgeProc] = []

    def make(config: str, manifests: dict[str, str], name: str | None = None, start: bool = True) -> BridgeProc:
        b = BridgeProc(tmp_path / (name or f"bridge{len(started)}"), config, manifests)
        started.append(b)
        return b.start() if start else b

    yield make
    for b in started:
        b.kill()


def wait_metric(d: Edged, name: str, predicate, timeout: float = 10.0) -> float:
    """Poll the daemon's /metrics until the (unlabelled or summed) sample `name` satisfies `predicate`."""

    def value() -> float | None:
        status, _, body = d.api.request("GET", "/metrics")
        assert status == 200
        total = None
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        return total

    deadline = time.monotonic() + timeout
    while True:
        v = value()
        if v is not None and predicate(v):
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} = {v} after {timeout}s")
        time.sleep(0.05)
