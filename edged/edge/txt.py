"""What a node says about itself in DNS-SD: names, the `_hubmesh._tcp` TXT record (under 400 bytes), its parsing.

Pure: no sockets. A peer's TXT is untrusted input: parsing never raises, anything garbled is left out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..locality import clean_zone, format_loc, parse_loc
from ..model import DEFAULT_TENANT
from ..routes import Labels, wire_labels
from ..vitals import Vitals

PROTOCOL_VERSION = "1"
HUBMESH_TYPE = "_hubmesh._tcp.local."
TXT_LIMIT = 400  # bytes of the whole TXT record; beyond it `svcs` becomes a hash and peers fetch the list
HASH_PREFIX = "#"
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_UNSAFE = re.compile(r"[^a-z0-9-]+")


def service_ref(tenant: str, name: str) -> str:
    """How a service is named to peers: `name`, or `tenant/name` outside the default tenant."""
    return name if tenant == DEFAULT_TENANT else f"{tenant}/{name}"


def parse_service_ref(ref: str) -> tuple[str, str] | None:
    """(tenant, name) from `name` or `tenant/name`; None when it is not one."""
    tenant, sep, name = ref.strip().rpartition("/")
    tenant = tenant if sep else DEFAULT_TENANT
    if not _LABEL.fullmatch(name) or not _LABEL.fullmatch(tenant):
        return None
    return tenant, name


def service_path(tenant: str, name: str) -> str:
    """Where a peer's ingress serves a service: `/svc/{name}`, or `/t/{tenant}/svc/{name}` for other tenants."""
    return f"/svc/{name}" if tenant == DEFAULT_TENANT else f"/t/{tenant}/svc/{name}"


def services_hash(refs: Iterable[str], labels: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """A short digest of a service list (and its services' labels), for TXT records that cannot hold them."""
    text = ",".join(sorted(set(refs)))
    if labels:
        pairs = (f"{ref}:" + ",".join(f"{k}={v}" for k, v in sorted(labels[ref].items())) for ref in sorted(labels))
        text += "|" + ";".join(pairs)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def interface_hash(addresses: Iterable[str]) -> str:
    """`ih`: a digest of the addresses a node advertises, so peers see a renumbered node at a glance."""
    return hashlib.sha256(",".join(sorted(set(addresses))).encode()).hexdigest()[:8]


def dns_label(text: str, limit: int = 40) -> str:
    """A safe DNS label from a node name: lower case, a-z 0-9 and '-' (node names may hold '.' and '_')."""
    label = _UNSAFE.sub("-", text.lower()).strip("-")[:limit].strip("-")
    return label or "edged"


def instance_label(node: str, tenant: str = DEFAULT_TENANT) -> str:
    """The instance part of this node's DNS-SD names (`{node}._hubmesh._tcp.local.`)."""
    base = node.replace(".", "-")[:50]
    return base if tenant == DEFAULT_TENANT else f"{base}-{tenant}"[:63]


def host_name(node: str) -> str:
    """The mDNS host name of the node's address records; prefixed so it never clashes with the box's own name."""
    return f"hubmesh-{dns_label(node)}.local."


def full_type(service_type: str) -> str:
    """`_thermo._tcp` -> `_thermo._tcp.local.`"""
    return service_type if service_type.endswith(".local.") else service_type.rstrip(".") + ".local."


def txt_size(props: Mapping[str, str]) -> int:
    """Bytes of a TXT record's RDATA: one length byte plus `key=value` per entry."""
    return sum(1 + len(k.encode()) + 1 + len(v.encode()) for k, v in props.items())


def node_txt(
    *,
    node: str,
    fleet: str,
    zone: str,
    vitals: Vitals,
    services: Iterable[str],
    addresses: Iterable[str],
    labels: Mapping[str, Mapping[str, str]] | None = None,
    location: tuple[float, float] | None = None,
) -> dict[str, str]:
    """The TXT keys of `{node}._hubmesh._tcp`. The service list is inlined when it fits, else sent as a hash;
    so is it when services carry labels (`labels`: ref -> labels), which peers fetch with the list.
    `loc` ("lat,lon", edged/locality.py) only when the node has a location."""
    refs = sorted(set(services))
    props = {
        "v": PROTOCOL_VERSION,
        "fleet": fleet,
        "node": node,
        "zone": zone,
        **({"loc": format_loc(location)} if location is not None else {}),
        **vitals.txt(),
        "ih": interface_hash(addresses),
        "svcs": ",".join(refs),
    }
    if labels or txt_size(props) > TXT_LIMIT:
        props["svcs"] = HASH_PREFIX + services_hash(refs, labels)
    return props


def decode_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """zeroconf's properties as text; undecodable bytes are replaced, a key without value is ""."""
    out = {}
    for key, value in properties.items():
        if not isinstance(key, bytes):
            continue
        out[key.decode("utf-8", "replace").lower()] = (value or b"").decode("utf-8", "replace")
    return out


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A peer as its `_hubmesh._tcp` TXT describes it."""

    node: str
    fleet: str
    zone: str
    version: str
    vitals: Vitals
    services: tuple[tuple[str, str], ...] | None  # (tenant, name); None when only a hash was sent
    services_hash: str  # of the refs as sent (or as hashed by the peer)
    ih: str
    location: tuple[float, float] | None = None  # `loc`; None when absent or garbled


def parse_node_txt(props: Mapping[str, str]) -> NodeRecord | None:
    """The peer's record, or None when it lacks `node` or `fleet` (not a HubMesh node we can use)."""
    node, fleet = props.get("node", ""), props.get("fleet", "")
    if not node or not fleet:
        return None
    raw = props.get("svcs", "")
    services: tuple[tuple[str, str], ...] | None
    if raw.startswith(HASH_PREFIX):
        services, digest = None, raw[len(HASH_PREFIX) :]
    else:
        refs = [r for r in raw.split(",") if r.strip()]
        services = parse_refs(refs)
        digest = services_hash(refs)
    return NodeRecord(
        node=node,
        fleet=fleet,
        zone=clean_zone(props.get("zone", "")),  # a zone name as config allows, else none: it ranks `geo` calls
        version=props.get("v", ""),
        vitals=Vitals.from_txt(dict(props)),
        services=services,
        services_hash=digest,
        ih=props.get("ih", ""),
        location=parse_loc(props.get("loc")),
    )


def parse_refs(refs: Iterable[object]) -> tuple[tuple[str, str], ...]:
    """(tenant, name) pairs of the well-formed refs, sorted and without duplicates."""
    out = set()
    for ref in refs:
        if isinstance(ref, str):
            parsed = parse_service_ref(ref)
            if parsed is not None:
                out.add(parsed)
    return tuple(sorted(out))


def parse_labels_doc(obj: object, services: Iterable[tuple[str, str]]) -> tuple[tuple[tuple[str, str], Labels], ...]:
    """The `labels` of a peer's /peer/services answer (ref -> {key: value}): per listed service, its labels
    (untrusted: refs not in `services` and garbled labels are left out; never raises)."""
    if not isinstance(obj, Mapping):
        return ()
    listed = set(services)
    out = []
    for ref, raw in list(obj.items())[: len(listed)]:
        key = parse_service_ref(ref) if isinstance(ref, str) else None
        labels = wire_labels(raw)
        if key in listed and labels:
            out.append((key, labels))
    return tuple(sorted(out))
