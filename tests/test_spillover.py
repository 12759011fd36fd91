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
