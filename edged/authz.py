"""Authorization rules ("intentions"): which caller may call which service, decided on every entry point.

A caller is named by its id: `TENANT/APP` for a local caller (an app, a JWT's subject, `anonymous`,
`admin`, `token` for a tenant's static token) and `spiffe://FLEET/node/NODE` for a peer node. A rule says
`action` (allow | deny) for callers whose id matches one of `from` (globs: `garden/*`, `spiffe://home/node/*`,
`*`), calling a service of `tenant` whose name matches `service` (a glob), optionally only for some
`methods` and path prefixes (`paths`, matched on the normalized path by whole segments).

Order of evaluation, first match wins: deny rules (edged.toml, the API, fleet config), the service's own
`[policy] deny`, allow rules, the service's own `[policy] allow` (a service that lists callers denies the
others), then the tenant's default action (`[authz] default`, `[authz.tenants] NAME = "deny"`). Each
decision names what made it, so a 403 and `edged authz explain` can say which rule it was.

Consul intentions and Dapr's access control are the models: default action per tenant, deny beats allow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import MappingProxyType

from .config import _LABEL, LABEL_WHAT
from .document import Table
from .model import DEFAULT_TENANT, PolicySpec, QuotaSpec
from .quota import load_quotas

ACTIONS = ("allow", "deny")
RULE_KEYS = ("name", "action", "tenant", "service", "from", "methods", "paths")
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RULE_NAME_WHAT = "a rule name of letters, digits, '_', '.' and '-' (at most 64 characters)"
ID_GLOB = re.compile(r"[A-Za-z0-9_.:/*?@-]{1,200}")
ID_GLOB_WHAT = "a caller id or glob like 'garden/lamps', 'garden/*' or 'spiffe://home/node/*'"
_SERVICE_GLOB = re.compile(r"[a-z0-9*?-]{1,63}")
_METHOD = re.compile(r"[A-Z]{1,20}")
_PATH = re.compile(r"/[^\s?#]{0,255}")
CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny rule (see the module doc)."""

    name: str
    action: str
    tenant: str = DEFAULT_TENANT
    service: str = "*"
    sources: tuple[str, ...] = ("*",)
    methods: frozenset[str] = frozenset()
    paths: tuple[str, ...] = ()
    origin: str = "config"  # config | api | fleet

    def applies(self, caller_ids: tuple[str, ...], tenant: str, service: str) -> bool:
        """Whether the rule speaks of this caller (any of its ids) and this service (methods and paths are
        checked per call)."""
        return (
            tenant == self.tenant
            and fnmatchcase(service, self.service)
            and any(matches_any(c, self.sources) for c in caller_ids)
        )

    def describe(self) -> dict:
        out = {"name": self.name, "action": self.action, "tenant": self.tenant, "service": self.service}
        out["from"] = list(self.sources)
        if self.methods:
            out["methods"] = sorted(self.methods)
        if self.paths:
            out["paths"] = list(self.paths)
        out["origin"] = self.origin
        return out


@dataclass(frozen=True, slots=True)
class AuthzConfig:
    """`[authz]`: the default action, per tenant, and the rules of edged.toml."""

    default: str = "allow"
    tenants: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed or not, by what (a rule's name, `policy.allow`, `policy.deny`, `default`), and why in words."""

    allowed: bool
    rule: str
    reason: str


def parse_rule(t: Table, origin: str) -> Rule:
    """One rule table (edged.toml `[[authz.rules]]`, a `PUT /v1/authz/rules/NAME` body)."""
    t.only(RULE_KEYS)
    sources = t.strings("from", ("*",), pattern=ID_GLOB, what=ID_GLOB_WHAT)
    if not sources:
        t.fail("from", "name at least one caller (or '*')")
    return Rule(
        name=t.string("name", pattern=_RULE_NAME, what=RULE_NAME_WHAT),
        action=t.choice("action", None, ACTIONS) or t.fail("action", "missing required key: allow or deny"),
        tenant=t.string("tenant", DEFAULT_TENANT, pattern=_LABEL, what=LABEL_WHAT),
        service=t.string("service", "*", pattern=_SERVICE_GLOB, what="a service name or glob"),
        sources=sources,
        methods=frozenset(t.strings("methods", (), pattern=_METHOD, what="an HTTP method in capitals")),
        paths=tuple(t.strings("paths", (), pattern=_PATH, what="a path prefix starting with '/'")),
        origin=origin,
    )


def load_authz(t: Table) -> AuthzConfig:
    """Read `[authz]` (called by the config loader)."""
    t.only(("default", "tenants", "rules"))
    tt = t.table("tenants")
    tenants = {}
    for name in tt.names():
        if not _LABEL.fullmatch(name):
            tt.fail(name, f"expected a tenant name: {LABEL_WHAT}, got {name!r}")
        tenants[name] = tt.choice(name, "allow", ACTIONS)
    arr = t.array("rules", [])
    rules = tuple(parse_rule(arr.table(i), "config") for i in range(len(arr)))
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            arr.table(i).fail("name", f"two rules named {rule.name!r}")
        seen.add(rule.name)
    return AuthzConfig(default=t.choice("default", "allow", ACTIONS), tenants=MappingProxyType(tenants), rules=rules)


@dataclass(frozen=True, slots=True)
class FleetAuthz:
    """What a signed fleet config document adds (its `authz` table): rules, quotas (by "TENANT" or
    "TENANT/SERVICE"), and JWKs for bearer JWTs."""

    rules: tuple[Rule, ...] = ()
    jwt_keys: tuple[Mapping, ...] = ()
    quotas: Mapping[str, QuotaSpec] = field(default_factory=lambda: MappingProxyType({}))

    def over(self, other: FleetAuthz) -> FleetAuthz:
        """These, with `other`'s rules replacing any of the same name and its keys added (a node's document
        over the fleet's)."""
        names = {r.name for r in other.rules}
        return FleetAuthz(
            tuple(r for r in self.rules if r.name not in names) + other.rules,
            self.jwt_keys + other.jwt_keys,
            MappingProxyType({**self.quotas, **other.quotas}),
        )


def load_fleet_authz(t: Table) -> FleetAuthz:
    """The `authz` table of a fleet config document: `rules` (as `[[authz.rules]]`), `quotas` (as `[quotas]`)
    and `jwt_keys` (JWKs)."""
    t.only(("rules", "quotas", "jwt_keys"))
    arr = t.array("rules", [])
    rules = tuple(parse_rule(arr.table(i), "fleet") for i in range(len(arr)))
    if len({r.name for r in rules}) != len(rules):
        arr.fail(None, "two rules with one name")
    keys = t.array("jwt_keys", [])
    jwks = tuple(MappingProxyType(dict(keys.table(i).data)) for i in range(len(keys)))
    return FleetAuthz(rules, jwks, load_quotas(t.table("quotas")))


def matches_any(caller_id: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(caller_id, p) for p in patterns)


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    for prefix in prefixes:
        if path == prefix or prefix == "/" or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return True
    return False


# A step of an evaluation: (methods, paths, decision); the first step whose methods and paths match decides.
_Step = tuple[frozenset[str], tuple[str, ...], Decision]


class Authorizer:
    """The rules in force (edged.toml + API + fleet config) and the tenants' defaults; `decide()` per call.

    The steps for (caller, tenant, service) are worked out once and cached, so a repeat call checks only
    the methods and paths of the rules that speak of it (usually none).
    """

    def __init__(self, config: AuthzConfig = AuthzConfig()) -> None:
        self._config = config
        self._extra: dict[tuple[str, str], Rule] = {}  # rules of the API and fleet config, by (origin, name)
        self._cache: dict[tuple[str, str, str, str], tuple[PolicySpec, tuple[_Step, ...]]] = {}
        self._compile()

    def configure(self, config: AuthzConfig) -> None:
        """New `[authz]` (a reload)."""
        self._config = config
        self._compile()

    def set_rules(self, rules: Iterable[Rule], origin: str) -> None:
        """Replace every rule of `origin` ("api", "fleet") with `rules`."""
        self._extra = {key: r for key, r in self._extra.items() if key[0] != origin}
        self._extra.update(((origin, r.name), r) for r in rules)
        self._compile()

    def rules(self) -> list[Rule]:
        """Every rule in force: edged.toml's first, then the API's and fleet config's by name."""
        return [*self._config.rules, *(self._extra[key] for key in sorted(self._extra, key=lambda k: (k[1], k[0])))]

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules() if r.name == name), None)

    def default(self, tenant: str) -> str:
        return self._config.tenants.get(tenant, self._config.default)

    def _compile(self) -> None:
        rules = self.rules()
        self._deny = [r for r in rules if r.action == "deny"]
        self._allow = [r for r in rules if r.action == "allow"]
        self._cache.clear()
        # No rule, and every tenant allows by default: only a service's own policy.allow/deny can refuse a call
        # (Gate.admit then skips decide(): the call path pays nothing for authorization it does not use).
        config = self._config
        self.open = not rules and config.default == "allow" and all(a == "allow" for a in config.tenants.values())

    def _steps(self, ids: tuple[str, ...], tenant: str, service: str, policy: PolicySpec) -> tuple[_Step, ...]:
        steps: list[_Step] = []
        caller_id = ids[0]

        def rule_step(rule: Rule) -> _Step:
            verb = "allowed" if rule.action == "allow" else "denied"
            where = f" ({rule.origin})" if rule.origin != "config" else ""
            return (
                rule.methods,
                rule.paths,
                Decision(rule.action == "allow", rule.name, f"{verb} by rule {rule.name!r}{where}"),
            )

        steps += [rule_step(r) for r in self._deny if r.applies(ids, tenant, service)]
        if any(matches_any(c, policy.deny) for c in ids):
            steps.append(
                (frozenset(), (), Decision(False, "policy.deny", f"{caller_id} is in policy.deny of {service}"))
            )
            return tuple(steps)
        steps += [rule_step(r) for r in self._allow if r.applies(ids, tenant, service)]
        if policy.allow:
            if any(matches_any(c, policy.allow) for c in ids):
                decision = Decision(True, "policy.allow", f"{caller_id} is in policy.allow of {service}")
            else:
                decision = Decision(False, "policy.allow", f"{caller_id} is not in policy.allow of {service}")
            steps.append((frozenset(), (), decision))
            return tuple(steps)
        action = self.default(tenant)
        verb = "allowed" if action == "allow" else "denied"
        steps.append(
            (frozenset(), (), Decision(action == "allow", "default", f"{verb} by the default of tenant {tenant!r}"))
        )
        return tuple(steps)

    def decide(
        self, caller_id: str, tenant: str, service: str, policy: PolicySpec, method: str, path: str, via: str = ""
    ) -> Decision:
        """The decision for one call (`path` normalized, without its query); `via`: the peer node that makes
        it for `caller_id`, whose id the rules match too."""
        key = (caller_id, tenant, service, via)
        cached = self._cache.get(key)
        if cached is None or cached[0] is not policy:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            ids = (caller_id, via) if via else (caller_id,)
            cached = self._cache[key] = (policy, self._steps(ids, tenant, service, policy))
        for methods, paths, decision in cached[1]:
            if (not methods or method in methods) and (not paths or _under(path, paths)):
                return decision
        raise AssertionError("the last step always decides")  # pragma: no cover
