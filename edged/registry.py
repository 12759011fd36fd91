"""Services and their endpoints, merged from every discovery source into immutable, numbered snapshots."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .model import TIERS, Endpoint, EndpointSpec, PolicySpec, Service, ServiceSpec, parse_target

# Who wins when two sources declare the same (tenant, service): files the operator wrote, then local
# registration, then what was learned from the fleet registry (MQTT) and from the LAN (mDNS).
SERVICE_SOURCES = ("manifest", "register", "mqtt", "mdns")
# Who wins when a policy is set outside the manifest: the local API, then fleet config.
POLICY_SOURCES = ("api", "fleet")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The registry at one moment. Readers keep a reference; writers build a new one."""

    generation: int
    services: Mapping[tuple[str, str], Service]  # (tenant, name) -> Service
    orphans: tuple[Endpoint, ...] = ()  # endpoints whose service is not declared (yet)

    def get(self, tenant: str, name: str) -> Service | None:
        return self.services.get((tenant, name))

    def for_tenant(self, tenant: str) -> list[Service]:
        return [svc for (t, _), svc in sorted(self.services.items()) if t == tenant]


EMPTY = Snapshot(generation=0, services=MappingProxyType({}))


def endpoint_id(spec: ServiceSpec, tier: str, where: str) -> str:
    """A stable id: the same declaration keeps its id (and so its health state) across reloads."""
    return f"{spec.tenant}/{spec.name}/{tier}/{where}"


def endpoint_from_spec(service: ServiceSpec, decl: EndpointSpec, *, source: str, eid: str | None = None) -> Endpoint:
    """The concrete endpoint of a declaration that names a URL (local, or edge with a fixed address)."""
    assert decl.url is not None
    return Endpoint(
        id=eid or endpoint_id(service, decl.tier, decl.url),
        service=service.name,
        tenant=service.tenant,
        tier=decl.tier,
        url=decl.url,
        priority=service.priority if decl.priority is None else decl.priority,
        weight=decl.weight,
        source=source,
        target=parse_target(decl.url),
    )


def static_endpoints(spec: ServiceSpec) -> list[Endpoint]:
    """Endpoints a service spec names by URL. `mdns` and cloud declarations are filled by their sources."""
    return [endpoint_from_spec(spec, d, source="manifest") for d in spec.endpoints if d.url is not None]


@dataclass(slots=True)
class _Sources:
    services: dict[str, dict[tuple[str, str], ServiceSpec]] = field(default_factory=dict)  # source -> specs
    endpoints: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)  # source name -> endpoints
    policies: dict[str, dict[tuple[str, str], PolicySpec]] = field(default_factory=dict)  # source -> overrides


class Registry:
    """Owns the current snapshot. Discovery sources replace their own part; every change makes a new snapshot.

    When sources declare the same (tenant, name), the first of `SERVICE_SOURCES` wins; policies set by the
    API or fleet config (`POLICY_SOURCES`) replace the declared policy.
    """

    def __init__(self) -> None:
        self._sources = _Sources()
        self._snapshot = EMPTY
        self._watchers: list[Callable[[Snapshot, Snapshot], None]] = []

    def snapshot(self) -> Snapshot:
        """The current snapshot (cheap: no copy)."""
        return self._snapshot

    def watch(self, fn: Callable[[Snapshot, Snapshot], None]) -> None:
        """Call `fn(old, new)` after each change, synchronously, in registration order."""
        self._watchers.append(fn)

    def set_services(self, source: str, specs: Iterable[ServiceSpec]) -> None:
        """Replace the services a source (one of `SERVICE_SOURCES`) declares."""
        if source not in SERVICE_SOURCES:
            raise ValueError(f"unknown service source {source!r}")
        new = {spec.key: spec for spec in specs}
        if self._sources.services.get(source) == new:
            return
        self._sources.services[source] = new
        self._rebuild()

    def set_manifests(self, specs: Iterable[ServiceSpec]) -> None:
        """Replace the services declared by manifest files."""
        self.set_services("manifest", specs)

    def set_registered_services(self, specs: Iterable[ServiceSpec]) -> None:
        """Replace the services declared by local registration (`POST /v1/register` with a manifest)."""
        self.set_services("register", specs)

    def set_policies(self, source: str, policies: Mapping[tuple[str, str], PolicySpec]) -> None:
        """Replace the policy overrides of a source (one of `POLICY_SOURCES`), keyed by (tenant, service)."""
        if source not in POLICY_SOURCES:
            raise ValueError(f"unknown policy source {source!r}")
        new = dict(policies)
        if self._sources.policies.get(source) == new:
            return
        self._sources.policies[source] = new
        self._rebuild()

    def base_policy(self, tenant: str, name: str, below: str) -> PolicySpec | None:
        """The policy a service would have without `below`'s override and those above it: what that source
        lays its keys over. None for an unknown service."""
        rank = POLICY_SOURCES.index(below)
        for source in POLICY_SOURCES[rank + 1 :]:
            policy = self._sources.policies.get(source, {}).get((tenant, name))
            if policy is not None:
                return policy
        for source in SERVICE_SOURCES:
            spec = self._sources.services.get(source, {}).get((tenant, name))
            if spec is not None:
                return spec.policy
        return None

    def policy_source(self, tenant: str, name: str) -> str:
        """Where the policy in force for a service comes from: "api", "fleet" or "declared"."""
        for source in POLICY_SOURCES:
            if (tenant, name) in self._sources.policies.get(source, {}):
                return source
        return "declared"

    def set_endpoints(self, source: str, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoints a source ("register", "mdns", "mqtt", ...) contributes to known services."""
        new = tuple(endpoints)
        if self._sources.endpoints.get(source, ()) == new:
            return
        self._sources.endpoints[source] = new
        self._rebuild()

    def declared_by_manifest(self, tenant: str, name: str) -> ServiceSpec | None:
        return self._sources.services.get("manifest", {}).get((tenant, name))

    def _rebuild(self) -> None:
        specs: dict[tuple[str, str], ServiceSpec] = {}
        for source in reversed(SERVICE_SOURCES):  # later sources first, so earlier ones overwrite them
            specs.update(self._sources.services.get(source, {}))
        for source in reversed(POLICY_SOURCES):
            for key, policy in self._sources.policies.get(source, {}).items():
                if key in specs:
                    specs[key] = replace(specs[key], policy=policy)
        extra: dict[tuple[str, str], list[Endpoint]] = {}
        orphans: list[Endpoint] = []
        for endpoints in self._sources.endpoints.values():
            for ep in endpoints:
                if (ep.tenant, ep.service) in specs:
                    extra.setdefault((ep.tenant, ep.service), []).append(ep)
                else:
                    orphans.append(ep)
        services: dict[tuple[str, str], Service] = {}
        for key, spec in sorted(specs.items()):
            allowed = set(spec.endpoint_types)
            eps = [ep for ep in static_endpoints(spec) + extra.get(key, []) if ep.tier in allowed]
            services[key] = Service(spec=spec, endpoints=tuple(_dedupe(eps)))
        old = self._snapshot
        if services == dict(old.services) and tuple(orphans) == old.orphans:
            return
        self._snapshot = Snapshot(old.generation + 1, MappingProxyType(services), tuple(orphans))
        for fn in self._watchers:
            fn(old, self._snapshot)


def _dedupe(endpoints: list[Endpoint]) -> list[Endpoint]:
    seen: set[str] = set()
    out = []
    for ep in endpoints:
        if ep.id not in seen:
            seen.add(ep.id)
            out.append(ep)
    return out


def tier_rank(spec: ServiceSpec, tier: str) -> int:
    """Position of a tier in the service's preference (`endpoint_types` order)."""
    try:
        return spec.endpoint_types.index(tier)
    except ValueError:
        return len(TIERS)
