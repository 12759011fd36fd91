"""End to end, cloud tier: real Mosquitto, the real daemon and `edged bridge` as subprocesses, real backends."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import json

import aiomqtt
import pytest
from conftest import wait_for
from fixtures_mqtt import (  # noqa: F401
    Broker,
    bridge_config,
    bridges,
    broker,
    mqtt_section,
    name_node,
    topic_prefix,
    wait_metric,
)
from loadgen import LoadGen, summary

from edged.cloud.envelope import CloudAnswer, decode_request, encode_answer


def thermo_manifest(local_port: int, *, per_try: str = "500ms", retries: int = 2, extra: str = "") -> str:
    """A service with one local endpoint and a cloud fallback."""
    return f"""
    service_name = "thermo"
    endpoint_types = ["local", "cloud"]
    [[endpoints]]
    type = "local"
    url = "http://127.0.0.1:{local_port}"
    priority = 1
    [[endpoints]]
    type = "cloud"
    priority = 5
    [policy]
    retries = {retries}
    per_try_timeout = "{per_try}"
    {extra}
    """


def bridge_manifest(port: int, service: str = "thermo") -> str:
    return f"""
    service_name = "{service}"
    [[endpoints]]
    type = "local"
    url = "http://127.0.0.1:{port}"
    """


def header(headers: list[tuple[str, str]], name: str) -> str:
    return {k.lower(): v for k, v in headers}.get(name, "")


def call_ok(d, path: str = "/readings") -> tuple[int, dict, list]:
    status, headers, body = d.call("thermo", path)
    return status, (json.loads(body) if body.startswith(b"{") else {}), headers


@pytest.mark.slowcpu
def test_local_endpoint_down_the_call_is_answered_through_mqtt_by_a_bridge(
    backends, edged, broker, bridges, topic_prefix
):
    cloud_backend = backends("cloud-backend")
    bridges(bridge_config(broker, topic_prefix), {"thermo.toml": bridge_manifest(cloud_backend.port)})
    local = backends("local")
    d = edged({"thermo.toml": thermo_manifest(local.port)}, mqtt_section(broker, topic_prefix))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)

    status, doc, headers = call_ok(d)
    assert status == 200 and doc["name"] == "local"

    local.kill()
    status, doc, headers = call_ok(d, "/readings?x=1")
    assert status == 200, doc
    assert doc["name"] == "cloud-backend" and doc["path"] == "/readings?x=1"
    assert header(headers, "x-edged-endpoint") == "default/thermo/cloud/mqtt"
    assert header(headers, "x-edged-bridge") == "cloud-1"
    # The request id made by the node reaches the backend through the envelope.
    assert doc["headers"]["x-request-id"] == header(headers, "x-request-id")

    # A POST with a body goes through too (it never reached the dead local endpoint, so it may move on).
    status, _, body = d.call("thermo", "/setpoint", "POST", b'{"c": 21}')
    assert status == 200 and json.loads(body)["body"] == '{"c": 21}'
    assert d.stop() == 0


def test_a_body_over_the_mqtt_limit_gets_413(backends, edged, broker, bridges, topic_prefix):
    cloud_backend = backends("cloud-backend")
    bridges(bridge_config(broker, topic_prefix), {"thermo.toml": bridge_manifest(cloud_backend.port)})
    manifest = """
    service_name = "thermo"
    endpoint_types = ["cloud"]
    """
    d = edged({"thermo.toml": manifest}, mqtt_section(broker, topic_prefix, max_payload="4KiB"))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    status, _, body = d.call("thermo", "/small", "POST", b"x" * 100)
    assert status == 200 and json.loads(body)["name"] == "cloud-backend"
    status, _, body = d.call("thermo", "/big", "POST", b"x" * 5000)
    assert status == 413 and json.loads(body)["error"] == "too_large"
    assert wait_metric(d, "edged_cloud_too_large_total", lambda v: v >= 1) == 1


@pytest.mark.slowcpu
def test_broker_killed_mid_run_local_calls_never_fail_and_cloud_calls_come_back(
    backends, edged, broker, bridges, topic_prefix
):
    local = backends("local")
    cloud_backend = backends("cloud-backend")
    bridges(bridge_config(broker, topic_prefix), {"thermo.toml": bridge_manifest(cloud_backend.port)})
    cloud_only = """
    service_name = "remote"
    endpoint_types = ["cloud"]
    [policy]
    per_try_timeout = "500ms"
    """
    d = edged(
        {"thermo.toml": thermo_manifest(local.port), "remote.toml": cloud_only},
        mqtt_section(broker, topic_prefix),
    )
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    # Another service, another bridge group: each group gets its copy, the group that serves it answers.
    config = bridge_config(broker, topic_prefix, node="cloud-2", group="remote-bridges")
    bridges(config, {"remote.toml": bridge_manifest(cloud_backend.port, "remote")})

    def remote_call() -> int:
        return d.call("remote", "/r")[0]

    wait_for(lambda: remote_call() == 200, 10, what="cloud call through the bridge")

    down_replies: list[tuple[int, dict]] = []
    side: list[asyncio.Future] = []  # work started by the load's timed actions, awaited at the end

    async def call_while_down() -> None:
        status, _, body = await asyncio.to_thread(d.call, "remote", "/r")
        down_replies.append((status, json.loads(body)))

    def in_background(make) -> None:
        side.append(asyncio.ensure_future(make()))  # the load loop must not wait for it

    async def run() -> list:
        load = LoadGen("127.0.0.1", d.port, "/svc/thermo/readings")
        actions = {
            0.5: broker.kill,
            1.0: lambda: in_background(call_while_down),
            2.0: lambda: in_background(lambda: asyncio.to_thread(broker.start)),
        }
        results = await load.run(100, 3.0, actions)
        await asyncio.gather(*side)
        return results

    results = asyncio.run(run())
    stats = summary(results)
    assert stats["failed"] == 0, [r for r in results if r.status != 200][:5]
    assert all(r.endpoint.startswith("default/thermo/local/") for r in results)
    # While the broker was down the cloud tier was skipped, with a clear reason, and without waiting.
    assert down_replies and down_replies[0][0] == 503
    detail = down_replies[0][1]["detail"]
    assert detail["skipped"][0]["reason"] == "broker disconnected"
    # After the restart: reconnected, and cloud calls work again.
    wait_for(lambda: remote_call() == 200, 10, what="cloud call after the broker restart")
    assert wait_metric(d, "edged_mqtt_connects_total", lambda v: v >= 2) >= 2
    assert d.stop() == 0


def test_last_will_says_offline_when_the_daemon_is_killed(edged, broker, topic_prefix):
    d = edged({}, mqtt_section(broker, topic_prefix), start=False)
    name_node(d, "pi-kill").start()
    status_topic = f"{topic_prefix}/home/nodes/pi-kill/status"

    async def watch() -> list[dict]:
        seen: list[dict] = []
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(status_topic, qos=1)
            async for msg in c.messages:
                doc = json.loads(msg.payload)
                seen.append(doc)
                if doc["state"] == "online":
                    d.proc.kill()  # SIGKILL: no clean DISCONNECT, so the broker sends the will
                if doc["state"] == "offline":
                    return seen

    seen = asyncio.run(asyncio.wait_for(watch(), 15))
    assert seen[0]["state"] == "online" and seen[-1]["state"] == "offline"
    assert seen[-1]["reason"] == "lost"


def test_late_and_garbage_answers_are_dropped_and_counted(edged, broker, topic_prefix):
    """A worker (any MQTT client may serve a service) that answers after the caller gave up."""
    manifest = """
    service_name = "slow"
    endpoint_types = ["cloud"]
    [policy]
    timeout = "200ms"
    per_try_timeout = "200ms"
    """
    d = edged({"slow.toml": manifest}, mqtt_section(broker, topic_prefix))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    results: dict = {}

    async def worker_and_call() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(f"{topic_prefix}/+/svc/slow/req")
            call = asyncio.ensure_future(asyncio.to_thread(d.call, "slow", "/x"))
            async for msg in c.messages:
                req = decode_request(msg.payload)
                await c.publish(req.reply, b"\xff garbage")
                await asyncio.sleep(0.4)  # past the call's 200 ms deadline
                answer = CloudAnswer(req.id, 200, ((b"content-type", b"text/plain"),), b"too late")
                await c.publish(req.reply, encode_answer(answer))
                break
            results["call"] = await call

    asyncio.run(asyncio.wait_for(worker_and_call(), 15))
    status, _, body = results["call"]
    assert status == 504 and json.loads(body)["detail"]["tries"][0]["error"] == "timeout", body
    assert wait_metric(d, "edged_cloud_late_answers_total", lambda v: v >= 1) == 1
    assert wait_metric(d, "edged_cloud_bad_answers_total", lambda v: v >= 1) == 1
    assert d.call("slow", "/x")[0] == 504  # and the daemon is fine (no worker now: the deadline passes)


def test_two_bridges_share_the_load(backends, edged, broker, bridges, topic_prefix):
    backend = backends("cloud-backend")
    for i in (1, 2):
        bridges(bridge_config(broker, topic_prefix, node=f"cloud-{i}"), {"thermo.toml": bridge_manifest(backend.port)})
    manifest = """
    service_name = "thermo"
    endpoint_types = ["cloud"]
    """
    d = edged({"thermo.toml": manifest}, mqtt_section(broker, topic_prefix, protocol="3.1.1"))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    served_by = set()
    for _ in range(20):
        status, headers, _ = d.call("thermo", "/x")
        assert status == 200
        served_by.add(header(headers, "x-edged-bridge"))
    assert served_by == {"cloud-1", "cloud-2"}


def test_remote_services_come_from_the_registry_and_survive_a_restart_without_broker(
    backends, edged, broker, bridges, topic_prefix
):
    backend = backends("site-a")
    site_a = edged({"thermo.toml": thermo_manifest(backend.port)}, mqtt_section(broker, topic_prefix), start=False)
    name_node(site_a, "site-a").start()
    # site-b has no manifest of its own: it learns thermo because its config follows it.
    site_b = edged({}, mqtt_section(broker, topic_prefix) + 'follow = ["thermo"]\n', start=False)
    name_node(site_b, "site-b").start()
    bridges(bridge_config(broker, topic_prefix), {"thermo.toml": bridge_manifest(backend.port)})

    def known() -> dict | None:
        services = {s["name"]: s for s in site_b.get("/v1/services")["services"]}
        return services.get("thermo")

    svc = wait_for(known, 10, what="site-b learns thermo from the registry")
    assert svc["source"] in ("mqtt:cloud-1", "mqtt:site-a")
    assert [ep["tier"] for ep in svc["endpoints"]] == ["cloud"]
    status, _, body = site_b.call("thermo", "/r")
    assert status == 200 and json.loads(body)["name"] == "site-a"
    peers = {p["node"]: p for p in site_b.get("/v1/status")["peers"]}
    assert peers["site-a"]["state"] == "online" and "thermo" in peers["site-a"]["services"]
    assert set(peers["site-a"]["vitals"]) >= {"cpu", "bat", "link", "power"}

    # site-a stops cleanly: its status says offline (not a last will: reason shutdown).
    assert site_a.stop() == 0
    wait_for(lambda: {p["node"]: p for p in site_b.get("/v1/status")["peers"]}["site-a"]["state"] == "offline", 10)

    # site-b reboots with no broker: it still knows thermo and its cloud endpoint (from its state dir).
    assert site_b.stop() == 0
    broker.kill()
    site_b.start()
    svc = known()
    assert svc is not None and [ep["tier"] for ep in svc["endpoints"]] == ["cloud"]
    status, _, body = site_b.call("thermo", "/r")
    assert status == 503 and json.loads(body)["detail"]["skipped"][0]["reason"] == "broker disconnected"
    assert site_b.stop() == 0


def test_telemetry_summaries_arrive_on_the_nodes_topic(backends, edged, broker, topic_prefix):
    local = backends("local")
    d = edged(
        {"thermo.toml": thermo_manifest(local.port)},
        mqtt_section(broker, topic_prefix, telemetry_interval="1s"),
        start=False,
    )
    name_node(d, "pi-tele").start()

    async def first_summary_with_calls() -> dict:
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            await c.subscribe(f"{topic_prefix}/home/telemetry/pi-tele")
            for _ in range(3):
                await asyncio.to_thread(d.call, "thermo", "/x")
            async for msg in c.messages:
                doc = json.loads(msg.payload)
                if doc["services"].get("thermo", {}).get("tiers", {}).get("local", {}).get("total", 0) >= 3:
                    return doc

    doc = asyncio.run(asyncio.wait_for(first_summary_with_calls(), 10))
    assert doc["node"] == "pi-tele" and doc["interval_s"] == 1.0
    assert set(doc["vitals"]) == {"cpu", "bat", "link", "power"}
    assert doc["mqtt"]["connects"] == 1
