"""The `predictive` strategy: an online model per endpoint that predicts a try's latency and failure chance,
and chooses by expected cost with exploration suited to conditions that drift.

Pure Python, a fixed 12 numbers per endpoint (`Model`, about 400 bytes), no numpy. For each endpoint:
- latency = a + b x (calls in flight when the try was sent): a discounted least-squares line, so the load
  an endpoint is under is part of the prediction (b is pulled towards a while the data cannot tell it:
  one more call in flight costs about one more service time);
- failure chance: discounted failed / all tries (timeouts, resets, 5xx), with a weak prior;
- every sum is discounted by age (half-life 20 s for latency, 4 s for failures): old evidence fades, so a
  box that slowed down or came back is seen within seconds (discounted Thompson sampling for drifting
  conditions).
For a call, each endpoint's line intercept is drawn from its posterior (more spread the fewer recent
samples: exploration that stops paying once an endpoint is known, and starts again as evidence ages);
the expected cost is (latency + failure chance x per-try timeout) x the node's vitals factor (CPU,
battery, link: as least_loaded weighs them); the cheapest goes first. `cloud_max_share` caps the share of
calls the cloud tier may take first (then cloud endpoints only back the others up).

Models live with each endpoint's health (`EndpointHealth.model`), are fed by the call path when the
service's strategy is `predictive`, and are kept in the state dir (`predictive.json`) across restarts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from .balancer import vitals_factor
from .model import Endpoint
from .state import StateError, StateStore

log = logging.getLogger("edged.predictive")

HALF_LIFE = 20.0  # seconds: latency evidence this old counts half
FAIL_HALF_LIFE = 4.0  # seconds: failures fade faster (a lossy link's bursts come and go within seconds)
EXPLORE = 0.5  # spread of a draw, as a share of the prediction's standard error
TAIL = 1.0  # the cost counts this many standard deviations of an endpoint's latency: the tail matters
PRIOR_WEIGHT = 2.0  # pseudo-samples pulling the in-flight slope towards the intercept
FAIL_PRIOR = (0.05, 1.0)  # pseudo failures, pseudo tries: a new endpoint's failure chance starts at 5 %
MIN_SIGMA = 0.0005  # seconds: the spread of a prediction never goes below this
STATE_FILE = "predictive.json"
SAVE_INTERVAL = 60.0
_LN2 = math.log(2.0)
_DECAY = -_LN2 / HALF_LIFE
_FAIL_DECAY = -_LN2 / FAIL_HALF_LIFE


class Model:
    """Discounted sums of one endpoint: weight, z, z^2, y, y^2, z*y (z = calls in flight at send, y = latency),
    failures, tries, and when they were last discounted (the clock of `observe`); and the line they give
    (a, b, sigma), worked out when a sample arrives rather than at every decision."""

    __slots__ = ("a", "b", "fails", "sigma", "stamp", "sy", "syy", "sz", "szy", "szz", "tries", "w")

    def __init__(self) -> None:
        self.w = self.sz = self.szz = self.sy = self.syy = self.szy = 0.0
        self.fails = self.tries = 0.0
        self.stamp = 0.0
        self.a = self.b = self.sigma = 0.0

    def __repr__(self) -> str:
        return f"<Model n={self.w:.1f} mean={1000 * self.sy / self.w if self.w else 0:.1f} ms fails={self.fails:.1f}>"

    def _decay(self, now: float) -> None:
        dt = now - self.stamp
        if dt > 0.0:
            g = math.exp(-_LN2 * dt / HALF_LIFE)
            self.w *= g
            self.sz *= g
            self.szz *= g
            self.sy *= g
            self.syy *= g
            self.szy *= g
            f = math.exp(-_LN2 * dt / FAIL_HALF_LIFE)
            self.fails *= f
            self.tries *= f
        self.stamp = now

    def observe(self, now: float, ok: bool, latency: float | None, load: int) -> None:
        """One try: its outcome, its latency when it answered, the calls in flight when it was sent."""
        self._decay(now)
        self.tries += 1.0
        if not ok:
            self.fails += 1.0
        if latency is not None and ok:
            z = float(load)
            self.w += 1.0
            self.sz += z
            self.szz += z * z
            self.sy += latency
            self.syy += latency * latency
            self.szy += z * latency
            self._fit()

    def _fit(self) -> None:
        """The latency line from the sums (ratios of sums: discounting all of them alike changes nothing)."""
        w = self.w
        zbar, ybar = self.sz / w, self.sy / w
        var_z = max(0.0, self.szz / w - zbar * zbar)
        cov = self.szy / w - zbar * ybar
        slope_ls = cov / var_z if var_z > 1e-9 else 0.0
        intercept_guess = max(ybar - slope_ls * zbar, ybar / (zbar + 1.0), 1e-6)
        # Shrink the slope towards the intercept (one more call in flight ~ one more service time).
        b = max(0.0, (slope_ls * var_z * w + intercept_guess * PRIOR_WEIGHT) / (var_z * w + PRIOR_WEIGHT))
        self.a = max(1e-6, ybar - b * zbar)
        self.b = b
        self.sigma = max(MIN_SIGMA, math.sqrt(max(0.0, self.syy / w - ybar * ybar - b * b * var_z)))

    def predict(self, now: float, load: int, default_rtt: float) -> tuple[float, float, float, float]:
        """(latency at this load, its spread, failure chance, recent samples) without changing the model."""
        age = now - self.stamp
        if age > 0.0:
            w = self.w * math.exp(_DECAY * age)
            f = math.exp(_FAIL_DECAY * age)
        else:
            w, f = self.w, 1.0
        p_fail = (self.fails * f + FAIL_PRIOR[0]) / (self.tries * f + FAIL_PRIOR[1])
        if w < 1e-3:
            return default_rtt * (load + 1), default_rtt, p_fail, w
        return self.a + self.b * load, self.sigma, p_fail, w

    def dump(self) -> list[float]:
        return [self.w, self.sz, self.szz, self.sy, self.syy, self.szy, self.fails, self.tries]

    @classmethod
    def restore(cls, values: Sequence[float], stamp: float) -> Model:
        m = cls()
        m.w, m.sz, m.szz, m.sy, m.syy, m.szy, m.fails, m.tries = (float(v) for v in values)
        m.stamp = stamp
        if m.w > 0.0:
            m._fit()
        return m


class ModelState(Protocol):
    inflight: int
    model: Model | None


def order(
    eps: Sequence[Endpoint],
    states: Sequence[ModelState],
    now: float,
    default_rtt: float,
    timeout: float,
    rng: random.Random,
    cloud_capped: bool,
) -> tuple[list[Endpoint], list[float]]:
    """Cheapest expected cost first (each drawn from its posterior); cloud endpoints last when capped."""
    costs: list[float] = []
    for ep, st in zip(eps, states, strict=True):
        model = st.model
        if model is None:
            lat, sigma, p_fail, n = default_rtt * (st.inflight + 1), default_rtt, FAIL_PRIOR[0] / FAIL_PRIOR[1], 0.0
        else:
            lat, sigma, p_fail, n = model.predict(now, st.inflight, default_rtt)
        drawn = lat + rng.gauss(0.0, EXPLORE) * sigma / math.sqrt(n + 1.0)
        cost = (max(drawn, 1e-6) + TAIL * sigma + p_fail * timeout) * (vitals_factor(ep.meta) if ep.meta else 1.0)
        if cloud_capped and ep.tier == "cloud":
            cost += 1e6
        costs.append(cost)
    ranked = sorted(range(len(eps)), key=costs.__getitem__)
    return list(map(eps.__getitem__, ranked)), costs


def why(ep: Endpoint, st: ModelState, now: float, default_rtt: float, cost: float, capped: bool) -> str:
    """`edged resolve`'s reason: the prediction behind an endpoint's place."""
    if st.model is None:
        return f"predictive: no samples yet, assumed {default_rtt * 1000:.0f} ms; drawn cost {cost * 1000:.1f} ms"
    lat, sigma, p_fail, n = st.model.predict(now, st.inflight, default_rtt)
    cap = "; over cloud_max_share: backup only" if capped and ep.tier == "cloud" else ""
    return (
        f"predictive: latency {lat * 1000:.1f} ms (+-{sigma * 1000:.1f}) at {st.inflight} in flight, "
        f"failure {100 * p_fail:.1f}%, {n:.0f} recent samples; drawn cost {cost * 1000:.1f} ms{cap}"
    )


class CloudShare:
    """Discounted share of a service's calls whose first choice was a cloud endpoint."""

    __slots__ = ("cloud", "stamp", "total")

    def __init__(self) -> None:
        self.cloud = self.total = 0.0
        self.stamp = 0.0

    def share(self, now: float) -> float:
        return self.cloud / self.total if self.total > 0 else 0.0

    def count(self, now: float, cloud: bool) -> None:
        g = math.exp(-_LN2 * max(0.0, now - self.stamp) / HALF_LIFE)
        self.stamp = now
        self.total = self.total * g + 1.0
        self.cloud = self.cloud * g + (1.0 if cloud else 0.0)


# -- kept across restarts ---------------------------------------------------------------------------------


def save(store: StateStore, models: Iterable[tuple[str, Model]], now: float) -> int:
    """Write every model with its age (monotonic clocks do not survive a restart); returns how many."""
    items = {eid: [*m.dump(), round(max(0.0, now - m.stamp), 3)] for eid, m in models}
    store.write_json(STATE_FILE, {"version": 1, "saved_at": time.time(), "models": items})
    return len(items)


def load(store: StateStore, now: float, max_items: int = 2048) -> dict[str, Model]:
    """The models kept in the state dir (at most `max_items`, about 400 bytes each), aged by the time the daemon
    was down; bad entries are dropped."""
    data = store.read_json(STATE_FILE, {})
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return {}
    down = max(0.0, time.time() - float(data.get("saved_at", time.time())))
    out: dict[str, Model] = {}
    for eid, values in list(data["models"].items())[:max_items]:
        if not (isinstance(eid, str) and isinstance(values, list) and len(values) == 9):
            continue
        try:
            nums = [float(v) for v in values]
        except (TypeError, ValueError):
            continue
        if not all(math.isfinite(v) and v >= -1e-9 for v in nums[:2] + nums[3:5] + nums[6:]):
            continue
        out[eid] = Model.restore(nums[:8], now - nums[8] - down)
    return out


async def keep(store: StateStore, models: Callable[[], Iterable[tuple[str, Model]]], clock=time.monotonic) -> None:
    """Save the models every SAVE_INTERVAL, and once more when cancelled (the daemon stops)."""
    try:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            _save_quietly(store, models, clock())
    finally:
        _save_quietly(store, models, clock())


def _save_quietly(store: StateStore, models: Callable[[], Iterable[tuple[str, Model]]], now: float) -> None:
    items = list(models())
    if not items:
        return  # no service uses the strategy: no write (an SD card's wear)
    try:
        save(store, items, now)
    except (StateError, OSError) as exc:
        log.warning("could not keep the predictive models: %s", exc)
