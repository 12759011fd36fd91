#!/usr/bin/env python3
"""What the opt-in compiled build (mypyc; README "Compiled build") buys and costs, pure against compiled in one run.

Builds the compiled build with scripts/build-compiled into `--venv` (default .venv-compiled; a wheel cached from
the same files is reused unless `--rebuild`), then prints:
- the build: CPU seconds (mypy and the C compiler; only when it really built), and the size of its extension
  modules as installed and stripped;
- instructions per call (callgrind, as scripts/callcost.py counts them, idle work taken out), `--rounds` times,
  the pure build (this tree, this interpreter) and the compiled build (the venv's interpreter and its edged);
- the idle daemon's RSS (VmRSS), after start and after a few calls, and how many compiled modules it has mapped;
- with `--tests`: the call path's tests against the compiled build (scripts/build-compiled --test).

Needs a C compiler, Python headers and valgrind. (Last stop's Cython experiment, with the sources unchanged,
gained nothing: docs/reference.md.)

usage: scripts/compiled_callcost.py [--venv DIR] [--rebuild] [--calls 300] [--gap 0.01] [--rounds 1] [--tests]
                                    [--no-callgrind] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import start_backend, stop_edged
from callcost import WARM_CALLS, calls, daemon, instructions
from harness import REPO

IDLE_SETTLE = 3.0
BUILD = REPO / "scripts" / "build-compiled"


def build(venv: Path, rebuild: bool, test: bool) -> dict:
    """scripts/build-compiled into `venv`; its summary (wheel, cached, cpu_s) and its exit code."""
    argv = [sys.executable, str(BUILD), "--venv", str(venv), *(["--no-cache"] if rebuild else []), *(["--test"] * test)]
    run = subprocess.run(argv, capture_output=True, text=True)
    lines = run.stdout.splitlines()
    summary = next((json.loads(line[len("build: ") :]) for line in reversed(lines) if line.startswith("build: ")), {})
    tail = [line for line in lines if not line.startswith("build: ")][-3:]
    return {**summary, "rc": run.returncode, "tail": tail, "stderr": run.stderr.strip().splitlines()[-5:]}


def site_dir(python: Path) -> Path:
    """Where the venv's edged is installed (asked from outside the tree, so the tree's is not the one found)."""
    code = "import edged, pathlib; print(pathlib.Path(edged.__file__).resolve().parents[1])"
    out = subprocess.run([str(python), "-c", code], cwd="/", capture_output=True, text=True, check=True, timeout=60)
    return Path(out.stdout.strip())


def extension_files(site: Path) -> list[Path]:
    """The compiled build's extension modules: mypyc's shared library and a stub per compiled module."""
    return sorted(site.glob("edged__mypyc*.so")) + sorted((site / "edged").rglob("*.so"))


def so_sizes(files: list[Path]) -> tuple[int, int]:
    """Bytes of the extension `files` as installed and stripped."""
    built = stripped = 0
    with tempfile.TemporaryDirectory() as tmp:
        for so in files:
            out = Path(tmp) / so.name
            subprocess.run(["strip", "--strip-unneeded", "-o", str(out), str(so)], check=True, timeout=60)
            built, stripped = built + so.stat().st_size, stripped + out.stat().st_size
    return built, stripped


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def mapped_extensions(pid: int, site: Path) -> int:
    """How many of the compiled build's extension modules process `pid` has mapped (it runs the compiled code)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    wanted = {str(f) for f in extension_files(site)}
    return len({line.split()[-1] for line in maps if line.split()[-1] in wanted})


def idle_rss(tmp: Path, name: str, source: Path, python: str, backend_port: int, site: Path) -> tuple[int, int, int]:
    """VmRSS (KiB) of the daemon, settled after start and after WARM_CALLS calls; and how many compiled
    extension modules it has mapped."""
    d = daemon(tmp, name, source, backend_port, [python, "-m", "edged"])
    assert d.proc is not None
    try:
        time.sleep(IDLE_SETTLE)
        started = rss_kib(d.proc.pid)
        calls(d, WARM_CALLS, 0)
        time.sleep(IDLE_SETTLE)
        return started, rss_kib(d.proc.pid), mapped_extensions(d.proc.pid, site)
    finally:
        stop_edged(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-compiled", help="the compiled build's venv")
    ap.add_argument("--rebuild", action="store_true", help="build even if a wheel of the same files is cached")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--gap", type=float, default=0.01, help="seconds between calls (the daemon sleeps meanwhile)")
    ap.add_argument("--rounds", type=int, default=1, help="instruction counts: pure then compiled, this many times")
    ap.add_argument("--tests", action="store_true", help="also run the call path's tests against the compiled build")
    ap.add_argument("--no-callgrind", action="store_true", help="build, sizes, RSS and tests only")
    ap.add_argument("--keep", metavar="DIR", help="copy the callgrind dumps of the calls to DIR (callgrind_annotate)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log while the slow parts run
    if not args.no_callgrind and shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"Python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.1f}")
    built = build(args.venv, args.rebuild, args.tests)
    if built["rc"] != 0 and not built.get("wheel"):
        print("the compiled build failed:\n  " + "\n  ".join(built["tail"] + built["stderr"]))
        return 1
    python = args.venv.resolve() / "bin" / "python"
    site = site_dir(python)
    files = extension_files(site)
    size, stripped = so_sizes(files)
    cost = "reused a cached wheel" if built.get("cached") else f"{built.get('cpu_s', 0):.0f} CPU s"
    mib = f"{size / 2**20:.1f} MiB ({stripped / 2**20:.1f} MiB stripped)"
    print(f"build: {cost}; {len(files)} extension modules, {mib}")
    if args.tests:
        print(f"tests against the compiled build (exit {built['rc']}):\n  " + "\n  ".join(built["tail"]))
    # (name, edged tree on PYTHONPATH, interpreter): the pure build is this tree; the compiled one the venv's own.
    builds = [("pure", REPO, sys.executable), ("compiled", site, str(python))]
    with tempfile.TemporaryDirectory(prefix="edged-compiled-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        backend, backend_port, backend_name = start_backend(tmp, [])
        stack.callback(backend.stop)
        print(f"backend: {backend_name}; {args.calls} calls one at a time, {args.gap:g} s apart")
        if not args.no_callgrind:
            per_call: dict[str, list[int]] = {name: [] for name, _, _ in builds}
            for n in range(args.rounds):
                for name, source, interpreter in builds:
                    cost_n = instructions(tmp, f"{name}{n}", source, backend_port, args, python=interpreter)
                    per_call[name].append(cost_n["instructions_per_call"])
                    print(f"  round {n + 1} {name}: {cost_n['instructions_per_call']:,} instructions per call "
                          f"(idle {cost_n['idle_per_s']:,}/s)")  # fmt: skip
            pure, comp = min(per_call["pure"]), min(per_call["compiled"])
            print(f"instructions per call: pure {pure:,}, compiled {comp:,} (lowest of {args.rounds}); "
                  f"compiled is {100 * (pure - comp) / pure:.0f}% fewer")  # fmt: skip
        for name, source, interpreter in builds:
            started, warm, mapped = idle_rss(tmp, f"rss-{name}", source, interpreter, backend_port, site)
            print(f"idle RSS {name}: {started / 1024:.1f} MiB after start, "
                  f"{warm / 1024:.1f} MiB after {WARM_CALLS} calls ({mapped} compiled modules mapped)")  # fmt: skip
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 1 if args.tests and built["rc"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
