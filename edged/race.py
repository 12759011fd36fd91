"""Tries that stay in the race: a per-try timeout that brings in the next endpoint without giving up on this one.

A per-try timeout exists to move on to a better endpoint. On a slow box the only endpoint still up may take
longer than that to answer (a peer on a Raspberry-Pi-class core taking over a failed peer's load answers its
first calls in hundreds of ms, and looks stalled meanwhile); cutting its try short then turns a slow answer into
a failed call, with most of the deadline left. So once no usable endpoint is left to move on to (only stalled
or down ones), the router runs its tries in a `Race`: when the per-try timeout passes, the next choice is
tried too, and the first answer wins; a slow try is cancelled only when another one answered or the deadline
passed. The last try a call can make has the deadline too. The common case (a usable endpoint left behind
the one tried) stays a plain `await`, with no task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from .call import UpstreamAnswer
from .looplag import TimeLimit
from .model import Endpoint

Outcome = tuple[Endpoint, UpstreamAnswer | None, dict | None]  # (endpoint, answer, failure) as Router._attempt


class Race:
    """The tries of one call that run side by side; `abandon()` cancels those still running."""

    __slots__ = ("_loop", "_tries")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tries: dict[asyncio.Task, Endpoint] = {}

    def __bool__(self) -> bool:
        return bool(self._tries)

    def start(self, endpoint: Endpoint, attempt: Awaitable[tuple[UpstreamAnswer | None, dict | None]]) -> asyncio.Task:
        task = self._loop.create_task(attempt)  # type: ignore[arg-type]
        self._tries[task] = endpoint
        return task

    async def wait(self, current: asyncio.Task | None, per_try: float | None, deadline: float) -> list[Outcome]:
        """What the tries came to until `current` ended, one of them answered, or `per_try` seconds of the loop's
        own time passed (None: no per-try limit); `deadline` (seconds from now) bounds it all."""
        limit = None if per_try is None else TimeLimit(self._loop, per_try, self._loop.time() + max(0.0, deadline))
        outcomes: list[Outcome] = []
        while self._tries:
            done = await self._first_done(limit)
            for task in done:
                outcomes.append((self._tries.pop(task), *task.result()))
            if not done or any(failure is None for _, _, failure in outcomes):
                break  # the per-try timeout passed, or an answer is in
            if current is not None and current.done():
                break
        return outcomes

    async def _first_done(self, limit: TimeLimit | None) -> set[asyncio.Task]:
        if limit is None:
            done, _ = await asyncio.wait(self._tries, return_when=asyncio.FIRST_COMPLETED)
            return done
        rang = self._loop.create_future()
        alarm = limit.call_when_expired(lambda: rang.done() or rang.set_result(None))
        try:
            done, _ = await asyncio.wait({*self._tries, rang}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            alarm.cancel()
            rang.cancel()
        return {task for task in done if task is not rang}  # type: ignore[misc]

    def abandon(self) -> None:
        """Cancel the tries still running, without waiting for them: each gives its in-flight place back as its
        cancellation reaches it (the next turn of the loop), and an answer one got meanwhile is released.
        A plain function, so that the router calls it from a `finally` (no `await` there: mypyc, see router)."""
        tries, self._tries = list(self._tries), {}
        for task in tries:
            task.cancel()
            task.add_done_callback(_release)


def _release(task: asyncio.Task) -> None:
    """An abandoned try ended: discard the answer it got before its cancellation reached it, if it did."""
    if task.cancelled() or task.exception() is not None:  # asking for the exception marks it retrieved
        return
    answer = task.result()[0]
    if answer is not None:
        answer.discard()
