"""Router: one call -> the plan's endpoints in order, within the call's deadline, per-try timeout and retry budget.

Failover happens here, before the caller sees anything: a try that fails to connect, breaks, times out
or answers with a retryable 5xx moves on to the next endpoint of the plan. Once a response head has
been accepted, it is the answer (its body streams to the caller; no replay after that).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .budget import RetryBudget
from .errors import CallError, UpstreamError
from .model import IDEMPOTENT_METHODS, Endpoint, Service
from .policy import Plan, Ranker
from .registry import Registry
from .telemetry import MeshMetrics

# Floor of the retry budget: retries per second always allowed, so that a quiet service still fails over.
MIN_RETRIES_PER_SECOND = 10.0
RETRY_BUDGET_WINDOW = 10.0


class UpstreamAnswer(Protocol):
    """What a transport returns once a response head is in (HTTP or MQTT alike)."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    content_length: int | None
    complete: bool  # the whole body is already here

    async def read(self) -> bytes: ...
    def discard(self) -> None: ...


class Transport(Protocol):
    """How endpoints of one tier are called."""

    def unavailable(self) -> str | None:
        """None when calls can be sent now, else why not (e.g. "broker disconnected")."""

    async def send(
        self, endpoint: Endpoint, call: Call, headers: list[tuple[bytes, bytes]], timeout: float
    ) -> UpstreamAnswer:
        """One try. Raises `UpstreamError` subclasses; `timeout` covers everything up to the response head."""


class HealthSink(Protocol):
    def call_started(self, endpoint_id: str) -> None: ...
    def call_finished(self, endpoint: Endpoint, service: Service, ok: bool, latency: float | None) -> None: ...


@dataclass(slots=True)
class Call:
    """A call as it enters the router: everything needed to send it, again if need be."""

    tenant: str
    service: str
    method: str
    path: str  # within the service, with the query: "/readings?x=1"
    headers: list[tuple[bytes, bytes]]  # already stripped of hop-by-hop headers
    body: bytes
    deadline: float  # monotonic time by which the caller must have its answer
    request_id: str
    tiers: frozenset[str] | None = None  # only these tiers (the ingress serves peers from "local" only)


@dataclass(slots=True)
class Routed:
    """The accepted answer and how it was reached."""

    answer: UpstreamAnswer
    endpoint: Endpoint
    tries: int
    service: Service
    started: float
    attempts: list[dict] = field(default_factory=list)


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
    ) -> None:
        self._registry = registry
        self._health = health
        self._transports = transports
        self._metrics = metrics
        self._ranker = ranker or Ranker()
        self._clock = clock
        self._budgets: dict[tuple[str, str], RetryBudget] = {}

    def service(self, tenant: str, name: str) -> Service:
        """The service, or 404 `unknown_service`."""
        svc = self._registry.snapshot().get(tenant, name)
        if svc is None:
            raise CallError(404, "unknown_service", f"no service {name!r} for tenant {tenant!r}")
        return svc

    def plan(
        self, service: Service, tiers: frozenset[str] | None = None, *, explain: bool = True
    ) -> tuple[Plan, list[dict]]:
        """The plan for one call of this service, and the endpoints left out because their tier is off."""
        skipped = []
        eps = []
        for ep in service.endpoints:
            if tiers is not None and ep.tier not in tiers:
                continue
            transport = self._transports.get(ep.tier)
            why = "no transport for this tier" if transport is None else transport.unavailable()
            if why is None:
                eps.append(ep)
            else:
                skipped.append({"endpoint": ep.id, "tier": ep.tier, "reason": why})
        plan = self._ranker.plan(service, self._health, self._clock(), eps, explain=explain)
        self._metrics.policy_evaluations.inc((plan.strategy,))
        return plan, skipped

    async def route_service_call(self, call: Call) -> Routed:
        """Send the call to the best endpoint, failing over along the plan. Raises `CallError` for the caller."""
        started = self._clock()
        service = self.service(call.tenant, call.service)
        spec = service.spec
        interface = spec.interface
        if interface is not None and not interface.allows(call.method, call.path.partition("?")[0]):
            raise CallError(
                404, "unknown_method", f"{call.method} {call.path.partition('?')[0]} is not in {spec.name}'s interface"
            )
        plan, skipped = self.plan(service, call.tiers, explain=False)
        budget = self._budget(service)
        budget.deposit()
        policy = spec.policy
        replay_ok = call.method in IDEMPOTENT_METHODS or policy.retry_non_idempotent
        attempts: list[dict] = []
        last_answer: UpstreamAnswer | None = None
        last_endpoint: Endpoint | None = None
        tries = 0
        for choice in plan.choices:
            ep = choice.endpoint
            if tries > policy.retries:
                break
            if tries > 0:
                if attempts and attempts[-1].get("reached") and not replay_ok:
                    break  # a non-idempotent call that may have arrived is not sent twice
                if not budget.try_withdraw():
                    self._metrics.retry_budget_exhausted.inc((spec.name,))
                    attempts.append({"endpoint": ep.id, "error": "retry budget exhausted"})
                    break
                self._metrics.retries.inc((spec.name, attempts[-1]["error"] if attempts else "unknown"))
            remaining = call.deadline - self._clock()
            if remaining <= 0:
                break
            timeout = min(policy.per_try_timeout, remaining)
            headers = [
                *call.headers,
                (b"x-request-id", call.request_id.encode()),
                (b"x-edged-timeout-ms", str(max(1, int(remaining * 1000))).encode()),
            ]
            tries += 1
            t0 = self._clock()
            self._health.call_started(ep.id)
            try:
                answer = await self._transports[ep.tier].send(ep, call, headers, timeout)
            except UpstreamError as exc:
                self._health.call_finished(ep, service, False, None)
                attempts.append({"endpoint": ep.id, "error": exc.kind, "detail": exc.detail, "reached": exc.reached})
                continue
            latency = self._clock() - t0
            if answer.status in policy.retry_on_status:
                self._health.call_finished(ep, service, False, latency)
                attempts.append({"endpoint": ep.id, "error": f"http_{answer.status}", "reached": True})
                if last_answer is not None:
                    last_answer.discard()
                last_answer, last_endpoint = answer, ep
                continue
            self._health.call_finished(ep, service, True, latency)
            if last_answer is not None:
                last_answer.discard()
            if tries > 1:
                self._metrics.failovers.inc((spec.name,))
            return Routed(answer, ep, tries, service, started, attempts)
        if last_answer is not None and last_endpoint is not None:
            # Every try failed and the last real answer was a retryable 5xx: the caller gets that answer.
            return Routed(last_answer, last_endpoint, tries, service, started, attempts)
        outcome = "deadline" if call.deadline - self._clock() <= 0 else "no_endpoint"
        self.record(spec.name, "none", outcome, started)
        if outcome == "deadline":
            raise CallError(504, "deadline", {"service": spec.name, "tries": attempts})
        detail: dict = {"service": spec.name, "tries": attempts}
        if skipped:
            detail["skipped"] = skipped
        if not plan.choices and not skipped:
            detail["reason"] = "the service has no endpoints"
        if plan.note:
            detail["note"] = plan.note
        raise CallError(503, "no_endpoint", detail)

    def record(self, service: str, tier: str, outcome: str, started: float) -> None:
        """Count a finished call (the API calls this once the answer's body is through)."""
        self._metrics.calls.inc((service, tier, outcome))
        self._metrics.call_seconds.observe((service, tier), self._clock() - started)

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
