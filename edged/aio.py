"""Small asyncio helpers shared by every owner of background tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Future]) -> None:
    """Cancel every task and wait until all have ended: no task outlives its owner.

    Their exceptions were logged where they happened (or by the owner's done-callback) and are not raised again.
    """
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
