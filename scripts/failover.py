#!/usr/bin/env python3
"""The failover scenario of the core issue, with figures: 200 calls/s through edged to a service with two
local endpoints (priority 1 and 2); the priority-1 backend is SIGKILLed (or SIGSTOPped) mid-run and
brought back. Prints failed calls, where traffic went, and the latency the fault cost.

usage: scripts/failover.py [--rate 200] [--duration 8] [--fault kill|stop|both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from harness import Backend, Edged, free_port, manifest
from loadgen import LoadGen, summary

HEALTH_AND_POLICY = """
[health_check]
http = "/healthz"
interval = "{interval}"
timeout = "200ms"
rise = 2
fall = 2
[policy]
retries = 2
per_try_timeout = "300ms"
"""


def two_endpoints(p1: int, p2: int, interval: str = "1s") -> str:
    """The scenario's service: priority 1 and 2, HTTP health checks, 300 ms per try."""
    return manifest("thermo", [(p1, 1), (p2, 2)], HEALTH_AND_POLICY.format(interval=interval))


def scenario(fault: str, rate: float, duration: float, root: Path) -> dict:
    """Run one fault; returns the figures."""
    b1 = Backend("p1", free_port(), root).start()
    b2 = Backend("p2", free_port(), root).start()
    d = Edged(root / f"edged-{fault}", {"thermo.toml": two_endpoints(b1.port, b2.port)}).start()
    fault_at, heal_at = duration * 0.25, duration * 0.5
    if fault == "kill":
        actions = {fault_at: b1.kill, heal_at: b1.start}
    else:
        actions = {fault_at: b1.freeze, heal_at: b1.thaw}
    try:
        results = asyncio.run(LoadGen("127.0.0.1", d.port, "/svc/thermo/x").run(rate, duration, actions))
    finally:
        d.stop()
        b1.thaw()
        b1.kill()
        b2.kill()
    ep1 = f"default/thermo/local/{b1.url}"
    after_fault = [r for r in results if r.started > fault_at]
    first_on_p2 = next((r for r in after_fault if r.endpoint != ep1), None)
    during = [r for r in results if fault_at < r.started < heal_at]
    back = next((r for r in results if r.started > heal_at and r.endpoint == ep1), None)
    stats = summary(results)
    stats_fault = summary(during)
    return {
        "fault": "SIGKILL" if fault == "kill" else "SIGSTOP",
        "rate": rate,
        "calls": stats["calls"],
        "failed": stats["failed"],
        "calls_during_fault": len(during),
        "served_by_p1_during_fault": sum(1 for r in during if r.endpoint == ep1),
        "first_call_after_fault_served_by": None if first_on_p2 is None else first_on_p2.endpoint.rsplit(":", 1)[1],
        "calls_after_fault_before_first_p2_answer": after_fault.index(first_on_p2) if first_on_p2 else None,
        "retried_calls": stats["retried"],
        "p50_ms": stats["p50_ms"],
        "p99_ms_during_fault": stats_fault["p99_ms"],
        "max_ms": stats["max_ms"],
        "calls_over_100ms": stats["over_100ms"],
        "back_on_p1_after_heal_s": None if back is None else round(back.started - heal_at, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--fault", choices=["kill", "stop", "both"], default="both")
    args = ap.parse_args()
    faults = ["kill", "stop"] if args.fault == "both" else [args.fault]
    with tempfile.TemporaryDirectory() as tmp:
        for fault in faults:
            print(json.dumps(scenario(fault, args.rate, args.duration, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
