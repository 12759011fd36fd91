from __future__ import annotations

import itertools
import math
import random
from collections import Counter

from helpers import FakeHealth, endpoint, service

from edged import balancer
from edged.health import HealthMonitor
from edged.model import STRATEGIES, PolicySpec
from edged.policy import Ranker, stall_threshold
from edged.predictive import Model


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


def test_peak_ewma_answers_in_the_same_instant_weigh_nothing_but_a_peak():
    from edged.balancer import PeakEwma

    p = PeakEwma()
    assert not p.measured and p.get(3.0) == 0.0
    p.observe(0.050, 3.0)  # a first answer is taken whole, whatever the clock reads
    assert (p.value, p.stamp) == (0.050, 3.0) and p.measured
    p.observe(0.010, 3.0)  # no time passed: a faster answer does not pull the estimate down
    assert (p.value, p.stamp) == (0.050, 3.0)
    p.observe(0.020, 2.5)  # nor from a clock read a moment earlier (answers end out of order)
    assert (p.value, p.stamp) == (0.050, 2.5)
    p.observe(0.080, 2.5)  # a peak is taken whole
    assert p.value == 0.080
    p.observe(0.010, 12.5)
    w = math.exp(-1)
    assert p.value == 0.080 * w * w + 0.010 * (1 - w)  # the same sums as before, to the last bit


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


# -- the call path's decision on a roster (Ranker._quick) -----------------------------------------------------


def random_service(rng: random.Random):
    """1-8 endpoints in up to three tiers, zones and priorities, some with vitals, under a random policy."""
    from edged.locality import where_meta

    places = {"munich": (48.1374, 11.5755), "vienna": (48.2082, 16.3738), "berlin": (52.52, 13.405)}
    eps = []
    for i in range(rng.randint(1, 8)):
        zone = rng.choice((*places, ""))
        meta = where_meta(zone, places.get(zone)) if rng.random() < 0.8 else ()
        if rng.random() < 0.3:
            meta += (("cpu", str(rng.randint(0, 100))), ("power", "battery"), ("bat", str(rng.randint(0, 100))))
        tier = rng.choice(("local", "edge", "cloud"))
        eps.append(endpoint(f"e{i}", 9000 + i, tier=tier, priority=rng.choice((1, 1, 2)), meta=meta))
    policy = PolicySpec(
        strategy=rng.choice(("least_loaded", "latency", "predictive", "geo")),
        levels=rng.choice(("tier", "priority", "none")),
        overprovisioning=rng.choice((1.4, 1.0)),
        geo_order=rng.choice(("rtt", "distance")),
        zone_weights=rng.choice(((), (("vienna", 1), ("berlin", 2)))),
        cloud_max_share=rng.choice((100, 100, 30)),
    )
    return service(*eps, policy=policy)


NOW = 20.0  # (a peak-EWMA stamped before 0 counts as never measured)


def random_health(rng: random.Random, svc) -> FakeHealth:
    health = FakeHealth()
    for ep in svc.endpoints:
        st = health.state(ep.id)
        if rng.random() < 0.8:
            st.peak.observe(rng.choice((0.004, rng.uniform(0.001, 0.05))), rng.uniform(0.0, NOW))
            st.latency_ewma = rng.choice((0.004, rng.uniform(0.001, 0.05)))
        st.inflight = rng.choice((0, 0, 0, 1, 4))
        st.sent_sum = st.inflight * rng.uniform(NOW - 0.5, NOW)
        if rng.random() < 0.7:  # predictive's model: from a few answers (the hour profile counts) to many
            st.model = Model()
            for _ in range(rng.choice((1, 3, 10, 60))):
                st.model.observe(rng.uniform(0.0, NOW), rng.random() < 0.9, rng.uniform(0.001, 0.05), 1)
        st.up = rng.random() < 0.9
        if st.inflight and rng.random() < 0.2:
            health.stalled_ids.add(ep.id)
    return health


def test_the_call_paths_plan_is_the_general_loops_draw_for_draw(monkeypatch):
    """Plans made on a roster (every endpoint usable) are those of `plan`'s general loop with the same random
    draws, for least_loaded, predictive and geo, over random services, health and subsets of endpoints."""
    from edged.locality import Origin

    rng = random.Random(11)
    quick = 0
    for _ in range(400):
        svc = random_service(rng)
        health = random_health(rng, svc)
        origin = Origin("munich", (48.1374, 11.5755))
        seed = rng.randrange(1 << 30)
        fast, slow = Ranker(random.Random(seed), origin), Ranker(random.Random(seed), origin)
        monkeypatch.setattr(slow, "_quick", lambda *args: None)  # the general loop only
        subset = list(svc.endpoints)[rng.randrange(len(svc.endpoints)) :]
        for k in range(6):
            eps = (None, subset, list(svc.endpoints))[k % 3]
            a = fast.plan(svc, health, NOW, eps, explain=False)
            b = slow.plan(svc, health, NOW, eps, explain=False)
            assert [(c.endpoint.id, c.usable) for c in a.choices] == [(c.endpoint.id, c.usable) for c in b.choices]
            assert (a.strategy, a.panic, a.drawn) == (b.strategy, b.panic, b.drawn)
            quick += all(health.state(ep.id).up and ep.id not in health.stalled_ids for ep in eps or svc.endpoints)
    assert quick > 300  # (the roster's decision was put to the test)


def test_a_new_snapshot_of_the_service_gets_a_new_roster():
    """Vitals travel in the endpoints' meta: a node that cools down is chosen again once its new meta is in."""
    health = FakeHealth()
    measured(health, "a", 0.004)
    measured(health, "b", 0.002)
    policy = PolicySpec(strategy="least_loaded")
    ranker = Ranker(random.Random(1))
    hot = service(endpoint("a", 1), with_meta(endpoint("b", 2), cpu="100", power="battery", bat="5"), policy=policy)
    assert ids(ranker.plan(hot, health, 0.0, explain=False)) == ["a", "b"]  # 2 ms x 2 x 4.8 x 2 > 4 ms
    cool = service(endpoint("a", 1), with_meta(endpoint("b", 2), cpu="0"), policy=policy)
    assert ids(ranker.plan(cool, health, 0.0, explain=False)) == ["b", "a"]


def test_a_callers_list_of_endpoints_is_ranked_as_given():
    """Plans for some of the service's endpoints (tiers off) and for endpoints that are not its own."""
    eps = [endpoint("a", 1), endpoint("b", 2), endpoint("c", 3)]
    svc = service(*eps, policy=PolicySpec(strategy="least_loaded"))
    health = FakeHealth()
    for name, rtt in (("a", 0.001), ("b", 0.002), ("c", 0.003)):
        measured(health, name, rtt)
    ranker = Ranker(random.Random(2))
    assert sorted(ids(ranker.plan(svc, health, 0.0, [eps[1], eps[2]], explain=False))) == ["b", "c"]
    stranger = endpoint("x", 4)
    measured(health, "x", 0.0005)
    for _ in range(20):
        plan = ranker.plan(svc, health, 0.0, [eps[0], stranger], explain=False)
        assert ids(plan) == ["x", "a"]
    assert ids(ranker.plan(svc, health, 0.0, [eps[2]], explain=False)) == ["c"]


def test_the_call_path_asks_the_monitor_for_a_stall_only_when_one_may_be_and_decides_as_it_says(monkeypatch):
    """`is_stalled`: an endpoint that had calls begin or an answer less than a stall threshold ago is not
    stalled, whatever the event loop's lag; the others are asked (and the loop's lag since then is not
    counted against them). Plans on the roster are the general loop's, draw for draw."""
    lag, asked = [0.0], []
    # (`stalled` reads the lag once per endpoint it is asked about: a compiled monitor cannot be patched)
    monitor = HealthMonitor(clock=lambda: 0.0, lag=lambda: asked.append(1) or lag[0])
    eps = [endpoint(name, 9000 + i) for i, name in enumerate("abc")]
    for ep in eps:
        monitor.state(ep.id).latency_ewma = 0.01  # stall threshold: 8 x 10 ms = 80 ms
        monitor.call_started(ep.id)  # at 0.0, lag 0.0
    for strategy in ("least_loaded", "predictive", "geo"):
        svc = service(*eps, policy=PolicySpec(strategy=strategy))
        fast, slow = Ranker(random.Random(3)), Ranker(random.Random(3))
        monkeypatch.setattr(slow, "_quick", lambda *args: None)  # the general loop only
        for now, lag[0] in ((0.05, 0.0), (0.079, 0.0), (0.1, 0.05), (0.1, 0.0), (0.3, 0.0)):
            del asked[:]
            a = fast.plan(svc, monitor, now, explain=False)
            assert (not asked) == (now < 0.08)  # calls began less than a threshold ago: none is asked about
            b = slow.plan(svc, monitor, now, explain=False)
            assert [(c.endpoint.id, c.usable) for c in a.choices] == [(c.endpoint.id, c.usable) for c in b.choices]
            assert all(c.usable for c in a.choices) == (now - lag[0] < 0.08), (now, lag[0])


def test_ranked_of_three_is_the_keyed_sort_draw_for_draw():
    """`balancer.ranked` orders three endpoints by compares: the same order as the keyed sort, the same draws."""

    def by_sort(group, values, rng):  # (`ranked` for more than two, as it was)
        n = len(group)
        i = int(rng.random() * n)
        j = int(rng.random() * (n - 1))
        if j >= i:
            j += 1
        a, b = group[i], group[j]
        first = a if values[a] < values[b] or (values[a] == values[b] and i < j) else b
        out = sorted(group, key=values.__getitem__)
        if out[0] != first:
            out.remove(first)
            out.insert(0, first)
        return out

    values = [0.0, 0.0, 0.0, 0.0, 0.0]
    for group in ((0, 1, 2), (1, 3, 4), range(3)):
        for costs in itertools.product((1.0, 2.0, 3.0), repeat=3):
            for k, cost in zip(group, costs, strict=True):
                values[k] = cost
            for seed in range(12):
                mine, theirs = random.Random(seed), random.Random(seed)
                assert balancer.ranked(group, values, mine) == by_sort(group, values, theirs), (group, costs, seed)
                assert mine.getstate() == theirs.getstate()
