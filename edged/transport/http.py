"""HTTP transport for local and edge endpoints: one pooled HTTP/1.1 client shared by every endpoint."""

from __future__ import annotations

import time
from collections.abc import Awaitable

from ..call import Call
from ..errors import UpstreamProtocolError
from ..http.client import UpstreamPool, UpstreamResponse
from ..model import Endpoint


class HttpTransport:
    """Sends a try over the shared keep-alive pool. Always available: each endpoint's health says the rest."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def unavailable(self, endpoint: Endpoint) -> str | None:
        return None

    def send(
        self, endpoint: Endpoint, call: Call, headers: list[tuple[bytes, bytes]], timeout: float
    ) -> Awaitable[UpstreamResponse]:
        """The pool's request, to be awaited (a plain function: no coroutine of its own wrapped around it, once
        per try). UpstreamProtocolError at once for an endpoint with no HTTP address."""
        if endpoint.target is None:
            raise UpstreamProtocolError(endpoint.url, "endpoint has no HTTP address")
        # The per-try timeout may stretch by the loop's lag on a slow box, never past the caller's deadline.
        limit = call.deadline - time.monotonic()
        return self._pool.request(endpoint.target, call.method, call.path, headers, call.body, timeout, limit)
