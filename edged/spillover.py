"""Priority levels and spillover: how a service's calls are shared among its levels (Envoy's formula).

Endpoints form levels (by default one per (priority, tier) in the tier order local -> edge -> cloud; the
policy key `levels` says "priority" to let tiers of one priority share a level, or "none" for one level).
A level's health is `min(100, overprovisioning x 100 x healthy / total)`; the first level takes that share
of the calls, the next level the share it can of what is left, and so on. With the default
overprovisioning of 1.4 a level keeps every call until fewer than about 71 % of its endpoints are healthy,
then hands the rest on in proportion. When the levels' health adds up to less than 100, shares are scaled
so that they still add up to 100 (calls go where health is). Below `panic_threshold` % in total, health
verdicts are not believed: every endpoint that is not refused outright takes part (Envoy's panic mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .model import Endpoint, ServiceSpec


@dataclass(frozen=True, slots=True)
class LevelShare:
    """One level as `edged resolve` shows it."""

    name: str
    healthy: int
    total: int
    health: float  # 0..100: min(100, overprovisioning x 100 x healthy / total)
    share: float  # 0..100: the share of calls that start in this level


def level_name(spec: ServiceSpec, ep: Endpoint) -> str:
    """A level's name in `edged resolve` ("p10/local"). (Levels are keyed by (priority, tier rank), or
    (priority, 0) or (0, 0), in `Ranker.plan`'s one pass over the endpoints.)"""
    mode = spec.policy.levels
    if mode == "tier":
        return f"p{ep.priority}/{ep.tier}"
    if mode == "priority":
        return f"p{ep.priority}"
    return "all"


def shares(counts: Sequence[tuple[int, int]], overprovisioning: float) -> tuple[list[float], list[float], float]:
    """Each level's health and share of calls (0..100), from its (healthy, total) counts in level order;
    and the levels' total health (0..100) that the panic threshold is compared with."""
    health = [min(100.0, overprovisioning * 100.0 * h / t) if t else 0.0 for h, t in counts]
    total = min(100.0, sum(health))
    out: list[float] = []
    left = 100.0
    for h in health:
        share = min(left, h * 100.0 / total) if total > 0 else 0.0
        out.append(share)
        left -= share
    return health, out, total


def pick(share_list: Sequence[float], u: float) -> int:
    """The level a call starts in, for a uniform draw `u` in [0, 1)."""
    x = u * 100.0
    last = 0
    for i, share in enumerate(share_list):
        if share > 0.0:
            last = i
            if x < share:
                return i
            x -= share
    return last  # rounding left a sliver: the last level with a share
