"""`edged bridge`: the cloud side of cloud calls.

Subscribes with a shared subscription, `$share/{group}/{prefix}/+/svc/+/req`, so that several bridges of one
group share the load (the broker hands each request to one of them). Each request is routed like a call
that entered a daemon, by the same pieces (the same `MeshCore`: manifests -> registry -> health checks ->
policy -> router), but restricted to the local tier (`Call.tiers`), over the pooled HTTP client. The answer
is published to the request's reply topic with its correlation id.

Every group gets its own copy of each request, and within a group the broker picks one bridge, so: the
bridges of one group serve the same services, and a bridge stays silent on a service it does not serve
(another group answers it). Bridges with different services go in different groups.

The bridge also publishes its services in the central registry (retained entries with `cloud = true`), so
that nodes without a manifest for them learn them.

Signed (`signing.py`, when the bridge has a node identity): a request is served only when sealed (or MAC'd to
this bridge, `pairing.py`) by a node of the fleet whose topic it came on, and only to that node's own reply
topic, and once (`ReplayGuard`); anything else gets no answer at all (an unverified reply topic is the one
thing a bridge must never publish to). Answers are MAC'd to their caller when the request was MAC'd, sealed
otherwise. A node acts only for the tenants `[bridge] tenants` grants it (its certificate names none).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time

from ..access import node_identity, relayed_identity
from ..aio import cancel_and_wait
from ..authz import matches_any
from ..call import LOCAL_ONLY, new_call
from ..config import Config
from ..core import MeshCore
from ..core import run as run_process
from ..errors import CallError, IdentityError, UpstreamError
from ..http.message import strip_hop_by_hop
from ..identity.names import PeerName, spiffe_id
from ..logs import log_event
from ..paths import normalize_path
from ..registry import Snapshot
from .envelope import CloudAnswer, CloudRequest, EnvelopeError, decode_request, encode_answer, error_answer
from .persist import StateSaver
from .registry_sync import RegistrySync
from .session import Inbound, MqttSession, PublishError
from .signing import ReplayGuard, SealError, identity_files, node_seals
from .telemetry import CloudMetrics
from .topics import Topics, parse_request_topic, shared_request_filter

log = logging.getLogger("edged.bridge")

MAX_INFLIGHT = 512  # requests served at once; more are answered 503 bridge_busy at once
ANSWER_OVERHEAD = 1024  # bytes of an answer envelope besides the body, kept free under mqtt.max_payload
RETURN_MARGIN = 0.05  # seconds (at most 10% of the deadline) kept for the answer's trip back


class _TooLarge(Exception):
    pass


async def _read_body(answer, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        chunk = await answer.read()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            answer.discard()
            raise _TooLarge(f"answer body over {limit} bytes")
        chunks.append(chunk)


class Bridge:
    """One bridge process: serves MQTT requests for the services of its manifests."""

    def __init__(self, config: Config, *, max_inflight: int = MAX_INFLIGHT) -> None:
        mq = config.mqtt
        self.config = config
        self.node = config.node.name
        self.topics = Topics(mq.topic_prefix, config.node.fleet)
        self.core = core = MeshCore(config)  # no tiers: a bridge serves its own local endpoints only
        self.registry, self.metrics, self.health = core.registry, core.metrics, core.health
        self.manifests, self.pool, self.router = core.manifests, core.pool, core.router
        self.seals = node_seals(config)
        self.replays = ReplayGuard(self.seals.skew) if self.seals is not None else None
        self.metrics_cloud = CloudMetrics(self.metrics.registry)
        self.session = MqttSession(
            mq,
            client_id=mq.client_id or f"edged-bridge-{self.node}-{os.getpid()}",
            will=lambda: self.registry_sync.last_will(),  # sealed, with a new epoch, at each connect
            on_connected=self._on_connected,
            max_message=config.limits.mqtt_message,
            on_limit=core.limit_hit,
            identity=identity_files(config),
        )
        self.session.subscribe(shared_request_filter(config.bridge.group, mq.topic_prefix), self._on_request, qos=0)
        self.registry_sync = RegistrySync(
            registry=self.registry,
            session=self.session,
            topics=self.topics,
            node=self.node,
            zone=config.node.zone,
            location=config.node.location,
            saver=StateSaver(core.store),
            metrics=self.metrics_cloud,
            status_extra=lambda: {"role": "bridge", "group": config.bridge.group},
            always_cloud=True,
            follow=None,
            limits=config.limits,
            on_limit=core.limit_hit,
            seals=self.seals,
        )
        self._max_inflight = max_inflight
        self._body_limit = max(0, mq.max_payload - ANSWER_OVERHEAD)
        self._inflight: set[asyncio.Task] = set()
        self._closing = False
        self._ready_logged = False
        self.served = 0  # answered from an endpoint
        self.failed = 0  # answered with an error (no endpoint, deadline, upstream broke)
        self.refused = 0  # bad envelopes, busy, stopping
        self.not_mine = 0  # requests for services this bridge does not serve: left to other groups
        self.registry.watch(self._on_registry_change)

    def __repr__(self) -> str:
        return f"<Bridge {self.node} inflight={len(self._inflight)} served={self.served} {self.session!r}>"

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load manifests, start health checks and the MQTT session (which may connect later)."""
        await self.core.start()
        self.registry_sync.local_changed(self.registry.snapshot())
        self.session.start()

    async def stop(self, drain: float = 5.0) -> None:
        """Answer in-flight requests (up to `drain` seconds), say offline, disconnect, release everything."""
        self._closing = True
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=drain)
        await cancel_and_wait(list(self._inflight))
        if self.session.connected:
            await self.registry_sync.clear_own()  # no one should keep routing to what leaves with us
            payload = self.registry_sync.offline_status("shutdown")
            with contextlib.suppress(PublishError):
                await self.session.publish(self.topics.status(self.node), payload, qos=1, retain=True, timeout=1.0)
        await self.session.close()
        await self.core.stop()
        log_event(
            log,
            logging.INFO,
            "bridge.stopped",
            served=self.served,
            failed=self.failed,
            refused=self.refused,
            not_mine=self.not_mine,
        )

    def _on_connected(self) -> None:
        self.registry_sync.on_connected()
        if not self._ready_logged:
            self._ready_logged = True
            snapshot = self.registry.snapshot()
            log_event(
                log,
                logging.INFO,
                "bridge.ready",
                node=self.node,
                group=self.config.bridge.group,
                services=sorted(name for (_, name) in snapshot.services),
                signed_as=self.seals.name.node if self.seals is not None else None,
            )

    def _on_registry_change(self, old: Snapshot, new: Snapshot) -> None:
        self.registry_sync.local_changed(new)

    # -- requests -------------------------------------------------------------------------------------------

    def _on_request(self, msg: Inbound) -> None:
        received = time.monotonic()
        payload = msg.payload
        sender = to = None
        if self.seals is not None:
            try:
                sender, payload = self.seals.open(msg.topic, payload, macs=True)
            except SealError as exc:
                self._unverified(msg.topic, str(exc))
                return
            to = sender if self.seals.last_mac else None  # a MAC'd request gets a MAC'd answer
        try:
            req = decode_request(payload)
        except EnvelopeError as exc:
            self.refused += 1
            log_event(log, logging.WARNING, "bridge.bad_request", topic=msg.topic, error=str(exc)[:200])
            own = exc.reply if sender is None else Topics(self.topics.prefix, sender.fleet).reply(sender.node)
            if exc.id is not None and exc.reply is not None and exc.reply == own:
                self._answer_now(exc.reply, error_answer(exc.id, 400, "bad_request", str(exc), self.node), to)
            return
        where = parse_request_topic(self.topics.prefix, msg.topic)
        if sender is not None:
            own_reply = Topics(self.topics.prefix, sender.fleet).reply(sender.node)
            if where is None or where[0] != sender.fleet or req.reply != own_reply:
                self._unverified(msg.topic, f"{sender.fleet}/{sender.node} asks for an answer on {req.reply}")
                return
            assert self.replays is not None
            stale = self.replays.check(sender, req.id, req.sent_ms, req.deadline_ms)
            if stale is not None:
                self._unverified(msg.topic, f"request {req.id.hex()} of {sender.fleet}/{sender.node}: {stale}")
                return
            req = dataclasses.replace(req, node=sender.node)
        if where is None or where[1] != req.service:
            self.refused += 1
            detail = f"request for {req.service!r} published on {msg.topic}"
            self._answer_now(req.reply, error_answer(req.id, 400, "bad_request", detail, self.node), to)
            return
        svc = self.registry.snapshot().get(req.tenant, req.service)
        if svc is None:
            # Not ours: another bridge group serves it (each group gets its own copy of every request).
            self.not_mine += 1
            return
        if not self._acts_for(req.node, req.tenant):
            self.refused += 1
            self.metrics_cloud.tenant_refused.inc()
            detail = f"node {req.node or 'unknown'} may not call in tenant {req.tenant[:64]} here ([bridge] tenants)"
            self._answer_now(req.reply, error_answer(req.id, 403, "forbidden", detail, self.node), to)
            return
        if self._closing or len(self._inflight) >= self._max_inflight:
            self.refused += 1
            code = "bridge_stopping" if self._closing else "bridge_busy"
            self._answer_now(req.reply, error_answer(req.id, 503, code, f"bridge {self.node}", self.node), to)
            return
        try:  # the calling node's authorization rules and quotas, as on every entry point
            caller = node_identity(self.config.node.fleet, req.node or "unknown", req.tenant)
            if sender is not None:  # sealed: the app it names is the verified node's own claim
                caller = relayed_identity(caller, req.app)
            ticket = self.core.gate.admit(caller, svc, req.method, normalize_path(req.path.partition("?")[0]))
        except CallError as exc:
            self.refused += 1
            answer = error_answer(req.id, exc.status, exc.code, exc.detail, self.node)
            self._answer_now(req.reply, dataclasses.replace(answer, headers=answer.headers + exc.headers), to)
            return
        task = asyncio.get_running_loop().create_task(self._serve(req, received, to))
        task.add_done_callback(lambda _: ticket.release())  # also when cancelled before it ran
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _acts_for(self, node: str, tenant: str) -> bool:
        """Whether the calling node (verified when sealed; a claim otherwise) may act for `tenant`: a node's
        certificate names no tenant, so the bridge's `[bridge] tenants` says which nodes may call in which
        tenant (by default: every node of the fleet in the default tenant, none in another)."""
        patterns = self.config.bridge.tenants.get(tenant)
        if not patterns or not node:
            return False
        try:
            caller = spiffe_id(self.config.node.fleet, node)
        except IdentityError:
            return False
        return matches_any(caller, patterns)

    def _unverified(self, topic: str, why: str) -> None:
        """A request that is not sealed by a node of this fleet, or asks for an answer elsewhere than to its
        sender: no answer (its reply topic cannot be trusted), counted."""
        self.refused += 1
        self.metrics_cloud.unsealed.inc(("request",))
        log.debug("request on %s refused: %s", topic, why)  # counted: anyone could flood a log

    def _answer_wire(self, topic: str, answer: CloudAnswer, to: PeerName | None) -> bytes:
        """The answer as published: MAC'd to its caller when the request was MAC'd (`to`), else sealed."""
        payload = encode_answer(answer)
        if self.seals is None:
            return payload
        return self.seals.seal_to(topic, payload, (to,)) if to is not None else self.seals.seal(topic, payload)

    def _answer_now(self, topic: str, answer: CloudAnswer, to: PeerName | None) -> None:
        """Error answers made without routing: through the outbox (no task needed)."""
        self.session.post(topic, self._answer_wire(topic, answer, to), qos=0)

    async def _serve(self, req: CloudRequest, received: float, to: PeerName | None) -> None:
        timeout = req.deadline_ms / 1000
        deadline = received + max(0.001, timeout - min(RETURN_MARGIN, timeout / 10))
        call = new_call(
            req.tenant,
            req.service,
            req.method,
            req.path,
            req.headers,
            req.body,
            deadline=deadline,
            request_id=req.request_id or secrets.token_hex(8),
            tiers=LOCAL_ONLY,
        )
        started = time.monotonic()
        tier, outcome = "none", "error"
        try:
            routed = await self.router.route_service_call(call)
            tier = routed.endpoint.tier
            body = await asyncio.wait_for(
                _read_body(routed.answer, self._body_limit), max(0.001, deadline - time.monotonic())
            )
            headers = strip_hop_by_hop(routed.answer.headers)
            headers += [
                (b"x-edged-bridge", self.node.encode()),
                (b"x-edged-bridge-endpoint", routed.endpoint.id.encode()),
            ]
            answer = CloudAnswer(req.id, routed.answer.status, tuple(headers), body, self.node)
            outcome = "success" if answer.status < 500 else "error"
            self.served += 1
        except CallError as exc:
            answer = error_answer(req.id, exc.status, exc.code, exc.detail, self.node)
            self.failed += 1
        except UpstreamError as exc:
            answer = error_answer(req.id, 502, "upstream_error", f"{exc.kind}: {exc.detail}", self.node)
            self.failed += 1
        except asyncio.TimeoutError:
            answer = error_answer(req.id, 504, "deadline", "answer body not complete before the deadline", self.node)
            self.failed += 1
        except _TooLarge as exc:
            answer = error_answer(req.id, 502, "too_large", f"{exc} (mqtt.max_payload)", self.node)
            self.failed += 1
        except Exception as exc:  # a bug must still answer, and not kill the task silently
            log.exception("bridge failed to serve %s %s", req.method, req.path)
            answer = error_answer(req.id, 500, "internal", type(exc).__name__, self.node)
            self.failed += 1
        finally:
            self.router.record(req.service, tier, outcome, started)
        try:
            wire = self._answer_wire(req.reply, answer, to)
            await self.session.publish(req.reply, wire, qos=0, correlation=req.id, timeout=max(0.1, timeout))
        except PublishError as exc:
            log.debug("answer to %s not published: %s", req.reply, exc)


def run(config: Config) -> int:
    """`edged bridge`: run until SIGTERM or SIGINT; uvloop when installed. Returns the exit code."""
    return run_process(lambda: Bridge(config))
