"""Sealed MQTT messages (edged/cloud/signing.py): who sent it, checked against the fleet CA."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import cbor2
import pytest
from fixtures_identity import FleetCA

from edged.cloud.signing import RELOAD_CHECK, ReplayGuard, SealError, Seals, load_seals
from edged.identity import PeerName
from edged.identity.files import write_file

TOPIC = "hubmesh/home/svc/thermo/req"


def make(ca: FleetCA, folder: Path, node: str, bundle: bytes | None = None, **kw) -> Seals:
    files = ca.enroll(folder, node, bundle=bundle, **kw)
    return Seals(files, skew=20)


def test_a_sealed_message_names_its_sender_and_binds_its_topic(tmp_path):
    ca = FleetCA("home")
    a, b = make(ca, tmp_path / "a", "pi-1"), make(ca, tmp_path / "b", "pi-2")
    sealed = a.seal(TOPIC, b"payload")
    assert b.open(TOPIC, sealed) == (PeerName("home", "pi-1"), b"payload")
    assert b.open(TOPIC, a.seal(TOPIC, b"again"))[1] == b"again"
    assert b.chains_verified == 1  # the chain is verified once and cached; each signature still is
    with pytest.raises(SealError, match="bad signature"):
        b.open("hubmesh/home/svc/other/req", sealed)  # the same bytes replayed on another topic
    obj = cbor2.loads(sealed)
    with pytest.raises(SealError, match="bad signature"):
        b.open(TOPIC, cbor2.dumps({**obj, "p": b"payloaD"}))
    assert (b.opened, b.refused) == (2, 2)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xff", "break code"),
        (b"garbage", "not a sealed message"),
        (cbor2.dumps({"v": 1, "id": b"x", "status": 200}), "unsigned"),
        (cbor2.dumps({"sv": 1, "p": b"x", "s": b"sig"}), "certificate chain"),
        (cbor2.dumps({"sv": 1, "p": b"x", "c": [b"\x30\x03"], "s": b"sig"}), "not DER"),
        (cbor2.dumps({"sv": 1, "p": b"x", "c": [b"x" * 9000], "s": b"sig"}), "over 8192 bytes"),
        (cbor2.dumps({"sv": 1, "p": "text", "c": [b"x"], "s": b"sig"}), "payload and a signature"),
    ],
)
def test_what_is_not_sealed_is_refused(tmp_path, data, message):
    with pytest.raises(SealError, match=message):
        make(FleetCA("home"), tmp_path, "pi-1").open(TOPIC, data)


def test_another_ca_an_expired_certificate_and_another_fleet_are_refused(tmp_path):
    ca = FleetCA("home")
    me = make(ca, tmp_path / "me", "pi-1")
    stranger = make(FleetCA("home"), tmp_path / "stranger", "pi-1")  # same names, another CA
    with pytest.raises(SealError, match="not trusted"):
        me.open(TOPIC, stranger.seal(TOPIC, b"x"))
    office = make(FleetCA("office"), tmp_path / "office", "pi-1", bundle=None)
    with pytest.raises(SealError, match="not trusted"):
        me.open(TOPIC, office.seal(TOPIC, b"x"))
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    old = make(ca, tmp_path / "old", "pi-2", lifetime=86400, now=past)
    with pytest.raises(SealError, match="expired"):
        me.open(TOPIC, old.seal(TOPIC, b"x"))


def test_ca_rotation_both_cas_of_the_bundle_verify(tmp_path):
    old_ca, new_ca = FleetCA("home"), FleetCA("home")
    bundle = old_ca.pem + new_ca.pem
    me = make(old_ca, tmp_path / "me", "pi-1", bundle=bundle)
    for i, ca in enumerate((old_ca, new_ca)):
        other = make(ca, tmp_path / f"o{i}", f"pi-{i + 2}", bundle=bundle)
        assert me.open(TOPIC, other.seal(TOPIC, b"x"))[0].node == f"pi-{i + 2}"


def test_a_renewed_certificate_is_taken_without_a_restart(tmp_path):
    ca = FleetCA("home")
    clock = [0.0]
    files = ca.enroll(tmp_path / "me", "pi-1")
    me = Seals(files, skew=20, monotonic=lambda: clock[0])
    peer = make(ca, tmp_path / "peer", "pi-2")
    first = cbor2.loads(me.seal(TOPIC, b"x"))["c"]
    renewed = ca.enroll(tmp_path / "renewed", "pi-1")
    for name in ("node.key", "node.crt"):
        write_file(str(tmp_path / "me" / name), (tmp_path / "renewed" / name).read_bytes(), 0o600)
    os.utime(files.cert, (1e9, 1e9))  # a different mtime whatever the clock's resolution
    assert cbor2.loads(me.seal(TOPIC, b"x"))["c"] == first  # looked at most every RELOAD_CHECK seconds
    clock[0] += RELOAD_CHECK
    sealed = me.seal(TOPIC, b"x")
    assert cbor2.loads(sealed)["c"] != first and peer.open(TOPIC, sealed)[0].node == "pi-1"
    assert renewed.present()


def test_no_identity_is_none_unless_required(tmp_path):
    assert load_seals(str(tmp_path), skew=20, required=False) is None
    with pytest.raises(SealError, match="holds no identity"):
        load_seals(str(tmp_path), skew=20, required=True)


def test_a_bridge_runs_a_sealed_request_once_and_only_within_its_deadline():
    now = [1_000_000.0]
    guard = ReplayGuard(20, cap=3, clock=lambda: now[0])
    pi1, pi2 = PeerName("home", "pi-1"), PeerName("home", "pi-2")
    sent = int(now[0] * 1000)
    assert guard.check(pi1, b"a", sent, 5000) is None
    assert guard.check(pi1, b"a", sent, 5000) == "replayed"
    assert guard.check(pi2, b"a", sent, 5000) is None  # ids are per sender
    assert "past its deadline" in guard.check(pi1, b"b", sent - 60_000, 5000)
    assert "in the future" in guard.check(pi1, b"c", sent + 60_000, 5000)
    assert guard.check(pi1, b"d", 0, 5000) == "no send time (ts)"
    assert guard.check(pi1, b"e", sent, 5000) is None
    assert "more than 3" in guard.check(pi1, b"f", sent, 5000)  # the memory is bounded ...
    now[0] += 26  # ... and forgets what is past its deadline and the skew
    assert guard.check(pi1, b"f", int(now[0] * 1000), 5000) is None and len(guard) == 1
    assert "past its deadline" in guard.check(pi1, b"a", sent, 5000)  # the first one, later: still refused


def test_a_node_whose_certificate_names_another_node_does_not_start_its_cloud_tier(tmp_path):
    from edged.cloud.signing import node_seals
    from edged.config import load_config

    FleetCA("home").enroll(tmp_path / "state" / "identity", "pi-2")
    (tmp_path / "edged.toml").write_text('[node]\nname = "pi-1"\n[state]\ndir = "state"\n[mqtt]\nenabled = true\n')
    with pytest.raises(SealError, match="names home/pi-2, the config home/pi-1"):
        node_seals(load_config(str(tmp_path / "edged.toml")))
