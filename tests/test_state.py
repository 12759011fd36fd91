from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edged.errors import EdgedError
from edged.state import AtomicFile, StateError, StateStore, atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_file_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "doc.bin"
    target.write_bytes(b"old")
    atomic_write(str(target), b"new contents", mode=0o640)
    assert target.read_bytes() == b"new contents"
    assert _mode(target) == 0o640
    atomic_write(str(target), b"again")
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.bin"]  # no temp files left


def test_atomic_write_failure_raises_state_error_and_removes_temp(tmp_path: Path) -> None:
    blocker = tmp_path / "doc.json"
    blocker.mkdir()
    (blocker / "inside").write_text("x")  # a non-empty folder cannot be renamed over
    with pytest.raises(StateError) as info:
        atomic_write(str(blocker), b"data")
    assert isinstance(info.value, EdgedError)
    assert str(blocker) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]
    with pytest.raises(StateError):
        atomic_write(str(tmp_path / "missing" / "doc.json"), b"data")


def test_store_creates_folder_on_first_write_only(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "state"
    store = StateStore(str(folder))
    assert store.read_json("registrations.json", {"none": True}) == {"none": True}
    assert not folder.exists()
    store.write_json("registrations.json", {"thermo": {"url": "http://127.0.0.1:8080", "ttl": 15}})
    assert _mode(folder) == 0o700
    assert _mode(folder / "registrations.json") == 0o600
    again = StateStore(str(folder))  # as after a reboot
    assert again.read_json("registrations.json", {}) == {"thermo": {"url": "http://127.0.0.1:8080", "ttl": 15}}
    store.write_json("registrations.json", {})
    assert again.read_json("registrations.json", None) == {}


@pytest.mark.parametrize(
    "content",
    [b'{"half": ', b"\xff\xfe not utf-8", b"", b"[1, 2, 3]"],
    ids=["truncated", "binary", "empty", "wrong-type"],
)
def test_corrupt_file_is_moved_aside_and_default_returned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    (tmp_path / "fleet.json").write_bytes(content)
    store = StateStore(str(tmp_path))
    before = int(time.time())
    with caplog.at_level(logging.WARNING, logger="edged.state"):
        assert store.read_json("fleet.json", {"version": 0}) == {"version": 0}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("fleet.json.corrupt-")]
    assert len(aside) == 1
    assert before <= int(aside[0].name.rsplit("-", 1)[1]) <= int(time.time())
    assert aside[0].read_bytes() == content
    assert not (tmp_path / "fleet.json").exists()
    assert any("fleet.json" in r.getMessage() for r in caplog.records)
    store.write_json("fleet.json", {"version": 1})  # and the store goes on working
    assert store.read_json("fleet.json", {}) == {"version": 1}


def test_unreadable_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "peers.json").mkdir()  # open() fails with an OSError other than "missing"
    store = StateStore(str(tmp_path))
    assert store.read_json("peers.json", []) == []
    assert any(p.name.startswith("peers.json.corrupt-") for p in tmp_path.iterdir())


def test_write_errors_are_state_errors(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StateError):
        StateStore(str(not_a_dir)).write_json("a.json", {})
    store = StateStore(str(tmp_path / "ok"))
    with pytest.raises(StateError):
        store.write_json("a.json", {"x": object()})
    with pytest.raises(StateError):
        store.write_json("a.json", {"x": float("nan")})
    for bad in ("", "../escape.json", "sub/a.json", ".hidden"):
        with pytest.raises(StateError):
            store.write_json(bad, {})
    assert not (tmp_path / "escape.json").exists()


def test_stale_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / ".registrations.json.abc123.tmp").write_text("half written")
    (tmp_path / "keep.json").write_text("{}")
    StateStore(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


def test_async_writes_land_in_call_order(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))

    async def main() -> None:
        doc = {"n": 0}
        writes = []
        for i in range(30):
            doc["n"] = i
            writes.append(asyncio.ensure_future(store.async_write_json("counter.json", doc)))
        doc["n"] = -1  # encoded at call time: this later change must not be written
        await asyncio.gather(*writes)

    asyncio.run(main())
    assert store.read_json("counter.json", {}) == {"n": 29}
    assert json.loads((tmp_path / "counter.json").read_text()) == {"n": 29}


_WRITER = """
import sys, json
from edged.state import atomic_write
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_write(path, json.dumps({"i": i, "pad": "x" * 4096}).encode())
    if i == 5:
        print("ready", flush=True)
"""


def test_killed_writer_leaves_a_whole_document(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    doc = json.loads(target.read_text())
    assert doc["i"] >= 5 and len(doc["pad"]) == 4096
    StateStore(str(tmp_path))  # a temp file the kill may have left is cleaned at start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]


def test_an_oversized_state_file_is_moved_aside_unread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Before: a 100 MB cloud-registry.json was read and decoded at start (346 MB RSS peak).
    import tracemalloc

    path = tmp_path / "cloud-registry.json"
    path.write_text('{"entries": []}')
    os.truncate(path, 100 * 2**20)  # sparse: no disk is used, reading it would take 100 MB
    store = StateStore(str(tmp_path))
    tracemalloc.start()
    try:
        assert store.read_json("cloud-registry.json", {}) == {}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    assert not path.exists() and [p.name.split("-")[0] for p in tmp_path.glob("*.corrupt-*")] == ["cloud"]
    assert "104857600 bytes, over the limit of 33554432 (not read); moved to" in caplog.text


def test_an_atomic_file_written_in_parts_replaces_the_old_one_only_at_commit(tmp_path: Path) -> None:
    target = tmp_path / "doc"
    target.write_bytes(b"old")
    with AtomicFile(str(target), mode=0o640) as f:
        f.write(b"new ")
        f.write(b"in parts")
        assert target.read_bytes() == b"old" and f.size == 12
        f.commit()
        assert target.read_bytes() == b"new in parts"
    assert _mode(target) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc"]
    with pytest.raises(StateError):
        f.write(b"after the commit")


def test_an_atomic_file_left_uncommitted_leaves_the_old_one_and_no_temp(tmp_path: Path) -> None:
    """An error (or a cancelled save) between two parts: the old file is whole, the temp file gone."""
    target = tmp_path / "doc"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), AtomicFile(str(target)) as f:
        f.write(b"half of the new")
        raise RuntimeError("cut short")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc"]
    f.abort()  # again: nothing to do
    with pytest.raises(StateError):
        f.commit()
    with pytest.raises(StateError):
        AtomicFile(str(tmp_path / "missing" / "doc"))
