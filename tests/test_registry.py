from __future__ import annotations

from helpers import endpoint

from edged.model import EndpointSpec, ServiceSpec
from edged.registry import Layer, Registry


def spec(name: str, *urls: str, types=("local", "edge", "cloud"), source="a.toml") -> ServiceSpec:
    return ServiceSpec(
        name=name,
        endpoint_types=types,
        endpoints=tuple(EndpointSpec(tier="local", url=u, priority=i) for i, u in enumerate(urls)),
        source=source,
    )


def test_snapshots_are_numbered_and_only_change_on_real_changes():
    reg = Registry()
    seen = []
    reg.watch(lambda old, new: seen.append((old.generation, new.generation)))
    reg.set_manifests([spec("a", "http://127.0.0.1:1")])
    first = reg.snapshot()
    reg.set_manifests([spec("a", "http://127.0.0.1:1")])
    assert reg.snapshot() is first and seen == [(0, 1)]
    reg.set_manifests([spec("a", "http://127.0.0.1:2")])
    assert reg.snapshot().generation == 2 and first.get("default", "a").endpoints[0].url.endswith(":1")


def test_endpoint_ids_are_stable_and_sources_merge():
    reg = Registry()
    reg.set_manifests([spec("a", "http://127.0.0.1:1")])
    ep_id = reg.snapshot().get("default", "a").endpoints[0].id
    assert ep_id == "default/a/local/http://127.0.0.1:1"
    reg.set_endpoints("mdns", [endpoint("peer", 9, tier="edge", svc="a"), endpoint("lost", 8, svc="nobody")])
    svc = reg.snapshot().get("default", "a")
    assert [e.id for e in svc.endpoints] == [ep_id, "default/a/edge/peer"]
    assert [e.service for e in reg.snapshot().orphans] == ["nobody"]


def test_tiers_not_in_endpoint_types_are_left_out():
    reg = Registry()
    reg.set_manifests([spec("a", types=("local",))])
    reg.set_endpoints("mdns", [endpoint("peer", 9, tier="edge", svc="a")])
    assert reg.snapshot().get("default", "a").endpoints == ()


def test_manifests_win_over_registered_services():
    reg = Registry()
    reg.set_registered_services([spec("a", "http://127.0.0.1:5", source="registration")])
    reg.set_manifests([spec("a", "http://127.0.0.1:1")])
    assert reg.snapshot().get("default", "a").spec.source == "a.toml"
    assert reg.declared_by_manifest("default", "a") is not None


def test_source_precedence_and_policy_overrides():
    from edged.model import PolicySpec

    reg = Registry()
    reg.set_services("mdns", [spec("a", types=("edge",), source="mdns:peer"), spec("b", source="mdns:peer")])
    reg.set_services("mqtt", [spec("a", types=("cloud",), source="mqtt:box")])
    # What the LAN found wins over what the broker says; the broker's tier stays, after the LAN's.
    learned = reg.snapshot().get("default", "a").spec
    assert (learned.source, learned.endpoint_types) == ("mdns:peer", ("edge", "cloud"))
    reg.set_manifests([spec("a", "http://127.0.0.1:1")])
    assert reg.snapshot().get("default", "a").spec.source == "a.toml"
    fleet: dict = {}
    api: dict = {}
    reg.add_layer(Layer("fleet", policies=lambda draft: fleet))
    reg.add_layer(Layer("api", policies=lambda draft: api))
    fleet[("default", "a")] = PolicySpec(strategy="weighted")
    reg.refresh()
    assert reg.snapshot().get("default", "a").spec.policy.strategy == "weighted"
    api[("default", "a")] = PolicySpec(strategy="latency")
    reg.refresh()
    assert reg.snapshot().get("default", "a").spec.policy.strategy == "latency"
    assert reg.policy_source("default", "a") == "api" and reg.policy_source("default", "b") == "declared"
    api.clear()
    reg.refresh()
    assert reg.snapshot().get("default", "a").spec.policy.strategy == "weighted"
