"""The lockspace's pure core: conflict rules, without threads or files."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from actors.events import LeaseAcquired, LeaseReleased, ReleaseReason
from actors.lockspace_core import (
    Acquire,
    LockspaceState,
    Refusal,
    Release,
    ReleaseOwner,
    apply,
    decide,
)
from actors.model import LeaseMode, Owner, OwnerKey
from protocol.errors import ErrorCode

EX, SH = LeaseMode.EXCLUSIVE, LeaseMode.SHARED


def owner(n: int) -> Owner:
    return Owner(uuid=bytes([n]) * 16, name=f"vm{n}", id=n, pid=1000 + n, start_time=n)


def run(state: LockspaceState, command: Acquire | Release | ReleaseOwner) -> Refusal | None:
    """Decide and apply, as the actor does once the journal has the events."""
    result = decide(state, command)
    if isinstance(result, Refusal):
        return result
    for event in result:
        apply(state, event)
    return None


def acquire(o: Owner, *items: tuple[str, LeaseMode]) -> Acquire:
    return Acquire(o, items, autocreate=True, conn=1)


def test_exclusive_lease_refuses_a_second_owner_and_names_the_holder() -> None:
    """A busy refusal says who holds the lease."""
    state = LockspaceState("ls")
    assert run(state, acquire(owner(1), ("disk", EX))) is None
    refusal = run(state, acquire(owner(2), ("disk", SH)))
    assert isinstance(refusal, Refusal)
    assert refusal.code is ErrorCode.BUSY
    assert refusal.holders == (owner(1),)
    assert "vm1" in refusal.message
    assert "pid 1001" in refusal.message


def test_same_owner_cannot_take_an_exclusive_lease_twice() -> None:
    """Re-acquiring an exclusive lease is busy, as in virtlockd."""
    state = LockspaceState("ls")
    run(state, acquire(owner(1), ("disk", EX)))
    assert isinstance(run(state, acquire(owner(1), ("disk", EX))), Refusal)


def test_by_default_a_shared_lease_asked_for_again_is_counted_once() -> None:
    """The default (``shared_holds = "once"``): a holder's shared re-acquire adds
    nothing, and one release ends its hold."""
    state = LockspaceState("ls")
    run(state, acquire(owner(1), ("disk", SH)))
    assert decide(state, acquire(owner(1), ("disk", SH))) == []
    run(state, acquire(owner(2), ("disk", SH)))
    assert len(state.held["disk"].owners) == 2
    run(state, Release(owner(1), ("disk",), conn=1))
    assert list(state.held["disk"].owners) == [owner(2).key]
    run(state, Release(owner(2), ("disk",), conn=1))
    assert state.held == {}


def test_a_shared_lease_asked_for_again_is_held_until_as_many_releases() -> None:
    """Under ``shared_holds = "each"``, as in virtlockd, which lists the owner again: a
    VM given one shareable image twice keeps it after the first detach, until the last.
    Each hold is an event saying how many the owner has now, so the journal's fold and
    an auditor count the same."""
    state = LockspaceState("ls", count_holds=True)
    run(state, acquire(owner(1), ("disk", SH)))
    events = decide(state, acquire(owner(1), ("disk", SH)))
    assert isinstance(events, list)
    assert [e.holds for e in events] == [2]  # type: ignore[attr-defined]
    for event in events:
        apply(state, event)
    run(state, acquire(owner(2), ("disk", SH)))
    assert len(state.held["disk"].owners) == 2
    assert state.held["disk"].holds(owner(1).key) == 2
    assert isinstance(run(state, acquire(owner(3), ("disk", EX))), Refusal)

    released = decide(state, Release(owner(1), ("disk",), conn=1))
    assert isinstance(released, list)
    assert [e.holds for e in released] == [1]  # type: ignore[attr-defined]
    for event in released:
        apply(state, event)
    run(state, Release(owner(2), ("disk",), conn=1))
    assert state.leases_of(owner(1).key) == ["disk"], "one hold is left"
    run(state, Release(owner(1), ("disk",), conn=1))
    assert state.held == {}
    assert state.by_owner == {}


def test_an_owner_ending_ends_every_hold_at_once() -> None:
    """An exit (or disconnect, or admin release) is one event per lease, however many
    times the owner held it; the lease's other holders keep it."""
    state = LockspaceState("ls", count_holds=True)
    for _ in range(3):
        run(state, acquire(owner(1), ("disk", SH)))
    run(state, acquire(owner(2), ("disk", SH)))
    events = decide(state, ReleaseOwner(owner(1).key, 1, ReleaseReason.OWNER_EXIT))
    assert isinstance(events, list)
    assert [e.holds for e in events] == [None]  # type: ignore[attr-defined]
    for event in events:
        apply(state, event)
    assert list(state.held["disk"].owners) == [owner(2).key]
    assert state.held["disk"].extra is None
    run(state, acquire(owner(1), ("disk", SH)))
    assert state.held["disk"].holds(owner(1).key) == 1, "a new hold starts at one"


def test_a_rollback_gives_back_only_the_hold_its_acquire_added() -> None:
    """A refused multi-lease acquire that had joined a lease its owner held already
    rolls back that one hold: the owner keeps the hold it had before."""
    state = LockspaceState("ls", count_holds=True)
    run(state, acquire(owner(1), ("disk", SH)))
    taken = decide(state, acquire(owner(1), ("disk", SH), ("other", SH)))
    assert isinstance(taken, list)
    for event in taken:
        apply(state, event)
    run(state, Release(owner(1), ("disk", "other"), conn=1, reason=ReleaseReason.ROLLBACK))
    assert state.leases_of(owner(1).key) == ["disk"]
    assert state.held["disk"].holds(owner(1).key) == 1


def test_multi_lease_acquire_is_all_or_nothing() -> None:
    """One busy lease refuses the whole request and changes nothing."""
    state = LockspaceState("ls")
    run(state, acquire(owner(1), ("b", EX)))
    refusal = run(state, acquire(owner(2), ("a", EX), ("b", EX), ("c", EX)))
    assert isinstance(refusal, Refusal)
    assert sorted(state.held) == ["b"]


def test_release_of_a_lease_not_held_is_refused() -> None:
    """Releasing another owner's lease is not-held and changes nothing."""
    state = LockspaceState("ls")
    run(state, acquire(owner(1), ("disk", EX)))
    refusal = run(state, Release(owner(2), ("disk",), conn=2))
    assert isinstance(refusal, Refusal)
    assert refusal.code is ErrorCode.NOT_HELD
    assert owner(1).key in state.held["disk"].owners


def test_release_owner_ends_every_lease_with_the_reason() -> None:
    """Owner exit releases all its leases and only its leases."""
    state = LockspaceState("ls")
    run(state, acquire(owner(1), ("a", EX), ("s", SH)))
    run(state, acquire(owner(2), ("s", SH), ("b", EX)))
    events = decide(state, ReleaseOwner(owner(1).key, 0, ReleaseReason.OWNER_EXIT))
    assert isinstance(events, list)
    assert {(e.resource, e.reason) for e in events if isinstance(e, LeaseReleased)} == {
        ("a", ReleaseReason.OWNER_EXIT),
        ("s", ReleaseReason.OWNER_EXIT),
    }
    for event in events:
        apply(state, event)
    assert sorted(state.held) == ["b", "s"]
    assert list(state.held["s"].owners) == [owner(2).key]


def test_duplicate_items_are_refused() -> None:
    """A request naming one lease twice is invalid."""
    refusal = decide(LockspaceState("ls"), acquire(owner(1), ("a", EX), ("a", SH)))
    assert isinstance(refusal, Refusal)
    assert refusal.code is ErrorCode.INVALID_ARGUMENT


ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release", "exit"]),
        st.integers(1, 4),
        st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([EX, SH])), max_size=3),
    ),
    max_size=40,
)


@given(ops, st.booleans())
def test_never_two_exclusive_holders_and_replay_rebuilds_the_state(
    script: list[tuple[str, int, list[tuple[str, LeaseMode]]]], count_holds: bool
) -> None:
    """Under any command sequence the invariants hold, each owner holds a lease as many
    times as it was granted less its releases, and folding the events rebuilds the table."""
    state = LockspaceState("ls", count_holds=count_holds)
    journal: list[LeaseAcquired | LeaseReleased] = []
    holds: dict[tuple[OwnerKey, str], int] = {}
    for op, n, items in script:
        if op == "acquire":
            command: Acquire | Release | ReleaseOwner = acquire(owner(n), *items)
        elif op == "release":
            command = Release(owner(n), tuple(r for r, _ in items), conn=1)
        else:
            command = ReleaseOwner(owner(n).key, 0, ReleaseReason.OWNER_EXIT)
        result = decide(state, command)
        if isinstance(result, Refusal):
            continue
        key = owner(n).key
        if op == "acquire":
            for resource in dict.fromkeys(r for r, _ in items):
                had = holds.get((key, resource), 0)
                holds[key, resource] = had + 1 if count_holds or not had else had
        elif op == "release":
            for resource in dict.fromkeys(r for r, _ in items):
                holds[key, resource] -= 1
        else:
            holds = {k: v for k, v in holds.items() if k[0] != key}
        for event in result:
            assert isinstance(event, LeaseAcquired | LeaseReleased)
            journal.append(event)
            apply(state, event)
        for holding in state.held.values():
            assert holding.owners
            if holding.mode is EX:
                assert len(holding.owners) == 1
        derived: dict[OwnerKey, set[str]] = {}
        for resource, holding in state.held.items():
            for key in holding.owners:
                derived.setdefault(key, set()).add(resource)
        assert state.by_owner == derived  # the owner index never drifts from the table
        counted = {
            (k, resource): holding.holds(k)
            for resource, holding in state.held.items()
            for k in holding.owners
        }
        assert counted == {k: v for k, v in holds.items() if v}
    replayed = LockspaceState("ls", count_holds=count_holds)
    for event in journal:
        apply(replayed, event)
    assert replayed == state
