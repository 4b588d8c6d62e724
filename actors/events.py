"""Every event lockd journals, in one module.

An event says what happened, in the past tense. The journal wraps each one in
a :class:`JournalEntry` that adds the sequence number, UTC time and host. On
disk and on the wire an entry is one flat CBOR map (see ``docs/journal.md``):
``{"seq", "time", "host", "type", ...event fields}``.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from typing import Any, ClassVar

import attrs

from actors.model import LeaseMode, Owner


def _owner(value: Owner | dict[str, Any]) -> Owner:
    return value if isinstance(value, Owner) else Owner.from_wire(value)


def _mode(value: LeaseMode | str) -> LeaseMode:
    # Built twice per acquire+release: calling the enum class runs two Python-level
    # methods of the enum module even when given a member.
    return value if type(value) is LeaseMode else LeaseMode(value)


# Fields convert their wire form (a string, a map) into the domain value, so an
# event is rebuilt from its map by passing the map's values straight in.


class ReleaseReason(enum.StrEnum):
    """Why a lease ended."""

    CLIENT = "client"
    """The owner (or a client acting for it) released it."""
    OWNER_EXIT = "owner-exit"
    """The owner process exited."""
    DISCONNECT = "disconnect"
    """The owner's own connection closed while the owner still ran; the owner is fenced."""
    ADMIN = "admin"
    """An operator disconnected the owner's connection."""
    OWNER_GONE = "owner-gone"
    """Start-up recovery found that the owner died while the daemon was down."""
    RECOVERY = "recovery"
    """Start-up recovery ended the lease for another reason (the message says why)."""
    ROLLBACK = "rollback"
    """Part of a multi-lease acquire that failed as a whole."""


def _optional_uid(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"{attribute.name} must be a uid, not {value!r}")


def _names(value: Any) -> tuple[str, ...]:
    names = tuple(value)
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"setting names must be text, not {value!r}")
    return names


def _optional_uids(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    uids = tuple(value)
    if not all(type(uid) is int and uid >= 0 for uid in uids):
        raise ValueError(f"allowed_uids must be uids, not {value!r}")
    return uids


def _reason(value: ReleaseReason | str) -> ReleaseReason:
    return value if type(value) is ReleaseReason else ReleaseReason(value)


@attrs.frozen
class Event:
    """Base of all events; subclasses set ``TYPE`` to their wire name."""

    TYPE: ClassVar[str] = ""


@attrs.frozen
class DaemonStarted(Event):
    """The daemon (or an embedded lock system) started serving."""

    TYPE: ClassVar[str] = "daemon-started"
    version: str
    pid: int
    allowed_uids: tuple[int, ...] | None = attrs.field(default=None, converter=_optional_uids)
    """The configuration's ``allowed_uids`` in force from this start (the uids besides
    the daemon's own that its client socket serves), or those a re-exec given up serves
    on with; None (absent): an older lockd's record."""


@attrs.frozen
class ConfigReloaded(Event):
    """SIGHUP re-read the configuration file: which settings it changes. Only the logging
    ones apply now; the others at the next re-exec or restart, whose ``daemon-started``
    says what is then in force. A re-exec writes one too (after its ``daemon-started``),
    naming every setting it changes from the previous program's, all applied."""

    TYPE: ClassVar[str] = "config-reloaded"
    file: str
    """The file read ("": none, the defaults)."""
    changed: tuple[str, ...] = attrs.field(converter=_names)
    """The settings whose value in the file differs from the one in force."""
    applied: tuple[str, ...] = attrs.field(converter=_names)
    """Those of ``changed`` in force now (logging)."""


@attrs.frozen
class DaemonStopped(Event):
    """The daemon stopped; leases are not released by a stop."""

    TYPE: ClassVar[str] = "daemon-stopped"
    reason: str


@attrs.frozen
class ConnectionOpened(Event):
    """Who is on the other end of client connection ``conn``, as the kernel named it when
    it connected (SO_PEERCRED): written once per connection, before the first change it
    makes (its ``register``, or a create or delete before one), so that the ``conn`` of
    every change names a process and a uid."""

    TYPE: ClassVar[str] = "connection-opened"
    conn: int
    pid: int
    """0: an in-process connection of a program embedding the lock system."""
    uid: int
    gid: int
    admin: bool
    """Made on the admin socket."""
    connected: float
    """Wall-clock time it connected (the record is written at its first change)."""
    repeat: bool | None = None
    """True: written again for a connection still open, because retention is about to
    delete the segment that holds its last record (the journal keeps one of each live
    connection); None (absent on the wire): its first record."""


@attrs.frozen
class LockspaceCreated(Event):
    """A lockspace directory was created."""

    TYPE: ClassVar[str] = "lockspace-created"
    lockspace: str
    path: str
    conn: int


@attrs.frozen
class ResourceCreated(Event):
    """A lease file was created explicitly (create-resource)."""

    TYPE: ClassVar[str] = "resource-created"
    lockspace: str
    resource: str
    conn: int


@attrs.frozen
class ResourceDeleted(Event):
    """A lease file was deleted explicitly (delete-resource)."""

    TYPE: ClassVar[str] = "resource-deleted"
    lockspace: str
    resource: str
    conn: int


@attrs.frozen
class LeaseAcquired(Event):
    """An owner now holds a lease."""

    TYPE: ClassVar[str] = "lease-acquired"
    lockspace: str
    resource: str
    mode: LeaseMode = attrs.field(converter=_mode)
    owner: Owner = attrs.field(converter=_owner)
    conn: int
    autocreate: bool
    holds: int | None = None
    """How many times the owner holds the lease now, when more than once (a shared lease
    it asked for again); None (absent): once."""
    once: bytes | None = None
    """The key the acquire carried (``once`` in the protocol): a repeat of that request
    answers from this record instead of taking the lease again; None (absent): none."""


@attrs.frozen
class LeaseReleased(Event):
    """An owner no longer holds a lease."""

    TYPE: ClassVar[str] = "lease-released"
    lockspace: str
    resource: str
    mode: LeaseMode = attrs.field(converter=_mode)
    owner: Owner = attrs.field(converter=_owner)
    conn: int
    reason: ReleaseReason = attrs.field(converter=_reason)
    holds: int | None = None
    """How many times the owner still holds the lease, when it held it more than once
    and this release ended one hold; None (absent): the owner no longer holds it."""
    once: bytes | None = None
    """The key of the request that released it (``once``): the release's own, or for a
    ``rollback`` the acquire's, whose record it undoes; None (absent): none."""


@attrs.frozen
class LeaseLost(Event):
    """A lease the journal says is held could not be held again: another process or host has it."""

    TYPE: ClassVar[str] = "lease-lost"
    holds: ClassVar[None] = None
    """Every hold ends (as :attr:`LeaseReleased.holds` None): read alike by the folds."""
    lockspace: str
    resource: str
    mode: LeaseMode = attrs.field(converter=_mode)
    owner: Owner = attrs.field(converter=_owner)
    reason: str


@attrs.frozen
class OwnerFenced(Event):
    """lockd signals an owner so that it stops writing to disks it no longer holds.

    Written before the signal is sent: a crash in between leaves the record of
    a signal that may not have gone, which the next daemon sends."""

    TYPE: ClassVar[str] = "owner-fenced"
    owner: Owner = attrs.field(converter=_owner)
    signal: str
    reason: str
    on_behalf_of: int | None = attrs.field(default=None, validator=_optional_uid)
    """The uid whose closed connection began the fence, when not root's: each signal goes
    only while a process of that uid could send it itself. None (absent on the wire):
    root's or lockd's own fence (an operator's disconnect, a lost lease), and records of
    an older lockd. A daemon that resumes the fence after a crash reads it here."""


@attrs.frozen
class Fence:
    """An owner being fenced, and why (``recovery-completed`` carries those it goes on with)."""

    owner: Owner = attrs.field(converter=_owner)
    reason: str
    since: float | None = attrs.field(default=None, converter=attrs.converters.optional(float))
    """Wall-clock time of the fence's first SIGTERM; None: it begins now (a fence only owed
    so far, or new). A resumed fence keeps it, so its SIGKILL comes a grace period after
    that, however many crashes fall in between (otherwise a daemon crashing within every
    grace period never kills)."""
    on_behalf_of: int | None = attrs.field(default=None, validator=_optional_uid)
    """As :attr:`OwnerFenced.on_behalf_of`: the uid the resumed fence signals for."""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"owner": self.owner.to_wire(), "reason": self.reason}
        if self.since is not None:
            wire["since"] = self.since
        if self.on_behalf_of is not None:
            wire["on_behalf_of"] = self.on_behalf_of
        return wire


def _fences(value: Any) -> tuple[Fence, ...]:
    # Keys a later lockd may add are ignored, as unknown event fields are.
    return tuple(
        item
        if isinstance(item, Fence)
        else Fence(item["owner"], item["reason"], item.get("since"), item.get("on_behalf_of"))
        for item in value
    )


@attrs.frozen
class RecoveryCompleted(Event):
    """Start-up recovery finished; counts say what it found."""

    TYPE: ClassVar[str] = "recovery-completed"
    held: int
    released: int
    lost: int
    duration_ms: float
    fencing: tuple[Fence, ...] = attrs.field(default=(), converter=_fences)
    """The fences this daemon starts or resumes: owners of leases lost while lockd was
    down, and fences a crash interrupted. Written in this one record, they outlive a
    crash before the owners actor's own ``owner-fenced`` records; absent in journals of
    an older lockd."""


@attrs.frozen
class JournalResumed(Event):
    """The journal takes writes again after a spell of refusing them (a full or failing
    disk): the first record written since, so the journal itself says why it has no
    record for that while. Every change lockd would have journaled meanwhile was
    refused (``io-error``) and left the kernel's locks as they were."""

    TYPE: ClassVar[str] = "journal-resumed"
    since: float
    """When the first refused write of the spell was (wall clock)."""
    refused: int
    """Writes refused in the spell, each carrying one or more changes (lockd's own
    tries to write this record are not counted)."""
    error: str
    """What the last refused write met (``[Errno 28] No space left on device``)."""


@attrs.frozen
class UnknownEvent(Event):
    """An event of a type this lockd does not know: a later lockd's (after a downgrade,
    or read by an older ``lockd events``). Kept as its map, so that readers pass it on
    as it is: they called a sound journal corrupt there (``journal-check`` said ok),
    and stopped. Nothing acts on it; recovery folds only the types it knows."""

    kind: str
    """Its ``type``."""
    fields: tuple[tuple[str, Any], ...]
    """Its other keys and values, in their order on the wire."""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        DaemonStarted,
        DaemonStopped,
        ConfigReloaded,
        ConnectionOpened,
        LockspaceCreated,
        ResourceCreated,
        ResourceDeleted,
        LeaseAcquired,
        LeaseReleased,
        LeaseLost,
        OwnerFenced,
        RecoveryCompleted,
        JournalResumed,
    )
}


_TO_WIRE: dict[type, Callable[[Any], Any] | None] = {}
"""Per value type: how it goes on the wire (None: as it is)."""

_WRITERS: dict[type[Event], Callable[[Event, dict[str, Any]], None]] = {}
"""Per event class: a function that puts its fields in a map (see :func:`_writer_for`)."""

_PLAIN = frozenset({"str", "int", "bool", "float", "bytes", "float | None", "int | None",
                    "str | None", "bytes | None", "bool | None"})  # fmt: skip
"""Field types (as annotated) whose values go on the wire as they are."""


def _wire_converter(cls: type) -> Callable[[Any], Any] | None:
    if issubclass(cls, Owner) or cls is Fence:
        return operator.methodcaller("to_wire")
    if cls is tuple:  # of values (RecoveryCompleted.fencing, ConfigReloaded.changed)
        return lambda items: [_dynamic(item) for item in items]
    if issubclass(cls, enum.Enum):
        return operator.attrgetter("value")
    return None


def _dynamic(value: Any) -> Any:
    """A value whose wire form is chosen by its type at run time (once per type)."""
    kind = type(value)
    try:
        convert = _TO_WIRE[kind]
    except KeyError:
        convert = _TO_WIRE[kind] = _wire_converter(kind)
    return value if convert is None else convert(value)


def _writer_for(cls: type[Event]) -> Callable[[Event, dict[str, Any]], None]:
    """Compile, once per event class, the function that writes its fields to a map.

    Two events are encoded per acquire+release pair; a loop over the fields
    that looked up each value's conversion took about 25 bytecodes per field,
    389 of a pair's 9,998 (``contrib/bench/inproc.py --opcodes``); this takes
    87. The compiled form is straight-line code, as attrs compiles
    ``__init__``: plain fields are copied, the enum and owner fields (their
    annotations say which) converted in place, and anything else goes
    through :func:`_dynamic`.
    """
    lines = [f"def write(event, out):\n    out['type'] = {cls.TYPE!r}"]
    for field in attrs.fields(cls):
        name, kind = field.name, field.type
        if kind in _PLAIN:
            value = f"event.{name}"
        elif kind in ("LeaseMode", "ReleaseReason"):  # StrEnums: str() is the value, in C
            value = f"_str(event.{name})"
        elif kind == "Owner":
            value = f"event.{name}.to_wire()"
        else:
            value = f"_dynamic(event.{name})"
        if field.default is None:  # added later: absent while None, as in older records
            lines.append(f"    if event.{name} is not None:\n        out[{name!r}] = {value}")
        else:
            lines.append(f"    out[{name!r}] = {value}")
    namespace: dict[str, Any] = {"_dynamic": _dynamic, "_str": str.__str__}
    exec("\n".join(lines), namespace)  # noqa: S102 - our own field names, as attrs does
    writer: Callable[[Event, dict[str, Any]], None] = namespace["write"]
    return writer


def _write_unknown(event: Event, out: dict[str, Any]) -> None:
    assert isinstance(event, UnknownEvent)
    out["type"] = event.kind
    out.update(event.fields)


_WRITERS[UnknownEvent] = _write_unknown


def event_to_wire(event: Event, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flat CBOR-ready map of an event's fields, with its ``type`` (added to ``out`` if given)."""
    cls = type(event)
    try:
        write = _WRITERS[cls]
    except KeyError:
        write = _WRITERS[cls] = _writer_for(cls)
    if out is None:
        out = {}
    write(event, out)
    return out


def event_from_wire(data: dict[str, Any]) -> Event:
    """Rebuild an event from its map (one of a type this lockd does not know as an
    :class:`UnknownEvent`); raises ValueError on a missing type or bad fields."""
    kind = data.get("type")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"bad event type {kind!r}")
        return UnknownEvent(kind, tuple((k, v) for k, v in data.items() if k != "type"))
    kwargs: dict[str, Any] = {}
    for field in attrs.fields(cls):
        if field.name in data:
            kwargs[field.name] = data[field.name]
        elif field.default is attrs.NOTHING:  # fields added later have defaults
            raise ValueError(f"{cls.TYPE} event lacks field {field.name!r}")
    return cls(**kwargs)


@attrs.frozen
class JournalEntry:
    """One journal record: an event with its sequence number, UTC time and host."""

    seq: int
    time: float
    host: str
    event: Event

    def to_wire(self) -> dict[str, Any]:
        """The flat map auditors read: seq, time, host, type, then the event's fields."""
        return event_to_wire(self.event, {"seq": self.seq, "time": self.time, "host": self.host})

    @classmethod
    def from_wire(cls, data: Any) -> JournalEntry:
        """Rebuild from a decoded map; raises ValueError on anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("journal entry must be a map")
        try:
            seq, time, host = data["seq"], data["time"], data["host"]
        except KeyError as exc:
            raise ValueError(f"journal entry lacks {exc}") from None
        if (
            not isinstance(seq, int)
            or not isinstance(time, (int, float))
            or not isinstance(host, str)
        ):
            raise ValueError("journal entry has a bad seq, time or host")
        rest = {k: v for k, v in data.items() if k not in ("seq", "time", "host")}
        try:
            event = event_from_wire(rest)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed event: {exc}") from None
        return cls(seq=seq, time=float(time), host=host, event=event)
