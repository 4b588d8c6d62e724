"""The lockspace's command scheduling, driven by hand: journal replies come when the test says."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any

from actors.events import JournalEntry, ReleaseReason
from actors.journal import Append, Appended, AppendFailed
from actors.lockspace import AcquireLeases, Done, LockspaceActor, ReleaseOwner
from actors.model import LeaseMode, Owner
from actors.runtime import DispatchedActor, Dispatcher
from lockd.lockfiles import LockspaceDir


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

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Done):
            self.done[message.token] = message
            return None
        return super().on_receive(message)


def owner(n: int) -> Owner:
    return Owner(uuid.UUID(int=n).bytes, f"vm{n}", 1, 1000 + n, 9)


def test_a_command_answered_at_once_holds_up_nothing_behind_it(
    dispatcher: Dispatcher, tmp_path: Path
) -> None:
    """A release of an owner that holds nothing ends as it starts. The commands queued
    behind it must start in the same pass: with nothing left in flight, no later pass
    would come, and they would wait for some unrelated request."""
    journal = HeldJournal.start(dispatcher)
    replies = Replies.start(dispatcher)
    lockspace = LockspaceActor.start(dispatcher, "ls", LockspaceDir(str(tmp_path)), journal)
    dispatcher.run_until_idle()
    (held,) = [a for a in dispatcher.actors if isinstance(a, HeldJournal)]
    (answers,) = [a for a in dispatcher.actors if isinstance(a, Replies)]
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
