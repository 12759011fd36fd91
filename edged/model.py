"""Values that flow through the mesh: service specs, endpoints, targets. Frozen, so snapshots can share them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from .methods import MethodTable, PathPattern

if TYPE_CHECKING:
    from .routes import Routing

Tier = Literal["local", "edge", "cloud"]
TIERS: tuple[str, ...] = ("local", "edge", "cloud")
STRATEGIES: tuple[str, ...] = ("priority", "least_loaded", "latency", "weighted", "geo", "round_robin", "predictive")
LEVELS: tuple[str, ...] = ("tier", "priority", "none")  # what makes a priority level (see edged/spillover.py)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "*"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Target:
    """Where an HTTP endpoint listens: TCP host:port or a Unix socket path, plus a base path."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""  # Unix socket path when kind == "unix"
    base_path: str = ""  # prefix put before the called path ("" or "/api")
    tls: bool = False

    @property
    def key(self) -> str:
        """Identity of the connection pool this target uses."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def host_header(self) -> str:
        if self.kind == "unix":
            return "localhost"
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_target(url: str) -> Target:
    """Parse `http://host:port[/base]`, `https://...` or `unix:/path/to.sock`; ValueError if not one of those."""
    if url.startswith("unix:"):
        path = url[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket URL needs an absolute path: {url!r}")
        return Target(kind="unix", path=path)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint URL must be http://, https:// or unix:/path, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"endpoint URL has no host: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ValueError(f"endpoint URL has a bad port: {url!r}") from exc
    return Target(
        kind="tcp",
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        tls=parts.scheme == "https",
    )


@dataclass(frozen=True, slots=True)
class MethodRule:
    """One declared method of an interface: an HTTP verb and a path pattern (`{name}` = one segment, `*` = rest)."""

    verb: str
    pattern: str
    matcher: PathPattern = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> MethodRule:
        """From "GET /readings/{id}"; ValueError when it is not "VERB /path" (see edged/methods.py)."""
        parts = text.split()
        if len(parts) != 2 or not parts[1].startswith("/"):
            raise ValueError(f"method must look like 'GET /path', got {text!r}")
        verb = parts[0].upper()
        if verb not in HTTP_METHODS:
            raise ValueError(f"unknown HTTP method {parts[0]!r} in {text!r}")
        return cls(verb=verb, pattern=parts[1], matcher=PathPattern.parse(parts[1]))

    def matches(self, method: str, path: str) -> bool:
        if self.verb != "*" and self.verb != method and not (self.verb == "GET" and method == "HEAD"):
            return False
        return self.matcher.matches(path)


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    """What a service answers. An empty `methods` tuple means the interface declares no restriction."""

    version: str | None = None
    methods: tuple[MethodRule, ...] = ()
    source: str = "inline"  # "inline" or the .proto file it came from
    table: MethodTable = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", MethodTable((rule.verb, rule.matcher) for rule in self.methods))

    def allows(self, method: str, path: str) -> bool:
        """Whether a call `method path` (path without query) is one the interface declares."""
        if not self.methods:
            return True
        return self.table.allows(method, path)


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    """Active health check of a service's endpoints (manifest `[health_check]`)."""

    kind: Literal["http", "tcp", "command", "ttl"]
    http_path: str | None = None
    command: str | None = None
    ttl: float | None = None  # seconds; for kind == "ttl"
    interval: float = 2.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """A rate limit (token bucket) and a cap on calls at once; None: no limit of that kind."""

    rate: float | None = None  # calls per second (the bucket refills at this rate)
    burst: int | None = None  # bucket size; None: the rate, at least 1
    in_flight: int | None = None  # calls at once

    @property
    def bucket(self) -> int:
        """The bucket size in force."""
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate or 1))


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """How the router treats calls of a service (manifest `[policy]`)."""

    strategy: str = "priority"
    retries: int = 2
    per_try_timeout: float = 5.0
    timeout: float = 15.0  # whole-call deadline unless the caller sends a shorter one
    retry_budget: float = 0.2
    retry_on_status: frozenset[int] = frozenset({502, 503, 504})
    retry_non_idempotent: bool = False
    battery_min: int | None = None  # skip endpoints whose node reports a battery below this (0..100)
    on_power: bool = False  # skip endpoints whose node runs on battery
    allow: tuple[str, ...] = ()  # callers allowed (globs over caller ids); when set, the others are denied
    deny: tuple[str, ...] = ()  # callers denied, whatever else allows them
    quota: QuotaSpec | None = None  # per (tenant, service): rate and calls at once
    # least_loaded (edged/balancer.py): the cost assumed for an endpoint with no measured call yet
    default_rtt: float = 0.030
    # priority levels and spillover (edged/spillover.py, Envoy's formula)
    levels: str = "tier"  # "tier": a level per (priority, tier); "priority": per priority; "none": one level
    overprovisioning: float = 1.4  # a level keeps all traffic while healthy share x this >= 100 %
    panic_threshold: int = 50  # % healthy across levels below which health verdicts are ignored
    # circuit breakers (edged/breaker.py); 0 = no limit
    max_inflight: int = 1024  # calls of the service in flight at once; beyond, they wait (max_pending) or get 503
    max_pending: int = 0  # calls allowed to wait for a place when the service is at max_inflight
    endpoint_max_inflight: int = 0  # tries in flight to one endpoint; beyond, the call goes to the next endpoint
    failure_accrual: int = 3  # failed calls in a row that take an endpoint out (outlier detection)
    failure_backoff: float = 10.0  # first time out; the n-th recent one lasts n times this (at most 300 s)
    cloud_max_share: int = 100  # predictive (edged/predictive.py): at most this % of calls go to the cloud first
    routing: Routing | None = None  # subsets, splits and match rules (edged/routes.py); None: every call alike
    # geo (edged/locality.py): zone -> weight of the zones that share one step of the spill order, and what
    # orders localities after the caller's zone: "rtt" (measured, else estimated from distance) or "distance"
    zone_weights: tuple[tuple[str, int], ...] = ()
    geo_order: str = "rtt"


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """An endpoint as a manifest declares it (long form `[[endpoints]]`)."""

    tier: str
    url: str | None = None  # local/edge HTTP endpoints
    mdns: str | None = None  # edge: every instance of this DNS-SD type
    priority: int | None = None  # None: the service's priority
    weight: int = 100
    labels: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs: what splits and rules select by


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A service as declared by a manifest or a registration."""

    name: str
    tenant: str = DEFAULT_TENANT
    priority: int = 10
    interface: InterfaceSpec | None = None
    endpoint_types: tuple[str, ...] = TIERS
    endpoints: tuple[EndpointSpec, ...] = ()
    health_check: HealthCheckSpec | None = None
    policy: PolicySpec = PolicySpec()
    advertise: str | None = None
    source: str = ""  # file path, or "register:<id>"
    registration_min_priority: int | None = None  # `[registration] min_priority`: best rank a registration may take

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.name)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A concrete, routable endpoint of a service. `id` is stable across reloads so health state follows it."""

    id: str
    service: str
    tenant: str
    tier: str
    url: str
    priority: int
    weight: int
    source: str  # "manifest", "register", "mdns", "mqtt"
    target: Target | None = None  # None for tiers not called over HTTP (cloud)
    meta: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs (edged/routes.py): `version = "2"`


@dataclass(frozen=True, slots=True)
class Service:
    """A service in a registry snapshot: its spec and its current concrete endpoints."""

    spec: ServiceSpec
    endpoints: tuple[Endpoint, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tenant(self) -> str:
        return self.spec.tenant
