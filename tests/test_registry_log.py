"""The persisted cloud registry (`edged.cloud.registry_log`): appended changes, rewrites, crash safety."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_cloud_registry import TOPICS, entry_msg, registry_sync

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
