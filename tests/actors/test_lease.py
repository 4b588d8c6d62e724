"""LeaseActor on real lease files, driven step by step on the test thread."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.lease import DropLock, LeaseActor, LockRefused, LockTaken, TakeLock
from actors.model import LeaseMode
from actors.runtime import DispatchedActor, Dispatcher
from lockd.lockfiles import LockspaceDir
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


def take(env: tuple[Dispatcher, LockspaceDir, Replies], name: str, mode: LeaseMode) -> Any:
    dispatcher, files, inbox = env
    ref = LeaseActor.start(dispatcher, files, name)
    ref.tell(TakeLock(mode, create=True, token=1, reply_to=inbox.actor_ref))
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
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,struct,sys;fd=os.open(sys.argv[1],os.O_RDWR);"
            "fcntl.fcntl(fd,fcntl.F_SETLK,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,1,0));"
            "print('locked',flush=True);sys.stdin.read()",
            str(tmp_path / "disk"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        _, reply = take(env, "disk", LeaseMode.SHARED)
        assert isinstance(reply, LockRefused)
        assert reply.code is ErrorCode.BUSY
        assert "another process or host" in reply.message
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
    dispatcher, files, inbox = env
    ref = LeaseActor.start(dispatcher, files, "absent")
    ref.tell(TakeLock(LeaseMode.EXCLUSIVE, create=False, token=2, reply_to=inbox.actor_ref))
    dispatcher.run_until_idle()
    reply = inbox.got.pop()
    assert isinstance(reply, LockRefused)
    assert reply.code is ErrorCode.NOT_FOUND
