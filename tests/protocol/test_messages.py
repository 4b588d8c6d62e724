"""Requests from the wire: valid ones become values, anything else a clear error."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import decode_item, encode_item
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.messages import (
    Acquire,
    Hello,
    LeaseRequest,
    Register,
    Release,
    RequestError,
    error_to_wire,
    request_from_wire,
)

OWNER = {"uuid": b"\x07" * 16, "name": "vm7", "id": 7, "pid": 4321}


def test_acquire_from_wire() -> None:
    """A multi-lease acquire becomes one value with every lease validated."""
    request = request_from_wire(
        {
            "op": "acquire",
            "id": 5,
            "leases": [
                {"lockspace": "org.libvirt.lockd.files", "resource": "a" * 64},
                {"lockspace": "org.libvirt.lockd.files", "resource": "b" * 64, "shared": True},
            ],
            "autocreate": True,
            "wait": 2,
        }
    )
    assert request == Acquire(
        5,
        (
            LeaseRequest("org.libvirt.lockd.files", "a" * 64),
            LeaseRequest("org.libvirt.lockd.files", "b" * 64, True),
        ),
        autocreate=True,
        wait=2.0,
    )


def test_hello_and_register() -> None:
    """The first two requests of every session parse."""
    assert request_from_wire({"op": "hello", "id": 0, "versions": [1]}) == Hello(0, (1,))
    register = request_from_wire({"op": "register", "id": 1, "owner": OWNER})
    assert isinstance(register, Register)
    assert register.owner.pid == 4321


def test_names_count_utf8_bytes() -> None:
    """text255 is 255 bytes: 127 two-byte characters and one ASCII fit exactly."""
    name = "\u00e9" * 127 + "a"
    register = request_from_wire({"op": "register", "id": 1, "owner": {**OWNER, "name": name}})
    assert isinstance(register, Register)
    assert register.owner.name == name
    assert request_from_wire({"op": "hello", "id": 0, "versions": [1], "client": name}) == Hello(
        0, (1,), name
    )


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"op": "frobnicate", "id": 1}, "unknown operation"),
        ({"op": "status", "id": 1, "extra": 1}, "status: unknown arguments 'extra'"),
        ({"op": "register", "id": 1, "owner": {**OWNER, "id": 0}}, "greater than 0"),
        ({"op": "register", "id": 1, "owner": {**OWNER, "uuid": b"x"}}, "16 bytes"),
        ({"op": "acquire", "id": 1, "leases": []}, "1-256"),
        (
            {"op": "acquire", "id": 1, "leases": [{"lockspace": "ls", "resource": "../x"}]},
            "invalid resource name",
        ),
        (
            {"op": "acquire", "id": 1, "leases": [{"lockspace": "..", "resource": "x"}]},
            "invalid lockspace name",
        ),
        (
            {
                "op": "acquire",
                "id": 1,
                "leases": [{"lockspace": "ls", "resource": "x"}],
                "wait": -1,
            },
            "wait",
        ),
        ({"op": "release", "id": 1}, "either leases or all"),
        ({"op": "disconnect", "id": 1, "client": "x"}, "unsigned"),
        # Names lockd prints: a newline would forge a line of `lockd events`.
        ({"op": "register", "id": 1, "owner": {**OWNER, "name": "vm\n7 x"}}, "control"),
        ({"op": "register", "id": 1, "owner": {**OWNER, "name": "vm\x1b[31m"}}, "control"),
        ({"op": "register", "id": 1, "owner": {**OWNER, "name": "vm\x85"}}, "control"),
        ({"op": "hello", "id": 1, "versions": [1], "client": "c\r"}, "control"),
        # text255 is 255 bytes of UTF-8: 128 two-byte characters are 256 bytes.
        ({"op": "register", "id": 1, "owner": {**OWNER, "name": "\u00e9" * 128}}, "bytes"),
        ({"op": "hello", "id": 1, "versions": [1], "client": "\u00e9" * 128}, "bytes"),
        # An optional argument given as null is a wrong type, not an absent argument.
        ({"op": "hello", "id": 1, "versions": [1], "client": None}, "client"),
        ({"op": "list-leases", "id": 1, "lockspace": None}, "lockspace"),
        ({"op": "set-log", "id": 1, "level": None}, "level"),
        ({"op": "set-log", "id": 1, "filters": None}, "filters"),
        # Keys of both kinds: the message must still be built (bytes and text do not sort).
        ({"op": "status", "id": 1, b"k": 1, "x": 2}, "unknown arguments 'x', b'k'"),
        # Named twice in a later lockspace: refused before the first lockspace grants.
        (
            {
                "op": "acquire",
                "id": 1,
                "leases": [
                    {"lockspace": "a", "resource": "x"},
                    {"lockspace": "b", "resource": "y"},
                    {"lockspace": "b", "resource": "y", "shared": True},
                ],
            },
            "lease b/y is requested twice",
        ),
        (
            {
                "op": "release",
                "id": 1,
                "leases": [
                    {"lockspace": "a", "resource": "x"},
                    {"lockspace": "b", "resource": "y"},
                    {"lockspace": "b", "resource": "y"},
                ],
            },
            "lease b/y is requested twice",
        ),
    ],
)
def test_invalid_requests_keep_their_id(data: dict[str, Any], fragment: str) -> None:
    """Each bad request is invalid-argument, names the problem, and keeps its id."""
    with pytest.raises(RequestError) as info:
        request_from_wire(data)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.request_id == 1
    assert fragment in info.value.message


def test_request_without_a_usable_id_is_refused() -> None:
    """A request whose id cannot be read gets an error with no id."""
    with pytest.raises(RemoteProtocolError) as info:
        request_from_wire({"op": "status", "id": -1})
    assert not isinstance(info.value, RequestError)


def test_release_all() -> None:
    """release {all: true} ends every lease of the owner."""
    assert request_from_wire({"op": "release", "id": 3, "all": True}) == Release(3, (), True)


def test_acquire_and_release_take_a_16_byte_key() -> None:
    """``once`` is the request's key: 16 bytes, on an acquire or a release of listed
    leases; anything else, or with ``all: true``, is refused before anything runs."""
    ref = {"lockspace": "ls", "resource": "r"}
    key = b"\x01" * 16
    acquire = request_from_wire({"op": "acquire", "id": 1, "leases": [ref], "once": key})
    assert isinstance(acquire, Acquire)
    assert acquire.once == key
    release = request_from_wire({"op": "release", "id": 2, "leases": [ref], "once": key})
    assert release == Release(2, (("ls", "r"),), False, key)
    assert request_from_wire({"op": "release", "id": 2, "leases": [ref]}) == Release(
        2, (("ls", "r"),)
    )
    for bad in (b"\x01" * 15, b"\x01" * 17, key.hex(), None, 1):
        for op in ("acquire", "release"):
            with pytest.raises(RequestError, match="once must be a byte string of 16 bytes"):
                request_from_wire({"op": op, "id": 3, "leases": [ref], "once": bad})
    with pytest.raises(RequestError, match="not all: true"):
        request_from_wire({"op": "release", "id": 4, "all": True, "once": key})


def test_error_reply_round_trips() -> None:
    """Error replies are plain maps with a stable code string."""
    wire = error_to_wire(9, ErrorCode.BUSY, "held", holders=[])
    assert decode_item(encode_item(wire)) == {
        "id": 9,
        "error": {"code": "busy", "message": "held", "holders": []},
    }


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.sampled_from(["hello", "register", "acquire", "release", "status", "disconnect", "x"]),
    st.dictionaries(
        st.sampled_from(
            ["id", "versions", "owner", "leases", "all", "wait", "client", "zz", b"zz", b"id", 1]
        ),
        json_like,
        max_size=4,
    ),
)
def test_any_map_parses_or_raises_a_protocol_error(op: str, args: dict[str, Any]) -> None:
    """No decoded map makes request parsing fail with anything but a protocol error."""
    with contextlib.suppress(RemoteProtocolError):
        request_from_wire({"op": op, **args})
