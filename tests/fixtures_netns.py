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

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from fixtures_identity import FleetCA  # noqa: E402
from harness import Edged, free_port, wait_for  # noqa: E402, F401  (wait_for: re-exported)
from loadgen import LoadGen  # noqa: E402

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


class EdgeNode(Edged):
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
        tls: bool = True,
        ca: FleetCA | None = None,
        node_extra: str = "",  # more `[node]` keys, e.g. zone and location
        enrolled: bool = True,
    ) -> None:
        self.name, self.fleet = name, fleet
        if tls and enrolled:  # enrolled by the fleet's test CA (one per fleet), as `edged fleet enroll` would have
            (ca or fleet_ca(fleet)).enroll(root / "state" / "identity", name)
        if netns is None:
            api, self.ingress_port = free_port(), free_port()
            ingress = f"127.0.0.1:{self.ingress_port}"
            interfaces = '["127.0.0.1"]'
        else:
            api, self.ingress_port = 7700, 7701
            ingress = "0.0.0.0:7701"
            interfaces = '"all"'
        self.api_port = api
        config_text = (
            textwrap.dedent(
                f"""
                [node]
                name = "{name}"
                fleet = "{fleet}"
                {node_extra}
                [api]
                listen = "127.0.0.1:{api}"
                socket = "run/edged.sock"
                drain_timeout = "2s"
                [ingress]
                listen = "{ingress}"
                insecure = {"false" if tls else "true"}
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
        super().__init__(root, manifests or {}, config_text=config_text, port=api, netns=netns, via_socket=True)

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
        super().__init__("unix", 0, path, timeout=timeout, unix=str(socket_path))


_FLEET_CAS: dict[str, FleetCA] = {}


def fleet_ca(fleet: str) -> FleetCA:
    """The test CA of `fleet` (made on first use): nodes of one fleet trust each other."""
    if fleet not in _FLEET_CAS:
        _FLEET_CAS[fleet] = FleetCA(fleet)
    return _FLEET_CAS[fleet]


def unique_fleet() -> str:
    """A fleet of its own per test: daemons of other tests (or runs) on the same loopback ignore it."""
    return f"t{secrets.token_hex(4)}"


def unique_type() -> str:
    """A DNS-SD type nobody else on this loopback browses: `_tXXXXXXXX._tcp`."""
    return f"_t{secrets.token_hex(4)}._tcp"


def unique_name(name: str) -> str:
    """`name` with a suffix of its own: an mDNS instance name nobody else on this loopback uses. A leftover of
    an earlier test, or the same test of a parallel run, under the same name (another fleet's, on another
    port) would mix its records with this one's in every cache: `node-b-1a2b3c`."""
    return f"{name}-{secrets.token_hex(3)}"


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
    """`edge_nodes(name, **options)` -> an EdgeNode (not started); every one is killed after the test. On the
    shared loopback (no `netns`) its node name (`node.name`: its mDNS instance and certificate name) is
    `unique_name(name)`; in a test's own namespaces it is `name`."""
    made: list[EdgeNode] = []

    def make(name: str, **options) -> EdgeNode:
        node_name = name if options.get("netns") else unique_name(name)
        node = EdgeNode(tmp_path / name, node_name, **options)
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
