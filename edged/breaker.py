"""Circuit breakers: how many calls a service and each of its endpoints take at once, and a bounded wait.

Envoy's limits in the words of the policy (`[policy]` keys, 0 = no limit):
- `max_inflight`: calls of the service being routed at once. One more waits for a place if fewer than
  `max_pending` calls already wait (at most until its deadline), else it fails at once with 503 `overloaded`.
  Nothing waits without bound: the wait queue has its length, each wait its deadline.
- `endpoint_max_inflight`: tries in flight to one endpoint. A try that would pass it goes to the next
  endpoint of the plan instead (it is not a failure, spends no retry); when every endpoint is full the call
  fails with 503 `overloaded`.
Consecutive-failure accrual with backoff (`failure_accrual`, `failure_backoff`) is passive outlier detection
(edged/health/outlier.py): the breaker that opens on failures rather than on load.
"""

from __future__ import annotations

from .errors import CallError
from .inflight import Hold, Places
from .model import PolicySpec


class Gate:
    """One service's breaker: its calls being routed counted in a `Places` (edged/inflight.py, the count the
    quotas use too), and a bounded wait for a place."""

    __slots__ = ("places",)

    def __init__(self) -> None:
        self.places = Places()

    def __repr__(self) -> str:
        return f"<Gate inflight={self.places.count} waiting={self.places.waiting}>"

    @property
    def inflight(self) -> int:
        return self.places.count

    @property
    def waiting(self) -> int:
        return self.places.waiting

    def try_enter(self, limit: int) -> Hold | None:
        """Take a place if one is free (no waiting; the call path's cheap case): the hold, or None."""
        places = self.places
        if limit and (places.count >= limit or places.waiting):
            return None
        places.count += 1
        return Hold((places,))

    async def enter(self, policy: PolicySpec, timeout: float, service: str) -> Hold:
        """A place, waited for if needed; 503 `overloaded` when the queue is full or time runs out."""
        hold = self.try_enter(policy.max_inflight)
        if hold is not None:
            return hold
        places = self.places
        if places.waiting >= policy.max_pending or timeout <= 0:
            raise CallError(503, "overloaded", _detail(service, "max_inflight", policy.max_inflight, self))
        if not await places.wait(timeout):
            raise CallError(503, "overloaded", _detail(service, "max_pending", policy.max_pending, self))
        return Hold((places,))  # the place was handed over: the count already has it

    def leave(self) -> None:
        """Give a place back without its hold (a place taken by `try_enter` whose hold was dropped)."""
        self.places.give()


def _detail(service: str, limit: str, value: int, gate: Gate) -> dict:
    return {"service": service, "limit": limit, "value": value, "inflight": gate.inflight, "waiting": gate.waiting}


class Breakers:
    """The gates of every service called, by (tenant, name): about 200 bytes each, and only services of the
    registry get one (an unknown name is refused before), so the table is as bounded as the registry."""

    def __init__(self) -> None:
        self._gates: dict[tuple[str, str], Gate] = {}

    def gate(self, key: tuple[str, str]) -> Gate:
        g = self._gates.get(key)
        if g is None:
            g = self._gates[key] = Gate()
        return g


def endpoint_full(inflight: int, policy: PolicySpec) -> bool:
    """Whether one more try to an endpoint with `inflight` tries would pass `endpoint_max_inflight`."""
    limit = policy.endpoint_max_inflight
    return bool(limit) and inflight >= limit
