"""The cloud transport's check of who answers a call (edged/cloud/transport.py), fed the messages a broker
would deliver; end to end, with a real broker, in test_e2e_cloud_attacks.py."""

from __future__ import annotations

import asyncio

import cbor2
from fixtures_identity import FleetCA

from edged.cloud.envelope import CloudAnswer, encode_answer
from edged.cloud.session import Inbound, MqttSession
from edged.cloud.signing import Seals
from edged.cloud.telemetry import CloudMetrics
from edged.cloud.topics import Topics
from edged.cloud.transport import CloudTransport
from edged.config import MqttConfig
from edged.telemetry import Metrics

TOPICS = Topics("hubmesh", "home")


def chain(seals: Seals) -> list[bytes]:
    return cbor2.loads(seals.seal("x", b""))["c"]


def test_an_answer_macd_by_a_box_that_does_not_serve_the_service_is_dropped_and_the_real_one_taken(tmp_path):
    ca = FleetCA("home")
    me = Seals(ca.enroll(tmp_path / "me", "test-node"), skew=20)
    bridge = Seals(ca.enroll(tmp_path / "bridge", "cloud-1"), skew=20)
    evil = Seals(ca.enroll(tmp_path / "evil", "evil"), skew=20)  # of the fleet, serves nothing
    for other in (bridge, evil):
        other.learn(chain(me))
        me.learn(chain(other))
    metrics = CloudMetrics(Metrics())

    async def main() -> None:
        transport = CloudTransport(
            MqttSession(MqttConfig(enabled=True), client_id="t"),
            TOPICS,
            "test-node",
            max_payload=1 << 20,
            metrics=metrics,
            seals=me,
            serves=lambda node, tenant, service: node == "cloud-1",
            providers=lambda tenant, service: ["cloud-1"],
        )
        cid = b"call-1"
        future = asyncio.get_running_loop().create_future()
        transport._pending[cid], transport._calls[cid] = future, ("default", "thermo")
        reply = TOPICS.reply("test-node")
        forged = encode_answer(CloudAnswer(cid, 200, (), b"forged", "cloud-1"))
        transport._on_answer(Inbound(reply, evil.seal_to(reply, forged, [me.name]), False))
        assert not future.done() and metrics.unsealed.get(("answer",)) == 1
        real = encode_answer(CloudAnswer(cid, 200, (), b"real", "cloud-1"))
        transport._on_answer(Inbound(reply, bridge.seal_to(reply, real, [me.name]), False))
        assert future.done() and future.result().body == b"real"

    asyncio.run(main())
