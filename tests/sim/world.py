"""The simulated world the real actors run in: a kernel lock table, process tables, journals.

Everything the lock daemon touches outside Python is faked here, and is
deterministic: one thread, no real processes, no real lease files. The
actors, their cores, the journal actor and recovery are the real ones.
"""

from __future__ import annotations

import signal as signals
from collections.abc import Callable, Sequence

import attrs

from actors.events import JournalEntry
from actors.lease import LockBusyError
from actors.model import Owner
from tests.fakes import ListReader, PipeWatches

INDEX = "org.libvirt.lockd.index"


@attrs.define
class Ofd:
    """An open file description: who opened which inode."""

    holder: str
    """"host-a", "host-b" (a daemon), or "thief" (another host without a daemon)."""
    inode: int


class Kernel:
    """Lease files on a shared lock directory, and the OFD locks on byte 0 of them.

    Locks follow fcntl semantics: any number of read locks, or one write
    lock, per file; a description may convert its own lock; closing the
    description drops its lock. Locks belong to the inode: unlinking a file
    keeps its locks on the old inode, and a new file of the same name is a
    new inode, unlocked. Files live in directories, which a path names: a
    directory moved aside keeps its files, and one made in its place is empty.
    """

    def __init__(self) -> None:
        self.dirs: dict[str, int] = {}
        """The directory each path names now."""
        self.files: dict[tuple[int, str], int] = {}
        self.ofds: dict[int, Ofd] = {}
        self.locks: dict[int, dict[int, str]] = {}
        self._next_inode = 1
        self._next_fd = 100_000  # never a real fd: a bug passing one to os.* fails loudly

    def folder(self, path: str) -> int:
        """The directory ``path`` names now (made, empty, if there is none)."""
        if path not in self.dirs:
            self.dirs[path] = self._next_inode
            self._next_inode += 1
        return self.dirs[path]

    def replace_folder(self, path: str) -> None:
        """The directory at ``path`` is moved aside, its files in it, and a new one made."""
        self.dirs.pop(path, None)
        self.folder(path)

    def open(self, holder: str, directory: int, name: str, *, create: bool) -> int:
        key = (directory, name)
        if key not in self.files:
            if not create:
                raise FileNotFoundError(name)
            self.files[key] = self._next_inode
            self._next_inode += 1
        fd = self._next_fd
        self._next_fd += 1
        self.ofds[fd] = Ofd(holder, self.files[key])
        return fd

    def lock(self, fd: int, *, shared: bool) -> None:
        ofd = self.ofds[fd]
        held = self.locks.setdefault(ofd.inode, {})
        others = {mode for other, mode in held.items() if other != fd}
        if "w" in others or (not shared and others):
            raise LockBusyError
        held[fd] = "r" if shared else "w"

    def close(self, fd: int) -> None:
        ofd = self.ofds.pop(fd)
        held = self.locks.get(ofd.inode, {})
        held.pop(fd, None)

    def close_all(self, holder: str) -> None:
        """A process died: the kernel closes every description it had."""
        for fd in [fd for fd, ofd in self.ofds.items() if ofd.holder == holder]:
            self.close(fd)

    def unlink(self, directory: int, name: str) -> None:
        self.files.pop((directory, name), None)

    def replace(self, directory: int, name: str) -> None:
        """A new file is renamed over ``name``, if there is one: a new inode, unlocked."""
        if (directory, name) in self.files:
            self.files[(directory, name)] = self._next_inode
            self._next_inode += 1

    def check(self) -> None:
        """fcntl's own rule: never a write lock beside any other lock on one file."""
        for inode, held in self.locks.items():
            modes = list(held.values())
            assert modes.count("w") <= 1, f"inode {inode}: two write locks {held}"
            assert not ("w" in modes and "r" in modes), f"inode {inode}: write beside read"

    def holders(self, directory: str, name: str) -> dict[str, str]:
        """holder -> mode of the locks on the file now named ``directory/name``."""
        inode = self.files.get((self.folder(directory), name))
        if inode is None:
            return {}
        return {self.ofds[fd].holder: mode for fd, mode in self.locks.get(inode, {}).items()}


@attrs.frozen
class FakeHeld:
    fd: int
    inode: tuple[int, int]


class FakeLockspaceDir:
    """``LeaseFiles`` over the fake kernel, for one daemon (``holder``) and one lockspace."""

    def __init__(self, kernel: Kernel, holder: str, path: str) -> None:
        self._kernel = kernel
        self._holder = holder
        self.path = path
        self._dir = kernel.folder(path)

    def open_lease(self, name: str, *, create: bool) -> FakeHeld:
        self.follow_path()  # as the real one: never a stale directory
        if create:
            index = self._kernel.open(self._holder, self._dir, INDEX, create=True)
            try:
                self._kernel.lock(index, shared=False)
                fd = self._kernel.open(self._holder, self._dir, name, create=True)
            finally:
                self._kernel.close(index)
        else:
            fd = self._kernel.open(self._holder, self._dir, name, create=False)
        return FakeHeld(fd, (0, self._kernel.ofds[fd].inode))

    def still_linked(self, held: FakeHeld, name: str) -> bool:
        return self._kernel.files.get((self._dir, name)) == held.inode[1]

    def names_fd(self, fd: int, name: str) -> bool:
        return self._kernel.files.get((self._dir, name)) == self._kernel.ofds[fd].inode

    def unlink_lease(self, name: str) -> None:
        index = self._kernel.open(self._holder, self._dir, INDEX, create=True)
        try:
            self._kernel.lock(index, shared=False)
            self._kernel.unlink(self._dir, name)
        finally:
            self._kernel.close(index)

    def try_lock(self, fd: int, *, shared: bool) -> None:
        self._kernel.lock(fd, shared=shared)

    def close_fd(self, fd: int) -> None:
        self._kernel.close(fd)

    def release_fd(self, fd: int) -> None:
        """As close_fd: the fake kernel has no second copy of a description."""
        self._kernel.close(fd)

    def follow_path(self) -> bool:
        """Use the directory the path names now, if it is another; True if it changed."""
        now = self._kernel.folder(self.path)
        if now == self._dir:
            return False
        self._dir = now
        return True

    def close(self) -> None:
        """No directory fd to close."""


class ProcessTable:
    """One host's processes: pids with start times; exits; pid reuse."""

    def __init__(
        self,
        clock: Callable[[], float] = lambda: 0.0,
        journal_failing: Callable[[], bool] = lambda: False,
    ) -> None:
        self.procs: dict[int, int] = {}
        self.ignores_sigterm: set[int] = set()
        self.views: list[ProcessView] = []
        self.signals: list[tuple[int, str]] = []
        self._started = 1000
        self.clock = clock
        self.journal_failing = journal_failing
        self.fenced: dict[tuple[int, int], float] = {}
        """(pid, start time) of each process that outlived a SIGTERM => when it got the first:
        a fence's SIGKILL is due a grace period later, across daemon crashes."""
        self.unrecorded: set[tuple[int, int]] = set()
        """Fenced while the journal failed: the next daemon may not know of the fence."""

    def spawn(self, pid: int, start: int | None = None) -> int:
        """Start a process with ``pid`` (a new start time: pid reuse is a different process).

        ``start`` gives it a start time of an earlier boot: after a reboot, VMs
        autostarted in the same order repeat their old pids and start times.
        """
        if start is None:
            self._started += 1
            start = self._started
        self.procs[pid] = start
        return start

    def exit(self, pid: int) -> None:
        if self.procs.pop(pid, None) is not None:
            for view in self.views:
                view.fire(pid)


class ProcessView:
    """The process table as one daemon incarnation sees it; its pidfd-like pipes die with it."""

    def __init__(self, table: ProcessTable) -> None:
        self.table = table
        self._watches = PipeWatches()
        table.views.append(self)

    def start_time(self, pid: int) -> int | None:
        return self.table.procs.get(pid)

    def uid_of(self, pid: int) -> int | None:
        return 0 if pid in self.table.procs else None

    def uids_of(self, pid: int) -> tuple[int, int] | None:
        return (0, 0) if pid in self.table.procs else None

    def leader_of(self, pid: int) -> int | None:
        return pid if pid in self.table.procs else None

    def is_gone(self, owner: Owner) -> bool:
        return self.table.procs.get(owner.pid) != owner.start_time

    def pid_gone(self, owner: Owner) -> bool:
        """A reused pid answers kill 0: only the full check sees the owner gone."""
        return owner.pid not in self.table.procs

    def open_watch(self, owner: Owner) -> int | None:
        if self.is_gone(owner):
            return None
        return self._watches.open(owner.pid)

    def close_watch(self, fd: int) -> None:
        self._watches.close(fd)

    def fire(self, pid: int) -> None:
        self._watches.fire(pid)

    def signal(self, owner: Owner, signum: int) -> bool:
        if self.is_gone(owner):
            return False
        name = signals.Signals(signum).name
        table = self.table
        table.signals.append((owner.pid, name))
        if name == "SIGKILL" or owner.pid not in table.ignores_sigterm:
            table.exit(owner.pid)
        else:
            key = (owner.pid, owner.start_time)
            table.fenced.setdefault(key, table.clock())
            if table.journal_failing():
                table.unrecorded.add(key)
        return True

    def close(self) -> None:
        self._watches.close_all()
        self.table.views.remove(self)


class SimJournal:
    """A journal that survives daemon crashes (it is in the kernel once written)."""

    def __init__(self) -> None:
        self.entries: list[JournalEntry] = []
        self.readers: list[ListReader] = []
        self.next_seq = 1
        self.fail = False

    def append(self, entries: Sequence[JournalEntry]) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.entries.extend(entries)
        self.next_seq += len(entries)

    def reader(self, since_seq: int) -> ListReader:
        self.readers.append(ListReader(self.entries, since_seq))
        return self.readers[-1]

    def sync(self) -> None:
        """Survives a daemon crash either way; host crashes are not simulated."""
