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


def test_an_incremental_change_of_some_services_gives_what_a_whole_rebuild_gives():
    """`update_services` patches the services it names (with every layer keyed by service); the snapshot is the
    one a rebuild from scratch makes, and watchers learn which services changed."""
    import random

    from edged.cloud.tier import cloud_endpoints
    from edged.cloud.topics import Topics
    from edged.model import PolicySpec

    def layers() -> list[Layer]:
        cache: dict = {}

        def cloud(specs):
            return cloud_endpoints(specs, broker_url="mqtt://b:1883", topics=Topics("h", "f"), cache=cache)

        def fleet(draft):
            return {("default", "r5"): PolicySpec(retries=0)} if ("default", "r5") in draft.services else {}

        mdns = [spec("r3", types=("edge",), source="mdns:pi-9")]
        return [Layer("mdns", services=lambda: mdns), Layer("cloud", endpoints=cloud), Layer("fleet", policies=fleet)]

    rng = random.Random(7)
    live = Registry(layers())
    live.set_manifests([spec("m1", "http://127.0.0.1:1"), spec("r2", "http://127.0.0.1:2", types=("local", "cloud"))])
    changes: list = []
    live.watch(lambda old, new: changes.append(new.changed))
    remote: dict = {}
    for _ in range(60):
        batch = {}
        for _ in range(rng.randint(1, 6)):
            name = f"r{rng.randint(0, 9)}"
            source = f"mqtt:pi-{rng.randint(1, 3)}"
            batch[("default", name)] = None if rng.random() < 0.3 else spec(name, types=("cloud",), source=source)
        live.update_services("mqtt", batch)
        remote.update(batch)
        fresh = Registry(layers())
        fresh.set_manifests(live._sources.services["manifest"].values())
        fresh.set_services("mqtt", [s for s in remote.values() if s is not None])
        fresh.refresh()  # from scratch (the changes above were patched in)
        want, got = fresh.snapshot(), live.snapshot()
        assert dict(got.services) == dict(want.services) and got.orphans == want.orphans
        assert live.policy_source("default", "r5") == fresh.policy_source("default", "r5")
    assert live.partial_rebuilds > 40 and live.rebuilds == 3  # one per layer added (the manifests: patched)
    assert all(c is not None and len(c) <= 6 for c in changes[2:])
    assert got.get("default", "r2").spec.source == "a.toml"  # a manifest outranks a learned entry


def test_a_manifest_change_is_patched_in_not_a_rebuild_of_every_service():
    """A box following a whole fleet keeps ten thousand remote services: an edited manifest recomputes the
    services it declares (the old code rebuilt every one, about 0.1 s of loop), with the same result."""
    from edged.model import PolicySpec

    def fleet(draft):  # a fleet policy over a manifest's own policy (the layer reads manifests by key)
        base = draft.manifests.get(("default", "m1"))
        return {("default", "m1"): PolicySpec(retries=0, timeout=base.policy.timeout)} if base else {}

    live = Registry([Layer("fleet", policies=fleet)])
    live.set_services("mqtt", [spec(f"r{n}", types=("cloud",), source=f"mqtt:pi-{n}") for n in range(300)])
    live.set_manifests([spec("m1", "http://127.0.0.1:1"), spec("r7", "http://127.0.0.1:7")])
    changes: list = []
    live.watch(lambda old, new: changes.append(new.changed))
    whole = live.rebuilds
    untouched = live.snapshot().get("default", "r8")
    edited = ServiceSpec(name="m1", policy=PolicySpec(timeout=3.0), endpoints=(EndpointSpec("local", "http://h:2"),))
    live.set_manifests([edited, spec("m2", "http://127.0.0.1:3")])  # m1 edited, r7 gone (back to mqtt), m2 new
    assert live.rebuilds == whole and changes == [{("default", k) for k in ("m1", "r7", "m2")}]
    assert live.snapshot().get("default", "r8") is untouched
    got = dict(live.snapshot().services)
    assert got[("default", "m1")].spec.policy == PolicySpec(retries=0, timeout=3.0)
    assert got[("default", "r7")].spec.source == "mqtt:pi-7"
    live.refresh()  # from scratch: the same
    assert dict(live.snapshot().services) == got and live.rebuilds == whole + 1
