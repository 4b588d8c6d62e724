"""RecoveryActor with fakes: held again, released (owner gone), lost and fenced."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.events import (
    Fence,
    JournalEntry,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    OwnerFenced,
    RecoveryCompleted,
    ReleaseReason,
)
from actors.lockspace import RESTORE_RETRY_SECONDS
from actors.model import LeaseMode, Owner
from actors.recovery import LOOKUP_RETRIES, RESUMED, RecoveryActor, RecoveryReport
from actors.recovery_core import HeldLease, ReplayState
from lockd.lockfiles import LockspaceDir, try_lock
from protocol.names import INDEX_NAME
from tests.actors.harness import Harness
from tests.actors.test_daemon_actors import FILES, kernel_locked

LIVE, DEAD, VICTIM = 5001, 5002, 5003


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "locks")
    for pid in (LIVE, VICTIM):
        harness.processes.spawn(pid, start=100)
    yield harness
    harness.close()


BOOT, EARLIER_BOOT = b"\x02" * 16, b"\x01" * 16


def owner(pid: int, boot: bytes | None = None) -> Owner:
    return Owner(uuid.uuid4().bytes, f"vm{pid}", 1, pid, 100, boot)


def start_recovery(h: Harness, state: ReplayState, **options: Any) -> list[RecoveryReport]:
    """Start recovery on the harness (``options`` override its collaborators); run until idle.

    Returns the list its report lands in: empty while recovery still waits.
    """
    reports: list[RecoveryReport] = []
    collaborators = {"router": h.router, "owners": h.owners, "journal": h.journal,
                     "processes": h.processes, "wall_clock": h.wall_clock,
                     **options}  # fmt: skip
    RecoveryActor.start(h.dispatcher, state=state, on_done=reports.append, **collaborators)
    h.run()
    return reports


def recover(h: Harness, state: ReplayState, **options: Any) -> RecoveryReport:
    (report,) = start_recovery(h, state, **options)
    return report


def held(
    state: ReplayState, resource: str, who: Owner, mode: LeaseMode = LeaseMode.EXCLUSIVE
) -> None:
    lease = HeldLease(FILES, resource, mode, True)
    lease.owners[who.key] = (who, 12.5)
    state.leases[(FILES, resource)] = lease


def test_recovery_holds_releases_and_reports_lost(h: Harness) -> None:
    live, dead, victim = owner(LIVE), owner(DEAD), owner(VICTIM)
    state = ReplayState()
    for name, who in (("live", live), ("dead", dead), ("stolen", victim)):
        held(state, name, who)
        (h.lock_dir / FILES / name).touch()
    thief = os.open(h.lock_dir / FILES / "stolen", os.O_RDWR)
    try_lock(thief, shared=False)  # another host took it while lockd was down
    h.processes.ignores_sigterm.add(VICTIM)
    try:
        report = recover(h, state)
        assert (report.held, report.released, report.lost) == (1, 1, 1)
        assert kernel_locked(h.lock_dir / FILES / "live")
        assert not (h.lock_dir / FILES / "dead").exists()  # autocreated, owner gone: cleaned
        (gone,) = h.journal_writer.events(LeaseReleased)
        assert (gone.owner.pid, gone.reason) == (DEAD, ReleaseReason.OWNER_GONE)
        (lost,) = h.journal_writer.events(LeaseLost)
        assert lost.owner.pid == VICTIM
        assert h.processes.signals == [(VICTIM, "SIGTERM")]
        h.advance(2.0)
        assert h.processes.signals == [(VICTIM, "SIGTERM"), (VICTIM, "SIGKILL")]
        (done,) = h.journal_writer.events(RecoveryCompleted)
        assert (done.held, done.released, done.lost) == (1, 1, 1)
        # The fence it starts is in that record: a crash before the SIGTERM is journaled
        # leaves it to the next start.
        assert done.fencing == (
            Fence(victim, f"lease {FILES}/stolen was taken while lockd was down"),
        )
        # Served afterwards exactly as before the crash, with the journaled 'since'.
        c = h.connect(LIVE)
        (row,) = c.ok("list-leases")["leases"]
        assert (row["resource"], row["owners"][0]["pid"], row["owners"][0]["since"]) == (
            "live",
            LIVE,
            12.5,
        )
        # A recovered owner is watched: its exit ends the lease.
        h.processes.exit(LIVE)
        h.run()
        assert not kernel_locked(h.lock_dir / FILES / "live")
    finally:
        os.close(thief)


def test_a_missing_lease_file_is_created_again_for_a_live_owner(h: Harness) -> None:
    live = owner(LIVE)
    state = ReplayState()
    held(state, "vanished", live)
    report = recover(h, state)
    assert report.held == 1
    assert kernel_locked(h.lock_dir / FILES / "vanished")


def test_a_busy_index_while_the_file_is_created_again_is_waited_for_not_fenced(
    h: Harness,
) -> None:
    """The lease file went missing while lockd was down, and another host holds the
    lockspace's index lock (creating or deleting a file of its own) when recovery
    creates it again. Nobody holds the lease: the live owner keeps it, once the
    index is free, and is not fenced (it was recorded lost and fenced at once)."""
    live = owner(LIVE)
    state = ReplayState()
    held(state, "vanished", live)
    (h.lock_dir / FILES).mkdir(parents=True, exist_ok=True)
    index = os.open(h.lock_dir / FILES / INDEX_NAME, os.O_RDWR | os.O_CREAT)
    try:
        try_lock(index, shared=False)  # another host, mid-create
        reports = start_recovery(h, state)
        h.advance(0.5)
        assert reports == []  # waiting for the index; requests wait too
    finally:
        os.close(index)
    h.advance(0.2)
    assert reports[0].held == 1
    assert reports[0].lost == 0
    assert h.journal_writer.events(LeaseLost) == []
    assert h.processes.signals == []
    assert kernel_locked(h.lock_dir / FILES / "vanished")


def test_a_lease_someone_else_holds_is_lost_at_once(h: Harness) -> None:
    """Another process holds the lease file's own lock: lost without waiting."""
    live = owner(LIVE)
    state = ReplayState()
    held(state, "taken", live)
    (h.lock_dir / FILES).mkdir(parents=True, exist_ok=True)
    fd = os.open(h.lock_dir / FILES / "taken", os.O_RDWR | os.O_CREAT)
    try:
        try_lock(fd, shared=False)
        assert recover(h, state).lost == 1  # no timer ran: answered at once
    finally:
        os.close(fd)


def test_an_adopted_fd_is_used_without_reopening(h: Harness) -> None:
    live = owner(LIVE)
    state = ReplayState()
    held(state, "kept", live)
    path = h.lock_dir / FILES / "kept"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    try_lock(fd, shared=False)  # the lock an inherited fd still carries
    assert recover(h, state, adopted={(FILES, "kept"): fd}).held == 1
    assert kernel_locked(path)
    c = h.connect(LIVE)
    assert c.ok("list-leases")["leases"][0]["resource"] == "kept"


def test_a_lockspace_mounted_late_is_waited_for_not_fenced(h: Harness) -> None:
    """Shared storage that appears a few seconds late: the live owner keeps its lease."""
    live = owner(LIVE)
    state = ReplayState()
    lease = HeldLease("late.pool", "disk", LeaseMode.EXCLUSIVE, False)
    lease.owners[live.key] = (live, 1.0)
    state.leases[("late.pool", "disk")] = lease
    reports = start_recovery(h, state)
    for _ in range(3):
        h.advance(1.0)
    assert reports == []  # still waiting: requests wait with it
    (h.lock_dir / "late.pool").mkdir()
    (h.lock_dir / "late.pool" / "disk").touch()
    h.advance(1.0)
    assert reports[0].held == 1
    assert h.processes.signals == []
    assert kernel_locked(h.lock_dir / "late.pool" / "disk")


def test_a_missing_lockspace_whose_owners_are_all_gone_is_not_waited_for(
    h: Harness, tmp_path: Path
) -> None:
    """After a reboot every owner is gone; shared storage not mounted then held recovery,
    and every request, for LOOKUP_RETRIES seconds, though no lock was to be taken there.
    The leases are released at once, and the store drops the fd it gave back for one."""
    dead = owner(DEAD)
    state = ReplayState()
    for resource in ("disk1", "disk2"):
        lease = HeldLease("late.pool", resource, LeaseMode.EXCLUSIVE, True)
        lease.owners[dead.key] = (dead, 1.0)
        state.leases[("late.pool", resource)] = lease
    stored = tmp_path / "stored"
    stored.touch()
    fd = os.open(stored, os.O_RDWR)
    fd_store = FakeFdStore()
    reports = start_recovery(h, state, adopted={("late.pool", "disk1"): fd}, fd_store=fd_store)
    assert [r.released for r in reports] == [2]  # without h.advance: no wait
    assert fd_store.removed == [("late.pool", "disk1")]
    gone = h.journal_writer.events(LeaseReleased)
    assert sorted((e.resource, e.reason) for e in gone) == [
        ("disk1", ReleaseReason.OWNER_GONE), ("disk2", ReleaseReason.OWNER_GONE)
    ]  # fmt: skip
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # closed: its lock no longer held for a gone owner


def test_a_lockspace_that_never_comes_back_loses_its_leases_and_unlocks_their_stored_fds(
    h: Harness, tmp_path: Path
) -> None:
    """Shared storage that stays away: after LOOKUP_RETRIES the live owner's lease is
    lost, and the log and fence say why (they said another process or host took it).
    The fd the store gave back for it is unlocked before it is closed: the store's
    copy kept the lock, unreported, until the manager dropped it (never, if the
    FDSTOREREMOVE could not be sent)."""
    live = owner(LIVE)
    state = ReplayState()
    lease = HeldLease("gone.pool", "disk", LeaseMode.EXCLUSIVE, False)
    lease.owners[live.key] = (live, 1.0)
    state.leases[("gone.pool", "disk")] = lease
    stored = tmp_path / "stored"
    stored.touch()
    fd = os.open(stored, os.O_RDWR)
    try_lock(fd, shared=False)
    store_copy = os.dup(fd)  # the service manager's copy of the description
    fd_store = FakeFdStore()
    try:
        reports = start_recovery(h, state, adopted={("gone.pool", "disk"): fd},
                                 fd_store=fd_store, release_fd=LockspaceDir.release_fd)  # fmt: skip
        for _ in range(LOOKUP_RETRIES + 1):
            h.advance(1.0)
        assert [r.lost for r in reports] == [1]
        (done,) = h.journal_writer.events(RecoveryCompleted)
        (fence,) = done.fencing
        assert fence.reason.startswith(
            "lease gone.pool/disk was lost while lockd was down: its lockspace directory is "
            "unavailable"
        )
        assert fd_store.removed == [("gone.pool", "disk")]
        assert not kernel_locked(stored)
    finally:
        os.close(store_copy)


def test_a_lease_file_that_cannot_be_created_again_is_lost_not_retried_forever(
    tmp_path: Path,
) -> None:
    """The lockspace directory vanished under recovery: tried again for
    RESTORE_RETRY_SECONDS (shared storage back from a hiccup would do), then lost."""
    from lockd.lockfiles import LockspaceDir

    harness = Harness(tmp_path / "locks")
    harness.processes.spawn(LIVE, start=100)
    try:
        (harness.lock_dir / "doomed").mkdir()

        def vanishing(path: str) -> LockspaceDir:
            files = LockspaceDir(path)
            os.rmdir(path)  # the directory fd stays valid; creating files in it fails
            return files

        from actors.router import RouterActor

        router = RouterActor.start(
            harness.dispatcher, lock_dir=str(harness.lock_dir), journal=harness.journal,
            open_lockspace=vanishing,
        )  # fmt: skip
        live = owner(LIVE)
        state = ReplayState()
        lease = HeldLease("doomed", "disk", LeaseMode.EXCLUSIVE, True)
        lease.owners[live.key] = (live, 1.0)
        state.leases[("doomed", "disk")] = lease
        reports = start_recovery(harness, state, router=router)
        for _ in range(int(RESTORE_RETRY_SECONDS * 10) - 5):
            harness.advance(0.1)
        assert reports == []  # still trying
        for _ in range(10):
            harness.advance(0.1)
        assert reports[0].lost == 1
        assert [e.owner.pid for e in harness.journal_writer.events(LeaseLost)] == [LIVE]
    finally:
        harness.close()


class FakeFdStore:
    """The service manager's fd store, recording what the lockspaces tell it."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str]] = []
        self.removed: list[tuple[str, str]] = []

    def store(self, lockspace: str, resource: str, fd: int) -> None:
        self.stored.append((lockspace, resource))

    def remove(self, lockspace: str, resource: str) -> None:
        self.removed.append((lockspace, resource))


def test_an_adopted_fd_that_lost_its_lock_is_removed_from_the_fd_store(h: Harness) -> None:
    """The store gave back an fd whose lock another host holds now: the lease is lost,
    and the manager is told to drop its copy (FDSTOREREMOVE), not left holding it."""
    from actors.router import RouterActor
    from lockd.lockfiles import LockspaceDir

    fd_store = FakeFdStore()
    router = RouterActor.start(
        h.dispatcher, lock_dir=str(h.lock_dir), journal=h.journal,
        open_lockspace=LockspaceDir, fd_store=fd_store,
    )  # fmt: skip
    victim = owner(VICTIM)
    state = ReplayState()
    held(state, "taken", victim)
    path = h.lock_dir / FILES / "taken"
    path.touch()
    thief = os.open(path, os.O_RDWR)
    try_lock(thief, shared=False)  # another host took it while lockd was down
    stale = os.open(path, os.O_RDWR)  # the stored fd, no longer carrying the lock
    try:
        assert recover(h, state, adopted={(FILES, "taken"): stale}, router=router).lost == 1
        assert fd_store.removed == [(FILES, "taken")]
        assert fd_store.stored == []
        assert [e.owner.pid for e in h.journal_writer.events(LeaseLost)] == [VICTIM]
    finally:
        os.close(thief)


class Flaky(LockspaceDir):
    """Lease files whose next ``failures`` locks fail with ENOLCK (an NFS lock hiccup)."""

    failures = 0

    def try_lock(self, fd: int, *, shared: bool) -> None:
        if Flaky.failures:
            Flaky.failures -= 1
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        super().try_lock(fd, shared=shared)


def _adopting(
    h: Harness, failures: int
) -> tuple[FakeFdStore, Path, int, int, list[RecoveryReport]]:
    """Recovery adopting a stored fd that carries the lease, whose first ``failures`` locks
    fail; the service manager keeps its own copy of the fd meanwhile."""
    from actors.router import RouterActor

    Flaky.failures = failures
    fd_store = FakeFdStore()
    router = RouterActor.start(
        h.dispatcher, lock_dir=str(h.lock_dir), journal=h.journal,
        open_lockspace=Flaky, fd_store=fd_store,
    )  # fmt: skip
    state = ReplayState()
    held(state, "disk", owner(LIVE))
    path = h.lock_dir / FILES / "disk"
    path.touch()
    stored = os.open(path, os.O_RDWR)
    try_lock(stored, shared=False)  # the previous daemon's lock, on this open file description
    copy = os.dup(stored)  # the service manager's copy of it
    reports = start_recovery(h, state, adopted={(FILES, "disk"): stored}, router=router)
    return fd_store, path, stored, copy, reports


def test_an_adopted_fd_whose_lock_fails_once_is_tried_again_and_never_let_go(
    h: Harness,
) -> None:
    """Locking the fd the store gave back failed with an I/O error, not another holder:
    the same fd is tried again, so the lease is never free (a new open would also
    conflict with the store's copy of the old one, and be taken for another holder's
    lock: the lease lost, the VM fenced)."""
    fd_store, path, stored, copy, reports = _adopting(h, failures=1)
    try:
        assert reports == []  # waiting to try again
        assert kernel_locked(path)
        h.advance(0.1)
        assert (reports[0].held, reports[0].lost) == (1, 0)
        assert h.journal_writer.events(LeaseLost) == []
        assert (fd_store.removed, fd_store.stored) == ([], [])  # the store's fd is the one
        os.fstat(stored)  # still open: lockd holds the lease on it
    finally:
        os.close(copy)
    assert kernel_locked(path)


def test_an_adopted_fd_that_cannot_be_locked_for_the_whole_retry_is_lost_and_unstored(
    h: Harness,
) -> None:
    fd_store, _, stored, copy, reports = _adopting(h, failures=10**6)
    try:
        for _ in range(int(RESTORE_RETRY_SECONDS * 10) + 5):
            h.advance(0.1)
        assert reports[0].lost == 1
        assert [e.owner.pid for e in h.journal_writer.events(LeaseLost)] == [LIVE]
        assert fd_store.removed == [(FILES, "disk")]
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(stored)  # closed by lockd; the manager drops its copy when told
    finally:
        os.close(copy)
        Flaky.failures = 0


def test_a_lost_lease_journaled_before_a_crash_still_gets_its_owner_fenced(h: Harness) -> None:
    """The previous daemon journaled the lost lease and died before it fenced the owner
    (or before its recovery completed): the next one fences the owner all the same, with a
    full grace period, however long ago the lease was lost: the fence was owed, never
    begun (no SIGTERM), so its owner has had no warning yet."""
    victim = owner(VICTIM)
    state = ReplayState()
    history = [
        LeaseAcquired(FILES, "stolen", LeaseMode.EXCLUSIVE, victim, 1, True),
        LeaseLost(FILES, "stolen", LeaseMode.EXCLUSIVE, victim, "held by another host"),
    ]
    lost_at = h.wall_clock() - 100.0
    for seq, event in enumerate(history, 1):
        state.fold(JournalEntry(seq, lost_at, "test", event))
    h.processes.ignores_sigterm.add(VICTIM)
    report = recover(h, state, boot_time=lost_at - 60)
    assert (report.held, report.lost) == (0, 0)  # nothing left to hold: it was lost before
    assert h.processes.signals == [(VICTIM, "SIGTERM")]
    (fenced,) = h.journal_writer.events(OwnerFenced)
    assert fenced.reason == f"lease {FILES}/stolen was taken while lockd was down" + RESUMED
    (done,) = h.journal_writer.events(RecoveryCompleted)
    assert [fence.since for fence in done.fencing] == [None]  # still to begin
    h.advance(1.5)
    assert h.processes.signals == [(VICTIM, "SIGTERM")]
    h.advance(0.2)
    assert h.processes.signals == [(VICTIM, "SIGTERM"), (VICTIM, "SIGKILL")]


def test_a_fence_the_crash_interrupted_is_resumed(h: Harness) -> None:
    """The previous daemon sent SIGTERM and died before its SIGKILL: the owner, still
    running (it ignores SIGTERM) and holding its lease, is signalled again and killed after
    the grace period, and its lease then ends. A fenced owner already gone is left alone."""
    live, gone = owner(LIVE), owner(DEAD)
    state = ReplayState()
    held(state, "disk", live)
    state.fencing[live.key] = (live, "connection closed while holding leases", 3.0, None)
    state.fencing[gone.key] = (gone, "connection closed while holding leases", 3.0, None)
    h.processes.ignores_sigterm.add(LIVE)
    report = recover(h, state)
    assert report.held == 1
    assert h.processes.signals == [(LIVE, "SIGTERM")]
    (fenced,) = h.journal_writer.events(OwnerFenced)
    assert fenced.reason == "connection closed while holding leases" + RESUMED
    h.advance(2.0)
    assert h.processes.signals == [(LIVE, "SIGTERM"), (LIVE, "SIGKILL")]
    (released,) = h.journal_writer.events(LeaseReleased)
    assert (released.owner.pid, released.reason) == (LIVE, ReleaseReason.OWNER_EXIT)
    assert not kernel_locked(h.lock_dir / FILES / "disk")


@pytest.mark.parametrize(
    ("begun_ago", "kill_after"), [(1.0, 0.6), (5.0, 0.0), (-30.0, 1.6)],
    ids=["part-of-the-grace-left", "grace-used-up", "clock-stepped-back"],
)  # fmt: skip
def test_a_resumed_fence_keeps_its_deadline(
    h: Harness, begun_ago: float, kill_after: float
) -> None:
    """A fence begun before the crash ends a grace period (1.6 s here) after it began, not
    after the restart: a daemon crashing within every grace period still kills in the end.
    The time it began goes on in recovery-completed, for the next crash; a time in the
    future (the wall clock stepped back) goes on as now, so the next start does not give a
    full grace period again."""
    vm = owner(LIVE)
    state = ReplayState()
    held(state, "disk", vm)
    begun = h.wall_clock() - begun_ago
    state.fencing[vm.key] = (vm, "connection closed while holding leases", begun, None)
    h.processes.ignores_sigterm.add(LIVE)
    recover(h, state, boot_time=begun - 60)  # the harness's wall clock starts at 0
    (done,) = h.journal_writer.events(RecoveryCompleted)
    assert [fence.since for fence in done.fencing] == [min(begun, h.wall_clock())]
    if kill_after:
        assert h.processes.signals == [(LIVE, "SIGTERM")]
        h.advance(kill_after - 0.05)
        assert h.processes.signals == [(LIVE, "SIGTERM")]
        h.advance(0.1)
    # Used up: SIGKILL right after the SIGTERM (a process may handle that at once).
    assert h.processes.signals == [(LIVE, "SIGTERM"), (LIVE, "SIGKILL")]


def test_an_owner_being_fenced_that_also_lost_a_lease_keeps_the_fences_deadline(
    h: Harness,
) -> None:
    """Its fence was begun (SIGTERM) before the crash and one of its leases was taken while
    lockd was down: one fence, named after the lost lease, due when the first was.
    (The simulation found the deadline reset to a full grace period here.)"""
    victim = owner(VICTIM)
    state = ReplayState()
    held(state, "stolen", victim)
    (h.lock_dir / FILES / "stolen").touch()
    begun = h.wall_clock() - 1.0
    state.fencing[victim.key] = (victim, "connection closed while holding leases", begun, None)
    thief = os.open(h.lock_dir / FILES / "stolen", os.O_RDWR)
    try_lock(thief, shared=False)
    h.processes.ignores_sigterm.add(VICTIM)
    try:
        recover(h, state, boot_time=begun - 60)
        (done,) = h.journal_writer.events(RecoveryCompleted)
        assert done.fencing == (
            Fence(victim, f"lease {FILES}/stolen was taken while lockd was down", begun),
        )
        assert h.processes.signals == [(VICTIM, "SIGTERM")]
        h.advance(0.7)
        assert h.processes.signals == [(VICTIM, "SIGTERM"), (VICTIM, "SIGKILL")]
    finally:
        os.close(thief)


@pytest.mark.parametrize(
    ("journaled", "current", "kept"),
    [
        (EARLIER_BOOT, BOOT, False),
        (BOOT, BOOT, True),
        (None, BOOT, True),  # journaled before lockd recorded boots: pid and start time decide
        (EARLIER_BOOT, None, True),  # the kernel gives no boot id now: likewise
    ],
    ids=["earlier-boot", "this-boot", "boot-not-journaled", "boot-unknown-now"],
)
def test_an_owner_of_an_earlier_boot_is_gone_though_its_pid_and_start_time_recur(
    h: Harness, journaled: bytes | None, current: bytes | None, kept: bool
) -> None:
    """After a reboot, a VM autostarted in the same order can repeat the old owner's pid and
    start time: a boot id recorded with the owner that differs from this boot's ends its
    lease (owner-gone) and its interrupted fence (the process is never signalled); unknown
    on either side leaves pid and start time to decide, as before boots were recorded."""
    vm = owner(LIVE, journaled)
    state = ReplayState()
    held(state, "disk", vm)
    state.fencing[vm.key] = (vm, "connection closed while holding leases", 3.0, None)
    h.processes.ignores_sigterm.add(LIVE)
    report = recover(h, state, boot=current)
    assert (report.held, report.released) == ((1, 0) if kept else (0, 1))
    assert kernel_locked(h.lock_dir / FILES / "disk") is kept
    assert h.processes.signals == ([(LIVE, "SIGTERM")] if kept else [])
    if not kept:
        (released,) = h.journal_writer.events(LeaseReleased)
        assert (released.owner, released.reason) == (vm, ReleaseReason.OWNER_GONE)
        h.advance(5.0)
        assert h.processes.signals == []


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (
            {"boot_time": 10.0},
            "begun before this boot: its pid and start time name another one",
        ),
        ({"fence_lost": False}, "lost_lease_policy = log: the operator's way to stop a fence"),
    ],
)
def test_an_interrupted_fence_is_not_resumed(h: Harness, options: dict[str, Any], why: str) -> None:
    live = owner(LIVE)
    state = ReplayState()
    held(state, "disk", live)
    state.fencing[live.key] = (live, "connection closed while holding leases", 3.0, None)
    report = recover(h, state, **options)
    assert report.held == 1, why
    h.advance(5.0)
    assert h.processes.signals == [], why
    assert kernel_locked(h.lock_dir / FILES / "disk")
