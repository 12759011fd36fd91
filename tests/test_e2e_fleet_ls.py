"""`edged fleet ls`: the whole fleet's registry read from a real Mosquitto on demand, while each daemon keeps
only what it routes to."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiomqtt
from conftest import wait_for
from fixtures_mqtt import broker, mqtt_section, name_node, topic_prefix, wait_metric  # noqa: F401

LOCAL = """
service_name = "{name}"
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
"""


def fleet_ls(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edged", "fleet", "ls", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_fleet_ls_lists_every_node_and_service_while_a_box_keeps_only_what_it_routes_to(
    backends, edged, broker, topic_prefix
):
    backend = backends("b")
    a = edged(
        {f"{n}.toml": LOCAL.format(name=n, port=backend.port) for n in ("lamp", "door", "fan")},
        mqtt_section(broker, topic_prefix),
        start=False,
    )
    name_node(a, "box-a").start()
    b = edged({"clock.toml": LOCAL.format(name="clock", port=backend.port)}, mqtt_section(broker, topic_prefix))
    wait_metric(b, "edged_mqtt_connected", lambda v: v == 1)
    wait_metric(a, "edged_mqtt_connected", lambda v: v == 1)

    def listing() -> list[dict] | None:
        done = fleet_ls(b.config, "--json")
        assert done.returncode == 0, done.stderr
        nodes = json.loads(done.stdout)
        return nodes if {n["node"] for n in nodes} >= {"box-a", "test-node"} else None

    nodes = {n["node"]: n for n in wait_for(listing, 15, what="both boxes listed")}
    assert nodes["box-a"]["services"] == ["door", "fan", "lamp"] and nodes["box-a"]["state"] == "online"
    assert nodes["test-node"]["services"] == ["clock"]
    assert set(nodes["box-a"]["vitals"]) >= {"cpu", "power"}
    # b routes nothing over the cloud: it knows box-a's status (fleet-wide, compact), none of its entries.
    peers = {p["node"]: p for p in b.get("/v1/status")["peers"]}
    assert peers["box-a"]["state"] == "online" and peers["box-a"]["services"] == []
    assert "lamp" not in {s["name"] for s in b.get("/v1/services")["services"]}

    one = fleet_ls(b.config, "--service", "fan")
    assert one.returncode == 0 and "box-a" in one.stdout and "test-node" not in one.stdout
    assert "1 nodes, 1 online, 1 service entries" in one.stdout
    broker.kill()
    down = fleet_ls(b.config, "--timeout", "1")
    assert down.returncode == 1 and "cannot reach the broker" in down.stderr


def test_status_lists_a_bounded_page_of_a_large_fleet_with_counts_and_pages_on(edged, broker, topic_prefix):
    """Before: `GET /v1/status` listed every node it knew (a fleet of thousands: one unbounded answer)."""

    async def publish() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            for n in range(250):
                state = "offline" if n % 5 == 0 else "online"
                doc = {"state": state, "node": f"n{n:03d}"}
                await c.publish(f"{topic_prefix}/home/nodes/n{n:03d}/status", json.dumps(doc), qos=1, retain=True)

    asyncio.run(publish())
    d = edged({}, mqtt_section(broker, topic_prefix))
    wait_for(lambda: d.get("/v1/status?limit=1")["peers_summary"]["total"] == 250, 15, what="every status learned")
    first = d.get("/v1/status")
    assert len(first["peers"]) == 100 and first["peers"][0]["node"] == "n000"
    summary = first["peers_summary"]
    assert summary == {"total": 250, "shown": 100, "next": "n099", "by_state": {"online": 200, "offline": 50}}
    second = d.get("/v1/status?limit=200&peers_after=n099")
    assert [p["node"] for p in second["peers"]] == [f"n{n:03d}" for n in range(100, 250)]
    assert second["peers_summary"]["next"] is None
    shown = subprocess.run(
        [sys.executable, "-m", "edged", "status", "--config", str(d.config), "--limit", "10"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    assert "10 of 250 peers (50 offline, 200 online); more: edged status --peers-after n009" in shown.stdout
