"""Starting a per-user daemon on demand: where it goes and what it writes there.

A user without ``$XDG_RUNTIME_DIR`` gets ``/tmp/lockd-UID/lockd``, in a directory
every user can write to: another user must not be able to plant that directory,
its socket, or ``lockd.log`` (a symbolic link there once made a spawned daemon
append its log to a file of the link maker's choosing).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lockd import autospawn, cli, commands
from lockd.autospawn import open_log
from lockd.config import UnsafePathError, default_paths
from lockd.plugin import LockError, LockManager, Owner, socket_connector
from protocol.client import Client
from tests.lockd.conftest import OTHER, as_a_user, as_root

VM_UUID = uuid.UUID("6695eb01-f6a4-8304-79aa-97f2502e193f").bytes


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records the daemons spawn would start, and starts none."""
    started: list[list[str]] = []

    def popen(argv: list[str], **_kwargs: Any) -> Any:
        started.append(argv)
        raise AssertionError("no daemon may be started here")

    monkeypatch.setattr(subprocess, "Popen", popen)
    return started


def _runtime(fallback: Path) -> Path:
    fallback.mkdir(mode=0o700)
    (fallback / "lockd").mkdir(mode=0o700)
    return fallback / "lockd"


def test_spawn_refuses_a_log_that_is_a_symlink(
    fallback_user: Path, tmp_path: Path, no_daemon: list[list[str]]
) -> None:
    """The reported attack: lockd.log linked to a file of the victim's. Nothing is
    written through the link, and no daemon is started."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    runtime = _runtime(fallback_user)
    (runtime / "lockd.log").symlink_to(victim)
    with pytest.raises(UnsafePathError, match=r"lockd\.log: it is a symbolic link"):
        autospawn.spawn(default_paths()["socket"], wait=0.1)
    assert victim.read_text() == "precious\n"
    assert no_daemon == []


@as_root
def test_spawn_refuses_a_runtime_directory_another_user_made(
    fallback_user: Path, no_daemon: list[list[str]]
) -> None:
    runtime = _runtime(fallback_user)
    for path in (fallback_user, runtime):
        os.chmod(path, 0o777)  # noqa: S103 - as the other user made it
        os.chown(path, OTHER, OTHER)
    with pytest.raises(
        UnsafePathError, match=re.escape(f"refusing {fallback_user}: it is another")
    ):
        autospawn.spawn(default_paths()["socket"], wait=0.1)
    assert not (runtime / "lockd.log").exists()
    assert no_daemon == []


def test_open_log_makes_a_new_log_0600(tmp_path: Path) -> None:
    path = tmp_path / "lockd.log"
    old = os.umask(0o022)
    try:
        fd = open_log(str(path))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        assert os.get_inheritable(fd) is False  # O_CLOEXEC: only the daemon gets it, as stdout
        assert os.get_blocking(fd)
        os.write(fd, b"line\n")
    finally:
        os.close(fd)
    fd = open_log(str(path))  # appended to, not truncated
    try:
        os.write(fd, b"more\n")
    finally:
        os.close(fd)
    assert path.read_text() == "line\nmore\n"


def test_open_log_narrows_an_older_log_of_the_users_own(tmp_path: Path) -> None:
    path = tmp_path / "lockd.log"
    path.write_text("from before\n")
    os.chmod(path, 0o644)
    os.close(open_log(str(path)))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


@as_root
def test_open_log_refuses_another_users_file(tmp_path: Path) -> None:
    path = tmp_path / "lockd.log"
    path.write_text("theirs\n")
    os.chown(path, OTHER, OTHER)
    with pytest.raises(UnsafePathError, match=f"of uid {OTHER}"):
        open_log(str(path))
    assert path.read_text() == "theirs\n"
    assert os.lstat(path).st_uid == OTHER


def test_open_log_refuses_a_hard_link(tmp_path: Path) -> None:
    """A second name for a file: whoever made the link chose the file."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / "lockd.log")
    with pytest.raises(UnsafePathError, match="2 link"):
        open_log(str(tmp_path / "lockd.log"))
    assert victim.read_text() == "precious\n"


def test_open_log_refuses_what_is_not_a_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "lockd.log")
    with pytest.raises(UnsafePathError, match="not a plain file"):
        open_log(str(tmp_path / "lockd.log"))


def test_a_failed_start_is_reported_from_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log is read back through the descriptor spawn opened, not its path again."""
    sock = tmp_path / "run" / "lockd.sock"
    monkeypatch.setenv("LOCKD_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(autospawn.SpawnFailed, match=r"missing\.toml: no such file"):
        autospawn.spawn(str(sock), wait=10)
    assert stat.S_IMODE(os.lstat(sock.parent).st_mode) == 0o700


@as_root
def test_a_client_refuses_a_socket_in_another_users_directory(
    fallback_user: Path, capsys: pytest.CaptureFixture[str], no_daemon: list[list[str]]
) -> None:
    """Another user's directory may hold their socket: a client would tell them its
    leases, and believe their answers. Refused before connecting, spawn or not."""
    runtime = _runtime(fallback_user)
    os.chown(runtime, OTHER, OTHER)
    for argv in (["status"], ["run", "--disk", "/vm/a.img", "--name", "vm", "--", "true"]):
        assert cli.main(argv) == 69
        err = capsys.readouterr().err
        assert f"refusing {runtime}: it is another user's" in err
    assert no_daemon == []


@as_root
def test_the_plugin_refuses_a_socket_in_another_users_directory(
    fallback_user: Path, no_daemon: list[list[str]]
) -> None:
    runtime = _runtime(fallback_user)
    os.chown(fallback_user, OTHER, OTHER)
    manager = LockManager(
        Owner(VM_UUID, "vm1", 7, os.getpid()),
        connect=socket_connector(default_paths()["socket"], timeout=1),
    )
    manager.add_disk("/vm/a.img")
    with pytest.raises(LockError) as caught:
        manager.acquire()
    assert caught.value.code == "unavailable"
    assert f"refusing {fallback_user}: it is another user's" in caught.value.message
    assert not (runtime / "lockd.log").exists()
    assert no_daemon == []


def _in_a_child_that_cannot_enter(directory: Path, action: Callable[[], int]) -> tuple[int, str]:
    """:func:`as_a_user` for a child that cannot enter ``directory``: root's 0700
    directory, the child playing uid 65534 (or, when the tests run as a user, the
    user's own directory at mode 0000)."""
    if os.geteuid() != 0:
        os.chmod(directory, 0)
    try:
        return as_a_user(action)
    finally:
        os.chmod(directory, 0o700)


def test_an_xdg_runtime_dir_the_user_cannot_enter_is_named_with_the_way_out(
    fallback_user: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    no_daemon: list[list[str]],
) -> None:  # fmt: skip
    """``su`` and ``sudo`` keep the caller's ``$XDG_RUNTIME_DIR`` (``/run/user/0``): the
    clients said only ``[Errno 13] Permission denied: '/run/user/0/lockd'`` (exit 1).
    They, and ``lockd serve``, name the variable and what to do, exit 69 (serve: 78,
    which its unit does not restart), and start no daemon."""
    xdg = tmp_path / "run-user-0"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    for argv, expected in (
        (["status"], 69),
        (["run", "--disk", "/vm/a.img", "--name", "vm", "--", "true"], 69),
        (
            ["serve", "--config", os.devnull, "--journal-dir", str(tmp_path / "j")],
            commands.EXIT_NEEDS_OPERATOR,
        ),
    ):
        status, err = _in_a_child_that_cannot_enter(xdg, functools.partial(cli.main, argv))
        assert status == expected, err
        assert f"cannot use {xdg / 'lockd'} (you are uid " in err
        assert "Permission denied" in err
        assert f"XDG_RUNTIME_DIR is {xdg}" in err
        assert "set XDG_RUNTIME_DIR to your own runtime directory, or unset it" in err
        if os.geteuid() == 0:  # the child plays another user: root's directory
            assert "su or sudo keeps the caller's" in err
        assert "Traceback" not in err
    assert os.listdir(xdg) == []
    assert not (tmp_path / "j").exists()
    assert no_daemon == []


def _connect_with_the_cli(path: str) -> Client:
    """Connect as ``lockd create-lockspace``, ``run`` and ``acquire`` do (they start a
    daemon on demand); then a client for the test on the socket that reached."""
    with commands._connect(path, "lockd-test", spawn=True):
        pass
    return Client(path, timeout=10)


@pytest.mark.parametrize(
    "connect",
    [lambda path: socket_connector(path, timeout=10)(), _connect_with_the_cli],
    ids=["plugin", "cli"],
)
def test_a_client_connects_past_a_daemon_that_died_as_it_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connect: Callable[[str], Any]
) -> None:
    """The plugin connects again the moment lockd crashes under an acquire, to give back
    what the acquire took; the dying daemon's listening socket could still take that
    connection and close it unanswered as the process went. That was "cannot reach
    lockd: the daemon closed the connection" and no daemon started on demand, so the
    VM was left holding what it was told it did not get. It is asked again, and the
    daemon started on demand answers. So do the CLI's commands that start one (helper-73:
    a `lockd run` issued as lockd died exited 69)."""
    config = tmp_path / "lockd.toml"
    config.write_text(
        f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{tmp_path / "journal"}"\n'
    )
    monkeypatch.setenv("LOCKD_CONFIG", str(config))
    monkeypatch.setenv("LOCKD_AUTOSPAWN", "1")
    sock = tmp_path / "run" / "lockd.sock"
    sock.parent.mkdir(mode=0o700)
    dying = socket.socket(socket.AF_UNIX)
    dying.bind(str(sock))
    dying.listen(1)
    dying.settimeout(30)

    def die_as_it_accepts() -> None:
        conn, _ = dying.accept()
        dying.close()  # a killed process's exit closes its listener, then the rest
        conn.close()

    thread = threading.Thread(target=die_as_it_accepts)
    thread.start()
    pid = None
    try:
        client = connect(str(sock))
        try:
            pid = client.call("status")["pid"]
        finally:
            client.close()
    finally:
        thread.join(30)
        dying.close()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _a_checkout_named_lockd(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The current directory holds a ``lockd`` that is not the package: a user's home
    with the repository cloned as ``~/lockd`` (no ``__init__.py`` at its top, so
    ``python -m lockd`` run there imports it as a namespace package)."""
    (directory / "lockd").mkdir()
    monkeypatch.chdir(directory)


def test_a_daemon_started_on_demand_runs_this_package_whatever_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to die at once with "ImportError: cannot import name '__version__' from
    'lockd' (unknown location)" for a user who ran ``lockd run`` from such a home."""
    _a_checkout_named_lockd(tmp_path, monkeypatch)
    config = tmp_path / "lockd.toml"
    config.write_text(
        f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{tmp_path / "journal"}"\n'
    )
    monkeypatch.setenv("LOCKD_CONFIG", str(config))
    sock = tmp_path / "run" / "lockd.sock"
    autospawn.spawn(str(sock), wait=15)
    with Client(str(sock), timeout=5) as client:
        pid = client.call("status")["pid"]
    os.kill(pid, signal.SIGTERM)


def test_a_daemon_started_on_demand_takes_relative_paths_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon runs where the package is, so a relative ``--socket`` (and
    ``$LOCKD_CONFIG``) named a place there: it served under the package's directory
    (or found no configuration), and the client waited here for a socket that never
    answered."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lockd.toml").write_text(
        f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{tmp_path / "journal"}"\n'
    )
    monkeypatch.setenv("LOCKD_CONFIG", "lockd.toml")
    monkeypatch.delenv("LOCKD_ADMIN_SOCKET", raising=False)
    autospawn.spawn(os.path.join("run", "lockd.sock"), wait=10)
    with Client(str(tmp_path / "run" / "lockd.sock"), timeout=5) as client:
        pid = client.call("status")["pid"]
    os.kill(pid, signal.SIGTERM)
    assert not (Path(autospawn.PACKAGE_ROOT) / "run").exists()


def test_the_bench_daemon_runs_this_package_whatever_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _a_checkout_named_lockd(tmp_path, monkeypatch)
    with commands._bench_daemon() as sock, Client(sock, timeout=5) as client:
        assert client.call("status")["leases"] == 0


def test_a_journal_another_daemon_holds_is_named_when_none_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon holding the journal serves another socket (a mistyped LOCKD_SOCKET):
    the one started exits "in use", and the client, waiting for a race's winner to
    answer here, said only "it did not answer"."""
    config = tmp_path / "lockd.toml"
    journal = tmp_path / "journal"
    config.write_text(f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{journal}"\n')
    monkeypatch.setenv("LOCKD_CONFIG", str(config))
    journal.mkdir()
    held = os.open(journal / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the other daemon holds it
        with pytest.raises(autospawn.SpawnFailed) as caught:
            autospawn.spawn(str(tmp_path / "run" / "lockd.sock"), wait=3)
    finally:
        os.close(held)
    assert f"journal {journal} is in use by another lockd, and none serves this socket" in str(
        caught.value
    )


def test_a_daemon_started_with_another_xdg_runtime_dir_is_named_with_its_socket(
    fallback_user: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's lockd was started in a desktop login (XDG_RUNTIME_DIR set); in a shell
    from su, cron or ssh (unset) the default socket is another, and the client asked
    "is LOCKD_SOCKET mistyped?", a variable the user never set. It now says why the
    sockets differ and how to reach that lockd."""
    from lockd.journal_file import lock_journal

    serving = "/run/user/4242/lockd/lockd.sock"
    config = tmp_path / "lockd.toml"
    journal = tmp_path / "journal"
    config.write_text(f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{journal}"\n')
    monkeypatch.setenv("LOCKD_CONFIG", str(config))
    journal.mkdir()
    held = lock_journal(str(journal), f"serving {serving}")
    assert held is not None
    try:
        with pytest.raises(autospawn.SpawnFailed) as caught:
            autospawn.spawn(default_paths()["socket"], wait=120)
    finally:
        os.close(held)
    message = str(caught.value)
    assert "XDG_RUNTIME_DIR unset, and that lockd was started with another" in message
    assert f"set LOCKD_SOCKET={serving} to use it" in message
    assert "mistyped" not in message


def test_a_journal_held_for_another_socket_fails_at_once_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's daemon wrote which socket it serves: a client spawning a daemon for
    another socket (LOCKD_SOCKET mistyped) is told at once, not after its whole wait for
    a race's winner that will never answer there."""
    import time

    from lockd.journal_file import lock_journal

    config = tmp_path / "lockd.toml"
    journal = tmp_path / "journal"
    config.write_text(f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{journal}"\n')
    monkeypatch.setenv("LOCKD_CONFIG", str(config))
    journal.mkdir()
    held = lock_journal(str(journal), "serving /run/elsewhere/lockd.sock")
    assert held is not None
    started = time.monotonic()
    try:
        with pytest.raises(autospawn.SpawnFailed) as caught:
            autospawn.spawn(str(tmp_path / "run" / "lockd.sock"), wait=120)
    finally:
        os.close(held)
    assert time.monotonic() - started < 60  # not the 120 s wait for a winner
    message = str(caught.value)
    assert f"pid {os.getpid()}, serving /run/elsewhere/lockd.sock" in message
    assert f"none serves {tmp_path / 'run' / 'lockd.sock'}" in message


@pytest.mark.parametrize("command", ["status", "leases"])
def test_a_client_that_starts_no_daemon_names_the_socket_the_users_lockd_serves(
    fallback_user: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """The user's lockd was started with XDG_RUNTIME_DIR set; in a shell without it
    ``lockd status`` said only "is `lockd serve` running?" (a start already named the
    socket to use). It names the socket the journal's lockd serves, and how to reach it;
    once that lockd has stopped, the line it left beside the journal is not believed."""
    from lockd import config as config_module
    from lockd.journal_file import lock_journal

    # A fallback directory with a short name, which clients never make: under tmp_path
    # (with xdist's popen-gwN in it) a socket's path can be over the 108 bytes allowed.
    short = os.path.join(tempfile.gettempdir(), f"absent-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(config_module, "FALLBACK_RUNTIME_DIR", short + "/lockd-{uid}")
    serving = "/run/user/4242/lockd/lockd.sock"
    config = tmp_path / "lockd.toml"
    journal = tmp_path / "journal"
    config.write_text(f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{journal}"\n')
    monkeypatch.setenv("LOCKD_CONFIG", str(config))
    journal.mkdir()
    held = lock_journal(str(journal), f"serving {serving}")  # this process plays the lockd
    assert held is not None
    try:
        # The admin socket is not the one the journal's lockd names: nothing is said of it.
        assert cli.main(["disconnect", "1"]) == commands.EXIT_UNAVAILABLE
        admin = capsys.readouterr().err
        assert cli.main([command]) == commands.EXIT_UNAVAILABLE
    finally:
        os.close(held)
    assert "is `lockd serve` running?" in admin
    assert serving not in admin
    said = capsys.readouterr().err
    assert f"the lockd holding journal {journal} (pid {os.getpid()}) serves {serving}" in said
    assert "XDG_RUNTIME_DIR unset, and that lockd was started with another" in said
    assert f"set LOCKD_SOCKET={serving} to use it" in said
    assert "is `lockd serve` running?" not in said
    assert cli.main([command]) == commands.EXIT_UNAVAILABLE  # stopped: its line is left
    said = capsys.readouterr().err
    assert "is `lockd serve` running?" in said
    assert serving not in said
    assert not os.path.exists(short)
