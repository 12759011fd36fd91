"""Which build of edged is running: pure Python, or with the call path compiled by mypyc (the opt-in build).

`COMPILED` is the one list of the modules the compiled build compiles (`EDGED_COMPILE=1 pip install .`, see
setup.py); setup.py, scripts/build-compiled, scripts/compiled_callcost.py and tests/test_compiled.py read it
here. Rules for the list: interpreted classes cannot subclass compiled ones, so a module with a subclass of a
listed module's class must be listed too (`edge/ingress.py`: `EdgeTransport(HttpTransport)`); and a listed
module's functions cannot be replaced from outside (tests that monkeypatch them run on the pure build only).

This module imports nothing of edged's and is never compiled itself: setup.py loads it before edged is built.
"""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# Source paths from the top of the tree, as mypyc takes them. Keep it to the per-call path: each module adds
# build time (about 10 min in all on a Raspberry Pi 4) and a compiled class can be neither subclassed nor patched.
COMPILED: tuple[str, ...] = (
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
    "edged/edge/ingress.py",  # subclasses transport/http.py's HttpTransport
)

PURE = "pure"
FULL = "compiled"
PARTIAL = "partly compiled"  # a broken install: some listed modules run from their .py


def module_names() -> list[str]:
    """The dotted names of the listed modules (`edged.http.server`, ...)."""
    return [path[: -len(".py")].replace("/", ".") for path in COMPILED]


def compiled_present(package_dir: Path | None = None) -> list[str]:
    """The listed modules that have an extension module beside their source in `package_dir` (default: this
    edged). Python's path finder takes an extension before a .py of the same name, so these run compiled."""
    top = (package_dir or Path(__file__).resolve().parent).parent
    found = []
    for path in COMPILED:
        stem = top / path[: -len(".py")]
        if any(stem.with_name(stem.name + suffix).exists() for suffix in EXTENSION_SUFFIXES):
            found.append(path)
    return found


def build(package_dir: Path | None = None) -> str:
    """The build: "compiled" when every listed module is compiled, "pure" when none is, else "partly compiled".
    Read from the files, so asking imports none of the modules (`edged --version` stays cheap)."""
    found = len(compiled_present(package_dir))
    return PURE if found == 0 else FULL if found == len(COMPILED) else PARTIAL
