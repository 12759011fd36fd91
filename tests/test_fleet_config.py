"""Signed fleet config: signing and checking documents, applying them to the registry, and end to end with
a real broker and the real daemon (routing changes; forgeries, replays and garbage change nothing; the
config survives a restart with the broker down)."""

# ruff: noqa: F811  (the fixtures imported from fixtures_mqtt are test parameters)

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import aiomqtt
import pytest
from conftest import wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fixtures_mqtt import broker, mqtt_section, topic_prefix, wait_metric  # noqa: F401
from helpers import loads_package

from edged.cli import main as edged_main
from edged.cloud.fleet import (
    FleetConfigError,
    FleetConfigSource,
    FleetKeyError,
    FleetSettings,
    document_text,
    generate_key,
    issued_time,
    key_id,
    load_private_key,
    load_public_key,
    parse_document,
    read_source_document,
    sign_document,
    tombstone,
    verify,
)
from edged.cloud.telemetry import CloudMetrics
from edged.model import PolicySpec, ServiceSpec
from edged.registry import Draft, Registry
from edged.telemetry import Metrics

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
TRUSTED = {key_id(KEY.public_key()): KEY.public_key()}


def signed(doc: dict, key: Ed25519PrivateKey = KEY) -> bytes:
    """A document as `edged fleet sign` makes it: named for fleet "home" unless it names another."""
    return sign_document(document_text({"fleet": "home", **doc}), key)


def source(registry: Registry | None = None, **kw) -> tuple[FleetConfigSource, Registry, CloudMetrics]:
    registry = registry or Registry()
    metrics = CloudMetrics(Metrics())
    src = FleetConfigSource(registry=registry, keys=TRUSTED, node="pi-1", fleet="home", metrics=metrics, **kw)
    registry.add_layer(src.layer)
    return src, registry, metrics


def registry_with(*names: str) -> Registry:
    r = Registry()
    r.set_manifests([ServiceSpec(name=n, endpoint_types=("local",)) for n in names])
    return r


def strategy(registry: Registry, name: str, tenant: str = "default") -> str:
    svc = registry.snapshot().get(tenant, name)
    assert svc is not None
    return svc.spec.policy.strategy


# -- signing and checking -----------------------------------------------------------------------------------


def test_a_signed_document_verifies_with_its_key_only():
    wire = signed({"version": 1, "policies": {}})
    text, kid = verify(wire, TRUSTED)
    assert json.loads(text)["version"] == 1 and kid == key_id(KEY.public_key())
    with pytest.raises(FleetConfigError) as info:
        verify(signed({"version": 1}, OTHER), TRUSTED)
    assert info.value.reason == "unknown_key"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x00\xffgarbage", "unparseable"),
        (b"[1, 2]", "unparseable"),
        (json.dumps({"version": 9, "policies": {"thermo": {"strategy": "latency"}}}).encode(), "unsigned"),
        (json.dumps({"format": "hubmesh-fleet-config/1", "document": "{}", "signature": ""}).encode(), "unsigned"),
        (
            json.dumps({"format": "hubmesh-fleet-config/1", "document": "{}", "signature": "%%%"}).encode(),
            "bad_signature",
        ),
    ],
    ids=["garbage", "not-an-object", "bare-document", "empty-signature", "signature-not-base64"],
)
def test_unsigned_and_garbage_payloads_are_refused(payload, reason):
    with pytest.raises(FleetConfigError) as info:
        verify(payload, TRUSTED)
    assert info.value.reason == reason


def test_a_tampered_document_or_a_stolen_key_id_fails_the_signature():
    wire = json.loads(signed({"version": 1, "policies": {"thermo": {"strategy": "latency"}}}))
    wire["document"] = wire["document"].replace("latency", "weighted")
    with pytest.raises(FleetConfigError) as info:
        verify(json.dumps(wire).encode(), TRUSTED)
    assert info.value.reason == "bad_signature"
    forged = json.loads(signed({"version": 1}, OTHER))
    forged["key_id"] = key_id(KEY.public_key())  # claims to be the trusted key
    with pytest.raises(FleetConfigError) as info:
        verify(json.dumps(forged).encode(), TRUSTED)
    assert info.value.reason == "bad_signature"


def test_good_documents_apply_and_every_bad_one_is_refused_counted_and_changes_nothing():
    src, registry, metrics = source(registry_with("thermo", "pump"))
    good = signed({"version": 5, "policies": {"thermo": {"strategy": "round_robin"}}})
    assert src.offer(good, "fleet", "t")
    assert strategy(registry, "thermo") == "round_robin" and strategy(registry, "pump") == "priority"
    assert registry.policy_source("default", "thermo") == "fleet"
    bad = [
        (signed({"version": 4, "policies": {"thermo": {"strategy": "latency"}}}), "fleet", "older"),
        (signed({"version": 5, "policies": {"thermo": {"strategy": "latency"}}}), "fleet", "conflict"),
        (signed({"version": 9, "policies": {"thermo": {"strategy": "latency"}}}, OTHER), "fleet", "unknown_key"),
        (signed({"version": 9, "policies": {"thermo": {"strategy": "fastest"}}}), "fleet", "invalid"),
        (signed({"version": 9, "polices": {}}), "fleet", "invalid"),
        (signed({"version": 9, "fleet": "garden"}), "fleet", "wrong_scope"),
        (signed({"version": 9, "node": "pi-1"}), "fleet", "wrong_scope"),
        (signed({"version": 9, "node": "pi-2"}), "node", "wrong_scope"),
        (b"garbage", "fleet", "unparseable"),
    ]
    for payload, scope, reason in bad:
        before = metrics.fleet_refused.get((reason,)) or 0
        assert not src.offer(payload, scope, "t"), reason
        assert metrics.fleet_refused.get((reason,)) == before + 1, reason
    assert strategy(registry, "thermo") == "round_robin"
    assert src.versions() == {"fleet": 5}
    # The same document again (retained, re-delivered on every reconnect: the same bytes, the same
    # `issued_at` stamp) is not a refusal.
    assert src.offer(good, "fleet", "t")
    assert sum(src.refused.values()) == len(bad)


def test_invalid_policy_is_refused_with_the_key_that_is_wrong():
    src, _, _ = source()
    src.offer(signed({"version": 1, "policies": {"thermo": {"retries": "many"}}}), "fleet", "hubmesh/home/config")
    assert src.refused == {"invalid": 1}
    with pytest.raises(FleetConfigError, match=r"policies\.thermo\.retries: expected an integer"):
        src._check(signed({"version": 1, "policies": {"thermo": {"retries": "many"}}}), "fleet", "x")


def test_a_node_document_overrides_the_fleet_document_per_service_and_tenants_are_named():
    src, registry, _ = source(registry_with("thermo", "pump"))
    registry.set_manifests(
        [*[s.spec for s in registry.snapshot().services.values()], ServiceSpec(name="pump", tenant="garden")]
    )
    fleet_doc = {"version": 1, "policies": {"thermo": {"strategy": "weighted"}, "pump": {"strategy": "latency"}}}
    node_doc = {
        "version": 1,
        "node": "pi-1",
        "policies": {"thermo": {"strategy": "round_robin"}, "garden/pump": {"retries": 0}},
    }
    assert src.offer(signed(fleet_doc), "fleet", "t") and src.offer(signed(node_doc), "node", "t")
    assert strategy(registry, "thermo") == "round_robin"
    assert strategy(registry, "pump") == "latency"
    garden = registry.snapshot().get("garden", "pump")
    assert garden is not None and garden.spec.policy.retries == 0


def test_a_fleet_policy_changes_the_keys_it_names_and_keeps_the_manifests_others():
    registry = Registry()
    declared = PolicySpec(strategy="priority", retries=1, per_try_timeout=0.3, timeout=2.0)
    registry.set_manifests([ServiceSpec(name="thermo", policy=declared), ServiceSpec(name="pump")])
    src, _, _ = source(registry)
    assert src.offer(signed({"version": 1, "policies": {"thermo": {"strategy": "round_robin"}}}), "fleet", "t")
    policy = registry.snapshot().get("default", "thermo").spec.policy
    assert (policy.strategy, policy.retries, policy.per_try_timeout, policy.timeout) == ("round_robin", 1, 0.3, 2.0)
    # The manifest changes: the fleet keys stay laid over the new version (the layer is recomputed).
    registry.set_manifests([ServiceSpec(name="thermo", policy=PolicySpec(retries=3)), ServiceSpec(name="pump")])
    policy = registry.snapshot().get("default", "thermo").spec.policy
    assert (policy.strategy, policy.retries) == ("round_robin", 3)


def test_a_document_recomputes_only_the_services_it_names_then_and_now():
    """A box following a whole fleet keeps thousands of services: a document (and the next one, which drops a
    service) recomputes the services the documents name, not every one, and gives what a whole rebuild gives."""
    names = [f"svc-{i}" for i in range(200)]
    src, registry, _ = source(registry_with(*names))
    whole = registry.rebuilds
    untouched = registry.snapshot().get("default", "svc-9")
    assert src.offer(signed({"version": 1, "policies": {"svc-1": {"strategy": "weighted"}}}), "fleet", "t")
    assert src.offer(signed({"version": 2, "policies": {"svc-2": {"strategy": "latency"}}}), "fleet", "t")
    assert registry.rebuilds == whole and registry.partial_rebuilds >= 2  # the old code rebuilt everything
    assert registry.snapshot().changed == {("default", "svc-1"), ("default", "svc-2")}
    assert strategy(registry, "svc-1") == "priority" and strategy(registry, "svc-2") == "latency"  # svc-1 dropped
    assert registry.snapshot().get("default", "svc-9") is untouched
    assert registry.policy_source("default", "svc-2") == "fleet" and registry.policy_source("default", "svc-1") == (
        "declared"
    )
    incremental = registry.snapshot().services
    registry.refresh()
    assert registry.snapshot().services == incremental


def test_settings_reach_their_owner_and_unknown_settings_are_ignored():
    seen: list[FleetSettings] = []
    src, _, _ = source(on_settings=seen.append)
    assert src.offer(signed({"version": 1, "settings": {"telemetry_interval": "15s", "future_knob": 3}}), "fleet", "t")
    assert seen[-1].telemetry_interval == 15.0
    assert src.docs["fleet"].ignored_settings == ("future_knob",)


def test_the_last_good_config_is_restored_and_checked_again_with_todays_keys():
    src, _, _ = source(registry_with("thermo"))
    src.offer(signed({"version": 3, "policies": {"thermo": {"strategy": "round_robin"}}}), "fleet", "t")
    saved = json.loads(json.dumps(src.state()))  # as it goes through the state file
    again, registry, _ = source(registry_with("thermo"))
    assert again.load(saved) == ["fleet"]
    assert strategy(registry, "thermo") == "round_robin" and again.versions() == {"fleet": 3}
    # A replay of an older document after the restart is still refused.
    assert not again.offer(signed({"version": 2}), "fleet", "t")
    # With the key no longer trusted, the saved document is not applied.
    untrusted = FleetConfigSource(
        registry=registry_with("thermo"), keys={}, node="pi-1", fleet="home", metrics=CloudMetrics(Metrics())
    )
    assert untrusted.load(saved) == []


def test_keygen_sign_on_the_command_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert edged_main(["fleet", "keygen", "ops"]) == 0
    assert (tmp_path / "ops.key").stat().st_mode & 0o777 == 0o600
    assert edged_main(["fleet", "keygen", "ops"]) == 1  # never overwrites a private key
    (tmp_path / "doc.toml").write_text('version = 7\n[policies.thermo]\nstrategy = "round_robin"\n')
    capsys.readouterr()
    assert edged_main(["fleet", "sign", "doc.toml", "--key", "ops.key", "--node", "pi-1"]) == 1
    assert "name the fleet" in capsys.readouterr().err  # never a default fleet: a document names its own
    assert edged_main(["fleet", "sign", "doc.toml", "--key", "ops.key", "--node", "pi-1", "--fleet", "home"]) == 0
    wire = (tmp_path / "doc.signed.json").read_bytes()
    public = load_public_key(str(tmp_path / "ops.pub"))
    text, _ = verify(wire, {key_id(public): public})
    doc = json.loads(text)
    assert (doc["node"], doc["version"], doc["fleet"]) == ("pi-1", 7, "home")
    assert issued_time(doc["issued_at"]) == pytest.approx(time.time(), abs=5)
    # The fleet can come from a config's [node] fleet, and a document naming another fleet is refused.
    (tmp_path / "office.toml").write_text('[node]\nname = "x"\nfleet = "office"\n')
    assert edged_main(["fleet", "sign", "doc.toml", "-k", "ops.key", "-c", "office.toml", "-o", "o.json"]) == 0
    assert json.loads(verify((tmp_path / "o.json").read_bytes(), {key_id(public): public})[0])["fleet"] == "office"
    (tmp_path / "home.toml").write_text('fleet = "home"\nversion = 3\n')
    capsys.readouterr()
    assert edged_main(["fleet", "sign", "home.toml", "-k", "ops.key", "--fleet", "office"]) == 1
    assert "names fleet 'home', not 'office'" in capsys.readouterr().err
    # A tombstone for a node's document.
    assert edged_main(["fleet", "withdraw", "pi-1", "-k", "ops.key", "--fleet", "home", "--version", "9"]) == 0
    tomb = json.loads(verify((tmp_path / "withdraw-pi-1.signed.json").read_bytes(), {key_id(public): public})[0])
    assert (tomb["node"], tomb["version"], tomb["withdrawn"], tomb["fleet"]) == ("pi-1", 9, True, "home")
    (tmp_path / "bad.toml").write_text('version = 8\n[policies.thermo]\nretries = "x"\n')
    capsys.readouterr()
    assert edged_main(["fleet", "sign", "bad.toml", "--key", "ops.key"]) == 1
    assert "bad.toml:3: policies.thermo.retries" in capsys.readouterr().err
    data = read_source_document(str(tmp_path / "doc.toml"))
    assert data["version"] == 7 and load_private_key(str(tmp_path / "ops.key"))


def test_public_keys_are_read_without_cryptography_and_other_keys_are_refused(tmp_path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    _, public_pem, kid = generate_key()
    (tmp_path / "ok.pub").write_bytes(b"# a comment before the block\n" + public_pem)
    raw = load_public_key(str(tmp_path / "ok.pub"))
    assert len(raw) == 32 and key_id(raw) == kid
    x25519 = X25519PrivateKey.generate().public_key()  # same size, another algorithm
    x_pem = x25519.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cases = {
        "x25519.pub": (x_pem, "not an Ed25519 public key"),
        "private.pem": (generate_key()[0], "not a PEM public key"),
        "garbage.pub": (b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
        "short.pub": (public_pem.replace(b"MCowBQYDK2VwAyEA", b"MCowBQYDK2Vw"), "not"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FleetKeyError, match=message):
            load_public_key(str(tmp_path / name))
    # A whole round: the raw key verifies what the private half signed, in a process that had not
    # loaded cryptography before the signature had to be checked.
    private_pem, public_pem, _ = generate_key()
    (tmp_path / "ops.key").write_bytes(private_pem)
    (tmp_path / "ops.pub").write_bytes(public_pem)
    wire = sign_document(document_text({"version": 1}), load_private_key(str(tmp_path / "ops.key")))
    (tmp_path / "doc.json").write_bytes(wire)
    probe = (
        "import sys; from edged.cloud.fleet import load_trusted_keys, verify; "
        f"keys = load_trusted_keys(({str(tmp_path / 'ops.pub')!r},)); "
        "assert keys and 'cryptography' not in sys.modules, sys.modules.keys(); "
        f"verify(open({str(tmp_path / 'doc.json')!r}, 'rb').read(), keys); "
        "assert 'cryptography' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, timeout=60)


def test_generate_key_gives_matching_halves():
    private_pem, public_pem, kid = generate_key()
    assert b"PRIVATE KEY" in private_pem and b"PUBLIC KEY" in public_pem and len(kid) == 16


# -- end to end ---------------------------------------------------------------------------------------------


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    async def go() -> None:
        async with aiomqtt.Client("127.0.0.1", port) as c:
            await c.publish(topic, payload, qos=1, retain=True)

    asyncio.run(go())


def two_endpoints(p1: int, p2: int) -> str:
    return f"""
    service_name = "thermo"
    [[endpoints]]
    type = "local"
    url = "http://127.0.0.1:{p1}"
    priority = 1
    [[endpoints]]
    type = "local"
    url = "http://127.0.0.1:{p2}"
    priority = 2
    """


def test_fleet_config_changes_routing_refuses_forgeries_and_survives_a_restart_with_the_broker_down(
    tmp_path, backends, edged, broker, topic_prefix
):
    private_pem, public_pem, _ = generate_key()
    (tmp_path / "ops.key").write_bytes(private_pem)
    (tmp_path / "ops.pub").write_bytes(public_pem)
    key = load_private_key(str(tmp_path / "ops.key"))
    b1, b2 = backends("p1"), backends("p2")
    extra = mqtt_section(broker, topic_prefix) + f'[fleet]\nkeys = ["{tmp_path / "ops.pub"}"]\n'
    d = edged({"thermo.toml": two_endpoints(b1.port, b2.port)}, extra)
    wait_metric(d, "edged_mqtt_connected", lambda v: v == 1)

    def answered_by(n: int = 6) -> set[str]:
        return {json.loads(d.call("thermo", "/x")[2])["name"] for _ in range(n)}

    def current_strategy() -> str:
        return d.get("/v1/services/thermo")["strategy"]

    assert answered_by() == {"p1"}
    # cryptography (about 7 MiB) is loaded only once a document must be verified, not for the keys.
    assert d.proc is not None and not loads_package(d.proc.pid, "cryptography")
    # The operator's way: sign a document and push it with the CLI (retained on {prefix}/home/config).
    (tmp_path / "rr.toml").write_text(
        # levels = "none": round robin over both priorities (by default each priority is a level of its own)
        'version = 2\n[policies.thermo]\nstrategy = "round_robin"\nlevels = "none"\n'
    )
    signed_rr = subprocess.run(
        [sys.executable, "-m", "edged", "fleet", "sign", "rr.toml", "--key", "ops.key", "-c", str(d.config), "-o", "-"],
        cwd=tmp_path,
        capture_output=True,
        check=True,
    ).stdout
    (tmp_path / "rr.signed.json").write_bytes(signed_rr)
    pushed = subprocess.run(
        [sys.executable, "-m", "edged", "fleet", "push", "rr.signed.json", "--config", str(d.config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert pushed.returncode == 0, pushed.stderr
    assert f"to {topic_prefix}/home/config" in pushed.stdout
    wait_for(lambda: current_strategy() == "round_robin", 5, what="fleet config applied")
    assert answered_by() == {"p1", "p2"}
    assert loads_package(d.proc.pid, "cryptography")

    # A forged document (unknown key), a replayed older one (good signature) and garbage: all refused.
    topic = f"{topic_prefix}/home/config"
    forged = sign_document(document_text({"version": 3, "policies": {"thermo": {"strategy": "latency"}}}), OTHER)
    older = signed({"version": 1, "policies": {"thermo": {"strategy": "weighted"}}}, key)
    for payload in (forged, older, b"\x00 garbage {"):
        publish_retained(broker.port, topic, payload)
    wait_metric(d, "edged_fleet_config_refused_total", lambda v: v >= 3)
    assert current_strategy() == "round_robin" and answered_by() == {"p1", "p2"}
    metrics = d.api.request("GET", "/metrics")[2].decode()
    for reason in ("unknown_key", "older", "unparseable"):
        assert f'edged_fleet_config_refused_total{{reason="{reason}"}} 1' in metrics
    assert 'edged_fleet_config_version{scope="fleet"} 2' in metrics

    # Restart with the broker down: the last good config is in force from the state dir.
    assert d.stop() == 0
    broker.kill()
    d.start()
    assert current_strategy() == "round_robin"
    assert d.get("/v1/services/thermo")["endpoints"] and answered_by() == {"p1", "p2"}
    assert d.stop() == 0


def test_the_fleet_layer_is_a_function_of_the_documents_and_the_manifests():
    src, _, _ = source()
    assert src.offer(signed({"version": 1, "policies": {"thermo": {"strategy": "round_robin"}}}), "fleet", "t")
    declared = {("default", "thermo"): ServiceSpec(name="thermo", policy=PolicySpec(retries=3))}
    (policy,) = src.policies(Draft({}, declared)).values()
    assert (policy.strategy, policy.retries) == ("round_robin", 3)  # laid over the manifest's policy
    (alone,) = src.policies(Draft({}, {})).values()
    assert (alone.strategy, alone.retries) == ("round_robin", PolicySpec().retries)  # no manifest: the defaults


def dated(doc: dict, issued_at: float, key: Ed25519PrivateKey = KEY) -> bytes:
    """A document signed with a given issue time (what a replay of an old one looks like)."""
    stamp = datetime.fromtimestamp(issued_at, timezone.utc).isoformat(timespec="seconds")
    text = json.dumps({"fleet": "home", **doc, "issued_at": stamp}, sort_keys=True)
    return sign_document(text, key)


def test_documents_must_name_their_fleet_and_node_and_carry_an_issue_time():
    src, _, _ = source(registry_with("thermo"))
    rr = {"policies": {"thermo": {"strategy": "round_robin"}}}
    unnamed = sign_document(document_text({"version": 5, **rr}), KEY)  # as `edged fleet sign` made them before
    assert not src.offer(unnamed, "fleet", "t")
    assert not src.offer(signed({"version": 5, "fleet": "office", **rr}), "fleet", "t")
    assert not src.offer(signed({"version": 5, **rr}), "node", "t")  # on config/pi-1 without naming pi-1
    assert not src.offer(signed({"version": 5, "node": "pi-2", **rr}), "node", "t")
    assert not src.offer(sign_document(json.dumps({"version": 5, "fleet": "home", **rr}), KEY), "fleet", "t")
    yesterday = json.dumps({"version": 5, "fleet": "home", "issued_at": "yesterday"})
    assert not src.offer(sign_document(yesterday, KEY), "fleet", "t")
    assert not src.offer(signed({"version": 2**60, **rr}), "fleet", "t")
    assert src.refused == {"wrong_scope": 4, "invalid": 3}
    assert src.offer(signed({"version": 5, "node": "pi-1", **rr}), "node", "t")
    assert src.versions() == {"node": 5}


def test_with_no_state_an_old_document_is_refused_and_with_state_an_older_version_is():
    now = time.time()
    src, registry, _ = source(registry_with("thermo"), max_age=30 * 86400, clock=lambda: now)
    rr = {"policies": {"thermo": {"strategy": "round_robin"}}}
    # A node that has never seen v12: a v3 retained two months ago (replayed) is refused as stale ...
    assert not src.offer(dated({"version": 3, **rr}, now - 60 * 86400), "fleet", "t")
    assert src.refused == {"stale": 1} and strategy(registry, "thermo") == "priority"
    # ... a recent one is taken, and from then on the version decides, whatever the issue time.
    assert src.offer(dated({"version": 12, **rr}, now - 86400), "fleet", "t")
    assert not src.offer(dated({"version": 3, **rr}, now), "fleet", "t")
    assert src.refused == {"stale": 1, "older": 1}
    # The saved state restores a document older than max_age (it is memory, not a replay).
    later, registry2, _ = source(registry_with("thermo"), max_age=3600, clock=lambda: now + 86400 * 365)
    assert later.load(json.loads(json.dumps(src.state()))) == ["fleet"]
    assert strategy(registry2, "thermo") == "round_robin"


def test_a_node_document_is_withdrawn_by_a_newer_tombstone_and_stays_withdrawn():
    src, registry, _ = source(registry_with("thermo"))
    src.offer(signed({"version": 1, "policies": {"thermo": {"strategy": "weighted"}}}), "fleet", "t")
    node_doc = signed({"version": 4, "node": "pi-1", "policies": {"thermo": {"strategy": "round_robin"}}})
    assert src.offer(node_doc, "node", "t") and strategy(registry, "thermo") == "round_robin"
    assert not src.offer(signed(tombstone("pi-1", 3)), "node", "t")  # not newer: refused
    assert src.offer(signed(tombstone("pi-1", 5)), "node", "t")
    assert strategy(registry, "thermo") == "weighted"  # the fleet's document again
    assert not src.offer(node_doc, "node", "t")  # a replay of the withdrawn document
    assert src.refused == {"older": 2}
    again, registry2, _ = source(registry_with("thermo"))
    assert again.load(json.loads(json.dumps(src.state()))) == ["fleet", "node"]
    assert strategy(registry2, "thermo") == "weighted" and not again.offer(node_doc, "node", "t")
    with pytest.raises(FleetConfigError, match="only a node's document"):
        text = document_text({"version": 6, "fleet": "home", "withdrawn": True})
        parse_document(text, key="k", signed=b"", source="t")


def test_a_fleet_policy_carries_a_services_allow_deny_and_quota_to_the_gate():
    from edged.access import Identity
    from edged.admission import Gate
    from edged.authz import Authorizer
    from edged.errors import CallError
    from edged.quota import Quotas
    from edged.telemetry import MeshMetrics

    registry = registry_with("pump")
    src, _, _ = source(registry)
    table = {"allow": ["default/lamps"], "deny": ["default/lamps-old"], "quota": {"rate": 1, "burst": 2}}
    assert src.offer(signed({"version": 1, "policies": {"pump": table}}), "fleet", "t")
    gate = Gate(Authorizer(), Quotas(), MeshMetrics())
    svc = registry.snapshot().get("default", "pump")

    def status(app: str) -> int:
        try:
            gate.admit(Identity(app, "default", frozenset({"call"})), svc, "GET", "/").release()
            return 200
        except CallError as exc:
            return exc.status

    assert [status(a) for a in ("lamps", "lamps-old", "other", "lamps", "lamps")] == [200, 403, 403, 200, 429]
    bad = {"version": 2, "policies": {"pump": {"allow": ["garden lamps"]}}}
    assert not src.offer(signed(bad), "fleet", "t")  # refused with its key; the last good config stays
    assert registry.snapshot().get("default", "pump").spec.policy.allow == ("default/lamps",)


def test_rules_and_jwt_keys_arrive_in_signed_fleet_config():
    import time as _time

    import jwt
    from jwt.algorithms import OKPAlgorithm

    from edged.access import Access, AccessConfig, Identity
    from edged.admission import Gate
    from edged.authz import Authorizer
    from edged.config import TenantConfig
    from edged.errors import CallError
    from edged.http.message import Request
    from edged.jwt_auth import JwtConfig
    from edged.quota import Quotas
    from edged.telemetry import MeshMetrics

    gate = Gate(Authorizer(), Quotas(), MeshMetrics())
    registry = registry_with("pump")
    src, _, _ = source(registry, on_authz=gate.set_fleet)
    signer = Ed25519PrivateKey.generate()
    jwk = {**json.loads(OKPAlgorithm.to_jwk(signer.public_key())), "kid": "fleet-1"}
    rule = {"name": "no-pump", "action": "deny", "service": "pump", "from": ["default/*"]}
    assert src.offer(signed({"version": 1, "authz": {"rules": [rule], "jwt_keys": [jwk]}}), "fleet", "t")
    svc = registry.snapshot().get("default", "pump")
    with pytest.raises(CallError) as err:
        gate.admit(Identity("lamps", "default", frozenset({"call"})), svc, "GET", "/")
    assert err.value.status == 403 and "no-pump" in str(err.value.detail) and "(fleet)" in str(err.value.detail)
    # A JWT signed by the key that came in fleet config is accepted (the box has no JWKS of its own).
    config = AccessConfig(jwt=JwtConfig(issuer="https://id.example", fleet_keys=True))
    access = Access(config, {"default": TenantConfig("default")}, fleet_keys=lambda: gate.fleet_jwt_keys)
    claims = {"iss": "https://id.example", "sub": "lamps", "tenant": "default", "exp": int(_time.time()) + 60}
    tok = jwt.encode(claims, signer, algorithm="EdDSA", headers={"kid": "fleet-1"})
    req = Request("GET", "/", "/", "", "1.1", [(b"authorization", f"Bearer {tok}".encode())], b"", "10.1.1.1", True)
    assert access.identify(req).id == "default/lamps"
    # A node document replaces the fleet's rule of the same name; a bad rule is refused, the last good stays.
    node_rule = {**rule, "action": "allow"}
    assert src.offer(signed({"version": 1, "node": "pi-1", "authz": {"rules": [node_rule]}}), "node", "t")
    gate.admit(Identity("lamps", "default", frozenset({"call"})), svc, "GET", "/").release()
    bad = {"version": 2, "authz": {"rules": [{"name": "x", "action": "perhaps"}]}}
    assert not src.offer(signed(bad), "fleet", "t")
    assert [r.name for r in gate.authz.rules()] == ["no-pump"]


def test_tenant_quotas_arrive_in_fleet_config_and_the_api_ranks_above():
    from edged.access import Identity
    from edged.admission import Gate
    from edged.authz import Authorizer
    from edged.errors import CallError
    from edged.model import QuotaSpec
    from edged.quota import Quotas
    from edged.telemetry import MeshMetrics

    gate = Gate(Authorizer(), Quotas({"default": QuotaSpec(rate=1000)}), MeshMetrics())
    registry = registry_with("pump")
    src, _, _ = source(registry, on_authz=gate.set_fleet)
    doc = {"version": 1, "authz": {"quotas": {"default": {"rate": 0.001, "burst": 2}}}}
    assert src.offer(signed(doc), "fleet", "t")
    svc = registry.snapshot().get("default", "pump")
    app = Identity("lamps", "default", frozenset({"call"}))

    def passed(n: int) -> int:
        ok = 0
        for _ in range(n):
            try:
                gate.admit(app, svc, "GET", "/").release()
                ok += 1
            except CallError as exc:
                assert exc.status == 429
        return ok

    assert passed(5) == 2  # fleet config over edged.toml
    gate.set_quotas("api", {"default": QuotaSpec(in_flight=1)})  # the API over fleet config: no rate, 1 at once
    held = gate.admit(app, svc, "GET", "/")
    assert passed(3) == 0
    held.release()
    assert passed(3) == 3
    bad = {"version": 2, "authz": {"quotas": {"Default": {"rate": 1}}}}
    assert not src.offer(signed(bad), "fleet", "t")


def test_a_fleet_document_nested_too_deeply_is_refused_before_it_is_decoded():
    """The signed wire form and the document inside are decoded with [limits] json_depth's default: a 40-level
    nesting is refused as unparseable before `json.loads` runs (before: decoded whole)."""
    from edged.cloud.fleet import MAX_JSON_DEPTH, FleetConfigError, verify

    deep = b'{"format": "hubmesh-fleet-config/1", "x": ' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(FleetConfigError, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        verify(deep, {})
