"""Router decisions with an injected transport (the real HTTP transport is covered end to end)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random

import pytest
from helpers import FakeHealth, endpoint, service

from edged.call import Call
from edged.errors import CallError, ConnectFailed, UpstreamReset, UpstreamTimeout
from edged.model import PolicySpec
from edged.policy import Ranker
from edged.registry import Registry
from edged.router import Router
from edged.telemetry import MeshMetrics


class Answer:
    def __init__(self, status: int) -> None:
        self.status, self.reason, self.headers, self.content_length = status, b"", [], 0
        self.complete = True
        self.discarded = False

    async def read(self) -> bytes:
        return b""

    def discard(self) -> None:
        self.discarded = True


class ScriptedTransport:
    """Each endpoint name maps to what its tries do: an int status, or an exception class."""

    def __init__(self, script: dict[str, object]) -> None:
        self.script = script
        self.sent: list[tuple[str, float]] = []
        self.answers: list[Answer] = []

    def unavailable(self, endpoint):
        return None

    async def send(self, ep, call, headers, timeout):
        name = ep.id.rsplit("/", 1)[1]
        self.sent.append((name, timeout))
        what = self.script[name]
        if isinstance(what, type):
            raise what(ep.url, "scripted")
        answer = Answer(what)
        self.answers.append(answer)
        return answer


def make(script, *, policy=None, method="GET", clock=None):
    eps = [endpoint(name, i + 1, priority=i) for i, name in enumerate(script)]
    spec = dataclasses.replace(service(*eps, policy=policy).spec, endpoints=())
    registry = Registry()
    registry.set_manifests([spec])
    registry.set_endpoints("test", eps)
    transport = ScriptedTransport(script)
    metrics = MeshMetrics()
    health = FakeHealth()
    kwargs = {"clock": clock} if clock else {}
    router = Router(registry, health, {"local": transport}, metrics, **kwargs)
    call = Call("default", "s", method, "/x", [], b"", (clock or __import__("time").monotonic)() + 10, "rid")
    return router, transport, metrics, health, call


def route(router, call):
    return asyncio.run(router.route_service_call(call))


def test_fails_over_on_connect_reset_and_timeout():
    for failure in (ConnectFailed, UpstreamReset, UpstreamTimeout):
        router, transport, metrics, health, call = make({"a": failure, "b": 200})
        routed = route(router, call)
        assert routed.endpoint.id.endswith("/b") and routed.tries == 2
        assert [n for n, _ in transport.sent] == ["a", "b"]
        assert health.results == [("default/s/local/a", False), ("default/s/local/b", True)]
        assert metrics.value("edged_failovers_total", {"service": "s"}) == 1


def test_retryable_status_moves_on_and_the_last_answer_is_returned_when_all_fail():
    router, transport, *_, call = make({"a": 503, "b": 502})
    routed = route(router, call)
    assert routed.answer.status == 502 and routed.tries == 2
    assert transport.answers[0].discarded  # the 503 we did not use was released


def test_non_idempotent_is_retried_only_when_it_never_arrived():
    router, transport, *_, call = make({"a": UpstreamReset, "b": 200}, method="POST")
    with pytest.raises(CallError) as err:
        route(router, call)
    assert err.value.status == 503 and [n for n, _ in transport.sent] == ["a"]
    router, transport, *_, call = make({"a": ConnectFailed, "b": 200}, method="POST")
    assert route(router, call).endpoint.id.endswith("/b")
    router, transport, *_, call = make(
        {"a": UpstreamReset, "b": 200}, method="POST", policy=PolicySpec(retry_non_idempotent=True)
    )
    assert route(router, call).endpoint.id.endswith("/b")


def test_retries_limit_the_tries():
    router, _transport, _, _, call = make(
        {"a": ConnectFailed, "b": ConnectFailed, "c": 200}, policy=PolicySpec(retries=1)
    )
    with pytest.raises(CallError) as err:
        route(router, call)
    assert err.value.code == "no_endpoint" and len(err.value.detail["tries"]) == 2


def test_per_try_timeout_is_bounded_by_the_deadline():
    now = [100.0]
    router, transport, _, _, call = make({"a": 200}, policy=PolicySpec(per_try_timeout=5.0), clock=lambda: now[0])
    call.deadline = now[0] + 0.25
    route(router, call)
    assert transport.sent[0][1] == pytest.approx(0.25)
    call.deadline = now[0] - 1
    with pytest.raises(CallError) as err:
        route(router, call)
    assert (err.value.status, err.value.code) == (504, "deadline")


def test_retry_budget_stops_retry_storms():
    now = [0.0]
    router, _transport, metrics, _, call = make({"a": UpstreamReset, "b": 200}, clock=lambda: now[0])
    call.deadline = 1e9
    outcomes = []
    for _ in range(300):
        try:
            outcomes.append(route(router, call).tries)
        except CallError:
            outcomes.append(0)
    # 20 % of 300 calls + a floor of 10/s over the 10 s window = about 160 retries; the rest fail fast.
    retried = outcomes.count(2)
    assert 155 <= retried <= 165, retried
    assert outcomes.count(0) == 300 - retried
    assert metrics.value("edged_retry_budget_exhausted_total", {"service": "s"}) == 300 - retried


def test_connect_failures_fail_over_without_spending_the_retry_budget():
    # A dead primary under load: every call's first try is refused (the request never left). All of them
    # are answered by the second endpoint, and the budget is still whole for retries that do add load.
    now = [0.0]
    router, transport, metrics, health, call = make({"a": ConnectFailed, "b": 200}, clock=lambda: now[0])
    call.deadline = 1e9
    outcomes = [route(router, call).tries for _ in range(300)]
    assert outcomes == [2] * 300
    assert not metrics.value("edged_retry_budget_exhausted_total", {"service": "s"})
    assert health.reached[:2] == [False, True]  # the health monitor is told the first try never arrived
    transport.script["a"] = UpstreamReset  # retries that may have reached the endpoint still draw on it
    for _ in range(300):
        with contextlib.suppress(CallError):
            route(router, call)
    assert metrics.value("edged_retry_budget_exhausted_total", {"service": "s"}) > 0


def test_a_try_tells_the_endpoint_the_whole_ms_left_and_at_least_one():
    seen = []

    class Recording(ScriptedTransport):
        async def send(self, ep, call, headers, timeout):
            seen.append(dict(headers)[b"x-edged-timeout-ms"])
            return await super().send(ep, call, headers, timeout)

    router, _, _, _, call = make({"a": 200}, clock=lambda: 100.0)
    router._transports["local"] = Recording({"a": 200})
    for left in (10.0, 2.0019, 0.0004):
        call.deadline = 100.0 + left
        route(router, call)
    assert seen == [b"10000", b"2001", b"1"]


def test_interface_rejects_undeclared_methods_before_routing():
    from edged.model import InterfaceSpec, MethodRule

    router, transport, _, _, call = make({"a": 200})
    registry = router._registry
    spec = registry.snapshot().get("default", "s").spec
    registry.set_manifests([dataclasses.replace(spec, interface=InterfaceSpec(methods=(MethodRule.parse("GET /ok"),)))])
    with pytest.raises(CallError) as err:
        route(router, call)
    assert err.value.code == "unknown_method" and transport.sent == []
    call.path = "/ok?q=1"
    assert route(router, call).answer.status == 200


def test_a_call_can_be_limited_to_some_tiers():
    router, transport, _, _, call = make({"a": 200})
    call.tiers = frozenset({"edge"})
    with pytest.raises(CallError) as err:
        route(router, call)
    assert err.value.code == "no_endpoint" and transport.sent == []
    call.tiers = frozenset({"local"})
    assert route(router, call).answer.status == 200


class HangingTransport(ScriptedTransport):
    """Endpoints scripted "hang" never answer: the try waits until it is cancelled."""

    hanging: asyncio.Event

    async def send(self, ep, call, headers, timeout):
        if self.script[ep.id.rsplit("/", 1)[1]] == "hang":
            self.sent.append((ep.id.rsplit("/", 1)[1], timeout))
            self.hanging.set()
            await asyncio.Event().wait()
        return await super().send(ep, call, headers, timeout)


@pytest.mark.parametrize("script", [{"a": "hang"}, {"a": 503, "b": "hang"}], ids=["first-try", "holding-a-503"])
def test_a_cancelled_call_gives_back_every_in_flight_place_and_held_answer(script):
    from edged.health import HealthMonitor

    router, _, _, _, call = make(script)
    health = HealthMonitor()
    transport = HangingTransport(script)
    router = Router(router._registry, health, {"local": transport}, MeshMetrics())

    async def scenario():
        transport.hanging = asyncio.Event()
        task = asyncio.create_task(router.route_service_call(call))
        await transport.hanging.wait()
        assert health.state(f"default/s/local/{transport.sent[-1][0]}").inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert [health.state(f"default/s/local/{name}").inflight for name in script] == [0] * len(script)
    assert all(answer.discarded for answer in transport.answers)  # the held 503's connection went back too
    # A cancelled try says nothing about the endpoint: no failure was counted against it.
    assert [health.state(f"default/s/local/{name}").calls_failed for name in script][-1] == 0


def test_every_way_a_try_ends_gives_its_in_flight_place_back_once():
    from edged.health import HealthMonitor

    script = {"a": ConnectFailed, "b": UpstreamReset, "c": 503, "d": 200}
    router, transport, _, _, call = make(script, policy=PolicySpec(retries=4))
    health = HealthMonitor()
    router = Router(router._registry, health, {"local": transport}, MeshMetrics())
    assert route(router, call).endpoint.id.endswith("/d")
    states = [health.state(f"default/s/local/{name}") for name in script]
    assert [st.inflight for st in states] == [0, 0, 0, 0]
    assert [(st.calls_ok, st.calls_failed) for st in states] == [(0, 1), (0, 1), (0, 1), (1, 0)]
    # A transport that fails in a way no try expects: the error reaches the caller, the place is back, and
    # nothing is counted against the endpoint.
    router._transports["local"] = ScriptedTransport({"a": RuntimeError, "b": 200, "c": 200, "d": 200})
    with pytest.raises(RuntimeError):
        route(router, call)
    assert [st.inflight for st in states] == [0, 0, 0, 0] and states[0].calls_failed == 1


class TimedTransport(ScriptedTransport):
    """Endpoints scripted (seconds, what) answer `what` after that long, or time out at the try's timeout."""

    async def send(self, ep, call, headers, timeout):
        name = ep.id.rsplit("/", 1)[1]
        what = self.script[name]
        if isinstance(what, tuple):
            delay, what = what
            if delay > timeout:
                await asyncio.sleep(timeout)
                self.sent.append((name, timeout))
                raise UpstreamTimeout(ep.url, f"no answer head within {timeout}s")
            await asyncio.sleep(delay)
            self.sent.append((name, timeout))
            answer = Answer(what)
            self.answers.append(answer)
            return answer
        return await super().send(ep, call, headers, timeout)


def make_timed(script, *, down=(), stalled=(), method="GET", per_try=0.05):
    router, _, metrics, health, call = make(script, policy=PolicySpec(per_try_timeout=per_try), method=method)
    transport = TimedTransport(script)
    router = Router(router._registry, health, {"local": transport}, metrics)
    for name in down:
        health.state(f"default/s/local/{name}").up = False
    health.stalled_ids.update(f"default/s/local/{name}" for name in stalled)
    return router, transport, health, call


def test_the_last_usable_endpoint_is_not_given_up_for_a_down_one():
    # A slow box: the only healthy peer answers after three per-try timeouts; the down one refuses. The
    # per-try timeout brings the down one in, and the slow answer, still awaited, is the caller's.
    router, transport, health, call = make_timed({"a": (0.15, 200), "b": ConnectFailed}, down=["b"])
    routed = route(router, call)
    assert routed.endpoint.id.endswith("/a") and routed.answer.status == 200 and routed.tries == 2
    assert [name for name, _ in transport.sent] == ["b", "a"]  # b refused while a was still on its way
    assert transport.sent[1][1] > 5  # a's try had the call's deadline, not the per-try timeout
    assert health.results == [("default/s/local/b", False), ("default/s/local/a", True)]
    # The same when the slow one already looks stalled (calls in flight, no answer lately): nothing better is left.
    router, transport, health, call = make_timed({"a": (0.15, 200), "b": ConnectFailed}, down=["b"], stalled=["a"])
    assert route(router, call).endpoint.id.endswith("/a")


def test_a_hung_last_usable_endpoint_loses_the_race_to_a_down_one_that_answers():
    # The usable endpoint hangs (a partition); the one marked down answers: its answer wins after the per-try
    # timeout, and the hung try, cancelled, counts as a failure against its endpoint.
    router, transport, health, call = make_timed({"a": (60, 200), "b": 200}, down=["b"])

    async def scenario():
        routed = await router.route_service_call(call)
        # The hung try is cancelled as the call returns (Race.abandon), not left to run: its place is back
        # once its cancellation reached it, a turn of the loop later (not only when asyncio.run ends).
        await asyncio.sleep(0)
        return routed, health.released, list(health.results)

    routed, released, results = asyncio.run(scenario())
    assert routed.endpoint.id.endswith("/b") and routed.tries == 2
    assert [name for name, _ in transport.sent] == ["b"]  # a's try never ended by itself
    assert ("default/s/local/a", False) in results and ("default/s/local/b", True) in results
    assert released == 2


def test_the_only_endpoint_has_until_the_deadline_and_a_slow_post_is_never_sent_twice():
    router, transport, _, call = make_timed({"a": (0.15, 200)})
    assert route(router, call).answer.status == 200 and len(transport.sent) == 1
    router, transport, _, call = make_timed({"a": (0.15, 201), "b": 200}, down=["b"], method="POST")
    routed = route(router, call)
    assert routed.answer.status == 201 and [name for name, _ in transport.sent] == ["a"]


def test_with_usable_endpoints_left_a_slow_try_is_cut_short_as_before():
    router, transport, health, call = make_timed({"a": (0.15, 200), "b": 200})
    routed = route(router, call)
    assert routed.endpoint.id.endswith("/b") and transport.sent[0] == ("a", 0.05)
    assert health.results[0] == ("default/s/local/a", False)


def test_a_reused_plan_follows_every_input_the_ranking_reads():
    """`priority` plans are reused between calls, and made again as soon as what the ranking read changes:
    an endpoint's availability or stall state, the endpoints a transport can send to, the service itself."""
    router, transport, _, health, call = make({"a": 200, "b": 200, "c": 200})
    svc = router.service("default", "s")

    def order(service=svc):
        plan, _ = router.plan(service, explain=False)
        return [c.endpoint.id.rsplit("/", 1)[1] for c in plan.choices], plan

    first, plan = order()
    assert first == ["a", "b", "c"] and order()[1] is plan  # the same plan, not ranked again
    health.state("default/s/local/a").up = False  # unavailable: last resort
    assert order()[0] == ["b", "c", "a"]
    health.state("default/s/local/a").up = True
    assert order()[0] == ["a", "b", "c"]
    health.stalled_ids.add("default/s/local/b")  # stalled (calls in flight, no answer lately): after the usable ones
    health.state("default/s/local/b").inflight = 1
    assert order()[0] == ["a", "c", "b"]
    health.stalled_ids.clear()
    health.state("default/s/local/b").inflight = 0
    transport.unavailable = lambda ep: "scripted: off" if ep.id.endswith("/a") else None
    assert order()[0] == ["b", "c"]
    transport.unavailable = lambda ep: None
    changed = dataclasses.replace(svc, endpoints=svc.endpoints[1:])  # a new snapshot's service
    assert order(changed)[0] == ["b", "c"] and order()[0] == ["a", "b", "c"]
    # The routed call goes where the plan says.
    assert route(router, call).endpoint.id.endswith("/a")


def test_a_reused_plan_follows_the_transports_and_keeps_their_reasons():
    """What a transport says of an endpoint is asked afresh each call, a reused plan or not: a tier whose
    transport comes later, and the reason a skipped endpoint is given, are those of now."""
    eps = [endpoint("a", 1, priority=0), endpoint("e", 2, priority=1, tier="edge")]
    spec = dataclasses.replace(service(*eps).spec, endpoints=())
    registry = Registry()
    registry.set_manifests([spec])
    registry.set_endpoints("test", eps)
    transports: dict = {"local": ScriptedTransport({})}
    router = Router(registry, FakeHealth(), transports, MeshMetrics())
    svc = router.service("default", "s")

    def plan():
        plan, skipped = router.plan(svc, explain=False)
        return [c.endpoint.id.rsplit("/", 1)[1] for c in plan.choices], [s["reason"] for s in skipped]

    assert plan() == plan() == (["a"], ["no transport for this tier"])
    transports["edge"] = edge = ScriptedTransport({})  # the edge tier attached: its endpoint is in the plan
    assert plan() == (["a", "e"], [])
    edge.unavailable = lambda ep: "no live node serves it"
    assert plan() == (["a"], ["no live node serves it"])
    edge.unavailable = lambda ep: "broker disconnected"  # left out still, for another reason
    assert plan() == (["a"], ["broker disconnected"])
    local_only = router.plan(svc, frozenset({"local"}), explain=False)  # a call limited to some tiers
    assert [c.endpoint.id for c in local_only[0].choices] == ["default/s/local/a"] and local_only[1] == []
    edge.unavailable = lambda ep: None
    assert plan() == (["a", "e"], [])
    evaluations = router._metrics.policy_evaluations.cell(("priority",))[0]
    assert evaluations == 7  # every plan counts, reused or not


@pytest.mark.parametrize("tiers", [None, frozenset({"local"})], ids=["any-tier", "some-tiers"])
def test_calls_follow_what_their_kept_plan_read(tiers):
    """A call's kept plan (held by its lane, or by tiers) is checked as `plan`'s is: a call after a change goes
    where a fresh ranking sends it, and each counts as an evaluation."""
    router, transport, metrics, health, call = make({"a": 200, "b": 200})
    call.tiers = tiers

    def where():
        return route(router, call).endpoint.id.rsplit("/", 1)[1]

    assert [where(), where()] == ["a", "a"]
    health.state("default/s/local/a").up = False
    assert where() == "b"
    health.state("default/s/local/a").up = True
    assert where() == "a"
    transport.unavailable = lambda ep: "scripted: off" if ep.id.endswith("/a") else None
    assert where() == "b"
    transport.unavailable = lambda ep: None
    health.stalled_ids.add("default/s/local/a")
    health.state("default/s/local/a").inflight = 1
    assert where() == "b"
    assert metrics.policy_evaluations.cell(("priority",))[0] == 6


def test_a_priority_plan_that_spills_over_by_a_draw_is_not_reused():
    """Two endpoints at priority 0, one of them down: level 0 is 70 % healthy (overprovisioning 1.4), so 30 % of
    calls start at priority 1. A reused plan would send them all to one level; each call draws afresh."""
    eps = [endpoint("a", 1, priority=0), endpoint("a2", 2, priority=0), endpoint("b", 3, priority=1)]
    spec = dataclasses.replace(service(*eps).spec, endpoints=())
    registry = Registry()
    registry.set_manifests([spec])
    registry.set_endpoints("test", eps)
    health = FakeHealth()
    router = Router(registry, health, {"local": ScriptedTransport({})}, MeshMetrics(), Ranker(random.Random(7)))
    health.state("default/s/local/a2").up = False
    svc = router.service("default", "s")
    firsts = [router.plan(svc, explain=False)[0].choices[0].endpoint.id.rsplit("/", 1)[1] for _ in range(1000)]
    assert 600 < firsts.count("a") < 800 and firsts.count("a") + firsts.count("b") == 1000
    health.state("default/s/local/a2").up = True  # whole again: no draw, and the plan is reused
    plan = router.plan(svc, explain=False)[0]
    assert router.plan(svc, explain=False)[0] is plan and not plan.drawn


def test_strategies_that_read_more_are_ranked_every_call():
    router, _, _, _, _ = make({"a": 200, "b": 200}, policy=PolicySpec(strategy="round_robin", levels="none"))
    svc = router.service("default", "s")
    firsts = [router.plan(svc, explain=False)[0].choices[0].endpoint.id for _ in range(4)]
    assert firsts[0] != firsts[1] and firsts[0] == firsts[2]  # each call takes the next turn
