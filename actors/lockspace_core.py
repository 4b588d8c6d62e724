"""Pure core of a lockspace: who holds which lease, and what a command would change.

``decide(state, command)`` returns the events a command produces, or a
:class:`Refusal`; ``apply(state, event)`` folds an event into the state.
Recovery is the same fold over the journal. No I/O and no threads: the
LockspaceActor wraps this with the kernel locks and the journal.

``apply`` updates the state in place and returns it: a lockspace holds up to
thousands of leases, and copying the table per event would make every acquire
cost O(leases).
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from actors.events import Event, LeaseAcquired, LeaseLost, LeaseReleased, ReleaseReason
from actors.model import LeaseMode, Owner, OwnerKey
from protocol.errors import ErrorCode


@attrs.define
class Holding:
    """One held lease: its mode and owners."""

    mode: LeaseMode
    owners: dict[OwnerKey, Owner]
    autocreate: bool
    extra: dict[OwnerKey, int] | None = None
    """Holds beyond the first, of owners that asked again for this lease shared (None:
    none did, as nearly always). An owner holds it until as many releases, as in
    virtlockd: a VM given one shareable image twice keeps it until its last detach."""

    def holds(self, owner: OwnerKey) -> int:
        """How many times ``owner`` holds this lease (0: not at all)."""
        if owner not in self.owners:
            return 0
        return 1 if self.extra is None else 1 + self.extra.get(owner, 0)


ONCE_PER_OWNER = 8
"""Keys kept per owner and lockspace: the newest requests, the ones a caller that lost
its reply repeats."""
ONCE_LEASES = 16_384
"""Leases named by all the records of one lockspace together (the scale target's
leases): past it the oldest records go, whoever's they are."""
OWNER_ENDS = frozenset(
    {ReleaseReason.OWNER_EXIT, ReleaseReason.DISCONNECT, ReleaseReason.ADMIN,
     ReleaseReason.OWNER_GONE, ReleaseReason.RECOVERY}
)  # fmt: skip
"""Release reasons that end the owner's leases for good: its keys go with them."""


@attrs.frozen
class Applied:
    """What a request carrying a key (``once``) did in one lockspace: what its repeat
    answers from."""

    release: bool
    """A release (False: an acquire)."""
    leases: tuple[tuple[str, LeaseMode], ...]
    """The leases it acquired or released here, in journal order."""

    def resources(self) -> tuple[str, ...]:
        """The resources of :attr:`leases`."""
        return tuple(resource for resource, _ in self.leases)


@attrs.define
class OnceKeys:
    """The keys of one lockspace's recent keyed requests, per owner, bounded.

    Folded from the ``once`` of the events (the live table and the journal's replay
    alike); a rollback forgets its acquire's key (the request took nothing in the end,
    and a repeat runs anew), an owner's end forgets all of its keys here."""

    records: dict[tuple[OwnerKey, bytes], Applied] = attrs.field(factory=dict)
    """Oldest first (insertion order)."""
    keys_of: dict[OwnerKey, list[bytes]] = attrs.field(factory=dict)
    leases: int = 0
    """Leases named by all of :attr:`records`."""

    def get(self, owner: OwnerKey, key: bytes) -> Applied | None:
        """What ``owner``'s request with ``key`` did here, if it is kept."""
        return self.records.get((owner, key))

    def note(
        self, owner: OwnerKey, key: bytes, release: bool, resource: str, mode: LeaseMode
    ) -> None:
        """One event of ``owner``'s request with ``key`` was journaled."""
        records = self.records
        earlier = records.get((owner, key))
        if earlier is not None and earlier.release is release:
            records[(owner, key)] = Applied(release, (*earlier.leases, (resource, mode)))
        else:
            if earlier is not None:  # an acquire's key, forgotten unrolled: replace it
                self._forget(owner, key)
            records[(owner, key)] = Applied(release, ((resource, mode),))
            mine = self.keys_of.setdefault(owner, [])
            mine.append(key)
            if len(mine) > ONCE_PER_OWNER:
                self._forget(owner, mine[0])
        self.leases += 1
        while self.leases > ONCE_LEASES and len(records) > 1:
            oldest = next(iter(records))
            self._forget(*oldest)

    def rolled_back(self, owner: OwnerKey, key: bytes) -> None:
        """``owner``'s acquire with ``key`` was undone (its rollback)."""
        applied = self.records.get((owner, key))
        if applied is not None and not applied.release:
            self._forget(owner, key)

    def owner_ended(self, owner: OwnerKey) -> None:
        """``owner``'s leases here ended for good (exit, fence, recovery)."""
        for key in self.keys_of.pop(owner, ()):
            self.leases -= len(self.records.pop((owner, key)).leases)

    def _forget(self, owner: OwnerKey, key: bytes) -> None:
        self.leases -= len(self.records.pop((owner, key)).leases)
        mine = self.keys_of[owner]
        mine.remove(key)
        if not mine:
            del self.keys_of[owner]

    def fold(self, event: Event) -> None:
        """Fold a lease event into the keys (no-op for one without a key, but an end)."""
        if isinstance(event, LeaseAcquired):
            if event.once is not None:
                self.note(event.owner.key, event.once, False, event.resource, event.mode)
        elif isinstance(event, LeaseReleased):
            if event.once is not None:
                if event.reason is ReleaseReason.ROLLBACK:
                    self.rolled_back(event.owner.key, event.once)
                else:
                    self.note(event.owner.key, event.once, True, event.resource, event.mode)
            elif self.keys_of and event.reason in OWNER_ENDS:
                self.owner_ended(event.owner.key)
        elif isinstance(event, LeaseLost) and self.keys_of:
            self.owner_ended(event.owner.key)

    def export(self) -> tuple[tuple[OwnerKey, bytes, Applied], ...]:
        """Every record, oldest first (what recovery hands a lockspace)."""
        return tuple((owner, key, applied) for (owner, key), applied in self.records.items())

    def restore(self, records: tuple[tuple[OwnerKey, bytes, Applied], ...]) -> None:
        """Add ``records`` (from :meth:`export`), oldest first."""
        for owner, key, applied in records:
            for resource, mode in applied.leases:
                self.note(owner, key, applied.release, resource, mode)


@attrs.define
class LockspaceState:
    """Every lease this host holds in one lockspace."""

    name: str
    held: dict[str, Holding] = attrs.field(factory=dict)
    by_owner: dict[OwnerKey, set[str]] = attrs.field(factory=dict)
    """The resources each owner holds: ``held`` indexed by owner. An owner's leases
    are looked up for every owner that ends (and every queued command of one is
    looked at again each time the lockspace schedules); a scan of ``held`` there
    made a mass exit of VMs quadratic: 256 owners ending at once with 16,384
    leases held kept a stopping daemon busy for minutes."""
    count_holds: bool = False
    """``shared_holds = "each"``: a holder asking again for a shared lease holds it once
    more, until as many releases (virtlockd's rule). False (``"once"``, the default): it
    is counted once, and one release ends its hold. Holds journaled while it was on
    are counted down either way."""

    once: OnceKeys = attrs.field(factory=OnceKeys)
    """Keys of the owners' recent keyed requests: a repeat changes nothing."""

    def leases_of(self, owner: OwnerKey) -> list[str]:
        """Resources held by ``owner``, sorted."""
        return sorted(self.by_owner.get(owner, ()))

    def add(
        self, resource: str, owner: Owner, mode: LeaseMode, autocreate: bool, holds: int = 1
    ) -> None:
        """``owner`` holds ``resource``, ``holds`` times (a new lease takes ``mode`` and
        ``autocreate``)."""
        holding = self.held.get(resource)
        if holding is None:
            holding = self.held[resource] = Holding(mode, {}, autocreate)
        holding.owners[owner.key] = owner
        if holds > 1:
            if holding.extra is None:
                holding.extra = {}
            holding.extra[owner.key] = holds - 1
        elif holding.extra is not None:
            _forget_extra(holding, owner.key)
        mine = self.by_owner.get(owner.key)
        if mine is None:
            self.by_owner[owner.key] = {resource}
        else:
            mine.add(resource)

    def remove(self, resource: str, owner: OwnerKey, holds: int = 0) -> None:
        """``owner`` holds ``resource`` ``holds`` times now (0: no longer); the lease ends
        with its last owner."""
        holding = self.held.get(resource)
        if holding is None:
            return
        if holds > 0 and owner in holding.owners:
            if holds > 1:
                assert holding.extra is not None
                holding.extra[owner] = holds - 1
            else:
                _forget_extra(holding, owner)
            return
        holding.owners.pop(owner, None)
        if holding.extra is not None:
            _forget_extra(holding, owner)
        if not holding.owners:
            del self.held[resource]
        mine = self.by_owner.get(owner)
        if mine is not None:
            mine.discard(resource)
            if not mine:
                del self.by_owner[owner]


def _forget_extra(holding: Holding, owner: OwnerKey) -> None:
    assert holding.extra is not None
    holding.extra.pop(owner, None)
    if not holding.extra:
        holding.extra = None


@attrs.frozen
class Refusal:
    """A domain refusal returned to the client: a value, not an exception."""

    code: ErrorCode
    message: str
    holders: tuple[Owner, ...] = ()


@attrs.frozen
class Acquire:
    """Take leases for an owner, all or none."""

    owner: Owner
    items: tuple[tuple[str, LeaseMode], ...]
    autocreate: bool
    conn: int
    once: bytes | None = None
    """The request's key: a repeat of one applied already changes nothing."""


@attrs.frozen
class Release:
    """Give up leases an owner holds."""

    owner: Owner
    resources: tuple[str, ...]
    conn: int
    reason: ReleaseReason = ReleaseReason.CLIENT
    once: bytes | None = None
    """The request's key (a rollback's: the acquire's, whose record it forgets)."""


@attrs.frozen
class ReleaseOwner:
    """End every lease an owner holds in this lockspace (exit, disconnect, admin)."""

    owner: OwnerKey
    conn: int
    reason: ReleaseReason


Command = Acquire | Release | ReleaseOwner


@attrs.frozen
class Repeated:
    """A keyed request this lockspace applied already: nothing changes, and the answer
    is the first one's."""

    resources: tuple[str, ...]
    """What the first request acquired or released here."""


def _repeat(
    state: LockspaceState, owner: Owner, key: bytes, release: bool, asked: set[Any]
) -> Repeated | Refusal | None:
    """The answer to ``owner``'s request with ``key`` if it was applied here already (None:
    it was not); a key reused for another request is refused."""
    applied = state.once.get(owner.key, key)
    if applied is None:
        return None
    if applied.release is release:
        if release:  # its repeat may leave out what it sees released already
            same = asked <= set(applied.resources())
        else:
            same = all(lease in asked for lease in applied.leases)
        if same:
            return Repeated(applied.resources())
    first = ", ".join(f"{state.name}/{resource}" for resource in applied.resources())
    return Refusal(
        ErrorCode.INVALID_ARGUMENT,
        f"once {uuid.UUID(bytes=key)} was given by {owner.describe()} to another request "
        f"(the {'release' if applied.release else 'acquire'} of {first}): "
        "a key names one request, use a new key for a new one",
    )


def refuse_busy(
    state: LockspaceState,
    resource: str,
    holding: Holding,
    asker: OwnerKey | None = None,
    wanted: LeaseMode | None = None,
) -> Refusal:
    """The busy refusal for ``resource``, naming every holder on this host.

    When the owner asking is a holder itself (it asks for the other mode: there is no
    upgrade or downgrade), the message says so, and how to get the mode it wants.
    """
    holders = tuple(holding.owners.values())
    names = ", ".join(o.describe() for o in holders)
    text = f"lease {state.name}/{resource} is held {holding.mode.value} by {names}"
    if asker is not None and asker in holding.owners:
        text += (
            f"; {'that is' if len(holders) == 1 else 'among them is'} the asking owner, "
            f"which holds it {holding.mode.value} already"
        )
        if wanted is not None and wanted is not holding.mode:
            text += (
                f" (a held lease's mode is never changed: release it, then acquire it "
                f"{wanted.value})"
            )
    return Refusal(ErrorCode.BUSY, text, holders)


def decide(state: LockspaceState, command: Command) -> list[Event] | Refusal | Repeated:
    """Events the command produces against ``state``, or why it is refused, or that it
    is a repeat of a keyed request applied already."""
    if isinstance(command, Acquire):
        return _decide_acquire(state, command)
    if isinstance(command, Release):
        return _decide_release(state, command)
    held = state.held
    return [
        LeaseReleased(
            state.name, r, held[r].mode, held[r].owners[command.owner], command.conn, command.reason
        )
        for r in state.leases_of(command.owner)
    ]


def _decide_acquire(state: LockspaceState, command: Acquire) -> list[Event] | Refusal | Repeated:
    once = command.once
    if once is not None and (
        repeat := _repeat(state, command.owner, once, False, set(command.items))
    ):
        return repeat
    seen: set[str] = set()
    events: list[Event] = []
    key = command.owner.key
    for resource, mode in command.items:
        if resource in seen:
            return Refusal(
                ErrorCode.INVALID_ARGUMENT, f"lease {state.name}/{resource} is requested twice"
            )
        seen.add(resource)
        holding = state.held.get(resource)
        if holding is None:
            events.append(
                LeaseAcquired(
                    state.name, resource, mode, command.owner, command.conn, command.autocreate,
                    once=once,
                )
            )  # fmt: skip
        elif holding.mode is LeaseMode.SHARED and mode is LeaseMode.SHARED:
            holds = holding.holds(key)
            if holds and not state.count_holds:
                continue  # held already, counted once
            # Asked again by a holder under "each", it is held once more, as virtlockd
            # lists the owner again, so that each release ends one hold.
            events.append(
                LeaseAcquired(
                    state.name, resource, mode, command.owner, command.conn, holding.autocreate,
                    holds + 1 if holds else None, once,
                )
            )  # fmt: skip
        else:
            return refuse_busy(state, resource, holding, key, mode)
    return events


def _decide_release(state: LockspaceState, command: Release) -> list[Event] | Refusal | Repeated:
    once = command.once
    if (
        once is not None
        and command.reason is not ReleaseReason.ROLLBACK
        and (repeat := _repeat(state, command.owner, once, True, set(command.resources)))
    ):
        return repeat
    events: list[Event] = []
    key = command.owner.key
    for resource in dict.fromkeys(command.resources):
        holding = state.held.get(resource)
        if holding is None or key not in holding.owners:
            if command.reason is ReleaseReason.ROLLBACK:
                # An acquire's rollback wants the lease not held: one the owner released
                # meanwhile (another connection, its exit) needs nothing, and refusing the
                # whole release left the rest of what the acquire took held for good.
                continue
            return Refusal(
                ErrorCode.NOT_HELD,
                f"lease {state.name}/{resource} is not held by {command.owner.describe()}",
            )
        extra = holding.extra  # holds beyond the first: those left after this release
        events.append(
            LeaseReleased(
                state.name,
                resource,
                holding.mode,
                holding.owners[key],
                command.conn,
                command.reason,
                None if extra is None else extra.get(key),
                once,
            )
        )
    return events


def apply(state: LockspaceState, event: Event) -> LockspaceState:
    """Fold one event into the state (in place) and return it."""
    if isinstance(event, LeaseAcquired):
        state.add(event.resource, event.owner, event.mode, event.autocreate, event.holds or 1)
        if event.once is not None:
            state.once.fold(event)
    elif isinstance(event, LeaseReleased):
        state.remove(event.resource, event.owner.key, event.holds or 0)
        if event.once is not None or state.once.keys_of:
            state.once.fold(event)
    return state
