"""Router: one call -> the plan's endpoints in order, within the call's deadline, per-try timeout and retry budget.

Failover happens here, before the caller sees anything: a try that fails to connect, breaks, times out
or answers with a retryable 5xx moves on to the next endpoint of the plan; so does a small answer
(`[limits] answer_buffer`) whose body breaks, as it is read whole before it is accepted. Once a response
head has been accepted, it is the answer (a longer body streams to the caller; no replay after that, and a
break there is reported to health by `settle`). Moving on from
a connect failure (the request never left) does not spend the retry budget.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from . import retry
from .answers import WHOLE_ANSWER, read_whole, streams, wants_whole
from .breaker import Breakers, Gate, endpoint_full
from .budget import RetryBudget
from .call import Call, Transport, UpstreamAnswer
from .errors import CallError, UpstreamError
from .model import Endpoint, PolicySpec, Service
from .policy import Choice, Plan, Ranker, is_stalled
from .race import Outcome, Race
from .registry import Registry
from .routes import RoutePicker
from .telemetry import MeshMetrics

# Floor of the retry budget: retries per second always allowed, so that a quiet service still fails over.
MIN_RETRIES_PER_SECOND = 10.0
RETRY_BUDGET_WINDOW = 10.0

# Strategies whose plan depends only on what `_PlanCache` watches: the service (its snapshot object: endpoints,
# their meta, the policy), the endpoints its transports can send to now, and each endpoint's availability and
# stall state. Their plan is reused while none of those changed. A strategy that reads anything else per call
# (a turn, a random draw, a latency, a count, a breaker) must not be listed here: it is ranked afresh each call.
# A `priority` plan whose starting level was drawn (spillover between partly healthy levels: `Plan.drawn`) is
# not kept either.
CACHEABLE_STRATEGIES = frozenset({"priority"})


class InFlight(Protocol):
    """One try's place in an endpoint's in-flight count: `finish` reports the outcome; `release` (or leaving the
    `with` block) gives the place back in any case (a cancelled try cannot leave the endpoint "busy")."""

    def __enter__(self) -> InFlight: ...
    def __exit__(self, *exc: object) -> None: ...
    def release(self) -> None: ...
    def finish(
        self,
        endpoint: Endpoint,
        service: Service,
        ok: bool,
        latency: float | None,
        *,
        reached: bool = True,
        later: bool = False,
    ) -> None: ...


class HealthSink(Protocol):
    def call_started(self, endpoint_id: str) -> InFlight: ...
    def body_ended(self, endpoint: Endpoint, service: Service, ok: bool) -> None: ...


NO_TRANSPORT = "no transport for this tier"
# An endpoint's health as a plan's making read it: available, stalled (available, calls in flight and no answer
# lately), down. Ints, compared by value: mypyc keeps a tuple[bool, bool] unboxed, and `is` would never hold.
_UP, _STALLED, _DOWN = 0, 1, 2


@dataclass(slots=True)
class _CachedPlan:
    service: Service
    # Each endpoint of the service within the call's tiers: why no transport could send to it (None: one could),
    # and for one that could, its health as the ranking read it (`_UP`, `_STALLED`, `_DOWN`; `_DOWN` for the others).
    rows: tuple[tuple[Endpoint, str | None, int], ...]
    made: tuple[Plan, list[dict]]  # the plan and the endpoints left out by their transport (`Router.plan`)
    evaluations: list[float]  # the plan's strategy's cell of policy_evaluations


class _PlanCache:
    """The last plan per (service, tiers) of a `CACHEABLE_STRATEGIES` strategy, and whether it still holds.

    Ranking builds a plan of frozen values per call (about a tenth of a local call's instructions,
    scripts/callcost.py); checking what the ranking read costs a few attribute reads per endpoint."""

    __slots__ = ("_health", "_plans")

    def __init__(self, health) -> None:
        self._health = health
        self._plans: dict[tuple[tuple[str, str], frozenset[str] | None], _CachedPlan] = {}

    def get(
        self, service: Service, tiers: frozenset[str] | None, now: float, transports: Mapping[str, Transport]
    ) -> tuple[Plan, list[dict]] | None:
        """The plan kept for (service, tiers) and its left-out endpoints if it still holds (`holds`), else None."""
        cached = self.entry(service, tiers)
        return None if cached is None else self.holds(cached, now, transports)

    def entry(self, service: Service, tiers: frozenset[str] | None) -> _CachedPlan | None:
        """The plan kept for (service, tiers), whether it holds or not."""
        cached = self._plans.get((service.spec.key, tiers))
        return cached if cached is not None and cached.service is service else None

    def holds(
        self, cached: _CachedPlan, now: float, transports: Mapping[str, Transport]
    ) -> tuple[Plan, list[dict]] | None:
        """A kept plan and its left-out endpoints, counted as an evaluation, if everything its making read is still
        so; else None. One pass over the endpoints, for their transports' verdicts and their health."""
        service = cached.service
        for ep, why, was in cached.rows:
            transport = transports.get(ep.tier)
            if (NO_TRANSPORT if transport is None else transport.unavailable(ep)) != why:
                return None
            if why is None and self._state(service, ep, now) != was:
                return None
        cached.evaluations[0] += 1
        return cached.made

    def keep(
        self,
        service: Service,
        tiers: frozenset[str] | None,
        now: float,
        whys: list[tuple[Endpoint, str | None]],
        plan: Plan,
        skipped: list[dict],
        evaluations: list[float],
    ) -> _CachedPlan | None:
        """Keep a plan just made at `now` (`whys`: the transports' verdict on each endpoint within `tiers`), but
        not one whose starting level was drawn: traffic spills over between levels by a draw per call."""
        key = (service.spec.key, tiers)
        if plan.drawn:  # this plan is for this call only
            self._plans.pop(key, None)
            return None
        if len(self._plans) >= _MAX_CACHED_PLANS:
            self._plans.clear()  # services come and go: start over rather than keep the gone ones
        rows = tuple((ep, why, _DOWN if why is not None else self._state(service, ep, now)) for ep, why in whys)
        cached = self._plans[key] = _CachedPlan(service, rows, (plan, skipped), evaluations)
        return cached

    def _state(self, service: Service, ep: Endpoint, now: float) -> int:
        """What the ranking reads of an endpoint's health: available now, and stalled now (`is_stalled`, never
        with no call in flight)."""
        st = self._health.state(ep.id)
        if not st.available(now):
            return _DOWN
        if st.inflight and is_stalled(st, ep.id, now, self._health, service.spec.policy.per_try_timeout):
            return _STALLED
        return _UP


_MAX_CACHED_PLANS = 4096


@dataclass(slots=True)
class Routed:
    """The accepted answer and how it was reached."""

    answer: UpstreamAnswer
    endpoint: Endpoint
    tries: int
    service: Service
    started: float
    streamed: bool = False  # its body was still arriving: `Router.settle` reports how it ended


DEADLINE_SLACK = 0.002  # seconds: how early a timer set for the deadline may fire (uvloop: 1 ms ticks)


class _Lane:
    """What a call of one service needs, looked up once per call instead of piece by piece: its breaker gate,
    its retry budget, and the plan kept for its calls to any tier (`_PlanCache`). Made again when the service
    object changes (the gate, by key, and the budget, while its ratio holds, carry over)."""

    __slots__ = ("budget", "gate", "kept", "service")

    def __init__(self, service: Service, gate: Gate, budget: RetryBudget) -> None:
        self.service = service
        self.gate = gate
        self.budget = budget
        self.kept: _CachedPlan | None = None  # (of a `CACHEABLE_STRATEGIES` strategy only)


class _Tally:
    """One (service, tier)'s call metrics as the cells `Router.record` counts into: calls by outcome, and the
    duration histogram's row (edged.telemetry: no label tuple, hash or call per count)."""

    __slots__ = ("buckets", "key", "outcomes", "row")

    def __init__(self, key: tuple[str, str], buckets: tuple[float, ...], row: list[float]) -> None:
        self.key = key
        self.buckets = buckets
        self.row = row
        self.outcomes: dict[str, list[float]] = {}


class Router:
    """Turns calls into tries. Reads the registry snapshot and health; writes results back to health."""

    def __init__(
        self,
        registry: Registry,
        health,  # HealthMonitor: a HealthView and a HealthSink
        transports: Mapping[str, Transport],
        metrics: MeshMetrics,
        ranker: Ranker | None = None,
        clock=time.monotonic,
        whole_answer: int = WHOLE_ANSWER,
    ) -> None:
        self._registry = registry
        self._health = health
        self._transports = transports
        self._metrics = metrics
        self._ranker = ranker or Ranker()
        self._clock = clock
        self._budgets: dict[tuple[str, str], RetryBudget] = {}
        self._lanes: dict[tuple[str, str], _Lane] = {}  # by service key
        self._whole_answer = whole_answer  # answers up to this length are read whole before they are the caller's
        self._plans = _PlanCache(health)
        self._breakers = Breakers()
        self._routes = RoutePicker()  # subsets, splits and match rules (edged/routes.py)
        self._tallies: dict[tuple[str, str], _Tally] = {}  # by (service, tier): see record
        self._evaluations: dict[str, list[float]] = {}  # policy_evaluations' cell per strategy

    def service(self, tenant: str, name: str) -> Service:
        """The service, or 404 `unknown_service`."""
        svc = self._registry.snapshot().get(tenant, name)
        if svc is None:
            raise CallError(404, "unknown_service", f"no service {name!r} for tenant {tenant!r}")
        return svc

    def plan(
        self, service: Service, tiers: frozenset[str] | None = None, *, explain: bool = True, now: float | None = None
    ) -> tuple[Plan, list[dict]]:
        """The plan for one call of this service, and the endpoints left out because their tier is off.
        `now`: the router's clock as the caller just read it (one read less per call)."""
        if now is None:
            now = self._clock()
        if not explain and service.spec.policy.strategy in CACHEABLE_STRATEGIES:  # (as route_service_call)
            kept = self._plans.get(service, tiers, now, self._transports)
            if kept is not None:
                return kept
        return self._make_plan(service, tiers, now, explain)

    def _make_plan(
        self, service: Service, tiers: frozenset[str] | None, now: float, explain: bool
    ) -> tuple[Plan, list[dict]]:
        """`plan` when no kept plan holds: ranked now, and kept if its strategy's plans are."""
        skipped = []
        eps = []
        whys: list[tuple[Endpoint, str | None]] = []  # the transports' verdict on each endpoint within `tiers`
        for ep in service.endpoints:
            if tiers is not None and ep.tier not in tiers:
                continue
            transport = self._transports.get(ep.tier)
            why = NO_TRANSPORT if transport is None else transport.unavailable(ep)
            whys.append((ep, why))
            if why is None:
                eps.append(ep)
            else:
                skipped.append({"endpoint": ep.id, "tier": ep.tier, "reason": why})
        plan = self._ranker.plan(service, self._health, now, eps, explain=explain)
        cell = self._evaluations.get(plan.strategy)
        if cell is None:
            cell = self._evaluations[plan.strategy] = self._metrics.policy_evaluations.cell((plan.strategy,))
        cell[0] += 1
        if not explain and service.spec.policy.strategy in CACHEABLE_STRATEGIES:
            cached = self._plans.keep(service, tiers, now, whys, plan, skipped, cell)
            if tiers is None:  # the lane holds it too: its calls find it without a look-up
                lane = self._lanes.get(service.spec.key)
                if lane is not None and lane.service is service:
                    lane.kept = cached
        return plan, skipped

    async def route_service_call(self, call: Call, service: Service | None = None) -> Routed:
        """Send the call to the best endpoint, failing over along the plan. Raises `CallError` for the caller.
        `service`: the call's service as the caller just looked it up (`service()`), to save a second look-up."""
        started = self._clock()
        if service is None:
            service = self.service(call.tenant, call.service)
        spec = service.spec
        policy = spec.policy
        if policy.routing is not None:  # the call's route: its policy over its subset's endpoints
            service = self._routes.pick(service, call, self._health, started)
            spec = service.spec
            policy = spec.policy
        interface = spec.interface
        if interface is not None and not interface.allows(call.method, call.path.partition("?")[0]):
            raise CallError(
                404, "unknown_method", f"{call.method} {call.path.partition('?')[0]} is not in {spec.name}'s interface"
            )
        lane = self._lanes.get(spec.key)
        if lane is None or lane.service is not service:
            lane = self._lane(service)
        places = lane.gate.places  # the service's breaker: its place is given back by the `finally` below
        now = started  # (the clock is read again after a wait for a place)
        max_inflight = policy.max_inflight
        if not max_inflight or (places.count < max_inflight and not places.waiters):  # Places.free, inline
            places.count += 1  # Gate.try_enter, inline: no hold object per call
        else:
            try:
                await lane.gate.enter(policy, call.deadline - self._clock(), spec.name)  # its hold's place: `places`
            except CallError as exc:
                self._metrics.overloaded.inc((spec.name, exc.detail["limit"]))  # type: ignore[index]
                self.record(spec.name, "none", "overloaded", started)
                raise
            now = self._clock()
        # `plan`, inline: once per call (only plans of `CACHEABLE_STRATEGIES` are kept)
        cached = lane.kept if call.tiers is None else self._plans.entry(service, call.tiers)
        kept = None if cached is None else self._plans.holds(cached, now, self._transports)
        plan, skipped = kept if kept is not None else self._make_plan(service, call.tiers, now, False)
        lane.budget.deposit()
        attempts: list[dict] = []
        full: list[str] = []  # endpoints passed over at their endpoint_max_inflight
        limit = policy.endpoint_max_inflight
        held: Routed | None = None  # the last retryable answer: the caller's if every other try fails too
        race: Race | None = None  # tries running side by side (edged.race), once the plan has no usable one left
        slow: dict | None = None  # the last try, still racing past its per-try timeout
        tries = 0

        try:
            for i, choice in enumerate(plan.choices):
                ep = choice.endpoint
                if limit and endpoint_full(self._health.state(ep.id).inflight, policy):
                    full.append(ep.id)
                    continue
                if tries > 0:  # the first try always goes
                    last = slow or (attempts[-1] if attempts else None)
                    if retry.why_not_retry(policy, tries, last, call.method):
                        break
                    if retry.spends_budget(last) and not lane.budget.try_withdraw():
                        self._metrics.retry_budget_exhausted.inc((spec.name,))
                        attempts.append({"endpoint": ep.id, "error": "retry budget exhausted"})
                        break
                    self._metrics.retries.inc((spec.name, last["error"] if last else "unknown"))
                remaining = call.deadline - self._clock()
                if remaining <= 0:
                    break
                tries += 1
                later = i + 1 < len(plan.choices) and tries <= policy.retries  # another try could follow
                if race is None and (not later or _usable_after(plan.choices, i)):
                    # A plain try: cut short by the per-try timeout while a usable endpoint is left to move on
                    # to; the last try the call can make has until the deadline.
                    answer, failed = await self._attempt(ep, service, call, policy, remaining, not later)
                    if failed is None and held is None:  # the common case, without the bookkeeping below
                        if tries > 1:
                            self._metrics.failovers.inc((spec.name,))
                        streamed = not answer.complete and call.method != "HEAD"  # type: ignore[union-attr]
                        return Routed(answer, ep, tries, service, started, streamed)  # type: ignore[arg-type]
                    outcomes = [(ep, answer, failed)]
                else:
                    # No usable endpoint left to move on to (only stalled or down ones): the per-try timeout
                    # brings the next choice in, and the slow try stays in the race (edged.race).
                    race = race or Race()
                    outrun: list[bool] = [False]
                    current = race.start(ep, self._attempt(ep, service, call, policy, remaining, outrun=outrun))
                    outcomes = await race.wait(current, policy.per_try_timeout if later else None, remaining)
                    # Still running with no answer in: its per-try timeout passed, and the next choice goes too.
                    outrun[0] = not current.done() and all(failed is not None for _, _, failed in outcomes)
                    slow = {"endpoint": ep.id, "error": "slow", "reached": True} if outrun[0] else None
                routed, held = self._take(outcomes, held, tries, attempts, service, started, call.method)
                if routed is not None:
                    return routed
            while race:  # the plan is through: what is still racing has until the deadline
                outcomes = await race.wait(None, None, call.deadline - self._clock())
                routed, held = self._take(outcomes, held, tries, attempts, service, started, call.method)
                if routed is not None:
                    return routed
            if held is not None:
                # Every try failed and the last real answer was a retryable 5xx: the caller gets that answer.
                held.tries = tries
                routed, held = held, None
                return routed
        except BaseException:
            # Cancelled (the caller left) while holding an answer: give its connection back. Every return
            # above leaves `held` None, so only a raise can leave one held. Not in the `finally`: mypy checks a
            # finally block last as reached by falling through the try, where `held` is None, and mypyc then
            # compiles `held` there as None (a TypeError when it is not).
            if held is not None:
                held.answer.discard()
            raise
        finally:
            if places.waiters:  # Places.give, inline: a call waits for this place
                places.give()
            else:
                places.count -= 1
            if race is not None:
                # Tries still racing are cancelled, not awaited: mypyc (2.4.1) compiles an await in a finally
                # block (or in an except that re-raises) so that leaving the try normally re-raises any
                # exception the caller is handling. And no `async with` either: it costs ~5k instructions a call.
                race.abandon()
        if full and not tries:
            self._metrics.overloaded.inc((spec.name, "endpoint_max_inflight"))
            self.record(spec.name, "none", "overloaded", started)
            limit_hit = {"service": spec.name, "limit": "endpoint_max_inflight", "value": policy.endpoint_max_inflight}
            raise CallError(503, "overloaded", {**limit_hit, "endpoints": full})
        # A try cut at the deadline may end up to a timer tick early (libuv's timers count milliseconds): within
        # DEADLINE_SLACK of it the call ran out of time, and the caller hears 504, not 503.
        outcome = "deadline" if call.deadline - self._clock() <= DEADLINE_SLACK else "no_endpoint"
        self.record(spec.name, "none", outcome, started)
        if outcome == "deadline":
            raise CallError(504, "deadline", {"service": spec.name, "tries": attempts})
        detail: dict = {"service": spec.name, "tries": attempts}
        if skipped:
            detail["skipped"] = skipped
        if full:
            detail["full"] = full
        if not plan.choices and not skipped:
            detail["reason"] = "the service has no endpoints"
        if plan.note:
            detail["note"] = plan.note
        raise CallError(503, "no_endpoint", detail)

    def _take(
        self,
        outcomes: list[Outcome],
        held: Routed | None,
        tries: int,
        attempts: list[dict],
        service: Service,
        started: float,
        method: str,
    ) -> tuple[Routed | None, Routed | None]:
        """Note what tries came to: (the caller's answer if one is, the retryable answer held meanwhile); each
        failure goes to `attempts`. A method, not a closure: a closure made per call costs every call."""
        won = None
        for answered_by, answer, failed in outcomes:
            if failed is None and won is None:
                streamed = streams(answer, method)  # type: ignore[arg-type]
                won = Routed(answer, answered_by, tries, service, started, streamed)  # type: ignore[arg-type]
            elif failed is None:
                answer.discard()  # type: ignore[union-attr]  # a second answer in the same instant
            else:
                attempts.append(failed)
                if answer is not None:
                    if held is not None:
                        held.answer.discard()
                    held = Routed(answer, answered_by, tries, service, started)
        if won is not None:
            if held is not None:
                held.answer.discard()
                held = None
            if tries > 1:
                self._metrics.failovers.inc((service.spec.name,))
        return won, held

    async def _attempt(
        self,
        ep: Endpoint,
        service: Service,
        call: Call,
        policy: PolicySpec,
        remaining: float,
        whole: bool = False,
        outrun: list[bool] | None = None,
    ) -> tuple[UpstreamAnswer | None, dict | None]:
        """One try: (answer, None) when the answer is the caller's, (answer, failure) for a retryable status,
        (None, failure) when no answer came. Health hears of the outcome; the in-flight count is given back
        whatever happens, cancellation included. `whole`, or racing (`outrun` given): the try has the
        `remaining` time, not the per-try timeout; a racing try cancelled once `outrun[0]` was set (its per-try
        timeout had passed, and another try answered first) counts as timed out."""
        timeout = remaining if whole or outrun is not None else min(policy.per_try_timeout, remaining)
        ms = remaining * 1000  # at least 1 ms; %d truncates a float as int() does (no calls, once per try)
        headers = [
            *call.headers,
            (b"x-request-id", call.request_id.encode()),
            (b"x-edged-timeout-ms", b"%d" % (ms if ms >= 1.0 else 1)),
        ]
        t0 = self._clock()
        # Every way out gives the place back once: `finish` with the outcome, else `release` (a cancelled try).
        # Handlers rather than `with flight:`, whose __enter__ and __exit__ calls cost about 2k instructions a
        # try, or a finally, whose `release` would run after every `finish` too.
        flight = self._health.call_started(ep.id)
        try:
            answer = await self._transports[ep.tier].send(ep, call, headers, timeout)
            if not answer.complete and wants_whole(answer, call.method, self._whole_answer):
                try:  # a small answer is read whole first: a break in it fails over like a reset
                    answer = await read_whole(answer, ep.id, call.deadline - self._clock())
                except UpstreamError as exc:
                    flight.finish(ep, service, False, None)
                    self._metrics.body_breaks.inc((service.name, "failover"))
                    kind = "body_" + exc.kind
                    return None, {"endpoint": ep.id, "error": kind, "detail": exc.detail, "reached": True}
        except UpstreamError as exc:
            flight.finish(ep, service, False, None, reached=exc.reached)
            return None, {"endpoint": ep.id, "error": exc.kind, "detail": exc.detail, "reached": exc.reached}
        except asyncio.CancelledError:
            if outrun is not None and outrun[0]:
                flight.finish(ep, service, False, None)
            else:
                flight.release()
            raise
        except BaseException:
            flight.release()
            raise
        latency = self._clock() - t0
        # retry.answer_error, with its common case (a status not retried) inline: once per try
        error = retry.answer_error(answer.status, policy) if answer.status in policy.retry_on_status else None
        if error is None and not answer.complete and call.method != "HEAD":  # answers.streams, inline
            flight.finish(ep, service, True, latency, later=True)  # ok or not once the body is through
        else:
            flight.finish(ep, service, error is None, latency)
        if error is not None:
            return answer, {"endpoint": ep.id, "error": error, "reached": True}
        return answer, None

    def settle(self, routed: Routed, ok: bool) -> None:
        """A streamed answer's body ended (`ok`) or broke: health hears of it now (consecutive breaks eject)."""
        if routed.streamed:
            routed.streamed = False
            self._health.body_ended(routed.endpoint, routed.service, ok)
            if not ok:
                self._metrics.body_breaks.inc((routed.service.name, "truncated"))

    def record(self, service: str, tier: str, outcome: str, started: float) -> None:
        """Count a finished call (the API calls this once the answer's body is through)."""
        tally = self._tallies.get((service, tier))
        if tally is None:
            tally = self._tally(service, tier)
        cell = tally.outcomes.get(outcome)
        if cell is None:
            cell = tally.outcomes[outcome] = self._metrics.calls.cell((service, tier, outcome))
        cell[0] += 1
        seconds = self._clock() - started
        row = tally.row  # Histogram.observe, on the series' row: its bucket and the sum (the count is their total)
        row[bisect_left(tally.buckets, seconds)] += 1
        row[-1] += seconds

    def _tally(self, service: str, tier: str) -> _Tally:
        if len(self._tallies) >= _MAX_CACHED_PLANS:
            self._tallies.clear()  # services come and go: start over rather than keep the gone ones
        key = (service, tier)
        seconds = self._metrics.call_seconds
        tally = self._tallies[key] = _Tally(key, seconds.buckets, seconds.row(key))
        return tally

    def _lane(self, service: Service) -> _Lane:
        if len(self._lanes) >= _MAX_CACHED_PLANS:
            self._lanes.clear()  # services come and go: start over rather than keep the gone ones
        key = service.spec.key
        lane = self._lanes[key] = _Lane(service, self._breakers.gate(key), self._budget(service))
        return lane

    def _budget(self, service: Service) -> RetryBudget:
        key = service.spec.key
        budget = self._budgets.get(key)
        if budget is None or budget.ratio != service.spec.policy.retry_budget:
            budget = RetryBudget(
                ratio=service.spec.policy.retry_budget,
                min_per_second=MIN_RETRIES_PER_SECOND,
                ttl=RETRY_BUDGET_WINDOW,
                clock=self._clock,
            )
            self._budgets[key] = budget
        return budget


def _usable_after(choices: tuple[Choice, ...], i: int) -> bool:
    """Whether a usable (healthy, not stalled) endpoint comes after choice `i` of the plan."""
    for j in range(i + 1, len(choices)):  # noqa: SIM110  (a loop: no generator object on the call path)
        if choices[j].usable:
            return True
    return False
