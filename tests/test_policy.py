from __future__ import annotations

import math
import random
from collections import Counter

from helpers import FakeHealth, endpoint, service

from edged.model import STRATEGIES, PolicySpec
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
    health.state("default/s/local/b").inflight = 1  # (only an endpoint with calls in flight can be stalled)
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


def measured(health, name: str, rtt: float, now: float = 0.0, inflight: int = 0) -> None:
    st = health.state(f"default/s/local/{name}")
    st.peak.observe(rtt, now)
    st.inflight = inflight


def test_latency_is_least_loaded_and_the_slow_endpoint_gets_nothing_under_power_of_two_choices():
    eps = [endpoint("fast", 1), endpoint("mid", 2), endpoint("slow", 3)]
    health = FakeHealth()
    measured(health, "fast", 0.001)
    measured(health, "mid", 0.002)
    measured(health, "slow", 0.020)
    ranker = Ranker(random.Random(5))
    svc = service(*eps, policy=PolicySpec(strategy="latency"))
    plans = [ranker.plan(svc, health, 0.0) for _ in range(6000)]
    assert {p.strategy for p in plans} == {"least_loaded"}
    firsts = Counter(ids(p)[0] for p in plans)
    # A random pair, the cheaper wins: fast wins 2 pairs of 3, mid the (mid, slow) pair, slow none.
    assert firsts["slow"] == 0 and 0.62 < firsts["fast"] / 6000 < 0.71, firsts
    assert all(ids(p)[1:] == sorted(ids(p)[1:], key=["fast", "mid", "slow"].index) for p in plans)
    assert plans[0].choices[0].reason.startswith("least loaded: cost ")


def test_least_loaded_cost_grows_with_calls_in_flight_and_with_poor_vitals():
    eps = [endpoint("a", 1), endpoint("b", 2)]
    health = FakeHealth()
    measured(health, "a", 0.001, inflight=9)  # cost 1 ms x 10
    measured(health, "b", 0.004)  # cost 4 ms
    svc = service(*eps, policy=PolicySpec(strategy="least_loaded"))
    assert ids(Ranker().plan(svc, health, 0.0)) == ["b", "a"]
    assert "(9 in flight + 1)" in Ranker().plan(svc, health, 0.0).choices[1].reason
    drained = with_meta(endpoint("b", 2), power="battery", bat="10")  # x 2 x (1 + 4 x 0.9): 36.8 ms
    assert ids(Ranker().plan(service(eps[0], drained, policy=svc.spec.policy), health, 0.0)) == ["a", "b"]
    hot = with_meta(endpoint("b", 2), cpu="90", link="20")  # x 1.9 / 0.2: cost 38 ms
    assert ids(Ranker().plan(service(eps[0], hot, policy=svc.spec.policy), health, 0.0)) == ["a", "b"]


def test_an_unmeasured_endpoint_gets_one_call_at_a_time_until_it_is_measured():
    eps = [endpoint("known", 1), endpoint("new", 2)]
    health = FakeHealth()
    measured(health, "known", 0.050)
    svc = service(*eps, policy=PolicySpec(strategy="least_loaded", default_rtt=0.030))
    plan = Ranker().plan(svc, health, 0.0)
    assert ids(plan) == ["new", "known"] and "not measured yet" in plan.choices[0].reason
    health.state("default/s/local/new").inflight = 1  # its probe is out: no second call before it answers
    measured(health, "known", 0.050, inflight=30)
    plan = Ranker().plan(svc, health, 0.0)
    assert ids(plan) == ["known", "new"] and "penalty" in plan.choices[1].reason


def test_peak_ewma_takes_peaks_at_once_and_decays_with_a_10s_time_constant():
    from edged.balancer import PeakEwma

    p = PeakEwma()
    assert not p.measured and p.get(0.0) == 0.0
    p.observe(0.010, 0.0)
    p.observe(0.100, 0.1)  # a peak: taken whole
    assert p.get(0.1) == 0.100
    assert abs(p.get(10.1) - 0.100 * math.exp(-1)) < 1e-9  # idle: decays towards zero, read changes nothing
    p.observe(0.010, 10.1)  # a faster answer after 10 s weighs 1 - e^-1 of the decayed estimate
    w = math.exp(-1)
    assert abs(p.value - (0.100 * w * w + 0.010 * (1 - w))) < 1e-9


def test_every_strategy_the_contract_names_is_implemented_none_falls_back():
    eps = [endpoint("b", 1, priority=2), endpoint("a", 2, priority=1)]
    # `geo` was the last to fall back to `priority` (edged/locality.py); predictive's own tests give it its model
    for strategy in (s for s in STRATEGIES if s != "predictive"):
        plan = Ranker().plan(service(*eps, policy=PolicySpec(strategy=strategy)), FakeHealth(), 0.0)
        assert plan.strategy == ("least_loaded" if strategy == "latency" else strategy) and plan.note == ""
        assert ids(plan) == ["a", "b"]  # priority levels first, whatever the strategy


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
    assert node_score((("cpu", "50"),)) == 1 / 1.5
    assert node_score((("cpu", "100"),)) == 0.5  # a busy node keeps half its weight (see node_score)


def test_power_rules_put_battery_nodes_last():
    mains = with_meta(endpoint("mains", 1, priority=2, tier="edge"), power="mains")
    low = with_meta(endpoint("low", 2, priority=1, tier="edge"), power="battery", bat="15")
    full = with_meta(endpoint("full", 3, priority=1, tier="edge"), power="battery", bat="90")
    # One level (else the refused endpoint makes priority 1 half healthy and 30 % of calls spill to mains).
    one = PolicySpec(battery_min=20, levels="none")
    plan = Ranker().plan(service(mains, low, full, policy=one), FakeHealth(), 0.0)
    assert ids(plan) == ["full", "mains", "low"]
    assert plan.choices[2].reason == "last resort: battery 15% < battery_min 20%"
    plan = Ranker().plan(service(mains, low, full, policy=PolicySpec(on_power=True)), FakeHealth(), 0.0)
    assert ids(plan)[0] == "mains" and not plan.choices[1].usable
