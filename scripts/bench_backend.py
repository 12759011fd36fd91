#!/usr/bin/env python3
"""A fast HTTP/1.1 backend for the benchmark when nginx is missing: every request gets 200 and 64 bytes.

Keep-alive, pipelining-safe, one process; uvloop when installed. Prints "ready" once it listens.

usage: python scripts/bench_backend.py PORT
"""

from __future__ import annotations

import asyncio
import socket
import sys

BODY = b"x" * 63 + b"\n"
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(BODY)
    + BODY
)


class _Http(asyncio.Protocol):
    """Answers each request head as soon as it is complete; request bodies (Content-Length) are skipped."""

    def __init__(self) -> None:
        self._buf = b""
        self._skip = 0  # body bytes of the current request still to drop
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        answers = 0
        while True:
            if self._skip:
                dropped = min(self._skip, len(buf))
                buf, self._skip = buf[dropped:], self._skip - dropped
                if self._skip:
                    break
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head, buf = buf[:end].lower(), buf[end + 4 :]
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                self._skip = int(head[at + 17 :].split(b"\r\n", 1)[0])
            answers += 1
        self._buf = buf
        if answers and self._transport is not None:
            self._transport.write(ANSWER * answers)


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Http, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(port))
    else:
        uvloop.run(_serve(port))


if __name__ == "__main__":
    main()
