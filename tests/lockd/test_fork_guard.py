"""lockd.fork_guard: what a child forked by an embedding program keeps of the lock system."""

from __future__ import annotations

import os
from pathlib import Path

from lockd import fork_guard


def _in_child(check: str) -> str:
    """Fork, run :func:`fork_guard.drop_copies_in_child` as the fork hook does, and return
    what the child says about ``check`` (a path read through the fd it names)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fork_guard.drop_copies_in_child()
            fd = int(check)
            os.write(write, os.readlink(f"/proc/self/fd/{fd}").encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            return pipe.read().decode()
    finally:
        os.waitpid(pid, 0)


def test_a_remembered_fd_is_dev_null_in_a_child(tmp_path: Path) -> None:
    """The child's copy of a lock system's fd points at /dev/null; the parent's is unchanged."""
    fd = os.open(tmp_path / "lease", os.O_RDWR | os.O_CREAT)
    try:
        fork_guard.remember(fd)
        assert _in_child(str(fd)) == os.devnull
        assert os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "lease")
    finally:
        fork_guard.close(fd)


def test_an_fd_number_reused_by_the_program_is_left_alone(tmp_path: Path) -> None:
    """An fd closed without forget() whose number the program then opened another file on
    stays that file in the child (never a program's own fd turned into /dev/null)."""
    fd = os.open(tmp_path / "lease", os.O_RDWR | os.O_CREAT)
    fork_guard.remember(fd)
    os.close(fd)
    again = os.open(tmp_path / "mine", os.O_RDWR | os.O_CREAT)
    try:
        assert again == fd
        assert _in_child(str(again)) == str(tmp_path / "mine")
    finally:
        os.close(again)
        fork_guard.forget(again)
