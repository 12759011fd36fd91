"""The identity keeper: status, journal and metrics of the node certificate, renewal two thirds into its life."""

# ruff: noqa: F811  (fixtures imported from fixtures_mqtt / fixtures_netns are test parameters)
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import subprocess
import sys
from pathlib import Path

from fixtures_identity import FleetCA
from fixtures_mqtt import broker, mqtt_section, topic_prefix  # noqa: F401
from fixtures_netns import edge_nodes, unique_fleet, wait_for  # noqa: F401

from edged.errors import EdgedError
from edged.identity.files import write_file
from edged.identity.issue import key_pem
from edged.identity.keeper import IdentityKeeper
from edged.identity.tls import server_context
from edged.telemetry import MeshMetrics

REPO = Path(__file__).resolve().parents[1]
UTC = dt.timezone.utc


def test_state_journal_and_metrics_through_a_certificates_life(tmp_path, caplog):
    issued = dt.datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    files = FleetCA("home", now=issued - dt.timedelta(days=1)).enroll(tmp_path, "pi-1", now=issued, lifetime=24 * 3600)
    now = [issued.timestamp() + 3600]
    metrics = MeshMetrics()
    calls: list[str] = []

    async def failing_renew() -> None:
        calls.append("renew")
        raise EdgedError("no answer from the fleet CA within 30s")

    keeper = IdentityKeeper(files, [], skew=20, renew=failing_renew, metrics=metrics, clock=lambda: now[0])
    keeper.tick()
    state = keeper.state()
    assert state["state"] == "ok" and state["spiffe_id"] == "spiffe://home/node/pi-1"
    assert state["renew_after"] == "2026-12-01T15:58:20Z"  # 2/3 of 24 h + the 5 min backdating
    assert metrics.value("edged_identity_expiry_seconds") == 23 * 3600
    now[0] = issued.timestamp() + 17 * 3600  # past two thirds: renewal is due, and fails
    asyncio.run(keeper._try_renew())
    with caplog.at_level(logging.WARNING, logger="edged.identity"):
        keeper.tick()
    assert calls == ["renew"] and keeper.state()["state"] == "renew_failing"
    assert "expires in 7.0 h and is not renewed yet: no answer from the fleet CA" in caplog.text
    assert metrics.value("edged_identity_renewals_total", {"result": "failed"}) == 1
    now[0] = issued.timestamp() + 25 * 3600
    assert keeper.state()["state"] == "expired" and "expired at 2026-12-02T00:00:00Z" in keeper.state()["problem"]
    now[0] = dt.datetime(1970, 1, 1, tzinfo=UTC).timestamp() + 42  # a Pi without RTC, before NTP
    assert keeper.state()["state"] == "clock_wrong"
    assert "TLS with peers is impossible until the clock is set" in keeper.state()["problem"]


def test_a_new_certificate_on_disk_is_used_for_new_connections(tmp_path):
    ca = FleetCA("home")
    files = ca.enroll(tmp_path, "pi-1", lifetime=3600)
    ctx = server_context(files)
    keeper = IdentityKeeper(files, [ctx], skew=20, renew=None)
    keeper.tick()
    before = keeper.state()["not_after"]
    later = dt.datetime.now(UTC) + dt.timedelta(hours=2)
    key, cert = ca.issue("pi-1", lifetime=3600, now=later)
    write_file(files.key, key_pem(key), 0o600)
    from edged.identity.issue import cert_pem

    write_file(files.cert, cert_pem(cert), 0o644)
    os.utime(files.cert, (1, 1))  # a distinct mtime, whatever the clock's resolution
    keeper.tick()
    assert keeper.state()["not_after"] != before and keeper.state()["renews_online"] is False


def test_the_daemon_renews_its_certificate_through_the_fleet_ca(tmp_path, edge_nodes, broker, topic_prefix):
    """A certificate already past two thirds of its life at start: renewed at once over MQTT by a real signer;
    `edged status` and the metrics say so."""
    fleet = unique_fleet()
    ca = FleetCA(fleet)
    ca_dir = tmp_path / "ca"
    write_file(str(ca_dir / "ca.key"), key_pem(ca.key), 0o600)
    write_file(str(ca_dir / "ca.pem"), ca.pem, 0o644)
    operator = tmp_path / "operator.toml"
    operator.write_text(mqtt_section(broker, topic_prefix) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    signer = subprocess.Popen(
        [sys.executable, "-m", "edged", "fleet", "ca", "serve", "--dir", str(ca_dir), "-c", str(operator)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        node = edge_nodes("pi-1", fleet=fleet, ca=ca, extra_config=mqtt_section(broker, topic_prefix))
        eighteen_h_ago = dt.datetime.now(UTC) - dt.timedelta(hours=18)
        ca.enroll(node.root / "state" / "identity", node.name, now=eighteen_h_ago)
        node.start()
        wait_for(lambda: '"event":"identity.renewed"' in node.log_text(), 30, what="the renewal")
        identity = node.get("/v1/status")["identity"]
        assert identity["state"] == "ok" and identity["expires_in_s"] > 23 * 3600
        assert identity["last_renewal"]["ok"] is True
        metrics = node.api.request("GET", "/metrics")[2].decode()
        assert 'edged_identity_renewals_total{result="ok"} 1' in metrics
        status = subprocess.run(
            [sys.executable, "-m", "edged", "status", "--api", f"unix:{node.socket}"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert f"identity spiffe://{fleet}/node/{node.name}" in status.stdout
    finally:
        signer.terminate()
        signer.wait(10)
