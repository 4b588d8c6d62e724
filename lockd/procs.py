"""The process table: start times from /proc, pidfds, and signals that cannot hit a reused pid."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import time
import uuid as uuidlib
from typing import Any

from actors.model import Owner, OwnerKey

log = logging.getLogger(__name__)

DAEMON_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1})
"""The signals ``lockd serve`` handles. Until its handlers are installed they keep
their default action, which ends the process, so they are blocked meanwhile: across
a re-exec (the mask survives ``execve``) and during start-up. They wait, pending,
and reach the handlers once installed; an operator's second SIGUSR1 or a reload
sent just after a re-exec no longer kills the daemon and drops every lock."""

PF_EXITING = 0x00000004
"""Kernel task flag set once a process has begun exiting (``/proc/PID/stat`` field 9)."""


_GONE = (errno.ENOENT, errno.ESRCH)
"""What reading /proc/PID/stat fails with when there is no such process."""


def _read_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after comm; None if no such process.

    Any other failure (EMFILE, ENFILE, ENOMEM...) raises OSError: "cannot
    tell" must never be read as "gone", or a daemon short of descriptors
    would release a running VM's leases. os.open/os.read, not open(): owners
    past the pidfd budget are polled through this (12 us instead of 22).
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    try:
        data = os.read(fd, 4096)
    except OSError as exc:
        if exc.errno in _GONE:
            return None  # reaped between open and read
        raise
    finally:
        os.close(fd)
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def _stat_fields(pid: int) -> list[bytes] | None:
    """For registration: None also when /proc cannot be read (hidepid, EMFILE), since
    a process lockd cannot see is not one it can own."""
    try:
        return _read_stat(pid)
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if no such process."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time the process has used (fields 14 and 15), None if gone.

    For benchmarks: the daemon's own CPU per request, which neither the
    client's time nor the scheduler's delays are part of.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def boot_time() -> float:
    """When this boot began, in seconds since the epoch (``btime`` in /proc/stat); 0 if unknown.

    A (pid, start time) pair names one process within one boot only.
    """
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> bytes | None:
    """This boot's random id, as 16 bytes; None if the kernel does not say.

    The kernel draws it at boot and never changes it until the next one, in
    every namespace: lockd stamps it on each owner it registers, so that after
    a reboot no journaled owner is mistaken for a new process that happens to
    have the same pid and start time.
    """
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return uuidlib.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return None


def fd_limit() -> int:
    """This process's soft limit on open descriptors (``lockd_max_fds`` in metrics)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _status_numbers(pid: int, field: bytes) -> list[int] | None:
    """The numbers of ``field`` (``b"Uid:"``) in /proc/PID/status; None if no such task."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field):
                    return [int(word) for word in line.split()[1:]]
    except (OSError, ValueError):
        return None
    return None


def _status_field(pid: int, field: bytes) -> int | None:
    """The first number of ``field`` in /proc/PID/status; None if no such task."""
    numbers = _status_numbers(pid, field)
    return numbers[0] if numbers else None


def uid_of(pid: int) -> int | None:
    """Real uid of a process, or None if it does not exist."""
    return _status_field(pid, b"Uid:")


def uids_of(pid: int) -> tuple[int, int] | None:
    """Real and saved uid of a process (``Uid:`` in /proc/PID/status: real, effective,
    saved, filesystem); None if it cannot be read."""
    numbers = _status_numbers(pid, b"Uid:")
    return (numbers[0], numbers[2]) if numbers and len(numbers) >= 3 else None


def leader_of(pid: int) -> int | None:
    """The process (thread group) ``pid`` belongs to: ``pid`` itself for a process, another
    pid for one of its threads (a thread id opens in /proc too); None if no such task."""
    return _status_field(pid, b"Tgid:")


def is_exiting(pid: int, started: int) -> bool:
    """True if the process is gone, a zombie, exiting, or its pid now names another process.

    Like a pidfd, it waits for the whole thread group: a main thread that
    called pthread_exit is a zombie with PF_EXITING while the other threads
    (and the VM) run on. When /proc cannot be read for another reason than
    the process being gone, the answer is "not known to be gone": holding a
    lease longer is safe, releasing it under a running VM is not.
    """
    try:
        fields = _read_stat(pid)
    except OSError as exc:
        log.debug("cannot read /proc/%d/stat (%s): taking the process as alive", pid, exc)
        return False
    if fields is None or int(fields[19]) != started:
        return True
    state, flags, threads = fields[0], int(fields[6]), int(fields[17])
    if threads > 1:
        return False
    return state in (b"Z", b"X", b"x") or bool(flags & PF_EXITING)


REFUSED_KEPT = 1024
"""Owners whose refused signal :class:`ProcTable` remembers having logged."""


class ProcTable:
    """Real :class:`actors.owners.Processes`: pidfds and /proc."""

    def __init__(self) -> None:
        self._refused: dict[OwnerKey, str] = {}
        """The error each owner's last signal failed with, as logged: a fence retries its
        SIGKILL every 0.2 s, and without CAP_KILL (a unit's CapabilityBoundingSet=
        leaving it out) each retry logged an ERROR line, five a second for as long as
        the VM ran. Said once per owner and error, again after a signal goes through;
        at most REFUSED_KEPT owners are remembered (past them, all are forgotten)."""

    def open_watch(self, owner: Owner) -> int | None:
        try:
            fd = os.pidfd_open(owner.pid)
        except ProcessLookupError:
            return None  # other errors (EMFILE) go to the caller, which polls instead
        # The pid may have been reused between registration and pidfd_open.
        try:
            fields = _read_stat(owner.pid)
        except OSError:
            os.close(fd)  # cannot tell (the pidfd took the last fd?): the caller polls
            raise
        if fields is None or int(fields[19]) != owner.start_time:
            os.close(fd)
            return None
        return fd

    def close_watch(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)

    def is_gone(self, owner: Owner) -> bool:
        return is_exiting(owner.pid, owner.start_time)

    def pid_gone(self, owner: Owner) -> bool:
        try:
            os.kill(owner.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # EPERM: a process has that pid, just not ours to signal
        return False

    uids_of = staticmethod(uids_of)

    def signal(self, owner: Owner, signum: int) -> bool:
        try:
            fd = os.pidfd_open(owner.pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            self._cannot_signal(owner, exc)
            return False
        try:
            if start_time(owner.pid) != owner.start_time:
                return False
            signal.pidfd_send_signal(fd, signum)
        except ProcessLookupError:
            return False
        except OSError as exc:
            self._cannot_signal(owner, exc)
            return False
        finally:
            os.close(fd)
        self._refused.pop(owner.key, None)
        return True

    def _cannot_signal(self, owner: Owner, exc: OSError) -> None:
        if self._refused.get(owner.key) == str(exc):
            return
        if len(self._refused) >= REFUSED_KEPT:
            self._refused.clear()
        self._refused[owner.key] = str(exc)
        log.error(
            "cannot signal %s: %s%s; not said again for it until a signal goes through",
            owner.describe(),
            exc,
            " (lockd lacks CAP_KILL?)" if exc.errno == errno.EPERM else "",
        )


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: one fd per lease, connection and owner."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


def wait_listening(
    path: str, proc: subprocess.Popen[Any], timeout: float = 15.0, log: str | None = None
) -> None:
    """Until ``proc``, a daemon just started, accepts connections on its socket ``path``.

    A connection is tried, not only the file looked for: the file exists from the
    daemon's ``bind``, a moment before its ``listen``, and a client that came in
    between was refused (``lockd bench`` failed so, "Connection refused", on a loaded
    machine). Raises RuntimeError if it exits first or takes over ``timeout`` seconds,
    with the text of its ``log`` file when given.
    """
    deadline = time.monotonic() + timeout
    while not _accepts(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            detail = ""
            if log is not None:
                with contextlib.suppress(OSError), open(log, encoding="utf-8") as f:
                    detail = ": " + f.read()
            raise RuntimeError(f"lockd did not start{detail}")
        time.sleep(0.05)


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:  # not there yet (ENOENT), or not listening yet (ECONNREFUSED)
            return False
    return True


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
