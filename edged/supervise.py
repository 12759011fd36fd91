"""Background loops with an owner that keeps them alive, and the event loop's own health (lag, task count).

A loop that raises (a bug, a file that trips a library in a way nobody foresaw) must not silently stop the
work it does for the rest of the daemon's life: the supervisor logs the failure once, counts it
(`edged_task_restarts_total{task}`), shows it in `/readyz` and `edged status`, and starts the loop again
after a backoff. Cancelling the supervisor (`close`) cancels and awaits every loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .aio import cancel_and_wait
from .telemetry import MeshMetrics

log = logging.getLogger("edged.supervise")

RESTART_FIRST = 0.5  # seconds before the first restart; doubles up to RESTART_MAX while the loop keeps failing
RESTART_MAX = 30.0
HEALTHY_AFTER = 60.0  # a loop that ran this long before failing starts again from the first backoff
LAG_EVERY = 0.25  # seconds between loop-lag samples (a tick of its own: 4 wake-ups a second)


@dataclass(slots=True)
class TaskRecord:
    """What `edged status` shows of a supervised loop that failed at least once."""

    restarts: int = 0
    last_error: str = ""
    last_failed: float = 0.0  # unix time


class Supervisor:
    """Owns the daemon's background loops; a loop that fails is logged, counted and restarted."""

    def __init__(self, metrics: MeshMetrics | None = None) -> None:
        self._metrics = metrics
        self._tasks: list[asyncio.Task] = []
        self.records: dict[str, TaskRecord] = {}

    def __repr__(self) -> str:
        return f"<Supervisor tasks={len(self._tasks)} failed={sorted(self.records)}>"

    def spawn(self, make: Callable[[], Awaitable[object]], name: str) -> None:
        """Run `make()` until cancelled, starting it again whenever it raises. A loop that returns is done."""
        task = asyncio.get_running_loop().create_task(self._keep(make, name), name=name)
        self._tasks.append(task)

    def failed(self) -> dict[str, dict]:
        """Loops that failed since start: name -> restarts, last error, when (for `/readyz` and `edged status`)."""
        return {
            name: {"restarts": r.restarts, "last_error": r.last_error, "last_failed": round(r.last_failed, 1)}
            for name, r in self.records.items()
        }

    async def close(self) -> None:
        """Cancel every loop and wait until all have ended."""
        await cancel_and_wait(self._tasks)
        self._tasks.clear()

    async def _keep(self, make: Callable[[], Awaitable[object]], name: str) -> None:
        delay = RESTART_FIRST
        while True:
            began = time.monotonic()
            try:
                await make()
                return
            except Exception as exc:
                record = self.records.setdefault(name, TaskRecord())
                record.restarts += 1
                record.last_error = f"{type(exc).__name__}: {exc}"[:300]
                record.last_failed = time.time()
                if self._metrics is not None:
                    self._metrics.task_restarts.inc((name,))
                if time.monotonic() - began > HEALTHY_AFTER:
                    delay = RESTART_FIRST
                log.error("background task %r failed; restarting it in %.1fs", name, delay, exc_info=exc)
            await asyncio.sleep(delay)
            delay = min(RESTART_MAX, delay * 2)


async def watch_loop_lag(metrics: MeshMetrics, every: float = LAG_EVERY) -> None:
    """Sample how late the event loop runs a timer (`edged_loop_lag_seconds`): what every call waits on top
    of its own work. The soak script (`scripts/soak.py`) reads its percentiles."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every
        await asyncio.sleep(every)
        metrics.loop_lag.observe((), max(0.0, loop.time() - due))


def count_tasks(metrics: MeshMetrics) -> None:
    """A collector: the asyncio tasks alive now (`edged_tasks`; a leak shows as growth over a soak)."""
    metrics.tasks.set((), len(asyncio.all_tasks()))
