"""Supervised background loops: one that fails is counted, shown and started again; close() ends them all."""

from __future__ import annotations

import asyncio

import pytest

from edged import supervise
from edged.supervise import Supervisor, count_tasks, watch_loop_lag
from edged.telemetry import MeshMetrics


def test_a_failing_loop_is_restarted_counted_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        monkeypatch.setattr(supervise, "RESTART_FIRST", 0.01)
        metrics = MeshMetrics()
        sup = Supervisor(metrics)
        runs = 0
        settled = asyncio.Event()

        async def flaky() -> None:
            nonlocal runs
            runs += 1
            if runs <= 2:
                raise RecursionError("maximum recursion depth exceeded")
            settled.set()
            await asyncio.sleep(3600)

        sup.spawn(flaky, "manifest watch")
        await asyncio.wait_for(settled.wait(), 5)
        assert runs == 3
        assert metrics.value("edged_task_restarts_total", {"task": "manifest watch"}) == 2
        failed = sup.failed()["manifest watch"]
        assert failed["restarts"] == 2 and failed["last_error"].startswith("RecursionError")
        await sup.close()
        assert "<Supervisor tasks=0" in repr(sup)

    asyncio.run(main())


def test_a_loop_that_returns_is_not_restarted_and_close_cancels_the_rest() -> None:
    async def main() -> None:
        sup = Supervisor()
        done = []

        async def once() -> None:
            done.append(1)

        cancelled = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                cancelled.set()

        sup.spawn(once, "once")
        sup.spawn(forever, "forever")
        await asyncio.sleep(0.05)
        assert done == [1] and sup.failed() == {}
        await sup.close()
        assert cancelled.is_set()

    asyncio.run(main())


def test_loop_lag_and_task_count_are_sampled() -> None:
    async def main() -> None:
        metrics = MeshMetrics()
        task = asyncio.get_running_loop().create_task(watch_loop_lag(metrics, every=0.01))
        for _ in range(1000):  # samples counted, not a time slept (a loaded box runs fewer ticks): 10 s at most
            if (metrics.value("edged_loop_lag_seconds_count") or 0) >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert (metrics.value("edged_loop_lag_seconds_count") or 0) >= 3
        count_tasks(metrics)
        assert (metrics.value("edged_tasks") or 0) >= 1

    asyncio.run(main())
