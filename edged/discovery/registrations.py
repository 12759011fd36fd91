"""Local registration: services on this box announce themselves (`POST /v1/register`), with optional TTL leases.

Registrations are kept in the state dir (atomic writes) so they survive a daemon restart; a lease that
lapses takes the endpoints out of routing but keeps the registration, and the next heartbeat brings them back.

Each registration is owned by the identity that made it (edged/access.py): only it, or an admin, renews,
changes or removes it. A registration cannot carry a `command` health check (only manifests on disk may),
and its endpoints rank after a service's declared ones unless the manifest says `[registration] min_priority`.
Writes to disk are coalesced and off the event loop; `register` hands back a future for "on disk".
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..access import Identity
from ..errors import CallError, ConfigError
from ..events import EventBus
from ..manifest import parse_manifest_data
from ..model import Endpoint, ServiceSpec
from ..registry import Registry, endpoint_from_spec
from ..state import StateStore
from ..state_writer import DocumentWriter
from ..units import parse_duration

log = logging.getLogger("edged.registrations")
STATE_FILE = "registrations.json"
SOURCE = "register"
_REG_KEYS = frozenset({"id", "ttl", "manifest", "service", "endpoint"})


@dataclass(slots=True)
class Registration:
    """One registration: a whole service (`kind="service"`) or one endpoint of a declared service."""

    id: str
    kind: str  # "service" | "endpoint"
    tenant: str
    owner: str | None  # the identity that registered it (None: from a state file older than owners)
    service: str
    document: dict  # the manifest, or the endpoint declaration, as the client sent it
    ttl: float | None
    created: float  # unix time
    expires_at: float | None = None  # monotonic; None without a TTL
    spec: ServiceSpec | None = None  # parsed manifest (kind == "service")
    endpoint: Endpoint | None = None  # concrete endpoint (kind == "endpoint")
    encoded: bytes = b""  # to_state() as JSON, made once: a write re-encodes only what changed

    def lapsed(self, now: float) -> bool:
        return self.expires_at is not None and now > self.expires_at

    def to_state(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "tenant": self.tenant,
            "owner": self.owner,
            "service": self.service,
            "document": self.document,
            "ttl": self.ttl,
            "created": self.created,
        }

    def state_json(self) -> bytes:
        if not self.encoded:
            self.encoded = _dumps(self.to_state())
        return self.encoded

    def describe(self, now: float) -> dict:
        out = self.to_state()
        out["state"] = "lapsed" if self.lapsed(now) else "active"
        if self.endpoint is not None:
            out["endpoint_id"] = self.endpoint.id
            out["priority"] = self.endpoint.priority
        return out


class Registrations:
    """Owns local registrations: validates them, feeds the registry, persists them, expires leases."""

    def __init__(
        self,
        registry: Registry,
        store: StateStore,
        events: EventBus,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_heartbeat: Callable[[list[str]], None] | None = None,
        max_total: int = 4096,
        max_per_owner: int = 256,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._events = events
        self._clock = clock
        self._on_heartbeat = on_heartbeat
        self._regs: dict[str, Registration] = {}
        self._unparsed: list[dict] = []  # records we could not load: kept, written back, never dropped
        self._lapsed: set[str] = set()
        self._apply_pending = False  # registrations changed, the registry not yet told
        self._max_total = max_total
        self._max_per_owner = max_per_owner
        self._on_limit = on_limit
        self.writer = DocumentWriter(store, STATE_FILE, self._state_document)

    # -- queries ---------------------------------------------------------------------------------
    def get(self, tenant: str, reg_id: str) -> Registration | None:
        reg = self._regs.get(reg_id)
        return reg if reg is not None and reg.tenant == tenant else None

    def owner_of_service(self, tenant: str, service: str) -> str | None:
        """Who registered the whole service `service` (None: nobody, or it is declared otherwise)."""
        for reg in self._regs.values():
            if reg.kind == "service" and reg.tenant == tenant and reg.service == service:
                return reg.owner
        return None

    def all(self, tenant: str | None = None) -> list[Registration]:
        return [r for r in self._regs.values() if tenant is None or r.tenant == tenant]

    def __len__(self) -> int:
        return len(self._regs)

    # -- changes -----------------------------------------------------------------------------------
    def load(self) -> int:
        """Restore registrations from the state dir; each gets one TTL of grace. Returns how many loaded."""
        data = self._store.read_json(STATE_FILE, {"registrations": []})
        records = data.get("registrations", []) if isinstance(data, dict) else []
        for record in records:
            try:
                owner = Identity(record.get("owner") or "", record["tenant"], frozenset())
                reg = self._build(owner, record["document"], record["kind"], record.get("service"), record.get("ttl"))
                reg.owner = record.get("owner")
                reg.id = record["id"]
                reg.created = record.get("created", reg.created)
                if reg.endpoint is not None:
                    reg.endpoint = dataclasses.replace(reg.endpoint, id=_endpoint_id(reg))
            except (CallError, KeyError, TypeError) as exc:
                log.warning("registration from state not usable, kept as is: %s (%s)", record.get("id"), exc)
                self._unparsed.append(record)
                continue
            self._regs[reg.id] = reg
        self._apply()
        return len(self._regs)

    def register(self, caller: Identity, body: object) -> tuple[Registration, bool, asyncio.Future[None]]:
        """Validate and add (or replace) a registration of `caller`. Returns it, whether it replaced an older
        one, and a future that resolves once it is on disk (StateError if that failed).

        Body: `{"manifest": {...}, "ttl": "15s", "id": "..."}` or a bare manifest (has `service_name`), or
        `{"service": "thermo", "endpoint": {"type": "local", "url": "..."}, "ttl": "15s", "id": "..."}`.
        """
        if not isinstance(body, dict):
            raise CallError(400, "invalid_registration", "body must be a JSON object")
        body = dict(body)
        reg_id = body.pop("id", None)
        ttl = body.pop("ttl", None)
        if "service_name" in body:
            body = {"manifest": body}
        unknown = set(body) - _REG_KEYS
        if unknown:
            raise CallError(400, "invalid_registration", f"unknown keys: {sorted(unknown)}")
        tenant = caller.tenant
        if "manifest" in body:
            reg = self._build(caller, body["manifest"], "service", None, ttl)
        elif "endpoint" in body:
            reg = self._build(caller, body["endpoint"], "endpoint", body.get("service"), ttl)
        else:
            raise CallError(400, "invalid_registration", "give a `manifest`, or a `service` and an `endpoint`")
        if reg_id is not None:
            if not isinstance(reg_id, str) or not reg_id or len(reg_id) > 64 or "/" in reg_id:
                raise CallError(400, "invalid_registration", "id: 1..64 characters, no '/'")
            other = self._regs.get(reg_id)
            if other is not None and (other.tenant != tenant or not caller.may_change(other.owner)):
                raise CallError(409, "conflict", f"registration id {reg_id!r} belongs to someone else")
        else:
            reg_id = self._same_as(reg) or secrets.token_hex(6)
        reg.id = reg_id
        if reg.endpoint is not None:
            reg.endpoint = dataclasses.replace(reg.endpoint, id=_endpoint_id(reg))
        replaced = reg_id in self._regs
        if not replaced:
            self._check_room(reg.owner)
        self._regs[reg_id] = reg
        self._apply_pending = True  # applied with the write that acknowledges it: one rebuild per burst
        saved = self.writer.changed()
        self._events.publish("registered", id=reg_id, tenant=tenant, service=reg.service, kind=reg.kind)
        return reg, replaced, saved

    def deregister(self, caller: Identity, reg_id: str) -> asyncio.Future[None] | None:
        """Remove a registration the caller may change; a future for "on disk", None if there is no such one."""
        reg = self.get(caller.tenant, reg_id)
        if reg is None or not caller.may_change(reg.owner):
            return None
        del self._regs[reg_id]
        self._apply_pending = True
        saved = self.writer.changed()
        self._events.publish("deregistered", id=reg_id, tenant=caller.tenant, service=reg.service)
        return saved

    def heartbeat(self, caller: Identity, reg_id: str) -> Registration | None:
        """Renew a lease (and feed TTL health checks of its endpoints)."""
        reg = self.get(caller.tenant, reg_id)
        if reg is None or not caller.may_change(reg.owner):
            return None
        if reg.ttl is not None:
            reg.expires_at = self._clock() + reg.ttl
        if reg_id in self._lapsed:
            self._apply()
        if self._on_heartbeat is not None:
            self._on_heartbeat(self._endpoint_ids(reg))
        return reg

    async def run(self, period: float = 0.25) -> None:
        """Expire leases: a lapsed registration leaves routing until its next heartbeat."""
        while True:
            await asyncio.sleep(period)
            now = self._clock()
            if {r.id for r in self._regs.values() if r.lapsed(now)} != self._lapsed:
                self._apply()

    async def close(self) -> None:
        """Write what is not on disk yet, then stop the writer."""
        await self.writer.close()

    # -- internals ---------------------------------------------------------------------------------
    def _check_room(self, owner: str | None) -> None:
        if len(self._regs) >= self._max_total:
            self._limit_hit("registrations")
            raise CallError(429, "too_many_registrations", f"this node holds {self._max_total} registrations")
        if sum(1 for r in self._regs.values() if r.owner == owner) >= self._max_per_owner:
            self._limit_hit("registrations_per_owner")
            raise CallError(429, "too_many_registrations", f"{owner} holds {self._max_per_owner} registrations")

    def _limit_hit(self, name: str) -> None:
        if self._on_limit is not None:
            self._on_limit(name)

    def _build(self, caller: Identity, document: object, kind: str, service: object, ttl: object) -> Registration:
        tenant = caller.tenant
        ttl_s = None
        if ttl is not None:
            try:
                ttl_s = parse_duration(ttl)
            except ValueError as exc:
                raise CallError(400, "invalid_registration", f"ttl: {exc}") from None
            if ttl_s <= 0:
                raise CallError(400, "invalid_registration", "ttl must be positive")
        if not isinstance(document, dict):
            raise CallError(400, "invalid_registration", f"{kind} must be a JSON object")
        reg = Registration(
            id="",
            kind=kind,
            tenant=tenant,
            owner=caller.name,
            service="",
            document=document,
            ttl=ttl_s,
            created=round(time.time(), 3),
            expires_at=None if ttl_s is None else self._clock() + ttl_s,
        )
        if kind == "service":
            doc_tenant = document.get("tenant", tenant)
            if doc_tenant != tenant:
                raise CallError(403, "forbidden", f"manifest names tenant {doc_tenant!r}, caller is {tenant!r}")
            spec = _parse(dict(document, tenant=tenant), "registration")
            if spec.health_check is not None and spec.health_check.kind == "command":
                # A command runs as the daemon's user: only manifests on disk (root's) may ask for one.
                raise CallError(
                    400, "invalid_registration", "health_check.command: only manifest files may run commands"
                )
            holder = self.owner_of_service(tenant, spec.name)
            if holder is not None and not caller.may_change(holder):
                raise CallError(409, "conflict", f"service {spec.name!r} is registered by {holder}")
            owner = self._registry.declared_by_manifest(tenant, spec.name)
            if owner is not None:
                raise CallError(409, "conflict", f"service {spec.name!r} is declared by manifest {owner.source}")
            reg.spec, reg.service = spec, spec.name
        else:
            if not isinstance(service, str):
                raise CallError(400, "invalid_registration", "service: the name of a declared service")
            target = self._registry.snapshot().get(tenant, service)
            if target is None:
                raise CallError(404, "unknown_service", f"no service {service!r} for tenant {tenant!r}")
            holder = _parse({"service_name": service, "tenant": tenant, "endpoints": [document]}, "registration")
            decl = holder.endpoints[0]
            if decl.url is None:
                raise CallError(400, "invalid_registration", "endpoint.url is required")
            if decl.tier not in target.spec.endpoint_types:
                raise CallError(400, "invalid_registration", f"service {service!r} takes no {decl.tier!r} endpoints")
            reg.service = service
            endpoint = endpoint_from_spec(target.spec, decl, source=SOURCE, eid="pending")
            floor = _priority_floor(target.spec)
            if endpoint.priority < floor:
                endpoint = dataclasses.replace(endpoint, priority=floor)  # never ahead of the declared endpoints
            reg.endpoint = endpoint
        return reg

    def _same_as(self, new: Registration) -> str | None:
        """The id of an existing registration for the same thing: a restarting app re-registers, not duplicates."""
        for reg in self._regs.values():
            if reg.tenant != new.tenant or reg.kind != new.kind or reg.service != new.service:
                continue
            if new.kind == "service":  # one registered service per name (`_build` checked who may replace it)
                return reg.id
            if reg.owner == new.owner and reg.endpoint and new.endpoint and reg.endpoint.url == new.endpoint.url:
                return reg.id
        return None

    def _endpoint_ids(self, reg: Registration) -> list[str]:
        if reg.endpoint is not None:
            return [reg.endpoint.id]
        snap = self._registry.snapshot().get(reg.tenant, reg.service)
        return [ep.id for ep in snap.endpoints] if snap is not None else []

    def _apply(self) -> None:
        self._apply_pending = False
        now = self._clock()
        self._lapsed = {r.id for r in self._regs.values() if r.lapsed(now)}
        specs, endpoints = [], []
        for reg in self._regs.values():
            active = reg.id not in self._lapsed
            if reg.spec is not None:
                specs.append(reg.spec if active else dataclasses.replace(reg.spec, endpoints=()))
            elif reg.endpoint is not None and active:
                endpoints.append(reg.endpoint)
        self._registry.set_registered_services(specs)
        self._registry.set_endpoints(SOURCE, endpoints)

    def _state_document(self) -> bytes:
        """The document to write; first the registry learns the changes it holds (the answer to each waits
        for this write, so a registration is routable by the time it is acknowledged)."""
        if self._apply_pending:
            self._apply()
        parts = [r.state_json() for r in self._regs.values()] + [_dumps(r) for r in self._unparsed]
        return b'{"version": 1, "registrations": [\n' + b",\n".join(parts) + b"\n]}\n"


def _dumps(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False).encode()


def _priority_floor(spec: ServiceSpec) -> int:
    """The best priority a registered endpoint may have in `spec`: the manifest's `[registration]
    min_priority`, else one after its worst declared endpoint (none declared: no floor)."""
    if spec.registration_min_priority is not None:
        return spec.registration_min_priority
    declared = [decl.priority if decl.priority is not None else spec.priority for decl in spec.endpoints]
    return max(declared) + 1 if declared else 0


def _endpoint_id(reg: Registration) -> str:
    assert reg.endpoint is not None
    return f"{reg.tenant}/{reg.service}/{reg.endpoint.tier}/reg:{reg.id}"


def _parse(document: dict, source: str) -> ServiceSpec:
    try:
        return parse_manifest_data(document, source)
    except ConfigError as exc:
        raise CallError(400, "invalid_registration", f"{exc.key}: {exc.message}" if exc.key else exc.message) from None
