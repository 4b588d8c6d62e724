"""The process table: start times from /proc, pidfds, and signals that cannot hit a reused pid."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from typing import Any

from actors.model import Owner

log = logging.getLogger(__name__)

PF_EXITING = 0x00000004
"""Kernel task flag set once a process has begun exiting (``/proc/PID/stat`` field 9)."""


def _stat_fields(pid: int) -> list[bytes] | None:
    # os.open/os.read, not open(): owners past the pidfd budget are polled
    # through this, thousands per second at scale (8 us instead of 22).
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # gone, or hidden from us (hidepid): either way not a process we can own
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if no such process."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def uid_of(pid: int) -> int | None:
    """Real uid of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def is_exiting(pid: int, started: int) -> bool:
    """True if the process is gone, a zombie, exiting, or its pid now names another process."""
    fields = _stat_fields(pid)
    if fields is None or int(fields[19]) != started:
        return True
    state, flags = fields[0], int(fields[6])
    return state in (b"Z", b"X", b"x") or bool(flags & PF_EXITING)


class ProcTable:
    """Real :class:`actors.owners.Processes`: pidfds and /proc."""

    def open_watch(self, owner: Owner) -> int | None:
        try:
            fd = os.pidfd_open(owner.pid)
        except ProcessLookupError:
            return None  # other errors (EMFILE) go to the caller, which logs them
        # The pid may have been reused between registration and pidfd_open.
        if start_time(owner.pid) != owner.start_time:
            os.close(fd)
            return None
        return fd

    def close_watch(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)

    def is_gone(self, owner: Owner) -> bool:
        return is_exiting(owner.pid, owner.start_time)

    def signal(self, owner: Owner, signum: int) -> bool:
        try:
            fd = os.pidfd_open(owner.pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            log.error("cannot signal %s: %s", owner.describe(), exc)
            return False
        try:
            if start_time(owner.pid) != owner.start_time:
                return False
            signal.pidfd_send_signal(fd, signum)
        except ProcessLookupError:
            return False
        except OSError as exc:
            log.error("cannot signal %s: %s", owner.describe(), exc)
            return False
        finally:
            os.close(fd)
        return True


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: one fd per lease, connection and owner."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


def stop_child(
    proc: subprocess.Popen[Any], signum: int = signal.SIGTERM, wait: float = 30.0
) -> None:
    """Stop a child process by its pid: ``signum``, then SIGKILL after ``wait`` seconds; reaped.

    For benchmarks and tools that start daemons and followers: nothing they
    start may outlive them, even when the child ignores the polite signal.
    """
    if proc.poll() is not None:
        return
    proc.send_signal(signum)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
