"""A call as the router sees it, and the two seams around it: what a transport is, what it answers.

Every entry point (the local API, the peer ingress, `edged bridge`) builds its `Call` with `new_call`'s header
rules, so that the headers the mesh sets itself are dropped from what a caller sent by one set of rules: the
bridge calls `new_call`; the API and the ingress call `edged.relay.call_for`, which applies the same rules
(`DROPPED`) in the one pass over the headers it makes anyway (a test holds the two to the same result).
Transports import this module, never the router.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .http.message import NOT_FORWARDED, Unions, strip_hop_by_hop
from .model import Endpoint

Headers = list[tuple[bytes, bytes]]

# Headers the mesh sets itself on the way in (the router adds the request id and the remaining time to each
# try); what a caller or a peer sends for these is not passed on.
OWN_HEADERS = frozenset({b"host", b"x-request-id", b"x-edged-timeout-ms"})
# Calls that may only go to this box's own endpoints (the peer ingress, the bridge: no onward hop).
LOCAL_ONLY = frozenset({"local"})


@dataclass(slots=True)
class Call:
    """A call as it enters the router: everything needed to send it, again if need be."""

    tenant: str
    service: str
    method: str
    path: str  # within the service, with the query: "/readings?x=1"
    headers: Headers  # already stripped of hop-by-hop headers
    body: bytes
    deadline: float  # monotonic time by which the caller must have its answer
    request_id: str
    tiers: frozenset[str] | None = None  # only these tiers (the ingress serves peers from "local" only)
    app: str = ""  # the calling app within `tenant` (its id is TENANT/APP): a claim the cloud tier carries


def new_call(
    tenant: str,
    service: str,
    method: str,
    path: str,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    *,
    deadline: float,
    request_id: str,
    tiers: frozenset[str] | None = None,
    drop: frozenset[bytes] = frozenset(),
    add: Iterable[tuple[bytes, bytes]] = (),
    app: str = "",
) -> Call:
    """The one way a call is made: the caller's headers minus hop-by-hop ones, `OWN_HEADERS` and `drop`,
    then `add` (headers the entry point sets, e.g. `x-forwarded-for`)."""
    kept = strip_hop_by_hop(headers if isinstance(headers, list) else list(headers), _OWN.get(drop) or _OWN.union(drop))
    if add:
        kept.extend(add)
    return Call(tenant, service, method, path, kept, body, deadline, request_id, tiers, app)


_OWN = Unions(OWN_HEADERS)  # OWN_HEADERS and an entry point's `drop`, made once per `drop` set
# Every name `new_call` drops (all but those a Connection header lists), with an entry point's `drop`: for
# `edged.relay.call_for`, which keeps new_call's rules in its own one pass over a request's headers.
DROPPED = Unions(NOT_FORWARDED | OWN_HEADERS)


class UpstreamAnswer(Protocol):
    """What a transport returns once a response head is in (HTTP or MQTT alike)."""

    status: int
    reason: bytes
    headers: Headers
    content_length: int | None
    complete: bool  # the whole body is already here

    async def read(self) -> bytes: ...
    def take(self) -> bytes: ...  # the body not yet read, at once (no wait): all of it once `complete`
    def discard(self) -> None: ...


class Transport(Protocol):
    """How endpoints of one tier are called."""

    def unavailable(self, endpoint: Endpoint) -> str | None:
        """None when calls to this endpoint can be sent now, else why not ("broker disconnected", "no live
        node serves it"): the router skips it at once instead of waiting for a per-try timeout."""

    async def send(self, endpoint: Endpoint, call: Call, headers: Headers, timeout: float) -> UpstreamAnswer:
        """One try. Raises `UpstreamError` subclasses; `timeout` covers everything up to the response head."""
