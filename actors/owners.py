"""OwnersActor: watches owner processes and ends their leases when they go.

Two ways an owner's leases end without a release request:

- its process exits: each registered owner is watched (also owners that
  have no connection open), and its exit releases every lease it holds with
  reason ``owner-exit``. Watching uses a pidfd, which wakes lockd the moment
  the process exits, while pidfds stay within a budget (``max_pidfds``); the
  owners beyond it, or whose pidfd could not be opened (EMFILE), are polled
  instead, all of them within ``POLL_SECONDS``, until an exiting owner frees
  a pidfd for the owner polled longest. Leases need descriptors more
  than watches do: a lease cannot exist without its fd, an owner can be
  polled, so at 16,384 leases under a 20,000-fd limit the owners still fit;
- its own connection (peer pid = owner pid, as when a VM inherited the
  connection) closes while the process still runs and holds leases: the
  process is fenced like virtlockd does (SIGTERM, then SIGKILL after a grace
  period), and its leases are released, with reason ``disconnect`` (``admin``
  when an operator closed it), **once it has exited**. Unlike virtlockd,
  the lock is not dropped while the process could still write: a VM stuck in
  the kernel keeps its disk locked rather than sharing it with a second
  writer.

Waiting is done with timers and the pidfd, so no other client waits. A
release that cannot be journaled is retried until it can be. Process access
sits behind :class:`Processes` so tests run without real processes.
"""

from __future__ import annotations

import collections
import itertools
import logging
import selectors
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import pykka

from actors.events import OwnerFenced, ReleaseReason
from actors.faults import crash_point
from actors.journal import Append, Appended, AppendFailed
from actors.lockspace import LeasesLost
from actors.metrics import REGISTRY
from actors.model import Owner, OwnerKey
from actors.router import Gather, Gathered, OwnerReleased, ReleaseOwnerEverywhere
from actors.runtime import DispatchedActor, Dispatcher, Timer, tell_if_alive

log = logging.getLogger(__name__)

FENCE_GRACE_SECONDS = 1.6
"""SIGTERM to SIGKILL: virtlockd's loop sends SIGKILL at its 8th 200 ms step."""
FENCE_GIVE_UP_SECONDS = 1.4
"""After SIGKILL, how long until the owner is reported as refusing to die."""
FENCE_RETRY_SECONDS = 0.2
"""Back-off before sending again a SIGKILL that could not be sent (EMFILE on its pidfd)."""
RELEASE_RETRY_SECONDS = 1.0
"""Back-off before retrying a release (or a fence's signal) the journal could not record."""
POLL_SECONDS = 1.0
"""Every owner watched without a pidfd is checked once per this period."""
POLL_FULL_EVERY = 5
"""Polling rounds per full check. In between, a round only asks whether the pid
exists (kill 0, ~1 us; a /proc read of another process costs ~25 us): an owner
that exited and was reaped, as a VM manager reaps its VMs, is seen within a
round; a zombie or a reused pid within this many. 1,596 polled owners cost
the idle daemon 3.4% of a CPU this way, 6.6% with a /proc read every round
(measured on the 2-vCPU test VM)."""
PROMOTE_TRIES = 16
"""Polled owners tried for one freed pidfd (those found gone are released on the way)."""
POLL_SLICES = 100
"""The polled owners are checked in this many slices spread over the period:
a /proc read costs ~12 us, so 1,600 polled owners at once would hold every
request up by ~20 ms; in 100 slices of 10 ms, by ~0.2 ms."""


class Processes(Protocol):
    """The process table, as the owners actor needs it (real: lockd.procs)."""

    def open_watch(self, owner: Owner) -> int | None:
        """A pollable fd that becomes readable when the owner exits (pidfd); None if gone."""
        ...

    def close_watch(self, fd: int) -> None: ...

    def is_gone(self, owner: Owner) -> bool:
        """True once the owner process exited or is exiting (or its pid was reused)."""
        ...

    def pid_gone(self, owner: Owner) -> bool:
        """Cheap and partial: True if no process has the owner's pid any more.

        False says nothing about a zombie or a reused pid; :meth:`is_gone` does.
        """
        ...

    def signal(self, owner: Owner, signum: int) -> bool:
        """Send ``signum`` to the owner process only; False if it is gone or cannot be signalled."""
        ...

    def uids_of(self, pid: int) -> tuple[int, int] | None:
        """The real and saved uids of process ``pid`` (what kill(2) compares a sender's uid
        with); None if it cannot be read."""
        ...


@attrs.frozen
class Watch:
    """Watch a registered owner until its process exits."""

    owner: Owner


@attrs.frozen
class OwnerExited:
    """The owner's pidfd became readable (or the owner was found gone)."""

    owner: OwnerKey


@attrs.frozen
class ConnectionClosed:
    """A registered connection closed; ``peer_pid`` and ``peer_uid`` are the process on its
    other end (SO_PEERCRED)."""

    owner: Owner
    conn: int
    peer_pid: int
    peer_uid: int
    by: str | None = None
    """Closed by an operator: which one (``uid U, pid P``), for the fence's reason."""

    @property
    def admin(self) -> bool:
        """Whether an operator closed it (``lockd disconnect``)."""
        return self.by is not None


@attrs.frozen
class FenceLost:
    """Recovery fences ``owner``: it lost a lease while lockd was down, or its fence was cut
    short by a crash. SIGTERM, then SIGKILL a grace period after ``since``."""

    owner: Owner
    reason: str
    since: float | None = None
    """Wall-clock time of the fence's first SIGTERM (None: it begins now)."""
    on_behalf_of: int | None = None
    """The uid a resumed fence signals for (None: root's), as :class:`_Fencing` has it."""


@attrs.frozen
class QueryFencing:
    """Which owners are being fenced: re-exec asks first (a re-exec must not interrupt a
    fence, its SIGKILL is a timer), and ``status`` shows them to the operator."""

    reply_to: pykka.ActorRef[Any]
    token: int = 0


@attrs.frozen
class FenceStatus:
    """One fence in progress."""

    owner: Owner
    reason: str
    """Why it began (the SIGTERM's reason)."""
    next_signal: str | None
    """SIGKILL while the grace period runs; None once SIGKILL was sent (waiting for the exit)."""
    due_in: float | None
    """Seconds until ``next_signal`` (None with it)."""


@attrs.frozen
class Fencing:
    """Reply to :class:`QueryFencing`: owners being fenced right now."""

    token: int = 0
    fences: tuple[FenceStatus, ...] = ()


@attrs.frozen
class _FenceStep:
    owner: Owner
    signum: int | None
    """None: the final check after SIGKILL."""


@attrs.frozen
class _Signal:
    """A fence's signal, journaled and then sent (and sent again after EMFILE)."""

    owner: Owner
    signum: int
    reason: str


@attrs.frozen
class _Record:
    """Timer: journal again a signal whose record the journal refused (it was sent)."""

    signal: _Signal


@attrs.frozen
class _RetryRelease:
    owner: OwnerKey
    conn: int
    reason: ReleaseReason
    tries: int = 0
    """Tries the journal refused so far (a full disk): only the first is logged."""


@attrs.frozen
class _Poll:
    """Timer tick: check the next slice of the owners watched by polling."""


@attrs.define
class _Watched:
    owner: Owner
    fd: int | None
    """The pidfd; None for an owner that is polled."""


@attrs.define
class _Fencing:
    owner: Owner
    conn: int
    reason: ReleaseReason
    """How its leases end once it exits."""
    why: str
    """Why the fence began, for ``status``."""
    next_signal: int | None = None
    """What its timer sends next (None: the check after SIGKILL)."""
    on_behalf_of: int | None = None
    """The uid whose closed connection began the fence, when it is not root's: each signal
    goes only while a process of that uid could send it itself (see
    :meth:`OwnersActor._signallable`)."""


class OwnersActor(DispatchedActor):
    """Watches owners, fences them when their own connection drops, ends their leases."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        processes: Processes,
        router: pykka.ActorRef[Any],
        journal: pykka.ActorRef[Any],
        grace: float = FENCE_GRACE_SECONDS,
        max_pidfds: int | None = None,
        clock: Callable[[], float] = time.time,
        signals_as: int | None = None,
    ) -> None:
        super().__init__(dispatcher)
        self._processes = processes
        self._signals_as = signals_as
        """The uid lockd runs as when it is not root (a user's daemon), None for root's,
        which may signal any process. A fence of lockd's own (an admin disconnect, a lost
        lease) sends each signal only while that uid could (see :meth:`_signallable`)."""
        self._max_pidfds = max_pidfds
        """None: no budget (a pidfd for every owner, polling only after EMFILE)."""
        self._pidfds = 0
        self._polled: dict[OwnerKey, Owner] = {}
        self._poll_queue: collections.deque[OwnerKey] = collections.deque()
        """What is left of the current polling round."""
        self._poll_rounds = 0
        self._round_ticks = 0
        """Ticks left in the current polling round (0: the next tick starts one)."""
        self._poll_timer: Timer | None = None
        self._router = router
        self._journal = journal
        self._grace = grace
        self._clock = clock
        """Wall clock, the journal's: how much of a resumed fence's grace is left."""
        self._watched: dict[OwnerKey, _Watched] = {}
        self._tokens = itertools.count(1)
        self._closing: dict[int, ConnectionClosed] = {}
        self._releasing: dict[int, _RetryRelease] = {}
        self._fencing: dict[OwnerKey, _Fencing] = {}
        self._timers: dict[OwnerKey, Timer] = {}
        self._signalling: dict[int, tuple[_Signal, bool]] = {}
        """Signals whose ``owner-fenced`` record the journal has not answered yet, and
        whether to send it then (False: a record written again after a failure)."""
        self.retries_pending = 0
        """Releases the journal refused, waiting for their retry (the journal lags the tables)."""

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Watch):
            self._watch(message.owner)
        elif isinstance(message, OwnerExited):
            self._exited(message.owner)
        elif isinstance(message, ConnectionClosed):
            self._connection_closed(message)
        elif isinstance(message, Gathered):
            self._checked_leases(message)
        elif isinstance(message, OwnerReleased):
            self._released(message)
        elif isinstance(message, _RetryRelease):
            self.retries_pending -= 1
            self._release(message)
        elif isinstance(message, FenceLost):
            self._fence_lost(message)
        elif isinstance(message, LeasesLost):
            for owner, lease in message.lost:
                reason = (f"lease {lease} was taken by another process or host after its "
                          "file was removed or replaced")  # fmt: skip
                self._fence_lost(FenceLost(owner, reason))
        elif isinstance(message, _FenceStep):
            self._fence_step(message)
        elif isinstance(message, (Appended, AppendFailed)):
            self._recorded(message)
        elif isinstance(message, _Signal):
            self._send(message)
        elif isinstance(message, _Record):
            self._record(message.signal, send=False)
        elif isinstance(message, QueryFencing):
            tell_if_alive(message.reply_to, self._fences_now(message.token))
        elif isinstance(message, _Poll):
            self._poll()
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
        if self._poll_timer is not None:
            self._poll_timer.cancel()

    @property
    def watch_counts(self) -> tuple[int, int]:
        """(owners watched by pidfd, owners watched by polling): for metrics and tests."""
        return self._pidfds, len(self._polled)

    # -- watching -----------------------------------------------------------------
    def _watch(self, owner: Owner) -> None:
        if owner.key in self._watched:
            return
        if self._max_pidfds is not None and self._pidfds >= self._max_pidfds:
            self._start_polling(owner, f"pidfd budget of {self._max_pidfds} used")
            return
        try:
            fd = self._processes.open_watch(owner)
            if fd is not None:
                self._watch_pidfd(owner, fd)
        except OSError as exc:
            self._start_polling(owner, f"no pidfd: {exc}")
            return
        if fd is None:
            self._watched[owner.key] = _Watched(owner, None)
            self.actor_ref.tell(OwnerExited(owner.key))
            return
        self._count()

    def _watch_pidfd(self, owner: Owner, fd: int) -> None:
        """Watch ``fd``, or close it and raise OSError (epoll out of watches, ENOSPC)."""
        ref = self.actor_ref
        key = owner.key
        try:
            self.dispatcher.watch(
                fd, selectors.EVENT_READ, lambda _mask: ref.tell(OwnerExited(key))
            )
        except OSError:
            self._processes.close_watch(fd)
            raise
        self._watched[key] = _Watched(owner, fd)
        self._pidfds += 1

    def _promote(self) -> None:
        """A pidfd came free: it goes to the owner polled longest.

        A pidfd sees an exit at once, a zombie and a reused pid included, where
        polling takes up to POLL_SECONDS (POLL_FULL_EVERY times that for a
        zombie). One owner per freed pidfd, so a burst of exits never turns
        into thousands of pidfd_open calls in one step; owners found gone on
        the way are released now rather than at their turn in the round. Still
        short of descriptors (EMFILE): they stay polled.
        """
        for _ in range(PROMOTE_TRIES):
            if not self._polled:
                return
            if self._max_pidfds is not None and self._pidfds >= self._max_pidfds:
                return
            key, owner = next(iter(self._polled.items()))
            try:
                fd = self._processes.open_watch(owner)
                if fd is not None:
                    self._watch_pidfd(owner, fd)
            except OSError:
                return
            if fd is None:
                self._exited(key)
                continue
            del self._polled[key]  # a round under way skips it: its key no longer resolves
            self._count()
            return

    def _start_polling(self, owner: Owner, why: str) -> None:
        if not self._polled:
            log.warning(
                "watching %s by polling every %.1f s (%s); later owners too while it lasts",
                owner.describe(),
                POLL_SECONDS,
                why,
            )
        self._watched[owner.key] = _Watched(owner, None)
        self._polled[owner.key] = owner
        if self._poll_queue:
            self._poll_queue.append(owner.key)  # a round is under way: it joins this one
        self._count()
        if self._poll_timer is None:
            self._schedule_poll(1)

    def _schedule_poll(self, ticks: int) -> None:
        ref = self.actor_ref
        self._poll_timer = self.dispatcher.call_later(
            ticks * POLL_SECONDS / POLL_SLICES, lambda: tell_if_alive(ref, _Poll())
        )

    def _poll(self) -> None:
        """One tick: check the next slice of this round's owners.

        A round lasts POLL_SLICES ticks (POLL_SECONDS) however many owners are
        polled: each is checked once per round, its share spread over the
        ticks left (owners joining mid-round included); once a round's owners
        are all checked, the timer sleeps until the next round begins.
        """
        self._poll_timer = None
        if not self._polled:
            self._poll_queue.clear()
            self._round_ticks = 0
            return
        if self._round_ticks == 0:
            self._poll_queue = collections.deque(self._polled)
            self._round_ticks = POLL_SLICES
            self._poll_rounds += 1
        full = self._poll_rounds % POLL_FULL_EVERY == 0
        gone = self._processes.is_gone if full else self._processes.pid_gone
        budget = -(-len(self._poll_queue) // self._round_ticks)
        self._round_ticks -= 1
        while budget and self._poll_queue:
            owner = self._polled.get(self._poll_queue.popleft())
            if owner is None:
                continue  # released since the round began: costs no /proc read
            budget -= 1
            if gone(owner):
                self._exited(owner.key)
        if not self._polled:
            return
        if self._poll_queue or self._round_ticks == 0:
            self._schedule_poll(1)
        else:
            # All checked: sleep out the round (no wake-ups 100 times a second for nothing).
            self._schedule_poll(self._round_ticks + 1)
            self._round_ticks = 0

    def _unwatch(self, key: OwnerKey) -> None:
        watched = self._watched.pop(key, None)
        if watched is None:
            return
        if watched.fd is not None:
            self._pidfds -= 1
            self.dispatcher.unwatch(watched.fd)
            self._processes.close_watch(watched.fd)
        else:
            self._polled.pop(key, None)
        self._count()

    def _count(self) -> None:
        REGISTRY.set("lockd_owners_watched", self._pidfds, by="pidfd")
        REGISTRY.set("lockd_owners_watched", len(self._polled), by="poll")

    def _exited(self, key: OwnerKey) -> None:
        fencing = self._fencing.pop(key, None)
        if key not in self._watched and fencing is None:
            return
        watched = self._watched.get(key)
        self._unwatch(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if fencing is None:
            self._release(_RetryRelease(key, 0, ReleaseReason.OWNER_EXIT))
        else:
            self._release(_RetryRelease(key, fencing.conn, fencing.reason))
        if watched is not None and watched.fd is not None:
            self._promote()  # after the release is on its way, whatever promoting meets

    def _release(self, release: _RetryRelease) -> None:
        token = next(self._tokens)
        self._releasing[token] = release
        self._router.tell(
            ReleaseOwnerEverywhere(
                release.owner, release.conn, release.reason, token, self.actor_ref
            )
        )

    def _released(self, message: OwnerReleased) -> None:
        release = self._releasing.pop(message.token, None)
        if release is None:
            return
        if not message.failed:
            if release.tries:
                log.info("journaled the release of pid %d's leases after %d refused tries",
                         release.owner.pid, release.tries)  # fmt: skip
            return
        # Said once per owner, not at every retry: with the journal's disk full, each
        # owner gone meanwhile logged a line a second until it was written (the
        # journal's own log says when it is written again).
        log.log(
            logging.ERROR if release.tries == 0 else logging.DEBUG,
            "could not journal the release of pid %d's leases in %s; retrying every %g s "
            "(the leases stay held until it is journaled)",
            release.owner.pid,
            ", ".join(message.failed),
            RELEASE_RETRY_SECONDS,
        )
        ref = self.actor_ref
        self.retries_pending += 1
        again = attrs.evolve(release, tries=release.tries + 1)
        self.dispatcher.call_later(RELEASE_RETRY_SECONDS, lambda: tell_if_alive(ref, again))

    # -- a dropped connection -------------------------------------------------------
    def _connection_closed(self, message: ConnectionClosed) -> None:
        owner = message.owner
        if message.peer_pid != owner.pid:
            # A manager's connection: the leases belong to the owner process,
            # which the pidfd keeps watching.
            return
        if self._processes.is_gone(owner):
            if owner.key in self._watched:
                self._exited(owner.key)
            else:
                self._release(_RetryRelease(owner.key, message.conn, ReleaseReason.OWNER_EXIT))
            return
        token = next(self._tokens)
        self._closing[token] = message
        self._router.tell(Gather(token, self.actor_ref, owner=owner.key))

    def _checked_leases(self, gathered: Gathered) -> None:
        closed = self._closing.pop(gathered.token, None)
        if closed is None:
            return
        owner = closed.owner
        holds = any(
            h.owner.key == owner.key
            for snapshot in gathered.lockspaces
            for lease in snapshot.leases
            for h in lease.holders
        )
        if not holds or owner.key in self._fencing:
            return
        if self._processes.is_gone(owner):
            self._release(_RetryRelease(owner.key, closed.conn, ReleaseReason.OWNER_EXIT))
            return
        reason = ReleaseReason.ADMIN if closed.admin else ReleaseReason.DISCONNECT
        why = "connection closed while holding leases"
        if closed.admin:  # an auditor asks who (which operator's session: its uid and pid)
            why = f"admin disconnect by {closed.by}" if closed.by else "admin disconnect"
        # An operator's disconnect is root's (the admin socket's uid) to answer for.
        uid = None if closed.admin or closed.peer_uid == 0 else closed.peer_uid
        self._watch(owner)
        if not self._signallable(owner, uid, "SIGTERM"):
            return
        self._fencing[owner.key] = _Fencing(owner, closed.conn, reason, why, on_behalf_of=uid)
        self._fence(owner, signal.SIGTERM, why)
        self._schedule(owner, self._grace, signal.SIGKILL)

    def _fence_lost(self, message: FenceLost) -> None:
        owner = message.owner
        if owner.key in self._fencing or self._processes.is_gone(owner):
            return
        uid = message.on_behalf_of
        self._watch(owner)
        # A user's fence resumed after a crash: the check its first SIGTERM passed is made
        # again (the owner may have become root's meanwhile).
        if not self._signallable(owner, uid, "SIGTERM"):
            return
        # Its other leases end with it (owner-exit), like any exiting owner's.
        self._fencing[owner.key] = _Fencing(
            owner, 0, ReleaseReason.OWNER_EXIT, message.reason, on_behalf_of=uid
        )
        self._fence(owner, signal.SIGTERM, message.reason)
        self._schedule(owner, self._grace_left(message.since), signal.SIGKILL)

    def _fences_now(self, token: int) -> Fencing:
        now = self.dispatcher.now()
        fences = []
        for key, fencing in self._fencing.items():
            timer = self._timers.get(key)
            if fencing.next_signal is None:
                name, due = None, None  # SIGKILL sent: only its exit is awaited
            else:
                name = signal.Signals(fencing.next_signal).name
                # No timer: its time came, and its record is being written (then it goes).
                due = 0.0 if timer is None else round(max(0.0, timer.deadline - now), 3)
            fences.append(FenceStatus(fencing.owner, fencing.why, name, due))
        return Fencing(token, tuple(fences))

    def _grace_left(self, since: float | None) -> float:
        """What remains of the grace period of a fence whose first SIGTERM was at ``since``.

        A fence resumed after a crash keeps its deadline: with a full grace period
        at each start, a daemon that crashes within every grace period would never
        send the SIGKILL. A wall clock stepped back gives the full period (never more);
        one stepped forward, less, down to SIGKILL right after the SIGTERM."""
        if since is None:
            return self._grace
        return min(self._grace, max(0.0, self._grace - (self._clock() - since)))

    def _schedule(self, owner: Owner, delay: float, signum: int | None) -> None:
        old = self._timers.pop(owner.key, None)
        if old is not None:
            old.cancel()
        fencing = self._fencing.get(owner.key)
        if fencing is not None:
            fencing.next_signal = signum
        ref = self.actor_ref
        self._timers[owner.key] = self.dispatcher.call_later(
            delay, lambda: tell_if_alive(ref, _FenceStep(owner, signum))
        )

    def _fence_step(self, step: _FenceStep) -> None:
        key = step.owner.key
        self._timers.pop(key, None)
        if key not in self._fencing:
            return  # it exited and its leases were released meanwhile
        if self._processes.is_gone(step.owner):
            self._exited(key)  # gone, but its pidfd was not watched
            return
        if step.signum is None:
            log.error(
                "%s survived SIGKILL (stuck in the kernel?); its leases stay held until it exits",
                step.owner.describe(),
            )
            return
        fencing = self._fencing[key]
        if not self._signallable(
            step.owner, fencing.on_behalf_of, signal.Signals(step.signum).name
        ):
            del self._fencing[key]  # over: its leases end when it exits, as any owner's
            return
        self._fence(step.owner, step.signum, "still running after SIGTERM")

    def _signallable(self, owner: Owner, uid: int | None, what: str) -> bool:
        """Whether a fence on behalf of ``uid`` (None: lockd's own, which root's lockd may
        always send) may send ``owner`` the signal ``what``: only while a process of that
        uid could send it itself, its real or saved uid being ``uid`` (kill(2)'s rule).
        Logs the refusal.

        A user's process that registered itself, then became root's (it ran a set-user-ID
        program such as sudo), had lockd SIGTERM and SIGKILL a root process for that user
        the moment the user's connection closed (after the SIGTERM, too: a process that
        runs sudo on SIGTERM). It is no longer signalled; its leases stay held until it
        exits, as an owner with no connection."""
        who = f"uid {uid}, whose connection closed,"
        if uid is None:
            # lockd's own fence: a user's lockd is held to kill(2)'s rule too. Its process
            # turned root's (sudo) had every SIGKILL refused (EPERM) and sent again each
            # 0.2 s, an error logged each time, for as long as the process ran.
            uid, who = self._signals_as, f"lockd, uid {self._signals_as},"
            if uid is None:
                return True
        uids = self._processes.uids_of(owner.pid)
        if uids is not None and uid in uids:
            return True
        runs_as = "its uid cannot be read" if uids is None else f"it runs as uid {uids[0]} now"
        log.warning(
            "not fencing %s with %s: %s could not signal it (%s: a set-user-ID program?); "
            "its leases stay held until it exits",
            owner.describe(), what, who, runs_as,
        )  # fmt: skip
        return False

    def _fence(self, owner: Owner, signum: int, reason: str) -> None:
        """Journal the signal, then send it (:meth:`_recorded`).

        Recorded first, as every change is: a daemon killed between the two
        leaves a record of a signal it did not send, which the next daemon
        resumes (sending it again is harmless to a process being fenced).
        Sent first, a crash in between would leave a signal no record tells
        of, and a fence begun on a dropped connection no next daemon knows of.
        """
        self._record(_Signal(owner, signum, reason), send=True)

    def _record(self, pending: _Signal, *, send: bool) -> None:
        if not send and pending.owner.key not in self._fencing:
            return  # the fence is over: its release tells the rest
        token = next(self._tokens)
        self._signalling[token] = (pending, send)
        fencing = self._fencing.get(pending.owner.key)
        uid = None if fencing is None else fencing.on_behalf_of
        event = OwnerFenced(pending.owner, signal.Signals(pending.signum).name, pending.reason, uid)
        self._journal.tell(Append((event,), token, self.actor_ref))

    def _recorded(self, message: Appended | AppendFailed) -> None:
        pending, send = self._signalling.pop(message.token, (None, False))
        if pending is None:
            return
        if send:
            crash_point("fence-journaled")
        if isinstance(message, AppendFailed):
            # Sent all the same: better a fenced VM than one writing a disk it lost.
            # The record is written again until it is in, so that a crash after
            # the journal heals still leaves the next daemon this fence.
            # Logged at the first refusal only (send): a retry refused again (the
            # disk still full) logged a line a second per fence.
            log.log(logging.ERROR if send else logging.DEBUG,
                    "could not journal fencing %s with %s: %s; %s, and the record retried",
                    pending.owner.describe(), signal.Signals(pending.signum).name,
                    message.message, "sending it anyway" if send else "sent")  # fmt: skip
            ref = self.actor_ref
            self.dispatcher.call_later(
                RELEASE_RETRY_SECONDS, lambda: tell_if_alive(ref, _Record(pending))
            )
        if send:
            self._send(pending)

    def _send(self, pending: _Signal) -> None:
        owner, signum = pending.owner, pending.signum
        if owner.key not in self._fencing:
            return  # it exited meanwhile, and its leases were released
        retry = self._timers.pop(owner.key, None) if signum == signal.SIGKILL else None
        if retry is not None:
            retry.cancel()  # the retry below, come due (or about to: this send replaces it)
        name = signal.Signals(signum).name
        if self._processes.signal(owner, signum):
            log.warning("fencing %s with %s: %s", owner.describe(), name, pending.reason)
            REGISTRY.inc("lockd_fence_actions_total", signal=name)
            if signum == signal.SIGKILL:
                self._schedule(owner, FENCE_GIVE_UP_SECONDS, None)
        elif self._processes.is_gone(owner):
            self._exited(owner.key)  # gone before the signal, perhaps not seen by its watch
        elif signum == signal.SIGKILL:
            # Not signalled, yet not gone: out of descriptors for the pidfd the
            # signal goes through (EMFILE). Send it again (not journal it again)
            # rather than give up on it. A SIGTERM is not retried: its SIGKILL follows.
            ref = self.actor_ref
            self._timers[owner.key] = self.dispatcher.call_later(
                FENCE_RETRY_SECONDS, lambda: tell_if_alive(ref, pending)
            )
