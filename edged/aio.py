"""Small asyncio helpers shared by every owner of background tasks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Future]) -> None:
    """Cancel every task and wait until all have ended: no task outlives its owner.

    Their exceptions were logged where they happened (or by the owner's done-callback) and are not raised again.
    """
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


# Older uvloops broke the edge tier: a node's mDNS never recovered from a network partition with uvloop
# 0.17-0.20 (tests/test_e2e_edge.py), so those run on asyncio's own loop (Debian 12 ships 0.17).
UVLOOP_MIN = (0, 21)


def run(main: Coroutine[Any, Any, object]) -> None:
    """Run `main` on uvloop when a recent enough one is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None and version_tuple(uvloop.__version__) >= UVLOOP_MIN:
        uvloop.run(main)
    else:
        asyncio.run(main)


def version_tuple(text: str) -> tuple[int, ...]:
    """"0.21.0" -> (0, 21, 0); "0.21.0rc1" -> (0, 21, 0): for checks of a library's version at import."""
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts)
