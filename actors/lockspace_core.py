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

import attrs

from actors.events import Event, LeaseAcquired, LeaseReleased, ReleaseReason
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


@attrs.frozen
class Release:
    """Give up leases an owner holds."""

    owner: Owner
    resources: tuple[str, ...]
    conn: int
    reason: ReleaseReason = ReleaseReason.CLIENT


@attrs.frozen
class ReleaseOwner:
    """End every lease an owner holds in this lockspace (exit, disconnect, admin)."""

    owner: OwnerKey
    conn: int
    reason: ReleaseReason


Command = Acquire | Release | ReleaseOwner


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


def decide(state: LockspaceState, command: Command) -> list[Event] | Refusal:
    """Events the command produces against ``state``, or why it is refused."""
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


def _decide_acquire(state: LockspaceState, command: Acquire) -> list[Event] | Refusal:
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
                    state.name, resource, mode, command.owner, command.conn, command.autocreate
                )
            )
        elif holding.mode is LeaseMode.SHARED and mode is LeaseMode.SHARED:
            holds = holding.holds(key)
            if holds and not state.count_holds:
                continue  # held already, counted once
            # Asked again by a holder under "each", it is held once more, as virtlockd
            # lists the owner again, so that each release ends one hold.
            events.append(
                LeaseAcquired(
                    state.name, resource, mode, command.owner, command.conn, holding.autocreate,
                    holds + 1 if holds else None,
                )
            )  # fmt: skip
        else:
            return refuse_busy(state, resource, holding, key, mode)
    return events


def _decide_release(state: LockspaceState, command: Release) -> list[Event] | Refusal:
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
            )
        )
    return events


def apply(state: LockspaceState, event: Event) -> LockspaceState:
    """Fold one event into the state (in place) and return it."""
    if isinstance(event, LeaseAcquired):
        state.add(event.resource, event.owner, event.mode, event.autocreate, event.holds or 1)
    elif isinstance(event, LeaseReleased):
        state.remove(event.resource, event.owner.key, event.holds or 0)
    return state
