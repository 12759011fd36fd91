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

    Keyed: what `policies` and `endpoints` give for a service depends only on that service's spec and the
    owner's state, not on the other services. An incremental rebuild (`update_services`: a few services of a
    source changed) calls `endpoints` with those services only (a `Partial` map) and keeps what they gave for
    the others; a layer that caches per service keeps the rest of its cache then.
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
    # The services that differ from the previous snapshot, when the registry knows (an incremental rebuild);
    # None: any may have. Watchers that follow every service use it to do O(changed) work.
    changed: frozenset[tuple[str, str]] | None = None

    def get(self, tenant: str, name: str) -> Service | None:
        return self.services.get((tenant, name))

    def for_tenant(self, tenant: str) -> list[Service]:
        return [svc for (t, _), svc in sorted(self.services.items()) if t == tenant]


EMPTY = Snapshot(generation=0, services=MappingProxyType({}))


class Partial(dict):
    """The services an incremental rebuild passes to `Layer.endpoints`: some of the merged ones, not all."""


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
        # What an incremental rebuild patches: "declared", the merged specs before any policy layer, and for each
        # policy source the specs its layer changed (a few: the others stay as below it, with no copy kept).
        self._stages: dict[str, dict[Key, ServiceSpec]] = {}
        self._services: dict[Key, Service] = {}  # the map under the current snapshot's proxy (never changed)
        self.rebuilds = 0  # whole rebuilds (for figures and tests)
        self.partial_rebuilds = 0
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

    def refresh_keys(self, keys: Iterable[Key]) -> None:
        """`refresh` when the owner knows which services its change can touch (a fleet document names the
        services whose policies it sets): only those are recomputed, in O(len(keys)) plus the layers' own
        tables, not every service (a box following ten thousand remote services)."""
        self._writable()
        self._patch(list(dict.fromkeys(keys)))

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
        old = self._sources.services.get(source, {})
        if old == new and source in self._sources.services:
            return
        self._sources.services[source] = new
        if not self._stages:
            self._rebuild()
            return
        # The services whose declaration changed, recomputed alone (every layer is keyed: see `Layer`): an
        # edited manifest on a box that follows ten thousand remote services is not a rebuild of all of them.
        changed = [key for key, spec in new.items() if old.get(key) != spec]
        changed += [key for key in old if key not in new]
        self._rebuild_keys(changed)

    def update_services(self, source: str, changed: Mapping[Key, ServiceSpec | None]) -> None:
        """Change some services of a source (None: no longer declared by it), keeping its others: work in
        O(len(changed)) (plus the policy layers' own tables), not a rebuild of every service: a box that
        learns ten thousand remote services applies each burst of them in a few ms (see `Layer`)."""
        self._writable()
        if source not in SERVICE_SOURCES:
            raise RegistryError(f"unknown service source {source!r}")
        mine = self._sources.services.setdefault(source, {})
        keys: list[Key] = []
        for key, spec in changed.items():
            if spec is None:
                if mine.pop(key, None) is not None:
                    keys.append(key)
            elif mine.get(key) != spec:
                mine[key] = spec
                keys.append(key)
        self._patch(keys)

    def _patch(self, keys: list[Key]) -> None:
        """Recompute the services `keys` alone (all of them while nothing is merged yet)."""
        if not keys:
            return
        if not self._stages:  # nothing merged yet: nothing to patch
            self._rebuild()
            return
        self._rebuild_keys(keys)

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

    def _merge(self, key: Key, layered: Mapping[str, Mapping[Key, ServiceSpec]]) -> ServiceSpec | None:
        """The declared spec of one service over every source (as `_rebuild` merges them all)."""
        merged = None
        for source in reversed(SERVICE_SOURCES):
            for spec in (self._sources.services.get(source, {}).get(key), layered.get(source, {}).get(key)):
                if spec is not None:
                    merged = spec if merged is None else _over(spec, merged, source)
        return merged

    def _rebuild_keys(self, keys: list[Key]) -> None:
        """`_rebuild` for a few services: the others keep their specs, endpoints and Service objects."""
        self.partial_rebuilds += 1
        layered: dict[str, dict[Key, ServiceSpec]] = {}
        wanted = set(keys)
        for layer in self._layers:
            if layer.services is not None:
                for spec in layer.services():
                    if spec.key in wanted:
                        layered.setdefault(layer.name, {})[spec.key] = spec
        stage = self._stages["declared"]
        for key in keys:
            merged = self._merge(key, layered)
            if merged is None:
                stage.pop(key, None)
            else:
                stage[key] = merged
        manifests = MappingProxyType(self._sources.services.get("manifest", {}))
        policy_from = dict(self._policy_from)
        for key in keys:
            policy_from.pop(key, None)
        below: Mapping[Key, ServiceSpec] = MappingProxyType(stage)
        for source in reversed(POLICY_SOURCES):
            over = self._stages[source]
            policies: dict[Key, PolicySpec] = {}
            for layer in self._layers:
                if layer.name == source and layer.policies is not None:
                    policies.update(layer.policies(Draft(below, manifests)))
            for key in keys:
                spec, policy = below.get(key), policies.get(key)
                if spec is None or policy is None:
                    over.pop(key, None)
                    continue
                over[key] = replace(spec, policy=policy)
                policy_from[key] = source
            below = _Overlay(below, over)
        self._policy_from = policy_from
        specs = below  # the final stage
        subset = Partial((key, specs[key]) for key in keys if key in specs)
        extra: dict[Key, list[Endpoint]] = {}
        orphans = [ep for ep in self._snapshot.orphans if (ep.tenant, ep.service) not in wanted]
        contributed = [*self._sources.endpoints.values()]
        contributed += [tuple(layer.endpoints(subset)) for layer in self._layers if layer.endpoints is not None]
        for endpoints in contributed:
            for ep in endpoints:
                key = (ep.tenant, ep.service)
                if key not in wanted:
                    continue
                if key in specs:
                    extra.setdefault(key, []).append(ep)
                else:
                    orphans.append(ep)
        old = self._snapshot
        services = self._services.copy()  # a dict's copy: 20x faster than dict() of the snapshot's proxy
        changed = set()
        for key in keys:
            spec = specs.get(key)
            if spec is None:
                if services.pop(key, None) is not None:
                    changed.add(key)
                continue
            svc = self._service(key, spec, tuple(extra.get(key, ())))
            if services.get(key) != svc:
                services[key] = svc
                changed.add(key)
        if not changed and tuple(orphans) == old.orphans:
            return
        self._services = services
        self._publish(Snapshot(old.generation + 1, MappingProxyType(services), tuple(orphans), frozenset(changed)))

    def _service(self, key: Key, spec: ServiceSpec, extras: tuple[Endpoint, ...]) -> Service:
        """The Service of a merged spec and the endpoints contributed to it (the last one, when unchanged)."""
        allowed = spec.endpoint_types
        static = static_endpoints(spec) if spec.endpoints else ()
        eps = tuple(_dedupe([ep for ep in (*static, *extras) if ep.tier in allowed]))
        known = self._services.get(key)
        # The same spec with the same endpoints makes the same Service: keep the old one (a burst of remote
        # entries changes a few services of thousands; the others keep theirs, and so their place in caches).
        if known is not None and known.spec is spec and known.endpoints == eps:
            return known
        return Service(spec=spec, endpoints=eps)

    def _publish(self, snapshot: Snapshot) -> None:
        old, self._snapshot = self._snapshot, snapshot
        self._notifying = True
        try:
            for fn in self._watchers:
                fn(old, snapshot)
        finally:
            self._notifying = False

    def _rebuild(self) -> None:
        self._writable()
        self.rebuilds += 1
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
        stages: dict[str, dict[Key, ServiceSpec]] = {"declared": dict(specs)}
        view: Mapping[Key, ServiceSpec] = MappingProxyType(stages["declared"])
        for source in reversed(POLICY_SOURCES):  # fleet first, the API's overrides over it
            below[source] = view  # live: an incremental rebuild patches the stages under it
            over = stages[source] = {}
            for layer in self._layers:
                if layer.name != source or layer.policies is None:
                    continue
                for key, policy in layer.policies(Draft(view, manifests)).items():
                    if key in specs:
                        specs[key] = over[key] = replace(specs[key], policy=policy)
                        policy_from[key] = source
            view = _Overlay(view, over)
        self._stages = stages
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
        for key, spec in sorted(specs.items()):
            services[key] = self._service(key, spec, tuple(extra.get(key, ())))
        old = self._snapshot
        if services == self._services and tuple(orphans) == old.orphans:
            return
        self._services = services
        self._publish(Snapshot(old.generation + 1, MappingProxyType(services), tuple(orphans)))


class _Overlay(Mapping):
    """The services below a policy layer with those it changed laid over them (a view: nothing copied)."""

    __slots__ = ("_base", "_over")

    def __init__(self, base: Mapping[Key, ServiceSpec], over: Mapping[Key, ServiceSpec]) -> None:
        self._base, self._over = base, over

    def __getitem__(self, key: Key) -> ServiceSpec:
        spec = self._over.get(key)
        return self._base[key] if spec is None else spec

    def get(self, key: Key, default=None):  # type: ignore[override]
        spec = self._over.get(key)
        return self._base.get(key, default) if spec is None else spec

    def __contains__(self, key: object) -> bool:
        return key in self._base

    def __iter__(self):
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


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
