"""HTTP/1.1 upstream client: pooled keep-alive connections per target, streamed response bodies.

Built on asyncio Protocols and httptools with no task per request: the response head arrives through a future
guarded by a timer that counts the loop's own time (`edged.looplag`: a slow box's lag is not blamed on the
upstream), and body chunks through a small buffer that pauses the socket when it fills.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import fcntl
import socket
import ssl
import termios
from collections.abc import Callable

import httptools

from edged.aio import version_tuple
from edged.errors import ConnectFailed, EdgedError, UpstreamError, UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from edged.http.message import Headers, cert_seconds_left
from edged.looplag import GRACE, TimeLimit
from edged.model import Target

_HIGH_WATER = 256 * 1024  # unread body bytes above which the upstream socket stops being read
# Bytes an answer's head may take, interim (1xx) heads included, before the exchange fails as a protocol error.
# The same default as the API's `max_header`: an upstream is no more trusted than a caller (a LAN peer, a local
# service), and without a bound a head streamed without end is buffered until the try's timeout.
MAX_HEAD_BYTES = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # send Content-Length: 0 for these even with no body
_SKIP_REQUEST_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
_NOTED = _SKIP_REQUEST_HEADERS  # answer headers the parser acts on: the same two
_FRAMED_OR_HOST = _SKIP_REQUEST_HEADERS | {b"host"}

# A parser goes on to the next answer of its connection only with httptools >= 0.6.3: older ones failed
# tests/test_http_client.py (the answer after a 204 with a Content-Length) and get a fresh parser instead.
_REUSE_PARSERS = version_tuple(httptools.__version__) >= (0, 6, 3)

# A head timer due within this many seconds is cancelled when its exchange ends; a later one is left to lapse.
_LAZY_TIMER = 1.0

# Connection states in the pool.
_BUSY, _IDLE, _GONE = 0, 1, 2


class _Stale(Exception):
    """A reused connection died before any byte of the answer: the request can be sent again on a new one."""


class UpstreamResponse:
    """Status and headers of an upstream answer; the body is read with `read()` until it returns b""."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_waiter",
        "complete",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        content_length: int | None,
        conn: _UpstreamConnection,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # names lower-cased, as received
        self.content_length = content_length  # None when chunked or close-delimited
        self.complete = False  # the whole body has been received
        self._conn: _UpstreamConnection | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} complete={self.complete} buffered={self._buffered}>"

    def header(self, name: bytes) -> bytes | None:
        """First value of the header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self) -> bytes:
        """The body received so far and not yet read; b"" at the end.

        UpstreamReset if the connection breaks mid-body; UpstreamTimeout if nothing arrives for the pool's
        body_timeout (the connection is closed then).
        """
        while not self._chunks:
            if self._error is not None:
                raise self._error
            conn = self._conn
            if self.complete or conn is None:
                return b""
            loop = conn._loop
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(conn._pool._body_timeout, self._on_timeout, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self.discard()  # nobody will read the rest
                raise
            finally:
                timer.cancel()
                self._waiter = None
        return self.take()

    def take(self) -> bytes:
        """The body received and not yet read, at once (`read` without a wait): all of it once `complete`."""
        chunks = self._chunks
        self._chunks = []
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn._read_paused:
            conn._resume()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def discard(self) -> None:
        """The caller will not read (the rest of) the body: close the connection unless the body is complete."""
        conn = self._conn
        self._conn = None
        self._chunks = []
        self._buffered = 0
        if conn is not None and not self.complete:
            conn._response = None
            conn._abort()

    # -- fed by the connection --

    def _finish(self) -> None:
        self.complete = True
        self._conn = None
        if self._waiter is not None:
            self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timeout(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        conn = self._conn
        key = conn._key if conn is not None else "?"
        body_timeout = conn._pool._body_timeout if conn is not None else 0.0
        self._fail(UpstreamTimeout(key, f"no body data for {body_timeout:g}s"))
        if conn is not None:
            conn._abort()


class _UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream: sends a request, parses its answer with a fresh parser, then goes idle."""

    def __init__(self, pool: UpstreamPool, key: str, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._key = key
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._state = _GONE  # _BUSY once connected and counted
        self._closed = False
        self._reused = False
        self._idle_since = 0.0
        self._read_paused = False
        self._expired = False  # the upstream's TLS certificate expired: no more requests on this connection
        self._expiry: asyncio.TimerHandle | None = None
        # Per-exchange state.
        self._parser: httptools.HttpResponseParser | None = None  # set while an exchange is on
        self._spare: httptools.HttpResponseParser | None = None  # the last parser, fit to parse the next answer
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._limit: TimeLimit | None = None  # when the exchange waiting for its head times out
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._response: UpstreamResponse | None = None  # None again when the exchange ends
        self._head_only = False  # HEAD: the answer ends with its head
        self._got_bytes = False
        # Bytes read since the last byte of body: the head (1xx heads included), then what brings no body (chunk
        # framing, trailers). Bounded by the pool's max_head (see data_received).
        self._head_bytes = 0
        self._fed = False  # body arrived in this read
        self._done = False  # the answer is complete
        self._keep_alive = False
        # Never reset: once true, the connection is not reused.
        self._garbage = False  # bytes after the answer
        self._close_delimited = False
        # The answer head so far: taken, and set afresh, when it is complete (so each exchange starts with them so).
        self._chunked = False  # transfer-encoding: chunked
        self._content_length: int | None = None
        self._reason = b""
        self._headers: Headers = []
        self._interim = False  # parsing a 1xx answer, which is skipped (reset when it ends)

    # -- exchange --

    def _send(self, data: bytes, head_only: bool, limit: TimeLimit) -> asyncio.Future[UpstreamResponse]:
        """Start an exchange: send `data`. The future gets the answer head, or fails once `limit` expires."""
        if self._closed:  # closed by the upstream before we could send (a slow loop sees this): nothing left
            if self._reused:
                raise _Stale()
            raise ConnectFailed(self._key, "closed by the upstream before the request was sent")
        waiter: asyncio.Future[UpstreamResponse] = self._loop.create_future()
        # The exchange's parse state, afresh.
        parser, self._spare = self._spare, None
        self._parser = parser if parser is not None else httptools.HttpResponseParser(self)
        self._head_waiter = waiter
        self._head_only = head_only
        self._got_bytes = self._done = self._fed = False
        self._head_bytes = 0
        self._limit = limit
        due = limit.due()
        if self._timer is None or due < self._timer_at:
            self._arm(due)
        self._transport.write(data)  # type: ignore[union-attr]  # set once connected, before any exchange
        return waiter

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(when, self._on_timer), when

    def _on_timer(self) -> None:
        """The head timeout: fail the exchange whose limit expired; re-arm for one still in time (lag of our
        own loop moves the limit, edged.looplag), or shortly while its answer waits unread in the socket."""
        self._timer = None
        waiter = self._head_waiter
        limit = self._limit
        if waiter is None or waiter.done() or self._closed or limit is None:
            return  # no exchange waits for its head: the next one arms the timer again
        now = self._loop.time()
        due = limit.due()
        if now < due:
            self._arm(due)
            return
        if limit.held(now) and self._answer_waiting():
            self._arm(now + GRACE)  # the upstream answered; our loop is behind
            return
        waiter.set_exception(UpstreamTimeout(self._key, f"no answer head within {limit.describe()}"))
        self._abort()

    def _answer_waiting(self) -> bool:
        """Bytes of the answer are in the socket, not yet read: the upstream answered, our loop is behind."""
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None:
            return False
        count = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, count, True)
        except (OSError, ValueError):
            return False
        return count[0] > 0

    def _end_exchange(self) -> None:
        """The answer is complete: keep the connection for the next request, or close it."""
        parser, self._parser = self._parser, None
        self._head_waiter = None
        response = self._response
        self._response = None
        if response is not None:  # response._finish(), inline: once per call
            response.complete = True
            response._conn = None
            if response._waiter is not None:
                response._wake()
        if self._keep_alive and not self._garbage and not self._close_delimited:
            # llhttp parses the next answer of a keep-alive connection where this one ended, except after a
            # HEAD (it would wait for the announced body): then the next exchange starts a new parser.
            if not self._head_only and _REUSE_PARSERS:
                self._spare = parser
            now = self._loop.time()  # once for both: the timer's and the idle time
            timer = self._timer
            if timer is not None and self._timer_at - now < _LAZY_TIMER:
                # Due soon with nothing to time (a health check's short timeout): it would only wake the loop.
                # One due later is left to lapse, so that calls at a steady rate do not set a timer each.
                timer.cancel()
                self._timer = None
            if self._read_paused:
                self._resume()
            self._pool._release(self, now)
        else:
            self._close()

    # -- transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop transports are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # nothing asked: the upstream talks out of turn
            self._abort()
            return
        self._got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error("upgrade answers are not supported")
            return
        except httptools.HttpParserError as exc:
            self._protocol_error(f"not an HTTP/1.x answer: {exc}")
            return
        if self._done:
            self._end_exchange()
        elif self._fed:  # a body still arriving, and some came: what came between its pieces does not add up
            self._fed = False
            self._head_bytes = 0
        else:  # the head is incomplete, or bytes that bring no body (framing, trailers): bounded like a head
            self._head_bytes += len(data)
            if self._head_bytes > self._pool._max_head:
                what = "answer head" if self._response is None else "answer framing without body"
                self._protocol_error(f"{what} over {self._pool._max_head} bytes")

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost settles the exchange

    def _expire_with(self, cert: dict) -> None:
        """The upstream is who its certificate says only until it expires: then this connection carries no new
        request (an idle one closes at once, a busy one after its exchange)."""
        left = cert_seconds_left(cert)
        if left is None:
            return
        self._expiry = self._loop.call_later(max(0.0, left), self._on_expiry)

    def _on_expiry(self) -> None:
        self._expiry = None
        self._expired = True
        if self._state == _IDLE:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._pool._drop(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            if self._reused and not self._got_bytes:
                waiter.set_exception(_Stale())
            else:
                detail = "connection closed before a full answer head"
                if exc is not None:
                    detail = f"{detail}: {exc}"
                waiter.set_exception(UpstreamReset(self._key, detail))
        response = self._response
        if response is not None and not self._done:
            if self._close_delimited:
                response._finish()
            else:
                response._fail(UpstreamReset(self._key, "connection closed mid-body"))
        self._response = None
        self._head_waiter = None
        self._parser = self._spare = None

    # -- parser callbacks --

    def on_message_begin(self) -> None:
        if self._done:
            self._garbage = True

    def on_status(self, status: bytes) -> None:
        self._reason += status  # once in all but a head split across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name in _NOTED:  # one set look-up for the common header that is neither
            if name == b"content-length":
                try:  # llhttp refuses a bad one first; a try costs nothing when it does not raise
                    self._content_length = int(value)
                except ValueError:
                    self._content_length = None
            else:
                self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        if self._done:
            return
        parser: httptools.HttpResponseParser = self._parser  # type: ignore[assignment]  # set for the exchange
        status = parser.get_status_code()
        headers = self._headers
        reason = self._reason
        content_length = self._content_length
        chunked = self._chunked
        self._headers = []
        self._reason = b""
        self._content_length = None
        self._chunked = False
        if status < 200:
            self._interim = True  # 1xx: skipped; the real answer follows
            return
        no_body = self._head_only or status == 204 or status == 304  # HEAD and 304 keep their announced length
        self._keep_alive = parser.should_keep_alive()
        self._close_delimited = not no_body and not chunked and content_length is None
        response = UpstreamResponse(
            status,
            reason,
            headers,
            None if (chunked or self._close_delimited) else content_length,
            self,
        )
        self._response = response
        if no_body:
            self._done = True  # HEAD, 204, 304: what follows is not ours
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._done:
            self._garbage = True
            return
        response = self._response
        if response is not None:  # the answer's buffer is fed here, inline: once per piece of body
            self._fed = True
            response._chunks.append(body)
            response._buffered += len(body)
            if response._buffered > _HIGH_WATER:
                self._pause()
            if response._waiter is not None:  # someone reads (else nothing to wake: the common whole answer)
                response._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._done = True

    # -- internals --

    def _protocol_error(self, detail: str) -> None:
        error = UpstreamProtocolError(self._key, detail)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self._response is not None:
            self._response._fail(error)
        self._response = None
        self._abort()

    def _pause(self) -> None:
        if not self._read_paused and self._transport is not None and not self._closed:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._read_paused and self._transport is not None and not self._closed:
            self._read_paused = False
            self._transport.resume_reading()

    def _close(self) -> None:
        self._pool._drop(self)
        if self._transport is not None and not self._closed:
            self._transport.close()

    def _abort(self) -> None:
        self._pool._drop(self)
        if self._transport is not None and not self._closed:
            self._transport.abort()


_TLS_CONNECTING = 2  # TLS handshakes in flight per target at most (see UpstreamPool._tls_turn)


class UpstreamTls:
    """How a pool speaks TLS to `https` targets: a client context, and a check of what each handshake proved."""

    __slots__ = ("check", "context")

    def __init__(self, context: ssl.SSLContext, check: Callable[[Target, dict | None], None]) -> None:
        self.context = context
        self.check = check  # raises (an EdgedError) when the verified certificate is not the one this target needs


class UpstreamPool:
    """Keep-alive connections per target (LIFO idle lists); `request` sends one request and returns its answer head.

    With `tls`, `https` targets are reached over TLS, each connection's certificate checked once, at connect:
    keep-alive then pays the handshake once per connection, not per request."""

    def __init__(
        self,
        *,
        max_idle_per_target: int = 32,
        idle_timeout: float = 30.0,
        body_timeout: float = 60.0,
        tls: UpstreamTls | None = None,
        max_head_bytes: int = MAX_HEAD_BYTES,
    ) -> None:
        self._tls = tls
        self._max_head = max_head_bytes  # an answer's head, interim ones included: see MAX_HEAD_BYTES
        self._connecting: dict[str, int] = {}  # TLS handshakes in flight per target
        self._turns: dict[str, collections.deque[asyncio.Future[None]]] = {}  # requests waiting for one to end
        self._max_idle = max_idle_per_target
        self._idle_timeout = idle_timeout
        self._body_timeout = body_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[str, list[_UpstreamConnection]] = {}
        self._busy: dict[str, int] = {}
        self._opened: dict[str, int] = {}
        self._conns: set[_UpstreamConnection] = set()
        self._host_headers: dict[str, bytes] = {}
        self._keys: dict[int, tuple[Target, str]] = {}  # id(target) -> (target, its key): see _key_of
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.stats()}>"

    async def request(
        self,
        target: Target,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        timeout: float,
        limit: float | None = None,
    ) -> UpstreamResponse:
        """Send `method path` (path includes the query) to `target`; returns once the answer head is in.
        Header names must be lower-case (as the parsers give them).

        `timeout` covers connect, send and the whole answer head, counting only the loop's own time: lag
        of the event loop meanwhile is added to it, but never past `limit` seconds from now (the caller's
        deadline; None = no bound). Raises ConnectFailed, UpstreamReset, UpstreamTimeout or
        UpstreamProtocolError. The caller must read the body to b"" or call discard().
        """
        known = self._keys.get(id(target))
        if known is not None and known[0] is target:
            key = known[1]
        else:
            key = self._key_of(target)
        if target.tls and self._tls is None:
            raise UpstreamProtocolError(key, "https upstreams not supported yet")
        if self._closed:
            raise ConnectFailed(key, "upstream pool is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = TimeLimit(loop, timeout, None if limit is None else now + (limit if limit > timeout else timeout))
        data = self._serialize(target, key, method, path, headers, body)
        head_only = method == "HEAD"
        try:
            conn = self._take_idle(key, now)
            if conn is not None:
                # The common case, inline rather than through _exchange: one coroutine less per call.
                try:
                    return await conn._send(data, head_only, deadline)
                except _Stale:
                    pass  # the upstream closed it while idle: send once more on a fresh connection
                except asyncio.CancelledError:
                    conn._abort()
                    raise
            if target.tls:
                # A turn to open a connection, or a connection that came free meanwhile (which may have gone stale).
                while (waited := await self._tls_turn(key, loop, deadline)) is not None:
                    try:
                        return await waited._send(data, head_only, deadline)
                    except _Stale:
                        continue
                    except asyncio.CancelledError:
                        waited._abort()
                        raise
                try:
                    conn = await self._connect(target, key, loop, deadline)
                finally:
                    self._tls_connected(key)
            else:
                conn = await self._connect(target, key, loop, deadline)
            return await self._exchange(conn, data, head_only, deadline)  # fresh: never _Stale
        finally:
            deadline.done()  # the head is in, or the try is over: its loop-lag meter may stop

    def _key_of(self, target: Target) -> str:
        """`target.key`, kept by the target object's id (with the target, so the id stays its own): the key is
        formatted once per target, not per request."""
        if len(self._keys) >= 4096:
            self._keys.clear()  # targets come and go with the registry: start over rather than keep the gone ones
        key = target.key
        self._keys[id(target)] = (target, key)
        return key

    async def _tls_turn(
        self, key: str, loop: asyncio.AbstractEventLoop, deadline: TimeLimit
    ) -> _UpstreamConnection | None:
        """A free connection to `key`, or None once this request may open one (a handshake costs milliseconds of
        CPU on both sides: a burst waits for the few handshakes in flight and for connections to come free,
        rather than starting one handshake per request)."""
        while self._connecting.get(key, 0) >= _TLS_CONNECTING:
            waiter = loop.create_future()
            self._turns.setdefault(key, collections.deque()).append(waiter)
            expired: list[bool] = []

            def ring(waiter: asyncio.Future[None] = waiter, expired: list[bool] = expired) -> None:
                expired.append(True)
                waiter.cancel()

            alarm = deadline.call_when_expired(ring)
            try:
                await waiter
            except asyncio.CancelledError:
                if not expired:
                    raise
                raise ConnectFailed(key, f"no connection came free within {deadline.describe()}") from None
            finally:
                alarm.cancel()
                turns = self._turns.get(key)
                if turns is not None and waiter in turns:
                    turns.remove(waiter)
            conn = self._take_idle(key, loop.time())
            if conn is not None:
                return conn
        self._connecting[key] = self._connecting.get(key, 0) + 1
        return None

    def _tls_connected(self, key: str) -> None:
        self._connecting[key] -= 1
        self._wake_turn(key)

    def _wake_turn(self, key: str) -> None:
        turns = self._turns.get(key)
        while turns:
            waiter = turns.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _exchange(
        self, conn: _UpstreamConnection, data: bytes, head_only: bool, deadline: TimeLimit
    ) -> UpstreamResponse:
        try:
            return await conn._send(data, head_only, deadline)
        except asyncio.CancelledError:
            conn._abort()
            raise

    async def _connect(
        self, target: Target, key: str, loop: asyncio.AbstractEventLoop, deadline: TimeLimit
    ) -> _UpstreamConnection:
        conn = _UpstreamConnection(self, key, loop)
        if target.kind == "unix":
            task = loop.create_task(loop.create_unix_connection(lambda: conn, target.path))
        elif target.tls and self._tls is not None:
            connect = loop.create_connection(
                lambda: conn, target.host, target.port, ssl=self._tls.context, server_hostname=target.host
            )
            task = loop.create_task(connect)
        else:
            task = loop.create_task(loop.create_connection(lambda: conn, target.host, target.port))
        timed_out = False

        def on_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel()

        timer = deadline.call_when_expired(on_timeout)
        try:
            await task
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result()[0].abort()  # connected just as we were cancelled
            if timed_out:
                raise ConnectFailed(key, f"connect timeout after {deadline.describe()}") from None
            raise
        except ssl.SSLError as exc:  # before OSError, of which it is one: say what TLS refused
            raise ConnectFailed(key, f"tls: {getattr(exc, 'verify_message', None) or exc.reason or exc}") from None
        except OSError as exc:
            detail = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectFailed(key, detail, refused=isinstance(exc, ConnectionRefusedError)) from None
        finally:
            timer.cancel()
        if target.tls and self._tls is not None:
            transport = conn._transport
            peercert = transport.get_extra_info("peercert") if transport is not None else None
            try:
                self._tls.check(target, peercert)
            except EdgedError as exc:
                conn._abort()
                raise ConnectFailed(key, f"tls: {exc}") from None
            if peercert:
                conn._expire_with(peercert)
        if self._closed:
            conn._abort()
            raise ConnectFailed(key, "upstream pool is closed")
        self._conns.add(conn)
        conn._state = _BUSY
        self._busy[key] = self._busy.get(key, 0) + 1
        self._opened[key] = self._opened.get(key, 0) + 1
        return conn

    def _serialize(self, target: Target, key: str, method: str, path: str, headers: Headers, body: bytes) -> bytes:
        full = target.base_path + path if target.base_path else path or "/"
        try:
            raw_path = full.encode("latin-1")  # round-trips what the server decoded as latin-1
        except UnicodeEncodeError:
            raw_path = full.encode("utf-8")
        parts = [method.encode("ascii"), b" ", raw_path, b" HTTP/1.1\r\n"]  # pieces: no %-format parse per call
        has_host = False
        for name, value in headers:  # lower-case names, as everywhere in edged
            if name in _FRAMED_OR_HOST:  # one set look-up for the common header
                if name != b"host":
                    continue  # framing: ours
                has_host = True
            parts += (name, b": ", value, b"\r\n")  # flat pieces, one join at the end: no tuple per header
        if not has_host:
            host = self._host_headers.get(key)
            if host is None:
                host = self._host_headers[key] = b"host: %s\r\n" % _encode_host(target.host_header)
            parts.append(host)
        if body or method in _BODY_METHODS:
            parts.append(b"content-length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        if body:
            parts.append(body)
        return b"".join(parts)

    # -- pool bookkeeping --

    def _take_idle(self, key: str, now: float) -> _UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            transport = conn._transport
            if conn._closed or transport is None or transport.is_closing():
                conn._state = _GONE
                continue
            if now - conn._idle_since > self._idle_timeout:  # the newest is stale, so all are
                conn._state = _GONE
                conn._close()
                for old in idle:
                    old._state = _GONE
                    old._close()
                idle.clear()
                return None
            conn._state = _BUSY
            conn._reused = True
            self._busy[key] += 1
            return conn
        return None

    def _release(self, conn: _UpstreamConnection, now: float) -> None:
        """`conn` is done with its exchange (at loop time `now`): idle for the next request, or closed."""
        if conn._state != _BUSY:
            return
        key = conn._key
        self._busy[key] -= 1
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = []
        if self._closed or conn._closed or conn._expired or len(idle) >= self._max_idle:
            conn._state = _GONE
            conn._close()
            return
        conn._state = _IDLE
        conn._idle_since = now
        idle.append(conn)
        if self._turns:
            self._wake_turn(key)
        if self._sweep_timer is None:
            delay = min(5.0, max(0.05, self._idle_timeout / 4))
            self._sweep_timer = conn._loop.call_later(delay, self._sweep_idle, delay)

    def _drop(self, conn: _UpstreamConnection) -> None:
        """Take `conn` out of the books (it is closing or closed)."""
        state = conn._state
        conn._state = _GONE
        if state == _BUSY:
            self._busy[conn._key] -= 1
        elif state == _IDLE:
            with contextlib.suppress(ValueError):
                self._idle[conn._key].remove(conn)
        if conn._closed:
            self._conns.discard(conn)

    def _sweep_idle(self, delay: float) -> None:
        self._sweep_timer = None
        if self._closed or self._loop is None:
            return
        cutoff = self._loop.time() - self._idle_timeout
        left = False
        for idle in self._idle.values():
            while idle and idle[0]._idle_since < cutoff:  # oldest first
                conn = idle.pop(0)
                conn._state = _GONE
                conn._close()
            left = left or bool(idle)
        if left:
            self._sweep_timer = self._loop.call_later(delay, self._sweep_idle, delay)

    def close_idle(self, key: str) -> None:
        """Close the idle connections to one target (what they were opened for no longer holds)."""
        for conn in self._idle.pop(key, ()):
            conn._state = _GONE
            conn._close()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per target key: idle and busy connections now, and connections opened in total."""
        return {
            key: {
                "idle": len(self._idle.get(key, ())),
                "busy": self._busy.get(key, 0),
                "opened": opened,
            }
            for key, opened in self._opened.items()
        }

    async def close(self) -> None:
        """Close every connection, idle or busy; requests in progress fail."""
        self._closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for idle in self._idle.values():
            for conn in idle:
                conn._state = _GONE
            idle.clear()
        conns = list(self._conns)
        for conn in conns:
            conn._abort()
        if conns:
            await asyncio.sleep(0)  # let connection_lost run
        self._conns.clear()


def _encode_host(host: str) -> bytes:
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        return host.encode("idna")
