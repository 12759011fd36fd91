"""End to end: policies changed at runtime through the API and `edged policy`, kept across a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from harness import free_port, manifest, wait_for

POLICY = """
[policy]
strategy = "priority"
per_try_timeout = "300ms"
timeout = "2s"
"""


def edged_cli(d, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edged", *words, "--api", f"unix:{d.socket}"], capture_output=True, text=True
    )


def first_url(d) -> str:
    return d.get("/v1/resolve/thermo")["ranked"][0]["url"]


def test_a_policy_set_at_runtime_changes_routing_keeps_the_manifest_keys_and_survives_a_restart(backends, edged):
    b1, b2 = backends("p1"), backends("p2")
    d = edged({"thermo.toml": manifest("thermo", [(b1.port, 1), (b2.port, 2)], POLICY)})
    view = d.get("/v1/policies/thermo")
    assert view["source"] == "declared" and view["policy"]["strategy"] == "priority" and view["override"] is None

    # A dry run shows the plan under the proposal and changes nothing.
    status, _, body = d.api.request(
        "POST", "/v1/policies/thermo:dry-run", json.dumps({"strategy": "round_robin"}).encode()
    )
    dry = json.loads(body)
    assert status == 200 and dry["strategy"] == "round_robin" and dry["current"]["strategy"] == "priority"
    assert d.get("/v1/policies/thermo")["override"] is None

    # Set through the CLI: only the keys given change; the manifest's timeouts stay.
    # (levels=none: one level for both priorities, else round robin would turn within priority 1 only)
    out = edged_cli(d, "policy", "set", "thermo", "strategy=round_robin", "levels=none", "retries=1")
    assert out.returncode == 0, out.stderr
    view = d.get("/v1/policies/thermo")
    assert view["source"] == "api"
    assert view["override"] == {"strategy": "round_robin", "levels": "none", "retries": 1}
    assert view["policy"]["per_try_timeout"] == 0.3 and view["policy"]["timeout"] == 2.0
    served = {json.loads(d.call("thermo", "/x")[2])["name"] for _ in range(4)}
    assert served == {"p1", "p2"}  # round robin now

    # Kept across a restart, with the broker-less state dir.
    assert d.stop() == 0
    d.start()
    assert d.get("/v1/policies/thermo")["policy"]["strategy"] == "round_robin"

    # Reset: the manifest's policy is back.
    out = edged_cli(d, "policy", "reset", "thermo")
    assert out.returncode == 0, out.stderr
    assert d.get("/v1/policies/thermo")["source"] == "declared"
    assert {json.loads(d.call("thermo", "/x")[2])["name"] for _ in range(4)} == {"p1"}


def test_bad_policies_are_refused_with_the_key(backends, edged):
    b1 = backends("p1")
    d = edged({"thermo.toml": manifest("thermo", [(b1.port, 1)], POLICY)})
    cases = [
        ({"strategy": "fastest"}, 400, "invalid_policy", "strategy"),
        ({"per_try_timeout": "5s"}, 400, "invalid_policy", "timeout"),  # longer than the manifest's 2 s timeout
        ({"colour": "red"}, 400, "invalid_policy", "colour"),
        (["strategy"], 400, "invalid_policy", "JSON object"),
    ]
    for body, code, error, mentions in cases:
        status, _, data = d.admin.request("PUT", "/v1/policies/thermo", json.dumps(body).encode())
        doc = json.loads(data)
        assert (status, doc["error"]) == (code, error) and mentions in str(doc["detail"]), doc
    assert d.admin.request("PUT", "/v1/policies/nope", b"{}")[0] == 404
    assert d.admin.request("DELETE", "/v1/policies/thermo")[0] == 404  # nothing to reset
    assert d.get("/v1/policies/thermo")["source"] == "declared"
    out = edged_cli(d, "policy", "set", "thermo", "strategy=fastest")
    assert out.returncode == 1 and "invalid_policy" in out.stderr


def test_resolve_shows_each_level_and_calls_spill_over_in_proportion_to_health(backends, edged):
    """Two of three endpoints of priority 1 fail their checks: that level keeps 1/3 x 1.4 = 47 % of the
    calls and the priority-2 level takes the rest; `edged resolve` shows both levels' shares; no call fails."""
    live = backends("a0")
    backup = backends("b")
    dead = [free_port(), free_port()]
    checks = """
    [health_check]
    http = "/healthz"
    interval = "200ms"
    timeout = "100ms"
    rise = 1
    fall = 1
    """
    eps = [(live.port, 1), (dead[0], 1), (dead[1], 1), (backup.port, 2)]
    d = edged({"thermo.toml": manifest("thermo", eps, POLICY + checks)})
    wait_for(lambda: d.get("/v1/resolve/thermo")["levels"][0]["healthy"] == 1, 10, what="two endpoints down")
    view = d.get("/v1/resolve/thermo")
    assert [(lv["level"], lv["healthy"], lv["total"], lv["share"]) for lv in view["levels"]] == [
        ("p1/local", 1, 3, 46.7),
        ("p2/local", 1, 1, 53.3),
    ]
    served = Counter(json.loads(d.call("thermo", "/x")[2])["name"] for _ in range(200))
    assert set(served) == {"a0", "b"} and 60 < served["a0"] < 130, served
    out = edged_cli(d, "resolve", "thermo")
    assert out.returncode == 0 and "p2/local" in out.stdout and "53%" in out.stdout, out.stdout


def test_predictive_explains_its_choice_and_keeps_what_it_learned_across_a_restart(backends, edged):
    b1, b2 = backends("p1"), backends("p2")
    policy = POLICY.replace('"priority"', '"predictive"')
    d = edged({"thermo.toml": manifest("thermo", [(b1.port, 10), (b2.port, 10)], policy)})
    assert all(d.call("thermo", "/x")[0] == 200 for _ in range(30))
    view = d.get("/v1/resolve/thermo")
    assert view["strategy"] == "predictive" and not view["note"]
    learned = {r["endpoint"] for r in view["ranked"] if r["reason"].startswith("predictive: latency")}
    assert learned, view["ranked"]  # at least the endpoint that took the calls has a model, and says so
    assert d.stop() == 0
    kept = json.loads((d.root / "state" / "predictive.json").read_text())
    assert learned <= set(kept["models"])
    d.start()
    view = d.get("/v1/resolve/thermo")
    again = {r["endpoint"] for r in view["ranked"] if r["reason"].startswith("predictive: latency")}
    assert again == learned, view["ranked"]
