#!/usr/bin/env python3
"""CPU cost per call of the call path's access checks (issue 12), before and after, in one process.

Before: the bearer/loopback tenant lookup and the interface's regex. After: `Access.identify`, the Host
allowlist, path normalization, and the segment matcher. Both run on the same parsed request, with and without
an interface to check; several rounds, CPU time (process_time) per call, best and median.

usage: scripts/bench_checks.py [--calls 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hmac
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.access import CALL, Access, AccessConfig
from edged.browser import SAFE_METHODS, HostGuard
from edged.config import TenantConfig
from edged.http.message import Request
from edged.model import MethodRule
from edged.paths import normalize_path

METHODS = ["GET /readings", "POST /setpoint", "GET /zones/{id}", "GET /static/*"]


def old_rule(text: str) -> re.Pattern[str]:
    """The regex the interface compiled a method into before the segment matchers."""
    pattern = text.split()[1]
    rx = ""
    for piece in re.split(r"(\{[^/{}]+\}|\*)", pattern):
        rx += ".*" if piece == "*" else "[^/]+" if piece.startswith("{") and piece.endswith("}") else re.escape(piece)
    return re.compile(rx + "/?")


def request(path: str) -> Request:
    headers = [(b"host", b"127.0.0.1:7700"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
    return Request("GET", path, path, "", "1.1", headers, b"", "127.0.0.1", True)


def before(req: Request, rules: list[tuple[str, re.Pattern[str]]], tokens: list[tuple[bytes, str]]) -> bool:
    authorization = req.header(b"authorization")
    if authorization:
        token = authorization.partition(b" ")[2].strip()
        for known, _ in tokens:
            hmac.compare_digest(known, token)
    elif not req.peer.startswith(("127.", "::1", "unix")):
        return False
    path = "/" + req.path[5:].partition("/")[2]
    return not rules or any(verb in (req.method, "*") and rx.fullmatch(path) for verb, rx in rules)


def after(req: Request, rules: list[MethodRule], access: Access, hosts: HostGuard) -> bool:
    hosts.check_host(req.header(b"host"))
    caller = access.identify(req)
    if CALL not in caller.rights:
        return False
    if req.method not in SAFE_METHODS:
        hosts.check_same_origin(req)
    path = normalize_path("/" + req.path[5:].partition("/")[2])
    return not rules or any(rule.matches(req.method, path) for rule in rules)


def per_call_us(fn, calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    access = Access(AccessConfig(), {"default": TenantConfig("default", open_on_loopback=True)})
    hosts = HostGuard(["127.0.0.1"])
    old_rules = [(m.split()[0], old_rule(m)) for m in METHODS]
    new_rules = [MethodRule.parse(m) for m in METHODS]
    req = request("/svc/thermo/zones/7")
    cases = {
        "before, no interface": lambda: before(req, [], []),
        "after, no interface": lambda: after(req, [], access, hosts),
        "before, 4-method interface": lambda: before(req, old_rules, []),
        "after, 4-method interface": lambda: after(req, new_rules, access, hosts),
    }
    assert all(fn() for fn in cases.values())
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            results[name].append(per_call_us(fn, args.calls))
    out = {
        name: {"best_us": round(min(v), 3), "median_us": round(statistics.median(v), 3)} for name, v in results.items()
    }
    for kind in ("no interface", "4-method interface"):
        added = [a - b for a, b in zip(results[f"after, {kind}"], results[f"before, {kind}"], strict=True)]
        out[f"added by the new checks, {kind}"] = {"median_us": round(statistics.median(added), 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
