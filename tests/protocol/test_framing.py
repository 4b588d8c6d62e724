"""Framing and strict decoding, fed whole, byte by byte and with trailing data."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import decode_item, encode_item
from protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocol.framing import FrameDecoder, encode_frame

HELLO = {"op": "hello", "id": 0, "versions": [1]}
HELLO_FRAME = bytes.fromhex("00000019a3626f706568656c6c6f626964006876657273696f6e738101")


def _frames(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_golden_hello_frame() -> None:
    """The hello request encodes to the documented bytes."""
    assert encode_frame(encode_item(HELLO)) == HELLO_FRAME


def test_frames_fed_whole_byte_by_byte_and_back_to_back_agree() -> None:
    """Splitting the stream anywhere yields the same frames."""
    stream = HELLO_FRAME + encode_frame(encode_item({"op": "status", "id": 1}))
    whole = FrameDecoder()
    whole.receive_data(stream)
    expected = _frames(whole)
    assert len(expected) == 2
    bytewise = FrameDecoder()
    got: list[bytes] = []
    for i in range(len(stream)):
        bytewise.receive_data(stream[i : i + 1])
        got += _frames(bytewise)
    assert got == expected


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    """A length prefix past the cap is fatal at once; nothing is buffered for it."""
    decoder = FrameDecoder(max_frame=1024)
    decoder.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.fatal


def test_eof_inside_a_frame_is_an_error_and_clean_eof_is_not() -> None:
    """A truncated frame at EOF is reported; EOF between frames just closes."""
    clean = FrameDecoder()
    clean.receive_data(HELLO_FRAME)
    clean.receive_data(b"")
    clean.receive_data(b"")  # a read resumed after the end says it again: no error
    assert len(_frames(clean)) == 1
    assert clean.closed
    torn = FrameDecoder()
    torn.receive_data(HELLO_FRAME[:-1])
    torn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        torn.next_frame()


def test_trailing_bytes_inside_a_frame_are_refused() -> None:
    """cbor2 would ignore bytes after the item; the codec does not."""
    with pytest.raises(RemoteProtocolError, match="trailing"):
        decode_item(cbor2.dumps(HELLO) + b"\x00")


@pytest.mark.parametrize(
    ("hexdata", "why"),
    [
        ("a2616101616102", "duplicate key"),
        ("9f01ff", "indefinite array"),
        ("c11a00000000", "datetime tag"),
        ("d81d00", "shared-reference tag"),
        ("d9270f00", "unknown tag"),
        ("81" * 20 + "00", "deep nesting"),
        ("5b7fffffffffffffff78", "huge claimed length"),
        ("a1010a", "integer map key"),
    ],
)
def test_strict_decoding_refuses(hexdata: str, why: str) -> None:
    """Inputs two decoders could read differently are refused with invalid-argument."""
    with pytest.raises(RemoteProtocolError) as info:
        decode_item(bytes.fromhex(hexdata))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT, why


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_either_parse_or_raise_a_protocol_error(data: bytes) -> None:
    """Garbage never escapes as another exception type."""
    decoder = FrameDecoder(max_frame=128)
    try:
        decoder.receive_data(data)
        decoder.receive_data(b"")
        while (frame := decoder.next_frame()) is not None:
            decode_item(frame)
    except ProtocolError:
        pass


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@given(values)
def test_round_trip(value: object) -> None:
    """Anything the protocol can carry survives encode and strict decode."""
    assert decode_item(encode_item(value)) == value
