"""Frames: a 4-byte big-endian length, then exactly that many bytes of one CBOR item.

Sans-I/O: feed bytes with :meth:`FrameDecoder.receive_data` (``b""`` means
EOF), take complete frames with :meth:`FrameDecoder.next_frame`. The buffer is
bounded: a length prefix above the cap is refused before its body is read.
"""

from __future__ import annotations

import struct

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

DEFAULT_MAX_FRAME = 65536
"""Cap on a request frame's payload, the same bound libvirt puts on lock-protocol strings."""

MAX_REPLY_FRAME = 16 * 1024 * 1024
"""Cap on a frame the server sends: listings of 16,384 leases do not fit in 64 KiB."""

_HEADER = struct.Struct(">I")


def encode_frame(payload: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Prefix ``payload`` with its length; refuse payloads above the cap."""
    if len(payload) > max_frame:
        raise LocalProtocolError(
            ErrorCode.TOO_LARGE, f"frame of {len(payload)} bytes exceeds the {max_frame} cap"
        )
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frame payloads."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` marks the end of the stream (said again, as a
        socket read resumed after it says it, it is no error)."""
        if self._eof and not data:
            return
        if self._eof:
            raise RemoteProtocolError(ErrorCode.INVALID_ARGUMENT, "data after end of stream")
        if not data:
            self._eof = True
            return
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or None when more bytes are needed.

        Raises RemoteProtocolError (fatal) for a length above the cap, or for an
        end of stream in the middle of a frame.
        """
        if len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max_frame:
                raise RemoteProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"frame of {length} bytes exceeds the {self._max_frame} cap",
                    fatal=True,
                )
            end = _HEADER.size + length
            if len(self._buffer) >= end:
                payload = bytes(self._buffer[_HEADER.size : end])
                del self._buffer[:end]
                return payload
        if self._eof and self._buffer:
            raise RemoteProtocolError(
                ErrorCode.INVALID_ARGUMENT,
                f"stream ended inside a frame ({len(self._buffer)} bytes pending)",
                fatal=True,
            )
        return None

    def take_buffered(self) -> bytes:
        """Remove and return the bytes not yet returned as frames (handing a stream over)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    @property
    def closed(self) -> bool:
        """True once EOF was received and every complete frame has been taken."""
        return self._eof and not self._buffer
