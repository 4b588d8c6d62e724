"""The listening socket files lockd binds itself: their mode, set without a race."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from lockd.server import bind_unix

_real_bind = socket.socket.bind


@pytest.fixture
def during_bind(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[str], None]]:
    """Run what the test appends right after the kernel made the socket file, as another
    thread or another user could at that moment."""
    hooks: list[Callable[[str], None]] = []

    def bind(self: socket.socket, address: str) -> None:
        _real_bind(self, address)
        for hook in hooks:
            hook(address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    return hooks


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_the_socket_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """0600 exactly: never wider (umask 0), and never without the owner's read and
    write (a umask that takes them would leave lockd's own uid unable to connect)."""
    old = os.umask(umask)
    try:
        sock = bind_unix(str(tmp_path / "lockd.sock"))
    finally:
        os.umask(old)
    with sock:
        assert _mode(tmp_path / "lockd.sock") == 0o600


def test_the_umask_of_the_other_threads_is_left_alone_while_binding(
    tmp_path: Path, during_bind: list[Callable[[str], None]]
) -> None:
    """A umask of 0177 around bind() is the whole process's: a directory another thread
    made meanwhile (a lockspace's, during recovery) came out 0600, unusable."""
    made = tmp_path / "made-meanwhile"
    during_bind.append(lambda _: os.mkdir(made, 0o700))
    old = os.umask(0o022)
    try:
        sock = bind_unix(str(tmp_path / "lockd.sock"))
    finally:
        os.umask(old)
    sock.close()
    assert _mode(made) == 0o700


def test_a_symbolic_link_swapped_in_after_the_bind_is_not_followed(
    tmp_path: Path, during_bind: list[Callable[[str], None]]
) -> None:
    """In a directory another user can write to, they could replace the new socket with a
    symbolic link before lockd set its mode: the chmod(path) that followed changed the
    file the link named. Now nothing is changed there, and the start fails, saying so."""
    victim = tmp_path / "victim"
    victim.write_text("someone else's\n")
    victim.chmod(0o644)
    path = tmp_path / "lockd.sock"

    def swap(address: str) -> None:
        os.unlink(address)
        os.symlink(victim, address)

    during_bind.append(swap)
    with pytest.raises(OSError, match="is no longer the socket lockd bound"):
        bind_unix(str(path))
    assert _mode(victim) == 0o644
    assert os.path.islink(path)  # not lockd's to remove
    assert victim.read_text() == "someone else's\n"
