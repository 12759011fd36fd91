"""HTTP transport for local and edge endpoints: one pooled HTTP/1.1 client shared by every endpoint."""

from __future__ import annotations

import time

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

    async def send(
        self, endpoint: Endpoint, call: Call, headers: list[tuple[bytes, bytes]], timeout: float
    ) -> UpstreamResponse:
        if endpoint.target is None:
            raise UpstreamProtocolError(endpoint.url, "endpoint has no HTTP address")
        # The per-try timeout may stretch by the loop's lag on a slow box, never past the caller's deadline.
        limit = call.deadline - time.monotonic()
        return await self._pool.request(endpoint.target, call.method, call.path, headers, call.body, timeout, limit)
