"""JSON request bodies with a nesting limit: depth is checked on the bytes before decoding, so a body nested
deeper than Python's stack is a 400, never a RecursionError (and never a 500 with a traceback)."""

from __future__ import annotations

import json
import re

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = frozenset(b"[{")


def json_depth(data: bytes, limit: int) -> int:
    """How deep `data` nests arrays and objects, counting up to `limit + 1` (then it stops looking)."""
    depth = deepest = 0
    for byte in _STRING.sub(b"", data).translate(None, _NOT_BRACKETS):
        if byte in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def loads(data: bytes, max_depth: int) -> object:
    """`json.loads` for a request body; ValueError (with a reason) if it is not JSON or nests too deeply."""
    if json_depth(data, max_depth) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except RecursionError:  # cannot happen below the limit; kept so that no input becomes a 500
        raise ValueError("nested too deeply") from None
