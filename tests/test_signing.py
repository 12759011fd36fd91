"""Sealed MQTT messages (edged/cloud/signing.py): who sent it, checked against the fleet CA."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import cbor2
import pytest
from fixtures_identity import FleetCA

from edged.cloud.signing import RELOAD_CHECK, ReplayGuard, SealError, Seals, load_seals
from edged.identity import IdentityFiles, PeerName
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


# -- per-pair MACs (pairing.py) -------------------------------------------------------------------------------

REPLY = "hubmesh/home/reply/pi-1"
ENTRY = "hubmesh/home/nodes/cloud-1/services/thermo"


def caller_and_bridge(tmp_path, ca: FleetCA | None = None, **kw) -> tuple[Seals, Seals]:
    """A caller that has learned the bridge's certificate from its sealed registry entry, as a box does."""
    ca = ca or FleetCA("home")
    caller = Seals(ca.enroll(tmp_path / "caller", "pi-1"), skew=20, **kw)
    bridge = Seals(ca.enroll(tmp_path / "bridge", "cloud-1"), skew=20, **kw)
    caller.open(ENTRY, bridge.seal(ENTRY, b"entry"))
    return caller, bridge


def test_requests_and_answers_are_macd_per_pair_and_the_chain_travels_until_the_peer_knows_it(tmp_path):
    caller, bridge = caller_and_bridge(tmp_path)
    first = caller.seal_to(TOPIC, b"request", [bridge.name])
    obj = cbor2.loads(first)
    assert obj["sv"] == 2 and "c" in obj and "s" not in obj  # MAC'd, with the caller's chain (first contact)
    assert bridge.open(TOPIC, first, macs=True) == (caller.name, b"request") and bridge.last_mac
    answer = bridge.seal_to(REPLY, b"answer", [caller.name])
    assert "c" not in cbor2.loads(answer)  # the caller knows the bridge's certificate (its entry)
    assert caller.open(REPLY, answer, macs=True) == (bridge.name, b"answer")
    later = caller.seal_to(TOPIC, b"request 2", [bridge.name])  # the bridge has shown it knows our certificate
    assert "c" not in cbor2.loads(later) and len(later) - len(b"request 2") < 100
    assert bridge.open(TOPIC, later, macs=True)[1] == b"request 2"
    assert (caller.pairs_derived, bridge.pairs_derived) == (1, 1)  # one ECDH each, for the pair's life
    assert len(first) - len(b"request") > 400  # the chain: about 500 bytes, once
    with pytest.raises(SealError, match="unsigned, or another format"):
        bridge.open(TOPIC, later)  # registry entries, statuses (no `macs`) take ECDSA seals only
    with pytest.raises(SealError, match="bad MAC"):
        bridge.open("hubmesh/home/svc/other/req", later, macs=True)  # the topic is in the MAC
    with pytest.raises(SealError, match="not MAC'd to this node"):
        caller.open(TOPIC, later, macs=True)  # a request of the caller is not an answer to it


def test_a_message_macd_under_another_pairs_key_or_by_another_box_is_refused(tmp_path):
    ca = FleetCA("home")
    caller, bridge = caller_and_bridge(tmp_path, ca)
    other = Seals(ca.enroll(tmp_path / "other", "cloud-2"), skew=20)
    caller.open(ENTRY, other.seal(ENTRY, b"entry"))
    to_other = cbor2.loads(caller.seal_to(TOPIC, b"request", [other.name]))
    # The MAC for cloud-2, relabelled as one for cloud-1: the key of the pair (pi-1, cloud-2) is not cloud-1's.
    relabelled = {**to_other, "m": [[bridge.fingerprint[:16], to_other["m"][0][1]]]}
    with pytest.raises(SealError, match="bad MAC"):
        bridge.open(TOPIC, cbor2.dumps(relabelled), macs=True)
    # A box of the fleet MACs under its own pair key but names pi-1 as the sender (with pi-1's chain).
    evil = Seals(ca.enroll(tmp_path / "evil", "evil"), skew=20)
    evil.learn(cbor2.loads(bridge.seal(ENTRY, b"x"))["c"])
    forged = cbor2.loads(evil.seal_to(TOPIC, b"forged", [bridge.name]))
    forged["f"], forged["c"] = to_other["f"], to_other["c"]
    with pytest.raises(SealError, match="bad MAC"):
        bridge.open(TOPIC, cbor2.dumps(forged), macs=True)
    # Its own MAC opens: as evil (the bridge and the caller then check what evil may do, by name).
    assert bridge.open(TOPIC, evil.seal_to(TOPIC, b"mine", [bridge.name]), macs=True)[0].node == "evil"
    # A stranger's CA: its chain does not verify, its MAC is never checked.
    stranger = Seals(FleetCA("home").enroll(tmp_path / "stranger", "pi-1"), skew=20)
    with pytest.raises(SealError, match="not trusted"):
        stranger.learn(cbor2.loads(bridge.seal(ENTRY, b"x"))["c"])
    stranger._certs[bridge.fingerprint] = bridge._certs.get(bridge.fingerprint) or caller._certs[bridge.fingerprint]
    stranger._latest[bridge.name] = bridge.fingerprint  # as if it had: its MAC still needs a chain that verifies
    with pytest.raises(SealError, match="not trusted"):
        bridge.open(TOPIC, stranger.seal_to(TOPIC, b"x", [bridge.name]), macs=True)


def test_a_replayed_macd_request_opens_again_and_the_bridge_does_not_run_it_twice(tmp_path):
    from edged.cloud.envelope import CloudRequest, decode_request, encode_request

    caller, bridge = caller_and_bridge(tmp_path)
    sent = int(time.time() * 1000)
    req = CloudRequest(b"id-1", REPLY, "GET", "/r", (), b"", 2000, "default", "thermo", "pi-1", sent_ms=sent)
    wire = caller.seal_to(TOPIC, encode_request(req), [bridge.name])
    guard = ReplayGuard(20)
    outcomes = []
    for _ in range(2):
        sender, payload = bridge.open(TOPIC, wire, macs=True)  # a MAC proves who, not when
        got = decode_request(payload)
        outcomes.append(guard.check(sender, got.id, got.sent_ms, got.deadline_ms))
    assert outcomes == [None, "replayed"]


def test_an_expired_certificate_or_one_whose_ca_left_the_bundle_no_longer_macs(tmp_path):
    old_ca, new_ca = FleetCA("home"), FleetCA("home")
    bundle = old_ca.pem + new_ca.pem
    now = [time.time()]
    caller = Seals(old_ca.enroll(tmp_path / "c", "pi-1", lifetime=120, bundle=bundle), skew=20, clock=lambda: now[0])
    mono = [0.0]
    files = new_ca.enroll(tmp_path / "b", "cloud-1", bundle=bundle)
    bridge = Seals(files, skew=20, clock=lambda: now[0], monotonic=lambda: mono[0])
    caller.open(ENTRY, bridge.seal(ENTRY, b"entry"))
    assert bridge.open(TOPIC, caller.seal_to(TOPIC, b"a", [bridge.name]), macs=True)[1] == b"a"
    caller.open(REPLY, bridge.seal_to(REPLY, b"ok", [caller.name]), macs=True)
    later = caller.seal_to(TOPIC, b"b", [bridge.name])
    assert "c" not in cbor2.loads(later)
    assert bridge.open(TOPIC, later, macs=True)[1] == b"b"  # cached: certificate and pair key
    now[0] += 200  # the caller's certificate (120 s) is past its end and the 20 s skew
    with pytest.raises(SealError, match="expired"):
        bridge.open(TOPIC, later, macs=True)
    now[0] -= 200
    assert bridge.open(TOPIC, later, macs=True)[1] == b"b"
    # The old CA leaves the bundle (its key is lost, say): the caller's certificate is no longer trusted, and
    # the pair key made with it is forgotten at once.
    write_file(files.ca, new_ca.pem, 0o644)
    os.utime(files.ca, (1e9, 1e9))
    mono[0] += RELOAD_CHECK
    bridge.seal(ENTRY, b"x")  # the bridge looks at its files when it next seals
    with pytest.raises(SealError, match="not seen here"):
        bridge.open(TOPIC, later, macs=True)
    with pytest.raises(SealError, match="not trusted"):
        bridge.open(TOPIC, first_contact(caller, bridge), macs=True)


def first_contact(caller: Seals, bridge: Seals) -> bytes:
    """A MAC'd request of `caller` that carries its chain (as after a timeout)."""
    caller.unack([bridge.name])
    return caller.seal_to(TOPIC, b"c", [bridge.name])


def test_a_restarted_bridge_gets_the_chain_again_after_a_timeout_and_unknown_peers_get_ecdsa(tmp_path):
    ca = FleetCA("home")
    caller, bridge = caller_and_bridge(tmp_path, ca)
    bridge.open(TOPIC, caller.seal_to(TOPIC, b"a", [bridge.name]), macs=True)
    caller.open(REPLY, bridge.seal_to(REPLY, b"ok", [caller.name]), macs=True)
    restarted = Seals(IdentityFiles(str(tmp_path / "bridge")), skew=20)
    with pytest.raises(SealError, match="not seen here"):
        restarted.open(TOPIC, caller.seal_to(TOPIC, b"b", [bridge.name]), macs=True)
    caller.unack([bridge.name])  # what the transport does when a call times out
    assert restarted.open(TOPIC, caller.seal_to(TOPIC, b"c", [bridge.name]), macs=True)[1] == b"c"
    # A provider whose certificate this node has not seen, or too many providers: an ECDSA seal, which anyone
    # of the fleet can check.
    assert cbor2.loads(caller.seal_to(TOPIC, b"d", [PeerName("home", "cloud-9")]))["sv"] == 1
    many = [PeerName("home", f"cloud-{i}") for i in range(9)]
    assert cbor2.loads(caller.seal_to(TOPIC, b"e", many))["sv"] == 1


def test_verified_certificates_and_pair_keys_are_bounded(tmp_path):
    ca = FleetCA("home")
    bridge = Seals(ca.enroll(tmp_path / "bridge", "cloud-1"), skew=20, chain_cache=3, pair_cache=2)
    callers = [Seals(ca.enroll(tmp_path / f"c{i}", f"pi-{i}"), skew=20) for i in range(5)]
    for c in callers:
        c.learn(cbor2.loads(bridge.seal(ENTRY, b"x"))["c"])
        assert bridge.open(TOPIC, c.seal_to(TOPIC, b"r", [bridge.name]), macs=True)[0] == c.name
    assert (len(bridge._pairs), len(bridge._certs), len(bridge._chains)) == (2, 3, 3)
    assert len(bridge._latest) <= 3
    first = callers[0]
    first.unack([bridge.name])  # evicted on the bridge: its chain comes again and all is derived anew
    assert bridge.open(TOPIC, first.seal_to(TOPIC, b"again", [bridge.name]), macs=True)[1] == b"again"
    assert bridge.pairs_derived == 6


def test_with_macs_off_every_request_is_sealed_with_ecdsa(tmp_path):
    """`[mqtt] macs = false`: for a fleet whose bridges run an edged that opens only ECDSA seals."""
    ca = FleetCA("home")
    caller = Seals(ca.enroll(tmp_path / "caller", "pi-1"), skew=20, macs=False)
    bridge = Seals(ca.enroll(tmp_path / "bridge", "cloud-1"), skew=20)
    caller.learn(cbor2.loads(bridge.seal(ENTRY, b"x"))["c"])
    sealed = caller.seal_to(TOPIC, b"r", [bridge.name])
    assert cbor2.loads(sealed)["sv"] == 1 and bridge.open(TOPIC, sealed)[1] == b"r"


def test_a_renewed_certificate_makes_new_pair_keys_and_macs_to_the_old_one_count_until_it_expires(tmp_path):
    ca = FleetCA("home")
    clock = [0.0]
    files = ca.enroll(tmp_path / "bridge", "cloud-1")
    bridge = Seals(files, skew=20, monotonic=lambda: clock[0])
    caller = Seals(ca.enroll(tmp_path / "caller", "pi-1"), skew=20)
    caller.open(ENTRY, bridge.seal(ENTRY, b"entry"))
    bridge.open(TOPIC, caller.seal_to(TOPIC, b"a", [bridge.name]), macs=True)
    old = bridge.fingerprint
    ca.enroll(tmp_path / "renewed", "cloud-1")
    for name in ("node.key", "node.crt"):
        write_file(str(tmp_path / "bridge" / name), (tmp_path / "renewed" / name).read_bytes(), 0o600)
    os.utime(files.cert, (1e9, 1e9))
    clock[0] += RELOAD_CHECK
    bridge.seal(ENTRY, b"x")  # looks at its files: renewed
    assert bridge.fingerprint != old
    to_old = caller.seal_to(TOPIC, b"b", [bridge.name])  # the caller still knows the old certificate
    assert cbor2.loads(to_old)["m"][0][0] == old[:16]
    assert bridge.open(TOPIC, to_old, macs=True)[1] == b"b"  # taken: the old certificate is still valid
    answer = bridge.seal_to(REPLY, b"ok", [caller.name])  # made with the new certificate, which goes along
    assert "c" in cbor2.loads(answer) and caller.open(REPLY, answer, macs=True)[0] == bridge.name
    to_new = caller.seal_to(TOPIC, b"c", [bridge.name])
    assert cbor2.loads(to_new)["m"][0][0] == bridge.fingerprint[:16]  # a new pair key, to the new certificate
    assert bridge.open(TOPIC, to_new, macs=True)[1] == b"c"
