"""The persisted cloud registry: an append-only log of what changed, rewritten whole now and then.

A box that follows a whole fleet keeps about 10,000 entries; rewriting all of them (a 4-7 MB JSON document)
at every save held the event loop for 0.2-0.5 s and wrote as much to the SD card. Instead each save appends
the records that changed since the last one (one write and one fsync, in a thread), and the file is rewritten
whole (`state.AtomicFile`: temp file, fsync, rename) only at the first save after a start and when the
appended records outgrow the live ones. Either way the records are encoded on the event loop in parts of at
most 64 KiB or about 2 ms, the loop running in between: encoding in a thread held the GIL against the loop (a task
waiting for its turn during the first save of 10,000 entries waited up to 22-27 ms). Entries are stored by
shape (`registry_sync.Shape`: an entry without its node and service name), each shape once per file, so the
file is about 40 bytes per entry.

`cloud-registry.log`, one JSON value a line:
  {"format": 3, "prefix": "hubmesh", "fleet": "home"}     the header, first line
  ["s", 7, "<base64 CBOR>"]                              shape 7 (numbered within the file)
  ["e", "pi-2", "thermo", 7]                             pi-2's entry "thermo" has shape 7 (null: deleted)
  ["n", "pi-2", {"state": "online", ...}]                pi-2's compact status (null: forgotten)

Crash safety: a torn last line (power cut mid-append) is ignored when reading, and since the first save
after a start rewrites the file whole, nothing is ever appended after a torn line. A kill mid-rewrite leaves
the previous file (the rename is the commit) and a temp file that `StateStore` removes at the next start.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..state import MAX_STATE_BYTES, AtomicFile, StateError, StateStore

log = logging.getLogger("edged.cloud.registry")

LOG_FILE = "cloud-registry.log"
FORMAT = 3
MIN_COMPACT = 1024  # appended records before a rewrite is considered at all
MAX_LINE = 64 * 1024  # a longer line is damage: an entry is at most a few KiB
# A save encodes at most about this much, or for this long, before the event loop runs again (a local call
# waits for the part being encoded at worst); the clock is read every CHECK_EVERY records. Joining, encoding
# and writing the part add up to half a millisecond: a part is some 2 ms of the loop in all.
PART_BYTES = 64 * 1024
PART_SECONDS = 0.0015
CHECK_EVERY = 32

EntryRecord = tuple[str, str, Any]  # (node, key, Shape or None: deleted)
NodeRecord = tuple[str, "dict | None"]  # (node, its status as a dict, or None: forgotten)


@dataclass
class Loaded:
    """What a log holds: the last record of each entry and node (deletions applied)."""

    header: dict = field(default_factory=dict)
    shapes: dict[int, bytes] = field(default_factory=dict)  # id -> shape CBOR
    entries: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> key -> shape id
    nodes: dict[str, dict] = field(default_factory=dict)  # node -> status
    records: int = 0  # lines read (for the rewrite decision)
    torn: int = 0  # bad lines skipped (a torn tail after a crash)


def read_log(path: str, max_bytes: int = MAX_STATE_BYTES) -> Loaded | None:
    """The log at `path`, replayed; None when there is none (or it is over `max_bytes`, or not a log)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                log.warning("%s is over %d bytes: not read", path, max_bytes)
                return None
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    lines = data.split(b"\n")
    out = Loaded()
    try:
        header = json.loads(lines[0])
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return None
    out.header = header
    try:  # the whole file as one JSON array: one call of the C decoder (a line at a time costs 3x more)
        records = json.loads(b"[" + b",".join(line for line in lines[1:] if line) + b"]")
        for rec in records:
            _replay(out, rec)
        out.records = len(records)
        return out
    except (ValueError, TypeError, IndexError, RecursionError):
        out = Loaded(header=header)  # a torn or damaged line: a line at a time, skipping the bad ones
    for line in lines[1:]:
        if not line:
            continue
        try:
            if len(line) > MAX_LINE:
                raise ValueError("line too long")
            rec = json.loads(line)
            _replay(out, rec)
        except (ValueError, TypeError, IndexError, RecursionError):
            out.torn += 1  # a torn tail (a crash mid-append) or damage: skipped, rewritten at the next save
            continue
        out.records += 1
    return out


def _replay(out: Loaded, rec: Any) -> None:
    kind = rec[0]
    if kind == "s" and isinstance(rec[1], int) and isinstance(rec[2], str):
        out.shapes[rec[1]] = base64.b64decode(rec[2], validate=True)
    elif kind == "e" and isinstance(rec[1], str) and isinstance(rec[2], str):
        if rec[3] is None:
            known = out.entries.get(rec[1])
            if known is not None:
                known.pop(rec[2], None)
        elif isinstance(rec[3], int):
            out.entries.setdefault(rec[1], {})[rec[2]] = rec[3]
        else:
            raise ValueError("bad entry record")
    elif kind == "n" and isinstance(rec[1], str):
        if rec[2] is None:
            out.nodes.pop(rec[1], None)
        elif isinstance(rec[2], dict):
            out.nodes[rec[1]] = rec[2]
        else:
            raise ValueError("bad node record")
    else:
        raise ValueError("unknown record")


class RegistryLog:
    """Writes the log of one registry (`header`: its prefix and fleet). One write at a time: the caller (the
    state saver) awaits each before the next."""

    def __init__(self, store: StateStore, header: dict, name: str = LOG_FILE) -> None:
        self.store = store
        self.path = store.path(name)
        self.header = {"format": FORMAT, **header}
        self._ids: dict[bytes, int] = {}  # shape CBOR -> its id in the file as written
        self._appended = 0  # records appended since the last rewrite
        self._rewrite = True  # the first save after a start rewrites the file (see the module doc)
        self._forced = 0  # `force_rewrite` calls: one during a rewrite asks for another
        self.rewrites = 0
        self.appends = 0
        self.lines = 0  # records encoded, ever

    def force_rewrite(self) -> None:
        """The next save rewrites the file whole (the memory holds what the file lacks)."""
        self._rewrite = True
        self._forced += 1

    @property
    def rewrite_pending(self) -> bool:
        return self._rewrite

    def rewrite_due(self, changed: int, live: int) -> bool:
        """Whether this save should rewrite the file whole rather than append `changed` records."""
        return self._rewrite or self._appended + changed > max(MIN_COMPACT, live)

    async def rewrite(self, entries: Iterable[EntryRecord], nodes: Iterable[NodeRecord]) -> bool:
        """Replace the file with these live records. False if it failed (logged; the next save rewrites again).

        Encoded on the loop in parts (`PART_BYTES`, `PART_SECONDS`), each written to a temp file, with the loop
        free between parts; the fsync and rename run in a thread. The old file stays whole until the rename: a
        crash, a failure or a cancellation mid-save loses nothing that was saved before."""
        try:
            try:
                os.makedirs(self.store.directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StateError(self.store.directory, exc.strerror or str(exc)) from exc
            forced = self._forced
            self._ids = {}
            self._rewrite = True  # until the rename: a save cut short leaves shapes numbered in no file
            with AtomicFile(self.path) as f:
                f.write((json.dumps(self.header) + "\n").encode())
                async for part in self._parts(entries, nodes):
                    f.write(part)
                await asyncio.to_thread(f.commit)
        except StateError as exc:
            log.error("could not save the cloud registry: %s", exc)
            return False
        self._rewrite = forced != self._forced
        self._appended = 0
        self.rewrites += 1
        return True

    async def append(self, entries: Iterable[EntryRecord], nodes: Iterable[NodeRecord]) -> bool:
        """Append these changed records (encoded on the loop in parts, written and fsynced in a thread). False
        if it failed (logged; the next save rewrites the file whole: what was lost is in memory)."""
        known, lines = dict(self._ids), self.lines
        try:
            parts = [part async for part in self._parts(entries, nodes)]
            if not parts:
                return True
            await asyncio.to_thread(self._append_now, parts)
        except BaseException as exc:  # a cancellation too: the shapes numbered meanwhile are not on disk
            self._ids = known
            self._rewrite = True
            if not isinstance(exc, StateError):
                raise
            log.error("could not save the cloud registry: %s", exc)
            return False
        self._appended += self.lines - lines
        self.appends += 1
        return True

    async def _parts(self, entries: Iterable[EntryRecord], nodes: Iterable[NodeRecord]) -> AsyncIterator[bytes]:
        """The records' lines, a part at a time: at most about `PART_BYTES` and `PART_SECONDS` of encoding each,
        with the loop free between parts."""
        clock = time.perf_counter
        lines: list[str] = []
        size = 0
        started = clock()
        for rec in self._records(entries, nodes):
            lines.append(rec)
            size += len(rec) + 1
            if size >= PART_BYTES or (len(lines) % CHECK_EVERY == 0 and clock() - started >= PART_SECONDS):
                yield ("\n".join(lines) + "\n").encode()
                lines, size = [], 0
                await asyncio.sleep(0)
                started = clock()
        if lines:
            yield ("\n".join(lines) + "\n").encode()

    def _records(self, entries: Iterable[EntryRecord], nodes: Iterable[NodeRecord]) -> Iterator[str]:
        """One line per record (a shape's line before the first entry that uses it)."""
        dumps = json.dumps
        for node, key, shape in entries:
            self.lines += 1
            if shape is None:
                yield dumps(["e", node, key, None])
                continue
            sid = self._ids.get(shape.cbor)
            if sid is None:
                sid = self._ids[shape.cbor] = len(self._ids)
                self.lines += 1
                yield dumps(["s", sid, base64.b64encode(shape.cbor).decode()])
            yield dumps(["e", node, key, sid])
        for node, status in nodes:
            self.lines += 1
            yield dumps(["n", node, status], separators=(",", ":"))

    def _append_now(self, parts: list[bytes]) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                for data in parts:
                    view = memoryview(data)
                    while view:  # a crash leaves at most one torn line, at the end
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StateError(self.path, exc.strerror or str(exc)) from exc
