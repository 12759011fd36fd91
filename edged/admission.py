"""The gate every call passes before it is routed, on every entry point (local API, peer ingress, cloud
bridge): authorization (edged/authz.py), then quotas (edged/quota.py). A refused call costs no endpoint:
403 `forbidden` naming the rule (also in `x-edged-rule`), or 429 `rate_limited` with `retry-after`; both
counted (`edged_authz_denied_total{tenant,rule}`, `edged_quota_refused_total{tenant}`).
"""

from __future__ import annotations

from collections.abc import Mapping

from .access import Identity
from .authz import Authorizer, AuthzConfig, FleetAuthz
from .errors import CallError
from .model import QuotaSpec, Service
from .quota import Quotas, Ticket
from .telemetry import MeshMetrics


class Gate:
    """Authorizer + quotas + their counters, shared by the entry points of one process."""

    def __init__(self, authz: Authorizer, quotas: Quotas, metrics: MeshMetrics) -> None:
        self.authz = authz
        self.quotas = quotas
        self.fleet_jwt_keys: tuple = ()  # JWKs from signed fleet config (the JWT verifier reads them)
        self._quota_layers: dict[str, Mapping[str, QuotaSpec]] = {"config": quotas.configured()}
        self._denied = metrics.registry.counter(
            "edged_authz_denied_total",
            "Calls refused by an authorization rule (403), by tenant and rule.",
            ("tenant", "rule"),
        )
        self._limited = metrics.registry.counter(
            "edged_quota_refused_total", "Calls refused by a quota (429), by tenant.", ("tenant",)
        )

    @classmethod
    def build(cls, authz: AuthzConfig, quotas: dict, metrics: MeshMetrics) -> Gate:
        return cls(Authorizer(authz), Quotas(quotas), metrics)

    def set_fleet(self, fleet: FleetAuthz) -> None:
        """Signed fleet config changed: its rules and JWT keys are in force from the next call."""
        self.authz.set_rules(fleet.rules, "fleet")
        self.fleet_jwt_keys = fleet.jwt_keys
        self.set_quotas("fleet", fleet.quotas)

    def set_quotas(self, origin: str, quotas: Mapping[str, QuotaSpec]) -> None:
        """The quotas of one origin ("config", "fleet", "api"); a key of a later origin wins (edged.toml <
        fleet config < the API, as for policies)."""
        self._quota_layers[origin] = quotas
        merged: dict[str, QuotaSpec] = {}
        for layer in ("config", "fleet", "api"):
            merged.update(self._quota_layers.get(layer, {}))
        self.quotas.configure(merged)

    def admit(self, caller: Identity, svc: Service, method: str, path: str) -> Ticket:
        """Let the call through (its in-flight places, to give back when it ends) or raise 403 / 429.

        `path` is the normalized path within the service, without its query."""
        spec = svc.spec
        policy = spec.policy
        if not self.authz.open or policy.allow or policy.deny:  # open, with no service rule: nothing to decide
            decision = self.authz.decide(caller.id, spec.tenant, spec.name, policy, method, path, caller.via)
            if not decision.allowed:
                self._denied.inc((spec.tenant, decision.rule))
                raise CallError(403, "forbidden", decision.reason, ((b"x-edged-rule", decision.rule.encode()),))
        try:
            return self.quotas.admit(spec.tenant, spec.name, policy.quota)
        except CallError:
            self._limited.inc((spec.tenant,))
            raise
