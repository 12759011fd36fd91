"""End to end, liveness of what the central registry teaches: real Mosquitto, the real daemon and
`edged bridge` as subprocesses. A box that dies (last will) or stops cleanly is no longer routed to: the
next call goes straight to the other endpoint, with no per-try timeout spent on the dead one."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import contextlib
import json

import aiomqtt
from conftest import wait_for
from fixtures_mqtt import (  # noqa: F401
    bridge_config,
    bridges,
    broker,
    cloud_first_manifest,
    mqtt_section,
    topic_prefix,
    wait_metric,
)

BRIDGE_THERMO = """
service_name = "thermo"
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
"""


def answer(d) -> tuple[int, str, str, str]:
    """(status, backend name, endpoint id, tries) of one call to thermo."""
    status, headers, body = d.call("thermo", "/r")
    h = {k.lower(): v for k, v in headers}
    name = json.loads(body).get("name", "") if body.startswith(b"{") else ""
    return status, name, h.get("x-edged-endpoint", ""), h.get("x-edged-tries", "")


def provider_state(d, node: str) -> str | None:
    svc = next((s for s in d.get("/v1/services")["services"] if s["name"] == "thermo"), None)
    for p in (svc or {}).get("providers", []):
        if p["node"] == node:
            assert p["seen"] is not None  # the last-seen time is shown with the state
            return p["state"]
    return None


def bridge_and_daemon(backends, edged, broker, bridges, topic_prefix, node: str):
    """A bridge `node` serving thermo from a backend "remote"; a daemon that prefers the cloud tier for thermo
    and has a local endpoint (backend "local") too, connected and knowing the bridge is online."""
    local = backends("local")
    remote = backends("remote")
    bridge = bridges(
        bridge_config(broker, topic_prefix, node=node), {"thermo.toml": BRIDGE_THERMO.format(port=remote.port)}
    )
    manifest = cloud_first_manifest("thermo", local.port, per_try="3s", timeout="10s")
    d = edged({"thermo.toml": manifest}, mqtt_section(broker, topic_prefix))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    wait_for(lambda: provider_state(d, node) == "online", 10, what="the daemon learns the bridge")
    return local, bridge, d


def test_a_killed_box_is_not_routed_to_after_its_last_will_and_is_again_when_it_returns(
    backends, edged, broker, bridges, topic_prefix
):
    local, bridge, d = bridge_and_daemon(backends, edged, broker, bridges, topic_prefix, "cloud-1")
    assert answer(d) == (200, "remote", "default/thermo/cloud/mqtt", "1")

    bridge.kill()  # SIGKILL: the broker publishes its last will
    wait_for(
        lambda: [r["tier"] for r in d.get("/v1/resolve/thermo")["ranked"]] == ["local"],
        10,
        what="the last will withdraws the cloud endpoint",
    )
    assert provider_state(d, "cloud-1") == "offline"
    # Calls go straight to the local endpoint: no try is spent waiting on the dead box.
    for _ in range(20):
        assert answer(d) == (200, "local", f"default/thermo/local/http://127.0.0.1:{local.port}", "1")
    peers = {p["node"]: p for p in d.get("/v1/status")["peers"]}
    assert peers["cloud-1"]["state"] == "offline" and peers["cloud-1"]["seen"] is not None

    bridge.start()  # back: its status says online, and the cloud endpoint returns
    wait_for(lambda: answer(d)[1] == "remote", 10, what="calls go to the returned box again")
    assert d.stop() == 0


def test_a_box_that_stops_cleanly_removes_its_retained_entries_and_is_not_routed_to(
    backends, edged, broker, bridges, topic_prefix
):
    local, bridge, d = bridge_and_daemon(backends, edged, broker, bridges, topic_prefix, "cloud-2")
    assert answer(d)[1] == "remote"

    assert bridge.stop() == 0
    # The daemon withdraws the cloud endpoint: the entry is gone and the status says offline.
    wait_for(lambda: answer(d)[1:] == ("local", f"default/thermo/local/http://127.0.0.1:{local.port}", "1"), 10)

    async def retained() -> dict[str, bytes]:
        """What the broker keeps for cloud-2 (its retained messages arrive right after subscribing)."""
        got: dict[str, bytes] = {}

        async def collect(c: aiomqtt.Client) -> None:
            async for msg in c.messages:
                got[str(msg.topic)] = msg.payload

        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(f"{topic_prefix}/home/nodes/cloud-2/#", qos=1)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(collect(c), 1.0)
        return got

    kept = asyncio.run(retained())
    assert list(kept) == [f"{topic_prefix}/home/nodes/cloud-2/status"], kept  # no service entries left
    assert json.loads(kept[f"{topic_prefix}/home/nodes/cloud-2/status"])["state"] == "offline"
    assert d.stop() == 0
