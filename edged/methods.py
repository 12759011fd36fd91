"""Interface method patterns as segment matchers: linear in the path, no regex, no backtracking.

A pattern is `/`-separated segments: literal text, `{name}` (one non-empty segment, optionally with a literal
prefix and suffix: `v{n}.json`), and a trailing `*` (the rest of the path, empty or not; also at the end
of a segment: `/files/img*`). `*` anywhere else is refused: patterns also arrive from remote registry
entries, and a backtracking pattern is a way to stall the event loop. A trailing `/` on the path is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_PATTERN_LENGTH = 256  # characters of one pattern
MAX_METHODS = 256  # patterns of one interface
MAX_SEGMENTS = 32


@dataclass(frozen=True, slots=True)
class _Segment:
    prefix: str
    suffix: str
    param: bool  # a `{name}` between prefix and suffix; else the segment is `prefix` exactly

    def matches(self, seg: str) -> bool:
        if not self.param:
            return seg == self.prefix
        return (
            len(seg) > len(self.prefix) + len(self.suffix) and seg.startswith(self.prefix) and seg.endswith(self.suffix)
        )


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled pattern; `matches(path)` costs one pass over the path's segments."""

    segments: tuple[_Segment, ...]
    rest: str | None  # None: the path has exactly these segments; else a trailing `*` after this literal prefix
    exact: str | None  # the pattern itself when it has no parameter and no `*` (a string compare)

    @classmethod
    def parse(cls, pattern: str) -> PathPattern:
        """From "/zones/{id}/*"; ValueError for a pattern that is too long or has `*` before its end."""
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
        if not pattern.startswith("/"):
            raise ValueError(f"pattern must start with '/', got {pattern!r}")
        parts = pattern[1:].split("/")
        if len(parts) > MAX_SEGMENTS:
            raise ValueError(f"pattern has more than {MAX_SEGMENTS} segments")
        rest = None
        if parts[-1].endswith("*"):
            rest = parts.pop()[:-1]
            if "{" in rest or "}" in rest:
                raise ValueError(f"'*' cannot follow a parameter in one segment: {pattern!r}")
        segments = []
        for part in parts:
            if "*" in part:
                raise ValueError(f"'*' only at the end of a pattern: {pattern!r}")
            if "{" in part or "}" in part:
                prefix, open_, tail = part.partition("{")
                name, close, suffix = tail.partition("}")
                if not open_ or not close or not name or "{" in suffix or "}" in suffix or "{" in name:
                    raise ValueError(f"one {{name}} per segment, like '/zones/{{id}}': {pattern!r}")
                segments.append(_Segment(prefix, suffix, True))
            else:
                segments.append(_Segment(part, "", False))
        exact = pattern if rest is None and not any(s.param for s in segments) else None
        return cls(tuple(segments), rest, exact)

    def matches(self, path: str) -> bool:
        """Whether `path` (no query) matches; linear in len(path)."""
        if self.exact is not None:
            return path == self.exact or (path[-1:] == "/" and path[:-1] == self.exact)
        return path[:1] == "/" and self.match_segments(path[1:].split("/"))

    def match_segments(self, segs: list[str]) -> bool:
        """`matches` on a path already split at "/" (without its leading one)."""
        n = len(self.segments)
        count = len(segs)
        if self.rest is None:
            if count == n + 1 and segs[-1] == "":  # a trailing slash
                count = n
            if count != n:
                return False
        elif count <= n or not segs[n].startswith(self.rest):  # "/a/*" against "/a": the rest needs its slash
            return False
        for i in range(n):  # noqa: SIM110 - a plain loop: this is on the call path, all(genexpr) costs more
            if not self.segments[i].matches(segs[i]):
                return False
        return True


class MethodTable:
    """An interface's (verb, pattern) rules, for one question per call: is `method path` declared?
    Literal patterns are one dict lookup; the others share one split of the path."""

    __slots__ = ("_exact", "_others")

    def __init__(self, rules: Iterable[tuple[str, PathPattern]]) -> None:
        self._exact: dict[str, set[str]] = {}
        self._others: list[tuple[str, PathPattern]] = []
        for verb, pattern in rules:
            if pattern.exact is not None:
                self._exact.setdefault(pattern.exact, set()).add(verb)
            else:
                self._others.append((verb, pattern))

    @staticmethod
    def _verb_ok(verbs: Iterable[str] | str, method: str) -> bool:
        return method in verbs or "*" in verbs or (method == "HEAD" and "GET" in verbs)

    def allows(self, method: str, path: str) -> bool:
        verbs = self._exact.get(path)
        if verbs is None and path[-1:] == "/":
            verbs = self._exact.get(path[:-1])
        if verbs is not None and self._verb_ok(verbs, method):
            return True
        if not self._others or path[:1] != "/":
            return False
        segs = path[1:].split("/")
        for verb, pattern in self._others:
            if (verb == method or verb == "*" or (verb == "GET" and method == "HEAD")) and pattern.match_segments(segs):
                return True
        return False
