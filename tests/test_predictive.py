"""The predictive strategy: the model, its choice and explanation, the cloud cap, state across restarts."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

from helpers import FakeHealth, endpoint, service

from edged import balancer, predictive
from edged.health import HealthMonitor
from edged.model import PolicySpec, Service
from edged.policy import Ranker
from edged.predictive import Model
from edged.state import StateStore


def test_the_model_learns_latency_per_call_in_flight_and_forgets_with_age():
    m = Model()
    rng = random.Random(1)
    for i in range(400):
        load = i % 6
        m.observe(i * 0.01, True, 0.010 + 0.005 * load + rng.gauss(0, 0.0005), load)
    lat0, sigma, p_fail, n = m.predict(4.0, 0, 0.03)
    lat4, *_ = m.predict(4.0, 4, 0.03)
    assert abs(lat0 - 0.010) < 0.002 and abs(lat4 - 0.030) < 0.003 and sigma < 0.002
    assert p_fail < 0.01 and predictive.MAX_WEIGHT - 2 < n <= predictive.MAX_WEIGHT  # the last ~48 answers weigh
    *_, n_later = m.predict(4.0 + predictive.HALF_LIFE, 0, 0.03)
    assert abs(n_later - n / 2) < 1.0  # evidence halves every half-life


def test_failures_raise_the_failure_chance_within_seconds_and_it_fades():
    m = Model()
    for i in range(50):
        m.observe(i * 0.02, True, 0.01, 0)
    for i in range(10):
        m.observe(1.0 + i * 0.02, False, None, 0)
    assert m.predict(1.2, 0, 0.03)[2] > 0.15
    for i in range(40):
        m.observe(2.0 + i * 0.5, True, 0.01, 0)
    assert m.predict(22.0, 0, 0.03)[2] < 0.05


def learned(health: FakeHealth, name: str, latency: float, fails: int = 0, tier: str = "local") -> None:
    st = health.state(f"default/s/{tier}/{name}")
    st.model = Model()
    for i in range(60):
        st.model.observe(i * 0.05, i >= fails, latency, 0)


def test_predictive_prefers_the_cheaper_expected_cost_and_explains_it():
    eps = [endpoint("slow", 1), endpoint("fast", 2), endpoint("flaky", 3)]
    health = FakeHealth()
    learned(health, "slow", 0.050)
    learned(health, "fast", 0.010)
    learned(health, "flaky", 0.005, fails=30)  # fast when it answers, but half its tries fail
    svc = service(*eps, policy=PolicySpec(strategy="predictive", per_try_timeout=0.3))
    ranker = Ranker(random.Random(2))
    firsts = Counter(ranker.plan(svc, health, 3.0, explain=False).choices[0].endpoint.id for _ in range(300))
    assert firsts.most_common(1)[0][0].endswith("/fast") and firsts["default/s/local/fast"] > 280
    plan = ranker.plan(svc, health, 3.0)
    assert plan.strategy == "predictive" and not plan.note
    reason = next(c.reason for c in plan.choices if c.endpoint.id.endswith("/flaky"))
    assert reason.startswith("predictive: latency 5.0 ms") and float(reason.split("failure ")[1].split("%")[0]) > 20


def test_cloud_max_share_keeps_the_cloud_to_its_share_of_first_choices():
    eps = [endpoint("edge", 1, tier="edge"), endpoint("cloud", 2, tier="cloud")]
    health = FakeHealth()
    learned(health, "edge", 0.050, tier="edge")
    learned(health, "cloud", 0.010, tier="cloud")  # the cloud is faster: uncapped, it would take every call
    policy = PolicySpec(strategy="predictive", levels="none", cloud_max_share=20)
    ranker = Ranker(random.Random(3))
    tiers = Counter(
        ranker.plan(service(*eps, policy=policy), health, 3.0 + i * 0.01, explain=False).choices[0].endpoint.tier
        for i in range(1000)
    )
    assert 0.15 < tiers["cloud"] / 1000 <= 0.21, tiers
    never = PolicySpec(strategy="predictive", levels="none", cloud_max_share=0)
    plan = ranker.plan(service(*eps, policy=never), health, 13.0)
    assert [c.endpoint.tier for c in plan.choices] == ["edge", "cloud"]  # the cloud only backs up
    assert "cloud_max_share" in plan.choices[1].reason


def test_models_are_kept_with_their_age_and_bad_entries_are_dropped(tmp_path):
    store = StateStore(tmp_path)
    m = Model()
    for i in range(20):
        m.observe(100.0 + i, True, 0.02, 1)
    assert predictive.save(store, [("default/s/local/a", m)], now=120.0) == 1
    doc = json.loads((tmp_path / predictive.STATE_FILE).read_text())
    doc["models"]["bad"] = ["x"] * 9
    doc["models"]["negative"] = [-5.0] * 9
    (tmp_path / predictive.STATE_FILE).write_text(json.dumps(doc))
    back = predictive.load(store, now=5000.0)
    assert list(back) == ["default/s/local/a"]
    restored = back["default/s/local/a"]
    assert abs(restored.predict(5000.0, 1, 0.03)[0] - m.predict(120.0, 1, 0.03)[0]) < 1e-9
    assert abs(restored.stamp - (5000.0 - 1.0)) < 1.0  # last sample 1 s before the save (and ~0 s of downtime)


def test_a_box_that_slows_down_is_seen_within_a_few_dozen_answers_however_busy_it_was():
    m = Model()
    for i in range(4000):  # 20 s of a busy, steady box: 10 ms
        m.observe(i * 0.005, True, 0.010, 0)
    for i in range(40):  # then 0.2 s of 50 ms answers
        m.observe(20.0 + i * 0.005, True, 0.050, 0)
    # Discounted by age alone (a 20 s half-life), the 4,000 old answers held the prediction near 10 ms.
    assert m.predict(20.2, 0, 0.03)[0] > 0.030


def test_failures_of_a_loss_burst_show_within_tries_and_fade_within_seconds_of_its_end():
    m = Model()
    for i in range(500):
        m.observe(i * 0.01, True, 0.01, 0)
    for i in range(10):  # a burst: 4 of 10 tries lost
        m.observe(5.0 + i * 0.01, i % 5 >= 2, 0.01 if i % 5 >= 2 else None, 0)
    assert m.predict(5.1, 0, 0.03)[2] > 0.1
    assert m.predict(8.0, 0, 0.03)[2] < m.predict(5.1, 0, 0.03)[2]
    for i in range(30):  # the burst is over: a few dozen answers bring it back
        m.observe(6.0 + i * 0.01, True, 0.01, 0)
    assert m.predict(6.3, 0, 0.03)[2] < 0.05


def test_tries_overdue_in_flight_make_an_endpoint_costlier_at_once():
    eps = [endpoint("lossy", 1), endpoint("steady", 2)]
    health = FakeHealth()
    learned(health, "lossy", 0.010)
    learned(health, "steady", 0.020)
    svc = service(*eps, policy=PolicySpec(strategy="predictive", per_try_timeout=0.3))
    ranker = Ranker(random.Random(4))

    def lossy_first(now: float) -> int:
        firsts = (ranker.plan(svc, health, now, explain=False).choices[0].endpoint.id for _ in range(200))
        return sum(eid.endswith("/lossy") for eid in firsts)

    assert lossy_first(3.0) > 150  # the faster one, while its tries come back
    lossy = health.state("default/s/local/lossy")
    lossy.inflight, lossy.sent_sum = 4, 4 * 2.92  # four tries out for 80 ms, where 10 ms is usual: replies lost
    assert lossy_first(3.0) < 20


def test_the_hour_of_the_day_is_what_an_endpoint_left_alone_is_predicted_by(monkeypatch):
    clock = {"s": 3 * 3600.0}
    monkeypatch.setattr(predictive, "day_clock", lambda: clock["s"])
    m = Model()
    for i in range(100):  # 3 am: slow (a nightly backup runs on the box)
        m.observe(i * 0.01, True, 0.080, 0)
    clock["s"] = 15 * 3600.0
    for i in range(100):  # 3 pm: fast
        m.observe(10.0 + i * 0.01, True, 0.010, 0)
    later = 10.0 + 10 * predictive.HALF_LIFE  # long unused: recent evidence has faded
    assert abs(m.predict(later, 0, 0.5)[0] - 0.010) < 0.002
    clock["s"] = 3 * 3600.0 + 600
    assert abs(m.predict(later, 0, 0.5)[0] - 0.080) < 0.005
    clock["s"] = 9 * 3600.0  # an hour never seen: the line of the last answers, however faded
    assert m.predict(later, 0, 0.5)[0] == m.a


def test_a_version_1_state_file_still_loads_and_hours_survive_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(predictive, "day_clock", lambda: 7 * 3600.0)
    store = StateStore(tmp_path)
    m = Model()
    for i in range(20):
        m.observe(100.0 + i, True, 0.02, 1)
    predictive.save(store, [("default/s/local/a", m)], now=120.0)
    back = predictive.load(store, now=5000.0)["default/s/local/a"]
    assert list(back.hours) == list(m.hours) and back.hours[7] > 0
    doc = json.loads((tmp_path / predictive.STATE_FILE).read_text())
    doc = {"version": 1, "saved_at": doc["saved_at"], "models": {k: v[:9] for k, v in doc["models"].items()}}
    (tmp_path / predictive.STATE_FILE).write_text(json.dumps(doc))
    old = predictive.load(store, now=5000.0)["default/s/local/a"]
    assert abs(old.predict(5000.0, 1, 0.03)[0] - back.predict(5000.0, 1, 0.03)[0]) < 1e-9
    assert not any(old.hours)


def test_a_lossy_but_live_endpoint_is_priced_not_ejected_and_a_dead_one_still_goes():
    now = [100.0]
    ea, eb = endpoint("lossy", 1), endpoint("steady", 2)

    def run(strategy: str, failures: list[bool]) -> tuple[HealthMonitor, Service]:
        monitor = HealthMonitor(clock=lambda: now[0])
        svc = service(ea, eb, policy=PolicySpec(strategy=strategy))
        for _ in range(40):  # answering well
            now[0] += 0.01
            monitor.call_started(ea.id)
            monitor.call_finished(ea, svc, True, 0.01, load=0)
        for ok in failures:
            now[0] += 0.01
            monitor.call_started(ea.id)
            monitor.call_finished(ea, svc, ok, 0.01 if ok else None, load=0)
        return monitor, svc

    burst = [False, True, True, False, False, False]  # a loss burst: three timeouts in a row
    ll, _ = run("least_loaded", burst)
    assert not ll.state(ea.id).available(now[0])  # failure accrual ejects it
    monitor, svc = run("predictive", burst)
    lossy = monitor.state(ea.id)
    assert lossy.available(now[0]) and lossy.model is not None
    assert lossy.model.predict(now[0], 0, 0.03)[2] > 0.1  # priced instead: its failure chance
    monitor.call_started(ea.id)  # the process is gone: two refused connects eject it at once
    monitor.call_finished(ea, svc, False, None, reached=False)
    monitor.call_started(ea.id)
    monitor.call_finished(ea, svc, False, None, reached=False)
    assert not lossy.available(now[0])
    # An endpoint that fails most of its tries (a partition: every try times out) is ejected as before.
    cut, _ = run("predictive", [False] * 30)
    assert not cut.state(ea.id).available(now[0])


def test_an_endpoint_down_by_its_checks_that_still_answers_calls_stays_a_priced_choice():
    eps = [endpoint("wifi", 1), endpoint("wired", 2)]
    health = FakeHealth()
    learned(health, "wifi", 0.005, fails=20)  # a third of its tries lost, the rest answered fast
    learned(health, "wired", 0.100)
    wifi = health.state("default/s/local/wifi")
    wifi.up, wifi.why = False, "unhealthy: timeout (2 checks)"  # two lost checks in a row
    wifi.active_ok, wifi.ejected_until, wifi.last_response_at = False, 0.0, 2.9
    ranker = Ranker(random.Random(5))

    def firsts(strategy: str, now: float) -> Counter:
        svc = service(*eps, policy=PolicySpec(strategy=strategy, per_try_timeout=0.3))
        return Counter(ranker.plan(svc, health, now, explain=False).choices[0].endpoint.id for _ in range(200))

    assert firsts("predictive", 3.0)["default/s/local/wifi"] > 100  # answered 0.1 s ago: lossy, not dead
    assert firsts("least_loaded", 3.0)["default/s/local/wifi"] == 0
    svc = service(*eps, policy=PolicySpec(strategy="predictive", per_try_timeout=0.3))
    said = {c.endpoint.id: c.reason for c in ranker.plan(svc, health, 3.0).choices}
    assert "checks fail but it still answers calls" in said["default/s/local/wifi"], said
    assert firsts("predictive", 2.9 + predictive.LIVE_WINDOW)["default/s/local/wifi"] == 0  # no answer since: down
    wifi.active_ok, wifi.last_response_at = True, 3.4
    wifi.ejected_until = 10.0  # ejected (its connects were refused): down, however recent its last answer
    assert firsts("predictive", 3.5)["default/s/local/wifi"] == 0


def test_measured_endpoints_price_their_losses_not_the_link_vital_and_weigh_the_battery_less():
    warm, cold = predictive.vitals_factors((("power", "mains"), ("link", "50")))
    assert warm == 1.0 and cold == 2.0  # a lossy link's failures are in the model's failure chance
    warm, cold = predictive.vitals_factors((("power", "battery"), ("bat", "5")))
    assert cold == balancer.power_link_factor({"power": "battery", "bat": "5"})
    assert warm == cold**predictive.POWER_WEIGHT  # weighed less: see vitals_factors


def test_costs_are_the_predictions_floats_bit_for_bit():
    """`predictive.costs` inlines `Model.predict`'s common case: the same floats as the loop that asks it, the
    same draws, over models with little evidence (the hour profile counts), much, none, and tries in flight."""

    def by_predict(states, factors, backup, now, default_rtt, timeout, rng):  # (the cost loop, as it was)
        out = []
        normal = predictive._NORMAL or predictive._normal_table()
        for k, st in enumerate(states):
            if st.model is None:
                lat, sigma, p_fail, n, tries = default_rtt * (st.inflight + 1), default_rtt, 0.05, 0.0, 0.0
            else:
                lat, sigma, p_fail, n = st.model.predict(now, st.inflight, default_rtt)
                tries = st.model.tries
            u = normal[int(rng.random() * 256)]
            cost = lat + u * predictive.EXPLORE * sigma / math.sqrt(n + 1.0)
            p_fail += u * predictive.FAIL_EXPLORE * math.sqrt(p_fail * (1.0 - p_fail) / (tries + 1.0))
            cost = max(cost, 1e-6) + predictive.TAIL * sigma + max(p_fail, 0.0) * timeout
            if st.inflight and now - st.sent_sum / st.inflight > lat:
                cost += predictive.OVERDUE * (now - st.sent_sum / st.inflight - lat)
            if factors[k] is not None:
                cost *= factors[k][0] if n >= 1.0 else factors[k][1]
            if backup is not None and backup[k]:
                cost += 1e6
            out.append(cost)
        return out

    rng = random.Random(4)
    health = FakeHealth()
    hours = 0
    for case in range(300):
        states = []
        for i in range(rng.randint(1, 6)):
            st = health.state(f"{case}/{i}")
            st.model = None if rng.random() < 0.2 else Model()
            for _ in range(rng.choice((0, 1, 2, 5, 60)) if st.model else 0):
                st.model.observe(rng.uniform(0.0, 50.0), rng.random() < 0.8, rng.uniform(0.001, 0.1), rng.randint(0, 3))
            st.inflight = rng.choice((0, 0, 1, 3))
            st.sent_sum = st.inflight * rng.uniform(0.0, 60.0)
            states.append(st)
            hours += st.model is not None and st.model.predict(60.0, 0, 0.03)[3] < predictive.HOUR_WEIGHT
        factors = [rng.choice((None, (1.5, 2.0), (0.9, 3.0))) for _ in states]
        backup = rng.choice((None, [rng.random() < 0.5 for _ in states]))
        now, seed = rng.choice((40.0, 60.0, 300.0)), rng.randrange(1 << 30)
        mine, theirs = random.Random(seed), random.Random(seed)
        got = predictive.costs(states, factors, backup, now, 0.03, 0.5, mine)
        assert got == by_predict(states, factors, backup, now, 0.03, 0.5, theirs)
        assert mine.getstate() == theirs.getstate()
    assert hours > 100  # (the cases `predict` itself answers were put to the test too)
