"""Giving freed memory back to the operating system after a burst.

A reconnect delivers thousands of retained registry messages at once; decoding them allocates far more than
what is kept (each message's bytes, CBOR maps, parsed specs), and glibc's malloc keeps the pages it freed in
its arenas, part-used, for later. The daemon's RSS then stays some hundreds of bytes per kept entry above
what the Python heap holds. `trim()` asks glibc to return the free pages of every arena (`malloc_trim(0)`:
0.2-0.5 ms after a burst of 10,000 entries); a C library without it (musl, other platforms) keeps its own
policy and `trim()` does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_AFTER = 1000  # entries applied in one burst (or kept at the first save) before a trim is worth it


class Trimmer:
    """Calls the C library's `symbol` (glibc's `malloc_trim`), looked up at the first call; does nothing,
    with one debug message, where the process has no such function."""

    def __init__(self, symbol: str = "malloc_trim") -> None:
        self.symbol = symbol
        self.calls = 0  # trims asked for (whether or not the C library can)
        self._func: Callable[[int], int] | None = None
        self._looked_up = False

    def __repr__(self) -> str:
        return f"Trimmer({self.symbol!r}, calls={self.calls}, available={self.available})"

    @property
    def available(self) -> bool:
        """Whether the C library has the function."""
        self._look_up()
        return self._func is not None

    def _look_up(self) -> None:
        if self._looked_up:
            return
        self._looked_up = True
        import ctypes  # (here: an idle daemon that never trims does not pay for ctypes and libffi)

        try:
            func = getattr(ctypes.CDLL(None), self.symbol)  # the running process's symbols: its C library's
        except (OSError, AttributeError):
            log.debug("no %s in this C library: freed memory stays with the allocator", self.symbol)
            return
        func.argtypes = [ctypes.c_size_t]
        func.restype = ctypes.c_int
        self._func = func

    def __call__(self) -> bool:
        """Return the free memory of the allocator's arenas to the OS. True if some was returned; False when
        none was, or when the C library cannot."""
        self.calls += 1
        self._look_up()
        if self._func is None:
            return False
        return bool(self._func(0))


trim = Trimmer()  # the process's one trimmer: `memory.trim()`
