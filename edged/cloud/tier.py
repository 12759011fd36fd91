"""`CloudTier`: the daemon component of the cloud tier, and the cloud endpoints it derives from the registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from ..aio import cancel_and_wait
from ..config import Config
from ..logs import log_event
from ..model import Endpoint
from ..registry import Registry, Snapshot
from ..state import StateStore
from ..telemetry import MeshMetrics
from . import fleet as fleet_mod
from . import registry_sync as registry_mod
from .fleet import FleetConfigSource, FleetSettings, load_trusted_keys
from .persist import StateSaver
from .registry_sync import RegistrySync
from .session import LastWill, MqttSession, PublishError, broker_address
from .telemetry import CloudMetrics, TelemetryPublisher, prime_vitals, read_vitals
from .topics import Topics
from .transport import CloudTransport

log = logging.getLogger("edged.cloud")

CLOUD_SOURCE = "mqtt"
VITALS_STEP = 10  # re-publish the retained status when a vital moved by this many points


def cloud_endpoints(snapshot: Snapshot, *, broker_url: str, topics: Topics) -> list[Endpoint]:
    """One cloud endpoint per service whose endpoint types include "cloud".

    Priority and weight come from a long-form `[[endpoints]] type = "cloud"` when there is one, else the
    service's priority and weight 100.
    """
    host, port, tls = broker_address(broker_url)
    where = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}/{topics.base}/svc"
    out = []
    for svc in snapshot.services.values():
        spec = svc.spec
        if "cloud" not in spec.endpoint_types:
            continue
        decl = next((d for d in spec.endpoints if d.tier == "cloud"), None)
        out.append(
            Endpoint(
                id=f"{spec.tenant}/{spec.name}/cloud/mqtt",
                service=spec.name,
                tenant=spec.tenant,
                tier="cloud",
                url=f"{where}/{spec.name}",
                priority=decl.priority if decl is not None and decl.priority is not None else spec.priority,
                weight=decl.weight if decl is not None else 100,
                source=CLOUD_SOURCE,
                target=None,
            )
        )
    return out


class CloudTier:
    """The daemon component of the cloud tier. Built in `Daemon.__init__`, started after the core."""

    name = "cloud"

    def __init__(
        self,
        *,
        config: Config,
        registry: Registry,
        store: StateStore,
        metrics: MeshMetrics,
        transports: dict,
        peer_sources: list[Callable[[], list[dict]]],
    ) -> None:
        mq = config.mqtt
        self.config = config
        self.node = config.node.name
        self.topics = Topics(mq.topic_prefix, config.node.fleet)
        self._registry = registry
        self._store = store
        self._mesh = metrics
        self.metrics = CloudMetrics(metrics.registry)
        self.saver = StateSaver(store)
        offline = json.dumps({"state": "offline", "node": self.node, "fleet": config.node.fleet, "reason": "lost"})
        self.session = MqttSession(
            mq,
            client_id=mq.client_id or f"edged-{self.node}",
            will=LastWill(self.topics.status(self.node), offline.encode()),
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
        )
        self.transport = CloudTransport(
            self.session, self.topics, self.node, max_payload=mq.max_payload, metrics=self.metrics
        )
        self._vitals: dict[str, str] = {}
        self.registry_sync = RegistrySync(
            registry=registry,
            session=self.session,
            topics=self.topics,
            node=self.node,
            zone=config.node.zone,
            saver=self.saver,
            metrics=self.metrics,
            status_extra=lambda: {"vitals": dict(self._vitals)},
        )
        self.fleet = FleetConfigSource(
            registry=registry,
            keys=load_trusted_keys(config.fleet.keys),
            node=self.node,
            fleet=config.node.fleet,
            metrics=self.metrics,
            saver=self.saver,
            on_settings=self._on_settings,
        )
        self.session.subscribe(self.topics.config(), lambda m: self.fleet.on_message(m, "fleet"), qos=1)
        self.session.subscribe(self.topics.config(self.node), lambda m: self.fleet.on_message(m, "node"), qos=1)
        self.telemetry = TelemetryPublisher(
            post=lambda topic, payload: self.session.post(topic, payload, qos=0),
            topic=self.topics.telemetry(self.node),
            node=self.node,
            fleet=config.node.fleet,
            mesh=metrics,
            interval=mq.telemetry_interval,
            extra=self._telemetry_extra,
        )
        transports["cloud"] = self.transport
        peer_sources.append(self.registry_sync.peers)
        registry.watch(self._on_registry_change)
        metrics.add_collector(self._collect)
        self._sync_scheduled = False
        self._tasks: list[asyncio.Task] = []

    def __repr__(self) -> str:
        return f"<CloudTier {self.node} {self.session!r} {self.fleet!r}>"

    # -- Component ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the last known registry and fleet config, then connect in the background (never waits
        for the broker: a box with no network starts just the same)."""
        prime_vitals()
        self._vitals = read_vitals()
        restored = self.fleet.load(self._store.read_json(fleet_mod.STATE_FILE, {}))
        known = self.registry_sync.load(self._store.read_json(registry_mod.STATE_FILE, {}))
        self._sync()
        self.session.start()
        loop = asyncio.get_running_loop()
        for coro, name in (
            (self.telemetry.run(), "cloud telemetry"),
            (self.saver.run(), "cloud state saver"),
            (self._watch_vitals(), "cloud vitals"),
        ):
            task = loop.create_task(coro, name=name)
            task.add_done_callback(_log_failure)
            self._tasks.append(task)
        log_event(
            log,
            logging.INFO,
            "cloud.started",
            broker=self.config.mqtt.url,
            fleet_config=self.fleet.versions(),
            restored_fleet_config=restored,
            restored_remote_entries=known,
        )

    async def leaving(self) -> None:
        """Say `offline` (retained) while the connection is still up: a clean exit sends no last will."""
        if not self.session.connected:
            return
        payload = self.registry_sync.status_payload("offline", reason="shutdown")
        with contextlib.suppress(PublishError):
            await self.session.publish(self.topics.status(self.node), payload, qos=1, retain=True, timeout=1.0)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        await self.session.close()
        self.transport.fail_all("cloud tier stopped")
        await self.saver.flush()

    # -- hooks ----------------------------------------------------------------------------------------------

    def _on_connected(self) -> None:
        self.metrics.connects.inc()
        self._mesh.mqtt_connected.set((), 1)
        self.registry_sync.on_connected()

    def _on_disconnected(self, reason: str) -> None:
        self._mesh.mqtt_connected.set((), 0)
        self.transport.fail_all(f"broker disconnected: {reason}")

    def _on_registry_change(self, old: Snapshot, new: Snapshot) -> None:
        # Deferred: changing the registry from inside its watcher would hand later watchers stale snapshots.
        if self._sync_scheduled:
            return
        self._sync_scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self._sync)
        except RuntimeError:  # no loop yet (a change during construction): sync at start()
            self._sync_scheduled = False

    def _sync(self) -> None:
        """Follow the registry: cloud endpoints of services that allow the tier; this node's entries."""
        self._sync_scheduled = False
        snapshot = self._registry.snapshot()
        endpoints = cloud_endpoints(snapshot, broker_url=self.config.mqtt.url, topics=self.topics)
        self._registry.set_endpoints("cloud", endpoints)
        self.fleet.refresh()  # fleet policies are laid over manifests, which may have changed
        self.registry_sync.local_changed(self._registry.snapshot())

    def _on_settings(self, settings: FleetSettings) -> None:
        interval = settings.telemetry_interval
        self.telemetry.set_interval(interval if interval is not None else self.config.mqtt.telemetry_interval)

    def _collect(self) -> None:
        self._mesh.mqtt_connected.set((), 1 if self.session.connected else 0)

    def _telemetry_extra(self) -> dict:
        return {
            "vitals": dict(self._vitals),
            "mqtt": {
                "connects": self.session.connects,
                "pending": self.transport.pending,
                "late_answers": self.metrics.late_answers.get() or 0,
                "timeouts": self.metrics.timeouts.get() or 0,
            },
            "fleet_config": self.fleet.versions(),
        }

    async def _watch_vitals(self) -> None:
        """Read vitals every `[vitals] interval`; re-publish the status when one moved noticeably."""
        published = dict(self._vitals)
        while True:
            await asyncio.sleep(self.config.vitals.interval)
            try:
                self._vitals = read_vitals()
            except Exception:  # psutil on an odd box: keep the last reading, try again next round
                log.exception("reading vitals failed")
                continue
            for kind in ("cpu", "bat", "link"):
                if self._vitals[kind]:
                    self._mesh.node_vitals.set((kind,), float(self._vitals[kind]))
            if _moved(published, self._vitals) and self.session.connected:
                self.registry_sync.publish_status()
                published = dict(self._vitals)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cloud tier task %r failed", task.get_name(), exc_info=task.exception())


def _moved(old: dict[str, str], new: dict[str, str]) -> bool:
    if old.get("power") != new.get("power"):
        return True
    for kind in ("cpu", "bat", "link"):
        a, b = old.get(kind, ""), new.get(kind, "")
        if (a == "") != (b == "") or (a and b and abs(int(a) - int(b)) >= VITALS_STEP):
            return True
    return False
