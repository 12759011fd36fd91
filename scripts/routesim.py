#!/usr/bin/env python3
"""Routing simulator: edged's real router, policy, health and breakers against simulated endpoints.

Deterministic (seeded) and discrete-event: an asyncio event loop whose clock is virtual (`VirtualLoop`:
when nothing is ready it jumps to the next timer instead of sleeping), so a minute of traffic runs in
seconds and the same seed gives the same table. What runs is edged's own code, imported: the `Router`
(failover, per-try timeouts, deadline, retry budget, circuit breakers), the `Ranker` (every strategy,
priority levels and spillover), the `HealthMonitor` (in-flight counts, peak-EWMA, passive outlier
detection, stall detection; active check results fed through `check_result`) and the `Registry` (vitals
travel as endpoint meta, as the edge tier publishes them). Only the endpoints are simulated (`SimNode`):
`servers` calls at once, FIFO queue, log-normal service times, a link delay per tier, and scripted faults
(slow-down, partition, death, loss bursts, a draining battery).

For every scenario and strategy it prints p50/p99/p99.9 of call latency (failed calls included at the time
they took), failed calls, the share of calls answered by battery and by cloud endpoints, and the regret:
mean latency above that of an oracle that sees every node's true state (queue, speed, faults) and sends
each call where its expected latency is lowest.

`--replay` runs the `heterogeneous` scenario (shortened) against real backends (HTTP servers with the same
service-time model, one process) through the real daemon, at the same rate, and prints the simulator's
figures for the same setting next to the measured ones: the simulator is honest if they agree.

usage: scripts/routesim.py [--scenario NAME ...] [--strategy NAME ...] [--seed 1] [--duration S] [--replay]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import selectors
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from edged import predictive  # noqa: E402
from edged.call import Call  # noqa: E402
from edged.errors import CallError, ConnectFailed, UpstreamTimeout  # noqa: E402
from edged.health import CheckResult, HealthMonitor  # noqa: E402
from edged.locality import Origin, where_meta  # noqa: E402
from edged.model import Endpoint, HealthCheckSpec, PolicySpec, ServiceSpec  # noqa: E402
from edged.policy import Choice, Plan, Ranker  # noqa: E402
from edged.registry import Registry  # noqa: E402
from edged.router import Router  # noqa: E402
from edged.telemetry import MeshMetrics  # noqa: E402

STRATEGIES = ("priority", "round_robin", "weighted", "least_loaded", "predictive", "oracle")
LINK = {"local": 0.0002, "edge": 0.002, "cloud": 0.040}  # one-way-and-back network time per tier (seconds)
VITALS_EVERY = 2.0  # seconds between vitals updates (the edge tier's TXT updates)
DAY = 60.0  # seconds of virtual time in a day (the day-night scenario's; the predictive model's hours follow it)


# -- virtual time ---------------------------------------------------------------------------------------


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _NoIOSelector(selectors.BaseSelector):
    """A selector with no I/O: waiting for `timeout` seconds moves the virtual clock on by that much."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._map: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj, events, data=None):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fd] = key
        return key

    def unregister(self, fileobj):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("simulation stalled: nothing scheduled and nothing ready")
        if timeout > 0:
            self._clock.now += timeout
        return []

    def get_map(self):
        return self._map


class VirtualLoop(asyncio.SelectorEventLoop):
    """asyncio on virtual time: `time()` is the simulation clock, idle waits cost no real time."""

    def __init__(self, clock: VirtualClock) -> None:
        self._vclock = clock
        super().__init__(selector=_NoIOSelector(clock))

    def time(self) -> float:
        return self._vclock.now


# -- simulated endpoints -----------------------------------------------------------------------------------


Schedule = Callable[[float], float]


def const(x: float) -> Schedule:
    return lambda t: x


FULL, ONE, ZERO = const(100.0), const(1.0), const(0.0)


@dataclass
class SimNode:
    """One simulated endpoint (its node): capacity, speed and scripted conditions as functions of time."""

    name: str
    tier: str = "edge"
    servers: int = 4
    median: float = 0.020  # seconds of service time (log-normal median)
    sigma: float = 0.35
    priority: int = 10
    vitals: bool = True  # publishes vitals (an edge box); local endpoints carry none
    power: str = "mains"
    battery: Schedule = FULL  # percent, for power == "battery"
    slow: Schedule = ONE  # service-time multiplier (drift)
    loss: Schedule = ZERO  # share of replies lost (a flaky link): the try times out
    partitioned: Callable[[float], bool] = lambda t: False  # unreachable: tries and checks time out
    dead: Callable[[float], bool] = lambda t: False  # process gone: connections refused at once
    zone: str = ""  # where it is (strategy geo): its zone, location and the WAN time to it (seconds, both ways)
    loc: tuple[float, float] | None = None
    wan: float = 0.0
    # run state
    busy: int = 0
    queued: int = 0
    busy_area: float = 0.0  # integral of busy over time, for the CPU vital (an average, as psutil gives)
    busy_mark: float = 0.0
    cpu: float = 0.0  # average use of its servers over the last vitals interval (0..1)
    rng: random.Random = field(default_factory=random.Random)
    sem: asyncio.Semaphore | None = None

    def mean_service(self, t: float) -> float:
        return self.median * self.slow(t) * math.exp(self.sigma**2 / 2)

    def capacity(self) -> float:
        """Calls per second it can take at its starting speed."""
        return self.servers / self.mean_service(0.0)

    def expected_latency(self, t: float, timeout: float) -> float:
        """What the oracle knows: the true expected answer time of one more call now."""
        if self.dead(t) or self.partitioned(t):
            return math.inf
        ahead = max(0, self.busy + self.queued + 1 - self.servers)
        service = self.mean_service(t)
        lost = self.loss(t)
        return LINK[self.tier] + self.wan + (ahead / self.servers + 1) * service * (1 - lost) + lost * timeout

    def set_busy(self, delta: int, now: float) -> None:
        self.busy_area += self.busy * (now - self.busy_mark)
        self.busy_mark = now
        self.busy += delta

    def sample_cpu(self, now: float, interval: float) -> None:
        self.set_busy(0, now)
        self.cpu = min(1.0, self.busy_area / (self.servers * interval))
        self.busy_area = 0.0

    def meta(self, t: float) -> tuple[tuple[str, str], ...]:
        """Vitals as the edge tier publishes them: CPU busy % (its servers' use), battery, link quality."""
        if not self.vitals:
            return where_meta(self.zone, self.loc)
        out = [("cpu", str(round(100 * self.cpu))), ("power", self.power)]
        if self.power == "battery":
            out.append(("bat", str(round(self.battery(t)))))
        out.append(("link", str(round(100 * (1 - self.loss(t))))))
        return (*out, *where_meta(self.zone, self.loc))


class Answer:
    def __init__(self, status: int) -> None:
        self.status, self.reason, self.headers, self.content_length = status, b"OK", [], 0
        self.complete = True  # the whole (empty) body is here

    async def read(self) -> bytes:
        return b""

    def discard(self) -> None:
        pass


class SimTransport:
    """The router's transport for every tier: a try is a visit to a SimNode."""

    def __init__(self, nodes: dict[str, SimNode], clock: VirtualClock) -> None:
        self._nodes = nodes
        self._clock = clock
        self.working: set[asyncio.Future] = set()  # visits still at a box (some abandoned by their try)

    def unavailable(self, endpoint: Endpoint) -> str | None:
        return None

    async def send(self, ep: Endpoint, call: Call, headers, timeout: float) -> Answer:
        node = self._nodes[ep.id]
        t = self._clock.now
        if node.dead(t):
            await asyncio.sleep(LINK[node.tier])
            raise ConnectFailed(ep.url, "connection refused")
        if node.partitioned(t) or node.rng.random() < node.loss(t):
            await asyncio.sleep(timeout)  # the request or its reply is lost: the try's timeout ends it
            raise UpstreamTimeout(ep.url, f"no answer in {timeout * 1000:.0f} ms")
        # A try that times out is abandoned by the router, not by the box: it stays in the box's queue and
        # takes its turn (the replay on real backends showed the difference under overload).
        visit = asyncio.ensure_future(self._visit(node))
        self.working.add(visit)
        visit.add_done_callback(self.working.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(visit), timeout)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(ep.url, f"no answer in {timeout * 1000:.0f} ms") from None

    async def _visit(self, node: SimNode) -> Answer:
        await asyncio.sleep((LINK[node.tier] + node.wan) / 2)
        assert node.sem is not None
        node.queued += 1
        try:
            await node.sem.acquire()
        finally:
            node.queued -= 1
        node.set_busy(+1, self._clock.now)
        try:
            await asyncio.sleep(node.rng.lognormvariate(math.log(node.median * node.slow(self._clock.now)), node.sigma))
        finally:
            node.set_busy(-1, self._clock.now)
            node.sem.release()
        await asyncio.sleep((LINK[node.tier] + node.wan) / 2)
        return Answer(200)


class OracleRanker:
    """Knows every node's true state: each call goes where its expected latency is lowest (then the rest)."""

    def __init__(self, nodes: dict[str, SimNode], clock: VirtualClock) -> None:
        self._nodes = nodes
        self._clock = clock

    def plan(self, service, health, now, endpoints=None, *, explain=True) -> Plan:
        eps = service.endpoints if endpoints is None else endpoints
        timeout = service.spec.policy.per_try_timeout
        t = self._clock.now
        ranked = sorted(eps, key=lambda ep: self._nodes[ep.id].expected_latency(t, timeout))
        return Plan("oracle", tuple(Choice(ep, True, "oracle") for ep in ranked))


# -- scenarios --------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    what: str
    nodes: Callable[[], list[SimNode]]
    load: Schedule  # share of the nodes' total capacity offered, over time
    duration: float = 60.0
    policy: dict = field(default_factory=dict)  # policy keys for every strategy
    arrivals: str = "poisson"  # or "even" (fixed spacing, as scripts/loadgen.py sends)
    strategies: tuple[str, ...] = STRATEGIES  # those it is run with by default
    origin: Origin | None = None  # where the caller is (strategy geo; None: nowhere in particular)


def _burst(period: float, length: float, level: float, start: float = 5.0) -> Schedule:
    return lambda t: level if t >= start and (t - start) % period < length else 0.0


def _ramp(t0: float, t1: float, a: float, b: float) -> Schedule:
    return lambda t: a if t <= t0 else b if t >= t1 else a + (b - a) * (t - t0) / (t1 - t0)


def _and_two(first: Callable[[], SimNode], c_median: float = 0.020) -> Callable[[], list[SimNode]]:
    """A scenario's boxes: the one it is about, and two steady ones on mains (b: 20 ms, c: `c_median`)."""
    return lambda: [first(), SimNode("b", median=0.020), SimNode("c", median=c_median)]


def heterogeneous() -> list[SimNode]:
    return [
        SimNode("fast", servers=4, median=0.010),
        SimNode("medium", servers=4, median=0.020),
        SimNode("slow", servers=2, median=0.040),
        SimNode("old-pi", servers=2, median=0.080),
    ]


def scenarios() -> dict[str, Scenario]:
    day = DAY
    items = [
        Scenario("heterogeneous", "four boxes of different speed, 60 % load", heterogeneous, const(0.6)),
        Scenario(
            "ramp",
            "load from 20 % to 130 % of capacity (breakers: 16 tries per endpoint)",
            lambda: [SimNode("a", median=0.015), SimNode("b", median=0.020), SimNode("c", median=0.030)],
            _ramp(5.0, 55.0, 0.2, 1.3),
            policy={"endpoint_max_inflight": 16},
        ),
        Scenario(
            "drift",
            "one of three boxes slows down 1x -> 6x between 10 s and 50 s",
            _and_two(lambda: SimNode("drifting", median=0.015, slow=_ramp(10.0, 50.0, 1.0, 6.0))),
            const(0.5),
        ),
        Scenario(
            "battery",
            "the fastest box runs on a battery draining 100 % -> 5 %",
            _and_two(
                lambda: SimNode("solar", median=0.012, power="battery", battery=_ramp(0.0, 60.0, 100.0, 5.0)), 0.025
            ),
            const(0.5),
        ),
        Scenario(
            "flaky-wifi",
            "the fastest box loses 40 % of replies in 2 s bursts every 8 s",
            _and_two(lambda: SimNode("wifi", median=0.010, loss=_burst(8.0, 2.0, 0.4))),
            const(0.5),
        ),
        Scenario(
            "partition",
            "one of three boxes is cut off from 20 s to 40 s, then heals",
            _and_two(lambda: SimNode("cut", median=0.012, partitioned=lambda t: 20.0 <= t < 40.0)),
            const(0.4),
        ),
        Scenario(
            "day-night",
            "load swings 10 % -> 90 % -> 10 % (a day in 60 s) over mixed boxes",
            heterogeneous,
            lambda t: 0.5 - 0.4 * math.cos(2 * math.pi * t / day),
        ),
        Scenario(
            "cloud-cost",
            "a local box, two edge boxes and a cloud tier (slow WAN, pay per call) in one level, 70 % load",
            lambda: [
                SimNode("local", tier="local", servers=2, median=0.010),
                SimNode("edge-1", servers=4, median=0.020),
                SimNode("edge-2", servers=4, median=0.020),
                SimNode("cloud", tier="cloud", servers=64, median=0.030),
            ],
            const(0.7 * 0.5),  # of all capacity, the cloud's included: about 70 % of local + edge
            policy={"levels": "none"},
        ),
        Scenario(
            "spillover",
            "priority 1 loses its four boxes one by one (10, 20, 30, 40 s); priority 2 stands by; load: 80 % of a box",
            lambda: [
                *(
                    SimNode(f"p1-{i}", median=0.015, priority=1, dead=lambda t, i=i: t >= 10.0 * (i + 1))
                    for i in range(4)
                ),
                *(SimNode(f"p2-{i}", median=0.020, priority=2) for i in range(4)),
            ],
            const(0.1),
        ),
        GEO,
    ]
    return {s.name: s for s in items}


# -- zone and geo (edged/locality.py) -----------------------------------------------------------------------

GEO_HERE = Origin("munich", (48.1374, 11.5755))
GEO_STRATEGIES = ("geo", "least_loaded", "round_robin", "oracle")


def geo_nodes() -> list[SimNode]:
    """The caller's zone (Munich) loses its four boxes one by one (10, 20, 30, 40 s); four equal boxes stand by
    in Vienna, 356 km and 8 ms of WAN round trip away."""
    return [
        *(
            SimNode(f"munich-{i}", zone="munich", loc=GEO_HERE.location, dead=lambda t, i=i: t >= 10.0 * (i + 1))
            for i in range(4)
        ),
        *(SimNode(f"vienna-{i}", median=0.020, zone="vienna", loc=(48.2082, 16.3738), wan=0.008) for i in range(4)),
    ]


GEO = Scenario(
    "geo",
    "two zones: the caller's loses its 4 boxes one by one (10..40 s), the farther one (+8 ms) stands by",
    geo_nodes,
    const(0.1),  # 80 % of one box
    strategies=GEO_STRATEGIES,
    origin=GEO_HERE,
)


def zone_windows(results: list[RunResult]) -> str:
    """For the geo scenario: the share of calls answered in the caller's zone, per 10 s, and over the run
    (Envoy's formula, as for levels: 100 % with 4 or 3 of 4 healthy, 70 % with 2, 35 % with 1, 0 % with none)."""
    rows = [("strategy", *(f"{10 * k}-{10 * k + 10}s" for k in range(6)), "in zone", "p99 ms", "failed")]
    for r in results:
        if r.scenario != "geo":
            continue
        cells = []
        for k in range(6):
            window = [o for o in r.outcomes if o.ok and 10 * k <= o.started < 10 * k + 10]
            near = sum(1 for o in window if o.node.startswith("munich"))
            cells.append(f"{100 * near / len(window):.0f}%" if window else "-")
        answered = [o for o in r.outcomes if o.ok]
        near = sum(1 for o in answered if o.node.startswith("munich"))
        share = f"{100 * near / len(answered):.0f}%" if answered else "-"
        rows.append((r.strategy, *cells, share, f"{r.pct(0.99) * 1000:.1f}", str(r.failed)))
    return table(rows) if len(rows) > 1 else ""


# -- one run ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    latency: float
    ok: bool
    node: str  # answered by ("" when failed)
    started: float = 0.0
    tries: int = 0


@dataclass
class RunResult:
    scenario: str
    strategy: str
    outcomes: list[Outcome]
    battery_share: float
    cloud_share: float
    per_node: dict[str, int]

    def pct(self, p: float) -> float:
        lat = sorted(o.latency for o in self.outcomes)
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.ok)

    @property
    def mean(self) -> float:
        return sum(o.latency for o in self.outcomes) / max(1, len(self.outcomes))


def run(scenario: Scenario, strategy: str, seed: int = 1) -> RunResult:
    """Run one scenario with one strategy; deterministic for a seed."""
    clock = VirtualClock()
    loop = VirtualLoop(clock)
    day_clock = predictive.day_clock
    predictive.day_clock = lambda: (clock.now % DAY) * 86400.0 / DAY  # the model's time of day: virtual days
    try:
        return loop.run_until_complete(_run(scenario, strategy, seed, clock))
    finally:
        predictive.day_clock = day_clock
        loop.close()


async def _run(scenario: Scenario, strategy: str, seed: int, clock: VirtualClock) -> RunResult:
    nodes = scenario.nodes()
    by_id: dict[str, SimNode] = {}
    for i, node in enumerate(nodes):
        node.rng = random.Random(seed * 1000 + i)
        node.sem = asyncio.Semaphore(node.servers)
    policy_keys = {"per_try_timeout": 0.3, "timeout": 2.0, "retries": 2, **scenario.policy}
    # The oracle ranks every call itself: its service's policy must not be one whose plan the router caches
    # (`router.CACHEABLE_STRATEGIES`), or the first plan would stand for the whole run.
    sim_strategy = "least_loaded" if strategy == "oracle" else strategy
    policy = PolicySpec(strategy=sim_strategy, **policy_keys)
    check = HealthCheckSpec(kind="http", http_path="/healthz", interval=1.0, timeout=0.3, rise=2, fall=2)
    spec = ServiceSpec(name="sim", endpoint_types=("local", "edge", "cloud"), health_check=check, policy=policy)

    def endpoints(t: float) -> list[Endpoint]:
        out = []
        for node in nodes:
            out.append(
                Endpoint(
                    id=f"default/sim/{node.tier}/{node.name}",
                    service="sim",
                    tenant="default",
                    tier=node.tier,
                    url=f"sim://{node.name}",
                    priority=node.priority,
                    weight=100,
                    source="sim",
                    target=None,  # no HTTP target: the monitor runs no check task; the simulator feeds checks
                    meta=node.meta(t),
                )
            )
        return out

    for ep, node in zip(endpoints(0.0), nodes, strict=True):
        by_id[ep.id] = node
    registry = Registry()
    registry.set_manifests([spec])
    registry.set_endpoints("sim", endpoints(0.0))
    health = HealthMonitor(clock=clock, lag=lambda: 0.0)
    health.sync(registry.snapshot().services.values())
    transport = SimTransport(by_id, clock)
    ranker = OracleRanker(by_id, clock) if strategy == "oracle" else Ranker(random.Random(seed), scenario.origin)
    router = Router(registry, health, dict.fromkeys(LINK, transport), MeshMetrics(), ranker=ranker, clock=clock)
    capacity = sum(n.capacity() for n in nodes)
    outcomes: list[Outcome] = []
    answered: dict[str, int] = {n.name: 0 for n in nodes}
    arrivals = random.Random(seed)
    end = scenario.duration

    async def one(i: int) -> None:
        t0 = clock.now
        call = Call("default", "sim", "GET", "/x", [], b"", t0 + policy.timeout, f"r{i}")
        try:
            routed = await router.route_service_call(call)
        except CallError:
            outcomes.append(Outcome(clock.now - t0, False, ""))
            return
        node = by_id[routed.endpoint.id]
        ok = routed.answer.status < 500
        outcomes.append(Outcome(clock.now - t0, ok, node.name if ok else "", t0, routed.tries))
        if ok:
            answered[node.name] += 1

    async def checks() -> None:
        check_rng = random.Random(seed + 7)
        while True:
            t = clock.now
            for ep_id, node in by_id.items():
                reachable = not (node.dead(t) or node.partitioned(t)) and check_rng.random() >= node.loss(t)
                health.check_result(ep_id, CheckResult(reachable, "ok" if reachable else "timeout", 0.001))
            await asyncio.sleep(check.interval)

    async def vitals() -> None:
        while True:
            await asyncio.sleep(VITALS_EVERY)
            for node in nodes:
                node.sample_cpu(clock.now, VITALS_EVERY)
            registry.set_endpoints("sim", endpoints(clock.now))

    background = [asyncio.ensure_future(checks()), asyncio.ensure_future(vitals())]
    calls: set[asyncio.Task] = set()
    i = 0
    while clock.now < end:
        rate = max(1e-3, scenario.load(clock.now) * capacity)
        gap = arrivals.expovariate(rate) if scenario.arrivals == "poisson" else 1.0 / rate
        await asyncio.sleep(gap)
        task = asyncio.ensure_future(one(i))
        calls.add(task)
        task.add_done_callback(calls.discard)
        i += 1
    if calls:
        await asyncio.gather(*calls)
    for task in [*background, *transport.working]:  # the boxes' leftover work is not measured
        task.cancel()
    await asyncio.gather(*background, *transport.working, return_exceptions=True)
    await health.close()
    total = max(1, sum(answered.values()))
    battery = sum(v for k, v in answered.items() if _node(nodes, k).power == "battery")
    cloud = sum(v for k, v in answered.items() if _node(nodes, k).tier == "cloud")
    return RunResult(scenario.name, strategy, outcomes, battery / total, cloud / total, answered)


def _node(nodes: list[SimNode], name: str) -> SimNode:
    return next(n for n in nodes if n.name == name)


# -- report -------------------------------------------------------------------------------------------------


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def report(results: list[RunResult]) -> str:
    rows = [
        ("scenario", "strategy", "calls", "p50 ms", "p99 ms", "p99.9 ms", "failed", "battery", "cloud", "regret ms")
    ]
    oracle = {r.scenario: r for r in results if r.strategy == "oracle"}
    for r in results:
        o = oracle.get(r.scenario)
        regret = f"{(r.mean - o.mean) * 1000:+.1f}" if o is not None else "-"
        rows.append(
            (
                r.scenario,
                r.strategy,
                str(len(r.outcomes)),
                f"{r.pct(0.5) * 1000:.1f}",
                f"{r.pct(0.99) * 1000:.1f}",
                f"{r.pct(0.999) * 1000:.1f}",
                str(r.failed),
                f"{100 * r.battery_share:.1f}%",
                f"{100 * r.cloud_share:.1f}%",
                regret,
            )
        )
    return table(rows)


def spill_windows(results: list[RunResult]) -> str:
    """For the spillover scenario: the share of calls answered by priority 2, per 10 s (Envoy's formula says
    0 % with 4 or 3 of 4 healthy, 30 % with 2, 65 % with 1, 100 % with none)."""
    rows = [("strategy", *(f"{10 * k}-{10 * k + 10}s" for k in range(6)))]
    for r in results:
        if r.scenario != "spillover":
            continue
        cells = []
        for k in range(6):
            window = [o for o in r.outcomes if o.ok and 10 * k <= o.started < 10 * k + 10]
            p2 = sum(1 for o in window if o.node.startswith("p2"))
            cells.append(f"{100 * p2 / len(window):.0f}%" if window else "-")
        rows.append((r.strategy, *cells))
    return table(rows) if len(rows) > 1 else ""


def targets(results: list[RunResult]) -> list[tuple[str, bool, str]]:
    """The issue's targets that these results can check: (what, met, figures)."""
    got = {(r.scenario, r.strategy): r for r in results}
    out = []
    ll, rr = got.get(("heterogeneous", "least_loaded")), got.get(("heterogeneous", "round_robin"))
    if ll and rr:
        ratio = ll.pct(0.99) / rr.pct(0.99)
        out.append(("least_loaded p99 <= 0.5 x round_robin (heterogeneous)", ratio <= 0.5, f"{ratio:.2f}x"))
    for scenario in ("drift", "flaky-wifi"):
        pr, ll, orc = (got.get((scenario, s)) for s in ("predictive", "least_loaded", "oracle"))
        if pr and ll:
            ratio = pr.pct(0.99) / ll.pct(0.99)
            out.append((f"predictive p99 <= 0.95 x least_loaded ({scenario})", ratio <= 0.95, f"{ratio:.2f}x"))
        if pr and orc:
            ratio = pr.pct(0.99) / orc.pct(0.99)
            out.append((f"predictive p99 <= 1.10 x oracle ({scenario})", ratio <= 1.10, f"{ratio:.2f}x"))
    for (scenario, strategy), r in sorted(got.items()):
        if scenario in ("spillover", "geo") and strategy != "oracle":
            out.append((f"{scenario}, {strategy}: 0 failed calls", r.failed == 0, f"{r.failed} failed"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", help="run only these (default: all)")
    ap.add_argument("--strategy", action="append", help=f"run only these (default: {', '.join(STRATEGIES)}; geo: geo)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, help="end every scenario after this many seconds")
    ap.add_argument("--replay", action="store_true", help="replay `heterogeneous` through the real daemon")
    args = ap.parse_args()
    if args.replay:
        import routereplay

        return routereplay.main(args.seed, ["--duration", str(args.duration or 30.0)])
    all_scenarios = scenarios()
    names = args.scenario or list(all_scenarios)
    results = []
    for name in names:
        scenario = all_scenarios[name]
        if args.duration:
            scenario.duration = min(scenario.duration, args.duration)
        print(f"# {name}: {scenario.what}", file=sys.stderr)
        for strategy in args.strategy or scenario.strategies:
            t0 = time.process_time()
            results.append(run(scenario, strategy, args.seed))
            print(f"  {strategy}: {time.process_time() - t0:.1f} s CPU", file=sys.stderr)
    print(report(results))
    spill = spill_windows(results)
    if spill:
        print("\nspillover: share of calls answered by priority 2, per 10 s")
        print(spill)
    zones = zone_windows(results)
    if zones:
        print("\ngeo: share of calls answered in the caller's zone, per 10 s")
        print(zones)
    checks = targets(results)
    if checks:
        print()
        for what, met, figures in checks:
            print(f"{'met ' if met else 'MISS'}  {what}: {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
