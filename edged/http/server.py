"""HTTP/1.1 server on asyncio Protocols and httptools: buffered requests, streamed answers, one handler per connection.

Each connection parses with llhttp (httptools) in `data_received`, queues complete requests, and answers them in
order from one worker task that lives as long as the connection (no task per request). One sweep timer per
server, armed only while it has connections (an idle daemon is not woken for it), enforces the header, idle and
lingering timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import grp
import json
import logging
import os
import socket
import ssl
import stat
import struct
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools

from edged.aio import cancel_and_wait
from edged.errors import EdgedError
from edged.http.message import Headers, Request, cert_seconds_left

log = logging.getLogger("edged.http.server")

_MAX_QUEUED = 8  # pipelined requests waiting before we stop reading the socket
_RESUME_QUEUED = 2
_TURN = 8  # pipelined requests answered in a row before other connections get the loop (fair to them)
_LINGER = 2.0  # seconds to keep reading (and dropping) input after an error answer, so the client sees it
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NOTED = frozenset({b"content-length", b"expect"})  # request headers the parser acts on
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}
_BODILESS = frozenset((*range(200), 204, 304))  # statuses whose answers have no body
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ListenError(EdgedError):
    """The server could not listen where it was told to."""


class ClientDisconnected(EdgedError):
    """The client went away while its answer was being written."""


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))
        if 100 <= status <= 999:
            _STATUS_LINES[status] = line
    return line


def error_body(code: str, detail: object) -> bytes:
    """The JSON body of every error the data plane answers: `{"error": code, "detail": detail}`."""
    return json.dumps({"error": code, "detail": detail}, separators=(",", ":")).encode()


class ResponseWriter:
    """Writes one answer: `start` + `write`* + `end`, or `send` / `send_json` at once."""

    # Made once per request: the state starts as these class-level defaults (no slots, so no store of each in
    # __init__), and what the framing needs of the request is read by _frame once the answer starts.
    _close = False  # the connection closes after this answer (decided by _frame)
    _chunked = False
    _no_body = False
    _left: int | None = None  # bytes still owed under a Content-Length
    started = False
    finished = False

    def __init__(self, conn: _ServerConnection, request: Request) -> None:
        self._conn = conn
        self._request = request

    def _build_head(self, status: int, headers: Headers, content_length: int | None) -> list[bytes]:
        parts = [_status_line(status)]
        close = False
        for name, value in headers:
            # Names are lower-case everywhere in edged (parsers lower them), so no .lower() per header here.
            if name in _FRAMING:  # the writer owns framing; a handler may still ask to close
                if name == b"connection" and b"close" in value.lower():
                    close = True
                continue
            parts += (name, b": ", value, b"\r\n")
        return self._frame(parts, status, content_length, close)

    def _frame(self, parts: list[bytes], status: int, content_length: int | None, close: bool) -> list[bytes]:
        """`parts` (the status line and header lines) with the framing headers and the blank line after them."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        request = self._request
        conn = self._conn
        close = close or self._close or not request.keep_alive
        close = close or (conn._closing and (conn._server._shut or not conn._queue))
        version = request.version
        head = request.method == "HEAD"
        if head or status < 200 or status == 204 or status == 304:
            self._no_body = True
            if head and content_length is not None:
                parts.append(b"content-length: %d\r\n" % content_length)
        elif content_length is not None:
            parts.append(b"content-length: %d\r\n" % content_length)
            self._left = content_length
        elif version == "1.1":
            parts.append(b"transfer-encoding: chunked\r\n")
            self._chunked = True
        else:
            close = True  # HTTP/1.0 without a length: the close ends the body
        if close:
            parts.append(b"connection: close\r\n\r\n")
        elif version == "1.0":
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        self._close = close
        return parts

    def start(self, status: int, headers: Headers, *, content_length: int | None = None) -> None:
        """Send status and headers (lower-case names). Without `content_length`: chunked (HTTP/1.1) or
        close-delimited (HTTP/1.0) body."""
        self._conn._write(b"".join(self._build_head(status, headers, content_length)))

    def start_lines(self, status: int, lines: list[bytes], *, content_length: int | None = None) -> None:
        """`start` with the header lines already encoded (pieces that join to "name: value\\r\\n" lines, no
        framing header among them: `edged.http.message.header_lines`); `lines` is taken over."""
        lines.insert(0, _STATUS_LINES.get(status) or _status_line(status))
        self._conn._write(b"".join(self._frame(lines, status, content_length, False)))

    def send_lines(self, status: int, lines: list[bytes], body: bytes) -> None:
        """`send` with the header lines already encoded (as `start_lines`); `lines` is taken over."""
        request = self._request
        conn = self._conn
        status_line = _STATUS_LINES.get(status) or _status_line(status)
        if (
            status not in _BODILESS
            and request.keep_alive
            and request.version == "1.1"
            and request.method != "HEAD"
            and not conn._closing
            and not self.started
            and not self._close
        ):
            # The relayed answer nearly always: HTTP/1.1, kept alive, with a body. Its framing is one line,
            # decided here in one test instead of by _frame (once per call).
            self.started = self.finished = True
            lines.insert(0, status_line)
            lines += (b"content-length: %d\r\n\r\n" % len(body), body)
        else:
            lines.insert(0, status_line)
            lines = self._frame(lines, status, len(body), False)
            if body and not self._no_body:
                lines.append(body)
            self._left = None
            self.finished = True
        if not conn._closed and conn._transport is not None:  # _write, inline
            conn._transport.write(b"".join(lines))

    async def write(self, data: bytes) -> None:
        """Send a piece of the body; waits while the client's socket is backed up. ClientDisconnected if it is gone."""
        if not self.started or self.finished:
            raise RuntimeError("write() outside start() .. end()")
        conn = self._conn
        if conn._closed:
            raise ClientDisconnected("client closed the connection")
        if not data or self._no_body:
            return
        if self._chunked:
            conn._write(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            if self._left is not None:
                if len(data) > self._left:  # more than announced: cut it, and the connection can't be reused
                    data = data[: self._left]
                    self._close = True
                self._left -= len(data)
            conn._write(data)
        if conn._write_paused:
            await conn._drain()

    def end(self) -> None:
        """Finish the answer (the last chunk for chunked bodies). Calling it twice is harmless."""
        if self.finished:
            return
        if not self.started:
            raise RuntimeError("end() before start()")
        self.finished = True
        if self._chunked:
            self._conn._write(b"0\r\n\r\n")
        elif self._left:  # fewer bytes than announced: only closing tells the client
            self._close = True

    def cut(self) -> None:
        """End a started answer short (its source broke off): the connection closes after what was sent, so
        the client sees a truncated body (never a last chunk or a short body as whole)."""
        self.finished = True
        self._close = True

    def send(self, status: int, headers: Headers, body: bytes) -> None:
        """Send a whole answer at once, with Content-Length."""
        parts = self._build_head(status, headers, len(body))
        if body and not self._no_body:
            parts.append(body)
        self._left = None
        self.finished = True
        self._conn._write(b"".join(parts))

    def send_json(self, status: int, obj: object, headers: Headers | tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Send `obj` as an application/json answer."""
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send(status, [(b"content-type", b"application/json"), *headers], body)


class _Fail:
    """A queued error answer: the request could not be read; answer it in turn, then close."""

    __slots__ = ("code", "detail", "status")

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the answer is in `_ServerConnection._reject`."""


class _ServerConnection(asyncio.Protocol):
    """One client connection: parses requests, queues them, answers them in order from one worker task."""

    def __init__(self, server: HttpServer, unix: bool, listener: _Listener) -> None:
        self._server = server
        self._loop = server._loop
        self._unix = unix
        self._listener = listener
        self._counted = False  # counted against its listener's connection limit
        self._transport: asyncio.Transport | None = None
        self._peer = "unix"
        self._cred: tuple[int, int, int] | None = None
        self._peer_cert: dict | None = None  # what a TLS handshake verified (TLS listeners only)
        self._expiry: asyncio.TimerHandle | None = None  # closes the connection when the peer's certificate expires
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[Request | _Fail] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._busy = False  # the worker is answering a request
        self._closing = False  # close once the current answer is done
        self._closed = False
        self._discard = False  # input is no longer parsed (after an error or an upgrade)
        self._read_paused = False
        self._write_paused = False
        self._write_paused_since = 0.0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._linger_until = 0.0
        self._requests = 0
        self._reject: _Fail | None = None
        self._continue_pending = False
        # Per-message parse state.
        self._open = False  # a message has begun and is not complete
        self._fed = False  # body arrived in the read being fed (see data_received)
        self._in_head = False
        self._raw_head = 0
        self._head_size = 0
        self._max_head = server._max_header_bytes  # read per header: kept here, one attribute look-up less
        self._url = b""
        self._headers: Headers = []
        self._body: list[bytes] = []  # emptied by on_message_complete (with _body_size), so only when not empty
        self._body_size = 0
        self._content_length: int | None = None
        self._expect = False
        self._version = "1.1"  # the message's HTTP version, read by on_headers_complete
        now = self._loop.time()
        self._since = now  # when the current wait began (connect, idle, message begin, last body data)

    # -- transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop transports are not asyncio.Transport
        server = self._server
        server._conns.add(self)
        server._arm_sweep()
        if self._listener.open >= server._max_connections:
            server._limit_hit("connections")  # over the limit: a clear answer, then the door closes
            self._fail(503, "overloaded", "too many connections")
            return
        self._listener.open += 1
        self._counted = True
        transport.set_write_buffer_limits(high=server._max_output)  # type: ignore[attr-defined]
        if self._unix:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    self._cred = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        else:
            peer = transport.get_extra_info("peername")
            self._peer = peer[0] if isinstance(peer, tuple) else str(peer)
            self._peer_cert = transport.get_extra_info("peercert")  # None without TLS; called after the handshake
            if self._peer_cert:
                self._expire_with(self._peer_cert)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _expire_with(self, cert: dict) -> None:
        """The caller is who its certificate says only until it expires: then no more requests on this connection
        (the one being answered ends first). A renewed peer connects again with its new certificate."""
        left = cert_seconds_left(cert)
        if left is None:
            return
        self._expiry = self._loop.call_later(max(0.0, left), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self._closing = True
        if self._idle():
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._server._conns.discard(self)
        if self._counted:
            self._counted = False
            self._listener.open -= 1
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()  # the client is gone: stop its handler too
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientDisconnected("client closed the connection"))
        self._drain_waiter = None

    def eof_received(self) -> bool:
        # Like Go and nginx, take EOF as the client leaving (a full close looks the same): running handlers stop.
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_since = self._loop.time()

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return
        in_head, done = self._in_head, self._requests
        try:  # fed here, not in a method of its own: once per read
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We do not switch protocols: answer the request as a plain one, then close.
            self._discard = True
            if self._queue and isinstance(self._queue[-1], Request):
                self._queue[-1].keep_alive = False
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
        # llhttp buffers an unfinished header line without limit: bound the raw bytes of a head that spans
        # reads too. Counted after feeding, and only for the same request: one read may also hold many whole
        # pipelined requests (counting those made a false 431 under heavy pipelining).
        # After the head, a read of chunk framing or trailers alone (no body) counts the same way: max_body does
        # not see it, and httptools keeps an unfinished trailer line whole.
        if self._requests == done and not self._discard:
            if self._fed:  # its body is arriving: what came between its pieces does not add up
                self._fed = False
                self._raw_head = 0
            elif in_head if self._in_head else self._open:
                self._raw_head += len(data)
                if self._raw_head > 2 * self._max_head + 4096:
                    if self._in_head:
                        self._fail(431, "header_too_large", "header section too large")
                    else:
                        self._fail(400, "bad_request", "chunk framing or trailers without body over the head limit")

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        """Answer what the parser (or a callback of ours) refused, then close."""
        reject, self._reject = self._reject, None
        if reject is not None:
            self._fail(reject.status, reject.code, reject.detail)
        elif isinstance(exc, httptools.HttpParserCallbackError):
            log.error("request parsing failed", exc_info=exc.__context__)
            self._fail(500, "internal", "request parsing failed")
        elif self._in_head and "overflow" in str(exc).lower():  # httptools < 0.2 (http-parser) limits heads
            self._fail(431, "header_too_large", "header section too large")
        else:
            self._fail(400, "bad_request", str(exc) or type(exc).__name__)

    # -- parser callbacks --

    def on_message_begin(self) -> None:
        self._open = self._in_head = True
        self._raw_head = self._head_size = 0
        self._fed = False
        self._url = b""
        self._headers = []
        self._content_length = None
        self._expect = False
        self._since = self._loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url  # nearly always in one piece; all of it is bounded by the head limit below
        self._head_size += len(url)
        if self._head_size > self._max_head:
            self._stop(431, "header_too_large", "header section too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_size = self._head_size + len(name) + len(value) + 4
        if size > self._max_head:
            self._stop(431, "header_too_large", "header section too large")
        name = name.lower()
        self._headers.append((name, value))
        if name in _NOTED:  # one set look-up for the common header that is neither
            if name == b"content-length":
                try:
                    self._content_length = int(value)
                except ValueError:
                    self._stop(400, "bad_request", "bad content-length")
            else:
                self._expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._since = self._loop.time()
        # Asked once per request and kept for on_message_complete: httptools formats it anew each time (str.format,
        # about 2k instructions).
        version = self._version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):  # llhttp refuses others, http-parser not
            self._stop(400, "bad_request", "unsupported HTTP version")
        limit = self._server._max_body_bytes
        if self._content_length is not None and self._content_length > limit:
            self._stop(413, "too_large", f"request body over {limit} bytes")
        if self._expect and version == "1.1":
            if self._busy or self._queue:  # an earlier answer is on the wire: send it after that one
                self._continue_pending = True
            else:
                self._write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._fed = True
        self._body_size += len(body)
        if self._body_size > self._server._max_body_bytes:
            self._stop(413, "too_large", f"request body over {self._server._max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._open = False
        self._continue_pending = False
        parser = self._parser
        target = self._url.decode("latin-1")
        path, _, query = target.partition("?")
        if path[:1] != "/" and "://" in path:  # absolute-form, as proxies are sent
            parts = urlsplit(target)
            path, query = parts.path or "/", parts.query
        body = self._body
        if body:  # given to the request whole: the pieces go (and a message without a body resets nothing)
            self._body = []
            self._body_size = 0
        request = Request(  # positional: a little cheaper than keywords, once per request
            parser.get_method().decode("ascii"),
            target,
            path,
            query,
            self._version,
            self._headers,
            (body[0] if len(body) == 1 else b"".join(body)) if body else b"",
            self._peer,
            parser.should_keep_alive(),
            self._cred,
            self._peer_cert,
        )
        self._requests += 1
        queue = self._queue
        wakeup = self._wakeup
        if wakeup is not None and not queue and not wakeup.done():
            # _enqueue's common case, inline (once per request): the worker waits for this request, the only one.
            queue.append(request)
            wakeup.set_result(None)
        else:
            self._enqueue(request)

    # -- internals --

    def _stop(self, status: int, code: str, detail: str) -> None:
        self._reject = _Fail(status, code, detail)
        raise _Reject(detail)

    def _write(self, data: bytes) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    async def _drain(self) -> None:
        if self._closed:
            raise ClientDisconnected("client closed the connection")
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    def _enqueue(self, item: Request | _Fail) -> None:
        queue = self._queue
        queue.append(item)
        wakeup = self._wakeup  # set while the worker waits for a request
        if wakeup is not None:
            if not wakeup.done():
                wakeup.set_result(None)
        elif self._worker is None:
            self._worker = self._loop.create_task(self._work())
            self._server._tasks.add(self._worker)
            self._worker.add_done_callback(self._server._tasks.discard)
        if len(queue) >= _MAX_QUEUED and not self._read_paused and self._transport is not None:
            self._transport.pause_reading()
            self._read_paused = True

    def _fail(self, status: int, code: str, detail: str) -> None:
        """The input cannot be read on: stop parsing, answer the error in turn, then close."""
        self._discard = True
        self._open = self._in_head = False
        if self._busy or self._queue:
            self._enqueue(_Fail(status, code, detail))
        else:
            self._answer_fail(_Fail(status, code, detail))

    def _answer_fail(self, fail: _Fail) -> None:
        body = error_body(fail.code, fail.detail)
        head = b"%scontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self._write(b"".join((head % (_status_line(fail.status), len(body)), body)))
        self._linger()

    def _linger(self) -> None:
        """Half-close and keep draining input for a moment: closing with unread input would reset the answer away."""
        transport = self._transport
        if transport is None or self._closed:
            return
        self._discard = True
        self._closing = True
        self._linger_until = self._loop.time() + _LINGER
        if self._read_paused:
            transport.resume_reading()
            self._read_paused = False
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()

    def _close(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.close()

    def _abort(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.abort()

    async def _work(self) -> None:
        """Answer queued requests in order for as long as the connection lives."""
        queue = self._queue
        loop = self._loop
        server = self._server
        handler = server._handler
        in_a_row = 0
        while not self._closed:
            if not queue:
                in_a_row = 0
                self._since = loop.time()
                wakeup = self._wakeup = loop.create_future()
                await wakeup
                self._wakeup = None
                continue
            if self._write_paused:
                # The client does not read its answers: stop reading its requests until it does.
                self._server._limit_hit("output")
                if not self._read_paused and self._transport is not None:
                    self._transport.pause_reading()
                    self._read_paused = True
                try:
                    await self._drain()
                except ClientDisconnected:
                    return
                continue
            item = queue.popleft()
            if self._read_paused and len(queue) <= _RESUME_QUEUED and not self._discard:
                self._read_paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
            if isinstance(item, _Fail):
                self._answer_fail(item)
                return
            # The handler runs here, not in a coroutine of its own: one coroutine less per request.
            self._busy = True
            writer = ResponseWriter(self, item)
            server._in_flight += 1
            try:
                await handler(item, writer)
            except ClientDisconnected:
                close = True
            except Exception:
                close = self._handler_failed(item, writer)
            else:
                close = writer._close if writer.finished else self._unfinished(item, writer)
            finally:
                self._busy = False
                server._in_flight -= 1
                if server._drained is not None and not server._in_flight and not server._drained.done():
                    server._drained.set_result(None)
            if close or (self._closing and (server._shut or not queue)):
                if self._linger_until:
                    return
                self._close()
                return
            if queue:  # (an empty queue sets in_a_row to 0 at the top of the loop)
                in_a_row += 1
                if in_a_row >= _TURN:
                    # Answers that need no I/O never suspend: without this, one pipelining client holds the loop.
                    in_a_row = 0
                    await asyncio.sleep(0)
            elif self._continue_pending and self._open:
                self._continue_pending = False
                self._write(_CONTINUE)

    def _handler_failed(self, request: Request, writer: ResponseWriter) -> bool:
        """The handler raised: answer 500 if nothing was sent yet. True when the connection must close."""
        log.exception("handler failed for %s %s", request.method, request.path)
        if writer.finished:  # the answer is whole: the connection is still good
            return writer._close
        if writer.started:
            self._abort()  # half an answer is on the wire: only a reset tells the client
            return True
        writer.send(500, [(b"content-type", b"application/json")], error_body("internal", "handler failed"))
        return writer._close

    def _unfinished(self, request: Request, writer: ResponseWriter) -> bool:
        """The handler returned without finishing its answer: end it, or answer 500 if it sent nothing."""
        if writer.started:
            writer.end()
        else:
            log.error("handler for %s %s sent no answer", request.method, request.path)
            writer.send(500, [(b"content-type", b"application/json")], error_body("internal", "no answer"))
        return writer._close

    def _idle(self) -> bool:
        return not self._busy and not self._queue and not self._open

    def _sweep(self, now: float) -> None:
        """Close the connection if it waited too long for what it is waiting for."""
        server = self._server
        if self._linger_until:
            if now >= self._linger_until:
                self._abort()
            return
        if self._write_paused:
            if now - self._write_paused_since > server._idle_timeout:
                self._abort()  # the client stopped reading its answer
            return
        if self._busy or self._queue:
            return
        if self._open:
            # Whole-head and whole-body deadlines: a byte now and then does not keep a request open.
            limit = server._header_timeout if self._in_head else server._body_timeout
        else:
            limit = server._header_timeout if self._requests == 0 else server._idle_timeout
        if now - self._since > limit:
            if self._open and not self._in_head:
                server._limit_hit("body_timeout")
                self._fail(408, "timeout", "the request body took too long to arrive")
                return
            if self._open:
                server._limit_hit("header_timeout")
            self._close()


Handler = Callable[[Request, ResponseWriter], Awaitable[None]]


class HandshakeLimit(Protocol):
    """What a TLS listener asks before each handshake (edged.edge.handshakes.HandshakeGate)."""

    timeout: float

    def admit(self, address: str) -> bool: ...

    def done(self, address: str) -> None: ...


class _Gated:
    """A TLS listening socket that accepts by hand, asking `gate` before each handshake (HttpServer._listen_gated)."""

    __slots__ = ("gate", "listener", "sock", "tls")

    def __init__(self, sock: socket.socket, listener: _Listener, tls: ssl.SSLContext, gate: HandshakeLimit) -> None:
        self.sock, self.listener, self.tls, self.gate = sock, listener, tls, gate


class _Listener:
    """One listening socket's count of open connections (the limit is per listener)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0


class HttpServer:
    """An HTTP/1.1 server that hands each buffered request to `handler` with a ResponseWriter."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int = 65536,
        max_body_bytes: int = 1 << 20,
        idle_timeout: float = 75.0,
        header_timeout: float = 10.0,
        body_timeout: float = 30.0,
        max_connections: int = 1024,
        max_output: int = 256 * 1024,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self._handler = handler
        self._body_timeout = body_timeout
        self._max_connections = max_connections
        self._max_output = max_output
        self._on_limit = on_limit
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._idle_timeout = idle_timeout
        self._header_timeout = header_timeout
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by the first listen
        self._servers: list[asyncio.AbstractServer] = []
        self._gated: list[_Gated] = []  # TLS listeners that accept by hand (_listen_gated)
        self._unix_paths: list[tuple[str, int]] = []  # (path, inode) of sockets we created
        self._conns: set[_ServerConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweep_interval = max(0.05, min(1.0, header_timeout / 4, idle_timeout / 4, body_timeout / 4))
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._in_flight = 0
        self._drained: asyncio.Future[None] | None = None  # set during shutdown when in_flight drops to 0
        self._shut = False

    def _limit_hit(self, name: str) -> None:
        if self._on_limit is not None:
            self._on_limit(name)

    @property
    def in_flight(self) -> int:
        """Requests whose handler is running."""
        return self._in_flight

    def __repr__(self) -> str:
        return (
            f"<HttpServer listeners={len(self._servers)} connections={len(self._conns)} in_flight={self._in_flight}"
            f" sweeping={self._sweep_timer is not None}>"
        )

    def _start(self) -> None:
        if self._shut:
            raise ListenError("server is shut down")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    async def listen_tcp(
        self, host: str, port: int, tls: ssl.SSLContext | None = None, handshakes: HandshakeLimit | None = None
    ) -> tuple[str, int]:
        """Listen on host:port; returns the bound address (port 0 picks a free port). With `tls`, every
        connection starts with a TLS handshake that must end within the header timeout, or within
        `handshakes.timeout` when a gate caps the handshakes in progress (per source address and in total)."""
        self._start()
        listener = _Listener()
        if tls is not None and handshakes is not None:
            return self._listen_gated(host, port, listener, tls, handshakes)
        extra: dict[str, Any] = {} if tls is None else {"ssl": tls, "ssl_handshake_timeout": self._header_timeout}
        # Any: uvloop's Server.sockets is a list where typeshed says a tuple, which the compiled build would check.
        server: Any
        try:
            server = await self._loop.create_server(
                lambda: _ServerConnection(self, False, listener), host, port, reuse_address=True, backlog=1024, **extra
            )
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        return bound[0], bound[1]

    def _listen_gated(
        self, host: str, port: int, listener: _Listener, tls: ssl.SSLContext, gate: HandshakeLimit
    ) -> tuple[str, int]:
        """A TLS listener that accepts by hand: the source address is known, and the gate asked, before a byte of
        the handshake is read (asyncio's TLS servers hide a connection until its handshake is over). An admitted
        connection's handshake runs on the loop's own TLS (`connect_accepted_socket`) within `gate.timeout`."""
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        gated = _Gated(sock, listener, tls, gate)
        self._gated.append(gated)
        self._loop.add_reader(sock.fileno(), self._accept_gated, gated)
        bound = sock.getsockname()
        return bound[0], bound[1]

    def _accept_gated(self, gated: _Gated) -> None:
        sock, gate = gated.sock, gated.gate
        for _ in range(64):  # a burst at a time: other work gets the loop between bursts
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: wait a second rather than spin (as asyncio does)
                log.error("accepting a peer connection failed: %s", exc.strerror or exc)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(1.0, self._resume_gated, gated)
                return
            address = peer[0] if isinstance(peer, tuple) else str(peer)
            if self._shut or not gate.admit(address):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # a reset, before any TLS byte is read: a flood costs an accept and a close
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as create_server's sockets: no Nagle delay
            task = self._loop.create_task(self._handshake(conn, address, gated))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume_gated(self, gated: _Gated) -> None:
        if not self._shut and gated.sock.fileno() >= 0:
            self._loop.add_reader(gated.sock.fileno(), self._accept_gated, gated)

    async def _handshake(self, conn: socket.socket, address: str, gated: _Gated) -> None:
        listener = gated.listener
        try:
            await self._loop.connect_accepted_socket(
                lambda: _ServerConnection(self, False, listener),
                conn,
                ssl=gated.tls,
                ssl_handshake_timeout=gated.gate.timeout,
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError):
            conn.close()  # refused certificate, timeout, or the client left (the transport closed it already)
        finally:
            gated.gate.done(address)

    async def listen_unix(self, path: str, mode: int = 0o660, group: str | None = None) -> None:
        """Listen on a Unix socket: a stale socket file is removed first; then chmod, and chgrp if `group` exists.

        The chgrp happens only when the socket's group differs: under systemd (Group=edged) it already has
        the right one, and the unit's SystemCallFilter=~@privileged makes chown fail with EPERM.
        """
        self._start()
        _remove_stale_socket(path)
        try:
            listener = _Listener()
            server = await self._loop.create_unix_server(
                lambda: _ServerConnection(self, True, listener), path, backlog=1024
            )
        except OSError as exc:
            raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        self._servers.append(server)
        try:
            os.chmod(path, mode)
            if group is not None:
                try:
                    gid = grp.getgrnam(group).gr_gid
                except KeyError:
                    log.info("group %r does not exist; %s keeps its group", group, path)
                else:
                    if os.stat(path).st_gid != gid:
                        os.chown(path, -1, gid)
            self._unix_paths.append((path, os.stat(path).st_ino))
        except OSError as exc:
            raise ListenError(f"cannot set up {path}: {exc.strerror or exc}") from exc

    def _arm_sweep(self) -> None:
        if self._sweep_timer is None and not self._shut:
            self._sweep_timer = self._loop.call_later(self._sweep_interval, self._sweep)

    def _sweep(self) -> None:
        """Close the connections that waited too long; again after the interval while any are left."""
        self._sweep_timer = None
        try:
            now = self._loop.time()
            for conn in list(self._conns):
                conn._sweep(now)
        finally:
            if self._conns:
                self._arm_sweep()

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, close idle connections, let running handlers finish up to drain_timeout, close the rest."""
        if self._shut:
            return
        self._shut = True
        for server in self._servers:
            server.close()
        for gated in self._gated:
            self._loop.remove_reader(gated.sock.fileno())
            gated.sock.close()
        self._gated.clear()
        for conn in list(self._conns):
            conn._closing = True
            if conn._idle():
                conn._close()
        if self._in_flight and self._loop is not None:
            self._drained = self._loop.create_future()
            await asyncio.wait([self._drained], timeout=drain_timeout)
        for conn in list(self._conns):
            conn._abort()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        await cancel_and_wait(list(self._tasks))
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for path, inode in self._unix_paths:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)


def _remove_stale_socket(path: str) -> None:
    """Unlink `path` if it is a socket nobody answers on; ListenError if it is live or not a socket."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"cannot inspect {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # backlog full: someone listens
    except OSError as exc:
        raise ListenError(f"cannot probe {path}: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    raise ListenError(f"{path} is in use by a running server")
