"""Lease files and their locks: the one place lockd calls fcntl on a lease.

A lease is an open-file-description (OFD) lock on byte 0, length 1 of a
zero-byte file: write lock = exclusive, read lock = shared. OFD locks conflict
with the classic POSIX locks virtlockd takes on the same byte, so lockd and
virtlockd hosts sharing a lock directory exclude each other; unlike classic
locks they are not dropped when some other fd on the file closes.

Files are opened relative to the lockspace directory fd with O_NOFOLLOW, so a
symlink planted in a lockspace never redirects lockd to another file, and only
regular files are taken as lease files.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

import attrs

from actors.lease import LockBusyError, LockspaceGoneError
from lockd import fork_guard
from protocol.names import INDEX_NAME

log = logging.getLogger(__name__)

__all__ = [
    "HeldFile", "LockBusyError", "LockspaceDir", "holds_lock", "lock_conflicts", "try_lock",
    "unlock",
]  # fmt: skip

_FLOCK = struct.Struct("hhqqi4x")
"""struct flock on Linux x86_64/aarch64: l_type, l_whence, l_start, l_len, l_pid."""

LEASE_FILE_MODE = 0o600

_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
"""How a lease or index file is opened. Not through a symlink; and should another file
than a plain one be found at its name (a FIFO, a device node planted on the shared lock
dir), the open neither waits (a FIFO, a modem line) nor makes a tty lockd's terminal."""


def _plain_file(fd: int, name: str) -> os.stat_result:
    """``fd``'s stat if it is a regular file; else close it and raise OSError (io-error)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise OSError(errno.EINVAL, f"not a lease file but {kind}", name)
    return st


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


_SETLK = fcntl.F_OFD_SETLK
# The three requests on byte 0, length 1 (l_pid must be 0), packed once: a pair
# makes four lock calls (two on the index file, the lease's lock and unlock).
_SHARED = _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 1, 0)
_EXCLUSIVE = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
_UNLOCK = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0)


def try_lock(fd: int, *, shared: bool) -> None:
    """Take the lease lock on ``fd``; raise LockBusyError on conflict, OSError otherwise."""
    try:
        fcntl.fcntl(fd, _SETLK, _SHARED if shared else _EXCLUSIVE)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise LockBusyError from None
        raise


def lock_conflicts(fd: int, *, shared: bool) -> bool:
    """Whether taking the lease lock on ``fd`` (``shared`` or exclusive) would conflict
    with one another open file description holds. Takes no lock (F_OFD_GETLK): a
    checker (``lockd verify``) never makes a concurrent acquire busy."""
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _SHARED if shared else _EXCLUSIVE)
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)


def holds_lock(fd: int) -> bool:
    """Whether ``fd``'s open file description holds an OFD lock on its file.

    Read from /proc, which lists in an fd's fdinfo the locks its description owns.
    Asking the kernel who conflicts (F_OFD_GETLK) cannot tell: a description never
    conflicts with its own lock, but an unlocked one on a file nobody locks (the file a
    lease held before a relink) sees no conflict either. Raises OSError without /proc.
    """
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        return any(line.startswith("lock:") and " OFDLCK " in line for line in info)


def unlock(fd: int) -> None:
    """Drop the lease lock on ``fd`` (closing the fd drops it too)."""
    fcntl.fcntl(fd, _SETLK, _UNLOCK)


@attrs.define
class HeldFile:
    """An open lease file descriptor and the inode it was opened on."""

    fd: int
    inode: tuple[int, int]


def _open_dir(path: str) -> tuple[int, tuple[int, int]]:
    """A directory fd on ``path`` and the directory's (device, inode), which an open fd
    keeps for good. O_NOFOLLOW: a lockspace directory swapped for a symlink on the
    shared lock dir must not redirect lease files elsewhere."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino)


class LockspaceDir:
    """One lockspace directory, held open as a directory fd."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dirfd, self._dir_id = _open_dir(path)

    def follow_path(self) -> bool:
        """Hold open the directory at :attr:`path` now, if it is another than the one held
        (removed and made again, or moved aside and replaced, or another mount over it);
        True when it changed.

        Lease files are opened, created and checked through the directory fd: left on
        the old directory, a held lease's name looked fine there (moved aside), or could
        not be made again (removed), while other hosts created and locked the disk's
        file in the new one. A path that is gone, or is no directory (a symlink put in
        its place), is not followed: nothing changes until a directory is there.
        """
        try:
            now = os.stat(self.path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == self._dir_id:  # one stat per acquire, no more
                return False
            fd, dir_id = _open_dir(self.path)
        except OSError:
            return False
        os.close(self._dirfd)
        self._dirfd, self._dir_id = fd, dir_id
        log.warning("lockspace directory %s was replaced: its lease files are opened in the "
                    "new one, and held leases locked again there", self.path)  # fmt: skip
        return True

    try_lock = staticmethod(try_lock)
    """Take the lease lock on ``fd``: :func:`try_lock` itself, no call in between."""

    @staticmethod
    def close_fd(fd: int) -> None:
        """Close a lease fd: its OFD lock goes with it, unless another copy of its open
        file description lives on (the fd store's: see :meth:`release_fd`, or a forked
        child's: see :mod:`lockd.fork_guard`)."""
        fork_guard.close(fd)

    @staticmethod
    def release_fd(fd: int) -> None:
        """Unlock, then close a lease fd whose lease ended: the lock ends now, though
        the service manager's fd store keeps a copy of the description (and with a
        close alone, its lock) until it gets to the FDSTOREREMOVE."""
        # Not contextlib.suppress: once per release, it costs 24 bytecodes more.
        try:  # noqa: SIM105
            unlock(fd)
        except OSError:
            pass  # the close drops what it can anyway
        fork_guard.close(fd)

    def close(self) -> None:
        """Close the directory fd; open lease fds are unaffected."""
        os.close(self._dirfd)

    def _open(self, name: str, flags: int) -> int:
        """Open ``name`` in the lockspace; an error names the whole path: opened through
        the directory fd, it named only the file (``[Errno 28] No space left on device:
        'r15'``), not which lockspace directory, on which filesystem, was full."""
        try:
            return os.open(name, flags, LEASE_FILE_MODE, dir_fd=self._dirfd)
        except OSError as exc:
            if exc.errno is None:
                raise
            if exc.errno == errno.ENOENT and not os.path.lexists(self.path):
                raise LockspaceGoneError(
                    errno.ENOENT, "lockspace directory gone", self.path
                ) from None
            # O_NOFOLLOW meeting a symlink: "Too many levels of symbolic links" said
            # nothing of what the file was, nor that lockd refuses it on purpose.
            why = (
                "not a lease file but a symbolic link (lockd never follows one)"
                if exc.errno == errno.ELOOP
                else exc.strerror
            )
            raise type(exc)(exc.errno, why, os.path.join(self.path, name)) from None

    def _index_locked(self) -> int:
        """Open and exclusively lock the index file; the caller closes the fd to unlock."""
        fd = self._open(INDEX_NAME, _OPEN_FLAGS | os.O_CREAT)
        fork_guard.remember(fd, _plain_file(fd, INDEX_NAME))
        try:
            try_lock(fd, shared=False)
        except BaseException:
            fork_guard.close(fd)
            raise
        return fd

    def open_lease(self, name: str, *, create: bool) -> HeldFile:
        """Open a lease file, creating it under the index lock when ``create`` is set.

        Raises FileNotFoundError when it does not exist and ``create`` is off,
        LockBusyError when another host is creating or deleting a file in
        this lockspace at this instant.
        """
        self.follow_path()  # never a stale directory: another host uses the one there now
        if not create:
            fd = self._open(name, _OPEN_FLAGS)
        else:
            index = self._index_locked()
            try:
                fd = self._open(name, _OPEN_FLAGS | os.O_CREAT)
            finally:
                fork_guard.close(index)
        st = _plain_file(fd, name)
        fork_guard.remember(fd, st)
        return HeldFile(fd=fd, inode=(st.st_dev, st.st_ino))

    def still_linked(self, held: HeldFile, name: str) -> bool:
        """True if ``name`` still names the inode ``held`` was opened on.

        After locking, a file another host unlinked (or replaced) in between
        must be reopened, as virtlockd's acquire loop does. Raises OSError when
        the name cannot be looked up (an I/O error).
        """
        try:
            st = os.stat(name, dir_fd=self._dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == held.inode

    def names_fd(self, fd: int, name: str) -> bool:
        """False only if ``name`` is sure not to name the file ``fd`` is open on (it names
        another file, or none); an error reading either says nothing, and is True."""
        try:
            st = os.fstat(fd)
            now = os.stat(name, dir_fd=self._dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)

    def unlink_lease(self, name: str) -> None:
        """Remove a lease file under the index lock; a missing file is not an error."""
        index = self._index_locked()
        try:
            os.unlink(name, dir_fd=self._dirfd)
        except FileNotFoundError:
            pass
        finally:
            fork_guard.close(index)
