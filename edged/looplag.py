"""Event-loop lag, and time limits that do not count it: a slow box must not blame a healthy endpoint.

On a slow or busy CPU the event loop runs behind: a connection the kernel completed in 0.1 ms, or an answer
already in the socket buffer, is seen only after the work queued ahead of it has run, hundreds of ms later
on a Raspberry-Pi-class core under load. A per-try timeout that fires then blames the endpoint for the
daemon's own delay: the try fails over (more work, more lag), healthy endpoints collect failures, and
a short overload turns into a burst of failed calls. A `TimeLimit` therefore counts only the loop's own
time: it expires once `timeout` seconds have passed *plus* whatever lag the loop showed meanwhile, and
never later than its hard `limit` (the caller's deadline).

`LoopLag` measures the lag with a tick every `TICK` seconds that runs only while some limit is pending: each
tick adds how late it ran. A limit's owner calls `TimeLimit.done()` once the limit no longer matters (the
answer head is in), and the tick is cancelled when the last pending limit is done (how late it is by then
counted first): an exchange that ends within a tick (a local call, a health check) costs no wake-up for it,
and an idle daemon is not woken up for it at all. At 200 calls/s and more (limits done less than BUSY_GAP
apart) the tick is left running instead, one wake-up per TICK rather than a timer armed and cancelled per call,
and stops by itself a TICK after the last limit. A limit that is never marked done keeps the tick going
until a second past its due time, no longer.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

TICK = 0.02  # seconds between lag samples while a limit is armed
_SLACK = 0.001  # timer lateness that is only the loop's clock granularity, not lag
GRACE = 0.005  # seconds: how soon an expired limit looks again while `waiting()` says the answer is in
_KEEP = 1.0  # seconds the lag stays measured past the due time of the latest limit
# Limits that end less than this apart (calls at 200/s and more) keep the tick running instead of cancelling it
# with each: see TimeLimit.done.
BUSY_GAP = TICK / 4

T = TypeVar("T")
_lags: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLag] = weakref.WeakKeyDictionary()
_last: LoopLag | None = None  # the meter `loop_lag` returned last (it holds its loop until another loop asks)


class LoopLag:
    """How far behind one event loop ran, summed over the times it was measured."""

    __slots__ = ("__weakref__", "_due", "_handle", "_idle_at", "_loop", "_pending", "_total", "_until")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._total = 0.0
        self._due = 0.0  # loop time the pending tick is due
        self._handle: asyncio.TimerHandle | None = None
        self._until = 0.0  # the tick runs until then (loop time)
        self._pending = 0  # limits made and not yet done (a `TimeLimit` counts itself in)
        self._idle_at = float("-inf")  # loop time the last pending limit was done

    def __repr__(self) -> str:
        return f"<LoopLag total={self.total():.3f}s until={self._until:.1f} pending={self._pending}>"

    def total(self) -> float:
        """Seconds of lag so far, counting a tick that is overdue right now."""
        if self._handle is None:  # not measuring now (nothing pending): the sum so far
            return self._total
        overdue = self._loop.time() - self._due - _SLACK
        return self._total + overdue if overdue > 0.0 else self._total

    def _tick(self) -> None:
        now = self._loop.time()
        overdue = now - self._due - _SLACK  # not max(0.0, ...): the builtin costs about 1k instructions (Python 3.11)
        if overdue > 0.0:
            self._total += overdue
        if (not self._pending and now - self._idle_at >= TICK) or now > self._until:
            self._handle = None
            return
        self._due = now + TICK
        self._handle = self._loop.call_at(self._due, self._tick)


def loop_lag(loop: asyncio.AbstractEventLoop | None = None) -> LoopLag:
    """The lag meter of `loop` (default: the running loop), made on first use."""
    global _last
    loop = loop or asyncio.get_running_loop()
    last = _last
    if last is not None and last._loop is loop:  # the one loop of a daemon: no weak-dict lookup per limit
        return last
    lag = _lags.get(loop)
    if lag is None:
        lag = _lags[loop] = LoopLag(loop)
    _last = lag
    return lag


class TimeLimit:
    """`timeout` seconds of the loop's own time from now: time lost to loop lag is added back, up to `limit`.

    `limit` is a hard loop-time bound (e.g. the caller's deadline); None = no bound beyond the lag's.
    """

    __slots__ = ("_done", "_lag", "_lag0", "_loop", "limit", "start", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, limit: float | None = None) -> None:
        self._loop = loop
        last = _last  # loop_lag(loop), inline: once per try
        lag = self._lag = last if last is not None and last._loop is loop else loop_lag(loop)
        lag._pending += 1  # LoopLag.acquire, inline: once per try
        self._done = False
        self.start = now = loop.time()
        total = lag._total  # lag.total(), inline: once per try
        if lag._handle is not None:
            overdue = now - lag._due - _SLACK
            if overdue > 0.0:
                total += overdue
        self._lag0 = total
        self.timeout = timeout
        self.limit = limit

    def done(self) -> None:
        """The limit no longer matters (what it bounded is over): the lag need not be measured for it any more.
        Idempotent; `describe()` still works afterwards.

        With no limit left pending, the tick is cancelled, its lateness so far counted. A tick left to run out
        woke the loop once per call at low rates (an exchange is shorter than a tick); the cancel costs a
        non-blocking turn instead (uvloop closes the timer's handle; strace: 4 epoll_pwait per exchange instead
        of 6). But when the previous last limit was done less than BUSY_GAP ago (calls at 200/s and more), the
        tick keeps running: the next limit comes before it is due, and arming a timer and cancelling it per call
        (about 7k instructions and a turn of the loop) cost more than its one wake-up per TICK. Left running, it
        stops by itself once a TICK has passed with nothing pending (`LoopLag._tick`)."""
        if self._done:
            return
        self._done = True
        lag = self._lag  # the lag's own bookkeeping, inline here (its one caller): once per try
        if lag._pending > 0:
            lag._pending -= 1
            if not lag._pending:
                now = lag._loop.time()
                handle = lag._handle
                if handle is not None and now - lag._idle_at >= BUSY_GAP:
                    overdue = now - lag._due - _SLACK  # the tick's lateness so far (lag.total(), inline)
                    if overdue > 0.0:
                        lag._total += overdue
                    handle.cancel()
                    lag._handle = None
                lag._idle_at = now

    def lost(self) -> float:
        """Seconds of loop lag since the limit began."""
        return self._lag.total() - self._lag0

    def due(self) -> float:
        """When the limit expires (loop time), as far as the lag seen so far goes (keeps the lag measured
        until a little past then)."""
        lag = self._lag
        total = lag._total  # lag.total(), inline: this runs once or twice per try
        if lag._handle is not None:
            overdue = self._loop.time() - lag._due - _SLACK
            if overdue > 0.0:
                total += overdue
        due = self.start + self.timeout + total - self._lag0
        if self.limit is not None and due > self.limit:
            due = self.limit
        until = due + _KEEP
        if until > lag._until:
            lag._until = until
        if lag._handle is None and lag._pending:  # start the tick (measure the lag until `_until` at most)
            lag._due = self._loop.time() + TICK
            lag._handle = self._loop.call_at(lag._due, lag._tick)
        return due

    def held(self, now: float) -> bool:
        """Whether an expiry at `now` may still wait for an answer that arrived unread (before the hard limit)."""
        return self.limit is None or now < self.limit

    def describe(self) -> str:
        """For error details: "0.3s" or "0.3s (+1.2s of loop lag)"."""
        lost = self.lost()
        return f"{self.timeout:g}s" if lost < 0.0005 else f"{self.timeout:g}s (+{lost:.3f}s of loop lag)"

    def call_when_expired(self, callback: Callable[[], object], waiting: Callable[[], bool] | None = None) -> Alarm:
        """Run `callback` once the limit has expired; cancel the returned alarm when the work is done.

        `waiting()`, asked when the limit expires, says the awaited data has arrived but the loop has not read it
        yet (e.g. bytes in the socket): then the alarm looks again in GRACE seconds, up to the hard `limit`.
        """
        return Alarm(self, callback, waiting)


class Alarm:
    """A timer for one `TimeLimit`: when it rings early because of lag, it sets itself again for the new due time."""

    __slots__ = ("_callback", "_handle", "_limit", "_loop", "_waiting")

    def __init__(self, limit: TimeLimit, callback: Callable[[], object], waiting: Callable[[], bool] | None) -> None:
        self._limit = limit
        self._loop = limit._loop
        self._callback = callback
        self._waiting = waiting
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(limit.due(), self._ring)

    def _ring(self) -> None:
        due = self._limit.due()
        now = self._loop.time()
        if now < due - _SLACK:
            self._handle = self._loop.call_at(due, self._ring)  # lag moved the due time: not yet
            return
        if self._waiting is not None and self._limit.held(now) and self._waiting():
            self._handle = self._loop.call_at(now + GRACE, self._ring)  # the answer is in; we are behind
            return
        self._handle = None
        self._callback()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def wait_for(aw: Awaitable[T], timeout: float, limit: float | None = None) -> T:
    """`asyncio.wait_for` that counts only the loop's own time (see `TimeLimit`); `limit` is in seconds from now.

    Raises `asyncio.TimeoutError` when the limit expires (the awaitable is cancelled and awaited first).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(aw)
    expired = False

    def ring() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    time_limit = TimeLimit(loop, timeout, None if limit is None else loop.time() + limit)
    alarm = time_limit.call_when_expired(ring)
    try:
        return await task
    except asyncio.CancelledError:
        me = asyncio.current_task()
        cancelling = getattr(me, "cancelling", lambda: 0)()  # Python 3.11+: was *this* task cancelled too?
        if expired and not cancelling:
            raise asyncio.TimeoutError from None
        raise
    finally:
        alarm.cancel()
        time_limit.done()
