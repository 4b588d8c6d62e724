"""Logging like virtlockd's: a level, per-module filters, and stderr or the journal.

- ``log_level``: ``debug`` / ``info`` / ``warning`` / ``error``.
- ``log_filters``: space-separated ``LEVEL:module`` entries (virtlockd's
  ``log_filters`` form; LEVEL is a name or 1-4 = debug..error), e.g.
  ``"debug:actors.owners 3:lockd.server"``: a module (and its children) logs
  at its own level.
- ``log_outputs``: ``stderr`` or ``journald`` (the native journal protocol on
  ``/run/systemd/journal/socket``, with priority and the module as fields;
  falls back to stderr with a warning when there is no journal). When systemd
  connects stderr to the journal (``$JOURNAL_STREAM`` names it), each line
  starts with its syslog priority (``<4>``, sd-daemon(3)) instead of
  ``lockd[PID]:``, which the journal adds itself.

All three can change at runtime (``lockd log-level`` on the admin socket).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import pkgutil
import socket
import struct
import sys
import threading
import time

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_NUMERIC = {"1": "debug", "2": "info", "3": "warning", "4": "error"}
FORMAT = "%(asctime)s lockd[%(process)d]: %(levelname)s: %(name)s: %(message)s"
"""stderr's lines anywhere but the journal: a file (``lockd.log`` of a daemon started on
demand) or a supervisor's pipe, which may add no time of its own."""
JOURNAL_STREAM_FORMAT = "%(levelname)s: %(name)s: %(message)s"
"""stderr's lines when it is the journal, which names the program and pid itself."""


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: critical 2, error 3, warning 4, info 6,
    debug 7 (a level between two takes the lower one's)."""
    for level, prio in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                        (logging.INFO, 6)):  # fmt: skip
        if levelno >= level:
            return prio
    return 7


def stderr_is_journal() -> bool:
    """Whether systemd connected stderr to the journal: ``$JOURNAL_STREAM`` is its
    ``DEVICE:INODE`` (not inherited by a stderr redirected elsewhere since)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):
        return False


class PlainFormatter(logging.Formatter):
    """:data:`FORMAT`, stamped in UTC to the millisecond (``2026-11-27T10:00:00.250Z``),
    as the journal's events are: without a time, a fence or a lost lease in
    ``lockd.log`` could not be placed, nor matched with ``lockd events``."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class JournalStreamFormatter(logging.Formatter):
    """Every line (a traceback's too) prefixed with the record's ``<PRIORITY>``, which
    the journal reads off a stream and strips: without it each line was "info"."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_STREAM_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


class LogFilterError(ValueError):
    """A filter string that cannot be parsed; the message says which entry."""


def parse_filters(text: str) -> dict[str, str]:
    """``"debug:actors.owners 3:lockd"`` -> ``{"actors.owners": "debug", "lockd": "warning"}``."""
    out = {}
    for item in text.split():
        level, sep, module = item.partition(":")
        level = _NUMERIC.get(level, level.lower())
        if not sep or not module or level not in _NUMERIC.values():
            raise LogFilterError(f"bad log filter {item!r}: use LEVEL:module, LEVEL 1-4 or a name")
        if module == "root":  # logging's name for the root logger, which log_level sets
            raise LogFilterError(f"bad log filter {item!r}: set the root's level with log_level")
        out[module] = level
    return out


PACKAGES = ("lockd", "actors", "protocol")
"""Where lockd's modules are; each logs under its own name (``getLogger(__name__)``)."""


@functools.cache
def modules() -> frozenset[str]:
    """Every name a filter can usefully give: lockd's packages, their modules, and pykka."""
    names = {"pykka"}  # the actor library logs its actors' starts, stops and crashes there
    for package in PACKAGES:
        names.add(package)
        path = importlib.import_module(package).__path__
        names.update(info.name for info in pkgutil.walk_packages(path, package + "."))
    return frozenset(names)


def unknown_modules(filters: dict[str, str]) -> list[str]:
    """The filtered names no lockd module logs under: a typo, or a module since renamed."""
    return sorted(name for name in filters if name not in modules())


def check_modules(filters: str) -> None:
    """Refuse a filter for a module lockd does not have, naming it (``lockd log-level``).

    At runtime an unknown name is a typo to point out, not to apply: it would log
    nothing, and each new name is a logger Python keeps for the life of the process.
    The file's filters are only warned about (:func:`configure`): a module renamed
    by an upgrade must not stop a daemon from starting over a log line.
    """
    unknown = unknown_modules(parse_filters(filters))
    if unknown:
        raise LogFilterError(
            f"no module {', '.join(map(repr, unknown))} in lockd: filter one of the packages "
            f"{', '.join(PACKAGES)} or pykka, or a module in them (e.g. actors.owners)"
        )


class JournaldHandler(logging.Handler):
    """Writes records to journald with its native datagram protocol."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self._path = path or JOURNAL_SOCKET
        """Addressed by each send, as sd_journal_send does: a socket connected once stayed
        on the journald of the moment, refused every line after a restart of it
        (``systemctl restart systemd-journald``, an upgrade) and reported each on stderr."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record).encode("utf-8", "replace")
            fields = [
                b"PRIORITY=%d" % priority(record.levelno),
                b"SYSLOG_IDENTIFIER=lockd",
                b"LOCKD_MODULE=" + record.name.encode(),
            ]
            body = b"\n".join(fields) + b"\nMESSAGE\n" + struct.pack("<Q", len(message))
            self._sock.sendto(body + message + b"\n", self._path)
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


_filtered: set[str] = set()


def log_uncaught() -> None:
    """Send exceptions nothing caught (the main thread's, any thread's) through logging at
    critical, for the daemon: Python printed their tracebacks on stderr bare, so under
    systemd each line was stored at priority info (``journalctl -p err`` showed no crash)
    and with ``log_outputs = "journald"`` they were not in the journal's fields at all."""
    log = logging.getLogger("lockd")

    def hook(kind: type[BaseException], exc: BaseException, tb: object) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)  # type: ignore[arg-type]
            return
        log.critical("uncaught exception", exc_info=(kind, exc, tb))  # type: ignore[arg-type]

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "unknown"
        log.critical(
            "uncaught exception in thread %s",
            name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        )

    sys.excepthook = hook
    threading.excepthook = thread_hook


def configure(level: str, filters: str = "", output: str = "stderr") -> None:
    """Apply level, filters and output to the root logger (safe to call again at runtime)."""
    parsed = parse_filters(filters)
    root = logging.getLogger()
    if output not in ("stderr", "journald"):
        raise LogFilterError(f"log output must be stderr or journald, not {output!r}")
    current = getattr(root, "_lockd_output", None)
    # A daemon that fell back to stderr takes the journal at the next change once there is one.
    fell_back = not any(isinstance(h, JournaldHandler) for h in root.handlers)
    if current != output or (output == "journald" and fell_back and os.path.exists(JOURNAL_SOCKET)):
        for old in list(root.handlers):
            root.removeHandler(old)
            old.close()
        handler: logging.Handler
        if output == "journald" and os.path.exists(JOURNAL_SOCKET):
            handler = JournaldHandler()
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                JournalStreamFormatter() if stderr_is_journal() else PlainFormatter()
            )
        root.addHandler(handler)
        root._lockd_output = output  # type: ignore[attr-defined]
        if output == "journald" and not isinstance(handler, JournaldHandler):
            logging.getLogger("lockd").warning("no journal at %s; using stderr", JOURNAL_SOCKET)
    root.setLevel(level.upper())
    for name in _filtered - set(parsed):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, module_level in parsed.items():
        logging.getLogger(name).setLevel(module_level.upper())
    _filtered.clear()
    _filtered.update(parsed)
    if "pykka" not in parsed:
        # Actor start/stop lines at debug would drown everything else.
        logging.getLogger("pykka").setLevel(max(logging.INFO, root.level))
    for name in unknown_modules(parsed):
        logging.getLogger("lockd").warning(
            "log filter for %r: lockd has no such module, so it logs nothing", name
        )


def describe(state: dict[str, str]) -> str:
    """:func:`current`'s answer in words, as the log and ``lockd log-level`` say it."""
    text = f"level {state['level']}, filters {state['filters']!r}, output {state['output']}"
    if state.get("output_asked", state["output"]) != state["output"]:
        text += f" ({state['output_asked']} asked: no journal at {JOURNAL_SOCKET})"
    return text


def asked_output() -> str:
    """The output the configuration (or the last change) asked for, which :func:`current`
    may not show: ``journald`` without a journal writes to stderr."""
    return str(getattr(logging.getLogger(), "_lockd_output", "stderr"))


def current() -> dict[str, str]:
    """The level, filters and output in force, for the admin socket.

    ``output`` is where lines go now: ``lockd log-level`` said ``journald`` for a daemon
    that had fallen back to stderr, and an operator looked in the journal for nothing.
    ``output_asked`` is added only when it differs."""
    root = logging.getLogger()
    filters = " ".join(
        f"{logging.getLevelName(logging.getLogger(n).level).lower()}:{n}" for n in sorted(_filtered)
    )
    asked = asked_output()
    journald = any(isinstance(h, JournaldHandler) for h in root.handlers)
    state = {
        "level": logging.getLevelName(root.level).lower(),
        "filters": filters,
        "output": "journald" if journald else "stderr",
    }
    if asked != state["output"]:
        state["output_asked"] = asked
    return state
