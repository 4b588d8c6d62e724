"""SIGUSR1: the daemon re-executes itself without ever letting go of a lock or a client."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from actors.recovery import RESUMED
from lockd.lockfiles import try_lock
from lockd.reexec import Handoff, ListenerFd
from lockd.server import bind_unix
from protocol.names import FILES_LOCKSPACE, lease_name_for_path
from tests.e2e.conftest import DaemonProcess, MakeDaemon, journaled, start_dropping_owner, wait_for
from tests.e2e.fake_systemd import FakeServiceManager
from tests.e2e.invariants import check, listed
from tests.e2e.test_daemon import an_owner, churn_past, events, lease_file, start_run
from tests.e2e.test_fd_store import (
    assert_vm_lease_kept,
    fds_on,
    kill_daemon,
    vm_with_stored_lease,
)
from tests.e2e.test_recovery import start_fence
from tests.lockprobe import probe, start_watch, stop_watch

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _loader(
    daemon: DaemonProcess,
    pid: int,
    stop: threading.Event,
    calls: list[int],
    errors: list[BaseException],
) -> threading.Thread:
    """A started thread acquiring and releasing one lease for ``pid`` until ``stop``,
    counting pairs in ``calls[0]``; every call must succeed (a failure goes to
    ``errors``)."""

    def load() -> None:
        try:
            with daemon.client("load") as client:
                owner = {"uuid": uuid.uuid4().bytes, "name": "load", "id": 1, "pid": pid}
                client.call("register", owner=owner)
                lease = {"lockspace": FILES_LOCKSPACE, "resource": "load"}
                while not stop.is_set():
                    client.call("acquire", leases=[lease], autocreate=True)
                    client.call("release", leases=[lease])
                    calls[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    return thread


def test_sigusr1_keeps_every_lock_and_connection(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    watcher = start_watch(lease_file(daemon, "/vm/a.img"))
    children.append(watcher)  # type: ignore[arg-type]

    # A client under load across the re-exec: every call must succeed.
    errors: list[BaseException] = []
    calls = [0]
    stop = threading.Event()
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    loader = _loader(daemon, sleeper.pid, stop, calls, errors)
    idle = daemon.client("idle")  # an idle connection opened before the re-exec
    try:
        wait_for(lambda: calls[0] > 20)
        uptime = idle.call("status")["uptime_s"]
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
        before = calls[0]
        wait_for(lambda: calls[0] > before + 20)
    finally:
        stop.set()
        loader.join(30)
    assert errors == []
    status = idle.call("status")
    assert status["pid"] == daemon.proc.pid  # same process, same connection
    assert status["uptime_s"] > uptime  # a reload is no restart
    idle.close()
    tries, free = stop_watch(watcher)
    assert tries > 100
    assert free == 0, f"the lock was seen free {free} times during the re-exec"
    stopped = events(daemon, "--type", "daemon-stopped")
    assert stopped[-1]["reason"] == "re-exec (SIGUSR1)"
    check(daemon)
    # The VM's inherited connection was handed over too: closing it fences as before.
    clients = daemon.lockd("clients", "--json").stdout
    assert f'"pid": {vm.pid}' in clients
    vm.kill()
    vm.wait()
    wait_for(lambda: not listed(daemon))
    assert events(daemon, "--type", "lease-released")[-1]["reason"] == "owner-exit"
    os.kill(sleeper.pid, signal.SIGKILL)
    time.sleep(0.1)


def test_a_subscriber_gets_every_event_once_across_a_reexec_under_load(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """``subscribe`` with ``since: 1`` replays the journal, then goes on live; across
    SIGUSR1 under load the events journaled during the hand-over (the old program's
    last ones, its daemon-stopped, the new one's start-up) reach it too, read back
    from the journal. Every seq arrives once and in order, as ``lockd events`` has it."""
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    stop, done = threading.Event(), threading.Event()
    calls = [0]
    seqs: list[int] = []
    errors: list[BaseException] = []

    auditor = daemon.client("audit")
    auditor.call("subscribe", since=1)

    def audit() -> None:
        try:
            while not done.is_set():
                seqs.append(auditor.next_event()["event"]["seq"])
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            if not done.is_set():
                errors.append(exc)

    loader = _loader(daemon, sleeper.pid, stop, calls, errors)
    reader = threading.Thread(target=audit)
    reader.start()
    try:
        wait_for(lambda: calls[0] > 50)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
        before = calls[0]
        wait_for(lambda: calls[0] > before + 50)
        stop.set()
        loader.join(30)
        last = events(daemon)[-1]["seq"]
        wait_for(lambda: bool(seqs) and seqs[-1] >= last)
    finally:
        stop.set()
        done.set()
        loader.join(30)
        auditor.close()
        reader.join(30)
        os.kill(sleeper.pid, signal.SIGKILL)
    assert errors == []
    assert seqs == list(range(1, last + 1))


def test_signals_sent_while_the_new_program_starts_do_not_end_it(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """An operator sends SIGUSR1 twice, or a reload right after it. Until the new
    program has installed its handlers, SIGUSR1 and SIGHUP would end it by their
    default action, every lock with it; they are blocked across the exec instead,
    and handled once it serves."""
    start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    watcher = start_watch(lease_file(daemon, "/vm/a.img"))
    children.append(watcher)  # type: ignore[arg-type]
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 1.5  # the new program's start-up falls in this
    while time.monotonic() < deadline and daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(0.02)
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") >= 2)
    time.sleep(0.5)
    assert daemon.proc.poll() is None, "a signal ended the daemon"
    with daemon.client() as client:
        assert client.call("status")["pid"] == daemon.proc.pid
    tries, free = stop_watch(watcher)
    assert tries > 100
    assert free == 0, f"the lock was seen free {free} times"
    check(daemon)


def test_a_client_accepted_while_the_new_program_is_checked_keeps_a_unique_id(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """The daemon accepts until the new program passes its check. A client accepted
    meanwhile is handed over with its id, so the new program must not give that id
    again: ids key the daemon's table of connections, and the next re-exec hands over
    only those in it (the other's socket would be closed by the exec)."""
    sleeper = subprocess.Popen(["sleep", "120"])
    children.append(sleeper)

    def registered(name: str, pid: int) -> tuple[Any, int]:
        client = daemon.client(name)
        owner = {"uuid": uuid.uuid4().bytes, "name": name, "id": 1, "pid": pid}
        return client, client.call("register", owner=owner)["client"]

    before, before_id = registered("before", sleeper.pid)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "re-exec: checking that the new program starts" in daemon.log.read_text(),
             interval=0.005)  # fmt: skip
    during, during_id = registered("during", os.getpid())  # the check takes 0.3 s or more
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    after, after_id = registered("after", os.getpid())
    assert len({before_id, during_id, after_id}) == 3
    listed_clients = json.loads(daemon.lockd("clients", "--json").stdout)
    names = sorted(c["owner"]["name"] for c in listed_clients if c.get("owner"))
    assert names == ["after", "before", "during"]
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 3)
    # Each still under the name its hello gave, which `lockd clients` shows.
    listed_clients = json.loads(daemon.lockd("clients", "--json").stdout)
    hello_names = sorted(c.get("name", "") for c in listed_clients if c.get("owner"))
    assert hello_names == ["after", "before", "during"]
    for client in (before, during, after):
        assert client.call("status")["pid"] == daemon.proc.pid  # all three handed over
        client.close()


_GRAB = """
import fcntl, os, sys, time
journal = os.open(sys.argv[1], os.O_RDWR)
pid_file = os.open(sys.argv[2], os.O_RDWR)
print("ready", flush=True)
tries = won = 0
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    tries += 1
    for fd, lock in ((journal, fcntl.flock), (pid_file, fcntl.lockf)):
        try:
            lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue
        won += 1
        lock(fd, fcntl.LOCK_UN)
print(tries, won, flush=True)
"""


def test_a_reexec_never_lets_go_of_the_journal_directory_or_the_pid_file(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A second ``lockd serve`` started on the same paths while the daemon re-executes
    must find both still taken. Its flock and its pid file's lock went with their fds
    at the exec before: a second daemon could win the journal directory, the new
    program then exited ("in use"), and every lock was gone with no daemon left."""
    pid_file = tmp_path / "run" / "lockd.pid"
    daemon = make_daemon("own", None, "--pid-file", str(pid_file))
    wait_for(pid_file.exists)
    grab = subprocess.Popen(
        [sys.executable, "-c", _GRAB, str(daemon.journal_dir / ".lock"), str(pid_file), "3"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    children.append(grab)  # type: ignore[arg-type]
    assert grab.stdout is not None
    assert grab.stdout.readline().strip() == "ready"
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    tries, won = map(int, grab.stdout.readline().split())
    assert grab.wait(10) == 0
    assert tries > 100
    assert won == 0, f"another process took the daemon's locks {won} times during the re-exec"
    assert daemon.proc.poll() is None
    assert pid_file.read_text().strip() == str(daemon.proc.pid)
    daemon.stop()
    assert not pid_file.exists()


def test_a_reexec_hands_on_the_records_retention_keeps_for_open_connections(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A connection identified before a re-exec stays open across it: the new program
    keeps its ``connection-opened`` as the old one did, writing it again before
    retention deletes the segment that holds its last copy, so the kept journal names
    who is behind its release."""
    config = tmp_path / "lockd.toml"
    config.write_text("journal_segment_bytes = 4096\njournal_retain_segments = 1\n")
    daemon = make_daemon("keep", None, "--config", str(config))
    vm, churner = (subprocess.Popen(["sleep", "600"]) for _ in range(2))
    children += [vm, churner]
    disk = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/early.img")}
    with daemon.client("early") as early, daemon.client("churn") as churn:
        conn = early.call("register", owner=an_owner(vm.pid, "vm"))["client"]
        early.call("acquire", leases=[disk], autocreate=True)
        churn.call("register", owner=an_owner(churner.pid, "churn"))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
        (started,) = events(daemon, "--type", "daemon-started")[1:]
        churn_past(daemon, churn, started["seq"])
        early.call("release", leases=[disk])
    rows = events(daemon)
    (released,) = (row for row in rows if row["type"] == "lease-released"
                   and row["resource"] == disk["resource"])  # fmt: skip
    named = [row for row in rows if row["type"] == "connection-opened"
             and row["conn"] == conn and row["seq"] < released["seq"]]  # fmt: skip
    assert named, "the kept journal does not say who conn is"
    assert (named[-1]["pid"], named[-1]["uid"], named[-1]["repeat"]) == (
        os.getpid(), os.getuid(), True
    )  # fmt: skip


@pytest.mark.parametrize("sighup", [False, True], ids=["no-sighup", "after-sighup"])
def test_a_reexec_journals_the_settings_it_changes(
    make_daemon: MakeDaemon, tmp_path: Path, sighup: bool
) -> None:
    """The operator edits the file and reloads with SIGUSR1 (``systemctl reload``), with
    or without a SIGHUP first: after the re-exec's ``daemon-started`` a
    ``config-reloaded`` names every setting the new program runs with that the old one
    did not, all applied. Until now, with no SIGHUP, nothing said that ``fence_grace``
    or ``max_clients`` had changed."""
    config = tmp_path / "lockd.toml"
    config.write_text("fence_grace = 5\n")
    daemon = make_daemon("settings", None, "--config", str(config))
    config.write_text("fence_grace = 3\nmax_clients = 50\n")
    assert daemon.proc is not None
    if sighup:
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: journaled(daemon, "config-reloaded") > 0)
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    wait_for(lambda: journaled(daemon, "config-reloaded") == 1 + sighup)
    started = events(daemon, "--type", "daemon-started")[1]
    reloaded = events(daemon, "--type", "config-reloaded")[-1]
    assert reloaded["seq"] > started["seq"]
    assert reloaded["file"] == str(config)
    assert reloaded["changed"] == reloaded["applied"] == ["max_clients", "fence_grace"]
    # A second re-exec with the file as it is changes nothing, and says nothing.
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 3)
    assert len(events(daemon, "--type", "config-reloaded")) == 1 + sighup


def test_sigusr1_during_a_fence_hands_the_fence_over_with_its_deadline(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The SIGKILL of a fence is a timer in the old process: the new one resumes the fence
    from the journal, due when it was (a reload is not put off by a VM being killed).
    The grace leaves room for the re-exec's two program starts on a loaded machine: with
    4 s, two test workers and a load of 7-11 sent the SIGKILL before the exec."""
    grace = 6.0
    config = tmp_path / "lockd.toml"
    daemon, owner = start_fence(make_daemon, children, config, f"fence_grace = {grace}\n", "fence")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    assert owner.wait(grace + 10) == -signal.SIGKILL
    fenced = events(daemon, "--type", "owner-fenced")
    assert [e["signal"] for e in fenced] == ["SIGTERM", "SIGTERM", "SIGKILL"]
    assert fenced[1]["reason"].endswith(RESUMED)
    assert fenced[2]["time"] - fenced[0]["time"] < grace + 1.5  # not a new grace period
    assert daemon.proc.poll() is None  # the same pid serves on
    check(daemon)


def test_sigusr1_during_a_fence_under_policy_log_is_put_off_and_the_fence_completes(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Under lost_lease_policy = log the next process would drop the fence (the operator's
    way to stop one), so a re-exec is abandoned rather than ending a fence unasked."""
    config = tmp_path / "lockd.toml"
    daemon, owner = start_fence(make_daemon, children, config, 'lost_lease_policy = "log"\n', "log")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    # The check runs the new program once: seconds on a loaded machine.
    wait_for(lambda: "re-exec abandoned" in daemon.log.read_text(), timeout=30)
    assert owner.wait(10) == -signal.SIGKILL
    assert [e["signal"] for e in events(daemon, "--type", "owner-fenced")] == ["SIGTERM", "SIGKILL"]
    assert daemon.lockd("status").returncode == 0
    assert len(events(daemon, "--type", "daemon-started")) == 1  # no re-exec happened


def _high(fd: int) -> int:
    """A copy of ``fd`` above the fake manager's LISTEN_FDS range (3..), closing ``fd``."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 200)
    os.close(fd)
    return high


def _start_handed(
    daemon: DaemonProcess,
    *,
    leases: tuple[tuple[str, str, int], ...] = (),
    also_pass: Sequence[int] = (),
    **fields: Any,
) -> None:
    """Start ``daemon`` (stopped) as a re-exec would: from a handoff with its listening
    sockets, no connection, ``leases`` (their fds), and ``fields`` (an earlier build's,
    or nonsense). The handed fds are closed here once the daemon has them."""
    listeners = [_high(bind_unix(str(p)).detach()) for p in (daemon.socket, daemon.admin_socket)]
    handoff = Handoff(
        (ListenerFd(listeners[0], str(daemon.socket), False),
         ListenerFd(listeners[1], str(daemon.admin_socket), True)),
        (), leases, 1, **fields,
    )  # fmt: skip
    memfd = _high(os.memfd_create("handoff"))
    os.write(memfd, handoff.to_bytes())
    passed = [*listeners, *(fd for _, _, fd in leases), memfd]
    daemon.pass_fds = [*also_pass, *passed]
    extra = daemon.extra
    daemon.extra = (*extra, "--handoff-fd", str(memfd))
    try:
        daemon.start()
    finally:
        daemon.extra = extra
        for fd in passed:
            os.close(fd)  # from here on, only the daemon (and the fd store) hold them


def test_stale_lease_fds_in_a_handoff_are_closed_and_held_leases_kept(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """The next daemon is handed a lease fd the journal does not list (its lock must not
    stay held) and, for a held lease, an fd the fd store returns as well (one is kept):
    every lease the journal lists stays locked throughout, and nothing else does."""
    daemon, vm, name, path = vm_with_stored_lease(make_daemon, manager, children)
    with manager.lock:
        (stored,) = manager.store[name]
    watcher = start_watch(path)
    children.append(watcher)  # type: ignore[arg-type]
    kill_daemon(daemon)  # stands in for the old process's exec

    # What the old process would hand over: its listening sockets, the VM's lease
    # fd (the same open file description the store holds), and a stale one.
    ghost = daemon.lock_dir / FILES_LOCKSPACE / "ghost"
    ghost.touch()
    ghost_fd = _high(os.open(ghost, os.O_RDWR))
    try_lock(ghost_fd, shared=False)
    inherited = _high(os.dup(stored))
    leases = ((FILES_LOCKSPACE, lease_name_for_path("/vm/a.img"), inherited),
              (FILES_LOCKSPACE, "ghost", ghost_fd))  # fmt: skip
    env, fds = manager.env()  # the store returns the VM's lease fd too
    daemon.env_extra = env
    _start_handed(daemon, leases=leases, also_pass=fds)

    assert probe(ghost, "ofd") == "free", "the daemon kept the stale handoff fd's lock"
    assert "no journaled lease for adopted fd" in daemon.log.read_text()
    assert daemon.proc is not None
    assert fds_on(daemon.proc.pid, path) == 1, "the lease's fd from the store was kept as well"
    assert_vm_lease_kept(daemon, vm, watcher, "the handover")
    check(daemon)


BAD_EDITS = {
    "error": ("journal_sync = 'sometimes'\n", "journal_sync"),
    "moved pid file": ("pid_file = '{tmp}/elsewhere.pid'\n", "restart lockd to change them"),
    # The held lease's lockspace, served from another directory: the new program took
    # the handed fd (the lock on the old file) for the lease there, unlocked.
    "moved lockspace": (
        f"[lockspaces]\n'{FILES_LOCKSPACE}' = '{{tmp}}/elsewhere'\n",
        f"lockspaces.{FILES_LOCKSPACE} (None -> ",
    ),
}


@pytest.mark.parametrize("edit", sorted(BAD_EDITS))
def test_a_reload_after_a_bad_config_edit_serves_on_and_keeps_every_lock(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path, edit: str
) -> None:
    """The operator broke the config file, or moved a path the running daemon serves
    from, then reloaded: the new program would exit at once and take every lock with it,
    or carry on from paths that hold none of them. Its start-up check says so first, so
    the old program serves on, the lock never free; once the edit is undone, SIGUSR1
    re-execs."""
    added, expected = BAD_EDITS[edit]
    config = tmp_path / "lockd.toml"
    config.write_text("fence_grace = 5\n")
    daemon = make_daemon("bad", None, "--config", str(config))
    start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    watcher = start_watch(lease_file(daemon, "/vm/a.img"))
    children.append(watcher)  # type: ignore[arg-type]
    config.write_text("fence_grace = 5\n" + added.format(tmp=tmp_path))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "re-exec abandoned" in daemon.log.read_text())
    abandoned = next(
        line for line in daemon.log.read_text().splitlines() if "re-exec abandoned" in line
    )
    assert expected in abandoned
    assert daemon.proc.poll() is None
    assert daemon.lockd("status").returncode == 0
    assert len(events(daemon, "--type", "daemon-started")) == 1
    config.write_text("fence_grace = 5\n")
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    tries, free = stop_watch(watcher)
    assert tries > 100
    assert free == 0, f"the lock was seen free {free} times"
    assert daemon.proc.poll() is None
    check(daemon)


def test_a_reexec_into_a_journal_dir_the_new_program_refuses_is_abandoned_and_keeps_every_lock(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """The new program refuses a journal directory other users can write to (or that is
    another user's): one the old program served from (a build before that check, or
    a ``chmod g+w`` since) passed the handoff check, and the new program exited after
    the exec, every lock with it. The check now says so first: the re-exec is abandoned,
    the old program serves on, the lock never free."""
    start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    watcher = start_watch(lease_file(daemon, "/vm/a.img"))
    children.append(watcher)  # type: ignore[arg-type]
    mode = daemon.journal_dir.stat().st_mode & 0o7777
    daemon.journal_dir.chmod(mode | 0o020)
    try:
        proc = daemon.proc
        assert proc is not None
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "re-exec abandoned" in daemon.log.read_text() or proc.poll() is not None)
        assert proc.poll() is None, daemon.log.read_text()[-2000:]
        abandoned = next(
            line for line in daemon.log.read_text().splitlines() if "re-exec abandoned" in line
        )
        assert "other users can write to it" in abandoned
        assert daemon.lockd("status").returncode == 0
    finally:
        daemon.journal_dir.chmod(mode)
    proc.send_signal(signal.SIGUSR1)  # fixed: the re-exec goes through
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    tries, free = stop_watch(watcher)
    assert tries > 100
    assert free == 0, f"the lock was seen free {free} times"
    assert proc.poll() is None
    check(daemon)


def _copy_of_this_build(tmp_path: Path) -> Path:
    """This build's packages copied to a directory of their own: ``cwd`` for a daemon
    that runs them, and that a test may edit into an earlier build."""
    build = tmp_path / "build"
    for package in ("actors", "protocol", "lockd"):
        shutil.copytree(REPO / package, build / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return build


def _without_the_handoff_check(build: Path) -> None:
    """Edit the copy at ``build`` into a build from before --handoff-check, on disk as a
    downgrade would leave it (its running daemon has what it imported)."""
    cli = build / "lockd" / "cli.py"
    option = 'serve.add_argument("--handoff-check", action="store_true", help=argparse.SUPPRESS)'
    assert option in cli.read_text()
    cli.write_text(cli.read_text().replace(option, "serve.set_defaults(handoff_check=False)"))


def test_sigusr1_during_a_fence_into_a_build_without_the_check_is_put_off(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A build from before --handoff-check cannot say whether it resumes a fence, and
    those from before 2026-11-26 07:10 do not: a downgrade's re-exec during a fence went
    ahead, logging that the next process resumed it, and the VM being killed (over a lost
    lease, say) ran on. Now it is abandoned, and the fence completes."""
    grace = 8.0
    config = tmp_path / "lockd.toml"
    build = _copy_of_this_build(tmp_path)
    config.write_text(f"fence_grace = {grace}\n")
    daemon = make_daemon("fencing", None, "--config", str(config), cwd=build)
    owner = start_dropping_owner(daemon, children, ignore_sigterm=True)
    wait_for(lambda: journaled(daemon, "owner-fenced") > 0)
    _without_the_handoff_check(build)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "re-exec abandoned" in daemon.log.read_text(), timeout=grace)
    assert "a lockd from before --handoff-check, may not resume them" in daemon.log.read_text()
    assert owner.wait(grace + 10) == -signal.SIGKILL
    assert [e["signal"] for e in events(daemon, "--type", "owner-fenced")] == ["SIGTERM", "SIGKILL"]
    assert len(events(daemon, "--type", "daemon-started")) == 1  # no re-exec happened
    assert daemon.proc.poll() is None


def test_a_downgrade_to_a_build_without_the_check_is_checked_with_check_config(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A build from before --handoff-check (here: this one with the option taken out,
    as a downgrade would leave the files on disk) has its configuration checked with
    --check-config instead: broken, the re-exec is abandoned; mended, it execs the old
    way (the journal lock and the pid file taken by the new program itself), and the
    lease is never free."""
    build = _copy_of_this_build(tmp_path)
    config = tmp_path / "lockd.toml"
    config.write_text("fence_grace = 5\n")
    daemon = make_daemon("old", None, "--config", str(config), cwd=build)
    start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    watcher = start_watch(lease_file(daemon, "/vm/a.img"))
    children.append(watcher)  # type: ignore[arg-type]
    _without_the_handoff_check(build)
    config.write_text("fence_grace = 5\njournal_sync = 'sometimes'\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "re-exec abandoned" in daemon.log.read_text())
    assert "fails --check-config" in daemon.log.read_text()
    assert daemon.proc.poll() is None
    config.write_text("fence_grace = 5\n")
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    assert "from before --handoff-check" in daemon.log.read_text()
    tries, free = stop_watch(watcher)
    assert tries > 100
    assert free == 0, f"the lock was seen free {free} times"
    assert daemon.proc.poll() is None
    check(daemon)


def test_status_and_the_journal_tell_which_build_a_reload_runs(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """Every build says release 0.1.0, so an operator could not see whether a reload ran
    the code just installed. The version carries a digest of the code: the same code
    gives the CLI's, new code (a comment edited, as an upgrade leaves files on disk)
    another, in ``status`` and in each ``daemon-started``."""
    build = _copy_of_this_build(tmp_path)
    daemon = make_daemon("build", None, cwd=build)
    cli = daemon.lockd("--version")
    before = json.loads(daemon.lockd("status", "--json").stdout)["version"]
    assert cli.stdout == f"lockd {before}\n"
    assert before.startswith("0.1.0+")
    config = build / "lockd" / "config.py"
    config.write_text(config.read_text() + "# upgraded\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    after = json.loads(daemon.lockd("status", "--json").stdout)["version"]
    assert after.startswith("0.1.0+")
    assert after != before
    started = [e["version"] for e in events(daemon, "--type", "daemon-started")]
    assert started == [before, after]


def _acquires_ok(daemon: DaemonProcess) -> int:
    lines = daemon.lockd("metrics").stdout.splitlines()
    line = next(ln for ln in lines if ln.startswith('lockd_acquires_total{result="ok"}'))
    return int(line.split()[-1])


@pytest.mark.parametrize(
    "edit",
    ["", 'log_filters = "error:actors.owners"\n', 'log_outputs = "journald"\n'],
    ids=["runtime-kept", "filters-edited", "outputs-edited"],
)
def test_a_reexec_keeps_the_counts_and_the_log_level_set_at_runtime(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path,
    edit: str,
) -> None:  # fmt: skip
    """A reload is not a restart: counters go on from where they were (``rate()`` would
    read a drop to 0 as one), and a level set with ``lockd log-level`` stays, unless the
    file's logging was edited since, which then applies (as SIGHUP). The daemon runs
    with ``--verbose``, so its configured level is debug whatever the file says."""
    config = tmp_path / "lockd.toml"
    config.write_text("fence_grace = 5\n")
    daemon = make_daemon("counts", None, "--config", str(config))
    start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    start_run(daemon, children, "--disk", "/vm/b.img", "--name", "vm2")
    assert _acquires_ok(daemon) == 2
    assert daemon.lockd("log-level", "warning").returncode == 0
    config.write_text("fence_grace = 5\n" + edit)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    assert _acquires_ok(daemon) == 2
    logging_now = json.loads(daemon.lockd("log-level", "--json").stdout)
    if edit:  # the file applies: the level --verbose gives, the file's filters
        assert logging_now["level"] == "debug"
        assert logging_now["filters"] == ("error:actors.owners" if "filters" in edit else "")
    else:
        assert logging_now["level"] == "warning"
    start_run(daemon, children, "--disk", "/vm/c.img", "--name", "vm3")
    assert _acquires_ok(daemon) == 3


def test_a_handoff_from_an_earlier_build_starts_whatever_its_counts_look_like(
    make_daemon: MakeDaemon,
) -> None:
    """Counts and logging in the shape an earlier build hands over (histograms without
    their bounds, logging without outputs), and counts that make no sense: the new
    program starts and serves. A failed start would free every lease; counts are not
    worth that. The level set at runtime is kept: the file's logging did not change."""
    metrics = {
        "counters": [
            ["lockd_acquires_total", [[[["result", "ok"]], 7]]],
            ["lockd_conflicts_total", 3],
        ],
        "histograms": [["lockd_journal_fsync_seconds", [1] * 11, 0.5]],
    }
    logging = {"level": "warning", "filters": "", "config_level": "debug", "config_filters": ""}
    daemon = make_daemon("earlier", None)
    kill_daemon(daemon)  # stands in for the old process's exec
    _start_handed(daemon, metrics=metrics, logging=logging)
    assert daemon.lockd("status").returncode == 0
    assert "counters not carried over" in daemon.log.read_text()
    assert json.loads(daemon.lockd("log-level", "--json").stdout)["level"] == "warning"


def test_the_collectors_counters_go_on_across_a_reexec(make_daemon: MakeDaemon) -> None:
    """python_gc_* counted from 0 again in each program (62 collections after a reload
    that found 65), while every other counter went on. The previous program's counts,
    handed over, are added to the new one's."""
    handed = {"counters": [], "histograms": [], "gc": [[10**6, 5 * 10**6, 0]] * 3}
    daemon = make_daemon("gc", None)
    kill_daemon(daemon)  # stands in for the old process's exec
    _start_handed(daemon, metrics=handed)
    text = daemon.lockd("metrics").stdout
    for generation in range(3):
        collections = re.search(
            rf'^python_gc_collections_total{{generation="{generation}"}} (\d+)$', text, re.M
        )
        assert collections is not None
        assert int(collections.group(1)) >= 10**6
    collected = re.search(r'^python_gc_objects_collected_total{generation="0"} (\d+)$', text, re.M)
    assert collected is not None
    assert int(collected.group(1)) >= 5 * 10**6


def test_a_handoff_with_logging_that_makes_no_sense_starts_too(
    make_daemon: MakeDaemon,
) -> None:
    """The logging part of a handoff is as little worth a failed start as the counts."""
    logging = {"filters": 7, "config_level": "debug", "config_filters": ""}  # no level
    daemon = make_daemon("nonsense", None)
    kill_daemon(daemon)
    _start_handed(daemon, logging=logging)
    assert daemon.lockd("status").returncode == 0
    assert "logging set at runtime not kept" in daemon.log.read_text()


def test_a_reexec_runs_the_lockd_it_was_started_from_whatever_the_current_directory(
    make_daemon: MakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started (with the ``lockd`` command) in a directory holding a ``lockd`` directory of
    its own, as ``~`` with a checkout cloned as ``~/lockd``: ``python -m lockd`` from
    there took that directory for the package, and the re-exec died with an ImportError
    (abandoned: the daemon served on, but could never be upgraded in place)."""
    import tests.e2e.conftest as e2e

    command = Path(sys.executable).parent / "lockd"  # the venv's console script
    home = tmp_path / "home"
    (home / "lockd" / "lockd").mkdir(parents=True)  # a checkout, its package one down
    monkeypatch.setattr(e2e, "LOCKD", [str(command)])
    daemon = make_daemon("cwd", None, cwd=home)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: journaled(daemon, "daemon-started") == 2, timeout=30)
    assert daemon.proc.poll() is None
    assert "re-exec abandoned" not in daemon.log.read_text()


def test_a_sighup_to_every_lockd_process_does_not_end_the_reexec_check(
    make_daemon: MakeDaemon,
) -> None:
    """`systemctl kill -s HUP lockd` (every process of the unit) or `pkill -HUP lockd`
    during a reload also reached the new program being checked (--handoff-check), which
    died of it: "re-exec abandoned: the new program fails its start-up check"."""
    daemon = make_daemon()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    daemon.proc.send_signal(signal.SIGUSR1)

    def check_child() -> list[int]:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]

    wait_for(check_child, timeout=10, interval=0.002)
    for child in check_child():
        os.kill(child, signal.SIGHUP)
    wait_for(lambda: "re-exec: took over" in daemon.log.read_text()
             or "abandoned" in daemon.log.read_text())  # fmt: skip
    assert "abandoned" not in daemon.log.read_text()
    assert daemon.lockd("status").returncode == 0
