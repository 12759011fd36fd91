"""Quotas: token-bucket rate limits and caps on calls at once, per tenant and per (tenant, service).

A call takes one token from each bucket that applies (its tenant's, its service's) and one place in each
in-flight cap, or none of them: over any limit it is refused at once with 429 `rate_limited` and a
`retry-after`, before an endpoint is touched (Envoy's local rate limit: `max_tokens`, refill rate). Limits
come from `[quotas]` in edged.toml (by "TENANT" or "TENANT/SERVICE"), the `authz.quotas` of signed fleet
config and the runtime API (`/v1/authz/quotas/...`), in that order of precedence (the API's win: see
`Gate.set_quotas`), and from a service's own `[policy] quota` (manifest, fleet policy, the policy API), which
any of those keys overrides. A changed limit keeps the tokens its bucket had (it does not refill it).
Buckets exist only for keys with a limit, so their number is bounded by the config, not by callers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .config import _LABEL, LABEL_WHAT
from .document import Table
from .errors import CallError
from .inflight import FREE, Hold, Places
from .model import QuotaSpec

QUOTA_KEYS = ("rate", "burst", "in_flight")
MAX_RATE = 1e6


def load_quota(t: Table) -> QuotaSpec:
    """One quota table: `rate` (calls per second), `burst` (bucket size), `in_flight` (calls at once)."""
    t.only(QUOTA_KEYS)
    spec = QuotaSpec(
        rate=t.number("rate", None, lo=0.001, hi=MAX_RATE),
        burst=t.integer("burst", None, lo=1, hi=10**6),
        in_flight=t.integer("in_flight", None, lo=1, hi=10**6),
    )
    if spec.burst is not None and spec.rate is None:
        t.fail("burst", "a burst needs a rate")
    return spec


def quota_dict(spec: QuotaSpec) -> dict[str, float | int]:
    """A QuotaSpec as the table `load_quota` reads (only the keys it sets)."""
    out: dict[str, float | int] = {}
    if spec.rate is not None:
        out["rate"] = spec.rate
    if spec.burst is not None:
        out["burst"] = spec.burst
    if spec.in_flight is not None:
        out["in_flight"] = spec.in_flight
    return out


class _Bucket:
    """Tokens refilled at `rate` per second up to `size`; starts full."""

    __slots__ = ("last", "rate", "size", "spec", "tokens")

    def __init__(self, spec: QuotaSpec, now: float) -> None:
        self.spec = spec
        self.rate = spec.rate or 0.0
        self.size = float(spec.bucket)
        self.tokens = self.size
        self.last = now

    def refill(self, now: float) -> float:
        """Tokens now (not taken)."""
        if now > self.last:
            self.tokens = min(self.size, self.tokens + (now - self.last) * self.rate)
            self.last = now
        return self.tokens


@dataclass(slots=True)
class _Scope:
    """The limits of one key ("garden" or "garden/thermo") and their state."""

    key: str
    spec: QuotaSpec
    bucket: _Bucket | None
    places: Places = field(default_factory=Places)  # calls holding a place in its in-flight cap

    @property
    def in_flight(self) -> int:
        return self.places.count


def _reshape(scope: _Scope, spec: QuotaSpec, now: float) -> None:
    """A changed limit, in place: tickets out there still count against it, and it does not refill."""
    bucket = _Bucket(spec, now) if spec.rate is not None else None
    if scope.bucket is not None and bucket is not None:
        bucket.tokens = min(bucket.size, scope.bucket.refill(now))
    scope.spec, scope.bucket = spec, bucket


Ticket = Hold  # a call's places in the in-flight caps (edged/inflight.py): given back once, however it ends
__all__ = ["FREE", "Quotas", "Ticket"]


class Quotas:
    """The quotas in force and their buckets. `admit()` takes a call's tokens and places, or raises 429."""

    def __init__(self, configured: Mapping[str, QuotaSpec] = {}, *, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._configured: dict[str, QuotaSpec] = dict(configured)
        self._scopes: dict[str, _Scope] = {}
        # (tenant, service) -> (the service's own quota it was made for, the scopes that apply, those capped)
        self._plans: dict[tuple[str, str], tuple[QuotaSpec | None, tuple[_Scope, ...], tuple[Places, ...]]] = {}
        self.refused = 0

    def configure(self, configured: Mapping[str, QuotaSpec]) -> None:
        """New limits by key (a reload, a runtime change): unchanged keys keep their buckets and counts."""
        self._configured = dict(configured)
        self._plans.clear()
        now = self._clock()
        for key, scope in list(self._scopes.items()):
            spec = self._configured.get(key)
            if spec is None and scope.in_flight == 0:
                del self._scopes[key]
            elif spec is not None and spec != scope.spec:
                _reshape(scope, spec, now)  # now: the new rate counts from this moment

    def configured(self) -> dict[str, QuotaSpec]:
        """The limits of edged.toml and the API, by key."""
        return dict(self._configured)

    def _scope(self, key: str, spec: QuotaSpec, now: float) -> _Scope:
        scope = self._scopes.get(key)
        if scope is None:
            if len(self._scopes) > 4 * len(self._configured) + 4096:  # service quotas of services now gone
                self._scopes = {k: s for k, s in self._scopes.items() if s.in_flight or k in self._configured}
                self._plans.clear()
            scope = self._scopes[key] = _Scope(key, spec, _Bucket(spec, now) if spec.rate is not None else None)
        elif scope.spec != spec:
            _reshape(scope, spec, now)
        return scope

    def admit(self, tenant: str, service: str, service_quota: QuotaSpec | None) -> Ticket:
        """Take one token and one in-flight place of each limit that applies, or raise CallError 429."""
        if not self._configured and service_quota is None:
            return FREE
        plan = self._plans.get((tenant, service))
        if plan is None or plan[0] is not service_quota:
            plan = self._plan(tenant, service, service_quota)
        scopes, capped = plan[1], plan[2]
        if not scopes:
            return FREE
        now = self._clock()
        for scope in scopes:  # check all before taking any: a refusal costs no other limit a token
            bucket = scope.bucket
            if bucket is not None and bucket.refill(now) < 1.0:
                self.refused += 1
                wait = (1.0 - bucket.tokens) / bucket.rate
                raise CallError(
                    429,
                    "rate_limited",
                    f"quota {scope.key!r}: {bucket.rate:g} calls/s (burst {bucket.size:g}); retry in {wait:.3f}s",
                    ((b"retry-after", str(max(1, math.ceil(wait))).encode()),),
                )
            cap = scope.spec.in_flight
            if cap is not None and not scope.places.free(cap):
                self.refused += 1
                detail = f"quota {scope.key!r}: {cap} calls at once"
                raise CallError(429, "rate_limited", detail, ((b"retry-after", b"1"),))
        for scope in scopes:
            if scope.bucket is not None:
                scope.bucket.tokens -= 1.0
        if not capped:
            return FREE
        return Hold.take(capped)

    def _plan(
        self, tenant: str, service: str, service_quota: QuotaSpec | None
    ) -> tuple[QuotaSpec | None, tuple[_Scope, ...], tuple[Places, ...]]:
        """The scopes a call of (tenant, service) passes, worked out once per change of the limits."""
        configured = self._configured
        service_key = f"{tenant}/{service}"
        now = self._clock()
        scopes = []
        for key, spec in ((tenant, configured.get(tenant)), (service_key, configured.get(service_key, service_quota))):
            if spec is not None:
                scopes.append(self._scope(key, spec, now))
        if len(self._plans) >= 4096:
            self._plans.clear()
        plan = (service_quota, tuple(scopes), tuple(s.places for s in scopes if s.spec.in_flight is not None))
        self._plans[(tenant, service)] = plan
        return plan

    def state(self) -> dict[str, dict]:
        """Each limit with its tokens and calls in flight now (for `GET /v1/authz`)."""
        now = self._clock()
        return {
            key: {
                **quota_dict(scope.spec),
                "tokens": None if scope.bucket is None else round(scope.bucket.refill(now), 3),
                "in_flight_now": scope.in_flight,
            }
            for key, scope in sorted(self._scopes.items())
        }


def quota_key(text: str) -> str | None:
    """`TENANT` or `TENANT/SERVICE` as a quota key, or None when it is neither."""
    tenant, _, service = text.partition("/")
    if not _LABEL.fullmatch(tenant) or (service and not _LABEL.fullmatch(service)) or text.endswith("/"):
        return None
    return text


def load_quotas(t: Table) -> Mapping[str, QuotaSpec]:
    """Read `[quotas]`: a table per `"TENANT"` or `"TENANT/SERVICE"` (called by the config loader)."""
    out = {}
    for name in t.names():
        if quota_key(name) is None:
            t.fail(name, f"expected TENANT or TENANT/SERVICE ({LABEL_WHAT} each), got {name!r}")
        out[name] = load_quota(t.table(name))
    return MappingProxyType(out)
