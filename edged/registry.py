"""Services and their endpoints, merged from every discovery source into immutable, numbered snapshots."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .model import TIERS, Endpoint, EndpointSpec, Service, ServiceSpec, parse_target


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
    manifests: dict[tuple[str, str], ServiceSpec] = field(default_factory=dict)
    registered: dict[tuple[str, str], ServiceSpec] = field(default_factory=dict)
    endpoints: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)  # source name -> endpoints


class Registry:
    """Owns the current snapshot. Discovery sources replace their own part; every change makes a new snapshot.

    Manifests win over registered services of the same (tenant, name): files are what the operator wrote.
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

    def set_manifests(self, specs: Iterable[ServiceSpec]) -> None:
        """Replace the services declared by manifest files."""
        self._sources.manifests = {spec.key: spec for spec in specs}
        self._rebuild()

    def set_registered_services(self, specs: Iterable[ServiceSpec]) -> None:
        """Replace the services declared by local registration (`POST /v1/register` with a manifest)."""
        self._sources.registered = {spec.key: spec for spec in specs}
        self._rebuild()

    def set_endpoints(self, source: str, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoints a source ("register", "mdns", "mqtt", ...) contributes to known services."""
        new = tuple(endpoints)
        if self._sources.endpoints.get(source, ()) == new:
            return
        self._sources.endpoints[source] = new
        self._rebuild()

    def declared_by_manifest(self, tenant: str, name: str) -> ServiceSpec | None:
        return self._sources.manifests.get((tenant, name))

    def _rebuild(self) -> None:
        specs = dict(self._sources.registered)
        specs.update(self._sources.manifests)
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
