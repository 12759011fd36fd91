"""End to end, the attacks of issue 9 on the cloud tier, by a client of the broker: the real daemon, a real
Mosquitto, and an attacker that is any MQTT client (here: aiomqtt in the test)."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import http.client
import json

import aiomqtt
import cbor2
from fixtures_mqtt import broker, mqtt_section, topic_prefix, wait_metric  # noqa: F401

from edged.cloud.envelope import decode_request

CLOUD_ONLY = """
service_name = "slow"
endpoint_types = ["cloud"]
[policy]
retries = 0
per_try_timeout = "2s"
"""


def test_interim_and_made_up_statuses_from_the_cloud_become_502_and_keep_alive_stays_in_step(
    edged, broker, topic_prefix
):
    """Before: an answer with status 101 (or 100) was relayed as the final, bodiless answer; the caller's
    keep-alive connection then read the next answer's bytes as this one's. Now: 502 bad_answer, at once."""
    d = edged({"slow.toml": CLOUD_ONLY}, mqtt_section(broker, topic_prefix))
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    statuses = [101, 100, 199, 600, 2**70]
    seen: list[tuple[int, bytes]] = []

    def caller() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
        for _ in statuses:
            conn.request("GET", "/svc/slow/x")
            resp = conn.getresponse()
            seen.append((resp.status, resp.read()))
        # The same connection still carries a plain local API request cleanly.
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        seen.append((resp.status, resp.read()))
        conn.close()

    async def worker() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(f"{topic_prefix}/+/svc/slow/req")
            call = asyncio.ensure_future(asyncio.to_thread(caller))
            answered = 0
            async for msg in c.messages:
                req = decode_request(msg.payload)
                status = statuses[answered]
                await c.publish(req.reply, cbor2.dumps({"v": 1, "id": req.id, "status": status, "body": b"hi"}))
                answered += 1
                if answered == len(statuses):
                    break
            await call

    asyncio.run(asyncio.wait_for(worker(), 30))
    assert len(seen) == len(statuses) + 1
    for status, body in seen[:-1]:
        assert status == 502, seen
        assert json.loads(body)["error"] == "bad_answer", body
    assert seen[-1][0] == 200
    assert wait_metric(d, "edged_cloud_bad_answers_total", lambda v: v >= len(statuses)) == len(statuses)
