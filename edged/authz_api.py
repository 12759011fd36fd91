"""`/v1/authz`: read and change authorization rules and quotas at runtime, and explain a decision.

- `GET /v1/authz`: the tenants' default actions, the rules and the quotas (with their state) that concern the
  caller's tenant (an admin's: every tenant).
- `PUT /v1/authz/rules/{name}` (a rule as JSON: the keys of `[[authz.rules]]`), `DELETE /v1/authz/rules/{name}`.
- `PUT /v1/authz/quotas/{tenant}[/{service}]` (`{"rate": .., "burst": .., "in_flight": ..}`), `DELETE` the same.
- `POST /v1/authz/explain` (`{"as": ID, "service": "[TENANT/]NAME", "path": "/x", "method": "GET"}`): the
  decision, the rule that made it and the quotas that would apply (`edged authz explain`).

Changes need the admin right, are kept in the state dir (`authz.json`) and survive a restart; rules and
quotas of edged.toml cannot be changed here (edit the file and reload).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from . import jsonbody
from .access import ADMIN, Identity
from .admission import Gate
from .authz import Rule, parse_rule
from .document import Doc, Table
from .errors import CallError, ConfigError
from .events import EventBus
from .http.message import Request
from .http.server import ResponseWriter
from .limits import Limits
from .model import DEFAULT_TENANT, PolicySpec, QuotaSpec
from .paths import normalize_path
from .quota import load_quota, quota_dict, quota_key
from .router import Router
from .state import StateError, StateStore

log = logging.getLogger("edged.authz")
STATE_FILE = "authz.json"
MAX_RULES = 1024  # rules set through the API
_JSON_DEPTH = Limits().json_depth  # nesting of a request body (admin-only writes: the default limit)


def _invalid(exc: ConfigError) -> CallError:
    return CallError(400, "invalid_rule", f"{exc.key}: {exc.message}" if exc.key else exc.message)


class AuthzApi:
    """The runtime rules and quotas (origin "api") and their endpoints."""

    def __init__(self, gate: Gate, store: StateStore, events: EventBus, router: Router) -> None:
        self._gate = gate
        self._store = store
        self._events = events
        self._router = router
        self._rules: dict[str, Rule] = {}
        self._quotas: dict[str, QuotaSpec] = {}

    def configure(self, quotas: Mapping[str, QuotaSpec]) -> None:
        """edged.toml's quotas changed (a reload): the API's still win."""
        self._gate.set_quotas("config", quotas)

    def load(self) -> int:
        """Restore the rules and quotas kept in the state dir; returns how many."""
        data = self._store.read_json(STATE_FILE, {})
        data = data if isinstance(data, dict) else {}
        for i, item in enumerate(data.get("rules", [])):
            try:
                rule = parse_rule(Table(Doc(f"{STATE_FILE} rules[{i}]"), item), "api")
            except (ConfigError, TypeError):
                log.warning("authorization rule in state not usable, dropped: %r", item)
                continue
            self._rules[rule.name] = rule
        for key, item in (data.get("quotas") or {}).items():
            try:
                if quota_key(key) is None:
                    raise TypeError(key)
                self._quotas[key] = load_quota(Table(Doc(f"{STATE_FILE} quotas.{key}"), item))
            except (ConfigError, TypeError):
                log.warning("quota in state not usable, dropped: %r", key)
        self._apply()
        return len(self._rules) + len(self._quotas)

    def _apply(self) -> None:
        self._gate.authz.set_rules(self._rules.values(), "api")
        self._gate.set_quotas("api", dict(self._quotas))

    def _save(self) -> None:
        data = {
            "version": 1,
            "rules": [{k: v for k, v in r.describe().items() if k != "origin"} for r in self._rules.values()],
            "quotas": {k: quota_dict(q) for k, q in sorted(self._quotas.items())},
        }
        try:
            self._store.write_json(STATE_FILE, data)
        except StateError as exc:
            log.error("could not keep authorization rules and quotas: %s", exc)

    # -- endpoints (the Api routes /v1/authz here) ---------------------------------------------------------
    def get(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        admin = ADMIN in caller.rights
        authz = self._gate.authz
        rules = [r.describe() for r in authz.rules() if admin or r.tenant == caller.tenant]
        quotas = {k: v for k, v in self._gate.quotas.state().items() if admin or k.partition("/")[0] == caller.tenant}
        tenants = sorted({caller.tenant, *(r["tenant"] for r in rules)})
        resp.send_json(200, {"defaults": {t: authz.default(t) for t in tenants}, "rules": rules, "quotas": quotas})

    def put(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        kind, name = self._target(caller, rest)
        body = _json(req)
        if kind == "rules":
            if not isinstance(body, dict):
                raise CallError(400, "invalid_rule", "the body must be a JSON object of rule keys")
            try:
                rule = parse_rule(Table(Doc("rule"), {**body, "name": name}), "api")
            except ConfigError as exc:
                raise _invalid(exc) from None
            if name not in self._rules and len(self._rules) >= MAX_RULES:
                raise CallError(429, "too_many_rules", f"at most {MAX_RULES} rules through the API")
            self._rules[name] = rule
            shown: dict = rule.describe()
        else:
            if not isinstance(body, dict):
                raise CallError(400, "invalid_rule", "the body must be a JSON object: rate, burst, in_flight")
            try:
                spec = load_quota(Table(Doc("quota"), body))
            except ConfigError as exc:
                raise _invalid(exc) from None
            self._quotas[name] = spec
            shown = {"key": name, **quota_dict(spec)}
        self._apply()
        self._save()
        self._events.publish(
            "authz_changed",
            tenant=name.partition("/")[0] if kind == "quotas" else shown["tenant"],
            what=kind,
            name=name,
        )
        resp.send_json(200, shown)

    def delete(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        kind, name = self._target(caller, rest)
        table: dict = self._rules if kind == "rules" else self._quotas
        if table.pop(name, None) is None:
            raise CallError(404, "not_found", f"no {kind[:-1]} {name!r} set through the API")
        self._apply()
        self._save()
        self._events.publish("authz_changed", what=kind, name=name, removed=True)
        resp.send_json(200, {"name": name, "deleted": True})

    def _target(self, caller: Identity, rest: list[str]) -> tuple[str, str]:
        caller.require(ADMIN)
        kind, name = (rest[0], "/".join(rest[1:])) if rest else ("", "")
        if kind not in ("rules", "quotas") or not name:
            raise CallError(404, "not_found", "/v1/authz/rules/{name} or /v1/authz/quotas/{tenant}[/{service}]")
        if kind == "quotas" and quota_key(name) is None:
            raise CallError(400, "invalid_rule", f"a quota is for TENANT or TENANT/SERVICE, got {name!r}")
        if kind == "rules" and any(r.name == name and r.origin != "api" for r in self._gate.authz.rules()):
            raise CallError(409, "conflict", f"rule {name!r} comes from edged.toml or fleet config")
        return kind, name

    def explain(self, req: Request, resp: ResponseWriter, caller: Identity, rest: list[str]) -> None:
        if rest != ["explain"]:
            raise CallError(404, "not_found", "POST /v1/authz/explain")
        body = _json(req)
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("as"), str)
            or not isinstance(body.get("service"), str)
        ):
            raise CallError(
                400, "bad_request", 'expected {"as": ID, "service": "[TENANT/]NAME", "path": ..., "method": ...}'
            )
        caller_id, ref = body["as"], body["service"]
        tenant, _, name = ref.rpartition("/")
        if not tenant:
            tenant = caller_id.partition("/")[0] if "/" in caller_id and "://" not in caller_id else DEFAULT_TENANT
        if ADMIN not in caller.rights and tenant != caller.tenant:
            raise CallError(403, "forbidden", f"{caller.name} may explain calls in tenant {caller.tenant!r} only")
        method = str(body.get("method") or "GET").upper()
        path = normalize_path(str(body.get("path") or "/"))
        try:
            svc = self._router.service(tenant, name)
        except CallError:
            svc = None
        policy = svc.spec.policy if svc is not None else PolicySpec()
        decision = self._gate.authz.decide(caller_id, tenant, name, policy, method, path.partition("?")[0])
        configured = self._gate.quotas.configured()
        service_quota = configured.get(f"{tenant}/{name}", policy.quota)
        resp.send_json(
            200,
            {
                "as": caller_id,
                "tenant": tenant,
                "service": name,
                "known_service": svc is not None,
                "method": method,
                "path": path,
                "decision": "allow" if decision.allowed else "deny",
                "rule": decision.rule,
                "reason": decision.reason,
                "quotas": {
                    tenant: quota_dict(configured[tenant]) if tenant in configured else None,
                    f"{tenant}/{name}": quota_dict(service_quota) if service_quota is not None else None,
                },
            },
        )


def _json(req: Request) -> object:
    try:
        return jsonbody.loads(req.body or b"null", _JSON_DEPTH)
    except ValueError as exc:
        raise CallError(400, "bad_request", f"body is not JSON: {exc}") from None
