"""Priority levels and spillover (Envoy's formula), through the real Ranker."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from helpers import FakeHealth, endpoint, service

from edged.model import PolicySpec
from edged.policy import Ranker
from edged.spillover import pick, shares


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([(4, 4), (4, 4)], [100.0, 0.0]),
        ([(3, 4), (4, 4)], [100.0, 0.0]),  # 75 % x 1.4 = 105: the level keeps everything
        ([(5, 7), (4, 4)], [100.0, 0.0]),  # 71.4 % x 1.4 = 100
        ([(2, 4), (4, 4)], [70.0, 30.0]),
        ([(0, 4), (4, 4)], [0.0, 100.0]),
        ([(1, 4), (1, 4)], [50.0, 50.0]),  # 35 + 35 < 100: scaled to add up to 100
        ([(1, 4), (1, 4), (4, 4)], [35.0, 35.0, 30.0]),
    ],
)
def test_envoy_shares(counts, expected):
    _, got, _ = shares(counts, 1.4)
    assert [round(x, 6) for x in got] == expected


def test_pick_follows_the_shares():
    assert [pick([70.0, 30.0], u) for u in (0.0, 0.69, 0.7, 0.99)] == [0, 0, 1, 1]
    assert pick([0.0, 100.0], 0.0) == 1


def two_levels(healthy_in_p0: int, **policy):
    p0 = [endpoint(f"a{i}", i, priority=1) for i in range(4)]
    p1 = [endpoint(f"b{i}", 10 + i, priority=2) for i in range(4)]
    health = FakeHealth()
    for ep in p0[healthy_in_p0:]:
        health.state(ep.id).up = False
        health.state(ep.id).why = "unhealthy: test"
    return service(*p0, *p1, policy=PolicySpec(**policy)), health


def firsts(svc, health, n=5000) -> Counter:
    ranker = Ranker(random.Random(11))
    return Counter(ranker.plan(svc, health, 0.0).choices[0].level for _ in range(n))


def test_a_level_keeps_all_calls_until_fewer_than_71_percent_are_healthy_then_spills_in_proportion():
    svc, health = two_levels(3)
    assert firsts(svc, health) == {"p1/local": 5000}
    svc, health = two_levels(2)
    got = firsts(svc, health)
    assert 0.67 < got["p1/local"] / 5000 < 0.73, got
    plan = Ranker().plan(svc, health, 0.0)
    assert [(lv.name, lv.healthy, lv.total, round(lv.share)) for lv in plan.levels] == [
        ("p1/local", 2, 4, 70),
        ("p2/local", 4, 4, 30),
    ]
    # Every usable endpoint of both levels is in the plan, then the unhealthy ones as a last resort.
    assert [c.usable for c in plan.choices] == [True] * 6 + [False] * 2
    svc, health = two_levels(2, overprovisioning=1.0)
    assert 0.47 < firsts(svc, health)["p1/local"] / 5000 < 0.53


def test_levels_none_puts_every_tier_in_one_level():
    eps = [endpoint("l", 1), endpoint("e", 2, tier="edge")]
    svc = service(*eps, policy=PolicySpec(strategy="round_robin", levels="none"))
    ranker = Ranker()
    assert {ranker.plan(svc, FakeHealth(), 0.0).choices[0].endpoint.tier for _ in range(4)} == {"local", "edge"}
    svc = service(*eps, policy=PolicySpec(strategy="round_robin"))  # default: a level per tier, local first
    assert {ranker.plan(svc, FakeHealth(), 0.0).choices[0].endpoint.tier for _ in range(4)} == {"local"}


def test_panic_below_the_threshold_spreads_calls_over_every_endpoint_of_the_level():
    eps = [endpoint(f"a{i}", i) for i in range(3)]
    health = FakeHealth()
    for ep in eps[1:]:
        health.state(ep.id).up = False
    svc = service(*eps, policy=PolicySpec(strategy="round_robin"))
    plan = Ranker().plan(svc, health, 0.0)  # 1/3 x 1.4 = 47 % < 50 %
    assert plan.panic and "panic" in plan.note
    ranker = Ranker()
    assert {ranker.plan(svc, health, 0.0).choices[0].endpoint.id for _ in range(3)} == {ep.id for ep in eps}
    svc = service(*eps, policy=PolicySpec(strategy="round_robin", panic_threshold=0))
    plan = Ranker().plan(svc, health, 0.0)
    assert not plan.panic and [c.usable for c in plan.choices] == [True, False, False]


@pytest.mark.parametrize("strategy", ["round_robin", "least_loaded", "predictive", "geo"])
@pytest.mark.parametrize("explain", [True, False])
def test_a_stalled_endpoint_is_no_health_verdict_and_never_brings_panic(strategy, explain):
    """Stalled is a call in flight for long, not a verdict: it must not push a service into panic, where the
    down endpoints are tried among the first (tests/test_e2e_faults.py's ejected p1 while p2 was stalled)."""
    p1, p2 = endpoint("p1", 1, priority=1), endpoint("p2", 2, priority=2)
    health = FakeHealth()
    health.state(p1.id).up = False  # ejected
    health.state(p2.id).inflight = 4
    health.stalled_ids.add(p2.id)  # its calls are slow to come back
    svc = service(p1, p2, policy=PolicySpec(strategy=strategy))
    ranker = Ranker(random.Random(3))
    for _ in range(20):  # (the quick path's draws, and the general loop's)
        plan = ranker.plan(svc, health, 0.0, explain=explain)
        assert not plan.panic and [(c.endpoint.id, c.usable) for c in plan.choices] == [(p2.id, False), (p1.id, False)]
    # One level of three: one down, one stalled: 2/3 x 1.4 of them have no bad verdict, no panic either ...
    eps = [endpoint(f"a{i}", i) for i in range(3)]
    health = FakeHealth()
    health.state(eps[0].id).up = False
    health.state(eps[1].id).inflight = 1
    health.stalled_ids.add(eps[1].id)
    svc = service(*eps, policy=PolicySpec(strategy=strategy))
    for _ in range(20):
        plan = ranker.plan(svc, health, 0.0, explain=explain)
        assert not plan.panic and [c.endpoint.id for c in plan.choices] == [eps[2].id, eps[1].id, eps[0].id]
    # ... while the verdicts alone still bring it: two of three down.
    health.state(eps[1].id).up = False
    assert ranker.plan(svc, health, 0.0, explain=explain).panic
