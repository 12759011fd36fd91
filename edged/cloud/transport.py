"""The cloud transport: a try routed to the cloud tier becomes an MQTT request, its answer comes back by id.

Request: CBOR envelope published (QoS 0) to `{prefix}/{fleet}/svc/{service}/req`; the answer arrives on
this node's `reply/{node}` topic and is matched by correlation id. QoS 0 on purpose: the router's per-try
timeout and retries are the reliability layer, and a QoS 1 redelivery after a reconnect could run a POST
twice. While the broker is down, or no live node serves the service (the registry says so: see liveness.py),
`unavailable(endpoint)` says why and the router skips the endpoint instead of waiting;
calls in flight when the connection drops cannot get their answer on it (`fail_all`): an idempotent one is
sent again as soon as the session is up again (the next broker of `[mqtt] url`), within what is left of its
try, at most `RESENDS` times; the others fail at once (`reset`), so the router fails over right away.

Signed (`signing.py`, when this node has an identity): each request is MAC'd to every node known to serve
the service, under the key of each pair (`pairing.py`; sealed with the node's key when one of them is not
known yet), and an answer is taken only when it is MAC'd or sealed by a node of this fleet that serves the
service (it has a sealed registry entry saying so): an answer forged by any other client of the broker is
dropped, and the call waits for the real one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus

from ..call import Call
from ..errors import ConnectFailed, UpstreamReset, UpstreamTimeout
from ..identity import PeerName
from ..looplag import TimeLimit
from ..model import IDEMPOTENT_METHODS, Endpoint
from .envelope import CloudAnswer, CloudRequest, EnvelopeError, decode_answer, encode_request, error_answer
from .session import MqttSession, PublishError
from .signing import SealError, Seals
from .telemetry import CloudMetrics
from .topics import Topics

log = logging.getLogger("edged.cloud.transport")

RESENDS = 2  # times a call is sent again after its connection dropped (a broker dies, the next one too)
MIN_RESEND = 0.05  # seconds of the try that must be left to send it again
HEARD_WAIT = 1.0  # seconds a resend waits for a provider of the service to be heard on the new connection
HEARD_POLL = 0.02

# Set by the router on every try; the envelope carries them as fields (`rid`, `deadline`) instead.
_ENVELOPE_FIELDS = frozenset({b"x-request-id", b"x-edged-timeout-ms"})


class MqttAnswer:
    """An answer that came over MQTT, whole: the router and the API read it like an HTTP answer."""

    __slots__ = ("_body", "complete", "content_length", "headers", "reason", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        try:
            self.reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            self.reason = b""
        self.headers = headers
        self.content_length: int | None = len(body)
        self.complete = True  # the whole body is here: the API answers with one write
        self._body = body

    def __repr__(self) -> str:
        return f"<MqttAnswer {self.status} {self.content_length} bytes>"

    @classmethod
    def error(cls, status: int, code: str, detail: object) -> MqttAnswer:
        """An answer made here, with the mesh's JSON error body (413 too_large)."""
        body = json.dumps({"error": code, "detail": detail}).encode()
        return cls(status, [(b"content-type", b"application/json")], body)

    async def read(self) -> bytes:
        body, self._body = self._body, b""
        return body

    def take(self) -> bytes:
        body, self._body = self._body, b""
        return body

    def discard(self) -> None:
        self._body = b""


class CloudTransport:
    """The router's transport for tier "cloud". Subscribes to its reply topic on the given session."""

    def __init__(
        self,
        session: MqttSession,
        topics: Topics,
        node: str,
        *,
        max_payload: int,
        metrics: CloudMetrics,
        on_timeout: Callable[[str, str, float], None] = lambda tenant, service, waited: None,
        on_answer: Callable[[str], None] = lambda node: None,
        unreachable: Callable[[str, str], str | None] = lambda tenant, service: None,
        seals: Seals | None = None,
        serves: Callable[[str, str, str], bool] = lambda node, tenant, service: True,
        providers: Callable[[str, str], Iterable[str]] = lambda tenant, service: (),
        heard: Callable[[str, str], bool] = lambda tenant, service: True,
    ) -> None:
        self._heard = heard  # whether a provider of (tenant, service) was heard on the current connection
        self._session = session
        self._seals = seals  # None: unsigned (no node identity): answers are taken from anyone
        self._serves = serves  # whether a node (of this fleet) serves (tenant, service): its answers count
        self._providers = providers  # the nodes known to serve (tenant, service): a request is MAC'd to each
        self._on_timeout = on_timeout  # passive liveness: (tenant, service) got no answer in `waited` s
        self._on_answer_from = on_answer  # ... and an answer came from this node
        self._unreachable = unreachable  # why no live node serves (tenant, service) now, or None
        self._topics = topics
        self._node = node
        self._reply = topics.reply(node)
        self._max_payload = max_payload
        self._metrics = metrics
        self._pending: dict[bytes, asyncio.Future[CloudAnswer]] = {}
        self._calls: dict[bytes, tuple[str, str]] = {}  # id -> (tenant, service) of the call, to check who answers
        # Ids: a random prefix per process (a restarted daemon ignores answers meant for its past life),
        # then a counter.
        self._id_prefix = os.urandom(6)
        self._seq = itertools.count(1)
        session.subscribe(self._reply, self._on_answer, qos=0)

    def __repr__(self) -> str:
        return f"<CloudTransport {self._reply} pending={len(self._pending)} up={self._session.connected}>"

    @property
    def pending(self) -> int:
        """Calls waiting for their answer."""
        return len(self._pending)

    def unavailable(self, endpoint: Endpoint) -> str | None:
        """Skip the endpoint now when the broker is down, or when every node known to serve the service is
        dead (the registry says so: a call would only wait for its per-try timeout)."""
        if not self._session.connected:
            return "broker disconnected"
        return self._unreachable(endpoint.tenant, endpoint.service)

    async def send(
        self, endpoint: Endpoint, call: Call, headers: list[tuple[bytes, bytes]], timeout: float
    ) -> MqttAnswer:
        """One try over MQTT; raises ConnectFailed (not sent), UpstreamTimeout or UpstreamReset (broker lost).
        An idempotent call whose connection dropped while it waited is sent again once the session is back
        (see the module doc)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        resends = 0
        while True:
            try:
                return await self._send_once(endpoint, call, headers, timeout - (loop.time() - started))
            except UpstreamReset:
                if resends >= RESENDS or call.method not in IDEMPOTENT_METHODS:
                    raise
                left = min(timeout - (loop.time() - started), call.deadline - time.monotonic())
                if left < MIN_RESEND or not await self._session.wait_connected(left):
                    raise
                # A request sent before any provider subscribed on the new broker is lost (QoS 0, nobody to
                # tell): wait until one is heard on this connection (its retained entry, or the entries it
                # posts once subscribed), a moment at most.
                polls = int(min(HEARD_WAIT, timeout - (loop.time() - started) - MIN_RESEND) / HEARD_POLL)
                for _ in range(max(0, polls)):  # polled: the registry has no per-service event to wait on
                    if self._heard(call.tenant, endpoint.service):
                        break
                    await asyncio.sleep(HEARD_POLL)
                if timeout - (loop.time() - started) < MIN_RESEND:
                    raise
                resends += 1
                self._metrics.resends.inc()

    async def _send_once(
        self, endpoint: Endpoint, call: Call, headers: list[tuple[bytes, bytes]], timeout: float
    ) -> MqttAnswer:
        if not self._session.connected:
            raise ConnectFailed(endpoint.url, "broker disconnected")
        cid = self._id_prefix + next(self._seq).to_bytes(8, "big")
        request = CloudRequest(
            id=cid,
            reply=self._reply,
            method=call.method,
            path=call.path,
            headers=tuple(h for h in headers if h[0] not in _ENVELOPE_FIELDS),
            body=call.body,
            deadline_ms=max(1, int(timeout * 1000)),
            tenant=call.tenant,
            service=endpoint.service,
            node=self._node,
            request_id=call.request_id,
            sent_ms=int(time.time() * 1000) if self._seals is not None else 0,
            app=call.app if self._seals is not None else "",  # a claim only a sealed request makes
        )
        topic = self._topics.request(endpoint.service)
        payload = encode_request(request)
        if self._seals is not None:
            payload = self._seals.seal_to(topic, payload, self._recipients(call.tenant, endpoint.service))
        if len(payload) > self._max_payload:
            self._metrics.too_large.inc()
            detail = f"request of {len(payload)} bytes is over the MQTT limit of {self._max_payload} (mqtt.max_payload)"
            return MqttAnswer.error(413, "too_large", detail)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CloudAnswer] = loop.create_future()
        self._pending[cid] = future
        self._calls[cid] = (call.tenant, endpoint.service)
        # The bridge has `timeout`; our own loop's lag is added back (an answer that came in time but was
        # read late is not a timeout), never past the caller's deadline.
        limit = TimeLimit(loop, timeout, loop.time() + max(timeout, call.deadline - time.monotonic()))
        timer = limit.call_when_expired(lambda: self._expire(cid, future, endpoint, call.tenant, limit))
        try:
            try:
                await self._session.publish(
                    topic,
                    payload,
                    qos=0,
                    response_topic=self._reply,
                    correlation=cid,
                    expiry=timeout,
                    timeout=timeout,
                )
            except PublishError as exc:
                raise ConnectFailed(endpoint.url, f"not published: {exc}") from None
            self._metrics.requests.inc()
            answer = await future
        finally:
            timer.cancel()
            limit.done()
            self._pending.pop(cid, None)
            self._calls.pop(cid, None)
        return MqttAnswer(answer.status, list(answer.headers), answer.body)

    def _recipients(self, tenant: str, service: str) -> list[PeerName]:
        fleet = self._topics.fleet
        return [PeerName(fleet, node) for node in self._providers(tenant, service)]

    def fail_all(self, reason: str) -> None:
        """The connection dropped: calls in flight will get no answer; let the router move on now."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(UpstreamReset("mqtt", reason))

    def _expire(
        self, cid: bytes, future: asyncio.Future[CloudAnswer], endpoint: Endpoint, tenant: str, limit: TimeLimit
    ) -> None:
        self._pending.pop(cid, None)  # an answer after this is late: dropped and counted
        if not future.done():
            if self._seals is not None:  # a bridge that restarted has forgotten our certificate: send it again
                self._seals.unack(self._recipients(tenant, endpoint.service))
            self._metrics.timeouts.inc()
            future.set_exception(UpstreamTimeout(endpoint.url, f"no answer over MQTT within {limit.describe()}"))
            self._on_timeout(tenant, endpoint.service, limit.timeout)

    def _on_answer(self, message) -> None:
        payload, sender = message.payload, None
        if self._seals is not None:
            try:
                sender, payload = self._seals.open(message.topic, payload, macs=True)
            except SealError as exc:
                self._refused(message.topic, str(exc))
                return
        try:
            answer = decode_answer(payload)
        except EnvelopeError as exc:
            self._metrics.bad_answers.inc()
            log.debug("dropped a bad answer on %s: %s", message.topic, exc)
            if exc.id is not None and self._may_answer(exc.id, sender, message.topic):
                future = self._pending.pop(exc.id, None)
                if future is not None and not future.done():
                    # The call fails now, as with a bad gateway (the router may try the next endpoint).
                    future.set_result(error_answer(exc.id, 502, "bad_answer", str(exc)[:200]))
            return
        future = self._pending.get(answer.id)
        if future is None or future.done():
            self._metrics.late_answers.inc()
            return
        if not self._may_answer(answer.id, sender, message.topic):
            return  # forged: the call keeps waiting for its real answer
        del self._pending[answer.id]
        future.set_result(answer)
        self._on_answer_from(sender.node if sender is not None else answer.node)

    def _may_answer(self, cid: bytes, sender, topic: str) -> bool:
        """Whether `sender` (verified; None when unsigned) may answer call `cid`: a node of this fleet that
        serves the call's service."""
        if sender is None:
            return True
        tenant, service = self._calls.get(cid, ("", ""))
        if sender.fleet == self._topics.fleet and self._serves(sender.node, tenant, service):
            return True
        self._refused(topic, f"{sender.fleet}/{sender.node} does not serve {tenant}/{service}")
        return False

    def _refused(self, topic: str, why: str) -> None:
        self._metrics.unsealed.inc(("answer",))
        log.debug("answer on %s refused: %s", topic, why)
