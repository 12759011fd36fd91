"""One state document written off the event loop, coalesced: a burst of changes costs one write, and each
change can wait until it is durably on disk (so an API can acknowledge only what a power cut keeps)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .aio import cancel_and_wait
from .state import StateError, StateStore

log = logging.getLogger("edged.state")


class DocumentWriter:
    """`changed()` marks the document dirty and returns a future that resolves once a write that began after
    the change has finished (StateError if it failed). Writes run one at a time in a thread; changes that
    arrive during a write are folded into the next one. `build()` runs on the event loop and returns the
    encoded document (callers keep the encoding of parts that did not change); the fsync runs in the thread."""

    def __init__(self, store: StateStore, name: str, build: Callable[[], bytes]) -> None:
        self._store = store
        self._name = name
        self._build = build
        self._dirty = 0  # number of the newest change
        self._written = 0  # newest change on disk
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.writes = 0  # documents written (for figures and tests)

    def __repr__(self) -> str:
        return f"<DocumentWriter {self._name} dirty={self._dirty} written={self._written} writes={self.writes}>"

    def changed(self) -> asyncio.Future[None]:
        """The document changed; await the result to know it is on disk."""
        self._dirty += 1
        return self._wait()

    def _wait(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((self._dirty, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name=f"edged-state:{self._name}")
        return fut

    async def flush(self) -> None:
        """Wait until every change so far is on disk (a failed write is logged by the writer)."""
        if self._dirty > self._written:
            with contextlib.suppress(StateError):
                await self._wait()

    async def close(self) -> None:
        """Flush, then stop the writer task."""
        await self.flush()
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def _run(self) -> None:
        while self._dirty > self._written:
            upto = self._dirty
            doc = self._build()
            error: StateError | None = None
            try:
                await asyncio.to_thread(self._store.write_bytes, self._name, doc)
                self.writes += 1
            except StateError as exc:
                log.error("could not persist %s: %s", self._name, exc)
                error = exc
            self._written = upto
            keep = []
            for n, fut in self._waiters:
                if n > upto:
                    keep.append((n, fut))
                elif not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)
            self._waiters = keep
