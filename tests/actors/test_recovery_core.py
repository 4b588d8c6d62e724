"""The journal fold behind recovery: typed and wire forms agree, snapshots round-trip."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.events import (
    DaemonStarted,
    Event,
    JournalEntry,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    LockspaceCreated,
    ReleaseReason,
)
from actors.model import LeaseMode, Owner
from actors.recovery_core import ReplayState

OWNERS = [Owner(uuid.UUID(int=i).bytes, f"vm{i}", i + 1, 100 + i, 7) for i in range(4)]
RESOURCES = ["a", "b", "c"]

events = st.one_of(
    st.builds(
        LeaseAcquired,
        st.just("ls"),
        st.sampled_from(RESOURCES),
        st.sampled_from(list(LeaseMode)),
        st.sampled_from(OWNERS),
        st.integers(0, 3),
        st.booleans(),
    ),
    st.builds(
        LeaseReleased,
        st.just("ls"),
        st.sampled_from(RESOURCES),
        st.sampled_from(list(LeaseMode)),
        st.sampled_from(OWNERS),
        st.integers(0, 3),
        st.sampled_from(list(ReleaseReason)),
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
            )
            for key, held in state.leases.items()
        },
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


def test_a_gap_is_refused() -> None:
    state = ReplayState()
    state.fold(JournalEntry(1, 0.0, "h", DaemonStarted("1", 1)))
    import pytest

    with pytest.raises(ValueError, match="does not follow"):
        state.fold(JournalEntry(3, 0.0, "h", DaemonStarted("1", 1)))
