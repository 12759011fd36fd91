"""From what mDNS sees to what the registry holds: peers and DNS-SD instances -> edge endpoints (pure).

- A HubMesh peer (`_hubmesh._tcp`, same fleet, not this node) offers services; each (peer, service) becomes an
  edge endpoint through the peer's ingress, `http://{addr}:{port}/svc/{service}`. A service this node does not
  declare at all is declared from mDNS (lowest precedence), so a call for it is routed with no manifest here.
- A manifest's `[[endpoints]] type = "edge", mdns = "_x._tcp"` takes every live instance of that type,
  `http://{addr}:{port}{TXT path}`, whoever advertises it (an edged of this fleet, Avahi, a bare responder).
- Endpoint meta carries the node's vitals (from its TXT), its name, zone and location; a link quality this
  node measured stands in when the peer does not know its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..locality import where_meta
from ..model import Endpoint, Service, ServiceSpec, parse_target
from ..registry import Key, Layer, Snapshot
from ..routes import Labels
from ..vitals import Vitals
from .txt import NodeRecord, service_path

if TYPE_CHECKING:
    from .mdns import Instance  # zeroconf is loaded only when mDNS is on

_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
DEFAULT_PRIORITY = ServiceSpec(name="x").priority
LINK_HALF_RTT_MS = 50.0  # a round trip this long halves the link score
LOSS_ALPHA = 0.3


PeerLabels = tuple[tuple[tuple[str, str], Labels], ...]


@dataclass(frozen=True, slots=True)
class Peer:
    """A live HubMesh node of this fleet, as discovery resolved it."""

    record: NodeRecord
    address: str
    port: int
    instance: str
    services: tuple[tuple[str, str], ...]  # (tenant, name); fetched from its ingress when TXT held only a hash
    labels: PeerLabels = ()  # ((tenant, name), labels) of the services that carry labels (fetched with the list)

    @property
    def node(self) -> str:
        return self.record.node


def url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def offered(snapshot: Snapshot) -> list[Service]:
    """Services this node offers to peers: at least one local endpoint, and an edge audience (`edge` in
    `endpoint_types`, or an `advertise` type)."""
    return [
        svc
        for svc in snapshot.services.values()
        if any(ep.tier == "local" for ep in svc.endpoints)
        and ("edge" in svc.spec.endpoint_types or svc.spec.advertise is not None)
    ]


def _meta(
    node: str, vitals: Vitals, link: int | None, where: tuple[tuple[str, str], ...] = ()
) -> tuple[tuple[str, str], ...]:
    if vitals.link is None and link is not None:
        vitals = Vitals(cpu=vitals.cpu, bat=vitals.bat, power=vitals.power, link=link)
    return tuple(sorted((*vitals.meta(), ("node", node), *where)))


def _where(record: NodeRecord | None) -> tuple[tuple[str, str], ...]:
    """A peer's zone and location as endpoint meta (strategy `geo`, edged/locality.py)."""
    return () if record is None else where_meta(record.zone, record.location)


def _txt_path(props: Mapping[str, str]) -> str:
    path = props.get("path", "").strip()
    return path.rstrip("/") if _PATH.fullmatch(path) else ""


@dataclass(frozen=True, slots=True)
class Discovered:
    """What the edge tier's last sync found: the whole input of its registry layer, replaced at each sync."""

    peers: tuple[Peer, ...] = ()
    typed: tuple[Instance, ...] = ()  # instances of the types manifests name (not `_hubmesh._tcp`)
    links: Mapping[str, int | None] = field(default_factory=dict)  # node -> link quality measured here


def edge_layer(discovered: Callable[[], Discovered], *, node: str, fleet: str, tls: bool = False) -> Layer:
    """The registry layer "mdns": services peers offer (declared when unknown here) and edge endpoints for
    the merged services, both pure functions of `discovered()` and of what the registry merged."""

    def services() -> list[ServiceSpec]:
        return build(discovered().peers, (), {}, node=node, fleet=fleet, tls=tls)[1]

    def endpoints(specs: Mapping[Key, ServiceSpec]) -> list[Endpoint]:
        found = discovered()
        return build(found.peers, found.typed, specs, node=node, fleet=fleet, links=found.links, tls=tls)[0]

    return Layer("mdns", services=services, endpoints=endpoints)


def build(
    peers: Iterable[Peer],
    typed: Iterable[Instance],
    specs: Mapping[Key, ServiceSpec],
    *,
    node: str,
    fleet: str,
    links: Mapping[str, int | None] | None = None,
    tls: bool = False,
) -> tuple[list[Endpoint], list[ServiceSpec]]:
    """Edge endpoints for the registry (source "mdns") and the services declared from mDNS.

    With `tls`, a node's ingress is reached over `https` (mutual TLS): `peers` must hold only admitted peers,
    and an instance that names a node is an ingress route that must prove that node too (edge.admission)."""
    links = links or {}
    ingress = "https" if tls else "http"
    peers = [p for p in peers if p.node != node and p.record.fleet == fleet]
    by_node = {p.node: p for p in peers}
    endpoints: dict[str, Endpoint] = {}
    urls: set[tuple[str, str, str]] = set()
    by_type: dict[str, list[Instance]] = {}
    for instance in typed:
        by_type.setdefault(instance.type, []).append(instance)
    for spec in specs.values():
        for decl in spec.endpoints:
            if decl.tier != "edge" or decl.mdns is None:
                continue
            for instance in by_type.get(decl.mdns + ".local.", ()):
                props = instance.props
                owner, owner_fleet = props.get("node", ""), props.get("fleet", "")
                if owner == node or (owner and owner_fleet and owner_fleet != fleet):
                    continue  # ourselves, or another fleet's ingress (it would refuse us)
                if tls and owner and owner not in by_node:
                    continue  # names a node that has not proved itself (or is not advertised): no calls
                scheme = ingress if owner else "http"  # a plain DNS-SD service (Avahi, a device) speaks HTTP
                url = f"{scheme}://{url_host(instance.addresses[0])}:{instance.port}{_txt_path(props)}"
                peer = by_node.get(owner)
                vitals = peer.record.vitals if peer is not None else Vitals.from_txt(props)
                if owner:
                    meta = _meta(owner, vitals, links.get(owner), _where(peer.record if peer is not None else None))
                else:
                    meta = vitals.meta() if vitals != Vitals() else ()
                eid = f"{spec.tenant}/{spec.name}/edge/mdns:{instance.label}"
                endpoints[eid] = Endpoint(
                    id=eid,
                    service=spec.name,
                    tenant=spec.tenant,
                    tier="edge",
                    url=url,
                    priority=spec.priority if decl.priority is None else decl.priority,
                    weight=decl.weight,
                    source="mdns",
                    target=parse_target(url),
                    meta=meta,
                    labels=decl.labels,  # what the manifest says of the instances of its type
                )
                urls.add((spec.tenant, spec.name, url))
    declared: dict[tuple[str, str], ServiceSpec] = {}
    for peer in sorted(peers, key=lambda p: p.node):
        meta = _meta(peer.node, peer.record.vitals, links.get(peer.node), _where(peer.record))
        labelled = dict(peer.labels)
        for tenant, name in peer.services:
            declared.setdefault(
                (tenant, name),
                ServiceSpec(name=name, tenant=tenant, endpoint_types=("edge",), source=f"mdns:{peer.node}"),
            )
            url = f"{ingress}://{url_host(peer.address)}:{peer.port}{service_path(tenant, name)}"
            if (tenant, name, url) in urls:
                continue  # the same ingress route, already taken through the manifest's mdns type
            known = specs.get((tenant, name))
            eid = f"{tenant}/{name}/edge/mdns:{peer.node}"
            endpoints[eid] = Endpoint(
                id=eid,
                service=name,
                tenant=tenant,
                tier="edge",
                url=url,
                priority=known.priority if known is not None else DEFAULT_PRIORITY,
                weight=100,
                source="mdns",
                target=parse_target(url),
                meta=meta,
                labels=labelled.get((tenant, name), ()),
            )
    return sorted(endpoints.values(), key=lambda e: e.id), [declared[k] for k in sorted(declared)]


class LinkEstimator:
    """Link quality to each peer from what calls and health checks to it saw: round-trip time and loss.

    Used when a peer cannot report its own (no Wi-Fi). 0..100 in steps of 10, so that noise does not churn
    the registry: 100 / (1 + rtt / 50 ms), times the share of recent tries that did not fail.
    """

    def __init__(self) -> None:
        self._totals: dict[str, tuple[int, int]] = {}
        self._loss: dict[str, float] = {}

    def update(self, node: str, latency: float | None, ok_total: int, failed_total: int) -> int | None:
        """Fold in the peer's counters (running totals over its endpoints); its link score, or None if unknown."""
        last_ok, last_failed = self._totals.get(node, (0, 0))
        if ok_total < last_ok or failed_total < last_failed:  # endpoints came back with fresh counters
            last_ok = last_failed = 0
        self._totals[node] = (ok_total, failed_total)
        ok, failed = ok_total - last_ok, failed_total - last_failed
        if ok + failed:
            sample = failed / (ok + failed)
            prev = self._loss.get(node)
            self._loss[node] = sample if prev is None else prev + LOSS_ALPHA * (sample - prev)
        loss = self._loss.get(node)
        if latency is None and loss is None:
            return None
        score = 100.0 if latency is None else 100.0 / (1.0 + latency * 1000.0 / LINK_HALF_RTT_MS)
        score *= 1.0 - (loss or 0.0)
        return max(0, min(100, round(score / 10.0) * 10))

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for node in [n for n in self._totals if n not in keep]:
            del self._totals[node]
            self._loss.pop(node, None)
