"""Services and their endpoints, merged from every discovery source into immutable, numbered snapshots.

Two ways in, and neither from inside a watcher (the registry refuses that):
- sources that are told (manifest files, local registration, the MQTT registry) replace their part with
  `set_services` / `set_endpoints` when something arrives;
- layers (`Layer`) are computed at each rebuild from their owner's own state and from what the registry has
  merged so far: an edge tier's mDNS peers, the cloud endpoints, fleet and API policies. The owner calls
  `refresh()` when its own state changed; a manifest change recomputes every layer with no watcher involved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .errors import EdgedError
from .model import TIERS, Endpoint, EndpointSpec, PolicySpec, Service, ServiceSpec, parse_target

# Who wins when two sources declare the same (tenant, service): files the operator wrote, then local
# registration, then what was learned from the LAN (mDNS), then from the fleet registry (MQTT): an entry
# anyone on the broker could have retained never hides the edge endpoints of a service found on the LAN.
SERVICE_SOURCES = ("manifest", "register", "mdns", "mqtt")
# A service that several of these learned keeps the tiers of each, the stronger source's first.
LEARNED_SOURCES = frozenset({"mdns", "mqtt"})
# Who wins when a policy is set outside the manifest: the local API, then fleet config.
POLICY_SOURCES = ("api", "fleet")

Key = tuple[str, str]  # (tenant, service name)


class RegistryError(EdgedError):
    """The registry was used against its rules (a write from inside a watcher, an unknown source)."""


@dataclass(frozen=True, slots=True)
class Draft:
    """What a policy layer is laid over: the services merged so far (after the layers below it)."""

    services: Mapping[Key, ServiceSpec]
    manifests: Mapping[Key, ServiceSpec]  # as manifest files declare them (fleet policies lay over these)


@dataclass(frozen=True, slots=True)
class Layer:
    """One owner's contribution, recomputed at every rebuild. Each function is pure in its argument and the
    owner's own state (no I/O, no writes), so that it can be tested alone and called at any time.

    `name` ranks it: a services layer by `SERVICE_SOURCES`, a policies layer by `POLICY_SOURCES`.
    """

    name: str
    services: Callable[[], Iterable[ServiceSpec]] | None = None  # services the owner declares
    policies: Callable[[Draft], Mapping[Key, PolicySpec]] | None = None  # policies laid over the draft's
    endpoints: Callable[[Mapping[Key, ServiceSpec]], Iterable[Endpoint]] | None = None  # for the merged services


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
        labels=decl.labels,
    )


def static_endpoints(spec: ServiceSpec) -> list[Endpoint]:
    """Endpoints a service spec names by URL. `mdns` and cloud declarations are filled by their sources."""
    return [endpoint_from_spec(spec, d, source="manifest") for d in spec.endpoints if d.url is not None]


@dataclass(slots=True)
class _Sources:
    services: dict[str, dict[tuple[str, str], ServiceSpec]] = field(default_factory=dict)  # source -> specs
    endpoints: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)  # source name -> endpoints


class Registry:
    """Owns the current snapshot. Discovery sources replace their own part; every change makes a new snapshot.

    When sources declare the same (tenant, name), the first of `SERVICE_SOURCES` wins; policies set by the
    API or fleet config (`POLICY_SOURCES`) replace the declared policy.
    """

    def __init__(self, layers: Iterable[Layer] = ()) -> None:
        self._sources = _Sources()
        self._snapshot = EMPTY
        self._watchers: list[Callable[[Snapshot, Snapshot], None]] = []
        self._layers: list[Layer] = []
        self._notifying = False
        self._below: dict[str, Mapping[Key, ServiceSpec]] = {}  # policy source -> the services it was laid over
        self._policy_from: dict[Key, str] = {}  # which policy source set each service's policy
        self._built: dict[Key, tuple[ServiceSpec, tuple[Endpoint, ...], Service]] = {}  # what the last rebuild made
        for layer in layers:
            self.add_layer(layer)

    def _writable(self) -> None:
        if self._notifying:
            # Envoy's rule: callbacks never write back into what they are notified about. A watcher that
            # wants to add something returns it as a layer instead.
            raise RegistryError("the registry was changed from inside one of its watchers")

    def add_layer(self, layer: Layer) -> None:
        """Fold a layer into every rebuild from now on (the core does this with what tiers return)."""
        self._writable()
        if layer.services is not None and layer.name not in SERVICE_SOURCES:
            raise RegistryError(f"a services layer needs a name of {SERVICE_SOURCES}, not {layer.name!r}")
        if layer.policies is not None and layer.name not in POLICY_SOURCES:
            raise RegistryError(f"a policies layer needs a name of {POLICY_SOURCES}, not {layer.name!r}")
        self._layers.append(layer)
        self._rebuild()

    def refresh(self) -> None:
        """A layer's owner says its own state changed: recompute (a no-op when the result is the same)."""
        self._rebuild()

    def snapshot(self) -> Snapshot:
        """The current snapshot (cheap: no copy)."""
        return self._snapshot

    def watch(self, fn: Callable[[Snapshot, Snapshot], None]) -> None:
        """Call `fn(old, new)` after each change, synchronously, in registration order."""
        self._watchers.append(fn)

    def set_services(self, source: str, specs: Iterable[ServiceSpec] | Mapping[Key, ServiceSpec]) -> None:
        """Replace the services a source (one of `SERVICE_SOURCES`) declares: specs, or a map by key (its key
        tuples are kept: a source with ten thousand services saves making them again at every change)."""
        self._writable()
        if source not in SERVICE_SOURCES:
            raise RegistryError(f"unknown service source {source!r}")
        new = dict(specs) if isinstance(specs, Mapping) else {spec.key: spec for spec in specs}
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

    def base_policy(self, tenant: str, name: str, below: str) -> PolicySpec | None:
        """The policy a service would have without `below`'s layer and those above it: what that layer lays
        its keys over. None for an unknown service."""
        spec = self._below.get(below, {}).get((tenant, name))
        return spec.policy if spec is not None else None

    def policy_source(self, tenant: str, name: str) -> str:
        """Where the policy in force for a service comes from: "api", "fleet" or "declared"."""
        return self._policy_from.get((tenant, name), "declared")

    def set_endpoints(self, source: str, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoints a source ("register", "mdns", "mqtt", ...) contributes to known services."""
        self._writable()
        new = tuple(endpoints)
        if self._sources.endpoints.get(source, ()) == new:
            return
        self._sources.endpoints[source] = new
        self._rebuild()

    def declared_by_manifest(self, tenant: str, name: str) -> ServiceSpec | None:
        return self._sources.services.get("manifest", {}).get((tenant, name))

    def _rebuild(self) -> None:
        self._writable()
        specs: dict[Key, ServiceSpec] = {}
        for source in reversed(SERVICE_SOURCES):  # later sources first, so earlier ones overwrite them
            declared = list(self._sources.services.get(source, {}).items())
            for layer in self._layers:
                if layer.name == source and layer.services is not None:
                    declared.extend((spec.key, spec) for spec in layer.services())
            for key, spec in declared:
                weaker = specs.get(key)
                specs[key] = spec if weaker is None else _over(spec, weaker, source)
        manifests = MappingProxyType(self._sources.services.get("manifest", {}))
        below: dict[str, Mapping[Key, ServiceSpec]] = {}
        policy_from: dict[Key, str] = {}
        for source in reversed(POLICY_SOURCES):  # fleet first, the API's overrides over it
            below[source] = MappingProxyType(dict(specs))
            for layer in self._layers:
                if layer.name != source or layer.policies is None:
                    continue
                for key, policy in layer.policies(Draft(below[source], manifests)).items():
                    if key in specs:
                        specs[key] = replace(specs[key], policy=policy)
                        policy_from[key] = source
        self._below, self._policy_from = below, policy_from
        merged = MappingProxyType(specs)
        extra: dict[Key, list[Endpoint]] = {}
        orphans: list[Endpoint] = []
        contributed = [*self._sources.endpoints.values()]
        contributed += [tuple(layer.endpoints(merged)) for layer in self._layers if layer.endpoints is not None]
        for endpoints in contributed:
            for ep in endpoints:
                if (ep.tenant, ep.service) in specs:
                    extra.setdefault((ep.tenant, ep.service), []).append(ep)
                else:
                    orphans.append(ep)
        services: dict[Key, Service] = {}
        built: dict[Key, tuple[ServiceSpec, tuple[Endpoint, ...], Service]] = {}
        for key, spec in sorted(specs.items()):
            extras = tuple(extra.get(key, ()))
            known = self._built.get(key)
            # The same spec object with the same contributed endpoints makes the same Service: keep the old one
            # (a burst of remote entries changes a few services of thousands; the rest cost a lookup).
            if known is not None and known[0] is spec and known[1] == extras:
                svc = known[2]
            else:
                allowed = set(spec.endpoint_types)
                eps = [ep for ep in static_endpoints(spec) + list(extras) if ep.tier in allowed]
                svc = Service(spec=spec, endpoints=tuple(_dedupe(eps)))
            services[key] = svc
            built[key] = (spec, extras, svc)
        self._built = built
        old = self._snapshot
        if services == dict(old.services) and tuple(orphans) == old.orphans:
            return
        self._snapshot = Snapshot(old.generation + 1, MappingProxyType(services), tuple(orphans))
        self._notifying = True
        try:
            for fn in self._watchers:
                fn(old, self._snapshot)
        finally:
            self._notifying = False


def _over(spec: ServiceSpec, weaker: ServiceSpec | None, source: str) -> ServiceSpec:
    """`spec` of `source` over what a weaker source declared: a learned service keeps a weaker learner's tiers
    after its own (found on the LAN and in the fleet registry: edge first, then cloud)."""
    if weaker is None or source not in LEARNED_SOURCES or weaker.source.partition(":")[0] not in LEARNED_SOURCES:
        return spec
    extra = tuple(t for t in weaker.endpoint_types if t not in spec.endpoint_types)
    return replace(spec, endpoint_types=spec.endpoint_types + extra) if extra else spec


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
