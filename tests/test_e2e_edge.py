"""End to end, the edge tier: real daemons with real zeroconf, real backends, real DNS-SD responders.

On 127.0.0.1 (zeroconf bound to it, each test in a fleet of its own) for the fast tests; across network
namespaces (one per box, created and removed by the `lan` fixture) for the multi-host ones: no configuration,
SIGKILL, partition and heal.
"""

# ruff: noqa: F811  (the fixtures imported from fixtures_netns are test parameters)
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
from fixtures_netns import (
    UnixLoadGen,
    edge_nodes,  # noqa: F401  (fixtures)
    fake_vitals_roots,
    fleet_ca,
    lan,  # noqa: F401
    ns_backends,  # noqa: F401
    plain_services,  # noqa: F401
    thermo_manifest,
    unique_fleet,
    unique_type,
    wait_for,
)
from loadgen import summary
from zeroconf import ServiceBrowser, Zeroconf

from edged.identity import IdentityFiles
from edged.identity.tls import client_context

FAST_CHECK = """
[health_check]
http = "/healthz"
interval = "300ms"
timeout = "200ms"
rise = 1
fall = 1
[policy]
per_try_timeout = "200ms"
retries = 2
"""


def answered_by(response) -> str:
    status, _, body = response
    assert status == 200, body
    return json.loads(body)["name"]


def ingress_request(port: int, path: str, identity: IdentityFiles) -> tuple[int, dict]:
    """GET from an ingress over mutual TLS, presenting `identity`."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=client_context(identity))
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


# -- one namespace, zeroconf on 127.0.0.1 ---------------------------------------------------------------


def test_a_call_for_a_service_only_b_has_is_routed_to_b_and_away_the_moment_b_leaves(edge_nodes, ns_backends):
    fleet = unique_fleet()
    backend = ns_backends("thermo-b")
    a = edge_nodes("node-a", fleet=fleet).start()  # no manifest at all
    b = edge_nodes("node-b", fleet=fleet, manifests={"thermo.toml": thermo_manifest(backend.port)}).start()
    wait_for(lambda: a.edge_urls("thermo"), 10, what="thermo learned from node-b")
    assert a.edge_urls("thermo") == [f"https://127.0.0.1:{b.ingress_port}/svc/thermo"]
    status, headers, body = a.call("thermo", "/readings?unit=c")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["name"] == "thermo-b" and seen["path"] == "/readings?unit=c"
    # Over mutual TLS the caller is its certificate: no identity headers travel, none reach the service.
    assert "x-edged-fleet" not in seen["headers"] and "x-edged-node" not in seen["headers"]
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert dict(headers)["x-edged-endpoint"] == f"default/thermo/edge/mdns:{b.name}"
    (peer,) = a.peers()
    assert (peer["node"], peer["state"], peer["services"]) == (b.name, "up", ["default/thermo"])
    assert peer["cpu"] is not None and peer["bat"] is None and peer["power"] == ""  # this box: no battery
    metrics = a.api.request("GET", "/metrics")[2].decode()
    assert "edged_mdns_peers 1" in metrics and 'edged_node_vitals{kind="cpu"}' in metrics
    # SIGTERM: goodbye packets, node-a drops the endpoint and the service it had declared for it at once.
    b.stop()
    wait_for(lambda: not a.edge_urls("thermo"), 2, what="goodbye handled")
    assert a.call("thermo", "/readings")[0] == 404
    assert '"reason":"goodbye"' in a.log_text()


def test_a_plain_dns_sd_service_is_found_called_and_dropped_when_it_goes_silent(
    edge_nodes, ns_backends, plain_services
):
    stype = unique_type()
    backend = ns_backends("plain-thermo")
    manifest = f"""
    service_name = "thermo"
    [[endpoints]]
    type = "edge"
    mdns = "{stype}"
    """
    a = edge_nodes("node-a", fleet=unique_fleet(), manifests={"thermo.toml": manifest}).start()
    responder = plain_services(stype, "sensor-box", backend.port, txt={"path": "/api"})
    wait_for(lambda: a.edge_urls("thermo"), 10, what="the plain service resolved")
    assert a.edge_urls("thermo") == [f"http://127.0.0.1:{backend.port}/api"]
    status, _, body = a.call("thermo", "/readings")
    assert status == 200 and json.loads(body)["path"] == "/api/readings"
    assert "x-edged-fleet" not in json.loads(body)["headers"]  # no identity for a service outside the fleet
    responder.kill()  # SIGKILL: no goodbye; re-resolution finds it silent
    wait_for(lambda: not a.edge_urls("thermo"), 8, what="silent responder dropped")
    assert '"reason":"silent"' in a.log_text()


def test_fleets_ingress_rules_and_advertised_dns_sd_types(edge_nodes, ns_backends, tmp_path):
    fleet, stype = unique_fleet(), unique_type()
    backend = ns_backends("thermo-b")
    b = edge_nodes(
        "node-b",
        fleet=fleet,
        manifests={
            "thermo.toml": thermo_manifest(backend.port, top=f'advertise = "{stype}"'),
            "private.toml": thermo_manifest(backend.port, name="private", types='["local"]'),
        },
    ).start()
    other = edge_nodes(
        "node-c", fleet=unique_fleet(), manifests={"gadget.toml": thermo_manifest(backend.port, name="gadget")}
    ).start()
    a = edge_nodes("node-a", fleet=fleet).start()
    wait_for(lambda: a.edge_urls("thermo"), 10, what="thermo from node-b")
    # node-a resolves node-c too (it advertises in another fleet), and ignores it.
    wait_for(lambda: f"{other.name}._hubmesh._tcp.local." in a.log_text(), 15, what="node-c resolved by node-a")
    time.sleep(0.3)
    assert a.call("gadget")[0] == 404 and [p["node"] for p in a.peers()] == [b.name]
    assert other.call("thermo")[0] == 404  # and node-c ignores this fleet
    port = b.ingress_port
    member = fleet_ca(fleet).enroll(tmp_path / "member", "test")  # who may call is covered by test_e2e_peer_tls
    assert ingress_request(port, "/healthz", member) == (200, {"status": "ok", "node": b.name})
    assert ingress_request(port, "/svc/thermo/x", member)[1]["name"] == "thermo-b"
    status, doc = ingress_request(port, "/svc/private/x", member)  # local-only: never reachable from peers
    assert (status, doc["error"]) == (404, "unknown_service")
    assert ingress_request(port, "/peer/services", member)[1]["services"] == ["thermo"]
    # `advertise = "_x._tcp"`: plain DNS-SD tools see it, pointing at the ingress with its path, node and fleet.
    found: dict = {}
    zc = Zeroconf(interfaces=["127.0.0.1"])
    try:

        def on_change(zeroconf, service_type, name, state_change):
            found[name] = True

        browser = ServiceBrowser(zc, stype + ".local.", handlers=[on_change])
        wait_for(lambda: found, 5, what="advertised type browsed")
        info = zc.get_service_info(stype + ".local.", next(iter(found)), 3000)
        browser.cancel()
    finally:
        zc.close()
    assert info is not None and info.port == port
    assert info.properties[b"path"] == b"/svc/thermo" and info.properties[b"fleet"] == fleet.encode()
    assert info.properties[b"node"] == b.name.encode()


def test_a_node_of_another_fleet_that_goes_silent_is_no_lost_peer(edge_nodes, ns_backends):
    """Before: a node of another fleet on the same LAN, ignored while it answered, was listed among this node's
    peers as "lost" once it went silent (with no node name: a caller reading `node` met a KeyError)."""
    backend = ns_backends("thermo-b")
    fleet = unique_fleet()
    b = edge_nodes("node-b", fleet=fleet, manifests={"thermo.toml": thermo_manifest(backend.port)}).start()
    other = edge_nodes("node-c", fleet=unique_fleet()).start()
    a = edge_nodes("node-a", fleet=fleet).start()
    wait_for(lambda: a.edge_urls("thermo"), 15, what="node-b a peer of node-a")
    wait_for(lambda: f"{other.name}._hubmesh._tcp.local." in a.log_text(), 15, what="node-c resolved by node-a")
    other.kill()  # SIGKILL: no goodbye, it goes silent
    b.kill()
    removed = '"event":"mdns.removed"'
    wait_for(
        lambda: all(f'{removed},"instance":"{n.name}.' in a.log_text() for n in (b, other)), 20, what="both silent"
    )
    assert [(p.get("node"), p.get("instance", "").split(".")[0], p["state"]) for p in a.peers()] == [
        (None, b.name, "lost")  # this fleet's silent node is a lost peer; the other fleet's is nothing here
    ]


def test_weighted_calls_go_to_a_peer_on_mains_rather_than_one_on_battery(edge_nodes, ns_backends, tmp_path):
    """A peer reporting battery 10 % on battery power gets less than a tenth of the calls of an equal peer on
    mains (`weighted`); its TXT follows when the battery changes; health checks pass through the ingresses."""
    fleet = unique_fleet()
    battery_roots = fake_vitals_roots(tmp_path / "battery", battery=10, status="Discharging", mains=False)
    mains_roots = fake_vitals_roots(tmp_path / "mains", mains=True)
    nodes = {}
    for name, (proc, sysfs) in (("on-battery", battery_roots), ("on-mains", mains_roots)):
        backend = ns_backends(name)
        nodes[name] = edge_nodes(
            name,
            fleet=fleet,
            manifests={"thermo.toml": thermo_manifest(backend.port)},
            vitals=f'interval = "200ms"\nproc_root = "{proc}"\nsys_root = "{sysfs}"',
        ).start()
    # Checks a loaded machine does not fail (fall 3): a peer marked down would send every call to the other.
    weighted = FAST_CHECK.replace("fall = 1", "fall = 3")
    weighted = weighted.replace("[policy]", '[policy]\nstrategy = "weighted"')
    caller_manifest = f"""
    service_name = "thermo"
    endpoint_types = ["edge"]
    {weighted}
    """
    a = edge_nodes("caller", fleet=fleet, manifests={"thermo.toml": caller_manifest}).start()

    def edge_endpoints() -> list[dict]:
        return [ep for ep in a.endpoints("thermo") if ep["tier"] == "edge"]

    wait_for(lambda: len(edge_endpoints()) == 2 and all(ep["up"] for ep in edge_endpoints()), 10, what="both up")
    # One call at a time, so that the split is the policy's alone: with calls in flight, a mains peer whose
    # answers are late (a loaded machine) is rightly passed over as stalled, and its calls go to the battery
    # peer (at 500 calls/s, 92 and 223 of 1,000 were seen there). Weights 100 x 0.5 (on battery) x 0.1 (10 %)
    # against 100: a share of at most 4.8 % (less as the nodes' CPU readings differ), 28.6 of 600 calls (sd 5.2);
    # under a tenth of the mains peer's (54.5) is 5 sd above that: a false alarm once in millions of runs.
    share: Counter = Counter()
    for _ in range(600):
        status, headers, body = a.call("thermo", "/r")
        assert status == 200, body
        share[dict(headers)["x-edged-endpoint"].rpartition(":")[2]] += 1
    assert share[nodes["on-battery"].name] < share[nodes["on-mains"].name] / 10, share
    assert all(ep["health"] == "healthy" for ep in edge_endpoints())  # checks carried the fleet identity
    # Charged to 60 % (still on battery): a meaningful change, sent after txt_min_interval (500 ms).
    (battery_roots[1] / "class" / "power_supply" / "BAT0" / "capacity").write_text("60\n")

    def battery_share() -> float:
        ranked = a.get("/v1/resolve/thermo")["ranked"]
        reason = next(r["reason"] for r in ranked if r["endpoint"].endswith(nodes["on-battery"].name))
        return float(reason.split("share ")[1].rstrip("%"))

    wait_for(lambda: battery_share() > 20, 5, what="the new battery level in node-a's view")


def test_a_taken_ingress_port_or_a_missing_interface_never_takes_the_daemon_down(edge_nodes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = edge_nodes("node-a", fleet=unique_fleet())
        text = node.config.read_text()
        text = text.replace(f'listen = "127.0.0.1:{node.ingress_port}"', f'listen = "127.0.0.1:{port}"')
        node.config.write_text(text.replace('interfaces = ["127.0.0.1"]', 'interfaces = ["no-such-if0"]'))
        node.start()
        assert node.get("/v1/status")["node"]["ready"] is True
        log = node.log_text()
        assert "peer ingress not available" in log and "mDNS is off" in log
        assert node.stop() == 0


# -- one network namespace per box ----------------------------------------------------------------------


def test_two_boxes_find_each_other_with_no_configuration(lan, edge_nodes, ns_backends):
    net = lan(2)
    fleet = unique_fleet()
    ns_backends("box2-thermo", netns=net.host(2), port=8080)
    box1 = edge_nodes("box1", fleet=fleet, netns=net.host(1)).start()
    box2 = edge_nodes("box2", fleet=fleet, netns=net.host(2), manifests={"t.toml": thermo_manifest(8080)})
    box2.start()
    wait_for(lambda: box1.edge_urls("thermo"), 10, what="box2's thermo on box1")
    assert box1.edge_urls("thermo") == ["https://10.77.0.2:7701/svc/thermo"]
    assert answered_by(box1.call("thermo", "/readings")) == "box2-thermo"
    assert [p["address"] for p in box1.peers()] == ["10.77.0.2"]
    status = subprocess.run(
        [sys.executable, "-m", "edged", "status", "--api", f"unix:{box1.socket}"], capture_output=True, text=True
    )
    peer_row = next(line for line in status.stdout.splitlines() if line.startswith("box2"))
    assert status.returncode == 0 and "10.77.0.2:7701" in peer_row and "thermo" in peer_row


@pytest.mark.slowcpu
def test_peer_killed_partitioned_and_healed_loses_no_call(lan, edge_nodes, ns_backends):
    net = lan(3)
    fleet = unique_fleet()
    caller_manifest = f"""
    service_name = "thermo"
    endpoint_types = ["edge"]
    {FAST_CHECK}
    """
    # About failover, not identity: an insecure fleet (tests/test_e2e_peer_tls.py covers mutual TLS across
    # namespaces, forged goodbyes included). Over TLS this test passed 7 of 11 runs on the shared 2-core test
    # machine (all 4 failures at load 9-12; insecure 3 of 3 alongside): at 200 calls/s the TLS caller fell
    # seconds behind before any fault (p50 1-2 s), so calls missed their 200 ms tries. Its CPU per call is
    # that of plain HTTP (0.4-0.9 ms, /proc/PID/stat); the calls queue for connections instead (at most two
    # handshakes in flight per peer: 30-50 connections against about 300 in plain HTTP). Without that cap,
    # 40-112 of 400 calls failed at 200 calls/s (each opening its own handshake).
    box1 = edge_nodes("box1", fleet=fleet, netns=net.host(1), manifests={"t.toml": caller_manifest}, tls=False)
    box1.start()
    boxes = {}
    for i in (2, 3):
        ns_backends(f"box{i}-thermo", netns=net.host(i), port=8080)
        boxes[i] = edge_nodes(
            f"box{i}", fleet=fleet, netns=net.host(i), manifests={"t.toml": thermo_manifest(8080)}, tls=False
        )
        boxes[i].start()

    def both_up() -> bool:
        edge = [ep for ep in box1.endpoints("thermo") if ep["tier"] == "edge"]
        return len(edge) == 2 and all(ep["up"] for ep in edge)

    wait_for(both_up, 10, what="both peers")

    def primary() -> int:
        return int(answered_by(box1.call("thermo", "/x"))[3])

    def run(fault_at: float, fault) -> list:
        results = asyncio.run(UnixLoadGen(box1.socket, "/svc/thermo/r").run(200, 3.0, {fault_at: fault}))
        failed = [r for r in results if r.status != 200]
        assert not failed, (summary(results), failed[:5], box1.log_text()[-3000:])
        return results

    # SIGKILL the box that takes the calls (priority: the same one every time).
    victim = primary()
    results = run(1.0, boxes[victim].kill)
    late = [r for r in results if r.started > 1.5 and r.endpoint.endswith(f"box{victim}")]
    assert not late, late[:5]
    wait_for(lambda: len(box1.edge_urls("thermo")) == 1, 8, what="the killed peer dropped by re-resolution")
    boxes[victim].start()
    # Back means up, not only listed: the victim below must be the peer that takes the calls of a healthy pair.
    wait_for(both_up, 10, what="the restarted peer back")

    # Cut the box that takes the calls off the LAN: same outcome, then heal it.
    victim = primary()
    results = run(1.0, lambda: net.partition(victim))
    assert not [r for r in results if r.started > 1.5 and r.endpoint.endswith(f"box{victim}")]
    wait_for(lambda: len(box1.edge_urls("thermo")) == 1, 8, what="the partitioned peer dropped")
    assert [p["state"] for p in box1.peers() if p.get("instance", "").startswith(f"box{victim}.")] == ["lost"]
    net.heal(victim)
    wait_for(lambda: len(box1.edge_urls("thermo")) == 2, 10, what="the healed peer back")
    wait_for(lambda: primary() == victim, 5, what="calls back on the healed peer")
