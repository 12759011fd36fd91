from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.errors import EdgedError
from edged.logs import log_event, setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if h.get_name() == "edged"]


def test_json_lines_carry_event_fields_and_utc_ms_timestamp() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log = logging.getLogger("edged.router")
    log_event(log, logging.INFO, "call.done", service="thermo", tier="local", ms=1.25, tags=["a"])
    log_event(log, logging.DEBUG, "too.quiet", x=1)
    log.warning("plain %s message", "printf")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "call.done" and "msg" not in first
    assert first["level"] == "info" and first["logger"] == "edged.router"
    assert (first["service"], first["tier"], first["ms"], first["tags"]) == ("thermo", "local", 1.25, ["a"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second == {**second, "level": "warning", "msg": "plain printf message"}
    assert "event" not in second


def test_exceptions_and_reserved_names_in_json() -> None:
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    log = logging.getLogger("edged.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log_event(log, logging.ERROR, "oops", exc_info=True, level="mine", path=Path("/x"))
        log.exception("with logger.exception")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert "ValueError: boom" in first["exc"] and "Traceback" in first["exc"]
    assert first["level"] == "error" and first["_level"] == "mine"
    assert first["path"] == "/x"  # non-JSON values are written as their str()
    assert "ValueError: boom" in second["exc"]


def test_text_format_for_humans() -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    log_event(logging.getLogger("edged.health"), logging.WARNING, "endpoint.down", endpoint="a b", fails=3)
    line = out.getvalue().rstrip("\n")
    m = re.fullmatch(r"(\S+) WARNING edged\.health endpoint\.down endpoint=\"a b\" fails=3", line)
    assert m, line
    assert m.group(1).endswith("Z")


def test_text_format_under_journald_omits_timestamp_and_adds_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    out = io.StringIO()  # no file descriptor: the variable alone decides
    setup_logging("info", "text", stream=out)
    log_event(logging.getLogger("edged"), logging.ERROR, "started", port=7700)
    assert out.getvalue() == "<3>ERROR edged started port=7700\n"


def test_journal_stream_must_match_the_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.log"
    with open(path, "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("info", "text", stream=f)
        logging.getLogger("edged").info("matched")
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # stdout was redirected elsewhere
        setup_logging("info", "text", stream=f)
        logging.getLogger("edged").info("other")
    matched, other = path.read_text().splitlines()
    assert matched == "<6>INFO edged matched"
    assert re.fullmatch(r"\S+Z INFO edged other", other)


def test_setup_is_idempotent_and_validates() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "json", stream=first)
    setup_logging("debug", "json", stream=second)
    assert len(_ours()) == 1
    logging.getLogger("edged.x").debug("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1
    with pytest.raises(EdgedError):
        setup_logging("loud", "json", stream=second)
    with pytest.raises(EdgedError):
        setup_logging("info", "xml", stream=second)
    assert len(_ours()) == 1


def test_default_stream_is_stdout_of_a_real_process() -> None:
    code = (
        "import logging; from edged.logs import setup_logging, log_event;"
        "setup_logging(); setup_logging();"
        "log_event(logging.getLogger('edged'), logging.INFO, 'hello', n=1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert json.loads(line)["event"] == "hello"
    assert done.stderr == ""
