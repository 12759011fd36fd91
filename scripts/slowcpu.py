"""A slow CPU for one process tree: a cgroup `cpu` controller caps it at 1/factor of one core.

`EDGED_SLOW_CPU=N` makes the test harness (and `scripts/bench.py --slow-cpu N`) start every daemon in such
a cgroup; N = 1 picks `DEFAULT_FACTOR`. The short CFS period (10 ms, longer past a factor of 10) spreads
the cap evenly, so that the daemon sees a slow core rather than a fast one that stops for long stretches.
Needs root and the v1 `cpu` hierarchy at /sys/fs/cgroup/cpu (or cgroup2 with the `cpu` controller).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

DEFAULT_FACTOR = 8.0  # about a Raspberry Pi 4 core against this one; arm64 emulation ran Python 7-14x slower
PERIOD_US = 10_000
_MIN_QUOTA_US = 1_000  # the kernel's floor
_V1_ROOT = Path("/sys/fs/cgroup/cpu")
_V2_ROOT = Path("/sys/fs/cgroup")
_serial = itertools.count()


def factor_from_env(env: dict[str, str] | os._Environ = os.environ) -> float | None:
    """The slow-down factor asked for by EDGED_SLOW_CPU (None: run at full speed)."""
    value = env.get("EDGED_SLOW_CPU", "").strip()
    if value in ("", "0"):
        return None
    factor = float(value)
    if factor < 1:
        raise ValueError(f"EDGED_SLOW_CPU={value!r}: expected a factor >= 1 (1 = the default, {DEFAULT_FACTOR:g})")
    return DEFAULT_FACTOR if factor == 1 else factor


class CpuThrottle:
    """One cgroup whose processes share 1/factor of one core; `close()` removes it once they are gone."""

    def __init__(self, factor: float, name: str = "edged-slowcpu") -> None:
        self.factor = factor
        period = max(PERIOD_US, int(_MIN_QUOTA_US * factor))  # the quota cannot go below 1 ms
        quota = int(period / factor)
        if (_V1_ROOT / "cpu.cfs_quota_us").exists():
            self.path = _V1_ROOT / f"{name}-{os.getpid()}-{next(_serial)}"
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        elif "cpu" in (_V2_ROOT / "cgroup.controllers").read_text().split():
            self.path = _V2_ROOT / f"{name}-{os.getpid()}-{next(_serial)}"
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {period}")
        else:
            raise OSError("no cgroup cpu controller: mount the v1 cpu hierarchy or enable cpu in cgroup2")

    def __repr__(self) -> str:
        return f"<CpuThrottle {self.path} 1/{self.factor:g} core>"

    def enter(self) -> None:
        """Move the calling process into the cgroup (for `preexec_fn`: the child joins before it execs)."""
        (self.path / "cgroup.procs").write_text("0")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled(self) -> tuple[int, float]:
        """(periods in which the cap stopped the group, seconds it was held back)."""
        fields = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        if "throttled_time" in fields:  # v1, nanoseconds
            return int(fields["nr_throttled"]), int(fields["throttled_time"]) / 1e9
        return int(fields["nr_throttled"]), int(fields["throttled_usec"]) / 1e6

    def close(self) -> None:
        """Remove the cgroup (its processes must have exited; a leftover one is moved back to the root)."""
        with contextlib.suppress(FileNotFoundError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.path.parent / "cgroup.procs").write_text(pid)
            self.path.rmdir()
