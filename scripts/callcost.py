#!/usr/bin/env python3
"""What one call through edged costs, in counts that a busy shared machine does not blur.

Runs the daemon (one local endpoint, nginx or the Python backend behind it) and sends `--calls` calls one at
a time with a pause between them, as at a low rate. Then prints:
- instructions per call (user space: Python, uvloop, httptools, libc), counted by callgrind, with the
  daemon's idle instructions over the same time taken out (needs valgrind);
- with `--opcodes`: Python bytecodes per call, in total and by function (a `sys.settrace` opcode count),
  which says where in the code the call path spends them;
- with `--syscalls`: system calls per call by name (strace -c) and context switches per call, then the
  same per second of quiet: the wake-ups a call costs, and those the idle daemon pays (needs strace).
`--baseline REF` measures the edged of that git ref too (e.g. main), one after the other. `--extra-config FILE`
(TOML appended to this tree's daemon config) and `--header 'Name: value'` (sent with this tree's calls) measure
a call with more on its path (a JWT, authorization rules, quotas: see scripts/authz_figures.py); the baseline
runs as before.

`--keep DIR` keeps the callgrind dump of the calls (`callgrind_annotate --inclusive=yes DIR/edged.calls.callgrind`).

usage: scripts/callcost.py [--calls 300] [--gap 0.01] [--baseline REF] [--opcodes] [--top 40] [--syscalls]
                           [--extra-config FILE] [--header 'Name: value' ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import SERVICE, SequentialClient, baseline_tree, bench_daemon, ctx_switches, start_backend, stop_edged
from harness import REPO, Edged, wait_for

WARM_CALLS = 50
IDLE_SECONDS = 3.0

# Runs edged with an opcode counter that SIGUSR1 starts and SIGUSR2 stops (writing the counts to argv[1]).
OPCOUNT = """
import collections, signal, sys
out = sys.argv.pop(1)
counts, calls = collections.Counter(), collections.Counter()
def tracer(frame, event, arg):
    if event == "call":
        frame.f_trace_opcodes = True
        calls[frame.f_code] += 1
    elif event == "opcode":
        counts[frame.f_code] += 1
    return tracer
def stop(*_):
    sys.settrace(None)
    with open(out, "w") as f:
        for code, n in counts.most_common():
            qualname = getattr(code, "co_qualname", code.co_name)
            name = f"{code.co_filename.rsplit('/edged/', 1)[-1]}:{code.co_firstlineno} {qualname}"
            f.write(f"{n} {calls[code]} {name}\\n")
signal.signal(signal.SIGUSR1, lambda *_: sys.settrace(tracer))
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["edged", *sys.argv[1:]]
from edged.cli import main
sys.exit(main())
"""


def daemon(tmp: Path, name: str, source: Path, backend_port: int, prefix: list[str], extra: str = "") -> Edged:
    """The benchmark's daemon (`bench.bench_daemon`, plus `extra` config), started as `prefix + ["run", ...]`."""
    d = bench_daemon(tmp, backend_port, source, name)
    if extra:
        d.config.write_text(d.config.read_text() + "\n" + extra)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(source))
    argv = [*prefix, "run", "--config", str(d.config)]
    d.proc = subprocess.Popen(argv, cwd=d.root, stdout=d.log.open("ab"), stderr=subprocess.STDOUT, env=env)
    wait_for(d.ready, 300, interval=0.2, what=f"{name} ready (log: {d.log})")
    return d


def calls(d: Edged, n: int, gap: float, headers: tuple[str, ...] = ()) -> float:
    """`n` calls one at a time, `gap` seconds apart (with `headers`); returns the seconds they took."""
    c = SequentialClient(d.port, f"/svc/{SERVICE}/x")
    if headers:
        c.request = c.request[:-2] + "".join(f"{h}\r\n" for h in headers).encode() + b"\r\n"
    try:
        t0 = time.monotonic()
        for _ in range(n):
            if c.call() != 200:
                raise RuntimeError("a call failed")
            time.sleep(gap)
        return time.monotonic() - t0
    finally:
        c.close()


def callgrind_totals(path: Path) -> int:
    match = re.search(r"^(?:summary|totals):\s*(\d+)", path.read_text(errors="replace"), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {path}")
    return int(match.group(1))


def instructions(
    tmp: Path, name: str, source: Path, backend_port: int, args, extra: str = "", headers=(), python: str = ""
) -> dict:
    """Callgrind: instructions over IDLE_SECONDS of quiet, then over the calls; per call, idle taken out.
    `python`: the interpreter that runs the daemon (another venv's, e.g. the compiled build's), else this one."""
    out = tmp / f"{name}.callgrind"
    prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    d = daemon(tmp, name, source, backend_port, [*prefix, python or sys.executable, "-m", "edged"], extra)
    assert d.proc is not None
    pid = str(d.proc.pid)
    try:
        calls(d, WARM_CALLS, 0, headers)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        time.sleep(IDLE_SECONDS)
        subprocess.run(["callgrind_control", "-d", "idle", pid], check=True, capture_output=True)
        wall = calls(d, args.calls, args.gap, headers)
        subprocess.run(["callgrind_control", "-d", "calls", pid], check=True, capture_output=True)
    finally:
        stop_edged(d)
    dumps = sorted(tmp.glob(f"{name}.callgrind.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    if len(dumps) < 2:
        raise RuntimeError(f"callgrind wrote {len(dumps)} dumps, expected 2")
    if args.keep:  # for callgrind_annotate: where the instructions of the calls went, by function
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(dumps[1], Path(args.keep) / f"{name}.calls.callgrind")
    idle, busy = callgrind_totals(dumps[0]), callgrind_totals(dumps[1])
    idle_part = idle * wall / IDLE_SECONDS
    return {
        "instructions_per_call": round((busy - idle_part) / args.calls),
        "raw_per_call": round(busy / args.calls),
        "idle_per_s": round(idle / IDLE_SECONDS),
    }


def opcodes(tmp: Path, name: str, source: Path, backend_port: int, args) -> dict:
    """Python bytecodes per call, in total and for the `--top` functions that run the most."""
    out = tmp / f"{name}.opcodes"
    d = daemon(tmp, name, source, backend_port, [sys.executable, "-c", OPCOUNT, str(out)])
    assert d.proc is not None
    try:
        calls(d, WARM_CALLS, 0)
        d.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        calls(d, args.calls, args.gap)
        d.proc.send_signal(signal.SIGUSR2)
        wait_for(out.exists, 10, what="opcode counts")
        time.sleep(0.2)
    finally:
        stop_edged(d)
    rows = [line.split(" ", 2) for line in out.read_text().splitlines()]
    total = sum(int(n) for n, _, _ in rows)
    return {
        "bytecodes_per_call": round(total / args.calls),
        "functions": [
            {"bytecodes": round(int(n) / args.calls, 1), "runs": round(int(c) / args.calls, 2), "function": f}
            for n, c, f in rows[: args.top]
        ],
    }


def strace_counts(pid: int, run) -> dict[str, int]:
    """System calls by name of every thread of `pid` while `run()` runs (strace -c attached meanwhile)."""
    with tempfile.NamedTemporaryFile(prefix="edged-strace-", suffix=".txt") as out:
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", out.name, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(1.0)  # attached to every thread before the work starts
            run()
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
        counts = {}
        for line in Path(out.name).read_text().splitlines():
            fields = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(fields) >= 5 and fields[3].isdigit() and fields[-1] not in ("total", "syscall"):
                counts[fields[-1]] = int(fields[3])
        return counts


def syscalls(tmp: Path, name: str, source: Path, backend_port: int, args) -> dict:
    """System calls and context switches per call (calls `--gap` apart), and per second of quiet."""
    d = daemon(tmp, name, source, backend_port, [sys.executable, "-m", "edged"])
    assert d.proc is not None
    pid = d.proc.pid
    try:
        calls(d, WARM_CALLS, 0)
        switches = ctx_switches(pid)
        calls(d, args.calls, args.gap)
        per_call_switches = (ctx_switches(pid) - switches) / args.calls
        busy = strace_counts(pid, lambda: calls(d, args.calls, args.gap))
        time.sleep(IDLE_SECONDS)  # the calls' own timers (idle connections, lag meter) run out
        switches = ctx_switches(pid)
        time.sleep(IDLE_SECONDS)
        idle_switches = (ctx_switches(pid) - switches) / IDLE_SECONDS
        idle = strace_counts(pid, lambda: time.sleep(IDLE_SECONDS))
    finally:
        stop_edged(d)
    return {
        "per_call": {k: round(v / args.calls, 2) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])},
        "ctx_switches_per_call": round(per_call_switches, 2),
        "idle_per_s": {k: round(v / IDLE_SECONDS, 1) for k, v in sorted(idle.items(), key=lambda kv: -kv[1])},
        "idle_ctx_switches_per_s": round(idle_switches, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--gap", type=float, default=0.01, help="seconds between calls (the daemon sleeps meanwhile)")
    ap.add_argument("--baseline", metavar="REF", help="also measure edged at this git ref (e.g. main)")
    ap.add_argument("--opcodes", action="store_true", help="also count Python bytecodes per call, by function")
    ap.add_argument("--top", type=int, default=40, help="functions listed with --opcodes")
    ap.add_argument("--extra-config", metavar="FILE", help="TOML appended to this tree's daemon config")
    ap.add_argument("--header", action="append", default=[], help="'Name: value' sent with this tree's calls")
    ap.add_argument("--keep", metavar="DIR", help="copy the callgrind dump of the calls to DIR (callgrind_annotate)")
    ap.add_argument("--syscalls", action="store_true", help="also count system calls and context switches (strace)")
    args = ap.parse_args()
    if args.syscalls and shutil.which("strace") is None:
        print("strace is not installed (apt-get install strace)", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="edged-callcost-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        notes: list[str] = []
        backend, backend_port, backend_name = start_backend(tmp, notes)
        stack.callback(backend.stop)
        trees = {"edged": REPO}
        if args.baseline:
            trees[f"edged@{args.baseline}"] = baseline_tree(args.baseline, tmp)
        print(f"backend: {backend_name}; {args.calls} calls one at a time, {args.gap:g} s apart")
        for note in notes:
            print(f"note: {note}")
        for name, source in trees.items():
            tag = name.replace("@", "-")
            mine = source == REPO
            extra = Path(args.extra_config).read_text() if args.extra_config and mine else ""
            cost = instructions(tmp, tag, source, backend_port, args, extra, tuple(args.header) if mine else ())
            print(
                f"{name}: {cost['instructions_per_call']:,} instructions per call "
                f"({cost['raw_per_call']:,} before taking out {cost['idle_per_s']:,}/s of idle work)"
            )
            if args.opcodes:
                ops = opcodes(tmp, tag, source, backend_port, args)
                print(f"{name}: {ops['bytecodes_per_call']:,} Python bytecodes per call; by function:")
                for row in ops["functions"]:
                    print(f"  {row['bytecodes']:8.1f}  x{row['runs']:<5g} {row['function']}")
            if args.syscalls:
                sc = syscalls(tmp, tag, source, backend_port, args)
                each = ", ".join(f"{k} {v:g}" for k, v in sc["per_call"].items() if v >= 0.01)
                print(f"{name}: {sc['ctx_switches_per_call']:g} context switches per call; system calls per call:")
                print(f"  {each}")
                quiet = ", ".join(f"{k} {v:g}" for k, v in sc["idle_per_s"].items()) or "none"
                print(f"{name}: idle, {sc['idle_ctx_switches_per_s']:g} context switches/s; system calls/s:")
                print(f"  {quiet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
