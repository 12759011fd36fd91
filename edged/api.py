"""The local API and call path: one HTTP handler that routes `/svc/...` calls and answers `/v1/...` requests."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

from . import buildinfo, jsonbody, routes
from .access import ADMIN, CALL, READ, WRITE, Access, Identity
from .admission import Gate
from .authz_api import AuthzApi
from .browser import SAFE_METHODS, HostGuard, require_json
from .discovery.registrations import Registrations
from .errors import CallError
from .events import EventBus
from .http.message import Request
from .http.server import ResponseWriter
from .manifest import policy_dict
from .model import Service
from .paths import normalize_path
from .policies import PolicyOverrides
from .quota import FREE
from .registry import Registry
from .relay import call_for, relay_answer, relay_whole
from .router import Router
from .state import StateError
from .telemetry import MeshMetrics

log = logging.getLogger("edged.api")

MESH_SUFFIX = b".mesh"
SSE_KEEPALIVE = 15.0
_AUTHORIZATION = frozenset({b"authorization"})  # a tenant token is for the mesh, not the service
_NOTHING: frozenset[bytes] = frozenset()


@dataclass(slots=True)
class NodeInfo:
    name: str
    fleet: str
    zone: str
    version: str
    started: float  # unix time


class Api:
    """The request handler for both listeners (TCP and Unix socket)."""

    def __init__(
        self,
        *,
        node: NodeInfo,
        registry: Registry,
        router: Router,
        health,  # HealthMonitor
        registrations: Registrations,
        access: Access,
        hosts: HostGuard,
        events: EventBus,
        metrics: MeshMetrics,
        ready: Callable[[], bool],
        render_metrics: Callable[[], str],
        peers: Callable[[], list[dict]] = list,
        providers: Callable[[str, str], list[dict]] = lambda tenant, name: [],
        config_state: Callable[[], dict] = dict,
        gate: Gate | None = None,
        authz: AuthzApi | None = None,
        json_depth: int = 32,
        identity: Callable[[], dict | None] = lambda: None,
    ) -> None:
        self._node = node
        self._registry = registry
        self._router = router
        self._health = health
        self._registrations = registrations
        self._access = access
        self._hosts = hosts
        self._events = events
        self._metrics = metrics
        self._ready = ready
        self._render_metrics = render_metrics
        self._peers = peers
        self._providers = providers
        self._config_state = config_state  # the config file, reloads, keys pending restart
        self._gate = gate  # authorization rules and quotas of the call path (None: every call admitted)
        self._json_depth = json_depth  # [limits] json_depth: nesting of a JSON request body
        self._identity = identity  # this node's fleet certificate (edged.identity.keeper)
        self._policies: PolicyOverrides | None = None  # set by the daemon: `set_policies`
        # (method, first segment) -> (the right it takes, handler)
        self._routes: dict[tuple[str, str], tuple[str, Callable[..., Awaitable[None] | None]]] = {
            ("GET", "services"): (READ, self._services),
            ("GET", "resolve"): (READ, self._resolve),
            ("GET", "status"): (READ, self._status),
            ("GET", "events"): (READ, self._events_stream),
            ("GET", "register"): (READ, self._list_registrations),
            ("POST", "register"): (WRITE, self._register),
            ("DELETE", "register"): (WRITE, self._deregister),
            ("PUT", "register"): (WRITE, self._heartbeat),
            ("GET", "policies"): (READ, self._policy_get),
            ("PUT", "policies"): (WRITE, self._policy_set),
            ("DELETE", "policies"): (WRITE, self._policy_delete),
            ("POST", "policies"): (READ, self._policy_dry_run),
        }
        if authz is not None:
            self._routes.update(
                {
                    ("GET", "authz"): (READ, authz.get),
                    ("PUT", "authz"): (WRITE, authz.put),  # and admin: AuthzApi checks
                    ("DELETE", "authz"): (WRITE, authz.delete),
                    ("POST", "authz"): (READ, authz.explain),
                }
            )

    def set_access(self, access: Access) -> None:
        """New tokens and rights (a config reload): the next request is identified with them."""
        self._access = access

    def set_policies(self, policies: PolicyOverrides) -> None:
        """Enable `/v1/policies` (the daemon builds the overrides after the API)."""
        self._policies = policies

    def handle(self, req: Request, resp: ResponseWriter) -> Awaitable[None]:
        """Entry point for every request the HTTP server parses: the awaitable that answers it. A call is
        answered by `_call`'s coroutine itself (no coroutine of this method's around it, once per call)."""
        try:
            host: bytes | None = None
            for name, value in req.headers:  # req.header(b"host"), inline: once per request
                if name == b"host":
                    host = value
                    break
            # Browsers reach TCP only. A Host allowed before is one set look-up here (None is never in `allowed`).
            if req.peer != "unix" and host not in self._hosts.allowed:
                self._hosts.check_host(host)
            if req.target[:1] != "/":
                raise CallError(400, "bad_request", "absolute-form request targets are not served")
            if host is not None and MESH_SUFFIX in host and host.split(b":", 1)[0].endswith(MESH_SUFFIX):
                service = host.split(b":", 1)[0][: -len(MESH_SUFFIX)].decode("ascii", "replace")
                return self._call(req, resp, service, req.path, host)
            path = req.path
            if path.startswith("/svc/"):
                service, _, rest = path[5:].partition("/")
                return self._call(req, resp, service, "/" + rest, host)
            if path.startswith("/v1/"):
                return self._guarded(self._v1(req, resp), resp)
            if path == "/metrics" and req.method in ("GET", "HEAD"):
                self._access.identify(req).require(self._access.node_views)  # every tenant's services
                body = self._render_metrics().encode()
                resp.send(200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")], body)
            elif path == "/healthz":
                resp.send_json(200, {"status": "ok"})
            elif path == "/readyz":
                ready = self._ready()
                answer: dict = {"status": "ready" if ready else "not_ready"}
                failed = self._config_state().get("tasks_failed")
                if failed:  # restarted background loops: still serving, but someone should look
                    answer["tasks_failed"] = failed
                resp.send_json(200 if ready else 503, answer)
            else:
                raise CallError(404, "not_found", f"no route for {req.method} {path}")
        except CallError as exc:
            self._refuse(resp, exc)
        return _answered()

    def _refuse(self, resp: ResponseWriter, exc: CallError) -> None:
        """Answer a CallError (counted by status); one raised after the answer started goes on to the server."""
        if resp.started:
            raise exc
        self._metrics.http_errors.inc((str(exc.status),))
        resp.send_json(exc.status, {"error": exc.code, "detail": exc.detail}, exc.headers)

    async def _guarded(self, answering: Awaitable[None], resp: ResponseWriter) -> None:
        """`answering`, with its CallError answered (`_refuse`)."""
        try:
            await answering
        except CallError as exc:
            self._refuse(resp, exc)

    # -- the call path ---------------------------------------------------------------------------
    async def _call(self, req: Request, resp: ResponseWriter, service: str, path: str, host: bytes | None) -> None:
        """One call: its caller's rights, the gate, the route and the relayed answer; a CallError is answered."""
        try:
            caller = self._access.identify(req)
            if CALL not in caller.rights:
                caller.require(CALL)
            if req.method not in SAFE_METHODS:
                self._hosts.check_same_origin(req)
            path = normalize_path(path)
            if not service:
                raise CallError(404, "unknown_service", "no service named in the path")
            svc = self._router.service(caller.tenant, service)
            ticket = FREE if self._gate is None else self._gate.admit(caller, svc, req.method, path)
            try:  # the ticket's places in the in-flight caps are given back however the call ends
                if req.query:
                    path = f"{path}?{req.query}"
                call = call_for(
                    req,
                    svc,
                    path,
                    drop=_AUTHORIZATION if caller.by_token else _NOTHING,
                    add=[(b"x-forwarded-host", host)] if host is not None else (),
                    app=caller.app,
                )
                rid = call.request_id
                routed = await self._router.route_service_call(call, svc)
                extra = (
                    b"x-edged-endpoint: ",
                    routed.endpoint.id.encode(),
                    b"\r\nx-edged-tries: %d\r\nx-request-id: " % routed.tries,
                    rid.encode(),
                    b"\r\n",
                )
                if routed.answer.complete and req.method != "HEAD":  # all here: no coroutine
                    relay_whole(self._router, resp, routed, extra)
                else:
                    await relay_answer(self._router, req, resp, routed, extra)
            finally:
                ticket.release()
        except CallError as exc:
            self._refuse(resp, exc)

    # -- /v1 ---------------------------------------------------------------------------------------
    async def _v1(self, req: Request, resp: ResponseWriter) -> None:
        parts = req.path[4:].split("/")
        if parts[0] == "echo":
            self._echo(req, resp, "/" + "/".join(parts[1:]))
            return
        caller = self._access.identify(req)
        route = self._routes.get((req.method, parts[0]))
        if route is None:
            if any(name == parts[0] for _, name in self._routes):
                raise CallError(405, "method_not_allowed", f"{req.method} /v1/{parts[0]}")
            raise CallError(404, "not_found", f"no route for {req.method} {req.path}")
        right, handler = route
        caller.require(right)
        if req.method not in SAFE_METHODS:
            self._hosts.check_same_origin(req)
            require_json(req)
        result = handler(req, resp, caller, parts[1:])
        if result is not None:
            await result

    def _echo(self, req: Request, resp: ResponseWriter, path: str) -> None:
        """Diagnostics and the demo service: answers with what it received."""
        body = {
            "node": self._node.name,
            "method": req.method,
            "path": path,
            "query": req.query,
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in req.headers},
            "body": req.body.decode("utf-8", "replace"),
        }
        resp.send_json(200, body)

    @staticmethod
    def _scope(req: Request, caller: Identity) -> str | None:
        """The tenant a view shows: the caller's; an admin's `?tenant=NAME`, else every tenant (None)."""
        if ADMIN not in caller.rights:
            return caller.tenant
        for part in req.query.split("&"):
            key, _, value = part.partition("=")
            if key == "tenant" and value:
                return value
        return None

    def _visible(self, snap, scope: str | None) -> list[Service]:
        return sorted(snap.services.values(), key=lambda s: s.spec.key) if scope is None else snap.for_tenant(scope)

    def _services(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        scope = self._scope(req, caller)
        snap = self._registry.snapshot()
        now = time.monotonic()
        if rest and rest[0]:
            tenant = scope or caller.tenant
            svc = snap.get(tenant, rest[0])
            if svc is None:
                raise CallError(404, "unknown_service", f"no service {rest[0]!r} for tenant {tenant!r}")
            resp.send_json(200, self._describe(svc, now, detail=True))
            return
        resp.send_json(
            200,
            {"generation": snap.generation, "services": [self._describe(s, now) for s in self._visible(snap, scope)]},
        )

    def _describe(self, svc, now: float, detail: bool = False) -> dict:
        spec = svc.spec
        eps = []
        for ep in svc.endpoints:
            st = self._health.state(ep.id)
            eps.append(
                {
                    **({"labels": dict(ep.labels)} if ep.labels else {}),  # edged/routes.py; none: left out
                    "id": ep.id,
                    "tier": ep.tier,
                    "url": ep.url,
                    "priority": ep.priority,
                    "weight": ep.weight,
                    "source": ep.source,
                    "up": st.available(now),
                    "health": st.reason(now),
                    "latency_ms": None if st.latency_ewma is None else round(st.latency_ewma * 1000, 2),
                    "calls_ok": st.calls_ok,
                    "calls_failed": st.calls_failed,
                }
            )
        out = {
            "name": spec.name,
            "tenant": spec.tenant,
            "source": spec.source,
            "strategy": spec.policy.strategy,
            "endpoints": eps,
        }
        providers = self._providers(spec.tenant, spec.name)
        if providers:  # remote nodes serving it over MQTT: liveness and last-seen time
            out["providers"] = providers
        if detail:
            out["priority"] = spec.priority
            out["endpoint_types"] = list(spec.endpoint_types)
            out["interface"] = (
                None
                if spec.interface is None
                else {
                    "version": spec.interface.version,
                    "source": spec.interface.source,
                    "methods": [f"{m.verb} {m.pattern}" for m in spec.interface.methods],
                }
            )
            out["health_check"] = None if spec.health_check is None else spec.health_check.kind
            out["policy"] = policy_dict(spec.policy)
            out["policy_source"] = self._registry.policy_source(spec.tenant, spec.name)
        return out

    def _resolve(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        tenant = self._scope(req, caller) or caller.tenant
        if not rest or not rest[0]:
            raise CallError(404, "unknown_service", "GET /v1/resolve/{service}")
        svc = self._router.service(tenant, rest[0])
        plan, skipped = self._router.plan(svc)
        view: dict[str, object] = {
            "service": svc.name,
            "strategy": plan.strategy,
            "note": plan.note,
            "levels": plan.explain_levels(),
            "localities": plan.explain_localities(),
            "ranked": plan.explain(),
            "skipped": skipped,
        }
        if svc.spec.policy.routing is not None:  # the default route's split now (edged/routes.py)
            _, subsets = routes.dry_run(svc, routes.Sample(), self._health, time.monotonic())
            view["split"] = [item for item, _ in subsets if item["subset"] is not None]
            view["routes"] = len(svc.spec.policy.routing.rules)
        resp.send_json(200, view)

    def _status(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        scope = self._scope(req, caller)
        snap = self._registry.snapshot()
        now = time.monotonic()
        node = self._node
        node_wide = self._access.node_views in caller.rights  # peers offer every tenant's services
        # Bounded: a box that follows a fleet of thousands lists the first `limit` of each, with counts of all
        # (the whole fleet: `edged fleet ls`, or pages: `?peers_after=NODE`, `?services_after=TENANT/NAME`).
        query = status_query(req.query)
        every_peer = self._peers() if node_wide else []
        peers, peers_summary = page(every_peer, lambda p: str(p.get("node", "")), query["limit"], query["peers_after"])
        peers_summary["by_state"] = dict(Counter(str(p.get("state", "")) for p in every_peer))
        visible = self._visible(snap, scope)
        services, services_summary = page(visible, _service_name, query["limit"], query["services_after"])
        resp.send_json(
            200,
            {
                "node": {
                    "name": node.name,
                    "fleet": node.fleet,
                    "zone": node.zone,
                    "version": node.version,
                    "build": buildinfo.build(),  # "compiled" (mypyc, the opt-in build) or "pure"
                    "uptime_s": round(time.time() - node.started, 1),
                    "ready": self._ready(),
                    "generation": snap.generation,
                },
                "peers": peers,
                "peers_summary": peers_summary,
                "config": self._config_state() if node_wide else {},
                "identity": self._identity() if node_wide else None,
                "services": [self._describe(s, now) for s in services],
                "services_summary": services_summary,
            },
        )

    # -- /v1/policies: runtime policy changes ------------------------------------------------------
    def _policy_target(self, tenant: str, rest: list[str], suffix: str = ""):
        if self._policies is None:
            raise CallError(404, "not_found", "runtime policies are not enabled")
        name = rest[0] if len(rest) == 1 else ""
        if suffix:
            if not name.endswith(suffix):
                raise CallError(404, "not_found", f"POST /v1/policies/{{name}}{suffix}")
            name = name[: -len(suffix)]
        if not name:
            raise CallError(404, "unknown_service", "name a service: /v1/policies/{name}")
        return self._router.service(tenant, name)

    def _may_steer(self, caller: Identity, service: str) -> None:
        """A service's policy is changed by an admin, or by the app that registered the whole service."""
        if ADMIN not in caller.rights and self._registrations.owner_of_service(caller.tenant, service) != caller.name:
            raise CallError(403, "forbidden", f"{caller.name} may not change the policy of {service!r}")

    def _policy_view(self, svc) -> dict:
        assert self._policies is not None
        return {
            "service": svc.name,
            "tenant": svc.tenant,
            "source": self._registry.policy_source(svc.tenant, svc.name),
            "policy": policy_dict(svc.spec.policy),
            "override": self._policies.table(svc.tenant, svc.name),
        }

    def _json_body(self, req: Request, code: str = "invalid_policy") -> object:
        try:
            return jsonbody.loads(req.body or b"null", self._json_depth)
        except ValueError as exc:
            raise CallError(400, code, f"body is not JSON: {exc}") from None

    def _policy_get(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        tenant = caller.tenant
        resp.send_json(200, self._policy_view(self._policy_target(tenant, rest)))

    async def _policy_set(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        tenant = caller.tenant
        svc = self._policy_target(tenant, rest)
        self._may_steer(caller, svc.name)
        assert self._policies is not None
        _, saved = self._policies.set(tenant, svc.name, self._json_body(req))
        await _on_disk(saved)
        resp.send_json(200, self._policy_view(self._router.service(tenant, svc.name)))

    async def _policy_delete(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        tenant = caller.tenant
        svc = self._policy_target(tenant, rest)
        self._may_steer(caller, svc.name)
        assert self._policies is not None
        saved = self._policies.delete(tenant, svc.name)
        if saved is None:
            raise CallError(404, "no_override", f"{svc.name} has no policy set through the API")
        await _on_disk(saved)
        resp.send_json(200, self._policy_view(self._router.service(tenant, svc.name)))

    def _policy_dry_run(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        """What the plan would be under a proposed override, next to the plan now; changes nothing. A body's
        `request` ({method, path, headers}) is a sample call: its route and subsets are shown (edged/routes.py)."""
        tenant = caller.tenant
        svc = self._policy_target(tenant, rest, ":dry-run")
        assert self._policies is not None
        body = self._json_body(req)
        sample = None
        if isinstance(body, dict) and "request" in body:
            body = dict(body)
            try:
                sample = routes.parse_sample(body.pop("request"))
            except ValueError as exc:
                raise CallError(400, "invalid_request", str(exc)) from None
        proposed = self._policies.preview(tenant, svc.name, body)
        now_plan, _ = self._router.plan(svc)
        proposed_svc = Service(replace(svc.spec, policy=proposed), svc.endpoints)
        route, subsets = routes.dry_run(proposed_svc, sample or routes.Sample(), self._health, time.monotonic())
        plans = []
        for item, routed in subsets:
            plan, skipped = self._router.plan(routed)
            plans.append((item["share"], plan, skipped))
            if sample is not None or proposed.routing is not None:
                item["ranked"] = plan.explain()
        _, new_plan, skipped = max(plans, key=lambda p: p[0])  # the subset most calls go to
        resp.send_json(
            200,
            {
                "service": svc.name,
                "policy": policy_dict(proposed),
                "strategy": new_plan.strategy,
                "note": new_plan.note,
                "ranked": new_plan.explain(),
                "skipped": skipped,
                "route": {**route, "subsets": [item for item, _ in subsets]},
                "current": {"strategy": now_plan.strategy, "ranked": now_plan.explain()},
            },
        )

    def _list_registrations(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        scope = self._scope(req, caller)
        now = time.monotonic()
        resp.send_json(200, {"registrations": [r.describe(now) for r in self._registrations.all(scope)]})

    async def _register(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        if rest and rest[0]:
            raise CallError(404, "not_found", "POST /v1/register (no id in the path)")
        body = self._json_body(req, "invalid_registration")
        reg, replaced, saved = self._registrations.register(caller, body)
        await _on_disk(saved)  # acknowledged only once a restart keeps it
        resp.send_json(200 if replaced else 201, reg.describe(time.monotonic()))

    async def _deregister(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        saved = self._registrations.deregister(caller, rest[0]) if rest else None
        if saved is None:
            raise CallError(404, "unknown_registration", f"no registration {rest[0] if rest else ''!r}")
        await _on_disk(saved)
        resp.send_json(200, {"id": rest[0], "deregistered": True})

    def _heartbeat(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        if len(rest) != 2 or rest[1] != "ttl":
            raise CallError(404, "not_found", "PUT /v1/register/{id}/ttl")
        reg = self._registrations.heartbeat(caller, rest[0])
        if reg is None:
            raise CallError(404, "unknown_registration", f"no registration {rest[0]!r}")
        resp.send_json(200, reg.describe(time.monotonic()))

    async def _events_stream(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        """Server-sent events: registrations, endpoint up/down, manifest reloads."""
        scope = self._scope(req, caller)
        node_wide = self._access.node_views in caller.rights  # events of no tenant: peers, reloads
        resp.start(200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")])
        await resp.write(b": edged events\n\n")
        async with self._events.subscribe() as queue:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if event is None:  # the daemon is stopping
                    break
                tenant = event.get("tenant")
                if tenant is None:
                    if not node_wide and event["type"] != "services_changed":  # that one names no service
                        continue
                elif scope is not None and tenant != scope:
                    continue
                data = json.dumps(event, separators=(",", ":"))
                await resp.write(f"event: {event['type']}\ndata: {data}\n\n".encode())


async def _on_disk(saved: asyncio.Future[None]) -> None:
    """Wait for a state write; 507 `not_persisted` when it failed (a full disk: the change holds only until a
    restart, so it is not acknowledged; the caller may send it again)."""
    try:
        await saved
    except StateError as exc:
        raise CallError(507, "not_persisted", f"the change is in force but not on disk: {exc.reason}") from None


STATUS_LIMIT = 100  # peers and services `GET /v1/status` lists by default (`?limit=`, up to MAX_STATUS_LIMIT)
MAX_STATUS_LIMIT = 1000


async def _answered() -> None:
    """What `Api.handle` returns for a request it answered at once."""


def _service_name(svc: Service) -> str:
    return f"{svc.spec.tenant}/{svc.spec.name}"


def status_query(query: str) -> dict:
    """`?limit=N&peers_after=NODE&services_after=TENANT/NAME` of `GET /v1/status` (bad values: defaults)."""
    out: dict = {"limit": STATUS_LIMIT, "peers_after": "", "services_after": ""}
    for part in query.split("&")[:16]:
        key, _, value = part.partition("=")
        value = unquote(value)[:256]
        if key == "limit" and value.isdigit():
            out["limit"] = max(1, min(int(value), MAX_STATUS_LIMIT))
        elif key in ("peers_after", "services_after"):
            out[key] = value
    return out


def page(items: list, key: Callable[[Any], str], limit: int, after: str) -> tuple[list, dict]:
    """The first `limit` items by `key` after `after`, and a summary: how many in all, how many shown, and
    the `after` of the next page (None: the last one)."""
    items = sorted(items, key=key)
    start = 0
    if after:
        start = next((i for i, item in enumerate(items) if key(item) > after), len(items))
    shown = items[start : start + limit]
    more = start + limit < len(items)
    return shown, {"total": len(items), "shown": len(shown), "next": key(shown[-1]) if more and shown else None}
