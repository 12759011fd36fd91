#!/usr/bin/env python3
"""The peer ingress over mutual TLS against plain HTTP, in one run (issue 9, item 2).

On 127.0.0.1: one backend (tests/backend.py), a daemon whose ingress speaks mutual TLS and one whose ingress
speaks plain HTTP (`[ingress] insecure = true`), both offering the backend to peers. A client then calls,
one call at a time over one keep-alive connection:
  direct      the backend itself (the peer: what the hop adds is measured against it)
  plain hop   the insecure ingress -> backend (x-edged-fleet/-node headers name the caller)
  mTLS hop    the TLS ingress -> backend (the client presents a certificate of the fleet CA)
and prints per route p50 / p99 and the hop's added p50 / p99, the daemon's CPU per call (its own CPU time
over the calls, from /proc), then the handshake: fresh TLS connections each making one call (wall time and
the daemon's CPU per handshake), and the idle RSS of both daemons (mDNS on, after settling).

usage: scripts/ingress_tls_bench.py [--calls N] [--rounds N] [--handshakes N] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import psutil  # noqa: E402
from fixtures_netns import EdgeNode, NsBackend, fleet_ca, free_port, thermo_manifest, unique_fleet  # noqa: E402

from edged.identity.tls import client_context  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def timed_calls(conn: http.client.HTTPConnection, path: str, headers: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        answer = conn.getresponse()
        answer.read()
        out.append((time.perf_counter() - t0) * 1000)
        assert answer.status == 200, answer.status
    return out


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--handshakes", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edged-tls-bench-"))
    fleet = unique_fleet()
    backend = NsBackend("thermo", free_port(), root).start()
    manifests = {"thermo.toml": thermo_manifest(backend.port)}
    tls_node = EdgeNode(root / "tls", "node-tls", fleet=fleet, manifests=manifests).start()
    plain_node = EdgeNode(root / "plain", "node-plain", fleet=fleet, manifests=manifests, tls=False).start()
    time.sleep(3)  # settle: mDNS announced, first vitals read
    idle = {
        "mTLS": psutil.Process(tls_node.proc.pid).memory_info().rss / 2**20,
        "plain": psutil.Process(plain_node.proc.pid).memory_info().rss / 2**20,
    }
    client_files = fleet_ca(fleet).enroll(root / "client", "bench-client")
    ctx = client_context(client_files)
    routes = {
        "direct": (http.client.HTTPConnection("127.0.0.1", backend.port), "/r", {}),
        "plain hop": (
            http.client.HTTPConnection("127.0.0.1", plain_node.ingress_port),
            "/svc/thermo/r",
            {"x-edged-fleet": fleet, "x-edged-node": "bench-client"},
        ),
        "mTLS hop": (http.client.HTTPSConnection("127.0.0.1", tls_node.ingress_port, context=ctx), "/svc/thermo/r", {}),
    }
    daemon_of = {"plain hop": plain_node, "mTLS hop": tls_node}
    lat: dict[str, list[float]] = {name: [] for name in routes}
    cpu: dict[str, list[float]] = {name: [] for name in daemon_of}
    try:
        for conn, path, headers in routes.values():
            timed_calls(conn, path, headers, 200)  # warm up: connections, pools, caches
        for _ in range(args.rounds):
            for name, (conn, path, headers) in routes.items():
                daemon = daemon_of.get(name)
                before = cpu_seconds(daemon.proc.pid) if daemon else 0.0
                lat[name] += timed_calls(conn, path, headers, args.calls)
                if daemon:
                    cpu[name].append((cpu_seconds(daemon.proc.pid) - before) / args.calls * 1e6)
        # Handshakes: a fresh connection (TLS 1.3, both certificates verified) and one call on it, N times.
        hs_wall, before = [], cpu_seconds(tls_node.proc.pid)
        for _ in range(args.handshakes):
            t0 = time.perf_counter()
            conn = http.client.HTTPSConnection("127.0.0.1", tls_node.ingress_port, context=ctx)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            hs_wall.append((time.perf_counter() - t0) * 1000)
            conn.close()
        hs_cpu = (cpu_seconds(tls_node.proc.pid) - before) / args.handshakes * 1000
        plain_wall = []
        for _ in range(args.handshakes):
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", plain_node.ingress_port)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            plain_wall.append((time.perf_counter() - t0) * 1000)
            conn.close()
        time.sleep(3)
        rss = {
            "mTLS": psutil.Process(tls_node.proc.pid).memory_info().rss / 2**20,
            "plain": psutil.Process(plain_node.proc.pid).memory_info().rss / 2**20,
        }
    finally:
        for conn, _, _ in routes.values():
            conn.close()
        tls_node.kill()
        plain_node.kill()
        backend.kill()
    direct50, direct99 = percentile(lat["direct"], 0.5), percentile(lat["direct"], 0.99)
    result = {
        "calls": args.calls * args.rounds,
        "routes": {
            name: {
                "p50_ms": round(percentile(v, 0.5), 3),
                "p99_ms": round(percentile(v, 0.99), 3),
                "added_p50_ms": round(percentile(v, 0.5) - direct50, 3),
                "added_p99_ms": round(percentile(v, 0.99) - direct99, 3),
                "daemon_cpu_us_per_call": [round(c, 1) for c in cpu.get(name, [])],
            }
            for name, v in lat.items()
        },
        "handshake": {
            "new_tls_connection_and_call_ms_p50": round(statistics.median(hs_wall), 3),
            "new_plain_connection_and_call_ms_p50": round(statistics.median(plain_wall), 3),
            "daemon_cpu_ms_per_tls_connection": round(hs_cpu, 3),
        },
        "idle_rss_mib": {k: round(v, 1) for k, v in idle.items()},
        "rss_after_calls_mib": {k: round(v, 1) for k, v in rss.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'route':<10} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}  daemon CPU us/call (per round)")
    for name, r in result["routes"].items():
        cpu_text = ", ".join(f"{c:g}" for c in r["daemon_cpu_us_per_call"]) or "-"
        print(
            f"{name:<10} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['added_p50_ms']:>8.3f} {r['added_p99_ms']:>8.3f}"
            f"  {cpu_text}"
        )
    mtls, plain = result["routes"]["mTLS hop"], result["routes"]["plain hop"]
    d50, d99 = mtls["p50_ms"] - plain["p50_ms"], mtls["p99_ms"] - plain["p99_ms"]
    print(f"mTLS over plain: {d50:+.3f} ms p50, {d99:+.3f} ms p99")
    h = result["handshake"]
    print(
        f"handshake: new TLS connection + call {h['new_tls_connection_and_call_ms_p50']:.2f} ms p50 (plain "
        f"{h['new_plain_connection_and_call_ms_p50']:.2f} ms); daemon CPU {h['daemon_cpu_ms_per_tls_connection']:.2f}"
        " ms per TLS connection"
    )
    for label, m in (("idle RSS", idle), ("RSS after the calls", rss)):
        print(f"{label}: mTLS {m['mTLS']:.1f} MiB, plain {m['plain']:.1f} MiB ({m['mTLS'] - m['plain']:+.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
