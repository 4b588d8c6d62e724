"""The lockspace's command scheduling, driven by hand: journal replies come when the test says."""

from __future__ import annotations

import itertools
import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from actors.events import JournalEntry, LeaseAcquired, LeaseReleased, ReleaseReason
from actors.journal import Append, Appended, AppendFailed
from actors.lockspace import (
    AcquireLeases,
    Command,
    CreateResource,
    DeleteResource,
    Done,
    LockspaceActor,
    ReleaseLeases,
    ReleaseOwner,
)
from actors.model import LeaseMode, Owner, OwnerKey
from actors.runtime import DispatchedActor, Dispatcher
from lockd.lockfiles import LockspaceDir
from tests.actors.test_daemon_actors import kernel_locked


class HeldJournal(DispatchedActor):
    """Keeps every append until the test answers it."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher)
        self.pending: list[Append] = []
        self._seqs = itertools.count(1)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Append):
            self.pending.append(message)
            return None
        return super().on_receive(message)

    def answer(self, index: int, *, ok: bool) -> None:
        append = self.pending.pop(index)
        assert append.reply_to is not None
        if ok:
            entries = tuple(JournalEntry(next(self._seqs), 1.0, "h", e) for e in append.events)
            append.reply_to.tell(Appended(append.token, entries))
        else:
            append.reply_to.tell(AppendFailed(append.token, "disk full"))


class Replies(DispatchedActor):
    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher)
        self.done: dict[int, Done] = {}
        self.answered: list[int] = []

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Done):
            self.done[message.token] = message
            self.answered.append(message.token)
            return None
        return super().on_receive(message)


def owner(n: int) -> Owner:
    return Owner(uuid.UUID(int=n).bytes, f"vm{n}", 1, 1000 + n, 9)


def lockspace_on(
    dispatcher: Dispatcher, tmp_path: Path
) -> tuple[Any, HeldJournal, Replies, LockspaceActor]:
    """A lockspace on ``tmp_path`` whose journal answers when told: its ref, the journal,
    where its answers go (a ref is ``answers.actor_ref``) and the actor itself."""
    journal = HeldJournal.start(dispatcher)
    Replies.start(dispatcher)
    ref = LockspaceActor.start(dispatcher, "ls", LockspaceDir(str(tmp_path)), journal)
    dispatcher.run_until_idle()
    (held,) = [a for a in dispatcher.actors if isinstance(a, HeldJournal)]
    (answers,) = [a for a in dispatcher.actors if isinstance(a, Replies)]
    (actor,) = [a for a in dispatcher.actors if isinstance(a, LockspaceActor)]
    return ref, held, answers, actor


def test_a_command_answered_at_once_holds_up_nothing_behind_it(
    dispatcher: Dispatcher, tmp_path: Path
) -> None:
    """A release of an owner that holds nothing ends as it starts. The commands queued
    behind it must start in the same pass: with nothing left in flight, no later pass
    would come, and they would wait for some unrelated request."""
    lockspace, held, answers, _ = lockspace_on(dispatcher, tmp_path)
    replies = answers.actor_ref
    vm = owner(1)
    exclusive = (("c", LeaseMode.EXCLUSIVE),)
    lockspace.tell(AcquireLeases(vm, exclusive, True, 1, 1, replies))
    dispatcher.run_until_idle()
    assert len(held.pending) == 1  # in flight: its journal record awaits an answer
    # Behind it, for the same owner (so both wait): end everything it holds, then acquire.
    lockspace.tell(ReleaseOwner(vm.key, 1, ReleaseReason.OWNER_EXIT, 2, replies))
    lockspace.tell(AcquireLeases(vm, (("b", LeaseMode.EXCLUSIVE),), True, 1, 3, replies))
    dispatcher.run_until_idle()
    held.answer(0, ok=False)  # the first acquire fails: the owner holds nothing
    dispatcher.run_until_idle()
    assert answers.done[1].refusal is not None
    assert answers.done[2].refusal is None  # nothing to release: answered at once
    assert len(held.pending) == 1, "the acquire queued behind never started"
    held.answer(0, ok=True)
    dispatcher.run_until_idle()
    assert answers.done[3].refusal is None


def test_a_release_and_the_releases_queued_ahead_of_it_leave_a_queued_join_its_lease(
    dispatcher: Dispatcher, tmp_path: Path
) -> None:
    """vm1 and vm2 hold a base image shared. vm2's release of it waits behind vm2's
    own acquire, vm3's shared acquire of it behind vm3's own. In arrival order vm3
    joins before vm1's release, so the lease never ends. vm1's release may go ahead
    of vm3's join only if the lease outlives it *and* vm2's release queued ahead of
    it: if it went, vm2's release could start next, the two would end the lease, and
    vm3 would find it free (another host could have taken it meanwhile)."""
    lockspace, held, answers, actor = lockspace_on(dispatcher, tmp_path)
    replies = answers.actor_ref
    vm1, vm2, vm3 = owner(1), owner(2), owner(3)
    base = (("base", LeaseMode.SHARED),)
    lockspace.tell(AcquireLeases(vm1, base, True, 1, 1, replies))
    lockspace.tell(AcquireLeases(vm2, base, True, 1, 2, replies))
    dispatcher.run_until_idle()
    while held.pending:
        held.answer(0, ok=True)
        dispatcher.run_until_idle()
    assert set(actor._state.held["base"].owners) == {vm1.key, vm2.key}
    # vm2 and vm3 each have an acquire in flight, so their next commands wait.
    lockspace.tell(AcquireLeases(vm2, (("disk2", LeaseMode.EXCLUSIVE),), True, 1, 3, replies))
    lockspace.tell(AcquireLeases(vm3, (("disk3", LeaseMode.EXCLUSIVE),), True, 1, 4, replies))
    dispatcher.run_until_idle()
    lockspace.tell(ReleaseLeases(vm2, ("base",), 1, ReleaseReason.CLIENT, 5, replies))
    lockspace.tell(AcquireLeases(vm3, base, True, 1, 6, replies))
    lockspace.tell(ReleaseLeases(vm1, ("base",), 1, ReleaseReason.CLIENT, 7, replies))
    dispatcher.run_until_idle()
    # vm2's acquire is written first, then everything in the order it was asked for.
    while held.pending:
        held.answer(0, ok=True)
        dispatcher.run_until_idle()
        lease = actor._state.held.get("base")
        assert lease is not None, "the lease ended before vm3 joined it"
        changes = [c for a in held.pending for c in _touches(a).get("base", [])]
        releasing = {o for kind, o in changes if kind == "release"}
        assert set(lease.owners) - releasing, "the releases in flight would end the lease"
    assert all(answers.done[t].refusal is None for t in range(1, 8))
    assert set(actor._state.held["base"].owners) == {vm3.key}
    assert kernel_locked(tmp_path / "base")


def _touches(append: Append) -> dict[str, list[tuple[str, OwnerKey | None]]]:
    """What a pending journal write changes: per resource, (kind, owner) of each event."""
    touched: dict[str, list[tuple[str, OwnerKey | None]]] = {}
    for event in append.events:
        if isinstance(event, LeaseAcquired):
            kind = "join" if event.mode is LeaseMode.SHARED else "take"
            touched.setdefault(event.resource, []).append((kind, event.owner.key))
        elif isinstance(event, LeaseReleased):
            touched.setdefault(event.resource, []).append(("release", event.owner.key))
        else:
            touched.setdefault(event.resource, []).append(("file", None))  # type: ignore[attr-defined]
    return touched


@pytest.mark.parametrize("seed", range(60))
def test_random_schedules_keep_conflicting_commands_apart_and_answer_every_one(
    dispatcher: Dispatcher, tmp_path: Path, seed: int
) -> None:
    """Random commands by four owners on three resources, journal writes answered in a
    random order (one in ten failing). Whatever the order, commands that do not commute
    are never in flight together: one owner's commands run one at a time, and on a
    resource only releases by different owners, shared acquires joining a lease held
    shared, and both while a holder outlives every release, run alongside each other.
    Nothing is left waiting once the journal has answered everything, every command gets
    one answer, and the kernel locks end up exactly on the leases held. At random
    moments a full scheduling pass checks that nothing waiting could have started."""
    rnd = random.Random(seed)
    lockspace, held, answers, actor = lockspace_on(dispatcher, tmp_path)
    replies = answers.actor_ref
    owners = [owner(n) for n in range(1, 5)]
    names = ["a", "b", "c"]
    tokens = itertools.count(1)
    asked: list[int] = []

    def check_in_flight() -> None:
        leases = actor._state.held
        pending = [_touches(append) for append in held.pending]
        for one, other in itertools.combinations(pending, 2):
            mine = {o for changes in one.values() for _, o in changes if o is not None}
            theirs = {o for changes in other.values() for _, o in changes if o is not None}
            assert not mine & theirs, f"one owner's commands in flight together: {one} {other}"
        on: dict[str, list[set[str]]] = {}
        for touched in pending:
            for resource, changes in touched.items():
                on.setdefault(resource, []).append({kind for kind, _ in changes})
        for resource, writes in on.items():
            if len(writes) < 2:
                continue
            kinds = set().union(*writes)
            holding = leases.get(resource)
            joined = holding is not None and holding.mode is LeaseMode.SHARED
            assert kinds == {"release"} or (kinds <= {"join", "release"} and joined), (
                f"conflicting commands on {resource} in flight together: {writes}"
            )
            if kinds == {"join", "release"}:
                # Joins alongside releases only while a holder outlives every release.
                assert holding is not None
                releasing = sum("release" in kinds for kinds in writes)
                assert len(holding.owners) - releasing >= 1, (
                    f"{resource}: a release could end the lease under a join: {writes}"
                )

    def send(command: Command) -> None:
        if command.reply_to is not None:
            asked.append(command.token)
        lockspace.tell(command)

    for _ in range(300):
        roll = rnd.random()
        vm = rnd.choice(owners)
        token = next(tokens)
        if roll < 0.3:
            modes = [LeaseMode.SHARED, LeaseMode.SHARED, LeaseMode.EXCLUSIVE]
            items = tuple((r, rnd.choice(modes)) for r in rnd.sample(names, rnd.randint(1, 2)))
            send(AcquireLeases(vm, items, True, 1, token, replies))
        elif roll < 0.45:
            resources = tuple(rnd.sample(names, rnd.randint(1, 2)))
            send(ReleaseLeases(vm, resources, 1, ReleaseReason.CLIENT, token, replies))
        elif roll < 0.6:
            send(ReleaseOwner(vm.key, 1, ReleaseReason.OWNER_GONE, token, replies))
        elif roll < 0.65:
            send(DeleteResource(rnd.choice(names), 1, token, replies))
        elif roll < 0.7:
            send(CreateResource(rnd.choice(names), 1, token, replies))
        elif held.pending:
            held.answer(rnd.randrange(len(held.pending)), ok=rnd.random() > 0.1)
        dispatcher.run_until_idle()
        check_in_flight()
        if rnd.random() < 0.25 and actor._queued:
            # Nothing waits that could go: a pass over the whole queue starts (or
            # answers) nothing, whatever the scheduler skipped to get here.
            waiting = list(actor._queued)
            actor._run_queued()
            assert list(actor._queued) == waiting, "a queued command could have started"
            dispatcher.run_until_idle()
    while held.pending:
        held.answer(rnd.randrange(len(held.pending)), ok=True)
        dispatcher.run_until_idle()
        check_in_flight()
    assert sorted(answers.answered) == asked, "a command was left waiting, or answered twice"
    for name in names:
        assert kernel_locked(tmp_path / name) == (name in actor._state.held), name
