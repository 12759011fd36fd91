"""The peer ingress: where other nodes of the fleet send edge calls, forwarded to this node's LOCAL endpoints only.

Routes (HTTP/1.1 on `[ingress] listen`):
- `ANY /svc/{service}/{path}` and `ANY /t/{tenant}/svc/{service}/{path}`: a call from a peer, routed by this
  node's policy among its local endpoints (never onward to another peer: no loops, no surprise hops).
- `GET /peer/services`: the services this node offers, for peers whose TXT record only had room for a hash.
- `GET /healthz`: the ingress answers (503 `leaving` once this node is shutting down: peers check a goodbye so).

Who may call is decided in one place, `FleetIdentity`. Normally the ingress speaks TLS 1.3 only and requires a
client certificate of the fleet CA (edged.identity): the caller is who its certificate names, and headers
naming a fleet or node are dropped, never believed. With `[ingress] insecure = true` (labs and tests) it
speaks plain HTTP and believes the `x-edged-fleet` / `x-edged-node` headers, as edged did before mutual TLS.
The calling node becomes an `Identity` (`access.node_identity`: id `spiffe://FLEET/node/NODE`) that the
authorization rules and quotas of the gate (edged/admission.py) see, as on the local call path.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from ..access import node_identity, relayed_identity
from ..admission import Gate
from ..call import LOCAL_ONLY, Call
from ..errors import CallError, IdentityError
from ..http.client import UpstreamPool, UpstreamResponse
from ..http.message import Request
from ..http.server import HttpServer, ListenError, ResponseWriter
from ..identity.files import peer_name_of
from ..model import DEFAULT_TENANT, Endpoint
from ..paths import normalize_path
from ..quota import FREE
from ..registry import Registry
from ..relay import call_for, relay_answer, relay_whole
from ..router import Router
from ..routes import common_labels
from ..transport.http import HttpTransport
from .handshakes import HandshakeGate
from .peers import offered
from .txt import service_ref, services_hash

log = logging.getLogger("edged.edge.ingress")

FLEET_HEADER = b"x-edged-fleet"
NODE_HEADER = b"x-edged-node"
APP_HEADER = b"x-edged-app"  # the calling app within the tenant: believed only over mutual TLS
IDENTITY_HEADERS = frozenset({FLEET_HEADER, NODE_HEADER, APP_HEADER})
# Never passed from a peer to a local service: who called is the ingress's to say, not the caller's.
SPOOFABLE = IDENTITY_HEADERS | {b"x-forwarded-for"}
SERVICES_PATH = "/peer/services"


class FleetIdentity:
    """Who this node is to peers, and which callers its ingress serves: by certificate (TLS) or by header (insecure)."""

    def __init__(self, node: str, fleet: str, *, tls: bool = True) -> None:
        self.node = node
        self.fleet = fleet
        self.tls = tls
        self._headers = [] if tls else [(FLEET_HEADER, fleet.encode()), (NODE_HEADER, node.encode())]

    def headers(self) -> list[tuple[bytes, bytes]]:
        """What this node sends with every call and health check to a peer's ingress (nothing over TLS)."""
        return list(self._headers)

    def check(self, req: Request) -> str:
        """The calling node's name; CallError 403 `forbidden` unless it is a member of this fleet."""
        if self.tls:
            return self._check_certificate(req)
        fleet = req.header(FLEET_HEADER)
        node = req.header(NODE_HEADER)
        if fleet is None or node is None or not node:
            raise CallError(403, "forbidden", "peer calls must name their fleet and node (x-edged-fleet, x-edged-node)")
        if fleet.decode("utf-8", "replace") != self.fleet:
            raise CallError(403, "forbidden", f"fleet {fleet.decode('utf-8', 'replace')!r} is not this node's fleet")
        return node.decode("utf-8", "replace")

    def _check_certificate(self, req: Request) -> str:
        if not req.peer_cert:  # a TLS listener requires one: only a plain listener gets here without
            raise CallError(403, "forbidden", "peer calls need a client certificate of the fleet CA")
        try:
            name = peer_name_of(req.peer_cert)
        except IdentityError as exc:
            raise CallError(403, "forbidden", str(exc)) from None
        if name.fleet != self.fleet:
            raise CallError(403, "forbidden", f"the certificate names fleet {name.fleet!r}, not this node's")
        return name.node


def to_peer(endpoint: Endpoint) -> bool:
    """Whether an edge endpoint is a HubMesh node's ingress (its meta names the node) rather than a plain service."""
    return any(key == "node" and value for key, value in endpoint.meta)


class EdgeTransport(HttpTransport):
    """The HTTP transport, but calls to a peer's ingress go over mutual TLS (`https` endpoints, through the peer
    pool), or carry our fleet identity in headers on an insecure fleet."""

    def __init__(self, pool: UpstreamPool, identity: FleetIdentity, peer_pool: UpstreamPool | None = None) -> None:
        super().__init__(pool)
        self._identity = identity
        self._peers = HttpTransport(peer_pool) if peer_pool is not None else None

    async def send(
        self, endpoint: Endpoint, call: Call, headers: list[tuple[bytes, bytes]], timeout: float
    ) -> UpstreamResponse:
        target = endpoint.target
        tls = self._peers is not None and target is not None and target.tls
        if to_peer(endpoint):
            headers = [h for h in headers if h[0] not in IDENTITY_HEADERS] + self._identity.headers()
            if tls and call.app:  # the peer's rules see TENANT/APP: a claim this node's certificate vouches for
                headers.append((APP_HEADER, call.app.encode()))
        if tls:
            return await self._peers.send(endpoint, call, headers, timeout)  # type: ignore[union-attr]
        return await super().send(endpoint, call, headers, timeout)


class Ingress:
    """The peer ingress server. A failure to listen is logged and leaves the daemon serving its local API."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        router: Router,
        registry: Registry,
        identity: FleetIdentity,
        max_header: int,
        max_body: int,
        idle_timeout: float,
        on_peer_call: Callable[[str], None] | None = None,
        server_limits: dict | None = None,
        gate: Gate | None = None,
        tls: ssl.SSLContext | None = None,
        handshakes: HandshakeGate | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._tls = tls
        self.handshakes = handshakes  # TLS handshakes in progress, capped per source and in total
        self._router = router
        self._registry = registry
        self._identity = identity
        self._on_peer_call = on_peer_call
        self._gate = gate
        self.server = HttpServer(
            self.handle,
            max_header_bytes=max_header,
            max_body_bytes=max_body,
            idle_timeout=idle_timeout,
            **(server_limits or {}),
        )
        self.address: tuple[str, int] | None = None  # where it listens, once it does
        self.leaving = False  # shutdown began: /healthz answers 503 "leaving" while calls still drain

    async def start(self) -> bool:
        """Listen; False (and an error in the log) when the address is taken or not ours."""
        try:
            self.address = await self.server.listen_tcp(self._host, self._port, self._tls, self.handshakes)
        except ListenError as exc:
            log.error("peer ingress not available (%s); serving the local API only, not advertising this node", exc)
            return False
        log.info("peer ingress on %s:%d (%s)", *self.address, "mutual TLS 1.3" if self._tls else "plain HTTP")
        return True

    async def shutdown(self, drain_timeout: float) -> None:
        await self.server.shutdown(drain_timeout)

    def offered_refs(self) -> list[str]:
        """`name` / `tenant/name` of every service offered to peers now."""
        return sorted(service_ref(s.tenant, s.name) for s in offered(self._registry.snapshot()))

    def offered_labels(self) -> dict[str, dict[str, str]]:
        """Ref -> labels of the offered services whose local endpoints all carry some labels alike."""
        out = {}
        for svc in offered(self._registry.snapshot()):
            labels = common_labels(ep for ep in svc.endpoints if ep.tier == "local")
            if labels:
                out[service_ref(svc.tenant, svc.name)] = dict(labels)
        return out

    async def handle(self, req: Request, resp: ResponseWriter) -> None:
        try:
            path = req.path
            if path == "/healthz":
                if self.leaving:  # said over our certificate: a peer takes our mDNS goodbye as true (edge.goodbye)
                    resp.send_json(503, {"status": "leaving", "node": self._identity.node})
                else:
                    resp.send_json(200, {"status": "ok", "node": self._identity.node})
                return
            caller = self._identity.check(req)
            if path == SERVICES_PATH and req.method == "GET":
                refs, labels = self.offered_refs(), self.offered_labels()
                doc = {"node": self._identity.node, "services": refs, "hash": services_hash(refs, labels)}
                resp.send_json(200, {**doc, "labels": labels} if labels else doc)
                return
            if req.target[:1] != "/":
                raise CallError(400, "bad_request", "absolute-form request targets are not served")
            tenant, service, rest = _split(path)
            if service is None:
                raise CallError(404, "not_found", f"no route for {req.method} {path}")
            query = f"?{req.query}" if req.query else ""
            await self._call(req, resp, caller, tenant, service, normalize_path(rest), query)
        except CallError as exc:
            if resp.started:
                raise
            resp.send_json(exc.status, {"error": exc.code, "detail": exc.detail}, exc.headers)

    async def _call(
        self, req: Request, resp: ResponseWriter, caller: str, tenant: str, service: str, path: str, query: str
    ) -> None:
        svc = self._router.service(tenant, service)
        if not any(ep.tier == "local" for ep in svc.endpoints) or not (
            "edge" in svc.spec.endpoint_types or svc.spec.advertise is not None
        ):
            raise CallError(404, "unknown_service", f"{service!r} is not offered to peers by {self._identity.node}")
        if self._gate is not None:
            who = node_identity(self._identity.fleet, caller, tenant)
            app = req.header(APP_HEADER) if self._identity.tls else None  # plain HTTP: anyone could say it
            if app:
                who = relayed_identity(who, app.decode("utf-8", "replace"))
            ticket = self._gate.admit(who, svc, req.method, path)
        else:
            ticket = FREE
        with ticket:
            call = call_for(
                req,
                svc,
                path + query,
                tiers=LOCAL_ONLY,
                drop=SPOOFABLE,
                add=[(b"x-forwarded-for", req.peer.encode())],
            )
            if self._on_peer_call is not None:
                self._on_peer_call(caller)
            routed = await self._router.route_service_call(call)
            extra = (
                b"x-edged-peer-endpoint: ",
                routed.endpoint.id.encode(),
                b"\r\nx-edged-peer-tries: %d\r\n" % routed.tries,
            )
            if routed.answer.complete and req.method != "HEAD":  # all here: no coroutine
                relay_whole(self._router, resp, routed, extra)
            else:
                await relay_answer(self._router, req, resp, routed, extra)


def _split(path: str) -> tuple[str, str | None, str]:
    """(tenant, service, rest) of `/svc/{service}/{rest}` or `/t/{tenant}/svc/{service}/{rest}`."""
    tenant = DEFAULT_TENANT
    if path.startswith("/t/"):
        tenant, _, path = path[3:].partition("/")
        path = "/" + path
        if not tenant:
            return tenant, None, ""
    if not path.startswith("/svc/"):
        return tenant, None, ""
    service, _, rest = path[5:].partition("/")
    return tenant, (service or None), "/" + rest
