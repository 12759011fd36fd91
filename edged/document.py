"""Checked documents: TOML with the line of every key, and typed reads that name the file, line and dotted key
of a bad value. Shared by the daemon config (`edged.config`), manifests (`edged.manifest`) and fleet config
documents (`edged.cloud.fleet`).
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from edged.errors import ConfigError
from edged.units import parse_duration, parse_size

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

KeyPath = tuple[str | int, ...]
Locate = Callable[[KeyPath], int | None]


# ------------------------------------------------------------------------------------------- checked reads

REQUIRED: Any = object()  # default that makes a key mandatory


def dotted(path: KeyPath) -> str:
    """`("endpoints", 1, "url")` -> `endpoints[1].url`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else repr(part)
            out += f".{name}" if out else name
    return out


def describe(value: object) -> str:
    """What a user wrote, in words: `a string ('3')`, `an integer (3)`, `a boolean (true)`."""
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"a string ({text!r})"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if value is None:
        return "null"
    return f"a {type(value).__name__} ({value})"


def format_seconds(seconds: float) -> str:
    """2.0 -> "2s", 0.5 -> "500ms": durations shown back the way users write them."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class Doc:
    """Where a decoded document came from, so that errors can name its file and line."""

    file: str
    locate: Locate | None = None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        line = self.locate(path) if self.locate is not None else None
        return ConfigError(self.file, message, line=line, key=dotted(path) or None)


class Table:
    """Checked, typed reads from one table (or array) of a decoded document.

    Each getter takes a default; `REQUIRED` makes the key mandatory. A wrong value raises `ConfigError` with
    the file, line and dotted key, saying what was expected and what was found.
    """

    __slots__ = ("data", "doc", "path")

    def __init__(self, doc: Doc, data: Mapping[str, object] | Sequence[object], path: KeyPath = ()):
        self.doc = doc
        self.data = data
        self.path = path

    # -- structure

    def names(self) -> list[str]:
        return [str(k) for k in self.data] if isinstance(self.data, Mapping) else []

    def __len__(self) -> int:
        return len(self.data)

    def has(self, key: str | int) -> bool:
        if isinstance(self.data, Mapping):
            return key in self.data
        return isinstance(key, int) and 0 <= key < len(self.data)

    def fail(self, key: str | int | None, message: str) -> NoReturn:
        """Raise a ConfigError at `key` of this table (None: at the table itself)."""
        raise self.doc.error(self.path if key is None else (*self.path, key), message)

    def only(self, allowed: Iterable[str]) -> None:
        """Refuse keys not in `allowed`, with a suggestion for a likely typo."""
        allowed = tuple(allowed)
        for key in self.names():
            if key not in allowed:
                import difflib  # only for a config error: not loaded by a daemon whose config is fine

                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
                self.fail(key, f"unknown key {key!r}; {hint}")

    def get(self, key: str | int, default: Any = REQUIRED) -> Any:
        """The raw value, or `default` when absent (a missing REQUIRED key raises)."""
        if self.has(key):
            return self.data[key]  # type: ignore[index]
        if default is REQUIRED:
            raise self.doc.error((*self.path, key), "missing required key")
        return default

    def table(self, key: str | int) -> Table:
        """A sub-table; an empty one when the key is absent."""
        value = self.get(key, {})
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a table, got {describe(value)}")
        return Table(self.doc, value, (*self.path, key))

    def array(self, key: str | int, default: Any = REQUIRED) -> Table:
        """A sub-array, as a Table indexed by position."""
        value = self.get(key, default)
        if not isinstance(value, (list, tuple)):
            self.fail(key, f"expected an array, got {describe(value)}")
        return Table(self.doc, value, (*self.path, key))

    # -- scalars

    def string(
        self,
        key: str | int,
        default: Any = REQUIRED,
        *,
        pattern: re.Pattern[str] | None = None,
        what: str = "a string",
        allow_empty: bool = False,
    ) -> Any:
        if not self.has(key):
            return self.get(key, default)
        value = self.data[key]  # type: ignore[index]
        if not isinstance(value, str):
            self.fail(key, f"expected {what}, got {describe(value)}")
        if not value and not allow_empty:
            self.fail(key, f"expected {what}, got an empty string")
        if pattern is not None and value and not pattern.fullmatch(value):
            case = " (lower case only)" if pattern.fullmatch(value.lower()) else ""
            self.fail(key, f"expected {what}{case}, got {value!r}")
        return value

    def choice(self, key: str | int, default: Any, choices: Sequence[str]) -> Any:
        what = "one of " + ", ".join(repr(c) for c in choices)
        value = self.string(key, default, what=what)
        if self.has(key) and value not in choices:
            self.fail(key, f"expected {what}, got {value!r}")
        return value

    def boolean(self, key: str | int, default: Any = REQUIRED) -> Any:
        value = self.get(key, default)
        if self.has(key) and not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {describe(value)}")
        return value

    def integer(self, key: str | int, default: Any = REQUIRED, *, lo: int | None = None, hi: int | None = None) -> Any:
        value = self.get(key, default)
        if not self.has(key):
            return value
        if lo is not None and hi is not None:
            what = f"an integer from {lo} to {hi}"
        elif lo is not None:
            what = f"an integer >= {lo}"
        else:
            what = "an integer"
        # bool is an int subclass in Python, never in a config file
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected {what}, got {describe(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(key, f"expected {what}, got {value}")
        return value

    def number(self, key: str | int, default: Any = REQUIRED, *, lo: float, hi: float) -> Any:
        value = self.get(key, default)
        if not self.has(key):
            return value
        what = f"a number from {lo:g} to {hi:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"expected {what}, got {describe(value)}")
        if math.isnan(value) or not lo <= value <= hi:
            self.fail(key, f"expected {what}, got {value}")
        return float(value)

    def duration(self, key: str | int, default: Any = REQUIRED, *, positive: bool = True) -> Any:
        """Seconds, from "300ms" / "2s" / "1m" or a bare number of seconds."""
        value = self.get(key, default)
        if not self.has(key):
            return value
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.fail(key, f"expected a duration like '2s' or '300ms', got {describe(value)}")
        if not math.isfinite(seconds) or (positive and seconds <= 0):
            self.fail(key, f"expected a duration > 0, got {describe(value)}")
        return seconds

    def size(self, key: str | int, default: Any = REQUIRED) -> Any:
        """Bytes, from "1MiB" / "64KiB" or a bare number of bytes; must be > 0."""
        value = self.get(key, default)
        if not self.has(key):
            return value
        try:
            size = parse_size(value)
        except ValueError:
            self.fail(key, f"expected a size like '1MiB' or '64KiB', got {describe(value)}")
        if size <= 0:
            self.fail(key, f"expected a size > 0, got {describe(value)}")
        return size

    def strings(self, key: str | int, default: Any = REQUIRED, **string_options: Any) -> Any:
        """An array of strings, as a tuple; each element checked like `string()`."""
        if not self.has(key):
            return self.get(key, default)
        items = self.array(key)
        return tuple(items.string(i, **string_options) for i in range(len(items)))


# ------------------------------------------------------------------------------------ TOML and its lines


# A config or manifest file past this size is refused unread: no service needs a megabyte to declare, and a
# huge file would cost the decoders many times its size in memory.
MAX_FILE_BYTES = 2**20


def read_text(path: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A config or manifest file's text; ConfigError when it cannot be read, is over `max_bytes` (checked before
    reading) or is not UTF-8."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ConfigError(path, f"{size} bytes, over the limit of {max_bytes // 2**20} MiB")
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:  # grew while we read it
        raise ConfigError(path, f"over the limit of {max_bytes // 2**20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, f"not UTF-8 text (byte {exc.start})", line=line) from None


def refusal(path: str, exc: Exception) -> ConfigError:
    """What any unforeseen failure of decoding or checking a file (a library's own exception, a nesting deeper
    than Python's stack) becomes: the usual refusal that names the file."""
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, RecursionError):
        return ConfigError(path, "nested too deeply")
    return ConfigError(path, f"cannot be read: {type(exc).__name__}: {exc}"[:500])


_TOML_WHERE = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)\s*$")


def parse_toml(text: str, file: str) -> dict[str, Any]:
    """Decode TOML; a syntax error becomes a ConfigError with the line tomllib reported."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _TOML_WHERE.search(message)
        line: int | None = None
        if m:
            message = message[: m.start()]
            if m.group(1):
                line = int(m.group(1))
                message += f" (column {m.group(2)})"
            else:
                line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        raise ConfigError(file, f"TOML syntax error: {message}", line=line) from None


def prefix_locator(lines: Mapping[KeyPath, int]) -> Locate:
    """A `locate` that answers with the line of the longest known prefix of a key path."""

    def locate(path: KeyPath) -> int | None:
        p = tuple(path)
        while p:
            if p in lines:
                return lines[p]
            p = p[:-1]
        return None

    return locate


def toml_locator(text: str) -> Locate:
    """`locate(key_path) -> line` for a TOML text that tomllib accepted (tomllib keeps no positions)."""
    return prefix_locator(toml_key_lines(text))


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}\n#]")


class _TomlScanner:
    """Walks TOML text and records the line of every key, table header and array element by key path."""

    def __init__(self, text: str):
        self.t = text
        self.i = 0
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.lines: dict[KeyPath, int] = {}
        self.aot: dict[KeyPath, int] = {}  # array-of-tables path -> elements seen so far

    def line(self, pos: int | None = None) -> int:
        return bisect.bisect_right(self.starts, self.i if pos is None else pos)

    def record(self, path: KeyPath, line: int) -> None:
        for n in range(1, len(path) + 1):
            self.lines.setdefault(path[:n], line)

    def skip(self, newlines: bool) -> None:
        t = self.t
        while self.i < len(t):
            c = t[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self.i += 1
            elif c == "#":
                end = t.find("\n", self.i)
                self.i = len(t) if end < 0 else end
            else:
                return

    def run(self) -> dict[KeyPath, int]:
        table: KeyPath = ()
        t = self.t
        while True:
            self.skip(newlines=True)
            if self.i >= len(t):
                return self.lines
            start = self.i
            line = self.line()
            if t.startswith("[[", self.i):
                self.i += 2
                table = self.resolve(self.keys(), new_element=True)
                self.record(table, line)
            elif t[self.i] == "[":
                self.i += 1
                table = self.resolve(self.keys(), new_element=False)
                self.record(table, line)
            else:
                path = table + self.keys()
                self.skip(newlines=False)
                if t.startswith("=", self.i):
                    self.i += 1
                    self.record(path, line)
                    self.skip(newlines=False)
                    self.value(path)
            # the rest of the line is a header's closing brackets or a comment; this also never loops in place
            nl = t.find("\n", max(self.i, start + 1))
            self.i = len(t) if nl < 0 else nl

    def resolve(self, keys: KeyPath, *, new_element: bool) -> KeyPath:
        """Header keys -> key path with array-of-tables indices (`[[a]]` then `[a.b]` -> ("a", n, "b"))."""
        out: KeyPath = ()
        for n, key in enumerate(keys):
            out += (key,)
            if new_element and n == len(keys) - 1:
                index = self.aot.get(out, 0)
                self.aot[out] = index + 1
                out += (index,)
            elif out in self.aot:
                out += (self.aot[out] - 1,)
        return out

    def keys(self) -> KeyPath:
        t = self.t
        out: list[str] = []
        while self.i < len(t):
            self.skip(newlines=False)
            if self.i >= len(t):
                break
            c = t[self.i]
            if c in "\"'":
                end = self.string_end()
                raw = t[self.i : end]
                self.i = end
                try:
                    out.append(tomllib.loads(f"k = {raw}")["k"])
                except (tomllib.TOMLDecodeError, KeyError):
                    out.append(raw[1:-1])
            else:
                m = _BARE_KEY.match(t, self.i)
                if not m:
                    break
                out.append(m.group())
                self.i = m.end()
            self.skip(newlines=False)
            if t.startswith(".", self.i):
                self.i += 1
                continue
            break
        return tuple(out)

    def string_end(self) -> int:
        """End offset of the string starting at self.i (basic, literal, or their multi-line forms)."""
        t, i = self.t, self.i
        for quote in ('"""', "'''"):
            if t.startswith(quote, i):
                j = i + 3
                while j < len(t):
                    if quote == '"""' and t[j] == "\\":
                        j += 2
                    elif t.startswith(quote, j):
                        end = j + 3
                        while end < len(t) and t[end] == quote[0] and end - j < 5:
                            end += 1
                        return end
                    else:
                        j += 1
                return len(t)
        quote = t[i]
        j = i + 1
        while j < len(t) and t[j] != quote and t[j] != "\n":
            j += 2 if quote == '"' and t[j] == "\\" else 1
        return min(j + 1, len(t))

    def value(self, path: KeyPath) -> None:
        t = self.t
        if self.i >= len(t):
            return
        c = t[self.i]
        if c == "[":
            self.i += 1
            index = 0
            while True:
                self.skip(newlines=True)
                if self.i >= len(t) or t[self.i] == "]":
                    self.i += 1
                    return
                self.record((*path, index), self.line())
                before = self.i
                self.value((*path, index))
                self.skip(newlines=True)
                if t.startswith(",", self.i):
                    self.i += 1
                    index += 1
                elif self.i == before:
                    return
        elif c == "{":
            self.i += 1
            while True:
                self.skip(newlines=True)
                if self.i >= len(t) or t[self.i] == "}":
                    self.i += 1
                    return
                line = self.line()
                sub = (*path, *self.keys())
                self.skip(newlines=False)
                if not t.startswith("=", self.i):
                    return
                self.i += 1
                self.record(sub, line)
                self.skip(newlines=False)
                self.value(sub)
                self.skip(newlines=True)
                if t.startswith(",", self.i):
                    self.i += 1
        elif c in "\"'":
            self.i = self.string_end()
        else:
            m = _SCALAR_END.search(t, self.i)
            self.i = len(t) if m is None else m.start()


def toml_key_lines(text: str) -> dict[KeyPath, int]:
    """Line (1-based) of each key, table header and array element of a TOML text, by key path."""
    scanner = _TomlScanner(text)
    try:
        return scanner.run()
    except (IndexError, ValueError, RecursionError):  # best effort: lines are a courtesy, never a crash
        return scanner.lines
