"""Time limits that do not count the event loop's own lag: the cause of failed calls on slow CPUs.

A blocked loop stands for a slow box: the connection and the answer are there in the kernel, the daemon has
not looked yet. The try must not fail for that; an upstream that really is silent still times out, and the
caller's hard limit still holds.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from edged import looplag
from edged.errors import UpstreamTimeout
from edged.http import UpstreamPool
from edged.looplag import TICK, TimeLimit
from edged.model import parse_target

pytestmark = pytest.mark.timeout(30)


class ThreadBackend:
    """An HTTP/1.1 server in a thread of its own (it answers while the test's event loop is blocked).
    `answer=False`: it accepts and reads but never answers."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            if self.answer:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


async def request_through_a_stalled_loop(backend: ThreadBackend, timeout: float, limit: float | None, stall: float):
    """Start a try, then block the loop for `stall` s (as a slow CPU would), then let the try finish."""
    pool = UpstreamPool()
    target = parse_target(f"http://127.0.0.1:{backend.port}")
    task = asyncio.ensure_future(pool.request(target, "GET", "/x", [], b"", timeout, limit))
    await asyncio.sleep(0)  # the connect is under way
    time.sleep(stall)  # noqa: ASYNC251  (on purpose: the loop is busy; the kernel completes the connect)
    try:
        response = await task
        return response.status, await response.read()
    finally:
        await pool.close()


def test_a_stalled_loop_does_not_turn_a_prompt_upstream_into_a_timeout():
    backend = ThreadBackend()
    try:
        # 0.5 s of stall against a 0.1 s per-try timeout: a plain timer fires in the same loop turn that
        # sees the connection made, and the try fails as "connect timeout" although the upstream was fine.
        assert asyncio.run(request_through_a_stalled_loop(backend, 0.1, 5.0, 0.5)) == (200, b"ok")
    finally:
        backend.close()


def test_a_silent_upstream_still_times_out_and_says_how_much_was_lag():
    backend = ThreadBackend(answer=False)
    try:
        with pytest.raises(UpstreamTimeout) as err:
            asyncio.run(request_through_a_stalled_loop(backend, 0.1, 5.0, 0.3))
        assert "no answer head within 0.1s (+" in err.value.detail and "of loop lag)" in err.value.detail
    finally:
        backend.close()


class FakeLoop:
    """Just the clock and timers a LoopLag needs; the test moves time and runs what is due."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.now

    def get_debug(self) -> bool:
        return False

    def call_at(self, when, callback, *args):
        handle = asyncio.TimerHandle(when, callback, args, self)  # type: ignore[arg-type]
        self.timers.append(handle)
        return handle

    def _timer_handle_cancelled(self, handle) -> None:
        pass

    def run(self, t: float, *, blocked: bool = False) -> None:
        """Move the clock to `t`, running timers as they fall due (or, `blocked`, only once `t` is reached)."""
        while True:
            live = [h for h in self.timers if not h.cancelled() and h.when() <= t]
            if not live:
                break
            handle = min(live, key=lambda h: h.when())
            self.timers.remove(handle)
            self.now = t if blocked else max(self.now, handle.when())
            handle._run()
        self.now = t


def test_lag_is_measured_only_while_watched_and_moves_the_due_time_up_to_the_limit():
    loop = FakeLoop()
    limit = TimeLimit(loop, 0.3, limit=2.0)  # type: ignore[arg-type]
    lag = looplag.loop_lag(loop)  # type: ignore[arg-type]
    rang = []
    alarm = limit.call_when_expired(lambda: rang.append(loop.now))
    loop.run(0.1)  # on time: no lag
    assert lag.total() == pytest.approx(0.0) and not rang
    loop.run(1.0, blocked=True)  # blocked from 0.1 to 1.0: the tick due at 0.12 ran 0.88 s late
    assert lag.total() == pytest.approx(0.88 - 0.001)
    assert not rang and limit.due() == pytest.approx(0.3 + 0.879)  # the alarm set itself again
    assert "of loop lag" in limit.describe()
    loop.run(1.9, blocked=True)  # blocked again: due would be past 2.0, but that is the hard limit
    assert limit.due() == 2.0 and not rang
    loop.run(2.5)
    assert rang == [2.0]
    alarm.cancel()
    # No limit pending any more: the tick stops a second later, and an idle daemon is not woken up for it.
    loop.run(3.5)
    assert not [h for h in loop.timers if not h.cancelled()]
    total = lag.total()
    loop.run(10.0, blocked=True)
    assert lag.total() == total


def test_the_tick_stops_with_the_last_limit_done():
    loop = FakeLoop()
    lag = looplag.loop_lag(loop)  # type: ignore[arg-type]
    first, second = TimeLimit(loop, 0.5), TimeLimit(loop, 0.5)  # type: ignore[arg-type]
    first.due(), second.due()  # both armed: the tick runs
    live = lambda: [h for h in loop.timers if not h.cancelled()]  # noqa: E731
    assert len(live()) == 1
    first.done()
    first.done()  # idempotent: `second` still holds the tick
    assert len(live()) == 1
    loop.run(0.1, blocked=True)  # the tick due at 0.02 ran 0.08 s late, and again for 0.12
    second.done()
    assert lag.total() == pytest.approx(0.08 - 0.001)
    assert "of loop lag" in second.describe()
    assert not live()  # cancelled with the last limit done: no wake-up for a tick that has nothing to measure
    loop.run(0.2, blocked=True)  # lag with nothing pending is not measured
    assert lag.total() == pytest.approx(0.08 - 0.001)
    second.due()  # read after done: the tick does not start again
    assert not live()


def test_limits_in_quick_succession_share_one_tick_that_stops_a_tick_after_the_last():
    """Calls at 200/s and more: each exchange's limit is done less than BUSY_GAP after the previous one, so the
    tick keeps running (one timer a TICK, not one armed and cancelled per call); once the calls stop, it runs
    out a TICK later and an idle daemon is not woken for it. Lag meanwhile is still counted."""
    loop = FakeLoop()
    looplag.loop_lag(loop)  # type: ignore[arg-type]
    live = lambda: [h for h in loop.timers if not h.cancelled()]  # noqa: E731
    made = 0
    for i in range(40):  # a call every 2 ms, each over in 1 ms
        loop.run(i * 0.002)
        before = len(loop.timers)
        limit = TimeLimit(loop, 0.5)  # type: ignore[arg-type]
        limit.due()
        made += len(loop.timers) - before
        loop.run(i * 0.002 + 0.001)
        limit.done()
    # The first limit armed the tick and, done with none before it, cancelled it; the second armed it again
    # and kept it running (done 2 ms after the first): the next 38 found it running.
    assert made == 2
    assert len(live()) == 1  # still running after the last call: it may be needed in a moment
    loop.run(0.15)
    assert not live()  # a TICK with nothing pending: it stopped by itself (at most two ticks after the last)
    limit = TimeLimit(loop, 0.5)  # type: ignore[arg-type]
    limit.due()
    loop.run(0.25, blocked=True)  # blocked: the tick due at 0.17 ran 0.08 s late
    assert limit.lost() == pytest.approx(0.08 - 0.001)
    limit.done()  # the previous limit was done long ago: the tick is cancelled at once, as at a low rate
    assert not live()


def test_a_cancelled_tick_counts_how_late_it_already_was():
    loop = FakeLoop()
    lag = looplag.loop_lag(loop)  # type: ignore[arg-type]
    limit = TimeLimit(loop, 0.5)  # type: ignore[arg-type]
    limit.due()  # the tick is due at 0.02
    loop.now = 0.05  # the loop ran 0.03 s late and the answer came first
    limit.done()
    assert lag.total() == pytest.approx(0.03 - 0.001)
    assert not [h for h in loop.timers if not h.cancelled()]


def test_wait_for_times_out_returns_and_passes_cancellation_on():
    async def main():
        assert await looplag.wait_for(asyncio.sleep(0, "v"), 1.0) == "v"
        with pytest.raises(asyncio.TimeoutError):
            await looplag.wait_for(asyncio.sleep(10), TICK)
        inner = asyncio.ensure_future(asyncio.sleep(10))
        outer = asyncio.ensure_future(looplag.wait_for(inner, 10.0))
        await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert inner.cancelled()

    asyncio.run(main())


def test_an_answer_waiting_unread_holds_the_alarm_until_read_or_the_hard_limit():
    loop = FakeLoop()
    limit = TimeLimit(loop, 0.3, limit=1.0)  # type: ignore[arg-type]
    inbox = [b"HTTP/1.1 200 OK\r\n"]  # bytes in the socket the loop has not read yet
    rang = []
    limit.call_when_expired(lambda: rang.append(loop.now), waiting=lambda: bool(inbox))
    loop.run(0.5)
    assert not rang  # due at 0.3, but the answer is there: not a timeout
    inbox.clear()  # the loop read it (and, here, the answer did not complete the head)
    loop.run(0.6)
    assert rang and rang[0] == pytest.approx(0.3 + 0.2 + looplag.GRACE, abs=looplag.GRACE)
    # Bytes that keep waiting do not stretch the try past its hard limit.
    limit = TimeLimit(loop, 0.3, limit=loop.now + 0.5)  # type: ignore[arg-type]
    rang.clear()
    limit.call_when_expired(lambda: rang.append(loop.now), waiting=lambda: True)
    loop.run(loop.now + 2.0)
    assert len(rang) == 1 and rang[0] == pytest.approx(limit.limit, abs=2 * looplag.GRACE)
