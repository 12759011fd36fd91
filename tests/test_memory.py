"""`edged.memory`: freed memory handed back to the OS after a burst, and a C library that cannot."""

from __future__ import annotations

import logging
import os

import pytest

from edged import memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_c_library_without_malloc_trim_makes_trim_a_logged_no_op(caplog: pytest.LogCaptureFixture) -> None:
    """musl has no malloc_trim: the trimmer says so once (debug) and returns False, never raising."""
    trimmer = memory.Trimmer("edged_no_such_malloc_trim")
    with caplog.at_level(logging.DEBUG, logger="edged.memory"):
        assert trimmer() is False
        assert trimmer() is False
    assert not trimmer.available and trimmer.calls == 2
    said = [r for r in caplog.records if "edged_no_such_malloc_trim" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG


@pytest.mark.skipif(not memory.Trimmer().available, reason="the C library has no malloc_trim (not glibc)")
def test_trim_gives_freed_arena_pages_back_to_the_os() -> None:
    """Blocks freed between kept ones (a burst's messages around the entries it keeps) stay in the RSS until
    the trim returns their pages."""
    blocks = [bytearray(4000) for _ in range(20000)]  # ~80 MB of malloc'd blocks (over pymalloc's 512 B)
    kept = blocks[::16]
    del blocks
    before = rss_bytes()
    assert memory.Trimmer()() is True
    assert before - rss_bytes() > 20 * 2**20
    assert len(kept) == 1250
