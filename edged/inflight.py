"""Calls in flight: one counting mechanism for every limit on calls at once.

`Places` counts the calls holding a place under one key (a tenant, a tenant's service, a service's breaker)
and keeps the calls waiting for one (FIFO, each wait bounded by its caller). `Hold` is a call's places,
taken in one or more `Places` at once: it gives them back exactly once, by `release()` or on leaving its
`with` block, so a call cancelled anywhere (its client left, its task was cancelled before it ran) cannot
leave a place taken. Two kinds of limits are checked against these counts: quotas (edged/quota.py: over
the cap the call is refused at once, 429 `rate_limited`) and circuit breakers (edged/breaker.py: over
`max_inflight` the call waits for a place if few enough already wait, else 503 `overloaded`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence


class Places:
    """The calls holding a place under one key (`count`), and those waiting for one (FIFO)."""

    __slots__ = ("count", "waiters")

    def __init__(self) -> None:
        self.count = 0
        self.waiters: deque[asyncio.Future[None]] = deque()  # first come, first served (the router reads it: `free`)

    def __repr__(self) -> str:
        return f"<Places count={self.count} waiting={len(self.waiters)}>"

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def free(self, limit: int | None) -> bool:
        """Whether one more call may take a place now under `limit` (0 or None: no limit), nobody waiting first."""
        return not limit or (self.count < limit and not self.waiters)

    def take(self) -> None:
        self.count += 1

    async def wait(self, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) for a place handed over by `give`; False when the time ran out.
        Cancelled, it passes on a place handed over in the same instant."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            if fut.done():
                return True  # the place came just as the time ran out: keep it
            fut.cancel()
            self._remove(fut)
            return False
        except BaseException:  # cancelled: the caller left
            if fut.done() and not fut.cancelled():
                self.give()  # the place was handed over as the wait ended: pass it on
            else:
                fut.cancel()
                self._remove(fut)
            raise
        return True

    def give(self) -> None:
        """Give a place back: to the first waiting call, if any (the count stays), else to the count."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        if self.count > 0:
            self.count -= 1

    def _remove(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(fut)


class Hold:
    """A call's places (in one or more `Places`): given back once, however the call ends."""

    __slots__ = ("_places",)

    def __init__(self, places: Sequence[Places]) -> None:
        self._places = places

    @classmethod
    def take(cls, places: Sequence[Places]) -> Hold:
        """Take a place in each of `places` (the caller checked the limits) and hold them."""
        for p in places:
            p.count += 1
        return cls(places)

    @property
    def held(self) -> bool:
        return bool(self._places)

    def release(self) -> None:
        """Give every place back (idempotent)."""
        places = self._places
        if places:  # (`FREE`, most calls' quota ticket, holds none: nothing to write)
            self._places = ()
            for p in places:
                p.give()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


FREE = Hold(())  # the hold of a call that no limit counts: nothing to give back
