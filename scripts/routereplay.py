#!/usr/bin/env python3
"""Is the routing simulator honest? Replay one of its scenarios on real processes and compare.

The `heterogeneous` boxes (at half speed, so that the load fits a busy shared machine) become real HTTP
servers in one backend process (`--serve`: per port, `servers` calls at once, FIFO, log-normal service
times, `/healthz` at once). The real daemon routes to them as four local endpoints, with the strategy
under test and the simulator's policy (per-try 300 ms, 2 s deadline, 2 retries, 1 s health checks), and
scripts/loadgen.py sends calls at a fixed rate (60 % of the boxes' capacity). The simulator runs the same
setting (same boxes on the local tier, no vitals, evenly spaced arrivals) and both sets of figures are
printed side by side: p50 / p99 / p99.9, failed calls, each box's share of the calls.

usage: scripts/routesim.py --replay      (or scripts/routereplay.py [--duration 30] [--strategy NAME ...])
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import routesim
from harness import Edged, free_port
from loadgen import LoadGen

SLOWER = 2.0  # the boxes run at half the simulator scenario's speed: half the calls per second


def boxes() -> list[routesim.SimNode]:
    """The `heterogeneous` scenario's boxes, on the local tier, at half speed, with no vitals (local endpoints
    carry none)."""
    out = []
    for node in routesim.heterogeneous():
        out.append(dataclasses.replace(node, tier="local", median=node.median * SLOWER, vitals=False))
    return out


# -- the backend process --------------------------------------------------------------------------------------


async def serve(specs: list[tuple[int, int, float, float, int]]) -> None:
    """HTTP/1.1 servers, one per (port, servers, median, sigma, seed); prints "ready" once all listen."""
    servers = []
    for port, count, median, sigma, seed in specs:
        servers.append(await asyncio.start_server(_handler(count, median, sigma, seed), "127.0.0.1", port))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _handler(count: int, median: float, sigma: float, seed: int):
    sem = asyncio.Semaphore(count)
    rng = random.Random(seed)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if not path.startswith(b"/healthz"):
                    async with sem:
                        await asyncio.sleep(rng.lognormvariate(math.log(median), sigma))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return handle


# -- the replay -------------------------------------------------------------------------------------------------


MANIFEST = """
service_name = "replay"
{endpoints}
[health_check]
http = "/healthz"
interval = "1s"
timeout = "300ms"
rise = 2
fall = 2
[policy]
strategy = "{strategy}"
per_try_timeout = "300ms"
timeout = "2s"
retries = 2
"""


def measure(strategy: str, nodes: list[routesim.SimNode], rate: float, duration: float, tmp: Path) -> dict:
    ports = [free_port() for _ in nodes]
    specs = [f"{p}:{n.servers}:{n.median}:{n.sigma}:{i}" for i, (p, n) in enumerate(zip(ports, nodes, strict=True))]
    backend = subprocess.Popen(
        [sys.executable, __file__, "--serve", *specs], stdout=subprocess.PIPE, text=True, cwd=tmp
    )
    d = None
    try:
        assert backend.stdout is not None and backend.stdout.readline().strip() == "ready"
        endpoints = "\n".join(
            f'[[endpoints]]\ntype = "local"\nurl = "http://127.0.0.1:{p}"\npriority = 10' for p in ports
        )
        manifest = MANIFEST.format(endpoints=endpoints, strategy=strategy)
        d = Edged(tmp / strategy, {"replay.toml": manifest})
        d.config.write_text(d.config.read_text().replace("[log]\n", '[log]\nlevel = "warning"\n', 1))  # quiet
        d.start()
        gen = LoadGen("127.0.0.1", d.port, "/svc/replay/x", timeout=5.0)
        results = asyncio.run(gen.run(rate, duration))
    finally:
        if d is not None:
            d.stop()
        backend.kill()
        backend.wait()
    names = {f"http://127.0.0.1:{p}": n.name for p, n in zip(ports, nodes, strict=True)}  # ids end with the URL
    lat = sorted(r.latency for r in results)
    by_node: Counter[str] = Counter()
    for r in results:
        if r.status == 200:
            by_node[next((name for url, name in names.items() if r.endpoint.endswith(url)), "?")] += 1
    return {
        "calls": len(results),
        "p50": _pct(lat, 0.5),
        "p99": _pct(lat, 0.99),
        "p99.9": _pct(lat, 0.999),
        "failed": sum(1 for r in results if r.status != 200),
        "shares": by_node,
    }


def simulate(strategy: str, nodes_fn, rate_share: float, duration: float, seed: int) -> dict:
    scenario = routesim.Scenario(
        "replay", "heterogeneous, half speed, local", nodes_fn, routesim.const(rate_share), duration, {}, "even"
    )
    r = routesim.run(scenario, strategy, seed)
    lat = sorted(o.latency for o in r.outcomes)
    return {
        "calls": len(r.outcomes),
        "p50": _pct(lat, 0.5),
        "p99": _pct(lat, 0.99),
        "p99.9": _pct(lat, 0.999),
        "failed": r.failed,
        "shares": Counter(r.per_node),
    }


def _pct(lat: list[float], p: float) -> float:
    return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0


def main(seed: int = 1, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--strategy", action="append")
    args = ap.parse_args(argv if argv is not None else [])
    nodes = boxes()
    load = 0.6
    rate = load * sum(n.capacity() for n in nodes)
    rows = [("strategy", "run", "calls", "p50 ms", "p99 ms", "p99.9 ms", "failed", *(n.name for n in nodes))]
    with tempfile.TemporaryDirectory(prefix="routereplay-") as tmp:
        for strategy in args.strategy or ["round_robin", "least_loaded"]:
            sim = simulate(strategy, boxes, load, args.duration, seed)
            real = measure(strategy, nodes, rate, args.duration, Path(tmp))
            for label, fig in (("simulated", sim), ("real daemon", real)):
                total = max(1, sum(fig["shares"].values()))
                rows.append(
                    (
                        strategy,
                        label,
                        str(fig["calls"]),
                        f"{fig['p50']:.1f}",
                        f"{fig['p99']:.1f}",
                        f"{fig['p99.9']:.1f}",
                        str(fig["failed"]),
                        *(f"{100 * fig['shares'][n.name] / total:.1f}%" for n in nodes),
                    )
                )
    print(f"heterogeneous boxes at half speed, {rate:.0f} calls/s for {args.duration:g} s, through the real daemon:")
    print(routesim.table(rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        specs = []
        for item in sys.argv[2:]:
            port, count, median, sigma, seed = item.split(":")
            specs.append((int(port), int(count), float(median), float(sigma), int(seed)))
        asyncio.run(serve(specs))
        sys.exit(0)
    sys.exit(main(1, sys.argv[1:]))
