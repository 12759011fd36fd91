"""The persisted cloud registry (`edged.cloud.registry_log`): appended changes, rewrites, crash safety."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_cloud_registry import TOPICS, entry_msg, registry_sync

import edged.cloud.registry_log as rl
from edged.cloud.registry_log import LOG_FILE, MIN_COMPACT, read_log
from edged.cloud.registry_sync import STATE_FILE
from edged.cloud.session import Inbound
from edged.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def status_msg(node: str, state: str = "online") -> Inbound:
    return Inbound(TOPICS.status(node), json.dumps({"state": state, "node": node}).encode(), True)


def test_a_save_appends_only_what_changed_and_a_restart_restores_it(tmp_path):
    async def main() -> None:
        sync = registry_sync(tmp_path, Registry())
        for n in range(50):
            sync._on_status(status_msg(f"pi-{n}"))
            for s in range(10):
                sync._on_service(entry_msg(f"pi-{n}", f"s{n}-{s}"))
        await sync._saver.flush()
        path = tmp_path / LOG_FILE
        first = path.stat().st_size
        assert sync._log.rewrites == 1 and sync._log.appends == 0
        assert first < 500 * 60  # one shape for all 500 entries: about 40 bytes an entry
        sync._on_service(entry_msg("pi-3", "s3-0", payload=b""))  # deleted
        sync._on_service(entry_msg("pi-3", "extra"))
        sync._on_status(status_msg("pi-4", "offline"))
        await sync._saver.flush()
        assert sync._log.rewrites == 1 and sync._log.appends == 1
        assert 0 < path.stat().st_size - first < 300  # three records, not the whole registry again

        again = Registry()
        restored = registry_sync(tmp_path, again)
        assert restored.restore() == 500
        assert sorted(restored.entries["pi-3"])[:2] == ["extra", "s3-1"] and "s3-0" not in restored.entries["pi-3"]
        assert restored.nodes["pi-4"].state == "offline"
        assert again.snapshot().get("default", "extra").spec.source == "mqtt:pi-3"
        assert restored.serves("pi-7", "default", "s7-2") and not restored.serves("pi-7", "default", "s3-1")

    asyncio.run(main())


def test_the_burst_of_a_start_is_not_noted_change_by_change_and_later_changes_are_appended(tmp_path):
    """The first save after a start rewrites the log whole: the burst before it keeps no (node, key) pair per
    entry (the old code did, about 100 bytes an entry until the save); what changes after it is appended."""

    async def main() -> None:
        sync = registry_sync(tmp_path, Registry())
        for n in range(20):
            sync._on_status(status_msg(f"pi-{n}"))
            for s in range(10):
                sync._on_service(entry_msg(f"pi-{n}", f"s{n}-{s}"))
        assert not sync._dirty_entries and not sync._dirty_nodes
        await sync._saver.flush()
        assert sync._log.rewrites == 1 and sync._log.appends == 0
        sync._on_service(entry_msg("pi-3", "extra"))
        sync._on_status(status_msg("pi-4", "offline"))
        assert sync._dirty_entries == {("pi-3", "extra")} and sync._dirty_nodes == {"pi-4"}
        await sync._saver.flush()
        assert sync._log.rewrites == 1 and sync._log.appends == 1
        restored = registry_sync(tmp_path, Registry())
        assert restored.restore() == 201 and restored.nodes["pi-4"].state == "offline"

    asyncio.run(main())


def test_appends_are_rewritten_whole_once_they_outgrow_the_live_records(tmp_path):
    async def main() -> None:
        sync = registry_sync(tmp_path, Registry())
        sync._on_service(entry_msg("pi-1", "flappy"))
        await sync._saver.flush()
        for i in range(MIN_COMPACT + 10):  # a service that comes and goes
            sync._on_service(entry_msg("pi-1", "flappy", payload=b"" if i % 2 else None))
            await sync._saver.flush()
        assert sync._log.rewrites == 2  # the first save, then once the appends outgrew the one live entry
        assert (tmp_path / LOG_FILE).stat().st_size < 40 * 1024
        assert registry_sync(tmp_path, Registry()).restore() == len(sync.entries.get("pi-1", {}))

    asyncio.run(main())


def tear(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b'["e", "pi-1", "s9", ')  # a power cut in the middle of an append


def test_a_torn_last_record_is_skipped_and_the_next_save_rewrites(tmp_path):
    async def main() -> None:
        sync = registry_sync(tmp_path, Registry())
        for s in range(3):
            sync._on_service(entry_msg("pi-1", f"s{s}"))
        await sync._saver.flush()
        path = tmp_path / LOG_FILE
        tear(path)
        loaded = read_log(str(path))
        assert loaded is not None and loaded.torn == 1 and sorted(loaded.entries["pi-1"]) == ["s0", "s1", "s2"]
        again = registry_sync(tmp_path, Registry())
        assert again.restore() == 3
        await again._saver.flush()  # damage seen: rewritten whole, nothing appended after the torn line
        assert read_log(str(path)).torn == 0 and again._log.rewrites == 1

    asyncio.run(main())


def test_the_json_document_of_an_earlier_version_is_read_once_and_becomes_the_log(tmp_path):
    async def main() -> None:
        old = registry_sync(tmp_path, Registry())
        old._on_service(entry_msg("pi-1", "thermo"))
        (tmp_path / STATE_FILE).write_text(json.dumps(old.state()))
        sync = registry_sync(tmp_path, Registry())
        assert sync.restore() == 1
        await sync._saver.flush()
        assert not (tmp_path / STATE_FILE).exists()
        assert registry_sync(tmp_path, Registry()).restore() == 1

    asyncio.run(main())


_WRITER = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from test_cloud_registry import entry_msg, registry_sync
from edged.registry import Registry
import edged.cloud.registry_log as rl
rl.MIN_COMPACT = 50  # rewrites often, so that the kill falls in one sometimes

async def main():
    sync = registry_sync(sys.argv[1], Registry())
    i = 0
    while True:
        for _ in range(20):
            sync._on_service(entry_msg(f"pi-{i % 40}", f"s{i % 400}", payload=b"" if i % 7 == 0 else None))
            i += 1
        await sync._saver.flush()
        print(f"saved {i}", flush=True)

asyncio.run(main())
"""


def test_a_kill_mid_append_or_rewrite_leaves_a_log_that_restores(tmp_path):
    """SIGKILL at random points of a writer that appends and rewrites without pause: each time, the log reads
    back (at most a torn last record) and restores into a registry."""
    for attempt in range(4):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(folder), str(REPO / "tests")], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            for _ in range(3 + attempt * 5):
                assert proc.stdout.readline().startswith("saved")
            time.sleep(0.003 * attempt)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        loaded = read_log(str(folder / LOG_FILE))
        assert loaded is not None and loaded.torn <= 1 and loaded.entries
        sync = registry_sync(folder, Registry())
        assert sync.restore() == sum(len(known) for known in loaded.entries.values()) > 0


def _temp_files(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(f".{LOG_FILE}.")]


def _fill(sync, nodes: range, services: int = 10) -> None:
    for n in nodes:
        sync._on_status(status_msg(f"pi-{n}"))
        for s in range(services):
            sync._on_service(entry_msg(f"pi-{n}", f"s{n}-{s}"))


def test_a_whole_rewrite_is_written_in_parts_with_the_loop_running_between_them(tmp_path):
    """3,000 entries (over 100 KiB): the loop runs while the temp file holds part of the new log, and the log
    written reads back whole."""

    async def main() -> None:
        sync = registry_sync(tmp_path, Registry())
        _fill(sync, range(300))
        seen: list[int] = []  # sizes of the temp file seen by another task during the save

        async def watch() -> None:
            while True:
                for name in _temp_files(tmp_path):
                    with contextlib.suppress(FileNotFoundError):
                        seen.append((tmp_path / name).stat().st_size)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        await sync._saver.flush()
        watcher.cancel()
        final = (tmp_path / LOG_FILE).stat().st_size
        assert final > rl.PART_BYTES
        assert any(0 < size < final for size in seen)  # written in parts, other tasks running in between
        assert sync._log.rewrites == 1 and not _temp_files(tmp_path)
        assert registry_sync(tmp_path, Registry()).restore() == 3000

    asyncio.run(main())


def test_a_rewrite_cut_short_leaves_the_old_log_whole_and_the_last_flush_writes_everything(tmp_path):
    """A stop cancels the saver mid-rewrite: the old log is untouched, no temp file stays, and the flush that
    follows (as `CloudTier.stop` does) saves what memory holds."""

    async def main() -> None:
        sync = registry_sync(tmp_path, Registry())
        _fill(sync, range(10))
        await sync._saver.flush()
        old = (tmp_path / LOG_FILE).read_bytes()
        _fill(sync, range(10, 300))
        sync._mark_all()
        saving = asyncio.create_task(sync._saver.flush())
        for _ in range(1_000_000):  # until a part of the new log is written (a task yields between parts)
            if any((tmp_path / name).stat().st_size > rl.PART_BYTES for name in _temp_files(tmp_path)):
                break
            await asyncio.sleep(0)
        saving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saving
        assert (tmp_path / LOG_FILE).read_bytes() == old and not _temp_files(tmp_path)
        assert registry_sync(tmp_path, Registry()).restore() == 100
        await sync._saver.flush()
        assert registry_sync(tmp_path, Registry()).restore() == 3000

    asyncio.run(main())


_MID_SAVE = r"""
import asyncio, os, sys, time
sys.path.insert(0, sys.argv[2])
from test_cloud_registry import entry_msg, registry_sync
from test_registry_log import _fill, _temp_files
from edged.registry import Registry

async def main():
    sync = registry_sync(sys.argv[1], Registry())
    _fill(sync, range(10))
    await sync._saver.flush()
    _fill(sync, range(10, 300))
    sync._mark_all()

    async def stop_mid_save():  # the process dies with the new log half written
        while not any(os.path.getsize(os.path.join(sys.argv[1], n)) > 0 for n in _temp_files(sys.argv[1])):
            await asyncio.sleep(0)
        print("mid", flush=True)
        time.sleep(60)

    asyncio.ensure_future(stop_mid_save())
    await sync._saver.flush()
    print("done", flush=True)

asyncio.run(main())
"""


def test_a_kill_mid_rewrite_leaves_the_old_log_whole(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _MID_SAVE, str(tmp_path), str(REPO / "tests")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "mid\n"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    loaded = read_log(str(tmp_path / LOG_FILE))
    assert loaded is not None and loaded.torn == 0 and len(loaded.entries) == 10  # the first save, whole
    assert _temp_files(tmp_path)  # the half-written new log, never renamed
    assert registry_sync(tmp_path, Registry()).restore() == 100  # and its StateStore removed the temp file
    assert not _temp_files(tmp_path)


def test_a_burst_of_a_thousand_entries_and_the_first_save_after_it_trim_the_allocator(tmp_path):
    """The arenas a burst's messages left part-used go back to the OS once it is applied (and after the first
    whole save); a few changes do not pay for a pass over the arenas."""
    from edged import memory

    async def applied(sync) -> None:
        for _ in range(100_000):
            if not sync._touched and sync._apply_timer is None:
                return
            await asyncio.sleep(0.01)

    async def main() -> None:
        registry = Registry()
        sync = registry_sync(tmp_path, registry)
        calls = memory.trim.calls
        _fill(sync, range(5))
        await applied(sync)
        assert memory.trim.calls == calls and len(registry.snapshot().services) == 50
        _fill(sync, range(5, 110))
        await applied(sync)
        assert memory.trim.calls == calls + 1 and len(registry.snapshot().services) == 1100
        await sync._saver.flush()  # the first save: rewritten whole
        assert memory.trim.calls == calls + 2
        _fill(sync, range(110, 115))
        await applied(sync)
        await sync._saver.flush()  # appended
        assert memory.trim.calls == calls + 2 and sync._log.appends == 1

    asyncio.run(main())
