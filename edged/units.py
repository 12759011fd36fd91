"""Parsing of human units used in config and manifests: durations ("300ms", "2s") and sizes ("1MiB")."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|k|K|M|G)?\s*$")
_SIZE_SCALE = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "k": 1024,
    "K": 1024,
    "KiB": 1024,
    "M": 1024**2,
    "MiB": 1024**2,
    "G": 1024**3,
    "GiB": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from "300ms", "2s", "1.5m", "1h", "30d" or a bare number of seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '2s' or '300ms', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_SCALE[m.group(2)]
    raise ValueError(f"expected a duration like '2s' or '300ms', got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from "1MiB", "64KiB", "1MB" or a bare number of bytes; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '1MiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_SCALE[m.group(2)])
    raise ValueError(f"expected a size like '1MiB' or '64KiB', got {value!r}")
