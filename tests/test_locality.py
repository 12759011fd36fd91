"""Strategy `geo` (edged/locality.py) through the real Ranker: zone first, then nearest, spill by health, weights;
and zone/location as they arrive from the LAN and the broker (garbage from a hostile host is left out)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from helpers import FakeHealth, endpoint, service

from edged.cloud.registry_sync import NodeStatus, normalize_entry, spec_entry
from edged.edge.peers import Peer, build
from edged.edge.txt import decode_txt, node_txt, parse_node_txt
from edged.errors import ConfigError
from edged.locality import Origin, clean_zone, format_loc, haversine_km, parse_loc, where_meta
from edged.manifest import parse_policy, policy_dict
from edged.model import PolicySpec, ServiceSpec
from edged.policy import Ranker
from edged.spillover import shares
from edged.vitals import Vitals

MUNICH = (48.1374, 11.5755)
VIENNA = (48.2082, 16.3738)  # 356 km from Munich
BERLIN = (52.52, 13.405)  # 504 km from Munich
LONDON = (51.5074, -0.1278)
PARIS = (48.8566, 2.3522)


def peer_ep(name: str, zone: str = "", loc: tuple[float, float] | None = None, port: int = 0, **kw):
    """An edge endpoint of node `name`, with the meta the edge tier gives it."""
    meta = tuple(sorted((("node", name), *where_meta(zone, loc))))
    return endpoint(name, port or 9000 + sum(map(ord, name)), tier="edge", meta=meta, **kw)


def geo(*eps, **policy):
    return service(*eps, policy=PolicySpec(strategy="geo", **policy))


def first_ids(svc, health, ranker, n=4000) -> Counter:
    plans = (ranker.plan(svc, health, 0.0, explain=False) for _ in range(n))
    return Counter(plan.choices[0].endpoint.id.rpartition("/")[2] for plan in plans)


HERE = Origin("munich", MUNICH)


def order(svc, health=None, origin=HERE, seed=1) -> list[str]:
    plan = Ranker(random.Random(seed), origin).plan(svc, health or FakeHealth(), 0.0)
    return [c.endpoint.id.rpartition("/")[2] for c in plan.choices]


# -- places --------------------------------------------------------------------------------------------------


def test_haversine_matches_known_distances():
    assert haversine_km(LONDON, PARIS) == pytest.approx(343.6, abs=1.0)
    assert haversine_km(MUNICH, BERLIN) == pytest.approx(504.4, abs=1.0)
    assert haversine_km((0.0, 0.0), (0.0, 180.0)) == pytest.approx(20015.1, abs=1.0)
    assert haversine_km(MUNICH, MUNICH) == 0.0


@pytest.mark.parametrize(
    "text",
    ["", "48.1", "48.1,11.5,3", "nan,1", "1,nan", "inf,0", "0,-inf", "91,0", "0,180.5", "-90.01,0", "a,b", "1e999,0",
     "4" * 60 + ",1", "48.1;11.5", " , ", None, 7, [True, False], ["1", {}], [1, 2, 3]],
)  # fmt: skip
def test_garbage_locations_are_unknown(text):
    assert parse_loc(text) is None


def test_locations_parse_round_and_format_short():
    assert parse_loc("48.13741234,11.57549999") == (48.1374, 11.5755)
    assert parse_loc(" -33.86 , 151.2 ") == (-33.86, 151.2)
    assert parse_loc([90, -180]) == (90.0, -180.0)
    assert format_loc((48.0, 11.5)) == "48,11.5" and format_loc(None) == ""
    assert parse_loc(format_loc(MUNICH)) == MUNICH


@pytest.mark.parametrize("zone", ["", " ", "a b", "zone/1", "-lead", "x" * 64, "ü", "a\x00", 5, None])
def test_garbage_zones_are_no_zone(zone):
    assert clean_zone(zone) == ""


def test_txt_carries_zone_and_location_and_a_hostile_txt_gets_neither():
    props = node_txt(
        node="pi-a", fleet="home", zone="hall", vitals=Vitals(), services=["x"], addresses=[], location=MUNICH
    )
    assert props["loc"] == "48.1374,11.5755"
    record = parse_node_txt(props)
    assert record is not None and (record.zone, record.location) == ("hall", MUNICH)
    assert "loc" not in node_txt(node="pi-a", fleet="home", zone="", vitals=Vitals(), services=[], addresses=[])
    for zone, loc in [("a b", "nan,nan"), ("z" * 200, "1" * 5000 + ",2"), ("..", "91,181"), ("", "\xff,\x00")]:
        raw = {b"node": b"evil", b"fleet": b"home", b"zone": zone.encode(), b"loc": loc.encode("utf-8", "replace")}
        record = parse_node_txt(decode_txt(raw))
        assert record is not None and (record.zone, record.location) == ("", None), (zone, loc)


def test_peers_endpoints_carry_the_peers_zone_and_location():
    record = parse_node_txt(
        node_txt(node="pi-b", fleet="home", zone="hall", vitals=Vitals(), services=["s"], addresses=[], location=VIENNA)
    )
    assert record is not None
    peer = Peer(record, "10.0.0.2", 7701, "pi-b", (("default", "s"),))
    (ep,), _ = build([peer], [], {}, node="pi-a", fleet="home")
    assert ("zone", "hall") in ep.meta and ("loc", format_loc(VIENNA)) in ep.meta and ("node", "pi-b") in ep.meta


def test_registry_entries_and_status_carry_zone_and_location_validated():
    spec = ServiceSpec(name="s")
    entry = spec_entry(spec, node="pi-a", zone="hall", cloud=True, location=MUNICH)
    assert entry["loc"] == format_loc(MUNICH)
    assert normalize_entry(entry, node="pi-a")["loc"] == format_loc(MUNICH)
    assert "loc" not in spec_entry(spec, node="pi-a", zone="", cloud=True)  # unchanged bytes without a location
    hostile = {**entry, "zone": "x" * 10_000, "loc": [float("nan"), 1.0]}
    got = normalize_entry(hostile, node="pi-a")
    assert got["zone"] == "" and "loc" not in got
    status = NodeStatus.of({"state": "online", "zone": "hall", "loc": "48.1374,11.5755"}, seen=1.0, since=1.0)
    assert (status.zone, status.loc) == ("hall", "48.1374,11.5755") and status.as_dict()["loc"] == status.loc
    bad = NodeStatus.of({"state": "online", "zone": ["hall"], "loc": {"lat": 1}}, seen=1.0, since=1.0)
    assert (bad.zone, bad.loc) == ("", "") and "loc" not in bad.as_dict()


# -- ordering ------------------------------------------------------------------------------------------------


def test_the_callers_zone_first_then_nearest_then_unknown_places_last():
    svc = geo(
        peer_ep("far", "berlin", BERLIN),
        peer_ep("nowhere", "mars"),  # a zone, but no location and no measurement
        peer_ep("near", "vienna", VIENNA),
        peer_ep("home", "munich", MUNICH),
        levels="none",
    )
    for seed in range(20):
        assert order(svc, seed=seed) == ["home", "near", "far", "nowhere"]


def test_an_endpoint_with_no_place_is_never_first_even_when_the_callers_zone_is_gone():
    svc = geo(peer_ep("rogue"), peer_ep("far", "berlin", BERLIN), peer_ep("home", "munich", MUNICH))
    health = FakeHealth()
    health.state(svc.endpoints[2].id).up = False
    assert Ranker(random.Random(1), HERE).plan(svc, health, 0.0).choices[0].endpoint.id.endswith(
        "far"
    )
    assert first_ids(svc, health, Ranker(random.Random(2), HERE)) == {"far": 4000}


def test_measured_round_trip_time_orders_other_zones_unless_geo_order_is_distance():
    near, far = peer_ep("near", "vienna", VIENNA), peer_ep("far", "berlin", BERLIN)
    health = FakeHealth()
    health.state(far.id).latency_ewma = 0.002  # measured 2 ms; near is not measured: 30 ms + 3.5 ms estimated
    assert order(geo(near, far), health) == ["far", "near"]
    assert order(geo(near, far, geo_order="distance"), health) == ["near", "far"]
    health.state(near.id).latency_ewma = 0.001
    assert order(geo(near, far), health) == ["near", "far"]


def test_local_endpoints_are_always_in_the_callers_locality():
    svc = geo(peer_ep("peer", "munich", MUNICH), endpoint("mine", 9100), levels="none")
    plan = Ranker(random.Random(1), Origin("", None)).plan(svc, FakeHealth(), 0.0)
    assert plan.choices[0].endpoint.id.endswith("mine")  # no zone, no location here: still first
    assert [(loc["locality"], loc["here"], loc["ranked_by"]) for loc in plan.localities] == [
        ("(here)", True, "zone"),
        ("munich", False, "unknown"),
    ]


def test_levels_still_come_first_geo_orders_within_each():
    svc = geo(peer_ep("home", "munich", MUNICH, priority=2), peer_ep("far", "berlin", BERLIN, priority=1))
    assert order(svc) == ["far", "home"]  # priority 1 is its own level: it keeps the calls while healthy


def test_within_a_locality_the_least_loaded_endpoint_takes_the_call():
    slow, quick = peer_ep("slow", "munich", MUNICH), peer_ep("quick", "munich", MUNICH)
    health = FakeHealth()
    health.state(slow.id).peak.observe(0.050, 0.0)
    health.state(quick.id).peak.observe(0.005, 0.0)
    assert first_ids(geo(slow, quick), health, Ranker(random.Random(3), HERE)) == {"quick": 4000}


# -- spillover between localities, and weights ----------------------------------------------------------------


@pytest.mark.parametrize("healthy", [4, 3, 2, 1, 0])
def test_calls_spill_from_the_callers_zone_in_proportion_to_its_lost_health(healthy):
    home = [peer_ep(f"home{i}", "munich", MUNICH) for i in range(4)]
    near = [peer_ep(f"near{i}", "vienna", VIENNA) for i in range(2)]
    far = [peer_ep(f"far{i}", "berlin", BERLIN) for i in range(2)]
    svc = geo(*far, *near, *home)
    health = FakeHealth()
    for ep in home[healthy:]:
        health.state(ep.id).up = False
    got = first_ids(svc, health, Ranker(random.Random(healthy), HERE), n=10_000)
    by_zone = Counter({z: sum(v for k, v in got.items() if k.startswith(z)) for z in ("home", "near", "far")})
    _, expected, _ = shares([(healthy, 4), (2, 2), (2, 2)], 1.4)  # Envoy's formula, the same code as levels
    for zone, share in zip(("home", "near", "far"), expected, strict=True):
        assert by_zone[zone] / 10_000 == pytest.approx(share / 100, abs=0.02), (zone, by_zone, expected)
    plan = Ranker(random.Random(1), HERE).plan(svc, health, 0.0)
    assert [round(loc["share"], 1) for loc in plan.localities] == [round(x, 1) for x in expected]


def test_zone_weights_split_a_step_as_envoys_locality_weighted_balancer():
    home = peer_ep("home", "munich", MUNICH)
    b = peer_ep("b", "vienna", VIENNA)
    c = peer_ep("c", "berlin", BERLIN)
    d = peer_ep("d", "paris", PARIS)
    never = peer_ep("never", "london", LONDON)
    svc = geo(home, b, c, d, never, zone_weights=(("berlin", 1), ("london", 0), ("vienna", 3)))
    health = FakeHealth()
    health.state(home.id).up = False
    got = first_ids(svc, health, Ranker(random.Random(5), HERE), n=8000)
    assert set(got) == {"b", "c"}  # the weighted step (vienna, berlin) takes everything: it is fully healthy
    assert got["b"] / 8000 == pytest.approx(0.75, abs=0.02)
    ids = order(svc, health)
    assert ids[-1] == "home" and "never" in ids and "d" in ids  # weight 0: failover only, never a first choice
    plan = Ranker(random.Random(1), HERE).plan(svc, health, 0.0)
    rows = {loc["locality"]: loc for loc in plan.localities}
    assert (rows["vienna"]["weight"], rows["vienna"]["share"], rows["berlin"]["share"]) == (3, 75.0, 25.0)
    assert rows["london"]["share"] == 0.0 and rows["paris"]["share"] == 0.0


def test_resolve_explains_zone_distance_rtt_and_share():
    home, far = peer_ep("home", "munich", MUNICH), peer_ep("far", "berlin", BERLIN)
    health = FakeHealth()
    health.state(far.id).latency_ewma = 0.0042
    plan = Ranker(random.Random(1), HERE).plan(geo(home, far, levels="none"), health, 0.0)
    reasons = {c.endpoint.id.rpartition("/")[2]: c.reason for c in plan.choices}
    assert reasons["home"].startswith("geo: munich, caller's zone; locality share 100%; least loaded")
    assert reasons["far"].startswith("geo: berlin, 504 km, rtt 4.2 ms; locality share 0%")
    far_row = plan.localities[1]
    assert far_row["distance_km"] == pytest.approx(504, abs=1) and (far_row["rtt_ms"], far_row["ranked_by"]) == (
        4.2,
        "rtt",
    )


# -- policy keys ---------------------------------------------------------------------------------------------


def test_geo_policy_keys_round_trip_and_bad_ones_are_refused_with_the_key():
    policy = parse_policy({"strategy": "geo", "zone_weights": {"b": 3, "a": 0}, "geo_order": "distance"}, "t")
    assert policy.zone_weights == (("a", 0), ("b", 3)) and policy.geo_order == "distance"
    assert parse_policy(policy_dict(policy), "t") == policy
    assert "zone_weights" not in policy_dict(PolicySpec()) and "geo_order" not in policy_dict(PolicySpec())
    bad = [
        ({"zone_weights": {"a b": 1}}, "zone_weights.'a b': expected a zone name"),
        ({"zone_weights": {"a": -1}}, "from 0 to 1000"),
        ({"zone_weights": {"a": 1001}}, "from 0 to 1000"),
        ({"zone_weights": {"a": "3"}}, "zone_weights.a"),
        ({"zone_weights": ["a"]}, "expected a table"),
        ({"zone_weights": {f"z{i}": 1 for i in range(65)}}, "at most 64 zones"),
        ({"geo_order": "fastest"}, "geo_order"),
    ]
    for doc, mentions in bad:
        with pytest.raises(ConfigError) as info:
            parse_policy(doc, "t")
        assert mentions in str(info.value), (doc, str(info.value))


def test_in_panic_every_endpoint_takes_part_and_the_locality_with_health_left_starts():
    home = [peer_ep(f"home{i}", "munich", MUNICH) for i in range(3)]
    far = [peer_ep(f"far{i}", "berlin", BERLIN) for i in range(3)]
    health = FakeHealth()
    for ep in [*home, *far[:2]]:
        health.state(ep.id).up = False  # 1 of 6 healthy: 23 % < panic_threshold 50 %
    plan = Ranker(random.Random(1), HERE).plan(geo(*home, *far), health, 0.0)
    assert plan.panic and len(plan.choices) == 6
    ids = [c.endpoint.id.rpartition("/")[2] for c in plan.choices]
    assert ids[0].startswith("far") and set(ids[3:]) == {"home0", "home1", "home2"}  # munich's health is 0
    assert {c.endpoint.id for c in plan.choices if c.usable} == {far[2].id}
    assert plan.localities[0]["locality"] == "munich" and plan.localities[0]["healthy"] == 0


def test_peers_with_no_zone_share_one_locality_so_calls_do_not_herd_onto_the_nearest():
    eps = [peer_ep("near", loc=VIENNA), peer_ep("far", loc=BERLIN), peer_ep("farther", loc=LONDON)]
    health = FakeHealth()
    for ep in eps:
        health.state(ep.id).latency_ewma = 0.004
        health.state(ep.id).peak.observe(0.004, 0.0)
    plan = Ranker(random.Random(1), HERE).plan(geo(*eps), health, 0.0)
    assert [(loc["locality"], loc["total"], loc["share"]) for loc in plan.localities] == [("", 3, 100.0)]
    got = first_ids(geo(*eps), health, Ranker(random.Random(4), HERE), n=3000)
    # Least loaded among them (power of two choices: with equal costs and nothing in flight, the cheaper of
    # two drawn takes it, 2/3 and 1/3 here), not every call to the nearest.
    assert len(got) >= 2 and max(got.values()) < 0.75 * 3000, got
