"""Zone and geo routing: where endpoints are, and how a level's calls are shared among their localities.

Strategy `geo` (Envoy's zone-aware and locality-weighted routing, with priority-style spillover):

- A **locality** is a zone (`[node] zone`, carried in mDNS TXT `zone=` and in the MQTT registry); the
  endpoints of nodes with no zone form one locality (a locality per node would herd every call onto the
  fastest one). An endpoint of this node (tier "local") is always in the caller's locality: the caller is
  this node's apps.
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
from typing import NamedTuple, Protocol

from . import balancer
from .balancer import LoadState
from .model import Endpoint, PolicySpec
from .spillover import pick, shares

ZONE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # as `[node] zone` (edged/config.py)
MAX_LOC_TEXT = 48  # bytes of a "lat,lon" text worth parsing; longer is garbage from a hostile host
LOC_DECIMALS = 4  # about 11 m: plenty for choosing a site, and a short TXT value
EARTH_RADIUS_KM = 6371.0088
RTT_PER_KM = 1e-5  # seconds of round trip per km: light in fibre (~200,000 km/s), both ways
GEO_ORDERS = ("rtt", "distance")
MAX_WEIGHT = 1000
HERE, PLACED, UNPLACED = 0, 1, 2  # a locality's rank class: the caller's, with a place, with none
HERE_NAME = "(here)"  # the locality of this node's own endpoints when it has no zone (not a valid zone name)


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

    locality: str  # its zone; "" for endpoints with none; HERE_NAME for this node's own when it has no zone
    here: bool  # in the caller's zone, or this node's own endpoint
    km: float | None  # great-circle distance from the caller; None when either location is unknown


def place(ep: Endpoint, origin: Origin) -> Place:
    """Where `ep` is (from its meta: "zone" and "loc", filled by the tier that found it)."""
    if ep.tier == "local":
        return Place(origin.zone or HERE_NAME, True, 0.0)
    meta = dict(ep.meta) if ep.meta else {}
    zone = clean_zone(meta.get("zone"))
    loc = parse_loc(meta.get("loc"))
    km = None if loc is None or origin.location is None else haversine_km(origin.location, loc)
    return Place(zone, bool(zone) and zone == origin.zone, km)


# -- one service's localities, and one call's choice among them --------------------------------------------


class Layout:
    """A service's endpoints grouped by locality, seen from the caller; made once per registry snapshot of
    the service (the ranker caches it). Localities are numbered in name order (ties in the order go by
    name); `base` is each one's place when no round-trip time counts, `static` that order."""

    __slots__ = ("base", "here", "index", "km", "names", "static", "weights")

    def __init__(self, places: Mapping[str, Place], weights: Mapping[str, int], order_by: str, default_rtt: float):
        self.names = sorted({p.locality for p in places.values()})
        number = {name: i for i, name in enumerate(self.names)}
        self.index = {eid: number[p.locality] for eid, p in places.items()}  # endpoint id -> locality number
        self.here = [False] * len(self.names)
        self.km: list[float | None] = [None] * len(self.names)  # the nearest member's distance
        for p in places.values():
            i = number[p.locality]
            self.here[i] = self.here[i] or p.here
            km = self.km[i]
            if p.km is not None and (km is None or p.km < km):
                self.km[i] = p.km
        # Zone weights (`zone_weights`) for the zones listed, not the caller's: its zone always comes first.
        self.weights = [None if self.here[i] else weights.get(name) for i, name in enumerate(self.names)]
        self.base = [self._base(i, order_by, default_rtt) for i in range(len(self.names))]
        self.static = sorted(range(len(self.names)), key=self.base.__getitem__)

    def __repr__(self) -> str:
        return f"<Layout {[self.names[i] for i in self.static]}>"

    def _base(self, i: int, order_by: str, default_rtt: float) -> float:
        """One float that sorts like (HERE | PLACED | UNPLACED, seconds or km): a cheap key per call."""
        km = self.km[i]
        if self.here[i]:
            return HERE * _CLASS
        if km is None:
            return UNPLACED * _CLASS
        return PLACED * _CLASS + ((default_rtt + km * RTT_PER_KM) if order_by == "rtt" else km)

    def by(self, i: int, rtt: Sequence[float] | None) -> str:
        """What placed locality `i`: "zone", "rtt", "distance" or "unknown"."""
        if self.here[i]:
            return "zone"
        if rtt is not None and rtt[i] < _INF:
            return "rtt"
        return "distance" if self.km[i] is not None else "unknown"


_CLASS = 1e12  # a rank class's span in `Layout.base`: beyond any seconds or km
_INF = math.inf


class GeoState(LoadState, Protocol):
    latency_ewma: float | None


class Decision(NamedTuple):
    """One call's choice within a level: the order to try, and what `edged resolve` shows of it."""

    ordered: list[Endpoint]
    costs: dict[str, float]  # endpoint id -> least_loaded cost (explaining only)
    ranked: list[int]  # the level's locality numbers, nearest first
    healthy: list[int]  # per locality number
    total: list[int]
    rtt: list[float] | None  # per locality number: its fastest member's latency EWMA (inf: none)
    shares: list[float]  # per locality number, 0..100 of the level's calls (explaining only)


def choose(
    layout: Layout,
    members: Sequence[Endpoint],
    states: Sequence[GeoState],
    usable: Sequence[Endpoint],
    others: Sequence[Endpoint],
    state: Callable[[str], GeoState],
    policy: PolicySpec,
    now: float,
    rng: random.Random,
    explain: bool = False,
) -> Decision:
    """Order one level's candidates (`members`, with their `states`) for a call. `usable` are the level's
    healthy endpoints (`members` itself, unless in panic) and `others` its stalled and down ones: they count
    in a locality's health. `latency(id)` is an endpoint's latency EWMA, or None. (The call path runs this
    for every call: plain lists indexed by locality number, few calls.)"""
    n = len(layout.names)
    index = layout.index
    default_rtt, overprovisioning = policy.default_rtt, policy.overprovisioning
    healthy = [0] * n
    rtt: list[float] | None = [_INF] * n if policy.geo_order == "rtt" else None
    groups: dict[int, tuple[list[Endpoint], list[GeoState]]] = {}  # locality number -> its candidates
    for ep, st in zip(members, states, strict=True):
        i = index[ep.id]
        group = groups.get(i)
        if group is None:
            groups[i] = ([ep], [st])
        else:
            group[0].append(ep)
            group[1].append(st)
    if len(groups) == 1 and not explain:  # one locality has every candidate: no draw, nothing to rank
        eps, sts = groups.popitem()[1]
        return _new(Decision, (balancer.order(eps, sts, now, default_rtt, rng)[0], {}, [], healthy, [], rtt, []))
    if members is usable:  # not in panic: the candidates are the healthy ones
        for i, (_, sts) in groups.items():
            healthy[i] = len(sts)
            if rtt is not None:
                for st in sts:
                    lat = st.latency_ewma
                    if lat is not None and lat < rtt[i]:
                        rtt[i] = lat
        total = healthy.copy()
        rest: Sequence[Endpoint] = others
    else:
        for ep in usable:
            healthy[index[ep.id]] += 1
        total = [0] * n
        rest = (*usable, *others)
    for ep in rest:
        i = index[ep.id]
        total[i] += 1
        if rtt is not None:
            lat = state(ep.id).latency_ewma
            if lat is not None and lat < rtt[i]:
                rtt[i] = lat
    if rtt is not None and min(rtt) < _INF:
        base, here = layout.base, layout.here
        keys = [base[i] if r == _INF or here[i] else PLACED * _CLASS + r for i, r in enumerate(rtt)]
        ranked = [i for i in sorted(range(n), key=keys.__getitem__) if total[i]]
    else:
        ranked = [i for i in layout.static if total[i]]
    with_calls = [i for i in ranked if i in groups]
    weights = layout.weights
    first = ranked[0] if ranked else 0
    out_shares: list[float] = []
    start = 0
    if len(with_calls) > 1 and (
        explain or weights[first] is not None or healthy[first] * overprovisioning < total[first]
    ):  # else the nearest locality is healthy enough (health 100) to keep every call: nothing to draw
        out_shares = spill(ranked, healthy, total, weights, overprovisioning, n)
        start = pick([out_shares[i] for i in with_calls], rng.random())
    if explain and not out_shares:
        out_shares = spill(ranked, healthy, total, weights, overprovisioning, n)
    ordered: list[Endpoint] = []
    costs: dict[str, float] = {}
    if start:
        with_calls.insert(0, with_calls.pop(start))
    for i in with_calls:
        eps, sts = groups[i]
        if len(eps) == 1:
            ordered.append(eps[0])
            if explain:
                costs[eps[0].id] = balancer.cost(sts[0], eps[0].meta, now, default_rtt)
            continue
        got, values = balancer.order(eps, sts, now, default_rtt, rng)
        ordered += got
        if explain:
            for ep, value in zip(eps, values, strict=True):
                costs[ep.id] = value
    return _new(Decision, (ordered, costs, ranked, healthy, total, rtt, out_shares))


_new = tuple.__new__  # a named tuple's own __new__ is a Python function: this is the call path


class LevelPlaces(NamedTuple):
    """One level's localities, made once per registry snapshot for the call path (`nearest_first`), their
    members as positions in the caller's endpoint list: what their order takes from the layout, worked out
    once. The caller's own localities (a round-trip time never moves them) come first, the others after them
    by round-trip time where measured, else by their place in the layout's base order."""

    groups: tuple[tuple[int, tuple[int, ...]], ...]  # each locality's number and members, by locality number
    single: list[tuple[int, ...]] | None  # the order when the level is one locality (no weights count then)
    by_base: list[tuple[int, ...]] | None  # the order when no round-trip time counts; None: a weighted first
    head: tuple[tuple[int, ...], ...]  # the caller's localities' members (always first)
    away: tuple[tuple[float, tuple[int, ...], bool], ...]  # the others: base order key, members, weighted


def level_places(layout: Layout, ids: Sequence[str], positions: Sequence[int]) -> LevelPlaces:
    """The localities of the level whose members are `ids[k]` for `k` in `positions` (ascending)."""
    members: dict[int, list[int]] = {}
    for k in positions:
        members.setdefault(layout.index[ids[k]], []).append(k)
    groups = tuple((i, tuple(members[i])) for i in sorted(members))
    static = sorted(range(len(groups)), key=lambda g: layout.base[groups[g][0]])
    by_base = None if layout.weights[groups[static[0]][0]] is not None else [groups[g][1] for g in static]
    here = layout.here
    return LevelPlaces(
        groups,
        [groups[0][1]] if len(groups) == 1 else None,
        by_base,
        tuple(m for i, m in groups if here[i]),
        tuple((layout.base[i], m, layout.weights[i] is not None) for i, m in groups if not here[i]),
    )


def nearest_first(places: LevelPlaces, states: Sequence[GeoState], by_rtt: bool) -> list[tuple[int, ...]] | None:
    """`choose`'s order of a level's localities when every member is usable (each is then healthy enough to
    keep every call, so the nearest takes them all and nothing is drawn): their members, nearest locality
    first. `states[k]` is the health of position `k`. None when the nearest is one of `zone_weights`' zones:
    its step is shared by a draw, which `choose` makes. (The caller's localities have the lowest key of
    `choose`'s order, and the others' keys are worked out as it does: the same order.)"""
    if places.single is not None:
        return places.single
    away = places.away
    if not by_rtt or len(away) < 2:  # (with one other locality, its round-trip time cannot move it)
        return places.by_base
    keys = []
    for key, members, _ in away:  # as in `choose`: a locality's fastest member's latency EWMA, if measured
        rtt = _INF
        for k in members:
            lat = states[k].latency_ewma
            if lat is not None and lat < rtt:
                rtt = lat
        keys.append(PLACED * _CLASS + rtt if rtt < _INF else key)
    if len(away) == 2:
        order: Sequence[int] = (1, 0) if keys[1] < keys[0] else (0, 1)  # (the stable sort, by one compare)
    else:
        order = sorted(range(len(away)), key=keys.__getitem__)
    head = places.head
    if not head and away[order[0]][2]:
        return None
    return [*head, *(away[g][1] for g in order)]


def spill(
    ranked: Sequence[int],
    healthy: Sequence[int],
    total: Sequence[int],
    weights: Sequence[int | None],
    overprovisioning: float,
    n: int,
) -> list[float]:
    """Each locality's share (0..100) of the level's calls: Envoy's spillover between the steps of the order
    (`spillover.shares`), and its locality-weighted split (weight x health) within the step of weighted zones.
    Localities of weight 0 get none (failover only)."""
    steps: list[list[int]] = []
    group: list[int] | None = None
    for i in ranked:
        w = weights[i]
        if w is None:
            steps.append([i])
        elif w > 0:
            if group is None:
                group = []
                steps.append(group)
            group.append(i)
    counts = [(sum(healthy[i] for i in step), sum(total[i] for i in step)) for step in steps]
    _, step_shares, _ = shares(counts, overprovisioning)
    out = [0.0] * n
    for step, share in zip(steps, step_shares, strict=True):
        if len(step) == 1:
            out[step[0]] = share
            continue
        parts = [(weights[i] or 0) * min(100.0, overprovisioning * 100.0 * healthy[i] / total[i]) for i in step]
        whole = sum(parts)
        for i, part in zip(step, parts, strict=True):
            out[i] = share * part / whole if whole > 0 else 0.0
    return out


def describe(layout: Layout, d: Decision, i: int) -> str:
    """Where locality `i` stands, for `edged resolve` ("berlin, 504 km, rtt 4.2 ms; locality share 30%")."""
    name = layout.names[i]
    parts = [name or "no zone"]
    if layout.here[i]:
        parts.append("caller's zone")
    km = layout.km[i]
    if km is not None and not (layout.here[i] and km == 0.0):
        parts.append(f"{km:.0f} km")
    if d.rtt is not None and d.rtt[i] < _INF:
        parts.append(f"rtt {d.rtt[i] * 1000:.1f} ms")
    if layout.weights[i] is not None:
        parts.append(f"weight {layout.weights[i]}")
    return ", ".join(parts) + f"; locality share {d.shares[i]:.0f}%"


def explain(layout: Layout, d: Decision, level: str, order_by: str) -> list[dict]:
    """The level's localities as `GET /v1/resolve` shows them, nearest first."""
    return [
        {
            "level": level,
            "locality": layout.names[i],
            "here": layout.here[i],
            "distance_km": None if layout.km[i] is None else round(layout.km[i], 1),  # type: ignore[arg-type]
            "rtt_ms": None if d.rtt is None or d.rtt[i] == _INF else round(d.rtt[i] * 1000, 2),
            "ranked_by": layout.by(i, d.rtt if order_by == "rtt" else None),
            "weight": layout.weights[i],
            "healthy": d.healthy[i],
            "total": d.total[i],
            "share": round(d.shares[i], 1),
        }
        for i in d.ranked
    ]
