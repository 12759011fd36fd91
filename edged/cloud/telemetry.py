"""Telemetry of the cloud tier: its own metric families and the periodic MQTT summary (with the core's vitals).

The summary on `{prefix}/{fleet}/telemetry/{node}` (JSON, QoS 0, not retained) counts calls, failures and
failovers per service and tier since the previous summary, with the node's vitals. It is rate-limited:
never more often than MIN_INTERVAL, whatever `[mqtt] telemetry_interval` or fleet config say.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from ..telemetry import MeshMetrics, Metrics

log = logging.getLogger("edged.cloud.telemetry")

MIN_INTERVAL = 1.0  # seconds: the floor of the summary period


class CloudMetrics:
    """Metric families of the cloud tier, declared on the daemon's registry (or a fresh one in tests)."""

    def __init__(self, registry: Metrics | None = None) -> None:
        m = registry if registry is not None else Metrics()
        self.requests = m.counter("edged_cloud_requests_total", "Cloud calls published over MQTT.")
        self.timeouts = m.counter("edged_cloud_timeouts_total", "Cloud calls with no answer within the try timeout.")
        self.resends = m.counter(
            "edged_cloud_resends_total", "Idempotent cloud calls sent again after their broker connection dropped."
        )
        self.late_answers = m.counter(
            "edged_cloud_late_answers_total", "Answers that came after their call gave up (dropped)."
        )
        self.bad_answers = m.counter("edged_cloud_bad_answers_total", "Answers on the reply topic that were invalid.")
        self.too_large = m.counter("edged_cloud_too_large_total", "Cloud calls over mqtt.max_payload (413).")
        self.unsealed = m.counter(
            "edged_cloud_refused_messages_total",
            "Requests, answers and registry entries refused: not sealed by a fleet certificate, or sealed by one"
            " that may not send them (kind: request, answer, entry).",
            ("kind",),
        )
        self.tenant_refused = m.counter(
            "edged_bridge_tenant_refused_total",
            "Requests a bridge refused (403): the calling node may not act for the tenant it named ([bridge] tenants).",
        )
        self.connects = m.counter("edged_mqtt_connects_total", "Successful connections to the MQTT broker.")
        self.registry_nodes = m.gauge(
            "edged_mqtt_registry_nodes",
            "Nodes known from the MQTT registry, by liveness (online, offline, stale, suspect, unknown).",
            ("state",),
        )
        self.fleet_refused = m.counter(
            "edged_fleet_config_refused_total", "Fleet config documents refused, by reason.", ("reason",)
        )
        self.fleet_version = m.gauge(
            "edged_fleet_config_version", "Version of the fleet config in force, by scope (fleet, node).", ("scope",)
        )


class TelemetryPublisher:
    """Builds and posts the periodic summary. `run()` is a loop owned by the cloud tier."""

    def __init__(
        self,
        *,
        post: Callable[[str, bytes], bool],
        topic: str,
        node: str,
        fleet: str,
        mesh: MeshMetrics,
        interval: float,
        extra: Callable[[], dict] = dict,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._post = post
        self._topic = topic
        self._node = node
        self._fleet = fleet
        self._mesh = mesh
        self._extra = extra
        self._clock = clock
        self.interval = max(MIN_INTERVAL, interval)
        self._wake = asyncio.Event()
        self._last_calls: dict[tuple[str, ...], float] = {}
        self._last_failovers: dict[tuple[str, ...], float] = {}
        self._last_sent = 0.0
        self.sent = 0

    def set_interval(self, seconds: float) -> None:
        """Change the period (fleet config `settings.telemetry_interval`); never below MIN_INTERVAL."""
        self.interval = max(MIN_INTERVAL, seconds)
        self._wake.set()

    def summary(self) -> dict:
        """Calls, failures and failovers per service and tier since the previous summary, and totals."""
        services: dict[str, dict] = {}
        calls = self._mesh.calls.values()  # (service, tier, outcome) -> count
        for labels, total in calls.items():
            service, tier, outcome = labels
            delta = total - self._last_calls.get(labels, 0.0)
            svc = services.setdefault(service, {"tiers": {}, "failovers": 0})
            row = svc["tiers"].setdefault(tier, {"calls": 0, "failures": 0, "total": 0})
            row["calls"] += int(delta)
            row["total"] += int(total)
            if outcome != "success":
                row["failures"] += int(delta)
        failovers = self._mesh.failovers.values()
        for labels, total in failovers.items():
            svc = services.setdefault(labels[0], {"tiers": {}, "failovers": 0})
            svc["failovers"] = int(total - self._last_failovers.get(labels, 0.0))
        self._last_calls, self._last_failovers = calls, failovers
        return {
            "node": self._node,
            "fleet": self._fleet,
            "ts": round(time.time(), 3),
            "interval_s": self.interval,
            "services": services,
            **self._extra(),
        }

    def publish_now(self) -> bool:
        """Post one summary if the rate limit allows; False when it does not or the session is down."""
        now = self._clock()
        if self._last_sent and now - self._last_sent < MIN_INTERVAL:
            return False
        payload = json.dumps(self.summary(), separators=(",", ":")).encode()
        if not self._post(self._topic, payload):
            return False
        self._last_sent = now
        self.sent += 1
        return True

    async def run(self) -> None:
        """Post a summary every `interval`, re-reading the interval when it changes."""
        self._last_sent = self._clock()  # the first summary comes one interval after the start
        while True:
            delay = self._last_sent + self.interval - self._clock()
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                    continue  # the interval changed: compute the due time again
                except asyncio.TimeoutError:
                    pass
            if not self.publish_now():
                self._last_sent = self._clock()  # disconnected: try again one interval later
