"""Logging: virtlockd-style filters, journald's native protocol, runtime changes."""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from freezegun import freeze_time

from lockd import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logs.configure("warning", "", "stderr")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_filters_parse_names_and_virtlockd_numbers() -> None:
    assert logs.parse_filters("debug:actors.owners 3:lockd.server") == {
        "actors.owners": "debug",
        "lockd.server": "warning",
    }
    with pytest.raises(logs.LogFilterError, match="bad log filter 'loud:x'"):
        logs.parse_filters("loud:x")
    with pytest.raises(logs.LogFilterError):
        logs.parse_filters("debug")


def test_a_filter_on_the_root_logger_is_refused_and_changes_nothing() -> None:
    """ "root" names the root logger: a filter on it, once cleared, left the root at
    NOTSET, logging everything at debug while reporting level "notset"."""
    logs.configure("info", "", "stderr")
    with pytest.raises(logs.LogFilterError, match="log_level"):
        logs.configure("info", "info:root", "stderr")
    logs.configure("info", "", "stderr")
    assert logs.current()["level"] == "info"
    assert logging.getLogger().getEffectiveLevel() == logging.INFO


def test_configure_sets_levels_and_forgets_old_filters() -> None:
    logs.configure("warning", "debug:actors.owners", "stderr")
    assert logging.getLogger("actors.owners").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("actors.router").getEffectiveLevel() == logging.WARNING
    assert logs.current() == {
        "level": "warning",
        "filters": "debug:actors.owners",
        "output": "stderr",
    }
    logs.configure("info", "", "stderr")
    assert logging.getLogger("actors.owners").getEffectiveLevel() == logging.INFO
    assert logs.current()["filters"] == ""


def test_journald_handler_speaks_the_native_protocol(tmp_path: Path) -> None:
    path = tmp_path / "journal.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    try:
        handler = logs.JournaldHandler(str(path))
        handler.setFormatter(logging.Formatter("%(message)s"))
        record = logging.LogRecord("actors.owners", logging.WARNING, __file__, 1,
                                   "fencing\nvm1", None, None)  # fmt: skip
        handler.emit(record)
        data = server.recv(65536)
        handler.close()
    finally:
        server.close()
    assert b"PRIORITY=4\n" in data
    assert b"SYSLOG_IDENTIFIER=lockd\n" in data
    assert b"LOCKD_MODULE=actors.owners\n" in data
    _, _, rest = data.partition(b"MESSAGE\n")
    (length,) = struct.unpack("<Q", rest[:8])
    assert rest[8 : 8 + length] == b"fencing\nvm1"


def test_a_filter_for_a_module_lockd_lacks_is_refused_at_runtime() -> None:
    """``lockd log-level --filters "debug:actors.owner"`` (a typo) did nothing and said
    nothing, and each new name was a logger Python keeps for good: the admin socket
    could grow the daemon without bound, one name a call."""
    logs.configure("info", "debug:actors.owners", "stderr")
    before = set(logging.Logger.manager.loggerDict)
    with pytest.raises(logs.LogFilterError, match=re.escape("no module 'actors.owner' in lockd")):
        logs.check_modules("debug:actors 3:lockd.server debug:pykka debug:actors.owner")
    assert set(logging.Logger.manager.loggerDict) == before
    assert logs.current()["filters"] == "debug:actors.owners"  # nothing changed
    logs.check_modules("debug:actors 3:lockd.server debug:pykka debug:protocol.framing")


def test_a_configured_filter_for_a_module_lockd_lacks_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The file's filters only warn: a module renamed by an upgrade must not stop a
    daemon (or a re-exec) over a log line."""
    logs.configure("info", "debug:lockd.gone debug:actors.owners", "stderr")
    assert logs.current()["filters"] == "debug:actors.owners debug:lockd.gone"
    assert "log filter for 'lockd.gone': lockd has no such module" in caplog.text
    assert "actors.owners" not in caplog.text


def _stderr_to(path: Path, monkeypatch: pytest.MonkeyPatch, *, journal: bool) -> None:
    """stderr is ``path``; ``journal``: $JOURNAL_STREAM names it, as systemd sets it."""
    stream = path.open("w", encoding="utf-8")
    monkeypatch.setattr("sys.stderr", stream)
    st = path.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if journal else "1:2")
    monkeypatch.setattr(logging.getLogger(), "_lockd_output", None, raising=False)


def test_stderr_that_is_the_journal_gets_each_lines_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd (lockd.service, log_outputs = "stderr") stderr is a journal stream:
    every line was stored at priority info (`journalctl -p warning` showed no error)
    and named the process twice (`lockd[7]: lockd[7]: ERROR: ...`)."""
    out = tmp_path / "stderr"
    _stderr_to(out, monkeypatch, journal=True)
    logs.configure("info", "", "stderr")
    log = logging.getLogger("lockd.test")
    log.warning("reload: %s changed", "max_clients")
    log.error("two\nlines")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.info("fine")
    log.critical("worst")
    logging.getLogger().handlers[0].flush()
    lines = out.read_text().splitlines()
    assert lines[0] == "<4>WARNING: lockd.test: reload: max_clients changed"
    assert lines[1:3] == ["<3>ERROR: lockd.test: two", "<3>lines"]
    assert lines[3] == "<3>ERROR: lockd.test: failed"
    assert lines[4] == "<3>Traceback (most recent call last):"
    assert "<3>ValueError: boom" in lines
    assert lines[-2:] == ["<6>INFO: lockd.test: fine", "<2>CRITICAL: lockd.test: worst"]
    assert all(line.startswith("<") and "lockd[" not in line for line in lines)


def test_stderr_elsewhere_keeps_the_plain_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $JOURNAL_STREAM inherited by a daemon whose stderr was redirected (one started
    on demand writes lockd.log) is not this stderr: no priority prefixes there. Each
    line starts with its time in UTC, as the journal's events are stamped: lockd.log
    and a supervisor's pipe had no time at all, so a fence in them could not be placed."""
    out = tmp_path / "stderr"
    _stderr_to(out, monkeypatch, journal=False)
    logs.configure("info", "", "stderr")
    with freeze_time("2026-11-27 10:00:00.250", tz_offset=5):  # local time is UTC+5
        logging.getLogger("lockd.test").warning("plain")
    logging.getLogger().handlers[0].flush()
    assert out.read_text() == (
        f"2026-11-27T10:00:00.250Z lockd[{os.getpid()}]: WARNING: lockd.test: plain\n"
    )


def test_a_critical_record_reaches_the_journal_as_critical() -> None:
    """Levels above error were written at priority info."""
    assert [logs.priority(n) for n in (50, 40, 30, 20, 10, 25)] == [2, 3, 4, 6, 7, 6]


def test_journald_handler_follows_a_restarted_journald(tmp_path: Path) -> None:
    """journald restarted (an upgrade) binds its socket anew: a handler connected to the
    old one had every later line refused (ECONNREFUSED) and so lost."""
    path = tmp_path / "journal.sock"

    def journald() -> socket.socket:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(str(path))
        server.settimeout(5)
        return server

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("lockd", logging.ERROR, __file__, 1, text, None, None)

    refused: list[str] = []

    class Handler(logs.JournaldHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            refused.append(record.getMessage())

    server = journald()
    handler = Handler(str(path))
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.emit(record("before"))
        assert server.recv(65536).endswith(b"before\n")
        server.close()
        path.unlink()
        server = journald()  # the restarted journald
        handler.emit(record("after"))
        assert refused == []
        assert server.recv(65536).endswith(b"after\n")
    finally:
        server.close()
        handler.close()


def test_log_level_says_stderr_when_journald_was_asked_but_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``log_outputs = "journald"`` on a host without a journal writes to stderr (with a
    warning), but ``lockd log-level`` said ``output journald``: an operator looked in the
    journal for lines that were never there."""
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "no-journal.sock"))
    _stderr_to(tmp_path / "stderr", monkeypatch, journal=False)
    logs.configure("info", "", "journald")
    state = logs.current()
    assert state == {"level": "info", "filters": "", "output": "stderr",
                     "output_asked": "journald"}  # fmt: skip
    assert logs.describe(state).endswith(
        f"output stderr (journald asked: no journal at {tmp_path / 'no-journal.sock'})"
    )
    # A runtime change keeps asking for the journal: it is used once there is one.
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(logs.JOURNAL_SOCKET)
    try:
        logs.configure("debug", "", logs.asked_output())
        assert logs.current() == {"level": "debug", "filters": "", "output": "journald"}
        logging.getLogger("lockd.test").warning("to the journal")
        journal.settimeout(5)
        assert journal.recv(65536).endswith(b"to the journal\n")
    finally:
        journal.close()


def test_an_uncaught_exception_reaches_the_journal_as_critical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A traceback nothing caught was printed by Python on stderr bare: under systemd each
    of its lines was stored at priority info, so ``journalctl -p err`` showed no crash."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    out = tmp_path / "stderr"
    _stderr_to(out, monkeypatch, journal=True)
    logs.configure("info", "", "stderr")
    logs.log_uncaught()
    try:
        raise RuntimeError("main thread")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)

    def fail() -> None:
        raise ValueError("worker")

    thread = threading.Thread(target=fail, name="lockd-worker")
    thread.start()
    thread.join()
    logging.getLogger().handlers[0].flush()
    lines = out.read_text().splitlines()
    assert lines[0] == "<2>CRITICAL: lockd: uncaught exception"
    assert "<2>RuntimeError: main thread" in lines
    assert "<2>CRITICAL: lockd: uncaught exception in thread lockd-worker" in lines
    assert "<2>ValueError: worker" in lines
    assert all(line.startswith("<2>") for line in lines)
