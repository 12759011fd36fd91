"""Policy: the service's rule turns its endpoints and their health into an ordered plan, with a reason per rank.

Pure over its inputs (endpoints, a health view, the time, a random source), so `edged resolve` can show
exactly what the router would do, and tests can check every strategy without I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .model import Endpoint, PolicySpec, Service
from .registry import tier_rank

# Strategies this version implements; the others named in the contract fall back to `priority`, visibly.
IMPLEMENTED = ("priority", "round_robin", "weighted", "latency")
STALL_FLOOR = 0.025  # seconds: below this, a slow answer is not yet a sign of a frozen endpoint
STALL_FACTOR = 8.0  # an endpoint is "stalled" when nothing came back for this many typical latencies


# Vitals of an endpoint's node travel in `Endpoint.meta` (filled by the edge tier from mDNS TXT):
# "cpu" busy %, "bat" battery %, "link" link quality %, each "0".."100" or absent/"" when unknown,
# and "power" = "battery" | "mains" | "" (unknown counts as mains: most edge boxes have no battery).
ON_BATTERY_FACTOR = 0.5  # on battery, even a full one, a node gets half the share of an equal node on mains
MIN_FACTOR = 0.05  # a busy or badly linked node keeps a trickle of calls, so that it is seen to recover


def _vital(meta: dict[str, str], key: str) -> float | None:
    value = meta.get(key, "")
    try:
        return min(100.0, max(0.0, float(value))) / 100.0 if value != "" else None
    except ValueError:
        return None


def node_score(meta: tuple[tuple[str, str], ...]) -> float:
    """0..1: how much of its weight an endpoint keeps, by its node's CPU load, battery and link quality."""
    if not meta:
        return 1.0
    m = dict(meta)
    score = 1.0
    cpu = _vital(m, "cpu")
    if cpu is not None:
        score *= max(MIN_FACTOR, 1.0 - cpu)
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

    def available(self, now: float) -> bool: ...
    def reason(self, now: float) -> str: ...


class HealthView(Protocol):
    def state(self, endpoint_id: str) -> HealthState: ...
    def stalled(self, endpoint_id: str, now: float, threshold: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class Choice:
    """One endpoint in the plan, in the order the router will try them."""

    endpoint: Endpoint
    usable: bool  # healthy, not ejected and not stalled: a first-class choice
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    strategy: str
    choices: tuple[Choice, ...]
    note: str = ""

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
                "usable": c.usable,
                "reason": c.reason,
            }
            for i, c in enumerate(self.choices)
        ]


def stall_threshold(latency_ewma: float | None, per_try_timeout: float) -> float:
    """How long an endpoint may hold calls with no answer before new calls go elsewhere first."""
    cap = per_try_timeout / 2
    if latency_ewma is None:
        return cap
    return max(STALL_FLOOR, min(cap, STALL_FACTOR * latency_ewma))


class Ranker:
    """Applies strategies. Holds only what strategies need between calls (round-robin turn, randomness)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._turns: dict[tuple[str, str], int] = {}

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

        Usable endpoints come first, in the strategy's order; then stalled ones (they may still answer);
        then unhealthy or ejected ones as a last resort, so that a wrong health verdict never turns into
        a failed call while anything might still answer. `explain=False` (the call path) skips the reasons.
        """
        spec = service.spec
        eps = service.endpoints if endpoints is None else endpoints
        strategy = spec.policy.strategy
        note = ""
        if strategy not in IMPLEMENTED:
            note = f"strategy {strategy!r} is not available in this version; using 'priority'"
            strategy = "priority"
        usable: list[Endpoint] = []
        stalled: list[Endpoint] = []
        down: list[tuple[Endpoint, str]] = []
        for ep in eps:
            st = health.state(ep.id)
            refusal = vitals_refusal(ep, spec.policy)
            if refusal is not None:
                down.append((ep, refusal))
            elif not st.available(now):
                down.append((ep, st.reason(now) if explain else ""))
            elif health.stalled(ep.id, now, stall_threshold(st.latency_ewma, spec.policy.per_try_timeout)):
                stalled.append(ep)
            else:
                usable.append(ep)
        ordered, why = self._order(strategy, service, usable, health)
        choices = [Choice(ep, True, why(ep) if explain else "") for ep in ordered]
        if stalled:
            reason = "stalled: calls in flight, no answer lately" if explain else ""
            choices += [Choice(ep, False, reason) for ep in _by_priority(service, stalled)]
        if down:
            down.sort(key=lambda item: _priority_key(service, item[0]))
            choices += [Choice(ep, False, f"last resort: {reason}" if explain else "") for ep, reason in down]
        return Plan(strategy, tuple(choices), note)

    def _order(
        self, strategy: str, service: Service, eps: list[Endpoint], health: HealthView
    ) -> tuple[list[Endpoint], Callable[[Endpoint], str]]:
        """The strategy's order, and how to say why an endpoint has its place (only asked when explaining)."""
        if len(eps) <= 1 and strategy != "round_robin":
            return eps, lambda ep: f"only usable endpoint; {strategy}"
        if strategy == "round_robin":
            base = _by_priority(service, eps)
            turn = self._turns.get(service.spec.key, 0)
            self._turns[service.spec.key] = turn + 1
            k = turn % len(base) if base else 0
            return base[k:] + base[:k], lambda ep: f"round robin, turn {turn + 1}"
        if strategy == "weighted":
            # Efraimidis-Spirakis: a weighted random order without replacement, O(n log n).
            weights = {ep.id: effective_weight(ep) for ep in eps}
            keyed = sorted(eps, key=lambda ep: self._rng.random() ** (1.0 / weights[ep.id]), reverse=True)
            total = sum(weights.values())
            return keyed, lambda ep: f"weighted, share {100 * weights[ep.id] / total:.1f}%"
        if strategy == "latency":
            # Unmeasured endpoints first (they need a sample), then lowest moving-average latency.
            def lat(ep: Endpoint) -> tuple:
                value = health.state(ep.id).latency_ewma
                return (value is not None, value or 0.0, *_priority_key(service, ep))

            def why(ep: Endpoint) -> str:
                value = health.state(ep.id).latency_ewma
                return "latency not measured yet" if value is None else f"latency {value * 1000:.1f} ms (ewma)"

            return sorted(eps, key=lat), why
        return _by_priority(
            service, eps
        ), lambda ep: f"priority {ep.priority}, tier {ep.tier}, weight {ep.weight}; healthy"


def _priority_key(service: Service, ep: Endpoint) -> tuple:
    return (ep.priority, tier_rank(service.spec, ep.tier), -ep.weight, ep.id)


def _by_priority(service: Service, eps: Sequence[Endpoint]) -> list[Endpoint]:
    return sorted(eps, key=lambda ep: _priority_key(service, ep))
