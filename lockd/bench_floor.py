"""What one acquire+release pair cannot go below: its syscalls and its journal record.

A lock daemon's pair is bounded below by the kernel work it must do. virtlockd
(with AUTOCREATE, as libvirt uses it) opens the lease file with ``O_CREAT``,
locks it, and on release unlinks and closes it. lockd does that under the
lockspace's index lock (so a release never unlinks a file another host has
just re-created) and checks after locking that the name still names the
locked inode; it also writes a journal record per change. These functions
time exactly those steps in-process, on the same file system as the daemon's
lock directory, so the side-by-side table can say how much of each daemon's
pair is kernel work and how much is the daemon itself; and one hop between
two of lockd's actors, the unit of its actor system's own cost.
"""

from __future__ import annotations

import fcntl
import os
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

import attrs
import pykka

from actors.events import JournalEntry, LeaseAcquired, LeaseReleased, ReleaseReason
from actors.model import LeaseMode, Owner
from actors.runtime import DispatchedActor, Dispatcher
from lockd.journal_file import FileJournal
from lockd.lockfiles import LockspaceDir

_FLOCK = struct.Struct("hhqqi4x")
_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def _per_op_us(step: Callable[[], None], ops: int, warmup: int = 200) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(ops):
        step()
    return round((time.perf_counter() - start) / ops * 1e6, 2)


def virtlockd_files_pair_us(directory: str, ops: int = 5000) -> float:
    """virtlockd's file work per pair: open(O_CREAT), lock; unlink, close."""
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)

    def pair() -> None:
        fd = os.open("floor-v", _FLAGS | os.O_CREAT, 0o600, dir_fd=dirfd)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        os.unlink("floor-v", dir_fd=dirfd)
        os.close(fd)

    try:
        return _per_op_us(pair, ops)
    finally:
        os.close(dirfd)


def lockd_files_pair_us(directory: str, ops: int = 5000) -> float:
    """lockd's file work per pair, through the daemon's own :class:`LockspaceDir` calls."""
    files = LockspaceDir(directory)

    def pair() -> None:
        held = files.open_lease("floor-l", create=True)
        files.try_lock(held.fd, shared=False)
        files.still_linked(held, "floor-l")
        files.unlink_lease("floor-l")
        files.close_fd(held.fd)

    try:
        return _per_op_us(pair, ops)
    finally:
        files.close()


def journal_pair_us(directory: str, ops: int = 5000) -> float:
    """Encoding and writing a pair's two journal records (``journal_sync = none``)."""
    journal = FileJournal(directory)
    owner = Owner(b"\x01" * 16, "floor", 1, os.getpid(), 1)
    files = "org.libvirt.lockd.files"

    def pair() -> None:
        now = time.time()
        seq = journal.next_seq
        acquired = LeaseAcquired(files, "floor", LeaseMode.EXCLUSIVE, owner, 1, True)
        journal.append([JournalEntry(seq, now, "floor", acquired)])
        released = LeaseReleased(
            files, "floor", LeaseMode.EXCLUSIVE, owner, 1, ReleaseReason.CLIENT
        )
        journal.append([JournalEntry(seq + 1, now, "floor", released)])

    try:
        return _per_op_us(pair, ops)
    finally:
        journal.close()


@attrs.frozen
class _Ping:
    left: int
    token: int
    reply_to: pykka.ActorRef[Any]


class _PingActor(DispatchedActor):
    def __init__(self, dispatcher: Dispatcher, handled: list[int]) -> None:
        super().__init__(dispatcher)
        self._handled = handled

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Ping):
            self._handled[0] += 1
            if message.left:
                message.reply_to.tell(_Ping(message.left - 1, message.token, self.actor_ref))
            return None
        return super().on_receive(message)


def actor_hop_us(ops: int = 50_000) -> float:
    """One message between two of lockd's actors: an attrs message built, told, dispatched
    and handled, in-process. A pair makes 13 such hops, so this says how much of a pair
    the actor system itself costs."""
    dispatcher = Dispatcher()
    handled = [0]
    try:
        a, b = _PingActor.start(dispatcher, handled), _PingActor.start(dispatcher, handled)
        dispatcher.run_until_idle(poll_io=False)
        a.tell(_Ping(1000, 0, b))  # warm-up
        dispatcher.run_until_idle(poll_io=False)
        handled[0] = 0
        a.tell(_Ping(ops, 1, b))
        start = time.perf_counter()
        dispatcher.run_until_idle(poll_io=False)
        elapsed = time.perf_counter() - start
        dispatcher.stop_all()
        dispatcher.run_until_idle(poll_io=False)
    finally:
        dispatcher.close()
    if handled[0] != ops + 1:
        raise RuntimeError(f"actor hop floor: {handled[0]} of {ops + 1} messages handled")
    return round(elapsed / (ops + 1) * 1e6, 2)


def work_floors(lock_dir: str | None = None, ops: int = 5000) -> dict[str, float]:
    """The floors, in a temp directory beside ``lock_dir`` (its file system matters)."""
    parent = lock_dir if lock_dir and os.path.isdir(lock_dir) else None
    with tempfile.TemporaryDirectory(prefix="lockd-floor-", dir=parent) as tmp:
        leases = os.path.join(tmp, "leases")
        journal = os.path.join(tmp, "journal")
        os.mkdir(leases)
        os.mkdir(journal)
        return {
            "virtlockd_files_pair_us": virtlockd_files_pair_us(leases, ops),
            "lockd_files_pair_us": lockd_files_pair_us(leases, ops),
            "journal_pair_us": journal_pair_us(journal, ops),
            "actor_hop_us": actor_hop_us(ops * 10),
        }
