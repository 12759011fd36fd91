"""Real parts for edge-tier tests and figures: network namespaces, daemons with mDNS on, backends, load over a socket.

- `Lan`: a bridge in its own namespace and one veth per host namespace, addresses 10.77.0.x/24 inside the
  namespaces only; names are unique per run, and everything is removed by `close()`. Creating it raises
  `NetnsUnavailable` where `ip netns add` is not permitted (tests skip with that reason).
- `EdgeNode`: `python -m edged run` with mDNS on, in a namespace (`ip netns exec`) or on 127.0.0.1 only;
  the test talks to it over its Unix socket, which works across network namespaces.
- `NsBackend`: tests/backend.py inside a namespace. `UnixLoadGen`: scripts/loadgen.py over a Unix socket.

Used by tests/test_mdns.py, tests/test_e2e_edge.py and scripts/edge_figures.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from harness import free_port, wait_for  # noqa: E402
from loadgen import LoadGen, Result, _Conn, _read_response  # noqa: E402

from edged.client import ApiClient, ApiError  # noqa: E402

_SEQ = itertools.count(1)


class NetnsUnavailable(Exception):
    """`ip netns` cannot be used here (not root, no iproute2, a container without CAP_SYS_ADMIN)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


class Lan:
    """Host namespaces h1..hN on one bridge: 10.77.0.{i}/24 on each host's eth0 (the LAN), lo up."""

    def __init__(self, hosts: int) -> None:
        self.tag = f"{os.getpid() % 10000:04d}{next(_SEQ) % 100:02d}"
        self.bridge = f"edged-{self.tag}-br"
        self.hosts = [f"edged-{self.tag}-h{i}" for i in range(1, hosts + 1)]
        self._created: list[str] = []

    def create(self) -> Lan:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the ip command (iproute2) is not installed")
        probe = _ip("netns", "add", self.bridge, check=False)
        if probe.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
        self._created.append(self.bridge)
        try:
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts, start=1):
                _ip("netns", "add", host)
                self._created.append(host)
                veth = f"ev{self.tag}{i}"
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host)
                _ip("link", "set", veth, "netns", self.bridge)
                _ip("-n", self.bridge, "link", "set", veth, "master", "br0", "up")
                _ip("-n", host, "link", "set", "lo", "up")
                _ip("-n", host, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _ip("-n", host, "link", "set", "eth0", "up")
        except subprocess.CalledProcessError as exc:
            self.close()
            raise NetnsUnavailable(f"setting up namespaces failed: {exc.stderr.strip()}") from None
        return self

    def host(self, i: int) -> str:
        return self.hosts[i - 1]

    @staticmethod
    def address(i: int) -> str:
        return f"10.77.0.{i}"

    def partition(self, i: int) -> None:
        """Cut host i off the LAN (its link goes down; its processes keep running)."""
        _ip("-n", self.host(i), "link", "set", "eth0", "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.host(i), "link", "set", "eth0", "up")

    def close(self) -> None:
        """Remove every namespace this LAN created (their veths go with them)."""
        for name in reversed(self._created):
            _ip("netns", "del", name, check=False)
        self._created.clear()


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return argv if netns is None else ["ip", "netns", "exec", netns, *argv]


class NsBackend:
    """tests/backend.py on 127.0.0.1:PORT inside a namespace (or here): a real service on that box."""

    def __init__(self, name: str, port: int, cwd: Path, netns: str | None = None) -> None:
        self.name, self.port, self.cwd, self.netns = name, port, cwd, netns
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> NsBackend:
        argv = [sys.executable, str(REPO / "tests" / "backend.py"), str(self.port), self.name]
        self.proc = subprocess.Popen(in_netns(self.netns, argv), cwd=self.cwd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def thermo_manifest(
    port: int, *, name: str = "thermo", extra: str = "", types: str = '["local", "edge"]', top: str = ""
) -> str:
    """A service with one local backend, offered to peers. `top`: more top-level keys; `extra`: more tables."""
    return f"""
    service_name = "{name}"
    endpoint_types = {types}
    {top}
    [[endpoints]]
    type = "local"
    url = "http://127.0.0.1:{port}"
    priority = 1
    {extra}
    """


class EdgeNode:
    """The daemon with the edge tier on. `netns` None: on 127.0.0.1 of this namespace, zeroconf bound to it."""

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        fleet: str,
        manifests: dict[str, str] | None = None,
        netns: str | None = None,
        resolve_interval: str = "300ms",
        extra_config: str = "",
        vitals: str = 'interval = "200ms"',
    ) -> None:
        self.root, self.name, self.netns, self.fleet = root, name, netns, fleet
        self.services = root / "services.d"
        self.services.mkdir(parents=True, exist_ok=True)
        for file, text in (manifests or {}).items():
            self.write_manifest(file, text)
        if netns is None:
            api, self.ingress_port = free_port(), free_port()
            ingress = f"127.0.0.1:{self.ingress_port}"
            interfaces = '["127.0.0.1"]'
        else:
            api, self.ingress_port = 7700, 7701
            ingress = "0.0.0.0:7701"
            interfaces = '"all"'
        self.api_port = api
        self.socket = root / "run" / "edged.sock"
        self.config = root / "edged.toml"
        self.config.write_text(
            textwrap.dedent(
                f"""
                [node]
                name = "{name}"
                fleet = "{fleet}"
                [api]
                listen = "127.0.0.1:{api}"
                socket = "run/edged.sock"
                drain_timeout = "2s"
                [ingress]
                listen = "{ingress}"
                [services]
                dirs = ["services.d"]
                reload_interval = "200ms"
                [state]
                dir = "state"
                [mdns]
                interfaces = {interfaces}
                resolve_interval = "{resolve_interval}"
                txt_min_interval = "500ms"
                [log]
                format = "json"
                """
            )
            + "[vitals]\n"
            + textwrap.dedent(vitals).strip()
            + "\n"
            + textwrap.dedent(extra_config)
        )
        self.log = root / "edged.log"
        self.api = ApiClient(f"unix:{self.socket}", timeout=10)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def write_manifest(self, file: str, text: str) -> None:
        (self.services / file).write_text(textwrap.dedent(text))

    def start(self, wait: bool = True) -> EdgeNode:
        argv = [sys.executable, "-m", "edged", "run", "--config", str(self.config)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            in_netns(self.netns, argv), cwd=self.root, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env
        )
        if wait:
            wait_for(self.ready, 20, what=f"{self.name} ready (log: {self.log})")
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
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
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} did not stop in time") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def call(self, service: str, path: str = "/", method: str = "GET", body: bytes = b"", headers=None):
        return self.api.request(method, f"/svc/{service}{path}", body, headers)

    def get(self, path: str) -> dict:
        return self.api.get_json(path)

    def endpoints(self, service: str) -> list[dict]:
        """The service's endpoints now; [] when the service is not known (yet, or any more)."""
        status, _, body = self.api.request("GET", f"/v1/services/{service}")
        if status == 404:
            return []
        return json.loads(body)["endpoints"]

    def edge_urls(self, service: str) -> list[str]:
        return sorted(ep["url"] for ep in self.endpoints(service) if ep["tier"] == "edge")

    def peers(self) -> list[dict]:
        return self.get("/v1/status")["peers"]

    def log_text(self) -> str:
        return self.log.read_text()


class UnixLoadGen(LoadGen):
    """scripts/loadgen.py's open-loop load, over the daemon's Unix socket (it reaches into a namespace)."""

    def __init__(self, socket_path: Path, path: str, *, timeout: float = 10.0) -> None:
        super().__init__("unix", 0, path, timeout=timeout)
        self.socket_path = str(socket_path)

    async def _one(self, t0: float) -> None:
        started = time.monotonic()
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = _Conn(*await asyncio.open_unix_connection(self.socket_path))
            conn.writer.write(self._request)
            status, headers, _ = await asyncio.wait_for(_read_response(conn.reader), self.timeout)
            self._idle.append(conn)
            self.results.append(
                Result(
                    started - t0,
                    time.monotonic() - started,
                    status,
                    headers.get("x-edged-endpoint", ""),
                    int(headers.get("x-edged-tries", "1")),
                )
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            if conn is not None:
                conn.writer.close()
            self.results.append(Result(started - t0, time.monotonic() - started, 0, "", 0, repr(exc)))


def unique_fleet() -> str:
    """A fleet of its own per test: daemons of other tests (or runs) on the same loopback ignore it."""
    return f"t{secrets.token_hex(4)}"


def unique_type() -> str:
    """A DNS-SD type nobody else on this loopback browses: `_tXXXXXXXX._tcp`."""
    return f"_t{secrets.token_hex(4)}._tcp"


# -- pytest fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def lan() -> Iterator:
    """`lan(n)` -> a Lan of n hosts, removed after the test; the test is skipped where namespaces are refused."""
    made: list[Lan] = []

    def make(hosts: int) -> Lan:
        try:
            net = Lan(hosts).create()
        except NetnsUnavailable as exc:
            pytest.skip(f"multi-host edge tests need network namespaces: {exc}")
        made.append(net)
        return net

    yield make
    for net in made:
        net.close()


@pytest.fixture
def edge_nodes(tmp_path: Path) -> Iterator:
    """`edge_nodes(name, **options)` -> an EdgeNode (not started); every one is killed after the test."""
    made: list[EdgeNode] = []

    def make(name: str, **options) -> EdgeNode:
        node = EdgeNode(tmp_path / name, name, **options)
        made.append(node)
        return node

    yield make
    for node in made:
        node.kill()


@pytest.fixture
def ns_backends(tmp_path: Path) -> Iterator:
    """`ns_backends(name, netns=None, port=None)` -> a started NsBackend; killed after the test."""
    made: list[NsBackend] = []

    def make(name: str, netns: str | None = None, port: int | None = None) -> NsBackend:
        backend = NsBackend(name, port or free_port(), tmp_path, netns).start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.kill()


def fake_vitals_roots(
    root: Path,
    *,
    battery: int | None = None,
    status: str = "Discharging",
    mains: bool | None = None,
    load1: float = 0.0,
    wifi_quality: float | None = None,
) -> tuple[Path, Path]:
    """A fake /proc and /sys (what `[vitals] proc_root` / `sys_root` point at): one CPU, a battery, a mains
    supply and a Wi-Fi interface, each only when asked for. Returns (proc_root, sys_root)."""
    proc, sysfs = root / "proc", root / "sys"
    (proc / "net").mkdir(parents=True, exist_ok=True)
    supplies = sysfs / "class" / "power_supply"
    supplies.mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\n")
    (proc / "loadavg").write_text(f"{load1:.2f} 0.00 0.00 1/100 1\n")
    if wifi_quality is not None:
        (proc / "net" / "wireless").write_text(
            "Inter-| sta-|   Quality        |   Discarded packets               | Missed | WE\n"
            " face | tus | link level noise |  nwid  crypt   frag  retry   misc | beacon | 22\n"
            f" wlan0: 0000   {wifi_quality:g}.  -56.  -256        0      0      0      0      0        0\n"
        )
    if battery is not None:
        bat = supplies / "BAT0"
        bat.mkdir(exist_ok=True)
        (bat / "type").write_text("Battery\n")
        (bat / "capacity").write_text(f"{battery}\n")
        (bat / "status").write_text(f"{status}\n")
    if mains is not None:
        ac = supplies / "AC"
        ac.mkdir(exist_ok=True)
        (ac / "type").write_text("Mains\n")
        (ac / "online").write_text("1\n" if mains else "0\n")
    return proc, sysfs


PUBLISHER = """
import asyncio, json, sys
from zeroconf import InterfaceChoice, IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
spec = json.loads(sys.argv[1])
async def main():
    interfaces = InterfaceChoice.All if spec["interfaces"] == "all" else spec["interfaces"]
    zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(spec["type"], spec["name"] + "." + spec["type"], port=spec["port"],
                            parsed_addresses=spec["addresses"], properties=spec["txt"], server=spec["server"])
    await (await zc.async_register_service(info))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class PlainService:
    """A DNS-SD service registered by a bare zeroconf in its own process: no edged, no HubMesh TXT keys."""

    def __init__(
        self,
        service_type: str,
        name: str,
        port: int,
        *,
        txt: dict[str, str] | None = None,
        address: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        self.spec = {
            "type": service_type if service_type.endswith(".local.") else service_type + ".local.",
            "name": name,
            "port": port,
            "addresses": [address],
            "txt": txt or {},
            "server": f"{name}-plain.local.",
            "interfaces": [address] if netns is None else "all",
        }
        self.netns = netns
        self.proc: subprocess.Popen | None = None

    def start(self) -> PlainService:
        argv = [sys.executable, "-c", PUBLISHER, json.dumps(self.spec)]
        self.proc = subprocess.Popen(in_netns(self.netns, argv), stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def plain_services() -> Iterator:
    """`plain_services(type, name, port, **options)` -> a started PlainService; killed after the test."""
    made: list[PlainService] = []

    def make(service_type: str, name: str, port: int, **options) -> PlainService:
        service = PlainService(service_type, name, port, **options)
        made.append(service)
        return service.start()

    yield make
    for service in made:
        service.kill()
