"""The mesh core: what every process kind shares, how a tier plugs in by returning its parts, and the
registry's layers as pure functions."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
from helpers import StatusServer, endpoint

from edged.cloud.bridge import Bridge
from edged.config import load_config
from edged.core import MeshCore, TierParts
from edged.daemon import Daemon
from edged.edge.peers import Discovered, Peer, edge_layer
from edged.edge.txt import HUBMESH_TYPE, node_txt, parse_node_txt
from edged.events import EventBus
from edged.model import PolicySpec, ServiceSpec
from edged.policies import PolicyOverrides
from edged.registry import Draft, Layer, Registry, RegistryError
from edged.state import StateStore
from edged.vitals import Vitals


def config_file(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "services.d").mkdir(exist_ok=True)
    path = tmp_path / "edged.toml"
    path.write_text(
        textwrap.dedent(
            """
            [node]
            name = "n1"
            [services]
            dirs = ["services.d"]
            [state]
            dir = "state"
            [mdns]
            enabled = false
            [ingress]
            enabled = false
            [mqtt]
            enabled = true
            url = "mqtt://127.0.0.1:1"
            """
        )
        + extra
    )
    return path


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_bridge_and_daemon_are_built_on_the_same_core(tmp_path):
    config = load_config(str(config_file(tmp_path)))

    async def build() -> tuple[Daemon, Bridge, MeshCore]:
        return Daemon(config), Bridge(config), MeshCore(config)

    daemon, bridge, bare = asyncio.run(build())
    assert type(daemon.core) is MeshCore and type(bridge.core) is MeshCore
    assert bridge.router is bridge.core.router and daemon.router is daemon.core.router
    core_families = families(bare.metrics.render())
    assert {"edged_calls_total", "edged_node_vitals", "edged_outlier_ejections_total"} <= core_families
    # The same metric families, whichever process kind serves them (the cloud tier's in both).
    assert families(daemon.metrics.render()) == families(bridge.metrics.render())
    assert core_families <= families(bridge.metrics.render())
    assert [t.name for t in daemon.core.tiers] == ["edge", "cloud"] and bridge.core.tiers == []


class FakeTransport:
    def unavailable(self, endpoint):
        return "scripted: off"

    async def send(self, ep, call, headers, timeout):
        raise AssertionError("never sent")


class ExtraTier:
    """A new tier is what it returns: here a transport, a layer, check headers, peers and a vitals listener."""

    name = "extra"

    def __init__(self, core: MeshCore) -> None:
        self.core = core
        self.heard: list[Vitals] = []
        self.started = self.stopped = False

    def parts(self) -> TierParts:
        return TierParts(
            transports={"cloud": FakeTransport()},
            layers=(Layer("extra", endpoints=self.endpoints),),
            check_headers={"cloud": lambda ep: [("x-extra", ep.service)]},
            peers=lambda: [{"node": "far", "source": "extra"}],
            on_vitals=self.heard.append,
        )

    @staticmethod
    def endpoints(specs):
        return [endpoint("far", 1, tier="cloud", svc=name) for (_, name) in specs]

    async def start(self) -> None:
        self.started = True

    async def leaving(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True


def test_a_tier_plugs_in_by_being_in_the_list(tmp_path):
    config = load_config(str(config_file(tmp_path)))
    (tmp_path / "services.d" / "a.toml").write_text('service_name = "a"\nendpoint_types = ["local", "cloud"]\n')

    async def scenario():
        core = MeshCore(config, tiers=[ExtraTier])
        await core.start()
        await core.start_tiers()
        (tier,) = core.tiers
        svc = core.registry.snapshot().get("default", "a")
        _, skipped = core.router.plan(svc)
        headers = core._headers_for(svc.endpoints[0])
        await core.stop()
        return tier, svc, skipped, headers, core.peers()

    tier, svc, skipped, headers, peers = asyncio.run(scenario())
    assert [ep.id for ep in svc.endpoints] == ["default/a/cloud/far"]  # the layer's endpoint
    assert skipped == [{"endpoint": "default/a/cloud/far", "tier": "cloud", "reason": "scripted: off"}]
    assert list(headers) == [("x-extra", "a")]
    assert peers == [{"node": "far", "source": "extra"}]
    assert tier.started and tier.stopped


def test_the_cores_health_checks_use_its_keep_alive_pool(tmp_path):
    """HTTP checks go over the same pool as calls: many checks, one connection to the endpoint."""
    config = load_config(str(config_file(tmp_path)))

    async def scenario() -> tuple[int, int, dict]:
        server = StatusServer(200, keep_alive=True)
        port = await server.start_tcp()
        (tmp_path / "services.d" / "a.toml").write_text(
            f'service_name = "a"\n[[endpoints]]\ntype = "local"\nurl = "http://127.0.0.1:{port}"\n'
            '[health_check]\nhttp = "/healthz"\ninterval = "100ms"\ntimeout = "50ms"\n'
        )
        core = MeshCore(config)
        await core.start()
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while len(server.requests) < 4:
                assert asyncio.get_running_loop().time() < deadline, "checks did not run"
                await asyncio.sleep(0.05)
            stats = core.pool.stats()
        finally:
            await core.stop()
            await server.stop()
        return len(server.requests), server.connections, stats

    checks, connections, stats = asyncio.run(scenario())
    assert checks >= 4 and connections == 1
    assert [s["opened"] for s in stats.values()] == [1]


def test_the_registry_refuses_a_write_from_inside_a_watcher():
    registry = Registry()
    registry.watch(lambda old, new: registry.set_endpoints("x", []))
    with pytest.raises(RegistryError):
        registry.set_manifests([ServiceSpec(name="a")])


# -- layers as pure functions -------------------------------------------------------------------------------


def peer(node: str, services=(("default", "thermo"),)) -> Peer:
    props = node_txt(node=node, fleet="home", zone="", vitals=Vitals(cpu=5), services=["thermo"], addresses=[])
    record = parse_node_txt(props)
    assert record is not None
    return Peer(record, "10.0.0.2", 7701, f"{node}.{HUBMESH_TYPE}", tuple(services))


def test_the_edge_layer_is_a_function_of_what_was_discovered_and_of_the_manifests():
    found = Discovered(peers=(peer("pi-b"),))
    layer = edge_layer(lambda: found, node="me", fleet="home")
    assert [s.source for s in layer.services()] == ["mdns:pi-b"]
    declared = {("default", "thermo"): ServiceSpec(name="thermo", priority=4, endpoint_types=("local", "edge"))}
    (ep,) = layer.endpoints(declared)
    assert (ep.id, ep.priority, dict(ep.meta)["cpu"]) == ("default/thermo/edge/mdns:pi-b", 4, "5")
    # In a registry: a manifest change re-prices the peer's endpoint with no sync and no watcher.
    registry = Registry([layer])
    registry.set_manifests([ServiceSpec(name="thermo", priority=9, endpoint_types=("local", "edge"))])
    assert [e.priority for e in registry.snapshot().get("default", "thermo").endpoints] == [9]
    assert edge_layer(Discovered, node="me", fleet="home").endpoints(declared) == []  # nothing found: nothing


def test_api_policy_overrides_are_a_layer_over_what_lies_below(tmp_path):
    registry = Registry()
    overrides = PolicyOverrides(registry, StateStore(str(tmp_path)), EventBus())
    overrides._tables[("default", "a")] = {"strategy": "latency"}
    below = {("default", "a"): ServiceSpec(name="a", policy=PolicySpec(retries=3))}
    (policy,) = overrides.policies(Draft(below, {})).values()
    assert (policy.strategy, policy.retries) == ("latency", 3)  # the override's key, the base's others
    assert overrides.policies(Draft({}, {})) == {}  # the service is gone: the override waits


def test_an_api_policy_change_recomputes_its_service_only(tmp_path):
    """A box following thousands of remote services: setting or dropping one service's override patches that
    service (the old code rebuilt every one), and gives what a whole rebuild gives."""

    async def main() -> None:
        registry = Registry()
        overrides = PolicyOverrides(registry, StateStore(str(tmp_path)), EventBus())
        registry.add_layer(overrides.layer)
        registry.set_manifests([ServiceSpec(name=f"svc-{i}", endpoint_types=("local",)) for i in range(200)])
        whole, untouched = registry.rebuilds, registry.snapshot().get("default", "svc-9")
        policy, saved = overrides.set("default", "svc-1", {"strategy": "latency"})
        await saved
        assert registry.snapshot().get("default", "svc-1").spec.policy.strategy == policy.strategy
        assert await overrides.delete("default", "svc-1") is None
        assert registry.snapshot().get("default", "svc-1").spec.policy.strategy == "priority"
        assert registry.rebuilds == whole and registry.partial_rebuilds >= 2
        assert registry.snapshot().get("default", "svc-9") is untouched
        overrides.set("default", "svc-2", {"retries": 3})[1].cancel()
        incremental = registry.snapshot().services
        registry.refresh()
        assert registry.snapshot().services == incremental

    asyncio.run(main())


def test_a_cloud_endpoint_is_reused_while_its_service_is_unchanged_and_made_anew_for_a_new_broker(tmp_path):
    """The cloud layer hands out again the endpoint a service has in the registry (`tier._Previous`), so an
    incremental rebuild keeps the services it did not change as they were; a new broker URL makes new ones."""
    import dataclasses

    import cbor2

    from edged.cloud.registry_sync import spec_entry
    from edged.cloud.session import Inbound
    from edged.cloud.tier import CloudEndpoint
    from edged.manifest import parse_manifest_data

    config = load_config(str(config_file(tmp_path, 'follow = ["*"]\n')))

    def entry(node: str, name: str, priority: int = 0) -> Inbound:
        spec = parse_manifest_data({"service_name": name, "priority": priority}, "x.toml")
        payload = cbor2.dumps(spec_entry(spec, node=node, zone="", cloud=True))
        return Inbound(tier.topics.service(node, "default", name), payload, True)

    def cloud_ep(name: str) -> CloudEndpoint:
        service = daemon.core.registry.snapshot().get("default", name)
        assert service is not None
        return next(ep for ep in service.endpoints if isinstance(ep, CloudEndpoint))

    async def main() -> None:
        nonlocal daemon, tier
        daemon = Daemon(config)
        tier = next(t for t in daemon.core.tiers if t.name == "cloud")
        sync = tier.registry_sync
        for name in ("thermo", "lamp"):
            sync._on_service(entry("pi-2", name))
        sync._apply_some()
        thermo, lamp = cloud_ep("thermo"), cloud_ep("lamp")
        sync._on_service(entry("pi-2", "pump"))
        sync._on_service(entry("pi-2", "lamp", priority=2))  # lamp changes: a new endpoint
        sync._on_service(entry("pi-3", "thermo"))  # another provider: thermo's spec and endpoint stay
        sync._apply_some()
        assert cloud_ep("thermo") is thermo and cloud_ep("pump").url.endswith("/svc/pump")
        assert cloud_ep("lamp") is not lamp and cloud_ep("lamp").priority == 2
        tier.reconfigure(dataclasses.replace(config.mqtt, url="mqtt://127.0.0.2:1"))
        assert cloud_ep("thermo").url == f"mqtt://127.0.0.2:1/{tier.topics.base}/svc/thermo"

    daemon = tier = None
    asyncio.run(main())
