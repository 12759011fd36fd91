"""The opt-in compiled build (mypyc; setup.py, scripts/build-compiled): edged says which build runs, and a
compiled build really runs its listed modules compiled.

The tests of a compiled build run only where one is under test: `scripts/build-compiled --test` (as `.ci/run`
does) runs them, with the call path's tests, in a venv holding the compiled build (EDGED_TEST_COMPILED=1); in the
dev tree (pure Python) they are skipped with the reason.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import json
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
from pathlib import Path

import pytest
from conftest import wait_for
from harness import manifest
from test_router import Answer, ScriptedTransport, make

from edged import __version__, buildinfo
from edged.errors import CallError, ConnectFailed

UNDER_TEST = os.environ.get("EDGED_TEST_COMPILED") == "1"
BUILD = buildinfo.build()

needs_compiled = pytest.mark.skipif(
    not UNDER_TEST and BUILD == buildinfo.PURE,
    reason="no compiled build under test (scripts/build-compiled --test builds one and runs these)",
)


def fake_package(tmp_path: Path, compiled: list[str]) -> Path:
    """An edged package dir in `tmp_path` with every listed module's .py, and an extension module for `compiled`."""
    for path in buildinfo.COMPILED:
        src = tmp_path / path
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("")
        if path in compiled:
            src.with_name(src.stem + EXTENSION_SUFFIXES[0]).write_bytes(b"")
    return tmp_path / "edged"


def test_build_is_read_from_the_files(tmp_path: Path) -> None:
    listed = list(buildinfo.COMPILED)
    assert buildinfo.build(fake_package(tmp_path / "pure", [])) == "pure"
    assert buildinfo.build(fake_package(tmp_path / "part", listed[:1])) == "partly compiled"
    assert buildinfo.build(fake_package(tmp_path / "all", listed)) == "compiled"


def _awaits(nodes: list[ast.stmt]) -> list[int]:
    """Lines of the awaits (await, async with, async for) in `nodes`."""
    found = []
    for node in nodes:
        found += [n.lineno for n in ast.walk(node) if isinstance(n, (ast.Await, ast.AsyncWith, ast.AsyncFor))]
    return found


def test_compiled_modules_avoid_what_mypyc_compiles_wrong() -> None:
    """mypyc 2.4.1 compiles an await in a `finally` block, or in an `except` block that re-raises, so that an
    exception stays in sys.exc_info (and a finally re-raises the caller's): the listed modules must have none
    (docs/reference.md "Compiled build"). Checked on the sources, so the pure suite catches a new one."""
    top = Path(buildinfo.__file__).resolve().parents[1]
    found = []
    for path in buildinfo.COMPILED:
        for node in ast.walk(ast.parse((top / path).read_text())):
            if not isinstance(node, ast.Try):
                continue
            found += [f"{path}:{line} await in finally" for line in _awaits(node.finalbody)]
            for handler in node.handlers:
                if any(isinstance(n, ast.Raise) and n.exc is None for n in ast.walk(handler)):
                    found += [f"{path}:{line} await in an except that re-raises" for line in _awaits(handler.body)]
    assert found == []


def test_version_says_which_build(tmp_path: Path) -> None:
    """`edged --version` names the build that runs: whatever edged this interpreter imports (in the dev tree,
    pure; under scripts/build-compiled --test, compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if not UNDER_TEST:  # the dev tree's edged, as the daemons of the other tests run it
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-m", "edged", "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"edged {__version__} ({BUILD})"


@needs_compiled
def test_the_build_under_test_is_compiled() -> None:
    """A compiled run that silently tested pure Python would prove nothing: every listed module is compiled."""
    assert BUILD == buildinfo.FULL, f"edged at {Path(buildinfo.__file__).parent} is {BUILD}"


@needs_compiled
@pytest.mark.parametrize("name", buildinfo.module_names())
def test_listed_module_is_an_extension_module(name: str) -> None:
    module = importlib.import_module(name)
    assert isinstance(module.__loader__, ExtensionFileLoader), f"{name} imported from {module.__file__}"
    assert module.__file__ is not None and module.__file__.endswith(tuple(EXTENSION_SUFFIXES))


@needs_compiled
def test_daemon_runs_compiled_and_says_so(edged, backends) -> None:
    """The daemon the tests start maps mypyc's shared library, and its status and startup log say compiled."""
    backend = backends("a")
    d = edged({"echo.toml": manifest("echo", [(backend.port, 1)])})
    assert d.proc is not None
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "edged__mypyc" in maps
    status = d.api.get_json("/v1/status")
    assert status["node"]["build"] == "compiled"
    ready = wait_for(lambda: [json.loads(x) for x in d.log_text().splitlines() if '"edged ready"' in x], 10)
    assert ready[0]["build"] == "compiled"
    status, _, _ = d.call("echo", "/x")
    assert status == 200


class _Unending(Answer):
    """An answer whose small body never comes: the router reads it whole (edged.answers.read_whole) until cut."""

    def __init__(self) -> None:
        super().__init__(200)
        self.complete, self.content_length = False, 10

    async def read(self) -> bytes:
        await asyncio.get_running_loop().create_future()
        return b""


class _UnendingTransport(ScriptedTransport):
    async def send(self, ep, call, headers, timeout):
        return _Unending()


def test_a_call_made_while_an_exception_is_handled_raises_its_own_error() -> None:
    """mypyc 2.4.1 compiled the router's `await` in a `finally` so that leaving the try re-raised the exception
    the caller was handling (here the KeyError) instead of the call's own CallError (edged/router.py)."""
    router, *_, call = make({"a": ConnectFailed, "b": ConnectFailed})
    try:
        raise KeyError("handled by the caller")
    except KeyError:
        with pytest.raises(CallError) as err:
            asyncio.run(router.route_service_call(call))
    assert err.value.code == "no_endpoint"


def test_a_cancelled_call_leaves_no_exception_behind() -> None:
    """A call cancelled while its answer is read whole leaves sys.exc_info() empty: with the await in the
    router's `finally`, the compiled build left the CancelledError there, and later calls raised it."""
    router, *_, call = make({"a": 200})
    router._transports["local"] = _UnendingTransport({})

    async def cancel_one() -> None:
        task = asyncio.ensure_future(router.route_service_call(call))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(cancel_one())
    assert sys.exc_info() == (None, None, None)
    router, *_, call = make({"a": ConnectFailed})
    with pytest.raises(CallError):
        asyncio.run(router.route_service_call(call))
