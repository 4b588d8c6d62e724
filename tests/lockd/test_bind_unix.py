"""The listening socket files lockd binds itself: their mode, set without a race."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from lockd.config import Config
from lockd.daemon import _reapply_socket_access
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


def test_a_mode_for_others_makes_the_missing_directory_passable(tmp_path: Path) -> None:
    """socket_mode "0660" is no use behind a 0700 directory lockd made itself."""
    with bind_unix(str(tmp_path / "run" / "lockd.sock"), mode=0o660):
        assert _mode(tmp_path / "run" / "lockd.sock") == 0o660
        assert _mode(tmp_path / "run") == 0o711
    with bind_unix(str(tmp_path / "own" / "lockd.sock")):
        assert _mode(tmp_path / "own") == 0o700


def test_a_directory_others_cannot_pass_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One made 0700 before (by an earlier lockd, or by hand): the socket's mode alone
    lets nobody in, and the log says what to do."""
    (tmp_path / "run").mkdir(mode=0o700)
    with bind_unix(str(tmp_path / "run" / "lockd.sock"), mode=0o666):
        pass
    assert f"lets no other user through to it: chmod o+x {tmp_path / 'run'}" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another group takes root")
def test_the_socket_gets_its_group_and_mode_and_is_0600_until_then(
    tmp_path: Path, during_bind: list[Callable[[str], None]]
) -> None:
    """Made 0600 (lockd's own group's for a moment: it must not let that group in), then
    given the group and the mode."""
    seen: list[tuple[int, int]] = []
    during_bind.append(lambda path: seen.append((_mode(Path(path)), os.lstat(path).st_gid)))
    with bind_unix(str(tmp_path / "lockd.sock"), mode=0o660, group=65534):
        made = os.lstat(tmp_path / "lockd.sock")
    assert seen == [(0o600, os.getegid())]
    assert (stat.S_IMODE(made.st_mode), made.st_gid) == (0o660, 65534)


def test_a_reexec_applies_the_new_mode_to_its_socket_and_never_fails_on_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-exec carries the socket on; its new socket_mode applies to the file. Failing
    that (the file gone), the new program logs it and serves on, every lock kept."""
    path = tmp_path / "lockd.sock"
    config = Config(socket=str(path), admin_socket=str(tmp_path / "a"),
                    lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"),
                    socket_mode="0660")  # fmt: skip
    with bind_unix(str(path)):
        _reapply_socket_access(str(path), config)
        assert _mode(path) == 0o660
        path.unlink()
        _reapply_socket_access(str(path), config)
    assert "re-exec: socket_mode and socket_group not applied to" in caplog.text
