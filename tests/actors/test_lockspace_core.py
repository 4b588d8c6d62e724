"""The lockspace's pure core: conflict rules, without threads or files."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from actors.events import LeaseAcquired, LeaseReleased, ReleaseReason
from actors.lockspace_core import (
    ONCE_PER_OWNER,
    Acquire,
    LockspaceState,
    Refusal,
    Release,
    ReleaseOwner,
    Repeated,
    apply,
    decide,
)
from actors.model import LeaseMode, Owner, OwnerKey
from protocol.errors import ErrorCode

EX, SH = LeaseMode.EXCLUSIVE, LeaseMode.SHARED


def owner(n: int) -> Owner:
    return Owner(uuid=bytes([n]) * 16, name=f"vm{n}", id=n, pid=1000 + n, start_time=n)


def run(
    state: LockspaceState, command: Acquire | Release | ReleaseOwner
) -> Refusal | Repeated | None:
    """Decide and apply, as the actor does once the journal has the events."""
    result = decide(state, command)
    if isinstance(result, Refusal | Repeated):
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


def once(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_a_repeated_release_leaves_the_other_devices_hold() -> None:
    """Under "each", one image on two devices is held twice; the release of one device,
    repeated with its key (its reply lost), ends one hold, not both."""
    state = LockspaceState("ls", count_holds=True)
    vm = owner(1)
    assert run(state, Acquire(vm, (("img", SH),), True, 1, once(1))) is None
    assert run(state, Acquire(vm, (("img", SH),), True, 1, once(2))) is None
    assert state.held["img"].holds(vm.key) == 2
    assert run(state, Release(vm, ("img",), 1, once=once(3))) is None
    again = run(state, Release(vm, ("img",), 1, once=once(3)))
    assert again == Repeated(("img",))
    assert state.held["img"].holds(vm.key) == 1
    assert run(state, Release(vm, ("img",), 1, once=once(4))) is None
    assert "img" not in state.held


def test_a_repeated_acquire_takes_no_third_hold() -> None:
    """An acquire repeated with its key answers as granted and counts no hold."""
    state = LockspaceState("ls", count_holds=True)
    vm = owner(1)
    run(state, Acquire(vm, (("img", SH),), True, 1, once(1)))
    run(state, Acquire(vm, (("img", SH), ("b", EX)), True, 1, once(2)))
    again = run(state, Acquire(vm, (("img", SH), ("b", EX)), True, 1, once(2)))
    assert again == Repeated(("img", "b"))
    assert state.held["img"].holds(vm.key) == 2


def test_a_repeated_release_may_leave_out_what_it_released() -> None:
    """A release repeated with its key may list fewer leases (those it sees released
    already): still a repeat, answered with what the first released; more is refused."""
    state = LockspaceState("ls")
    vm = owner(1)
    run(state, Acquire(vm, (("a", EX), ("b", EX)), True, 1))
    run(state, Release(vm, ("a", "b"), 1, once=once(1)))
    assert run(state, Release(vm, ("b",), 1, once=once(1))) == Repeated(("a", "b"))
    run(state, Acquire(vm, (("c", EX),), True, 1))
    refusal = run(state, Release(vm, ("a", "c"), 1, once=once(1)))
    assert isinstance(refusal, Refusal)
    assert refusal.code is ErrorCode.INVALID_ARGUMENT
    assert "c" in state.held


def test_without_a_key_a_repeat_counts_again() -> None:
    """No key, no record: the events carry none and a repeat is a new request."""
    state = LockspaceState("ls", count_holds=True)
    vm = owner(1)
    events = decide(state, Acquire(vm, (("img", SH),), True, 1))
    assert isinstance(events, list)
    assert all(isinstance(e, LeaseAcquired) and e.once is None for e in events)
    run(state, Acquire(vm, (("img", SH),), True, 1))
    run(state, Acquire(vm, (("img", SH),), True, 1))
    assert state.held["img"].holds(vm.key) == 2
    assert not state.once.records


def test_a_key_reused_for_another_request_is_refused() -> None:
    """A key names one request: given to another lease, or to a release after an
    acquire, it is refused and nothing changes."""
    state = LockspaceState("ls")
    vm = owner(1)
    run(state, Acquire(vm, (("a", EX),), True, 1, once(1)))
    for command in (
        Acquire(vm, (("b", EX),), True, 1, once(1)),
        Acquire(vm, (("a", SH),), True, 1, once(1)),
        Release(vm, ("a",), 1, once=once(1)),
    ):
        refusal = run(state, command)
        assert isinstance(refusal, Refusal)
        assert refusal.code is ErrorCode.INVALID_ARGUMENT
        assert str(uuid.UUID(bytes=once(1))) in refusal.message
    assert sorted(state.held) == ["a"]


def test_keys_are_per_owner() -> None:
    """Another owner's request with the same key is its own."""
    state = LockspaceState("ls")
    run(state, Acquire(owner(1), (("s", SH),), True, 1, once(1)))
    assert run(state, Acquire(owner(2), (("s", SH),), True, 1, once(1))) is None
    assert set(state.held["s"].owners) == {owner(1).key, owner(2).key}


def test_a_rollback_forgets_the_acquires_key() -> None:
    """An acquire rolled back took nothing in the end: its repeat runs anew."""
    state = LockspaceState("ls")
    vm = owner(1)
    run(state, Acquire(vm, (("a", EX),), True, 1, once(1)))
    rollback = decide(state, Release(vm, ("a",), 1, ReleaseReason.ROLLBACK, once(1)))
    assert isinstance(rollback, list)
    assert [e.once for e in rollback if isinstance(e, LeaseReleased)] == [once(1)]
    for event in rollback:
        apply(state, event)
    assert run(state, Acquire(vm, (("a", EX),), True, 1, once(1))) is None
    assert sorted(state.held) == ["a"]


def test_keys_end_with_the_owner_and_are_bounded() -> None:
    """An owner keeps its newest keys only, and none once its leases end for good."""
    state = LockspaceState("ls")
    vm = owner(1)
    for n in range(ONCE_PER_OWNER + 1):
        run(state, Acquire(vm, ((f"r{n}", EX),), True, 1, once(n)))
    assert state.once.get(vm.key, once(0)) is None
    assert state.once.get(vm.key, once(ONCE_PER_OWNER)) is not None
    assert len(state.once.records) == ONCE_PER_OWNER
    assert state.once.leases == ONCE_PER_OWNER
    run(state, ReleaseOwner(vm.key, 0, ReleaseReason.OWNER_EXIT))
    assert not state.once.records
    assert not state.once.keys_of
    assert state.once.leases == 0


ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release", "exit", "repeat"]),
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
    applied: dict[int, Acquire | Release] = {}
    """Per owner, its last keyed request that changed something (the one repeated)."""
    for i, (op, n, items) in enumerate(script):
        if op == "repeat":
            if n not in applied:
                continue
            # Its reply was lost: sent again with the same key, it changes nothing.
            before = (dict(holds), repr(state))
            assert isinstance(decide(state, applied[n]), Repeated)
            assert (dict(holds), repr(state)) == before
            continue
        if op == "acquire":
            command: Acquire | Release | ReleaseOwner = Acquire(
                owner(n), tuple(items), True, 1, once(i)
            )
        elif op == "release":
            command = Release(owner(n), tuple(r for r, _ in items), 1, once=once(i))
        else:
            command = ReleaseOwner(owner(n).key, 0, ReleaseReason.OWNER_EXIT)
        result = decide(state, command)
        if isinstance(result, Refusal):
            continue
        assert isinstance(result, list)
        if isinstance(command, ReleaseOwner):
            applied.pop(n, None)
        elif result:
            applied[n] = command
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
