"""Circuit breakers on the real Router: per-endpoint and per-service limits, the bounded wait, fail-fast 503."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from helpers import endpoint, service
from test_router import Answer, make, route

from edged.call import Call
from edged.errors import CallError
from edged.health import HealthMonitor
from edged.model import PolicySpec
from edged.registry import Registry
from edged.router import Router
from edged.telemetry import MeshMetrics


def test_a_full_endpoint_is_passed_over_without_spending_a_try():
    router, transport, _metrics, health, call = make({"a": 200, "b": 200}, policy=PolicySpec(endpoint_max_inflight=2))
    health.state("default/s/local/a").inflight = 2
    routed = route(router, call)
    assert routed.endpoint.id.endswith("/b") and routed.tries == 1
    assert [n for n, _ in transport.sent] == ["b"]


def test_every_endpoint_full_fails_fast_with_503_overloaded():
    router, transport, metrics, health, call = make({"a": 200, "b": 200}, policy=PolicySpec(endpoint_max_inflight=1))
    for name in "ab":
        health.state(f"default/s/local/{name}").inflight = 1
    with pytest.raises(CallError) as err:
        route(router, call)
    assert (err.value.status, err.value.code) == (503, "overloaded")
    assert err.value.detail["endpoints"] == ["default/s/local/a", "default/s/local/b"]
    assert transport.sent == []
    assert metrics.value("edged_breaker_overflows_total", {"service": "s", "limit": "endpoint_max_inflight"}) == 1


class HeldTransport:
    """Every try waits until the test lets it answer 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sent = 0

    def unavailable(self, endpoint):
        return None

    async def send(self, ep, call, headers, timeout):
        self.sent += 1
        await self.release.wait()
        return Answer(200)


def gated(policy: PolicySpec):
    ep = endpoint("a", 1)
    spec = dataclasses.replace(service(ep, policy=policy).spec, endpoints=())
    registry = Registry()
    registry.set_manifests([spec])
    registry.set_endpoints("test", [ep])
    transport = HeldTransport()
    metrics = MeshMetrics()
    health = HealthMonitor()
    router = Router(registry, health, {"local": transport}, metrics)

    def call(timeout: float = 10.0) -> Call:
        return Call("default", "s", "GET", "/x", [], b"", time.monotonic() + timeout, "rid")

    return router, transport, metrics, health, call


def test_the_service_limit_fails_fast_without_a_queue_and_gives_places_back():
    async def scenario():
        router, transport, metrics, health, call = gated(PolicySpec(max_inflight=2))
        first = [asyncio.create_task(router.route_service_call(call())) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(CallError) as err:
            await router.route_service_call(call())
        assert (err.value.status, err.value.code, err.value.detail["limit"]) == (503, "overloaded", "max_inflight")
        transport.release.set()
        assert [r.answer.status for r in await asyncio.gather(*first)] == [200, 200]
        assert (await router.route_service_call(call())).answer.status == 200  # the places came back
        assert metrics.value("edged_breaker_overflows_total", {"service": "s", "limit": "max_inflight"}) == 1
        assert health.state("default/s/local/a").inflight == 0

    asyncio.run(scenario())


def test_max_pending_calls_wait_in_order_the_next_one_and_late_ones_get_503():
    async def scenario():
        router, transport, _metrics, _health, call = gated(PolicySpec(max_inflight=1, max_pending=1))
        running = asyncio.create_task(router.route_service_call(call()))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(router.route_service_call(call()))
        await asyncio.sleep(0.01)
        with pytest.raises(CallError) as err:  # the queue holds one
            await router.route_service_call(call())
        assert err.value.detail["limit"] == "max_inflight" and err.value.detail["waiting"] == 1
        assert transport.sent == 1  # the waiting call has not gone out
        transport.release.set()
        assert (await running).answer.status == 200 and (await waiting).answer.status == 200
        assert transport.sent == 2

    asyncio.run(scenario())


def test_a_wait_ends_at_the_deadline_and_a_cancelled_wait_leaves_no_place_behind():
    async def scenario():
        router, transport, _metrics, _health, call = gated(PolicySpec(max_inflight=1, max_pending=4))
        running = asyncio.create_task(router.route_service_call(call()))
        await asyncio.sleep(0.01)
        with pytest.raises(CallError) as err:
            await router.route_service_call(call(timeout=0.05))
        assert (err.value.code, err.value.detail["limit"]) == ("overloaded", "max_pending")
        gone = asyncio.create_task(router.route_service_call(call()))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client left while it waited
        await asyncio.gather(gone, return_exceptions=True)
        transport.release.set()
        await running
        gate = router._breakers.gate(("default", "s"))
        assert (gate.inflight, gate.waiting) == (0, 0)

    asyncio.run(scenario())
