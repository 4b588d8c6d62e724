"""Real OFD locks on lease files, checked from another process."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockd.lockfiles import LockBusyError, LockspaceDir, try_lock, unlock
from tests.lockprobe import probe


@pytest.fixture
def lockspace(tmp_path: Path) -> Iterator[LockspaceDir]:
    ls = LockspaceDir(str(tmp_path))
    yield ls
    ls.close()


@pytest.mark.parametrize("kind", ["ofd", "classic"])
def test_exclusive_lease_blocks_other_processes_until_released(
    lockspace: LockspaceDir, tmp_path: Path, kind: str
) -> None:
    """A held write lock on byte 0 stops OFD and virtlockd-style classic locks elsewhere."""
    held = lockspace.open_lease("disk1", create=True)
    try_lock(held.fd, shared=False)
    assert probe(tmp_path / "disk1", kind, "read") == "busy"
    unlock(held.fd)
    assert probe(tmp_path / "disk1", kind) == "free"
    os.close(held.fd)


def test_shared_lease_admits_readers_and_refuses_writers(
    lockspace: LockspaceDir, tmp_path: Path
) -> None:
    """A shared lease is a read lock: other shared holders fit, exclusive ones do not."""
    held = lockspace.open_lease("disk2", create=True)
    try_lock(held.fd, shared=True)
    assert probe(tmp_path / "disk2", "ofd", "read") == "free"
    assert probe(tmp_path / "disk2", "classic", "write") == "busy"
    os.close(held.fd)


def test_two_fds_in_one_process_conflict(lockspace: LockspaceDir) -> None:
    """OFD locks conflict inside one process, unlike classic locks."""
    first = lockspace.open_lease("disk3", create=True)
    second = lockspace.open_lease("disk3", create=False)
    try_lock(first.fd, shared=False)
    with pytest.raises(LockBusyError):
        try_lock(second.fd, shared=False)
    os.close(second.fd)
    os.close(first.fd)


def test_lease_file_is_empty_and_private(lockspace: LockspaceDir, tmp_path: Path) -> None:
    """Created lease files are zero bytes, mode 0600."""
    held = lockspace.open_lease("disk4", create=True)
    st = (tmp_path / "disk4").stat()
    assert st.st_size == 0
    assert st.st_mode & 0o777 == 0o600
    os.close(held.fd)


def test_planted_symlink_is_never_followed(lockspace: LockspaceDir, tmp_path: Path) -> None:
    """A symlink in the lockspace pointing elsewhere is refused, and its target untouched."""
    target = tmp_path.parent / f"{tmp_path.name}-outside"
    (tmp_path / "evil").symlink_to(target)
    with pytest.raises(OSError):  # noqa: PT011 - ELOOP from O_NOFOLLOW
        lockspace.open_lease("evil", create=True)
    assert not target.exists()


def test_missing_file_without_create(lockspace: LockspaceDir) -> None:
    """Without autocreate a missing lease file is reported, not created."""
    with pytest.raises(FileNotFoundError):
        lockspace.open_lease("absent", create=False)


def test_unlinked_file_is_detected(lockspace: LockspaceDir) -> None:
    """A file unlinked after open is noticed, so acquire reopens it."""
    held = lockspace.open_lease("disk5", create=True)
    assert lockspace.still_linked(held, "disk5")
    lockspace.unlink_lease("disk5")
    assert not lockspace.still_linked(held, "disk5")
    lockspace.unlink_lease("disk5")
    os.close(held.fd)


def test_a_replaced_lockspace_directory_is_followed_a_symlink_or_nothing_is_not(
    tmp_path: Path,
) -> None:
    """Lease files go through the directory fd: after the directory was moved aside and
    made again, names looked up through the old one still named the held file, while
    other hosts created the disk's file in the new one."""
    space = tmp_path / "space"
    space.mkdir()
    d = LockspaceDir(str(space))
    try:
        held = d.open_lease("disk", create=True)
        assert not d.follow_path()  # the same directory
        space.rename(tmp_path / "aside")
        assert not d.follow_path()  # gone: nothing to follow
        assert d.names_fd(held.fd, "disk")  # still through the old one
        (tmp_path / "elsewhere").mkdir()
        space.symlink_to(tmp_path / "elsewhere")
        assert not d.follow_path()  # never through a symlink
        space.unlink()
        space.mkdir()
        assert d.follow_path()
        assert not d.names_fd(held.fd, "disk")  # the name, here, names no file
        again = d.open_lease("disk", create=True)
        assert (space / "disk").exists()
        os.close(again.fd)
        os.close(held.fd)
    finally:
        d.close()


@pytest.mark.parametrize("shared", [False, True])
def test_the_lock_is_byte_0_length_1_and_unlock_ends_it(
    lockspace: LockspaceDir, shared: bool
) -> None:
    """The range virtlockd locks, no more (asked of the whole file from another open
    file description): a host locking other bytes of the file is not held up."""
    held = lockspace.open_lease("disk-range", create=True)
    other = os.open(lockspace.path + "/disk-range", os.O_RDWR)
    whole = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        try_lock(held.fd, shared=shared)
        found = struct.unpack("hhqqi4x", fcntl.fcntl(other, fcntl.F_OFD_GETLK, whole))
        assert found[:4] == (fcntl.F_RDLCK if shared else fcntl.F_WRLCK, os.SEEK_SET, 0, 1)
        unlock(held.fd)
        found = struct.unpack("hhqqi4x", fcntl.fcntl(other, fcntl.F_OFD_GETLK, whole))
        assert found[0] == fcntl.F_UNLCK
    finally:
        os.close(other)
        os.close(held.fd)
