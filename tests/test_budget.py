"""Retry budget: pure logic over a clock the test moves."""

from __future__ import annotations

import pytest

from edged.budget import RetryBudget


class FakeClock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def withdraw_all(budget: RetryBudget, limit: int = 100_000) -> int:
    taken = 0
    while taken < limit and budget.try_withdraw():
        taken += 1
    return taken


def test_reserve_allows_min_per_second_times_ttl_with_no_calls() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, ttl=10.0, clock=FakeClock())
    assert withdraw_all(budget) == 100


def test_ratio_of_calls_under_load() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, ttl=10.0, clock=FakeClock())
    for _ in range(100):
        budget.deposit()
    assert withdraw_all(budget) == 20
    budget.deposit()
    budget.deposit()
    budget.deposit()
    budget.deposit()
    budget.deposit()
    assert withdraw_all(budget) == 1  # 105 calls -> 21 retries


def test_ratio_plus_reserve() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, ttl=10.0, clock=FakeClock())
    for _ in range(1000):
        budget.deposit()
    assert withdraw_all(budget) == 210


def test_recovers_after_ttl() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, ttl=10.0, clock=clock)
    assert withdraw_all(budget) == 10
    clock.now += 5.0
    assert withdraw_all(budget) == 0  # the spent retries are still in the window
    clock.now += 5.0
    assert withdraw_all(budget) == 10


def test_window_slides_calls_out_too() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10.0, clock=clock)
    for _ in range(10):
        budget.deposit()  # at t
    clock.now += 5.0
    for _ in range(10):
        budget.deposit()  # at t + 5
    clock.now += 5.5  # the first ten calls left the window
    assert withdraw_all(budget) == 5
    clock.now += 1_000_000.0  # a long idle jump empties everything in O(buckets)
    assert withdraw_all(budget) == 0
    assert "calls=0" in repr(budget)


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ttl=0)


def test_calls_leave_the_window_bucket_by_bucket() -> None:
    # The current bucket's calls count at once, and leave the window with their bucket, ttl later.
    clock = FakeClock(5000.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, ttl=10.0, clock=clock)
    for step in range(3):  # 10 calls at 5000.x, 20 at 5001.x, 30 at 5002.x
        for _ in range(10 * (step + 1)):
            budget.deposit()
        clock.now += 1.0
    assert "calls=60" in repr(budget)
    clock.now = 5010.5  # the bucket of 5000.x left the window
    assert "calls=50" in repr(budget)
    clock.now = 5011.0
    assert withdraw_all(budget) == 30
    clock.now = 5012.0  # every call left the window; the 30 retries taken at 5011 have not
    assert withdraw_all(budget) == 0
    for _ in range(31):
        budget.deposit()
    assert withdraw_all(budget) == 1
