"""Fixtures for end-to-end tests: real backend processes and the real daemon as a subprocess."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from harness import Backend, Edged, free_port, wait_for  # noqa: E402

__all__ = ["REPO", "Backend", "Edged", "free_port", "wait_for"]


@pytest.fixture
def backends(tmp_path: Path) -> Iterator:
    started: list[Backend] = []

    def make(name: str, port: int | None = None) -> Backend:
        b = Backend(name, port or free_port(), tmp_path).start()
        started.append(b)
        return b

    yield make
    for b in started:
        if b.proc and b.proc.poll() is None:
            b.thaw()
            b.kill()


@pytest.fixture
def edged(tmp_path: Path) -> Iterator:
    started: list[Edged] = []

    def make(manifests: dict[str, str], extra_config: str = "", start: bool = True, root: Path | None = None) -> Edged:
        d = Edged(root or tmp_path / f"edged{len(started)}", manifests, extra_config)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.kill()  # also removes its CPU throttle (EDGED_SLOW_CPU)


def pytest_terminal_summary(terminalreporter) -> None:
    """The property-based tests say how many cases they generated and how long that took (tests/test_fuzz.py)."""
    fuzz = sys.modules.get("test_fuzz")
    line = fuzz.summary() if fuzz is not None else None
    if line:
        terminalreporter.write_line(line)
