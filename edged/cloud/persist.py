"""Writes the cloud tier's state documents (last known registry, last good fleet config) off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..state import StateError, StateStore

log = logging.getLogger("edged.cloud.persist")


class StateSaver:
    """Coalesces bursts of changes: `mark(name, build)` asks for a write, `run()` writes the newest state
    of each document a moment later, in a thread (fsync must not stall calls). `flush()` writes now."""

    def __init__(self, store: StateStore, delay: float = 0.1) -> None:
        self.store = store
        self._delay = delay
        self._pending: dict[str, Callable[[], object]] = {}
        self._wake = asyncio.Event()

    def mark(self, name: str, build: Callable[[], object]) -> None:
        """Document `name` changed; `build()` makes its JSON value when it is written."""
        self._pending[name] = build
        self._wake.set()

    async def flush(self) -> None:
        """Write every marked document now."""
        pending, self._pending = self._pending, {}
        for name, build in pending.items():
            try:
                await self.store.async_write_json(name, build())
            except StateError as exc:
                log.error("could not save %s: %s", name, exc)

    async def run(self) -> None:
        """The write loop (owned and cancelled by the cloud tier, which then calls `flush()`)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._delay)
            await self.flush()
