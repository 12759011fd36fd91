"""The `predictive` strategy: an online model per endpoint that predicts a try's latency and failure chance,
and chooses by expected cost with exploration suited to conditions that drift.

Pure Python, a fixed set of numbers per endpoint (`Model`, under 1 KiB with its hour profile), no numpy.
For each endpoint:
- latency = a + b x (calls in flight when the try was sent): a discounted least-squares line, so the load
  an endpoint is under is part of the prediction (b is pulled towards a while the data cannot tell it:
  one more call in flight costs about one more service time);
- the evidence is discounted twice: by age (half-life 20 s, so an endpoint left alone is explored again)
  and by count (at most the last ~48 answers weigh: a box that slows down is seen after a few dozen
  answers, however busy it is; a 20 s half-life alone lagged a drifting box by tens of ms);
- failure chance: discounted failed / all tries (timeouts, resets, 5xx; half-life 4 s, at most ~32 tries),
  with a weak prior: a lossy link's bursts are seen and forgotten within a second or two;
- tries overdue: the mean age of the tries in flight (`EndpointHealth.sent_sum`) above the predicted
  latency counts as cost at once. A lost reply is otherwise known only when its try times out; this sees
  the start of a loss burst (or a stall) within tens of ms;
- time of day: a discounted latency per hour of the day (24 buckets), the prediction for an endpoint with
  little recent evidence (after a restart, or one left alone for a while) instead of a flat default;
- vitals: battery and link quality as a cost factor (as least_loaded weighs them); CPU at half weight for
  an endpoint with recent answers (their latency and in-flight count already carry its load: at full
  weight calls went to a slow idle box in the routing simulator's drift scenario; at none, a busy fast box
  lost calls it should have had on day/night), at full weight for one with none.
For a call, each endpoint's intercept and failure chance are drawn from their posteriors with one normal
draw (discounted Thompson sampling: more spread the less recent evidence); the expected cost is
latency + spread + failure chance x per-try timeout + overdue age, x the vitals factor; the cheapest goes
first. `cloud_max_share` caps the share of calls the cloud tier may take first (then cloud endpoints only
back the others up).

Models live with each endpoint's health (`EndpointHealth.model`), are fed by the call path when the
service's strategy is `predictive`, and are kept in the state dir (`predictive.json`) across restarts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from .balancer import CPU_FACTOR, power_link_factor, vital
from .model import Endpoint
from .state import StateError, StateStore

log = logging.getLogger("edged.predictive")

HALF_LIFE = 20.0  # seconds: latency evidence this old counts half
MAX_WEIGHT = 48.0  # latency evidence counts at most this many answers (older ones fade as new ones come)
FAIL_HALF_LIFE = 4.0  # seconds: failures fade faster (a lossy link's bursts come and go within seconds)
MAX_TRIES = 32.0  # the failure chance weighs at most this many tries
EXPLORE = 0.5  # spread of a latency draw, as a share of the prediction's standard error
FAIL_EXPLORE = 1.0  # spread of a failure-chance draw, in standard errors of the estimate
TAIL = 1.0  # the cost counts this many standard deviations of an endpoint's latency: the tail matters
OVERDUE = 1.0  # seconds of cost per second that its tries in flight are older, on average, than predicted
PRIOR_WEIGHT = 2.0  # pseudo-samples pulling the in-flight slope towards the intercept
FAIL_PRIOR = (0.05, 1.0)  # pseudo failures, pseudo tries: a new endpoint's failure chance starts at 5 %
PRICED_FAILS = 0.5  # an endpoint failing fewer than this share of its recent tries is priced, never ejected
LIVE_WINDOW = 1.0  # seconds: an endpoint down by its checks that answered a call this recently may be live
POWER_WEIGHT = 0.75  # the battery factor's exponent for an endpoint with recent answers (see vitals_factors)
CPU_WEIGHT = 0.5  # share of least_loaded's CPU factor for an endpoint with recent answers (see the module doc)
HOURS = 24  # buckets of the time-of-day profile
HOUR_ALPHA = 0.02  # weight of one answer in its hour's latency (an hour's profile follows weeks, not calls)
HOUR_WEIGHT = 4.0  # pseudo-samples the hour's latency counts for against the recent line
MIN_SIGMA = 0.0005  # seconds: the spread of a prediction never goes below this
STATE_FILE = "predictive.json"
SAVE_INTERVAL = 60.0
_LN2 = math.log(2.0)
_DECAY = -_LN2 / HALF_LIFE
_FAIL_DECAY = -_LN2 / FAIL_HALF_LIFE
_VALUES = 8  # the sums `dump` gives
_LENGTHS = (_VALUES + 1, _VALUES + 1 + HOURS)  # a kept model: its sums, its age (version 1), its hours (2)


_UTC_OFFSET = -(time.altzone if time.daylight and time.localtime().tm_isdst else time.timezone)  # at start


def _local_seconds() -> float:
    """Seconds into the local day (the time-of-day feature's clock; the simulator replaces `day_clock`)."""
    return (time.time() + _UTC_OFFSET) % 86400.0


day_clock: Callable[[], float] = _local_seconds


def hour_now() -> int:
    return int(day_clock() / 3600.0) % HOURS


class Model:
    """Discounted sums of one endpoint: weight, z, z^2, y, y^2, z*y (z = calls in flight at send, y = latency),
    failures, tries, and when they were last discounted (the clock of `observe`); the line they give
    (a, b, sigma), worked out when a sample arrives rather than at every decision; and the latency by hour
    of the day (0: not seen yet)."""

    __slots__ = ("a", "b", "fails", "hours", "sigma", "stamp", "sy", "syy", "sz", "szy", "szz", "tries", "w")

    def __init__(self) -> None:
        self.w = self.sz = self.szz = self.sy = self.syy = self.szy = 0.0
        self.fails = self.tries = 0.0
        self.stamp = 0.0
        self.a = self.b = self.sigma = 0.0
        self.hours = array("f", bytes(4 * HOURS))

    def __repr__(self) -> str:
        return f"<Model n={self.w:.1f} mean={1000 * self.sy / self.w if self.w else 0:.1f} ms fails={self.fails:.1f}>"

    def _decay(self, now: float) -> None:
        dt = now - self.stamp
        if dt > 0.0:
            self._scale(math.exp(_DECAY * dt))
            f = math.exp(_FAIL_DECAY * dt)
            self.fails *= f
            self.tries *= f
        self.stamp = now

    def _scale(self, g: float) -> None:
        self.w *= g
        self.sz *= g
        self.szz *= g
        self.sy *= g
        self.syy *= g
        self.szy *= g

    def observe(self, now: float, ok: bool, latency: float | None, load: int) -> None:
        """One try: its outcome, its latency when it answered, the calls in flight when it was sent."""
        self._decay(now)
        if self.tries > MAX_TRIES - 1.0:
            k = (MAX_TRIES - 1.0) / self.tries
            self.tries *= k
            self.fails *= k
        self.tries += 1.0
        if not ok:
            self.fails += 1.0
        if latency is not None and ok:
            if self.w > MAX_WEIGHT - 1.0:
                self._scale((MAX_WEIGHT - 1.0) / self.w)
            z = float(load)
            self.w += 1.0
            self.sz += z
            self.szz += z * z
            self.sy += latency
            self.syy += latency * latency
            self.szy += z * latency
            self._fit()
            h = hour_now()
            seen = self.hours[h]
            base = max(1e-6, latency - self.b * z)  # this answer at no load
            self.hours[h] = base if seen == 0.0 else seen + HOUR_ALPHA * (base - seen)

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
        if w < HOUR_WEIGHT:  # little recent evidence: what this hour of the day usually brings
            usual = self.hours[hour_now()]
            if usual > 0.0:
                a = (self.a * w + usual * HOUR_WEIGHT) / (w + HOUR_WEIGHT) if w >= 1e-3 else usual
                b = self.b if w >= 1e-3 else usual
                return a + b * load, max(self.sigma, MIN_SIGMA), p_fail, w
        if w < 1e-3:
            return default_rtt * (load + 1), default_rtt, p_fail, w
        return self.a + self.b * load, self.sigma, p_fail, w

    def answers_most(self, now: float) -> bool:
        """Whether the endpoint answered most of its recent tries (failure chance < PRICED_FAILS): a lossy but
        live endpoint, whose failures the cost prices (outlier detection then does not eject it)."""
        f = math.exp(_FAIL_DECAY * (now - self.stamp)) if now > self.stamp else 1.0
        return (self.fails * f + FAIL_PRIOR[0]) / (self.tries * f + FAIL_PRIOR[1]) < PRICED_FAILS

    def dump(self) -> list[float]:
        return [self.w, self.sz, self.szz, self.sy, self.syy, self.szy, self.fails, self.tries]

    @classmethod
    def restore(cls, values: Sequence[float], stamp: float, hours: Sequence[float] = ()) -> Model:
        m = cls()
        m.w, m.sz, m.szz, m.sy, m.syy, m.szy, m.fails, m.tries = (float(v) for v in values)
        m.stamp = stamp
        if len(hours) == HOURS:
            m.hours = array("f", hours)
        if m.w > 0.0:
            m._fit()
        return m


_FACTORS: dict[tuple[tuple[str, str], ...], tuple[float, float]] = {}


def vitals_factors(meta: tuple[tuple[str, str], ...]) -> tuple[float, float]:
    """A node's vitals as cost factors (battery and link as least_loaded's `balancer.vitals_factor`), for an
    endpoint with recent answers and for one without. With answers: no link part (its lost replies are its
    measured failure chance; the link factor on top priced a lossy link twice), the battery part to the
    power POWER_WEIGHT, half the CPU weight. Without: all of least_loaded's factor."""
    factors = _FACTORS.get(meta)
    if factors is None:
        m = dict(meta)
        cpu = vital(m, "cpu") or 0.0
        power = power_link_factor({k: v for k, v in m.items() if k != "link"}) ** POWER_WEIGHT
        if len(_FACTORS) >= 1024:
            _FACTORS.clear()  # vitals vary: keep the table small rather than complete
        warm, cold = power * (1.0 + CPU_WEIGHT * CPU_FACTOR * cpu), power_link_factor(m) * (1.0 + CPU_FACTOR * cpu)
        factors = _FACTORS[meta] = (warm, cold)
    return factors


class ModelState(Protocol):
    inflight: int
    sent_sum: float  # the send times of its tries in flight, summed
    model: Model | None


class CheckedState(ModelState, Protocol):
    active_ok: bool
    ejected_until: float
    last_response_at: float


def live(st: CheckedState, now: float) -> bool:
    """Down by its active checks alone, yet still answering calls (one answer within LIVE_WINDOW, most recent
    tries answered): a lossy link, not a dead endpoint. Predictive keeps it as a choice, priced by its failure
    chance, rather than pushing its share onto the others. A partitioned or frozen endpoint answers nothing:
    by the time its checks have failed (`fall` x `interval`: 4 s by default) its last answer is older than
    LIVE_WINDOW and it is left out as before (until then its overdue tries price it); an ejected one
    (refused connects: the process is gone) is left out too."""
    model = st.model
    return (
        model is not None
        and now - st.last_response_at < LIVE_WINDOW
        and st.ejected_until <= now
        and model.answers_most(now)
    )


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
    factors = [vitals_factors(ep.meta) if ep.meta else None for ep in eps]
    backup = [ep.tier == "cloud" for ep in eps] if cloud_capped else None
    drawn = costs(states, factors, backup, now, default_rtt, timeout, rng)
    ranked = sorted(range(len(eps)), key=drawn.__getitem__)
    return list(map(eps.__getitem__, ranked)), drawn


def costs(
    states: Sequence[ModelState],
    factors: Sequence[tuple[float, float] | None],
    backup: Sequence[bool] | None,
    now: float,
    default_rtt: float,
    timeout: float,
    rng: random.Random,
) -> list[float]:
    """Each endpoint's expected cost, drawn from its posterior (one draw each, in order): `states[i]`'s, times
    its node's `vitals_factors` `factors[i]` (None: no vitals), plus 1e6 where `backup[i]` (a cloud endpoint
    over `cloud_max_share`; `backup` None: none is). The call path's decision runs this for every call, so
    `Model.predict`'s common case (evidence recent enough that the hour profile does not count) is inlined:
    the same operations, so the same floats."""
    out: list[float] = []
    add = out.append
    draw = rng.random
    sqrt, exp = math.sqrt, math.exp
    normal = _NORMAL or _normal_table()
    prior_fails, prior_tries = FAIL_PRIOR
    for k, st in enumerate(states):
        model = st.model
        inflight = st.inflight
        if model is None:
            lat, sigma, p_fail, n, tries = default_rtt * (inflight + 1), default_rtt, prior_fails, 0.0, 0.0
        else:
            age = now - model.stamp
            if age > 0.0:
                n = model.w * exp(_DECAY * age)
                f = exp(_FAIL_DECAY * age)
            else:
                n, f = model.w, 1.0
            if n < HOUR_WEIGHT:  # (the hour profile or the default may count: `predict` itself)
                lat, sigma, p_fail, n = model.predict(now, inflight, default_rtt)
            else:
                p_fail = (model.fails * f + prior_fails) / (model.tries * f + prior_tries)
                lat, sigma = model.a + model.b * inflight, model.sigma
            tries = model.tries
        u = normal[int(draw() * _DRAWS)]  # one draw for both: an endpoint explored is explored on both counts
        cost = lat + u * EXPLORE * sigma / sqrt(n + 1.0)
        p_fail += u * FAIL_EXPLORE * sqrt(p_fail * (1.0 - p_fail) / (tries + 1.0))
        cost = (cost if cost > 1e-6 else 1e-6) + TAIL * sigma + (p_fail if p_fail > 0.0 else 0.0) * timeout
        if inflight:
            age = now - st.sent_sum / inflight  # the mean age of its tries in flight
            if age > lat:
                cost += OVERDUE * (age - lat)
        factor = factors[k]
        if factor is not None:
            cost *= factor[0] if n >= 1.0 else factor[1]
        if backup is not None and backup[k]:
            cost += 1e6
        add(cost)
    return out


_DRAWS = 256
_NORMAL: list[float] = []


def _normal_table() -> list[float]:
    """Standard normal quantiles at the middle of 256 equal slices, made on first use: a draw is then one
    C-level random() and an index (random.gauss, pure Python, cost more than the rest of a prediction)."""
    for i in range(_DRAWS):
        p, lo, hi = (i + 0.5) / _DRAWS, -6.0, 6.0
        for _ in range(40):  # bisection on the normal CDF, 0.5 * (1 + erf(x / sqrt 2))
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p else (lo, mid)
        _NORMAL.append((lo + hi) / 2)
    return _NORMAL


def why(ep: Endpoint, st: ModelState, now: float, default_rtt: float, cost: float, capped: bool) -> str:
    """`edged resolve`'s reason: the prediction behind an endpoint's place."""
    if st.model is None:
        return f"predictive: no samples yet, assumed {default_rtt * 1000:.0f} ms; drawn cost {cost * 1000:.1f} ms"
    lat, sigma, p_fail, n = st.model.predict(now, st.inflight, default_rtt)
    cap = "; over cloud_max_share: backup only" if capped and ep.tier == "cloud" else ""
    if not getattr(st, "active_ok", True):  # kept by `live`
        cap += "; its checks fail but it still answers calls: kept, priced by its failure chance"
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
    items = {
        eid: [*m.dump(), round(max(0.0, now - m.stamp), 3), *(round(h, 6) for h in m.hours)] for eid, m in models
    }
    store.write_json(STATE_FILE, {"version": 2, "saved_at": time.time(), "models": items})
    return len(items)


def load(store: StateStore, now: float, max_items: int = 2048) -> dict[str, Model]:
    """The models kept in the state dir (at most `max_items`, under 1 KiB each), aged by the time the daemon
    was down; bad entries are dropped. Version 1 files (no hour profile: 9 numbers a model) still load."""
    data = store.read_json(STATE_FILE, {})
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return {}
    down = max(0.0, time.time() - float(data.get("saved_at", time.time())))
    out: dict[str, Model] = {}
    for eid, values in list(data["models"].items())[:max_items]:
        if not (isinstance(eid, str) and isinstance(values, list) and len(values) in _LENGTHS):
            continue
        try:
            nums = [float(v) for v in values]
        except (TypeError, ValueError):
            continue
        if not all(math.isfinite(v) and v >= -1e-9 for v in nums[:2] + nums[3:5] + nums[6:]):
            continue
        out[eid] = Model.restore(nums[:_VALUES], now - nums[_VALUES] - down, nums[_VALUES + 1 :])
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
