"""Giving back the memory start-up freed: glibc keeps freed pages in its heap, and start-up frees a lot.

Reading the config and manifests, loading modules and the first rounds of mDNS and MQTT allocate and free
a few MiB of short-lived buffers; glibc's malloc keeps those pages in the process (only the top of the heap
is returned by itself). `malloc_trim(0)` returns every free page: about 0.6 MiB of the idle full daemon's
RSS here (scripts/footprint.py). Other C libraries (musl) have no malloc_trim: then this does nothing.
"""

from __future__ import annotations

import sys

TRIM_AFTER = 2.0  # seconds after start-up: the tiers' first rounds (mDNS probes, MQTT connect) are done by then


def trim() -> bool:
    """Return the free pages of the C heap to the system. False when it did not: ctypes is not loaded, or the C
    library has no malloc_trim."""
    ctypes = sys.modules.get("ctypes")
    if ctypes is None:
        # Importing ctypes for this alone costs more than it gives back: the local tier alone measured 0.2 MiB
        # more with it. zeroconf (mDNS on) loads it anyway, and there the trim gives back about 0.6 MiB.
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(0)
    return True
