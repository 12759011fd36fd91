"""End to end, brokers that fail and brokers that bridge: real Mosquittos, the real daemon and `edged bridge`
as subprocesses, real backends.

- `[mqtt] url` as a list: the box and the bridge worker move to the second broker when the first is killed,
  and back to the first once it returns (`switch_back`), with their subscriptions and retained state.
- A site broker bridged to a central one with the lines of `config/mosquitto/bridge.conf`: a call from a box
  on the site answered by a bridge worker attached to the central broker; registry entries, last wills and
  signed fleet config crossing the bridge.
"""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import aiomqtt
from conftest import wait_for
from fixtures_mqtt import (  # noqa: F401
    CLOUD_ONLY,
    bridge_config,
    bridges,
    broker,
    make_broker,
    mqtt_section,
    name_node,
    site_broker_config,
    topic_prefix,
    wait_metric,
)

from edged.cloud.fleet import document_text, generate_key, load_private_key, sign_document

WORKER = """
service_name = "thermo"
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
"""

LAMP = """
service_name = "lamp"
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
"""


def answer(d) -> tuple[int, str, str]:
    """(status, backend name, the bridge worker that answered) of one call to thermo."""
    status, headers, body = d.call("thermo", "/r")
    h = {k.lower(): v for k, v in headers}
    name = json.loads(body).get("name", "") if body.startswith(b"{") else ""
    return status, name, h.get("x-edged-bridge", "")


def connected_to(log_text: str) -> list[str]:
    """The brokers a daemon or bridge connected to, in order (from its JSON log)."""
    out = []
    for line in log_text.splitlines():
        if '"mqtt.connected"' in line:
            out.append(json.loads(line)["broker"])
    return out


def test_a_box_fails_over_to_its_second_broker_and_switches_back_to_the_first(
    backends, edged, broker, make_broker, bridges, topic_prefix
):
    first, second = broker, make_broker(name="second").start()
    urls = [first.url, second.url]
    worker = backends("worker")
    conf = bridge_config(first, topic_prefix).replace(
        f'url = "{first.url}"', f'url = ["{first.url}", "{second.url}"]\nswitch_back = "1s"'
    )
    bridge = bridges(conf, {"thermo.toml": WORKER.format(port=worker.port)})
    d = edged({"thermo.toml": CLOUD_ONLY}, mqtt_section(first, topic_prefix, url=urls, switch_back="1s"))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    wait_for(lambda: answer(d) == (200, "worker", "cloud-1"), 10, what="a call over the first broker")
    assert connected_to(d.log_text()) == [first.url]

    first.kill()  # SIGKILL: both clients lose it; each moves on to the second broker
    wait_for(lambda: answer(d) == (200, "worker", "cloud-1"), 20, what="calls answered over the second broker")
    assert connected_to(d.log_text())[-1] == second.url
    assert connected_to(bridge.log.read_text())[-1] == second.url

    first.start()  # back on the same port: both return to it within switch_back
    for log in (d.log_text, bridge.log.read_text):
        wait_for(lambda log=log: connected_to(log())[-1:] == [first.url], 15, what="switched back to the first")
    assert '"mqtt.switch_back"' in d.log_text()
    second.kill()  # no longer used: calls do not notice
    assert [answer(d) for _ in range(10)] == [(200, "worker", "cloud-1")] * 10
    assert d.stop() == 0


def retained(port: int, topic_filter: str, quiet: float = 0.5) -> dict[str, bytes]:
    """The retained messages a broker holds under a filter (they arrive right after subscribing)."""

    async def go() -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        async with aiomqtt.Client("127.0.0.1", port) as c:
            await c.subscribe(topic_filter, qos=1)

            async def collect() -> None:
                async for msg in c.messages:
                    out[msg.topic.value] = bytes(msg.payload)

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(collect(), quiet)
        return out

    return asyncio.run(go())


def test_a_site_broker_bridged_to_the_central_one_carries_calls_entries_wills_and_fleet_config(
    tmp_path: Path, backends, edged, make_broker, bridges, topic_prefix
):
    central = make_broker(name="central").start()
    site = make_broker(site_broker_config(central.port, topic_prefix, "site-a"), name="site-a").start()
    wait_for(lambda: "hubmesh-bridge-site-a" in central.log.read_text(), 10, what="the bridge connects")

    worker = backends("central-worker")
    bridge = bridges(bridge_config(central, topic_prefix), {"thermo.toml": WORKER.format(port=worker.port)})
    private_pem, public_pem, _ = generate_key()
    (tmp_path / "ops.pub").write_bytes(public_pem)
    (tmp_path / "ops.key").write_bytes(private_pem)
    lamp = backends("lamp")
    extra = mqtt_section(site, topic_prefix) + f'[fleet]\nkeys = ["{tmp_path / "ops.pub"}"]\n'
    d = edged({"thermo.toml": CLOUD_ONLY, "lamp.toml": LAMP.format(port=lamp.port)}, extra, start=False)
    name_node(d, "site-box").start()
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)

    def provider_state() -> str | None:
        svc = d.get("/v1/services/thermo")
        return next((p["state"] for p in svc.get("providers", []) if p["node"] == "cloud-1"), None)

    # Central -> site: the worker's retained entry and status; site -> central -> site: a call and its answer.
    wait_for(lambda: provider_state() == "online", 10, what="the site box learns the central worker")
    assert answer(d) == (200, "central-worker", "cloud-1")
    # Site -> central: the box's own retained entry and status.
    on_central = wait_for(
        lambda: retained(central.port, f"{topic_prefix}/home/nodes/site-box/#") or None, 10, what="entries cross"
    )
    assert f"{topic_prefix}/home/nodes/site-box/services/lamp" in on_central
    assert json.loads(on_central[f"{topic_prefix}/home/nodes/site-box/status"])["state"] == "online"

    # Fleet config pushed to the central broker reaches the box on the site.
    key = load_private_key(str(tmp_path / "ops.key"))
    source = {"fleet": "home", "version": 7, "policies": {"lamp": {"strategy": "round_robin"}}}
    doc = sign_document(document_text(source), key)

    async def push() -> None:
        async with aiomqtt.Client("127.0.0.1", central.port) as c:
            await c.publish(f"{topic_prefix}/home/config", doc, qos=1, retain=True)

    asyncio.run(push())
    wait_for(lambda: d.get("/v1/services/lamp")["strategy"] == "round_robin", 10, what="fleet config crosses")

    # The worker dies: the central broker's last will crosses to the site, and the box stops routing there.
    bridge.kill()
    wait_for(lambda: provider_state() == "offline", 10, what="the last will crosses the bridge")
    status, _, _ = answer(d)
    assert status == 503
    assert d.stop() == 0


def test_a_reload_moves_the_box_to_a_new_broker_list_without_a_restart(
    backends, edged, broker, make_broker, bridges, topic_prefix
):
    """Before: `[mqtt] url` took effect only at a restart (`pending_restart: mqtt.url`)."""
    old, new = broker, make_broker(name="new").start()
    worker = backends("worker")
    bridges(bridge_config(new, topic_prefix), {"thermo.toml": WORKER.format(port=worker.port)})
    d = edged({"thermo.toml": CLOUD_ONLY}, mqtt_section(old, topic_prefix))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    assert answer(d)[0] in (503, 504)  # no worker on the old broker

    d.config.write_text(d.config.read_text().replace(f'url = "{old.url}"', f'url = ["{new.url}", "{old.url}"]'))
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: connected_to(d.log_text())[-1:] == [new.url], 15, what="the box moves to the new first broker")
    wait_for(lambda: answer(d) == (200, "worker", "cloud-1"), 15, what="calls answered over the new broker")
    assert d.get("/v1/status")["config"]["pending_restart"] == []
    assert '"mqtt.reconfigured"' in d.log_text()
    # Its retained status is on the new broker (and its subscriptions, since calls are answered).
    assert json.loads(retained(new.port, f"{topic_prefix}/home/nodes/test-node/status")[
        f"{topic_prefix}/home/nodes/test-node/status"
    ])["state"] == "online"


def test_a_call_in_flight_when_its_broker_dies_is_sent_again_over_the_next_broker(
    backends, edged, broker, make_broker, bridges, topic_prefix
):
    """Before: the call waited for an answer that could not come (its broker was gone), then failed."""
    first, second = broker, make_broker(name="second").start()
    urls = [first.url, second.url]
    worker = backends("worker")
    conf = bridge_config(first, topic_prefix).replace(f'url = "{first.url}"', f'url = ["{first.url}", "{second.url}"]')
    bridge = bridges(conf, {"thermo.toml": WORKER.format(port=worker.port)})
    d = edged({"thermo.toml": CLOUD_ONLY}, mqtt_section(first, topic_prefix, url=urls))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    wait_for(lambda: answer(d) == (200, "worker", "cloud-1"), 10, what="a call over the first broker")

    result: list = []

    def slow_call() -> None:
        t = time.monotonic()
        status, _, body = d.call("thermo", "/sleep/1500")
        result.append((status, time.monotonic() - t, body))

    caller = threading.Thread(target=slow_call)
    caller.start()
    # The request is at the worker, which answers after 1.5 s (over the broker killed now).
    wait_for(lambda: worker.sleeps() == 1, 10, what="the call at the worker")
    first.kill()
    caller.join(30)
    status, took, body = result[0]
    assert status == 200, body
    assert connected_to(d.log_text())[-1] == second.url and connected_to(bridge.log.read_text())[-1] == second.url
    assert took < 4.5  # sent again once the box was on the second broker, not after the 5 s per-try timeout
