"""Durable state under /var/lib/edged: what must survive a reboot with no network.

Files are written whole and atomically (temp file, fsync, rename, fsync of the folder), so a power cut
leaves either the old or the new version, never a torn one. A file that cannot be read back is moved
aside and replaced by the caller's default: a bad state file must never stop the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable

from .errors import EdgedError

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"
# A state document past this size is moved aside unread: decoding JSON takes several times its size in memory
# (a 100 MB file peaked at 346 MB RSS), and nothing edged keeps comes near it (10,000 registrations ~ 5 MB).
MAX_STATE_BYTES = 32 * 2**20


class StateError(EdgedError):
    """A state file could not be written (disk full, read-only, permissions) or its name is invalid."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable. Filesystems that cannot fsync a folder are tolerated."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class AtomicFile:
    """A file replaced atomically and durably, written in parts: `write` the parts (to a temp file in the same
    folder: a rename is only atomic within one filesystem), then `commit` (fsync, rename, fsync of the folder).
    Until the commit `path` keeps its old contents whole, whatever happens: a file left uncommitted (an
    error, a cancelled save) is removed by `abort` or on leaving the `with` block, and a crash leaves only a
    temp file, which `StateStore` removes at the next start. OS failures raise StateError.
    """

    def __init__(self, path: str, mode: int = 0o600) -> None:
        import tempfile  # with shutil: only once something is written (an idle daemon may never)

        self.path = path
        self._directory = os.path.dirname(os.path.abspath(path))
        self.size = 0  # bytes written so far
        try:
            fd, self._tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(path)}.", suffix=_TMP_SUFFIX, dir=self._directory
            )
        except OSError as exc:
            raise StateError(path, exc.strerror or str(exc)) from exc
        self._fd: int | None = fd
        try:
            os.fchmod(fd, mode)
        except OSError as exc:
            self.abort()
            raise StateError(path, exc.strerror or str(exc)) from exc

    def __repr__(self) -> str:
        state = "open" if self._fd is not None else "closed"
        return f"AtomicFile({self.path!r}, {state}, {self.size} bytes)"

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # after a commit: nothing left to do

    def write(self, data: bytes) -> None:
        """Append `data` to the new contents (not visible at `path` before `commit`)."""
        if self._fd is None:
            raise StateError(self.path, "write after commit or abort")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.abort()
            raise StateError(self.path, exc.strerror or str(exc)) from exc
        self.size += len(data)

    def commit(self) -> None:
        """Make what was written the file at `path`: fsync, rename over it, fsync the folder. Blocks on the
        disk (tens of ms on an SD card): from the event loop, run it in a thread."""
        if self._fd is None:
            raise StateError(self.path, "commit after commit or abort")
        fd, self._fd = self._fd, None
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            raise StateError(self.path, exc.strerror or str(exc)) from exc
        try:
            _fsync_dir(self._directory)
        except OSError as exc:
            raise StateError(self.path, exc.strerror or str(exc)) from exc

    def abort(self) -> None:
        """Drop what was written (`path` keeps its old contents); nothing to do after a commit."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably (`AtomicFile` in one part); raises StateError on any
    OS failure, with the temp file removed."""
    with AtomicFile(path, mode) as f:
        f.write(data)
        f.commit()


class StateStore:
    """JSON documents by name in one folder (`[state] dir`), written atomically.

    `write_json` blocks on fsync (tens of milliseconds on an SD card); from the event loop use
    `async_write_json`, which writes in a thread and never lets an older document overwrite a newer one.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._seq = 0
        self._written: dict[str, int] = {}  # name -> sequence number of the document on disk
        self._remove_stale_temps()

    def __repr__(self) -> str:
        return f"StateStore({self.directory!r}, written={sorted(self._written)})"

    def path(self, name: str) -> str:
        """The file of document `name`; names are plain file names ("registrations.json")."""
        if not name or name != os.path.basename(name) or name.startswith(".") or "\0" in name:
            raise StateError(os.path.join(self.directory, name), "invalid state file name")
        return os.path.join(self.directory, name)

    def read_json(self, name: str, default: object, max_bytes: int = MAX_STATE_BYTES) -> object:
        """The document `name`, or `default` when it is missing, unreadable, corrupt or over `max_bytes`.

        An unreadable, corrupt or oversized file is logged and moved aside to `NAME.corrupt-<unix ts>` (an
        oversized one before a byte of it is read). When `default` is a dict or a list, a document of another
        JSON type counts as corrupt too, so that callers can trust the shape they asked for.
        """
        path = self.path(name)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    return self._set_aside(path, f"{size} bytes, over the limit of {max_bytes} (not read)", default)
                raw = f.read(max_bytes + 1)
        except FileNotFoundError:
            return default
        except OSError as exc:
            return self._set_aside(path, f"unreadable: {exc.strerror or exc}", default)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            return self._set_aside(path, f"corrupt: {exc}", default)
        if isinstance(default, (dict, list)) and not isinstance(obj, type(default)):
            return self._set_aside(path, f"expected a JSON {type(default).__name__}, got {type(obj).__name__}", default)
        return obj

    def write_json(self, name: str, obj: object) -> None:
        """Write document `name` atomically (creating the folder, 0700, on first use); StateError on failure."""
        self.write_bytes(name, self._encode(name, obj))

    def write_bytes(self, name: str, data: bytes) -> None:
        """`write_json` for a document its caller already encoded (as JSON)."""
        self._write_if_newest(name, data, self._next_seq())

    def async_write_json(self, name: str, obj: object) -> Awaitable[None]:
        """`write_json` in a thread; await the result. Call from the event loop.

        The document is encoded (and a bad one refused) at call time, not when awaited: later changes to
        `obj` are not seen, and of several writes in flight the last one called wins.
        """
        data = self._encode(name, obj)
        return asyncio.to_thread(self._write_if_newest, name, data, self._next_seq())

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _encode(self, name: str, obj: object) -> bytes:
        try:
            # Compact: json's C encoder does not indent, and the pure-Python one is 3-4x slower on the
            # event loop (a 1 MB fleet registry: 165 ms against 45).
            text = json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise StateError(self.path(name), f"not JSON-serializable: {exc}") from exc
        return (text + "\n").encode("utf-8")

    def _write_if_newest(self, name: str, data: bytes, seq: int) -> None:
        path = self.path(name)
        with self._lock:
            # Writes run in threads and may arrive out of order: the newest document wins.
            if self._written.get(name, 0) > seq:
                return
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StateError(self.directory, exc.strerror or str(exc)) from exc
            atomic_write(path, data)
            self._written[name] = seq

    def _set_aside(self, path: str, reason: str, default: object) -> object:
        aside = f"{path}.corrupt-{int(time.time())}"
        try:
            os.replace(path, aside)
        except OSError as exc:
            log.warning("state file %s is %s; could not move it aside (%s); using defaults", path, reason, exc)
        else:
            log.warning("state file %s is %s; moved to %s; using defaults", path, reason, aside)
        return default

    def _remove_stale_temps(self) -> None:
        """Temp files left by a crash in the middle of a write are garbage: remove them."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for entry in names:
            if entry.startswith(".") and entry.endswith(_TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, entry))
