"""Request paths as a service sees them: normalized before the interface allowlist and before the endpoint's
base path is joined on, so that what is checked is what the backend gets.

Dot segments (also `%2e`) are resolved inside the service (`/a/../../b` is `/b`: never above the service's
root); encoded slashes and backslashes, NUL and raw backslashes are refused (400 `bad_path`): a backend that
decodes them would see another path than the one checked.
"""

from __future__ import annotations

import re

from .errors import CallError

_REFUSED = re.compile(r"%(?:00|2[fF]|5[cC])|[\\\x00]")
_DOT = re.compile(r"%2[eE]")


def normalize_path(path: str) -> str:
    """The path (no query) to check and forward; CallError 400 `bad_path` when it cannot be made safe."""
    if "%" not in path and "/." not in path and "\\" not in path and "\x00" not in path:
        return path  # the common case: nothing to resolve
    if _REFUSED.search(path):
        raise CallError(400, "bad_path", "encoded '/', '\\' or NUL in the path")
    if "%" in path:
        path = _DOT.sub(".", path)
    if "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")[1:]
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    tail = "/" if segments and segments[-1] in (".", "..") else ""
    return "/" + "/".join(out) + tail if out else "/"
