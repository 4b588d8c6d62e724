"""LeaseActor: exactly one open fd on one lease file, and the OFD lock on it.

The lockspace decides who may hold a lease; the lease actor makes the kernel
agree, which is what other processes and other hosts on the shared lock
directory see. It replies to whoever asked with :class:`LockTaken` or
:class:`LockRefused`, and stops itself once its lock is dropped.
"""

from __future__ import annotations

import errno
import logging
import resource
import time
from typing import Any, Protocol

import attrs
import pykka

from actors.faults import crash_point
from actors.model import LeaseMode
from actors.runtime import DispatchedActor, Dispatcher, tell_if_alive
from protocol.errors import ErrorCode

log = logging.getLogger(__name__)

REOPEN_ATTEMPTS = 8
"""How often to reopen a lease file another host unlinked between our open and our lock."""
FD_WARNING_SECONDS = 60.0
"""At most one log warning per this period about running out of descriptors."""


class _Throttle:
    """Says yes at most once per ``period`` seconds (monotonic clock)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.last = -period

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.period:
            return False
        self.last = now
        return True


_fd_warnings = _Throttle(FD_WARNING_SECONDS)


def open_failure(exc: OSError) -> str:
    """The refusal text for a lease file that could not be opened.

    Out of descriptors is the one an operator can fix, and the raw EMFILE
    does not say how: every lease held keeps its file open, so the fix is
    the daemon's fd limit. Said in the reply, and in the log (rate-limited:
    a host at its limit refuses every new lease).
    """
    if exc.errno == errno.EMFILE:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        text = (
            f"cannot open lease file: lockd has all {limit} of its file descriptors open "
            "(one per lease held); raise its limit (LimitNOFILE in lockd.service, "
            "ulimit -n where it is started by hand)"
        )
    elif exc.errno == errno.ENFILE:
        text = "cannot open lease file: the system is out of file descriptors (fs.file-max)"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot create lease file: {exc} (the lock directory's filesystem is full, "\
            "or out of inodes: df -h, df -i)"  # fmt: skip
    elif exc.errno == errno.EROFS:
        return f"cannot open lease file: {exc} (the lock directory is mounted read-only)"
    else:
        return f"cannot open lease file: {exc}"
    if _fd_warnings.ready():
        log.warning("refusing new leases: %s", text.removeprefix("cannot open lease file: "))
    return text


class LockBusyError(Exception):
    """The kernel refused the lock: another process or host holds it."""


class LockspaceGoneError(FileNotFoundError):
    """The lockspace's directory is no longer at its path: removed, or the filesystem
    it was on unmounted. ``filename`` is the directory's path."""


def lockspace_gone(lockspace: str, path: str | None) -> str:
    """What a request meets in a lockspace whose directory is gone, and what to do.

    Not made again by lockd itself: a lock directory shared over NFS and not mounted
    leaves an empty local directory in its place, and lease files made there hand
    out locks no other host sees (two VMs on one disk). virtlockd does not either."""
    return (
        f"lockspace directory {path} is gone (removed, or its filesystem not mounted); "
        "lockd does not make it again by itself, since on a shared lock directory not "
        "mounted that would hand out locks no other host sees: mount it again, or make it "
        f"with `lockd create-lockspace {lockspace}`"
    )


class HeldFileLike(Protocol):
    """An open lease file: its fd."""

    fd: int


class LeaseFiles(Protocol):
    """The lockspace directory operations a lease actor needs (real: lockd.lockfiles)."""

    def open_lease(self, name: str, *, create: bool) -> HeldFileLike: ...
    def still_linked(self, held: Any, name: str) -> bool: ...
    def names_fd(self, fd: int, name: str) -> bool:
        """False only if ``name`` is sure not to name the file ``fd`` is open on."""
        ...

    def unlink_lease(self, name: str) -> None: ...
    def try_lock(self, fd: int, *, shared: bool) -> None: ...
    def close_fd(self, fd: int) -> None:
        """Close a lease fd (and with it the lock; the simulation's fake kernel sees it)."""
        ...

    def release_fd(self, fd: int) -> None:
        """Unlock and close the fd of a lease that ended: unlike :meth:`close_fd`, also
        while another copy of it (the service manager's fd store) stays open."""
        ...


@attrs.frozen
class TakeLock:
    """Open (or create) the lease file and lock it in ``mode``."""

    mode: LeaseMode
    create: bool
    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class AdoptLock:
    """Take over ``fd`` (inherited across re-exec, or given back by the service manager).

    Locking again through the same open file description is a no-op for the
    kernel, so the lock is held without a gap; if the fd no longer carries
    the lock and another process took it meanwhile, the adoption is refused.
    """

    fd: int
    mode: LeaseMode
    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class Relink:
    """The lease file's name no longer names the file locked: lock the file it names now.

    Someone removed or replaced the lease file under the lock (an operator's ``rm``,
    virtlockd's delete-resource, which takes no lock): the old lock then protects
    nothing, and another host could create the file again and take the disk. The
    name is opened again (created under the index lock if missing) and locked in
    the lease's mode; the old fd is closed only once that lock is held.
    """

    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class DropLock:
    """Drop the lock and close the fd; unlink the file first when it was autocreated."""

    unlink: bool


@attrs.frozen
class LockTaken:
    """Reply: the kernel lock is held."""

    resource: str
    token: int
    fd: int = attrs.field(default=-1, eq=False)
    """The lease fd (for the fd store and re-exec); the lease actor keeps owning it."""


@attrs.frozen
class LockRefused:
    """Reply: the lock could not be taken, with the code to give the client."""

    resource: str
    token: int
    code: ErrorCode
    message: str
    held_elsewhere: bool = False
    """The lease file's own lock is held by another process or host. Anything else
    (the index lock busy while another host creates or deletes a file, a file being
    replaced, an I/O error) says nothing about who holds the lease."""


class LeaseActor(DispatchedActor):
    """Holds one lease file's fd and its OFD lock on byte 0."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        files: LeaseFiles,
        lockspace: str,
        resource: str,
        first: TakeLock | AdoptLock | None = None,
    ) -> None:
        super().__init__(dispatcher)
        self._files = files
        self._lockspace = lockspace
        """Only to name the lease in full (``LOCKSPACE/RESOURCE``) in what it reports: its
        refusal is a lost lease's reason in the journal, where the hash alone said not
        which lockspace it was in."""
        self._resource = resource
        self._fd: int | None = None
        self._mode: LeaseMode | None = None
        self._first = first
        """Handled as the actor starts: the step that starts it takes the lock too (every
        lease actor is started to take or adopt one; one hop fewer per new lease)."""

    def on_start(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            self.on_receive(first)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, TakeLock):
            tell_if_alive(message.reply_to, self._take(message))
            return None
        if isinstance(message, AdoptLock):
            tell_if_alive(message.reply_to, self._adopt(message))
            return None
        if isinstance(message, Relink):
            tell_if_alive(message.reply_to, self._relink(message))
            return None
        if isinstance(message, DropLock):
            self._drop(message.unlink)
            # The lockspace forgot this actor when it sent DropLock, so nothing
            # is queued behind it: stop now rather than tell ourselves to stop
            # (one hop fewer per lease release).
            self._stop()
            return None
        return super().on_receive(message)

    def on_stop(self) -> None:
        if self._fd is not None:
            self._files.close_fd(self._fd)
            self._fd = None

    def _refused(self, msg: TakeLock, code: ErrorCode, text: str) -> LockRefused:
        return LockRefused(self._resource, msg.token, code, text)

    def _adopt(self, msg: AdoptLock) -> LockTaken | LockRefused:
        try:
            self._files.try_lock(msg.fd, shared=msg.mode is LeaseMode.SHARED)
        except LockBusyError:
            self._fd = None  # a retried adoption kept it: it is closed here
            self._files.close_fd(msg.fd)
            return LockRefused(
                self._resource, msg.token, ErrorCode.BUSY,
                f"lease {self._lockspace}/{self._resource} was taken by another process "
                "or host", True,
            )  # fmt: skip
        except OSError as exc:
            # Kept open: if it still carries the lease (the previous daemon's lock, or
            # the service manager's copy), closing it could free the lease, and the
            # lockspace tries this fd again. DropLock closes it if it gives up.
            self._fd, self._mode = msg.fd, msg.mode
            return LockRefused(
                self._resource, msg.token, ErrorCode.IO_ERROR, f"cannot lock lease file: {exc}"
            )
        self._fd, self._mode = msg.fd, msg.mode
        return LockTaken(self._resource, msg.token, msg.fd)

    def _take(self, msg: TakeLock) -> LockTaken | LockRefused:
        if self._fd is not None:
            return self._refused(msg, ErrorCode.INTERNAL, "lease actor already holds a lock")
        for _ in range(REOPEN_ATTEMPTS):
            try:
                held = self._files.open_lease(self._resource, create=msg.create)
            except LockspaceGoneError as exc:
                return self._refused(
                    msg, ErrorCode.NOT_FOUND, lockspace_gone(self._lockspace, exc.filename)
                )
            except FileNotFoundError as exc:
                # The whole path: the lockspace names it (LockspaceActor._on_lock_reply).
                return self._refused(
                    msg, ErrorCode.NOT_FOUND, f"no file {exc.filename or self._resource} "
                    "(create-resource makes it, as does an acquire with autocreate)",
                )  # fmt: skip
            except LockBusyError:
                return self._refused(
                    msg, ErrorCode.BUSY, "another host is creating or deleting a lease file here"
                )
            except OSError as exc:
                return self._refused(msg, ErrorCode.IO_ERROR, open_failure(exc))
            try:
                self._files.try_lock(held.fd, shared=msg.mode is LeaseMode.SHARED)
            except LockBusyError:
                self._files.close_fd(held.fd)
                return LockRefused(
                    self._resource, msg.token, ErrorCode.BUSY,
                    f"lease {self._lockspace}/{self._resource} is held by another process "
                    "or host", True,
                )  # fmt: skip
            except OSError as exc:
                self._files.close_fd(held.fd)
                return self._refused(msg, ErrorCode.IO_ERROR, f"cannot lock lease file: {exc}")
            # Another host may have deleted (and recreated) the file between our
            # open and our lock: a lock on an unlinked inode protects nothing.
            try:
                linked = self._files.still_linked(held, self._resource)
            except OSError as exc:  # an NFS server gone, a soft mount timing out
                self._files.close_fd(held.fd)
                return self._refused(msg, ErrorCode.IO_ERROR, f"cannot check lease file: {exc}")
            if linked:
                self._fd, self._mode = held.fd, msg.mode
                return LockTaken(self._resource, msg.token, held.fd)
            # Another host unlinked it after our open: open the name again, as
            # virtlockd's acquire loop does. Without create, a file that is
            # gone for good then ends as not-found; one re-created is locked.
            self._files.close_fd(held.fd)
        return self._refused(msg, ErrorCode.BUSY, "lease file keeps being replaced by another host")

    def _relink(self, msg: Relink) -> LockTaken | LockRefused:
        old, mode = self._fd, self._mode
        if old is None or mode is None:
            return LockRefused(self._resource, msg.token, ErrorCode.INTERNAL, "no lock held")
        if self._files.names_fd(old, self._resource):
            return LockTaken(self._resource, msg.token, old)  # put back meanwhile
        self._fd = None
        taken = self._take(TakeLock(mode, True, msg.token, msg.reply_to))
        if isinstance(taken, LockTaken):
            self._files.release_fd(old)  # as a release: the store's copy keeps no lock
        else:
            self._fd, self._mode = old, mode
        return taken

    def _drop(self, unlink: bool) -> None:
        if self._fd is None:
            return
        if unlink:
            try:
                if self._mode is LeaseMode.SHARED:
                    # Only the last holder anywhere may delete: win exclusive first.
                    self._files.try_lock(self._fd, shared=False)
                # And only the file locked: one put in its place (after an rm under
                # the lock) is another's, and may be held.
                if self._files.names_fd(self._fd, self._resource):
                    self._files.unlink_lease(self._resource)
            except (LockBusyError, OSError):
                pass  # someone else still holds or is creating it; the file stays
        self._files.release_fd(self._fd)
        self._fd = None
        crash_point("release-dropped")
