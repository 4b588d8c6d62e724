"""Requests and replies: validated values, built from decoded CBOR maps.

A request on the wire is one map ``{"op": tstr, "id": uint, ...arguments}``.
``request_from_wire`` refuses unknown operations, unknown or missing
arguments and wrong types with ``invalid-argument``, keeping the request id
when it could be read so the error reply can carry it. An invalid request
object cannot exist: every class validates itself at construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs

from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.names import (
    CONTROL_CHARACTERS,
    InvalidNameError,
    check_lockspace_name,
    check_resource_name,
)

PROTOCOL_VERSION = 1
MAX_ID = 2**64 - 1
MAX_WAIT_SECONDS = 3600.0


class _Invalid(ValueError):
    """A request argument breaks the spec; becomes invalid-argument on the wire."""


def _uint(value: Any, what: str, *, positive: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ID:
        raise _Invalid(f"{what} must be an unsigned integer")
    if positive and value == 0:
        raise _Invalid(f"{what} must be greater than 0")
    return value


def _text(value: Any, what: str) -> str:
    """``text255``: 1-255 bytes of UTF-8 (a CDDL ``.size`` counts bytes), no controls.

    Counted in bytes, as the protocol and the plugin state it: a client in C
    keeps the names it reads back (``list-clients``, ``busy`` holders) in
    255-byte buffers, which 255 characters of non-ASCII text would overrun."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value.encode()) <= 255
        or CONTROL_CHARACTERS.search(value) is not None
    ):
        raise _Invalid(f"{what} must be 1-255 bytes of UTF-8 without control characters")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"{what} must be a boolean")
    return value


def _lockspace(value: Any) -> str:
    try:
        return check_lockspace_name(value)
    except InvalidNameError as exc:
        raise _Invalid(str(exc)) from None


def _resource(value: Any) -> str:
    try:
        return check_resource_name(value)
    except InvalidNameError as exc:
        raise _Invalid(str(exc)) from None


@attrs.frozen
class OwnerIdentity:
    """The owner a client registers: uuid, name, id (> 0) and pid (> 0)."""

    uuid: bytes
    name: str
    id: int
    pid: int

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.uuid, bytes) or len(self.uuid) != 16:
            raise _Invalid("owner uuid must be 16 bytes")
        _text(self.name, "owner name")
        _uint(self.id, "owner id", positive=True)
        _uint(self.pid, "owner pid", positive=True)


@attrs.frozen
class LeaseRequest:
    """One lease in an acquire: lockspace, resource, shared or not."""

    lockspace: str
    resource: str
    shared: bool = False

    def __attrs_post_init__(self) -> None:
        _lockspace(self.lockspace)
        _resource(self.resource)
        _bool(self.shared, "shared")


@attrs.frozen
class Request:
    """Base of every request; ``OP`` is the wire name, ``ARGS`` the allowed argument keys."""

    OP: ClassVar[str] = ""
    ARGS: ClassVar[frozenset[str]] = frozenset()
    id: int


@attrs.frozen
class Hello(Request):
    """Version handshake; must be the first request on a connection."""

    OP: ClassVar[str] = "hello"
    ARGS: ClassVar[frozenset[str]] = frozenset({"versions", "client"})
    versions: tuple[int, ...]
    client: str | None = None


@attrs.frozen
class Register(Request):
    """Name the owner this connection acts for."""

    OP: ClassVar[str] = "register"
    ARGS: ClassVar[frozenset[str]] = frozenset({"owner"})
    owner: OwnerIdentity


@attrs.frozen
class Restrict(Request):
    """One way: afterwards the connection may only stay open."""

    OP: ClassVar[str] = "restrict"


@attrs.frozen
class CreateLockspace(Request):
    """Create a lockspace directory (idempotent)."""

    OP: ClassVar[str] = "create-lockspace"
    ARGS: ClassVar[frozenset[str]] = frozenset({"lockspace"})
    lockspace: str


@attrs.frozen
class CreateResource(Request):
    """Create a lease file explicitly."""

    OP: ClassVar[str] = "create-resource"
    ARGS: ClassVar[frozenset[str]] = frozenset({"lockspace", "resource"})
    lockspace: str
    resource: str


@attrs.frozen
class DeleteResource(Request):
    """Delete a lease file that nobody holds."""

    OP: ClassVar[str] = "delete-resource"
    ARGS: ClassVar[frozenset[str]] = frozenset({"lockspace", "resource"})
    lockspace: str
    resource: str


@attrs.frozen
class Acquire(Request):
    """Take one or more leases, all or none; optionally wait for busy ones."""

    OP: ClassVar[str] = "acquire"
    ARGS: ClassVar[frozenset[str]] = frozenset({"leases", "autocreate", "wait", "once"})
    leases: tuple[LeaseRequest, ...]
    autocreate: bool = False
    wait: float = 0.0
    once: bytes | None = None
    """The client's key for this request: a repeat with it is applied at most once."""


@attrs.frozen
class Release(Request):
    """Give up the listed leases, or all of the owner's leases."""

    OP: ClassVar[str] = "release"
    ARGS: ClassVar[frozenset[str]] = frozenset({"leases", "all", "once"})
    leases: tuple[tuple[str, str], ...] = ()
    all: bool = False
    once: bytes | None = None
    """As :attr:`Acquire.once` (only with ``leases``)."""


@attrs.frozen
class Inquire(Request):
    """The leases the registered owner holds."""

    OP: ClassVar[str] = "inquire"


@attrs.frozen
class ListLeases(Request):
    """Every lease this host holds, optionally in one lockspace."""

    OP: ClassVar[str] = "list-leases"
    ARGS: ClassVar[frozenset[str]] = frozenset({"lockspace"})
    lockspace: str | None = None


@attrs.frozen
class ListLockspaces(Request):
    """Every lockspace and how many leases it holds."""

    OP: ClassVar[str] = "list-lockspaces"


@attrs.frozen
class ListClients(Request):
    """Every client connection."""

    OP: ClassVar[str] = "list-clients"


@attrs.frozen
class Status(Request):
    """Daemon version, uptime, counts and journal position."""

    OP: ClassVar[str] = "status"


@attrs.frozen
class Subscribe(Request):
    """Receive every new journal event on this connection; with ``since``, the kept
    events from that seq on first."""

    OP: ClassVar[str] = "subscribe"
    ARGS: ClassVar[frozenset[str]] = frozenset({"since"})
    since: int | None = None


@attrs.frozen
class Disconnect(Request):
    """Admin socket only: close a client connection; its leases end as on disconnect."""

    OP: ClassVar[str] = "disconnect"
    ARGS: ClassVar[frozenset[str]] = frozenset({"client"})
    client: int


@attrs.frozen
class SetLog(Request):
    """Admin socket only: change the log level and per-module filters at runtime."""

    OP: ClassVar[str] = "set-log"
    ARGS: ClassVar[frozenset[str]] = frozenset({"level", "filters"})
    level: str | None = None
    filters: str | None = None


@attrs.frozen
class Metrics(Request):
    """Counters and gauges in the Prometheus text exposition format."""

    OP: ClassVar[str] = "metrics"


LOG_LEVELS = ("debug", "info", "warning", "error")


def _owner(value: Any) -> OwnerIdentity:
    if not isinstance(value, dict) or set(value) != {"uuid", "name", "id", "pid"}:
        raise _Invalid("owner must be a map of exactly uuid, name, id and pid")
    return OwnerIdentity(value["uuid"], value["name"], value["id"], value["pid"])


_LEASE_KEYS = frozenset({"lockspace", "resource"})
_LEASE_KEYS_SHARED = frozenset({"lockspace", "resource", "shared"})


def _lease_list(value: Any, *, with_shared: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not 1 <= len(value) <= 256:
        raise _Invalid("leases must be a list of 1-256 maps")
    allowed = _LEASE_KEYS_SHARED if with_shared else _LEASE_KEYS
    for item in value:
        if not isinstance(item, dict) or not _LEASE_KEYS <= item.keys() <= allowed:
            raise _Invalid(f"each lease must be a map of {sorted(allowed)}")
    return value


def _once_each(leases: Sequence[tuple[str, str]]) -> None:
    """Refuse a lease named twice in one request, before any of it runs.

    Each lockspace would refuse it too, but only when its turn came: the leases
    of the lockspaces before it would be granted (journaled, seen by others)
    and then rolled back."""
    seen: set[tuple[str, str]] = set()
    for lease in leases:
        if lease in seen:
            raise _Invalid(f"lease {lease[0]}/{lease[1]} is requested twice")
        seen.add(lease)


ONCE_KEY_SIZE = 16


def once_key(op: str, request_id: str, n: int = 0) -> bytes:
    """The key (``once``) of the ``n``-th ``op`` request of a call its caller names
    ``request_id``: the same for the same call repeated, from any process."""
    text = f"lockd-request\0{op}\0{request_id}\0{n}".encode()
    return hashlib.blake2b(text, digest_size=ONCE_KEY_SIZE).digest()


def _once_key(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != ONCE_KEY_SIZE:
        raise _Invalid(f"once must be a byte string of {ONCE_KEY_SIZE} bytes")
    return value


def _build(cls: type[Request], rid: int, args: dict[str, Any]) -> Request:
    # Acquire and release first: they are nearly every request a daemon reads.
    if cls is Acquire:
        leases = tuple(
            LeaseRequest(i["lockspace"], i["resource"], i.get("shared", False))
            for i in _lease_list(args.get("leases"), with_shared=True)
        )
        if len(leases) > 1:  # one lease cannot be named twice
            _once_each([(lease.lockspace, lease.resource) for lease in leases])
        wait = args.get("wait", 0.0)
        if not isinstance(wait, (int, float)) or isinstance(wait, bool):
            raise _Invalid("wait must be a number of seconds")
        if not 0 <= wait <= MAX_WAIT_SECONDS:
            raise _Invalid(f"wait must be between 0 and {MAX_WAIT_SECONDS:g} seconds")
        return Acquire(
            rid,
            leases,
            _bool(args.get("autocreate", False), "autocreate"),
            float(wait),
            _once_key(args["once"]) if "once" in args else None,
        )
    if cls is Release:
        release_all = _bool(args.get("all", False), "all")
        if release_all == ("leases" in args):
            raise _Invalid("release takes either leases or all: true")
        if release_all:
            if "once" in args:
                raise _Invalid("once takes the leases to release, not all: true")
            return Release(rid, (), True)
        pairs = tuple(
            (_lockspace(i["lockspace"]), _resource(i["resource"]))
            for i in _lease_list(args["leases"], with_shared=False)
        )
        if len(pairs) > 1:
            _once_each(pairs)
        return Release(rid, pairs, False, _once_key(args["once"]) if "once" in args else None)
    if cls is Hello:
        versions = args.get("versions")
        if not isinstance(versions, list) or not versions:
            raise _Invalid("versions must be a non-empty list")
        return Hello(
            rid,
            tuple(_uint(v, "version") for v in versions),
            _text(args["client"], "client") if "client" in args else None,
        )
    if cls is Register:
        return Register(rid, _owner(args.get("owner")))
    if cls is CreateLockspace:
        return CreateLockspace(rid, _lockspace(args.get("lockspace")))
    if cls in (CreateResource, DeleteResource):
        return cls(rid, _lockspace(args.get("lockspace")), _resource(args.get("resource")))
    if cls is ListLeases:
        return ListLeases(rid, _lockspace(args["lockspace"]) if "lockspace" in args else None)
    if cls is Subscribe:
        since = _uint(args["since"], "since", positive=True) if "since" in args else None
        return Subscribe(rid, since)
    if cls is Disconnect:
        return Disconnect(rid, _uint(args.get("client"), "client"))
    if cls is SetLog:
        # Absent means unchanged; null is not absent (the CDDL's values are text).
        level, filters = args.get("level"), args.get("filters")
        if "level" in args and level not in LOG_LEVELS:
            raise _Invalid(f"level must be one of {', '.join(LOG_LEVELS)}")
        if "filters" in args and (not isinstance(filters, str) or len(filters) > 4096):
            raise _Invalid("filters must be a string of at most 4096 characters")
        return SetLog(rid, level, filters)
    return cls(rid)


REQUEST_TYPES: dict[str, type[Request]] = {
    cls.OP: cls
    for cls in (
        Hello, Register, Restrict, CreateLockspace, CreateResource, DeleteResource, Acquire,
        Release, Inquire, ListLeases, ListLockspaces, ListClients, Status, Subscribe, Disconnect,
        SetLog, Metrics,
    )
}  # fmt: skip


_ENVELOPE = frozenset({"op", "id"})
_KEYS = {cls: cls.ARGS | _ENVELOPE for cls in REQUEST_TYPES.values()}
"""Every key a request's map may have, by type: tested in one comparison, no set built."""


def request_from_wire(data: Any) -> Request:
    """Build a request from a decoded map; raise RemoteProtocolError(invalid-argument)."""
    if not isinstance(data, dict):
        raise RemoteProtocolError(ErrorCode.INVALID_ARGUMENT, "a request must be a CBOR map")
    rid = data.get("id")
    try:
        rid = _uint(rid, "id")
    except _Invalid as exc:
        raise RemoteProtocolError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
    op = data.get("op")
    cls = REQUEST_TYPES.get(op) if isinstance(op, str) else None
    if cls is None:
        raise RequestError(rid, ErrorCode.INVALID_ARGUMENT, f"unknown operation {op!r}")
    # The arguments are the map's other keys; _build reads them from the map itself
    # (no copy without op and id on every request: no argument has either name).
    if not data.keys() <= _KEYS[cls]:
        unknown = data.keys() - _KEYS[cls]
        raise RequestError(
            # repr: keys may be bytes and text at once, which do not sort together
            rid,
            ErrorCode.INVALID_ARGUMENT,
            f"{op}: unknown arguments {', '.join(sorted(map(repr, unknown)))}",
        )
    try:
        return _build(cls, rid, data)
    except _Invalid as exc:
        raise RequestError(rid, ErrorCode.INVALID_ARGUMENT, f"{op}: {exc}") from None


class RequestError(RemoteProtocolError):
    """A well-framed request that is invalid; carries its id so the reply can name it."""

    def __init__(self, request_id: int, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.request_id = request_id


def reply_to_wire(request_id: int | None, result: dict[str, Any]) -> dict[str, Any]:
    """Success reply map."""
    return {"id": request_id, "result": result}


def error_to_wire(
    request_id: int | None, code: ErrorCode, message: str, **details: Any
) -> dict[str, Any]:
    """Error reply map: ``{"id", "error": {"code", "message", ...details}}``."""
    return {"id": request_id, "error": {"code": code.value, "message": message, **details}}
