"""`CloudTier`: the cloud tier of the daemon, and the cloud endpoints it lays over the registry (a pure layer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from ..aio import cancel_and_wait
from ..config import MqttConfig
from ..logs import log_event
from ..model import Endpoint, ServiceSpec, Target
from ..registry import Key, Layer, Partial, Registry, Snapshot
from ..vitals import Vitals
from . import fleet as fleet_mod
from .fleet import FleetConfigSource, FleetSettings, load_trusted_keys
from .persist import StateSaver
from .registry_sync import RegistrySync
from .session import MqttSession, PublishError, broker_address
from .signing import identity_files, node_seals
from .telemetry import CloudMetrics, TelemetryPublisher
from .topics import Topics
from .transport import CloudTransport

if TYPE_CHECKING:
    from ..core import MeshCore, TierParts

log = logging.getLogger("edged.cloud")

CLOUD_SOURCE = "mqtt"
VITALS_STEP = 10  # re-publish the retained status when a vital moved by this many points
SWEEP_INTERVAL = 2.0  # seconds: how often what time alone changes (stale status, end of suspicion) is applied
STALE_ROUNDS = 3  # an online status not renewed for this many announce intervals counts as dead


class CloudEndpoint(Endpoint):
    """A service's cloud endpoint: its id (`{tenant}/{service}/cloud/mqtt`) and URL (the broker's address and
    topic base, then `/svc/{service}`) are made when read, from its service and one string shared by every
    cloud endpoint of a broker. A box following a whole fleet keeps ten thousand of them; the two strings
    were 175 bytes of each. Equal to, and made by `dataclasses.replace` like, any other endpoint."""

    __slots__ = ("_where",)

    def __init__(
        self,
        id: str | None = None,
        service: str = "",
        tenant: str = "",
        tier: str = "cloud",
        url: str | None = None,
        priority: int = 0,
        weight: int = 100,
        source: str = CLOUD_SOURCE,
        target: Target | None = None,
        meta: tuple[tuple[str, str], ...] = (),
        labels: tuple[tuple[str, str], ...] = (),
        *,
        where: str | None = None,
    ) -> None:
        if where is None:  # `dataclasses.replace`: every field, id and URL as read
            if url is None or not url.endswith(f"/{service}"):
                raise ValueError(f"not the URL of a cloud endpoint of {service!r}: {url!r}")
            where = url[: -len(service) - 1]
        setter = object.__setattr__  # frozen: as the dataclass's own __init__ sets its fields
        for name, value in (
            ("service", service),
            ("tenant", tenant),
            ("tier", tier),
            ("priority", priority),
            ("weight", weight),
            ("source", source),
            ("target", target),
            ("meta", meta),
            ("labels", labels),
            ("_where", where),
        ):
            setter(self, name, value)
        if (id is not None and id != self.id) or tier != "cloud" or target is not None:
            raise ValueError(f"not a cloud endpoint: {id!r} ({tier}, target {target!r})")

    @property  # type: ignore[override]
    def id(self) -> str:
        return f"{self.tenant}/{self.service}/cloud/mqtt"

    @property  # type: ignore[override]
    def url(self) -> str:
        return f"{self._where}/{self.service}"


class _Previous(Mapping[Key, Endpoint]):
    """The cloud endpoint each service has in the registry now (the snapshot that a rebuild replaces), for
    `cloud_endpoints` to hand out again when it would make an equal one. Read from the registry, not kept in
    a map of its own: with 10,000 remote services that map was 30 bytes per entry for what the registry holds
    anyway."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, key: Key) -> Endpoint:
        service = self._registry.snapshot().services.get(key)
        if service is not None:
            for ep in service.endpoints:
                if isinstance(ep, CloudEndpoint):
                    return ep
        raise KeyError(key)

    def __iter__(self) -> Iterator[Key]:
        for key, service in self._registry.snapshot().services.items():
            if any(isinstance(ep, CloudEndpoint) for ep in service.endpoints):
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


def cloud_endpoints(
    specs: Mapping[Key, ServiceSpec],
    *,
    broker_url: str,
    topics: Topics,
    cache: Mapping[Key, Endpoint] | None = None,
) -> list[Endpoint]:
    """The "cloud" layer: one cloud endpoint per service whose endpoint types include "cloud". (Whether a
    live node serves it right now is the transport's per-call check, not the registry's: see `liveness.py`.)

    Priority and weight come from a long-form `[[endpoints]] type = "cloud"` when there is one, else the
    service's priority and weight 100. With a `cache` (a dict kept by the caller between calls, or a read-only
    view of the endpoints made last time: `_Previous`), a service whose endpoint would be the same as last
    time gets the same object: the registry then keeps that service as it was (10,000 remote services: no
    new endpoint each at every change).
    """
    host, port, tls = broker_address(broker_url)
    where = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}/{topics.base}/svc"
    out = []
    fresh: dict[Key, Endpoint] = {}
    for key, spec in specs.items():
        if "cloud" not in spec.endpoint_types:
            continue
        decl = next((d for d in spec.endpoints if d.tier == "cloud"), None) if spec.endpoints else None
        priority = decl.priority if decl is not None and decl.priority is not None else spec.priority
        weight = decl.weight if decl is not None else 100
        known = cache.get(key) if cache is not None else None
        labels = decl.labels if decl is not None else ()
        if (
            not isinstance(known, CloudEndpoint)
            or known._where != where  # the broker's address changed (a reload)
            or (known.priority, known.weight, known.labels) != (priority, weight, labels)
        ):
            known = CloudEndpoint(
                service=spec.name, tenant=spec.tenant, where=where, priority=priority, weight=weight, labels=labels
            )
        out.append(known)
        fresh[key] = known
    if isinstance(cache, dict):
        if not isinstance(specs, Partial):  # some services only (an incremental rebuild): keep the others
            cache.clear()
        cache.update(fresh)
    return out


class CloudTier:
    """The cloud tier, built by the core (`CloudTier(core)`), started after it."""

    name = "cloud"

    def __init__(self, core: MeshCore) -> None:
        config = core.config
        mq = config.mqtt
        self.config = config
        self.node = config.node.name
        self.topics = Topics(mq.topic_prefix, config.node.fleet)
        registry = core.registry
        self._registry = registry
        self._store = core.store
        self._mesh = core.metrics
        self._node_vitals = core.vitals
        self.metrics = CloudMetrics(core.metrics.registry)
        self.saver = StateSaver(core.store)
        self.seals = node_seals(config)  # None without a node identity: nothing is signed
        self.session = MqttSession(
            mq,
            client_id=mq.client_id or f"edged-{self.node}",
            will=lambda: self.registry_sync.last_will(),  # sealed, with a new epoch, at each connect
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            max_message=config.limits.mqtt_message,
            on_limit=core.limit_hit,
            identity=identity_files(config),
        )
        self._published: dict[str, str] = {}  # the vitals in the retained status
        self._status_posted = 0.0  # monotonic time of the last `online` status this node posted
        self.registry_sync = RegistrySync(
            registry=registry,
            session=self.session,
            topics=self.topics,
            node=self.node,
            zone=config.node.zone,
            location=config.node.location,
            saver=self.saver,
            metrics=self.metrics,
            status_extra=lambda: {"vitals": self._node_vitals.current.status()},
            stale_after=STALE_ROUNDS * mq.announce_interval,
            offline_ttl=mq.offline_ttl,
            limits=config.limits,
            on_limit=core.limit_hit,
            seals=self.seals,
            follow=mq.follow,
        )
        self.transport = CloudTransport(
            self.session,
            self.topics,
            self.node,
            max_payload=mq.max_payload,
            metrics=self.metrics,
            on_timeout=self.registry_sync.call_timed_out,
            on_answer=self.registry_sync.call_answered,
            unreachable=self.registry_sync.unreachable,
            seals=self.seals,
            serves=self.registry_sync.serves,
            providers=self.registry_sync.provider_nodes,
            heard=self.registry_sync.heard_since_connect,
        )
        self.fleet = FleetConfigSource(
            registry=registry,
            keys=load_trusted_keys(config.fleet.keys),
            node=self.node,
            fleet=config.node.fleet,
            metrics=self.metrics,
            saver=self.saver,
            on_settings=self._on_settings,
            max_age=config.fleet.max_age,
            on_authz=core.gate.set_fleet,  # the gate owns the rules and keys of every entry point
        )
        self.session.subscribe(self.topics.config(), lambda m: self.fleet.on_message(m, "fleet"), qos=1)
        self.session.subscribe(self.topics.config(self.node), lambda m: self.fleet.on_message(m, "node"), qos=1)
        self.telemetry = TelemetryPublisher(
            post=lambda topic, payload: self.session.post(topic, payload, qos=0),
            topic=self.topics.telemetry(self.node),
            node=self.node,
            fleet=config.node.fleet,
            mesh=core.metrics,
            interval=mq.telemetry_interval,
            extra=self._telemetry_extra,
        )
        self._started = False
        self._tasks: list[asyncio.Task] = []

    def reconfigure(self, mq: MqttConfig) -> None:
        """A reload changed live `[mqtt]` keys (`reconfig.LIVE_MQTT_FIELDS`): the session moves to the new
        broker list or credentials, the registry follows what `follow` names now."""
        old, self.config = self.config.mqtt, replace(self.config, mqtt=mq)
        self.session.reconfigure(mq)
        if mq.follow != old.follow:
            self.registry_sync.set_follow(mq.follow)
        if mq.url != old.url:
            self._registry.refresh()  # the cloud endpoints name the broker in their URL
        log_event(log, logging.INFO, "cloud.reconfigured", broker=mq.url, fallback=list(mq.fallback_urls))

    def parts(self) -> TierParts:
        from ..core import TierParts

        topics, previous = self.topics, _Previous(self._registry)

        def endpoints(specs: Mapping[Key, ServiceSpec]) -> list[Endpoint]:
            return cloud_endpoints(specs, broker_url=self.config.mqtt.url, topics=topics, cache=previous)

        return TierParts(
            transports={"cloud": self.transport},
            layers=(
                Layer("cloud", endpoints=endpoints),
                self.fleet.layer,
            ),
            peers=self.registry_sync.peers,
            providers=self.registry_sync.providers,
            collect=self._collect,
            on_vitals=self._on_vitals,
            on_registry_change=self._on_registry_change,
        )

    def __repr__(self) -> str:
        return f"<CloudTier {self.node} {self.session!r} {self.fleet!r}>"

    # -- Tier -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the last known registry and fleet config, then connect in the background (never waits
        for the broker: a box with no network starts just the same)."""
        self._started = True
        self._published = self._node_vitals.current.status()
        restored = self.fleet.load(self._store.read_json(fleet_mod.STATE_FILE, {}))
        self.registry_sync.local_changed(self._registry.snapshot())  # first: what to learn (and keep)
        known = self.registry_sync.restore()
        self.session.start()
        loop = asyncio.get_running_loop()
        for coro, name in (
            (self.telemetry.run(), "cloud telemetry"),
            (self.saver.run(), "cloud state saver"),
            (self._sweep(), "cloud liveness sweep"),
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
            signed_as=self.seals.name.node if self.seals is not None else None,
        )

    async def leaving(self) -> None:
        """Delete this node's retained entries and say `offline` (retained) while the connection is still
        up: a clean exit sends no last will, and no one should keep routing to services that left."""
        if not self.session.connected:
            return
        cleared = await self.registry_sync.clear_own()
        log_event(log, logging.INFO, "cloud.leaving", cleared_entries=cleared)
        payload = self.registry_sync.offline_status("shutdown")
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
        self._status_posted = time.monotonic()

    def _on_disconnected(self, reason: str) -> None:
        self._mesh.mqtt_connected.set((), 0)
        self.transport.fail_all(f"broker disconnected: {reason}")

    def _on_registry_change(self, old: Snapshot, new: Snapshot) -> None:
        # Observe only: this node's entries follow the registry (cloud endpoints and fleet policies are layers).
        if self._started and not _only_learned(old, new):
            self.registry_sync.local_changed(new)

    def _on_settings(self, settings: FleetSettings) -> None:
        interval = settings.telemetry_interval
        self.telemetry.set_interval(interval if interval is not None else self.config.mqtt.telemetry_interval)

    def _collect(self) -> None:
        self._mesh.mqtt_connected.set((), 1 if self.session.connected else 0)
        self.registry_sync.collect()

    def _telemetry_extra(self) -> dict:
        return {
            "vitals": self._node_vitals.current.status(),
            "mqtt": {
                "connects": self.session.connects,
                "pending": self.transport.pending,
                "late_answers": self.metrics.late_answers.get() or 0,
                "timeouts": self.metrics.timeouts.get() or 0,
            },
            "fleet_config": self.fleet.versions(),
        }

    def _on_vitals(self, vitals: Vitals) -> None:
        """Each reading of the core's sampler: re-publish the status when a vital moved noticeably, and at
        least every announce interval (others take an online status that is not renewed for a few intervals
        as a dead box: a last will the broker lost)."""
        now = vitals.status()
        due = time.monotonic() - self._status_posted >= self.config.mqtt.announce_interval
        if self._started and (_moved(self._published, now) or due) and self.session.connected:
            self.registry_sync.publish_status()
            self._published = now
            self._status_posted = time.monotonic()

    async def _sweep(self) -> None:
        """Apply what time alone changes in the registry (see `RegistrySync.sweep`)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.registry_sync.sweep()


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cloud tier task %r failed", task.get_name(), exc_info=task.exception())


def _only_learned(old: Snapshot, new: Snapshot) -> bool:
    """Whether the change is only services learned from the registry (a burst of remote entries): nothing
    this node offers or routes to changed, so its own entries need no second look."""
    if new.changed is None:
        return False
    for key in new.changed:
        for svc in (old.services.get(key), new.services.get(key)):
            if svc is not None and not svc.spec.source.startswith(f"{CLOUD_SOURCE}:"):
                return False
    return True


def _moved(old: dict[str, str], new: dict[str, str]) -> bool:
    if old.get("power") != new.get("power"):
        return True
    for kind in ("cpu", "bat", "link"):
        a, b = old.get(kind, ""), new.get(kind, "")
        if (a == "") != (b == "") or (a and b and abs(int(a) - int(b)) >= VITALS_STEP):
            return True
    return False
