#!/usr/bin/env python3
"""The idle daemon's footprint, as installed: RSS, CPU and context switches per second, and what its RSS is.

Two configurations, each from this tree and (with `--baseline REF`) from that git ref, in one run: the local
tier alone (one local endpoint, 100 calls, then quiet) and everything on (scripts/bench.py's full daemon: mDNS
on loopback, MQTT to a Mosquitto it starts, a fleet key, 20 services with HTTP health checks). Each tree is
byte-compiled first, as `pip install` leaves an installed edged: a tree run from source without .pyc files
(PYTHONDONTWRITEBYTECODE) compiles every module at each start and keeps about 1 MiB more.

`--modules` adds what the full daemon's RSS is made of: the modules it imported (read from `-X importtime`),
imported again in that order in a fresh interpreter, with the RSS and the Python allocations (tracemalloc)
each adds; with `--baseline`, also those the baseline imported and this tree no longer does.

usage: scripts/footprint.py [--rounds 2] [--baseline REF] [--modules] [--top 30] [--json]
Needs mosquitto for the full daemon (else only the local tier). Ends every process it started.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import (
    FULL_SETTLE,
    IDLE_WINDOW,
    SERVICE,
    Route,
    baseline_tree,
    footprint,
    idle_footprint,
    start_edged,
    start_full_edged,
    start_mosquitto,
    start_python_backend,
    stop_edged,
    wait_ready,
)
from harness import REPO, imported_modules

# Run in a fresh interpreter: defer what the daemon defers, import the names on stdin in order; print each
# one's growth in KiB: of RSS (argv[1] == "rss"), or of Python allocations (tracemalloc, which itself adds to
# RSS: a separate run).
MEASURE = r"""
import importlib, json, sys, tracemalloc
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4
def traced():
    return tracemalloc.get_traced_memory()[0] // 1024
size = rss if sys.argv[1] == "rss" else traced
if size is traced:
    tracemalloc.start()
out = {}
before = size()
try:  # what `edged run` defers before it imports the rest (ssl, OpenSSL's hashing...), deferred here too;
    from edged.lazy import defer_for_daemon  # what that imports (the C module _ssl) is edged.lazy's row
except ImportError:  # a tree from before it: bz2 and lzma only
    from edged.lazy import defer_import
    def defer_for_daemon():
        defer_import("bz2")
        defer_import("lzma")
defer_for_daemon()
out["edged.lazy"] = size() - before
for name in sys.stdin.read().split():
    before = size()
    try:
        importlib.import_module(name)
    except Exception:  # a module only for other platforms (nt, msvcrt) or an optional one that is absent
        continue
    out[name] = out.get(name, 0) + size() - before
print(json.dumps(out))
"""


def compile_tree(source: Path) -> None:
    """Byte-compile the tree's edged package, as an install does (quietly; a tree already compiled is kept)."""
    compileall.compile_dir(str(source / "edged"), quiet=1)


def local_figures(tmp: Path, backend_port: int, trees: dict[str, Path], stack: ExitStack) -> dict[str, dict]:
    routes = []
    for name, source in trees.items():
        d = start_edged(tmp, backend_port, stack, source, f"{name.replace('@', '-')}-local")
        assert d.proc is not None
        routes.append(Route(name, d.port, f"/svc/{SERVICE}/x", d.proc.pid, lambda d=d: d.ready() and None))
    return idle_footprint(routes)


def full_daemon_imports(tmp: Path, backend_port: int, source: Path, name: str) -> list[str]:
    """The modules the full daemon of `source` imported by the end of its settling time, in import order."""
    started = start_mosquitto(tmp)
    if started is None:
        return []
    broker, mqtt_port = started
    os.environ["PYTHONPROFILEIMPORTTIME"] = "1"  # inherited by the daemon (harness.Edged passes os.environ)
    try:
        d = start_full_edged(tmp, backend_port, mqtt_port, source, f"{name.replace('@', '-')}-modules")
        try:
            time.sleep(FULL_SETTLE)
            log = d.log_text()
        finally:
            stop_edged(d)
    finally:
        del os.environ["PYTHONPROFILEIMPORTTIME"]
        broker.stop()
    return imported_modules(log)


def module_costs(source: Path, names: list[str]) -> list[tuple[str, int, int]]:
    """(module, RSS KiB, Python KiB) of each module in `names`, imported in that order in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=str(source))
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    sizes = {}
    for kind in ("rss", "py"):
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, kind], input=" ".join(names), env=env, cwd=source,
            capture_output=True, text=True, timeout=300, check=True,
        )
        sizes[kind] = json.loads(out.stdout)
    return [(name, rss, sizes["py"].get(name, 0)) for name, rss in sizes["rss"].items()]


def group(name: str) -> str:
    """edged's modules one by one; any other package as one row."""
    parts = name.split(".")
    return name if parts[0] == "edged" else parts[0].lstrip("_") or name


def by_group(costs: list[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for name, rss, py in costs:
        r, p = out.get(group(name), (0, 0))
        out[group(name)] = (r + rss, p + py)
    return out


FIGURES = (("rss_mib", "RSS MiB"), ("cpu_ms_per_s", "CPU ms/s"), ("ctx_switches_per_s", "ctx switches/s"))


def span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="each figure is measured this many times (default 2)")
    ap.add_argument("--baseline", help="a git ref measured beside this tree (e.g. main)")
    ap.add_argument("--modules", action="store_true", help="also the full daemon's RSS by module")
    ap.add_argument("--top", type=int, default=30, help="rows of the module table (default 30)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()
    result: dict = {"load_average": None, "rounds": [], "modules": {}}
    with tempfile.TemporaryDirectory(prefix="edged-footprint-") as t, ExitStack() as stack:
        tmp = Path(t)
        trees = {"edged": REPO}
        if args.baseline:
            trees[f"edged@{args.baseline}"] = baseline_tree(args.baseline, tmp)
        for source in trees.values():
            compile_tree(source)
        backend, backend_port, _ = start_python_backend(tmp)
        stack.callback(backend.stop)
        wait_ready(backend, backend_port)
        for i in range(args.rounds):
            notes: list[str] = []
            (tmp / f"r{i}").mkdir()
            print(f"round {i + 1}: local tier, then the full daemon ({IDLE_WINDOW:g} s counted each)", file=sys.stderr)
            with ExitStack() as local_stack:
                local = local_figures(tmp / f"r{i}", backend_port, trees, local_stack)
            full = footprint(tmp / f"r{i}", backend_port, {n: (src, None) for n, src in trees.items()}, notes)
            result["rounds"].append({"local": local, "full": full, "notes": notes})
        if args.modules:
            names = {name: full_daemon_imports(tmp, backend_port, source, name) for name, source in trees.items()}
            for name, source in trees.items():
                result["modules"][name] = module_costs(source, names[name])
        result["load_average"] = os.getloadavg()
    print_report(result, list(trees), args.top)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


def print_report(result: dict, trees: list[str], top: int) -> None:
    rounds = result["rounds"]
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    print(f"\nidle footprint, {len(rounds)} rounds (load average {load})")
    print(f"| {'figure':40} | " + " | ".join(f"{t:>16}" for t in trees) + " |")
    print(f"|{'-' * 42}|" + "|".join("-" * 18 for _ in trees) + "|")
    for kind, label in (("local", "local tier"), ("full", "full daemon")):
        for key, unit in FIGURES:
            cells = []
            for t in trees:
                values = [r[kind][t][key] for r in rounds if t in r.get(kind, {})]
                cells.append(span(values) if values else "-")
            print(f"| {label + ', ' + unit:40} | " + " | ".join(f"{c:>16}" for c in cells) + " |")
    for r in rounds:
        for note in r["notes"]:
            print(f"note: {note}")
    modules = result["modules"]
    if not modules:
        return
    this = trees[0]
    groups = by_group(modules[this])
    total = sum(r for r, _ in groups.values())
    print(f"\n{this}, full daemon: RSS by module, imported in a fresh interpreter", end=" ")
    print(f"({total / 1024:.1f} MiB over the bare interpreter)")
    print("| module | RSS KiB | Python KiB |\n|---|---|---|")
    for name, (rss, py) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {name} | {rss} | {py} |")
    if len(trees) > 1:
        base = trees[1]
        now = {n for n, _, _ in modules[this]}
        gone = [(n, r, p) for n, r, p in modules[base] if n not in now]
        gone_groups = by_group(gone)
        rss_gone = sum(r for r, _ in gone_groups.values())
        print(f"\nimported by the {base} full daemon, not by this tree's ({rss_gone / 1024:.1f} MiB in the baseline)")
        print("| module | RSS KiB | Python KiB |\n|---|---|---|")
        for name, (rss, py) in sorted(gone_groups.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"| {name} | {rss} | {py} |")


if __name__ == "__main__":
    sys.exit(main())
