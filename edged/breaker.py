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

import asyncio
import contextlib
from collections import deque

from .errors import CallError
from .model import PolicySpec


class Gate:
    """One service's count of calls being routed, and the calls waiting for a place (FIFO)."""

    __slots__ = ("_waiters", "inflight")

    def __init__(self) -> None:
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return f"<Gate inflight={self.inflight} waiting={len(self._waiters)}>"

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_enter(self, limit: int) -> bool:
        """Take a place if one is free (no waiting; the call path's cheap case)."""
        if limit and (self.inflight >= limit or self._waiters):
            return False
        self.inflight += 1
        return True

    async def wait(self, policy: PolicySpec, timeout: float, service: str) -> None:
        """Wait for a place (after `try_enter` failed); 503 `overloaded` when the queue is full or time runs out."""
        if len(self._waiters) >= policy.max_pending or timeout <= 0:
            raise CallError(503, "overloaded", _detail(service, "max_inflight", policy.max_inflight, self))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            if fut.done():
                return  # the place came just as the time ran out: keep it
            fut.cancel()
            self._remove(fut)
            raise CallError(503, "overloaded", _detail(service, "max_pending", policy.max_pending, self)) from None
        except BaseException:  # cancelled: the caller left
            if fut.done() and not fut.cancelled():
                self.leave()  # the place was handed over as the wait ended: pass it on
            else:
                fut.cancel()
                self._remove(fut)
            raise

    def leave(self) -> None:
        """Give the place back: to the first waiting call, if any, else to the count."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the place passes to it: the count stays
                return
        if self.inflight > 0:
            self.inflight -= 1

    def _remove(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)


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
