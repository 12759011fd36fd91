"""Endpoint health: active checks with rise/fall, TTL heartbeats and passive outlier detection, per endpoint id.

The request path reports (`call_started` gives an `InFlight` handle, its `finish` the outcome), check tasks
and heartbeats report, and the policy only reads `state(id).available(now)`: plain attribute reads, no locks,
no allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable, Sequence

from edged.balancer import PeakEwma
from edged.health.checks import CheckResult, run_check
from edged.health.outlier import Outlier, OutlierConfig
from edged.http.client import UpstreamPool
from edged.looplag import LoopLag, loop_lag
from edged.model import Endpoint, HealthCheckSpec, Service
from edged.predictive import Model

log = logging.getLogger(__name__)

_EWMA_ALPHA = 0.3
_FAST_PROBE_MIN = 0.1  # seconds: floor of the faster probing while a state change is pending
_SWEEP_RETRY = 1.0  # seconds before the sweeper tries again after a failed sweep
_CHECK_STEP_MAX = 0.25  # seconds: the longest step of the grid that regular checks start on
_MAX_GROUPS = 1024  # endpoint-id tuples whose states `states_of` keeps (a few per service the box calls)


def on_grid(now: float, delay: float, interval: float) -> float:
    """`delay` from loop time `now`, moved to end on the nearest step of a grid of interval/8 (at most
    0.25 s): the checks of many endpoints that fall due within one step then start in one wake-up of an idle
    daemon (and share one loop-lag tick) instead of one each. A check starts within half a step of when it
    was due; an interval that is a whole number of steps is kept exactly (the check's own time included)."""
    step = min(_CHECK_STEP_MAX, interval / 8)
    if step <= 0.0:
        return delay
    return max(0.0, round((now + delay) / step) * step - now)


OnChange = Callable[[Endpoint, bool, str], None]
_DEFAULT_OUTLIER = OutlierConfig()


class EndpointHealth:
    """What is known about one endpoint's health. Public attributes are read by the policy and `edged status`."""

    __slots__ = (
        "_fail_detail",
        "_fail_streak",
        "_lag_answer",
        "_lag_busy",
        "_ok_streak",
        "_outlier",
        "_published",
        "_spec",
        "_ttl_deadline",
        "active_ok",
        "busy_since",
        "calls_failed",
        "calls_ok",
        "checks_failed",
        "checks_ok",
        "ejected_until",
        "endpoint_id",
        "inflight",
        "last_detail",
        "last_response_at",
        "latency_ewma",
        "model",
        "peak",
        "sent_sum",
    )

    def __init__(self, endpoint_id: str, outlier: Outlier) -> None:
        self.endpoint_id = endpoint_id
        self.active_ok = True  # optimistic: a new endpoint is usable until checks say otherwise
        self.ejected_until = 0.0
        self.last_detail = ""
        self.latency_ewma: float | None = None
        self.peak = PeakEwma()  # calls' answer times, for the least_loaded strategy (edged.balancer)
        self.model: Model | None = None  # for the predictive strategy (edged.predictive), made on first use
        self.inflight = 0
        self.sent_sum = 0.0  # sum of the send times of the tries in flight: their mean age (edged.predictive)
        self.busy_since = 0.0
        self.last_response_at = 0.0
        self._lag_busy = 0.0  # the event loop's lag total at busy_since
        self._lag_answer = 0.0  # and at last_response_at, when tries were left in flight (`InFlight.finish`)
        self.checks_ok = 0
        self.checks_failed = 0
        self.calls_ok = 0
        self.calls_failed = 0
        self._outlier = outlier
        self._spec: HealthCheckSpec | None = None
        self._ok_streak = 0
        self._fail_streak = 0
        self._fail_detail = ""
        self._ttl_deadline = 0.0
        self._published = True  # the availability last announced through on_change

    def __repr__(self) -> str:
        return (
            f"<EndpointHealth {self.endpoint_id} active_ok={self.active_ok} ejected_until={self.ejected_until:.1f} "
            f"inflight={self.inflight} detail={self.last_detail!r}>"
        )

    def available(self, now: float) -> bool:
        """Usable for calls: healthy by active checks (or none) and not ejected by outlier detection."""
        return self.active_ok and now >= self.ejected_until

    def reason(self, now: float) -> str:
        """Why it is (un)available, for `edged status` and resolve: "healthy", "unhealthy: HTTP 503 (2 checks)"."""
        if not self.active_ok:
            if self._fail_streak:
                plural = "s" if self._fail_streak != 1 else ""
                return f"unhealthy: {self._fail_detail} ({self._fail_streak} check{plural})"
            if self._ok_streak and self._spec is not None:
                return f"unhealthy: {self._fail_detail} ({self._ok_streak}/{self._spec.rise} ok checks)"
            return f"unhealthy: {self._fail_detail}"
        if now < self.ejected_until:
            return f"ejected {self.ejected_until - now:.1f}s more: {self._outlier.reason}"
        return "healthy"


class HealthMonitor:
    """Owns the check tasks and the TTL/ejection sweeper; keeps one EndpointHealth per endpoint id.

    `on_change(endpoint, available, reason)` is called whenever an endpoint's availability flips, and
    `version` bumps with it so that the policy can cache rankings on it.
    """

    def __init__(
        self,
        *,
        outlier: OutlierConfig = _DEFAULT_OUTLIER,
        clock: Callable[[], float] = time.monotonic,
        on_change: OnChange | None = None,
        ssl_context: ssl.SSLContext | None = None,
        check_headers: Callable[[Endpoint], Sequence[tuple[str, str]]] | None = None,
        check_pool: Callable[[Endpoint], UpstreamPool | None] | None = None,
        lag: Callable[[], float] | None = None,
        pool: UpstreamPool | None = None,
    ) -> None:
        self.version = 0
        self._lag_source = lag  # seconds of event-loop lag so far (default: the running loop's, edged.looplag)
        self._outlier_config = outlier
        self._clock = clock
        self._on_change = on_change
        self._ssl_context = ssl_context
        self._states: dict[str, EndpointHealth] = {}
        self._groups: dict[tuple[str, ...], tuple[EndpointHealth, ...]] = {}  # `states_of`: ids -> their states
        self._kept_models: dict[str, Model] = {}  # predictive models from the last run, for endpoints to come
        self._endpoints: dict[str, Endpoint] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # endpoint id -> its check loop
        self._retiring: set[asyncio.Task[None]] = set()  # cancelled, awaited by close()
        self._sweeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._loop_lag: LoopLag | None = None
        # Extra headers for an endpoint's http checks (the edge tier sends its fleet identity to peers' ingresses).
        self._check_headers = check_headers
        # The pool an endpoint's http checks go through, when not a connection per check (peers' ingresses over
        # mutual TLS: the pool's connections are kept alive, so a check costs no handshake).
        self._check_pool = check_pool

    def __repr__(self) -> str:
        down = sum(1 for h in self._states.values() if not h.available(self._clock()))
        return f"<HealthMonitor endpoints={len(self._states)} down={down} tasks={len(self._tasks)} v{self.version}>"

    # -- membership ---------------------------------------------------------------------------------------

    def sync(self, services: Iterable[Service]) -> None:
        """Follow a registry snapshot: start checks of new endpoints, stop those of gone ones, keep the rest.

        Must be called from the event loop. A changed HealthCheckSpec for an id restarts its check.
        """
        if self._closed:
            return
        seen = _endpoints_of(services)
        self._apply(seen, [i for i in self._states if i not in seen])

    def sync_changed(self, before: Iterable[Service], after: Iterable[Service]) -> None:
        """`sync` for some services only (an incremental registry change): `before` as they were, `after` as
        they are now (a service gone is in `before` only). The endpoints of the other services are kept."""
        if self._closed:
            return
        seen = _endpoints_of(after)
        gone = [ep.id for svc in before for ep in svc.endpoints if ep.id not in seen and ep.id in self._states]
        self._apply(seen, gone)

    def _apply(self, seen: dict[str, tuple[Endpoint, HealthCheckSpec | None]], gone: list[str]) -> None:
        now = self._clock()
        if gone:
            self._groups.clear()  # (a state dropped: no tuple of `states_of` may hold it)
        for endpoint_id in gone:
            self._stop_task(endpoint_id)
            self._states.pop(endpoint_id, None)
            self._endpoints.pop(endpoint_id, None)
        for endpoint_id, (endpoint, spec) in seen.items():
            h = self._states.get(endpoint_id)
            if h is None and spec is None:
                # Nothing to check: the state is made at its first use (`state`, a call), healthy as a new one
                # is. Ten thousand remote services a box never calls cost no state each (about 400 bytes).
                continue
            old = self._endpoints.get(endpoint_id)
            self._endpoints[endpoint_id] = endpoint
            if h is None:
                h = self._new_state(endpoint_id)
            elif (
                h._spec == spec
                and old is not None
                and (old.target, old.url) == (endpoint.target, endpoint.url)  # meta changes need no new check
                and (endpoint_id in self._tasks or not _needs_task(endpoint, spec))
            ):
                continue
            self._stop_task(endpoint_id)
            self._set_spec(endpoint, h, spec, now)
            if _needs_task(endpoint, spec):
                assert spec is not None
                self._tasks[endpoint_id] = asyncio.get_running_loop().create_task(
                    self._check_loop(endpoint, h, spec), name=f"edged-health:{endpoint_id}"
                )
        self._ensure_sweeper()

    def state(self, endpoint_id: str) -> EndpointHealth:
        """The health of an endpoint; an unknown id gets a default (healthy) state."""
        h = self._states.get(endpoint_id)
        if h is None:
            h = self._new_state(endpoint_id)
        return h

    def states_of(self, ids: tuple[str, ...]) -> tuple[EndpointHealth, ...]:
        """`state(i)` of each of `ids`, as one tuple kept until a state is made or dropped: the ranker reads
        a service's endpoints' health with one call per decision instead of one lookup per endpoint."""
        got = self._groups.get(ids)
        if got is None:
            got = tuple(map(self.state, ids))  # (may make states, which empties the table: then add this)
            if len(self._groups) >= _MAX_GROUPS:
                self._groups.clear()
            self._groups[ids] = got
        return got

    def available(self, endpoint_id: str, now: float) -> bool:
        """`state(endpoint_id).available(now)` without making a state for an endpoint that has none (a new
        one is available): for readers of every endpoint, such as a metrics scrape of ten thousand."""
        h = self._states.get(endpoint_id)
        return h is None or h.available(now)

    # -- reports -------------------------------------------------------------------------------------------

    def heartbeat(self, endpoint_id: str) -> None:
        """A TTL heartbeat: the endpoint stays healthy for one more ttl. Ignored for endpoints without a TTL check."""
        h = self._states.get(endpoint_id)
        if h is None or h._spec is None or h._spec.kind != "ttl":
            return
        now = self._clock()
        h._ttl_deadline = now + (h._spec.ttl or 0.0)
        h.checks_ok += 1
        h.last_detail = "heartbeat"
        if not h.active_ok:
            h.active_ok = True
            h._fail_streak = 0
            self._publish(h, now)
            self._wake.set()  # its TTL is a deadline again: the sweeper may be asleep with none pending

    def check_result(self, endpoint_id: str, result: CheckResult) -> None:
        """Count the result of a check run elsewhere (the routing simulator, scripts/routesim.py) through the
        same rise/fall as the check tasks; ignored for an endpoint not synced with a check spec."""
        h = self._states.get(endpoint_id)
        endpoint = self._endpoints.get(endpoint_id)
        if h is None or endpoint is None or h._spec is None or h._spec.kind == "ttl":
            return
        self._apply_check(endpoint, h, h._spec, result)

    def call_started(self, endpoint_id: str) -> InFlight:
        """A call to the endpoint began (for in-flight counts and stall detection). Use the handle in a `with`
        block: it gives the count back when the block is left, whether `finish` was called or not."""
        h = self._states.get(endpoint_id) or self.state(endpoint_id)
        load = h.inflight
        now = self._clock()
        if not load:
            h.busy_since = h.sent_sum = now  # (sent_sum: a call_finished with no try begun may have left a remainder)
            lag = self._loop_lag  # _lag(), its common case inline: once per try
            h._lag_busy = lag.total() if lag is not None else self._lag()
        else:
            h.sent_sum += now
        h.inflight = load + 1
        return InFlight(self, h, load, now)

    def call_finished(
        self,
        endpoint: Endpoint,
        service: Service,
        ok: bool,
        latency: float | None,
        *,
        answered: bool | None = None,
        detail: str | None = None,
        reached: bool = True,
        later: bool = False,
        load: int | None = None,
    ) -> None:
        """A call ended. ok=False for connect errors, resets, timeouts and 5xx; feeds outlier detection.

        `later=True`: the answer head is in but its body still streams; `body_ended` gives the outcome.

        `reached=False` says the try never reached the endpoint (a connect failure): a short streak of those ejects.

        `answered` says whether the endpoint sent a response at all (a 5xx did, a timeout did not) and drives
        stall detection; by default a call answered when it was ok or has a latency (the router measures one
        only for responses). `latency` (seconds) feeds the EWMA when given. `load` (calls in flight when the try
        was sent) feeds the predictive model of services that use it.
        """
        # Told as a try's handle tells it (`InFlight.finish`): one place given back (the count stays >= 0),
        # no send time taken off `sent_sum` (the handle's is 0.0).
        InFlight(self, self.state(endpoint.id), load).finish(
            endpoint, service, ok, latency, reached=reached, later=later, answered=answered, detail=detail
        )

    def body_ended(self, endpoint: Endpoint, service: Service, ok: bool) -> None:
        """A streamed answer's body came whole (`ok`) or broke off: the outcome of a call reported `later`."""
        h = self.state(endpoint.id)
        self._outcome(endpoint, service, h, ok, True, None if ok else "answer body broke off", self._clock())

    def _outcome(
        self,
        endpoint: Endpoint,
        service: Service,
        h: EndpointHealth,
        ok: bool,
        reached: bool,
        detail: str | None,
        now: float,
    ) -> None:
        outlier = h._outlier
        if ok:
            h.calls_ok += 1
            h.last_detail = detail or "call ok"
            outlier.success()
            return
        h.calls_failed += 1
        h.last_detail = detail or "call failed"
        policy = service.spec.policy
        model = h.model  # predictive prices a lossy but live endpoint rather than ejecting it (edged.predictive)
        if outlier.failure(
            self._others_available(endpoint.id, service, now),
            connect=not reached,
            accrual=policy.failure_accrual,
            backoff=policy.failure_backoff,
            priced=policy.strategy == "predictive" and model is not None and model.answers_most(now),
        ):
            h.ejected_until = outlier.ejected_until
            self._endpoints.setdefault(endpoint.id, endpoint)  # so that the sweeper can announce its return
            self._publish(h, now, endpoint)
            self._wake.set()  # the sweeper announces the end of the ejection
            self._ensure_sweeper()

    def stalled(self, endpoint_id: str, now: float, threshold: float) -> bool:
        """Calls are in flight and nothing came back for `threshold` seconds (a frozen endpoint).

        Seconds the event loop itself ran late meanwhile do not count: on a slow CPU the answer may be there,
        unread, and a healthy primary must not look frozen (edged.looplag).
        """
        h = self._states.get(endpoint_id)
        if h is None or h.inflight <= 0:
            return False
        if h.busy_since >= h.last_response_at:
            since, lag_then = h.busy_since, h._lag_busy
        else:
            since, lag_then = h.last_response_at, h._lag_answer
        return now - since - (self._lag() - lag_then) >= threshold

    def models(self) -> list[tuple[str, Model]]:
        """The predictive models of the endpoints that have one, and those kept for endpoints not back yet (to
        keep them across restarts)."""
        return [*((eid, h.model) for eid, h in self._states.items() if h.model is not None), *self._kept_models.items()]

    def restore_models(self, models: dict[str, Model]) -> None:
        """Give endpoints the models kept from the last run; an endpoint not known yet (an edge or cloud one
        is discovered later) gets its model when it appears."""
        for eid, model in models.items():
            h = self._states.get(eid)
            if h is not None:
                h.model = model
            else:
                self._kept_models[eid] = model

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel and await every check task and the sweeper (running check commands are killed)."""
        self._closed = True
        for endpoint_id in list(self._tasks):
            self._stop_task(endpoint_id)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._retiring.add(self._sweeper)
            self._sweeper = None
        tasks = list(self._retiring)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._retiring.clear()

    def sweep(self) -> float | None:
        """Expire TTLs and ejections that are over; return the next deadline (clock time) or None.

        The sweeper task calls this; tests may call it directly with a controlled clock.
        """
        now = self._clock()
        nxt: float | None = None
        for endpoint_id, h in list(self._states.items()):
            spec = h._spec
            if spec is not None and spec.kind == "ttl" and h.active_ok:
                if now >= h._ttl_deadline:
                    h.active_ok = False
                    h.checks_failed += 1
                    h._fail_streak = 0
                    h._fail_detail = h.last_detail = f"no heartbeat for {spec.ttl:g}s"
                    self._publish(h, now, self._endpoints.get(endpoint_id))
                elif nxt is None or h._ttl_deadline < nxt:
                    nxt = h._ttl_deadline
            if h.ejected_until:
                if h._outlier.expire():
                    h.ejected_until = 0.0
                    self._publish(h, now, self._endpoints.get(endpoint_id))
                elif nxt is None or h.ejected_until < nxt:
                    nxt = h.ejected_until
        return nxt

    # -- internals -----------------------------------------------------------------------------------------

    def _lag(self) -> float:
        """Lag of the running event loop so far (seconds; 0.0 with no loop: pure use from tests)."""
        lag = self._loop_lag
        if lag is not None:  # the common case first (the call path has it inline)
            return lag.total()
        if self._lag_source is not None:
            return self._lag_source()
        try:
            fresh: LoopLag = loop_lag()
        except RuntimeError:
            return 0.0
        self._loop_lag = fresh
        return fresh.total()

    def _new_state(self, endpoint_id: str) -> EndpointHealth:
        """Make and keep the state of an endpoint that has none."""
        h = self._states[endpoint_id] = EndpointHealth(endpoint_id, Outlier(self._outlier_config, self._clock))
        self._groups.clear()  # (a state made: `states_of`' tuples are made again, so none holds a replaced one)
        if self._kept_models:
            h.model = self._kept_models.pop(endpoint_id, None)
        return h

    def _set_spec(self, endpoint: Endpoint, h: EndpointHealth, spec: HealthCheckSpec | None, now: float) -> None:
        """Adopt a (new or changed) check spec: streaks start over; no check or a TTL check starts healthy."""
        h._spec = spec
        h._ok_streak = h._fail_streak = 0
        if spec is None or spec.kind == "ttl" or endpoint.target is None:
            if spec is not None and spec.kind == "ttl":
                h._ttl_deadline = now + (spec.ttl or 0.0)  # one ttl of grace for the first heartbeat
                self._wake.set()
            elif spec is not None:
                h.last_detail = "not checked"
            h.active_ok = True
            self._publish(h, now, endpoint)

    def _stop_task(self, endpoint_id: str) -> None:
        task = self._tasks.pop(endpoint_id, None)
        if task is not None:
            task.cancel()
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (pure use from tests): availability is still exact, only the announcements wait
        self._sweeper = loop.create_task(self._sweep_loop(), name="edged-health:sweeper")

    async def _sweep_loop(self) -> None:
        """Sleep until the next TTL or ejection deadline, or until a new one is set (`_wake`: a TTL check, an
        ejection, a heartbeat that brings an expired endpoint back; other heartbeats only move a deadline later).
        With no deadline pending it is not woken at all."""
        while True:
            try:
                nxt = self.sweep()
                delay = None if nxt is None else max(0.0, nxt - self._clock())
            except Exception:
                log.exception("health sweep failed")
                delay = _SWEEP_RETRY
            self._wake.clear()
            if delay is None:
                await self._wake.wait()
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _check_loop(self, endpoint: Endpoint, h: EndpointHealth, spec: HealthCheckSpec) -> None:
        """Probe forever: at once, then at a random offset (spreads endpoints), then every interval, each on
        the next step of a grid (`on_grid`); every interval/4 (not below 0.1 s) while a state change is
        pending."""
        first = True
        while True:
            try:
                headers = self._check_headers(endpoint) if self._check_headers is not None else ()
                pool = self._check_pool(endpoint) if self._check_pool is not None else None
                result = await run_check(spec, endpoint, ssl_context=self._ssl_context, headers=headers, pool=pool)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("health check of %s failed", endpoint.id)
                result = CheckResult(ok=False, detail=f"check error: {exc!r}"[:200], latency=0.0)
            try:
                pending = self._apply_check(endpoint, h, spec, result)
            except Exception:
                log.exception("applying the health check of %s failed", endpoint.id)
                pending = False
            if pending:
                delay = max(_FAST_PROBE_MIN, spec.interval / 4)
            elif first:
                delay = on_grid(asyncio.get_running_loop().time(), random.uniform(0.0, spec.interval), spec.interval)
            else:
                delay = on_grid(asyncio.get_running_loop().time(), spec.interval, spec.interval)
            first = False
            await asyncio.sleep(delay)

    def _apply_check(self, endpoint: Endpoint, h: EndpointHealth, spec: HealthCheckSpec, result: CheckResult) -> bool:
        """Count one check result through rise/fall; True while a state change is pending (probe faster)."""
        now = self._clock()
        h.last_detail = result.detail
        if result.ok:
            h.checks_ok += 1
            h._ok_streak += 1
            h._fail_streak = 0
            if result.latency > 0:
                ewma = h.latency_ewma
                h.latency_ewma = result.latency if ewma is None else ewma + _EWMA_ALPHA * (result.latency - ewma)
            if not h.active_ok and h._ok_streak >= spec.rise:
                h.active_ok = True
        else:
            h.checks_failed += 1
            h._fail_streak += 1
            h._ok_streak = 0
            h._fail_detail = result.detail
            if h.active_ok and h._fail_streak >= spec.fall:
                h.active_ok = False
        if h._outlier.active_check(result.ok, spec.rise):
            h.ejected_until = 0.0
        self._publish(h, now, endpoint)
        pending = 0 < h._fail_streak < spec.fall if h.active_ok else 0 < h._ok_streak < spec.rise
        return pending or (h.ejected_until > now and h._ok_streak > 0)

    def _others_available(self, endpoint_id: str, service: Service, now: float) -> int:
        count = 0
        for other in service.endpoints:
            if other.id != endpoint_id:
                h = self._states.get(other.id)
                if h is None or h.available(now):
                    count += 1
        return count

    def _publish(self, h: EndpointHealth, now: float, endpoint: Endpoint | None = None) -> None:
        """Announce an availability flip (once per flip): bump the version and call on_change."""
        available = h.available(now)
        if available == h._published:
            return
        h._published = available
        self.version += 1
        if self._on_change is None:
            return
        endpoint = self._endpoints.get(h.endpoint_id) or endpoint  # the latest synced copy
        if endpoint is None:
            return
        try:
            self._on_change(endpoint, available, h.reason(now))
        except Exception:
            log.exception("health on_change hook failed for %s", h.endpoint_id)


class InFlight:
    """A call's place in one endpoint's in-flight count (tower's `PendingRequests` handle): `finish` reports
    the outcome and gives the place back; leaving the `with` block gives it back if `finish` did not (the call
    was cancelled: nothing is learned about the endpoint)."""

    __slots__ = ("_health", "_load", "_monitor", "_sent")

    def __init__(self, monitor: HealthMonitor, health: EndpointHealth, load: int | None = 0, sent: float = 0.0) -> None:
        self._monitor: HealthMonitor | None = monitor
        self._health = health
        self._load = load  # calls in flight when this one was sent (None: not known, as `call_finished` may say)
        self._sent = sent  # when it was sent (its part of `EndpointHealth.sent_sum`)

    def __enter__(self) -> InFlight:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._monitor is not None:  # release(), inline: once per try
            self._monitor = None
            h = self._health
            if h.inflight > 0:
                h.inflight -= 1
                h.sent_sum -= self._sent  # its send time leaves the mean age of the tries in flight too

    def finish(
        self,
        endpoint: Endpoint,
        service: Service,
        ok: bool,
        latency: float | None,
        *,
        reached: bool = True,
        later: bool = False,
        answered: bool | None = None,
        detail: str | None = None,
    ) -> None:
        """The call ended with this outcome (see `HealthMonitor.call_finished`): health learns of it, and the
        place is given back. Here rather than in a method of the monitor: once per try, one call less."""
        monitor = self._monitor
        if monitor is None:
            return
        self._monitor = None
        h = self._health
        now = monitor._clock()
        # Most tries at low rates end alone: with none left in flight, `sent_sum` is not read (edged.predictive
        # reads it over the tries in flight) and the next try to begin sets it afresh.
        inflight = h.inflight
        if inflight > 1:
            h.inflight = inflight - 1
            h.sent_sum -= self._sent  # its send time leaves the mean age of the tries in flight
        else:
            h.inflight = 0  # (never below: `call_finished` may tell of a try it was not told began)
        if (ok or latency is not None) if answered is None else answered:
            h.last_response_at = now
            # The lag then is read only while other tries are in flight: `stalled` asks for it only with tries in
            # flight and an answer since the first of them began, and with none left the next try begins anew
            # (busy_since, with its own lag, is then the later time).
            if inflight > 1:
                lag = monitor._loop_lag  # _lag(), its common case inline
                h._lag_answer = lag.total() if lag is not None else monitor._lag()
        if latency is not None:
            ewma = h.latency_ewma
            h.latency_ewma = latency if ewma is None else ewma + _EWMA_ALPHA * (latency - ewma)
            h.peak.observe(latency, now)
        if service.spec.policy.strategy == "predictive" and self._load is not None and reached:  # (most are not)
            if h.model is None:
                h.model = Model()
            h.model.observe(now, ok, latency, self._load)
        if later:
            return
        if ok:  # _outcome's common case, inline: once per try
            h.calls_ok += 1
            h.last_detail = detail or "call ok"
            outlier = h._outlier
            if outlier.consecutive_failures or outlier.probation:  # (Outlier.success's own test, inline)
                outlier.success()
            return
        monitor._outcome(endpoint, service, h, ok, reached, detail, now)

    def release(self) -> None:
        """Give the place back without an outcome (idempotent)."""
        if self._monitor is not None:
            self._monitor = None
            h = self._health
            if h.inflight > 0:
                h.inflight -= 1
                h.sent_sum -= self._sent


def _endpoints_of(services: Iterable[Service]) -> dict[str, tuple[Endpoint, HealthCheckSpec | None]]:
    return {ep.id: (ep, svc.spec.health_check) for svc in services for ep in svc.endpoints}


def _needs_task(endpoint: Endpoint, spec: HealthCheckSpec | None) -> bool:
    """A check task runs for http/tcp/command checks of endpoints we can reach over HTTP (not cloud)."""
    return spec is not None and spec.kind != "ttl" and endpoint.target is not None
