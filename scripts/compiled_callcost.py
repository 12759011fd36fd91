#!/usr/bin/env python3
"""What compiling the hot call path with Cython would buy: an experiment, not a build step (edged ships pure Python).

Copies this tree (its tracked files, as they are in the worktree) into a temporary directory, compiles the call
path's modules there with Cython (pure-Python mode, the sources unchanged), and prints, pure against compiled in
the same run:
- the build: per module, whether it compiled, the CPU seconds it took, and the size of its .so (as built, with
  debug symbols, and stripped);
- instructions per call (callgrind, as scripts/callcost.py counts them, idle work taken out), `--rounds` times;
- the idle daemon's RSS (VmRSS), after start and after a few calls;
- with `--tests`: the call path's test files run against the compiled copy (pytest, its own PYTHONPATH).
Nothing is written into the worktree: the .so and .c files live and die in the temporary directory (in the tree
they would shadow the .py sources).

`--compiler mypyc` compiles the same modules with mypyc instead (one build; see `compile_mypyc` for what it
needs switched off). Needs Cython (or mypy) in the interpreter that runs this (`.venv/bin/pip install cython`),
a C compiler, Python headers and valgrind.

usage: scripts/compiled_callcost.py [--calls 300] [--gap 0.01] [--rounds 1] [--tests] [--module edged/x.py ...]
                                    [--compiler cython|mypyc]
                                    [--no-callgrind] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
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

HOT_MODULES = (
    "edged/http/server.py",
    "edged/http/client.py",
    "edged/http/message.py",
    "edged/router.py",
    "edged/relay.py",
    "edged/api.py",
    "edged/transport/http.py",
    "edged/health/monitor.py",
    "edged/balancer.py",
    "edged/looplag.py",
)
CALL_PATH_TESTS = (
    "tests/test_router.py",
    "tests/test_http_server.py",
    "tests/test_http_client.py",
    "tests/test_call_path.py",
    "tests/test_cancellation.py",
)
BUILD_TIMEOUT = 900  # seconds per module; a loaded 2-core box takes up to a minute for the largest
IDLE_SETTLE = 3.0
# mypyc: interpreted classes cannot subclass compiled ones, so these are compiled too (EdgeTransport(HttpTransport)).
MYPYC_SUBCLASSES = ("edged/edge/ingress.py",)
MYPYC_IGNORED_ERRORS = ("arg-type", "call-overload")
# Text edits to the copy: a switched-off no-redef there makes mypyc fail with an internal error.
MYPYC_EDITS = (("edged/router.py", 'detail: dict = {"service": spec.name', 'detail = {"service": spec.name'),)


def copy_tree(dest: Path) -> None:
    """The worktree's tracked files (with uncommitted edits) copied to `dest`: no .venv, no stray builds."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True, timeout=60)
    for name in listed.stdout.decode().split("\0"):
        src = REPO / name
        if name and src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def compile_module(tree: Path, module: str) -> dict:
    """Cythonize and build `module` in place in `tree`; CPU seconds (Cython plus the C compiler) and .so sizes."""
    before = children_cpu()
    run = subprocess.run(
        [sys.executable, "-m", "Cython.Build.Cythonize", "-3", "-i", "-q", module],
        cwd=tree, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )
    cpu = children_cpu() - before
    stem = tree / module[: -len(".py")]
    built = sorted(stem.parent.glob(f"{stem.name}.*.so"))
    row = {"module": module, "ok": run.returncode == 0 and bool(built), "cpu_s": cpu}
    if not row["ok"]:
        row["error"] = (run.stderr or run.stdout).strip().splitlines()[-3:]
        return row
    row["so_bytes"], row["stripped_bytes"] = so_sizes(built[:1])
    return row


def so_sizes(files: list[Path]) -> tuple[int, int]:
    """Bytes of the extension `files` as built (with debug symbols) and stripped."""
    built = stripped = 0
    for so in files:
        out = so.with_suffix(".stripped")
        subprocess.run(["strip", "--strip-unneeded", "-o", str(out), str(so)], check=True, timeout=60)
        built, stripped = built + so.stat().st_size, stripped + out.stat().st_size
        out.unlink()
    return built, stripped


def compile_mypyc(tree: Path, modules: list[str]) -> dict:
    """mypyc on `modules` (plus the modules whose classes subclass theirs) in place in `tree`, in one build.

    Two type errors of today's code are switched off and a third edited away in the copy, and GCC's
    predefined `__unix` macro is undefined: mypyc names the C field of an attribute `_unix` `__unix`."""
    for name, old, new in MYPYC_EDITS:
        text = (tree / name).read_text()
        if old not in text:
            error = f"the edit for mypyc no longer applies: {old}"
            return {"module": name, "ok": False, "cpu_s": 0.0, "error": [error]}
        (tree / name).write_text(text.replace(old, new))
    before = children_cpu()
    flags = [f"--disable-error-code={code}" for code in MYPYC_IGNORED_ERRORS]
    run = subprocess.run(
        [sys.executable, "-m", "mypyc", *flags, *modules, *MYPYC_SUBCLASSES],
        cwd=tree, capture_output=True, text=True, timeout=BUILD_TIMEOUT * 2,
        env=dict(os.environ, CFLAGS="-U__unix"),
    )
    cpu = children_cpu() - before
    files = sorted(tree.glob("*.so")) + sorted((tree / "edged").rglob("*.so"))
    row = {"module": f"mypyc, {len(modules) + len(MYPYC_SUBCLASSES)} modules", "ok": run.returncode == 0, "cpu_s": cpu}
    if not row["ok"]:
        row["error"] = [line for line in (run.stdout + run.stderr).splitlines() if "error" in line][-5:]
        return row
    row["so_bytes"], row["stripped_bytes"] = so_sizes(files)
    return row


def compiled_modules(tree: Path, modules: list[str]) -> list[str]:
    """Those of `modules` that the compiled copy really imports from a .so (not its .py), checked in a child."""
    names = [m[: -len(".py")].replace("/", ".") for m in modules]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    print(n, importlib.import_module(n).__file__)"
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=tree, env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return [line.split()[0] for line in out.stdout.splitlines() if line.endswith(".so")]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def mapped_extensions(pid: int, tree: Path) -> int:
    """How many extension modules from `tree` process `pid` has mapped: the daemon really runs the compiled code."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    edged = str(tree / "edged")
    return len({line.split()[-1] for line in maps if line.endswith(".so") and line.split()[-1].startswith(edged)})


def idle_rss(tmp: Path, name: str, source: Path, backend_port: int) -> tuple[int, int, int]:
    """VmRSS (KiB) of the daemon run from `source`, settled after start and after WARM_CALLS calls; and how many
    extension modules of `source` it has mapped."""
    d = daemon(tmp, name, source, backend_port, [sys.executable, "-m", "edged"])
    assert d.proc is not None
    try:
        time.sleep(IDLE_SETTLE)
        started = rss_kib(d.proc.pid)
        calls(d, WARM_CALLS, 0)
        time.sleep(IDLE_SETTLE)
        return started, rss_kib(d.proc.pid), mapped_extensions(d.proc.pid, source)
    finally:
        stop_edged(d)


def run_tests(tree: Path, files: tuple[str, ...]) -> tuple[int, str]:
    """pytest on `files` in the compiled copy (its edged first on the path); exit code and the summary line."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=tree, env=env, capture_output=True, text=True,
    )
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return run.returncode, "\n  ".join([*failed, lines[-1] if lines else "(no output)"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--gap", type=float, default=0.01, help="seconds between calls (the daemon sleeps meanwhile)")
    ap.add_argument("--rounds", type=int, default=1, help="instruction counts: pure then compiled, this many times")
    ap.add_argument("--module", action="append", help="a module to compile (default: the call path's hot modules)")
    ap.add_argument("--compiler", choices=("cython", "mypyc"), default="cython")
    ap.add_argument("--tests", action="store_true", help="also run the call path's tests against the compiled copy")
    ap.add_argument("--no-callgrind", action="store_true", help="build, sizes, RSS and tests only")
    ap.add_argument("--keep", metavar="DIR", help="copy the callgrind dumps of the calls to DIR (callgrind_annotate)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log while the slow parts run
    try:
        compiler = importlib.import_module("Cython" if args.compiler == "cython" else "mypy.version")
    except ImportError:
        print(f"{args.compiler} is not installed: {sys.executable} -m pip install {args.compiler}", file=sys.stderr)
        return 2
    if not args.no_callgrind and shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modules = args.module or list(HOT_MODULES)
    with tempfile.TemporaryDirectory(prefix="edged-compiled-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        tree = tmp / "compiled-tree"
        copy_tree(tree)
        version = getattr(compiler, "__version__", "?")
        print(f"{args.compiler} {version}, Python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.1f}")
        if args.compiler == "mypyc":
            rows = [compile_mypyc(tree, modules)]
            built = [*modules, *MYPYC_SUBCLASSES] if rows[0]["ok"] else []
        else:
            rows = [compile_module(tree, m) for m in modules]
            built = [r["module"] for r in rows if r["ok"]]
        for r in rows:
            if r["ok"]:
                print(f"  {r['module']}: {r['cpu_s']:.1f} CPU s, .so {r['so_bytes'] / 1024:,.0f} KiB "
                      f"({r['stripped_bytes'] / 1024:,.0f} KiB stripped)")
            else:
                print(f"  {r['module']}: FAILED after {r['cpu_s']:.1f} CPU s: " + " / ".join(r["error"]))
        good = [r for r in rows if r["ok"]]
        print(
            f"build: {len(good)}/{len(rows)} modules, {sum(r['cpu_s'] for r in rows):.0f} CPU s, "
            f".so {sum(r['so_bytes'] for r in good) / 2**20:.1f} MiB "
            f"({sum(r['stripped_bytes'] for r in good) / 2**20:.1f} MiB stripped)"
        )
        loaded = compiled_modules(tree, built)
        print(f"compiled modules imported from .so: {len(loaded)}/{len(built)}")
        if not built or len(loaded) != len(built):
            print("some compiled modules are not the ones imported: figures would not be about the compiled build")
            return 1

        backend, backend_port, backend_name = start_backend(tmp, [])
        stack.callback(backend.stop)
        trees = {"pure": REPO, "compiled": tree}
        print(f"backend: {backend_name}; {args.calls} calls one at a time, {args.gap:g} s apart")
        if not args.no_callgrind:
            per_call: dict[str, list[int]] = {name: [] for name in trees}
            for n in range(args.rounds):
                for name, source in trees.items():
                    cost = instructions(tmp, f"{name}{n}", source, backend_port, args)
                    per_call[name].append(cost["instructions_per_call"])
                    print(f"  round {n + 1} {name}: {cost['instructions_per_call']:,} instructions per call "
                          f"(idle {cost['idle_per_s']:,}/s)")
            pure, comp = min(per_call["pure"]), min(per_call["compiled"])
            print(f"instructions per call: pure {pure:,}, compiled {comp:,} (lowest of {args.rounds}); "
                  f"compiled is {100 * (pure - comp) / pure:.0f}% fewer")
        for name, source in trees.items():
            started, warm, mapped = idle_rss(tmp, f"rss-{name}", source, backend_port)
            print(f"idle RSS {name}: {started / 1024:.1f} MiB after start, "
                  f"{warm / 1024:.1f} MiB after {WARM_CALLS} calls ({mapped} compiled modules mapped)")
        if args.tests:
            rc, summary = run_tests(tree, CALL_PATH_TESTS)
            print(f"tests against the compiled copy (exit {rc}):\n  {summary}")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
