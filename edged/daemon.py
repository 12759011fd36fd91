"""The daemon (`edged run`): the mesh core with the edge and cloud tiers, the local API and registrations."""

from __future__ import annotations

import logging
import os
import time

from . import __version__, buildinfo
from .access import Access
from .api import Api, NodeInfo
from .authz_api import AuthzApi
from .browser import HostGuard
from .config import Config, load_config, secret_file_warnings
from .core import MeshCore, TierFactory
from .core import run as run_process
from .discovery.registrations import Registrations
from .errors import ConfigError
from .http.server import HttpServer
from .logs import log_event, setup_logging
from .model import Endpoint, EndpointSpec, HealthCheckSpec, ServiceSpec
from .policies import PolicyOverrides
from .reconfig import changed_keys, is_live, with_live_keys
from .registry import Snapshot
from .systemd import Notifier

log = logging.getLogger("edged.daemon")


def daemon_tiers(config: Config) -> list[TierFactory]:
    """The tiers `edged run` wires, in one list. A new tier is one more entry here (imported lazily, so
    that a tier that is off costs no memory)."""
    from .edge import EdgeTier

    tiers: list[TierFactory] = [EdgeTier]
    if config.mqtt.enabled:
        from .cloud import CloudTier

        tiers.append(CloudTier)
    return tiers


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
        extra = [demo_echo_service(config)] if config.demo.echo else []
        self.core = core = MeshCore(
            config, tiers=daemon_tiers(config), extra_services=extra, on_health_change=self._on_health_change
        )
        self.metrics, self.events, self.registry = core.metrics, core.events, core.registry
        self.health, self.pool, self.router, self.store = core.health, core.pool, core.router, core.store
        self.manifests = core.manifests
        limits = config.limits
        self.registrations = Registrations(
            self.registry,
            self.store,
            self.events,
            on_heartbeat=lambda ids: [self.health.heartbeat(i) for i in ids],
            max_total=limits.registrations,
            max_per_owner=limits.registrations_per_owner,
            on_limit=core.limit_hit,
        )
        self.policies = PolicyOverrides(self.registry, self.store, self.events)
        self.authz = AuthzApi(core.gate, self.store, self.events, self.router)
        self.registry.add_layer(self.policies.layer)
        self._ready = False
        self._up_labels: set[tuple[str, str, str]] = set()
        self.reloads = 0
        self.last_reload: dict | None = None
        self.pending_restart: list[str] = []  # keys of edged.toml changed since start that need a restart
        self.api = Api(
            node=NodeInfo(config.node.name, config.node.fleet, config.node.zone, __version__, time.time()),
            registry=self.registry,
            router=self.router,
            health=self.health,
            registrations=self.registrations,
            access=self._access(config),
            hosts=HostGuard(self._api_names(config)),
            events=self.events,
            metrics=self.metrics,
            ready=lambda: self._ready,
            render_metrics=self.metrics.render,
            peers=core.peers,
            providers=core.providers,
            config_state=self.config_state,
            gate=core.gate,
            authz=self.authz,
            json_depth=config.limits.json_depth,
            identity=core.identity,
        )
        self.api.set_policies(self.policies)
        self.server = HttpServer(
            self.api.handle,
            max_header_bytes=config.api.max_header,
            max_body_bytes=config.api.max_body,
            idle_timeout=config.api.idle_timeout,
            **core.server_limits(),
        )
        self.listening: list[str] = []
        self.metrics.add_collector(self._collect)
        self.metrics.build_info.set((__version__,), 1)
        self.registry.watch(self._on_registry_change)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load manifests and registrations, start checks and listeners, then tell systemd we are ready."""
        t0 = time.monotonic()
        await self.core.start()
        loaded = self.registrations.load()
        self.policies.load()
        self.authz.load()
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
        await self.core.start_tiers()
        self.core.spawn(self.registrations.run, "registration leases")
        if self.notifier.watchdog_interval():
            self.core.spawn(self.notifier.async_watchdog_loop, "watchdog")
        self._ready = True
        snap = self.registry.snapshot()
        self.notifier.ready(f"serving {len(snap.services)} services")
        log_event(
            log,
            logging.INFO,
            "edged ready",
            node=self.config.node.name,
            version=__version__,
            build=buildinfo.build(),  # "compiled" (mypyc, the opt-in build) or "pure": for bug reports
            listen=self.listening,
            services=len(snap.services),
            registrations=loaded,
            manifest_errors=len(self.manifests.errors),
            startup_ms=round((time.monotonic() - t0) * 1000, 1),
        )

    def reload(self) -> None:
        """SIGHUP: re-read edged.toml and the manifests. Live keys apply at once; keys that need a restart are
        reported as pending; a bad edged.toml keeps the running config (and a bad manifest its last good version).
        """
        self.notifier.reloading()
        t0 = time.monotonic()
        error, applied = None, []
        if self.config.path is not None:
            try:
                new = load_config(self.config.path)
            except ConfigError as exc:
                error = str(exc)
                log_event(log, logging.ERROR, "reload refused: running config kept", error=error)
            else:
                applied = self._apply_config(new)
        manifest_errors = self.manifests.reload()
        self.reloads += 1
        self.last_reload = {
            "at": time.time(),
            "ok": error is None,
            "error": error,
            "applied": applied,
            "manifest_errors": len(manifest_errors),
            "ms": round((time.monotonic() - t0) * 1000, 1),
        }
        if error is not None:
            status = f"reload failed, running config kept: {error}"
        else:
            status = f"reloaded: {len(applied)} keys applied, {len(manifest_errors)} manifest errors"
        if self.pending_restart:
            status += f"; pending restart: {', '.join(self.pending_restart)}"
        self.notifier.ready(status)
        self.events.publish(
            "reloaded",
            errors=[str(e) for e in manifest_errors],
            config_error=error,
            applied=applied,
            pending_restart=self.pending_restart,
        )

    def _apply_config(self, new: Config) -> list[str]:
        """Apply the live keys of a freshly read edged.toml; returns them. The rest becomes `pending_restart`."""
        applied = [key for key in changed_keys(self.config, new) if is_live(key)]
        old, self.config = self.config, with_live_keys(self.config, new)
        if old.log != new.log:
            setup_logging(new.log.level, new.log.format)
        if (old.access, old.tenants) != (new.access, new.tenants):
            self.api.set_access(self._access(new))
        if (old.authz, old.quotas) != (new.authz, new.quotas):
            self.core.gate.authz.configure(new.authz)
            self.authz.configure(new.quotas)
        if old.mqtt != self.config.mqtt:
            for tier in self.core.tiers:
                reconfigure = getattr(tier, "reconfigure", None)  # the cloud tier: live [mqtt] keys
                if reconfigure is not None:
                    reconfigure(self.config.mqtt)
        extra = [demo_echo_service(self.config)] if new.demo.echo else []
        self.manifests.configure(new.services.dirs, extra, new.services.reload_interval)
        self.pending_restart = changed_keys(self.config, new)
        for warning in secret_file_warnings(new):
            log.warning("%s", warning)
        log_event(log, logging.INFO, "config reloaded", applied=applied, pending_restart=self.pending_restart)
        if self.pending_restart:
            log_event(
                log,
                logging.WARNING,
                "config keys pending restart: systemctl restart edged applies them",
                keys=self.pending_restart,
            )
        return applied

    def config_state(self) -> dict:
        """For `edged status` and `edged reload`: the config file, reloads so far, keys pending restart."""
        return {
            "file": self.config.path,
            "pid": os.getpid(),
            "reloads": self.reloads,
            "last_reload": self.last_reload,
            "pending_restart": self.pending_restart,
            "tasks_failed": self.core.supervisor.failed(),
        }

    async def stop(self) -> None:
        """SIGTERM: stop taking calls, let in-flight ones finish up to the drain timeout, release everything."""
        self._ready = False
        self.notifier.stopping()
        log_event(log, logging.INFO, "edged stopping", in_flight=self.server.in_flight)
        self.events.close()
        await self.core.leaving()
        await self.server.shutdown(self.config.api.drain_timeout)
        await self.registrations.close()
        await self.policies.close()
        await self.core.stop()
        log.info("edged stopped")

    def _access(self, config: Config) -> Access:
        """Who is calling: the config's tokens, apps and JWT keys, and the JWT keys of signed fleet config."""
        return Access(config.access, config.tenants, fleet_keys=lambda: self.core.gate.fleet_jwt_keys)

    @staticmethod
    def _api_names(config: Config) -> list[str]:
        """Host names that name the API besides localhost, loopback addresses and *.mesh."""
        node = config.node.name.lower()
        return [config.api.listen_host, node, f"{node}.local", *config.access.hosts]

    # -- internals ---------------------------------------------------------------------------------
    def _on_registry_change(self, old: Snapshot, new: Snapshot) -> None:
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
        log_event(log, logging.INFO, f"endpoint {'up' if available else 'down'}", endpoint=endpoint.id, reason=reason)

    def _collect(self) -> None:
        """Refresh gauges that are cheaper to compute on scrape than to keep current."""
        snap = self.registry.snapshot()
        now = time.monotonic()
        seen = set()
        up = self.metrics.endpoint_up
        for svc in snap.services.values():
            for ep in svc.endpoints:
                eid = ep.id
                labels = (svc.name, eid, ep.tier)
                refused = up.dropped
                up.set(labels, 1.0 if self.health.available(eid, now) else 0.0)
                if up.dropped == refused:  # kept (not over [limits] metric_series: a box following a fleet)
                    seen.add(labels)
        for labels in self._up_labels - seen:
            self.metrics.endpoint_up.remove(labels)
        self._up_labels = seen
        self.metrics.registry_generation.set((), snap.generation)
        self.metrics.registrations.set((), len(self.registrations))
        self.metrics.inflight.set((), self.server.in_flight)


def run(config: Config) -> int:
    """`edged run`: the daemon until a signal (SIGHUP reloads). Returns the process exit code."""
    return run_process(lambda: Daemon(config), on_hup=lambda daemon: daemon.reload())
