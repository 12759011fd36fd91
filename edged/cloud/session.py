"""The MQTT session: one supervised broker connection (aiomqtt 2.x) with reconnect, resubscribe and an outbox.

The supervisor connects, subscribes to every declared filter, then runs the receive loop and the outbox
loop together: when the broker dies, the receive loop fails within milliseconds and takes the outbox loop
with it (a QoS 1 publish in flight would otherwise block until its timeout). It then waits with
exponential backoff and jitter, capped at `[mqtt] reconnect_max`, and tries again; it never busy-loops.

Brokers (`[mqtt] url` as a list): each failed try moves on to the next broker, and the backoff grows once
per round of them; a connection that was up and ended starts again from the first. While on another
broker, the session checks the first one every `[mqtt] switch_back` seconds (a TCP connect) and, once it
answers, leaves cleanly (no last will) and connects to it. Subscriptions and retained state are made again
on every connect, so nothing depends on the broker keeping a session. Subscriptions may change at run
time (`add_filter` / `remove_filter`): the live connection subscribes or unsubscribes at once.

aiomqtt and paho stay inside this module: callers see `Inbound` messages and `EdgedError` subclasses.

Hot path. aiomqtt's own QoS 0 publish waits for a writer callback a few loop turns later (0.25 ms a publish
here), and its message iterator makes a task per message; together about 0.7 ms of each cloud call. So, on
aiomqtt 2.x, the session hands QoS 0 publishes to its paho client and writes them at once (`loop_write`),
with paho's writer hook adding the writer at once too (see `_writer_hook`), and dispatches received messages
from paho's `on_message` callback directly; the connection's end is still seen through aiomqtt. Connect,
TLS, will, subscribe, QoS 1 and disconnect go through aiomqtt's public API. pyproject.toml pins the aiomqtt
and paho-mqtt minor versions this was tested with; without those internals (another aiomqtt, or
`fast_path=False`) the session falls back to the public API throughout, and says so in its log
(`mqtt.connected path=public`). Both paths are tested against a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..aio import cancel_and_wait
from ..config import MqttConfig
from ..errors import EdgedError
from ..identity import IdentityFiles
from ..lazy import defer_import
from ..logs import log_event
from .topics import topic_matches

# paho reads urllib.request only for a SOCKS proxy (with PySocks installed): importing it costs ~1 MiB of RSS
# (http.client, email). uuid only makes a client id when none is given (the session always gives one).
defer_import("urllib.request")
defer_import("uuid")

import aiomqtt  # noqa: E402  (after the deferral above)
import paho.mqtt as paho_mqtt  # noqa: E402
import paho.mqtt.client as paho_client  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

log = logging.getLogger("edged.cloud.session")

BACKOFF_BASE = 0.1  # seconds before the first reconnect try
STABLE_AFTER = 2.0  # a connection that lasted this long starts the backoff over
OP_TIMEOUT = 5.0  # CONNACK, SUBACK, PUBACK and clean DISCONNECT waits (aiomqtt's default is 10 s)
OUTBOX_SIZE = 1024  # queued QoS 1 publishes; more are dropped (state is re-published on every connect)
OUTBOX_BATCH = 64  # publishes awaited together, so one PUBACK round trip covers many
INCOMING_QUEUE = 10_000  # fallback path only: messages received and not yet dispatched; more are dropped
CONTENT_TYPE_CBOR = "application/cbor"


class SessionError(EdgedError):
    """The session cannot be set up (bad TLS files, unreadable password file, bad URL)."""


class PublishError(EdgedError):
    """A publish did not happen: not connected, or the broker did not take it in time."""


class _Reconfigured(Exception):
    """Raised inside a live connection to end it (cleanly) after `reconfigure` changed the broker list or
    the credentials."""


class _SwitchBack(Exception):
    """The first broker answers again: leave the fallback broker (cleanly) for it."""


@dataclass(frozen=True, slots=True)
class Inbound:
    """A received message, without library types. MQTT 5 response topic and correlation data when present."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class LastWill:
    """What the broker publishes for us when we vanish without a clean DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


Handler = Callable[[Inbound], None]


def pack_publish_properties(
    *, response_topic: str | None, correlation: bytes | None, expiry: int | None, content_type: str | None
) -> bytes:
    """MQTT 5 PUBLISH properties as wire bytes (length, then Message Expiry Interval 0x02, Content Type 0x03,
    Response Topic 0x08, Correlation Data 0x09): paho's Properties class costs ~70 us per publish here."""
    body = bytearray()
    if expiry:
        body += b"\x02" + struct.pack("!I", expiry)
    for ident, value in ((0x03, content_type), (0x08, response_topic)):
        if value:
            raw = value.encode("utf-8")
            body += bytes((ident,)) + struct.pack("!H", len(raw)) + raw
    if correlation:
        body += b"\x09" + struct.pack("!H", len(correlation)) + correlation
    size, length = len(body), bytearray()
    while True:  # variable byte integer
        byte, size = size % 128, size // 128
        length.append(byte | 0x80 if size else byte)
        if not size:
            break
    return bytes(length + body)


class _PackedProperties(Properties):
    """Properties that paho only asks to `pack()` (QoS 0 publish): already packed, nothing else."""

    def __init__(self, packed: bytes, text: str) -> None:  # no super().__init__: that is the slow part
        object.__setattr__(self, "_packed", packed)
        object.__setattr__(self, "_text", text)

    def pack(self) -> bytes:
        return self._packed  # type: ignore[attr-defined]

    def __str__(self) -> str:  # paho logs properties at debug level
        return self._text  # type: ignore[attr-defined]


def backoff_delay(attempt: int, cap: float, rng: random.Random, base: float = BACKOFF_BASE) -> float:
    """Seconds to wait before reconnect try `attempt` (0-based): exponential, capped, with "equal jitter"
    (half fixed, half random), so that a fleet does not reconnect in lockstep after a broker restart."""
    delay = min(cap, base * 2.0 ** min(attempt, 32))
    return delay / 2 + rng.random() * delay / 2


def broker_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of `mqtt://host[:1883]` or `mqtts://host[:8883]`."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise SessionError(f"expected an mqtt:// or mqtts:// URL, got {url!r}")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise SessionError(f"bad port in {url!r}") from None
    return parts.hostname, port, tls


async def run_together(*coros: Coroutine[Any, Any, Any]) -> None:
    """Run coroutines as one group: the first to end or fail cancels the others, and all are awaited.

    The exception of the first one that failed is raised (Python 3.10 has no TaskGroup).
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


class MqttSession:
    """One client connection to the broker, kept up by a supervisor task that `start()` creates and
    `close()` cancels and awaits.

    Declare subscriptions with `subscribe()` before `start()`; they are made again on every connect.
    `on_connected()` runs once the subscriptions are in place (post retained state there);
    `on_disconnected(reason)` runs when a live connection ends.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str,
        will: LastWill | Callable[[], LastWill] | None = None,  # a callable: made anew for each connection
        on_connected: Callable[[], None] | None = None,
        on_disconnected: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        fast_path: bool = True,
        max_message: int = 1 << 20,
        on_limit: Callable[[str], None] | None = None,
        identity: IdentityFiles | None = None,
    ) -> None:
        self.config = config
        self._identity = identity  # mqtts:// without cert_file: the node certificate is the client certificate
        self._fast_path = fast_path  # False: aiomqtt's public API only (the fallback, forced)
        self.path = ""  # "paho" or "public": how the live connection publishes and receives
        self.max_message = max_message  # larger incoming messages are dropped (MQTT 5: the broker is told)
        self._on_limit = on_limit
        self.dropped_large = 0
        self._brokers = [broker_address(url) for url in config.urls]
        self._index = 0  # the broker of the current (or next) try
        self.host, self.port, self.tls = self._brokers[0]
        self.client_id = client_id
        self.v5 = config.protocol == "5"
        self._will = will
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._rng = rng or random.Random()
        self._subs: dict[str, int] = {}  # filter -> QoS
        self._subs_changed = asyncio.Event()
        self._reconnect = asyncio.Event()  # set by `reconfigure`: the live connection ends, the next one is new
        self._routes: list[tuple[str, Handler]] = []
        self._client: aiomqtt.Client | None = None
        self._paho: paho_client.Client | None = None  # the fast path (see the module doc), while connected
        self._outbox: asyncio.Queue[tuple[str, bytes, int, bool]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._up = asyncio.Event()
        self._warned_internals = False
        # Counters, read by telemetry.
        self.connects = 0
        self.failed_connects = 0
        self.dropped_posts = 0
        self.handler_errors = 0
        self.last_error = ""

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"down ({self.last_error or 'not started'})"
        return f"<MqttSession {self.client_id} {self.host}:{self.port} {state} connects={self.connects}>"

    @property
    def broker(self) -> str:
        """The URL of the broker in use (or tried next)."""
        return self.config.urls[self._index]

    # -- setup --------------------------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        """Route messages matching `topic_filter` to `handler` (called on the event loop; must not block)."""
        if self._task is not None:
            raise SessionError("subscriptions must be declared before start()")
        self.route(topic_filter, handler)
        self.add_filter(topic_filter, qos)

    def route(self, topic_filter: str, handler: Handler) -> None:
        """Hand messages matching `topic_filter` to `handler`, without subscribing to it: one route may serve
        many narrower filters added at run time (each route costs a match per message received)."""
        if self._task is not None:
            raise SessionError("routes must be declared before start()")
        self._routes.append((topic_filter, handler))

    def add_filter(self, topic_filter: str, qos: int = 0) -> None:
        """Subscribe to `topic_filter` (now when connected, and on every connect); a route must match it."""
        if self._subs.get(topic_filter, -1) < qos:
            self._subs[topic_filter] = qos
            self._subs_changed.set()

    def remove_filter(self, topic_filter: str) -> None:
        """Stop subscribing to `topic_filter` (unsubscribe now when connected)."""
        if self._subs.pop(topic_filter, None) is not None:
            self._subs_changed.set()

    def reconfigure(self, config: MqttConfig) -> None:
        """A reload: the new broker list, credentials and TLS files are used from the next connect. When any of
        them changed, a live connection ends now (cleanly: no last will) and the session connects to the first
        broker of the new list."""
        def conn(c: MqttConfig) -> tuple:
            return (c.urls, c.username, c.password_file, c.ca_file, c.cert_file, c.key_file)

        changed = conn(config) != conn(self.config)
        self.config = config
        self._brokers = [broker_address(url) for url in config.urls]
        if changed:
            self._index = 0
            self._reconnect.set()
        elif self._index >= len(self._brokers):
            self._index = 0

    async def _watch_reconnect(self) -> None:
        await self._reconnect.wait()
        raise _Reconfigured()

    @property
    def filters(self) -> dict[str, int]:
        """The filters subscribed on every connect, with their QoS."""
        return dict(self._subs)

    def start(self) -> None:
        """Start the supervisor. Returns at once: the broker may well be down."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name="edged-mqtt-session")

    async def close(self, timeout: float = 3.0) -> None:
        """Disconnect cleanly (no last will) and stop the supervisor; bounded even with a hung broker."""
        self._closing = True
        task = self._task
        if task is None:
            return
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:  # the clean DISCONNECT is stuck on a hung broker: cut it short
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        self._task = None

    # -- state --------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and subscribed: calls can be sent and answers will arrive."""
        return self._up.is_set()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Whether the session is (or becomes, within `timeout`) connected."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self.connected

    # -- sending ------------------------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry: float | None = None,
        timeout: float = OP_TIMEOUT,
    ) -> None:
        """Publish now on the live connection; PublishError when disconnected or not taken within `timeout`.

        On MQTT 5, `response_topic`, `correlation` and `expiry` (seconds, rounded up) go into the standard
        properties; on 3.1.1 they are left out (the envelope carries them anyway).
        """
        client = self._client
        if client is None or not self._up.is_set():
            raise PublishError("broker disconnected")
        wants_props = self.v5 and bool(response_topic or correlation or expiry)
        expiry_s = max(1, math.ceil(expiry)) if expiry else None
        paho = self._paho
        if qos == 0 and paho is not None:
            fast_props = None
            if wants_props:
                packed = pack_publish_properties(
                    response_topic=response_topic,
                    correlation=correlation,
                    expiry=expiry_s,
                    content_type=CONTENT_TYPE_CBOR,
                )
                fast_props = _PackedProperties(packed, f"[ResponseTopic={response_topic}, expiry={expiry_s}]")
            try:
                info = paho.publish(topic, payload, 0, retain, fast_props)
                if info.rc == paho_client.MQTT_ERR_SUCCESS:
                    paho.loop_write()  # send now; what the socket cannot take yet, the writer callback sends
            except (OSError, ValueError) as exc:  # ValueError: a topic paho refuses
                raise PublishError(str(exc)) from None
            if info.rc != paho_client.MQTT_ERR_SUCCESS:
                raise PublishError(paho_client.error_string(info.rc))
            return
        props = None
        if wants_props:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
            if expiry_s:
                props.MessageExpiryInterval = expiry_s
            props.ContentType = CONTENT_TYPE_CBOR
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, properties=props, timeout=timeout)
        except aiomqtt.MqttError as exc:
            raise PublishError(str(exc) or type(exc).__name__) from None

    def post(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Queue a publish for the outbox loop (state, telemetry). Dropped (False) while disconnected or
        when the outbox is full: retained state is posted again on every connect."""
        outbox = self._outbox
        if outbox is None:
            return False
        try:
            outbox.put_nowait((topic, payload, qos, retain))
        except asyncio.QueueFull:
            self.dropped_posts += 1
            return False
        return True

    # -- the supervisor -----------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        while not self._closing:
            self.host, self.port, self.tls = self._brokers[self._index]
            started = time.monotonic()
            was_up = False
            try:
                was_up = await self._connect_and_serve()
                reason = "connection ended"
            except asyncio.CancelledError:
                self._mark_down("closing")
                raise
            except _Reconfigured:
                self._mark_down("reconfigured")
                log_event(log, logging.INFO, "mqtt.reconfigured", broker=self.config.urls[0], left=self.broker)
                self._index, attempt = 0, 0
                continue
            except _SwitchBack:
                self._mark_down(f"switching back to {self.config.urls[0]}")
                log_event(log, logging.INFO, "mqtt.switch_back", broker=self.config.urls[0], left=self.broker)
                self._index, attempt = 0, 0
                continue
            except (aiomqtt.MqttError, OSError, EdgedError, ssl.SSLError) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug must not end the session for good: log it, back off, retry
                log.exception("MQTT session failed unexpectedly")
                reason = f"{type(exc).__name__}: {exc}"
            was_up = self._mark_down(reason) or was_up
            if self._closing:
                break
            if was_up and time.monotonic() - started >= STABLE_AFTER:
                attempt = 0
            if not was_up:
                self.failed_connects += 1
            # The backoff grows once per round of brokers: a dead first broker delays the second by one step.
            delay = backoff_delay(attempt // len(self._brokers), self.config.reconnect_max, self._rng)
            broker = self.broker
            if was_up or attempt == 0:
                log_event(log, logging.WARNING, "mqtt.down", broker=broker, reason=reason, retry_in=delay)
            else:
                log_event(
                    log,
                    logging.DEBUG,
                    "mqtt.retry",
                    broker=broker,
                    reason=reason,
                    attempt=attempt,
                    retry_in=round(delay, 3),
                )
            # A connection that was up starts the round again from the first broker; a failed try moves on.
            self._index = 0 if was_up else (self._index + 1) % len(self._brokers)
            attempt += 1
            await asyncio.sleep(delay)

    async def _connect_and_serve(self) -> bool:
        """One connection, from CONNECT to its end. Returns (or raises) when it ends; True if it was up."""
        self._reconnect.clear()  # this connection is made with the config in force now
        password, tls_context = await asyncio.to_thread(self._load_secrets)
        will = None
        if self._will is not None:
            w = self._will() if callable(self._will) else self._will
            will = aiomqtt.Will(w.topic, w.payload, qos=w.qos, retain=w.retain)
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.config.username,
            password=password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self.v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=None if self.v5 else True,
            keepalive=max(5, int(self.config.keepalive)),
            timeout=OP_TIMEOUT,
            tls_context=tls_context,
            # Nagle + delayed ACK add 40-90 ms to every QoS 1 round trip (FIELD-NOTES): paho never sets it.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            max_queued_incoming_messages=INCOMING_QUEUE,
            properties=self._connect_properties(),
            logger=log,
        )
        # The outbox awaits up to OUTBOX_BATCH publishes together by design; aiomqtt's default threshold (10)
        # warned "There are N pending publish calls" for each one over it at every start. Over twice the
        # batch something else is piling up, and that warning is worth having.
        client.pending_calls_threshold = 2 * OUTBOX_BATCH
        paho = getattr(client, "_client", None)
        fast = isinstance(paho, paho_client.Client) and isinstance(
            getattr(client, "_disconnected", None), asyncio.Future
        )
        if self._fast_path and not fast and not self._warned_internals:
            self._warned_internals = True
            log_event(
                log,
                logging.WARNING,
                "mqtt.public_api_only",
                aiomqtt=getattr(aiomqtt, "__version__", "unknown"),
                paho=getattr(paho_mqtt, "__version__", "unknown"),
                detail="this aiomqtt has not the internals of the pinned one: QoS 0 calls are slower",
            )
        fast = fast and self._fast_path
        if fast:
            paho.on_message = self._on_paho_message  # type: ignore[union-attr]
            paho.on_socket_register_write = self._writer_hook(client)  # type: ignore[union-attr]
        async with client:
            # The outbox exists before subscribing: retained messages may be dispatched before SUBACK's
            # waiter resumes, and their handlers may post (a stale entry of ours to delete).
            outbox: asyncio.Queue[tuple[str, bytes, int, bool]] = asyncio.Queue(OUTBOX_SIZE)
            self._client, self._outbox = client, outbox
            subscribed = dict(self._subs)
            if subscribed:
                granted = await client.subscribe(list(subscribed.items()))
                self._check_granted(list(subscribed), granted)
            self._paho = paho if fast else None
            self.path = "paho" if fast else "public"
            self.connects += 1
            self.last_error = ""
            self._up.set()
            log_event(log, logging.INFO, "mqtt.connected", broker=self.broker, client_id=self.client_id, path=self.path)
            if self._on_connected is not None:
                try:
                    self._on_connected()
                except Exception:
                    log.exception("on_connected hook failed")
            loops = [self._receive(client), self._drain(client, outbox), self._follow_filters(client, subscribed)]
            loops.append(self._watch_reconnect())
            if self._index > 0:
                loops.append(self._watch_first())
            await run_together(*loops)
        return True

    async def _follow_filters(self, client: aiomqtt.Client, subscribed: dict[str, int]) -> None:
        """Subscribe and unsubscribe on the live connection as the filters change (`add_filter`)."""
        while True:
            if subscribed == self._subs:
                self._subs_changed.clear()
                await self._subs_changed.wait()
                continue
            want = dict(self._subs)
            gone = [f for f in subscribed if f not in want]
            new = [(f, q) for f, q in want.items() if subscribed.get(f, -1) < q]
            if gone:
                await client.unsubscribe(gone, timeout=OP_TIMEOUT)
            if new:
                granted = await client.subscribe(new, timeout=OP_TIMEOUT)
                self._check_granted([f for f, _ in new], granted)
            subscribed.clear()
            subscribed.update(want)

    async def _watch_first(self) -> None:
        """On a fallback broker: end this connection (`_SwitchBack`) once the first broker accepts TCP."""
        host, port, _ = self._brokers[0]
        while True:
            await asyncio.sleep(self.config.switch_back)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), OP_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                continue
            writer.close()
            raise _SwitchBack()

    def _check_granted(self, filters: list[str], granted: Any) -> None:
        """A broker may refuse a subscription (ACL): say which, loudly; the rest still works."""
        for topic_filter, code in zip(filters, granted, strict=False):
            value = getattr(code, "value", code)
            if isinstance(value, int) and value >= 0x80:
                log_event(log, logging.ERROR, "mqtt.subscribe_refused", filter=topic_filter, code=str(code))

    def _mark_down(self, reason: str) -> bool:
        """Forget the connection; tell the owner if it was up. Returns whether it was up."""
        was_up = self._up.is_set()
        self._up.clear()
        self._client = None
        self._paho = None
        self.path = ""
        self._outbox = None
        self.last_error = reason
        if was_up and self._on_disconnected is not None:
            try:
                self._on_disconnected(reason)
            except Exception:
                log.exception("on_disconnected hook failed")
        return was_up

    def _load_secrets(self) -> tuple[str | None, ssl.SSLContext | None]:
        """Read the password file and build the TLS context (in a thread: both touch the disk)."""
        password = None
        cfg = self.config
        if cfg.password_file:
            try:
                with open(cfg.password_file, encoding="utf-8") as f:
                    password = f.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise SessionError(f"cannot read mqtt.password_file {cfg.password_file}: {exc}") from None
        context = None
        if self.tls:
            cert, key, ca = cfg.cert_file, cfg.key_file, cfg.ca_file
            if cert is None and self._identity is not None and self._identity.present():
                # Read at every connect: a renewed certificate is used from the next connection on.
                cert, key, ca = self._identity.cert, self._identity.key, ca or self._identity.ca
            try:
                context = ssl.create_default_context(cafile=ca)
                if cert:
                    context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                detail = f"TLS setup failed (ca_file, cert_file, key_file, or the node identity): {exc}"
                raise SessionError(detail) from None
        elif cfg.cert_file or cfg.ca_file:
            log.warning("mqtt.ca_file / cert_file are set but the URL is mqtt://: TLS is off (use mqtts://)")
        return password, context

    # -- the loops of one connection ----------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        if self._paho is not None:
            # Messages are dispatched by _on_paho_message; here we only wait for the connection's end
            # (asyncio.wait does not cancel aiomqtt's future when this task is cancelled).
            ended = client._disconnected
            await asyncio.wait([ended])
            ended.result()  # raises the reason of an unexpected disconnection
            return
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes):
                payload = b"" if payload is None else str(payload).encode()
            self._dispatch(message.topic.value, payload, bool(message.retain), message.properties)

    def _writer_hook(self, client: aiomqtt.Client) -> Callable[..., None]:
        """paho's on_socket_register_write, adding the writer at once when on the loop thread.

        aiomqtt adds it with call_soon_threadsafe, that is later; after a `loop_write()` of ours had already
        sent the packet and paho had unregistered, that late writer would stay registered and forgotten (a
        busy loop, then a poll handle on a closed socket, which makes uvloop abort).
        """
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def register(paho: paho_client.Client, _userdata: object, sock: Any) -> None:
            def writable() -> None:
                try:
                    paho.loop_write()
                except Exception as exc:  # as aiomqtt does: a broken socket ends the connection
                    ended = client._disconnected
                    if not ended.done():
                        ended.set_exception(exc)

            if threading.get_ident() == loop_thread:
                loop.add_writer(sock.fileno(), writable)
            else:  # paho's connect runs in aiomqtt's executor thread
                loop.call_soon_threadsafe(loop.add_writer, sock.fileno(), writable)

        return register

    def _on_paho_message(self, _client: object, _userdata: object, message: paho_client.MQTTMessage) -> None:
        """paho's callback, on the event loop (inside aiomqtt's reader): dispatch at once."""
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return
        self._dispatch(topic, message.payload, bool(message.retain), getattr(message, "properties", None))

    def _connect_properties(self) -> Any:
        """MQTT 5 CONNECT properties: Maximum Packet Size, so the broker drops what we would refuse anyway
        (before it crosses the network or fills paho's buffer). MQTT 3.1.1 has no way to say it."""
        if not self.v5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = self.max_message + 4096  # the payload plus a fixed header, topic and properties
        return props

    def _dispatch(self, topic: str, payload: bytes, retain: bool, props: Any) -> None:
        if len(payload) > self.max_message:
            # Never handed on, so never kept (a retained one would come back at every start).
            self.dropped_large += 1
            if self._on_limit is not None:
                self._on_limit("mqtt_message")
            log.warning("MQTT message on %s dropped: %d bytes, over %d", topic, len(payload), self.max_message)
            return
        inbound = Inbound(
            topic=topic,
            payload=payload,
            retain=retain,
            response_topic=getattr(props, "ResponseTopic", None) if props is not None else None,
            correlation=getattr(props, "CorrelationData", None) if props is not None else None,
        )
        for topic_filter, handler in self._routes:
            if topic_matches(topic_filter, topic):
                try:
                    handler(inbound)
                except Exception:  # a handler's bug must not break the connection (paho would re-raise)
                    self.handler_errors += 1
                    log.exception("handler for %s failed on %s", topic_filter, topic)

    async def _drain(self, client: aiomqtt.Client, outbox: asyncio.Queue[tuple[str, bytes, int, bool]]) -> None:
        while True:
            batch = [await outbox.get()]
            while not outbox.empty() and len(batch) < OUTBOX_BATCH:
                batch.append(outbox.get_nowait())
            # No deadline on the PUBACK: while a reconnect delivers thousands of retained messages, it can
            # take longer than any fixed wait, and ending the connection for it starts the same burst again
            # (a livelock seen with 1,000 boxes). A dead connection is found by the keepalive instead, and
            # its end cancels this loop.
            results = await asyncio.gather(
                *(client.publish(t, p, qos=q, retain=r, timeout=math.inf) for t, p, q, r in batch),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result  # the connection is unusable: end it, the supervisor reconnects

