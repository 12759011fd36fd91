"""Liveness of remote nodes (edged/cloud/liveness.py) and how the registry sync and the cloud tier act on it:
a dead box's services stop being routed at once, come back with it, and are forgotten after `offline_ttl`."""

from __future__ import annotations

import asyncio
import json

import cbor2

from edged.cloud.liveness import OFFLINE, ONLINE, STALE, SUSPECT, UNKNOWN, Liveness
from edged.cloud.persist import StateSaver
from edged.cloud.registry_sync import RegistrySync, spec_entry
from edged.cloud.session import Inbound, MqttSession
from edged.cloud.telemetry import CloudMetrics
from edged.cloud.tier import cloud_endpoints
from edged.cloud.topics import Topics
from edged.config import MqttConfig
from edged.manifest import parse_manifest_data
from edged.registry import Registry
from edged.state import StateStore

TOPICS = Topics("hubmesh", "home")
THERMO = ("default", "thermo")


def test_a_service_is_withdrawn_only_when_every_known_provider_is_dead():
    live = Liveness(stale_after=0)
    assert live.reachable(THERMO, 0) is None  # nobody known: an MQTT worker that is not edged may serve it
    live.add_provider(THERMO, "a", 0)
    assert live.reachable(THERMO, 0) is True and live.state("a", 0) == UNKNOWN  # entry before status
    assert live.status("a", ONLINE, 1) is False  # unknown -> online: both are routed, nothing changes
    live.add_provider(THERMO, "b", 1)
    live.status("b", ONLINE, 1)
    assert live.status("a", OFFLINE, 2) is True
    assert not live.is_withdrawn(THERMO) and live.withdrawn() == frozenset()
    live.status("b", OFFLINE, 3)
    assert live.is_withdrawn(THERMO) and live.reachable(THERMO, 3) is False
    assert live.providers(THERMO, 3) == [("a", OFFLINE), ("b", OFFLINE)]
    assert live.status("b", ONLINE, 4) is True  # back: routed again
    assert not live.is_withdrawn(THERMO)
    assert live.status("b", ONLINE, 5) is False  # the same news again changes nothing


def test_the_services_a_node_alone_serves_share_one_providers_tuple():
    """Ten thousand services, most with one provider: one tuple per node, not one per service."""
    live = Liveness(stale_after=0)
    for n in range(3):
        live.add_provider(("default", f"s{n}"), "pi-1", 0.0)
    live.add_provider(("default", "s2"), "pi-2", 0.0)
    assert live.serving(("default", "s0")) is live.serving(("default", "s1")) == ("pi-1",)  # the old code: two
    assert live.serving(("default", "s2")) == ("pi-1", "pi-2")
    live.remove_provider(("default", "s2"), "pi-1", 1.0)
    assert live.serving(("default", "s2")) == ("pi-2",) and live.serving(("default", "s0")) == ("pi-1",)
    live.forget("pi-1", 2.0)
    assert live.serving(("default", "s0")) == () and live.serving(("default", "s2")) == ("pi-2",)
    live.add_provider(("default", "s0"), "pi-1", 3.0)
    assert live.serving(("default", "s0")) == ("pi-1",)


def test_an_online_status_not_renewed_goes_stale_and_is_forgotten_after_the_ttl():
    live = Liveness(stale_after=30)
    live.add_provider(THERMO, "a", 0)
    live.status("a", ONLINE, 0)
    assert live.refresh(29) is False and live.state("a", 29) == ONLINE
    assert live.state("a", 31) == STALE
    assert live.refresh(31) is True and live.is_withdrawn(THERMO)  # time alone, applied by refresh
    assert live.expired(31, ttl=100) == []
    assert live.expired(101, ttl=100) == ["a"]
    live.status("a", ONLINE, 102)  # renewed: live again, not expired
    assert live.state("a", 102) == ONLINE and not live.is_withdrawn(THERMO) and live.expired(103, ttl=100) == []


def test_an_offline_node_expires_a_ttl_after_it_went_offline():
    live = Liveness(stale_after=0)
    live.status("a", ONLINE, 0)
    live.status("a", OFFLINE, 10)
    live.status("a", OFFLINE, 50)  # a repeated offline status does not restart the clock
    assert live.expired(109, ttl=100) == [] and live.expired(111, ttl=100) == ["a"]
    live.add_provider(THERMO, "a", 111)
    assert live.is_withdrawn(THERMO)
    live.forget("a", 111)
    assert live.reachable(THERMO, 111) is None and live.nodes == {} and not live.is_withdrawn(THERMO)


def test_calls_that_time_out_make_the_only_provider_suspect_until_it_answers_or_the_hold_ends():
    live = Liveness(stale_after=0, suspect_after=3, suspect_hold=15)
    live.add_provider(THERMO, "a", 0)
    live.add_provider(("default", "lamp"), "a", 0)
    live.status("a", ONLINE, 0)
    assert live.timed_out(THERMO, 1, sent=0.5) is False  # no node answered since: the fault may be ours
    live.answered("b", 0.6)  # another node answers: the broker and this box are fine
    assert live.timed_out(THERMO, 1, sent=0.5) is False and live.timed_out(THERMO, 2, sent=0.5) is False
    assert live.timed_out(THERMO, 3, sent=0.5) is True
    # The whole node is suspect: its other services stop being routed without paying timeouts too.
    assert live.state("a", 4) == SUSPECT and live.withdrawn() == {THERMO, ("default", "lamp")}
    assert live.state("a", 19) == ONLINE and live.refresh(19) is True  # the hold is over: one call may try
    assert not live.is_withdrawn(THERMO)
    live.answered("b", 19.5)
    assert live.timed_out(THERMO, 20, sent=19) is True  # and one more timeout makes it suspect at once
    assert live.answered("a", 21) is True and live.state("a", 21) == ONLINE and not live.is_withdrawn(THERMO)
    assert live.timed_out(THERMO, 22, sent=21) is False  # the count started over


def test_timeouts_blame_no_node_when_several_serve_the_service():
    live = Liveness(stale_after=0, suspect_after=1)
    for node in ("a", "b"):
        live.add_provider(THERMO, node, 0)
        live.status(node, ONLINE, 0)
    live.answered("c", 0.5)
    assert live.timed_out(THERMO, 1, sent=0) is False  # the broker picked one of them: no one to blame
    assert live.withdrawn() == frozenset()


def test_a_service_whose_last_provider_left_cleanly_stays_withdrawn_until_one_comes_back():
    live = Liveness(stale_after=0)
    live.add_provider(THERMO, "a", 0)
    live.status("a", ONLINE, 0)
    live.remove_provider(THERMO, "a", 5, departed=True)  # its entry was deleted by a clean stop
    assert live.reachable(THERMO, 6) is False and live.is_withdrawn(THERMO)
    assert live.forget_departed(50, ttl=100) is False
    live.add_provider(THERMO, "b", 51)
    assert not live.is_withdrawn(THERMO)
    live.remove_provider(THERMO, "b", 60, departed=True)
    assert live.forget_departed(161, ttl=100) is True and live.reachable(THERMO, 161) is None
    assert not live.is_withdrawn(THERMO)


def test_a_thousand_deaths_touch_only_the_dead_nodes_services():
    live = Liveness(stale_after=0)
    for i in range(2000):
        node = f"n{i}"
        for j in range(10):
            live.add_provider(("default", f"s{i}-{j}"), node, 0)
        live.status(node, ONLINE, 0)
    for i in range(0, 2000, 10):
        assert live.status(f"n{i}", OFFLINE, 1) is True
    assert len(live.withdrawn()) == 200 * 10
    assert live.is_withdrawn(("default", "s10-3")) and not live.is_withdrawn(("default", "s11-3"))


# -- the registry sync and the cloud tier acting on it -----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_sync(tmp_path, registry: Registry, clock: Clock) -> RegistrySync:
    session = MqttSession(MqttConfig(enabled=True), client_id="t")
    return RegistrySync(
        registry=registry,
        session=session,
        topics=TOPICS,
        node="me",
        zone="",
        saver=StateSaver(StateStore(tmp_path / "state")),
        metrics=CloudMetrics(),
        stale_after=900,
        offline_ttl=3600,
        clock=clock,
        follow=("*",),
    )


def entry(node: str, name: str, payload: bytes | None = None) -> Inbound:
    spec = parse_manifest_data({"service_name": name}, "x.toml")
    if payload is None:
        payload = cbor2.dumps(spec_entry(spec, node=node, zone="", cloud=True))
    return Inbound(TOPICS.service(node, "default", name), payload, retain=True)


def status(node: str, state: str) -> Inbound:
    return Inbound(TOPICS.status(node), json.dumps({"state": state, "node": node}).encode(), retain=True)


def routed(registry: Registry, sync: RegistrySync) -> list[str]:
    """Services whose cloud endpoint the cloud transport would send a call to now."""
    specs = {key: svc.spec for key, svc in registry.snapshot().services.items()}
    eps = cloud_endpoints(specs, broker_url="mqtt://127.0.0.1:1883", topics=TOPICS)
    return sorted(ep.service for ep in eps if sync.unreachable(ep.tenant, ep.service) is None)


def test_a_dead_box_loses_its_cloud_endpoints_at_once_and_is_forgotten_after_the_ttl(tmp_path):
    async def main() -> None:
        registry, clock = Registry(), Clock()
        sync = make_sync(tmp_path, registry, clock)
        for node, name in (("pi-1", "thermo"), ("pi-1", "lamp"), ("pi-2", "door")):
            sync._on_service(entry(node, name))
        sync._on_status(status("pi-1", "online"))
        sync._on_status(status("pi-2", "online"))
        sync.apply()  # a burst of registry messages is applied once, a moment later; now, for the test
        assert routed(registry, sync) == ["door", "lamp", "thermo"]

        sync._on_status(status("pi-1", "offline"))  # its last will
        assert routed(registry, sync) == ["door"]  # at once: the next call skips them
        assert sync.unreachable("default", "thermo") == "no live node serves it (pi-1 offline)"
        # Still known (a 503 with reasons, not a 404), and shown with its liveness and last-seen time.
        assert registry.snapshot().get("default", "thermo") is not None
        (provider,) = sync.providers("default", "thermo")
        assert provider["node"] == "pi-1" and provider["state"] == "offline" and provider["seen"] > 0
        assert {p["node"]: p["state"] for p in sync.peers()} == {"pi-1": "offline", "pi-2": "online"}

        sync._on_status(status("pi-1", "online"))  # back
        assert routed(registry, sync) == ["door", "lamp", "thermo"]
        sync._on_status(status("pi-1", "offline"))

        clock.now += 3601  # an hour later: pi-1 is forgotten, in memory and in the state file
        sync._on_status(status("pi-2", "online"))  # pi-2 renews its status (it would otherwise go stale)
        sync.sweep()
        sync.apply()
        assert sorted(n for _, n in registry.snapshot().services) == ["door"]
        assert "pi-1" not in sync.entries and "pi-1" not in sync.nodes
        assert "pi-1" not in json.dumps(sync.state())

    asyncio.run(main())


def test_time_alone_makes_a_silent_box_stale_and_the_sweep_says_so(tmp_path):
    async def main() -> None:
        registry, clock = Registry(), Clock()
        sync = make_sync(tmp_path, registry, clock)
        sync._on_service(entry("pi-1", "thermo"))
        sync._on_status(status("pi-1", "online"))
        sync.apply()
        sync.sweep()
        assert routed(registry, sync) == ["thermo"]
        clock.now += 901  # no status for longer than stale_after: its last will may have been lost
        sync.sweep()
        assert routed(registry, sync) == []
        assert sync.peers()[0]["state"] == "stale"

    asyncio.run(main())


def test_a_clean_stop_deleting_the_entries_withdraws_the_service(tmp_path):
    async def main() -> None:
        registry, clock = Registry(), Clock()
        sync = make_sync(tmp_path, registry, clock)
        sync._on_service(entry("pi-1", "thermo"))
        sync._on_status(status("pi-1", "online"))
        sync._on_service(entry("pi-1", "thermo", payload=b""))  # deleted by the node itself
        sync._on_status(status("pi-1", "offline"))
        sync.apply()
        # The remote service is gone from the registry; a local manifest that also declares the cloud tier
        # for it would get no cloud endpoint either: nobody serves it any more.
        assert registry.snapshot().get("default", "thermo") is None
        assert sync.unreachable("default", "thermo") == "no live node serves it (its last node left)"

    asyncio.run(main())


def test_a_restored_registry_keeps_node_states(tmp_path):
    async def main() -> None:
        registry, clock = Registry(), Clock()
        sync = make_sync(tmp_path, registry, clock)
        sync._on_service(entry("pi-1", "thermo"))
        sync._on_service(entry("pi-2", "door"))
        sync._on_status(status("pi-1", "offline"))
        sync._on_status(status("pi-2", "online"))
        saved = json.loads(json.dumps(sync.state()))
        again_registry = Registry()
        again = make_sync(tmp_path, again_registry, clock)
        assert again.load(saved) == 2
        assert routed(again_registry, again) == ["door"]

    asyncio.run(main())
