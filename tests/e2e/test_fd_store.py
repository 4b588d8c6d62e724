"""Under a service manager, lease fds live in its fd store: a crash keeps every lock held."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockd.commands import EXIT_NEEDS_OPERATOR
from lockd.systemd import lease_fd_name
from protocol.names import FILES_LOCKSPACE, lease_name_for_path
from tests.e2e.conftest import DaemonProcess, MakeDaemon, wait_for
from tests.e2e.fake_systemd import FakeServiceManager
from tests.e2e.invariants import check, listed
from tests.e2e.test_daemon import events, lease_file, start_run
from tests.lockprobe import probe, start_watch, stop_watch

pytestmark = pytest.mark.e2e


def fds_on(pid: int, path: Path) -> int:
    """How many of ``pid``'s descriptors are open on ``path``."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # one that closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == target
    return count


def _hand_store_to(
    daemon: DaemonProcess, fm: FakeServiceManager, extra: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """The next start of ``daemon`` gets ``fm``'s stored fds (and ``extra`` ones), its
    notify socket and ``env``, as systemd would start it."""
    stored_env, fds = fm.env(extra)
    daemon.env_extra = {**stored_env, **(env or {})}
    daemon.pass_fds = fds
    daemon.launcher = fm.launcher()


def start_under(daemon: DaemonProcess, fm: FakeServiceManager, **extra: int) -> None:
    _hand_store_to(daemon, fm, extra)
    daemon.start()


def start_crashing_under(daemon: DaemonProcess, fm: FakeServiceManager, point: str) -> None:
    """:func:`start_under`, with the crash point ``point`` armed (``LOCKD_CRASH_AT``)."""
    _hand_store_to(daemon, fm, env={"LOCKD_CRASH_AT": point})
    daemon.start()


@contextlib.contextmanager
def started_while_busy(daemon: DaemonProcess, fm: FakeServiceManager) -> Iterator[None]:
    """:func:`start_under` while PID 1 is busy: inside, an FDSTOREREMOVE waits, and the
    store keeps every copy it holds."""
    _hand_store_to(daemon, fm)
    with fm.lock:
        daemon.start()
        yield


def vm_with_stored_lease(
    make_daemon: MakeDaemon, manager: FakeServiceManager, children: list[subprocess.Popen[bytes]]
) -> tuple[DaemonProcess, subprocess.Popen[bytes], str, Path]:
    """A daemon under ``manager`` and a VM holding /vm/a.img, once its lease fd is stored:
    (daemon, VM, the lease's fd-store name, the lease file)."""
    daemon = make_daemon("sd")
    daemon.stop()
    start_under(daemon, manager)
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    wait_for(lambda: len(manager.stored_names()) == 1)
    (name,) = manager.stored_names()
    return daemon, vm, name, lease_file(daemon, "/vm/a.img")


def assert_vm_lease_kept(
    daemon: DaemonProcess, vm: subprocess.Popen[bytes], watcher: subprocess.Popen[str], across: str
) -> None:
    """The watcher never once found the VM's lease free, and the new daemon holds it again."""
    tries, free = stop_watch(watcher)
    assert tries > 100
    assert free == 0, f"the lock was seen free {free} times across {across}"
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm.pid,))
    }
    assert events(daemon, "--type", "recovery-completed")[-1]["held"] == 1


def crash_and_restart_watched(
    daemon: DaemonProcess,
    manager: FakeServiceManager,
    vm: subprocess.Popen[bytes],
    path: Path,
    children: list[subprocess.Popen[bytes]],
    **extra: int,
) -> None:
    """SIGKILL the daemon and start it again under ``manager`` (``extra``: more fds it
    hands back), while a watcher looks at the lock: it was never free, and is the VM's."""
    watcher = start_watch(path)
    children.append(watcher)  # type: ignore[arg-type]
    kill_daemon(daemon)
    start_under(daemon, manager, **extra)
    assert_vm_lease_kept(daemon, vm, watcher, "the restart")


def kill_daemon(daemon: DaemonProcess) -> None:
    """SIGKILL, and reap it: everything it held that is not stored elsewhere is gone."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()


def test_a_crash_keeps_the_lock_held_through_the_fd_store(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    daemon, vm, name, path = vm_with_stored_lease(make_daemon, manager, children)
    assert name == "l0"  # short: 16,384 leases' names fit in a restart's LISTEN_FDNAMES
    assert manager.ready_count() == 1
    kill_daemon(daemon)
    # The daemon is dead, and the disk is still locked: the manager holds the fd.
    assert probe(path, "ofd") == "busy"
    assert probe(path, "classic") == "busy"

    junk = tmp_path / "junk"
    junk.touch()
    stale = os.open(junk, os.O_RDWR)
    other = os.open(junk, os.O_RDWR)
    start_under(daemon, manager, **{"lease-0000": stale, "bogus": other})
    wait_for(lambda: manager.ready_count() == 2)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm.pid,))
    }
    assert "lease-0000" not in manager.stored_names()  # stale: removed from the store
    log = daemon.log.read_text()
    assert "refusing an fd named 'bogus'" in log
    assert events(daemon, "--type", "recovery-completed")[-1]["held"] == 1
    check(daemon)

    vm.kill()
    vm.wait()
    wait_for(lambda: not manager.stored_names())  # FDSTOREREMOVE on release
    wait_for(lambda: not path.exists())
    check(daemon)
    os.close(stale)
    os.close(other)


def test_a_store_an_earlier_build_filled_is_adopted_by_its_hashed_names(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """An upgrade by restart: the store holds the lease under an earlier build's name
    (``lease-`` and a hash); the lock is kept throughout, and the release drops it."""
    daemon, vm, name, path = vm_with_stored_lease(make_daemon, manager, children)
    legacy = lease_fd_name(FILES_LOCKSPACE, lease_name_for_path("/vm/a.img"))
    with manager.lock:
        manager.store[legacy] = manager.store.pop(name)
    crash_and_restart_watched(daemon, manager, vm, path, children)
    assert manager.stored_names() == {legacy}
    vm.kill()
    vm.wait()
    wait_for(lambda: not manager.stored_names())
    with manager.lock:
        assert f"FDSTOREREMOVE=1\nFDNAME={legacy}" in manager.messages
    check(daemon)


def test_a_reexec_hands_on_the_stores_names_and_a_crash_after_it_keeps_every_lock(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """After a re-exec, the next lease gets a name of its own, not the one the store
    holds the first under (one FDSTOREREMOVE would drop both); a crash then keeps both
    locks, each fd paired with its lease by its file."""
    daemon, vm, _, path = vm_with_stored_lease(make_daemon, manager, children)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: len(events(daemon, "--type", "daemon-started")) == 2, timeout=30)
    vm2 = start_run(daemon, children, "--disk", "/vm/b.img", "--name", "vm2")
    wait_for(lambda: len(manager.stored_names()) == 2)
    assert manager.stored_names() == {"l0", "l1"}
    path2 = lease_file(daemon, "/vm/b.img")
    watchers = [start_watch(path), start_watch(path2)]
    children.extend(watchers)  # type: ignore[arg-type]
    kill_daemon(daemon)
    start_under(daemon, manager)
    for watcher in watchers:
        tries, free = stop_watch(watcher)
        assert tries > 100
        assert free == 0, f"a lock was seen free {free} times across the restart"
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm.pid,)),
        (FILES_LOCKSPACE, lease_name_for_path("/vm/b.img")): ("exclusive", (vm2.pid,)),
    }
    vm.kill()
    vm.wait()
    wait_for(lambda: manager.stored_names() == {"l1"})  # vm2's lock still stored
    check(daemon)


def test_a_lease_the_store_returns_twice_is_adopted_once_and_the_extra_fd_closed(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """LISTEN_FDNAMES names one lease twice: one fd is adopted, the other closed, not leaked."""
    daemon, vm, name, path = vm_with_stored_lease(make_daemon, manager, children)
    with manager.lock:
        (kept,) = manager.store[name]
    twin = os.dup(kept)  # the same lease fd, stored a second time under its name
    try:
        crash_and_restart_watched(daemon, manager, vm, path, children, **{name: twin})
    finally:
        os.close(twin)
    assert probe(path, "ofd") == "busy"
    assert daemon.proc is not None
    assert fds_on(daemon.proc.pid, path) == 1, "the extra fd is still open in the daemon"
    assert f"fd store returned {name} and {name} for " in daemon.log.read_text()
    check(daemon)


def test_an_adopted_fd_whose_owner_died_meanwhile_is_removed_from_the_store(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """The store gives back the fd of a lease whose owner exited while lockd was down:
    recovery releases it (owner-gone) and tells the manager to drop its copy, which
    would otherwise keep the disk locked with nobody holding the lease."""
    daemon, vm, name, path = vm_with_stored_lease(make_daemon, manager, children)
    kill_daemon(daemon)
    vm.kill()  # the owner dies while lockd is down
    vm.wait()
    assert probe(path, "ofd") == "busy"  # the manager's copy still holds it
    start_under(daemon, manager)
    assert events(daemon, "--type", "recovery-completed")[-1]["released"] == 1
    wait_for(lambda: not manager.stored_names(), timeout=3)
    with manager.lock:
        assert f"FDSTOREREMOVE=1\nFDNAME={name}" in manager.messages
    assert not path.exists() or probe(path, "ofd") == "free"
    assert listed(daemon) == {}
    check(daemon)


def test_a_lease_file_moved_while_down_is_locked_where_it_is_now_not_through_the_old_fd(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """The store returns a lease's fd, but its lockspace is now served from another
    directory (``lock_dir`` changed and the unit restarted, as moves must be): the fd
    locks the old file, which protects nothing there. The lease is locked on the file
    its path names now (it was adopted through the old fd, reported held, and the new
    file left free for any other host)."""
    daemon, vm, name, old = vm_with_stored_lease(make_daemon, manager, children)
    daemon.stop()  # under the fd store a stop keeps the lock too
    assert probe(old, "ofd") == "busy"
    daemon.lock_dir = tmp_path / "moved"
    (daemon.lock_dir / FILES_LOCKSPACE).mkdir(parents=True)
    new = lease_file(daemon, "/vm/a.img")
    start_under(daemon, manager)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm.pid,))
    }
    assert probe(new, "ofd") == "busy"
    wait_for(lambda: probe(old, "ofd") == "free")  # the old fd closed, and dropped from the store
    assert manager.stored_names() == {name}  # the new file's fd stored in its place
    check(daemon)


def test_a_crash_between_journaling_an_acquire_and_replying_keeps_the_lock_in_the_store(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """``lease-acquired`` is written and the daemon dies before its reply: the journal
    says the lease is held, so the store must hold its lock meanwhile (stored only after
    the reply, it was free until the restart took it again, for any host to take)."""
    daemon = make_daemon("sd")
    daemon.stop()
    start_crashing_under(daemon, manager, "acquire-journaled")
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    done = daemon.lockd("acquire", "--owner-pid", str(sleeper.pid), "--disk", "/vm/a.img")
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == -signal.SIGKILL
    assert done.returncode != 0  # no reply
    path = lease_file(daemon, "/vm/a.img")
    assert probe(path, "ofd") == "busy"
    start_under(daemon, manager)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (sleeper.pid,))
    }
    assert events(daemon, "--type", "recovery-completed")[-1]["held"] == 1
    check(daemon)


def test_a_crash_before_journaling_an_acquire_leaves_no_lock_in_the_store(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """The other side of storing before the journal write: locked and stored, the daemon
    dies before ``lease-acquired`` is written. The restart drops the stored fd that no
    journaled lease owns, and the file is free."""
    daemon = make_daemon("sd")
    daemon.stop()
    start_crashing_under(daemon, manager, "acquire-locked")
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    daemon.lockd("acquire", "--owner-pid", str(sleeper.pid), "--disk", "/vm/a.img")
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == -signal.SIGKILL
    start_under(daemon, manager)
    assert listed(daemon) == {}
    wait_for(lambda: not manager.stored_names())
    wait_for(lambda: probe(lease_file(daemon, "/vm/a.img"), "ofd") == "free")
    check(daemon)


def test_a_crash_while_recovery_journals_its_findings_keeps_relocked_leases_in_the_store(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """A start with no fds handed back (the store is emptied by a stop) locks a live
    VM's lease anew; the daemon dies once recovery journaled its findings (an owner
    gone). The journal says the lease is held: its lock must be in the store by then
    (stored after the findings, it was free until the next start, for any host)."""
    daemon = make_daemon("sd")
    vm, gone = (subprocess.Popen(["sleep", "600"]) for _ in range(2))
    children.extend((vm, gone))
    for pid, disk in ((vm.pid, "/vm/a.img"), (gone.pid, "/vm/b.img")):
        assert daemon.lockd("acquire", "--owner-pid", str(pid), "--disk", disk).returncode == 0
    daemon.stop()  # not under the manager: nothing stored
    gone.kill()
    gone.wait()
    with pytest.raises(RuntimeError, match="exited at start"):  # killed in its recovery
        start_crashing_under(daemon, manager, "restore-journaled")
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == -signal.SIGKILL
    assert probe(lease_file(daemon, "/vm/a.img"), "ofd") == "busy"  # the store's copy
    start_under(daemon, manager)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm.pid,))
    }
    check(daemon)


def test_a_released_lease_is_free_at_once_while_the_store_still_holds_its_fd(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """The store holds the lease fd's open file description, and so its OFD lock, until
    the manager gets to FDSTOREREMOVE: closing the daemon's fd did not free it. A
    released lease file that stays (one created beforehand) was still locked after the
    release's answer, for as long as PID 1 was busy: "busy" to the next VM or host."""
    daemon = make_daemon("sd")
    daemon.stop()
    start_under(daemon, manager)
    with daemon.client() as client:
        client.call("create-lockspace", lockspace="test.space")
        client.call("create-resource", lockspace="test.space", resource="disk-1")
    path = daemon.lock_dir / "test.space" / "disk-1"
    owner = subprocess.Popen(["sleep", "600"])
    children.append(owner)
    acquire = ("--owner-pid", str(owner.pid), "--lease", "test.space/disk-1")
    done = daemon.lockd("acquire", *acquire, "--no-autocreate")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: len(manager.stored_names()) == 1)
    assert probe(path, "ofd") == "busy"
    with manager.lock:  # PID 1 busy: the FDSTOREREMOVE waits
        done = daemon.lockd("release", *acquire)
        assert done.returncode == 0, done.stderr
        assert probe(path, "ofd") == "free"
        assert probe(path, "classic") == "free"
    wait_for(lambda: not manager.stored_names())
    check(daemon)


def test_a_lease_recovery_ends_is_free_at_once_while_the_store_still_holds_its_fd(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """The store gives back the fd of a lease whose owner exited while lockd was down;
    recovery ends the lease. That fd was closed without unlocking, so the store's copy
    kept the lock until the manager got to the FDSTOREREMOVE (for good if that send gave
    up after 0.1 s): the disk was "busy" to the next VM or host meanwhile, and the
    autocreated file, whose removal needs the lock, stayed."""
    daemon, vm, _, path = vm_with_stored_lease(make_daemon, manager, children)
    kill_daemon(daemon)
    vm.kill()  # the owner dies while lockd is down
    vm.wait()
    with started_while_busy(daemon, manager):
        assert events(daemon, "--type", "recovery-completed")[-1]["released"] == 1
        wait_for(lambda: not path.exists(), timeout=5)
    wait_for(lambda: not manager.stored_names())
    assert listed(daemon) == {}
    check(daemon)


@pytest.mark.parametrize("stale_on", ["lease-file", "replaced-file"])
def test_of_a_lease_stored_twice_the_fd_holding_the_lock_is_kept(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    stale_on: str,
) -> None:
    """A stale, unlocked copy under the lease's name handed back first: an earlier hold's
    (another open of the lease file), or the old file's after a relink (the lease file
    removed or replaced while held), either with its FDSTOREREMOVE lost. The daemon kept
    the first fd and closed the one holding the lock: the lease was free until recovery
    or, on the replaced file (where nothing conflicts with an unlocked fd), recovery found
    the store's copy holding the lease and fenced the VM for a lease "lost to another
    process or host"."""
    daemon, vm, name, path = vm_with_stored_lease(make_daemon, manager, children)
    if stale_on == "replaced-file":
        replaced = tmp_path / "replaced-lease-file"
        replaced.touch()
        stale = os.open(replaced, os.O_RDWR)  # the old file, unlinked from the lockspace since
    else:
        stale = os.open(path, os.O_RDWR)
    with manager.lock:
        manager.store[name].insert(0, stale)  # passed first, as the store may order them
    watcher = start_watch(path)
    children.append(watcher)  # type: ignore[arg-type]
    kill_daemon(daemon)
    with started_while_busy(daemon, manager):
        assert_vm_lease_kept(daemon, vm, watcher, "the restart")
    log = daemon.log.read_text()
    if stale_on == "lease-file":
        assert f"fd store returned {name} and {name} for " in log
    else:
        assert f"fd store: an fd under {name} is not its lease's; closing it" in log
    with manager.lock:  # the store still keeps the lease's lock
        assert f"FDSTOREREMOVE=1\nFDNAME={name}" not in manager.messages
    assert not events(daemon, "--type", "lease-lost")
    assert vm.poll() is None
    check(daemon)


@pytest.mark.parametrize("replaced", ["file", "directory"])
def test_a_lease_relinked_while_held_is_kept_across_a_crash_by_the_store(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
    replaced: str,
) -> None:
    """A held lease's file removed (or its lockspace directory moved aside and made again)
    is locked again where its name is; the store then keeps the new file's fd, alone, so
    a crash keeps the disk locked and the restart holds the lease on that file."""
    daemon, vm, name, path = vm_with_stored_lease(make_daemon, manager, children)
    if replaced == "file":
        path.unlink()
    else:
        path.parent.rename(path.parent.with_name("aside"))
        path.parent.mkdir()
    wait_for(lambda: path.exists() and probe(path, "ofd") == "busy", timeout=5)

    def stored_is_new_file() -> bool:
        with manager.lock:
            fds = manager.store.get(name, [])
            return len(fds) == 1 and os.path.samestat(os.fstat(fds[0]), os.stat(path))

    wait_for(stored_is_new_file, timeout=5)
    crash_and_restart_watched(daemon, manager, vm, path, children)
    assert not events(daemon, "--type", "lease-lost")
    check(daemon)


def test_a_start_on_an_empty_journal_is_refused_while_the_store_holds_leases(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """lockd restarted by its service manager on a journal directory with no event (a
    new or mistyped journal_dir, a journal moved away) while the fd store gives back a
    running VM's lock: it started, found no journaled lease for the fd, removed it from
    the store, and the VM's disk was free for another host. It now refuses to start,
    saying why and how out; the store keeps the lock, and a start on the right journal
    holds the lease again."""
    daemon, vm, name, path = vm_with_stored_lease(make_daemon, manager, children)
    kill_daemon(daemon)
    journal = daemon.journal_dir
    journal.rename(journal.with_name("journal.moved"))
    journal.mkdir(mode=0o700)
    with pytest.raises(RuntimeError, match="daemon exited at start"):
        start_under(daemon, manager)
    assert daemon.proc is not None
    assert daemon.proc.wait() == EXIT_NEEDS_OPERATOR  # not restarted: it would be refused alike
    log = daemon.log.read_text()
    assert "the service manager's fd store holds the locks of 1 leases" in log
    assert f"journal_dir {journal} holds no event" in log
    assert manager.stored_names() == {name}
    assert probe(path, "ofd") == "busy"
    shutil.rmtree(journal)
    journal.with_name("journal.moved").rename(journal)
    start_under(daemon, manager)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm.pid,))
    }


def test_a_start_on_an_empty_journal_goes_on_when_the_store_holds_no_lock(
    make_daemon: MakeDaemon, manager: FakeServiceManager, tmp_path: Path
) -> None:
    """A stored copy whose lock is gone (its removal from the store lost in a crash) holds
    no VM's disk: a start on an empty journal is not refused for it, and it is removed
    from the store as usual (helper-73's find: the refusal counted every stored fd)."""
    daemon = make_daemon("sd")
    daemon.stop()
    shutil.rmtree(daemon.journal_dir)
    junk = tmp_path / "junk"
    junk.touch()
    stale = os.open(junk, os.O_RDWR)
    try:
        start_under(daemon, manager, **{"lease-0000": stale})
        wait_for(lambda: "lease-0000" not in manager.stored_names())
        assert listed(daemon) == {}
    finally:
        os.close(stale)
