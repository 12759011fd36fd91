"""Retry budget (Finagle/Linkerd style): retries may add at most `ratio` extra load, plus a small floor.

Counts live in time buckets over a sliding window of `ttl` seconds, so each call is O(1) and memory is fixed.
A call (`deposit`, once per routed call) costs a clock read and one count: the window is moved only when the
clock passed the end of the current bucket, and the current bucket's calls join the buckets then.
"""

from __future__ import annotations

import time
from collections.abc import Callable

_BUCKETS = 10


class RetryBudget:
    """Allows a retry while retries in the last `ttl` s < ratio * calls in the last `ttl` s + min_per_second * ttl.

    The window moves in steps of ttl/10, so "the last ttl seconds" means the last 9/10 ttl to ttl.
    """

    __slots__ = (
        "_calls",
        "_clock",
        "_cur",
        "_deposits",
        "_deposits_sum",
        "_end",
        "_reserve",
        "_width",
        "_withdrawals",
        "_withdrawals_sum",
        "ratio",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_second < 0 or ttl <= 0:
            raise ValueError("retry budget needs ratio >= 0, min_per_second >= 0 and ttl > 0")
        self.ratio = ratio
        self._reserve = min_per_second * ttl
        self._width = ttl / _BUCKETS
        self._clock = clock
        self._deposits = [0] * _BUCKETS
        self._withdrawals = [0] * _BUCKETS
        self._deposits_sum = 0  # calls in the window's buckets, not counting `_calls` (the current bucket's)
        self._withdrawals_sum = 0
        self._calls = 0  # calls in the current bucket (`_cur`): its slot of `_deposits` is filled when it ends
        self._cur = int(clock() // self._width)  # absolute bucket number of "now"
        self._end = (self._cur + 1) * self._width  # clock time the current bucket ends

    def __repr__(self) -> str:
        self._advance()
        calls = self._deposits_sum + self._calls
        return f"<RetryBudget calls={calls} retries={self._withdrawals_sum} ratio={self.ratio}>"

    def deposit(self) -> None:
        """Count one original call."""
        if self._clock() >= self._end:  # (the clock is read once: `_advance` reads it again only then)
            self._advance()
        self._calls += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when the budget is spent."""
        self._advance()
        if self._withdrawals_sum >= self.ratio * (self._deposits_sum + self._calls) + self._reserve:
            return False
        self._withdrawals[self._cur % _BUCKETS] += 1
        self._withdrawals_sum += 1
        return True

    def _advance(self) -> None:
        """Move the window to now: the current bucket's calls join its slot, and the buckets that fell out of
        the window are emptied (at most all ten)."""
        now = int(self._clock() // self._width)
        cur = self._cur
        steps = now - cur
        if steps <= 0:
            return
        self._deposits[cur % _BUCKETS] = self._calls  # (emptied when the bucket left the window before)
        self._deposits_sum += self._calls
        self._calls = 0
        for i in range(cur + 1, cur + 1 + min(steps, _BUCKETS)):
            slot = i % _BUCKETS
            self._deposits_sum -= self._deposits[slot]
            self._withdrawals_sum -= self._withdrawals[slot]
            self._deposits[slot] = 0
            self._withdrawals[slot] = 0
        self._cur = now
        self._end = (now + 1) * self._width
