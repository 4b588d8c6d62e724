"""LeaseActor on real lease files, driven step by step on the test thread."""

from __future__ import annotations

import errno
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.lease import (
    AdoptLock,
    DropLock,
    LeaseActor,
    LockBusyError,
    LockRefused,
    LockTaken,
    Relink,
    TakeLock,
    open_failure,
)
from actors.model import LeaseMode
from actors.runtime import DispatchedActor, Dispatcher
from lockd.lockfiles import HeldFile, LockspaceDir, try_lock, unlock
from protocol.errors import ErrorCode
from tests.lockprobe import probe


class Inbox(DispatchedActor):
    """Collects replies, standing in for the lockspace actor."""

    def __init__(self, dispatcher: Dispatcher, got: list[Any]) -> None:
        super().__init__(dispatcher)
        self.got = got

    def on_receive(self, message: Any) -> Any:
        self.got.append(message)


class Replies:
    """The fake's ref and the replies it received."""

    def __init__(self, ref: pykka.ActorRef[Inbox], got: list[Any]) -> None:
        self.actor_ref = ref
        self.got = got


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Dispatcher, LockspaceDir, Replies]]:
    dispatcher = Dispatcher()
    files = LockspaceDir(str(tmp_path))
    got: list[Any] = []
    yield dispatcher, files, Replies(Inbox.start(dispatcher, got), got)
    dispatcher.stop_all()
    dispatcher.run_until_idle()
    files.close()
    dispatcher.close()


def take(
    env: tuple[Dispatcher, LockspaceDir, Replies],
    name: str,
    mode: LeaseMode = LeaseMode.EXCLUSIVE,
    *,
    create: bool = True,
) -> Any:
    """Start a lease actor on ``env``'s files, ask it to take the lock; (ref, its reply)."""
    dispatcher, files, inbox = env
    ref = LeaseActor.start(dispatcher, files, "ls", name)
    ref.tell(TakeLock(mode, create=create, token=1, reply_to=inbox.actor_ref))
    dispatcher.run_until_idle()
    return ref, inbox.got.pop()


def test_exclusive_take_locks_the_file_and_drop_unlinks_it(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    """Another process cannot lock the file while held; after drop it is gone."""
    dispatcher = env[0]
    ref, reply = take(env, "disk", LeaseMode.EXCLUSIVE)
    assert reply == LockTaken("disk", 1)
    assert probe(tmp_path / "disk", "classic", "read") == "busy"
    ref.tell(DropLock(unlink=True))
    dispatcher.run_until_idle()
    assert not (tmp_path / "disk").exists()
    assert not ref.is_alive()


def test_lock_held_elsewhere_is_refused_as_busy(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    """A lock held by another process (another host's daemon) is busy, and nothing leaks."""
    (tmp_path / "disk").touch()
    with _locked_by_another_process(tmp_path / "disk"):
        _, reply = take(env, "disk", LeaseMode.SHARED)
        assert isinstance(reply, LockRefused)
        assert reply.code is ErrorCode.BUSY
        # In full, LOCKSPACE/RESOURCE: at recovery this is a lost lease's reason.
        assert reply.message == "lease ls/disk is held by another process or host"


def test_an_adopted_fd_whose_lock_another_process_took_is_refused_naming_the_lease(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    """An fd handed back (fd store, re-exec) that no longer carries its lock, taken by
    another process meanwhile: refused as busy, and the reason (a lost lease's, in the
    journal) names the lease as LOCKSPACE/RESOURCE, not by its hash alone."""
    dispatcher, files, inbox = env
    (tmp_path / "disk").touch()
    fd = os.open(tmp_path / "disk", os.O_RDWR)
    with _locked_by_another_process(tmp_path / "disk"):
        LeaseActor.start(dispatcher, files, "ls", "disk", AdoptLock(fd, LeaseMode.EXCLUSIVE, 1,
                                                                    inbox.actor_ref))  # fmt: skip
        dispatcher.run_until_idle()
        reply = inbox.got.pop()
        assert isinstance(reply, LockRefused)
        assert reply.held_elsewhere
        assert reply.message == "lease ls/disk was taken by another process or host"


@contextmanager
def _locked_by_another_process(path: Path) -> Iterator[None]:
    """``path`` locked on byte 0 by another process (another host's daemon) meanwhile."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,struct,sys;fd=os.open(sys.argv[1],os.O_RDWR);"
            "fcntl.fcntl(fd,fcntl.F_SETLK,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,1,0));"
            "print('locked',flush=True);sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_shared_drop_keeps_the_file_while_another_holder_remains(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    """The last shared holder deletes the file only after winning an exclusive upgrade."""
    dispatcher = env[0]
    first, _ = take(env, "shared", LeaseMode.SHARED)
    second, reply = take(env, "shared", LeaseMode.SHARED)
    assert reply == LockTaken("shared", 1)
    first.tell(DropLock(unlink=True))
    dispatcher.run_until_idle()
    assert (tmp_path / "shared").exists()
    second.tell(DropLock(unlink=True))
    dispatcher.run_until_idle()
    assert not (tmp_path / "shared").exists()


def test_missing_file_without_create_is_not_found(
    env: tuple[Dispatcher, LockspaceDir, Replies],
) -> None:
    """Without autocreate, acquiring a lease whose file is absent is not-found."""
    _, reply = take(env, "absent", create=False)
    assert isinstance(reply, LockRefused)
    assert reply.code is ErrorCode.NOT_FOUND


class ReplacedAfterFirstOpen(LockspaceDir):
    """A lockspace where another host deletes and re-creates the lease file right after
    our first open (so before our lock); keeps an fd on the old inode to ask about it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.opens = 0
        self.old_inode: int | None = None

    def open_lease(self, name: str, *, create: bool) -> HeldFile:
        held = super().open_lease(name, create=create)
        self.opens += 1
        if self.opens == 1:
            path = os.path.join(self.path, name)
            self.old_inode = os.open(path, os.O_RDWR)
            os.unlink(path)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        return held


def inode_locked(fd: int) -> bool:
    """Whether someone else holds the lock on the inode ``fd`` is open on (linked or not)."""
    try:
        try_lock(fd, shared=False)
    except LockBusyError:
        return True
    unlock(fd)
    return False


def test_a_file_replaced_between_open_and_lock_is_never_held_on_its_old_inode(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    """Without create too (recovery, acquire without autocreate): the lock is checked
    against the name after it is taken, so the unlinked inode is let go and the
    file the name names now is opened and locked instead."""
    dispatcher, _, inbox = env
    (tmp_path / "disk").touch()
    files = ReplacedAfterFirstOpen(str(tmp_path))
    try:
        ref, taken = take((dispatcher, files, inbox), "disk", create=False)
        assert taken == LockTaken("disk", 1), "refused or locked the unlinked inode"
        assert os.fstat(taken.fd).st_ino == os.stat(tmp_path / "disk").st_ino
        assert files.old_inode is not None
        assert not inode_locked(files.old_inode)
        assert probe(tmp_path / "disk", "ofd") == "busy"
        assert files.opens == 2
        ref.tell(DropLock(unlink=False))
        dispatcher.run_until_idle()
    finally:
        if files.old_inode is not None:
            os.close(files.old_inode)
        files.close()


class DeletedAfterFirstOpen(LockspaceDir):
    """Another host deletes the lease file right after our first open, for good."""

    def open_lease(self, name: str, *, create: bool) -> HeldFile:
        held = super().open_lease(name, create=create)
        os.unlink(os.path.join(self.path, name))
        return held


def test_a_file_deleted_between_open_and_lock_is_not_found_without_create(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    dispatcher, _, inbox = env
    (tmp_path / "disk").touch()
    files = DeletedAfterFirstOpen(str(tmp_path))
    try:
        _, refused = take((dispatcher, files, inbox), "disk", create=False)
        assert isinstance(refused, LockRefused)
        assert refused.code is ErrorCode.NOT_FOUND
        assert not (tmp_path / "disk").exists()
    finally:
        files.close()


def test_open_failures_say_what_to_do_about_descriptors(caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE names the daemon's limit and LimitNOFILE, ENFILE the system's; others pass
    through; the log warning comes once however many acquires are refused."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with caplog.at_level(logging.WARNING, logger="actors.lease"):
        texts = [open_failure(OSError(errno.EMFILE, "Too many open files")) for _ in range(3)]
    assert f"all {soft} of its file descriptors" in texts[0]
    assert "LimitNOFILE" in texts[0]
    assert len([r for r in caplog.records if "refusing new leases" in r.message]) <= 1
    enfile = open_failure(OSError(errno.ENFILE, "Too many open files in system"))
    assert "fs.file-max" in enfile
    assert open_failure(OSError(errno.EACCES, "Permission denied")) == (
        "cannot open lease file: [Errno 13] Permission denied"
    )


def replaced_and_locked(path: Path) -> int:
    """Remove ``path`` and put a new file there, locked (another host's); its fd."""
    path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try_lock(fd, shared=False)
    return fd


def test_relink_locks_the_file_its_name_names_now(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    """A held lease's file removed: Relink creates the file again and locks it."""
    dispatcher, _, inbox = env
    ref, first = take(env, "disk")
    (tmp_path / "disk").unlink()
    ref.tell(Relink(token=2, reply_to=inbox.actor_ref))
    dispatcher.run_until_idle()
    (reply,) = inbox.got
    assert isinstance(reply, LockTaken)
    assert reply.fd != first.fd
    assert probe(tmp_path / "disk", "classic", "read") == "busy"


def test_relink_onto_a_file_another_holds_is_refused_as_held_elsewhere(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    """The file put in place of the held one is locked by another: the lease is lost."""
    dispatcher, _, inbox = env
    ref, _ = take(env, "disk")
    theirs = replaced_and_locked(tmp_path / "disk")
    try:
        ref.tell(Relink(token=2, reply_to=inbox.actor_ref))
        dispatcher.run_until_idle()
        (reply,) = inbox.got
        assert isinstance(reply, LockRefused)
        assert reply.held_elsewhere
    finally:
        os.close(theirs)


def test_drop_never_unlinks_a_file_put_in_place_of_the_one_locked(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path
) -> None:
    """An autocreated lease released after its file was replaced leaves the new file,
    which another host may hold, where it is (until 2026-11-27 it was unlinked)."""
    dispatcher = env[0]
    ref, _ = take(env, "disk")
    theirs = replaced_and_locked(tmp_path / "disk")
    try:
        ref.tell(DropLock(unlink=True))
        dispatcher.run_until_idle()
        assert (tmp_path / "disk").exists()
    finally:
        os.close(theirs)


class StatFailsAfterLock(LockspaceDir):
    """Once ``failing``, the server answers the open and the lock, then fails the check
    of the name (an NFS server going away, a soft mount timing out): EIO."""

    failing = False

    def still_linked(self, held: Any, name: str) -> bool:
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        return super().still_linked(held, name)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("step", ["take", "relink"])
def test_an_io_error_checking_the_name_after_the_lock_is_a_refusal_not_a_crash(
    env: tuple[Dispatcher, LockspaceDir, Replies], tmp_path: Path, step: str
) -> None:
    """The check that the file just locked is still the one its name names fails with an
    I/O error: the lock is refused as an I/O error (a relink keeps the lock it had, and
    the lockspace tries again), the fd opened for it is closed, and the actor lives on.
    The error escaped the actor, which stops the dispatcher: the whole daemon, and
    without an fd store every lock on the host, went down over one stat."""
    dispatcher, _, inbox = env
    files = StatFailsAfterLock(str(tmp_path))
    try:
        ref = LeaseActor.start(dispatcher, files, "ls", "disk")
        message: TakeLock | Relink = TakeLock(LeaseMode.EXCLUSIVE, True, 1, inbox.actor_ref)
        if step == "relink":
            ref.tell(message)
            dispatcher.run_until_idle()
            assert isinstance(inbox.got.pop(), LockTaken)
            (tmp_path / "disk").unlink()
            message = Relink(token=2, reply_to=inbox.actor_ref)
        before = open_fds()
        files.failing = True
        ref.tell(message)
        dispatcher.run_until_idle()
        (reply,) = inbox.got
        assert isinstance(reply, LockRefused)
        assert (reply.code, reply.held_elsewhere) == (ErrorCode.IO_ERROR, False)
        assert "Input/output error" in reply.message
        assert open_fds() == before
        assert probe(tmp_path / "disk", "ofd") == "free"
        assert ref.is_alive()
        ref.tell(DropLock(unlink=False))
        dispatcher.run_until_idle()
    finally:
        files.close()
