"""Browser safety for the local API on TCP: what a web page open on this box must not be able to do.

- DNS rebinding: a page's own host name resolved to 127.0.0.1 reaches the API with `Host: evil.example`;
  only host names that name the API are answered (localhost, loopback addresses, `*.mesh`, the listen
  address, `[access] hosts`).
- Cross-site requests: a write (or a non-safe call) carrying a foreign `Origin` or `Sec-Fetch-Site:
  cross-site` is refused.
- JSON bodies must say `application/json`: the "simple" requests a page may send without asking (text/plain,
  form encodings) are not JSON to the API.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .errors import CallError
from .http.message import Request

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CACHE_MAX = 64  # Host values seen and allowed; a few in practice


def _host_name(value: bytes) -> str:
    """`b"Example.org:7700"` -> "example.org"; `b"[::1]:7700"` -> "::1"."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.rpartition(":")[0] if text.count(":") == 1 else text


class HostGuard:
    """Decides which Host and Origin values name this API."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = {"localhost", *(n.lower() for n in names if n)}
        # Raw Host values already allowed: the call path tests `host not in allowed` before calling check_host.
        self.allowed: set[bytes] = set()

    def host_allowed(self, name: str) -> bool:
        if name in self._names or name.endswith(".mesh") or name.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def check_host(self, host: bytes | None) -> None:
        """403 `forbidden_host` for a Host that does not name the API (no Host: HTTP/1.0 tools, allowed)."""
        if host is None or host in self.allowed:
            return
        if not self.host_allowed(_host_name(host)):
            raise CallError(403, "forbidden_host", "this Host does not name the edged API")
        if len(self.allowed) < _CACHE_MAX:
            self.allowed.add(host)

    def check_same_origin(self, req: Request) -> None:
        """403 `cross_origin` when a browser says the request comes from another site."""
        site = req.header(b"sec-fetch-site")
        if site is not None and site.strip().lower() == b"cross-site":
            raise CallError(403, "cross_origin", "cross-site requests may not change anything")
        origin = req.header(b"origin")
        if origin is not None:
            _, sep, rest = origin.partition(b"://")
            if not sep or not self.host_allowed(_host_name(rest.partition(b"/")[0])):
                raise CallError(403, "cross_origin", "requests from another origin may not change anything")


def require_json(req: Request) -> None:
    """415 `unsupported_media_type` for a body that does not say it is JSON."""
    if not req.body:
        return
    ctype = (req.header(b"content-type") or b"").partition(b";")[0].strip().lower()
    if ctype != b"application/json" and not ctype.endswith(b"+json"):
        raise CallError(415, "unsupported_media_type", "send JSON bodies with Content-Type: application/json")
