"""Policy: the service's rule turns its endpoints and their health into an ordered plan, with a reason per rank.

Pure over its inputs (endpoints, a health view, the time, a random source), so `edged resolve` can show
exactly what the router would do, and tests can check every strategy without I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from operator import itemgetter, mul
from typing import NamedTuple, Protocol

from . import balancer, locality, predictive
from .balancer import PeakEwma
from .balancer import vital as _vital
from .model import Endpoint, PolicySpec, Service
from .registry import tier_rank
from .spillover import LevelShare, level_name, pick, shares

# Strategies this version implements; the others named in the contract fall back to `priority`, visibly.
IMPLEMENTED = ("priority", "round_robin", "weighted", "least_loaded", "predictive", "geo")  # "latency" = least_loaded
MAX_LAYOUTS = 4096  # services whose level layout the ranker keeps
MAX_SUBSETS = 16  # per service: subsets of its endpoints (tiers off, a caller's tiers) with a roster
QUICK = ("least_loaded", "latency", "predictive", "geo")  # strategies decided on a roster (Ranker._quick)
STALL_FLOOR = 0.025  # seconds: below this, a slow answer is not yet a sign of a frozen endpoint
STALL_FACTOR = 8.0  # an endpoint is "stalled" when nothing came back for this many typical latencies


# Vitals of an endpoint's node travel in `Endpoint.meta` (filled by the edge tier from mDNS TXT):
# "cpu" busy %, "bat" battery %, "link" link quality %, each "0".."100" or absent/"" when unknown,
# and "power" = "battery" | "mains" | "" (unknown counts as mains: most edge boxes have no battery).
ON_BATTERY_FACTOR = 0.5  # on battery, even a full one, a node gets half the share of an equal node on mains
MIN_FACTOR = 0.05  # a busy or badly linked node keeps a trickle of calls, so that it is seen to recover


def node_score(meta: tuple[tuple[str, str], ...]) -> float:
    """0..1: how much of its weight an endpoint keeps, by its node's CPU load, battery and link quality."""
    if not meta:
        return 1.0
    m = dict(meta)
    score = 1.0
    cpu = _vital(m, "cpu")
    if cpu is not None:
        # At most half for a busy CPU: the calls we send are part of its load, and a node whose weight fell
        # with it (to 1/20, as this was) loses its calls, idles, regains them: the simulator's swing.
        score /= 1.0 + cpu
    if m.get("power") == "battery":
        bat = _vital(m, "bat")
        score *= ON_BATTERY_FACTOR * (1.0 if bat is None else max(bat, MIN_FACTOR / 10))
    link = _vital(m, "link")
    if link is not None:
        score *= max(MIN_FACTOR, link)
    return score


def effective_weight(ep: Endpoint) -> float:
    """The weight the `weighted` strategy uses: the declared weight scaled by the node's score."""
    return max(ep.weight, 1) * node_score(ep.meta)


def vitals_refusal(ep: Endpoint, policy: PolicySpec) -> str | None:
    """Why the policy's power rules exclude this endpoint (`on_power`, `battery_min`), or None."""
    if not ep.meta or not (policy.on_power or policy.battery_min is not None):
        return None
    m = dict(ep.meta)
    if m.get("power") != "battery":
        return None
    if policy.on_power:
        return "node on battery (policy on_power)"
    bat = _vital(m, "bat")
    if policy.battery_min is not None and bat is not None and bat * 100 < policy.battery_min:
        return f"battery {bat * 100:.0f}% < battery_min {policy.battery_min}%"
    return None


class HealthState(Protocol):
    latency_ewma: float | None
    inflight: int
    peak: PeakEwma
    active_ok: bool  # `available(now)` is `active_ok and now >= ejected_until` (the call path reads them inline)
    ejected_until: float
    busy_since: float  # when calls last began while none were in flight (`is_stalled`)
    last_response_at: float  # when it last answered (`is_stalled`)
    sent_sum: float  # predictive: the send times of its tries in flight, summed
    model: predictive.Model | None  # predictive: its model

    def available(self, now: float) -> bool: ...
    def reason(self, now: float) -> str: ...


class HealthView(Protocol):
    def state(self, endpoint_id: str) -> HealthState: ...
    def states_of(self, ids: tuple[str, ...]) -> Sequence[HealthState]: ...  # `state` of each (one call)

    # Never True when calls began or an answer came less than `threshold` ago (`is_stalled` does not ask then).
    def stalled(self, endpoint_id: str, now: float, threshold: float) -> bool: ...


class Choice(NamedTuple):
    """One endpoint in the plan, in the order the router will try them. (A named tuple, not a frozen
    dataclass: the call path makes one per endpoint per call, and a tuple is made in a third of the time.)"""

    endpoint: Endpoint
    usable: bool  # healthy, not ejected and not stalled: a first-class choice
    reason: str
    level: str = ""


class Plan(NamedTuple):
    strategy: str
    choices: tuple[Choice, ...]
    note: str = ""
    levels: tuple[LevelShare, ...] = ()  # filled when explaining
    panic: bool = False  # too few healthy endpoints: health verdicts were not believed (spillover.py)
    drawn: bool = False  # a random draw chose the starting level (spillover): the next call may start elsewhere
    localities: tuple[dict, ...] = ()  # geo, when explaining: each level's localities (locality.explain)

    def explain(self) -> list[dict]:
        """The plan as data for `GET /v1/resolve/{name}` and `edged resolve`."""
        return [
            {
                "rank": i + 1,
                "endpoint": c.endpoint.id,
                "tier": c.endpoint.tier,
                "url": c.endpoint.url,
                "priority": c.endpoint.priority,
                "weight": c.endpoint.weight,
                "level": c.level,
                "usable": c.usable,
                "reason": c.reason,
            }
            for i, c in enumerate(self.choices)
        ]

    def explain_localities(self) -> list[dict]:
        """`geo`: each level's localities, their place, health and share of the level's calls."""
        return list(self.localities)

    def explain_levels(self) -> list[dict]:
        """Each level's health and share of calls, for `edged resolve`."""
        return [
            {
                "level": lv.name,
                "healthy": lv.healthy,
                "total": lv.total,
                "health": round(lv.health, 1),
                "share": round(lv.share, 1),
            }
            for lv in self.levels
        ]


def stall_threshold(latency_ewma: float | None, per_try_timeout: float) -> float:
    """How long an endpoint may hold calls with no answer before new calls go elsewhere first."""
    cap = per_try_timeout / 2
    if latency_ewma is None:
        return cap
    return max(STALL_FLOOR, min(cap, STALL_FACTOR * latency_ewma))


def is_stalled(st: HealthState, endpoint_id: str, now: float, health: HealthView, per_try_timeout: float) -> bool:
    """Whether an endpoint with calls in flight is stalled: `health.stalled` at its `stall_threshold`, asked
    (about 6k instructions) only when it may be. It is not when calls began on it, or it answered, less than
    the threshold ago (`stalled` only takes the event loop's lag since then off that age): most calls, told
    apart by a compare, and by a second one before the threshold is worked out."""
    since, answered = st.busy_since, st.last_response_at
    age = now - (since if since >= answered else answered)
    if age < STALL_FLOOR and age < per_try_timeout / 2:  # below any `stall_threshold`
        return False
    threshold = stall_threshold(st.latency_ewma, per_try_timeout)
    return age >= threshold and health.stalled(endpoint_id, now, threshold)


def _usable_costs(
    ids: tuple[str, ...], states: Sequence[HealthState], health: HealthView, now: float, policy: PolicySpec
) -> tuple[list[float], list[int], list[int]]:
    """least_loaded's cost of each endpoint `ids[i]` (`balancer.cost`, inlined, without the vitals factor), and
    the positions of those that are down (not available) and stalled; `states[i]` is its health. One pass,
    availability inlined, as the call path's decision reads little else (policybench.py)."""
    exp, decay, default_rtt, per_try = math.exp, balancer.DECAY, policy.default_rtt, policy.per_try_timeout
    out: list[float] = []
    add = out.append
    down: list[int] = []
    stalled: list[int] = []
    for st in states:
        if not (st.active_ok and now >= st.ejected_until):  # not `available(now)`
            down.append(len(out))
            add(0.0)
            continue
        pending = st.inflight
        peak = st.peak
        if pending:
            if is_stalled(st, ids[len(out)], now, health, per_try):
                stalled.append(len(out))
            if peak.stamp < 0.0:
                add(balancer.PENALTY + pending)
            else:
                add(peak.value * exp((peak.stamp - now) / decay) * (pending + 1))
        elif peak.stamp < 0.0:
            add(default_rtt)
        else:
            add(peak.value * exp((peak.stamp - now) / decay))  # (x (0 + 1) changes nothing)
    return out, down, stalled


def _verdicts_below(counts: Sequence[tuple[int, int]], policy: PolicySpec) -> float | None:
    """The levels' total health (0..100) by health verdicts alone, from each level's (endpoints not down,
    endpoints) counts, when it is below `panic_threshold` (panic); None otherwise. A stalled endpoint counts
    as healthy here: a call in flight for long is no verdict, and panic would try the down ones among the
    first (they are only last resorts otherwise)."""
    total = shares(counts, policy.overprovisioning)[2]
    return total if total < policy.panic_threshold else None


class _Level:
    """The endpoints of one priority level while a plan is made."""

    __slots__ = ("down", "first", "stalled", "states", "total", "usable")

    def __init__(self, first: Endpoint) -> None:
        self.first = first  # names the level
        self.total = 0
        self.usable: list[Endpoint] = []
        self.states: list[HealthState] = []  # the usable endpoints' health, in the same order
        self.stalled: list[Endpoint] = []
        self.down: list[tuple[Endpoint, str]] = []


class _Roster:
    """A service's endpoints (all, or the subset a call may use) made ready for the call path's decision, once
    per registry snapshot of the service (services are immutable): what does not change between calls (levels,
    localities, vitals factors, the plan's choices) is not worked out per call. `quick`: the strategy has a
    decision in `Ranker._quick` (the common case of every endpoint usable)."""

    __slots__ = (
        "choices",
        "eps",
        "eps_list",
        "factored",
        "factors",
        "ids",
        "last",
        "level_eps",
        "levels",
        "places",
        "predictive",
        "quick",
        "rank",
        "strategy",
        "subsets",
    )

    def __init__(self, eps: tuple[Endpoint, ...], keys: dict[str, int], strategy: str, quick: bool) -> None:
        self.strategy = strategy
        self.eps = eps
        self.eps_list = list(eps)  # (the router hands a list: compared as one, item by item by identity)
        self.ids = tuple(ep.id for ep in eps)
        self.quick = quick and bool(eps)
        self.factors = [balancer.vitals_factor(ep.meta) if ep.meta else 1.0 for ep in eps]
        self.factored = any(f != 1.0 for f in self.factors)
        self.choices = [Choice(ep, True, "", "") for ep in eps]  # immutable: shared by every plan
        self.last = [Choice(ep, False, "", "") for ep in eps]  # as a last resort (stalled or down)
        self.rank: list[int] = []  # each position's place in priority order (`_priority_key`)
        levels: dict[int, list[int]] = {}
        for k, ep in enumerate(eps):
            levels.setdefault(keys[ep.id], []).append(k)
        self.levels = [tuple(levels[key]) for key in sorted(levels)]  # positions, in level order
        self.level_eps = [tuple(eps[k] for k in level) for level in self.levels]
        self.places: list[locality.LevelPlaces] = []  # geo: each level's localities
        self.subsets: dict[tuple[int, ...], _Roster] = {}  # (the full roster's) rosters of some endpoints
        self.predictive: _PredictiveRoster | None = None  # predictive: what its costs take from the endpoints


class _PredictiveRoster:
    """What `predictive` weighs per call of a roster's endpoints that does not change between calls: the
    positions whose cost is drawn (those of levels of more than one endpoint: a level of one has no order to
    draw), in level order, with their nodes' vitals factors (`predictive.vitals_factors`, None: no vitals) and
    whether they are cloud endpoints (`cloud_max_share`); and each level with where its positions start among
    the drawn ones (-1: a level of one)."""

    __slots__ = ("backup", "drawn", "every", "factors", "spans")

    def __init__(self, roster: _Roster) -> None:
        eps = roster.eps
        drawn: list[int] = []
        self.spans: list[tuple[tuple[int, ...], int]] = []
        for level in roster.levels:
            self.spans.append((level, len(drawn) if len(level) > 1 else -1))
            if len(level) > 1:
                drawn += level
        self.drawn = tuple(drawn)
        self.every = drawn == list(range(len(eps)))  # (the health of the roster's endpoints as it comes)
        self.factors = [predictive.vitals_factors(eps[k].meta) if eps[k].meta else None for k in drawn]
        self.backup = [eps[k].tier == "cloud" for k in drawn]


class Ranker:
    """Applies strategies. Holds only what strategies need between calls (round-robin turn, randomness)."""

    def __init__(self, rng: random.Random | None = None, origin: locality.Origin | None = None) -> None:
        self._rng = rng or random.Random()
        self.origin = origin or locality.Origin()  # where the caller is, for `geo`
        self._places: dict[tuple[str, str], tuple[Service, locality.Layout]] = {}  # geo: localities
        self._turns: dict[tuple, int] = {}
        self._layouts: dict[tuple[str, str], tuple[Service, dict[str, int], bool]] = {}
        self._cloud: dict[tuple[str, str], predictive.CloudShare] = {}  # predictive's cloud_max_share
        self._rosters: dict[tuple[str, str], tuple[Service, _Roster]] = {}

    def plan(
        self,
        service: Service,
        health: HealthView,
        now: float,
        endpoints: Sequence[Endpoint] | None = None,
        *,
        explain: bool = True,
    ) -> Plan:
        """Order `endpoints` (default: all of the service's) for one call.

        Endpoints form priority levels (edged/spillover.py); the call starts in a level drawn by the levels'
        shares, then goes on to the others in level order. Within a level, usable endpoints come in the
        strategy's order. Then stalled ones (they may still answer); then unhealthy, ejected or refused ones
        as a last resort, so that a wrong health verdict never turns into a failed call while anything might
        still answer. `explain=False` (the call path) skips the reasons.
        """
        if not explain and service.spec.policy.strategy in QUICK:  # the call path: the common case, decided
            roster = self._roster(service, endpoints)  # on what is prepared once per registry snapshot
            if roster is not None and roster.quick:
                quick = self._quick(service, roster, health, now)
                if quick is not None:
                    return quick
        spec = service.spec
        policy = spec.policy
        eps = service.endpoints if endpoints is None else endpoints
        strategy = policy.strategy
        note = ""
        if strategy == "latency":
            strategy = "least_loaded"
        elif strategy not in IMPLEMENTED:
            note = f"strategy {strategy!r} is not available in this version; using 'priority'"
            strategy = "priority"
        # The call path runs this for every call: one pass, attribute reads, few calls (see policybench.py).
        check_power = policy.on_power or policy.battery_min is not None
        state = health.state
        keys, single = self._level_keys(service)
        groups: dict[int, _Level] = {}
        refused: list[tuple[Endpoint, str]] = []
        if single and eps:  # one level (most services): no key per endpoint
            lv = groups[0] = _Level(eps[0])
            lv.total = len(eps)
        for ep in eps:
            if not single:
                key = keys.get(ep.id)
                if key is None:  # not one of the service's own endpoints (a caller's list): computed here
                    key = _level_key(ep, policy.levels, _tier_ranks(spec.endpoint_types))
                lv = groups.get(key)
                if lv is None:
                    lv = groups[key] = _Level(ep)
                lv.total += 1
            if check_power and ep.meta:
                refusal = vitals_refusal(ep, policy)
                if refusal is not None:
                    refused.append((ep, refusal))
                    continue
            st = state(ep.id)
            if not st.available(now) and not (strategy == "predictive" and predictive.live(st, now)):
                lv.down.append((ep, st.reason(now) if explain else ""))
            elif st.inflight > 0 and is_stalled(st, ep.id, now, health, policy.per_try_timeout):
                lv.stalled.append(ep)
            else:
                lv.usable.append(ep)
                lv.states.append(st)
        if not groups:
            return Plan(strategy, (), note)
        if len(groups) == 1:
            levels = list(groups.values())
            lv = levels[0]
            healths = [min(100.0, policy.overprovisioning * 100.0 * len(lv.usable) / lv.total)]
            share_list = [100.0]
            total = healths[0]
            start = 0
            drawn = False
        else:
            levels = [groups[k] for k in sorted(groups)]
            lv = levels[0]
            if explain or policy.overprovisioning * len(lv.usable) < lv.total:
                healths, share_list, total = shares(
                    [(len(lv.usable), lv.total) for lv in levels], policy.overprovisioning
                )
                start = pick(share_list, self._rng.random())
                drawn = sum(1 for share in share_list if share > 0.0) > 1
            else:  # the first level is healthy enough to take every call (the common case): no draw
                total, start, drawn = 100.0, 0, False
        panic = False
        if any(lv.down for lv in levels):  # (refused ones count as not healthy, as in the shares)
            below = _verdicts_below([(len(lv.usable) + len(lv.stalled), lv.total) for lv in levels], policy)
            if below is not None:
                panic, total = True, below
        choices: list[Choice] = []
        geo_rows: list[dict] | None = [] if explain and strategy == "geo" else None
        if not explain and not panic and (strategy == "least_loaded" or strategy == "predictive"):
            # The call path's common case, without the general loop's bookkeeping (scripts/policybench.py).
            default_rtt, rng, add = policy.default_rtt, self._rng, choices.append
            capped = strategy == "predictive" and self._cloud_capped(service, now)
            for i in range(len(levels)) if not start else (start, *(j for j in range(len(levels)) if j != start)):
                members = levels[i].usable  # the start level first, then the others in level order
                if len(members) > 1:
                    if strategy == "least_loaded":
                        members = balancer.order(members, levels[i].states, now, default_rtt, rng)[0]
                    else:
                        members = predictive.order(
                            members, levels[i].states, now, default_rtt, policy.per_try_timeout, rng, capped
                        )[0]
                for ep in members:
                    add(_new(Choice, (ep, True, "", "")))
            levels_done = True
        else:
            levels_done = False
        others = (start, *(i for i in range(len(levels)) if i != start)) if len(levels) > 1 else (0,)
        for i in () if levels_done else others:
            lv = levels[i]
            name = level_name(spec, lv.first) if explain else ""
            members, states = lv.usable, lv.states
            if panic:
                members = [*lv.usable, *lv.stalled, *(ep for ep, _ in lv.down)]
                states = [state(ep.id) for ep in members]
            if not members:
                continue
            if strategy == "geo":
                ordered, why = self._geo(service, lv, members, states, now, health, geo_rows, name)
            else:
                ordered, why = self._order(strategy, service, members, states, now, (spec.key, i), explain)
            if not panic:
                if explain:
                    choices += [Choice(ep, True, why(ep), name) for ep in ordered]
                else:  # tuple.__new__ directly: a named tuple's own __new__ is a Python function
                    choices += [_new(Choice, (ep, True, "", "")) for ep in ordered]
                continue
            usable = set(lv.usable)
            for ep in ordered:
                choices.append(Choice(ep, ep in usable, f"panic: {why(ep)}" if explain else "", name))
        if not panic:
            for lv in levels:
                if lv.stalled or lv.down:
                    break
            else:
                lv = None
            if lv is not None:  # something is stalled or down: it follows, as a last resort
                stalled = [ep for lv in levels for ep in lv.stalled]
                if stalled:
                    reason = "stalled: calls in flight, no answer lately" if explain else ""
                    choices += [Choice(ep, False, reason) for ep in _by_priority(service, stalled)]
                refused += [item for lv in levels for item in lv.down]
        if refused:
            refused.sort(key=lambda item: _priority_key(service, item[0]))
            choices += [Choice(ep, False, f"last resort: {reason}" if explain else "") for ep, reason in refused]
        if not explain:
            if strategy == "predictive" and choices:  # cloud_max_share counts the calls' first choices
                self._cloud_share(service).count(now, choices[0].endpoint.tier == "cloud")
            return _new(Plan, (strategy, tuple(choices), note, (), panic, drawn, ()))
        if panic:
            note = (note + "; " if note else "") + (
                f"panic: {total:.0f}% healthy < panic_threshold {policy.panic_threshold}%, health is not believed"
            )
        shown = tuple(
            LevelShare(level_name(spec, lv.first), len(lv.usable), lv.total, healths[i], share_list[i])
            for i, lv in enumerate(levels)
        )
        return Plan(strategy, tuple(choices), note, shown, panic, drawn, tuple(geo_rows or ()))

    def _level_keys(self, service: Service) -> tuple[dict[str, int], bool]:
        """Endpoint id -> level key, and whether they are all one level; made once per registry snapshot of the
        service (services are immutable). Plans are made for the service's own endpoints (or some of them)."""
        layout = self._layouts.get(service.spec.key)
        if layout is None or layout[0] is not service:
            if len(self._layouts) >= MAX_LAYOUTS:
                self._layouts.clear()  # services come and go: start over rather than keep the gone ones
            policy = service.spec.policy
            ranks = _tier_ranks(service.spec.endpoint_types)
            keys = {ep.id: _level_key(ep, policy.levels, ranks) for ep in service.endpoints}
            layout = (service, keys, len(set(keys.values())) <= 1)
            self._layouts[service.spec.key] = layout
        return layout[1], layout[2]

    def _geo(
        self,
        service: Service,
        lv: _Level,
        members: list[Endpoint],
        states: list[HealthState],
        now: float,
        health: HealthView,
        rows: list[dict] | None,
        level: str,
    ) -> tuple[list[Endpoint], Callable[[Endpoint], str]]:
        """`geo` within one level (edged/locality.py): the caller's zone, then nearer localities first, with
        spillover by their health and `zone_weights`; least loaded within a locality."""
        policy = service.spec.policy
        layout = self._layout_of(service)
        others = [*lv.stalled, *(ep for ep, _ in lv.down)] if lv.stalled or lv.down else ()
        state = health.state
        try:
            decision = locality.choose(
                layout, members, states, lv.usable, others, state, policy, now, self._rng, rows is not None
            )
        except KeyError:  # an endpoint that is not one of the service's own (a caller's list): placed here
            places = {ep.id: locality.place(ep, self.origin) for ep in (*lv.usable, *others)}
            layout = locality.Layout(places, dict(policy.zone_weights), policy.geo_order, policy.default_rtt)
            decision = locality.choose(
                layout, members, states, lv.usable, others, state, policy, now, self._rng, rows is not None
            )
        if rows is None:
            return decision.ordered, _priority_why
        rows += locality.explain(layout, decision, level, policy.geo_order)

        def why(ep: Endpoint) -> str:
            where = locality.describe(layout, decision, layout.index[ep.id])
            return f"geo: {where}; {balancer.why(ep, state(ep.id), now, decision.costs[ep.id])}"

        return decision.ordered, why

    def _layout_of(self, service: Service) -> locality.Layout:
        """The service's localities as seen from here, made once per registry snapshot (like `_level_keys`)."""
        known = self._places.get(service.spec.key)
        if known is None or known[0] is not service:
            if len(self._places) >= MAX_LAYOUTS:
                self._places.clear()
            policy = service.spec.policy
            places = {ep.id: locality.place(ep, self.origin) for ep in service.endpoints}
            layout = locality.Layout(places, dict(policy.zone_weights), policy.geo_order, policy.default_rtt)
            known = self._places[service.spec.key] = (service, layout)
        return known[1]

    def _roster(self, service: Service, endpoints: Sequence[Endpoint] | None) -> _Roster | None:
        """The roster of `endpoints` (default: all of the service's), made once per registry snapshot of the
        service; None when they are not all the service's own (a caller's list) or too many subsets were seen."""
        known = self._rosters.get(service.spec.key)
        if known is None or known[0] is not service:
            if len(self._rosters) >= MAX_LAYOUTS:
                self._rosters.clear()
            known = self._rosters[service.spec.key] = (service, self._new_roster(service, service.endpoints))
        roster = known[1]
        if endpoints is None or endpoints == roster.eps_list or endpoints == roster.eps:
            return roster
        key = tuple(map(id, endpoints))  # (the service's endpoints live as long as the roster: ids stay theirs)
        sub = roster.subsets.get(key)
        if sub is None:
            own = {id(ep) for ep in service.endpoints}
            if len(roster.subsets) >= MAX_SUBSETS or not all(k in own for k in key):
                return None
            sub = roster.subsets[key] = self._new_roster(service, tuple(endpoints))
        return sub

    def _new_roster(self, service: Service, eps: tuple[Endpoint, ...]) -> _Roster:
        policy = service.spec.policy
        strategy = "least_loaded" if policy.strategy == "latency" else policy.strategy
        quick = (
            strategy in QUICK
            and not (policy.on_power or policy.battery_min is not None)  # (refusals: the general loop)
            and policy.overprovisioning >= 1.0  # (else a level with every endpoint usable may spill)
        )
        roster = _Roster(eps, self._level_keys(service)[0], strategy, quick)
        by_priority = sorted(range(len(eps)), key=lambda k: _priority_key(service, eps[k]))
        roster.rank = [0] * len(eps)
        for place, k in enumerate(by_priority):
            roster.rank[k] = place
        if strategy == "geo":
            layout = self._layout_of(service)
            roster.places = [locality.level_places(layout, roster.ids, level) for level in roster.levels]
        elif strategy == "predictive" and roster.quick:
            roster.predictive = _PredictiveRoster(roster)
        return roster

    def _quick(self, service: Service, roster: _Roster, health: HealthView, now: float) -> Plan | None:
        """The call path's plan for least_loaded, predictive or geo when every endpoint is usable (the common
        case: the first level takes every call, no shares or last resorts are to be worked out, and the
        nearest locality keeps every call), and for least_loaded out of panic (`_quick_degraded`); None
        otherwise (`plan` does it all). The same plan, draw for draw, as `plan`'s general loop (tests and
        `policybench.py --same-as`); per call, only each endpoint's health and load are read."""
        strategy = roster.strategy
        if strategy == "predictive":
            return self._quick_predictive(service, roster, health, now)
        policy = service.spec.policy
        states = health.states_of(roster.ids)
        values, down, stalled = _usable_costs(roster.ids, states, health, now, policy)
        if roster.factored:  # (x 1.0 changes no cost: only nodes with vitals are worth the pass)
            values = list(map(mul, values, roster.factors))
        if down or stalled:  # geo weighs its localities' health: the general loop
            return self._quick_degraded(service, roster, values, down, stalled) if strategy == "least_loaded" else None
        rng = self._rng
        if strategy == "least_loaded":
            if len(roster.levels) == 1:
                order = balancer.ranked(roster.levels[0], values, rng)
            else:
                order = []
                for level in roster.levels:
                    order += balancer.ranked(level, values, rng)
        else:  # geo: each level's localities nearest first, least loaded within each
            by_rtt = policy.geo_order == "rtt"
            steps = []
            for places in roster.places:
                nearest = locality.nearest_first(places, states, by_rtt)
                if nearest is None:
                    return None
                steps += nearest
            order = []
            for members in steps:  # (a locality of one has its order: no draw)
                order += members if len(members) == 1 else balancer.ranked(members, values, rng)
        choices = itemgetter(*order)(roster.choices) if len(order) > 1 else (roster.choices[order[0]],)
        return _new(Plan, (strategy, choices, "", (), False, False, ()))

    def _quick_degraded(
        self, service: Service, roster: _Roster, values: list[float], down: list[int], stalled: list[int]
    ) -> Plan | None:
        """`_quick` for least_loaded when some endpoints are down or stalled: the levels' shares (a draw when
        the first cannot take every call), each level's usable endpoints in its order, then the stalled and
        the down ones by priority as last resorts; None in panic (the general loop)."""
        policy = service.spec.policy
        op = policy.overprovisioning
        if down:  # panic is decided on the health verdicts alone (`_verdicts_below`)
            gone = set(down)
            counts = [(sum(1 for k in level if k not in gone), len(level)) for level in roster.levels]
            if _verdicts_below(counts, policy) is not None:
                return None
        bad = {*down, *stalled}
        levels = [[k for k in level if k not in bad] for level in roster.levels]
        share_list: list[float] = []
        if len(levels) > 1 and op * len(levels[0]) < len(roster.levels[0]):
            counts = [(len(usable), len(level)) for usable, level in zip(levels, roster.levels, strict=True)]
            share_list = shares(counts, op)[1]
        rng = self._rng
        start = pick(share_list, rng.random()) if share_list else 0
        order: list[int] = []
        for i in (start, *(j for j in range(len(levels)) if j != start)) if start else range(len(levels)):
            order += balancer.ranked(levels[i], values, rng)
        rank = roster.rank.__getitem__
        last = roster.last
        choices = [*map(roster.choices.__getitem__, order), *(last[k] for k in sorted(stalled, key=rank))]
        choices += [last[k] for k in sorted(down, key=rank)]
        drawn = sum(1 for share in share_list if share > 0.0) > 1
        return _new(Plan, ("least_loaded", tuple(choices), "", (), False, drawn, ()))

    def _quick_predictive(self, service: Service, roster: _Roster, health: HealthView, now: float) -> Plan | None:
        """`_quick` for predictive: one pass of `predictive.costs` over the endpoints of levels of more than one
        (their draws in level order, as `predictive.order` level by level), each level cheapest first; the
        cloud's share counts the first."""
        policy = service.spec.policy
        per_try = policy.per_try_timeout
        states = health.states_of(roster.ids)
        for eid, st in zip(roster.ids, states, strict=True):  # (before any draw: None leaves the rng as it was)
            if not (st.active_ok and now >= st.ejected_until):  # not `available(now)`
                return None
            if st.inflight > 0 and is_stalled(st, eid, now, health, per_try):
                return None
        pr = roster.predictive
        assert pr is not None  # (made with every quick predictive roster)
        values = predictive.costs(
            states if pr.every else [states[k] for k in pr.drawn],
            pr.factors,
            pr.backup if self._cloud_capped(service, now) else None,
            now,
            policy.default_rtt,
            per_try,
            self._rng,
        )
        order: list[int] = []
        for level, start in pr.spans:
            if start < 0:
                order.append(level[0])
            elif len(level) == 2:  # (the sort below, by one compare)
                order += (level[1], level[0]) if values[start + 1] < values[start] else level
            else:  # cheapest first (stable: ties in the level's order, as `predictive.order`)
                drawn = pr.drawn
                order += [drawn[i] for i in sorted(range(start, start + len(level)), key=values.__getitem__)]
        self._cloud_share(service).count(now, roster.eps[order[0]].tier == "cloud")
        choices = itemgetter(*order)(roster.choices) if len(order) > 1 else (roster.choices[order[0]],)
        return _new(Plan, ("predictive", choices, "", (), False, False, ()))

    def _cloud_share(self, service: Service) -> predictive.CloudShare:
        share = self._cloud.get(service.spec.key)
        if share is None:
            if len(self._cloud) >= MAX_LAYOUTS:
                self._cloud.clear()
            share = self._cloud[service.spec.key] = predictive.CloudShare()
        return share

    def _cloud_capped(self, service: Service, now: float) -> bool:
        """Whether the cloud tier has had its `cloud_max_share` of first choices (predictive): backup only."""
        limit = service.spec.policy.cloud_max_share
        return limit < 100 and self._cloud_share(service).share(now) * 100 >= limit

    def _order(
        self,
        strategy: str,
        service: Service,
        eps: list[Endpoint],
        states: list[HealthState],
        now: float,
        turn_key: tuple,
        explain: bool = True,
    ) -> tuple[list[Endpoint], Callable[[Endpoint], str]]:
        """The strategy's order, and how to say why an endpoint has its place (only asked when explaining;
        without `explain` the second value is a stand-in that must not be called)."""
        if len(eps) <= 1 and strategy not in ("round_robin", "predictive"):
            if strategy == "priority":
                return eps, _priority_why
            return eps, lambda ep: f"only usable endpoint of its level; {strategy}"
        if strategy == "least_loaded":
            ordered, costs = balancer.order(eps, states, now, service.spec.policy.default_rtt, self._rng)
            if not explain:
                return ordered, _priority_why

            def why(ep: Endpoint) -> str:
                k = eps.index(ep)
                p2c = " (power of two choices)" if ep is ordered[0] and len(eps) > 2 else ""
                return balancer.why(ep, states[k], now, costs[k]) + p2c

            return ordered, why
        if strategy == "predictive":
            policy = service.spec.policy
            capped = self._cloud_capped(service, now)
            ordered, costs = predictive.order(
                eps,
                states,
                now,
                policy.default_rtt,
                policy.per_try_timeout,
                self._rng,
                capped,
            )
            if not explain:
                return ordered, _priority_why

            def why_predictive(ep: Endpoint) -> str:
                k = eps.index(ep)
                return predictive.why(ep, states[k], now, policy.default_rtt, costs[k], capped)

            return ordered, why_predictive
        if strategy == "round_robin":
            base = _by_priority(service, eps)
            turn = self._turns.get(turn_key, 0)
            self._turns[turn_key] = turn + 1
            k = turn % len(base) if base else 0
            return base[k:] + base[:k], lambda ep: f"round robin, turn {turn + 1}"
        if strategy == "weighted":
            # Efraimidis-Spirakis: a weighted random order without replacement, O(n log n).
            weights = {ep.id: effective_weight(ep) for ep in eps}
            keyed = sorted(eps, key=lambda ep: self._rng.random() ** (1.0 / weights[ep.id]), reverse=True)
            total = sum(weights.values())
            return keyed, lambda ep: f"weighted, share {100 * weights[ep.id] / total:.1f}%"
        return _by_priority(service, eps), _priority_why


def _priority_why(ep: Endpoint) -> str:
    return f"priority {ep.priority}, tier {ep.tier}, weight {ep.weight}; healthy"


_RANKS: dict[tuple[str, ...], dict[str, int]] = {}
_new = tuple.__new__


def _level_key(ep: Endpoint, mode: str, ranks: dict[str, int]) -> int:
    """An endpoint's level as a sortable int: priority, then the tier's rank (levels = "tier")."""
    if mode == "none":
        return 0
    return ep.priority * 8 + (ranks.get(ep.tier, 7) if mode == "tier" else 0)


def _tier_ranks(types: tuple[str, ...]) -> dict[str, int]:
    """Tier -> its place in `endpoint_types` (at most a few distinct orders exist: a tiny cache)."""
    ranks = _RANKS.get(types)
    if ranks is None:
        ranks = _RANKS[types] = {tier: i for i, tier in enumerate(types)}
    return ranks


def _priority_key(service: Service, ep: Endpoint) -> tuple:
    return (ep.priority, tier_rank(service.spec, ep.tier), -ep.weight, ep.id)


def _by_priority(service: Service, eps: Sequence[Endpoint]) -> list[Endpoint]:
    return sorted(eps, key=lambda ep: _priority_key(service, ep))
