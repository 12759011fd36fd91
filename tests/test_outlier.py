"""Passive outlier detection: pure logic over a clock the test moves."""

from __future__ import annotations

from edged.health.outlier import Outlier, OutlierConfig


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


CFG = OutlierConfig(consecutive_failures=3, base_ejection=10.0, max_ejection=300.0)


def fail(o: Outlier, times: int, others: int = 1) -> list[bool]:
    return [o.failure(others) for _ in range(times)]


def test_ejected_after_n_consecutive_failures() -> None:
    clock = FakeClock()
    o = Outlier(CFG, clock)
    assert fail(o, 3) == [False, False, True]
    assert o.ejected() and o.ejected_until == clock.now + 10.0
    assert o.reason == "3 failed calls" and o.consecutive_failures == 0
    clock.now += 9.9
    assert o.ejected() and o.expire() is False
    clock.now += 0.1
    assert not o.ejected() and o.expire() is True and o.ejected_until == 0.0


def test_connect_failures_eject_after_a_shorter_streak() -> None:
    o = Outlier(CFG, FakeClock())  # consecutive_connect_failures = 2 by default
    assert [o.failure(1, connect=True) for _ in range(2)] == [False, True]
    assert o.ejected() and o.reason == "2 failed connects"
    # A failure that reached the endpoint (a reset, a 5xx) breaks the connect streak: the general rule applies.
    o = Outlier(CFG, FakeClock())
    assert [o.failure(1, connect=c) for c in (True, False, True)] == [False, False, True]
    assert o.reason == "3 failed calls"
    o = Outlier(CFG, FakeClock())
    o.failure(1, connect=True)
    o.success()
    assert o.failure(1, connect=True) is False and not o.ejected()
    # Never the last available endpoint, whatever the streak.
    o = Outlier(CFG, FakeClock())
    assert [o.failure(0, connect=True) for _ in range(4)] == [False] * 4


def test_success_resets_the_streak() -> None:
    o = Outlier(CFG, FakeClock())
    fail(o, 2)
    o.success()
    assert fail(o, 2) == [False, False] and not o.ejected()
    assert o.failure(1) is True


def test_failures_while_ejected_do_not_extend_it() -> None:
    clock = FakeClock()
    o = Outlier(CFG, clock)
    fail(o, 3)
    until = o.ejected_until
    assert fail(o, 5) == [False] * 5
    assert o.ejected_until == until and o.consecutive_failures == 0


def test_ejection_grows_with_repeats_and_is_capped() -> None:
    clock = FakeClock()
    o = Outlier(OutlierConfig(consecutive_failures=3, base_ejection=10.0, max_ejection=25.0), clock)
    durations = []
    for i in range(4):
        start = clock.now
        assert fail(o, 3 if i == 0 else 1)[-1] is True  # after an ejection, a failed probe ejects at once
        durations.append(o.ejected_until - start)
        clock.now = o.ejected_until
        assert o.expire()
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_a_good_probe_after_an_ejection_restores_the_full_accrual() -> None:
    clock = FakeClock()
    o = Outlier(CFG, clock)
    fail(o, 3)
    clock.now = o.ejected_until
    assert o.expire()
    o.success()  # the probe answered: back to a full streak before the next ejection
    assert fail(o, 3) == [False, False, True]
    assert o.reason == "3 failed calls"


def test_policy_accrual_and_backoff_replace_the_config() -> None:
    clock = FakeClock()
    o = Outlier(CFG, clock)
    assert [o.failure(1, accrual=5, backoff=2.0) for _ in range(5)] == [False] * 4 + [True]
    assert o.ejected_until == 1002.0
    clock.now = 1002.0
    assert o.expire()
    assert o.failure(1, accrual=5, backoff=2.0) is True  # the probe failed: out again, for 2 x 2 s
    assert o.ejected_until == 1006.0 and o.reason == "probe after an ejection failed"


def test_ejection_count_decays_per_quiet_max_ejection_period() -> None:
    clock = FakeClock()
    o = Outlier(CFG, clock)
    fail(o, 3)
    clock.now = o.ejected_until
    o.expire()
    fail(o, 3)  # second ejection: 20 s
    assert o.ejections == 2
    clock.now = o.ejected_until
    o.expire()
    clock.now += 299.0
    assert o.ejections == 2  # not a full quiet period yet
    clock.now += 1.0
    assert o.ejections == 1
    start = clock.now
    fail(o, 3)
    assert o.ejected_until - start == 20.0  # n = 1 + 1
    clock.now = o.ejected_until
    o.expire()
    clock.now += 600.0  # two quiet periods
    assert o.ejections == 0
    start = clock.now
    fail(o, 3)
    assert o.ejected_until - start == 10.0


def test_never_ejects_the_last_available_endpoint() -> None:
    o = Outlier(CFG, FakeClock())
    assert fail(o, 10, others=0) == [False] * 10
    assert not o.ejected() and o.consecutive_failures == 10
    assert o.failure(1) is True  # another endpoint is back: the kept streak ejects at once
    assert o.ejected()


def test_active_checks_uneject_early_after_rise_successes() -> None:
    clock = FakeClock()
    o = Outlier(CFG, clock)
    assert o.active_check(True, rise=2) is False  # not ejected: nothing to do
    fail(o, 3)
    assert o.active_check(True, rise=2) is False
    assert o.active_check(False, rise=2) is False  # a failed check breaks the run
    assert o.active_check(True, rise=2) is False
    assert o.ejected()
    assert o.active_check(True, rise=2) is True
    assert not o.ejected() and o.ejected_until == 0.0 and o.remaining() == 0.0
    # the count stays, and decays from the early return
    assert o.ejections == 1
    clock.now += 300.0
    assert o.ejections == 0


def test_repr_shows_live_state() -> None:
    o = Outlier(CFG, FakeClock())
    fail(o, 3)
    assert "ejections=1" in repr(o) and "ejected=True" in repr(o)
