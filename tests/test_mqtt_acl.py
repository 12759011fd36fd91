"""The shipped Mosquitto configuration (config/mosquitto/), run for real: who may connect, publish and read."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path

import aiomqtt
from fixtures_fleet_broker import FleetBroker, fleet_broker  # noqa: F401
from fixtures_identity import FleetCA
from fixtures_mqtt import topic_prefix  # noqa: F401

from edged.identity import IdentityFiles


def tls(files: IdentityFiles | None, ca_pem: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    if files is not None:
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


def client(broker: FleetBroker, files: IdentityFiles | None, name: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier=name,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=tls(files, broker.root / "ca.pem"),
        timeout=5,
    )


def refused_by_tls(broker: FleetBroker, files: IdentityFiles | None) -> bool:
    """Whether the broker ends the TLS session of a client with this certificate (or none) before MQTT."""
    ctx = tls(files, broker.root / "ca.pem")
    raw = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    with raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        try:
            # CONNECT, MQTT 3.1.1, clean session, keepalive 5 s, client id "x"
            sock.sendall(bytes.fromhex("100d00044d51545404020005000178"))
            return sock.recv(4) == b""  # a CONNACK is 4 bytes
        except (ssl.SSLError, ConnectionError):
            return True


async def received(c: aiomqtt.Client, within: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []

    async def collect() -> None:
        async for msg in c.messages:
            got.append((msg.topic.value, msg.payload))

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(collect(), within)
    return got


def test_only_fleet_certificates_connect_and_each_node_is_confined_to_its_own_topics(tmp_path, fleet_broker):
    b, p = fleet_broker, fleet_broker.prefix
    pi1 = b.enroll(tmp_path / "pi-1", "pi-1")
    evil = b.enroll(tmp_path / "evil", "evil")  # a box of the fleet, taken over
    bridge = b.enroll(tmp_path / "cloud-1", "cloud-1")
    stranger = FleetCA("home").enroll(tmp_path / "stranger", "pi-1")  # same names, another CA

    for files in (None, stranger):
        assert refused_by_tls(b, files)
    assert not refused_by_tls(b, pi1)

    async def main() -> None:
        async with (
            client(b, pi1, "pi-1") as node,
            client(b, evil, "evil") as attacker,
            client(b, bridge, "cloud-1") as cloud,
        ):
            await attacker.subscribe(f"{p}/+/svc/+/req")  # granted, but nothing is delivered
            await attacker.subscribe(f"{p}/+/reply/+")
            await cloud.subscribe(f"$share/g/{p}/+/svc/+/req")
            await node.subscribe(f"{p}/home/nodes/+/services/+")
            await node.subscribe(f"{p}/home/reply/pi-1")
            await node.subscribe(f"{p}/home/ca/reply/pi-1/+")
            await attacker.subscribe(f"{p}/home/ca/reply/+/+")
            await attacker.subscribe(f"{p}/home/ca/req")
            await node.publish(f"{p}/home/ca/req", b"renewal CSR", qos=1)
            await attacker.publish(f"{p}/home/ca/reply/pi-1/r1", b"forged certificate", qos=1)
            await node.publish(f"{p}/home/svc/thermo/req", b"request", qos=1)
            await cloud.publish(f"{p}/home/reply/pi-1", b"answer", qos=1)
            await attacker.publish(f"{p}/home/reply/pi-1", b"forged answer", qos=1)
            await attacker.publish(f"{p}/home/nodes/ghost/services/lamp", b"ghost entry", qos=1, retain=True)
            await attacker.publish(f"{p}/home/nodes/evil/services/lamp", b"its own entry", qos=1, retain=True)
            await attacker.publish(f"{p}/home/config", b"fleet config", qos=1, retain=True)
            got_attacker, got_cloud, got_node = await asyncio.gather(
                received(attacker, 1.0), received(cloud, 1.0), received(node, 1.0)
            )
        assert got_attacker == []
        assert got_cloud == [(f"{p}/home/svc/thermo/req", b"request")]
        assert sorted(got_node) == [
            (f"{p}/home/nodes/evil/services/lamp", b"its own entry"),
            (f"{p}/home/reply/pi-1", b"answer"),
        ]

    asyncio.run(asyncio.wait_for(main(), 30))
