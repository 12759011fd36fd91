"""The peer ingress: where other nodes of the fleet send edge calls, forwarded to this node's LOCAL endpoints only.

Routes (HTTP/1.1 on `[ingress] listen`):
- `ANY /svc/{service}/{path}` and `ANY /t/{tenant}/svc/{service}/{path}`: a call from a peer, routed by this
  node's policy among its local endpoints (never onward to another peer: no loops, no surprise hops).
- `GET /peer/services`: the services this node offers, for peers whose TXT record only had room for a hash.
- `GET /healthz`: the ingress answers.

Who may call is decided in one place, `FleetIdentity`: today the caller names its fleet and node in headers;
mutual TLS (the security issue) replaces `headers()` and `check()` without touching the routes. The calling
node becomes an `Identity` (`access.node_identity`: id `spiffe://FLEET/node/NODE`) that the authorization
rules and quotas of the gate (edged/admission.py) see, as on the local call path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..access import node_identity
from ..admission import Gate
from ..call import LOCAL_ONLY, Call
from ..errors import CallError
from ..http.client import UpstreamPool, UpstreamResponse
from ..http.message import Request
from ..http.server import HttpServer, ListenError, ResponseWriter
from ..model import DEFAULT_TENANT, Endpoint
from ..paths import normalize_path
from ..quota import FREE
from ..registry import Registry
from ..relay import call_for, relay_answer
from ..router import Router
from ..transport.http import HttpTransport
from .peers import offered
from .txt import service_ref, services_hash

log = logging.getLogger("edged.edge.ingress")

FLEET_HEADER = b"x-edged-fleet"
NODE_HEADER = b"x-edged-node"
SERVICES_PATH = "/peer/services"


class FleetIdentity:
    """Who this node is to peers, and which callers its ingress serves (the seam mTLS will take over)."""

    def __init__(self, node: str, fleet: str) -> None:
        self.node = node
        self.fleet = fleet
        self._headers = [(FLEET_HEADER, fleet.encode()), (NODE_HEADER, node.encode())]

    def headers(self) -> list[tuple[bytes, bytes]]:
        """What this node sends with every call and health check to a peer's ingress."""
        return list(self._headers)

    def check(self, req: Request) -> str:
        """The calling node's name; CallError 403 `forbidden` unless it is a member of this fleet."""
        fleet = req.header(FLEET_HEADER)
        node = req.header(NODE_HEADER)
        if fleet is None or node is None or not node:
            raise CallError(403, "forbidden", "peer calls must name their fleet and node (x-edged-fleet, x-edged-node)")
        if fleet.decode("utf-8", "replace") != self.fleet:
            raise CallError(403, "forbidden", f"fleet {fleet.decode('utf-8', 'replace')!r} is not this node's fleet")
        return node.decode("utf-8", "replace")


def to_peer(endpoint: Endpoint) -> bool:
    """Whether an edge endpoint is a HubMesh node's ingress (its meta names the node) rather than a plain service."""
    return any(key == "node" and value for key, value in endpoint.meta)


class EdgeTransport(HttpTransport):
    """The HTTP transport, but calls to a peer's ingress carry our fleet identity."""

    def __init__(self, pool: UpstreamPool, identity: FleetIdentity) -> None:
        super().__init__(pool)
        self._identity = identity

    async def send(
        self, endpoint: Endpoint, call: Call, headers: list[tuple[bytes, bytes]], timeout: float
    ) -> UpstreamResponse:
        if to_peer(endpoint):
            headers = [h for h in headers if h[0] not in (FLEET_HEADER, NODE_HEADER)] + self._identity.headers()
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
    ) -> None:
        self._host, self._port = host, port
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

    async def start(self) -> bool:
        """Listen; False (and an error in the log) when the address is taken or not ours."""
        try:
            self.address = await self.server.listen_tcp(self._host, self._port)
        except ListenError as exc:
            log.error("peer ingress not available (%s); serving the local API only, not advertising this node", exc)
            return False
        log.info("peer ingress on %s:%d", *self.address)
        return True

    async def shutdown(self, drain_timeout: float) -> None:
        await self.server.shutdown(drain_timeout)

    def offered_refs(self) -> list[str]:
        """`name` / `tenant/name` of every service offered to peers now."""
        return sorted(service_ref(s.tenant, s.name) for s in offered(self._registry.snapshot()))

    async def handle(self, req: Request, resp: ResponseWriter) -> None:
        try:
            path = req.path
            if path == "/healthz":
                resp.send_json(200, {"status": "ok", "node": self._identity.node})
                return
            caller = self._identity.check(req)
            if path == SERVICES_PATH and req.method == "GET":
                refs = self.offered_refs()
                resp.send_json(200, {"node": self._identity.node, "services": refs, "hash": services_hash(refs)})
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
            ticket = self._gate.admit(node_identity(self._identity.fleet, caller, tenant), svc, req.method, path)
        else:
            ticket = FREE
        with ticket:
            call = call_for(
                req, svc, path + query, tiers=LOCAL_ONLY, add=[(b"x-forwarded-for", req.peer.encode())]
            )
            if self._on_peer_call is not None:
                self._on_peer_call(caller)
            routed = await self._router.route_service_call(call)
            extra = [
                (b"x-edged-peer-endpoint", routed.endpoint.id.encode()),
                (b"x-edged-peer-tries", str(routed.tries).encode()),
            ]
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
