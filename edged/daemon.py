"""The daemon: wires discovery -> registry -> health -> policy -> router -> transport, and owns their lifetimes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Protocol

from . import __version__
from .aio import cancel_and_wait
from .api import Api, NodeInfo
from .config import Config
from .discovery.manifests import ManifestSource
from .discovery.registrations import Registrations
from .errors import ConfigError
from .events import EventBus
from .health import HealthMonitor
from .http.client import UpstreamPool
from .http.server import HttpServer
from .logs import log_event
from .model import Endpoint, EndpointSpec, HealthCheckSpec, ServiceSpec
from .policies import PolicyOverrides
from .policy import Ranker
from .registry import Registry, Snapshot
from .router import Router
from .state import StateStore
from .systemd import Notifier
from .telemetry import MeshMetrics
from .tenancy import Tenancy
from .transport.http import HttpTransport

log = logging.getLogger("edged.daemon")


class Component(Protocol):
    """A part of the daemon with its own lifetime (the edge tier, the cloud tier). Built with the daemon,
    started after the core is up and before READY, told first when the daemon leaves, stopped last."""

    name: str

    async def start(self) -> None: ...

    async def leaving(self) -> None:
        """Shutdown began: announce it (mDNS goodbye, MQTT offline) while in-flight calls still drain."""

    async def stop(self) -> None: ...


def demo_echo_service(config: Config) -> ServiceSpec:
    """The built-in sample service: the daemon's own echo route, called through the mesh like any service."""
    host = config.api.listen_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return ServiceSpec(
        name="echo",
        endpoint_types=("local",),
        endpoints=(EndpointSpec(tier="local", url=f"http://{host}:{config.api.listen_port}/v1/echo", priority=1),),
        health_check=HealthCheckSpec(kind="http", http_path="/healthz", interval=5.0, timeout=1.0),
        source="built-in demo ([demo] echo = true)",
    )


class Daemon:
    """One running edged. `start()` brings it to ready; `stop()` drains and releases everything it started."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.metrics = MeshMetrics()
        self.events = EventBus()
        self.registry = Registry()
        self.store = StateStore(config.state.dir)
        self.health = HealthMonitor(on_change=self._on_health_change)
        self.registrations = Registrations(
            self.registry, self.store, self.events, on_heartbeat=lambda ids: [self.health.heartbeat(i) for i in ids]
        )
        extra = [demo_echo_service(config)] if config.demo.echo else []
        self.manifests = ManifestSource(
            self.registry, config.services.dirs, extra=extra, on_errors=self._on_manifest_errors
        )
        self.pool = UpstreamPool()
        http = HttpTransport(self.pool)
        # Components add their tier's transport here (the router reads this very dict).
        self.transports: dict = {"local": http, "edge": http}
        self.router = Router(self.registry, self.health, self.transports, self.metrics, Ranker())
        self.components: list[Component] = []
        self.peer_sources: list[Callable[[], list[dict]]] = []  # for `edged status`: peers per component
        self._ready = False
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()
        self._up_labels: set[tuple[str, str, str]] = set()
        self.api = Api(
            node=NodeInfo(config.node.name, config.node.fleet, config.node.zone, __version__, time.time()),
            registry=self.registry,
            router=self.router,
            health=self.health,
            registrations=self.registrations,
            tenancy=Tenancy(config.tenants),
            events=self.events,
            metrics=self.metrics,
            ready=lambda: self._ready,
            render_metrics=self.metrics.render,
            peers=lambda: [peer for source in self.peer_sources for peer in source()],
        )
        self.server = HttpServer(
            self.api.handle,
            max_header_bytes=config.api.max_header,
            max_body_bytes=config.api.max_body,
            idle_timeout=config.api.idle_timeout,
        )
        # Tiers beyond local plug in here as components (each adds its transport and discovery source).
        # -- edge tier (mDNS + ingress): see edged/edge/
        from .edge import EdgeTier

        self.edge = EdgeTier(
            config,
            registry=self.registry,
            router=self.router,
            health=self.health,
            metrics=self.metrics,
            events=self.events,
            pool=self.pool,
        )
        self.transports["edge"] = self.edge.transport
        self.components.append(self.edge)
        self.peer_sources.append(self.edge.peers)
        # -- cloud tier (MQTT): see edged/cloud/
        if config.mqtt.enabled:
            from .cloud import CloudTier

            self.components.append(
                CloudTier(
                    config=config,
                    registry=self.registry,
                    store=self.store,
                    metrics=self.metrics,
                    transports=self.transports,
                    peer_sources=self.peer_sources,
                )
            )
        self.listening: list[str] = []
        self.metrics.add_collector(self._collect)
        self.metrics.build_info.set((__version__,), 1)
        self.registry.watch(self._on_registry_change)
        # Last, so that its registry watcher runs after every other one (it may lay policies again).
        self.policies = PolicyOverrides(self.registry, self.store, self.events)
        self.api.set_policies(self.policies)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load manifests and registrations, start checks and listeners, then tell systemd we are ready."""
        t0 = time.monotonic()
        self.manifests.reload()
        loaded = self.registrations.load()
        self.policies.load()
        self.health.sync(self.registry.snapshot().services.values())
        api = self.config.api
        host, port = await self.server.listen_tcp(api.listen_host, api.listen_port)
        self.listening.append(f"http://{host}:{port}")
        if api.socket:
            try:
                os.makedirs(os.path.dirname(api.socket), mode=0o750, exist_ok=True)
                await self.server.listen_unix(api.socket, 0o660, api.socket_group)
                self.listening.append(f"unix:{api.socket}")
            except OSError as exc:
                log.error("API socket %s not available (%s); serving on TCP only", api.socket, exc)
        for component in self.components:
            await component.start()
        self._spawn(self.registrations.run(), "registration leases")
        self._spawn(self.manifests.watch(self.config.services.reload_interval), "manifest watch")
        if self.notifier.watchdog_interval():
            self._spawn(self.notifier.async_watchdog_loop(), "watchdog")
        self._ready = True
        snap = self.registry.snapshot()
        self.notifier.ready(f"serving {len(snap.services)} services")
        log_event(
            log,
            logging.INFO,
            "edged ready",
            node=self.config.node.name,
            listen=self.listening,
            services=len(snap.services),
            registrations=loaded,
            manifest_errors=len(self.manifests.errors),
            startup_ms=round((time.monotonic() - t0) * 1000, 1),
        )

    def reload(self) -> None:
        """SIGHUP: re-read manifests (a bad file keeps its last good version). Listener changes need a restart."""
        self.notifier.reloading()
        errors = self.manifests.reload()
        self.notifier.ready(f"reloaded, {len(errors)} manifest errors")
        self.events.publish("reloaded", errors=[str(e) for e in errors])

    async def stop(self) -> None:
        """SIGTERM: stop taking calls, let in-flight ones finish up to the drain timeout, release everything."""
        self._ready = False
        self.notifier.stopping()
        log_event(log, logging.INFO, "edged stopping", in_flight=self.server.in_flight)
        self.events.close()
        for component in reversed(self.components):
            await _quietly(component.leaving(), f"{component.name}: leaving")
        await self.server.shutdown(self.config.api.drain_timeout)
        for component in reversed(self.components):
            await _quietly(component.stop(), f"{component.name}: stop")
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        await self.health.close()
        await self.pool.close()
        log.info("edged stopped")

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            # Handlers stay during the drain: a repeated SIGTERM must not cut in-flight calls short.
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    # -- internals ---------------------------------------------------------------------------------
    def _spawn(self, coro, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A background loop died: say so loudly; systemd's watchdog is not enough to explain why.
            log.error("background task %r failed", task.get_name(), exc_info=task.exception())

    def _on_registry_change(self, old: Snapshot, new: Snapshot) -> None:
        self.health.sync(new.services.values())
        self.events.publish("services_changed", generation=new.generation)

    def _on_health_change(self, endpoint: Endpoint, available: bool, reason: str) -> None:
        self.events.publish(
            "endpoint_up" if available else "endpoint_down",
            tenant=endpoint.tenant,
            service=endpoint.service,
            endpoint=endpoint.id,
            tier=endpoint.tier,
            reason=reason,
        )
        if not available and reason.startswith("ejected"):
            self.metrics.ejections.inc((endpoint.service,))
        log_event(log, logging.INFO, f"endpoint {'up' if available else 'down'}", endpoint=endpoint.id, reason=reason)

    def _on_manifest_errors(self, errors: list[ConfigError]) -> None:
        if errors:
            self.metrics.manifest_errors.inc((), len(errors))

    def _collect(self) -> None:
        """Refresh gauges that are cheaper to compute on scrape than to keep current."""
        snap = self.registry.snapshot()
        now = time.monotonic()
        seen = set()
        for svc in snap.services.values():
            for ep in svc.endpoints:
                labels = (svc.name, ep.id, ep.tier)
                seen.add(labels)
                self.metrics.endpoint_up.set(labels, 1.0 if self.health.state(ep.id).available(now) else 0.0)
        for labels in self._up_labels - seen:
            self.metrics.endpoint_up.remove(labels)
        self._up_labels = seen
        self.metrics.registry_generation.set((), snap.generation)
        self.metrics.registrations.set((), len(self.registrations))
        self.metrics.inflight.set((), self.server.in_flight)


async def _quietly(coro, what: str) -> None:
    """Shutdown goes on whatever one part does: log its failure and continue with the next."""
    try:
        await coro
    except Exception:
        log.exception("%s failed", what)


def run(config: Config) -> int:
    """Run the daemon until a signal; uvloop when installed. Returns the process exit code."""
    daemon_main = _main(config)
    try:
        import uvloop
    except ImportError:
        asyncio.run(daemon_main)
    else:
        uvloop.run(daemon_main)
    return 0


async def _main(config: Config) -> None:
    daemon = Daemon(config)
    await daemon.run_until_signalled()
