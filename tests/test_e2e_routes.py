"""End to end: traffic splits and match rules (edged/routes.py) with the daemon as a subprocess and real
backends: a 90/10 canary split by label, a header rule to the canary, a path-prefix rule with a policy of its
own, changes through the policy API and through signed fleet config, and `edged policy dry-run`."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from conftest import wait_for
from fixtures_mqtt import broker, mqtt_section, topic_prefix, wait_metric  # noqa: F401
from fixtures_netns import edge_nodes, ns_backends, thermo_manifest, unique_fleet  # noqa: F401
from test_fleet_config import publish_retained

from edged.cloud.fleet import document_text, generate_key, load_private_key, sign_document

SUBSETS = """
[policy]
strategy = "priority"
per_try_timeout = "500ms"
timeout = "3s"
[policy.subsets]
v1 = { version = "1" }
v2 = { version = "2" }
"""
CANARY = """
[[policy.splits]]
subset = "v1"
weight = 90
[[policy.splits]]
subset = "v2"
weight = 10
"""
HEADER_RULE = """
[[policy.routes]]
name = "canary"
match = { headers = [{ name = "x-canary", exact = "1" }] }
subset = "v2"
"""
PREFIX_RULE = """
[[policy.routes]]
name = "spread"
match = { path_prefix = "/spread" }
policy = { strategy = "round_robin", levels = "none" }
"""


def labelled_manifest(eps: list[tuple[int, int, str]], extra: str) -> str:
    """`api` with local endpoints [(port, priority, version)]."""
    lines = ['service_name = "api"']
    for port, priority, version in eps:
        lines += [
            "[[endpoints]]",
            'type = "local"',
            f'url = "http://127.0.0.1:{port}"',
            f"priority = {priority}",
            f'labels = {{ version = "{version}" }}',
        ]
    return "\n".join(lines) + "\n" + extra


def served(d, n: int, path: str = "/x", headers=None) -> Counter:
    out: Counter = Counter()
    for _ in range(n):
        status, _, body = d.call("api", path, headers=headers)
        assert status == 200, body
        out[json.loads(body)["name"]] += 1
    return out


def edged_cli(d, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edged", *words, "--api", f"unix:{d.socket}"], capture_output=True, text=True
    )


def test_a_canary_split_a_header_rule_and_a_path_rule_with_its_own_policy(backends, edged):
    v1a, v1b, v2 = backends("v1a"), backends("v1b"), backends("v2")
    eps = [(v1a.port, 1, "1"), (v1b.port, 2, "1"), (v2.port, 1, "2")]
    d = edged({"api.toml": labelled_manifest(eps, SUBSETS + CANARY + HEADER_RULE + PREFIX_RULE)})

    # 90/10 by label; within v1, `priority`: v1a (priority 1) takes them all. Binomial(400, 0.1): 40 +- 6.
    counts = served(d, 400)
    assert set(counts) == {"v1a", "v2"} and 15 <= counts["v2"] <= 70, counts

    # The header rule: every call with x-canary: 1 goes to version 2; another value is not the rule's.
    assert served(d, 30, headers=[("x-canary", "1")]) == Counter({"v2": 30})
    assert served(d, 30, headers=[("x-canary", "yes")])["v1a"] >= 18  # not the rule's: the 90/10 split
    # The path-prefix rule picks another policy: round robin over every priority of the subset it draws.
    spread = served(d, 60, path="/spread/x")
    assert spread["v1a"] >= 15 and spread["v1b"] >= 15, spread  # `priority` would never send to v1b
    assert "v1b" not in served(d, 20, path="/spreadsheet")  # a prefix is whole segments

    view = d.get("/v1/resolve/api")
    assert [(i["subset"], i["share"], i["healthy"]) for i in view["split"]] == [("v1", 90.0, True), ("v2", 10.0, True)]

    # v2 goes down: no call fails (a call drawn to v2 fails over to v1 before health knows), then health
    # takes v2 out and its 10 % go to v1; `edged resolve` says so.
    v2.kill()
    counts = served(d, 100)
    assert set(counts) == {"v1a"}, counts
    wait_for(lambda: d.get("/v1/resolve/api")["split"][1]["share"] == 0.0, 10, what="v2's share given away")
    out = edged_cli(d, "resolve", "api")
    assert out.returncode == 0 and "split of the default route (2 match rules before it)" in out.stdout, out.stdout
    assert [line.split()[:4] for line in out.stdout.splitlines() if line.startswith("v")] == [
        ["v1", "version=1", "90", "100%"],
        ["v2", "version=2", "10", "0%"],
    ], out.stdout


def test_splits_changed_through_the_api_at_runtime_and_dry_run_shows_the_route(backends, edged):
    v1, v2 = backends("v1"), backends("v2")
    eps = [(v1.port, 1, "1"), (v2.port, 1, "2")]
    d = edged({"api.toml": labelled_manifest(eps, SUBSETS + CANARY + HEADER_RULE)})
    assert served(d, 50)["v1"] >= 35

    # The whole of the traffic to v2, through the CLI (policy API); the manifest's subsets and rules stay.
    out = edged_cli(d, "policy", "set", "api", 'splits=[{"subset": "v2", "weight": 100}]')
    assert out.returncode == 0, out.stderr
    assert served(d, 30) == Counter({"v2": 30})
    view = d.get("/v1/policies/api")
    assert view["source"] == "api" and view["policy"]["routes"][0]["name"] == "canary"

    # An invalid change is refused, naming the field, and changes nothing.
    status, _, body = d.admin.request(
        "PUT", "/v1/policies/api", json.dumps({"splits": [{"subset": "v9", "weight": 1}]}).encode()
    )
    doc = json.loads(body)
    assert status == 400 and doc["error"] == "invalid_policy" and "splits[0].subset" in doc["detail"], doc
    assert served(d, 10) == Counter({"v2": 10})

    # Dry run of a proposal for a sample request: the rule it matches, the subset, the ranked endpoints.
    out = edged_cli(d, "policy", "dry-run", "api", 'splits=[{"subset": "v1", "weight": 100}]', "-H", "x-canary: 1")
    assert out.returncode == 0, out.stderr
    assert "route: canary" in out.stdout and "subset v2 (version=2): share 100.0%" in out.stdout, out.stdout
    assert f"http://127.0.0.1:{v2.port}" in out.stdout and f"http://127.0.0.1:{v1.port}" not in out.stdout
    three_to_one = 'splits=[{"subset": "v1", "weight": 3}, {"subset": "v2", "weight": 1}]'
    out = edged_cli(d, "policy", "dry-run", "api", three_to_one)
    assert out.returncode == 0, out.stderr
    assert "route: default (no rule matched)" in out.stdout
    assert "subset v1 (version=1): share 75.0%" in out.stdout and "subset v2 (version=2): share 25.0%" in out.stdout
    sample = {"request": {"path": "/x", "headers": {"x-canary": "1"}}}
    status, _, body = d.api.request("POST", "/v1/policies/api:dry-run", json.dumps(sample).encode())
    dry = json.loads(body)
    assert status == 200 and dry["route"]["rule"] == "canary"
    assert [r["url"] for r in dry["ranked"]] == [f"http://127.0.0.1:{v2.port}"]
    bad = json.dumps({"request": {"method": 7}}).encode()
    status, _, body = d.api.request("POST", "/v1/policies/api:dry-run", bad)
    assert status == 400 and "request.method" in json.loads(body)["detail"]
    assert served(d, 10) == Counter({"v2": 10})  # a dry run changes nothing
    out = edged_cli(d, "policy", "dry-run", "api", "subsets={}", "routes=[]", "splits=[]", "--path", "/x")
    assert out.returncode == 0 and "route: default (no rule matched)" in out.stdout, out.stdout + out.stderr


def test_a_split_pushed_in_signed_fleet_config(tmp_path, backends, edged, broker, topic_prefix):
    private_pem, public_pem, _ = generate_key()
    (tmp_path / "ops.pub").write_bytes(public_pem)
    (tmp_path / "ops.key").write_bytes(private_pem)
    key = load_private_key(str(tmp_path / "ops.key"))
    v1, v2 = backends("v1"), backends("v2")
    extra = mqtt_section(broker, topic_prefix) + f'[fleet]\nkeys = ["{tmp_path / "ops.pub"}"]\n'
    d = edged({"api.toml": labelled_manifest([(v1.port, 1, "1"), (v2.port, 1, "2")], SUBSETS)}, extra)
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    assert len(served(d, 10)) == 1  # subsets alone split nothing: `priority` over all (one of the two)
    policy = {
        "subsets": {"v1": {"version": "1"}, "v2": {"version": "2"}},
        "splits": [{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 50}],
        "routes": [{"match": {"headers": [{"name": "x-canary", "present": True}]}, "subset": "v2"}],
    }
    doc = sign_document(document_text({"fleet": "home", "version": 1, "policies": {"api": policy}}), key)
    publish_retained(broker.port, f"{topic_prefix}/home/config", doc)
    wait_for(lambda: d.get("/v1/policies/api")["source"] == "fleet", 10, what="fleet config applied")
    counts = served(d, 200)
    assert set(counts) == {"v1", "v2"} and 60 <= counts["v2"] <= 140, counts  # Binomial(200, .5): 100 +- 7
    assert served(d, 20, headers=[("x-canary", "anything")]) == Counter({"v2": 20})


def test_labels_travel_to_peers_and_a_caller_splits_and_routes_by_them(edge_nodes, ns_backends):
    """Two peers offer `api`, one with version 1, one with version 2 (labels of their local endpoints); a third
    node that declares only the policy routes by those labels over mDNS + /peer/services (mutual TLS)."""
    fleet = unique_fleet()
    for node, version in (("node-v1", "1"), ("node-v2", "2")):
        backend = ns_backends(f"api-{version}")
        manifest = thermo_manifest(backend.port, name="api", extra=f'labels = {{ version = "{version}" }}')
        edge_nodes(node, fleet=fleet, manifests={"api.toml": manifest}).start()
    caller = """
    service_name = "api"
    endpoint_types = ["edge"]
    """ + SUBSETS + HEADER_RULE + """
    [[policy.splits]]
    subset = "v1"
    weight = 100
    """
    a = edge_nodes("node-a", fleet=fleet, manifests={"api.toml": caller}).start()
    wait_for(lambda: len(a.edge_urls("api")) == 2, 15, what="api learned from both peers")
    labels = sorted(ep["labels"]["version"] for ep in a.endpoints("api") if ep["tier"] == "edge")
    assert labels == ["1", "2"]  # `edged status` / `/v1/services` show them
    for _ in range(20):
        status, _, body = a.call("api", "/x")
        assert status == 200 and json.loads(body)["name"] == "api-1", body
        status, _, body = a.call("api", "/x", headers=[("x-canary", "1")])
        assert status == 200 and json.loads(body)["name"] == "api-2", body
