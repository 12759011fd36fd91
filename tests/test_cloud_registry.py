"""Central registry entries, cloud endpoints of services, and telemetry summaries. Most tests feed the
handlers the messages a broker would deliver; one publishes through a real Mosquitto."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import dataclasses
import json
import tracemalloc

import cbor2
import pytest
from fixtures_mqtt import Broker, broker, topic_prefix  # noqa: F401
from helpers import FakeHealth

from edged import jsonbody
from edged.cloud.persist import StateSaver
from edged.cloud.registry_log import LOG_FILE, read_log
from edged.cloud.registry_sync import APPLY_CHUNK, RegistrySync, entry_spec, normalize_entry, spec_entry
from edged.cloud.session import Inbound, MqttSession
from edged.cloud.telemetry import MIN_INTERVAL, CloudMetrics, TelemetryPublisher
from edged.cloud.tier import cloud_endpoints
from edged.cloud.topics import Topics
from edged.config import MqttConfig
from edged.limits import Limits
from edged.manifest import parse_manifest_data
from edged.model import Endpoint, ServiceSpec, parse_target
from edged.policy import Ranker
from edged.registry import Layer, Registry
from edged.state import StateStore
from edged.telemetry import MeshMetrics, Metrics

TOPICS = Topics("hubmesh", "home")


def manifest(**data) -> object:
    return parse_manifest_data({"service_name": "thermo", **data}, "test.toml")


def test_an_entry_carries_interface_and_policy_and_makes_a_cloud_only_spec():
    spec = manifest(
        priority=4,
        interface_definition={"version": "1.2.0", "methods": ["GET /readings", "POST /zones/{id}"]},
        endpoint_types=["local", "cloud"],
        endpoints=[{"type": "local", "url": "http://127.0.0.1:9"}],
        policy={"strategy": "round_robin", "per_try_timeout": "250ms", "battery_min": 20},
    )
    wire = cbor2.loads(cbor2.dumps(spec_entry(spec, node="pi-1", zone="hall", cloud=True)))
    entry = normalize_entry(wire, node="pi-1")
    remote = entry_spec(entry, source="mqtt:pi-1")
    assert remote.endpoint_types == ("cloud",) and remote.endpoints == ()
    assert remote.priority == 4 and remote.source == "mqtt:pi-1"
    assert remote.policy == spec.policy
    assert remote.interface is not None and remote.interface.allows("POST", "/zones/7")
    assert not remote.interface.allows("DELETE", "/readings")
    assert json.dumps(entry)  # storable in the state dir as it is


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        {"v": 2, "service": "x", "tenant": "default", "priority": 1},
        {"v": 1, "service": "", "tenant": "default", "priority": 1},
        {"v": 1, "service": "x", "tenant": "default", "priority": -1},
        {"v": 1, "service": "x", "tenant": "default", "priority": 2**31},
        {"v": 1, "service": "x", "tenant": "default", "priority": 2**80},
        {"v": 1, "service": "x", "tenant": "default", "priority": 1, "policy": {"strategy": "fastest"}},
        {"v": 1, "service": "x", "tenant": "default", "priority": 1, "interface": {"methods": ["nonsense"]}},
        {"v": 1, "service": "x", "tenant": "default", "priority": 1, "interface": {"methods": [b"bytes"]}},
    ],
)
def test_bad_entries_are_refused(bad):
    if isinstance(bad, dict):
        bad = {**bad, "node": "pi-1"}
    with pytest.raises(ValueError):
        normalize_entry(bad, node="pi-1")


def test_an_entry_or_a_status_is_taken_only_from_the_node_it_describes(tmp_path):
    """Before: `nodes/ghost/services/x` carrying `node: pi-2` was learned (and `edged status` showed pi-2
    serving x); a status on `nodes/ghost/status` could speak for any node."""
    registry = Registry()
    sync = registry_sync(tmp_path, registry)
    spec = parse_manifest_data({"service_name": "x"}, "x.toml")
    forged = cbor2.dumps(spec_entry(spec, node="pi-2", zone="", cloud=True))
    sync._on_service(Inbound(TOPICS.service("ghost", "default", "x"), forged, retain=True))
    sync._on_status(Inbound(TOPICS.status("ghost"), b'{"state": "online", "node": "pi-2"}', True))
    assert sync.entries == {} and sync.nodes == {} and sync.bad_messages == 2
    # A saved registry is checked the same way when it is loaded.
    entry = spec_entry(spec, node="pi-2", zone="", cloud=True)
    doc = {"format": 1, "prefix": "hubmesh", "fleet": "home", "entries": {"ghost": {"x": entry}, "pi-2": {"x": entry}}}
    assert sync.load(doc) == 1 and list(sync.entries) == ["pi-2"]


def test_an_entry_on_the_broker_never_hides_or_outranks_a_service_found_on_the_lan(tmp_path):
    """Before: a retained `nodes/ghost/services/lamp` (priority 0) replaced the service that mDNS had learned:
    its spec said endpoint types ("cloud",), so the peer's edge endpoint was dropped and every call went to
    whoever answers on the broker. Now the LAN's declaration wins; the cloud endpoint stays as a fallback."""
    registry = Registry()
    lan = ServiceSpec(name="lamp", endpoint_types=("edge",), source="mdns:pi-2")
    edge = Endpoint(
        id="default/lamp/edge/mdns:pi-2",
        service="lamp",
        tenant="default",
        tier="edge",
        url="http://10.0.0.2:7701/svc/lamp",
        priority=lan.priority,
        weight=100,
        source="mdns",
        target=parse_target("http://10.0.0.2:7701/svc/lamp"),
    )
    registry.add_layer(Layer("mdns", services=lambda: [lan], endpoints=lambda specs: [edge]))
    registry.add_layer(
        Layer("cloud", endpoints=lambda specs: cloud_endpoints(specs, broker_url="mqtt://b", topics=TOPICS))
    )
    sync = registry_sync(tmp_path, registry)
    ghost = parse_manifest_data({"service_name": "lamp", "priority": 0}, "x.toml")
    sync._on_service(
        Inbound(
            TOPICS.service("ghost", "default", "lamp"),
            cbor2.dumps(spec_entry(ghost, node="ghost", zone="", cloud=True)),
            retain=True,
        )
    )
    sync.apply()
    svc = registry.snapshot().get("default", "lamp")
    assert svc is not None and svc.spec.source == "mdns:pi-2"
    assert svc.spec.endpoint_types == ("edge", "cloud")
    plan = [c.endpoint.tier for c in Ranker().plan(svc, FakeHealth(), 0.0).choices]
    assert plan == ["edge", "cloud"]


def specs_of(registry: Registry) -> dict:
    """The merged services, as the registry hands them to its layers."""
    return {key: svc.spec for key, svc in registry.snapshot().services.items()}


def test_cloud_endpoints_follow_endpoint_types_and_the_long_form():
    registry = Registry()
    registry.set_manifests(
        [
            manifest(endpoint_types=["local"], endpoints=[{"type": "local", "url": "http://127.0.0.1:9"}]),
            parse_manifest_data({"service_name": "short", "priority": 7, "endpoint_types": ["cloud"]}, "s.toml"),
            parse_manifest_data(
                {"service_name": "long", "endpoints": [{"type": "cloud", "priority": 2, "weight": 30}]}, "l.toml"
            ),
        ]
    )
    eps = {ep.service: ep for ep in cloud_endpoints(specs_of(registry), broker_url="mqtt://b:1884", topics=TOPICS)}
    assert set(eps) == {"short", "long"}
    assert eps["short"].id == "default/short/cloud/mqtt" and eps["short"].priority == 7
    assert eps["short"].url == "mqtt://b:1884/hubmesh/home/svc/short" and eps["short"].target is None
    assert (eps["long"].priority, eps["long"].weight) == (2, 30)


def test_a_cloud_endpoint_keeps_no_id_or_url_string_of_its_own_and_reads_as_before():
    """Ten thousand of them on a box following a whole fleet: the old endpoint kept its id and URL strings
    (about 175 bytes of its 300); they are made when read, and the endpoint behaves as any other."""
    specs = {
        ("default", f"a-rather-long-service-name-{n:05d}"): ServiceSpec(
            name=f"a-rather-long-service-name-{n:05d}", endpoint_types=("cloud",)
        )
        for n in range(1000)
    }
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    eps = cloud_endpoints(specs, broker_url="mqtts://broker.example.net:8883", topics=TOPICS)
    kept = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert kept / len(eps) < 200  # the old code: about 300 bytes an endpoint
    ep = eps[7]
    assert ep.id == "default/a-rather-long-service-name-00007/cloud/mqtt"
    assert ep.url == "mqtts://broker.example.net:8883/hubmesh/home/svc/a-rather-long-service-name-00007"
    moved = dataclasses.replace(ep, priority=3)  # as routes.py does for fallback endpoints
    assert (moved.id, moved.url, moved.priority) == (ep.id, ep.url, 3) and moved != ep
    assert dataclasses.replace(moved, priority=ep.priority) == ep and len({ep, moved}) == 2
    cache: dict = {}
    first = cloud_endpoints(specs, broker_url="mqtt://b:1884", topics=TOPICS, cache=cache)
    assert cloud_endpoints(specs, broker_url="mqtt://b:1884", topics=TOPICS, cache=cache)[7] is first[7]
    again = cloud_endpoints(specs, broker_url="mqtt://c:1884", topics=TOPICS, cache=cache)[7]  # a new broker
    assert again.url == "mqtt://c:1884/hubmesh/home/svc/a-rather-long-service-name-00007"


def registry_sync(
    tmp_path, registry: Registry, session: MqttSession | None = None, topics=TOPICS, **options
) -> RegistrySync:
    # A session never started publishes nothing: the handlers are called by the test.
    session = session or MqttSession(MqttConfig(enabled=True), client_id="t")
    return RegistrySync(
        registry=registry,
        session=session,
        topics=topics,
        node="me",
        zone="",
        saver=StateSaver(StateStore(str(tmp_path))),
        metrics=CloudMetrics(Metrics()),
        **{"follow": ("*",), **options},
    )


def entry_msg(node: str, name: str, *, cloud: bool = True, payload: bytes | None = None) -> Inbound:
    spec = parse_manifest_data({"service_name": name}, "x.toml")
    if payload is None:
        payload = cbor2.dumps(spec_entry(spec, node=node, zone="", cloud=cloud))
    return Inbound(TOPICS.service(node, "default", name), payload, retain=True)


def test_remote_entries_become_services_and_go_away_with_their_entry(tmp_path):
    async def main() -> None:
        registry = Registry()
        sync = registry_sync(tmp_path, registry)
        sync._on_service(entry_msg("pi-2", "thermo"))
        sync._on_service(entry_msg("pi-2", "private", cloud=False))  # not reachable over MQTT
        sync._on_service(entry_msg("me", "mine"))  # our own entry: not learned
        sync._on_service(entry_msg("pi-3", "junk", payload=b"\xff\x00"))
        sync._on_status(Inbound(TOPICS.status("pi-2"), b'{"state": "online", "vitals": {"cpu": "12"}}', True))
        sync._on_status(Inbound(TOPICS.status("pi-4"), b"not json", True))
        sync.apply()  # a burst of messages is applied once, a moment later; now, for the test
        snap = registry.snapshot()
        assert sorted(name for _, name in snap.services) == ["thermo"]
        assert snap.get("default", "thermo").spec.source == "mqtt:pi-2"
        assert sync.bad_messages == 2
        peers = {p["node"]: p for p in sync.peers()}
        assert peers["pi-2"]["state"] == "online" and peers["pi-2"]["services"] == ["private", "thermo"]
        saved = json.loads(json.dumps(sync.state()))  # as written to the state dir now
        sync._on_service(entry_msg("pi-2", "thermo", payload=b""))  # an empty retained message deletes
        sync.apply()
        assert registry.snapshot().get("default", "thermo") is None
        # A restart with no broker: the saved registry brings the remote service back.
        again = Registry()
        assert registry_sync(tmp_path, again).load(saved) == 2
        assert again.snapshot().get("default", "thermo") is not None

    asyncio.run(main())


def test_a_box_learns_the_services_it_routes_to_over_the_cloud_and_those_it_follows_and_no_others(tmp_path):
    async def main() -> None:
        registry = Registry()
        session = MqttSession(MqttConfig(enabled=True), client_id="t")
        sync = registry_sync(tmp_path, registry, session, follow=("weather",))
        thermo = manifest(endpoint_types=["local", "cloud"], endpoints=[{"type": "local", "url": "http://127.0.0.1:1"}])
        lamp = parse_manifest_data(
            {"service_name": "lamp", "endpoints": [{"type": "local", "url": "http://127.0.0.1:2"}]}, "lamp.toml"
        )
        registry.set_manifests([thermo, lamp])
        sync.local_changed(registry.snapshot())  # the cloud tier does this on every registry change
        assert sync.learning == {"thermo", "weather"}
        assert set(session.filters) == {
            TOPICS.all_status,
            TOPICS.service_filter("thermo"),
            TOPICS.service_filter("weather"),
            "hubmesh/home/nodes/me/services/+",  # our own retained entries (stale ones are removed)
        }
        for node in ("pi-2", "pi-3"):
            for name in ("thermo", "weather", "lamp", "other"):
                sync._on_service(entry_msg(node, name))
        sync.apply()
        assert sorted(sync.entries["pi-2"]) == ["thermo", "weather"]  # lamp is served here; other not needed
        assert registry.snapshot().get("default", "weather").spec.source == "mqtt:pi-2"
        assert registry.snapshot().get("default", "other") is None
        assert [p["node"] for p in sync.providers("default", "thermo")] == ["pi-2", "pi-3"]

        # thermo's manifest goes: its subscription and its learned entries go too.
        registry.set_manifests([lamp])
        sync.local_changed(registry.snapshot())
        assert sync.learning == {"weather"} and TOPICS.service_filter("thermo") not in session.filters
        assert sorted(sync.entries["pi-2"]) == ["weather"] and sync.providers("default", "thermo") == []
        sync._on_service(entry_msg("pi-2", "thermo"))  # one already on its way when the filter went
        assert "thermo" not in sync.entries["pi-2"]
        # And a saved registry keeps only what is followed today.
        saved = json.loads(json.dumps(sync.state()))

        def entry(name: str, node: str) -> dict:
            return spec_entry(parse_manifest_data({"service_name": name}, "x.toml"), node=node, zone="", cloud=True)

        assert saved["format"] == 2 and isinstance(saved["entries"]["pi-2"]["weather"], str)  # CBOR, base64
        saved["entries"]["pi-4"] = {"weather": entry("weather", "pi-4")}  # format 1 (a JSON map) is read too
        saved["entries"]["pi-5"] = {"other": entry("other", "pi-5"), "weather": entry("lamp", "pi-5")}
        again = registry_sync(tmp_path, Registry(), follow=("weather",))
        # pi-5's "other" is not followed; its "weather" describes another service (refused).
        assert again.load(saved) == 3 and sorted(again.entries) == ["pi-2", "pi-3", "pi-4"]
        # A bridge (follow=None) offers its services and learns none, whatever its manifests say.
        bridge_session = MqttSession(MqttConfig(enabled=True), client_id="t3")
        bridge = registry_sync(tmp_path, registry, bridge_session, follow=None)
        registry.set_manifests([thermo])
        bridge.local_changed(registry.snapshot())
        assert set(bridge_session.filters) == {"hubmesh/home/nodes/me/services/+"} and not bridge.learning

    asyncio.run(main())


def test_node_status_is_kept_compact_and_a_renewed_status_writes_nothing(tmp_path):
    async def main() -> None:
        store = StateStore(str(tmp_path))
        sync = registry_sync(tmp_path, Registry())
        sync._saver = saver = StateSaver(store)
        doc = {"state": "online", "node": "pi-2", "zone": "attic", "vitals": {"cpu": "12"}, "services": ["a"] * 50}
        sync._on_status(Inbound(TOPICS.status("pi-2"), json.dumps({**doc, "ts": 1.0}).encode(), True))
        assert set(sync.nodes["pi-2"].as_dict()) == {"state", "zone", "vitals", "seen", "since"}
        await saver.flush()
        path = tmp_path / LOG_FILE
        assert read_log(str(path)).nodes["pi-2"]["zone"] == "attic"
        size = path.stat().st_size
        sync._on_status(Inbound(TOPICS.status("pi-2"), json.dumps({**doc, "ts": 2.0}).encode(), True))
        await saver.flush()
        assert path.stat().st_size == size  # the same node, the same state: no write
        will = {"state": "offline", "node": "pi-2", "reason": "lost"}
        sync._on_status(Inbound(TOPICS.status("pi-2"), json.dumps(will).encode(), True))
        await saver.flush()
        assert path.stat().st_size > size  # appended, not rewritten
        assert read_log(str(path)).nodes["pi-2"]["state"] == "offline"
        assert sync.nodes["pi-2"].reason == "lost"

    asyncio.run(main())


def test_a_status_delivered_again_renews_the_node_without_being_read_again(tmp_path, monkeypatch):
    """A reconnect delivers every node's retained status again, as it was: it renews the node (seen, not
    stale) with no parsing (the old code parsed and rebuilt each one: about 50 us a node, 1,000 at once)."""
    parses: list[bytes] = []
    loads = jsonbody.loads
    monkeypatch.setattr(jsonbody, "loads", lambda data, depth: (parses.append(data), loads(data, depth))[1])
    clock = [100.0]
    sync = registry_sync(tmp_path, Registry(), stale_after=10.0, clock=lambda: clock[0])
    online = Inbound(TOPICS.status("pi-2"), json.dumps({"state": "online", "zone": "attic", "ts": 1.0}).encode(), True)
    sync._on_status(online)
    since = sync.nodes["pi-2"].since
    clock[0] += 20.0
    sync.nodes["pi-2"].seen = 0.0
    assert sync.liveness.state("pi-2", clock[0]) == "stale"
    sync._on_status(Inbound(online.topic, bytes(online.payload), True))  # the same message, another object
    assert len(parses) == 1 and sync.liveness.state("pi-2", clock[0]) == "online"
    assert sync.nodes["pi-2"].seen > 0.0 and sync.nodes["pi-2"].since == since and sync.nodes["pi-2"].zone == "attic"
    sync._on_status(Inbound(online.topic, json.dumps({"state": "offline", "reason": "lost"}).encode(), True))
    assert len(parses) == 2 and sync.liveness.state("pi-2", clock[0]) == "offline"
    sync._on_status(Inbound(online.topic, b"", True))  # deleted: the same message again is read again
    sync._on_status(online)
    assert len(parses) == 3 and sync.liveness.state("pi-2", clock[0]) == "online"


def test_a_saved_registry_of_another_fleet_or_prefix_is_ignored(tmp_path):
    async def main() -> None:
        sync = registry_sync(tmp_path, Registry())
        sync._on_service(entry_msg("pi-2", "thermo"))
        saved = sync.state()
        other = registry_sync(tmp_path, Registry(), topics=Topics("hubmesh", "garden"))
        assert other.load(saved) == 0

    asyncio.run(main())


def test_telemetry_summaries_count_since_the_last_one_and_are_rate_limited():
    mesh = MeshMetrics(Metrics())
    now = [100.0]
    posted: list[tuple[str, bytes]] = []

    async def main() -> None:
        pub = TelemetryPublisher(
            post=lambda t, p: posted.append((t, p)) or True,
            topic=TOPICS.telemetry("me"),
            node="me",
            fleet="home",
            mesh=mesh,
            interval=0.01,  # asks for more than the floor allows
            extra=lambda: {"vitals": {"cpu": "5"}},
            clock=lambda: now[0],
        )
        assert pub.interval == MIN_INTERVAL
        mesh.calls.inc(("thermo", "local", "success"), 3)
        mesh.calls.inc(("thermo", "cloud", "error"))
        mesh.failovers.inc(("thermo",))
        assert pub.publish_now()
        first = json.loads(posted[-1][1])
        assert first["services"]["thermo"]["tiers"]["local"] == {"calls": 3, "failures": 0, "total": 3}
        assert first["services"]["thermo"]["tiers"]["cloud"]["failures"] == 1
        assert first["services"]["thermo"]["failovers"] == 1 and first["vitals"] == {"cpu": "5"}
        assert not pub.publish_now()  # within MIN_INTERVAL of the last one
        now[0] += MIN_INTERVAL
        mesh.calls.inc(("thermo", "local", "success"))
        assert pub.publish_now()
        second = json.loads(posted[-1][1])
        assert second["services"]["thermo"]["tiers"]["local"] == {"calls": 1, "failures": 0, "total": 4}
        assert second["services"]["thermo"]["failovers"] == 0

    asyncio.run(main())


def test_entries_are_retained_on_the_broker_and_a_stale_one_is_removed_at_the_next_start(
    tmp_path, broker: Broker, topic_prefix: str
):
    topics = Topics(topic_prefix, "home")

    def services(*names: str) -> Registry:
        registry = Registry()
        registry.set_manifests(
            [
                parse_manifest_data(
                    {"service_name": n, "endpoints": [{"type": "local", "url": "http://127.0.0.1:9"}]}, f"{n}.toml"
                )
                for n in names
            ]
        )
        return registry

    async def retained() -> set[str]:
        """The service entries a new subscriber gets (retained). The broker sends them right after SUBACK,
        before anything published later on: a marker published after subscribing arrives after them."""
        seen: set[str] = set()
        marker = asyncio.Event()
        session = MqttSession(MqttConfig(enabled=True, url=broker.url), client_id="reader")
        session.subscribe(topics.all_services, lambda m: seen.add(m.topic.rsplit("/", 1)[1]) if m.payload else None)
        session.subscribe(f"{topic_prefix}/marker", lambda m: marker.set())
        session.start()
        try:
            assert await session.wait_connected(10)
            await session.publish(f"{topic_prefix}/marker", b"")
            await asyncio.wait_for(marker.wait(), 10)
        finally:
            await session.close()
        return seen

    async def run_node(*names: str) -> set[str]:
        """Run a node with these services until the broker holds exactly their entries."""
        registry = services(*names)
        session = MqttSession(MqttConfig(enabled=True, url=broker.url), client_id="me")
        sync = registry_sync(tmp_path, registry, session, topics)
        session._on_connected = sync.on_connected
        sync.local_changed(registry.snapshot())
        session.start()
        try:
            assert await session.wait_connected(10)
            for _ in range(50):
                seen = await retained()
                if seen == set(names):
                    break
            return seen
        finally:
            await session.close()

    assert asyncio.run(run_node("thermo", "pump")) == {"thermo", "pump"}
    # pump's manifest went away while the node was down: its retained entry is removed at the next start.
    assert asyncio.run(run_node("thermo")) == {"thermo"}


def test_learned_entries_and_tracked_nodes_are_bounded(tmp_path):
    """Any client of the broker could publish entries and statuses without end; the known ones keep their place."""

    async def main() -> None:
        registry = Registry()
        hits: list[str] = []
        limits = Limits(learned_entries=5, learned_entries_per_node=3, peers=3)
        sync = registry_sync(tmp_path, registry, limits=limits, on_limit=hits.append)
        for i in range(5):
            sync._on_service(entry_msg("pi-1", f"s{i}"))
        assert sorted(sync.entries["pi-1"]) == ["s0", "s1", "s2"]
        assert hits == ["learned_entries_per_node"] * 2
        for node in ("pi-2", "pi-3"):
            for i in range(2):
                sync._on_service(entry_msg(node, f"t{i}"))
        assert sum(len(e) for e in sync.entries.values()) == 5 and hits[-1] == "learned_entries"
        sync._on_service(entry_msg("pi-1", "s0", payload=b""))  # a deleted entry makes room
        sync._on_service(entry_msg("pi-3", "t1"))
        sync._on_service(entry_msg("pi-2", "t1"))
        assert "t1" in sync.entries["pi-2"]
        for i in range(5):
            sync._on_status(Inbound(TOPICS.status(f"n{i}"), b'{"state": "online"}', True))
        assert sorted(sync.nodes) == ["n0", "n1", "n2"] and hits[-1] == "peers"
        sync._on_status(Inbound(TOPICS.status("n0"), b'{"state": "offline"}', True))  # known ones keep updating
        assert sync.nodes["n0"].state == "offline"

    asyncio.run(main())


def test_a_status_nested_too_deeply_is_refused_before_it_is_decoded(tmp_path):
    """Before: `json.loads` of a status nested 100,000 levels raised RecursionError out of the handler (only
    ValueError was caught); a status nested 40 levels was decoded whole. Now: refused by [limits] json_depth."""
    sync = registry_sync(tmp_path, Registry())
    for depth in (40, 100_000):
        deep = b'{"state": "online", "x": ' + b"[" * depth + b"]" * depth + b"}"
        sync._on_status(Inbound(TOPICS.status("pi-2"), deep, True))
    assert sync.nodes == {} and sync.bad_messages == 2
    sync._on_status(Inbound(TOPICS.status("pi-2"), b'{"state": "online", "x": [[1]]}', True))
    assert sync.nodes["pi-2"].state == "online"


def test_a_signed_box_believes_only_sealed_statuses_and_deletions_of_the_current_connection(tmp_path):
    """Before: an unsealed `offline` on `nodes/pi-2/status`, or an empty retained message on one of its entries,
    from any client of the broker, marked pi-2 offline or deleted its entry. Now a status and a deletion (a
    sealed tombstone) count only when sealed by pi-2, and only for the connection (epoch) they belong to."""
    from fixtures_identity import FleetCA

    from edged.cloud.epochs import tombstone
    from edged.cloud.signing import Seals

    ca = FleetCA("home")
    me = Seals(ca.enroll(tmp_path / "me", "me"), skew=20)
    pi2 = Seals(ca.enroll(tmp_path / "pi2", "pi-2"), skew=20)
    sync = registry_sync(tmp_path, Registry(), seals=me)
    status_topic, entry_topic = TOPICS.status("pi-2"), TOPICS.service("pi-2", "default", "thermo")

    def status(state: str, epoch: str, sealed: bool = True) -> Inbound:
        doc = json.dumps({"state": state, "node": "pi-2", "fleet": "home", "epoch": epoch}).encode()
        return Inbound(status_topic, pi2.seal(status_topic, doc) if sealed else doc, True)

    def state() -> str:
        return sync.nodes["pi-2"].state

    e1, e2 = "1" * 16, "2" * 16
    sync._on_status(status("online", e1))
    assert state() == "online"
    for forged in (status("offline", e1, sealed=False), Inbound(status_topic, b"", True), status("offline", e2)):
        sync._on_status(forged)  # unsealed, an empty message, an offline of another connection
        assert state() == "online"
    sync._on_status(status("offline", e1))  # its last will
    assert state() == "offline"
    sync._on_status(status("online", e1))  # that connection's online, replayed after its end
    assert state() == "offline"
    sync._on_status(status("online", e2))  # a new connection
    assert state() == "online"
    entry = cbor2.dumps(spec_entry(manifest(), node="pi-2", zone="", cloud=True))
    sync._on_service(Inbound(entry_topic, pi2.seal(entry_topic, entry), True))
    assert "thermo" in sync.entries["pi-2"]
    for forged in (b"", pi2.seal(entry_topic, tombstone(e1)), me.seal(entry_topic, tombstone(e2))):
        sync._on_service(Inbound(entry_topic, forged, True))  # empty; a tombstone of an old connection; not pi-2's
        assert "thermo" in sync.entries["pi-2"]
    assert sync._metrics.unsealed.get(("status",)) == 4 and sync._metrics.unsealed.get(("entry",)) == 3
    sync._on_service(Inbound(entry_topic, pi2.seal(entry_topic, tombstone(e2)), True))
    assert "pi-2" not in sync.entries


def test_a_signed_node_seals_its_status_last_will_and_deletions_with_one_epoch_per_connection(tmp_path):
    from fixtures_identity import FleetCA

    from edged.cloud.epochs import tombstone_epoch
    from edged.cloud.signing import Seals

    ca = FleetCA("home")
    me = Seals(ca.enroll(tmp_path / "me", "me"), skew=20)
    peer = Seals(ca.enroll(tmp_path / "peer", "pi-2"), skew=20)
    sync = registry_sync(tmp_path, Registry(), seals=me)
    will = sync.last_will()
    sender, offline = peer.open(will.topic, will.payload)
    assert sender.node == "me" and json.loads(offline)["state"] == "offline"
    assert json.loads(offline)["epoch"] == sync.epoch == json.loads(sync.status_payload("online"))["epoch"]
    assert sync.last_will() and sync.epoch != json.loads(offline)["epoch"]  # a new connection, a new epoch
    topic = TOPICS.service("me", "default", "gone")
    assert tombstone_epoch(peer.open(topic, sync._entry_wire(topic, b""))[1]) == sync.epoch
    assert json.loads(peer.open(TOPICS.status("me"), sync.offline_status("shutdown"))[1])["reason"] == "shutdown"


def test_a_reload_of_follow_subscribes_to_what_it_names_now_and_forgets_the_rest(tmp_path):
    async def main() -> None:
        session = MqttSession(MqttConfig(enabled=True), client_id="t")
        sync = registry_sync(tmp_path, Registry(), session, follow=("weather",))
        own = "hubmesh/home/nodes/me/services/+"
        for name in ("weather", "lamp"):
            sync._on_service(entry_msg("pi-2", name))
        assert sorted(sync.entries["pi-2"]) == ["weather"]
        sync.set_follow(("*",))  # everything: one filter for all entries
        assert set(session.filters) == {TOPICS.all_status, TOPICS.all_services}
        sync._on_service(entry_msg("pi-2", "lamp"))
        assert sorted(sync.entries["pi-2"]) == ["lamp", "weather"]
        sync.set_follow(("lamp",))  # back to one service: weather is forgotten
        assert set(session.filters) == {TOPICS.all_status, own, TOPICS.service_filter("lamp")}
        assert sorted(sync.entries["pi-2"]) == ["lamp"] and sync.learning == {"lamp"}
        sync.set_follow(())
        assert "pi-2" not in sync.entries and set(session.filters) == {TOPICS.all_status, own}

    asyncio.run(main())


def test_following_a_whole_fleet_a_burst_reaches_the_registry_in_chunks_the_needed_services_first(tmp_path):
    """Before: one rebuild of every service per burst (0.1-0.3 s of loop at 10,000 services)."""

    async def main() -> None:
        registry = Registry()
        sync = registry_sync(tmp_path, registry)
        registry.set_manifests([manifest(service_name="wanted", endpoint_types=["cloud"])])
        sync.local_changed(registry.snapshot())
        changes: list = []
        registry.watch(lambda old, new: changes.append(new.changed))
        chunks: list = []
        update = registry.update_services
        registry.update_services = lambda source, specs: (chunks.append(set(specs)), update(source, specs))  # type: ignore[method-assign]
        for n in range(300):
            sync._on_service(entry_msg(f"pi-{n:03d}", f"s{n}"))
        sync._on_service(entry_msg("pi-999", "wanted"))
        for _ in range(2000):  # every chunk applied (10 ms apart, more on a loaded box): 20 s at most
            if sync._apply_timer is None and not sync._touched:
                break
            await asyncio.sleep(0.01)
        assert len(registry.snapshot().services) == 301
        assert all(c is not None and len(c) <= APPLY_CHUNK for c in changes) and len(changes) >= 300 // APPLY_CHUNK
        assert ("default", "wanted") in chunks[0]  # the service this node routes to, in the first chunk

    asyncio.run(main())


def test_a_service_gets_the_entry_of_its_first_node_by_name_and_keeps_its_spec_while_unchanged(tmp_path):
    """The spec a remote service gets is made when applied (none is kept beside the registry's): the first
    node by name that serves it, the same object while nothing changes, the next node once the first goes."""

    async def main() -> None:
        registry = Registry()
        sync = registry_sync(tmp_path, registry)
        sync._on_service(entry_msg("pi-5", "thermo"))
        sync.apply()
        first = registry.snapshot().get("default", "thermo").spec
        assert first.source == "mqtt:pi-5"
        sync._on_service(entry_msg("pi-7", "thermo"))  # a later node: the chosen entry stays
        sync._on_service(entry_msg("pi-5", "thermo"))  # the same entry delivered again (a reconnect)
        sync._apply_some()
        assert registry.snapshot().get("default", "thermo").spec is first
        sync._on_service(entry_msg("pi-3", "thermo"))  # an earlier node by name: its entry is chosen
        sync._apply_some()
        assert registry.snapshot().get("default", "thermo").spec.source == "mqtt:pi-3"
        sync._on_service(entry_msg("pi-3", "thermo", payload=b""))
        sync._apply_some()
        assert registry.snapshot().get("default", "thermo").spec == first
        assert [s.source for s in sync.remote_specs()] == ["mqtt:pi-5"]
        sync._on_service(entry_msg("pi-5", "thermo", payload=b""))
        sync._on_service(entry_msg("pi-7", "thermo", payload=b""))
        sync._apply_some()
        assert registry.snapshot().get("default", "thermo") is None and sync.remote_specs() == []

    asyncio.run(main())
