"""The server's sans-I/O connection state: framing, strict decoding and the hello rule."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import decode_item, encode_item
from protocol.errors import ErrorCode
from protocol.framing import encode_frame
from protocol.messages import Acquire, Hello, Request, Status
from protocol.server import Refused, ServerProtocol

HELLO = encode_frame(encode_item({"op": "hello", "id": 0, "versions": [1]}))
STATUS = encode_frame(encode_item({"op": "status", "id": 7}))


def drain(proto: ServerProtocol) -> list[Request | Refused]:
    out = []
    while (item := proto.next_incoming()) is not None:
        out.append(item)
    return out


def test_whole_and_byte_by_byte_give_the_same_requests() -> None:
    whole = ServerProtocol()
    whole.receive_data(HELLO + STATUS)
    got_whole = drain(whole)
    split = ServerProtocol()
    got_split: list[Request | Refused] = []
    for byte in HELLO + STATUS:
        split.receive_data(bytes([byte]))
        got_split.extend(drain(split))
    assert got_whole == got_split
    assert [type(r) for r in got_whole] == [Hello, Status]
    assert whole.version == 1


def test_requests_before_hello_are_refused_with_their_id() -> None:
    proto = ServerProtocol()
    proto.receive_data(STATUS)
    (refused,) = drain(proto)
    assert isinstance(refused, Refused)
    assert (refused.request_id, refused.code, refused.fatal) == (
        7,
        ErrorCode.INVALID_ARGUMENT,
        False,
    )
    assert "hello" in refused.message


def test_no_common_version() -> None:
    proto = ServerProtocol()
    proto.receive_data(encode_frame(encode_item({"op": "hello", "id": 1, "versions": [2, 3]})))
    (refused,) = drain(proto)
    assert isinstance(refused, Refused)
    assert refused.code is ErrorCode.UNSUPPORTED_VERSION
    reply = decode_item(proto.refusal(refused)[4:])
    assert reply == {
        "id": 1,
        "error": {"code": "unsupported-version", "message": refused.message, "versions": [1]},
    }


def test_oversized_length_is_fatal_before_the_body_arrives() -> None:
    proto = ServerProtocol()
    proto.receive_data(HELLO + struct.pack(">I", 1 << 30))
    hello, refused = drain(proto)
    assert isinstance(hello, Hello)
    assert isinstance(refused, Refused)
    assert (refused.code, refused.fatal, refused.request_id) == (ErrorCode.TOO_LARGE, True, None)
    proto.receive_data(STATUS)
    assert drain(proto) == []  # nothing more is parsed on a failed stream
    assert proto.closed


def test_trailing_bytes_inside_a_frame_refuse_only_that_frame() -> None:
    proto = ServerProtocol()
    bad = encode_item({"op": "status", "id": 3}) + b"\x00"
    proto.receive_data(HELLO + encode_frame(bad) + STATUS)
    _, refused, status = drain(proto)
    assert isinstance(refused, Refused)
    assert not refused.fatal
    assert "trailing" in refused.message
    assert isinstance(status, Status)


def test_acquire_parses_into_a_value() -> None:
    proto = ServerProtocol()
    lease = {"lockspace": "org.libvirt.lockd.files", "resource": "abc", "shared": True}
    proto.receive_data(
        HELLO + encode_frame(encode_item({"op": "acquire", "id": 9, "leases": [lease]}))
    )
    _, acquire = drain(proto)
    assert isinstance(acquire, Acquire)
    assert acquire.leases[0].shared is True


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_any_bytes_yield_requests_or_refusals(data: bytes, chunk: int) -> None:
    """Garbage after a valid hello: only values come out, never an exception."""
    proto = ServerProtocol()
    proto.receive_data(HELLO)
    drain(proto)
    for i in range(0, len(data), chunk):
        proto.receive_data(data[i : i + chunk])
        for item in drain(proto):
            assert isinstance(item, Request | Refused)
            if isinstance(item, Refused):
                assert isinstance(item.code, ErrorCode)
    proto.receive_data(b"")
    for item in drain(proto):
        assert isinstance(item, Request | Refused)


def test_protocol_doc_examples_decode_to_what_they_say() -> None:
    """Every hex frame in docs/protocol.md decodes, so an outside client can trust them."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    blocks = re.findall(r"```\n([0-9a-f\n]+)```", doc)
    assert len(blocks) >= 4
    for block in blocks:
        data = bytes.fromhex(block.replace("\n", ""))
        (length,) = struct.unpack(">I", data[:4])
        assert length == len(data) - 4
        assert isinstance(decode_item(data[4:]), dict)
