"""HTTP/1.1 message values shared by the server and the upstream client, and hop-by-hop header rules."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)


# What is never forwarded: hop-by-hop headers, and content-length (every sender frames the body itself).
NOT_FORWARDED: frozenset[bytes] = HOP_BY_HOP | {b"content-length"}
# Connection values that name no header beyond HOP_BY_HOP (nearly every Connection header says one of these).
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


@dataclass(slots=True)
class Request:
    """One parsed request, body buffered whole. Header names are lower-case; values and order are as received."""

    method: str
    target: str  # raw request target, e.g. "/svc/thermo/readings?x=1"
    path: str  # target without the query, not percent-decoded
    query: str  # without "?", "" if none
    version: str  # "1.0" | "1.1"
    headers: Headers
    body: bytes
    peer: str  # remote IP address, or "unix"
    keep_alive: bool
    cred: tuple[int, int, int] | None = None  # Unix socket: the peer's (pid, uid, gid) from SO_PEERCRED
    peer_cert: dict | None = None  # TLS listener: the client certificate its handshake verified (ssl's decoded form)

    def header(self, name: bytes) -> bytes | None:
        """First value of the header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def strip_hop_by_hop(headers: Headers, also: frozenset[bytes] = frozenset()) -> Headers:
    """Headers fit to forward: without HOP_BY_HOP, those named in Connection, content-length (callers reframe),
    and the names in `also` (the caller's own: one pass instead of two)."""
    skip = _SKIPS.get(also) or _SKIPS.union(also)
    kept = [h for h in headers if h[0] not in skip]
    if len(kept) == len(headers):
        return kept  # no Connection header among them
    named: set[bytes] | None = None
    for key, value in headers:
        if key == b"connection" and value not in PLAIN_CONNECTION:
            if named is None:
                named = set()
            named.update(token.strip().lower() for token in value.split(b","))
    if named:
        return [h for h in kept if h[0] not in named]
    return kept


class Unions:
    """`base | also`, made once per `also` set and kept (a handful of sets in practice, one per entry point; at
    most 64, so it never grows without bound): a per-call union of header-name sets costs one dict look-up."""

    __slots__ = ("_base", "_made", "get")

    def __init__(self, base: frozenset[bytes]) -> None:
        self._base = base
        self._made: dict[frozenset[bytes], frozenset[bytes]] = {}
        # The union already made for `also`, or None: `get(also) or union(also)` on the call path is a dict
        # look-up, no Python call.
        self.get = self._made.get

    def union(self, also: frozenset[bytes]) -> frozenset[bytes]:
        made = self._made.get(also)
        if made is None:
            if len(self._made) >= 64:
                self._made.clear()
            made = self._made[also] = self._base | also
        return made


_SKIPS = Unions(NOT_FORWARDED)  # what strip_hop_by_hop drops with the caller's `also`


def header_lines(headers: Headers) -> list[bytes]:
    """The headers fit to forward (as `strip_hop_by_hop`), encoded: a flat list of pieces that join to
    "name: value\r\n" lines. One pass, and no tuple or join per header: the relayed answer's head is built of it."""
    parts: list[bytes] = []
    for name, value in headers:
        if name not in NOT_FORWARDED:
            parts += (name, b": ", value, b"\r\n")
        elif name == b"connection" and value not in PLAIN_CONNECTION:  # it names more headers to drop
            parts = []
            for name, value in strip_hop_by_hop(headers):
                parts += (name, b": ", value, b"\r\n")
            return parts
    return parts


def cert_seconds_left(cert: dict) -> float | None:
    """Seconds until a verified peer certificate (`getpeercert()`) expires; None when it does not say."""
    try:
        return ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()
    except (KeyError, ValueError, TypeError):
        return None
