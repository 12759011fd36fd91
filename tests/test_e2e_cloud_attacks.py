"""End to end, the attacks of issue 9 on the cloud tier, by a client of the broker: the real daemon, a real
Mosquitto, and an attacker that is any MQTT client (here: aiomqtt in the test)."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiomqtt
import cbor2
from conftest import wait_for
from fixtures_fleet_broker import fleet_broker  # noqa: F401
from fixtures_identity import FleetCA
from fixtures_mqtt import bridge_config, bridges, broker, mqtt_section, topic_prefix, wait_metric  # noqa: F401
from test_e2e_cloud import bridge_manifest, header

from edged.cloud.envelope import CloudAnswer, CloudRequest, decode_answer, decode_request, encode_answer, encode_request
from edged.cloud.fleet import document_text, generate_key, load_private_key, sign_document
from edged.cloud.registry_sync import spec_entry
from edged.cloud.signing import Seals
from edged.identity import IdentityFiles, PeerName
from edged.model import ServiceSpec

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


# -- fleet config: cross-fleet and replayed documents ----------------------------------------------------------

THERMO = """
service_name = "thermo"
[[endpoints]]
type = "local"
url = "http://127.0.0.1:{port}"
"""


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    async def go() -> None:
        async with aiomqtt.Client("127.0.0.1", port) as c:
            await c.publish(topic, payload, qos=1, retain=True)

    asyncio.run(go())


def sample(d, series: str) -> float:
    """One sample of the daemon's /metrics (`name` or `name{labels}`), 0 when absent."""
    for line in d.api.request("GET", "/metrics")[2].decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def ops_key(folder: Path):
    """An operator's fleet key pair in `folder` (ops.key, ops.pub, as `edged fleet keygen ops` makes it)."""
    private_pem, public_pem, _ = generate_key()
    (folder / "ops.pub").write_bytes(public_pem)
    (folder / "ops.key").write_bytes(private_pem)
    return load_private_key(str(folder / "ops.key"))


def refused(d, reason: str) -> float:
    return sample(d, f'edged_fleet_config_refused_total{{reason="{reason}"}}')


def test_a_document_for_one_fleet_or_for_no_fleet_is_refused_by_another_fleet(
    tmp_path, backends, edged, broker, topic_prefix
):
    """Before: `fleet` was optional and `edged fleet sign` did not add it, so a document signed for `home` was
    applied by an `office` node trusting the same key. Now: a document names its fleet, or is refused."""
    key = ops_key(tmp_path)
    backend = backends("b")
    extra = mqtt_section(broker, topic_prefix) + f'[fleet]\nkeys = ["{tmp_path / "ops.pub"}"]\n'
    home = edged({"thermo.toml": THERMO.format(port=backend.port)}, extra)
    office = edged({"thermo.toml": THERMO.format(port=backend.port)}, extra, start=False)
    office.config.write_text(office.config.read_text().replace('name = "test-node"', 'name = "o-1"\nfleet = "office"'))
    office.start()
    for d in (home, office):
        wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    rr = {"policies": {"thermo": {"strategy": "round_robin"}}}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # A document as `edged fleet sign` made it before: no fleet named.
    unnamed = sign_document(json.dumps({"version": 5, "issued_at": now, **rr}), key)
    publish_retained(broker.port, f"{topic_prefix}/office/config", unnamed)
    wait_for(lambda: refused(office, "wrong_scope") >= 1, 10, what="the unnamed document refused")
    # The operator's document for home, copied by anyone to the office fleet's topic.
    for_home = sign_document(document_text({"version": 6, "fleet": "home", **rr}), key)
    publish_retained(broker.port, f"{topic_prefix}/home/config", for_home)
    publish_retained(broker.port, f"{topic_prefix}/office/config", for_home)
    wait_for(lambda: home.get("/v1/services/thermo")["strategy"] == "round_robin", 10, what="applied at home")
    wait_for(lambda: refused(office, "wrong_scope") >= 2, 10, what="home's document refused by office")
    assert office.get("/v1/services/thermo")["strategy"] == "priority"
    assert refused(home, "wrong_scope") == 0


def test_replayed_fleet_documents_are_refused_even_by_a_box_with_no_state(
    tmp_path, backends, edged, broker, topic_prefix
):
    """Before: rollback protection lived only in the state dir: a box with no state took v3 although v12
    exists, and took an old retained document again after a state wipe. Now: with no state, a document
    issued longer ago than `[fleet] max_age` is refused; with state, an older version is."""
    key = ops_key(tmp_path)
    backend = backends("b")
    extra = mqtt_section(broker, topic_prefix) + f'[fleet]\nkeys = ["{tmp_path / "ops.pub"}"]\nmax_age = "7d"\n'
    topic = f"{topic_prefix}/home/config"

    def doc(version: int, strategy: str, days_ago: float) -> bytes:
        issued = datetime.now(timezone.utc) - timedelta(days=days_ago)
        text = json.dumps(
            {
                "version": version,
                "fleet": "home",
                "issued_at": issued.isoformat(timespec="seconds"),
                "policies": {"thermo": {"strategy": strategy}},
            }
        )
        return sign_document(text, key)

    old_v3 = doc(3, "weighted", days_ago=60)  # captured by the attacker two months ago
    publish_retained(broker.port, topic, old_v3)
    d = edged({"thermo.toml": THERMO.format(port=backend.port)}, extra)
    wait_for(lambda: refused(d, "stale") >= 1, 10, what="the old document refused")
    assert d.get("/v1/services/thermo")["strategy"] == "priority"

    publish_retained(broker.port, topic, doc(12, "round_robin", days_ago=0))
    wait_for(lambda: d.get("/v1/services/thermo")["strategy"] == "round_robin", 10, what="v12 applied")
    publish_retained(broker.port, topic, old_v3)
    wait_for(lambda: refused(d, "older") >= 1, 10, what="v3 refused after v12")

    # The state is wiped; the broker still holds the attacker's retained v3.
    assert d.stop() == 0
    shutil.rmtree(d.root / "state")
    d.start()
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    wait_for(lambda: refused(d, "stale") >= 1, 10, what="the old document refused after the wipe")
    assert d.get("/v1/services/thermo")["strategy"] == "priority"


# -- a client on the broker: reads calls, forges answers, injects registry entries -----------------------------

CLOUD_THERMO = """
service_name = "thermo"
endpoint_types = ["cloud"]
[policy]
retries = 0
per_try_timeout = "3s"
"""


def enrolled(ca: FleetCA, root: Path, node: str) -> IdentityFiles:
    """A node's identity where the daemon (or bridge) with this root finds it: {state.dir}/identity."""
    folder = root / "state" / "identity"
    folder.mkdir(parents=True, exist_ok=True)
    return ca.enroll(folder, node)


def inner(payload: bytes) -> bytes:
    """What a sealed message carries (as any reader of the broker can see: sealing signs, it does not hide)."""
    obj = cbor2.loads(payload)
    return obj["p"] if isinstance(obj, dict) and "sv" in obj else payload


def test_a_client_on_the_broker_cannot_answer_for_a_bridge_nor_inject_a_registry_entry(
    tmp_path, backends, edged, bridges, broker, topic_prefix
):
    """Before: any client of the broker read every call on `svc/+/req`, answered first with the matching
    correlation id and its answer was the caller's; it retained `nodes/ghost/services/x` and the service
    appeared. Now (each box sealing with its node certificate, on a broker with no ACL at all): the forged
    answers (unsealed, or sealed by a fleet box that does not serve the service) are dropped and the bridge's
    answer is the caller's; entries not sealed by the node their topic names are not learned."""
    ca = FleetCA("home")
    backend = backends("cloud-backend")
    bridge = bridges(bridge_config(broker, topic_prefix), {"thermo.toml": bridge_manifest(backend.port)}, start=False)
    enrolled(ca, bridge.root, "cloud-1")
    bridge.start()
    # It follows the whole registry: the injected entries (lamp, lamp2) reach it, to be refused.
    d = edged({"thermo.toml": CLOUD_THERMO}, mqtt_section(broker, topic_prefix, follow=["*"]), start=False)
    enrolled(ca, d.root, "test-node")
    d.start()
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    evil = Seals(ca.enroll(tmp_path / "evil", "evil"), skew=20)  # a box of the fleet, taken over
    base = f"{topic_prefix}/home"
    forged = CloudAnswer(b"", 200, ((b"content-type", b"application/json"),), b'{"name": "forged"}', "cloud-1")
    ghost = spec_entry(ServiceSpec(name="lamp", priority=0), node="ghost", zone="", cloud=True)
    results: list[tuple[int, list, bytes]] = []
    reads: list[str] = []
    kinds: list[int] = []  # 1: sealed with ECDSA, 2: MAC'd per pair

    def caller() -> None:
        results.extend(d.call("thermo", "/r") for _ in range(5))

    async def attacker() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            topic = f"{base}/nodes/ghost/services/lamp"
            await c.publish(topic, cbor2.dumps(ghost), qos=1, retain=True)
            await c.publish(f"{base}/nodes/ghost/status", b'{"state": "online"}', qos=1, retain=True)
            topic2 = f"{base}/nodes/ghost/services/lamp2"  # sealed, by a box that is not ghost
            ghost2 = cbor2.dumps({**ghost, "service": "lamp2"})
            await c.publish(topic2, evil.seal(topic2, ghost2), qos=1, retain=True)
            await c.subscribe(f"{topic_prefix}/+/svc/+/req")
            calls = asyncio.create_task(asyncio.to_thread(caller))
            async for msg in c.messages:
                req = decode_request(inner(msg.payload))
                reads.append(req.path)
                wire = cbor2.loads(msg.payload)
                kinds.append(wire["sv"])
                if "c" in wire:
                    evil.learn(wire["c"])  # the caller's certificate, as its first request carries it
                answer = encode_answer(dataclasses.replace(forged, id=req.id))
                await c.publish(req.reply, answer)  # unsealed
                await c.publish(req.reply, evil.seal(req.reply, answer))  # sealed by a box that does not serve it
                # ... and MAC'd to the caller under evil's own pair key with it (evil is of the fleet)
                await c.publish(req.reply, evil.seal_to(req.reply, answer, [PeerName("home", "test-node")]))
                if len(reads) == 5:
                    break
            await calls

    asyncio.run(asyncio.wait_for(attacker(), 60))
    assert reads == ["/r"] * 5  # sealing signs; it does not hide (the broker's TLS and ACL do: test_mqtt_acl.py)
    assert kinds == [2] * 5  # MAC'd to the bridge (whose certificate the caller has from its sealed entry)
    for status, headers, body in results:
        assert status == 200 and json.loads(body)["name"] == "cloud-backend", body
        assert header(headers, "x-edged-bridge") == "cloud-1"
    # A box of the fleet asks the bridge to answer on another node's reply topic: no answer goes there; its
    # own request, answered on its own reply topic, shows the bridge at work meanwhile; replayed, it is not
    # run again.
    answers = asyncio.run(asyncio.wait_for(reflect(broker.port, base, evil), 20))
    assert answers == [b"own"], answers
    answers = asyncio.run(asyncio.wait_for(reflect(broker.port, base, evil, mac=True), 20))  # the same, MAC'd
    assert answers == [b"own-mac"], answers
    # Each forged answer was refused, or came after the bridge's (late: its call had its answer).
    wait_for(
        lambda: (
            sample(d, 'edged_cloud_refused_messages_total{kind="answer"}') + sample(d, "edged_cloud_late_answers_total")
            == 15
        ),
        10,
        what="forged answers dropped",
    )
    assert sample(d, 'edged_cloud_refused_messages_total{kind="answer"}') >= 1
    wait_for(lambda: sample(d, 'edged_cloud_refused_messages_total{kind="entry"}') == 2, 10, what="ghost entries")
    for name in ("lamp", "lamp2"):
        assert d.api.request("GET", f"/v1/services/{name}")[0] == 404


async def reflect(port: int, base: str, evil: Seals, *, mac: bool = False) -> list[bytes]:
    """Ids of the answers published on any reply topic after sealed requests of box `evil`: one asking for the
    answer on `test-node`'s reply topic (`reflected`), one on its own (`own`), and `own` once more. `mac`:
    MAC'd to the bridge (its certificate read from its retained entry) instead of sealed with ECDSA."""
    topic = f"{base}/svc/thermo/req"
    sent = int(time.time() * 1000)
    suffix = b"-mac" if mac else b""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        if mac:
            await c.subscribe(f"{base}/nodes/cloud-1/services/+")
            async for msg in c.messages:
                evil.learn(cbor2.loads(msg.payload)["c"])
                break
        await c.subscribe(f"{base}/reply/+")
        for cid, node in ((b"reflected" + suffix, "test-node"), (b"own" + suffix, "evil")):
            req = CloudRequest(cid, f"{base}/reply/{node}", "GET", "/r", (), b"", 2000, "default", "thermo", "evil")
            payload = encode_request(dataclasses.replace(req, sent_ms=sent))
            sealed = evil.seal_to(topic, payload, [PeerName("home", "cloud-1")]) if mac else evil.seal(topic, payload)
            assert cbor2.loads(sealed)["sv"] == (2 if mac else 1)
            await c.publish(topic, sealed)
        await c.publish(topic, sealed)  # the same sealed request again (replayed): not run, not answered
        seen: list[bytes] = []

        async def collect() -> None:
            async for msg in c.messages:
                if msg.topic.matches(f"{base}/reply/+"):
                    seen.append(decode_answer(inner(msg.payload)).id)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(collect(), 2.0)  # the bridge answers within milliseconds
        return seen


def test_cloud_calls_over_the_shipped_broker_configuration_with_node_certificates(
    tmp_path, backends, edged, bridges, fleet_broker, topic_prefix
):
    """The daemon and a bridge on Mosquitto as config/mosquitto/ ships it (TLS, client certificates, ACL):
    their node certificates are their client certificates and what the ACL knows them by."""
    backend = backends("cloud-backend")
    manifests = {"thermo.toml": bridge_manifest(backend.port)}
    bridge = bridges(bridge_config(fleet_broker, topic_prefix), manifests, start=False)
    enrolled(fleet_broker.ca, bridge.root, "cloud-1")
    bridge.start()
    d = edged({"thermo.toml": CLOUD_THERMO}, mqtt_section(fleet_broker, topic_prefix), start=False)
    enrolled(fleet_broker.ca, d.root, "test-node")
    d.start()
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    for _ in range(3):
        status, headers, body = d.call("thermo", "/r")
        assert status == 200 and json.loads(body)["name"] == "cloud-backend", body
        assert header(headers, "x-edged-bridge") == "cloud-1"
    assert "mqtts://127.0.0.1" in d.log_text() and '"signed_as":"test-node"' in d.log_text().replace(" ", "")
    assert '"signed_as":"cloud-1"' in bridge.log.read_text().replace(" ", "")


def test_a_client_on_the_broker_cannot_mark_a_bridge_offline_nor_delete_its_entries(
    tmp_path, backends, edged, bridges, broker, topic_prefix
):
    """Before: on a broker without the ACL, any client published an unsealed `offline` on a bridge's status, or
    an empty retained message on its entry, and every box took the bridge for gone: its cloud calls failed at
    once (503, "no live node serves it"). Now a status or a deletion counts only when sealed by the node, and
    only for the connection it belongs to: the sealed `offline` and tombstones of the bridge's clean stop,
    replayed after it came back, are refused too, and the bridge posts its status and entry again."""
    ca = FleetCA("home")
    backend = backends("cloud-backend")
    bridge = bridges(bridge_config(broker, topic_prefix), {"thermo.toml": bridge_manifest(backend.port)}, start=False)
    enrolled(ca, bridge.root, "cloud-1")
    bridge.start()
    d = edged({"thermo.toml": CLOUD_THERMO}, mqtt_section(broker, topic_prefix), start=False)
    enrolled(ca, d.root, "test-node")
    d.start()
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)
    base = f"{topic_prefix}/home"
    status_topic, entry_topic = f"{base}/nodes/cloud-1/status", f"{base}/nodes/cloud-1/services/thermo"

    def served() -> bool:
        status, _, body = d.call("thermo", "/r")
        return status == 200 and json.loads(body)["name"] == "cloud-backend"

    wait_for(served, 15, what="the bridge serves")
    offline = json.dumps({"state": "offline", "node": "cloud-1", "fleet": "home", "reason": "lost"}).encode()
    publish_retained(broker.port, status_topic, offline)
    publish_retained(broker.port, entry_topic, b"")
    # The daemon has them once it counted them refused (a withdrawal would be applied at once): then it serves.
    wait_for(lambda: cloud_refused(d, "status") >= 1 and cloud_refused(d, "entry") >= 1, 10, what="forgeries counted")
    assert all(served() for _ in range(3))

    # The bridge stops cleanly (sealed tombstone and offline of its connection), a reader keeps them, and the
    # bridge comes back; replayed, they are refused.
    captured: dict[str, bytes] = {}

    async def capture() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(f"{base}/nodes/cloud-1/#")
            stopping = asyncio.create_task(asyncio.to_thread(bridge.stop))
            async for msg in c.messages:
                if not msg.retain:
                    captured[str(msg.topic)] = msg.payload
                if status_topic in captured and b"shutdown" in inner(captured[status_topic]):
                    break
            await stopping

    asyncio.run(asyncio.wait_for(capture(), 20))
    assert captured.get(entry_topic)  # a tombstone: sealed, not empty
    bridge.start()
    wait_for(served, 20, what="the bridge serves again")
    for topic in (status_topic, entry_topic):
        publish_retained(broker.port, topic, captured[topic])
    wait_for(lambda: cloud_refused(d, "status") >= 2 and cloud_refused(d, "entry") >= 2, 10, what="replays counted")
    assert all(served() for _ in range(3))
    # The bridge saw its retained status and entry overwritten and posted them again: a box that subscribes now
    # reads them.
    wait_for(lambda: retained_state(broker.port, status_topic) == "online", 10, what="the bridge's status back")


def cloud_refused(d, kind: str) -> float:
    return sample(d, f'edged_cloud_refused_messages_total{{kind="{kind}"}}')


def retained_state(port: int, topic: str) -> str:
    """The state of the retained status on `topic`, as a box subscribing now reads it."""

    async def read() -> str:
        async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(topic)
            async for msg in c.messages:
                return json.loads(inner(msg.payload)).get("state", "")
        return ""

    return asyncio.run(asyncio.wait_for(read(), 5))
