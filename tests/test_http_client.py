"""UpstreamPool against real servers: pooling, retries, timeouts, resets, body framings, flow control."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from edged.errors import ConnectFailed, UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from edged.http import HttpServer, Request, ResponseWriter, UpstreamPool, UpstreamResponse
from edged.model import Target, parse_target

pytestmark = pytest.mark.timeout(30)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawBackend:
    """A TCP server that runs `script` for each accepted connection and counts them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.script(reader, writer, self.accepted)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stopped by __aexit__; returning normally keeps Python 3.11's stream callback quiet
        finally:
            writer.close()
            self.tasks.discard(task)

    @property
    def target(self) -> Target:
        return Target(kind="tcp", host="127.0.0.1", port=self.port)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request (head, body) off the stream; the body by Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


async def read_all(response: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    return b"".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def echo(request: Request, writer: ResponseWriter) -> None:
    if request.path.endswith("/stream"):
        writer.start(200, [(b"x-kind", b"stream")])
        for i in range(4):
            await writer.write(b"chunk%d;" % i)
        writer.end()
        return
    if request.path.endswith("/empty"):
        writer.send(204, [], b"")
        return
    body = b"%s %s host=%s len=%d|" % (
        request.method.encode(),
        request.target.encode(),
        request.header(b"host") or b"-",
        len(request.body),
    )
    writer.send(200, [(b"content-type", b"text/plain")], body + request.body)


def test_connections_are_reused_and_requests_framed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, body = await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head + body), head + body))

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            for i in range(5):
                response = await pool.request(
                    backend.target, "POST", f"/p/{i}?q=1", [(b"x-one", b"1"), (b"content-length", b"99")], b"hey", 2
                )
                assert response.status == 200 and response.reason == b"OK"
                assert response.content_length is not None
                echoed = await read_all(response)
                assert echoed.startswith(b"POST /p/%d?q=1 HTTP/1.1\r\n" % i)
                assert b"x-one: 1\r\n" in echoed and b"content-length: 3\r\n" in echoed
                assert b"content-length: 99" not in echoed
                assert b"host: 127.0.0.1:%d\r\n" % backend.port in echoed
                assert echoed.endswith(b"\r\n\r\nhey")
                assert response.complete
            assert backend.accepted == 1
            key = backend.target.key
            assert pool.stats() == {key: {"idle": 1, "busy": 0, "opened": 1}}
            # Concurrent requests need more connections; all go back to the pool.
            responses = await asyncio.gather(*(pool.request(backend.target, "GET", "/", [], b"", 2) for _ in range(3)))
            for response in responses:
                await read_all(response)
            assert pool.stats()[key]["idle"] == 3 and backend.accepted == 3
            await pool.close()

    asyncio.run(main())


def test_against_http_server_with_base_path_and_streaming() -> None:
    async def main() -> None:
        server = HttpServer(echo)
        _, port = await server.listen_tcp("127.0.0.1", 0)
        pool = UpstreamPool()
        target = parse_target(f"http://127.0.0.1:{port}/api")
        response = await pool.request(target, "GET", "/x?y=1", [(b"host", b"thermo.mesh")], b"", 2)
        assert await read_all(response) == b"GET /api/x?y=1 host=thermo.mesh len=0|"
        response = await pool.request(target, "GET", "/stream", [], b"", 2)
        assert response.content_length is None and response.header(b"x-kind") == b"stream"
        assert await read_all(response) == b"chunk0;chunk1;chunk2;chunk3;"
        response = await pool.request(target, "GET", "/empty", [], b"", 2)
        assert response.status == 204 and response.complete and await response.read() == b""
        assert pool.stats()[target.key] == {"idle": 1, "busy": 0, "opened": 1}
        await pool.close()
        await server.shutdown(1)

    asyncio.run(main())


def test_connection_refused_is_connect_failed() -> None:
    async def main() -> None:
        pool = UpstreamPool()
        target = Target(kind="tcp", host="127.0.0.1", port=free_port())
        with pytest.raises(ConnectFailed) as info:
            await pool.request(target, "GET", "/", [], b"", 2)
        assert info.value.reached is False
        with pytest.raises(ConnectFailed):
            await pool.request(Target(kind="unix", path="/nonexistent/edged.sock"), "GET", "/", [], b"", 2)
        with pytest.raises(UpstreamProtocolError):
            await pool.request(Target(kind="tcp", host="127.0.0.1", port=443, tls=True), "GET", "/", [], b"", 2)
        await pool.close()

    asyncio.run(main())


def test_silent_server_times_out() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            with pytest.raises(UpstreamTimeout):
                await pool.request(backend.target, "GET", "/", [], b"", 0.2)
            assert pool.stats()[backend.target.key]["busy"] == 0
            await pool.close()

    asyncio.run(main())


def test_each_exchange_on_a_reused_connection_keeps_its_own_head_timeout() -> None:
    """The head timeout is one lazy timer per connection: a short timeout after a long one still fires on time,
    and a long one after a short one is not cut at the short one's deadline."""
    delays = [0.0, 0.6, 0.0]  # seconds before each answer on a connection, one request after the other

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for delay in delays:
            await read_request(reader)
            await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()

            async def call(timeout: float) -> None:
                response = await pool.request(backend.target, "GET", "/", [], b"", timeout)
                assert await read_all(response) == b"ok"

            await call(10.0)  # arms the connection's timer 10 s ahead
            with pytest.raises(UpstreamTimeout, match=r"within 0\.2s"):
                # Answered after 0.6 s: fails at 0.2 s. Were it left to the 10 s timer, wait_for would end it
                # with another error first (its 3 s only bound a hang; they time nothing).
                await asyncio.wait_for(call(0.2), 3)
            await asyncio.sleep(0.5)  # the late answer arrives on the closed connection, not ours
            await call(0.15)  # a new connection (the timed-out one was closed): timer 0.15 s ahead, cancelled
            await call(2.0)  # when that exchange ended; answered after 0.6 s, within its own 2 s
            await call(2.0)
            assert pool.stats()[backend.target.key]["opened"] == 2
            await pool.close()

    asyncio.run(main())


def test_a_head_timer_due_soon_does_not_outlive_its_exchange() -> None:
    """A short head timeout (a health check's) is cancelled with its exchange, so an idle connection does not
    wake the loop for nothing; a long one (a call's) is left armed for the next exchanges to share."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            armed = lambda: [c for c in pool._conns if c._timer is not None]  # noqa: E731
            response = await pool.request(backend.target, "GET", "/", [], b"", 0.5)
            assert await read_all(response) == b"ok" and not armed()
            response = await pool.request(backend.target, "GET", "/", [], b"", 10.0)
            assert await read_all(response) == b"ok" and len(armed()) == 1
            await pool.close()

    asyncio.run(main())


def test_close_mid_head_is_reset() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Len")
        await writer.drain()

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            with pytest.raises(UpstreamReset) as info:
                await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert info.value.reached is True
            await pool.close()

    asyncio.run(main())


def test_close_mid_body_makes_read_raise_reset() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            for _ in range(2):
                response = await pool.request(backend.target, "GET", "/", [], b"", 2)
                assert response.status == 200
                with pytest.raises(UpstreamReset):
                    await read_all(response)
            assert pool.stats()[backend.target.key] == {"idle": 0, "busy": 0, "opened": 2}
            await pool.close()

    asyncio.run(main())


def test_chunked_and_close_delimited_bodies() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"6\r\n world\r\n0\r\n\r\n")
            await read_request(reader)  # the connection is reused for the next request
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nclose-")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"delimited")

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert response.content_length is None
            assert await read_all(response) == b"hello world"
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert response.content_length is None
            assert await read_all(response) == b"close-delimited"
            assert response.complete
            assert backend.accepted == 1
            assert pool.stats()[backend.target.key] == {"idle": 0, "busy": 0, "opened": 1}
            await pool.close()

    asyncio.run(main())


def test_take_gives_a_complete_answer_whole_and_then_nothing() -> None:
    """`take()` (the relay's no-wait read of an answer that is all here) joins the body's pieces, once."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b" world")
        await read_request(reader)

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            for _ in range(500):  # the rest of the body arrives
                if response.complete:
                    break
                await asyncio.sleep(0.01)
            assert response.take() == b"hello world"
            assert response.take() == b"" and await response.read() == b""
            assert pool.stats()[backend.target.key] == {"idle": 1, "busy": 0, "opened": 1}
            await pool.close()

    asyncio.run(main())


def test_head_204_and_interim_answers_have_no_body() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head, _ = await read_request(reader)
        assert head.startswith(b"HEAD ")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_request(reader)

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            response = await pool.request(backend.target, "HEAD", "/", [], b"", 2)
            assert response.status == 200 and response.complete
            assert response.header(b"content-length") == b"1000"
            assert await response.read() == b""
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert response.status == 204 and await response.read() == b""
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert response.status == 200 and response.headers == [(b"content-length", b"2")]
            assert await read_all(response) == b"ok"
            assert backend.accepted == 1
            await pool.close()

    asyncio.run(main())


def test_request_heads_are_framed_by_the_pool_with_or_without_a_host_or_framing_header() -> None:
    """The common request (no host or framing header among the caller's) and the rest give the same head:
    the caller's headers in order, its host kept, its framing headers replaced by the pool's own."""
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, _ = await read_request(reader)
            heads.append(head)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            host = b"host: 127.0.0.1:%d\r\n" % backend.port
            sent = [
                [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")],
                [(b"x-a", b"1"), (b"transfer-encoding", b"chunked"), (b"x-b", b"2")],
                [(b"x-a", b"1"), (b"host", b"thermo.mesh"), (b"content-length", b"7")],
                [],
            ]
            for headers in sent:
                response = await pool.request(backend.target, "PUT", "/p", headers, b"abc", 2)
                assert response.status == 204
            assert heads == [
                b"PUT /p HTTP/1.1\r\nx-a: 1\r\nx-b: 2\r\nx-a: 3\r\n%scontent-length: 3\r\n\r\n" % host,
                b"PUT /p HTTP/1.1\r\nx-a: 1\r\nx-b: 2\r\n%scontent-length: 3\r\n\r\n" % host,
                b"PUT /p HTTP/1.1\r\nx-a: 1\r\nhost: thermo.mesh\r\ncontent-length: 3\r\n\r\n",
                b"PUT /p HTTP/1.1\r\n%scontent-length: 3\r\n\r\n" % host,
            ]
            await pool.close()

    asyncio.run(main())


def test_answer_heads_are_lower_cased_in_order_and_each_answer_has_only_its_own() -> None:
    """Answer header names are lower-cased, in order, repeats kept; an interim answer's headers and reason,
    and the previous answer's, are not the next answer's; the framing is read from any case of its header."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\nX-Early: 1\r\n\r\n"
            b"HTTP/1.1 200 All Fine\r\nSet-Cookie: a=1\r\nCONTENT-length: 2\r\nset-cookie: b=2\r\n\r\nok"
        )
        await read_request(reader)
        writer.write(b"HTTP/1.1 201 Made\r\nTransfer-Encoding: gzip\r\ntransfer-ENCODING: Chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"2\r\nhi\r\n0\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 202 Acc")  # the head in pieces
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"epted\r\nX-Pie")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"ce: 3\r\nContent-Length: 0\r\n\r\n")
        await read_request(reader)

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert (response.status, response.reason, response.content_length) == (200, b"All Fine", 2)
            assert response.headers == [(b"set-cookie", b"a=1"), (b"content-length", b"2"), (b"set-cookie", b"b=2")]
            assert await read_all(response) == b"ok"
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert (response.status, response.reason, response.content_length) == (201, b"Made", None)
            assert response.headers == [(b"transfer-encoding", b"gzip"), (b"transfer-encoding", b"Chunked")]
            assert await read_all(response) == b"hi"
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert (response.status, response.reason, response.content_length) == (202, b"Accepted", 0)
            assert response.headers == [(b"x-piece", b"3"), (b"content-length", b"0")]
            assert await read_all(response) == b""
            assert backend.accepted == 1
            await pool.close()

    asyncio.run(main())


def test_idle_connection_closed_by_server_is_dropped_or_retried() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n%d!" % n)
        await writer.drain()
        if n == 1:
            return  # closes while the client keeps it idle
        # Read the next request and close without answering: the race a keep-alive timeout causes.
        await read_request(reader)

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            key = backend.target.key
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert await read_all(response) == b"1!"
            for _ in range(1000):  # the close is noticed and the connection leaves the pool (10 s at most)
                if pool.stats()[key]["idle"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert pool.stats()[key]["idle"] == 0
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert await read_all(response) == b"2!"
            # Connection 2 is pooled; it swallows the next request and closes: retried once on connection 3.
            response = await pool.request(backend.target, "POST", "/", [], b"data", 2)
            assert await read_all(response) == b"3!"
            assert backend.accepted == 3
            assert pool.stats()[key]["opened"] == 3
            await pool.close()

    asyncio.run(main())


def test_garbage_answer_is_protocol_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            with pytest.raises(UpstreamProtocolError):
                await pool.request(backend.target, "GET", "/", [], b"", 2)
            await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "kind",
    [
        "many headers",  # one header line after another
        "one endless header",  # a single header line that never ends (httptools buffers it whole)
        "endless status line",
        "interim answers",  # 1xx answers, each small, without end
    ],
)
def test_an_endless_answer_head_fails_at_the_head_limit_not_at_the_timeout(kind: str) -> None:
    """A hostile upstream (a LAN peer, a local service) streams an answer head without end: the pool stops
    reading it at `max_head_bytes` with a protocol error, long before the try's timeout, instead of buffering
    whatever the upstream sends until then (at loopback speed, gigabytes on a 1 GB box)."""
    sent: list[int] = [0]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        start, piece = {
            "many headers": (b"HTTP/1.1 200 OK\r\n", b"x-filler: " + b"a" * 1000 + b"\r\n"),
            "one endless header": (b"HTTP/1.1 200 OK\r\nx-filler: ", b"a" * 1024),
            "endless status line": (b"HTTP/1.1 200 ", b"O" * 1024),
            "interim answers": (b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 40),
        }[kind]
        writer.write(start)
        while sent[0] < 64 * 1024 * 1024:  # 64 MiB, unless the pool stops reading first
            writer.write(piece * 64)
            sent[0] += len(piece) * 64
            await writer.drain()

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool(max_head_bytes=16 * 1024)
            with pytest.raises(UpstreamProtocolError, match="answer head over 16384 bytes"):
                await pool.request(backend.target, "GET", "/", [], b"", 20)
            await pool.close()
        assert sent[0] < 8 * 1024 * 1024, f"the upstream got {sent[0]} bytes of head in before it was cut"

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["endless trailers", "endless chunk extension", "tiny chunks"])
def test_chunk_framing_without_body_is_bounded_like_a_head(kind: str) -> None:
    """After the head, bytes that bring no body (chunk extensions, trailers) are bounded like a head: an upstream
    cannot stream them without end. Body keeps flowing however small its chunks (framing between body bytes
    does not add up)."""
    sent: list[int] = [0]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        if kind == "tiny chunks":  # 64 KiB of body in 1-byte chunks: 6 bytes of framing each, 384 KiB in all
            for _ in range(64):
                writer.write(b"1\r\nx\r\n" * 1024)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        start, piece = {
            "endless trailers": (b"0\r\n", b"x-trailer: " + b"a" * 1000 + b"\r\n"),
            "endless chunk extension": (b"5;ext=", b"a" * 1024),
        }[kind]
        writer.write(start)
        while sent[0] < 64 * 1024 * 1024:
            writer.write(piece * 64)
            sent[0] += len(piece) * 64
            await writer.drain()

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool(max_head_bytes=16 * 1024)
            response = await pool.request(backend.target, "GET", "/", [], b"", 20)
            if kind == "tiny chunks":
                assert await read_all(response) == b"hello" + b"x" * 64 * 1024
            else:
                with pytest.raises(UpstreamProtocolError, match="16384 bytes"):
                    await read_all(response)
            await pool.close()
        assert sent[0] < 8 * 1024 * 1024, f"the upstream got {sent[0]} bytes in before it was cut"

    asyncio.run(main())


def test_stalled_body_times_out_and_discard_closes() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool(body_timeout=0.2)
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            assert await response.read() == b"12345"
            with pytest.raises(UpstreamTimeout):
                await response.read()
            response = await pool.request(backend.target, "GET", "/", [], b"", 2)
            response.discard()
            await asyncio.sleep(0.05)
            assert pool.stats()[backend.target.key] == {"idle": 0, "busy": 0, "opened": 2}
            await pool.close()

    asyncio.run(main())


def test_large_body_flows_with_backpressure() -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB

    async def handler(request: Request, writer: ResponseWriter) -> None:
        writer.start(200, [], content_length=len(payload))
        view = memoryview(payload)
        for offset in range(0, len(payload), 65536):
            await writer.write(bytes(view[offset : offset + 65536]))
        writer.end()

    async def main() -> None:
        server = HttpServer(handler)
        _, port = await server.listen_tcp("127.0.0.1", 0)
        pool = UpstreamPool()
        target = Target(kind="tcp", host="127.0.0.1", port=port)
        response = await pool.request(target, "GET", "/big", [], b"", 2)
        assert response.content_length == len(payload)
        await asyncio.sleep(0.2)  # let the upstream fill our buffer: reading must pause, not grow without end
        assert response._buffered < 1 << 20
        assert await read_all(response) == payload
        assert pool.stats()[target.key]["idle"] == 1
        await pool.close()
        await server.shutdown(1)

    asyncio.run(main())


def test_unix_target(tmp_path) -> None:
    path = str(tmp_path / "svc.sock")

    async def main() -> None:
        server = HttpServer(echo)
        await server.listen_unix(path)
        pool = UpstreamPool()
        target = parse_target(f"unix:{path}")
        for _ in range(2):
            response = await pool.request(target, "PUT", "/v1/x", [], b"abc", 2)
            assert await read_all(response) == b"PUT /v1/x host=localhost len=3|abc"
        assert pool.stats() == {f"unix:{path}": {"idle": 1, "busy": 0, "opened": 1}}
        await pool.close()
        await server.shutdown(1)

    asyncio.run(main())


def test_idle_connections_expire() -> None:
    async def main() -> None:
        server = HttpServer(echo)
        _, port = await server.listen_tcp("127.0.0.1", 0)
        pool = UpstreamPool(idle_timeout=0.2)
        target = Target(kind="tcp", host="127.0.0.1", port=port)
        await read_all(await pool.request(target, "GET", "/", [], b"", 2))
        assert pool.stats()[target.key]["idle"] == 1
        for _ in range(500):  # the idle timeout closes it (10 s at most: a loaded box runs the timer late)
            if pool.stats()[target.key]["idle"] == 0:
                break
            await asyncio.sleep(0.02)
        assert pool.stats()[target.key]["idle"] == 0
        await read_all(await pool.request(target, "GET", "/", [], b"", 2))
        assert pool.stats()[target.key]["opened"] == 2
        await pool.close()
        await server.shutdown(1)

    asyncio.run(main())


def test_cancelled_request_closes_its_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # a reused connection would get the next request here

    async def main() -> None:
        async with RawBackend(script) as backend:
            pool = UpstreamPool()
            call = asyncio.ensure_future(pool.request(backend.target, "GET", "/", [], b"", 5))
            await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert pool.stats()[backend.target.key] == {"idle": 0, "busy": 0, "opened": 1}
            response = await pool.request(backend.target, "GET", "/", [], b"", 5)
            assert await read_all(response) == b"ok"
            assert backend.accepted == 2
            await pool.close()

    asyncio.run(main())
