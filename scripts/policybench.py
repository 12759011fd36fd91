#!/usr/bin/env python3
"""What the policy's decision costs per call, and what an endpoint's routing state weighs.

Times `Ranker.plan(..., explain=False)` (the call path's decision) over the real HealthMonitor, for each
strategy and a few service sizes, as CPU time per call (several rounds: the range is printed). The peer
in the same run is the `latency` strategy of another git ref (default `main`), loaded from its source, so
the figure says what this change adds. Memory: tracemalloc over 1,000 endpoints' health + load state
(EndpointHealth, its outlier detector, its PeakEwma and its predictive Model), after each has seen calls.

With `--instructions` (needs valgrind), also instructions per decision, counted by callgrind as the
difference between a process that makes N decisions and one that makes none: a figure a busy machine does
not blur, and the one to compare with a Raspberry Pi (about 1,000-1,500 Python instructions per us there).

With `--same-as REF`, only a check: this tree's plans against those of REF's decision modules (policy,
balancer, locality, spillover) over random services, health, vitals, places and policies, with the same
random draws; it prints how many plans differ (a change meant to cost less must not change a decision).

usage: scripts/policybench.py [--calls 20000] [--rounds 5] [--ref main] [--instructions] [--same-as REF]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edged.health import HealthMonitor  # noqa: E402
from edged.locality import Origin, where_meta  # noqa: E402
from edged.model import Endpoint, EndpointSpec, PolicySpec, Service, ServiceSpec, parse_target  # noqa: E402
from edged.policy import Ranker  # noqa: E402

TARGETS_US = {"least_loaded": 10.0, "predictive": 30.0, "geo": 10.0}
# geo: the caller in Munich; its peers in three zones round the list, at 0, 356 and 504 km (edged/locality.py)
GEO_PLACES = (("munich", (48.1374, 11.5755)), ("vienna", (48.2082, 16.3738)), ("berlin", (52.52, 13.405)))
GEO_ORIGIN = Origin(*GEO_PLACES[0])


def ranker_for(strategy: str, ranker_class=Ranker, seed: int = 1):
    """A ranker; a `geo` one knows where the caller is."""
    if strategy == "geo":
        return ranker_class(random.Random(seed), GEO_ORIGIN)
    return ranker_class(random.Random(seed))


def make_service(n: int, strategy: str, tiers: tuple[str, ...] = ("local",)) -> Service:
    eps = []
    for i in range(n):
        tier = tiers[i % len(tiers)]
        url = f"http://127.0.0.1:{9000 + i}"
        meta = ()
        if strategy == "geo":  # peers in three zones (a local endpoint is always in the caller's locality)
            tier = "edge" if len(tiers) == 1 else tier
            meta = (*where_meta(*GEO_PLACES[i % 3]), ("node", f"n{i}"))
        eps.append(
            Endpoint(f"default/s/{tier}/e{i}", "s", "default", tier, url, 10, 100, "bench", parse_target(url), meta)
        )
    spec = ServiceSpec(
        name="s",
        endpoints=tuple(EndpointSpec(tier=e.tier, url=e.url) for e in eps),
        policy=PolicySpec(strategy=strategy),
    )
    return Service(spec, tuple(eps))


def warm(health: HealthMonitor, svc: Service, rng: random.Random) -> None:
    """Each endpoint has answered calls (so latency-aware strategies have something to weigh)."""
    for ep in svc.endpoints:
        for _ in range(5):
            with health.call_started(ep.id) as flight:
                flight.finish(ep, svc, True, rng.uniform(0.001, 0.02))


def per_call_us(ranker, svc: Service, health: HealthMonitor, calls: int, rounds: int) -> list[float]:
    out = []
    now = time.monotonic()
    plan = ranker.plan
    for _ in range(rounds):
        gc.collect()
        t0 = time.process_time()
        for _ in range(calls):
            plan(svc, health, now, None, explain=False)
        out.append((time.process_time() - t0) / calls * 1e6)
    return out


REF_MODULES = ("spillover", "balancer", "predictive", "locality", "policy")  # the decision's, in import order


def ref_ranker(ref: str):
    """The Ranker class of `ref`'s edged/policy.py, with `ref`'s spillover, balancer, predictive and locality
    modules (the decision's), run against this tree's other modules (health, model). (The endpoints' predictive
    models are this tree's `predictive.Model`s, made by its health monitor.)"""
    import edged

    loaded: dict[str, types.ModuleType] = {}
    saved = {name: sys.modules[f"edged.{name}"] for name in REF_MODULES}
    try:
        for name in REF_MODULES:
            src = subprocess.run(
                ["git", "show", f"{ref}:edged/{name}.py"], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout
            mod = types.ModuleType(f"edged._{name}_ref")
            mod.__package__ = "edged"
            sys.modules[mod.__name__] = mod
            exec(compile(src, f"{ref}:edged/{name}.py", "exec"), mod.__dict__)
            loaded[name] = sys.modules[f"edged.{name}"] = mod  # what the next ones import
            setattr(edged, name, mod)
    finally:
        for name, mod in saved.items():
            sys.modules[f"edged.{name}"] = mod
            setattr(edged, name, mod)
    return loaded["policy"].Ranker


def memory_per_endpoint(n: int = 1000) -> float:
    svc = make_service(n, "predictive")  # (the strategy whose endpoints carry the most state)
    rng = random.Random(1)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    health = HealthMonitor()
    warm(health, svc, rng)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "filename")
    grown = sum(s.size_diff for s in stats if "edged" in s.traceback[0].filename)
    del health
    return grown / n


def one(strategy: str, n: int, tiers: int, calls: int, ref: str, busy: bool = False) -> None:
    """The process callgrind counts: set up, then `calls` decisions (0: set up only). `busy`: a call is in
    flight at each endpoint."""
    ranker_class = ref_ranker(ref) if ref else Ranker
    svc = make_service(n, strategy, ("local", "edge", "cloud")[:tiers])
    health = HealthMonitor()
    warm(health, svc, random.Random(7))
    flights = [health.call_started(ep.id) for ep in svc.endpoints] if busy else []
    ranker = ranker_for(strategy, ranker_class)
    now = time.monotonic()
    ranker.plan(svc, health, now, None, explain=False)  # (set-up: what the first decision makes, such as tables)
    for _ in range(calls):
        ranker.plan(svc, health, now, None, explain=False)
    del flights


def instructions(strategy: str, n: int, tiers: int, calls: int, ref: str = "", busy: bool = False) -> float:
    """Instructions per decision: callgrind's total with `calls` decisions minus the one with none."""
    args = ["busy"] if busy else []
    return callgrind_per_call(lambda k: [__file__, "--one", strategy, str(n), str(tiers), str(k), ref, *args], calls)


def callgrind_per_call(argv_of, calls: int) -> float:
    """Instructions per call of a script run under callgrind: `argv_of(k)` (after the interpreter) makes `k`
    calls; the run with none is taken off, so set-up does not count."""
    totals = []
    for k in (0, calls):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, *argv_of(k)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONHASHSEED="0"),
        )
        m = re.search(r"Collected : (\d+)", out.stderr)
        if out.returncode != 0 or m is None:
            raise RuntimeError(f"callgrind failed: {out.stderr[-500:]}")
        totals.append(int(m.group(1)))
    return (totals[1] - totals[0]) / calls


def random_case(rng: random.Random) -> tuple[Service, HealthMonitor, Origin]:
    """A service of 1-9 endpoints under a random policy, with random health, load, vitals and places."""
    strategy = rng.choice(("least_loaded", "latency", "predictive", "geo", "priority", "round_robin", "weighted"))
    zones = ("munich", "vienna", "berlin", "")
    eps = []
    for i in range(rng.randint(1, 9)):
        tier = rng.choice(("local", "edge", "cloud"))
        url = f"http://127.0.0.1:{9000 + i}"
        meta: list[tuple[str, str]] = []
        if rng.random() < 0.3:
            meta += [("cpu", str(rng.randint(0, 100))), ("power", rng.choice(("battery", "mains", "")))]
            meta += [("bat", str(rng.randint(0, 100))), ("link", rng.choice(("", "40", "100")))]
        if strategy == "geo" and rng.random() < 0.9:
            zone = rng.choice(zones)
            place = dict(GEO_PLACES).get(zone) if rng.random() < 0.8 else None
            meta += where_meta(zone, place)
        priority = rng.choice((10, 10, 20))
        eps.append(
            Endpoint(
                f"default/s/{tier}/e{i}",
                "s",
                "default",
                tier,
                url,
                priority,
                100,
                "bench",
                parse_target(url),
                tuple(meta),
            )
        )
    policy = PolicySpec(
        strategy=strategy,
        levels=rng.choice(("tier", "tier", "priority", "none")),
        overprovisioning=rng.choice((1.4, 1.4, 1.0, 0.8)),
        battery_min=rng.choice((None, None, None, 30)),
        geo_order=rng.choice(("rtt", "rtt", "distance")),
        zone_weights=rng.choice(((), (), (("vienna", 1), ("berlin", 2)), (("berlin", 0),))),
        cloud_max_share=rng.choice((100, 100, 30)),
    )
    spec = ServiceSpec(name="s", endpoints=tuple(EndpointSpec(tier=e.tier, url=e.url) for e in eps), policy=policy)
    health = HealthMonitor()
    now = 1000.0
    for ep in eps:
        st = health.state(ep.id)
        if rng.random() < 0.8:
            for _ in range(rng.randint(1, 6)):
                with health.call_started(ep.id) as flight:
                    flight.finish(ep, Service(spec, tuple(eps)), rng.random() < 0.9, rng.uniform(0.001, 0.05))
            st.peak.stamp = now - rng.uniform(0.0, 30.0)
            st.latency_ewma = rng.choice((st.latency_ewma, 0.004, 0.004))  # (ties between localities)
        st.inflight = rng.choice((0, 0, 0, 1, 3))
        st.busy_since = now - rng.uniform(0.0, 1.0)
        if st.last_response_at:  # answered on this clock: in flight, some stalled, some not (and `live`)
            st.last_response_at = now - rng.uniform(0.0, 1.5) ** 3
        st.active_ok = rng.random() < 0.85
        st.ejected_until = now + 5.0 if rng.random() < 0.05 else 0.0
    origin = GEO_ORIGIN if rng.random() < 0.8 else Origin("vienna", None)
    return Service(spec, tuple(eps)), health, origin


def plain(plan) -> tuple:
    """A plan as plain values (`ref`'s LevelShare is another class than this tree's)."""
    levels = tuple((lv.name, lv.healthy, lv.total, lv.health, lv.share) for lv in plan.levels)
    choices = tuple((c.endpoint.id, c.usable, c.reason, c.level) for c in plan.choices)
    return (plan.strategy, choices, plan.note, levels, plan.panic, plan.drawn, plan.localities)


def same_as(ref: str, cases: int, seed: int) -> int:
    """Plans of this tree's Ranker against `ref`'s, same seeds, over random cases: how many calls differ."""
    Old = ref_ranker(ref)
    rng = random.Random(seed)
    differ = calls = 0
    for case in range(cases):
        svc, health, origin = random_case(rng)
        seed_case = rng.randrange(1 << 30)
        a, b = Old(random.Random(seed_case), origin), Ranker(random.Random(seed_case), origin)
        subset = list(svc.endpoints)
        if rng.random() < 0.3 and len(subset) > 1:
            subset.pop(rng.randrange(len(subset)))
        for k in range(40):
            explain = k % 10 == 9
            eps = (None, subset, list(svc.endpoints))[k % 3]
            pa = a.plan(svc, health, 1000.0 + k * 0.01, eps, explain=explain)
            pb = b.plan(svc, health, 1000.0 + k * 0.01, eps, explain=explain)
            calls += 1
            if plain(pa) != plain(pb):
                differ += 1
                if differ <= 5:
                    print(f"case {case} call {k} ({svc.spec.policy}):\n  {ref}: {pa}\n  here: {pb}", file=sys.stderr)
    print(f"{calls} plans over {cases} random cases: {differ} differ from {ref}'s")
    return differ


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        strategy, n, tiers, calls, ref = sys.argv[2:7]
        one(strategy, int(n), int(tiers), int(calls), ref, sys.argv[7:8] == ["busy"])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ref", default="main", help="git ref whose `latency` strategy is the peer")
    ap.add_argument("--instructions", action="store_true", help="also count instructions per decision (valgrind)")
    ap.add_argument("--same-as", metavar="REF", help="only check that plans are those of REF's Ranker (random cases)")
    ap.add_argument("--cases", type=int, default=2000, help="random cases for --same-as")
    args = ap.parse_args()
    if args.same_as:
        return 1 if same_as(args.same_as, args.cases, 1) else 0
    if args.instructions:
        if shutil.which("valgrind") is None:
            print("--instructions needs valgrind", file=sys.stderr)
            return 2
        rows = [("strategy", "endpoints", "tiers", "instructions/decision")]
        for strategy, n, t, ref, busy in [
            ("priority", 3, 1, "", False),
            ("least_loaded", 3, 1, "", False),
            ("least_loaded", 8, 1, "", False),
            ("least_loaded", 6, 3, "", False),
            ("least_loaded", 8, 1, "", True),
            ("predictive", 3, 1, "", False),
            ("predictive", 8, 1, "", False),
            ("predictive", 6, 3, "", False),
            ("geo", 3, 1, "", False),
            ("geo", 8, 1, "", False),
            ("geo", 6, 3, "", False),
            ("latency", 3, 1, args.ref, False),
            ("latency", 8, 1, args.ref, False),
            ("latency", 8, 1, args.ref, True),
        ]:
            label = (f"{strategy} @{ref}" if ref else strategy) + (" (busy)" if busy else "")
            rows.append((label, str(n), str(t), f"{instructions(strategy, n, t, 2000, ref, busy):,.0f}"))
        table(rows)
        print()
    rng = random.Random(7)
    rows = [("strategy", "endpoints", "tiers", "us/call min", "median", "max", "target")]
    strategies = ("priority", "round_robin", "weighted", "least_loaded", "predictive")
    cases = [(s, n, 1) for n in (3, 8) for s in strategies]
    cases += [("least_loaded", 6, 3), ("predictive", 6, 3)]
    cases += [("geo", 3, 1), ("geo", 8, 1), ("geo", 6, 3)]
    for strategy, n, t in cases:
        svc = make_service(n, strategy, ("local", "edge", "cloud")[:t])
        health = HealthMonitor()
        warm(health, svc, rng)
        got = per_call_us(ranker_for(strategy), svc, health, args.calls, args.rounds)
        target = TARGETS_US.get(strategy)
        rows.append(
            (
                strategy,
                str(n),
                str(t),
                f"{min(got):.2f}",
                f"{statistics.median(got):.2f}",
                f"{max(got):.2f}",
                f"<= {target:g}" if target else "-",
            )
        )
    try:
        Old = ref_ranker(args.ref)
    except (subprocess.CalledProcessError, SyntaxError, ImportError) as exc:
        print(f"(no peer: {args.ref}:edged/policy.py not usable: {exc})", file=sys.stderr)
    else:
        for n in (3, 8):
            svc = make_service(n, "latency")
            health = HealthMonitor()
            warm(health, svc, rng)
            got = per_call_us(Old(random.Random(1)), svc, health, args.calls, args.rounds)
            rows.append(
                (
                    f"latency @{args.ref}",
                    str(n),
                    "1",
                    f"{min(got):.2f}",
                    f"{statistics.median(got):.2f}",
                    f"{max(got):.2f}",
                    "peer",
                )
            )
    table(rows)
    per_ep = memory_per_endpoint()
    print(
        f"\nrouting state per endpoint (health + outlier + peak-EWMA + model, after calls): {per_ep:.0f} bytes"
        " (target <= 2048)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
