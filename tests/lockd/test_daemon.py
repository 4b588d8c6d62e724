"""What ``lockd serve`` sets for its whole process, checked in-process."""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from actors.connection import ConnectionActor, Received
from actors.events import DaemonStopped
from lockd import cli, logs
from lockd import daemon as daemon_module
from lockd import reexec as reexec_module
from lockd.commands import EXIT_NEEDS_OPERATOR
from lockd.config import Config, UnsafePathError, default_paths
from lockd.daemon import FULL_COLLECTION_AFTER, Daemon
from lockd.journal_file import read_entries
from lockd.reexec import PATH_KEYS, Handoff, TargetCheck
from lockd.snapshot import list_snapshots, seq_of
from protocol.client import Client
from protocol.codec import encode_item
from protocol.framing import encode_frame
from protocol.names import FILES_LOCKSPACE
from tests.actors.harness import FakeTransport
from tests.lockd.conftest import NOBODY, OTHER, as_a_user, as_root
from tests.lockd.test_snapshot_writer import children, slow_snapshots


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Config]:
    threshold = gc.get_threshold()
    yield Config(
        socket=str(tmp_path / "s"),
        admin_socket=str(tmp_path / "a"),
        lock_dir=str(tmp_path / "locks"),
        journal_dir=str(tmp_path / "journal"),
    )
    gc.unfreeze()
    gc.set_threshold(*threshold)
    gc.enable()


def test_serve_keeps_the_collector_out_of_recovery_and_on_afterwards(config: Config) -> None:
    """Off while recovery builds the state it keeps; on once the daemon serves, with that
    state frozen (left off, reference cycles from other paths would never be freed)."""
    assert gc.get_freeze_count() == 0
    daemon = Daemon(config, sockets=False)
    try:
        assert not gc.isenabled()
        daemon.dispatcher.run_until_idle()
        assert daemon.system.ready.is_set()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[2] == FULL_COLLECTION_AFTER
    finally:
        daemon.system.shutdown("test done")


def test_client_connections_leave_nothing_for_the_cyclic_collector(config: Config) -> None:
    """Whole connections over the real socket (register, acquire, release, status, close)
    free what they make by reference counting (why full collections can be rare), and
    the actors they start (connection, lease) stop."""
    daemon = Daemon(config, embedded=True)
    serving = threading.Thread(target=daemon.run, name="lockd-test")
    serving.start()
    try:
        assert daemon.system.ready.wait(10)

        def session() -> None:
            with Client(config.socket) as client:
                owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": os.getpid()}
                client.call("register", owner=owner)
                lease = {"lockspace": FILES_LOCKSPACE, "resource": "disk"}
                client.call("acquire", leases=[lease], autocreate=True)
                client.call("release", leases=[lease])
                client.call("status")
            # The daemon sees the close on its own thread: wait until it has.
            deadline = time.monotonic() + 10
            while True:
                with Client(config.socket) as probe:
                    if probe.call("status")["clients"] == 1:  # only the probe
                        break
                assert time.monotonic() < deadline
                time.sleep(0.01)

        def running() -> int:
            # Closed connections stop (and leave the set) on the daemon's thread: wait.
            deadline = time.monotonic() + 10
            while True:
                actors = list(daemon.system.dispatcher.actors)
                if sum(isinstance(a, ConnectionActor) for a in actors) == 0:
                    return len(actors)
                assert time.monotonic() < deadline
                time.sleep(0.01)

        session()  # the lockspace actor and the first client start
        before = running()
        gc.collect()
        gc.disable()
        for _ in range(20):
            session()
        assert gc.collect() == 0
        assert running() == before  # and every actor they started has stopped
    finally:
        gc.enable()
        daemon.request_stop("test done")
        serving.join(10)
        assert not serving.is_alive()


def test_an_embedded_lock_system_leaves_the_collector_alone(config: Config) -> None:
    """The collector belongs to the program that embeds lockd."""
    gc.disable()
    daemon = Daemon(config, sockets=False, embedded=True)
    try:
        daemon.dispatcher.run_until_idle()
        assert daemon.system.ready.is_set()
        assert not gc.isenabled()
        assert gc.get_freeze_count() == 0
    finally:
        daemon.system.shutdown("test done")


def _rotate_until_a_snapshot_child_runs(daemon: Daemon, *, keep: str | None = None) -> int:
    """Acquire+release pairs through a connection until a rotation forks a snapshot
    child; its pid. ``keep``: a lease the connection takes first and keeps."""
    transport = FakeTransport(os.getpid(), os.getuid())
    ref = daemon.system.connect(transport)

    def call(op: str, **fields: object) -> None:
        ref.tell(Received(encode_frame(encode_item({"op": op, "id": 1, **fields}))))
        daemon.dispatcher.run_until_idle(poll_io=False)

    owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": os.getpid()}
    call("hello", versions=[1])
    call("register", owner=owner)
    if keep is not None:
        call("acquire", leases=[{"lockspace": FILES_LOCKSPACE, "resource": keep}], autocreate=True)
    before = children()
    lease = {"lockspace": FILES_LOCKSPACE, "resource": "disk"}
    for _ in range(1000):  # 4 KiB segments: a rotation every dozen pairs or so
        call("acquire", leases=[lease], autocreate=True)
        call("release", leases=[lease])
        forked = children() - before
        if forked:
            return forked.pop()
    raise AssertionError("no snapshot child was forked")


def test_a_stop_waits_for_the_snapshot_being_written(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during a rotation: the child finishes its snapshot before the daemon is
    gone, so the next start reads it instead of replaying the segments it covers."""
    if threading.active_count() != 1:
        pytest.skip("snapshots are forked only by a single-threaded process")
    config = attrs.evolve(config, journal_segment_bytes=4096)
    slow_snapshots(monkeypatch, 0.5)
    daemon = Daemon(config, sockets=False)
    daemon.dispatcher.run_until_idle()
    child = _rotate_until_a_snapshot_child_runs(daemon)
    daemon.system.shutdown("test done")
    assert child not in children()  # finished and reaped
    assert list_snapshots(config.journal_dir)


def test_a_stop_kills_a_snapshot_child_that_does_not_finish(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child stuck on the disk: the stop waits STOP_WAIT_S, not for ever, then kills it,
    and still journals the stop."""
    if threading.active_count() != 1:
        pytest.skip("snapshots are forked only by a single-threaded process")
    config = attrs.evolve(config, journal_segment_bytes=4096)
    slow_snapshots(monkeypatch, 60.0)
    monkeypatch.setattr(daemon_module, "STOP_WAIT_S", 0.3)
    daemon = Daemon(config, sockets=False)
    daemon.dispatcher.run_until_idle()
    child = _rotate_until_a_snapshot_child_runs(daemon)
    started = time.monotonic()
    daemon.system.shutdown("test done")
    assert time.monotonic() - started < 5
    assert child not in children()  # killed and reaped
    assert list_snapshots(config.journal_dir) == []
    assert _stops(config) == ["test done"]


def test_a_reexec_kills_a_snapshot_child_that_does_not_finish_then_execs(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR1 during a rotation whose child is stuck on the disk: the re-exec waits
    STOP_WAIT_S for it, not for ever (the daemon is frozen meanwhile: every request
    waits), kills and reaps it, and still execs with everything handed over. The
    next program's first rotation writes the snapshot this one lost."""
    if threading.active_count() != 1:
        pytest.skip("snapshots are forked only by a single-threaded process")
    config = attrs.evolve(config, journal_segment_bytes=4096)
    slow_snapshots(monkeypatch, 60.0)
    monkeypatch.setattr(daemon_module, "STOP_WAIT_S", 0.3)
    execs: list[tuple[Handoff, float]] = []
    monkeypatch.setattr(
        reexec_module,
        "exec_with",
        lambda handoff, _argv, **_: execs.append((handoff, time.monotonic())),
    )
    passed = TargetCheck(True, True, paths=_paths(config))
    monkeypatch.setattr(reexec_module, "check_target", lambda _argv, _spawn=None: passed)
    daemon = Daemon(config, sockets=False)
    try:
        daemon.dispatcher.run_until_idle()
        child = _rotate_until_a_snapshot_child_runs(daemon, keep="kept")
        started = time.monotonic()
        daemon.reexec()
        while not execs and time.monotonic() - started < 20:
            daemon.dispatcher.run_once(timeout=0.05)
        assert execs, "the re-exec never reached exec"
        handoff, at = execs[0]
        assert at - started < 5
        assert child not in children()  # killed and reaped
        assert list_snapshots(config.journal_dir) == []
        assert [resource for _, resource, _ in handoff.leases] == ["kept"]  # its fd goes on
        assert _stops(config) == ["re-exec (SIGUSR1)"]
    finally:
        daemon.system.shutdown("test done")


def _paths(config: Config) -> dict[str, str | None]:
    return {key: getattr(config, key) for key in PATH_KEYS}


def _reexec_with(
    config: Config,
    monkeypatch: pytest.MonkeyPatch,
    check: TargetCheck,
    meanwhile: Callable[[Daemon], None] = lambda _daemon: None,
) -> tuple[Daemon, list[tuple[Handoff, bool]]]:
    """Send the daemon SIGUSR1's work with the new program answering ``check``;
    ``meanwhile`` prepares the daemon first (a stop to come mid-way, say). Runs until
    an exec, the re-exec's end, or a stop."""
    execs: list[tuple[Handoff, bool]] = []

    def exec_with(handoff: Handoff, _argv: list[str], *, block_signals: bool = True) -> None:
        execs.append((handoff, block_signals))

    monkeypatch.setattr(reexec_module, "exec_with", exec_with)
    monkeypatch.setattr(reexec_module, "check_target", lambda _argv, _spawn=None: check)
    daemon = Daemon(config, sockets=False)
    meanwhile(daemon)
    daemon.dispatcher.run_until_idle()
    daemon.reexec()
    started = time.monotonic()
    while (
        not execs
        and daemon._reexecing
        and not daemon._stop_reason
        and time.monotonic() - started < 10
    ):
        daemon.dispatcher.run_once(timeout=0.05)
    return daemon, execs


@pytest.mark.parametrize("own_fds", [True, False])
def test_a_reexec_hands_over_its_own_locks_only_to_a_program_that_takes_them(
    config: Config, monkeypatch: pytest.MonkeyPatch, own_fds: bool
) -> None:
    """A lockd from before --handoff-check takes the journal lock and the pid file itself
    and never unblocks the daemon's signals: handed the journal's lock, it would find the
    journal "in use" and exit, every lock going with it; so it gets neither (nor the pid
    file, handed with it), nor blocked signals."""
    check = TargetCheck(True, own_fds=own_fds, paths=_paths(config))
    daemon, execs = _reexec_with(config, monkeypatch, check)
    try:
        ((handoff, blocked),) = execs
        assert blocked is own_fds
        assert (handoff.journal_lock is not None) is own_fds
    finally:
        daemon.system.shutdown("test done")


def test_an_exec_that_fails_after_the_stop_was_journaled_journals_the_start_again(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exec fails (the interpreter gone meanwhile, ENOMEM) once ``daemon-stopped``
    (re-exec) is journaled: the daemon serves on, and the journal said it stopped, with
    lease events after it and no start. A ``daemon-started`` of this process follows."""

    def exec_fails(_handoff: Handoff, _argv: list[str], **_: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(reexec_module, "exec_with", exec_fails)
    passed = TargetCheck(True, True, paths=_paths(config))
    monkeypatch.setattr(reexec_module, "check_target", lambda _argv, _spawn=None: passed)
    daemon = Daemon(config, sockets=False)
    try:
        daemon.dispatcher.run_until_idle()
        daemon.reexec()
        started = time.monotonic()
        while daemon._reexecing and time.monotonic() - started < 10:
            daemon.dispatcher.run_once(timeout=0.05)
        daemon.dispatcher.run_until_idle()
        kinds = [(e.event.TYPE, getattr(e.event, "pid", None))
                 for e in read_entries(config.journal_dir)]  # fmt: skip
        assert kinds[-2:] == [("daemon-stopped", None), ("daemon-started", os.getpid())]
        assert _stops(config) == ["re-exec (SIGUSR1)"]
    finally:
        daemon.system.shutdown("test done")


def _stops(config: Config) -> list[str]:
    """The reasons of the daemon-stopped events in the journal."""
    return [e.event.reason for e in read_entries(config.journal_dir)
            if isinstance(e.event, DaemonStopped)]  # fmt: skip


def test_a_sigterm_while_a_reexec_is_checked_stops_the_daemon_and_execs_nothing(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the new program is checked: the stop runs the messages still
    queued, the check's answer among them. The re-exec must not go on from there and
    exec the next program over a stopping daemon (its listeners already closed): the
    operator asked for a stop, and a service manager would wait for it in vain."""
    execs: list[Handoff] = []
    monkeypatch.setattr(
        reexec_module, "exec_with", lambda handoff, *_a, **_kw: execs.append(handoff)
    )
    checked, answer = threading.Event(), threading.Event()

    def check(_argv: object, _spawn: object = None) -> TargetCheck:
        checked.set()
        answer.wait(10)  # the new program starts slowly: SIGTERM comes first
        return TargetCheck(True, own_fds=True, paths=_paths(config))

    monkeypatch.setattr(reexec_module, "check_target", check)
    daemon = Daemon(config, sockets=False)
    daemon.dispatcher.run_until_idle()
    daemon.reexec()
    started = time.monotonic()
    while not checked.is_set() and time.monotonic() - started < 10:
        daemon.dispatcher.run_once(timeout=0.05)
    assert checked.is_set()
    daemon.request_stop("SIGTERM")
    answer.set()
    time.sleep(0.1)  # the check's answer is queued now, not handled
    daemon.system.shutdown("SIGTERM")
    assert execs == []
    assert _stops(config) == ["SIGTERM"]


def test_a_sigterm_while_the_reexec_finishes_a_snapshot_stops_the_daemon_and_execs_nothing(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM after the re-exec decided to exec, while it waits up to STOP_WAIT_S for a
    snapshot child: the handler runs then (the dispatcher's thread is the main thread),
    and an exec after it would carry on serving, the stop lost."""
    passed = TargetCheck(True, own_fds=True, paths=_paths(config))

    def stopped_in_the_wait(daemon: Daemon) -> None:
        monkeypatch.setattr(
            daemon.system.snapshots, "wait", lambda _timeout=None: daemon.request_stop("SIGTERM")
        )

    daemon, execs = _reexec_with(config, monkeypatch, passed, stopped_in_the_wait)
    daemon.system.shutdown("SIGTERM")
    assert daemon._stop_reason == "SIGTERM"
    assert execs == []


def test_a_sigterm_while_a_reexec_quiesces_journals_one_stop(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM once the listeners are stopped: the stop runs the quiescing still queued,
    and the re-exec journaled its own "re-exec (SIGUSR1)" stop before the daemon's."""
    passed = TargetCheck(True, own_fds=True, paths=_paths(config))

    def stopped_at_the_quiesce(daemon: Daemon) -> None:
        monkeypatch.setattr(daemon, "_stop_accepting", lambda: daemon.request_stop("SIGTERM"))

    daemon, execs = _reexec_with(config, monkeypatch, passed, stopped_at_the_quiesce)
    daemon.system.shutdown("SIGTERM")
    assert execs == []
    assert _stops(config) == ["SIGTERM"]


def test_a_reexec_into_a_program_that_fails_its_check_is_abandoned(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new program cannot start (a bad config edit, a broken install): exec'ing it
    would end the daemon and free every lock, so the old program serves on instead."""
    why = "the new program fails its start-up check: lockd serve: bad config"
    daemon, execs = _reexec_with(config, monkeypatch, TargetCheck(False, why=why))
    try:
        assert execs == []
        assert not daemon._reexecing  # a later SIGUSR1 is not ignored
        assert _stops(config) == []  # nothing was journaled as if the daemon went away
    finally:
        daemon.system.shutdown("test done")


def test_sighup_does_not_report_the_admin_socket_beside_socket_as_changed(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """Started with ``--socket`` alone, the admin socket is beside it: re-reading the
    file must place it there again, not report it moved at every SIGHUP."""
    from lockd.config import admin_socket_beside

    config = attrs.evolve(config, admin_socket=admin_socket_beside(config.socket))
    daemon = Daemon(config, frozenset({"socket", "lock_dir", "journal_dir"}), sockets=False)
    try:
        daemon.dispatcher.run_until_idle()
        daemon.reload()
        assert "changed" not in caplog.text
    finally:
        daemon.system.shutdown("test done")


def test_sighup_says_a_moved_lockspace_takes_a_restart_as_the_reexec_does(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A [lockspaces] directory edited: SIGHUP said a re-exec would apply it, and the
    re-exec (SIGUSR1, systemctl reload) then refused, "the configuration now moves
    lockspaces.NAME"; both now say it takes a restart."""
    file = tmp_path / "lockd.toml"
    file.write_text("")
    config = attrs.evolve(config, config_file=str(file))
    overridden = frozenset({"socket", "admin_socket", "lock_dir", "journal_dir"})
    daemon = Daemon(config, overridden, sockets=False)
    try:
        daemon.dispatcher.run_until_idle()
        file.write_text(f'[lockspaces]\n"x.y" = "{tmp_path / "xy"}"\n')
        daemon.reload()
        assert "lockspaces changed; that takes a restart" in caplog.text
        assert "not applied until a re-exec" not in caplog.text
    finally:
        daemon.system.shutdown("test done")


def test_sighup_reads_the_default_file_as_the_start_does_present_or_not(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The default file (/etc/lockd/lockd.toml) is optional at the start. Removed after
    it, SIGHUP said "no such file; keeping the running configuration", where a re-exec
    or a restart took the defaults; made after a start without it, SIGHUP read it but
    said it re-read "the defaults"."""
    from lockd import config as config_mod

    caplog.set_level(logging.INFO, logger="lockd")
    default = tmp_path / "etc-lockd.toml"
    paths = {**config_mod.default_paths(), "config": str(default)}
    monkeypatch.setattr(config_mod, "default_paths", lambda uid=None: paths)
    default.write_text("max_clients = 5\n")
    config = attrs.evolve(config, config_file=str(default), max_clients=5)
    overridden = frozenset({"socket", "admin_socket", "lock_dir", "journal_dir"})
    daemon = Daemon(config, overridden, sockets=False)
    try:
        daemon.dispatcher.run_until_idle()
        default.unlink()
        daemon.reload()
        assert "keeping the running configuration" not in caplog.text
        assert "re-read from the defaults (no file)" in caplog.text
        assert "max_clients changed; not applied until a re-exec" in caplog.text
        caplog.clear()
        daemon.config = attrs.evolve(daemon.config, config_file=None)  # a start without it
        default.write_text("max_clients = 7\n")
        daemon.reload()
        assert f"re-read from {default}" in caplog.text
        assert "max_clients changed" in caplog.text
    finally:
        daemon.system.shutdown("test done")


def _per_user(config: Config) -> Config:
    """``config`` with the sockets at the per-user defaults (of ``fallback_user``)."""
    paths = default_paths()
    return attrs.evolve(config, socket=paths["socket"], admin_socket=paths["admin_socket"])


@as_root
def test_a_daemon_refuses_a_runtime_directory_another_user_made(
    config: Config, fallback_user: Path
) -> None:
    """Before anything starts: no journal is written, no socket bound in it."""
    (fallback_user / "lockd").mkdir(parents=True, mode=0o700)
    os.chown(fallback_user, OTHER, OTHER)
    with pytest.raises(UnsafePathError, match="another user's"):
        Daemon(_per_user(config), embedded=True)
    assert not os.path.exists(config.journal_dir)
    assert os.listdir(fallback_user / "lockd") == []


def test_a_users_lockd_given_another_users_journal_dir_is_told_to_choose_its_own() -> None:
    """A user ran ``lockd serve --journal-dir /var/lib/lockd/journal`` (root's) and was
    told to ``chmod go-w`` or ``chown`` it, neither of which a user can do."""
    argv = ["serve", "--config", os.devnull, "--journal-dir", "/usr",
            "--socket", "/nonexistent/lockd.sock", "--lock-dir", "/nonexistent/locks"]  # fmt: skip
    status, err = as_a_user(functools.partial(cli.main, argv))
    assert status == EXIT_NEEDS_OPERATOR, err
    assert "refusing journal_dir /usr: it is another user's (owner uid 0" in err
    assert "choose a journal_dir of your own" in err
    assert "chmod" not in err


@as_root
def test_a_users_lockd_whose_journal_is_below_another_users_directory_is_told_to_move_it() -> None:
    """The journal directory is the user's, but a directory above it is another user's:
    the user can neither chmod nor chown that one, and is told to choose its own."""
    above = tempfile.mkdtemp(prefix="lockd-above-")
    try:
        journal = os.path.join(above, "journal")
        os.mkdir(journal, 0o700)
        os.chown(journal, NOBODY, NOBODY)
        os.chmod(above, 0o755)  # noqa: S103 - another user's, as /home/other
        os.chown(above, OTHER, OTHER)

        def check() -> int:
            daemon_module.check_journal_dir(journal)
            return 0

        status, err = as_a_user(check)
        assert status == -1  # raised, the traceback on stderr
        assert f"directory {above} above it is uid {OTHER}'s" in err
        assert "choose a journal_dir of your own" in err
        assert "chmod" not in err
    finally:
        shutil.rmtree(above)


def test_a_users_lockd_given_a_lock_dir_it_cannot_write_is_refused() -> None:
    """A user ran ``lockd serve --lock-dir /var/lib/libvirt/lockd`` (root's, 0755): it
    started, warned that others could write to it, and failed every request io-error,
    "Permission denied" (helper-72's find). The start is refused, saying why."""
    own = tempfile.mkdtemp(prefix="lockd-user-")  # reachable by the user (in /tmp)
    try:
        if os.geteuid() == 0:
            os.chown(own, NOBODY, NOBODY)
        argv = ["serve", "--config", os.devnull, "--journal-dir", f"{own}/journal",
                "--socket", f"{own}/lockd.sock", "--lock-dir", "/usr"]  # fmt: skip
        status, err = as_a_user(functools.partial(cli.main, argv))
        assert status == EXIT_NEEDS_OPERATOR, err  # as a restart would be: not restarted
        assert f"refusing lock_dir /usr: uid {NOBODY if os.geteuid() == 0 else os.geteuid()}" in err
        assert "cannot write to it (owner uid 0, mode 0755)" in err
        assert "choose a lock_dir of your own" in err
        assert not os.path.exists(f"{own}/lockd.sock")
    finally:
        shutil.rmtree(own)


def test_a_daemon_makes_its_runtime_directory_0700(config: Config, fallback_user: Path) -> None:
    config = attrs.evolve(_per_user(config), allowed_uids=(os.geteuid(),))  # uid played: 4242
    daemon = Daemon(config, embedded=True)
    serving = threading.Thread(target=daemon.run, name="lockd-test")
    serving.start()
    try:
        assert daemon.system.ready.wait(10)
        for path in (fallback_user, fallback_user / "lockd"):
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
        with Client(config.socket) as client:
            assert client.call("status")["pid"] == os.getpid()
    finally:
        daemon.request_stop("test done")
        serving.join(10)
        assert not serving.is_alive()


def test_a_boot_that_cannot_be_recorded_does_not_stop_the_start(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal directory is full: the start goes on, and the file naming an earlier
    boot goes (left, a later start in this boot would take real damage for a crash's)."""
    os.makedirs(config.journal_dir)
    boot_file = Path(config.journal_dir) / ".boot"
    boot_file.write_bytes(b"\x07" * 16)

    def full(_directory: str, _boot: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(daemon_module, "record_boot", full)
    daemon = Daemon(config, sockets=False, embedded=True)
    try:
        daemon.dispatcher.run_until_idle()
        assert daemon.system.ready.is_set()
        assert not boot_file.exists()
    finally:
        daemon.system.shutdown("test done")


def test_showing_the_log_level_is_not_logged_as_setting_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``lockd log-level`` with no level and no filters only asks: the log used to say
    "logging set on the admin socket" for every such look."""
    said: list[str] = []
    monkeypatch.setattr(daemon_module.log, "info", lambda text, *args: said.append(text % args))
    saved = logs.current()
    try:
        assert daemon_module._log_control(None, None) == saved
        assert said == []
        daemon_module._log_control(saved["level"], None)  # setting it still says so
        # In words, not a dict's repr ("{'level': 'info', ...}").
        assert said == [
            f"logging set on the admin socket: level {saved['level']}, "
            f"filters {saved['filters']!r}, output {saved['output']}"
        ]
    finally:
        logs.configure(saved["level"], saved["filters"], saved["output"])


def test_a_second_daemon_on_the_journal_is_told_which_one_holds_it(config: Config) -> None:
    """ "in use by another lockd" named neither: the operator had to hunt for the process,
    and a client whose LOCKD_SOCKET was mistyped could not tell it from a race."""
    from lockd.daemon import JournalInUseError

    first = Daemon(config, sockets=False, embedded=True)
    try:
        second_config = attrs.evolve(config, socket=config.socket + "2",
                                     admin_socket=config.admin_socket + "2")  # fmt: skip
        with pytest.raises(JournalInUseError) as refused:
            Daemon(second_config)
        assert f"in use by another lockd (pid {os.getpid()}, embedded)" in str(refused.value)
    finally:
        first.system.shutdown("test done")


def test_the_start_names_the_snapshot_it_replayed_from_not_the_journals_end(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay folds the journal into the snapshot's state, and the log line read the seq
    after that: "snapshot at 200" with the newest snapshot at a rotation well before
    (after a cut at start-up, a snapshot seemingly newer than the cut)."""
    from tests.lockd.test_snapshot_replay import fill

    fill(Path(config.journal_dir), 200)
    newest = seq_of(list_snapshots(config.journal_dir)[-1])
    assert newest < 200
    said: list[str] = []
    monkeypatch.setattr(daemon_module.log, "info", lambda text, *args: said.append(text % args))
    daemon = Daemon(config, sockets=False, embedded=True)
    try:
        (line,) = [s for s in said if s.startswith("journal replayed")]
        assert line.startswith(f"journal replayed to seq 200 (snapshot at {newest}, ")
    finally:
        daemon.system.shutdown("test done")


def test_registrations_view_of_proc_takes_a_zombie_for_gone() -> None:
    """A waiting acquire asks whether its owner is gone: a process that exited but is
    not yet reaped keeps its pid and start time in /proc, and is gone all the same."""
    import signal
    import subprocess

    from actors.model import Owner
    from lockd import procs

    proc = subprocess.Popen(["sleep", "30"])
    try:
        started = procs.start_time(proc.pid)
        assert started is not None
        owner = Owner(uuid.uuid4().bytes, "vm", 1, proc.pid, started)
        info = daemon_module._ProcessInfo()
        assert not info.is_gone(owner)
        os.kill(proc.pid, signal.SIGKILL)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
        assert info.start_time(proc.pid) == started
        assert info.is_gone(owner)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("mode", "owner", "refused"),
    [
        (0o777, None, "can be written by other users (mode 0777, not sticky)"),
        (0o775, None, "can be written by other users (mode 0775, not sticky)"),
        (0o755, OTHER, f"is uid {OTHER}'s (mode 0755)"),
        (0o1777, None, None),
        (0o755, None, None),
    ],
    ids=["world-writable", "group-writable", "another-users", "sticky", "ours"],
)  # fmt: skip
@as_root
def test_a_journal_dir_is_refused_below_a_directory_others_can_rename_it_in(
    tmp_path: Path, mode: int, owner: int | None, refused: str | None
) -> None:
    """A journal directory that is root's own, 0700, inside a directory other users can
    write to (not sticky), or another user's: they could move it aside and put a journal
    of theirs in its place, whose events recovery replays as lockd's own. Only the last
    directory was checked; every one above it is now, as ssh's StrictModes does. A
    sticky directory such as /tmp is fine: only an entry's owner may rename it there."""
    shared = tmp_path / "shared"
    journal = shared / "lockd" / "journal"
    journal.mkdir(parents=True, mode=0o700)
    os.chmod(shared, mode)
    if owner is not None:
        os.chown(shared, owner, owner)
    if refused is None:
        daemon_module.check_journal_dir(str(journal))
        return
    with pytest.raises(PermissionError) as caught:
        daemon_module.check_journal_dir(str(journal))
    assert f"directory {shared} above it {refused}" in str(caught.value)
    assert f"chmod go-w {shared}" in str(caught.value)


@as_root
def test_a_journal_dir_reached_through_a_symlink_in_a_shared_directory_is_refused(
    tmp_path: Path,
) -> None:
    """The path named and the path its symlinks lead to are both checked: a symlink in a
    directory others can write to can be pointed elsewhere by them."""
    real = tmp_path / "real" / "journal"
    real.mkdir(parents=True, mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # noqa: S103 - the misconfiguration under test
    (shared / "journal").symlink_to(real)
    with pytest.raises(PermissionError, match=f"directory {shared} above it"):
        daemon_module.check_journal_dir(str(shared / "journal"))
    daemon_module.check_journal_dir(str(real))  # the same directory, named safely


def test_a_boot_id_that_cannot_be_read_is_said_at_start(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Under ``ProcSubset=pid`` (or a procfs mounted with subset=pid) the boot id is not
    there: owners were journaled without it, and nothing said so (helper-69's find)."""
    from lockd import procs

    monkeypatch.setattr(procs, "BOOT_ID_PATH", str(tmp_path / "no-boot-id"))
    daemon = Daemon(config, sockets=False, embedded=True)
    try:
        daemon.dispatcher.run_until_idle()
        assert f"cannot read this boot's id ({tmp_path / 'no-boot-id'})" in caplog.text
    finally:
        daemon.system.shutdown("test done")


def test_a_stored_fd_is_paired_with_its_lease_by_the_file_it_is_open_on(
    config: Config, tmp_path: Path
) -> None:
    """An fd the store hands back under a short name is its lease's if it is open on the
    lease's file: by its path, through a symlinked lock directory, or (a directory
    reached another way, as a bind mount shows it) by the file the lease's name links."""
    real = tmp_path / "real"
    (real / FILES_LOCKSPACE).mkdir(parents=True)
    (tmp_path / "locks").symlink_to(real)
    for name in ("disk", "other", "ended"):
        (real / FILES_LOCKSPACE / name).touch()
    (tmp_path / "bind").mkdir()  # the lockspace directory as another mount shows it
    os.link(real / FILES_LOCKSPACE / "other", tmp_path / "bind" / "other")
    lease_of = daemon_module._lease_files(
        config, [(FILES_LOCKSPACE, "disk"), (FILES_LOCKSPACE, "other")]
    )
    opened = [os.open(path, os.O_RDONLY) for path in (
        Path(config.lock_dir) / FILES_LOCKSPACE / "disk", tmp_path / "bind" / "other",
        real / FILES_LOCKSPACE / "ended",
    )]  # fmt: skip
    try:
        assert [lease_of(fd) for fd in opened] == [
            (FILES_LOCKSPACE, "disk"), (FILES_LOCKSPACE, "other"), None
        ]  # fmt: skip
    finally:
        for fd in opened:
            os.close(fd)
