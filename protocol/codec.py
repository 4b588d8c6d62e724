"""Strict CBOR decoding of one protocol item, and encoding.

cbor2 guards against deep nesting and huge *claimed* lengths, but it accepts
duplicate keys, indefinite lengths, tags and silently ignores trailing bytes.
A lock protocol must not: two peers reading one frame differently is how a
lease ends up held twice. So decoding here is strict, and size is bounded by
the framing before any byte reaches cbor2.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

# Tags cbor2 decodes itself (datetime, bignum, shared references, MIME, sets, ...)
# never reach tag_hook; they are refused by mapping each to the same refusal.
# Advisories against cbor2 6.x were found in exactly these tag paths.
_BUILTIN_TAGS = (
    *(0, 1, 2, 3, 4, 5, 24, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258),
    *(260, 261, 262, 263, 264, 265, 270, 1004, 43000, 55799),
)

MAX_DEPTH = 8
"""Deepest nesting a valid message needs is 4 (request > leases > lease > field)."""


def _refuse_tag(tag: cbor2.CBORTag, _immutable: bool) -> Any:
    raise RemoteProtocolError(
        ErrorCode.INVALID_ARGUMENT, f"CBOR tags are not allowed (tag {tag.tag})"
    )


def _refuse_builtin_tag(*_args: object) -> Any:
    raise RemoteProtocolError(ErrorCode.INVALID_ARGUMENT, "CBOR tags are not allowed")


_NO_SEMANTIC_TAGS = dict.fromkeys(_BUILTIN_TAGS, _refuse_builtin_tag)


def decode_item(data: bytes) -> Any:
    """Decode exactly one CBOR item from ``data``; raise RemoteProtocolError otherwise."""
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        stream,
        tag_hook=_refuse_tag,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
        semantic_decoders=_NO_SEMANTIC_TAGS,
    )
    try:
        item = decoder.decode()
    except RemoteProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types; all mean "malformed"
        raise RemoteProtocolError(ErrorCode.INVALID_ARGUMENT, f"malformed CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise RemoteProtocolError(
            ErrorCode.INVALID_ARGUMENT,
            f"{len(data) - stream.tell()} trailing bytes after the CBOR item",
        )
    return item


def encode_item(item: Any) -> bytes:
    """Encode one item; raise LocalProtocolError if it is not CBOR-encodable."""
    try:
        return cbor2.dumps(item)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for unencodable values
        raise LocalProtocolError(ErrorCode.INTERNAL, f"cannot encode {item!r}: {exc}") from None
