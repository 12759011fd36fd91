"""End to end: tenants, authorization rules and quotas on a running daemon (issue 10).

Two tenants on one box (`default`: thermo; `garden`: pump), callers named by static tokens, JWTs, Unix-socket
peer credentials and peer-node headers; every entry point answers each kind of caller as the table in
README.md says, and a tenant never sees the other's services, registrations or events.
"""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from conftest import wait_for
from cryptography.hazmat.primitives.asymmetric import ec
from fixtures_fleet_broker import fleet_broker  # noqa: F401
from fixtures_mqtt import bridge_config, bridges, broker, mqtt_section, topic_prefix, wait_metric  # noqa: F401
from harness import manifest
from jwt.algorithms import ECAlgorithm
from test_e2e_cloud_attacks import enrolled

from edged.client import ApiClient

JSON = [("Content-Type", "application/json")]
NO_SETPOINT = """
[[authz.rules]]
name = "no-setpoint"
action = "deny"
tenant = "garden"
service = "pump"
paths = ["/setpoint"]
"""
TENANTS = """
[access]
anonymous = "none"
[tenants.garden]
tokens = ["g-token"]
[access.apps.lamps]
tenant = "garden"
tokens = ["t-lamps"]
[access.apps.thermo-app]
tokens = ["t-thermo"]
[authz]
tenants = { garden = "deny" }
""" + NO_SETPOINT + """
[[authz.rules]]
name = "lamps-and-peers-use-pump"
action = "allow"
tenant = "garden"
service = "pump"
from = ["garden/lamps", "spiffe://home/node/pi-2"]
"""


def pump_manifest(port: int, extra: str = "") -> str:
    return f"""
    service_name = "pump"
    tenant = "garden"
    endpoint_types = ["local", "edge"]
    [[endpoints]]
    type = "local"
    url = "http://127.0.0.1:{port}"
    {extra}
    """


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def ingress_client(d) -> ApiClient:
    text = d.config.read_text()
    listen = text.split("[ingress]", 1)[1].split('listen = "', 1)[1].split('"', 1)[0]
    return ApiClient(f"http://{listen}", timeout=10)


def outcome(answer: tuple[int, list[tuple[str, str]], bytes]) -> tuple[int, str]:
    """(status, "error code (rule)") of an answer: what the entry-point table shows."""
    code, headers, body = answer
    doc = json.loads(body) if body.startswith(b"{") else {}
    rule = {k.lower(): v for k, v in headers}.get("x-edged-rule", "")
    return code, doc.get("error", "") + (f" ({rule})" if rule else "")


PEER = [("x-edged-fleet", "home"), ("x-edged-node", "pi-2")]


def calls_seen(d, tenant: str, service: str) -> int:
    """Calls an endpoint of the service answered (the daemon's own count, read as admin)."""
    svc = d.admin.get_json(f"/v1/services/{service}?tenant={tenant}")
    return sum(ep["calls_ok"] + ep["calls_failed"] for ep in svc["endpoints"])


def test_every_entry_point_answers_each_kind_of_caller(backends, edged):
    thermo, pump = backends("thermo"), backends("pump")
    d = edged({"thermo.toml": manifest("thermo", [(thermo.port, 1)]), "pump.toml": pump_manifest(pump.port)}, TENANTS)
    ingress = ingress_client(d)
    table: dict[str, dict[str, tuple[int, str]]] = {}

    table["local API"] = {
        "no identity": outcome(d.call("pump", "/x")),
        "wrong tenant": outcome(d.call("thermo", "/x", headers=bearer("t-lamps"))),
        "denied by a rule": outcome(d.call("pump", "/setpoint", headers=bearer("t-lamps"))),
        "denied by the tenant default": outcome(d.call("pump", "/x", headers=bearer("g-token"))),
        "allowed": outcome(d.call("pump", "/x", headers=bearer("t-lamps"))),
    }
    table["peer ingress"] = {
        "no identity": outcome(ingress.request("GET", "/t/garden/svc/pump/x")),
        "wrong tenant": outcome(ingress.request("GET", "/t/garden/svc/thermo/x", b"", PEER)),
        "denied by a rule": outcome(ingress.request("GET", "/t/garden/svc/pump/setpoint", b"", PEER)),
        "denied by the tenant default": outcome(
            ingress.request("GET", "/t/garden/svc/pump/x", b"", [("x-edged-fleet", "home"), ("x-edged-node", "pi-3")])
        ),  # no rule allows node pi-3
        "allowed": outcome(ingress.request("GET", "/t/garden/svc/pump/x", b"", PEER)),
    }
    print(json.dumps(table, indent=1))
    assert table == {
        "local API": {
            "no identity": (401, "unauthorized"),
            "wrong tenant": (404, "unknown_service"),
            "denied by a rule": (403, "forbidden (no-setpoint)"),
            "denied by the tenant default": (403, "forbidden (default)"),
            "allowed": (200, ""),
        },
        "peer ingress": {
            "no identity": (403, "forbidden"),
            "wrong tenant": (404, "unknown_service"),
            "denied by a rule": (403, "forbidden (no-setpoint)"),
            "denied by the tenant default": (403, "forbidden (default)"),
            "allowed": (200, ""),
        },
    }
    assert calls_seen(d, "garden", "pump") == 2  # the two allowed calls only: refusals never reached it
    metrics = d.admin.request("GET", "/metrics")[2].decode()
    assert 'edged_authz_denied_total{tenant="garden",rule="no-setpoint"} 2' in metrics
    assert 'edged_authz_denied_total{tenant="garden",rule="default"} 2' in metrics
    # A garden app registering "thermo" makes garden's own thermo: tenant default's views do not change.
    reg = {"manifest": {"service_name": "thermo", "endpoints": [{"type": "local", "url": pump.url}]}, "id": "x"}
    body = json.dumps(reg).encode()
    assert d.api.request("POST", "/v1/register", body, bearer("t-lamps") + JSON)[0] == 201
    home = bearer("t-thermo")
    services = get(d, "/v1/services", home)["services"]
    assert [(s["name"], s["tenant"], len(s["endpoints"])) for s in services] == [("thermo", "default", 1)]
    assert get(d, "/v1/register", home)["registrations"] == []
    assert calls_seen(d, "default", "thermo") == 0  # no cross-tenant attempt reached tenant default's endpoint
    assert outcome(d.call("thermo", "/x", headers=home)) == (200, "")
    assert outcome(d.call("thermo", "/x", headers=bearer("t-lamps"))) == (403, "forbidden (default)")  # garden's


CLIENT = """
import socket, sys
method, path, sock_path = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX)
s.connect(sock_path)
s.sendall(f"{method} {path} HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n".encode())
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
print(head.split()[1].decode())
print(body.decode())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root and python3")
def test_two_local_users_are_two_tenants_by_their_uid(backends, edged):
    thermo, pump = backends("thermo"), backends("pump")
    run_dir = Path(tempfile.mkdtemp(prefix="edged-tenants-"))  # other users must reach the socket
    os.chmod(run_dir, 0o755)
    users = '[access.apps.lamps]\ntenant = "garden"\nuids = [65534]\n[access.apps.thermo-app]\nuids = [65533]\n'
    d = edged(
        {"thermo.toml": manifest("thermo", [(thermo.port, 1)]), "pump.toml": pump_manifest(pump.port)},
        users + '[authz]\ntenants = { garden = "deny" }\n[[authz.rules]]\nname = "lamps-pump"\naction = "allow"\n'
        'tenant = "garden"\nservice = "pump"\nfrom = ["garden/lamps"]\nmethods = ["GET"]\n',
        start=False,
    )
    sock = run_dir / "edged.sock"
    text = d.config.read_text()
    d.config.write_text(text.replace('socket = "run/edged.sock"', f'socket = "{sock}"\nsocket_group = "nogroup"'))
    try:
        d.start()

        def as_user(uid: int, method: str, path: str) -> tuple[int, dict]:
            argv = ["/usr/bin/python3", "-c", CLIENT, method, path, str(sock)]
            out = subprocess.run(argv, user=uid, group=65534, capture_output=True, text=True, cwd="/", timeout=20)
            assert out.returncode == 0, out.stderr
            code, _, body = out.stdout.partition("\n")
            return int(code), json.loads(body) if body.strip().startswith("{") else {}

        # uid 65534 is lamps (garden), uid 65533 is thermo-app (default): each sees and calls its own tenant.
        assert [s["name"] for s in as_user(65534, "GET", "/v1/services")[1]["services"]] == ["pump"]
        assert [s["name"] for s in as_user(65533, "GET", "/v1/services")[1]["services"]] == ["thermo"]
        assert as_user(65534, "GET", "/svc/pump/x")[0] == 200
        assert as_user(65534, "POST", "/svc/pump/x")[0] == 403  # the rule allows GET only
        assert as_user(65534, "GET", "/svc/thermo/x")[0] == 404
        assert as_user(65533, "GET", "/svc/pump/x")[0] == 404
        assert as_user(65533, "GET", "/svc/thermo/x")[0] == 200
        assert as_user(65534, "GET", "/v1/resolve/thermo")[0] == 404
        assert as_user(65534, "GET", "/v1/services/thermo")[0] == 404
    finally:
        d.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def get(d, path: str, headers) -> dict:
    status, _, body = d.api.request("GET", path, b"", headers)
    assert status == 200, (path, status, body)
    return json.loads(body)


def read_events(
    client: ApiClient,
    headers,
    seconds: float,
    out: list[dict],
    ready: threading.Event | None = None,
    until: Callable[[dict], bool] | None = None,
) -> None:
    """Collect server-sent events for `seconds` (on its own connection), or until one for which `until` is
    true. `ready` is set once the stream is open: the daemon subscribes before it answers the head."""
    import http.client

    conn = http.client.HTTPConnection(client.address.split("//", 1)[1], timeout=seconds)
    conn.request("GET", "/v1/events", headers=dict(headers))
    resp = conn.getresponse()
    if ready is not None:
        ready.set()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            line = resp.fp.readline()
            if line.startswith(b"data: "):
                out.append(json.loads(line[6:]))
                if until is not None and until(out[-1]):
                    break
    except (TimeoutError, OSError):
        pass
    finally:
        conn.close()


def test_jwt_callers_see_only_their_tenant_and_metrics_need_an_admin(backends, edged, tmp_path):
    thermo, pump = backends("thermo"), backends("pump")
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [{**json.loads(ECAlgorithm.to_jwk(key.public_key())), "kid": "k1"}]}
    d = edged(
        {"thermo.toml": manifest("thermo", [(thermo.port, 1)]), "pump.toml": pump_manifest(pump.port)},
        '[access]\nanonymous = "none"\nnode_views = "admin"\n'
        '[access.jwt]\nissuer = "https://id.example"\naudience = "edged"\njwks_file = "jwks.json"\n',
        start=False,
    )
    (d.root / "jwks.json").write_text(json.dumps(jwks))
    d.start()

    def tok(tenant: str, sub: str, **extra) -> list[tuple[str, str]]:
        now = int(time.time())
        body = {"iss": "https://id.example", "aud": "edged", "sub": sub, "tenant": tenant, "exp": now + 600, **extra}
        return bearer(jwt.encode(body, key, algorithm="ES256", headers={"kid": "k1"}))

    garden, home = tok("garden", "lamps", roles=["write"]), tok("default", "heater")
    events: list[dict] = []
    ready = threading.Event()
    # Until garden's own registration, made after default's: one stream keeps the order, so a leak of
    # default's event would have come by then.
    until = lambda e: e.get("id") == "garden-reg"  # noqa: E731
    listener = threading.Thread(target=read_events, args=(d.api, garden, 30.0, events, ready, until))
    listener.start()
    assert ready.wait(30), "the event stream did not open"
    # The admin registers for tenant default (a JWT without the write role may not), garden's app for garden.
    reg = {"service": "thermo", "endpoint": {"type": "local", "url": thermo.url}, "id": "home-reg"}
    assert d.admin.request("POST", "/v1/register", json.dumps(reg).encode(), JSON)[0] == 201
    reg = {"service": "pump", "endpoint": {"type": "local", "url": pump.url}, "id": "garden-reg"}
    assert d.api.request("POST", "/v1/register", json.dumps(reg).encode(), garden + JSON)[0] == 201
    listener.join()

    assert [s["name"] for s in get(d, "/v1/services", garden)["services"]] == ["pump"]
    assert [s["name"] for s in get(d, "/v1/services", home)["services"]] == ["thermo"]
    assert [r["id"] for r in get(d, "/v1/register", garden)["registrations"]] == ["garden-reg"]
    assert [r["id"] for r in get(d, "/v1/register", home)["registrations"]] == ["home-reg"]
    status = get(d, "/v1/status", garden)
    assert [s["name"] for s in status["services"]] == ["pump"] and status["peers"] == [] and status["config"] == {}
    assert d.call("pump", "/x", headers=garden)[0] == 200
    assert d.call("thermo", "/x", headers=garden)[0] == 404
    assert d.call("pump", "/x", headers=home)[0] == 404
    assert d.api.request("GET", "/v1/resolve/thermo", b"", garden)[0] == 404
    # No event of tenant default reached the garden listener; its own registration did.
    assert events and all(e.get("tenant") in ("garden", None) for e in events), events
    assert any(e.get("id") == "garden-reg" for e in events) and not any(e.get("id") == "home-reg" for e in events)
    assert all(e["type"] == "services_changed" for e in events if e.get("tenant") is None)
    # /metrics (every tenant's services) is for admins here; an admin sees every tenant.
    assert d.api.request("GET", "/metrics", b"", garden)[0] == 403
    assert d.admin.request("GET", "/metrics")[0] == 200
    assert {s["tenant"] for s in d.admin.get_json("/v1/services")["services"]} == {"default", "garden"}
    # Tokens it cannot trust: expired, or signed by another key.
    assert d.call("pump", "/x", headers=tok("garden", "lamps", exp=int(time.time()) - 120))[0] == 401
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode({"iss": "https://id.example", "aud": "edged", "sub": "x", "tenant": "garden",
                         "exp": int(time.time()) + 60}, other, algorithm="ES256", headers={"kid": "k1"})  # fmt: skip
    assert d.call("pump", "/x", headers=bearer(forged))[0] == 401


def test_a_burst_over_a_quota_gets_exact_counts_of_200_and_429(backends, edged):
    pump = backends("pump")
    rate, burst = 0.01, 25
    quota = f'[quotas."garden/pump"]\nrate = {rate}\nburst = {burst}\n[quotas.garden]\nin_flight = 50\n'
    d = edged({"pump.toml": pump_manifest(pump.port)}, '[tenants.garden]\ntokens = ["g-token"]\n' + quota)
    statuses, retry = [], set()
    t0 = time.monotonic()
    for _ in range(100):
        code, headers, _ = d.call("pump", "/x", headers=bearer("g-token"))
        statuses.append(code)
        retry.add({k.lower(): v for k, v in headers}.get("retry-after"))
    elapsed = time.monotonic() - t0
    assert elapsed < 1 / rate  # (else a token refilled: one more 200)
    assert (statuses.count(200), statuses.count(429)) == (burst, 100 - burst)
    assert statuses[:burst] == [200] * burst  # the burst first, then refusals
    # 1 token at `rate` takes 1/rate s (100 s), less what refilled since the burst's first call: at most
    # `elapsed` (seconds on a loaded box), so not one value.
    waits = {int(v) for v in retry - {None}}
    assert None in retry and waits, retry
    assert all(math.ceil(1 / rate - elapsed) <= w <= math.ceil(1 / rate) for w in waits), (waits, elapsed)
    assert calls_seen(d, "garden", "pump") == 25
    # Quotas change at runtime: an admin raises this one through the API.
    body = json.dumps({"rate": 1000, "burst": 10}).encode()
    assert d.admin.request("PUT", "/v1/authz/quotas/garden/pump", body, JSON)[0] == 200
    assert d.call("pump", "/x", headers=bearer("g-token"))[0] == 200
    got = d.admin.get_json("/v1/authz")["quotas"]
    assert got["garden/pump"]["rate"] == 1000 and got["garden"]["in_flight_now"] == 0


def test_in_flight_cap_from_the_manifest(backends, edged):
    pump = backends("pump")
    d = edged({"pump.toml": manifest("pump", [(pump.port, 1)], "[policy]\nquota = { in_flight = 2 }\n")})
    results: list[int] = []

    def slow() -> None:
        results.append(d.call("pump", "/sleep/4000")[0])

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    # Both admitted (each holds its place for 4 s: room for a loaded box to admit the second), then the third.
    wait_for(lambda: calls_in_flight(d) == 2, 30, what="two calls in flight")
    third = d.call("pump", "/x")
    for t in threads:
        t.join()
    assert third[0] == 429 and json.loads(third[2])["error"] == "rate_limited"
    assert results == [200, 200]
    assert d.call("pump", "/x")[0] == 200  # the places came back


def calls_in_flight(d) -> int:
    """Calls in flight through the daemon, without this scrape itself (the same server answers it: counting it
    let the test send its third call while the second slow one was not yet admitted)."""
    for line in d.admin.request("GET", "/metrics")[2].decode().splitlines():
        if line.startswith("edged_inflight_calls "):
            return int(float(line.split()[1])) - 1
    return 0


def test_rules_change_at_runtime_and_explain_names_the_rule(backends, edged):
    pump = backends("pump")
    d = edged({"pump.toml": pump_manifest(pump.port)}, TENANTS)
    assert d.call("pump", "/x", headers=bearer("g-token"))[0] == 403
    rule = {"action": "allow", "tenant": "garden", "service": "pump", "from": ["garden/token"], "methods": ["GET"]}
    # Writing rules takes the admin right: a tenant's own token may not.
    put = ("PUT", "/v1/authz/rules/garden-token-pump", json.dumps(rule).encode())
    assert d.api.request(*put, bearer("g-token") + JSON)[0] == 403
    assert d.admin.request(*put, JSON)[0] == 200
    assert d.call("pump", "/x", headers=bearer("g-token"))[0] == 200
    assert d.admin.request("PUT", "/v1/authz/rules/no-setpoint", json.dumps(rule).encode(), JSON)[0] == 409

    def explain(*args: str) -> str:
        argv = ["-m", "edged", "authz", "explain", "--api", f"unix:{d.socket}", *args]
        out = subprocess.run([os.environ.get("PYTHON", "python3"), *argv], capture_output=True, text=True, timeout=30,
                             cwd=d.root, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "allow: allowed by rule 'garden-token-pump' (api)" in explain("--as", "garden/token", "garden/pump", "/x")
    denied = explain("--as", "garden/token", "garden/pump", "/setpoint")
    assert denied.startswith("deny: denied by rule 'no-setpoint'") and "rule: no-setpoint" in denied
    assert "rule: default" in explain("--as", "garden/token", "garden/pump", "/x", "-X", "POST")
    # Kept in the state dir: a restart keeps it.
    d.stop()
    d.start()
    assert d.call("pump", "/x", headers=bearer("g-token"))[0] == 200
    assert d.admin.request("DELETE", "/v1/authz/rules/garden-token-pump")[0] == 200
    assert d.call("pump", "/x", headers=bearer("g-token"))[0] == 403


BRIDGE_PUMP = 'service_name = "pump"\ntenant = "garden"\n[[endpoints]]\ntype = "local"\nurl = "{url}"\n'
CLOUD_PUMP = 'service_name = "pump"\ntenant = "garden"\nendpoint_types = ["cloud"]\n[policy]\nretries = 0\n'


def test_the_cloud_bridge_applies_its_own_rules_to_the_calling_node(backends, edged, broker, bridges, topic_prefix):
    served = backends("served-by-bridge")
    bridge_rules = """
[tenants.garden]
[authz]
tenants = { garden = "deny" }
""" + NO_SETPOINT + """
[[authz.rules]]
name = "test-node-reads-pump"
action = "allow"
tenant = "garden"
service = "pump"
from = ["spiffe://home/node/test-node"]
methods = ["GET"]
"""
    bridge_pump = BRIDGE_PUMP.format(url=served.url)
    grant = '{ garden = ["spiffe://home/node/test-node"] }'
    bridges(bridge_config(broker, topic_prefix, tenants=grant) + bridge_rules, {"pump.toml": bridge_pump})
    d = edged(
        {"pump.toml": CLOUD_PUMP},
        '[tenants.garden]\ntokens = ["g-token"]\n' + mqtt_section(broker, topic_prefix),
    )
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    garden = bearer("g-token")

    def answer(method: str, path: str, headers) -> tuple[int, str]:
        return outcome(d.call("pump", path, method, headers=headers))

    wait_for(lambda: answer("GET", "/x", garden)[0] == 200, 10, what="the bridge answers")
    assert answer("GET", "/setpoint", garden) == (403, "forbidden (no-setpoint)")
    assert answer("POST", "/x", garden) == (403, "forbidden (default)")
    assert answer("GET", "/x", [])[0] == 404  # tenant default has no pump: the call never leaves the box


def test_the_calling_app_crosses_to_the_bridge_as_a_sealed_claim_and_meets_its_rules(
    backends, edged, bridges, fleet_broker, topic_prefix
):
    """Issue 10 item 5 (cloud tier): the daemon seals the caller's tenant and app into the request; the bridge
    trusts that claim only because the sealing node's certificate verified, and applies its own rules to it."""
    served = backends("served-by-bridge")
    rules = """
[tenants.garden]
[authz]
tenants = { garden = "deny" }
[[authz.rules]]
name = "lamps-use-pump"
action = "allow"
tenant = "garden"
service = "pump"
from = ["garden/lamps"]
"""
    bridge_pump = BRIDGE_PUMP.format(url=served.url)
    grant = '{ garden = ["spiffe://home/node/test-*"] }'
    config = bridge_config(fleet_broker, topic_prefix, tenants=grant) + rules
    bridge = bridges(config, {"pump.toml": bridge_pump}, start=False)
    enrolled(fleet_broker.ca, bridge.root, "cloud-1")
    bridge.start()
    apps = '[access.apps.lamps]\ntenant = "garden"\ntokens = ["t-lamps"]\n[access.apps.guest]\ntenant = "garden"\n'
    d = edged(
        {"pump.toml": CLOUD_PUMP},
        apps + 'tokens = ["t-guest"]\n' + mqtt_section(fleet_broker, topic_prefix),
        start=False,
    )
    enrolled(fleet_broker.ca, d.root, "test-node")
    d.start()
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    wait_for(lambda: d.call("pump", "/x", headers=bearer("t-lamps"))[0] == 200, 10, what="the bridge answers lamps")
    # Same node, same tenant, another app: the bridge's default for garden refuses it.
    assert outcome(d.call("pump", "/x", headers=bearer("t-guest"))) == (403, "forbidden (default)")



def test_a_verified_node_acts_over_the_bridge_only_for_the_tenants_granted_to_it(
    backends, edged, bridges, fleet_broker, topic_prefix
):
    """Before: a node whose certificate verified was trusted for whatever tenant its request named (default
    allow): test-node called garden's pump through the bridge. Now the bridge's `[bridge] tenants` says which
    nodes may act for which tenant; unset, every node may call in the default tenant and none in another."""
    served = backends("served-by-bridge")
    manifests = {"pump.toml": BRIDGE_PUMP.format(url=served.url)}
    grant = '{ garden = ["spiffe://home/node/pi-*"] }'  # not test-node
    bridge = bridges(bridge_config(fleet_broker, topic_prefix, tenants=grant), manifests, start=False)
    enrolled(fleet_broker.ca, bridge.root, "cloud-1")
    bridge.start()
    d = edged(
        {"pump.toml": CLOUD_PUMP},
        '[tenants.garden]\ntokens = ["g-token"]\n' + mqtt_section(fleet_broker, topic_prefix),
        start=False,
    )
    enrolled(fleet_broker.ca, d.root, "test-node")
    d.start()
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    wait_for(lambda: d.call("pump", "/x", headers=bearer("g-token"))[0] == 403, 15, what="the bridge refuses")
    status, _, body = d.call("pump", "/x", headers=bearer("g-token"))
    assert status == 403 and b"may not call in tenant garden" in body, body
    assert json.loads(body)["error"] == "forbidden"  # said by the bridge (the daemon itself lets garden call pump)
