"""Change events for watchers (`GET /v1/events`): a bounded fan-out that never blocks the publisher."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

QUEUE_SIZE = 256


class EventBus:
    """Publishes small dict events to every subscriber; a slow subscriber loses its oldest events, not ours."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict]] = set()
        self.dropped = 0

    def publish(self, event_type: str, /, **fields: object) -> None:
        """Send `{"type": event_type, "ts": unix seconds, **fields}` to every subscriber."""
        if not self._queues:
            return
        event = {"type": event_type, "ts": round(time.time(), 3), **fields}
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict]]:
        """A queue of events for the duration of the `async with` block."""
        queue: asyncio.Queue[dict] = asyncio.Queue(QUEUE_SIZE)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    def close(self) -> None:
        """End every subscription (shutdown): subscribers receive None."""
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)  # type: ignore[arg-type]

    @property
    def subscribers(self) -> int:
        return len(self._queues)
