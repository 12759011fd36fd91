"""The persisted cloud registry: an append-only log of what changed, rewritten whole now and then.

A box that follows a whole fleet keeps about 10,000 entries; rewriting all of them (a 4-7 MB JSON document)
at every save held the event loop for 0.2-0.5 s and wrote as much to the SD card. Instead each save appends
the records that changed since the last one (one write and one fsync, in a thread), and the file is rewritten
whole (temp file, fsync, rename: `state.atomic_write`) only at the first save after a start and when the
appended records outgrow the live ones. Entries are stored by shape (`registry_sync.Shape`: an entry without
its node and service name), each shape once per file, so the file is about 40 bytes per entry.

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..state import MAX_STATE_BYTES, StateError, StateStore, atomic_write

log = logging.getLogger("edged.cloud.registry")

LOG_FILE = "cloud-registry.log"
FORMAT = 3
MIN_COMPACT = 1024  # appended records before a rewrite is considered at all
MAX_LINE = 64 * 1024  # a longer line is damage: an entry is at most a few KiB

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
        self.rewrites = 0
        self.appends = 0

    def force_rewrite(self) -> None:
        """The next save rewrites the file whole (the memory holds what the file lacks)."""
        self._rewrite = True

    @property
    def rewrite_pending(self) -> bool:
        return self._rewrite

    def rewrite_due(self, changed: int, live: int) -> bool:
        """Whether this save should rewrite the file whole rather than append `changed` records."""
        return self._rewrite or self._appended + changed > max(MIN_COMPACT, live)

    async def rewrite(self, entries: list[EntryRecord], nodes: list[NodeRecord]) -> bool:
        """Replace the file with these live records (encoded and written in a thread). False if it failed
        (logged; the next save rewrites again)."""
        return await self._write(self._rewrite_now, entries, nodes)

    async def append(self, entries: list[EntryRecord], nodes: list[NodeRecord]) -> bool:
        """Append these changed records (encoded and written in a thread). False if it failed (logged; the
        next save rewrites the file whole: what was lost is in memory)."""
        if not entries and not nodes:
            return True
        return await self._write(self._append_now, entries, nodes)

    async def _write(self, how, entries: list[EntryRecord], nodes: list[NodeRecord]) -> bool:
        """Run `how` (rewrite or append) in a thread; on failure log it and rewrite whole next time."""
        try:
            await asyncio.to_thread(how, entries, nodes)
        except StateError as exc:
            self._rewrite = True
            log.error("could not save the cloud registry: %s", exc)
            return False
        return True

    def _lines(self, entries: Iterable[EntryRecord], nodes: Iterable[NodeRecord]) -> list[str]:
        out = []
        dumps = json.dumps
        for node, key, shape in entries:
            if shape is None:
                out.append(dumps(["e", node, key, None]))
                continue
            sid = self._ids.get(shape.cbor)
            if sid is None:
                sid = self._ids[shape.cbor] = len(self._ids)
                out.append(dumps(["s", sid, base64.b64encode(shape.cbor).decode()]))
            out.append(dumps(["e", node, key, sid]))
        for node, status in nodes:
            out.append(dumps(["n", node, status], separators=(",", ":")))
        return out

    def _rewrite_now(self, entries: list[EntryRecord], nodes: list[NodeRecord]) -> None:
        self._ids = {}
        lines = [json.dumps(self.header), *self._lines(entries, nodes)]
        try:
            os.makedirs(self.store.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateError(self.store.directory, exc.strerror or str(exc)) from exc
        atomic_write(self.path, ("\n".join(lines) + "\n").encode())
        self._rewrite = False
        self._appended = 0
        self.rewrites += 1

    def _append_now(self, entries: list[EntryRecord], nodes: list[NodeRecord]) -> None:
        known = dict(self._ids)
        lines = self._lines(entries, nodes)
        data = ("\n".join(lines) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                view = memoryview(data)
                while view:  # a crash leaves at most one torn line, at the end
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._ids = known  # shapes not on disk must be written again
            raise StateError(self.path, exc.strerror or str(exc)) from exc
        self._appended += len(lines)
        self.appends += 1
