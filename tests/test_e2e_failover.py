"""End to end: the real daemon, real backends, 200 calls/s, and a backend killed or frozen mid-run."""

from __future__ import annotations

import asyncio

import failover
import pytest
from conftest import wait_for
from loadgen import LoadGen, summary

pytestmark = pytest.mark.slowcpu  # scripts/test-slowcpu runs these with the daemon on a throttled CPU
RATE = 200


def two_endpoints(p1: int, p2: int) -> str:
    return failover.two_endpoints(p1, p2, interval="500ms")


def run_load(port: int, duration: float, at: dict) -> list:
    return asyncio.run(LoadGen("127.0.0.1", port, "/svc/thermo/readings").run(RATE, duration, at))


def test_sigkill_of_the_primary_loses_no_call_and_traffic_returns_after_recovery(backends, edged):
    b1, b2 = backends("p1"), backends("p2")
    d = edged({"thermo.toml": two_endpoints(b1.port, b2.port)})
    ep1 = f"default/thermo/local/{b1.url}"
    ep2 = f"default/thermo/local/{b2.url}"
    killed_at, restarted_at = 1.0, 2.0
    results = run_load(d.port, 5.0, {killed_at: b1.kill, restarted_at: b1.start})
    stats = summary(results)
    assert stats["failed"] == 0, [r for r in results if r.status != 200][:5]
    # Calls are placed by when they were answered: on a slow CPU the daemon may route a call sent just
    # before the kill after it (EDGED_SLOW_CPU), and that one rightly goes to priority 2.
    # The load loop runs the kill as it reaches the first call due at killed_at, right after sending the one
    # before it: a call sent a gap early can meet the dead primary (and rightly fail over).
    before = [r for r in results if r.started + r.latency < killed_at - 2 / RATE]
    assert before and all(r.endpoint == ep1 for r in before), [
        (round(r.started, 3), round(r.latency, 3), r.endpoint[-5:], r.tries) for r in before if r.endpoint != ep1
    ]
    # From the first call after the kill, calls are answered by priority 2 (the first one after a retry).
    after_kill = [r for r in results if killed_at + 0.01 < r.started and r.started + r.latency < restarted_at]
    assert after_kill and all(r.endpoint == ep2 for r in after_kill)
    # After the restart the health check (rise 2, every 500 ms) brings priority 1 back, and traffic with it: it
    # comes back within the run (on a loaded machine later than the ~1 s it takes on a quiet one) and stays.
    back = next((r.started for r in results if r.started > restarted_at and r.endpoint == ep1), None)
    assert back is not None, [(round(r.started, 2), r.endpoint) for r in results[-20:]]
    tail = [r for r in results if r.started > back]
    assert tail and all(r.endpoint == ep1 for r in tail), [(round(r.started, 2), r.endpoint) for r in tail[:20]]
    assert d.stop() == 0


def test_sigstop_of_the_primary_loses_no_call(backends, edged):
    b1, b2 = backends("p1"), backends("p2")
    d = edged({"thermo.toml": two_endpoints(b1.port, b2.port)})
    ep2 = f"default/thermo/local/{b2.url}"
    results = run_load(d.port, 3.0, {1.0: b1.freeze, 2.0: b1.thaw})
    stats = summary(results)
    assert stats["failed"] == 0, [r for r in results if r.status != 200][:5]
    frozen = [r for r in results if r.started > 1.0 and r.started + r.latency < 2.0]  # answered before the thaw
    # Calls caught by the freeze were retried on priority 2 after the per-try timeout; the rest went there at once.
    assert frozen and all(r.endpoint == ep2 for r in frozen)
    slow = [r for r in frozen if r.tries > 1]
    assert len(slow) < len(frozen) / 2, stats
    assert d.stop() == 0


def test_a_failing_primary_is_marked_down_by_its_health_check_and_comes_back(backends, edged):
    b1, b2 = backends("p1"), backends("p2")
    d = edged({"thermo.toml": two_endpoints(b1.port, b2.port)})

    def up(url: str) -> bool:
        svc = d.get("/v1/services/thermo")
        return next(ep["up"] for ep in svc["endpoints"] if ep["url"] == url)

    b1.set_healthy(False)
    wait_for(lambda: not up(b1.url), 5, what="p1 marked down")
    status, headers, _ = d.call("thermo", "/x")
    assert status == 200 and dict(headers)["x-edged-endpoint"].endswith(str(b2.port))
    b1.set_healthy(True)
    wait_for(lambda: up(b1.url), 5, what="p1 back up")
    status, headers, _ = d.call("thermo", "/x")
    assert status == 200 and dict(headers)["x-edged-endpoint"].endswith(str(b1.port))
