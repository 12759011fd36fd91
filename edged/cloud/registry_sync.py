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
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import cbor2

from .. import __version__
from ..errors import ConfigError
from ..logs import log_event
from ..manifest import parse_policy, policy_dict
from ..model import TIERS, InterfaceSpec, MethodRule, ServiceSpec
from ..registry import Registry, Snapshot
from .persist import StateSaver
from .session import Inbound, MqttSession
from .telemetry import CloudMetrics
from .topics import Topics, service_key, split_service_key

log = logging.getLogger("edged.cloud.registry")

STATE_FILE = "cloud-registry.json"
ENTRY_VERSION = 1
SOURCE = "mqtt"


# -- entries: ServiceSpec <-> a plain dict (CBOR on the wire, JSON on disk) --------------------------------


def spec_entry(spec: ServiceSpec, *, node: str, zone: str, cloud: bool) -> dict[str, Any]:
    """The registry entry a node publishes for a service it offers. No timestamps: an unchanged service
    gives identical bytes, so re-publishing it is a no-op for every subscriber."""
    interface = None
    if spec.interface is not None:
        interface = {
            "version": spec.interface.version,
            "methods": [f"{m.verb} {m.pattern}" for m in spec.interface.methods],
        }
    return {
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


def entry_spec(entry: Mapping[str, Any], *, source: str) -> ServiceSpec:
    """The ServiceSpec a remote entry declares: reachable over the cloud tier only. ValueError if invalid."""
    if entry.get("v") != ENTRY_VERSION:
        raise ValueError(f"unsupported entry version {entry.get('v')!r}")
    name, tenant, priority = entry.get("service"), entry.get("tenant"), entry.get("priority")
    if not isinstance(name, str) or not isinstance(tenant, str) or not name or not tenant:
        raise ValueError("service and tenant must be non-empty strings")
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise ValueError("priority must be an integer >= 0")
    interface = None
    raw_iface = entry.get("interface")
    if raw_iface is not None:
        if not isinstance(raw_iface, Mapping) or not isinstance(raw_iface.get("methods", []), list):
            raise ValueError("interface must be a map with a list of methods")
        version = raw_iface.get("version")
        methods = tuple(MethodRule.parse(str(m)) for m in raw_iface.get("methods", []))
        interface = InterfaceSpec(version=version if isinstance(version, str) else None, methods=methods)
    try:
        policy = parse_policy(entry.get("policy", {}), source)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return ServiceSpec(
        name=name,
        tenant=tenant,
        priority=priority,
        interface=interface,
        endpoint_types=("cloud",),
        policy=policy,
        source=source,
    )


def normalize_entry(obj: object) -> dict[str, Any]:
    """A received entry reduced to its known fields (JSON-safe), or ValueError."""
    if not isinstance(obj, Mapping):
        raise ValueError("an entry must be a map")
    entry = {
        "v": obj.get("v"),
        "node": str(obj.get("node", "")),
        "zone": str(obj.get("zone", "")),
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
    entry_spec(entry, source="check")  # raises ValueError when it does not make a service
    json.dumps(entry)  # and it must be storable as JSON (no CBOR-only values)
    return entry


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
        saver: StateSaver,
        metrics: CloudMetrics,
        status_extra: Callable[[], dict] = dict,
        offers: Callable[[ServiceSpec], bool] | None = None,
        always_cloud: bool = False,  # a bridge: every service it offers is reachable over MQTT
        follow: bool = True,
    ) -> None:
        self._registry = registry
        self._session = session
        self._topics = topics
        self.node = node
        self._zone = zone
        self._saver = saver
        self._metrics = metrics
        self._status_extra = status_extra
        self._offers = offers
        self._always_cloud = always_cloud
        self._own: dict[str, bytes] = {}  # key -> entry payload this node offers now
        self._posted: dict[str, bytes] = {}  # key -> payload last posted on this connection
        self.nodes: dict[str, dict] = {}  # other node -> last status document
        self.entries: dict[str, dict[str, dict]] = {}  # other node -> key -> entry
        self.bad_messages = 0
        if follow:
            session.subscribe(topics.all_status, self._on_status, qos=1)
            session.subscribe(topics.all_services, self._on_service, qos=1)
        else:  # a bridge: only its own entries, to remove stale ones
            session.subscribe(f"{topics.base}/nodes/{node}/services/+", self._on_service, qos=1)

    # -- payloads of this node ------------------------------------------------------------------------------

    def status_payload(self, state: str, **extra: object) -> bytes:
        """JSON status document: `online` (with vitals) or `offline` (the last will, or a clean shutdown)."""
        doc = {"state": state, "node": self.node, "fleet": self._topics.fleet, "zone": self._zone, **extra}
        if state == "online":
            doc.update(self._status_extra())
            doc["version"] = __version__
            doc["services"] = sorted(self._own)
            doc["ts"] = round(time.time(), 3)
        return json.dumps(doc, separators=(",", ":")).encode()

    def publish_status(self) -> None:
        """Post the retained `online` status (on connect, and when vitals change)."""
        self._session.post(self._topics.status(self.node), self.status_payload("online"), qos=1, retain=True)

    def on_connected(self) -> None:
        """A fresh connection: post status and every entry again (state posted while down was dropped)."""
        self._posted = {}
        self.publish_status()
        self._post_entries()

    def local_changed(self, snapshot: Snapshot) -> None:
        """Recompute the entries this node offers from a registry snapshot; post what changed."""
        own: dict[str, bytes] = {}
        for svc in snapshot.services.values():
            spec = svc.spec
            if spec.source.startswith(f"{SOURCE}:"):
                continue  # learned from the registry: not ours to offer
            offered = self._offers(spec) if self._offers else any(ep.tier == "local" for ep in svc.endpoints)
            if not offered:
                continue
            cloud = self._always_cloud or "cloud" in spec.endpoint_types
            entry = spec_entry(spec, node=self.node, zone=self._zone, cloud=cloud)
            own[service_key(spec.tenant, spec.name)] = cbor2.dumps(entry)
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

    def _post_entry(self, key: str, payload: bytes) -> None:
        tenant, service = split_service_key(key)
        if self._session.post(self._topics.service(self.node, tenant, service), payload, qos=1, retain=True):
            if payload:
                self._posted[key] = payload
            else:
                self._posted.pop(key, None)

    # -- what the others publish ----------------------------------------------------------------------------

    def _on_status(self, msg: Inbound) -> None:
        parsed = self._topics.parse_node_topic(msg.topic)
        if parsed is None:
            return
        node = parsed[0]
        if node == self.node:
            return
        if not msg.payload:
            if self.nodes.pop(node, None) is not None:
                self._changed()
            return
        try:
            doc = json.loads(msg.payload)
            if not isinstance(doc, dict) or doc.get("state") not in ("online", "offline"):
                raise ValueError("expected a JSON object with state online|offline")
        except ValueError as exc:
            self.bad_messages += 1
            log.debug("bad status on %s: %s", msg.topic, exc)
            return
        doc = {k: v for k, v in doc.items() if isinstance(k, str)}
        doc["seen"] = round(time.time(), 3)
        previous = self.nodes.get(node, {}).get("state")
        self.nodes[node] = doc
        if previous != doc["state"]:
            log_event(log, logging.INFO, "mqtt.node_state", node=node, state=doc["state"])
        self._changed(services=False)

    def _on_service(self, msg: Inbound) -> None:
        parsed = self._topics.parse_node_topic(msg.topic)
        if parsed is None:
            return
        node, _, key = parsed
        if node == self.node:
            if msg.payload and key not in self._own and msg.retain:
                # A stale entry of ours (the service went away while we were offline): remove it.
                self._post_entry(key, b"")
            return
        if not msg.payload:
            if self.entries.get(node, {}).pop(key, None) is not None:
                self._changed()
            return
        try:
            entry = normalize_entry(cbor2.loads(msg.payload))
        except Exception as exc:  # garbage from any publisher: cbor2 and validation raise many types
            self.bad_messages += 1
            log_event(log, logging.WARNING, "mqtt.bad_registry_entry", topic=msg.topic, error=str(exc)[:200])
            return
        if self.entries.get(node, {}).get(key) == entry:
            return
        self.entries.setdefault(node, {})[key] = entry
        self._changed()

    def _changed(self, services: bool = True) -> None:
        if services:
            self.apply()
        self._saver.mark(STATE_FILE, self.state)
        states = [doc.get("state") for doc in self.nodes.values()]
        for state in ("online", "offline"):
            self._metrics.registry_nodes.set((state,), states.count(state))

    def remote_specs(self) -> list[ServiceSpec]:
        """One spec per remote (tenant, service) reachable over MQTT; of several nodes, the first by name."""
        specs: dict[tuple[str, str], ServiceSpec] = {}
        for node in sorted(self.entries):
            for entry in self.entries[node].values():
                if not entry.get("cloud"):
                    continue
                try:
                    spec = entry_spec(entry, source=f"{SOURCE}:{node}")
                except ValueError:
                    continue
                specs.setdefault(spec.key, spec)
        return list(specs.values())

    def apply(self) -> None:
        """Put the remote services into the registry (source "mqtt")."""
        self._registry.set_services(SOURCE, self.remote_specs())

    def peers(self) -> list[dict]:
        """Nodes known from the registry, for `edged status` / `GET /v1/status`."""
        out = []
        for node in sorted(set(self.nodes) | set(self.entries)):
            doc = self.nodes.get(node, {})
            out.append(
                {
                    "node": node,
                    "source": "mqtt",
                    "fleet": self._topics.fleet,
                    "state": doc.get("state", "unknown"),
                    "zone": doc.get("zone", ""),
                    "vitals": doc.get("vitals", {}),
                    "services": sorted(self.entries.get(node, {})),
                    "seen": doc.get("seen"),
                }
            )
        return out

    # -- persistence ----------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The document saved in the state dir."""
        return {
            "format": 1,
            "prefix": self._topics.prefix,
            "fleet": self._topics.fleet,
            "saved": round(time.time(), 3),
            "nodes": self.nodes,
            "entries": self.entries,
        }

    def load(self, doc: object) -> int:
        """Restore the last known registry (saved by a previous run); returns how many entries were kept."""
        if not isinstance(doc, dict) or doc.get("format") != 1:
            return 0
        if doc.get("prefix") != self._topics.prefix or doc.get("fleet") != self._topics.fleet:
            log.info("saved registry is for another broker prefix or fleet: ignored")
            return 0
        kept = 0
        for node, entries in (doc.get("entries") or {}).items():
            if node == self.node or not isinstance(entries, dict):
                continue
            for key, raw in entries.items():
                try:
                    self.entries.setdefault(node, {})[key] = normalize_entry(raw)
                    kept += 1
                except ValueError:
                    continue
        for node, status in (doc.get("nodes") or {}).items():
            if node != self.node and isinstance(status, dict):
                self.nodes[node] = status
        self.apply()
        return kept
