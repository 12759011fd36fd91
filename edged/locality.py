"""Zone and geo routing: where endpoints are, and how a level's calls are shared among their localities.

Strategy `geo` (Envoy's zone-aware and locality-weighted routing, with priority-style spillover):

- A **locality** is a zone (`[node] zone`, carried in mDNS TXT `zone=` and in the MQTT registry); a node
  with no zone is a locality of its own. An endpoint of this node (tier "local") is always in the caller's
  locality: the caller is this node's apps.
- Within one level (edged/spillover.py) the localities are **ordered**: the caller's zone first; then by
  round-trip time where measured (each endpoint's latency EWMA from calls and health checks; a locality's
  is its fastest member's), else by an RTT estimated from the great-circle distance between this node's
  `location` and theirs (`default_rtt` + 1 ms per 100 km, light in fibre both ways); `geo_order =
  "distance"` orders by distance alone. A locality with neither a location nor a measurement comes after
  every placed one, never first: a host that says nothing about where it is gets calls last.
- Calls **spill** down that order as Envoy spills between priorities (`spillover.shares`, the same
  formula and `overprovisioning`): the nearest locality keeps every call while at least 1/1.4 of its
  endpoints are healthy, then hands the rest on in proportion to what it lost.
- **Locality weights** (`zone_weights = {zone = weight}`): the listed zones other than the caller's form
  one step of that order, at the place of the nearest of them, and share it as Envoy's locality-weighted
  balancer does, each `weight x health` of the step. Weight 0: never a first choice (failover only).
- Within a locality the call goes to the least loaded endpoint (edged/balancer.py).

Pure: the ranker (edged/policy.py) hands in the endpoints, their health and a random draw.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from . import balancer
from .balancer import LoadState
from .model import Endpoint
from .spillover import pick, shares

ZONE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # as `[node] zone` (edged/config.py)
MAX_LOC_TEXT = 48  # bytes of a "lat,lon" text worth parsing; longer is garbage from a hostile host
LOC_DECIMALS = 4  # about 11 m: plenty for choosing a site, and a short TXT value
EARTH_RADIUS_KM = 6371.0088
RTT_PER_KM = 1e-5  # seconds of round trip per km: light in fibre (~200,000 km/s), both ways
GEO_ORDERS = ("rtt", "distance")
MAX_WEIGHT = 1000
HERE, PLACED, UNPLACED = 0, 1, 2  # a locality's rank class: the caller's, with a place, with none


# -- what a node says about where it is (untrusted when it comes from the network) ---------------------------


def clean_zone(value: object) -> str:
    """A zone name as `[node] zone` allows it, or "" for anything else (absent, too long, odd characters)."""
    return value if isinstance(value, str) and ZONE.fullmatch(value) else ""


def parse_loc(value: object) -> tuple[float, float] | None:
    """(latitude, longitude) from "lat,lon" (or a [lat, lon] pair); None when absent or not a place on Earth."""
    if isinstance(value, str):
        if not value or len(value) > MAX_LOC_TEXT:
            return None
        parts: Sequence[object] = value.split(",")
    elif isinstance(value, (list, tuple)):
        parts = value
    else:
        return None
    if len(parts) != 2 or any(isinstance(p, bool) or not isinstance(p, (str, int, float)) for p in parts):
        return None
    try:
        lat, lon = (float(p) for p in parts)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):  # also refuses NaN and infinities
        return None
    return round(lat, LOC_DECIMALS), round(lon, LOC_DECIMALS)


def format_loc(loc: tuple[float, float] | None) -> str:
    """"lat,lon" as TXT, the registry entries and the node status carry it; "" when unknown."""
    if loc is None:
        return ""
    return ",".join(f"{x:.{LOC_DECIMALS}f}".rstrip("0").rstrip(".") for x in loc)


def where_meta(zone: str, loc: tuple[float, float] | None) -> tuple[tuple[str, str], ...]:
    """A node's zone and location as `Endpoint.meta` items ("zone", "loc"); none when unknown."""
    out: tuple[tuple[str, str], ...] = ()
    if zone:
        out += (("zone", zone),)
    if loc is not None:
        out += (("loc", format_loc(loc)),)
    return out


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (latitude, longitude) points, in km."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


# -- where an endpoint is, seen from the caller -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the caller is: this node's `[node] zone` and `location`."""

    zone: str = ""
    location: tuple[float, float] | None = None


class Place(NamedTuple):
    """An endpoint's locality as seen from the caller."""

    locality: str  # its zone; "node:NAME" for a node with no zone; "" when nothing is known
    here: bool  # in the caller's zone, or this node's own endpoint
    km: float | None  # great-circle distance from the caller; None when either location is unknown


def place(ep: Endpoint, origin: Origin) -> Place:
    """Where `ep` is (from its meta: "zone", "loc", "node", filled by the tier that found it)."""
    if ep.tier == "local":
        return Place(origin.zone or "node:", True, 0.0)
    meta = dict(ep.meta) if ep.meta else {}
    zone = clean_zone(meta.get("zone"))
    node = meta.get("node", "")
    locality = zone or (f"node:{node}" if node else "")
    loc = parse_loc(meta.get("loc"))
    km = None if loc is None or origin.location is None else haversine_km(origin.location, loc)
    return Place(locality, bool(zone) and zone == origin.zone, km)


# -- one level's localities ---------------------------------------------------------------------------------


class Locality:
    """A locality of one level while a plan is made; `share` (0..100) is its part of the level's calls."""

    __slots__ = ("by", "cls", "healthy", "here", "key", "km", "members", "name", "rtt", "share", "states", "total")
    __slots__ += ("weight",)

    def __init__(self, name: str, here: bool) -> None:
        self.name = name
        self.here = here
        self.km: float | None = None  # nearest member's distance
        self.rtt: float | None = None  # fastest member's latency EWMA (seconds)
        self.healthy = 0
        self.total = 0
        self.members: list[Endpoint] = []  # candidates for the call, in the order given
        self.states: list[LoadState] = []
        self.weight: int | None = None  # from `zone_weights`, when listed
        self.cls = UNPLACED
        self.by = "unknown"  # what placed it: "zone", "rtt", "distance" or "unknown"
        self.key = math.inf
        self.share = 0.0

    def __repr__(self) -> str:
        return f"<Locality {self.name!r} {self.healthy}/{self.total} key={self.key:.4f} share={self.share:.1f}>"


def gather(
    everyone: Sequence[Endpoint],
    usable: frozenset[str] | set[str],
    places: Mapping[str, Place],
    latency: Callable[[str], float | None],
    members: Sequence[Endpoint],
    states: Sequence[LoadState],
) -> dict[str, Locality]:
    """The level's localities: `everyone` in the level counts (healthy when in `usable`), `members` (with
    their `states`) are the candidates for this call. `latency(id)` is an endpoint's measured EWMA or None."""
    out: dict[str, Locality] = {}
    for ep in everyone:
        p = places[ep.id]
        loc = out.get(p.locality)
        if loc is None:
            loc = out[p.locality] = Locality(p.locality, p.here)
        loc.total += 1
        if ep.id in usable:
            loc.healthy += 1
        if p.km is not None and (loc.km is None or p.km < loc.km):
            loc.km = p.km
        rtt = latency(ep.id)
        if rtt is not None and (loc.rtt is None or rtt < loc.rtt):
            loc.rtt = rtt
    for ep, st in zip(members, states, strict=True):
        loc = out[places[ep.id].locality]
        loc.members.append(ep)
        loc.states.append(st)
    return out


def rank(localities: Sequence[Locality], order_by: str, default_rtt: float) -> list[Locality]:
    """The caller's locality first, then placed ones nearest first (see the module doc), then the rest."""
    for loc in localities:
        if loc.here:
            loc.cls, loc.key, loc.by = HERE, 0.0, "zone"
        elif order_by == "rtt" and loc.rtt is not None:
            loc.cls, loc.key, loc.by = PLACED, loc.rtt, "rtt"
        elif loc.km is not None:
            loc.cls, loc.by = PLACED, "distance"
            loc.key = (default_rtt + loc.km * RTT_PER_KM) if order_by == "rtt" else loc.km
        else:
            loc.cls, loc.key, loc.by = UNPLACED, math.inf, "unknown"
    return sorted(localities, key=lambda loc: (loc.cls, loc.key, loc.name))


def steps(ordered: Sequence[Locality], weights: Mapping[str, int]) -> list[list[Locality]]:
    """The spill order as steps: each locality alone, except the weighted zones (not the caller's), which
    form one step where the nearest of them stands. Localities of weight 0 are left out (failover only)."""
    out: list[list[Locality]] = []
    group: list[Locality] | None = None
    for loc in ordered:
        w = None if loc.here else weights.get(loc.name)
        loc.weight = w
        if w is None:
            out.append([loc])
        elif w > 0:
            if group is None:
                group = []
                out.append(group)
            group.append(loc)
    return out


def share_out(step_list: Sequence[Sequence[Locality]], overprovisioning: float) -> float:
    """Set each locality's `share` (0..100) of the level's calls: Envoy's spillover between steps, and its
    locality-weighted split (weight x health) within a step. Returns the steps' total health (0..100)."""
    counts = [(sum(loc.healthy for loc in step), sum(loc.total for loc in step)) for step in step_list]
    _, step_shares, total = shares(counts, overprovisioning)
    for step, share in zip(step_list, step_shares, strict=True):
        if len(step) == 1:
            step[0].share = share
            continue
        parts = [(loc.weight or 0) * min(100.0, overprovisioning * 100.0 * loc.healthy / loc.total) for loc in step]
        whole = sum(parts)
        for loc, part in zip(step, parts, strict=True):
            loc.share = share * part / whole if whole > 0 else 0.0
    return total


def order(
    ordered: Sequence[Locality],
    now: float,
    default_rtt: float,
    rng: random.Random,
) -> tuple[list[Endpoint], dict[str, float]]:
    """The call's order: a locality drawn by the shares (least loaded first within it), then the other
    localities in rank order, each least loaded first; and each candidate's least_loaded cost."""
    with_calls = [loc for loc in ordered if loc.members]
    start = 0
    if len(with_calls) > 1:
        start = pick([loc.share for loc in with_calls], rng.random())
    out: list[Endpoint] = []
    costs: dict[str, float] = {}
    for i in (start, *(i for i in range(len(with_calls)) if i != start)):
        loc = with_calls[i]
        eps, values = balancer.order(loc.members, loc.states, now, default_rtt, rng)
        out += eps
        for ep, value in zip(loc.members, values, strict=True):
            costs[ep.id] = value
    return out, costs


def describe(loc: Locality) -> str:
    """Where a locality stands, for `edged resolve` ("zone b, 120 km, rtt 4.2 ms")."""
    name = loc.name if not loc.name.startswith("node:") else f"{loc.name[5:] or 'this node'} (no zone)"
    parts = [name or "unknown place"]
    if loc.here:
        parts.append("caller's zone")
    if loc.km is not None and not (loc.here and loc.km == 0.0):
        parts.append(f"{loc.km:.0f} km")
    if loc.rtt is not None:
        parts.append(f"rtt {loc.rtt * 1000:.1f} ms")
    if loc.weight is not None:
        parts.append(f"weight {loc.weight}")
    return ", ".join(parts)


def explain(loc: Locality, level: str) -> dict:
    """A locality as `GET /v1/resolve` shows it."""
    return {
        "level": level,
        "locality": loc.name,
        "here": loc.here,
        "distance_km": None if loc.km is None else round(loc.km, 1),
        "rtt_ms": None if loc.rtt is None else round(loc.rtt * 1000, 2),
        "ranked_by": loc.by,
        "weight": loc.weight,
        "healthy": loc.healthy,
        "total": loc.total,
        "share": round(loc.share, 1),
    }
