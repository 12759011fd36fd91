"""Structured logs on stdout, one line per record: JSON for machines, key=value text for humans.

Under systemd, journald captures stdout. When the stream *is* the journal (JOURNAL_STREAM names it),
each line starts with a syslog priority prefix ("<6>") that journald strips and turns into the
record's priority, and the text format leaves out the timestamp that journald already records.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import TextIO

from .errors import EdgedError

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("json", "text")

_FIELDS = "edged_fields"  # LogRecord attribute that carries log_event's fields
_EVENT = "edged_event"  # set when the message is an event name rather than free text
_RESERVED = frozenset({"ts", "level", "logger", "event", "msg", "exc"})
_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class LoggingError(EdgedError, ValueError):
    """An unknown log level or format was asked for."""


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: object) -> None:
    """Log `event` (a short stable name like "endpoint.down") with structured `fields`.

    `exc_info=True` among the fields attaches the current exception.
    """
    if not logger.isEnabledFor(level):
        return
    exc_info = fields.pop("exc_info", None)
    logger.log(level, event, exc_info=exc_info, extra={_FIELDS: fields, _EVENT: True}, stacklevel=2)


def _level_name(record: logging.LogRecord) -> str:
    return record.levelname.lower()


def _syslog_prefix(record: logging.LogRecord) -> str:
    level = record.levelno
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if level >= threshold:
            return f"<{_SYSLOG[threshold]}>"
    return "<7>"


def _iso_ms(created: float) -> str:
    return datetime.fromtimestamp(created, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields = getattr(record, _FIELDS, None)
    if not fields:
        return {}
    # A field may not overwrite the record's own keys; it keeps its value under "_key".
    return {(f"_{k}" if k in _RESERVED else k): v for k, v in fields.items()}


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "event" | "msg", ...fields, "exc"} on one line."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _iso_ms(record.created),
            "level": _level_name(record),
            "logger": record.name,
        }
        key = "event" if getattr(record, _EVENT, False) else "msg"
        out[key] = record.getMessage()
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        line = json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))
        return _syslog_prefix(record) + line if self.journal else line


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if not text or any(c in text for c in ' ="\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """`[TS] LEVEL logger event key=value ...`, the timestamp left out under journald."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        parts = [] if self.journal else [_iso_ms(record.created)]
        parts += [record.levelname, record.name, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return _syslog_prefix(record) + line if self.journal else line


def _is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald stream systemd gave us (JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True  # not a real file (tests, wrappers): trust the variable
    return value == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send every logger's records to `stream` (default: stdout) as `fmt` lines, at `level` and above.

    Calling it again replaces the handler it installed before instead of adding a second one.
    """
    levelno = LEVELS.get(level.lower()) if isinstance(level, str) else None
    if levelno is None:
        raise LoggingError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise LoggingError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    stream = sys.stdout if stream is None else stream
    journal = _is_journal(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(journal) if fmt == "json" else TextFormatter(journal))
    handler.set_name("edged")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "edged":
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
