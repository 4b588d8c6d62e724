"""LockspaceActor: one lockspace's lease table, its lease actors and its journal writes.

Each command runs decide -> kernel locks (lease actors) -> journal -> apply ->
reply, as messages on the dispatcher, so a command waiting for the journal
never holds up the rest of the daemon. Commands touching the same resources
or the same owner as one still in flight wait for it (in arrival order);
others run alongside it, which lets the journal group their writes. Two
kinds of command commute on a resource and so run alongside each other:
releases by different owners, and shared acquires joining a lease already
held shared (see ``_consider``).
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Container, Iterable
from typing import Any, Protocol

import attrs
import pykka

from actors import lockspace_core as core
from actors.events import (
    Event,
    JournalEntry,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    ReleaseReason,
    ResourceCreated,
    ResourceDeleted,
)
from actors.faults import crash_point
from actors.journal import Append, Appended, AppendFailed
from actors.lease import (
    REOPEN_ATTEMPTS,
    AdoptLock,
    DropLock,
    LeaseActor,
    LockBusyError,
    LockRefused,
    LockspaceGoneError,
    LockTaken,
    Relink,
    TakeLock,
    lockspace_gone,
)
from actors.metrics import REGISTRY, LabelSet
from actors.model import LeaseMode, Owner, OwnerKey
from actors.runtime import DispatchedActor, Dispatcher, Timer, tell_if_alive
from protocol.errors import ErrorCode

log = logging.getLogger(__name__)

RESTORE_RETRY_SECONDS = 5.0
"""How long recovery tries again to lock a live owner's lease refused for a reason
other than another holder's lock, before it records the lease lost."""
RESTORE_RETRIES = 50
"""Tries in that time (every 0.1 s: another host holds the index lock for microseconds)."""
LINK_CHECK_SECONDS = 0.5
"""How often a lockspace looks whether its held leases' names still name the files locked."""
LINK_CHECK_BATCH = 128
"""Leases looked at per check (two stat calls each, 1.5 ms for 128 on the test VM, so
requests wait at most that long): a round over 16,384 leases takes 64 s."""


# -- messages --------------------------------------------------------------


@attrs.frozen
class AcquireLeases:
    """Take ``items`` for ``owner``, all or none."""

    owner: Owner
    items: tuple[tuple[str, LeaseMode], ...]
    autocreate: bool
    conn: int
    token: int
    reply_to: pykka.ActorRef[Any]
    once: bytes | None = None
    """The request's key (``once``): a repeat of one applied here changes nothing."""


@attrs.frozen
class ReleaseLeases:
    """Release ``resources`` held by ``owner``."""

    owner: Owner
    resources: tuple[str, ...]
    conn: int
    reason: ReleaseReason
    token: int
    reply_to: pykka.ActorRef[Any]
    once: bytes | None = None
    """The request's key (a rollback's: its acquire's)."""


@attrs.frozen
class ReleaseOwner:
    """End every lease ``owner`` holds here (exit, disconnect, admin); reply may be None."""

    owner: OwnerKey
    conn: int
    reason: ReleaseReason
    token: int
    reply_to: pykka.ActorRef[Any] | None


@attrs.frozen
class CreateResource:
    """Create the lease file (idempotent)."""

    resource: str
    conn: int
    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class DeleteResource:
    """Delete the lease file when nobody holds it."""

    resource: str
    conn: int
    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class Done:
    """Reply to a command: the journal entries it produced, or why it was refused."""

    token: int
    lockspace: str
    entries: tuple[JournalEntry, ...] = ()
    refusal: core.Refusal | None = None
    repeated: tuple[str, ...] = ()
    """A keyed request applied here already: the resources it acquired or released
    then (nothing changed now)."""


@attrs.frozen
class Holder:
    """One owner of a held lease, and since when (UTC seconds)."""

    owner: Owner
    since: float
    holds: int = 1
    """How many times it holds the lease (a shared one asked for again is counted)."""


@attrs.frozen
class LeaseView:
    """A held lease as queries see it."""

    lockspace: str
    resource: str
    mode: LeaseMode
    holders: tuple[Holder, ...]


@attrs.frozen
class Counts:
    """How much a lockspace holds, without a view of every lease."""

    exclusive: int
    shared: int
    owners: frozenset[OwnerKey]

    @property
    def leases(self) -> int:
        """Leases held, in either mode."""
        return self.exclusive + self.shared


@attrs.frozen
class Snapshot:
    """What a lockspace holds right now: every lease, or (``counts``) only how many."""

    name: str
    path: str
    leases: tuple[LeaseView, ...]
    counts: Counts | None = None


@attrs.frozen
class TakeSnapshot:
    """Query: reply with :class:`SnapshotTaken` (only ``owner``'s leases when given).

    ``counts_only``: no lease views, just :class:`Counts` (status, metrics, the
    idle check): at 16,384 leases a full snapshot is that many objects.
    """

    token: int
    reply_to: pykka.ActorRef[Any]
    owner: OwnerKey | None = None
    counts_only: bool = False


@attrs.frozen
class SnapshotTaken:
    """Reply to :class:`TakeSnapshot`."""

    token: int
    snapshot: Snapshot


@attrs.frozen
class RestoreLease:
    """One lease the journal says is held, as recovery found its owners."""

    resource: str
    mode: LeaseMode
    autocreate: bool
    live: tuple[tuple[Owner, float], ...]
    """Owners still running (pid and start time match), with since when they hold it."""
    dead: tuple[Owner, ...]
    """Owners that died while the daemon was down."""
    fd: int | None = None
    """An fd still carrying the lock (re-exec, fd store), adopted instead of reopening."""
    holds: tuple[tuple[OwnerKey, int], ...] = ()
    """Live owners that hold the lease more than once, and how many times."""


@attrs.frozen
class Restore:
    """Recovery: hold these leases again (before any client is served)."""

    leases: tuple[RestoreLease, ...]
    token: int
    reply_to: pykka.ActorRef[Any]
    once: tuple[tuple[OwnerKey, bytes, core.Applied], ...] = ()
    """The keys of recent keyed requests here, oldest first (their repeats change nothing)."""


@attrs.frozen
class Restored:
    """Reply to :class:`Restore`: what was held again, released and lost."""

    token: int
    lockspace: str
    held: int
    released: int
    lost: tuple[tuple[Owner, str], ...]
    """Live owners whose lease another process or host took, with the lease."""
    unlocked: tuple[tuple[str, str], ...] = ()
    """Leases of ``lost`` that no one else was seen holding but that could not be locked
    (a read-only or failing lock directory), each with the error: not "taken"."""


@attrs.define
class _Restoring:
    request: Restore
    waiting: int = 0
    taken: dict[str, int] = attrs.field(factory=dict)
    refused: dict[str, LockRefused] = attrs.field(factory=dict)
    recreated: set[str] = attrs.field(factory=set)
    retries: dict[str, int] = attrs.field(factory=dict)
    fresh: set[str] = attrs.field(factory=set)
    """Leases locked anew (no fd handed back): their fds go to the fd store when taken."""
    events: tuple[Event, ...] = ()


class FdStoreLike(Protocol):
    """The service manager's fd store (real: lockd.systemd.FdStore)."""

    def store(self, lockspace: str, resource: str, fd: int) -> None: ...
    def remove(self, lockspace: str, resource: str) -> None: ...


@attrs.frozen
class LeasesLost:
    """To the router: live owners lost these leases while lockd ran (``lockspace/resource``)."""

    lost: tuple[tuple[Owner, str], ...]


@attrs.frozen
class _CheckLinks:
    """Timer tick: look at the next leases' names (see ``LockspaceActor._check_links``)."""


@attrs.frozen
class HandOff:
    """Re-exec: reply :class:`LeaseFds` once no command is in flight."""

    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class Unfreeze:
    """The re-exec was abandoned: run commands again."""


@attrs.frozen
class LeaseFds:
    """Every held lease's fd in one lockspace."""

    token: int
    lockspace: str
    fds: tuple[tuple[str, int], ...]


Command = AcquireLeases | ReleaseLeases | ReleaseOwner | CreateResource | DeleteResource


_NOTHING: frozenset[str] = frozenset()

# The type tests every message makes, as tuples built once: ``A | B`` in an
# isinstance call builds a union object each time it runs.
_COMMANDS = (AcquireLeases, ReleaseLeases, ReleaseOwner, CreateResource, DeleteResource)
_RELEASES = (ReleaseLeases, ReleaseOwner)
_FILE_COMMANDS = (CreateResource, DeleteResource)
_LEASE_COMMANDS = (AcquireLeases, ReleaseLeases)
_LOCK_REPLIES = (LockTaken, LockRefused)
_JOURNAL_REPLIES = (Appended, AppendFailed)


_RELEASES_BY_REASON = REGISTRY.series("lockd_releases_total")
_REASON_LABELS: dict[ReleaseReason, LabelSet] = {
    reason: (("reason", reason.value),) for reason in ReleaseReason
}
"""Every release counts by its reason: the label sets built once (each exported at 0)."""


@attrs.define
class _InFlight:
    command: Command
    resources: frozenset[str]
    owner: OwnerKey | None
    joining: frozenset[str]
    """The resources it joins, held shared already (a subset of ``resources``)."""
    events: list[Event] = attrs.field(factory=list)
    ahead: _Ahead | None = None
    """The scheduling view it was counted in when it started, if any."""
    waiting_locks: int = 0
    taken: list[str] = attrs.field(factory=list)
    refused: LockRefused | None = None


@attrs.define
class _Ahead:
    """What the commands started or left waiting so far in a scheduling pass hold up.

    Kept after the pass, it is what stands ahead of a command arriving
    later, which is then considered alone instead of in a pass over the
    whole queue: the queued commands, and the commands started since that
    are still in flight (these block what the in-flight counts block too).
    A finish takes its command out, so it stays exact until a finish frees
    something a queued command waits on, which runs a new pass. Counts, so
    that one command can be taken out.
    """

    owners: dict[OwnerKey, int] = attrs.field(factory=dict)
    releasing_owners: dict[OwnerKey, int] = attrs.field(factory=dict)
    """Owners with a ReleaseOwner among them."""
    changes: dict[str, int] = attrs.field(factory=dict)
    """Resources of commands other than releases and joins: they block every command."""
    releases: dict[str, int] = attrs.field(factory=dict)
    joins: dict[str, int] = attrs.field(factory=dict)
    queued_releases: dict[str, int] = attrs.field(factory=dict)
    """Resources of the releases among them still queued (not in flight)."""

    def count(
        self,
        command: Command,
        owner: OwnerKey | None,
        resources: frozenset[str],
        joining: frozenset[str],
        delta: int,
    ) -> None:
        """Count ``command`` in (1) or out (-1)."""
        if isinstance(command, _RELEASES):
            _count(self.releases, resources, delta)
        elif joining:
            _count(self.joins, joining, delta)
            _count(self.changes, resources - joining, delta)
        else:
            _count(self.changes, resources, delta)
        if owner is not None:
            _count(self.owners, (owner,), delta)
            if isinstance(command, ReleaseOwner):
                _count(self.releasing_owners, (owner,), delta)


def _count(
    table: dict[Any, int], keys: Iterable[Any], delta: int, watched: Container[Any] = ()
) -> bool:
    """Add ``delta`` to each key's count (a count of 0 is no entry); True if the
    count of a key in ``watched`` fell to 0."""
    freed = False
    for key in keys:
        n = table.get(key, 0) + delta
        if n:
            table[key] = n
        else:
            del table[key]
            freed = freed or key in watched
    return freed


def _owner_key(command: Command) -> OwnerKey | None:
    if isinstance(command, _LEASE_COMMANDS):
        return command.owner.key
    if isinstance(command, ReleaseOwner):
        return command.owner
    return None


class LockspaceActor(DispatchedActor):
    """Owns one lockspace: its table, its lease actors, its commands in flight."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        name: str,
        files: Any,
        journal: pykka.ActorRef[Any],
        fd_store: FdStoreLike | None = None,
        *,
        router: pykka.ActorRef[Any] | None = None,
        count_holds: bool = False,
    ) -> None:
        super().__init__(dispatcher)
        self.name = name
        self._fd_store = fd_store
        self._files = files
        self._journal = journal
        self._state = core.LockspaceState(name, count_holds=count_holds)
        self._since: dict[tuple[str, OwnerKey], float] = {}
        self._leases: dict[str, pykka.ActorRef[Any]] = {}
        self._tokens = itertools.count(1)
        self._inflight: dict[int, _InFlight] = {}
        # What the commands in flight hold up, kept as they start and finish so a
        # scheduling pass never walks every flight (thousands when VMs exit at once).
        self._busy: dict[str, int] = {}
        """Resources of changes in flight but releases and joins: they block every command."""
        self._busy_releasing: dict[str, int] = {}
        """Resources of releases in flight: they block all but other owners' releases."""
        self._busy_joining: dict[str, int] = {}
        """Resources joined by shared acquires in flight: they block all but other joins."""
        self._flying_owners: dict[OwnerKey, int] = {}
        self._flying_releases: dict[OwnerKey, int] = {}
        """Owners with a ReleaseOwner in flight."""
        self._queued: collections.deque[Command] = collections.deque()
        self._ahead: _Ahead | None = None
        """What stands ahead of a command arriving now, if nothing but arrivals
        came since the last scheduling pass (None: the next arrival runs a pass)."""
        # The resources and owners of the queued commands (since the last pass; a
        # superset): a finish that frees none of them can start none of them.
        self._waited_on: set[str] = set()
        self._waited_by: set[OwnerKey] = set()
        self._restoring: dict[int, _Restoring] = {}
        self._cleanups: set[int] = set()
        self._unjournaled: dict[int, tuple[Event, ...]] = {}
        """Recovery findings (and leases lost since) not journaled yet, retried until recorded."""
        self._retried: set[int] = set()
        self._handoff: HandOff | None = None
        self._frozen = False
        self._relinks: dict[int, tuple[str, pykka.ActorRef[Any]]] = {}
        """Leases whose file was removed or replaced, being locked again where the name is now."""
        self._link_queue: collections.deque[str] = collections.deque()
        self._link_timer: Timer | None = None
        """Armed while a lease is held: an idle lockspace never wakes the daemon."""
        self._link_warned: set[str] = set()
        """Leases whose file could not be locked again, warned about once."""
        self._router: pykka.ActorRef[Any] | None = router
        self.fds: dict[str, int] = {}
        """Lease fds by resource, for the fd store and re-exec (the lease actors own them)."""

    # -- entry ------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _COMMANDS):
            if self._ahead is not None and self._queued and not self._frozen:
                self._consider(message, self._ahead)
            else:
                self._queued.append(message)
                self._run_queued()
            return None
        if isinstance(message, _LOCK_REPLIES) and message.token in self._inflight:
            self._on_lock_reply(message)  # _finish keeps the scheduling view exact
            return None
        if isinstance(message, _JOURNAL_REPLIES) and message.token in self._inflight:
            self._on_journal_reply(message)
            return None
        if isinstance(message, _CheckLinks):
            self._check_links()  # changes nothing the queued commands wait for
            return None
        # Anything else may change what the queued commands wait for: the next
        # arrival runs a full pass.
        self._ahead = None
        if isinstance(message, _LOCK_REPLIES):
            if message.token in self._relinks:
                self._on_relink(message)
            elif message.token in self._restoring:
                self._on_restore_lock(message)
            elif message.token in self._cleanups:
                self._on_cleanup_lock(message)
            else:
                self._on_lock_reply(message)  # for no flight: a bug, which it raises
        elif isinstance(message, _JOURNAL_REPLIES):
            if message.token in self._restoring:
                self._on_restore_journaled(message)
            elif message.token in self._unjournaled:
                self._retry_journal(message)
            else:
                self._on_journal_reply(message)
        elif isinstance(message, Restore):
            self._restore(message)
        elif isinstance(message, HandOff):
            self._handoff = message
            self._maybe_hand_off()
        elif isinstance(message, Unfreeze):
            self._frozen = False  # the re-exec was abandoned: carry on serving
            self._run_queued()
        elif isinstance(message, TakeSnapshot):
            snapshot = self.counts() if message.counts_only else self.snapshot(message.owner)
            tell_if_alive(message.reply_to, SnapshotTaken(message.token, snapshot))
        else:
            return super().on_receive(message)
        return None

    def on_stop(self) -> None:
        # Stopping the daemon keeps every lock: lease actors close their fds
        # only when told to drop, and the process exit closes them otherwise.
        if self._link_timer is not None:
            self._link_timer.cancel()
        self._files.close()

    def counts(self) -> Snapshot:
        """How many leases are held, by mode, and by which owners (no lease views)."""
        shared = 0
        owners: set[OwnerKey] = set()
        for holding in self._state.held.values():
            shared += holding.mode is LeaseMode.SHARED
            owners.update(holding.owners)
        total = len(self._state.held)
        counts = Counts(total - shared, shared, frozenset(owners))
        return Snapshot(self.name, self._files.path, (), counts)

    def snapshot(self, owner: OwnerKey | None = None) -> Snapshot:
        """The lockspace's held leases (or ``owner``'s), sorted by resource."""
        held = self._state.held
        resources = sorted(held) if owner is None else self._state.leases_of(owner)
        return Snapshot(
            self.name,
            self._files.path,
            tuple(
                LeaseView(
                    self.name,
                    resource,
                    holding.mode,
                    tuple(
                        Holder(who, self._since.get((resource, key), 0.0), holding.holds(key))
                        for key, who in sorted(holding.owners.items())
                    ),
                )
                for resource, holding in ((r, held[r]) for r in resources)
            ),
        )

    # -- scheduling of commands ---------------------------------------------
    def _resources_of(self, command: Command) -> frozenset[str]:
        if isinstance(command, AcquireLeases):
            return frozenset(r for r, _ in command.items)
        if isinstance(command, ReleaseLeases):
            return frozenset(command.resources)
        if isinstance(command, ReleaseOwner):
            return frozenset(self._state.leases_of(command.owner))
        return frozenset({command.resource})

    def _joins(self, command: Command) -> frozenset[str]:
        """The resources ``command`` would join: shared, and held shared already."""
        if not isinstance(command, AcquireLeases):
            return _NOTHING
        held = self._state.held
        joins = [
            resource
            for resource, mode in command.items
            if mode is LeaseMode.SHARED
            and (holding := held.get(resource)) is not None
            and holding.mode is LeaseMode.SHARED
        ]
        return frozenset(joins) if joins else _NOTHING

    def _run_queued(self) -> None:
        """Start every queued command that conflicts with nothing in flight or ahead of it.

        Its cost per queued command must not grow with the leases held: a
        release of an owner queued behind another release of the same owner is
        passed over without listing its leases (the one ahead covers them
        all). And it runs only when it may start something: a command that
        arrives while others wait is considered alone (``_ahead``), and a
        finish runs a pass only if it freed a resource or an owner some queued
        command waits on (``_finish``). So neither a queue that fills up nor
        one that drains costs a pass per command.
        """
        self._ahead = None
        if self._frozen:
            return
        self._waited_on.clear()
        self._waited_by.clear()
        if not self._inflight and len(self._queued) == 1:
            # The common case (one client at a time here): nothing to order against.
            command = self._queued.popleft()
            self._start(
                command, self._resources_of(command), _owner_key(command), self._joins(command)
            )
            return
        ahead = _Ahead()
        queued, self._queued = self._queued, collections.deque()
        for command in queued:
            self._consider(command, ahead)
        self._ahead = ahead

    def _consider(self, command: Command, ahead: _Ahead) -> None:
        """Start ``command`` unless something in flight or ``ahead`` of it blocks it.

        Commands on a resource run in the order they came, except where they
        commute:

        - releases by different owners: each removes only its own holder, and
          whichever is applied last drops the kernel lock. When every VM
          sharing a base image exits at once, the releases all start in one
          pass instead of one per pass (1,024 such owners took 685 s to
          release when they queued one behind the other);
        - shared acquires joining a lease held shared: each adds only its own
          holder, and the kernel lock is held already. When the VMs sharing a
          base image all start at once, they join it together instead of one
          per pass (1,024 such VMs took 4 s to start, quadratic in their number);
        - a release and a join, while a holder that no release in flight takes
          away is left (``_outlives``): otherwise the last release would drop
          the kernel lock under the join. VMs stopping while others start then
          do not take turns on their base image (500 of each, their requests
          alternating, took 4.7 s against the daemon, one pass per command).

        A command that waits is queued, and what it would touch is added to
        ``ahead``, so later commands on the same things keep its place.
        """
        owner = _owner_key(command)
        if isinstance(command, ReleaseOwner) and (
            command.owner in ahead.releasing_owners or command.owner in self._flying_releases
        ):
            self._queued.append(command)  # the same owner's release ahead covers all it holds
            self._waited_by.add(command.owner)
            return
        resources = self._resources_of(command)
        release = isinstance(command, _RELEASES)
        joining = _NOTHING if release else self._joins(command)
        blocked = self._blocked(owner, resources, joining, release, ahead)
        if blocked:
            self._queued.append(command)
            if release:
                _count(ahead.queued_releases, resources, 1)
            self._waited_on.update(resources)
            if owner is not None:
                self._waited_by.add(owner)
        else:
            flight = self._start(command, resources, owner, joining)
            if flight is None:
                # Answered at once (refused, or nothing to do): it holds nothing up.
                # Kept as blocking, it could leave the rest waiting for a pass that
                # nothing in flight would ever start.
                return
            flight.ahead = ahead
        # Whatever ran or waits here blocks later commands on the same things.
        ahead.count(command, owner, resources, joining, 1)

    def _blocked(
        self,
        owner: OwnerKey | None,
        resources: frozenset[str],
        joining: frozenset[str],
        release: bool,
        ahead: _Ahead,
    ) -> bool:
        """Whether something in flight or ``ahead`` keeps a command waiting (``_consider``)."""
        if owner is not None and (owner in ahead.owners or owner in self._flying_owners):
            return True
        busy, joined, releasing = self._busy, self._busy_joining, self._busy_releasing
        if release:  # waits for changes, and for joins if it could end the lease
            if not (resources.isdisjoint(ahead.changes) and busy.keys().isdisjoint(resources)):
                return True
            # Releases queued ahead count too: overtaking a queued join, this one
            # must not let them end the lease before the join runs.
            joins, queued = ahead.joins, ahead.queued_releases
            return any(
                (r in joined or r in joins) and not self._outlives(r, 1 + queued.get(r, 0))
                for r in resources
            )
        changing = resources - joining if joining else resources
        if not (
            changing.isdisjoint(ahead.changes)
            and changing.isdisjoint(ahead.joins)
            and changing.isdisjoint(ahead.releases)
            and busy.keys().isdisjoint(changing)
            and joined.keys().isdisjoint(changing)
            and releasing.keys().isdisjoint(changing)
        ):
            return True
        # A join waits for changes, and for releases in flight only if they could
        # end the lease.
        return bool(joining) and (
            not (joining.isdisjoint(ahead.changes) and busy.keys().isdisjoint(joining))
            or any(r in releasing and not self._outlives(r, 0) for r in joining)
        )

    def _outlives(self, resource: str, releases: int) -> bool:
        """Whether ``resource`` keeps a holder that no release in flight, nor
        ``releases`` more about to start, takes away. Then none of those releases
        can end the lease, and joins may run alongside them: releases applied
        keep this count as it is, joins applied raise it."""
        holding = self._state.held.get(resource)
        holders = len(holding.owners) if holding is not None else 0
        return holders - self._busy_releasing.get(resource, 0) - releases >= 1

    def _start(
        self,
        command: Command,
        resources: frozenset[str],
        owner: OwnerKey | None,
        joining: frozenset[str],
    ) -> _InFlight | None:
        """Decide ``command`` and set it going: its flight, or None if it was answered
        at once (refused, or nothing to do)."""
        # Checked only while recovery's findings wait for the journal (rarely): the
        # set was built and intersected for every command.
        if self._unjournaled and (pending := self._unjournaled_resources() & resources):
            # Recovery's findings on these leases are not in the journal yet:
            # a change now would be journaled before them, out of order.
            refusal = core.Refusal(
                ErrorCode.IO_ERROR,
                f"the journal has not recorded recovery of {self.name}/{min(pending)} yet; "
                "retry when it is writable again",
            )
            self._reply(command, Done(command.token, self.name, refusal=refusal))
            return None
        if isinstance(command, _FILE_COMMANDS):
            return self._file_command(command)
        if isinstance(command, AcquireLeases):
            decision = core.decide(
                self._state,
                core.Acquire(
                    command.owner, command.items, command.autocreate, command.conn, command.once
                ),
            )
        elif isinstance(command, ReleaseLeases):
            decision = core.decide(
                self._state,
                core.Release(
                    command.owner, command.resources, command.conn, command.reason, command.once
                ),
            )
        else:
            decision = core.decide(
                self._state, core.ReleaseOwner(command.owner, command.conn, command.reason)
            )
        if isinstance(decision, core.Refusal):
            self._reply(command, Done(command.token, self.name, refusal=decision))
            return None
        if isinstance(decision, core.Repeated):
            self._reply(command, Done(command.token, self.name, repeated=decision.resources))
            return None
        if not decision:
            self._reply(command, Done(command.token, self.name))
            return None
        token = next(self._tokens)
        flight = _InFlight(command, resources, owner, joining, list(decision))
        self._inflight[token] = flight
        self._track_in(flight)
        if isinstance(command, AcquireLeases):
            for event in decision:
                assert isinstance(event, LeaseAcquired)
                if event.resource not in self._state.held:
                    take = TakeLock(event.mode, command.autocreate, token, self.actor_ref)
                    ref = LeaseActor.start(
                        self.dispatcher, self._files, self.name, event.resource, take
                    )
                    self._leases[event.resource] = ref
                    flight.waiting_locks += 1
            if flight.waiting_locks:
                return flight
        self._journal.tell(Append(tuple(flight.events), token, self.actor_ref))
        return flight

    def _reply(self, command: Command, done: Done) -> None:
        if command.reply_to is not None:
            tell_if_alive(command.reply_to, done)

    def _track_in(self, flight: _InFlight) -> None:
        """Count ``flight`` in to what the commands in flight hold up (:meth:`_track_out`).

        Twice per command (in and out): the common case of no joins is counted
        here, not through :func:`_count`, whose calls and ``(owner,)`` tuples were
        2% of a pair's bytecodes."""
        command = flight.command
        counts = self._busy_releasing if isinstance(command, _RELEASES) else self._busy
        joining = flight.joining
        if joining:
            _count(self._busy_joining, joining, 1)
            _count(counts, flight.resources - joining, 1)
        else:
            for resource in flight.resources:
                counts[resource] = counts.get(resource, 0) + 1
        owner = flight.owner
        if owner is not None:
            flying = self._flying_owners
            flying[owner] = flying.get(owner, 0) + 1
            if isinstance(command, ReleaseOwner):
                _count(self._flying_releases, (owner,), 1)

    def _track_out(self, flight: _InFlight) -> bool:
        """Count ``flight`` out of what the commands in flight hold up.

        True if that freed a resource or owner some queued command waits on: only
        then can a queued command start."""
        command = flight.command
        counts = self._busy_releasing if isinstance(command, _RELEASES) else self._busy
        joining, waited = flight.joining, self._waited_on
        freed = False
        if joining:
            freed = _count(self._busy_joining, joining, -1, waited)
            freed = _count(counts, flight.resources - joining, -1, waited) or freed
        else:
            for resource in flight.resources:  # _count, inline (see _track_in)
                n = counts.get(resource, 0) - 1
                if n:
                    counts[resource] = n
                else:
                    del counts[resource]
                    freed = freed or resource in waited
        owner = flight.owner
        if owner is not None:
            flying = self._flying_owners
            n = flying.get(owner, 0) - 1
            if n:
                flying[owner] = n
            else:
                del flying[owner]
                freed = freed or owner in self._waited_by
            if isinstance(command, ReleaseOwner):
                freed = _count(self._flying_releases, (owner,), -1, self._waited_by) or freed
        return freed

    def _finish(self, token: int, *, applied: bool = False) -> None:
        # A queued command waits on a resource or owner something in flight holds, or
        # on a queued command ahead of it that does. A finish that frees none of
        # those starts nothing: VMs stopping while others start took a pass over
        # every waiting start per stop (1,000 of each: 3.4 s, quadratic).
        flight = self._inflight.pop(token)
        freed = self._track_out(flight)
        release = isinstance(flight.command, _RELEASES)
        if not freed and ((applied and flight.joining) or (release and not applied)):
            # A join applied adds a holder, a release refused keeps one: either may
            # let a waiting release or join through (_outlives). A release applied
            # takes away one holder and one release in flight together, which lets
            # nothing through; that holds because a release is all or nothing and
            # covers only what its owner holds (core.decide, leases_of).
            waited = self._waited_on
            freed = any(r in waited for r in (flight.joining or flight.resources))
        ahead = self._ahead
        if ahead is not None and flight.ahead is ahead:
            ahead.count(flight.command, flight.owner, flight.resources, flight.joining, -1)
        if freed and self._queued:
            self._run_queued()
        self._maybe_hand_off()

    def _maybe_hand_off(self) -> None:
        if (
            self._handoff is None
            or self._inflight
            or self._queued
            or self._restoring
            or self._relinks
        ):
            return
        handoff, self._handoff = self._handoff, None
        # Frozen from here on: the fds listed are about to pass to the next
        # daemon, so nothing may drop or replace them.
        self._frozen = True
        fds = tuple(sorted(self.fds.items()))
        tell_if_alive(handoff.reply_to, LeaseFds(handoff.token, self.name, fds))

    # -- kernel locks ---------------------------------------------------------
    def _on_lock_reply(self, message: LockTaken | LockRefused) -> None:
        flight = self._inflight[message.token]
        flight.waiting_locks -= 1
        if isinstance(message, LockTaken):
            flight.taken.append(message.resource)
            self.fds[message.resource] = message.fd
            self._arm_link_check()
        else:
            ref = self._leases.pop(message.resource, None)
            if ref is not None:
                ref.tell(DropLock(unlink=False))  # it holds nothing: this just stops it
            if flight.refused is None:
                flight.refused = message
        if flight.waiting_locks:
            return
        command = flight.command
        assert isinstance(command, AcquireLeases)
        if flight.refused is not None:
            self._drop_locks(flight.taken, unlink=command.autocreate)
            refused = flight.refused
            # A lease held elsewhere is named in full by the lease actor, as the holders
            # of one held here are: the client tells the user which of its disks it is
            # (lockd.commands._label_of).
            text = refused.message
            if refused.code is ErrorCode.NOT_FOUND:
                # "lease file vm1 does not exist" named neither the lockspace, nor where
                # the daemon looked, nor how a lease file comes to be.
                text = f"lease {self.name}/{refused.resource} does not exist: {text}"
            self._reply(
                command, Done(command.token, self.name, refusal=core.Refusal(refused.code, text))
            )
            self._finish(message.token)
            return
        if self._fd_store is not None:
            # Stored before the journal write, not after: a crash after the write then
            # finds the lock kept in the store (stored after its reply, the lease a
            # crash in between left journaled was free until the restart took it again,
            # and anyone could take it meanwhile). A crash before the write leaves a
            # stored fd no lease owns, which the restart drops; so does a failed write.
            for resource in flight.taken:
                self._fd_store.store(self.name, resource, self.fds[resource])
        crash_point("acquire-locked")
        self._journal.tell(Append(tuple(flight.events), message.token, self.actor_ref))

    def _drop_locks(self, resources: list[str], *, unlink: bool) -> None:
        for resource in resources:
            if self.fds.pop(resource, None) is not None and self._fd_store is not None:
                self._fd_store.remove(self.name, resource)
            # Taken again later and tampered with again, it is warned about again.
            self._link_warned.discard(resource)
            ref = self._leases.pop(resource, None)
            if ref is not None:
                ref.tell(DropLock(unlink))

    # -- journal --------------------------------------------------------------
    def _on_journal_reply(self, message: Appended | AppendFailed) -> None:
        flight = self._inflight[message.token]
        command = flight.command
        if isinstance(message, AppendFailed):
            if isinstance(command, AcquireLeases):
                self._drop_locks(flight.taken, unlink=command.autocreate)
            # A release that cannot be journaled keeps the lease (and its lock):
            # holding a lock too long is safe, dropping it unrecorded is not.
            self._reply(
                command,
                Done(
                    command.token,
                    self.name,
                    refusal=core.Refusal(ErrorCode.IO_ERROR, message.message),
                ),
            )
            self._finish(message.token)
            return
        crash_point(
            "acquire-journaled" if isinstance(command, AcquireLeases) else "release-journaled"
        )
        for entry in message.entries:
            self._apply(entry)
        self._reply(command, Done(command.token, self.name, entries=message.entries))
        self._finish(message.token, applied=True)

    def _apply(self, entry: JournalEntry) -> None:
        event = entry.event
        if isinstance(event, LeaseAcquired):
            core.apply(self._state, event)
            if event.holds is None:  # held since its first hold
                self._since[(event.resource, event.owner.key)] = entry.time
        elif isinstance(event, LeaseReleased):
            _RELEASES_BY_REASON[_REASON_LABELS[event.reason]] += 1
            holding = self._state.held.get(event.resource)
            core.apply(self._state, event)
            if event.holds is None:
                self._since.pop((event.resource, event.owner.key), None)
                if holding is not None and event.resource not in self._state.held:
                    self._drop_locks([event.resource], unlink=holding.autocreate)

    # -- create-resource / delete-resource --------------------------------------
    def _file_command(self, command: CreateResource | DeleteResource) -> _InFlight | None:
        """Plain file operations: fast syscalls, done inline under the index lock."""
        resource = command.resource
        if isinstance(command, DeleteResource) and resource in self._state.held:
            holding = self._state.held[resource]
            refusal = core.refuse_busy(self._state, resource, holding)
            self._reply(command, Done(command.token, self.name, refusal=refusal))
            return None
        try:
            if isinstance(command, CreateResource):
                if self._lease_file_exists(resource):
                    # Nothing is created: no event (one said so at every create of a
                    # file there already, and the history had it created again and again).
                    self._reply(command, Done(command.token, self.name))
                    return None
                held = self._files.open_lease(resource, create=True)
                self._files.close_fd(held.fd)
                event: Event = ResourceCreated(self.name, resource, command.conn)
            else:
                self._delete_file(resource)
                event = ResourceDeleted(self.name, resource, command.conn)
        except LockspaceGoneError as exc:
            refusal = core.Refusal(ErrorCode.NOT_FOUND, lockspace_gone(self.name, exc.filename))
            self._reply(command, Done(command.token, self.name, refusal=refusal))
            return None
        except FileNotFoundError:
            refusal = core.Refusal(
                ErrorCode.NOT_FOUND, f"lease {self.name}/{resource} does not exist"
            )
            self._reply(command, Done(command.token, self.name, refusal=refusal))
            return None
        except LockBusyError:
            refusal = core.Refusal(
                ErrorCode.BUSY, f"lease {self.name}/{resource} is in use by another process or host"
            )
            self._reply(command, Done(command.token, self.name, refusal=refusal))
            return None
        except OSError as exc:
            refusal = core.Refusal(ErrorCode.IO_ERROR, f"lease {self.name}/{resource}: {exc}")
            self._reply(command, Done(command.token, self.name, refusal=refusal))
            return None
        token = next(self._tokens)
        flight = _InFlight(command, frozenset({resource}), None, _NOTHING, [event])
        self._inflight[token] = flight
        self._track_in(flight)
        self._journal.tell(Append((event,), token, self.actor_ref))
        return flight

    def _lease_file_exists(self, resource: str) -> bool:
        """Whether ``resource``'s lease file is there (opened and closed, not locked)."""
        try:
            held = self._files.open_lease(resource, create=False)
        except LockspaceGoneError:
            raise  # said as such, not "does not exist" (create-resource would make it)
        except FileNotFoundError:
            return False
        self._files.close_fd(held.fd)
        return True

    def _delete_file(self, resource: str) -> None:
        """Unlink a lease file only under an exclusive lock on the inode its name names.

        A file another host replaced between our open and our lock is opened
        again: unlinking the name then would delete the new file, which that
        host may hold. Raises FileNotFoundError, LockBusyError or OSError.
        """
        for _ in range(REOPEN_ATTEMPTS):
            held = self._files.open_lease(resource, create=False)
            try:
                self._files.try_lock(held.fd, shared=False)
                if self._files.still_linked(held, resource):
                    self._files.unlink_lease(resource)
                    return
            finally:
                self._files.close_fd(held.fd)
        raise LockBusyError(f"lease file {resource} keeps being replaced by another host")

    # -- recovery -------------------------------------------------------------------
    def _restore(self, request: Restore) -> None:
        """Take the kernel lock again for every lease with a live owner (or adopt its fd)."""
        request = attrs.evolve(request, leases=tuple(map(self._adoptable, request.leases)))
        self._state.once.restore(request.once)
        token = next(self._tokens)
        restoring = _Restoring(request)
        self._restoring[token] = restoring
        for lease in request.leases:
            if not lease.live:
                if lease.fd is not None:
                    # Unlocked, not only closed: the store's copy would keep the lock
                    # until the manager gets to the FDSTOREREMOVE (for good if it is lost).
                    self._files.release_fd(lease.fd)
                    if self._fd_store is not None:
                        self._fd_store.remove(self.name, lease.resource)
                if lease.autocreate:
                    self._cleanup(lease.resource)
                continue
            first: AdoptLock | TakeLock
            if lease.fd is not None:
                first = AdoptLock(lease.fd, lease.mode, token, self.actor_ref)
            else:
                # The file normally exists: open it without the index lock, and
                # only create it (under the index lock) if it went missing.
                first = TakeLock(lease.mode, False, token, self.actor_ref)
                restoring.fresh.add(lease.resource)
            ref = LeaseActor.start(self.dispatcher, self._files, self.name, lease.resource, first)
            self._leases[lease.resource] = ref
            restoring.waiting += 1
        if not restoring.waiting:
            self._restore_journal(token)

    def _adoptable(self, lease: RestoreLease) -> RestoreLease:
        """``lease``, without its handed fd if that is open on another file than the one
        its name in this directory is now.

        The service manager keeps a lease's fd across a stop, so a restart that serves
        the lockspace from another directory (``lock_dir`` or ``[lockspaces]`` moved,
        which takes a restart) gets back fds locking the old files. Adopted, the lease
        was reported held while its file here was free for any other host to take (or
        did not exist). The fd is closed (its lock protects nothing now) and dropped
        from the store, and the lease is locked on its file here like any other.
        """
        if lease.fd is None or not lease.live or self._files.names_fd(lease.fd, lease.resource):
            return lease
        log.warning("recovery: lease %s/%s: the fd handed over is open on another file than "
                    "the lease file there now (moved while lockd was down?); locking that one",
                    self.name, lease.resource)  # fmt: skip
        self._files.release_fd(lease.fd)  # the store's copy must not keep the old file locked
        if self._fd_store is not None:
            self._fd_store.remove(self.name, lease.resource)
        return attrs.evolve(lease, fd=None)

    def _cleanup(self, resource: str) -> None:
        """Remove an autocreated lease file whose owners all died, as their release would have.

        Only after winning an exclusive lock on it: another host may use it.
        """
        token = next(self._tokens)
        self._cleanups.add(token)
        take = TakeLock(LeaseMode.EXCLUSIVE, False, token, self.actor_ref)
        self._leases[resource] = LeaseActor.start(
            self.dispatcher, self._files, self.name, resource, take
        )

    def _on_cleanup_lock(self, message: LockTaken | LockRefused) -> None:
        self._cleanups.discard(message.token)
        ref = self._leases.pop(message.resource, None)
        if ref is not None:
            ref.tell(DropLock(unlink=isinstance(message, LockTaken)))

    def _on_restore_lock(self, message: LockTaken | LockRefused) -> None:
        restoring = self._restoring[message.token]
        if (
            isinstance(message, LockRefused)
            and message.code is ErrorCode.NOT_FOUND
            and message.resource not in restoring.recreated
        ):
            restoring.recreated.add(message.resource)
            lease = next(x for x in restoring.request.leases if x.resource == message.resource)
            self._leases[message.resource].tell(
                TakeLock(lease.mode, True, message.token, self.actor_ref)
            )
            return
        if isinstance(message, LockRefused) and self._retry_restore(restoring, message):
            return
        restoring.waiting -= 1
        if isinstance(message, LockTaken):
            restoring.taken[message.resource] = message.fd
            if self._fd_store is not None and message.resource in restoring.fresh:
                # Stored now, before the findings are journaled (as an acquire's before
                # its lease-acquired): the journal says this lease is held, and a crash
                # until the store had it would leave its lock free until the restart.
                self._fd_store.store(self.name, message.resource, message.fd)
        else:
            restoring.refused[message.resource] = message
            self._unstore(restoring, message.resource)
            ref = self._leases.pop(message.resource, None)
            if ref is not None:
                ref.tell(DropLock(unlink=False))
        if not restoring.waiting:
            self._restore_journal(message.token)

    def _unstore(self, restoring: _Restoring, resource: str) -> None:
        """The lease is lost: the service manager drops its copy of the adopted fd.

        Kept, that copy would hold on to a lock lockd no longer tracks (a
        lease-lost VM's lock, for one), and the next restart would adopt it.
        """
        lease = next(x for x in restoring.request.leases if x.resource == resource)
        if lease.fd is not None and self._fd_store is not None:
            self._fd_store.remove(self.name, resource)

    def _retry_restore(self, restoring: _Restoring, refused: LockRefused) -> bool:
        """Try a live owner's lease again later, unless someone else holds it.

        A refusal that is not another holder's lock (another host holding the
        index lock while it creates or deletes some file, a file being replaced,
        an I/O error) does not mean the lease was taken: recorded as lost, it
        would get a live VM fenced whose disk nobody else holds. Recovery (and
        with it every request) waits up to RESTORE_RETRY_SECONDS for it.
        """
        resource = refused.resource
        tries = restoring.retries.get(resource, 0)
        if refused.held_elsewhere or tries >= RESTORE_RETRIES:
            return False
        restoring.retries[resource] = tries + 1
        if tries == 0:
            log.warning("recovery: lease %s/%s: %s; trying again for up to %g s",
                        self.name, resource, refused.message, RESTORE_RETRY_SECONDS)  # fmt: skip
        lease = next(x for x in restoring.request.leases if x.resource == resource)
        again: AdoptLock | TakeLock
        if lease.fd is not None:
            # The lease actor kept the adopted fd open: the same open file description
            # as the previous daemon's (and the fd store's copy), so its lock, if it
            # still has one, is never let go; a new open would conflict with it.
            again = AdoptLock(lease.fd, lease.mode, refused.token, self.actor_ref)
        else:
            again = TakeLock(lease.mode, resource in restoring.recreated, refused.token,
                             self.actor_ref)  # fmt: skip
        ref = self._leases[resource]
        self.dispatcher.call_later(
            RESTORE_RETRY_SECONDS / RESTORE_RETRIES, lambda: tell_if_alive(ref, again)
        )
        return True

    def _restore_journal(self, token: int) -> None:
        restoring = self._restoring[token]
        events: list[Event] = []
        for lease in restoring.request.leases:
            events.extend(
                LeaseReleased(
                    self.name, lease.resource, lease.mode, owner, 0, ReleaseReason.OWNER_GONE
                )
                for owner in lease.dead
            )
            if lease.dead:
                REGISTRY.inc("lockd_releases_total", len(lease.dead), reason="owner-gone")
            refused = restoring.refused.get(lease.resource)
            if refused is not None:
                REGISTRY.inc("lockd_leases_lost_total", len(lease.live))
                events.extend(
                    LeaseLost(self.name, lease.resource, lease.mode, owner, refused.message)
                    for owner, _ in lease.live
                )
        restoring.events = tuple(events)
        if events:
            self._journal.tell(Append(tuple(events), token, self.actor_ref))
        else:
            self._on_restore_journaled(Appended(token, ()))

    def _unjournaled_resources(self) -> set[str]:
        return {
            e.resource  # type: ignore[attr-defined]
            for events in self._unjournaled.values()
            for e in events
        }

    def _schedule_journal_retry(self, token: int) -> None:
        self._retried.add(token)
        ref = self.actor_ref
        events = self._unjournaled[token]
        self.dispatcher.call_later(
            1.0, lambda: self._journal.tell(Append(events, token, ref)) if ref.is_alive() else None
        )

    def _retry_journal(self, message: Appended | AppendFailed) -> None:
        if isinstance(message, AppendFailed):
            if message.token not in self._retried:
                log.error("lockspace %s: cannot journal lost leases (%s); retrying",
                          self.name, message.message)  # fmt: skip
            self._schedule_journal_retry(message.token)
        else:
            del self._unjournaled[message.token]
            if message.token in self._retried:
                self._retried.discard(message.token)
                log.info("lockspace %s: findings journaled after a retry", self.name)

    def _on_restore_journaled(self, message: Appended | AppendFailed) -> None:
        restoring = self._restoring.pop(message.token)
        if restoring.events and isinstance(message, Appended):
            crash_point("restore-journaled")
        request = restoring.request
        if isinstance(message, AppendFailed):
            # What recovery found is what the daemon now holds: keep offering
            # it to the journal until it is recorded, so journal and tables agree.
            log.error("lockspace %s: recovery could not journal its findings (%s); retrying",
                      self.name, message.message)  # fmt: skip
            self._unjournaled[message.token] = restoring.events
            self._schedule_journal_retry(message.token)
        lost: list[tuple[Owner, str]] = []
        unlocked: list[tuple[str, str]] = []
        released = 0
        for lease in request.leases:
            released += len(lease.dead)
            refused = restoring.refused.get(lease.resource)
            if refused is not None:
                lost.extend((owner, lease.resource) for owner, _ in lease.live)
                if lease.live and not refused.held_elsewhere:
                    unlocked.append((lease.resource, refused.message))
                continue
            if not lease.live:
                continue
            self.fds[lease.resource] = restoring.taken[lease.resource]  # stored when taken
            self._arm_link_check()
            holds = dict(lease.holds)
            for owner, since in lease.live:
                self._state.add(
                    lease.resource, owner, lease.mode, lease.autocreate, holds.get(owner.key, 1)
                )
                self._since[(lease.resource, owner.key)] = since
        tell_if_alive(
            request.reply_to,
            Restored(
                request.token, self.name, len(restoring.taken), released, tuple(lost),
                tuple(unlocked),
            ),
        )  # fmt: skip

    # -- lease files removed or replaced under a held lock -----------------------------
    def _arm_link_check(self) -> None:
        if self._link_timer is None:
            ref = self.actor_ref
            self._link_timer = self.dispatcher.call_later(
                LINK_CHECK_SECONDS, lambda: tell_if_alive(ref, _CheckLinks())
            )

    def _changing(self, resource: str) -> bool:
        """A command in flight may add to ``resource``'s holders (a join): a relink waits.

        Releases in flight do not hold it up: one applied after a lease is lost
        finds nothing to release (nor does replay), and a release retried while the
        journal fails, of a VM that exited, would otherwise keep a lease whose file
        another host now holds listed as held until the journal heals."""
        return bool(self._busy.get(resource) or self._busy_joining.get(resource))

    def _check_links(self) -> None:
        """Lock again, where its name is now, a lease whose file was removed or replaced.

        Nothing in lockd, virtlockd or the index protocol unlinks a file another
        holds locked, but an operator's ``rm`` and virtlockd's delete-resource
        (which takes no lock) do. The lock then protects nothing: the next
        acquire anywhere creates the file again and gets the disk, while this
        host still reports the lease held (two VMs on one disk). Each check looks
        at the next LINK_CHECK_BATCH leases, round after round.
        """
        self._link_timer = None
        if not self.fds:
            self._link_warned.clear()
            return
        self._arm_link_check()
        if self._frozen or self._handoff is not None or self._restoring:
            return
        if self._files.follow_path():
            self._link_queue.clear()  # a round starts now over every lease, in the new one
        if not self._link_queue:
            self._link_queue.extend(self.fds)
        relinking = {resource for resource, _ in self._relinks.values()}
        for _ in range(min(LINK_CHECK_BATCH, len(self._link_queue))):
            resource = self._link_queue.popleft()
            fd = self.fds.get(resource)
            ref = self._leases.get(resource)
            if fd is None or ref is None or resource in relinking or self._changing(resource):
                continue
            if self._files.names_fd(fd, resource):
                continue
            if resource not in self._link_warned:
                log.warning("lease %s/%s: its file was removed or replaced while held; "
                            "locking the file its name names now", self.name, resource)  # fmt: skip
            token = next(self._tokens)
            self._relinks[token] = (resource, ref)
            ref.tell(Relink(token, self.actor_ref))

    def _on_relink(self, message: LockTaken | LockRefused) -> None:
        resource, ref = self._relinks.pop(message.token)
        if self._leases.get(resource) is not ref or resource not in self.fds:
            self._maybe_hand_off()  # released meanwhile: its DropLock closes what it holds
            return
        if isinstance(message, LockTaken):
            if self.fds[resource] != message.fd:
                self.fds[resource] = message.fd
                if self._fd_store is not None:
                    self._fd_store.remove(self.name, resource)
                    self._fd_store.store(self.name, resource, message.fd)
                log.info("lease %s/%s: locked again on its file", self.name, resource)
            self._link_warned.discard(resource)
        elif message.held_elsewhere and not self._changing(resource):
            self._link_warned.discard(resource)
            self._lose(resource, message.message)
        elif resource not in self._link_warned:
            # Not known to be taken (the index lock busy, an I/O error, a symlink put
            # in its place), or a command on it is in flight: each round tries again.
            self._link_warned.add(resource)
            log.warning("lease %s/%s: cannot lock its file again yet (%s); trying again "
                        "every %g s", self.name, resource, message.message,
                        LINK_CHECK_SECONDS)  # fmt: skip
        self._maybe_hand_off()

    def _lose(self, resource: str, why: str) -> None:
        """Another process or host locked the file the lease's name names now: the
        lease is lost, as recovery records one taken while lockd was down."""
        holding = self._state.held[resource]
        owners = list(holding.owners.values())
        events = tuple(
            LeaseLost(self.name, resource, holding.mode, owner, f"lease file replaced: {why}")
            for owner in owners
        )
        for owner in owners:
            log.error("%s lost lease %s/%s: its file was removed or replaced, and another "
                      "process or host holds the new one", owner.describe(), self.name,
                      resource)  # fmt: skip
            self._state.remove(resource, owner.key)
            self._since.pop((resource, owner.key), None)
        REGISTRY.inc("lockd_leases_lost_total", len(owners))
        self._drop_locks([resource], unlink=False)
        # Until recorded, changes to this lease are refused (as for recovery's findings):
        # none may be journaled before its loss.
        token = next(self._tokens)
        self._unjournaled[token] = events
        self._journal.tell(Append(events, token, self.actor_ref))
        if self._router is not None:
            self._router.tell(LeasesLost(tuple((o, f"{self.name}/{resource}") for o in owners)))
