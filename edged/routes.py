"""Routes: endpoint labels, labelled subsets, weighted splits across them, and ordered match rules.

The shape of Consul's service-resolver subsets, service-splitter and service-router, and of Gateway API's
HTTPRoute, as three keys of a service's policy (manifest `[policy]`, fleet config, `/v1/policies`):

    subsets = {v1 = {version = "1"}, v2 = {version = "2"}}       # name -> the labels an endpoint must carry
    splits = [{subset = "v1", weight = 90}, {subset = "v2", weight = 10}]   # the default route
    routes = [{match = {headers = [{name = "x-canary", exact = "1"}]}, subset = "v2"},
              {match = {path_prefix = "/admin"}, policy = {strategy = "round_robin", retries = 0}}]

The router asks `RoutePicker.pick` once per call, before ranking: the first rule whose match holds for the
call (methods, exact path or path prefix, headers) gives a subset, a split, or a policy of its own; no rule
matches: the default split (or every endpoint). A split draws one subset per call by weight; a drawn subset
with no healthy endpoint gives its share to the others. The chosen subset is then ranked by the (route's)
strategy, so every strategy works within it. A service with no `routing` pays one attribute test.

Everything is bounded: labels per endpoint, subsets, split entries, rules, header matchers and every length.
Header values from callers are compared as bytes (equal / starts with / present): no pattern, no regex.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .call import Call
from .document import Table
from .model import HTTP_METHODS, Endpoint, PolicySpec, Service
from .paths import normalize_path

# -- limits ----------------------------------------------------------------------------------------------
MAX_LABELS = 8  # per endpoint
MAX_SUBSETS = 16  # per service
MAX_SPLITS = 16  # entries of one split
MAX_ROUTES = 32  # match rules per service
MAX_HEADER_MATCHES = 8  # per rule
MAX_PATH = 256  # characters of a path or path prefix in a rule
MAX_HEADER_VALUE = 256  # characters of a header value in a rule
MAX_WEIGHT = 10_000
MAX_SAMPLE_HEADERS = 64  # headers of a dry-run's sample request
FALLBACK = 2  # endpoints of the other subsets that follow a drawn subset's own, as a last resort

LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9._-]{0,30}[a-z0-9])?")
LABEL_KEY_WHAT = "a label name of a-z, 0-9, '.', '_' and '-' (at most 32 characters)"
LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,46}[A-Za-z0-9])?")
LABEL_VALUE_WHAT = "a label value of letters, digits, '.', '_' and '-' (at most 48 characters)"
_NAME = re.compile(r"[a-z0-9]([a-z0-9_-]{0,30}[a-z0-9])?")
_NAME_WHAT = "a name of a-z, 0-9, '_' and '-' (at most 32 characters)"
_HEADER = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")
_HEADER_WHAT = "an HTTP header name (at most 64 characters)"
_PATH = re.compile(rf"/[^\s?#]{{0,{MAX_PATH - 1}}}")
_PATH_WHAT = f"a path starting with '/' (no spaces, '?' or '#'; at most {MAX_PATH} characters)"
_HEADER_VALUE = re.compile(rf"[\x20-\x7e]{{1,{MAX_HEADER_VALUE}}}")
_HEADER_VALUE_WHAT = f"printable ASCII text (at most {MAX_HEADER_VALUE} characters)"

POLICY_KEYS = ("subsets", "splits", "routes")  # the [policy] keys this module reads
# What a rule's own `policy` may change. Not the keys a service has once whatever the route (its gate's
# max_inflight/max_pending, its retry budget, its endpoints' failure accrual, who may call it), nor routes.
RULE_POLICY_KEYS = (
    "strategy",
    "retries",
    "per_try_timeout",
    "timeout",
    "retry_on_status",
    "retry_non_idempotent",
    "battery_min",
    "on_power",
    "default_rtt",
    "levels",
    "overprovisioning",
    "panic_threshold",
    "endpoint_max_inflight",
    "cloud_max_share",
)

Labels = tuple[tuple[str, str], ...]


# -- labels ------------------------------------------------------------------------------------------------


def parse_labels(t: Table, key: str) -> Labels:
    """`labels = {version = "2"}` of a manifest endpoint (or a subset): sorted pairs; ConfigError naming the key."""
    if not t.has(key):
        return ()
    sub = t.table(key)
    if len(sub) > MAX_LABELS:
        t.fail(key, f"at most {MAX_LABELS} labels, got {len(sub)}")
    pairs = []
    for name in sub.names():
        if not LABEL_KEY.fullmatch(name):
            sub.fail(name, f"expected {LABEL_KEY_WHAT}, got {name!r}")
        pairs.append((name, sub.string(name, pattern=LABEL_VALUE, what=LABEL_VALUE_WHAT)))
    return tuple(sorted(pairs))


def wire_labels(obj: object) -> Labels:
    """Labels a peer or the fleet registry sent (untrusted): the well-formed pairs, at most `MAX_LABELS`;
    never raises (anything garbled is left out)."""
    if not isinstance(obj, Mapping):
        return ()
    pairs = []
    for name, value in obj.items():
        if (
            isinstance(name, str)
            and isinstance(value, str)
            and LABEL_KEY.fullmatch(name)
            and LABEL_VALUE.fullmatch(value)
        ):
            pairs.append((name, value))
            if len(pairs) == MAX_LABELS:
                break
    return tuple(sorted(pairs))


def common_labels(endpoints: Iterable[Endpoint]) -> Labels:
    """The labels every one of `endpoints` carries alike: what a node says of a service it offers to peers
    (its ingress routes among its own endpoints, so a label they disagree on says nothing of it)."""
    common: set[tuple[str, str]] | None = None
    for ep in endpoints:
        common = set(ep.labels) if common is None else common & set(ep.labels)
    return tuple(sorted(common or ()))


# -- the compiled form -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subset:
    """Endpoints that carry every one of `labels` (no labels: every endpoint)."""

    name: str
    labels: Labels

    def holds(self, ep: Endpoint) -> bool:
        have = ep.labels
        return all(pair in have for pair in self.labels)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One header condition: `exact` / `prefix` value, or `present` (true: any value; false: absent)."""

    name: bytes
    kind: str  # "exact" | "prefix" | "present" | "absent"
    value: bytes = b""

    def holds(self, value: bytes | None) -> bool:
        kind = self.kind
        if kind == "exact":
            return value == self.value
        if kind == "prefix":
            return value is not None and value.startswith(self.value)
        return (value is not None) == (kind == "present")


@dataclass(frozen=True, slots=True)
class Rule:
    """A match rule: all its conditions hold for a call, or it does not match. Its action: a split (a single
    subset is a split of one), a policy, or both."""

    index: int
    name: str
    methods: frozenset[str]  # empty: any method
    path: str | None  # exact path
    prefix: str | None  # path prefix, by whole segments ("/admin" matches /admin and /admin/x, not /administrator)
    headers: tuple[HeaderMatch, ...]
    split: tuple[tuple[Subset, int], ...] | None  # None: the default split
    policy: PolicySpec | None  # None: the service's
    strict: bool = False  # it names one `subset`: its calls go there only (a split's fall back to the others)
    below: str = ""  # the prefix as a folder ("/admin/"): what a longer path under it starts with

    def matches(self, method: str, path: str, seen: Mapping[bytes, bytes]) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path is not None and path != self.path:
            return False
        prefix = self.prefix
        if prefix is not None and not (path == prefix or path.startswith(self.below)):
            return False
        for h in self.headers:  # noqa: SIM110  (a loop: no generator object on the call path)
            if not h.holds(seen.get(h.name)):
                return False
        return True

    @property
    def label(self) -> str:
        return self.name or f"routes[{self.index}]"


@dataclass(frozen=True, slots=True)
class Routing:
    """A service's subsets, default split and rules, compiled. Compared (and hashed) by its canonical JSON."""

    canonical: str
    table: Mapping[str, Any] = field(compare=False)  # as `policy_dict` writes it back
    subsets: tuple[Subset, ...] = field(default=(), compare=False)
    split: tuple[tuple[Subset, int], ...] | None = field(default=None, compare=False)
    rules: tuple[Rule, ...] = field(default=(), compare=False)
    header_names: frozenset[bytes] = field(default=frozenset(), compare=False)

    def match(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> Rule | None:
        """The first rule that matches the call (`path` with or without its query), or None (the default)."""
        if not self.rules:
            return None
        path = path.partition("?")[0]
        seen: dict[bytes, bytes] = {}
        names = self.header_names
        if names:
            for k, v in headers:  # the first of a repeated header counts
                if k in names and k not in seen:
                    seen[k] = v
        for rule in self.rules:
            if rule.matches(method, path, seen):
                return rule
        return None


def routing_dict(routing: Routing | None) -> dict[str, Any]:
    """The policy keys of `routing`, for `policy_dict` (empty without routing)."""
    return {} if routing is None else json.loads(routing.canonical)


# -- parsing -----------------------------------------------------------------------------------------------


def parse_routing(t: Table, rule_policy: Callable[[Table], PolicySpec]) -> Routing | None:
    """`subsets`, `splits` and `routes` of a policy table `t`, or None when it has none of them.

    `rule_policy(table)` makes a rule's policy: its keys laid over the service's (the caller knows that base).
    Errors name the key: `routes[2].match.headers[0].exact`."""
    if not any(t.has(k) for k in POLICY_KEYS):
        return None
    subsets = _subsets(t)
    by_name = {s.name: s for s in subsets}
    # `splits = []`: none (how an override takes away a split its base has)
    split = _split(t, "splits", by_name) if t.has("splits") and t.get("splits") != [] else None
    rules = _rules(t, by_name, rule_policy)
    if not subsets and split is None and not rules:
        return None  # all given empty: as if none were (the router's hook is skipped)
    table: dict[str, Any] = {}
    if subsets:
        table["subsets"] = {s.name: dict(s.labels) for s in subsets}
    if split is not None:
        table["splits"] = [{"subset": s.name, "weight": w} for s, w in split]
    if rules:
        table["routes"] = [_rule_table(t.get("routes")[i], rule) for i, rule in enumerate(rules)]
    names = frozenset(h.name for rule in rules for h in rule.headers)
    canonical = json.dumps(table, sort_keys=True, separators=(",", ":"))
    return Routing(canonical, table, subsets, split, rules, names)


def _subsets(t: Table) -> tuple[Subset, ...]:
    if not t.has("subsets"):
        return ()
    sub = t.table("subsets")
    if len(sub) > MAX_SUBSETS:
        t.fail("subsets", f"at most {MAX_SUBSETS} subsets, got {len(sub)}")
    out = []
    for name in sub.names():
        if not _NAME.fullmatch(name):
            sub.fail(name, f"expected {_NAME_WHAT}, got {name!r}")
        out.append(Subset(name, parse_labels(sub, name)))
    return tuple(out)


def _subset_ref(t: Table, key: str | int, by_name: Mapping[str, Subset]) -> Subset:
    name = t.string(key, what="the name of one of the policy's subsets")
    found = by_name.get(name)
    if found is None:
        known = ", ".join(sorted(by_name)) or "none: declare them in subsets"
        t.fail(key, f"no subset {name!r}; subsets: {known}")
    return found


def _split(t: Table, key: str, by_name: Mapping[str, Subset]) -> tuple[tuple[Subset, int], ...]:
    arr = t.array(key)
    if not 1 <= len(arr) <= MAX_SPLITS:
        t.fail(key, f"expected 1 to {MAX_SPLITS} entries like {{subset = \"v1\", weight = 90}}, got {len(arr)}")
    out: list[tuple[Subset, int]] = []
    for i in range(len(arr)):
        entry = arr.table(i)
        entry.only(("subset", "weight"))
        subset = _subset_ref(entry, "subset", by_name)
        if any(s is subset for s, _ in out):
            entry.fail("subset", f"subset {subset.name!r} is in this split twice")
        out.append((subset, entry.integer("weight", lo=0, hi=MAX_WEIGHT)))
    if not any(w for _, w in out):
        t.fail(key, "the weights add up to 0: give at least one subset a weight")
    return tuple(out)


def _rules(t: Table, by_name: Mapping[str, Subset], rule_policy: Callable[[Table], PolicySpec]) -> tuple[Rule, ...]:
    if not t.has("routes"):
        return ()
    arr = t.array("routes")
    if len(arr) > MAX_ROUTES:
        t.fail("routes", f"at most {MAX_ROUTES} routes, got {len(arr)}")
    rules = []
    names: set[str] = set()
    for i in range(len(arr)):
        r = arr.table(i)
        r.only(("name", "match", "subset", "splits", "policy"))
        name = r.string("name", "", pattern=_NAME, what=_NAME_WHAT)
        if name and name in names:
            r.fail("name", f"two routes named {name!r}")
        names.add(name)
        m = r.table("match")
        m.only(("methods", "path", "path_prefix", "headers"))
        methods = frozenset(m.strings("methods", ()))
        for k, verb in enumerate(sorted(methods)):
            if verb not in HTTP_METHODS or verb == "*":
                m.array("methods").fail(k, f"expected an HTTP method in capitals like 'GET', got {verb!r}")
        path = m.string("path", None, pattern=_PATH, what=_PATH_WHAT)
        prefix = m.string("path_prefix", None, pattern=_PATH, what=_PATH_WHAT)
        if path is not None and prefix is not None:
            m.fail("path_prefix", "give path (exact) or path_prefix, not both")
        headers = _header_matches(m)
        if r.has("subset") and r.has("splits"):
            r.fail("splits", "give subset or splits, not both")
        split = None
        if r.has("subset"):
            split = ((_subset_ref(r, "subset", by_name), 1),)
        elif r.has("splits"):
            split = _split(r, "splits", by_name)
        policy = None
        if r.has("policy"):
            p = r.table("policy")
            p.only(RULE_POLICY_KEYS)
            policy = rule_policy(p)
        if split is None and policy is None:
            r.fail(None, "a route needs subset, splits or policy (what to do with the calls it matches)")
        below = "" if prefix is None else prefix if prefix.endswith("/") else prefix + "/"
        rules.append(Rule(i, name, methods, path, prefix, headers, split, policy, r.has("subset"), below))
    return tuple(rules)


def _header_matches(m: Table) -> tuple[HeaderMatch, ...]:
    if not m.has("headers"):
        return ()
    arr = m.array("headers")
    if len(arr) > MAX_HEADER_MATCHES:
        m.fail("headers", f"at most {MAX_HEADER_MATCHES} header matches per route, got {len(arr)}")
    out = []
    for i in range(len(arr)):
        h = arr.table(i)
        h.only(("name", "exact", "prefix", "present"))
        name = h.string("name", what=_HEADER_WHAT).lower()
        if not _HEADER.fullmatch(name):
            h.fail("name", f"expected {_HEADER_WHAT}, got {name!r}")
        kinds = [k for k in ("exact", "prefix", "present") if h.has(k)]
        if len(kinds) != 1:
            what = 'give one of exact = "...", prefix = "..." or present = true|false'
            h.fail(None if not kinds else kinds[1], what)
        kind = kinds[0]
        if kind == "present":
            out.append(HeaderMatch(name.encode(), "present" if h.boolean("present") else "absent"))
        else:
            value = h.string(kind, pattern=_HEADER_VALUE, what=_HEADER_VALUE_WHAT)
            out.append(HeaderMatch(name.encode(), kind, value.encode()))
    return tuple(out)


def _rule_table(raw: Mapping[str, Any], rule: Rule) -> dict[str, Any]:
    """A rule as `policy_dict` writes it: its match as given (checked), its action, its policy keys as given."""
    out: dict[str, Any] = {}
    if rule.name:
        out["name"] = rule.name
    match: dict[str, Any] = {}
    if rule.methods:
        match["methods"] = sorted(rule.methods)
    if rule.path is not None:
        match["path"] = rule.path
    if rule.prefix is not None:
        match["path_prefix"] = rule.prefix
    if rule.headers:
        match["headers"] = [
            {"name": h.name.decode(), **_header_condition(h)} for h in rule.headers
        ]
    out["match"] = match
    if "subset" in raw:
        out["subset"] = rule.split[0][0].name  # type: ignore[index]
    elif rule.split is not None:
        out["splits"] = [{"subset": s.name, "weight": w} for s, w in rule.split]
    if rule.policy is not None:
        out["policy"] = dict(raw["policy"])
    return out


def _header_condition(h: HeaderMatch) -> dict[str, Any]:
    if h.kind in ("present", "absent"):
        return {"present": h.kind == "present"}
    return {h.kind: h.value.decode()}


# -- per call ------------------------------------------------------------------------------------------------


class _Health(Protocol):  # the part of the health monitor a draw reads (edged.policy.HealthView)
    def state(self, endpoint_id: str) -> Any: ...


class RoutePicker:
    """The router's hook: which endpoints (and which policy) a call is ranked over.

    Keeps, per service snapshot, one derived `Service` per (rule, subset) (its spec carries the route's policy,
    its endpoints the subset's): the same objects call after call, so the router's plan cache and the ranker's
    layouts keep working per route, and a plan is never reused across routes (they are different services)."""

    __slots__ = ("_made", "_rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._made: dict[tuple[str, str], tuple[Service, dict[tuple[int, str, bool], Service]]] = {}

    def pick(self, service: Service, call: Call, health: _Health, now: float) -> Service:
        """The service as this call sees it: the matched rule's policy over the drawn subset's endpoints. A
        rule whose policy has a shorter `timeout` brings the call's deadline in."""
        routing = service.spec.policy.routing
        assert routing is not None
        rule = routing.match(call.method, call.path, call.headers)
        split = routing.split if rule is None or rule.split is None else rule.split
        subset = None if split is None else self.draw(service, split, call.tiers, health, now, self._rng.random())
        routed = self._derived(service, rule, subset, subset is not None and (rule is None or not rule.strict))
        if rule is not None and rule.policy is not None:
            call.deadline = min(call.deadline, now + rule.policy.timeout)
        return routed

    def draw(
        self,
        service: Service,
        split: tuple[tuple[Subset, int], ...],
        tiers: frozenset[str] | None,
        health: _Health,
        now: float,
        x: float,
    ) -> Subset:
        """The subset `x` (uniform in [0, 1)) draws by weight; one with no healthy endpoint (in `tiers`) gives
        its share to the others, in proportion to their weights."""
        chosen, x = _by_weight(split, x)
        if len(split) == 1 or healthy(self._derived(service, None, chosen, False).endpoints, tiers, health, now):
            return chosen
        rest = tuple(
            (s, w)
            for s, w in split
            if s is not chosen and w and healthy(self._derived(service, None, s, False).endpoints, tiers, health, now)
        )
        if not rest:  # nothing healthy anywhere: the drawn subset, its endpoints as a last resort
            return chosen
        return _by_weight(rest, x)[0]  # x is now where the first draw fell within `chosen`: still uniform

    def _derived(self, service: Service, rule: Rule | None, subset: Subset | None, fallback: bool) -> Service:
        key = service.spec.key
        made = self._made.get(key)
        if made is None or made[0] is not service:
            if len(self._made) >= 4096:
                self._made.clear()  # services come and go: start over rather than keep the gone ones
            made = self._made[key] = (service, {})
        policy = None if rule is None else rule.policy
        slot = (-1 if policy is None else rule.index, "" if subset is None else subset.name, fallback)  # type: ignore[union-attr]
        found = made[1].get(slot)
        if found is None:
            found = made[1][slot] = subset_service(service, subset, policy, fallback=fallback)
        return found


def subset_service(
    service: Service, subset: Subset | None, policy: PolicySpec | None, *, fallback: bool = False
) -> Service:
    """`service` with only `subset`'s endpoints (None: all) under `policy` (None: its own).

    With `fallback`, the first `FALLBACK` other endpoints (by priority, tier, weight) follow as a last resort:
    a priority level after every level of the subset, so that they take calls only by failover when the
    subset's endpoints fail a call (before health has seen it) or by spillover as its health falls, never by
    the strategy's choice. A few, not all: the ranker orders every level, and a split is drawn per call.
    Not with `levels = "none"` (one level: they would mix in)."""
    spec = service.spec if policy is None else replace(service.spec, policy=policy)
    if subset is None:
        return Service(spec, service.endpoints)
    eps = tuple(ep for ep in service.endpoints if subset.holds(ep))
    if fallback and spec.policy.levels != "none":
        past = 1 + max((ep.priority for ep in eps), default=0)
        ranks = {tier: i for i, tier in enumerate(spec.endpoint_types)}
        others = sorted(
            (ep for ep in service.endpoints if not subset.holds(ep)),
            key=lambda ep: (ep.priority, ranks.get(ep.tier, 9), -ep.weight, ep.id),
        )
        eps += tuple(replace(ep, priority=past + ep.priority) for ep in others[:FALLBACK])  # in their order
    return Service(spec, eps)


def healthy(endpoints: Iterable[Endpoint], tiers: frozenset[str] | None, health: _Health, now: float) -> bool:
    """Whether one of `endpoints` (of `tiers`; None: any) is available now."""
    for ep in endpoints:  # noqa: SIM110  (a loop: no generator object on the call path)
        if (tiers is None or ep.tier in tiers) and health.state(ep.id).available(now):
            return True
    return False


def _by_weight(split: tuple[tuple[Subset, int], ...], x: float) -> tuple[Subset, float]:
    """The entry `x` in [0, 1) falls on by weight, and where it fell within that entry (again in [0, 1))."""
    total = sum(w for _, w in split)
    target = x * total
    acc = 0
    for subset, weight in split:
        if weight and target < acc + weight:
            return subset, (target - acc) / weight
        acc += weight
    return next(s for s, w in reversed(split) if w), 0.0


# -- dry run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """A request a dry run routes: its method, path and headers."""

    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[bytes, bytes], ...] = ()


def parse_sample(obj: object) -> Sample:
    """`{"method": "GET", "path": "/x", "headers": {"x-canary": "1"}}` of a dry run; ValueError naming the field."""
    if obj is None:
        return Sample()
    if not isinstance(obj, Mapping):
        raise ValueError("request: expected an object with method, path, headers")
    unknown = sorted(set(obj) - {"method", "path", "headers"})
    if unknown:
        raise ValueError(f"request.{unknown[0]}: unknown key; expected method, path, headers")
    method = obj.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS or method == "*":
        raise ValueError(f"request.method: expected an HTTP method like 'GET', got {method!r}")
    path = obj.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096:
        raise ValueError("request.path: expected a path starting with '/'")
    raw = obj.get("headers", {})
    if not isinstance(raw, Mapping) or len(raw) > MAX_SAMPLE_HEADERS:
        raise ValueError(f"request.headers: expected an object of at most {MAX_SAMPLE_HEADERS} name: value pairs")
    headers = []
    for name, value in raw.items():
        if not isinstance(value, str) or not _HEADER.fullmatch(str(name).lower()) or len(value) > 8192:
            raise ValueError(f"request.headers.{name}: expected a header name and a text value")
        headers.append((str(name).lower().encode(), value.encode("utf-8", "replace")))
    return Sample(method.upper(), normalize_path(path.partition("?")[0]), tuple(headers))


def dry_run(service: Service, sample: Sample, health: _Health, now: float) -> tuple[dict, list[tuple[dict, Service]]]:
    """Which rule `sample` matches and each subset it may go to, with its share now (healthy subsets share
    the unhealthy ones' weight); and per subset the service to rank (the caller plans each)."""
    routing = service.spec.policy.routing
    if routing is None:
        route = {"rule": None, "rule_index": None, "policy": "the service's", "strategy": service.spec.policy.strategy}
        return {**route, "note": "no routes or splits: every endpoint"}, [({"subset": None, "share": 100.0}, service)]
    rule = routing.match(sample.method, sample.path, sample.headers)
    split = routing.split if rule is None or rule.split is None else rule.split
    policy = None if rule is None else rule.policy
    route: dict[str, Any] = {
        "rule": None if rule is None else rule.label,
        "rule_index": None if rule is None else rule.index,
        "policy": "the route's" if policy is not None else "the service's",
        "strategy": (policy or service.spec.policy).strategy,
    }
    if split is None:
        return route, [({"subset": None, "share": 100.0}, subset_service(service, None, policy))]
    up = {s.name: healthy(subset_service(service, s, None).endpoints, None, health, now) for s, _ in split}
    fallback = rule is None or not rule.strict
    live = [(s, w) for s, w in split if w and up[s.name]] or [(s, w) for s, w in split if w]
    total = sum(w for _, w in live)
    out = []
    for subset, weight in split:
        routed = subset_service(service, subset, policy, fallback=fallback)
        share = 100.0 * weight / total if any(s is subset for s, _ in live) else 0.0
        item = {
            "subset": subset.name,
            "labels": dict(subset.labels),
            "weight": weight,
            "share": round(share, 1),
            "endpoints": sum(1 for ep in routed.endpoints if subset.holds(ep)),
            "healthy": up[subset.name],
        }
        out.append((item, routed))
    return route, out
