"""Writes the cloud tier's state documents (last known registry, last good fleet config) off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from ..state import StateError, StateStore

log = logging.getLogger("edged.cloud.persist")


class StateSaver:
    """Coalesces bursts of changes: `mark(name, build)` asks for a write, `run()` writes the newest state
    of each document a moment later (`delay`, or the document's own `within`), in a thread (fsync must not
    stall calls). `flush()` writes every marked document now."""

    def __init__(self, store: StateStore, delay: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._delay = delay
        self._clock = clock
        self._pending: dict[str, tuple[Callable[[], object], float]] = {}  # name -> (build, due)
        self._custom: dict[str, Callable[[], Awaitable[None]]] = {}  # name -> its own save (`mark_save`)
        self._wake = asyncio.Event()

    def mark(self, name: str, build: Callable[[], object], *, within: float | None = None) -> None:
        """Document `name` changed; `build()` makes its JSON value when it is written, at the latest
        `within` seconds from the first mark since the last write (default: the saver's delay). A large
        document that changes often (the fleet registry) asks for a longer `within`: one write per
        interval, however many messages changed it."""
        due = self._clock() + (self._delay if within is None else within)
        previous = self._pending.get(name)
        self._pending[name] = (build, due if previous is None else min(previous[1], due))
        self._wake.set()

    def mark_save(self, name: str, save: Callable[[], Awaitable[None]], *, within: float) -> None:
        """Like `mark`, for a document that writes itself (an append-only log): `save()` is awaited at the
        latest `within` seconds from now, one at a time with the other writes."""
        self._custom[name] = save
        self.mark(name, save, within=within)

    async def flush(self) -> None:
        """Write every marked document now."""
        pending, self._pending = self._pending, {}
        for name, (build, _) in pending.items():
            await self._write(name, build)

    async def _write(self, name: str, build: Callable[[], object]) -> None:
        save = self._custom.get(name)
        if save is not None:
            await save()
            return
        try:
            await self.store.async_write_json(name, build())
        except StateError as exc:
            log.error("could not save %s: %s", name, exc)

    async def run(self) -> None:
        """The write loop (owned and cancelled by the cloud tier, which then calls `flush()`)."""
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            due = min(d for _, d in self._pending.values())
            wait = due - self._clock()
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)  # an earlier due may arrive meanwhile
                continue
            now = self._clock()
            for name in [n for n, (_, d) in self._pending.items() if d <= now]:
                build, _ = self._pending.pop(name)
                await self._write(name, build)
