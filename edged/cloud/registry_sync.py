"""The central registry on the broker: this node's retained status and service entries, and everyone else's.

Each node publishes, retained:
  `nodes/{node}/status`            JSON `{"state": "online", "vitals": {...}, ...}`; its last will (also
                                   retained) says `"state": "offline"`, and so does a clean shutdown.
  `nodes/{node}/services/{key}`    CBOR registry entry of each service this node offers (one with local
                                   endpoints here); an empty retained payload removes it.
Entries of other nodes that say `cloud = true` (the service is reachable over MQTT: declared with a cloud
endpoint type, or served by an `edged bridge`) become services of the registry source "mqtt", with a
cloud endpoint. The last known registry is saved in the state dir and loaded at start, so a box that
boots with no network still knows the remote services.

Signed (`signing.py`, when this node has an identity): entries, statuses (the last will too) and deletions
(sealed tombstones) are sealed by the node's key, and taken only when sealed by the node their topic names,
in this fleet; an empty retained message deletes nothing. A status or deletion is believed only for the
connection it belongs to (`epochs.py`), and a node that sees its own status or entry overwritten on the
broker posts it again.

What a box learns (`[mqtt] follow`): the entries of the services it routes to over the cloud tier (those its
manifests and registrations declare with a "cloud" endpoint type) and of the services `follow` names, one
subscription `nodes/+/services/{key}` each, changed at run time as manifests come and go; `follow = ["*"]`
learns the whole fleet (a dashboard, a central box). Every box follows every node's status (the topic of
the last wills), kept in a compact form: state, zone, vitals, and when it was seen and changed. The whole
fleet stays one command away: `edged fleet ls` reads it from the broker.

Cost per message: a handful of dict operations plus parsing the entry itself; a burst (the retained
messages of a reconnect) becomes one registry rebuild per `APPLY_DELAY`, and the state file is written
at most every `SAVE_WITHIN` seconds, and only when an entry or a node's state changed (not for a renewed
status).

Liveness (`liveness.py`): a node's offline status withdraws the cloud endpoints of services that only it
(and other dead nodes) serve, at once; entries of a node that has not been live for `[mqtt] offline_ttl`
are dropped from memory and state; a clean stop removes this node's own retained entries.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from .. import __version__, jsonbody, memory
from ..errors import ConfigError
from ..identity import PeerName
from ..limits import Limits
from ..locality import clean_zone, format_loc, parse_loc
from ..logs import log_event
from ..manifest import parse_policy, policy_dict
from ..memory import TRIM_AFTER
from ..methods import MAX_METHODS
from ..model import DEFAULT_TENANT, TIERS, EndpointSpec, InterfaceSpec, MethodRule, ServiceSpec
from ..registry import Registry, Snapshot
from ..routes import common_labels, wire_labels
from .epochs import Epochs, new_epoch, tombstone, tombstone_epoch
from .liveness import OFFLINE, ONLINE, STALE, SUSPECT, UNKNOWN, Liveness
from .persist import StateSaver
from .registry_log import LOG_FILE, MIN_COMPACT, RegistryLog, read_log
from .session import Inbound, LastWill, MqttSession, PublishError
from .signing import SealError, Seals
from .telemetry import CloudMetrics
from .topics import Topics, service_key, split_service_key

log = logging.getLogger("edged.cloud.registry")

STATE_FILE = "cloud-registry.json"  # the whole document, as earlier versions saved it (read once, then the log)
APPLY_DELAY = 0.2  # seconds: a burst of new entries (a reconnect) is put into the registry a moment later ...
APPLY_CHUNK = 50  # ... this many services at a time (an incremental registry change: a few ms on a Pi) ...
APPLY_SHARE = 0.25  # ... taking at most about this share of the event loop (the next chunk waits 4x its cost)
# Entries that went away reach the registry later, in one rebuild for a whole burst (a hundred boxes stopping
# at once): routing does not wait for it, the transport already skips services no live node serves.
REMOVAL_DELAY = 5.0
FREEZE_EVERY = 1000  # entries learned or applied between two `gc.freeze()` (see `RegistrySync._freeze`)
SAVE_WITHIN = 5.0  # seconds: the registry file is a cache for a boot without broker; one write per interval
ENTRY_VERSION = 1
SOURCE = "mqtt"
MAX_PRIORITY = 2**31 - 1  # CBOR integers are unbounded: a bignum is refused before any comparison
CLOUD_ONLY = ("cloud",)


# -- entries: ServiceSpec <-> a plain dict (CBOR on the wire, JSON on disk) --------------------------------


def spec_entry(
    spec: ServiceSpec,
    *,
    node: str,
    zone: str,
    cloud: bool,
    labels: tuple[tuple[str, str], ...] = (),
    location: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The registry entry a node publishes for a service it offers. No timestamps: an unchanged service
    gives identical bytes, so re-publishing it is a no-op for every subscriber. `labels`: those all its
    local endpoints carry (edged/routes.py), sent only when there are some; `loc` only when known."""
    interface = None
    if spec.interface is not None:
        interface = {
            "version": spec.interface.version,
            "methods": [f"{m.verb} {m.pattern}" for m in spec.interface.methods],
        }
    entry = {
        "v": ENTRY_VERSION,
        "node": node,
        "zone": zone,
        "tenant": spec.tenant,
        "service": spec.name,
        "priority": spec.priority,
        "endpoint_types": list(spec.endpoint_types),
        "cloud": cloud,
        "interface": interface,
        "policy": policy_dict(spec.policy),
    }
    if labels:
        entry["labels"] = dict(labels)
    if location is not None:
        entry["loc"] = format_loc(location)
    return entry


class _Shared(dict):
    """One object for equal values that thousands of entries repeat ("online", "mains", the default policy),
    in a bounded table: made-up values from a hostile node must not grow it without end."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __call__(self, value: Any) -> Any:
        found = self.get(value)
        if found is not None:
            return found
        if len(self) < self.limit:
            self[value] = value
        return value


_share = _Shared(4096)  # short strings (zones, tenants) and whole vitals, which many nodes have alike
_shared_policy = _Shared(1024)  # policies (most entries: the default)


def entry_spec(entry: Mapping[str, Any], *, source: str) -> ServiceSpec:
    """The ServiceSpec a remote entry declares: reachable over the cloud tier only. ValueError if invalid."""
    if entry.get("v") != ENTRY_VERSION:
        raise ValueError(f"unsupported entry version {entry.get('v')!r}")
    name, tenant, priority = entry.get("service"), entry.get("tenant"), entry.get("priority")
    if not isinstance(name, str) or not isinstance(tenant, str) or not name or not tenant:
        raise ValueError("service and tenant must be non-empty strings")
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from 0 to {MAX_PRIORITY}")
    interface = None
    raw_iface = entry.get("interface")
    if raw_iface is not None:
        if not isinstance(raw_iface, Mapping) or not isinstance(raw_iface.get("methods", []), list):
            raise ValueError("interface must be a map with a list of methods")
        version = raw_iface.get("version")
        if len(raw_iface.get("methods", [])) > MAX_METHODS:
            raise ValueError(f"more than {MAX_METHODS} methods")
        methods = tuple(MethodRule.parse(str(m)) for m in raw_iface.get("methods", []))
        interface = InterfaceSpec(version=version if isinstance(version, str) else None, methods=methods)
    try:
        policy = parse_policy(entry.get("policy", {}), source)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    labels = wire_labels(entry.get("labels"))
    return ServiceSpec(
        name=name,
        tenant=_share(tenant),
        priority=priority,
        interface=interface,
        endpoint_types=CLOUD_ONLY,
        endpoints=(EndpointSpec(tier="cloud", labels=labels),) if labels else (),  # the cloud endpoint's labels
        policy=_shared_policy(policy),
        source=source,
    )


class Shape:
    """An entry without its node and service name: what the entries of a fleet mostly share (tenant,
    priority, zone, endpoint types, interface, policy). A box keeps an entry as its node, its key and a
    shape; equal shapes are one object (a bounded table), checked once, so a burst of ten thousand entries
    validates a handful of shapes, and an entry costs a dict slot instead of its CBOR (about 0.5 KiB)."""

    __slots__ = ("cbor", "cloud", "template")

    def __init__(self, cbor: bytes, cloud: bool, template: ServiceSpec) -> None:
        self.cbor = cbor  # the normalized entry without "node" and "service", as CBOR
        self.cloud = cloud  # reachable over MQTT
        self.template = template  # the spec it makes, named PLACEHOLDER

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shape) and other.cbor == self.cbor

    def __hash__(self) -> int:
        return hash(self.cbor)

    def entry(self, node: str, key: str) -> dict[str, Any]:
        """The whole normalized entry of `node` under `key`."""
        return {**cbor2.loads(self.cbor), "node": node, "service": split_service_key(key)[1]}

    def spec(self, key: str, source: str) -> ServiceSpec:
        """The cloud-only spec the entry under `key` makes (`dataclasses.replace` costs 10x more: a burst
        makes thousands)."""
        t = self.template
        return ServiceSpec(
            name=split_service_key(key)[1],
            tenant=t.tenant,
            priority=t.priority,
            interface=t.interface,
            endpoint_types=t.endpoint_types,
            endpoints=t.endpoints,  # the cloud endpoint's labels (edged/routes.py), when the entry has some
            policy=t.policy,
            source=source,
        )


PLACEHOLDER = "x"  # the service name a shape is checked with (any valid one: the name is checked apart)
_shapes: dict[bytes, Shape] = {}  # raw shape (as received) -> checked Shape
MAX_SHAPES = 1024  # shapes kept in the table (a fleet has a few: most services keep the defaults) ...
MAX_SHAPE_BYTES = 2048  # ... of at most this size each: the table stays under about 3 MiB whatever is sent


def entry_shape(obj: object, *, node: str, key: str) -> Shape:
    """The shape of a received entry found under `key` (its topic's last level) on `node`'s topic, checked;
    ValueError when it is not a valid entry of that node and service (see `normalize_entry`)."""
    if not isinstance(obj, Mapping):
        raise ValueError("an entry must be a map")
    if obj.get("node") != node:
        raise ValueError(f"an entry for node {str(obj.get('node'))[:64]!r} published as node {node!r}")
    service = obj.get("service")
    if not isinstance(service, str) or not service:
        raise ValueError("service and tenant must be non-empty strings")
    tenant = obj.get("tenant")
    if not isinstance(tenant, str) or service_key(tenant, service) != key:
        raise ValueError(f"the entry describes {str(tenant)[:64]}/{service[:64]}, not {key}")
    raw = cbor2.dumps({k: v for k, v in obj.items() if k != "node" and k != "service"})
    shape = _shapes.get(raw)
    if shape is None:
        entry = normalize_entry({**obj, "service": PLACEHOLDER}, node=node)
        del entry["node"], entry["service"]
        template = entry_spec({**entry, "service": PLACEHOLDER}, source="")
        shape = Shape(cbor2.dumps(entry), entry["cloud"], template)
        if len(_shapes) < MAX_SHAPES and len(raw) <= MAX_SHAPE_BYTES:  # made-up shapes must not grow it
            _shapes[raw] = shape
    return shape


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _service(key: str, shape: Shape) -> tuple[str, str] | None:
    """(tenant, service) of the entry under `key` when reachable over MQTT; None: kept for the view only.
    In the default tenant the service name is the key itself (one string for both)."""
    if not shape.cloud:
        return None
    tenant = shape.template.tenant
    return (tenant, key) if tenant == DEFAULT_TENANT else (tenant, split_service_key(key)[1])


def normalize_entry(obj: object, *, node: str) -> dict[str, Any]:
    """A received entry reduced to its known fields (JSON-safe), or ValueError. An entry is taken only from
    the node it describes: `node` is the one whose topic it came on (and, signed, whose key signed it)."""
    if not isinstance(obj, Mapping):
        raise ValueError("an entry must be a map")
    if obj.get("node") != node:
        raise ValueError(f"an entry for node {str(obj.get('node'))[:64]!r} published as node {node!r}")
    entry = {
        "v": obj.get("v"),
        "node": str(obj.get("node", "")),
        "zone": clean_zone(obj.get("zone", "")),  # zone and location: as config allows them, else none
        "tenant": obj.get("tenant"),
        "service": obj.get("service"),
        "priority": obj.get("priority"),
        "endpoint_types": [t for t in obj.get("endpoint_types", []) if t in TIERS]
        if isinstance(obj.get("endpoint_types"), list)
        else [],
        "cloud": obj.get("cloud") is True,
        "interface": obj.get("interface"),
        "policy": obj.get("policy", {}),
    }
    labels = wire_labels(obj.get("labels"))
    if labels:
        entry["labels"] = dict(labels)
    loc = parse_loc(obj.get("loc"))
    if loc is not None:
        entry["loc"] = format_loc(loc)
    entry_spec(entry, source="check")  # raises ValueError when it does not make a service
    json.dumps(entry)  # and it must be storable as JSON (no CBOR-only values)
    return entry


@dataclass(slots=True)
class NodeStatus:
    """What a box keeps of another node's status (a thousand of them live in every box, so not the whole
    document): its state, zone, vitals (a few short strings), and when it was seen and changed (wall clock)."""

    state: str
    zone: str = ""
    vitals: tuple[tuple[str, str], ...] = ()
    seen: float | None = None
    since: float | None = None
    reason: str = ""  # of an offline status: "lost" (the last will) or "shutdown"
    loc: str = ""  # "lat,lon" (edged/locality.py), "" when unknown or garbled

    @classmethod
    def of(cls, doc: Mapping[str, Any], *, seen: Any, since: Any) -> NodeStatus:
        vitals = doc.get("vitals")
        pairs: tuple[tuple[str, str], ...] = ()
        if isinstance(vitals, Mapping):
            pairs = _share(tuple((_share(str(k)[:16]), _share(str(v)[:16])) for k, v in list(vitals.items())[:8]))
        reason = doc.get("reason") if doc["state"] == "offline" else ""
        return cls(
            state=_share(doc["state"]),
            zone=_share(clean_zone(doc.get("zone") or "")),
            loc=format_loc(parse_loc(doc.get("loc"))),
            vitals=pairs,
            seen=seen if isinstance(seen, (int, float)) else None,
            since=since if isinstance(since, (int, float)) else None,
            reason=_share(reason[:32]) if isinstance(reason, str) else "",
        )

    def as_dict(self) -> dict[str, Any]:
        out = {"state": self.state, "zone": self.zone, "vitals": dict(self.vitals), "seen": self.seen}
        out["since"] = self.since
        if self.reason:
            out["reason"] = self.reason
        if self.loc:
            out["loc"] = self.loc
        return out


# -- the sync -----------------------------------------------------------------------------------------------


class RegistrySync:
    """Publishes this node's status and entries; follows the other nodes'. Sync callbacks only: the session
    calls the handlers on the event loop, `local_changed` is called with each new registry snapshot."""

    def __init__(
        self,
        *,
        registry: Registry,
        session: MqttSession,
        topics: Topics,
        node: str,
        zone: str,
        location: tuple[float, float] | None = None,
        saver: StateSaver,
        metrics: CloudMetrics,
        status_extra: Callable[[], dict] = dict,
        offers: Callable[[ServiceSpec], bool] | None = None,
        always_cloud: bool = False,  # a bridge: every service it offers is reachable over MQTT
        stale_after: float = 0.0,  # an online status not renewed for this long counts as dead (0: never)
        offline_ttl: float = 3600.0,  # entries of a node not live for this long are dropped
        clock: Callable[[], float] = time.monotonic,
        limits: Limits | None = None,
        on_limit: Callable[[str], None] | None = None,
        seals: Seals | None = None,
        follow: Iterable[str] | None = (),  # service keys to learn beyond the needed ones; "*": all; None: none
    ) -> None:
        self._seals = seals  # None: unsigned entries, taken from whoever publishes on a node's topic
        self.epoch = new_epoch()  # of this connection: in the status, the last will and tombstones (epochs.py)
        self._epochs = Epochs()  # the other nodes' connection epochs (signed fleets only)
        self._leaving = False  # a clean stop said offline: our own status is not posted again
        self._limits = limits or Limits()
        self._on_limit = on_limit or (lambda name: None)
        self._registry = registry
        self._session = session
        self._topics = topics
        self.node = node
        self._zone = zone
        self._location = location
        self._saver = saver
        self._metrics = metrics
        self._status_extra = status_extra
        self._offers = offers
        self._always_cloud = always_cloud
        self._own: dict[str, bytes] = {}  # key -> entry payload this node offers now
        self._posted: dict[str, bytes] = {}  # key -> payload last posted on this connection
        self.nodes: dict[str, NodeStatus] = {}  # other node -> its last status, compact
        # other node -> hash of the message its status came in: the same message again (a reconnect delivers every
        # retained status at once) only renews it, with no parsing, no seal check and no new NodeStatus
        self._status_hash: dict[str, int] = {}
        # other node -> key -> the entry's shape (`Shape`: shared by the entries that differ only in node and name)
        self.entries: dict[str, dict[str, Shape]] = {}
        self.liveness = Liveness(stale_after=stale_after)
        self._log = RegistryLog(saver.store, {"prefix": topics.prefix, "fleet": topics.fleet})
        self._legacy = False  # restored from the JSON document of an earlier version (removed once rewritten)
        self._dirty_entries: set[tuple[str, str]] = set()  # (node, key) changed since the last save
        self._dirty_nodes: set[str] = set()  # nodes whose status changed since the last save
        # The next save rewrites the log whole (the first after a start, or after a failed write): what changed
        # needs no tracking then (the burst of a start would keep a (node, key) pair per entry until the save).
        self._whole = True
        self._heard: set[str] = set()  # nodes heard from on the current connection (see `heard_since_connect`)
        self._touched: set[tuple[str, str]] = set()  # services whose spec may have changed since the last apply
        self._urgent: set[tuple[str, str]] = set()  # ... of them, those this node routes to (applied first)
        self._unfrozen = 0  # entries learned and services applied since the last `_freeze`
        self._burst = 0  # services applied since the registry last had nothing left to apply
        self._names: dict[str, str] = {}  # node -> the one string kept for it (its entries, providers, offers)
        self._sources: dict[str, str] = {}  # node -> "mqtt:{node}"
        self._learned = 0  # entries kept, over all nodes
        self._apply_timer: asyncio.TimerHandle | None = None
        self._apply_cost = 0.0  # seconds the last registry rebuild took (with its watchers)
        self.offline_ttl = offline_ttl
        self._clock = clock
        self.bad_messages = 0
        self.follows_all = follow is not None and "*" in follow
        self._follows_none = follow is None  # a bridge learns nothing (it only offers)
        self._follow = frozenset(follow or ()) - {"*"}  # keys learned whatever the manifests say
        self._needed: frozenset[str] = frozenset()  # keys this node's own services route to over the cloud
        self.learning: frozenset[str] = frozenset()  # the keys subscribed to now (follow | needed)
        own = f"{topics.base}/nodes/{node}/services/+"  # this node's own entries: stale ones are removed
        if follow is None:  # a bridge: only its own entries (and status, to post it again when overwritten)
            session.subscribe(own, self._on_service, qos=1)
            if seals is not None:
                session.subscribe(topics.status(node), self._on_status, qos=0)
            return
        # QoS 0: a reconnect delivers every node's retained status at once, with no PUBACK round trips and no
        # per-client queue limit of the broker (Mosquitto drops QoS 1 beyond max_queued_messages); a status lost
        # with a broken connection comes back retained on the next one.
        session.subscribe(topics.all_status, self._on_status, qos=0)
        session.route(topics.all_services, self._on_service)
        session.add_filter(topics.all_services if self.follows_all else own, qos=1)
        self._learn(self._follow)

    # -- payloads of this node ------------------------------------------------------------------------------

    def status_payload(self, state: str, **extra: object) -> bytes:
        """JSON status document: `online` (with vitals) or `offline` (the last will, or a clean shutdown), with
        this connection's epoch."""
        doc = {"state": state, "node": self.node, "fleet": self._topics.fleet, "zone": self._zone, **extra}
        if self._location is not None:
            doc["loc"] = format_loc(self._location)
        doc["epoch"] = self.epoch
        if state == "online":
            doc.update(self._status_extra())
            doc["version"] = __version__
            doc["services"] = sorted(self._own)
            doc["ts"] = round(time.time(), 3)
        return json.dumps(doc, separators=(",", ":")).encode()

    def _status_wire(self, payload: bytes) -> bytes:
        return self._seals.seal(self._topics.status(self.node), payload) if self._seals is not None else payload

    def publish_status(self) -> None:
        """Post the retained `online` status (on connect, and when vitals change)."""
        wire = self._status_wire(self.status_payload("online"))
        self._session.post(self._topics.status(self.node), wire, qos=1, retain=True)

    def last_will(self) -> LastWill:
        """The last will of a new connection (the session asks at each connect): a new epoch, and the
        `offline` of that epoch, sealed now (the broker publishes it when the connection is lost)."""
        self.epoch = new_epoch()
        self._leaving = False
        wire = self._status_wire(self.status_payload("offline", reason="lost"))
        return LastWill(self._topics.status(self.node), wire)

    def offline_status(self, reason: str) -> bytes:
        """The retained `offline` a clean stop posts (sealed); this node's status is not posted again after."""
        self._leaving = True
        return self._status_wire(self.status_payload("offline", reason=reason))

    def on_connected(self) -> None:
        """A fresh connection: post status and every entry again (state posted while down was dropped)."""
        self._posted = {}
        self._heard = set()
        self.publish_status()
        self._post_entries()

    def local_changed(self, snapshot: Snapshot) -> None:
        """Recompute the entries this node offers, and the services it needs to learn, from a registry
        snapshot; post what changed."""
        own: dict[str, bytes] = {}
        needed: set[str] = set()
        for svc in snapshot.services.values():
            spec = svc.spec
            if spec.source.startswith(f"{SOURCE}:"):
                continue  # learned from the registry: not ours to offer
            if "cloud" in spec.endpoint_types:
                needed.add(service_key(spec.tenant, spec.name))
            offered = self._offers(spec) if self._offers else any(ep.tier == "local" for ep in svc.endpoints)
            if not offered:
                continue
            cloud = self._always_cloud or "cloud" in spec.endpoint_types
            labels = common_labels(ep for ep in svc.endpoints if ep.tier == "local")
            entry = spec_entry(
                spec, node=self.node, zone=self._zone, cloud=cloud, labels=labels, location=self._location
            )
            own[service_key(spec.tenant, spec.name)] = cbor2.dumps(entry)
        if needed != self._needed:
            self._needed = frozenset(needed)
            self._learn(self._follow | self._needed)
        if own == self._own:
            return
        changed_set = set(own) != set(self._own)
        self._own = own
        self._post_entries()
        if changed_set:
            self.publish_status()  # the status lists the services

    def _post_entries(self) -> None:
        if not self._session.connected:
            return
        for key, payload in self._own.items():
            if self._posted.get(key) != payload:
                self._post_entry(key, payload)
        for key in [k for k in self._posted if k not in self._own]:
            self._post_entry(key, b"")  # an empty retained message deletes the entry

    def _entry_wire(self, topic: str, payload: bytes) -> bytes:
        """An entry as posted: sealed; an empty payload (a deletion) becomes a sealed tombstone of this
        connection when signed (an empty message cannot be sealed)."""
        if self._seals is None:
            return payload
        return self._seals.seal(topic, payload or tombstone(self.epoch))

    def _post_entry(self, key: str, payload: bytes) -> None:
        tenant, service = split_service_key(key)
        topic = self._topics.service(self.node, tenant, service)
        wire = self._entry_wire(topic, payload)
        if self._session.post(topic, wire, qos=1, retain=True):
            if payload:
                self._posted[key] = payload
            else:
                self._posted.pop(key, None)

    # -- what this node learns ------------------------------------------------------------------------------

    def _learn(self, keys: Iterable[str]) -> None:
        """Subscribe to the entries of `keys` (and no others): one filter per service. Entries of services no
        longer followed are forgotten."""
        keys = frozenset(keys)
        if self.follows_all or self._follows_none or keys == self.learning:
            return
        for key in self.learning - keys:
            self._session.remove_filter(self._topics.service_filter(key))
        for key in keys - self.learning:
            self._session.add_filter(self._topics.service_filter(key), qos=1)
        dropped = self.learning - keys
        self.learning = keys
        if dropped:
            self._forget_keys(dropped)

    def set_follow(self, follow: Iterable[str]) -> None:
        """`[mqtt] follow` changed (a reload): subscribe to what it names now, and forget what is no longer
        followed (nor needed). A bridge (which learns nothing) is not changed."""
        if self._follows_none:
            return
        follow = tuple(follow)
        all_now = "*" in follow
        self._follow = frozenset(follow) - {"*"}
        own = f"{self._topics.base}/nodes/{self.node}/services/+"
        if all_now and not self.follows_all:
            for key in self.learning:
                self._session.remove_filter(self._topics.service_filter(key))
            self._session.remove_filter(own)
            self.learning = frozenset()
            self.follows_all = True
            self._session.add_filter(self._topics.all_services, qos=1)  # every retained entry comes again
            return
        if self.follows_all and not all_now:
            self.follows_all = False
            self._session.remove_filter(self._topics.all_services)
            self._session.add_filter(own, qos=1)
            self.learning = frozenset()
            keep = self._follow | self._needed
            self._forget_keys(frozenset(k for known in self.entries.values() for k in known if k not in keep))
        self._learn(self._follow | self._needed)

    def _wants(self, key: str) -> bool:
        return self.follows_all or key in self.learning

    def _forget_keys(self, keys: frozenset[str]) -> None:
        forgotten = 0
        for node, known in list(self.entries.items()):
            for key in keys & known.keys():
                self._index(node, _service(key, known.pop(key)), add=False)
                self._dirty(node, key)
                forgotten += 1
            if not known:
                del self.entries[node]
                self._names.pop(node, None)
        if forgotten:
            self._learned -= forgotten
            self._changed(removal=True)

    # -- what the others publish ----------------------------------------------------------------------------

    def _on_status(self, msg: Inbound) -> None:
        parsed = self._topics.parse_node_topic(msg.topic)
        if parsed is None:
            return
        node = parsed[0]
        if node == self.node:
            self._on_own_status(msg)
            return
        if node in self.entries:
            self._heard.add(node)
        if not msg.payload:
            if self._seals is not None:  # anyone can publish an empty message; nobody can seal one
                if node in self.nodes:
                    self._refused("status", msg.topic, "an unsealed deletion of a status")
                return
            self._status_hash.pop(node, None)
            if self.nodes.pop(node, None) is not None:
                self.liveness.forget_status(node, self._clock())
                self._changed(services=False, node=node)
            return
        known = self.nodes.get(node)
        if known is not None and self._status_hash.get(node) == hash(msg.payload):
            known.seen = round(time.time(), 3)  # what a renewal changes (`since` only moves with the state)
            self.liveness.status(node, known.state, self._clock())
            return
        payload = self._payload_of("status", node, msg)
        if payload is None:
            return
        try:
            doc = jsonbody.loads(payload, self._limits.json_depth)
            if not isinstance(doc, dict) or doc.get("state") not in ("online", "offline"):
                raise ValueError("expected a JSON object with state online|offline")
            if doc.get("node", node) != node:
                raise ValueError(f"a status of node {str(doc.get('node'))[:64]!r} published as node {node!r}")
        except ValueError as exc:
            self.bad_messages += 1
            log.debug("bad status on %s: %s", msg.topic, exc)
            return
        wall = round(time.time(), 3)
        previous = self.nodes.get(node)
        if previous is None and len(self.nodes) >= self._limits.peers:
            self._on_limit("peers")  # a flood of made-up nodes: the known ones keep their place
            return
        state = doc["state"]
        if self._seals is not None:
            before = self._epochs.current(node)
            why = self._epochs.status(node, state, doc.get("epoch"))
            if why is not None:
                self._refused("status", msg.topic, why)
                return
            if state == "online" and before != doc["epoch"]:
                # A new connection (a restart, say) may have forgotten our certificate: MACs to it carry our
                # chain again until it shows it knows it (pairing.py).
                self._seals.unack((PeerName(self._topics.fleet, node),))
        changed = previous is None or previous.state != state
        since = wall if previous is None or changed else previous.since
        status = self.nodes[node] = NodeStatus.of(doc, seen=wall, since=since)
        self._status_hash[node] = hash(msg.payload)
        self.liveness.status(node, state, self._clock())
        if changed or previous is None or previous.zone != status.zone or previous.loc != status.loc:
            if changed:
                log_event(log, logging.INFO, "mqtt.node_state", node=node, state=state)
            self._changed(services=False, node=node)  # a renewed status changes nothing worth a write

    def _on_service(self, msg: Inbound) -> None:
        parsed = self._topics.parse_node_topic(msg.topic)
        if parsed is None:
            return
        node, _, key = parsed
        if node in self.entries:  # bounded: only nodes already kept (made-up names must not grow it)
            self._heard.add(node)
        if node == self.node:
            self._on_own_entry(msg, key)
            return
        if not self._wants(key):
            return  # a service no longer followed (its filter was just removed)
        if not msg.payload:
            if self._seals is None:
                self._delete(node, key)
            elif key in self.entries.get(node, {}):  # anyone can publish an empty message; nobody can seal one
                self._refused("entry", msg.topic, "an unsealed deletion")
            return
        payload = self._payload_of("entry", node, msg)
        if payload is None:
            return
        gone = tombstone_epoch(payload) if self._seals is not None else None
        if gone is not None:
            why = self._epochs.deletion(node, gone)
            if why is not None:
                self._refused("entry", msg.topic, why)
            else:
                self._delete(node, key)
            return
        known = self.entries.get(node, {})
        if key not in known:
            lim = self._limits
            if len(known) >= lim.learned_entries_per_node or self._learned >= lim.learned_entries:
                per_node = len(known) >= lim.learned_entries_per_node
                self._on_limit("learned_entries_per_node" if per_node else "learned_entries")
                return
            if not known and node not in self.nodes and len(self.entries) >= lim.peers:
                self._on_limit("peers")
                return
        try:
            kept = entry_shape(cbor2.loads(payload), node=node, key=key)
        except Exception as exc:  # garbage from any publisher: cbor2 and validation raise many types
            self.bad_messages += 1
            log_event(log, logging.WARNING, "mqtt.bad_registry_entry", topic=msg.topic, error=str(exc)[:200])
            return
        old = known.get(key)
        if old == kept:
            return
        if old is not None:
            self._index(node, _service(key, old), add=False)
        else:
            self._learned += 1
            node = self._names.setdefault(node, node)  # one string per node, not one per message
            self._unfrozen += 1
            if self._unfrozen >= FREEZE_EVERY:
                self._freeze()
        self.entries.setdefault(node, {})[key] = kept
        self._index(node, _service(key, kept), add=True)
        self._changed(entry=(node, key))

    def _delete(self, node: str, key: str) -> None:
        """`node` deleted its entry `key` (an empty retained message, or a sealed tombstone when signed)."""
        known = self.entries.get(node, {})
        old = known.pop(key, None)
        if old is not None:
            self._learned -= 1
            if not known:
                del self.entries[node]
                self._names.pop(node, None)
            self._index(node, _service(key, old), add=False, departed=True)
            self._changed(removal=True, entry=(node, key))

    # -- sealed messages (signing.py, epochs.py) ------------------------------------------------------------

    def _open_from(self, node: str, topic: str, wire: bytes) -> bytes:
        """The payload of a message sealed by `node` of this fleet; SealError otherwise."""
        assert self._seals is not None
        sender, payload = self._seals.open(topic, wire)
        if (sender.fleet, sender.node) != (self._topics.fleet, node):
            raise SealError(f"sealed by {sender.fleet}/{sender.node}, not by {self._topics.fleet}/{node}")
        return payload

    def _payload_of(self, kind: str, node: str, msg: Inbound) -> bytes | None:
        """What a status or entry message of `node` says: opened when this box checks seals; None (refused and
        counted as `kind`) when its seal does not hold."""
        if self._seals is None:
            return msg.payload
        try:
            return self._open_from(node, msg.topic, msg.payload)
        except SealError as exc:
            self._refused(kind, msg.topic, str(exc))
            return None

    def _refused(self, kind: str, topic: str, why: str) -> None:
        self.bad_messages += 1
        self._metrics.unsealed.inc((kind,))
        log.debug("%s on %s refused: %s", kind, topic, why)  # counted: anyone could flood a log

    def _own_payload(self, msg: Inbound) -> bytes | None:
        """What a message on one of our own topics says, when we sealed it; None otherwise."""
        try:
            return self._open_from(self.node, msg.topic, msg.payload) if msg.payload else None
        except SealError:
            return None

    def _on_own_status(self, msg: Inbound) -> None:
        """Our retained status overwritten (a replayed offline, anything not ours of this connection): post
        ours again, so that boxes that subscribe later see it."""
        if self._seals is None or self._leaving or not self._session.connected:
            return
        payload = self._own_payload(msg)
        try:
            doc = jsonbody.loads(payload, self._limits.json_depth) if payload is not None else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("state") == "online" and doc.get("epoch") == self.epoch:
            return
        log.debug("own status on %s overwritten: posted again", msg.topic)
        self.publish_status()

    def _on_own_entry(self, msg: Inbound, key: str) -> None:
        """A message on one of our own entry topics: a stale entry of ours (the service went away while we
        were offline) is deleted; signed, an entry of ours overwritten (a replayed tombstone, anything else)
        is posted again, and a tombstone of an old connection is renewed for this one."""
        if self._seals is None:
            if msg.payload and key not in self._own and msg.retain:
                self._post_entry(key, b"")
            return
        payload = self._own_payload(msg)
        mine = self._own.get(key)
        if mine is None:
            if msg.retain and msg.payload and (payload is None or tombstone_epoch(payload) != self.epoch):
                self._post_entry(key, b"")
            return
        if payload != mine and self._session.connected and not self._leaving:
            log.debug("own entry on %s overwritten: posted again", msg.topic)
            self._post_entry(key, mine)

    def _index(self, node: str, service: tuple[str, str] | None, *, add: bool, departed: bool = False) -> None:
        """Keep the providers of each cloud service (for liveness) and the spec it gets in the registry in step
        with the entries. `departed`: the node deleted the entry itself."""
        if service is None:  # not reachable over MQTT: kept for the view only
            return
        if add:
            self.liveness.add_provider(service, node, self._clock())
        else:
            self.liveness.remove_provider(service, node, self._clock(), departed=departed)
        self._touch(service)

    def _touch(self, service: tuple[str, str]) -> None:
        """A service's providers changed: its spec in the registry is made again at the next apply (`_spec`)."""
        self._touched.add(service)
        if self.follows_all and service_key(*service) in self._needed:
            self._urgent.add(service)

    def _spec(self, service: tuple[str, str]) -> ServiceSpec | None:
        """The spec a service gets in the registry: the entry of the first node by name that serves it (None:
        none does). Made when applied, not kept: the registry keeps it (a copy here was a map of 10,000
        specs on a box following a whole fleet), and it keeps its old spec when this one is equal."""
        serving = self.liveness.serving(service)
        if not serving:
            return None
        first = min(serving)
        key = service_key(*service)
        return self.entries[first][key].spec(key, self._source_of(first))

    def _changed(
        self, services: bool = True, removal: bool = False, entry: tuple[str, str] | None = None, node: str = ""
    ) -> None:
        """Something changed: apply it to the registry soon, and save the changed entry or node soon."""
        if services:
            self._schedule_apply(REMOVAL_DELAY if removal else APPLY_DELAY)
        if entry is not None:
            self._dirty(*entry)
        if node:
            self._dirty(node)
        self._saver.mark_save(LOG_FILE, self._save, within=SAVE_WITHIN)

    def _dirty(self, node: str, key: str | None = None) -> None:
        """Save `node`'s entry `key` (or, with no key, its status) at the next save: appended to the log, or
        nothing to note when the next save rewrites it whole; more changes than live entries make it one."""
        if self._whole:
            return
        if key is None:
            self._dirty_nodes.add(node)
        else:
            self._dirty_entries.add((node, key))
        if len(self._dirty_entries) + len(self._dirty_nodes) > max(MIN_COMPACT, self._learned + len(self.nodes)):
            self._mark_all()  # appending them would outgrow the file: rewritten whole anyway

    def collect(self) -> None:
        """At scrape time (not per message: a thousand boxes send a status every few seconds): nodes by
        liveness."""
        now = self._clock()
        counts = dict.fromkeys((ONLINE, OFFLINE, STALE, SUSPECT, UNKNOWN), 0)
        for node in self.nodes:
            counts[self.liveness.state(node, now)] += 1
        for state, n in counts.items():
            self._metrics.registry_nodes.set((state,), n)

    def _source_of(self, node: str) -> str:
        """`mqtt:{node}`: one string per node, shared by the specs of its services."""
        source = self._sources.get(node)
        if source is None:
            source = self._sources[node] = f"{SOURCE}:{node}"
        return source

    def remote_specs(self) -> list[ServiceSpec]:
        """One spec per remote (tenant, service) reachable over MQTT; of several nodes, the first by name."""
        return [spec for service in self.liveness.provided() if (spec := self._spec(service)) is not None]

    def apply(self) -> None:
        """Put the remote services into the registry (source "mqtt") now, all of them."""
        if self._apply_timer is not None:
            self._apply_timer.cancel()
            self._apply_timer = None
        self._touched, self._urgent = set(), set()
        specs = {service: self._spec(service) for service in self.liveness.provided()}
        self._registry.set_services(SOURCE, {service: spec for service, spec in specs.items() if spec is not None})

    def _apply_some(self) -> None:
        """The timer's apply: the services whose spec changed, `APPLY_CHUNK` at a time, each chunk an
        incremental registry change (O(chunk)); the rest right after, once the loop has run what waits (calls
        go on between chunks: a burst of ten thousand entries never holds the loop for long)."""
        self._apply_timer = None
        touched, urgent = self._touched, self._urgent
        if len(touched) <= APPLY_CHUNK:
            chunk, self._touched = touched, set()
            urgent.clear()
        else:  # the services this node routes to first (following a whole fleet, they are a few of thousands)
            chunk = {urgent.pop() for _ in range(min(APPLY_CHUNK, len(urgent)))}
            touched -= chunk
            chunk.update(touched.pop() for _ in range(APPLY_CHUNK - len(chunk)))
        started = time.perf_counter()
        self._registry.update_services(SOURCE, {service: self._spec(service) for service in chunk})
        self._unfrozen += len(chunk)  # the services, endpoints and health states made for them
        if self._unfrozen >= FREEZE_EVERY:
            self._freeze()
        self._apply_cost = time.perf_counter() - started
        self._burst += len(chunk)
        if self._touched:
            self._apply_timer = asyncio.get_running_loop().call_later(self._apply_cost / APPLY_SHARE, self._apply_some)
        elif self._burst:
            if self._burst >= TRIM_AFTER:  # a burst's messages are gone: give the arenas they left back to the OS
                memory.trim()
            self._burst = 0

    def _freeze(self) -> None:
        """Leave what the registry keeps out of the cyclic garbage collector's full passes: with ten thousand
        entries a full pass walks some 130,000 objects, 50-200 ms with the loop blocked, and a burst of
        new entries triggers several. These objects are freed by reference counting when they go (none of
        them is in a cycle); the young generations are collected first, so that little garbage is frozen."""
        gc.collect(1)
        gc.freeze()
        self._unfrozen = 0

    def _schedule_apply(self, delay: float) -> None:
        """Apply within `delay`, once for a burst of messages; at once when no event loop runs (loading)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.apply()
            return
        delay = max(delay, self._apply_cost / APPLY_SHARE)
        timer = self._apply_timer
        if timer is not None:
            if timer.when() <= loop.time() + delay:
                return
            timer.cancel()
        self._apply_timer = loop.call_later(delay, self._apply_some)

    def peers(self) -> list[dict]:
        """Nodes known from the registry, for `edged status` / `GET /v1/status`."""
        out = []
        now = self._clock()
        for node in sorted(set(self.nodes) | set(self.entries)):
            doc = self.nodes.get(node) or NodeStatus(state="")
            out.append(
                {
                    "node": node,
                    "source": "mqtt",
                    "fleet": self._topics.fleet,
                    "state": self.liveness.state(node, now),
                    "zone": doc.zone,
                    "location": parse_loc(doc.loc),
                    "vitals": dict(doc.vitals),
                    "services": sorted(self.entries.get(node, {})),
                    "seen": doc.seen,
                    "since": doc.since,
                }
            )
        return out

    # -- liveness -------------------------------------------------------------------------------------------

    def unreachable(self, tenant: str, service: str) -> str | None:
        """Why a cloud call to this service cannot be served now (every node known to serve it is dead), or
        None. The per-call check of the cloud transport: a set lookup."""
        if not self.liveness.is_withdrawn((tenant, service)):
            return None
        dead = [f"{node} {state}" for node, state in self.liveness.providers((tenant, service), self._clock())]
        return "no live node serves it" + (f" ({', '.join(dead[:3])})" if dead else " (its last node left)")

    def heard_since_connect(self, tenant: str, service: str) -> bool:
        """Whether a node serving (tenant, service) was heard on the current broker connection: then it is
        subscribed there (a box subscribes before it posts), and a request sent now can reach it."""
        heard = self._heard
        return any(node in heard for node in self.liveness.serving((tenant, service)))

    def serves(self, node: str, tenant: str, service: str) -> bool:
        """Whether `node` has an entry saying it serves (tenant, service) over MQTT (the cloud transport takes
        answers only from such nodes)."""
        shape = self.entries.get(node, {}).get(service_key(tenant, service))
        return shape is not None and shape.cloud

    def provider_nodes(self, tenant: str, service: str) -> Iterable[str]:
        """The nodes with an entry saying they serve (tenant, service) over MQTT (a cloud request is MAC'd to
        each: the broker hands it to one bridge of each group). Do not change what is returned."""
        return self.liveness.serving((tenant, service))

    def providers(self, tenant: str, service: str) -> list[dict]:
        """The nodes that serve a service over MQTT, with liveness and last-seen time (wall clock)."""
        out = []
        for node, state in self.liveness.providers((tenant, service), self._clock()):
            doc = self.nodes.get(node) or NodeStatus(state="")
            out.append({"node": node, "state": state, "seen": doc.seen, "since": doc.since})
        return out

    def call_timed_out(self, tenant: str, service: str, waited: float) -> None:
        """Passive detection: a cloud call got no answer within `waited` seconds (`Liveness.timed_out`)."""
        now = self._clock()
        if self.liveness.timed_out((tenant, service), now, now - waited):
            log_event(log, logging.WARNING, "mqtt.node_suspect", service=service, tenant=tenant)

    def call_answered(self, node: str) -> None:
        """An answer came from `node`: it is alive."""
        if node:
            self.liveness.answered(node, self._clock())

    def sweep(self) -> None:
        """Run now and then: apply what time alone changes (a status not renewed, the end of a suspicion)
        and drop the entries of nodes that have not been live for `offline_ttl`."""
        now = self._clock()
        self.liveness.refresh(now)
        self.liveness.forget_departed(now, self.offline_ttl)
        dead = self.liveness.expired(now, self.offline_ttl)
        if dead:
            self.drop_nodes(dead)

    def drop_nodes(self, nodes: Iterable[str]) -> None:
        """Forget nodes and their entries (memory and state); their services leave the registry."""
        dropped = []
        for node in nodes:
            self.nodes.pop(node, None)
            self._status_hash.pop(node, None)
            self._epochs.forget(node)
            self._sources.pop(node, None)
            self._names.pop(node, None)
            for key, shape in self.entries.pop(node, {}).items():
                self._learned -= 1
                self._index(node, _service(key, shape), add=False)
                self._dirty(node, key)
            self._dirty(node)
            self.liveness.forget(node, self._clock())
            dropped.append(node)
        if dropped:
            log_event(log, logging.INFO, "mqtt.nodes_dropped", nodes=dropped[:20], count=len(dropped))
            self._changed(removal=True)

    async def clear_own(self, timeout: float = 1.0) -> int:
        """A clean stop: delete this node's retained entries, so that no one keeps routing to them.
        Returns how many were deleted."""
        self._leaving = True  # our own tombstones coming back are not overwrites to undo
        cleared = 0
        for key in list(self._own):
            topic = self._topics.service(self.node, *split_service_key(key))
            try:
                await self._session.publish(topic, self._entry_wire(topic, b""), qos=1, retain=True, timeout=timeout)
            except PublishError:
                break
            cleared += 1
            self._posted.pop(key, None)
        return cleared

    # -- persistence ----------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The document saved in the state dir. Format 2: each entry is its CBOR in base64 (as kept in memory:
        no decoding at every write); format 1 (entries as JSON maps) is still read."""
        return {
            "format": 2,
            "prefix": self._topics.prefix,
            "fleet": self._topics.fleet,
            "saved": round(time.time(), 3),
            "nodes": {node: status.as_dict() for node, status in self.nodes.items()},
            "entries": {
                node: {key: _b64(cbor2.dumps(shape.entry(node, key))) for key, shape in known.items()}
                for node, known in self.entries.items()
            },
        }

    def load(self, doc: object) -> int:
        """Restore a registry document (`state()`; formats 1 and 2, the state file of earlier versions);
        returns how many entries were kept."""
        if not isinstance(doc, dict) or doc.get("format") not in (1, 2):
            return 0
        if doc.get("prefix") != self._topics.prefix or doc.get("fleet") != self._topics.fleet:
            log.info("saved registry is for another broker prefix or fleet: ignored")
            return 0

        def shape_of(node: str, key: str, raw: Any) -> Shape:
            entry = cbor2.loads(base64.b64decode(raw, validate=True)) if isinstance(raw, str) else raw
            return entry_shape(entry, node=node, key=key)

        return self._restore(doc.get("entries") or {}, doc.get("nodes") or {}, shape_of)

    def restore(self) -> int:
        """Restore the registry saved by a previous run (the log; else the JSON document of an earlier
        version, rewritten as a log at the first save); returns how many entries were kept."""
        loaded = read_log(self._log.path)
        if loaded is None:
            legacy = self._saver.store.read_json(STATE_FILE, {})
            if not legacy:
                return 0
            kept = self.load(legacy)
            self._legacy = True
            self._mark_all()
            return kept
        if loaded.header.get("prefix") != self._topics.prefix or loaded.header.get("fleet") != self._topics.fleet:
            log.info("saved registry is for another broker prefix or fleet: ignored")
            self._mark_all()  # rewritten for this one at the first save
            return 0
        checked: dict[int, Shape | None] = {}

        def shape_of(node: str, key: str, sid: Any) -> Shape:
            # Each shape of the file is decoded and checked once; an entry only checks its key against it.
            shape = checked.get(sid, False)
            if shape is False:
                raw = loaded.shapes.get(sid)
                shape = None
                if raw is not None:
                    with contextlib.suppress(Exception):  # damage: CBOR and validation raise many types
                        rest = cbor2.loads(raw)
                        service = split_service_key(key)[1]
                        shape = entry_shape({**rest, "node": node, "service": service}, node=node, key=key)
                checked[sid] = shape
            if shape is None or split_service_key(key)[0] != shape.template.tenant or not split_service_key(key)[1]:
                raise ValueError(f"entry {key} of {node}: no valid shape {sid!r}")
            return shape

        kept = self._restore(loaded.entries, loaded.nodes, shape_of)
        if loaded.torn:
            log.warning("the saved cloud registry had %d damaged records (skipped)", loaded.torn)
            self._mark_all()
        return kept

    def _restore(
        self, entries: Mapping[str, Any], nodes: Mapping[str, Any], shape_of: Callable[[str, str, Any], Shape]
    ) -> int:
        kept = 0
        lim = self._limits
        for node, known in entries.items():
            if node == self.node or not isinstance(node, str) or not isinstance(known, dict):
                continue
            for key, raw in list(known.items())[: lim.learned_entries_per_node]:
                if kept >= lim.learned_entries:  # a state file written under larger limits
                    break
                if not self._wants(key) or key in self.entries.get(node, {}):
                    continue  # a service this node no longer follows
                try:
                    shape = shape_of(node, key, raw)
                except Exception:  # a damaged file: base64, CBOR and validation raise many types
                    continue
                node = self._names.setdefault(node, node)
                self.entries.setdefault(node, {})[key] = shape
                self._index(node, _service(key, shape), add=True)
                kept += 1
        self._learned += kept
        now = self._clock()
        for node, status in list(nodes.items())[: lim.peers]:
            if node != self.node and isinstance(status, dict) and status.get("state") in ("online", "offline"):
                seen = status.get("seen")
                self.nodes[node] = NodeStatus.of(status, seen=seen, since=status.get("since", seen))
                # Seen "now": a saved wall-clock time means little on a box whose clock jumps at boot.
                self.liveness.status(node, status["state"], now)
        self.apply()
        if kept >= FREEZE_EVERY:
            self._freeze()
        return kept

    # -- the log ---------------------------------------------------------------------------------------------

    def _mark_all(self) -> None:
        """Write everything at the next save (a rewrite of the log)."""
        self._whole = True
        self._dirty_entries, self._dirty_nodes = set(), set()
        self._log.force_rewrite()
        self._saver.mark_save(LOG_FILE, self._save, within=SAVE_WITHIN)

    def _save(self) -> Awaitable[None]:
        """The saver's write: append what changed since the last save, or rewrite the log whole (see
        `registry_log.py`). The records are read as they are encoded, in parts with the loop free in between
        (not collected here in one piece: O(entries) for a rewrite): a record read later than now may be newer,
        and whatever changes from now on is noted and appended after it, so the log replays to what memory
        holds."""
        dirty_entries, self._dirty_entries = self._dirty_entries, set()
        dirty_nodes, self._dirty_nodes = self._dirty_nodes, set()
        whole, self._whole = self._whole, False  # changes from now on are appended after what is written here
        if whole or self._log.rewrite_due(len(dirty_entries) + len(dirty_nodes), self._learned + len(self.nodes)):
            return self._rewrite(self._live_entries(list(self.entries.items())), self._live_nodes(list(self.nodes)))
        return self._append(
            ((node, key, self.entries.get(node, {}).get(key)) for node, key in dirty_entries),
            self._live_nodes(dirty_nodes, deleted=True),
        )

    @staticmethod
    def _live_entries(nodes: list[tuple[str, dict[str, Shape]]]) -> Iterator[tuple[str, str, Shape]]:
        for node, known in nodes:
            for key, shape in list(known.items()):  # (a node's entries may change between two parts)
                yield node, key, shape

    def _live_nodes(self, names: Iterable[str], deleted: bool = False) -> Iterator[tuple[str, dict | None]]:
        for node in names:
            status = self.nodes.get(node)
            if status is not None:
                yield node, status.as_dict()
            elif deleted:
                yield node, None

    async def _saved(self, save: Awaitable[bool]) -> bool:
        """Whether `save` (an append or a rewrite of the log) was written; if not, everything is marked to be
        written whole: by the saver's last flush when a stop cut it short, else in SAVE_WITHIN (not at once: a
        full or read-only disk)."""
        try:
            saved = await save
        except asyncio.CancelledError:
            self._mark_all()
            raise
        if not saved:
            self._mark_all()
        return saved

    async def _append(self, entries: Iterable, nodes: Iterable) -> None:
        await self._saved(self._log.append(entries, nodes))

    async def _rewrite(self, entries: Iterable, nodes: Iterable) -> None:
        if not await self._saved(self._log.rewrite(entries, nodes)):
            return
        if self._log.rewrites == 1 and self._learned >= TRIM_AFTER:
            memory.trim()  # the first save after a start: what the burst (or the restore) left in the arenas
        if self._legacy:
            self._legacy = False  # the JSON document of an earlier version is in the log now
            with contextlib.suppress(OSError):
                os.unlink(self._saver.store.path(STATE_FILE))
