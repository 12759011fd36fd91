"""The MQTT session against a real Mosquitto: reconnect and resubscribe after the broker dies, TCP_NODELAY,
MQTT 3.1.1 and 5, TLS with a CA file, username + password file, and a bounded close on a hung broker."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fixtures_mqtt import Broker, broker, make_broker, topic_prefix  # noqa: F401

from edged.cloud.session import OUTBOX_BATCH, Inbound, MqttSession, PublishError
from edged.config import MqttConfig


def config(url: str, **kw) -> MqttConfig:
    return MqttConfig(enabled=True, url=url, reconnect_max=0.3, keepalive=5, **kw)


async def until(predicate, timeout: float = 10.0) -> None:
    """Wait for a condition on the event loop, failing after a generous timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if predicate():
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def test_reconnects_and_resubscribes_after_the_broker_is_killed(broker: Broker, topic_prefix: str):
    topic = f"{topic_prefix}/x"
    got: list[bytes] = []
    events: list[str] = []

    async def main() -> None:
        s = MqttSession(
            config(broker.url),
            client_id="t-session",
            on_connected=lambda: events.append("up"),
            on_disconnected=lambda reason: events.append("down"),
        )
        s.subscribe(topic, lambda m: got.append(m.payload))
        s.start()
        try:
            assert await s.wait_connected(10)
            sock = s._client._client.socket()  # the paho socket: Nagle must be off
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            await s.publish(topic, b"one")
            await until(lambda: got == [b"one"])
            broker.kill()
            await until(lambda: not s.connected)
            assert events == ["up", "down"]
            with pytest.raises(PublishError):
                await s.publish(topic, b"lost")
            assert s.post(topic, b"dropped") is False  # nothing queues up while down
            await asyncio.to_thread(broker.start)
            assert await s.wait_connected(10)
            await s.publish(topic, b"two")  # the subscription was made again on the new connection
            await until(lambda: got == [b"one", b"two"])
            assert s.post(topic, b"three", qos=1)
            await until(lambda: got[-1:] == [b"three"])
            assert events == ["up", "down", "up"] and s.connects == 2
        finally:
            await s.close()

    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_request_properties_travel_on_mqtt5_and_are_left_out_on_311(broker: Broker, topic_prefix: str, protocol):
    topic = f"{topic_prefix}/req"
    got: list[Inbound] = []

    async def main() -> None:
        s = MqttSession(config(broker.url, protocol=protocol), client_id=f"t-{protocol}")
        s.subscribe(topic, got.append)
        s.start()
        try:
            assert await s.wait_connected(10)
            await s.publish(topic, b"x", response_topic="r/me", correlation=b"id-1", expiry=0.2)
            await until(lambda: got)
        finally:
            await s.close()

    asyncio.run(main())
    if protocol == "5":
        assert (got[0].response_topic, got[0].correlation) == ("r/me", b"id-1")
    else:
        assert (got[0].response_topic, got[0].correlation) == (None, None)


def test_close_is_bounded_when_the_broker_hangs(broker: Broker):
    async def main() -> None:
        s = MqttSession(config(broker.url), client_id="t-hang")
        s.start()
        assert await s.wait_connected(10)
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.wait_for(s.close(timeout=1.0), 10)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        assert not s.connected

    asyncio.run(main())


# -- TLS and passwords ----------------------------------------------------------------------------------------


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    # Key identifiers, as a real CA sets them: Python 3.13's default contexts (VERIFY_X509_STRICT) refuse a
    # certificate with no Authority Key Identifier.
    if ca:  # and a CA's key usage (strict checking wants it too)
        usage = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement"),
            False,
        )
        usage |= {"key_cert_sign": True, "crl_sign": True, "encipher_only": False, "decipher_only": False}
        builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    issuer_public = issuer_cert.public_key() if issuer_cert else key.public_key()
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def tls_broker(tmp_path: Path, make_broker):
    passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(passwd_tool, os.X_OK):
        pytest.skip("mosquitto_passwd is not installed (it comes with mosquitto)")
    d = tmp_path / "pki"
    d.mkdir()
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, ca=True)
    server = _cert("127.0.0.1", server_key, ca, ca_key)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(_pem_key(server_key))
    subprocess.run([passwd_tool, "-b", "-c", str(d / "passwd"), "pi-1", "s3cret"], check=True, capture_output=True)
    (d / "pi-1.password").write_text("s3cret\n")
    (d / "wrong.password").write_text("guess\n")
    # Running as root, mosquitto drops to its own user, which cannot read pytest's private temp folders.
    user = "user root\n" if os.geteuid() == 0 else ""
    extra = f"""
cafile {d / "ca.pem"}
certfile {d / "server.pem"}
keyfile {d / "server.key"}
allow_anonymous false
password_file {d / "passwd"}
{user}"""
    b = make_broker(extra).start()
    return b, d


def test_tls_with_a_ca_file_and_a_password_file(tls_broker):
    b, d = tls_broker
    url = f"mqtts://127.0.0.1:{b.port}"
    got: list[bytes] = []

    async def main() -> None:
        good = MqttSession(
            config(url, ca_file=str(d / "ca.pem"), username="pi-1", password_file=str(d / "pi-1.password")),
            client_id="t-tls",
        )
        good.subscribe("secure/x", lambda m: got.append(m.payload), qos=1)
        wrong_password = MqttSession(
            config(url, ca_file=str(d / "ca.pem"), username="pi-1", password_file=str(d / "wrong.password")),
            client_id="t-tls-wrong",
        )
        unknown_ca = MqttSession(
            config(url, username="pi-1", password_file=str(d / "pi-1.password")), client_id="t-tls-ca"
        )
        sessions = (good, wrong_password, unknown_ca)
        for s in sessions:
            s.start()
        try:
            assert await good.wait_connected(10)
            await good.publish("secure/x", b"over tls", qos=1)
            await until(lambda: got == [b"over tls"])
            await until(lambda: wrong_password.failed_connects >= 1 and unknown_ca.failed_connects >= 1)
            assert not wrong_password.connected and not unknown_ca.connected
            assert "not authorized" in wrong_password.last_error.lower()
            assert "certificate" in unknown_ca.last_error.lower()
        finally:
            for s in sessions:
                await s.close()

    asyncio.run(main())


@pytest.mark.parametrize("fast_path", [True, False], ids=["paho-fast-path", "public-api-fallback"])
def test_both_paths_carry_qos0_qos1_and_properties_and_say_which_is_used(
    broker: Broker, topic_prefix: str, fast_path: bool, caplog
):
    """The fast path uses aiomqtt's paho client (internals of the pinned aiomqtt); the fallback, which
    another aiomqtt gets, uses only the public API. Both must work, and the log says which one runs."""
    topic = f"{topic_prefix}/paths"
    got: list[Inbound] = []

    async def main() -> str:
        s = MqttSession(config(broker.url), client_id=f"t-path-{fast_path}", fast_path=fast_path)
        s.subscribe(topic, got.append)
        s.start()
        try:
            assert await s.wait_connected(10)
            await s.publish(topic, b"q0", response_topic="r/me", correlation=b"c-1")
            await s.publish(topic, b"q1", qos=1)
            assert s.post(topic, b"posted")
            await until(lambda: len(got) == 3)
            return s.path
        finally:
            await s.close()

    caplog.set_level("INFO", logger="edged.cloud.session")
    path = asyncio.run(main())
    # On the pinned aiomqtt the fast path must be there: an upgrade that removes it fails here, loudly.
    assert path == ("paho" if fast_path else "public")
    assert sorted(m.payload for m in got) == [b"posted", b"q0", b"q1"]
    q0 = next(m for m in got if m.payload == b"q0")
    assert (q0.response_topic, q0.correlation) == ("r/me", b"c-1")
    connected = [r for r in caplog.records if r.getMessage() == "mqtt.connected"]
    assert connected and all(r.edged_fields["path"] == path for r in connected), caplog.text


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_large_incoming_messages_are_dropped_and_counted_not_handed_on(broker: Broker, topic_prefix: str, protocol):
    """A retained 64 MB message took RSS from 46 to 185 MB at every start; now nothing over the limit gets in.
    On MQTT 5 the broker is told the Maximum Packet Size and does not send it at all."""
    topic = f"{topic_prefix}/big"
    got: list[bytes] = []
    hits: list[str] = []

    async def main() -> None:
        sender = MqttSession(config(broker.url, protocol="3.1.1"), client_id=f"t-send-{protocol}")
        s = MqttSession(
            config(broker.url, protocol=protocol), client_id=f"t-big-{protocol}", max_message=1000, on_limit=hits.append
        )
        s.subscribe(topic, lambda m: got.append(m.payload))
        sender.start()
        s.start()
        try:
            assert await s.wait_connected(10) and await sender.wait_connected(10)
            await sender.publish(topic, b"x" * 20000, retain=True)
            await sender.publish(topic, b"small")
            await until(lambda: got == [b"small"])
            assert hits == ([] if protocol == "5" else ["mqtt_message"])
            assert s.connected  # and the session is fine
        finally:
            await sender.publish(topic, b"", retain=True)
            await s.close()
            await sender.close()

    asyncio.run(main())


def test_a_full_outbox_batch_does_not_warn_of_pending_publishes(broker: Broker, topic_prefix: str, caplog):
    """The outbox awaits up to OUTBOX_BATCH QoS 1 publishes together by design (a node posts its whole state
    at connect); aiomqtt's default threshold of 10 pending calls logged "There are N pending publish calls"
    for each one over it at every start."""
    topic = f"{topic_prefix}/burst"
    got: list[bytes] = []

    async def main() -> None:
        s = MqttSession(config(broker.url), client_id="t-burst")
        s.subscribe(topic, lambda m: got.append(m.payload))
        s.start()
        try:
            assert await s.wait_connected(10)
            assert all(s.post(topic, b"%d" % i) for i in range(OUTBOX_BATCH))
            await until(lambda: len(got) == OUTBOX_BATCH)
        finally:
            await s.close()

    caplog.set_level("INFO", logger="edged.cloud.session")
    asyncio.run(main())
    assert sorted(got, key=int) == [b"%d" % i for i in range(OUTBOX_BATCH)]
    assert not [r for r in caplog.records if "pending publish calls" in r.getMessage()], caplog.text
