"""Load-aware choice among a level's endpoints: peak-EWMA latency x (calls in flight + 1), power of two choices.

Finagle's and Linkerd's balancer. Each endpoint keeps a peak-sensitive moving average of its answer time
(`PeakEwma`: a slower answer is taken at once, faster ones pull it down with a 10 s time constant, and it
decays towards zero while the endpoint gets no calls, so that an endpoint shunned as slow is tried again).
Its cost for the next call is that latency times (calls in flight + 1), times its node's vitals factor
(`vitals_factor`: a hot, badly linked or battery-drained node costs more; a bounded factor, since a node's
CPU is busy with the very calls the in-flight count already weighs, and a sharper one made the traffic
swing away from a busy node and back, which the routing simulator showed). Two endpoints are drawn at
random and the cheaper takes the call: herding onto one "best" endpoint cannot happen, and a slow endpoint
gets little.

An endpoint never measured costs `default_rtt`; once it has a call in flight it costs a penalty that no
measured endpoint reaches (Finagle), so a freshly advertised endpoint gets one call at a time until its
first answer tells what it is worth.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

from .model import Endpoint

DECAY = 10.0  # seconds: the moving average's time constant (Finagle's and Linkerd's default)
PENALTY = 1e6  # seconds: the cost of an unmeasured endpoint that already has a call in flight
CPU_FACTOR = 1.0  # a node at 100 % CPU costs 1 + this times as much
BATTERY_FACTOR = 2.0  # a node on battery costs this times as much when full ...
DRAINED_FACTOR = 4.0  # ... and up to this much more again as its battery drains to 0 %
MIN_LINK = 0.05  # the cost is divided by the link quality (0..1), not below this
_FACTORS: dict[tuple[tuple[str, str], ...], float] = {}  # vitals -> factor (vitals change every few seconds)
_exp = math.exp


def vital(meta: dict[str, str], key: str) -> float | None:
    """A vital ("cpu", "bat", "link": "0".."100") as 0..1, or None when absent, empty or not a number."""
    value = meta.get(key, "")
    try:
        return min(100.0, max(0.0, float(value))) / 100.0 if value != "" else None
    except ValueError:
        return None


def power_link_factor(m: dict[str, str]) -> float:
    """The battery and link part of a node's cost factor (1.0 on mains with no link quality known)."""
    factor = 1.0
    if m.get("power") == "battery":
        bat = vital(m, "bat")
        factor *= BATTERY_FACTOR * (1.0 + DRAINED_FACTOR * (1.0 - (1.0 if bat is None else bat)))
    link = vital(m, "link")
    if link is not None:
        factor /= max(MIN_LINK, link)
    return factor


def vitals_factor(meta: tuple[tuple[str, str], ...]) -> float:
    """How many times more a call costs on this node, by its vitals (1.0 with none known)."""
    factor = _FACTORS.get(meta)
    if factor is None:
        m = dict(meta)
        cpu = vital(m, "cpu")
        factor = power_link_factor(m) * (1.0 + CPU_FACTOR * cpu if cpu is not None else 1.0)
        if len(_FACTORS) >= 1024:
            _FACTORS.clear()  # vitals vary: keep the table small rather than complete
        _FACTORS[meta] = factor
    return factor


class PeakEwma:
    """One endpoint's peak-EWMA answer time (seconds). 32 bytes of state; reading it does not change it."""

    __slots__ = ("stamp", "value")

    def __init__(self) -> None:
        self.value = 0.0
        # Clock time of the last sample; < 0: never measured. -inf rather than any negative time: a first sample's
        # gap is then endless and the estimate's weight exp(-inf) = 0, so `observe` takes it whole without a test.
        self.stamp = -math.inf

    def __repr__(self) -> str:
        return f"<PeakEwma {self.value * 1000:.2f} ms at {self.stamp:.1f}>"

    @property
    def measured(self) -> bool:
        return self.stamp >= 0.0

    def observe(self, rtt: float, now: float) -> None:
        """Take one answer time: a peak is taken whole, a lower one by the weight its time gap earns."""
        stamp = self.stamp
        self.stamp = now
        if now > stamp:  # (the weight of no time gap is 1.0: no exp, once per answer; -(now - stamp) is exact)
            w = _exp((stamp - now) / DECAY)  # 0.0 for a first sample: 0.0 * w + rtt * 1.0 is rtt, exactly
            current = self.value * w
            self.value = rtt if rtt > current else current * w + rtt * (1.0 - w)
        elif rtt > self.value:
            self.value = rtt

    def get(self, now: float) -> float:
        """The estimate now: the last value, decayed towards zero over the time with no sample."""
        if self.stamp < 0.0:
            return 0.0
        return self.value * math.exp(-max(0.0, now - self.stamp) / DECAY)


class LoadState(Protocol):
    inflight: int
    peak: PeakEwma


def cost(state: LoadState, meta: tuple[tuple[str, str], ...], now: float, default_rtt: float) -> float:
    """The expected cost (seconds) of sending one more call to an endpoint (see the module doc; `order`
    computes the same inline)."""
    pending = state.inflight
    peak = state.peak
    if peak.stamp < 0.0:
        if pending > 0:
            return PENALTY + pending
        rtt = default_rtt
    else:
        rtt = peak.get(now)
    return rtt * (pending + 1) * (vitals_factor(meta) if meta else 1.0)


def costs(states: Sequence[LoadState], factors: Sequence[float], now: float, default_rtt: float) -> list[float]:
    """`cost()` of each endpoint, `factors[i]` being the vitals factor of the node of `states[i]`'s endpoint
    (the ranker works factors out once per registry snapshot: vitals travel in the endpoints' meta)."""
    exp = math.exp
    out: list[float] = []
    add = out.append
    for st, factor in zip(states, factors, strict=True):  # `cost()`, inlined: this runs for every call
        peak = st.peak
        if peak.stamp < 0.0:
            pending = st.inflight
            add((PENALTY + pending if pending else default_rtt) * factor)
        else:
            add(peak.value * exp((peak.stamp - now) / DECAY) * (st.inflight + 1) * factor)
    return out


def ranked(group: Sequence[int], values: Sequence[float], rng: random.Random) -> list[int]:
    """The positions `group` (ascending) in least_loaded's order by their costs `values[k]`: power of two
    choices first, then the rest cheapest first (the failover order). Ties go to the earlier position; two
    equal costs alone are ordered by a draw, so that no endpoint is favoured by its place in the list."""
    n = len(group)
    if n <= 2:
        if n == 2:
            a, b = group
            if values[b] < values[a] or (values[b] == values[a] and rng.random() < 0.5):
                return [b, a]
        return list(group)
    i = int(rng.random() * n)
    j = int(rng.random() * (n - 1))
    if j >= i:
        j += 1
    a, b = group[i], group[j]
    first = a if values[a] < values[b] or (values[a] == values[b] and i < j) else b
    if n == 3:  # (the sort below, by two compares: the other two, cheaper first, a tie in the group's order)
        x, y, z = group
        p, q = (y, z) if first == x else (x, z) if first == y else (x, y)
        return [first, q, p] if values[q] < values[p] else [first, p, q]
    out = sorted(group, key=values.__getitem__)  # (stable: ties keep the group's order)
    if out[0] != first:
        out.remove(first)
        out.insert(0, first)
    return out


def order(
    eps: Sequence[Endpoint],
    states: Sequence[LoadState],
    now: float,
    default_rtt: float,
    rng: random.Random,
) -> tuple[list[Endpoint], list[float]]:
    """`ranked` over endpoints: their least_loaded order, and the cost of each of `eps` (in its order).
    `states[i]` is the load state of `eps[i]`."""
    values = costs(states, [vitals_factor(ep.meta) if ep.meta else 1.0 for ep in eps], now, default_rtt)
    return list(map(eps.__getitem__, ranked(range(len(eps)), values, rng))), values


def why(ep: Endpoint, state: LoadState, now: float, c: float) -> str:
    """The reason `edged resolve` shows for an endpoint's cost."""
    peak = state.peak
    if not peak.measured:
        base = "not measured yet" + (", a call in flight (penalty)" if state.inflight else "")
    else:
        base = f"peak-ewma {peak.get(now) * 1000:.1f} ms"
    factor = vitals_factor(ep.meta) if ep.meta else 1.0
    vitals = f" x vitals {factor:.2f}" if factor != 1.0 else ""
    return f"least loaded: cost {c * 1000:.1f} ms = {base} x ({state.inflight} in flight + 1){vitals}"
