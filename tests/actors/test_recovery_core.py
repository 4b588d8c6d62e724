"""The journal fold behind recovery: typed and wire forms agree, snapshots round-trip."""

from __future__ import annotations

import uuid

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.events import (
    DaemonStarted,
    Event,
    Fence,
    JournalEntry,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    LockspaceCreated,
    OwnerFenced,
    RecoveryCompleted,
    ReleaseReason,
)
from actors.model import LeaseMode, Owner
from actors.recovery_core import ReplayState

OWNERS = [
    # Owners journaled before boots were recorded (boot None) and after.
    Owner(uuid.UUID(int=i).bytes, f"vm{i}", i + 1, 100 + i, 7, None if i % 2 else bytes([i]) * 16)
    for i in range(4)
]
RESOURCES = ["a", "b", "c"]
ONCE_KEYS = [None, None, b"\x01" * 16, b"\x02" * 16]

events = st.one_of(
    st.builds(
        LeaseAcquired,
        st.just("ls"),
        st.sampled_from(RESOURCES),
        st.sampled_from(list(LeaseMode)),
        st.sampled_from(OWNERS),
        st.integers(0, 3),
        st.booleans(),
        st.sampled_from([None, None, 2, 3]),
        st.sampled_from(ONCE_KEYS),
    ),
    st.builds(
        LeaseReleased,
        st.just("ls"),
        st.sampled_from(RESOURCES),
        st.sampled_from(list(LeaseMode)),
        st.sampled_from(OWNERS),
        st.integers(0, 3),
        st.sampled_from(list(ReleaseReason)),
        st.sampled_from([None, None, 1, 2]),
        st.sampled_from(ONCE_KEYS),
    ),
    st.builds(
        LeaseLost,
        st.just("ls"),
        st.sampled_from(RESOURCES),
        st.sampled_from(list(LeaseMode)),
        st.sampled_from(OWNERS),
        st.just("taken"),
    ),
    st.builds(LockspaceCreated, st.sampled_from(["ls", "other"]), st.just("/x"), st.just(0)),
    st.builds(DaemonStarted, st.just("1"), st.just(1)),
    st.builds(
        OwnerFenced,
        st.sampled_from(OWNERS),
        st.sampled_from(["SIGTERM", "SIGKILL"]),
        st.sampled_from(["connection closed", "lease a was taken"]),
        st.sampled_from([None, 1000]),
    ),
    st.builds(
        RecoveryCompleted,
        st.integers(0, 3),
        st.integers(0, 3),
        st.integers(0, 3),
        st.just(1.5),
        st.lists(
            st.builds(
                Fence,
                st.sampled_from(OWNERS),
                st.sampled_from(["lease a was taken"]),
                st.sampled_from([None, 0.25]),
                st.sampled_from([None, 1000]),
            ),
            max_size=2,
        ).map(tuple),
    ),
)


def entries(evs: list[Event]) -> list[JournalEntry]:
    return [JournalEntry(i + 1, float(i), "h", e) for i, e in enumerate(evs)]


def summary(state: ReplayState) -> object:
    return (
        state.seq,
        state.lockspaces,
        {
            key: (
                held.mode,
                held.autocreate,
                sorted((k.pid, t) for k, (_, t) in held.owners.items()),
                sorted((k.pid, n) for k, n in (held.holds or {}).items()),
            )
            for key, held in state.leases.items()
        },
        {key.pid: (reason, since, uid) for key, (_, reason, since, uid) in state.fencing.items()},
        sorted(key.pid for key in state.owed),
        {lockspace: keys.export() for lockspace, keys in state.once.items()},
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=40))
def test_wire_fold_equals_typed_fold(evs: list[Event]) -> None:
    """Recovery's fast path over maps gives exactly the typed fold's state."""
    typed, wire = ReplayState(), ReplayState()
    for entry in entries(evs):
        typed.fold(entry)
        wire.fold_wire(entry.to_wire())
    assert summary(typed) == summary(wire)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=40), st.lists(events, max_size=20))
def test_snapshot_then_tail_equals_the_whole_history(head: list[Event], tail: list[Event]) -> None:
    """A snapshot at any point plus the entries after it rebuilds the same state."""
    all_entries = entries(head + tail)
    whole = ReplayState()
    for entry in all_entries:
        whole.fold(entry)
    snap = ReplayState()
    for entry in all_entries[: len(head)]:
        snap.fold(entry)
    resumed = ReplayState.from_wire(snap.to_wire())
    for entry in all_entries[len(head) :]:
        resumed.fold(entry)
    assert summary(resumed) == summary(whole)


def test_a_fence_is_pending_from_sigterm_or_lost_lease_until_exit_or_restart() -> None:
    """What recovery resumes: owners sent SIGTERM, or owed a fence by a lost lease, whose
    fence has not ended with their exit; a completed recovery replaces them with its own
    list. A SIGKILL does not end it: it is journaled before it is sent, and a crash in
    between must leave the next daemon something to send."""
    vm, other = OWNERS[0], OWNERS[1]

    def fold(*evs: Event) -> ReplayState:
        state = ReplayState()
        for entry in entries(list(evs)):
            state.fold(entry)
        return state

    term = OwnerFenced(vm, "SIGTERM", "connection closed")
    assert list(fold(term).fencing) == [vm.key]
    assert fold(term).fencing[vm.key] == (vm, "connection closed", 0.0, None)
    kill = OwnerFenced(vm, "SIGKILL", "still running")
    assert fold(term, kill).fencing == fold(term).fencing  # begun at the SIGTERM, as it was
    assert not fold(term, kill).owed
    exited = LeaseReleased("ls", "a", LeaseMode.EXCLUSIVE, vm, 0, ReleaseReason.DISCONNECT)
    assert not fold(term, exited).fencing
    assert not fold(term, kill, exited).fencing
    by_client = LeaseReleased("ls", "a", LeaseMode.EXCLUSIVE, vm, 0, ReleaseReason.CLIENT)
    assert list(fold(term, by_client).fencing) == [vm.key]  # it may hold others, still runs
    someone_else = LeaseReleased("ls", "a", LeaseMode.EXCLUSIVE, other, 0, ReleaseReason.ADMIN)
    assert list(fold(term, someone_else).fencing) == [vm.key]
    assert not fold(term, RecoveryCompleted(1, 0, 0, 1.0)).fencing
    handed = RecoveryCompleted(1, 0, 1, 1.0, (Fence(other, "lease ls/b was taken"),))
    assert fold(term, handed).fencing == {other.key: (other, "lease ls/b was taken", 1.0, None)}
    lost = LeaseLost("ls", "b", LeaseMode.EXCLUSIVE, vm, "taken by another host")
    assert fold(lost).fencing == {
        vm.key: (vm, "lease ls/b was taken while lockd was down", 0.0, None)
    }  # a crash before recovery completes leaves the fence it owes to the next start
    assert fold(term, lost).fencing[vm.key][1] == "connection closed"  # the first reason stays
    assert fold(lost, kill).fencing[vm.key] == (vm, fold(lost).fencing[vm.key][1], 1.0, None)
    assert not fold(lost, kill).owed
    # A resumed fence journals SIGTERM again, and recovery-completed lists it with the
    # time it began: its deadline does not move with either.
    again = OwnerFenced(vm, "SIGTERM", "connection closed" + "; resumed")
    assert fold(term, again).fencing[vm.key] == (vm, "connection closed; resumed", 0.0, None)
    resumed = RecoveryCompleted(1, 0, 0, 1.0, (Fence(vm, "connection closed", since=0.0),))
    assert fold(term, resumed, again).fencing[vm.key][2] == 0.0
    assert fold(lost, resumed).fencing[vm.key][2] == 0.0
    # Owed (by a lost lease) is not begun: the first SIGTERM starts the grace period.
    assert fold(lost).owed == {vm.key}
    assert fold(lost, term).fencing[vm.key][2] == 1.0
    assert not fold(lost, term).owed
    owed_on = RecoveryCompleted(1, 0, 1, 1.0, (Fence(vm, "lease ls/b was taken"),))
    assert fold(term, owed_on).owed == {vm.key}
    assert fold(term, owed_on, again).fencing[vm.key][2] == 2.0
    assert ReplayState.from_wire(fold(lost).to_wire()).owed == {vm.key}
    assert not ReplayState.from_wire(fold(term).to_wire()).owed
    restored = ReplayState.from_wire(fold(term).to_wire())
    assert restored.fencing == fold(term).fencing
    old_snapshot = fold(term).to_wire()
    del old_snapshot["fencing"]  # written before fences were kept
    assert ReplayState.from_wire(old_snapshot).fencing == {}


def test_the_uid_a_fence_signals_for_outlives_a_crash_and_a_snapshot() -> None:
    """A user's fence (``on_behalf_of``) keeps its uid through everything a next daemon
    reads it from: the SIGTERM record, the ``recovery-completed`` that hands it on, and a
    snapshot (with the fence begun, or owed); a fence of root's has none, and a snapshot
    of an older lockd (no uid) reads as root's fence, as it was."""
    vm = OWNERS[0]

    def fold(*evs: Event) -> ReplayState:
        state = ReplayState()
        for entry in entries(list(evs)):
            state.fold(entry)
        return state

    term = OwnerFenced(vm, "SIGTERM", "connection closed", on_behalf_of=1000)
    assert fold(term).fencing[vm.key][3] == 1000
    assert fold(term, OwnerFenced(vm, "SIGKILL", "still running", 1000)).fencing[vm.key][3] == 1000
    handed = RecoveryCompleted(1, 0, 0, 1.0, (Fence(vm, "closed", 0.0, on_behalf_of=1000),))
    assert fold(term, handed).fencing[vm.key][3] == 1000
    for state in (fold(term), fold(term, handed)):
        wire = cbor2.loads(cbor2.dumps(state.to_wire()))
        assert ReplayState.from_wire(wire).fencing == state.fencing
    owed = RecoveryCompleted(1, 0, 0, 1.0, (Fence(vm, "closed", None, on_behalf_of=1000),))
    restored = ReplayState.from_wire(fold(owed).to_wire())
    assert (restored.fencing[vm.key][3], restored.owed) == (1000, {vm.key})
    assert fold(OwnerFenced(vm, "SIGTERM", "admin disconnect")).fencing[vm.key][3] is None
    older = fold(term).to_wire()
    older["fencing"] = [item[:3] for item in older["fencing"]]  # as an older lockd wrote it
    assert ReplayState.from_wire(older).fencing[vm.key][3] is None
    bad = fold(term).to_wire()
    bad["fencing"][0][4] = "root"
    with pytest.raises(ValueError, match="bad uid"):
        ReplayState.from_wire(bad)


def test_a_gap_is_refused() -> None:
    state = ReplayState()
    state.fold(JournalEntry(1, 0.0, "h", DaemonStarted("1", 1)))
    import pytest

    with pytest.raises(ValueError, match="does not follow"):
        state.fold(JournalEntry(3, 0.0, "h", DaemonStarted("1", 1)))


def test_keyed_requests_outlive_a_crash_and_a_snapshot() -> None:
    """The keys of recent keyed requests are replayed and kept in a snapshot; a
    rollback forgets its acquire's key and an owner's end all of its keys."""
    vm, other = OWNERS[0], OWNERS[1]
    first, second, third = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
    state = ReplayState()
    for entry in entries([
        LeaseAcquired("ls", "img", LeaseMode.SHARED, vm, 1, True, None, first),
        LeaseAcquired("ls", "img", LeaseMode.SHARED, vm, 1, True, 2, second),
        LeaseReleased("ls", "img", LeaseMode.SHARED, vm, 1, ReleaseReason.CLIENT, 1, third),
        LeaseAcquired("ls", "x", LeaseMode.EXCLUSIVE, other, 2, True, None, first),
        LeaseReleased("ls", "x", LeaseMode.EXCLUSIVE, other, 2, ReleaseReason.ROLLBACK, None,
                      first),
    ]):  # fmt: skip
        state.fold(entry)
    resumed = ReplayState.from_wire(cbor2.loads(cbor2.dumps(state.to_wire())))
    for replayed in (state, resumed):
        keys = replayed.once["ls"]
        assert [(o.pid, k, a.release, a.resources()) for o, k, a in keys.export()] == [
            (vm.pid, first, False, ("img",)),
            (vm.pid, second, False, ("img",)),
            (vm.pid, third, True, ("img",)),
        ]
    resumed.fold(
        JournalEntry(6, 6.0, "h", LeaseReleased("ls", "img", LeaseMode.SHARED, vm, 0,
                                                ReleaseReason.OWNER_GONE))
    )  # fmt: skip
    assert resumed.once == {}
    assert "once" not in resumed.to_wire()
