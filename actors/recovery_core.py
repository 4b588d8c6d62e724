"""What the journal says is held: a pure fold of journal entries, and its snapshot form.

Recovery is this fold over the newest snapshot plus the entries after it.
The journal actor keeps the same fold up to date as it writes, so a snapshot
of it can be taken at any segment boundary; recovery time then depends on the
live state and one segment of history, never on the whole history.
"""

from __future__ import annotations

from typing import Any

import attrs

from actors.events import (
    Event,
    JournalEntry,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    LockspaceCreated,
    OwnerFenced,
    RecoveryCompleted,
    ReleaseReason,
)
from actors.lockspace_core import OWNER_ENDS, OnceKeys
from actors.model import LeaseMode, Owner, OwnerKey
from protocol.messages import ONCE_KEY_SIZE

SNAPSHOT_FORMAT = "lockd-snapshot"
SNAPSHOT_VERSION = 1

_EXITS = frozenset(
    {ReleaseReason.OWNER_EXIT, ReleaseReason.DISCONNECT, ReleaseReason.ADMIN,
     ReleaseReason.OWNER_GONE}
)  # fmt: skip
"""Release reasons that mean the owner process is gone: its fence, if any, is over."""


_LEASE_ENDS = (LeaseReleased, LeaseLost)
"""Built once: ``A | B`` in an isinstance call builds a union each time (once per event
folded, a million at a long journal's replay)."""


@attrs.define
class HeldLease:
    """A lease the journal says is held, with each owner and since when."""

    lockspace: str
    resource: str
    mode: LeaseMode
    autocreate: bool
    owners: dict[OwnerKey, tuple[Owner, float]] = attrs.field(factory=dict)
    holds: dict[OwnerKey, int] | None = None
    """Owners holding it more than once (a shared lease asked for again), and how many
    times; None: none."""

    def hold(self, owner: Owner, time: float, holds: int | None) -> None:
        """``owner`` holds it, ``holds`` times (None: once; since stays its first hold's)."""
        if holds is None:
            self.owners[owner.key] = (owner, time)
            if self.holds is not None:
                self._forget(owner.key)
            return
        if owner.key not in self.owners:
            self.owners[owner.key] = (owner, time)
        if self.holds is None:
            self.holds = {}
        self.holds[owner.key] = holds

    def end(self, owner: OwnerKey, holds: int | None) -> None:
        """``owner`` still holds it ``holds`` times (None: no longer)."""
        if holds is not None and owner in self.owners:
            if holds > 1:
                if self.holds is None:
                    self.holds = {}
                self.holds[owner] = holds
            elif self.holds is not None:
                self._forget(owner)
            return
        self.owners.pop(owner, None)
        if self.holds is not None:
            self._forget(owner)

    def _forget(self, owner: OwnerKey) -> None:
        assert self.holds is not None
        self.holds.pop(owner, None)
        if not self.holds:
            self.holds = None


def _holds(value: Any) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"bad holds {value!r}")
    return value


def _once(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != ONCE_KEY_SIZE:
        raise ValueError(f"bad once key {value!r}")
    return value


def lost_lease_reason(lease: str, why: str | None = None) -> str:
    """Why the owner of ``lease`` (``lockspace/resource``), lost while lockd was down, is
    fenced: taken by another process or host, unless ``why`` says otherwise."""
    if why is not None:
        return f"lease {lease} was lost while lockd was down: {why}"
    return f"lease {lease} was taken while lockd was down"


def _fence_tail(owed: bool, uid: int | None) -> list[Any]:
    """A snapshot's fence after its ``since``: ``[]``, ``[true]``, or ``[owed, uid]``
    (an older lockd reads the first of those items only)."""
    if uid is not None:
        return [owed, uid]
    return [True] if owed else []


@attrs.define
class ReplayState:
    """Everything recovery needs, as of journal entry ``seq``."""

    seq: int = 0
    lockspaces: dict[str, str] = attrs.field(factory=dict)
    leases: dict[tuple[str, str], HeldLease] = attrs.field(factory=dict)
    fencing: dict[OwnerKey, tuple[Owner, str, float, int | None]] = attrs.field(factory=dict)
    """Owners to fence, not yet SIGKILLed nor seen gone: (owner, reason, since, uid).

    An ``owner-fenced`` SIGTERM starts one, and so does a ``lease-lost`` (the
    fence it owes). A daemon killed before the SIGKILL would otherwise forget
    it; the next one resumes it. ``recovery-completed`` replaces them all
    with the fences that daemon goes on with, which it lists in that record.
    ``since`` is when the first SIGTERM was journaled (the SIGKILL is due a
    grace period later), or for a fence still owed, the time of the record
    that owes it (``lease-lost``, or the ``recovery-completed`` handing it on).
    ``uid``: the uid the fence signals for (``owner-fenced``'s ``on_behalf_of``), whose
    right to signal the owner a resumed fence checks again; None: root's or lockd's own.
    """
    owed: set[OwnerKey] = attrs.field(factory=set)
    """Fences in ``fencing`` owed but never begun: no SIGTERM journaled yet, so their
    grace period has not started (the next daemon gives a full one)."""
    once: dict[str, OnceKeys] = attrs.field(factory=dict)
    """Per lockspace, the keys of recent keyed requests (``once``), as the live lockspace
    keeps them: a repeat after a crash, restart or re-exec changes nothing."""
    _owner_cache: dict[tuple[Any, ...], Owner] = attrs.field(
        factory=dict, init=False, repr=False, eq=False
    )

    def fold(self, entry: JournalEntry) -> None:
        """Apply one entry (in place); entries must come in seq order."""
        if entry.seq != self.seq + 1:
            raise ValueError(f"journal entry {entry.seq} does not follow {self.seq}")
        self.seq = entry.seq
        self.apply(entry.event, entry.time)

    def fold_wire(self, record: dict[str, Any]) -> None:
        """:meth:`fold` for an entry still in its map form: recovery's fast path.

        Only the event types that change what is held are interpreted; owners
        are built once per process and shared, so replaying a long history
        allocates little.
        """
        seq = record["seq"]
        if seq != self.seq + 1:
            raise ValueError(f"journal entry {seq} does not follow {self.seq}")
        kind = record["type"]
        if kind == "lease-acquired":
            key = (record["lockspace"], record["resource"])
            owner = self._owner(record["owner"])
            held = self.leases.get(key)
            if held is None:
                held = HeldLease(key[0], key[1], LeaseMode(record["mode"]), record["autocreate"])
                self.leases[key] = held
            holds = record.get("holds")
            if holds is None and held.holds is None:
                held.owners[owner.key] = (owner, float(record["time"]))
            else:
                held.hold(owner, float(record["time"]), None if holds is None else _holds(holds))
            if (once := record.get("once")) is not None:
                self._keys(key[0]).note(
                    owner.key, _once(once), False, key[1], LeaseMode(record["mode"])
                )
        elif kind in ("lease-released", "lease-lost"):
            key = (record["lockspace"], record["resource"])
            held = self.leases.get(key)
            wire = record["owner"]
            owner_key = OwnerKey(wire["pid"], wire["start_time"])
            if held is not None:
                holds = record.get("holds") if kind == "lease-released" else None
                if holds is None and held.holds is None:
                    held.owners.pop(owner_key, None)
                else:
                    held.end(owner_key, None if holds is None else _holds(holds))
                if not held.owners:
                    del self.leases[key]
            if kind == "lease-lost":
                self._lost(self._owner(wire), key, float(record["time"]))
            else:
                self._released_wire(record, key, owner_key)
        elif kind == "lockspace-created":
            self.lockspaces[record["lockspace"]] = record["path"]
        elif kind == "owner-fenced":
            self._fenced(self._owner(record["owner"]), record["signal"], record["reason"],
                         float(record["time"]), record.get("on_behalf_of"))  # fmt: skip
        elif kind == "recovery-completed":
            when = float(record["time"])
            self.fencing, self.owed = {}, set()
            for fence in record.get("fencing", ()):
                owner = self._owner(fence["owner"])
                since = fence.get("since")
                begun = when if since is None else float(since)
                self.fencing[owner.key] = (owner, fence["reason"], begun,
                                           fence.get("on_behalf_of"))  # fmt: skip
                if since is None:
                    self.owed.add(owner.key)
        self.seq = seq

    def _released_wire(
        self, record: dict[str, Any], lease: tuple[str, str], owner: OwnerKey
    ) -> None:
        reason = record["reason"]
        if self.fencing and reason in _EXITS:
            self.fencing.pop(owner, None)
            self.owed.discard(owner)
        once = record.get("once")
        if once is not None:
            self._released(lease, owner, _once(once), reason, record["mode"])
        elif self.once and reason in OWNER_ENDS:
            self._owner_ended(lease[0], owner)

    def _keys(self, lockspace: str) -> OnceKeys:
        keys = self.once.get(lockspace)
        if keys is None:
            keys = self.once[lockspace] = OnceKeys()
        return keys

    def _released(
        self, lease: tuple[str, str], owner: OwnerKey, once: bytes, reason: str, mode: str
    ) -> None:
        keys = self._keys(lease[0])
        if reason == ReleaseReason.ROLLBACK:
            keys.rolled_back(owner, once)
        else:
            keys.note(owner, once, True, lease[1], LeaseMode(mode))
        if not keys.records:
            del self.once[lease[0]]

    def _owner_ended(self, lockspace: str, owner: OwnerKey) -> None:
        keys = self.once.get(lockspace)
        if keys is not None:
            keys.owner_ended(owner)
            if not keys.records:
                del self.once[lockspace]

    def replayed(self) -> None:
        """The replay is over: forget the owners :meth:`fold_wire` shared between records.

        The state goes on as the journal's own fold for the daemon's lifetime; kept,
        the cache held every owner of the history replayed, their leases long ended
        (about 4 MiB per 8 MiB segment of VM starts and stops), until the next restart.
        """
        self._owner_cache.clear()

    def _owner(self, wire: dict[str, Any]) -> Owner:
        cache = self._owner_cache
        # The boot belongs in the cache key: an autostarted VM can repeat pid, start
        # time, uuid, name and id after a reboot.
        ident = (wire["pid"], wire["start_time"], wire["uuid"], wire["name"], wire["id"],
                 wire.get("boot"))  # fmt: skip
        owner = cache.get(ident)
        if owner is None:
            owner = cache[ident] = Owner.from_wire(wire)
        return owner

    def apply(self, event: Event, time: float) -> None:
        """Apply one event, whatever its seq."""
        if isinstance(event, LeaseAcquired):
            key = (event.lockspace, event.resource)
            held = self.leases.get(key)
            if held is None:
                held = HeldLease(event.lockspace, event.resource, event.mode, event.autocreate)
                self.leases[key] = held
            if event.holds is None and held.holds is None:
                held.owners[event.owner.key] = (event.owner, time)
            else:
                held.hold(event.owner, time, None if event.holds is None else _holds(event.holds))
            if event.once is not None:
                self._keys(key[0]).note(
                    event.owner.key, event.once, False, event.resource, event.mode
                )
        elif isinstance(event, _LEASE_ENDS):
            key = (event.lockspace, event.resource)
            held = self.leases.get(key)
            if held is not None:
                holds = event.holds
                if holds is None and held.holds is None:
                    held.owners.pop(event.owner.key, None)
                else:
                    held.end(event.owner.key, None if holds is None else _holds(holds))
                if not held.owners:
                    del self.leases[key]
            if isinstance(event, LeaseLost):
                self._lost(event.owner, key, time)
            else:
                if self.fencing and event.reason in _EXITS:
                    self.fencing.pop(event.owner.key, None)
                    self.owed.discard(event.owner.key)
                if event.once is not None:
                    self._released(key, event.owner.key, event.once, event.reason, event.mode)
                elif self.once and event.reason in OWNER_ENDS:
                    self._owner_ended(key[0], event.owner.key)
        elif isinstance(event, LockspaceCreated):
            self.lockspaces[event.lockspace] = event.path
        elif isinstance(event, OwnerFenced):
            self._fenced(event.owner, event.signal, event.reason, time, event.on_behalf_of)
        elif isinstance(event, RecoveryCompleted):
            self.fencing = {
                f.owner.key: (
                    f.owner,
                    f.reason,
                    time if f.since is None else f.since,
                    f.on_behalf_of,
                )
                for f in event.fencing
            }
            self.owed = {f.owner.key for f in event.fencing if f.since is None}

    def _lost(self, owner: Owner, lease: tuple[str, str], time: float) -> None:
        # A lost lease owes its owner a fence (under lost_lease_policy = fence), from
        # the moment it is journaled: a crash before recovery completes must not
        # leave a process writing to a disk another host now holds.
        if self.once:  # its keys go with its leases here
            self._owner_ended(lease[0], owner.key)
        if owner.key not in self.fencing:
            self.fencing[owner.key] = (
                owner,
                lost_lease_reason(f"{lease[0]}/{lease[1]}"),
                time,
                None,
            )
            self.owed.add(owner.key)

    def _fenced(self, owner: Owner, signal: str, reason: str, time: float, uid: int | None) -> None:
        key = owner.key
        if signal == "SIGTERM":
            # A resumed fence journals SIGTERM again; its deadline still counts from
            # the first SIGTERM (a fence only owed until now begins here).
            earlier = self.fencing.get(key)
            begun = earlier[2] if earlier is not None and key not in self.owed else time
            self.fencing[key] = (owner, reason, begun, uid)
            self.owed.discard(key)
        else:
            # SIGKILL. It is journaled before it is sent, so a daemon killed in
            # between leaves it unsent: the fence lasts until a release says the
            # owner is gone, and a next daemon that finds the owner running
            # resumes it, SIGKILL at once (its deadline has passed).
            earlier = self.fencing.get(key)
            if earlier is None:
                self.fencing[key] = (owner, reason, time, uid)
            elif key in self.owed:
                self.fencing[key] = (owner, earlier[1], time, uid)
            self.owed.discard(key)

    def owners(self) -> dict[OwnerKey, Owner]:
        """Every owner holding something."""
        return {
            key: owner for held in self.leases.values() for key, (owner, _) in held.owners.items()
        }

    def to_wire(self) -> dict[str, Any]:
        """CBOR-ready form (the body of a snapshot file)."""
        wire: dict[str, Any] = {
            "seq": self.seq,
            "lockspaces": dict(self.lockspaces),
            "leases": [
                [
                    held.lockspace,
                    held.resource,
                    held.mode.value,
                    held.autocreate,
                    [[owner.to_wire(), since] for owner, since in held.owners.values()],
                ]
                for held in self.leases.values()
            ],
            # Owners holding a lease more than once: [lockspace, resource, pid, start time,
            # holds]. A key of its own, which an older lockd ignores (it counts one hold).
            "holds": [
                [held.lockspace, held.resource, key.pid, key.start_time, n]
                for held in self.leases.values()
                if held.holds is not None
                for key, n in held.holds.items()
            ],
            # A fourth item, true, marks a fence still owed (absent, or false before a
            # fifth: begun); a fifth, the uid the fence signals for (absent: root's).
            "fencing": [
                [owner.to_wire(), reason, since, *_fence_tail(owner.key in self.owed, uid)]
                for owner, reason, since, uid in self.fencing.values()
            ],
        }
        if self.once:
            # Keys of recent keyed requests, oldest first: [lockspace, pid, start time,
            # key, release, [[resource, mode], ...]]. A key of its own, which an older
            # lockd ignores (a repeat of such a request is then applied again).
            wire["once"] = [
                [lockspace, owner.pid, owner.start_time, key, applied.release,
                 [[resource, mode.value] for resource, mode in applied.leases]]
                for lockspace, keys in self.once.items()
                for owner, key, applied in keys.export()
            ]  # fmt: skip
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> ReplayState:
        """Rebuild from :meth:`to_wire`'s form; raises ValueError on anything malformed."""
        # A VM holds several leases: each owner is built (and validated) once,
        # not once per lease (16,384 leases of 1,024 owners at the scale target).
        owners_seen: dict[tuple[Any, ...], Owner] = {}
        try:
            state = cls(int(data["seq"]), dict(data["lockspaces"]))
            for lockspace, resource, mode, autocreate, owners in data["leases"]:
                held = HeldLease(lockspace, resource, LeaseMode(mode), bool(autocreate))
                for owner_wire, since in owners:
                    seen = tuple(owner_wire.items())
                    owner = owners_seen.get(seen)
                    if owner is None:
                        owner = owners_seen[seen] = Owner.from_wire(owner_wire)
                    held.owners[owner.key] = (owner, float(since))
                state.leases[(lockspace, resource)] = held
            # Absent from snapshots written before holds were counted.
            for lockspace, resource, pid, start_time, n in data.get("holds", ()):
                held = state.leases[(lockspace, resource)]
                key = OwnerKey(pid, start_time)
                if key not in held.owners:
                    raise ValueError(f"holds of {lockspace}/{resource} by an owner not listed")
                held.end(key, _holds(n))
            # Absent from snapshots written before fences were kept.
            for owner_wire, reason, since, *tail in data.get("fencing", ()):
                owner = Owner.from_wire(owner_wire)
                uid = tail[1] if len(tail) > 1 else None
                if uid is not None and (type(uid) is not int or uid < 0):
                    raise ValueError(f"bad uid {uid!r} in a fence")
                state.fencing[owner.key] = (owner, str(reason), float(since), uid)
                if tail and tail[0] is True:
                    state.owed.add(owner.key)
            # Absent from snapshots written before keyed requests, or with none kept.
            for lockspace, pid, start_time, key, release, leases in data.get("once", ()):
                if type(release) is not bool or not leases:
                    raise ValueError(f"bad once record {key!r}")
                keys = state._keys(lockspace)
                for resource, mode in leases:
                    keys.note(
                        OwnerKey(pid, start_time), _once(key), release, resource, LeaseMode(mode)
                    )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed snapshot: {exc!r}") from None
        return state
