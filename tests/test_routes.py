"""Routes (edged/routes.py): labels, subsets, weighted splits and match rules; their checks and limits; the
router's hook; labels on the way to peers (mDNS) and through the fleet registry (MQTT entries)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest
from helpers import FakeHealth, endpoint, service
from hypothesis import given, settings
from hypothesis import strategies as st
from test_router import ScriptedTransport

from edged.call import Call
from edged.cloud.registry_sync import entry_shape, entry_spec, normalize_entry, spec_entry
from edged.cloud.tier import cloud_endpoints
from edged.cloud.topics import Topics, service_key
from edged.edge.peers import Peer, build
from edged.edge.txt import HASH_PREFIX, node_txt, parse_labels_doc, parse_node_txt
from edged.errors import ConfigError
from edged.manifest import parse_manifest_data, parse_policy, policy_dict
from edged.model import PolicySpec, ServiceSpec
from edged.policy import Ranker
from edged.registry import Registry, static_endpoints
from edged.router import Router
from edged.routes import (
    MAX_HEADER_MATCHES,
    MAX_LABELS,
    MAX_ROUTES,
    RoutePicker,
    Sample,
    common_labels,
    dry_run,
    wire_labels,
)
from edged.telemetry import MeshMetrics
from edged.vitals import Vitals

SUBSETS = {"v1": {"version": "1"}, "v2": {"version": "2"}}
HEADER_RULE = {"match": {"headers": [{"name": "x-canary", "exact": "1"}]}, "subset": "v2"}
CANARY = {"subsets": SUBSETS, "splits": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}


def labelled(name: str, port: int, version: str, **kw):
    return dataclasses.replace(endpoint(name, port, **kw), labels=(("version", version),))


def svc(policy: dict, *eps):
    eps = eps or (labelled("a", 1, "1"), labelled("b", 2, "1"), labelled("c", 3, "2"))
    return service(*eps, policy=parse_policy(policy, "test"), types=("local",))


def call(method="GET", path="/", headers=(), tiers=None, deadline=100.0) -> Call:
    return Call("default", "s", method, path, list(headers), b"", deadline, "rid", tiers)


# -- parsing and checks --------------------------------------------------------------------------------------


def test_labels_on_manifest_endpoints_reach_the_endpoints():
    spec = parse_manifest_data(
        {
            "service_name": "api",
            "endpoints": [
                {"type": "local", "url": "http://127.0.0.1:1", "labels": {"version": "2", "track": "canary"}},
                {"type": "local", "url": "http://127.0.0.1:2"},
            ],
        },
        "m.toml",
    )
    eps = static_endpoints(spec)
    assert eps[0].labels == (("track", "canary"), ("version", "2")) and eps[1].labels == ()


def test_a_policy_with_routes_round_trips_through_policy_dict_and_compares_equal():
    table = {
        **CANARY,
        "routes": [
            {"name": "canary", "match": {"headers": [{"name": "X-Canary", "exact": "1"}]}, "subset": "v2"},
            {"match": {"path_prefix": "/admin", "methods": ["POST"]}, "policy": {"strategy": "round_robin"}},
        ],
    }
    policy = parse_policy(table, "t")
    again = parse_policy(policy_dict(policy), "t")
    assert again == policy and hash(again) == hash(policy)
    assert policy_dict(policy)["routes"][0]["match"]["headers"] == [{"name": "x-canary", "exact": "1"}]
    assert policy.routing.rules[1].policy.strategy == "round_robin"
    assert policy.routing.rules[1].policy.timeout == policy.timeout  # the rest is the service's
    assert parse_policy({}, "t").routing is None  # no routes: the router's hook is skipped
    assert parse_policy({"subsets": {}, "splits": [], "routes": []}, "t").routing is None
    cleared = parse_policy({**policy_dict(policy), "splits": []}, "t")  # an override takes the split away
    assert cleared.routing.split is None and len(cleared.routing.rules) == 2


def hm(**cond):
    return {"routes": [{"match": {"headers": [cond]}, "policy": {}}]}


@pytest.mark.parametrize(
    ("table", "key", "says"),
    [
        ({"splits": [{"subset": "v3", "weight": 1}]}, "splits[0].subset", "no subset 'v3'"),
        ({"subsets": {"v1": {"version": "1 2"}}}, "subsets.v1.version", "label value"),
        ({"subsets": {"v1": {"Version": "1"}}}, "subsets.v1.Version", "label name"),
        ({"subsets": {"v1": {f"k{i}": "x" for i in range(MAX_LABELS + 1)}}}, "subsets.v1", "at most 8 labels"),
        ({**CANARY, "splits": [{"subset": "v1", "weight": 0}]}, "splits", "add up to 0"),
        ({**CANARY, "splits": [{"subset": "v1", "weight": 1}] * 2}, "splits[1].subset", "twice"),
        ({**CANARY, "splits": [{"subset": "v1", "weight": 10001}]}, "splits[0].weight", "10000"),
        ({"routes": [{"match": {}}]}, "routes[0]", "needs subset, splits or policy"),
        ({**CANARY, "routes": [{"subset": "v1", "splits": []}]}, "routes[0].splits", "not both"),
        ({"routes": [{"match": {"path": "admin"}, "policy": {}}]}, "routes[0].match.path", "starting with '/'"),
        ({"routes": [{"match": {"path": "/a", "path_prefix": "/b"}, "policy": {}}]}, "path_prefix", "not both"),
        ({"routes": [{"match": {"methods": ["get"]}, "policy": {}}]}, "routes[0].match.methods[0]", "capitals"),
        (hm(name="a"), "routes[0].match.headers[0]", "one of exact"),
        (hm(name="a b", exact="x"), "routes[0].match.headers[0].name", "header"),
        (hm(name="a", exact="x" * 257), "routes[0].match.headers[0].exact", "at most 256"),
        (hm(name="a", exact="é"), "routes[0].match.headers[0].exact", "ASCII"),
        ({"routes": [{"policy": {"max_inflight": 1}}]}, "routes[0].policy.max_inflight", "unknown key"),
        ({"routes": [{"policy": {"routes": []}}]}, "routes[0].policy.routes", "unknown key"),
        ({"routes": [{"policy": {"timeout": "1s"}}]}, "routes[0].policy.timeout", "per_try_timeout"),
        ({"routes": [{"policy": {"strategy": "fastest"}}]}, "routes[0].policy.strategy", "one of"),
        ({"routes": [{"name": "x", "policy": {}}, {"name": "x", "policy": {}}]}, "routes[1].name", "two routes"),
        ({"routes": [{"policy": {}}] * (MAX_ROUTES + 1)}, "routes", "at most 32 routes"),
        (
            {"routes": [{"match": {"headers": [{"name": "a", "present": True}] * (MAX_HEADER_MATCHES + 1)}}]},
            "routes[0].match.headers",
            "at most 8 header matches",
        ),
    ],
)
def test_invalid_routing_is_refused_naming_the_key(table, key, says):
    with pytest.raises(ConfigError) as exc:
        parse_policy(table, "fleet")
    assert key in (exc.value.key or ""), exc.value
    assert says in exc.value.message, exc.value.message


# -- matching --------------------------------------------------------------------------------------------------


def rules(*routes):
    return parse_policy({"subsets": SUBSETS, "routes": list(routes)}, "t").routing


def matched(routing, method="GET", path="/", headers=()):
    rule = routing.match(method, path, list(headers))
    return None if rule is None else rule.label


def test_rules_are_tried_in_order_and_the_first_match_wins():
    r = rules(
        {"name": "canary", "match": {"headers": [{"name": "x-canary", "exact": "1"}]}, "subset": "v2"},
        {"name": "admin", "match": {"path_prefix": "/admin"}, "subset": "v1"},
        {"name": "all", "match": {}, "subset": "v1"},
    )
    assert matched(r, path="/admin/x", headers=[(b"x-canary", b"1")]) == "canary"
    assert matched(r, path="/admin/x") == "admin"
    assert matched(r, path="/other") == "all"


def test_methods_paths_and_prefixes_by_whole_segments():
    r = rules(
        {"name": "post", "match": {"methods": ["POST", "PUT"], "path": "/exact"}, "subset": "v1"},
        {"name": "admin", "match": {"path_prefix": "/admin"}, "subset": "v1"},
        {"name": "api", "match": {"path_prefix": "/api/"}, "subset": "v1"},
    )
    assert matched(r, "POST", "/exact") == "post" and matched(r, "PUT", "/exact?x=1") == "post"
    assert matched(r, "GET", "/exact") is None and matched(r, "POST", "/exact/more") is None
    assert matched(r, path="/admin") == "admin" and matched(r, path="/admin/users") == "admin"
    assert matched(r, path="/administrator") is None  # a prefix is whole path segments
    assert matched(r, path="/api/v1") == "api" and matched(r, path="/api") is None


def test_header_conditions_exact_prefix_present_and_absent():
    r = rules(
        {"name": "exact", "match": {"headers": [{"name": "x-canary", "exact": "1"}]}, "subset": "v2"},
        {"name": "prefix", "match": {"headers": [{"name": "user-agent", "prefix": "curl/"}]}, "subset": "v2"},
        {"name": "both", "match": {"headers": [{"name": "x-a", "present": True}, {"name": "x-b", "present": False}]},
         "subset": "v2"},
    )
    assert matched(r, headers=[(b"x-canary", b"1")]) == "exact"
    assert matched(r, headers=[(b"x-canary", b"10")]) is None  # exact is exact
    assert matched(r, headers=[(b"user-agent", b"curl/8.1")]) == "prefix"
    assert matched(r, headers=[(b"user-agent", b"wget curl/8.1")]) is None
    assert matched(r, headers=[(b"x-a", b"")]) == "both"
    assert matched(r, headers=[(b"x-a", b"1"), (b"x-b", b"1")]) is None
    # A repeated header: the first one counts (a second copy cannot change the decision after the fact).
    assert matched(r, headers=[(b"x-canary", b"2"), (b"x-canary", b"1")]) is None


def test_a_hostile_header_value_is_compared_not_interpreted():
    r = rules({"match": {"headers": [{"name": "x-canary", "prefix": "a.*"}]}, "subset": "v2"})
    assert matched(r, headers=[(b"x-canary", b"abc")]) is None  # no pattern: '.*' is two characters
    assert matched(r, headers=[(b"x-canary", b"a.*" + b"x" * 65536)]) is not None
    many = [(f"x-{i}".encode(), b"v") for i in range(5000)]  # only the names a rule names are looked at
    assert matched(r, headers=many) is None


# -- splits ----------------------------------------------------------------------------------------------------


def draws(picker, s, n, health=None, **kw):
    health = health or FakeHealth()
    counts: dict[str, int] = {}
    for _ in range(n):
        routed = picker.pick(s, call(**kw), health, 0.0)
        key = dict(routed.endpoints[0].labels)["version"]  # the drawn subset's come first
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_a_90_10_split_gives_shares_within_statistical_bounds_and_is_seeded():
    s = svc(CANARY)
    n = 20_000
    counts = draws(RoutePicker(random.Random(7)), s, n)
    # binomial: mean 2,000, sd 42; 5 sd either side
    assert set(counts) == {"1", "2"} and 1790 < counts["2"] < 2210, counts
    assert draws(RoutePicker(random.Random(7)), s, 500) == draws(RoutePicker(random.Random(7)), s, 500)


def test_a_subset_with_no_healthy_endpoint_gives_its_share_to_the_others():
    eps = (labelled("a", 1, "1"), labelled("b", 2, "2"), labelled("c", 3, "3"))
    table = {
        "subsets": {**SUBSETS, "v3": {"version": "3"}},
        "splits": [{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 25}, {"subset": "v3", "weight": 25}],
    }
    s = svc(table, *eps)
    health = FakeHealth()
    health.state(eps[0].id).up = False  # v1 is down: its half goes to v2 and v3, 50/50
    counts = draws(RoutePicker(random.Random(1)), s, 8000, health)
    assert set(counts) == {"2", "3"} and 3700 < counts["2"] < 4300, counts
    for ep in eps:
        health.state(ep.id).up = False  # nothing healthy: the draw stands, its endpoints as a last resort
    counts = draws(RoutePicker(random.Random(1)), s, 4000, health)
    assert 1700 < counts["1"] < 2300, counts
    # healthy only in a tier the call may not use (a peer's call: local only) counts as not healthy
    edge_v1 = labelled("e", 4, "1", tier="edge")
    s = service(edge_v1, eps[1], policy=parse_policy(CANARY, "t"), types=("local", "edge"))
    assert draws(RoutePicker(random.Random(1)), s, 200, tiers=frozenset({"local"})) == {"2": 200}


def test_a_subset_no_endpoint_carries_gives_its_share_and_a_rule_subset_is_strict():
    subsets = {**SUBSETS, "v3": {"version": "3"}}
    s = svc({**CANARY, "subsets": subsets, "routes": [{"match": {"path": "/v3"}, "subset": "v3"}]})
    assert draws(RoutePicker(random.Random(1)), s, 300, path="/x").keys() == {"1", "2"}
    picked = RoutePicker().pick(s, call(path="/v3"), FakeHealth(), 0.0)
    assert picked.endpoints == ()  # a rule that names one subset: no endpoint there, no call elsewhere


def test_a_rules_policy_applies_and_a_shorter_timeout_brings_the_deadline_in():
    table = {
        **CANARY,
        "per_try_timeout": "1s",
        "routes": [{"match": {"path_prefix": "/fast"}, "policy": {"strategy": "round_robin", "timeout": "2s"}}],
    }
    s = svc(table)
    picker = RoutePicker(random.Random(3))
    c = call(path="/fast/x", deadline=50.0)
    routed = picker.pick(s, c, FakeHealth(), 10.0)
    assert routed.spec.policy.strategy == "round_robin" and c.deadline == 12.0
    # the route without a split of its own takes the default split (the other subset follows as a fallback)
    assert [dict(ep.labels)["version"] for ep in routed.endpoints] in (["1", "1", "2"], ["2", "1", "1"])
    other = call(path="/slow", deadline=50.0)
    assert picker.pick(s, other, FakeHealth(), 10.0).spec.policy.strategy == "priority" and other.deadline == 50.0


def test_the_same_route_gives_the_same_service_object_and_a_new_snapshot_a_new_one():
    s = svc({"subsets": SUBSETS, "routes": [HEADER_RULE]})
    picker = RoutePicker()
    h = FakeHealth()
    one, two = picker.pick(s, call(), h, 0), picker.pick(s, call(), h, 0)
    canary = picker.pick(s, call(headers=[(b"x-canary", b"1")]), h, 0)
    assert one is two and canary is not one and len(canary.endpoints) == 1
    s2 = dataclasses.replace(s)
    assert picker.pick(s2, call(), h, 0) is not one


def test_the_other_subsets_follow_a_drawn_subset_as_later_levels_and_take_calls_only_when_it_fails():
    s = svc({**CANARY, "levels": "priority"})
    health = FakeHealth()
    picker = RoutePicker(random.Random(5))
    while (routed := picker.pick(s, call(), health, 0.0)).endpoints[0].id != s.endpoints[2].id:
        pass  # until the draw gives v2
    plan = Ranker().plan(routed, health, 0.0)
    assert [c.endpoint.id[-1] for c in plan.choices] == ["c", "a", "b"]
    assert [lv.share for lv in plan.levels] == [100.0, 0.0]  # v1's endpoints, a level after: failover only
    flat = svc({**CANARY, "levels": "none"})
    while (routed := picker.pick(flat, call(), health, 0.0)).endpoints[0].id != flat.endpoints[2].id:
        pass
    assert len(routed.endpoints) == 1  # one level for all: the others would mix in, so they are left out


# -- in the router --------------------------------------------------------------------------------------------


def routed_router(policy: dict):
    eps = [labelled("a", 1, "1", priority=1), labelled("b", 2, "2", priority=2)]
    spec = dataclasses.replace(service(*eps, policy=parse_policy(policy, "t")).spec, endpoints=())
    registry = Registry()
    registry.set_manifests([spec])
    registry.set_endpoints("test", eps)
    transport = ScriptedTransport({"a": 200, "b": 200})
    router = Router(registry, FakeHealth(), {"local": transport}, MeshMetrics())
    return router, transport


def test_a_priority_plan_is_not_reused_across_routes():
    """`priority` plans are cached; a canary call must not get the plan made for the default route (or back)."""
    router, _ = routed_router(
        {"subsets": SUBSETS, "routes": [{"match": {"headers": [{"name": "x-canary", "exact": "1"}]}, "subset": "v2"}]}
    )
    sent = []
    for canary in (False, True, True, False, True, False, False):
        headers = [(b"x-canary", b"1")] if canary else []
        c = Call("default", "s", "GET", "/x", headers, b"", time.monotonic() + 10, "rid")
        sent.append(asyncio.run(router.route_service_call(c)).endpoint.id[-1])
    assert sent == ["a", "b", "b", "a", "b", "a", "a"]


def test_a_service_without_routes_is_routed_as_before():
    router, _ = routed_router({})
    c = Call("default", "s", "GET", "/x", [(b"x-canary", b"1")], b"", time.monotonic() + 10, "rid")
    assert asyncio.run(router.route_service_call(c)).endpoint.id.endswith("/a")


# -- dry run -------------------------------------------------------------------------------------------------


def test_dry_run_names_the_rule_the_subsets_and_their_shares_now():
    s = svc({**CANARY, "routes": [{"name": "canary", "match": {"headers": [{"name": "x-canary", "exact": "1"}]},
                                   "subset": "v2"}]})
    health = FakeHealth()
    route, subsets = dry_run(s, Sample("GET", "/", ((b"x-canary", b"1"),)), health, 0.0)
    assert route["rule"] == "canary" and [(i["subset"], i["share"]) for i, _ in subsets] == [("v2", 100.0)]
    route, subsets = dry_run(s, Sample(), health, 0.0)
    assert route["rule"] is None and [(i["subset"], i["share"], i["endpoints"]) for i, _ in subsets] == [
        ("v1", 90.0, 2),
        ("v2", 10.0, 1),
    ]
    health.state(s.endpoints[2].id).up = False
    _, subsets = dry_run(s, Sample(), health, 0.0)
    assert [(i["share"], i["healthy"]) for i, _ in subsets] == [(100.0, True), (0.0, False)]


# -- labels on the way to other nodes --------------------------------------------------------------------------


def test_labels_from_the_wire_keep_only_well_formed_pairs_and_are_capped():
    assert wire_labels({"version": "2", "Bad Key": "x", "k": "v v", "n": 3}) == (("version", "2"),)
    assert len(wire_labels({f"k{i}": "v" for i in range(100)})) == MAX_LABELS
    assert wire_labels(["version"]) == () and wire_labels(None) == ()
    assert common_labels([labelled("a", 1, "2"), labelled("b", 2, "2")]) == (("version", "2"),)
    assert common_labels([labelled("a", 1, "1"), labelled("b", 2, "2")]) == ()


def test_a_node_with_labelled_services_advertises_a_hash_and_peers_take_the_labels_of_its_list():
    plain = node_txt(node="n", fleet="f", zone="", vitals=Vitals(), services=["api"], addresses=["10.0.0.1"])
    assert plain["svcs"] == "api"
    one = node_txt(
        node="n", fleet="f", zone="", vitals=Vitals(), services=["api"], addresses=["10.0.0.1"],
        labels={"api": {"version": "2"}},
    )
    two = node_txt(
        node="n", fleet="f", zone="", vitals=Vitals(), services=["api"], addresses=["10.0.0.1"],
        labels={"api": {"version": "3"}},
    )
    assert one["svcs"].startswith(HASH_PREFIX) and one["svcs"] != two["svcs"]  # a label change is a new list
    record = parse_node_txt(one)
    assert record.services is None  # peers fetch /peer/services, which carries the labels
    services = (("default", "api"),)
    labels = parse_labels_doc({"api": {"version": "2"}, "other": {"version": "9"}, "x": "junk"}, services)
    assert labels == ((("default", "api"), (("version", "2"),)),)  # a service it does not list: left out
    peer = Peer(record, "10.0.0.2", 7701, "n._hubmesh._tcp.local.", services, labels)
    eps, _ = build([peer], (), {}, node="me", fleet="f")
    assert [(ep.service, ep.labels) for ep in eps] == [("api", (("version", "2"),))]


def test_labels_travel_in_the_fleet_registry_entry_to_the_cloud_endpoint():
    spec = ServiceSpec(name="api", endpoint_types=("local", "cloud"), policy=PolicySpec())
    entry = spec_entry(spec, node="n1", zone="", cloud=True, labels=(("version", "2"),))
    assert entry["labels"] == {"version": "2"}
    assert "labels" not in spec_entry(spec, node="n1", zone="", cloud=True)  # unlabelled: the same bytes as before
    hostile = {**entry, "labels": {"version": "2", "evil key": "x", **{f"k{i}": "v" for i in range(50)}}}
    normalized = normalize_entry(hostile, node="n1")
    assert "evil key" not in normalized["labels"] and len(normalized["labels"]) == MAX_LABELS
    remote = entry_spec(normalize_entry(entry, node="n1"), source="mqtt:n1")
    (ep,) = cloud_endpoints({remote.key: remote}, broker_url="mqtt://127.0.0.1:1883", topics=Topics("hubmesh", "f"))
    assert ep.labels == (("version", "2"),)
    key = service_key(spec.tenant, spec.name)  # as a box keeps it: a shared shape, the spec made from it per key
    assert entry_shape(entry, node="n1", key=key).spec(key, "mqtt:n1").endpoints == remote.endpoints


# -- hostile input ----------------------------------------------------------------------------------------------

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 20_000), st.text(max_size=12))
_json = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["name", "match", "subset", "splits", "policy", "headers", "exact", "prefix", "present",
                             "methods", "path", "path_prefix", "weight", "version", "v1", "strategy", "x"]),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(subsets=_json, splits=_json, routes=_json)
def test_any_routing_document_parses_or_is_refused_with_a_config_error(subsets, splits, routes):
    try:
        policy = parse_policy({"subsets": subsets, "splits": splits, "routes": routes}, "fuzz")
    except ConfigError:
        return
    if policy.routing is not None:  # what parsed round-trips and matches without raising
        assert parse_policy(policy_dict(policy), "again") == policy
        policy.routing.match("GET", "/x?y", [(b"x", b"1")])


@settings(max_examples=150, deadline=None)
@given(obj=_json, refs=st.lists(st.text(max_size=8), max_size=4))
def test_labels_from_peers_and_entries_never_raise(obj, refs):
    assert len(wire_labels(obj)) <= MAX_LABELS
    parse_labels_doc(obj, [("default", r) for r in refs])
