from __future__ import annotations

import random
from collections import Counter

from helpers import FakeHealth, endpoint, service

from edged.model import PolicySpec
from edged.policy import Ranker, stall_threshold


def ids(plan) -> list[str]:
    return [c.endpoint.id.rsplit("/", 1)[1] for c in plan.choices]


def test_priority_orders_by_priority_then_tier_then_weight():
    eps = [
        endpoint("cloud", 1, priority=1, tier="cloud"),
        endpoint("b", 2, priority=1, weight=50),
        endpoint("a", 3, priority=1, weight=200),
        endpoint("z", 4, priority=0, tier="edge"),
    ]
    plan = Ranker().plan(service(*eps), FakeHealth(), 0.0)
    assert ids(plan) == ["z", "a", "b", "cloud"]
    assert all(c.usable for c in plan.choices)
    assert plan.choices[0].reason.startswith("priority 0")


def test_unhealthy_and_stalled_endpoints_go_last_with_their_reason():
    eps = [endpoint("a", 1, priority=1), endpoint("b", 2, priority=2), endpoint("c", 3, priority=3)]
    health = FakeHealth()
    health.state("default/s/local/a").up = False
    health.state("default/s/local/a").why = "unhealthy: HTTP 503"
    health.stalled_ids.add("default/s/local/b")
    plan = Ranker().plan(service(*eps), health, 0.0)
    assert ids(plan) == ["c", "b", "a"]
    assert [c.usable for c in plan.choices] == [True, False, False]
    assert plan.choices[2].reason == "last resort: unhealthy: HTTP 503"
    assert plan.choices[1].reason.startswith("stalled")


def test_round_robin_rotates():
    eps = [endpoint("a", 1), endpoint("b", 2), endpoint("c", 3)]
    svc = service(*eps, policy=PolicySpec(strategy="round_robin"))
    ranker = Ranker()
    firsts = [ids(ranker.plan(svc, FakeHealth(), 0.0))[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_weighted_shares_follow_weights():
    eps = [endpoint("heavy", 1, weight=900), endpoint("light", 2, weight=100)]
    svc = service(*eps, policy=PolicySpec(strategy="weighted"))
    ranker = Ranker(random.Random(7))
    firsts = Counter(ids(ranker.plan(svc, FakeHealth(), 0.0))[0] for _ in range(5000))
    assert 0.87 < firsts["heavy"] / 5000 < 0.93
    # Every endpoint stays in the plan, as a fallback.
    assert sorted(ids(ranker.plan(svc, FakeHealth(), 0.0))) == ["heavy", "light"]


def test_latency_prefers_unmeasured_then_fastest():
    eps = [endpoint("slow", 1), endpoint("fast", 2), endpoint("new", 3)]
    health = FakeHealth()
    health.state("default/s/local/slow").latency_ewma = 0.050
    health.state("default/s/local/fast").latency_ewma = 0.002
    plan = Ranker().plan(service(*eps, policy=PolicySpec(strategy="latency")), health, 0.0)
    assert ids(plan) == ["new", "fast", "slow"]
    assert plan.choices[1].reason == "latency 2.0 ms (ewma)"


def test_strategies_not_in_this_version_fall_back_to_priority_and_say_so():
    eps = [endpoint("b", 1, priority=2), endpoint("a", 2, priority=1)]
    plan = Ranker().plan(service(*eps, policy=PolicySpec(strategy="geo")), FakeHealth(), 0.0)
    assert plan.strategy == "priority" and ids(plan) == ["a", "b"]
    assert "geo" in plan.note


def test_stall_threshold_bounds():
    assert stall_threshold(None, 0.3) == 0.15
    assert stall_threshold(0.001, 0.3) == 0.025
    assert stall_threshold(0.010, 0.3) == 0.08
    assert stall_threshold(1.0, 0.3) == 0.15


def with_meta(ep, **meta):
    import dataclasses

    return dataclasses.replace(ep, meta=tuple(meta.items()))


def test_weighted_share_follows_node_vitals_battery_node_gets_under_a_tenth():
    mains = with_meta(endpoint("mains", 1, tier="edge"), cpu="20", power="mains", link="100")
    low = with_meta(endpoint("low", 2, tier="edge"), cpu="20", power="battery", bat="10", link="100")
    svc = service(mains, low, policy=PolicySpec(strategy="weighted"))
    ranker = Ranker(random.Random(3))
    firsts = Counter(ids(ranker.plan(svc, FakeHealth(), 0.0))[0] for _ in range(20000))
    assert firsts["low"] < firsts["mains"] / 10, firsts


def test_unknown_vitals_keep_the_full_weight():
    from edged.policy import node_score

    assert node_score(()) == 1.0
    assert node_score((("cpu", ""), ("bat", ""), ("power", ""), ("link", "x"))) == 1.0
    assert node_score((("cpu", "50"),)) == 0.5


def test_power_rules_put_battery_nodes_last():
    mains = with_meta(endpoint("mains", 1, priority=2, tier="edge"), power="mains")
    low = with_meta(endpoint("low", 2, priority=1, tier="edge"), power="battery", bat="15")
    full = with_meta(endpoint("full", 3, priority=1, tier="edge"), power="battery", bat="90")
    plan = Ranker().plan(service(mains, low, full, policy=PolicySpec(battery_min=20)), FakeHealth(), 0.0)
    assert ids(plan) == ["full", "mains", "low"]
    assert plan.choices[2].reason == "last resort: battery 15% < battery_min 20%"
    plan = Ranker().plan(service(mains, low, full, policy=PolicySpec(on_power=True)), FakeHealth(), 0.0)
    assert ids(plan)[0] == "mains" and not plan.choices[1].usable
