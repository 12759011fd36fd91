#!/usr/bin/env python3
"""What routes (edged/routes.py) cost per call: the router's hook with 0, 5 and 20 match rules.

Times `RoutePicker.pick` (match the call's method, path and headers against the rules in order, draw a
subset of the split, take the derived service) as CPU time per call, over several rounds (the range is
printed), for a call that matches no rule (every rule is tried: the worst case) and one that matches the
first. The peer in the same run is what a service without routes pays: the hook's one attribute test.
Also `pick` + `Ranker.plan` against `Ranker.plan` alone (least_loaded, 8 endpoints in two labelled subsets).

With `--instructions` (needs valgrind), instructions per call counted by callgrind, as the difference between
a process that makes N picks and one that makes none (policybench.py's method).

usage: scripts/routebench.py [--calls 20000] [--rounds 5] [--instructions]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from policybench import callgrind_per_call, make_service, table, warm  # noqa: E402

from edged.call import Call  # noqa: E402
from edged.health import HealthMonitor  # noqa: E402
from edged.manifest import parse_policy  # noqa: E402
from edged.model import Service  # noqa: E402
from edged.policy import Ranker  # noqa: E402
from edged.routes import RoutePicker  # noqa: E402

HEADERS = [
    (b"host", b"localhost"),
    (b"user-agent", b"curl/8.5.0"),
    (b"accept", b"*/*"),
    (b"content-type", b"application/json"),
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]


def routed_service(rules: int, n: int = 8, levels: str = "tier") -> Service:
    """`n` endpoints, half version 1 and half version 2, a 90/10 split, and `rules` rules (each a path prefix
    and a header condition; rule 0 matches path /r0)."""
    plain = make_service(n, "least_loaded")
    eps = tuple(
        dataclasses.replace(ep, labels=(("version", "1" if i % 2 else "2"),)) for i, ep in enumerate(plain.endpoints)
    )
    table_ = {
        "strategy": "least_loaded",
        "levels": levels,
        "subsets": {"v1": {"version": "1"}, "v2": {"version": "2"}},
        "splits": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
        "routes": [
            {
                "match": {"path_prefix": f"/r{i}", "headers": [{"name": f"x-rule-{i}", "present": i != 0}]},
                "subset": "v2",
            }
            for i in range(rules)
        ],
    }
    if not rules:
        del table_["routes"]
    policy = parse_policy(table_, "bench")
    return Service(dataclasses.replace(plain.spec, policy=policy), eps)


def per_call_us(fn, calls: int, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        gc.collect()
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        out.append((time.process_time() - t0) / calls * 1e6)
    return out


def cases(health: HealthMonitor):
    """(label, rules, the function one call runs)."""
    plain = make_service(8, "least_loaded")
    warm(health, plain, random.Random(7))
    ranker = Ranker(random.Random(1))
    now = time.monotonic()
    miss = Call("default", "s", "GET", "/api/readings?x=1", HEADERS, b"", now + 10, "rid")
    yield "no routes: the hook's test", 0, lambda: plain.spec.policy.routing is not None
    yield "no routes: plan alone (peer)", 0, lambda: ranker.plan(plain, health, now, None, explain=False)
    for rules in (0, 5, 20):
        svc = routed_service(rules)
        warm(health, svc, random.Random(7))
        picker = RoutePicker(random.Random(1))
        what = f"{rules} rules + split" if rules else "split alone"
        yield f"{what}, no rule matches: pick", rules, (lambda s=svc, p=picker: p.pick(s, miss, health, now))
        if rules:
            hit = Call("default", "s", "GET", "/r0/x", HEADERS, b"", now + 10, "rid")
            first = f"{what}, the first rule matches: pick"
            yield first, rules, (lambda s=svc, p=picker, c=hit: p.pick(s, c, health, now))
        yield (
            f"{what}, no rule matches: pick + plan",
            rules,
            (lambda s=svc, p=picker: ranker.plan(p.pick(s, miss, health, now), health, now, None, explain=False)),
        )
    flat = routed_service(0, levels="none")  # one level: no fallback level after the drawn subset
    warm(health, flat, random.Random(7))
    picker = RoutePicker(random.Random(1))
    yield (
        "split alone, levels = none (no fallback): pick + plan",
        0,
        (lambda: ranker.plan(picker.pick(flat, miss, health, now), health, now, None, explain=False)),
    )


def one(label: str, calls: int) -> None:
    """The process callgrind counts: set up, then `calls` calls of one case (0: set up only)."""
    health = HealthMonitor()
    for name, _, fn in cases(health):
        if name == label:
            for _ in range(calls):
                fn()
            return
    raise SystemExit(f"no case {label!r}")


def instructions(label: str, calls: int) -> float:
    return callgrind_per_call(lambda k: [__file__, "--one", label, str(k)], calls)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--instructions", action="store_true", help="also count instructions per call (valgrind)")
    args = ap.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        print("--instructions needs valgrind", file=sys.stderr)
        return 2
    head = ("case", "us/call min", "median", "max")
    rows = [(*head, "instructions/call") if args.instructions else head]
    for label, _, fn in cases(HealthMonitor()):
        got = per_call_us(fn, args.calls, args.rounds)
        row = (label, f"{min(got):.2f}", f"{statistics.median(got):.2f}", f"{max(got):.2f}")
        if args.instructions:
            row = (*row, f"{instructions(label, 2000):,.0f}")
        rows.append(row)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds of {args.calls} calls")
    table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
