"""The mesh core every process kind is built on (`edged run`, `edged bridge`), and the `Tier` protocol.

    manifests --> registry (+ the layers tiers return) --> health --> policy --> router --> transports
                                                                 vitals (one sampler) --> tiers

`MeshCore` builds these once, in one place, and owns their lifetimes. A tier plugs in by *returning* what
it adds (`Tier.parts()` -> `TierParts`): the core folds transports into the router's table, layers into
the registry's rebuild, check headers into health, peers into `edged status`, collectors into the
metrics and vitals listeners into the sampler. No tier reaches into another object. `run()` is the one
process runner (signals, uvloop).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from . import aio, predictive
from .admission import Gate
from .call import Transport
from .config import Config
from .discovery.manifests import ManifestSource
from .errors import ConfigError, EdgedError
from .events import EventBus
from .health import HealthMonitor
from .http.client import UpstreamPool
from .locality import Origin
from .model import Endpoint, ServiceSpec
from .policy import Ranker
from .registry import Layer, Registry, Snapshot
from .router import Router
from .state import StateStore
from .supervise import Supervisor, count_tasks, watch_loop_lag
from .telemetry import MeshMetrics, Metrics
from .transport.http import HttpTransport
from .vitals import NodeVitals, Vitals, VitalsReader

log = logging.getLogger("edged.core")

CheckHeaders = Callable[[Endpoint], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class TierParts:
    """What a tier adds to the core. Every field is optional: a tier returns only what it has."""

    transports: Mapping[str, Transport] = field(default_factory=dict)  # endpoint tier -> how it is called
    layers: tuple[Layer, ...] = ()  # folded into every registry rebuild
    check_headers: Mapping[str, CheckHeaders] = field(default_factory=dict)  # endpoint tier -> check headers
    check_pools: Mapping[str, UpstreamPool] = field(default_factory=dict)  # endpoint tier -> pool of its https checks
    peers: Callable[[], list[dict]] | None = None  # for `edged status` / `GET /v1/status`
    # For `/v1/services`: the remote nodes serving (tenant, service), with liveness and last-seen time.
    providers: Callable[[str, str], list[dict]] | None = None
    collect: Callable[[], None] | None = None  # refreshes its gauges at scrape time
    on_vitals: Callable[[Vitals], None] | None = None  # told of each vitals reading
    on_registry_change: Callable[[Snapshot, Snapshot], None] | None = None  # observes; must not write
    identity: Callable[[], dict] | None = None  # this node's certificate, for `edged status`


class Tier(Protocol):
    """A tier beyond local (edge, cloud). Built with the core (`make(core)`), it returns its parts once;
    started after the core is up, told first when the process leaves, stopped last."""

    name: str

    def parts(self) -> TierParts: ...

    async def start(self) -> None: ...

    async def leaving(self) -> None:
        """Shutdown began: announce it (mDNS goodbye, MQTT offline) while in-flight calls still drain."""

    async def stop(self) -> None: ...


TierFactory = Callable[["MeshCore"], Tier]


class MeshCore:
    """Registry, manifests, health, pool, router, metrics, events, state and the vitals sampler of one
    process, and the tiers built on them. `tiers` are factories (`make(core) -> Tier`); their order is the
    order of start (and the reverse of stop), not a preference: the policy ranks endpoints."""

    def __init__(
        self,
        config: Config,
        *,
        tiers: Sequence[TierFactory] = (),
        extra_services: Sequence[ServiceSpec] = (),
        on_health_change: Callable[[Endpoint, bool, str], None] | None = None,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = MeshMetrics(Metrics(max_series=self.limits.metric_series))
        self.metrics.add_collector(lambda: count_tasks(self.metrics))
        self.events = EventBus()
        self.store = StateStore(config.state.dir)
        self.registry = Registry()
        self._check_headers: dict[str, CheckHeaders] = {}
        self._check_pools: dict[str, UpstreamPool] = {}
        self.pool = UpstreamPool()  # calls' keep-alive connections; plain-HTTP health checks reuse them
        self.health = HealthMonitor(
            on_change=self._on_health_change, check_headers=self._headers_for, check_pool=self._pool_for
        )
        self.manifests = ManifestSource(
            self.registry, config.services.dirs, extra=list(extra_services), on_errors=self._on_manifest_errors
        )
        self._transports: dict[str, Transport] = {"local": HttpTransport(self.pool)}
        self.router = Router(
            self.registry,
            self.health,
            self._transports,
            self.metrics,
            Ranker(origin=Origin(config.node.zone, config.node.location)),
            whole_answer=self.limits.answer_buffer,
        )
        self.gate = Gate.build(config.authz, config.quotas, self.metrics)  # authz + quotas of every entry point
        self.vitals = NodeVitals(
            VitalsReader(config.vitals.proc_root, config.vitals.sys_root),
            interval=config.vitals.interval,
            gauge=self.metrics.node_vitals,
        )
        self._peer_sources: list[Callable[[], list[dict]]] = []
        self._identity_source: Callable[[], dict] | None = None
        self._provider_sources: list[Callable[[str, str], list[dict]]] = []
        self._on_health = on_health_change
        self.supervisor = Supervisor(self.metrics)
        self.registry.watch(self._on_registry_change)
        self.tiers: list[Tier] = []
        for make in tiers:
            tier = make(self)
            self._fold(tier.parts())
            self.tiers.append(tier)

    def __repr__(self) -> str:
        snap = self.registry.snapshot()
        return f"<MeshCore gen={snap.generation} services={len(snap.services)} tiers={[t.name for t in self.tiers]}>"

    def _fold(self, parts: TierParts) -> None:
        for name, transport in parts.transports.items():
            if name in self._transports:
                raise EdgedError(f"two transports for the {name!r} tier")
            self._transports[name] = transport
        self._check_headers.update(parts.check_headers)
        self._check_pools.update(parts.check_pools)
        for layer in parts.layers:
            self.registry.add_layer(layer)
        if parts.peers is not None:
            self._peer_sources.append(parts.peers)
        if parts.identity is not None:
            self._identity_source = parts.identity
        if parts.providers is not None:
            self._provider_sources.append(parts.providers)
        if parts.collect is not None:
            self.metrics.add_collector(parts.collect)
        if parts.on_vitals is not None:
            self.vitals.listeners.append(parts.on_vitals)
        if parts.on_registry_change is not None:
            self.registry.watch(parts.on_registry_change)

    # -- what processes read ------------------------------------------------------------------------------
    def identity(self) -> dict | None:
        """This node's fleet certificate as the tier that keeps it sees it (None: no tier does)."""
        return self._identity_source() if self._identity_source is not None else None

    def peers(self) -> list[dict]:
        """Peers of every tier, for `edged status`."""
        return [peer for source in self._peer_sources for peer in source()]

    def providers(self, tenant: str, service: str) -> list[dict]:
        """Remote nodes serving a service, with their liveness, for `/v1/services`."""
        return [p for source in self._provider_sources for p in source(tenant, service)]

    def limit_hit(self, name: str) -> None:
        """A limit of [limits] bit: count it (`edged_limit_hits_total{limit}`)."""
        self.metrics.limit_hits.inc((name,))

    def server_limits(self) -> dict:
        """The [limits] of an HTTP listener (the API's and the ingress's), as HttpServer keywords."""
        lim = self.limits
        return {
            "header_timeout": lim.header_timeout,
            "body_timeout": lim.body_timeout,
            "max_connections": lim.connections,
            "max_output": lim.output_buffer,
            "on_limit": self.limit_hit,
        }

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load manifests, start health checks, the vitals sampler and the manifest watch, then the tiers."""
        self.manifests.reload()
        self.health.sync(self.registry.snapshot().services.values())
        self.health.restore_models(predictive.load(self.store, time.monotonic()))
        self.spawn(lambda: predictive.keep(self.store, self.health.models), "predictive models")
        self.vitals.read()
        self.spawn(self.vitals.run, "vitals")
        self.spawn(lambda: self.manifests.watch(self.config.services.reload_interval), "manifest watch")
        self.spawn(lambda: watch_loop_lag(self.metrics), "loop lag")

    async def start_tiers(self) -> None:
        for tier in self.tiers:
            await tier.start()

    async def leaving(self) -> None:
        for tier in reversed(self.tiers):
            await quietly(tier.leaving(), f"{tier.name}: leaving")

    async def stop(self) -> None:
        """Stop the tiers, then every task of the core, health checks and the pool."""
        for tier in reversed(self.tiers):
            await quietly(tier.stop(), f"{tier.name}: stop")
        await self.supervisor.close()
        await self.health.close()
        await self.pool.close()

    def spawn(self, make: Callable[[], Awaitable[object]], name: str) -> None:
        """Run a background loop owned by the core: restarted when it fails, cancelled and awaited by `stop`."""
        self.supervisor.spawn(make, name)

    # -- internals ----------------------------------------------------------------------------------------
    def _headers_for(self, endpoint: Endpoint) -> Sequence[tuple[str, str]]:
        headers = self._check_headers.get(endpoint.tier)
        return headers(endpoint) if headers is not None else ()

    def _pool_for(self, endpoint: Endpoint) -> UpstreamPool | None:
        """The keep-alive pool an endpoint's http checks go through: the call path's own for plain HTTP, its
        tier's for TLS (a peer's ingress over mutual TLS: no handshake per check); None: a connection per check."""
        target = endpoint.target
        if target is None:
            return None
        return self._check_pools.get(endpoint.tier) if target.tls else self.pool

    def _on_registry_change(self, old: Snapshot, new: Snapshot) -> None:
        if new.changed is None:
            self.health.sync(new.services.values())
            return
        # An incremental change (a burst of remote entries): the endpoints of the services it touched only.
        keys = new.changed
        self.health.sync_changed(
            [s for k in keys if (s := old.services.get(k)) is not None],
            [s for k in keys if (s := new.services.get(k)) is not None],
        )

    def _on_health_change(self, endpoint: Endpoint, available: bool, reason: str) -> None:
        if not available and reason.startswith("ejected"):
            self.metrics.ejections.inc((endpoint.service,))
        if self._on_health is not None:
            self._on_health(endpoint, available, reason)

    def _on_manifest_errors(self, errors: list[ConfigError]) -> None:
        if errors:
            self.metrics.manifest_errors.inc((), len(errors))


async def quietly(coro, what: str) -> None:
    """Shutdown goes on whatever one part does: log its failure and continue with the next."""
    try:
        await coro
    except Exception:
        log.exception("%s failed", what)


class Process(Protocol):
    """A process kind: `start()` brings it up, `stop()` drains and releases everything it started."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve(make: Callable[[], Process], *, on_hup: Callable[[Process], None] | None = None) -> None:
    """Build the process, run it until SIGTERM or SIGINT, then stop it; SIGHUP calls `on_hup` when given."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    process = make()
    signals = [signal.SIGTERM, signal.SIGINT]
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup, process)
        signals.append(signal.SIGHUP)
    try:
        await process.start()
        await stopping.wait()
    finally:
        # Handlers stay during the drain: a repeated SIGTERM must not cut in-flight calls short.
        await process.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(make: Callable[[], Process], *, on_hup: Callable[[Process], None] | None = None) -> int:
    """Run a process kind until a signal; uvloop when installed. Returns the process exit code."""
    aio.run(serve(make, on_hup=on_hup))  # uvloop only from edged.aio.UVLOOP_MIN
    return 0
