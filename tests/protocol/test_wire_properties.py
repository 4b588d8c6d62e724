"""Properties of the wire layer under hostile bytes, checked against the spec, not the code.

A reference decoder written from docs/protocol.md ("Strict CBOR") and RFC 8949 judges
each generated payload; :func:`protocol.codec.decode_item` must agree with it, item
for item: accept what it accepts with the same value, refuse what it refuses with
``invalid-argument``. The generator builds raw CBOR (not through cbor2, which would
only write what it can read back), choosing the encoding of every head: minimal or
not, definite or indefinite, tags, simple values, floats of every width, invalid
UTF-8, reserved codes, truncations and trailing bytes.

Then the connection state (:class:`protocol.server.ServerProtocol`): a stream split
anywhere gives the same requests and refusals, and nothing is parsed after a fatal
one. Last the requests: a valid one with one field changed (every field to every near
miss, and random changes) parses exactly when the CDDL of docs/protocol.md, written
out here as predicates, admits it; else it is refused with its own id.

Derandomized, with fixed budgets: the same examples in every run, well under 10 s.
"""

from __future__ import annotations

import copy as copy_module
import math
import re
import struct
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import MAX_DEPTH, decode_item
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.framing import DEFAULT_MAX_FRAME, encode_frame
from protocol.messages import Request, RequestError, request_from_wire
from protocol.server import Refused, ServerProtocol


def fixed(examples: int) -> settings:
    """The same ``examples`` drawn in every run (derandomized, no example database)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- a reference decoder, from the spec ---------------------------------------------------------


class Bad(Exception):
    """The reference decoder refuses the payload."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise Bad("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _head(reader: _Reader) -> tuple[int, int, int]:
    """(major type, additional info, argument); indefinite heads are refused here."""
    (initial,) = reader.take(1)
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, info
    if info <= 27:
        size = 1 << (info - 24)
        return major, info, int.from_bytes(reader.take(size), "big")
    if info == 31 and major in (2, 3, 4, 5):
        raise Bad("indefinite length")
    raise Bad("reserved or misplaced additional information")


def _item(reader: _Reader, depth: int) -> Any:
    """One item; ``depth`` counts the arrays and maps around it."""
    if depth > MAX_DEPTH:
        raise Bad("too deep")
    major, info, arg = _head(reader)
    if major == 0:
        return arg
    if major == 1:
        return -1 - arg
    if major == 2:
        return reader.take(arg)
    if major == 3:
        try:
            return reader.take(arg).decode("utf-8")
        except UnicodeDecodeError:
            raise Bad("invalid UTF-8") from None
    if major == 4:
        return [_item(reader, depth + 1) for _ in range(arg)]
    if major == 5:
        out: dict[Any, Any] = {}
        for _ in range(arg):
            key = _item(reader, depth + 1)
            if not isinstance(key, str | bytes):
                raise Bad("map key neither text nor bytes")
            if key in out:
                raise Bad("duplicate key")
            out[key] = _item(reader, depth + 1)
        return out
    if major == 6:
        raise Bad("tag")
    # major 7
    if info == 20:
        return False
    if info == 21:
        return True
    if info == 22:
        return None
    if info == 23:
        return cbor2.undefined
    if info < 20:
        return cbor2.CBORSimpleValue(info)
    if info == 24:
        if arg < 32:
            raise Bad("two-byte simple value below 32")
        return cbor2.CBORSimpleValue(arg)
    width = {25: "e", 26: "f", 27: "d"}[info]
    size = {25: 2, 26: 4, 27: 8}[info]
    (value,) = struct.unpack(">" + width, arg.to_bytes(size, "big"))
    return float(value)


def reference_decode(data: bytes) -> Any:
    """Exactly one strict item filling ``data``, or Bad."""
    reader = _Reader(data)
    item = _item(reader, 0)
    if reader.pos != len(data):
        raise Bad("trailing bytes")
    return item


def same(a: Any, b: Any) -> bool:
    """Equal as decoded values: NaN equals NaN, 0.0 and -0.0 differ, bool is not int."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# -- raw CBOR, every encoding choice drawn ------------------------------------------------------


@st.composite
def heads(draw: st.DrawFn, major: int, arg: int) -> bytes:
    """A head for ``arg``: the shortest form mostly, sometimes a longer (still valid) one."""
    widths = [w for w in (0, 1, 2, 4, 8) if (arg < 24 if w == 0 else arg < 1 << (8 * w))]
    width = widths[0] if draw(st.integers(0, 3)) else draw(st.sampled_from(widths))
    if width == 0:
        return bytes([major << 5 | arg])
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + arg.to_bytes(width, "big")


def _text_bytes() -> st.SearchStrategy[bytes]:
    """UTF-8 mostly; sometimes sequences no UTF-8 decoder may accept."""
    invalid = st.sampled_from(
        [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
    )
    return st.text(max_size=6).map(str.encode) | st.tuples(
        st.text(max_size=3).map(str.encode), invalid
    ).map(b"".join)


KEYS = st.sampled_from(["op", "id", "versions", "leases", "lockspace", "resource", "x"])


@st.composite
def raw_items(draw: st.DrawFn, depth: int = 0) -> bytes:
    """One CBOR item as bytes, drawn at the level of heads and bodies."""
    containers = depth < MAX_DEPTH + 2
    kind = draw(
        st.sampled_from(
            ["uint", "nint", "bytes", "text", "simple", "float", "tag", "junk"]
            + (["array", "map", "map", "indefinite"] if containers else [])
        )
    )
    if kind == "uint":
        return draw(heads(0, draw(st.integers(0, 2**64 - 1))))
    if kind == "nint":
        return draw(heads(1, draw(st.integers(0, 2**64 - 1))))
    if kind == "bytes":
        body = draw(st.binary(max_size=6))
        return draw(heads(2, len(body))) + body
    if kind == "text":
        body = draw(_text_bytes())
        return draw(heads(3, len(body))) + body
    if kind == "simple":
        return draw(
            st.sampled_from([b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xe0", b"\xf3"])
            | st.integers(0, 255).map(lambda n: b"\xf8" + bytes([n]))
        )
    if kind == "float":
        value = draw(st.floats(allow_nan=True, allow_infinity=True))
        width = draw(st.sampled_from(["e", "f", "d"]))
        try:
            packed = struct.pack(">" + width, value)
        except OverflowError:
            width, packed = "d", struct.pack(">d", value)
        return {"e": b"\xf9", "f": b"\xfa", "d": b"\xfb"}[width] + packed
    if kind == "tag":
        tag = draw(
            st.sampled_from([0, 1, 2, 3, 24, 28, 29, 258, 55799]) | st.integers(0, 2**64 - 1)
        )
        return draw(heads(6, tag)) + draw(raw_items(depth + 1))
    if kind == "junk":  # reserved codes, a lone break, a head with its argument cut off
        return draw(
            st.sampled_from([b"\xff", b"\x1c", b"\x3d", b"\x5e", b"\xfc", b"\x19\x01", b"\x1f"])
        )
    if kind == "array":
        items = draw(st.lists(raw_items(depth + 1), max_size=3))
        return draw(heads(4, len(items))) + b"".join(items)
    if kind == "map":
        pairs = draw(st.lists(st.tuples(raw_keys(depth), raw_items(depth + 1)), max_size=3))
        return draw(heads(5, len(pairs))) + b"".join(k + v for k, v in pairs)
    # an indefinite-length container or string, well formed otherwise
    which = draw(st.sampled_from([b"\x9f", b"\xbf", b"\x5f", b"\x7f"]))
    if which == b"\x9f":
        return which + b"".join(draw(st.lists(raw_items(depth + 1), max_size=2))) + b"\xff"
    if which == b"\xbf":
        return which + draw(raw_keys(depth)) + draw(raw_items(depth + 1)) + b"\xff"
    chunk = b"\x41a" if which == b"\x5f" else b"\x61a"
    return which + chunk * draw(st.integers(0, 2)) + b"\xff"


@st.composite
def raw_keys(draw: st.DrawFn, depth: int) -> bytes:
    """A map key: a protocol key mostly (so duplicates come up), sometimes any item."""
    if draw(st.integers(0, 4)):
        key = draw(KEYS).encode()
        major = 3 if draw(st.integers(0, 4)) else 2
        return draw(heads(major, len(key))) + key
    return draw(raw_items(depth + 1))


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """An item, sometimes cut short or followed by more bytes."""
    data = draw(raw_items())
    if draw(st.integers(0, 5)) == 0:  # around the edge of the depth limit
        for _ in range(draw(st.integers(MAX_DEPTH - 2, MAX_DEPTH + 2))):
            data = (b"\x81" if draw(st.booleans()) else b"\xa1\x61k") + data
    damage = draw(st.integers(0, 9))
    if damage == 0 and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if damage == 1:
        return data + draw(st.binary(min_size=1, max_size=3))
    return data


# -- decoding ------------------------------------------------------------------------------------


def _outcome(call: Callable[[], Any]) -> tuple[Any, RemoteProtocolError | None]:
    """``call()``'s value, or the protocol error it raised."""
    try:
        return call(), None
    except RemoteProtocolError as exc:
        return None, exc


def _judge(data: bytes) -> tuple[str, Any]:
    try:
        return "ok", reference_decode(data)
    except Bad as exc:
        return "bad", str(exc)


@fixed(600)
@given(payloads())
def test_strict_decoding_agrees_with_the_spec(data: bytes) -> None:
    """decode_item accepts exactly what a decoder written from the spec accepts, with the
    same value, and refuses the rest with invalid-argument."""
    verdict, expected = _judge(data)
    got, refusal = _outcome(lambda: decode_item(data))
    if refusal is not None:
        assert verdict == "bad", f"refused {data.hex()} ({refusal}); the spec reads {expected!r}"
        assert refusal.code is ErrorCode.INVALID_ARGUMENT
        assert not refusal.fatal  # one bad frame; the stream goes on
        return
    assert verdict == "ok", f"accepted {data.hex()} as {got!r}; the spec refuses it: {expected}"
    assert same(got, expected), (data.hex(), got, expected)


@pytest.mark.parametrize(
    ("hexdata", "accepted"),
    [
        ("81" * MAX_DEPTH + "00", True),  # an integer inside 8 arrays
        ("81" * (MAX_DEPTH + 1) + "00", False),  # ... inside 9
        ("81" * MAX_DEPTH + "80", True),  # an empty array inside 8: no item is deeper
        ("81" * MAX_DEPTH + "a0", True),
        ("81" * (MAX_DEPTH + 1) + "80", False),
        ("a1616b" + "81" * (MAX_DEPTH - 1) + "00", True),  # a map value counts like an item
        ("a1616b" + "81" * MAX_DEPTH + "00", False),
    ],
)
def test_depth_is_counted_in_containers_around_an_item(hexdata: str, accepted: bool) -> None:
    """The documented limit, at its edge: an item may sit inside at most 8 arrays or maps."""
    data = bytes.fromhex(hexdata)
    assert (_judge(data)[0] == "ok") is accepted
    if accepted:
        decode_item(data)
    else:
        with pytest.raises(RemoteProtocolError):
            decode_item(data)


# -- the connection's state ---------------------------------------------------------------------

HELLO = encode_frame(cbor2.dumps({"op": "hello", "id": 0, "versions": [1]}))


def _frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """What a buggy or hostile client writes after its hello: frames of raw items, valid
    requests, bad length heads (past the cap, or cut), in any order."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 9))
        if kind <= 4:
            parts.append(_frame_of(draw(payloads())))
        elif kind <= 6:
            parts.append(_frame_of(cbor2.dumps(draw(requests()))))
        elif kind == 7:
            parts.append(struct.pack(">I", draw(st.integers(DEFAULT_MAX_FRAME + 1, 2**32 - 1))))
        elif kind == 8:
            parts.append(_frame_of(cbor2.dumps(draw(requests())))[: draw(st.integers(0, 8))])
        else:
            parts.append(draw(st.binary(max_size=12)))
    return b"".join(parts)


def _describe(item: Request | Refused) -> tuple[Any, ...]:
    if isinstance(item, Refused):
        return ("refused", item.request_id, item.code, item.message, item.fatal)
    return ("request", item)


def _feed(stream: bytes, cuts: list[int]) -> tuple[list[tuple[Any, ...]], ServerProtocol]:
    proto = ServerProtocol()
    out: list[tuple[Any, ...]] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        proto.receive_data(stream[start:cut])  # an empty piece is end of stream: not here
        start = cut
        while (item := proto.next_incoming()) is not None:
            out.append(_describe(item))
    proto.receive_data(b"")
    while (item := proto.next_incoming()) is not None:
        out.append(_describe(item))
    return out, proto


@fixed(120)
@given(streams(), st.data())
def test_a_stream_split_anywhere_gives_the_same_requests(
    stream: bytes, data: st.DataObject
) -> None:
    """Whole, one byte at a time, or cut at drawn places: the same requests and refusals
    come out, in the same order; a fatal refusal is the last thing out, and the
    connection is closed after it; at end of stream nothing is left half read."""
    stream = HELLO + stream
    whole, proto = _feed(stream, [])
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=8, unique=True))
    assert _feed(stream, cuts)[0] == whole
    assert _feed(stream, list(range(1, len(stream))))[0] == whole
    assert whole[0][0] == "request"  # the hello
    fatal = [i for i, item in enumerate(whole) if item[0] == "refused" and item[4]]
    assert fatal in ([], [len(whole) - 1]), whole
    assert proto.closed
    for item in whole:
        if item[0] == "refused":
            assert isinstance(item[2], ErrorCode)
            assert item[2] is not ErrorCode.INTERNAL
            assert item[3]  # a message a human can act on


# -- valid requests with one field changed ------------------------------------------------------

OWNER = {"uuid": b"\x07" * 16, "name": "vm7", "id": 7, "pid": 4321}
LEASE = {"lockspace": "org.libvirt.lockd.files", "resource": "r1"}
VALID: list[dict[str, Any]] = [
    {"op": "hello", "id": 1, "versions": [1], "client": "plugin"},
    {"op": "register", "id": 2, "owner": OWNER},
    {"op": "restrict", "id": 3},
    {"op": "create-lockspace", "id": 4, "lockspace": "ls"},
    {"op": "create-resource", "id": 5, **LEASE},
    {"op": "delete-resource", "id": 6, **LEASE},
    {"op": "acquire", "id": 7, "leases": [{**LEASE, "shared": True}, {**LEASE, "resource": "r2"}],
     "autocreate": True, "wait": 1.5},
    {"op": "release", "id": 8, "leases": [LEASE]},
    {"op": "release", "id": 9, "all": True},
    {"op": "inquire", "id": 10},
    {"op": "list-leases", "id": 11, "lockspace": "ls"},
    {"op": "list-lockspaces", "id": 12},
    {"op": "list-clients", "id": 13},
    {"op": "status", "id": 14},
    {"op": "subscribe", "id": 15, "since": 3},
    {"op": "disconnect", "id": 16, "client": 2},
    {"op": "set-log", "id": 17, "level": "debug", "filters": "info:lockd"},
    {"op": "metrics", "id": 18},
]  # fmt: skip

ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=17),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


NEAR_MISSES: list[Any] = [
    True, False, None, 0, 1, -1, 2**64 - 1, 2**64, -(2**64), 0.0, -0.0, 1.0, 1.5, 3600, 3600.5,
    math.nan, math.inf, "", "1", "a" * 255, "a" * 256, "\u00e9" * 127 + "a", "\u00e9" * 128,
    "a\nb", "a\x85b", "a\u202eb", ".", "..", "a/b", "org.libvirt.lockd.index", "debug", "DEBUG",
    "Org.Libvirt.Lockd.INDEX",
    b"", b"\x07" * 16, b"\x07" * 17, [], [1], {}, {"lockspace": "ls"},
]  # fmt: skip
"""Values one step from valid: the other type of a bool, an int or a string, a bound and
one past it (counted in bytes where the spec counts bytes), a character the names refuse."""


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a request map a value sits (keys of maps, indexes of lists)."""
    out = [path] if path else []
    if isinstance(value, dict):
        for key, inner in value.items():
            out += _paths(inner, (*path, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            out += _paths(inner, (*path, index))
    return out


def _changed(
    value: dict[str, Any], path: tuple[Any, ...], change: Callable[[Any, Any], None]
) -> Any:
    """A deep copy of ``value`` with ``change(container, key)`` applied at ``path``."""
    copy = copy_module.deepcopy(value)
    container = copy
    for step in path[:-1]:
        container = container[step]
    change(container, path[-1])
    return copy


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with one thing changed: a value replaced, a key dropped, or a key
    added (text or bytes, known to another operation or unknown)."""
    base = draw(st.sampled_from(VALID))
    path = draw(st.sampled_from(_paths(base)))
    how = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
    if how == "replace":
        new = draw(st.sampled_from(NEAR_MISSES) | ANY_VALUE)

        def change(container: Any, key: Any) -> None:
            container[key] = new

    elif how == "drop":

        def change(container: Any, key: Any) -> None:
            del container[key]

    else:
        extra = draw(
            st.sampled_from(["wait", "all", "since", "client", "owner", "x", "", b"op", b"id"])
            | st.text(max_size=4)
        )
        value = draw(ANY_VALUE)

        def change(container: Any, key: Any) -> None:
            if isinstance(container, dict):
                container.setdefault(extra, value)
            else:
                container.append(value)

    result: dict[str, Any] = _changed(base, path, change)
    return result


def _id_of(request: dict[str, Any]) -> int | None:
    rid = request.get("id")
    return rid if type(rid) is int and 0 <= rid <= 2**64 - 1 else None


# The request CDDL of docs/protocol.md, as predicates (written from the page, not the code).
_LOCKSPACE = re.compile(r"[A-Za-z0-9._:-]{1,255}")
_RESOURCE = re.compile(r"[A-Za-z0-9._:@+=-]{1,255}")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _is_uint(v: Any, low: int = 0) -> bool:
    return type(v) is int and low <= v <= 2**64 - 1


def _is_text255(v: Any) -> bool:
    return type(v) is str and 1 <= len(v.encode()) <= 255 and not _CONTROLS.search(v)


def _is_lockspace(v: Any) -> bool:
    return type(v) is str and bool(_LOCKSPACE.fullmatch(v)) and v not in (".", "..")


def _is_resource(v: Any) -> bool:
    return (
        type(v) is str
        and bool(_RESOURCE.fullmatch(v))
        and v not in (".", "..")
        and v.lower() != "org.libvirt.lockd.index"
    )


def _is_owner(v: Any) -> bool:
    return (
        type(v) is dict
        and set(v) == {"uuid", "name", "id", "pid"}
        and type(v["uuid"]) is bytes
        and len(v["uuid"]) == 16
        and _is_text255(v["name"])
        and _is_uint(v["id"], 1)
        and _is_uint(v["pid"], 1)
    )


def _is_lease_list(v: Any, *, shared: bool) -> bool:
    """``[1*256 lease]`` (or ``lease-ref``), no lease named twice (the prose's rule)."""
    if type(v) is not list or not 1 <= len(v) <= 256:
        return False
    for lease in v:
        if type(lease) is not dict or not {"lockspace", "resource"} <= set(lease):
            return False
        if not set(lease) <= {"lockspace", "resource", *(["shared"] if shared else [])}:
            return False
        if not (_is_lockspace(lease["lockspace"]) and _is_resource(lease["resource"])):
            return False
        if "shared" in lease and type(lease["shared"]) is not bool:
            return False
    return len({(lease["lockspace"], lease["resource"]) for lease in v}) == len(v)


def _is_wait(v: Any) -> bool:
    return type(v) in (int, float) and 0 <= v <= 3600  # NaN compares false: refused


_SPEC: dict[str, tuple[dict[str, Callable[[Any], bool]], frozenset[str]]] = {
    # op: (argument -> its check, the required ones)
    "hello": ({"versions": lambda v: type(v) is list and len(v) > 0 and all(map(_is_uint, v)),
               "client": _is_text255}, frozenset({"versions"})),
    "register": ({"owner": _is_owner}, frozenset({"owner"})),
    "restrict": ({}, frozenset()),
    "create-lockspace": ({"lockspace": _is_lockspace}, frozenset({"lockspace"})),
    "create-resource": ({"lockspace": _is_lockspace, "resource": _is_resource},
                        frozenset({"lockspace", "resource"})),
    "delete-resource": ({"lockspace": _is_lockspace, "resource": _is_resource},
                        frozenset({"lockspace", "resource"})),
    "acquire": ({"leases": lambda v: _is_lease_list(v, shared=True),
                 "autocreate": lambda v: type(v) is bool, "wait": _is_wait},
                frozenset({"leases"})),
    "release": ({"leases": lambda v: _is_lease_list(v, shared=False),
                 "all": lambda v: type(v) is bool}, frozenset()),
    "inquire": ({}, frozenset()),
    "list-leases": ({"lockspace": _is_lockspace}, frozenset()),
    "list-lockspaces": ({}, frozenset()),
    "list-clients": ({}, frozenset()),
    "status": ({}, frozenset()),
    "subscribe": ({"since": lambda v: _is_uint(v, 1)}, frozenset()),
    "disconnect": ({"client": _is_uint}, frozenset({"client"})),
    "set-log": ({"level": lambda v: v in ("debug", "info", "warning", "error") and type(v) is str,
                 "filters": lambda v: type(v) is str and len(v) <= 4096}, frozenset()),
    "metrics": ({}, frozenset()),
}  # fmt: skip


def spec_valid(request: dict[Any, Any]) -> bool:
    """Whether docs/protocol.md's CDDL (and its prose) admits ``request``."""
    op = request.get("op")
    if type(op) is not str or op not in _SPEC or not _is_uint(request.get("id")):
        return False
    checks, required = _SPEC[op]
    args = {k: v for k, v in request.items() if k not in ("op", "id")}
    if not required <= set(args) or not set(args) <= set(checks):
        return False
    if op == "release":  # ("leases": [...], ? "all": false // "all": true)
        if args.get("all") is True and "leases" in args:
            return False
        if "leases" not in args and args.get("all") is not True:
            return False
    return all(checks[key](value) for key, value in args.items())


def test_the_spec_predicates_admit_the_documented_requests() -> None:
    """The predicates are no stricter than the page: every valid base request passes."""
    assert all(spec_valid(request) for request in VALID)


def check_changed(request: dict[Any, Any]) -> None:
    """A changed request parses exactly when the protocol's CDDL admits it (and then means
    what the map says: its id and operation); else it gets ``invalid-argument`` carrying
    the request's own id (null only when the id is what broke), with a message naming the
    operation or the problem."""
    payload = cbor2.dumps(request)
    parsed, refusal = _outcome(lambda: request_from_wire(decode_item(payload)))
    if _judge(payload)[0] == "bad":  # a value strict CBOR has no room for (2**64: a tag)
        assert refusal is not None
        assert not isinstance(refusal, RequestError)  # refused whole: its id is not read
        assert refusal.code is ErrorCode.INVALID_ARGUMENT
        return
    rid = _id_of(request)
    assert (refusal is None) is spec_valid(request), (request, refusal and refusal.message)
    if isinstance(refusal, RequestError):
        assert rid is not None
        assert refusal.request_id == rid
    if refusal is not None:
        assert refusal.code is ErrorCode.INVALID_ARGUMENT
        assert not refusal.fatal
        # Without a RequestError (no id to answer with) only when the id is what broke.
        assert isinstance(refusal, RequestError) or rid is None, (request, refusal.message)
        op = request.get("op")
        named = isinstance(op, str) and refusal.message.startswith(f"{op}: ")
        assert named or "operation" in refusal.message or rid is None, refusal.message
        return
    assert parsed.id == rid
    assert request["op"] == parsed.OP
    assert set(request) <= {"op", "id", *type(parsed).ARGS}


def test_every_field_one_step_from_valid() -> None:
    """Each field of each operation's request, in turn, set to each near miss or dropped:
    every case is judged as the spec judges it (all of them, not a sample: a near miss
    at one field of one operation is exactly what a random draw passes by)."""
    cases = 0
    for base in VALID:
        for path in _paths(base):
            for value in NEAR_MISSES:

                def replace(container: Any, key: Any, value: Any = value) -> None:
                    container[key] = value

                check_changed(_changed(base, path, replace))
                cases += 1

            def drop(container: Any, key: Any) -> None:
                del container[key]

            check_changed(_changed(base, path, drop))
    assert cases > 2500


@fixed(600)
@given(requests())
def test_a_valid_request_with_one_field_changed_parses_as_the_spec_says(
    request: dict[str, Any],
) -> None:
    """Random values (of any type and shape), dropped keys and added ones, anywhere in a
    valid request: judged as the spec judges them (see :func:`check_changed`)."""
    check_changed(request)
