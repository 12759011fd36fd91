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
