#!/usr/bin/env python3
"""The floor of edged's data-plane stack: an HTTP/1.1 relay on uvloop + httptools with no mesh logic at all.

A benchmark peer for `scripts/bench.py` (its `floor` column), not a product: each client connection gets one
keep-alive connection to the backend; a request is re-framed and sent there, the answer re-framed and sent back,
all in protocol callbacks (no coroutine, no routing, no health, no metrics, no limits, no timeouts). What edged
costs above this column is edged's own work per call; what this column costs above HAProxy is the stack's.

usage: scripts/floor_relay.py PORT BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import sys
from http import HTTPStatus

import httptools

try:
    import uvloop
except ImportError:  # the figures are then of asyncio's loop: bench.py says which loop edged runs on
    uvloop = None

_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"})


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class _Message:
    """What both sides keep of a message as httptools parses it: its header lines to pass on, and its body."""

    def __init__(self) -> None:
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name not in _HOP:
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)


class _Upstream(_Message, asyncio.Protocol):
    """The backend side of one client connection: answers come back in order (one request at a time)."""

    def __init__(self, client: _Client) -> None:
        super().__init__()
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client.upstream_ready(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        body = b"".join(self.body)
        head = b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\n\r\n" % (
            status,
            _reason(status),
            b"".join(self.headers),
            len(body),
        )
        self.client.answer(head + body)


class _Client(_Message, asyncio.Protocol):
    """One client connection: its requests go to the backend over a connection of its own."""

    def __init__(self, backend: tuple[str, int]) -> None:
        super().__init__()
        self.backend = backend
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.waiting: list[bytes] = []  # requests parsed before the backend connection was up
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        loop.create_task(loop.create_connection(lambda: _Upstream(self), *self.backend)).add_done_callback(
            self._connected
        )

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.close()

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        for request in self.waiting:
            upstream.transport.write(request)  # type: ignore[union-attr]
        self.waiting = []

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        request = b"%s %s HTTP/1.1\r\nhost: backend\r\n%scontent-length: %d\r\n\r\n%s" % (
            self.parser.get_method(),
            self.url,
            b"".join(self.headers),
            len(body),
            body,
        )
        upstream = self.upstream
        if upstream is None:
            self.waiting.append(request)
        else:
            upstream.transport.write(request)  # type: ignore[union-attr]

    def answer(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


async def serve(port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(("127.0.0.1", backend_port)), "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    (asyncio.run if uvloop is None else uvloop.run)(serve(port, backend_port))


if __name__ == "__main__":
    main()
