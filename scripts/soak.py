#!/usr/bin/env python3
"""Soak: the real daemon under steady load for N minutes; RSS, descriptors, tasks and loop lag sampled.

Starts two backends (scripts/bench_backend.py) behind one service and the daemon as a subprocess, sends
`--rate` calls/s (open loop, keep-alive) through `/svc/soak/` for `--minutes`, and every `--every` seconds
prints one row: calls and failures in the interval, the daemon's RSS and open descriptors (psutil), its
asyncio task count (`edged_tasks`) and the p99 of its loop lag over the interval (`edged_loop_lag_seconds`,
a histogram: the p99 is the upper bound of its bucket). The end compares the first rows (after `--warmup`)
with the last: the targets are RSS growth < 5 %, loop-lag p99 < 10 ms, no failed call, flat descriptors.

usage: scripts/soak.py [--minutes 30] [--rate 500] [--every 30] [--warmup 60] [--connections 256] [--json FILE]
Under `nice -n -10` (root) the figures are the daemon's own on a machine busy with other work.
Exit status: 0 when every target held, 1 when one did not (the summary says which).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Edged, free_port, manifest, wait_for
from loadgen import LoadGen, summary

RSS_GROWTH_MAX = 0.05
LAG_P99_MAX = 0.010


def scrape(edged: Edged) -> dict[str, object]:
    """`edged_tasks` and the cumulative loop-lag buckets (bound -> count) from the daemon's /metrics."""
    # Over the Unix socket: a listener of its own, so a TCP load at [limits] connections cannot crowd it out.
    for _ in range(20):
        status, _, body = edged.admin.request("GET", "/metrics")
        if status == 200:
            break
        time.sleep(0.5)
    else:
        raise SystemExit(f"/metrics answered {status}: {body[:200]!r}")
    tasks = 0.0
    buckets: dict[float, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("edged_tasks "):
            tasks = float(line.split()[1])
        elif line.startswith("edged_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return {"tasks": tasks, "lag": buckets}


def p99(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the bucket holding the 99th percentile of the samples between two scrapes."""
    bounds = sorted(after)
    total = after[bounds[-1]] - before.get(bounds[-1], 0.0)
    if total <= 0:
        return 0.0
    for bound in bounds:
        if after[bound] - before.get(bound, 0.0) >= 0.99 * total:
            return bound
    return bounds[-1]


def start_backend(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "bench_backend.py"), str(port)],
        cwd=tmp,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, port


def sample(proc: psutil.Process, edged: Edged, last_lag: dict[float, float], load: dict) -> dict:
    scraped = scrape(edged)
    lag = scraped["lag"]
    row = {
        "t_s": 0.0,
        "calls": load["calls"],
        "failed": load["failed"],
        "p99_ms": load["p99_ms"],
        "rss_mib": round(proc.memory_info().rss / 2**20, 2),
        "fds": proc.num_fds(),
        "tasks": int(scraped["tasks"]),  # type: ignore[arg-type]
        "lag_p99_ms": round(p99(last_lag, lag) * 1000, 1),  # type: ignore[arg-type]
    }
    last_lag.clear()
    last_lag.update(lag)  # type: ignore[arg-type]
    return row


async def soak(args: argparse.Namespace, edged: Edged) -> list[dict]:
    proc = psutil.Process(edged.proc.pid)  # type: ignore[union-attr]
    rows: list[dict] = []
    last_lag: dict[float, float] = dict(scrape(edged)["lag"])  # type: ignore[arg-type]
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    widths = (7, 7, 6, 7, 8, 5, 6, 10)
    names = ("t_s", "calls", "failed", "p99_ms", "rss_mib", "fds", "tasks", "lag_p99_ms")
    print(" ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True)))
    while end - time.monotonic() > args.every / 2:  # no short last interval: its figures would mean little
        chunk = min(args.every, end - time.monotonic())
        gen = LoadGen("127.0.0.1", edged.port, "/svc/soak/x", max_connections=args.connections)
        load = summary(await gen.run(args.rate, chunk))
        row = sample(proc, edged, last_lag, load)
        row["t_s"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(" ".join(f"{row[k]:>{w}}" for k, w in zip(row, widths, strict=True)), flush=True)
    return rows


def verdict(rows: list[dict], warmup: float) -> tuple[dict, list[str]]:
    """Start (first row after the warm-up) against end (last row), and the targets missed."""
    steady = [r for r in rows if r["t_s"] > warmup] or rows
    first, last = steady[0], steady[-1]
    lags = sorted(r["lag_p99_ms"] for r in steady)
    out = {
        "calls": sum(r["calls"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "rss_start_mib": first["rss_mib"],
        "rss_end_mib": last["rss_mib"],
        "rss_growth_pct": round((last["rss_mib"] / first["rss_mib"] - 1) * 100, 2),
        "fds_start": first["fds"],
        "fds_end": last["fds"],
        "tasks_start": first["tasks"],
        "tasks_end": last["tasks"],
        "lag_p99_ms_start": first["lag_p99_ms"],
        "lag_p99_ms_end": last["lag_p99_ms"],
        "lag_p99_ms_median_interval": lags[len(lags) // 2],
        "lag_p99_ms_worst_interval": lags[-1],
    }
    missed = []
    if out["rss_growth_pct"] >= RSS_GROWTH_MAX * 100:
        missed.append(f"RSS grew {out['rss_growth_pct']} % (target < {RSS_GROWTH_MAX * 100:g} %)")
    if out["lag_p99_ms_end"] >= LAG_P99_MAX * 1000:
        missed.append(f"loop-lag p99 {out['lag_p99_ms_end']} ms at the end (target < {LAG_P99_MAX * 1000:g} ms)")
    if out["failed"]:
        missed.append(f"{out['failed']} failed calls")
    if out["fds_end"] > out["fds_start"] + 16:
        missed.append(f"descriptors grew from {out['fds_start']} to {out['fds_end']}")
    return out, missed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=500.0, help="calls per second")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the start figures are taken")
    ap.add_argument(
        "--connections", type=int, default=256, help="most connections the load opens (0: one per waiting call)"
    )
    ap.add_argument("--json", help="write the rows and the summary to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edged-soak-") as tmpdir:
        tmp = Path(tmpdir)
        backends = [start_backend(tmp) for _ in range(2)]
        text = manifest("soak", [(backends[0][1], 1), (backends[1][1], 1)], '[policy]\nstrategy = "round_robin"\n')
        edged = Edged(tmp / "edged", {"soak.toml": text})
        try:
            edged.start()
            wait_for(lambda: edged.call("soak", "/")[0] == 200, 10, what="the soak service to answer")
            rows = asyncio.run(soak(args, edged))
        finally:
            if edged.proc is not None:
                edged.stop()
            for proc, _ in backends:
                proc.kill()
                proc.wait()
    out, missed = verdict(rows, args.warmup)
    print(json.dumps(out, indent=1))
    print("targets met" if not missed else "targets MISSED: " + "; ".join(missed))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "summary": out}, indent=1))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
