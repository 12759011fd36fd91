"""CBOR envelopes of cloud calls, topic names and matching, and the reconnect backoff (no broker needed)."""

from __future__ import annotations

import dataclasses
import json
import random

import cbor2
import pytest

from edged.cloud.envelope import (
    MAX_ID_BYTES,
    CloudAnswer,
    CloudRequest,
    EnvelopeError,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    error_answer,
)
from edged.cloud.session import SessionError, backoff_delay, broker_address, pack_publish_properties
from edged.cloud.topics import (
    Topics,
    parse_request_topic,
    service_key,
    shared_request_filter,
    split_service_key,
    topic_matches,
)

REQUEST = CloudRequest(
    id=b"\x01" * 14,
    reply="hubmesh/home/reply/pi-1",
    method="POST",
    path="/setpoint?zone=1",
    headers=((b"content-type", b"application/json"), (b"x-note", b"cr\xe8me br\xfbl\xe9e")),
    body=b'{"c": 21}\x00\xff',
    deadline_ms=450,
    tenant="default",
    service="thermo",
    node="pi-1",
    request_id="abc123",
)


def raw_request(**changes) -> bytes:
    obj = cbor2.loads(encode_request(REQUEST))
    for key, value in changes.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return cbor2.dumps(obj)


def test_request_round_trips_with_binary_body_and_latin1_headers():
    data = encode_request(REQUEST)
    assert decode_request(data) == REQUEST
    obj = cbor2.loads(data)
    assert set(obj) == {"v", "id", "reply", "method", "path", "headers", "body", "deadline", "tenant", "service"} | {
        "node",
        "rid",
    }
    assert obj["body"] == REQUEST.body and isinstance(obj["body"], bytes)


def test_answer_round_trips_and_error_answers_carry_the_mesh_error_body():
    answer = CloudAnswer(b"id-1", 201, ((b"content-type", b"text/plain"),), b"made", "cloud-1")
    assert decode_answer(encode_answer(answer)) == answer
    err = decode_answer(encode_answer(error_answer(b"id-2", 503, "no_endpoint", {"tries": []}, "cloud-1")))
    assert err.status == 503 and json.loads(err.body) == {"error": "no_endpoint", "detail": {"tries": []}}
    assert dict(err.headers)[b"content-type"] == b"application/json"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "not CBOR"),
        (b"\xff\xfe garbage", "not CBOR"),
        (cbor2.dumps([1, 2, 3]), "must be a CBOR map"),
        (raw_request(v=2), "unsupported version"),
        (raw_request(method="GET /x HTTP/1.1\r\nHost: evil"), "bad method"),
        (raw_request(path="/x HTTP/1.1\r\nX-Evil: 1"), "bad path"),
        (raw_request(path="no-slash"), "bad path"),
        (raw_request(headers=[["x-a", "ok\r\nx-injected: 1"]]), "bad name or value"),
        (raw_request(headers=[["bad name", "v"]]), "bad name or value"),
        (raw_request(headers=[["x-a", "\u20ac"]]), "not latin-1"),
        (raw_request(headers=[["x-a"]]), "pair of strings"),
        (raw_request(deadline=0), "deadline must be 1..3600000 ms"),
        (raw_request(deadline=2**80), "deadline must be 1..3600000 ms"),
        (raw_request(deadline=3_600_001), "deadline must be 1..3600000 ms"),
        (raw_request(deadline="soon"), "wrong type"),
        (raw_request(tenant=None), "missing 'tenant'"),
        (raw_request(body="text, not bytes"), "wrong type"),
        (raw_request(reply="hubmesh/+/reply"), "bad reply topic"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_requests_are_refused_with_a_reason(payload, message):
    with pytest.raises(EnvelopeError, match=message):
        decode_request(payload)


def test_a_refused_request_keeps_id_and_reply_when_they_are_sound_so_it_can_be_answered():
    with pytest.raises(EnvelopeError) as info:
        decode_request(raw_request(path="x y"))
    assert info.value.id == REQUEST.id and info.value.reply == REQUEST.reply
    with pytest.raises(EnvelopeError) as info:
        decode_request(raw_request(id=b"x" * (MAX_ID_BYTES + 1), reply="a/#"))
    assert info.value.id is None and info.value.reply is None


@pytest.mark.parametrize(
    "obj",
    [
        {"v": 1, "id": b"i", "status": 99, "body": b""},
        {"v": 1, "id": b"i", "status": 101},
        {"v": 1, "id": b"i", "status": 100},
        {"v": 1, "id": b"i", "status": 600},
        {"v": 1, "id": b"i", "status": -200},
        {"v": 1, "id": b"i", "status": 2**80},
        {"v": 1, "id": b"i", "status": True},
        {"v": 1, "id": "text-id", "status": 200},
        {"v": 1, "status": 200},
    ],
)
def test_bad_answers_are_refused(obj):
    with pytest.raises(EnvelopeError) as info:
        decode_answer(cbor2.dumps(obj))
    # The id, when sound, is kept: the call it answers fails at once (502) instead of waiting.
    assert info.value.id == (obj["id"] if isinstance(obj.get("id"), bytes) else None)


def test_topics_of_a_fleet():
    t = Topics("hubmesh", "home")
    assert t.status("pi-1") == "hubmesh/home/nodes/pi-1/status"
    assert t.service("pi-1", "default", "thermo") == "hubmesh/home/nodes/pi-1/services/thermo"
    assert t.service("pi-1", "garden", "pump") == "hubmesh/home/nodes/pi-1/services/garden.pump"
    assert t.request("thermo") == "hubmesh/home/svc/thermo/req"
    assert t.reply("pi-1") == "hubmesh/home/reply/pi-1"
    assert (t.config(), t.config("pi-1")) == ("hubmesh/home/config", "hubmesh/home/config/pi-1")
    assert t.telemetry("pi-1") == "hubmesh/home/telemetry/pi-1"
    assert t.parse_node_topic("hubmesh/home/nodes/pi-1/services/garden.pump") == ("pi-1", "services", "garden.pump")
    assert t.parse_node_topic("hubmesh/home/nodes/pi-1/status") == ("pi-1", "status", "")
    assert t.parse_node_topic("hubmesh/other/nodes/pi-1/status") is None
    assert split_service_key(service_key("garden", "pump")) == ("garden", "pump")
    assert split_service_key(service_key("default", "thermo")) == ("default", "thermo")
    assert shared_request_filter("g", "hubmesh") == "$share/g/hubmesh/+/svc/+/req"
    assert parse_request_topic("hubmesh", "hubmesh/home/svc/thermo/req") == ("home", "thermo")
    assert parse_request_topic("hubmesh", "hubmesh/home/svc/thermo/x") is None


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("a/+", "a/b/c", False),
        ("a/b", "a/b", True),
        ("$share/g/p/+/svc/+/req", "p/home/svc/thermo/req", True),
        ("$share/g/p/+/svc/+/req", "p/home/svc/thermo/rep", False),
        ("+/x", "$SYS/x", False),
    ],
)
def test_topic_matching(topic_filter, topic, matches):
    assert topic_matches(topic_filter, topic) is matches


def test_backoff_grows_exponentially_is_capped_and_jittered():
    rng = random.Random(7)
    delays = [backoff_delay(n, 2.0, rng) for n in range(12)]
    for n, d in enumerate(delays):
        full = min(2.0, 0.1 * 2**n)
        assert full / 2 <= d <= full  # equal jitter: never zero (no busy loop), never above the cap
    assert delays[0] <= 0.1 and max(delays) <= 2.0 and delays[-1] >= 1.0
    assert len({round(backoff_delay(3, 30.0, rng), 6) for _ in range(20)}) > 1  # jitter spreads a fleet


def test_broker_addresses():
    assert broker_address("mqtt://10.0.0.2") == ("10.0.0.2", 1883, False)
    assert broker_address("mqtts://broker.example:9000") == ("broker.example", 9000, True)
    assert broker_address("mqtts://broker.example") == ("broker.example", 8883, True)
    with pytest.raises(SessionError):
        broker_address("http://x")


def test_hand_packed_publish_properties_read_back_with_paho():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    packed = pack_publish_properties(
        response_topic="hubmesh/home/reply/pi-1",
        correlation=b"\x00id\xff" * 40,
        expiry=3,
        content_type="application/cbor",
    )
    props, length = Properties(PacketTypes.PUBLISH).unpack(packed)
    assert length == len(packed)  # the variable-length prefix is right past 127 bytes too
    assert props.ResponseTopic == "hubmesh/home/reply/pi-1"
    assert props.CorrelationData == b"\x00id\xff" * 40
    assert (props.MessageExpiryInterval, props.ContentType) == (3, "application/cbor")
    assert pack_publish_properties(response_topic=None, correlation=None, expiry=None, content_type=None) == b"\x00"


def test_the_calling_app_rides_in_the_request_and_must_be_a_name():
    req = dataclasses.replace(REQUEST, app="lamps")
    assert decode_request(encode_request(req)).app == "lamps"
    assert "app" not in cbor2.loads(encode_request(REQUEST))  # absent when there is none
    for bad in ("a/b", "x y", "z" * 129):
        obj = {**cbor2.loads(encode_request(REQUEST)), "app": bad}
        with pytest.raises(EnvelopeError, match="bad app"):
            decode_request(cbor2.dumps(obj))
