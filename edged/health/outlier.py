"""Passive outlier detection: calls that fail in a row eject an endpoint for a while (Envoy's consecutive_5xx).

Connect failures (nothing listens, the request never left) eject after a shorter streak of their own: it
is the clearest sign of a dead endpoint, and every call planned onto it meanwhile pays a failed try first.

Pure logic over an injected clock; the request path reports results through HealthMonitor.call_finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """When calls eject an endpoint, and for how long (seconds)."""

    consecutive_failures: int = 3
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    consecutive_connect_failures: int = 2  # a streak made only of connect failures ejects at this length


class Outlier:
    """Ejection state of one endpoint.

    The n-th recent ejection lasts base_ejection * n, capped at max_ejection; n drops by one for each full
    max_ejection period spent without an ejection. An ejection ends when its time is over (`expire`) or,
    earlier, after `rise` consecutive successful active checks (`active_check`).
    """

    __slots__ = (
        "_active_streak",
        "_clock",
        "_config",
        "_connect_streak",
        "_decay_from",
        "_ejections",
        "consecutive_failures",
        "ejected_until",
        "probation",
        "reason",
    )

    def __init__(self, config: OutlierConfig = OutlierConfig(), clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self.consecutive_failures = 0
        self._connect_streak = 0  # the trailing connect failures of that streak
        self.ejected_until = 0.0  # clock time; 0.0 = not ejected
        self.reason = ""  # why the current or last ejection happened: "3 failed calls"
        self._ejections = 0
        self._decay_from = 0.0  # when the current ejection-free stretch began
        self._active_streak = 0  # ok active checks since the ejection began
        self.probation = False  # an ejection ran out: the first call back is a probe (Linkerd's half-open)

    def __repr__(self) -> str:
        return (
            f"<Outlier failures={self.consecutive_failures} ejections={self.ejections} "
            f"ejected={self.ejected()} until={self.ejected_until:.1f}>"
        )

    @property
    def ejections(self) -> int:
        """How many times the endpoint was ejected recently (after decay)."""
        self._decay(self._clock())
        return self._ejections

    def ejected(self) -> bool:
        return self._clock() < self.ejected_until

    def remaining(self) -> float:
        """Seconds of the current ejection still to serve (0.0 when not ejected)."""
        return max(0.0, self.ejected_until - self._clock())

    def success(self) -> None:
        """A call succeeded: the failure streak starts over."""
        # (HealthMonitor's call path asks the same first, inline: most calls have nothing to start over; a connect
        # streak is part of the failure streak)
        if self.consecutive_failures or self.probation:
            self.consecutive_failures = 0
            self._connect_streak = 0
            self.probation = False

    def failure(
        self,
        others_available: int,
        *,
        connect: bool = False,
        accrual: int | None = None,
        backoff: float | None = None,
        priced: bool = False,
    ) -> bool:
        """A call failed (`connect`: it could not even connect); True when this failure ejected the endpoint.

        `others_available` is how many other endpoints of the service are available now: with none left,
        the endpoint is never ejected (a degraded endpoint beats no endpoint); the streak is kept, so the
        next failure ejects once another endpoint is back. `accrual` and `backoff` (the service's policy keys
        `failure_accrual`, `failure_backoff`) replace the config's streak length and first ejection. A failed
        probe (the first call after an ejection ran out) ejects again at once, for longer.

        `priced`: the service's strategy prices this endpoint's failures itself (predictive, and the endpoint
        still answers most of its tries): a streak of failed calls does not eject it, since the strategy
        already sends it fewer calls and taking it out would push its share onto the others. A streak of
        connect failures and a failed probe still eject (a dead endpoint goes at once).
        """
        now = self._clock()
        if now < self.ejected_until:
            return False  # calls that were in flight when it was ejected
        self.consecutive_failures += 1
        self._connect_streak = self._connect_streak + 1 if connect else 0
        cfg = self._config
        by_connects = self._connect_streak >= cfg.consecutive_connect_failures
        streak = cfg.consecutive_failures if accrual is None else accrual
        if (
            (priced or self.consecutive_failures < streak) and not by_connects and not self.probation
        ) or others_available <= 0:
            return False
        self._decay(now)
        self._ejections += 1
        base = cfg.base_ejection if backoff is None else backoff
        self.ejected_until = now + min(base * self._ejections, max(cfg.max_ejection, base))
        self.probation = False
        self._decay_from = self.ejected_until
        if by_connects:
            self.reason = f"{self._connect_streak} failed connects"
        elif self.consecutive_failures < streak:
            self.reason = "probe after an ejection failed"
        else:
            self.reason = f"{self.consecutive_failures} failed calls"
        self.consecutive_failures = 0
        self._connect_streak = 0
        self._active_streak = 0
        return True

    def active_check(self, ok: bool, rise: int) -> bool:
        """An active check finished; True when `rise` ok checks in a row ended the ejection early."""
        now = self._clock()
        if now >= self.ejected_until:
            self._active_streak = 0
            return False
        if not ok:
            self._active_streak = 0
            return False
        self._active_streak += 1
        if self._active_streak < rise:
            return False
        self._uneject(now)
        return True

    def expire(self) -> bool:
        """Clear an ejection whose time is over; True when one was cleared (the endpoint is back)."""
        if self.ejected_until == 0.0 or self._clock() < self.ejected_until:
            return False
        self.ejected_until = 0.0
        self._active_streak = 0
        self.probation = True
        return True

    def _uneject(self, now: float) -> None:
        self.ejected_until = 0.0
        self._decay_from = now
        self._active_streak = 0

    def _decay(self, now: float) -> None:
        if not self._ejections or now < self.ejected_until:
            return
        periods = int((now - self._decay_from) // self._config.max_ejection)
        if periods > 0:
            self._ejections = max(0, self._ejections - periods)
            self._decay_from += periods * self._config.max_ejection
