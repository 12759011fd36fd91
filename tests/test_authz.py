"""Authorization rules (edged/authz.py), quotas (edged/quota.py) and the gate that applies both (admission.py)."""

from __future__ import annotations

import pytest

from edged.access import Identity, node_identity
from edged.admission import Gate
from edged.authz import Authorizer, AuthzConfig, load_authz
from edged.document import Doc, Table
from edged.errors import CallError, ConfigError
from edged.model import PolicySpec, QuotaSpec, Service, ServiceSpec
from edged.quota import Quotas, load_quotas
from edged.telemetry import MeshMetrics

OPEN = PolicySpec()


def authz(text: dict) -> Authorizer:
    return Authorizer(load_authz(Table(Doc("edged.toml"), text, ("authz",))))


RULES = {
    "tenants": {"garden": "deny"},
    "rules": [
        {"name": "no-guests", "action": "deny", "service": "*", "from": ["default/guest-*"]},
        {"name": "lamps-read-thermo", "action": "allow", "tenant": "garden", "service": "thermo",
         "from": ["garden/lamps"], "methods": ["GET"], "paths": ["/readings"]},
        {"name": "ops-all-garden", "action": "allow", "tenant": "garden", "service": "*", "from": ["garden/ops*"]},
        {"name": "no-setpoint-from-peers", "action": "deny", "tenant": "default", "service": "thermo",
         "from": ["spiffe://home/node/*"], "methods": ["POST"], "paths": ["/setpoint"]},
    ],
}  # fmt: skip


def test_allow_deny_wildcards_methods_paths_and_a_default_deny_tenant() -> None:
    a = authz(RULES)
    cases = [
        # (caller id, tenant, service, method, path) -> (allowed, rule)
        (("default/thermo-app", "default", "thermo", "GET", "/x"), (True, "default")),
        (("default/guest-7", "default", "thermo", "GET", "/x"), (False, "no-guests")),  # wildcard deny
        (("garden/lamps", "garden", "thermo", "GET", "/readings"), (True, "lamps-read-thermo")),
        (("garden/lamps", "garden", "thermo", "GET", "/readings/today"), (True, "lamps-read-thermo")),
        (("garden/lamps", "garden", "thermo", "GET", "/readingsX"), (False, "default")),  # whole segments only
        (("garden/lamps", "garden", "thermo", "POST", "/readings"), (False, "default")),  # method not allowed
        (("garden/lamps", "garden", "pump", "GET", "/readings"), (False, "default")),  # default-deny tenant
        (("garden/ops-2", "garden", "pump", "DELETE", "/"), (True, "ops-all-garden")),  # wildcard caller+service
        (("spiffe://home/node/pi-2", "default", "thermo", "POST", "/setpoint"), (False, "no-setpoint-from-peers")),
        (("spiffe://home/node/pi-2", "default", "thermo", "GET", "/setpoint"), (True, "default")),
    ]
    for (caller, tenant, service, method, path), (allowed, rule) in cases:
        d = a.decide(caller, tenant, service, OPEN, method, path)
        assert (d.allowed, d.rule) == (allowed, rule), (caller, service, method, path, d)
        assert rule in d.reason or rule == "default"


def test_a_services_own_allow_and_deny_lists() -> None:
    a = authz({"rules": [{"name": "ops", "action": "allow", "service": "thermo", "from": ["default/ops"]}]})
    listed = PolicySpec(allow=("default/lamps", "default/heat*"), deny=("default/heat-old",))
    for caller, allowed, rule in [
        ("default/lamps", True, "policy.allow"),
        ("default/heater", True, "policy.allow"),
        ("default/heat-old", False, "policy.deny"),  # deny beats allow
        ("default/other", False, "policy.allow"),  # listing callers denies the others
        ("default/ops", True, "ops"),  # an allow rule of edged.toml counts too
    ]:
        d = a.decide(caller, "default", "thermo", listed, "GET", "/")
        assert (d.allowed, d.rule) == (allowed, rule), caller
    # The decision follows the service's policy as it changes (a manifest edit, the policy API).
    assert a.decide("default/other", "default", "thermo", OPEN, "GET", "/").allowed


def test_runtime_rules_replace_their_origin_only_and_deny_first() -> None:
    a = authz(RULES)
    assert a.decide("garden/lamps", "garden", "pump", OPEN, "GET", "/").rule == "default"
    from edged.authz import Rule

    a.set_rules([Rule("lamps-pump", "allow", "garden", "pump", ("garden/lamps",), origin="api")], "api")
    assert a.decide("garden/lamps", "garden", "pump", OPEN, "GET", "/").rule == "lamps-pump"
    a.set_rules([Rule("block", "deny", "garden", "*", ("*",), origin="fleet")], "fleet")
    assert a.decide("garden/lamps", "garden", "pump", OPEN, "GET", "/").rule == "block"
    a.set_rules([], "fleet")
    a.set_rules([], "api")
    assert [r.name for r in a.rules()] == [r["name"] for r in RULES["rules"]]
    assert a.decide("garden/lamps", "garden", "pump", OPEN, "GET", "/").rule == "default"


def test_bad_rules_are_refused_with_their_key() -> None:
    for bad, key in [
        ({"rules": [{"name": "x", "action": "maybe"}]}, "authz.rules[0].action"),
        ({"rules": [{"name": "x"}]}, "authz.rules[0].action"),
        ({"rules": [{"name": "x", "action": "allow", "from": ["garden lamps"]}]}, "authz.rules[0].from[0]"),
        ({"rules": [{"name": "x", "action": "allow", "paths": ["readings"]}]}, "authz.rules[0].paths[0]"),
        ({"rules": [{"name": "x", "action": "allow"}, {"name": "x", "action": "deny"}]}, "authz.rules[1].name"),
        ({"tenants": {"garden": "open"}}, "authz.tenants.garden"),
    ]:
        with pytest.raises(ConfigError) as err:
            authz(bad)
        assert err.value.key == key, (bad, err.value)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_buckets_per_tenant_and_service_exact_counts() -> None:
    clock = Clock()
    q = Quotas({"garden": QuotaSpec(rate=100, burst=100), "garden/pump": QuotaSpec(rate=1, burst=3)}, clock=clock)
    results = []
    for _ in range(150):
        try:
            q.admit("garden", "thermo", None).release()
            results.append(200)
        except CallError as exc:
            assert exc.status == 429 and exc.code == "rate_limited"
            assert dict(exc.headers)[b"retry-after"] == b"1"
            results.append(429)
    assert results.count(200) == 100 and results.count(429) == 50
    clock.now += 0.25  # 25 tokens back
    assert sum(_ok(q, "garden", "thermo") for _ in range(40)) == 25
    clock.now += 10
    # The service's bucket (3) bites first; a refusal there takes no token from the tenant's bucket.
    assert sum(_ok(q, "garden", "pump") for _ in range(10)) == 3
    assert sum(_ok(q, "garden", "thermo") for _ in range(200)) == 97
    # Other tenants are not limited.
    assert sum(_ok(q, "default", "thermo") for _ in range(500)) == 500


def _ok(q: Quotas, tenant: str, service: str, quota: QuotaSpec | None = None) -> bool:
    try:
        q.admit(tenant, service, quota).release()
        return True
    except CallError:
        return False


def test_in_flight_caps_are_given_back_by_the_ticket() -> None:
    q = Quotas({"garden": QuotaSpec(in_flight=2)})
    own = QuotaSpec(in_flight=1)
    first = q.admit("garden", "thermo", own)
    with pytest.raises(CallError) as err:
        q.admit("garden", "thermo", own)  # the service's own cap ([policy] quota)
    assert "1 calls at once" in str(err.value.detail)
    second = q.admit("garden", "pump", None)
    with pytest.raises(CallError):
        q.admit("garden", "lamp", None)  # the tenant's cap
    first.release()
    first.release()  # a second release gives nothing back twice
    with q.admit("garden", "thermo", own):
        pass
    second.release()
    assert q.state()["garden"]["in_flight_now"] == 0
    # A limit changed while calls are in flight keeps counting them.
    held = q.admit("garden", "thermo", own)
    q.configure({"garden": QuotaSpec(in_flight=5)})
    held.release()
    assert q.state()["garden"]["in_flight_now"] == 0


def test_quota_config_keys() -> None:
    doc = Doc("edged.toml")
    quotas = load_quotas(Table(doc, {"garden": {"rate": 5}, "garden/thermo": {"in_flight": 2}}, ("quotas",)))
    assert quotas["garden"].bucket == 5 and quotas["garden/thermo"].in_flight == 2
    for bad in ({"Garden": {}}, {"garden/": {}}, {"a/b/c": {}}, {"garden": {"burst": 3}}, {"garden": {"rate": 0}}):
        with pytest.raises(ConfigError):
            load_quotas(Table(doc, bad, ("quotas",)))


def test_the_gate_counts_refusals_and_names_the_rule() -> None:
    metrics = MeshMetrics()
    gate = Gate(authz(RULES), Quotas({"default": QuotaSpec(rate=1, burst=1)}), metrics)
    svc = Service(ServiceSpec("thermo"), ())
    app = Identity("thermo-app", "default", frozenset({"call"}))
    gate.admit(app, svc, "GET", "/").release()
    with pytest.raises(CallError) as err:
        gate.admit(app, svc, "GET", "/")
    assert err.value.status == 429
    with pytest.raises(CallError) as err:
        gate.admit(node_identity("home", "pi-2"), svc, "POST", "/setpoint")
    assert err.value.status == 403 and dict(err.value.headers)[b"x-edged-rule"] == b"no-setpoint-from-peers"
    assert metrics.value("edged_authz_denied_total", {"tenant": "default", "rule": "no-setpoint-from-peers"}) == 1
    assert metrics.value("edged_quota_refused_total", {"tenant": "default"}) == 1


def test_default_config_allows_everything() -> None:
    a = Authorizer(AuthzConfig())
    assert a.decide("x/y", "x", "z", OPEN, "DELETE", "/").allowed


def test_a_call_a_peer_node_makes_for_one_of_its_apps_meets_rules_on_both_ids() -> None:
    from edged.access import relayed_identity

    a = authz(
        {
            "tenants": {"garden": "deny"},
            "rules": [
                {"name": "lamps", "action": "allow", "tenant": "garden", "from": ["garden/lamps"]},
                {"name": "pi-9-out", "action": "deny", "tenant": "garden", "from": ["spiffe://home/node/pi-9"]},
            ],
        }
    )

    def rule(node: str, app: str) -> tuple[bool, str]:
        caller = relayed_identity(node_identity("home", node, "garden"), app)
        d = a.decide(caller.id, "garden", "pump", OPEN, "GET", "/", caller.via)
        return d.allowed, d.rule

    assert rule("pi-2", "lamps") == (True, "lamps")  # the app's allow rule
    assert rule("pi-9", "lamps") == (False, "pi-9-out")  # a deny of the node wins
    assert rule("pi-2", "guest") == (False, "default")
    assert rule("pi-2", "") == (False, "default")  # no claim: the node alone
    assert relayed_identity(node_identity("home", "pi-2"), "a/b").id == "spiffe://home/node/pi-2"  # not an app
