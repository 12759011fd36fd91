"""HealthMonitor: real check tasks against real servers, TTL heartbeats, passive reports, stall detection."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from pathlib import Path

from helpers import StatusServer, process_gone

from edged.health import EndpointHealth, HealthMonitor, OutlierConfig
from edged.model import Endpoint, HealthCheckSpec, Service, ServiceSpec, parse_target


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_endpoint(eid: str, url: str, tier: str = "local") -> Endpoint:
    target = parse_target(url) if url.startswith(("http", "unix")) else None
    return Endpoint(
        id=eid,
        service="thermo",
        tenant="default",
        tier=tier,
        url=url,
        priority=1,
        weight=100,
        source="manifest",
        target=target,
    )


def make_service(check: HealthCheckSpec | None, *endpoints: Endpoint) -> Service:
    return Service(spec=ServiceSpec(name="thermo", health_check=check), endpoints=endpoints)


def http_check(interval: float = 0.05, rise: int = 2, fall: int = 2, path: str = "/healthz") -> HealthCheckSpec:
    return HealthCheckSpec(kind="http", http_path=path, interval=interval, timeout=0.5, rise=rise, fall=fall)


async def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def task_names() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if not t.done()}


Events = list[tuple[str, bool, str]]


def recorder(events: Events):
    def on_change(endpoint: Endpoint, available: bool, reason: str) -> None:
        events.append((endpoint.id, available, reason))

    return on_change


def test_rise_and_fall_follow_the_server() -> None:
    async def main() -> None:
        server = await StatusServer(200).start()
        events: Events = []
        monitor = HealthMonitor(on_change=recorder(events))
        ep = make_endpoint("a", server.url)
        monitor.sync([make_service(http_check(), ep)])
        h = monitor.state("a")
        try:
            await wait_until(lambda: h.checks_ok >= 2)
            assert h.available(time.monotonic()) and events == [] and monitor.version == 0
            assert h.last_detail == "HTTP 200" and h.latency_ewma is not None

            server.status = 503
            await wait_until(lambda: not h.active_ok)
            assert events == [("a", False, "unhealthy: HTTP 503 (2 checks)")]
            assert monitor.version == 1 and h.checks_failed >= 2
            assert h.reason(time.monotonic()).startswith("unhealthy: HTTP 503")

            server.status = 200
            await wait_until(lambda: h.active_ok)
            assert events[1:] == [("a", True, "healthy")]
            assert monitor.version == 2 and h.reason(time.monotonic()) == "healthy"
            assert all(path == "/healthz" for _, path in server.seen)
        finally:
            await monitor.close()
            await server.stop()
        assert "edged-health:a" not in task_names()

    asyncio.run(main())


def test_probes_faster_while_a_change_is_pending() -> None:
    async def main() -> None:
        server = await StatusServer(503).start()
        monitor = HealthMonitor()
        interval = 0.8  # pending probes every 0.2 s
        monitor.sync([make_service(http_check(interval=interval, rise=3, fall=3), make_endpoint("a", server.url))])
        h = monitor.state("a")
        try:
            await wait_until(lambda: not h.active_ok)
            assert len(server.seen) == 3  # fall = 3 checks, the first at once
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(server.seen)]
            assert all(gap < interval * 0.75 for gap in gaps), gaps
            await asyncio.sleep(interval / 2)
            assert len(server.seen) == 3  # settled: back to the normal interval

            server.status = 200
            await wait_until(lambda: h.active_ok)
            assert len(server.seen) == 6  # rise = 3 ok checks
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(server.seen[3:])]
            assert all(gap < interval * 0.75 for gap in gaps), gaps
        finally:
            await monitor.close()
            await server.stop()

    asyncio.run(main())


def test_sync_adds_removes_and_restarts_checks() -> None:
    async def main() -> None:
        a, b = await StatusServer().start(), await StatusServer().start()
        monitor = HealthMonitor()
        ea, eb = make_endpoint("a", a.url), make_endpoint("b", b.url)
        monitor.sync([make_service(http_check(), ea, eb)])
        try:
            await wait_until(lambda: len(a.seen) >= 2 and len(b.seen) >= 2)
            assert {"edged-health:a", "edged-health:b"} <= task_names()

            a.status = 503
            await wait_until(lambda: not monitor.state("a").active_ok)
            monitor.sync([make_service(http_check(), ea)])  # b is gone, a stays
            await wait_until(lambda: "edged-health:b" not in task_names())
            seen_b = len(b.seen)
            await asyncio.sleep(0.3)
            assert len(b.seen) == seen_b  # no more checks of b
            assert not monitor.state("a").active_ok  # a kept its state
            assert monitor.state("b").checks_ok == 0  # b's state was dropped; a fresh default one now

            monitor.sync([make_service(http_check(path="/other"), ea)])  # changed check restarts a's task
            await wait_until(lambda: a.seen[-1][1] == "/other")
            assert not monitor.state("a").active_ok  # still down: the new check has to rise first
            a.status = 200
            await wait_until(lambda: monitor.state("a").active_ok)

            monitor.sync([make_service(None, ea)])  # no active check any more
            await wait_until(lambda: "edged-health:a" not in task_names())
            assert monitor.state("a").available(time.monotonic())
        finally:
            await monitor.close()
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_ttl_expires_without_heartbeats() -> None:
    async def main() -> None:
        events: Events = []
        monitor = HealthMonitor(on_change=recorder(events))
        # A ttl of 1 s against heartbeats every 0.1 s: a loaded box may stand this test still for a moment between
        # a heartbeat and the next (at 0.25 s, a 0.15 s stall let the ttl expire between two of them).
        ttl = HealthCheckSpec(kind="ttl", ttl=1.0)
        monitor.sync([make_service(ttl, make_endpoint("t", "http://127.0.0.1:9"))])
        h = monitor.state("t")
        try:
            assert h.available(time.monotonic())  # one ttl of grace
            assert "edged-health:t" not in task_names()  # heartbeats, not probes
            await wait_until(lambda: not h.active_ok)
            assert events == [("t", False, "unhealthy: no heartbeat for 1s")]

            monitor.heartbeat("t")
            assert h.available(time.monotonic())
            assert events[1:] == [("t", True, "healthy")]
            for _ in range(6):  # heartbeats within the ttl keep it up
                await asyncio.sleep(0.1)
                monitor.heartbeat("t")
                assert h.active_ok
            await wait_until(lambda: not h.active_ok)
            assert len(events) == 3 and monitor.version == 3
            monitor.heartbeat("unknown")  # ignored, no error
        finally:
            await monitor.close()
        assert "edged-health:sweeper" not in task_names()

    asyncio.run(main())


def test_the_sweeper_sleeps_without_a_timer_while_no_deadline_is_pending() -> None:
    """An idle daemon with endpoints but no TTL and no ejection is not woken by the sweeper at all; a TTL
    check set later wakes it in time."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        monitor = HealthMonitor()
        monitor.sync([make_service(None, make_endpoint("a", "http://127.0.0.1:9"))])
        try:
            await asyncio.sleep(0.05)
            assert "edged-health:sweeper" in task_names()
            assert not [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
            monitor.sync([make_service(HealthCheckSpec(kind="ttl", ttl=0.1), make_endpoint("a", "http://127.0.0.1:9"))])
            h = monitor.state("a")
            await wait_until(lambda: not h.active_ok, timeout=2.0)
        finally:
            await monitor.close()

    asyncio.run(main())


def test_passive_ejection_never_takes_the_last_endpoint() -> None:
    clock = FakeClock()
    events: Events = []
    monitor = HealthMonitor(outlier=OutlierConfig(3, 10.0, 300.0), clock=clock, on_change=recorder(events))
    ea, eb = make_endpoint("a", "http://127.0.0.1:1"), make_endpoint("b", "http://127.0.0.1:2")
    service = make_service(None, ea, eb)
    for _ in range(3):
        monitor.call_started("a")
        monitor.call_finished(ea, service, False, 0.2)
    a = monitor.state("a")
    assert not a.available(clock.now) and a.ejected_until == clock.now + 10.0
    assert events == [("a", False, "ejected 10.0s more: 3 failed calls")]
    assert a.calls_failed == 3 and a.inflight == 0 and a.latency_ewma is not None

    for _ in range(5):  # b is now the only available endpoint: never ejected
        monitor.call_finished(eb, service, False, None)
    assert monitor.state("b").available(clock.now) and len(events) == 1

    clock.now += 10.0
    assert a.available(clock.now)  # readers see it at once ...
    monitor.sweep()  # ... and the sweeper announces it
    assert events[1:] == [("a", True, "healthy")] and a.ejected_until == 0.0
    assert monitor.version == 2
    monitor.call_finished(eb, service, False, None)  # a is back: b's kept streak ejects it now
    assert not monitor.state("b").available(clock.now)


def test_an_endpoint_with_nothing_to_check_gets_its_state_at_first_use() -> None:
    """A box following a whole fleet syncs ten thousand cloud endpoints it may never call: none gets a state
    until it is used, and a used one is ejected, announced and comes back as before."""
    clock = FakeClock()
    events: Events = []
    monitor = HealthMonitor(outlier=OutlierConfig(3, 10.0, 300.0), clock=clock, on_change=recorder(events))
    c1, c2 = make_endpoint("c1", "mqtt:thermo", tier="cloud"), make_endpoint("c2", "mqtt:thermo", tier="cloud")
    service = make_service(None, c1, c2)
    monitor.sync([service])
    assert "endpoints=0 " in repr(monitor)  # the old code made one state per endpoint here
    assert monitor.available("c2", clock.now) and "endpoints=0 " in repr(monitor)  # read (a scrape): none made
    assert monitor.state("c2").available(clock.now) and "endpoints=1 " in repr(monitor)  # made when read
    for _ in range(3):
        with monitor.call_started("c1") as call:
            call.finish(c1, service, False, None)
    assert not monitor.state("c1").available(clock.now)
    assert events == [("c1", False, "ejected 10.0s more: 3 failed calls")]
    monitor.sync([service])  # synced again: the state made by the calls is kept
    assert not monitor.state("c1").available(clock.now)
    clock.now += 10.0
    monitor.sweep()
    assert events[1:] == [("c1", True, "healthy")]
    monitor.sync_changed([service], [make_service(None, c2)])  # c1 goes; c2 stays
    assert "endpoints=1 " in repr(monitor) and monitor.state("c1").calls_failed == 0
    monitor.sync([])
    assert "endpoints=0 " in repr(monitor)


def test_latency_ewma_and_call_counts() -> None:
    monitor = HealthMonitor(clock=FakeClock())
    ep = make_endpoint("a", "http://127.0.0.1:1")
    service = make_service(None, ep)
    monitor.call_finished(ep, service, True, 0.1)
    monitor.call_finished(ep, service, True, 0.2)
    monitor.call_finished(ep, service, True, None)
    h = monitor.state("a")
    assert h.latency_ewma is not None and abs(h.latency_ewma - 0.13) < 1e-9
    assert h.calls_ok == 3 and h.last_detail == "call ok"


def test_active_checks_end_an_ejection_early() -> None:
    async def main() -> None:
        server = await StatusServer(200).start()
        events: Events = []
        monitor = HealthMonitor(outlier=OutlierConfig(3, 60.0, 300.0), on_change=recorder(events))
        ea, cloud = make_endpoint("a", server.url), make_endpoint("c", "mqtt:thermo", tier="cloud")
        service = make_service(http_check(rise=2), ea, cloud)
        monitor.sync([service])
        try:
            assert "edged-health:c" not in task_names() and monitor.state("c").last_detail == "not checked"
            for _ in range(3):  # the calls fail (say, a route inside the app) while its health check passes
                monitor.call_finished(ea, service, False, None)
            assert events and events[0][:2] == ("a", False) and events[0][2].startswith("ejected")
            await wait_until(lambda: monitor.state("a").available(time.monotonic()))
            assert events[1:] == [("a", True, "healthy")]
            assert monitor.state("a").ejected_until == 0.0
        finally:
            await monitor.close()
            await server.stop()

    asyncio.run(main())


def test_a_failing_hook_does_not_stop_checks() -> None:
    async def main() -> None:
        server = await StatusServer(200).start()
        calls: list[bool] = []

        def on_change(endpoint: Endpoint, available: bool, reason: str) -> None:
            calls.append(available)
            raise RuntimeError("hook bug")

        monitor = HealthMonitor(on_change=on_change)
        monitor.sync([make_service(http_check(), make_endpoint("a", server.url))])
        h = monitor.state("a")
        try:
            server.status = 503
            await wait_until(lambda: not h.active_ok)
            server.status = 200
            await wait_until(lambda: h.active_ok)
            assert calls == [False, True]
        finally:
            await monitor.close()
            await server.stop()

    asyncio.run(main())


def test_close_kills_a_running_command_check() -> None:
    async def main(pidfile: Path) -> None:
        monitor = HealthMonitor()
        check = HealthCheckSpec(kind="command", command=f"echo $$ > {pidfile}; exec sleep 30", interval=10, timeout=20)
        monitor.sync([make_service(check, make_endpoint("a", "http://127.0.0.1:1"))])
        await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        await monitor.close()
        assert not any(name.startswith("edged-health") for name in task_names())

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp, "pid")))
        pid = int(Path(tmp, "pid").read_text())
    assert process_gone(pid)


def test_a_late_event_loop_does_not_make_a_healthy_endpoint_look_stalled() -> None:
    # On a slow CPU the answer may be in the socket while the daemon's own loop is behind: that time is not
    # the endpoint's silence.
    clock, lag = FakeClock(0.0), [0.0]
    monitor = HealthMonitor(clock=clock, lag=lambda: lag[0])
    monitor.call_started("a")
    lag[0] = 0.8  # the loop ran 0.8 s late meanwhile
    assert not monitor.stalled("a", 1.0, 1.0)  # 1.0 s passed, only 0.2 s of it the loop's own
    assert monitor.stalled("a", 1.8, 1.0)


def test_the_loop_lag_after_an_answer_is_not_the_silence_of_the_tries_left_in_flight() -> None:
    clock, lag = FakeClock(0.0), [0.0]
    monitor = HealthMonitor(clock=clock, lag=lambda: lag[0])
    ep = make_endpoint("a", "http://127.0.0.1:1")
    service = make_service(None, ep)
    monitor.call_started("a")
    monitor.call_started("a")
    clock.now, lag[0] = 1.0, 0.3
    monitor.call_finished(ep, service, True, 1.0)  # one answers; the other is still out
    lag[0] = 1.1  # the loop ran 0.8 s late since
    assert not monitor.stalled("a", 2.5, 1.0)  # 1.5 s since the answer, 0.8 s of it the loop's own
    assert monitor.stalled("a", 2.85, 1.0)
    clock.now, lag[0] = 5.0, 2.0
    monitor.call_finished(ep, service, True, 1.0)  # the last one: nothing in flight
    assert not monitor.stalled("a", 50.0, 1.0)
    clock.now, lag[0] = 6.0, 2.5
    monitor.call_started("a")  # silent from 6.0, the lag counted from then
    lag[0] = 3.0
    assert not monitor.stalled("a", 7.4, 1.0)  # 1.4 s, 0.5 s of it the loop's own
    assert monitor.stalled("a", 7.5, 1.0)


def test_stalled_needs_calls_in_flight_and_silence() -> None:
    clock = FakeClock(0.0)
    monitor = HealthMonitor(clock=clock)
    ep = make_endpoint("a", "http://127.0.0.1:1")
    service = make_service(None, ep)
    assert not monitor.stalled("a", 100.0, 1.0)  # unknown / idle

    monitor.call_started("a")
    assert not monitor.stalled("a", 0.5, 1.0)
    assert monitor.stalled("a", 1.0, 1.0)
    clock.now = 1.2
    monitor.call_finished(ep, service, True, 1.2)
    assert not monitor.stalled("a", 5.0, 1.0)  # nothing in flight

    clock.now = 10.0
    monitor.call_started("a")
    monitor.call_started("a")
    clock.now = 10.5
    monitor.call_finished(ep, service, False, 0.01)  # a 503 is an answer (it has a latency)
    assert not monitor.stalled("a", 11.2, 1.0)
    assert monitor.stalled("a", 11.5, 1.0)
    monitor.call_started("a")
    clock.now = 11.8
    monitor.call_finished(ep, service, False, None)  # a timeout is not
    assert monitor.stalled("a", 11.8, 1.0)
    assert monitor.state("a").inflight == 1
    monitor.call_finished(ep, service, False, None, answered=True)  # the caller may say so explicitly
    monitor.call_started("a")
    assert not monitor.stalled("a", 12.5, 1.0) and monitor.stalled("a", 12.8, 1.0)


def test_unknown_endpoint_is_healthy_by_default() -> None:
    monitor = HealthMonitor()
    h = monitor.state("nobody")
    assert isinstance(h, EndpointHealth)
    assert h.available(time.monotonic()) and h.reason(time.monotonic()) == "healthy"
    assert monitor.state("nobody") is h and "nobody" in repr(h)


def test_regular_checks_start_on_a_grid_so_that_many_endpoints_share_a_wake_up():
    """Before: each endpoint's check slept exactly its interval after the last one ended, so 20 endpoints
    woke an idle daemon 20 times per interval (and each check's loop-lag tick once more)."""
    from edged.health.monitor import on_grid

    step = 2.0 / 8
    starts = set()
    for i in range(20):  # checks that ended at scattered times, 2 s interval
        now = 100.0 + i * 0.037
        due = now + on_grid(now, 2.0, 2.0)
        assert abs(due - (now + 2.0)) <= step / 2 + 1e-9  # within half a step of when it was due
        assert abs(due / step - round(due / step)) < 1e-9  # on the grid
        starts.add(round(due, 6))
    assert len(starts) <= 4  # 20 checks within 0.7 s: 4 wake-ups at most, not 20
    # An interval of whole steps is kept exactly, the check's own time included: no drift.
    now = 100.25 + 0.004
    assert round(now + on_grid(now, 2.0, 2.0), 6) == 102.25
    # Long intervals: steps of 0.25 s at most; a delay already due is not made negative.
    assert on_grid(10.0, 30.0, 30.0) == 30.0 and on_grid(10.1, 0.0, 2.0) == 0.0


def test_states_of_is_each_endpoints_state_and_follows_states_made_and_dropped() -> None:
    monitor = HealthMonitor(clock=FakeClock())
    a, b = make_endpoint("a", "http://127.0.0.1:1"), make_endpoint("b", "http://127.0.0.1:2")
    first = monitor.state("a")
    got = monitor.states_of(("a", "b"))
    assert got == (first, monitor.state("b"))  # (b's state made on the way)
    assert monitor.states_of(("a", "b")) is got  # kept: one lookup per decision
    monitor.sync([make_service(None, b)])  # a is gone: its state with it
    again = monitor.states_of(("a", "b"))
    assert again[0] is monitor.state("a") and again[0] is not first  # a fresh state, not the dropped one
    monitor.sync([make_service(None, a, b)])
    assert monitor.states_of(("b", "a")) == (monitor.state("b"), monitor.state("a"))
