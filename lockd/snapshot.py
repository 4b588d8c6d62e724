"""Snapshot files: the replay state at a segment boundary, so recovery skips old history.

``snapshot-<seq, 20 digits>.cbor`` holds one CBOR map
``{"format": "lockd-snapshot", "version": 1, "seq", "crc", "state": bstr}``
where ``state`` is the CBOR of :meth:`ReplayState.to_wire` and ``crc`` its
CRC-32. It is written to a temporary name, synced and renamed, so a crash
never leaves a half-written snapshot under the real name.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import select
import selectors
import signal
import threading
import time
import zlib
from collections.abc import Callable

import attrs
import cbor2

from actors.faults import also_kill, counted_in_child, crash_point
from actors.metrics import REGISTRY
from actors.recovery_core import SNAPSHOT_FORMAT, SNAPSHOT_VERSION, ReplayState
from actors.runtime import Dispatcher
from lockd.procs import DAEMON_SIGNALS

log = logging.getLogger(__name__)

PREFIX = "snapshot-"
SUFFIX = ".cbor"


def snapshot_name(seq: int) -> str:
    """File name of the snapshot taken after entry ``seq``."""
    return f"{PREFIX}{seq:020d}{SUFFIX}"


def seq_of(name: str) -> int:
    """The last journal seq a snapshot includes, from its name."""
    return int(name[len(PREFIX) : -len(SUFFIX)])


def list_snapshots(directory: str) -> list[str]:
    """Snapshot file names, oldest first."""
    return sorted(n for n in os.listdir(directory) if n.startswith(PREFIX) and n.endswith(SUFFIX))


def encode_snapshot(state: ReplayState) -> bytes:
    """The bytes of a snapshot file for ``state``."""
    body = cbor2.dumps(state.to_wire())
    return cbor2.dumps(
        {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "seq": state.seq,
            "crc": zlib.crc32(body),
            "state": body,
        }
    )


def decode_snapshot(data: bytes) -> ReplayState:
    """Read a snapshot file's bytes; raise ValueError if they are not a sound snapshot."""
    try:
        outer = cbor2.loads(data)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for bad input
        raise ValueError(f"undecodable snapshot: {exc}") from None
    if not isinstance(outer, dict) or outer.get("format") != SNAPSHOT_FORMAT:
        raise ValueError("not a lockd snapshot")
    if outer.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"unsupported snapshot version {outer.get('version')!r}")
    body = outer.get("state")
    if not isinstance(body, bytes) or zlib.crc32(body) != outer.get("crc"):
        raise ValueError("snapshot CRC mismatch")
    state = ReplayState.from_wire(cbor2.loads(body))
    if state.seq != outer.get("seq"):
        raise ValueError("snapshot seq does not match its state")
    return state


def write_snapshot(directory: str, state: ReplayState) -> str:
    """Write ``state`` durably (tmp, fsync, rename, fsync dir); return the file name."""
    name = snapshot_name(state.seq)
    # The pid in the name: a child orphaned by a SIGKILLed daemon may still write the
    # snapshot of the same seq while the next daemon writes its own (it rotates at the
    # same seq); one file for both could be renamed into place half written.
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = encode_snapshot(state)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        # A disk full (or failing) halfway: what was written goes, or each failed try
        # kept its part until a snapshot succeeded, taking the space that came back.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    crash_point("snapshot-tmp")
    try:
        os.rename(tmp, os.path.join(directory, name))
    except OSError:
        # As a write that fails: the temporary, a whole state's size, stayed until a
        # later snapshot was written and pruned it.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return name


def load_newest(directory: str) -> ReplayState | None:
    """The newest snapshot that reads back sound (older ones are fallbacks), or None."""
    for name in reversed(list_snapshots(directory)):
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                return decode_snapshot(f.read())
        except (OSError, ValueError) as exc:
            log.error("snapshot %s is unusable (%s); trying an older one", path, exc)
    return None


def prune(directory: str, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` snapshots, and stray temporary files."""
    for name in list_snapshots(directory)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    for name in os.listdir(directory):
        if name.startswith(f".{PREFIX}") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


_CLOSED = b"."
"""The child's first byte on its pipe: it has closed every fd it inherited but the pipe."""

KEEP_SNAPSHOTS = 2
"""Snapshots kept: the newest, and one fallback should it read back damaged."""

STOP_WAIT_S = 10.0
"""How long a stop or a re-exec waits for a snapshot child before killing it: well
inside lockd.service's TimeoutStopSec (30 s), so the daemon still journals its stop."""

CHILD_MAX_S = 300.0
"""A child still writing this long after its fork is stuck (16,384 leases take well under a
second): the next rotation kills it and forks afresh, rather than skip for ever."""


@attrs.define
class _Child:
    """A snapshot being written by a forked child."""

    pid: int
    fd: int
    """Read end of a pipe the child holds the write end of: EOF when it exits."""
    seq: int
    done: Callable[[int, bool], None]
    started: float
    """``time.monotonic()`` at the fork."""
    message: bytes = b""
    """What the child wrote on the pipe: why it failed."""


class SnapshotWriter:
    """Writes the journal's snapshots, in a forked child where that is safe.

    Building, encoding and syncing a snapshot of 16,384 leases took 125-200 ms
    on the 2-vCPU test VM; written by the daemon itself, every request waited
    that long at each segment rotation (measured: a 147 ms pair). A forked
    child gets the state as of the fork, copy-on-write, for the 2-3 ms a fork
    of that daemon takes, and writes it while the daemon serves, as Redis's
    BGSAVE does. Its exit, seen through a pipe the dispatcher watches, reports
    whether the snapshot is on disk; only then may covered segments go.

    A child is forked only while this process runs a single thread, as
    ``lockd serve`` does: in a program embedding lockd, another thread may
    hold a lock at the fork that the child would inherit held. There, and
    whenever the fork fails, the snapshot is written inline, as before.
    """

    def __init__(
        self,
        directory: str,
        dispatcher: Dispatcher | None = None,
        *,
        may_fork: Callable[[], bool] = lambda: threading.active_count() == 1,
    ) -> None:
        """``dispatcher``: where to watch for a child's exit; None writes inline only.
        ``may_fork``: asked at each snapshot (tests that fork from a threaded runner
        say yes; the child takes no lock another thread could hold)."""
        self.directory = directory
        self._dispatcher = dispatcher
        self._may_fork = may_fork
        self._child: _Child | None = None
        self._unreaped: list[int] = []
        """Children killed but not dead yet (stuck in I/O): reaped when they do die."""

    def write(
        self,
        state: ReplayState,
        done: Callable[[int, bool], None] | None = None,
    ) -> bool:
        """Write ``state``'s snapshot.

        True: written inline, on disk now. False: a child is writing it, and
        ``done(seq, ok)`` is called from the dispatcher loop when it exits (or
        the inline write failed, which is logged), or it is skipped because the
        child writing the previous snapshot has not finished: waiting for it
        would stall every request, and the next rotation tries again (old
        segments stay meanwhile). Call it from the loop thread.
        """
        self._reap_killed()
        child = self._child
        if child is not None and self._exited(child):
            self._reap(child)  # done, its report not yet read by the loop
        elif child is not None and time.monotonic() - child.started > CHILD_MAX_S:
            self._kill(child, f"still writing after {CHILD_MAX_S:g} s; killed")
        elif child is not None:
            log.warning("journal snapshot at seq %d skipped: the one at seq %d is still "
                        "being written; segments stay until one is",
                        state.seq, child.seq)  # fmt: skip
            REGISTRY.inc("lockd_journal_snapshots_total", result="skipped")
            return False
        if done is not None and self._dispatcher is not None and self._may_fork():
            try:
                self._fork(state, done)
            except OSError as exc:
                log.warning("snapshot at seq %d: fork failed (%s); writing it inline",
                            state.seq, exc)  # fmt: skip
            else:
                return False
        try:
            write_snapshot(self.directory, state)
        except OSError as exc:
            _failed(state.seq, str(exc))
            return False
        self._written()
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Block until a snapshot being written by a child is done (and reported).

        After ``timeout`` seconds the child is killed and the snapshot counts as
        failed: a child stuck in I/O must not hold up a stop or a re-exec for
        ever (the segments it would have covered stay).
        """
        self._reap_killed()
        child = self._child
        if child is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        # poll(), which needs no fd of its own: a daemon holding leases may be at its
        # fd limit (and past 1024, where select() cannot look).
        pipe = select.poll()
        pipe.register(child.fd, select.POLLIN)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not pipe.poll(None if left is None else left * 1000):
                self._kill(child, f"not done after {timeout} s; killed")
                return
            data = os.read(child.fd, 4096)
            if not data:
                break
            child.message += data
        self._reap(child)

    @staticmethod
    def _exited(child: _Child) -> bool:
        """Read what the child reported so far without blocking; True at its end of stream."""
        pipe = select.poll()  # not select(): a daemon holding leases has fds past 1024
        pipe.register(child.fd, select.POLLIN)
        while pipe.poll(0):
            data = os.read(child.fd, 4096)
            if not data:
                return True
            child.message += data
        return False

    def _kill(self, child: _Child, why: str) -> None:
        """SIGKILL a child that took too long; its snapshot failed for ``why``.

        It is reaped if it dies within a second. A child in uninterruptible I/O
        dies only when that I/O ends: it is not waited for, but reaped at a
        later snapshot or stop once it has died.
        """
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        self._child = None
        if self._dispatcher is not None:
            self._dispatcher.unwatch(child.fd)
        os.close(child.fd)
        self._unreaped.append(child.pid)
        deadline = time.monotonic() + 1.0
        while self._reap_killed() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._unreaped:
            log.error("snapshot child %d does not die (stuck in I/O?); not waiting for it",
                      child.pid)  # fmt: skip
        _failed(child.seq, why)
        child.done(child.seq, False)

    def _reap_killed(self) -> bool:
        """Reap the killed children that have died since; True while some are left."""
        for pid in list(self._unreaped):
            try:
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    continue
            except ChildProcessError:
                pass
            self._unreaped.remove(pid)
        return bool(self._unreaped)

    def _fork(self, state: ReplayState, done: Callable[[int, bool], None]) -> None:
        dispatcher = self._dispatcher
        assert dispatcher is not None
        rfd, wfd = os.pipe()
        # Signals stay blocked across the fork, so none reaches the child
        # while it still has the daemon's handlers and wake-up fd.
        daemon = os.getpid()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child; it always ends in os._exit
                _child_main(self.directory, state, wfd, mask, daemon)
            counted_in_child("snapshot-tmp")
        except OSError:
            os.close(rfd)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(wfd)
        # Until the child has closed what it inherited, its copies keep alive what
        # this process lets go of: the OFD lock of a lease released meanwhile (it
        # goes with the last fd of its open file description), a client socket's
        # end of stream, the journal lock. So wait for it: microseconds.
        first = os.read(rfd, 1)
        said = b"" if first == _CLOSED else first
        self._child = _Child(pid, rfd, state.seq, done, time.monotonic(), said)
        try:
            dispatcher.watch(rfd, selectors.EVENT_READ, self._readable)
        except OSError as exc:
            # Not watched (epoll out of memory): wait for this one here, as an
            # inline write would take as long. Not written inline: the child
            # is writing the same file.
            log.warning("snapshot at seq %d: cannot watch its child (%s); waiting for it",
                        state.seq, exc)  # fmt: skip
            self._dispatcher = None
            try:
                self.wait()
            finally:
                self._dispatcher = dispatcher

    def _readable(self, _mask: int) -> None:
        child = self._child
        assert child is not None
        data = os.read(child.fd, 4096)
        if data:
            child.message += data
            return
        self._reap(child)

    def _reap(self, child: _Child) -> None:
        self._child = None
        if self._dispatcher is not None:
            self._dispatcher.unwatch(child.fd)
        os.close(child.fd)
        _, status = os.waitpid(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        ok = code == 0
        if not ok:
            why = child.message.decode(errors="replace") or (
                f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            )
            _failed(child.seq, why)
        else:
            self._written()
        child.done(child.seq, ok)

    def _written(self) -> None:
        REGISTRY.inc("lockd_journal_snapshots_total", result="written")
        crash_point("snapshot-written")
        prune(self.directory, KEEP_SNAPSHOTS)


def _failed(seq: int, why: str) -> None:
    """Say so, and count it: old segments stay until a snapshot is written."""
    log.error("journal snapshot at seq %d failed: %s", seq, why)
    REGISTRY.inc("lockd_journal_snapshots_total", result="failed")


def _max_fds() -> int:
    """One past the highest fd this process can have open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = [n for n in (soft, hard) if n != resource.RLIM_INFINITY]
    return min(max(limits, default=1 << 20), (1 << 31) - 1)


def _child_main(
    directory: str,
    state: ReplayState,
    report_fd: int,
    mask: set[int | signal.Signals],
    daemon: int,
) -> None:  # pragma: no cover - runs in the forked child (coverage is not measured there)
    """Write the snapshot and exit: 0 once it is on disk, 1 with the reason on ``report_fd``."""
    code = 1
    gc.disable()  # a collection would touch, and so copy, every page of the daemon
    try:
        # Only the report pipe stays open: the daemon waits for that (_CLOSED),
        # since copies of its fds here would keep released locks held.
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, _max_fds())
        os.write(report_fd, _CLOSED)
        signal.set_wakeup_fd(-1)
        for signum in signal.valid_signals():
            handler = signal.getsignal(signum)
            if callable(handler):
                signal.signal(signum, signal.SIG_DFL)  # SIGTERM ends the child, as it should
        # Meant for the daemon (a reload, a re-exec), these reach the child too when sent
        # to the whole unit or by name (systemctl kill, pkill -HUP lockd): by default
        # they would end it, and the snapshot with it.
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        # Not the daemon's mask as it is during start-up (its signals blocked until
        # its handlers exist): nothing in the child waits for handlers.
        signal.pthread_sigmask(signal.SIG_SETMASK, set(mask) - DAEMON_SIGNALS)
        # Requests first: at nice 10 the child gets about a tenth of a CPU the
        # daemon keeps busy (CFS weights 110 against 1024) and all of an idle one.
        # SCHED_IDLE was tried: a request once waited 36 s behind a starved child.
        os.nice(10)
        also_kill(daemon)
        write_snapshot(directory, state)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the daemon, which logs it
        with contextlib.suppress(BaseException):
            os.write(report_fd, f"{type(exc).__name__}: {exc}".encode()[:4000])
    finally:
        os._exit(code)
