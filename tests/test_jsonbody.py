"""JSON request bodies: nesting is measured on the bytes (brackets inside strings do not count)."""

from __future__ import annotations

import json

import pytest

from edged.jsonbody import json_depth, loads


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('{"a": "[[[[{{{{"}', 1),
        ('["\\"[[[", [2]]', 2),
    ],
)
def test_depth_counts_only_structure(text: str, depth: int) -> None:
    assert json_depth(text.encode(), 10) == depth


def test_loads_refuses_past_the_limit_and_decodes_within_it() -> None:
    assert loads(b'{"a": [[1]]}', 3) == {"a": [[1]]}
    with pytest.raises(ValueError, match="nested deeper than 3 levels"):
        loads(b'{"a": [[[1]]]}', 3)
    with pytest.raises(ValueError, match="nested deeper than 32 levels"):
        loads(b"[" * 100_000 + b"]" * 100_000, 32)  # far past Python's stack: refused before decoding
    with pytest.raises(json.JSONDecodeError):
        loads(b"{nope", 32)
