"""The predictive strategy: the model, its choice and explanation, the cloud cap, state across restarts."""

from __future__ import annotations

import json
import random
from collections import Counter

from helpers import FakeHealth, endpoint, service

from edged import predictive
from edged.model import PolicySpec
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
    assert p_fail < 0.01 and n > 100
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
