"""OwnersActor: watches owner processes and ends their leases when they go.

Two ways an owner's leases end without a release request:

- its process exits: each registered owner is watched with a pidfd (also
  owners that have no connection open), and its exit releases every lease it
  holds with reason ``owner-exit``;
- its own connection (peer pid = owner pid, as when a VM inherited the
  connection) closes while the process still runs: the leases are released
  with reason ``disconnect`` (``admin`` when an operator closed it) and the
  process is fenced like virtlockd does: SIGTERM, then SIGKILL after a grace
  period. The wait is a timer, so no other client waits for it.

Process access sits behind :class:`Processes` so tests run without real
processes.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import signal
from typing import Any, Protocol

import attrs
import pykka

from actors.events import OwnerFenced, ReleaseReason
from actors.journal import Append
from actors.model import Owner, OwnerKey
from actors.router import OwnerReleased, ReleaseOwnerEverywhere
from actors.runtime import DispatchedActor, Dispatcher, Timer

log = logging.getLogger(__name__)

FENCE_GRACE_SECONDS = 1.6
"""SIGTERM to SIGKILL: virtlockd's loop sends SIGKILL at its 8th 200 ms step."""
FENCE_GIVE_UP_SECONDS = 1.4
"""After SIGKILL, how long to wait before logging that the owner would not die."""


class Processes(Protocol):
    """The process table, as the owners actor needs it (real: lockd.procs)."""

    def open_watch(self, owner: Owner) -> int | None:
        """A pollable fd that becomes readable when the owner exits (pidfd); None if gone."""
        ...

    def close_watch(self, fd: int) -> None: ...

    def is_gone(self, owner: Owner) -> bool:
        """True once the owner process exited or is exiting (or its pid was reused)."""
        ...

    def signal(self, owner: Owner, signum: int) -> bool:
        """Send ``signum`` to the owner process only; False if it is gone."""
        ...


@attrs.frozen
class Watch:
    """Watch a registered owner until its process exits."""

    owner: Owner


@attrs.frozen
class OwnerExited:
    """Self-sent: the owner's pidfd became readable."""

    owner: OwnerKey


@attrs.frozen
class ConnectionClosed:
    """A registered connection closed; ``peer_pid`` is the process on its other end."""

    owner: Owner
    conn: int
    peer_pid: int
    admin: bool


@attrs.frozen
class _FenceStep:
    owner: Owner
    signum: int


@attrs.define
class _Watched:
    owner: Owner
    fd: int | None


class OwnersActor(DispatchedActor):
    """Watches owners and fences them when their own connection drops."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        processes: Processes,
        router: pykka.ActorRef[Any],
        journal: pykka.ActorRef[Any],
        grace: float = FENCE_GRACE_SECONDS,
    ) -> None:
        super().__init__(dispatcher)
        self._processes = processes
        self._router = router
        self._journal = journal
        self._grace = grace
        self._watched: dict[OwnerKey, _Watched] = {}
        self._tokens = itertools.count(1)
        self._closing: dict[int, ConnectionClosed] = {}
        self._timers: dict[OwnerKey, Timer] = {}

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Watch):
            self._watch(message.owner)
        elif isinstance(message, OwnerExited):
            self._exited(message.owner)
        elif isinstance(message, ConnectionClosed):
            self._connection_closed(message)
        elif isinstance(message, OwnerReleased):
            self._released(message)
        elif isinstance(message, _FenceStep):
            self._fence_step(message)
        else:
            return super().on_receive(message)
        return None

    def on_stop(self) -> None:
        for watched in self._watched.values():
            if watched.fd is not None:
                self.dispatcher.unwatch(watched.fd)
                self._processes.close_watch(watched.fd)
        for timer in self._timers.values():
            timer.cancel()

    @property
    def watched(self) -> int:
        """How many owner processes are watched."""
        return len(self._watched)

    def _watch(self, owner: Owner) -> None:
        if owner.key in self._watched:
            return
        fd = self._processes.open_watch(owner)
        self._watched[owner.key] = _Watched(owner, fd)
        if fd is None:
            self.actor_ref.tell(OwnerExited(owner.key))
            return
        ref = self.actor_ref
        key = owner.key
        self.dispatcher.watch(fd, selectors.EVENT_READ, lambda _mask: ref.tell(OwnerExited(key)))

    def _unwatch(self, key: OwnerKey) -> None:
        watched = self._watched.pop(key, None)
        if watched is not None and watched.fd is not None:
            self.dispatcher.unwatch(watched.fd)
            self._processes.close_watch(watched.fd)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _exited(self, key: OwnerKey) -> None:
        if key not in self._watched:
            return
        self._unwatch(key)
        self._router.tell(ReleaseOwnerEverywhere(key, 0, ReleaseReason.OWNER_EXIT, 0, None))

    def _connection_closed(self, message: ConnectionClosed) -> None:
        owner = message.owner
        if message.peer_pid != owner.pid:
            # A manager's connection: the leases belong to the owner process,
            # which the pidfd keeps watching.
            return
        if self._processes.is_gone(owner):
            reason = ReleaseReason.OWNER_EXIT
        else:
            reason = ReleaseReason.ADMIN if message.admin else ReleaseReason.DISCONNECT
        token = next(self._tokens)
        self._closing[token] = message
        self._router.tell(
            ReleaseOwnerEverywhere(owner.key, message.conn, reason, token, self.actor_ref)
        )

    def _released(self, message: OwnerReleased) -> None:
        closed = self._closing.pop(message.token, None)
        if closed is None or not (message.entries or message.failed):
            return
        owner = closed.owner
        if self._processes.is_gone(owner):
            return
        # It held leases and lost its connection while running: it must not
        # go on writing to disks it no longer holds.
        reason = "admin disconnect" if closed.admin else "connection closed while holding leases"
        self._fence(owner, signal.SIGTERM, reason)
        self._timers[owner.key] = self.dispatcher.call_later(
            self._grace, lambda: self.actor_ref.tell(_FenceStep(owner, signal.SIGKILL))
        )

    def _fence_step(self, step: _FenceStep) -> None:
        self._timers.pop(step.owner.key, None)
        if self._processes.is_gone(step.owner):
            return
        self._fence(step.owner, step.signum, "still running after SIGTERM")

    def _fence(self, owner: Owner, signum: int, reason: str) -> None:
        name = signal.Signals(signum).name
        if not self._processes.signal(owner, signum):
            return
        log.warning("fencing %s with %s: %s", owner.describe(), name, reason)
        self._journal.tell(Append((OwnerFenced(owner, name, reason),), 0, None))
