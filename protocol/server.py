"""Server side of one connection, sans-I/O: bytes in, requests and reply bytes out.

The daemon feeds whatever the socket gave with :meth:`ServerProtocol.receive_data`
and takes :class:`Incoming` items from :meth:`ServerProtocol.next_incoming`: a
valid request, or a :class:`Refused` request that already carries its error
reply. Framing errors that leave the stream unusable (a length over the cap,
end of stream inside a frame) are fatal: the connection must close after the
error reply is sent. The hello handshake is enforced here, so every transport
(socket, embedding, tests) gets the same ordering rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from protocol.codec import decode_item, encode_item
from protocol.errors import ErrorCode, ProtocolError
from protocol.framing import DEFAULT_MAX_FRAME, MAX_REPLY_FRAME, FrameDecoder, encode_frame
from protocol.messages import (
    PROTOCOL_VERSION,
    Hello,
    Request,
    RequestError,
    error_to_wire,
    reply_to_wire,
    request_from_wire,
)

SUPPORTED_VERSIONS: Sequence[int] = (PROTOCOL_VERSION,)


@attrs.frozen
class Refused:
    """A frame that was not a valid request, with the error reply for it."""

    request_id: int | None
    code: ErrorCode
    message: str
    fatal: bool
    details: Mapping[str, Any] = attrs.field(factory=dict)
    """Extra keys of the error map (``versions`` on ``unsupported-version``)."""


Incoming = Request | Refused


class ServerProtocol:
    """One connection's protocol state: framing, decoding, and the hello handshake."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, version: int | None = None) -> None:
        self._frames = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self.version: int | None = version
        """The negotiated version; given when a connection is handed over (re-exec)."""
        self._failed = False
        self.last_payload = b""
        """The payload of the last request taken: re-exec replays a request still waiting."""

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed: what a slow handler lets pile up."""
        return self._frames.buffered

    @property
    def closed(self) -> bool:
        """The peer ended the stream and every complete frame has been taken."""
        return self._failed or self._frames.closed

    def take_buffered(self) -> bytes:
        """Unparsed bytes, removed (handing the connection to a re-executed daemon)."""
        return self._frames.take_buffered()

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` is end of stream."""
        if not self._failed:
            self._frames.receive_data(data)

    def next_incoming(self) -> Incoming | None:
        """The next request (or refusal), or None when more bytes are needed."""
        if self._failed:
            return None
        try:
            payload = self._frames.next_frame()
        except ProtocolError as exc:
            self._failed = True
            return Refused(None, exc.code, exc.message, fatal=True)
        if payload is None:
            return None
        self.last_payload = payload
        try:
            request = request_from_wire(decode_item(payload))
        except RequestError as exc:
            return Refused(exc.request_id, exc.code, exc.message, fatal=False)
        except ProtocolError as exc:
            return Refused(None, exc.code, exc.message, fatal=exc.fatal)
        return self._check_order(request)

    def _check_order(self, request: Request) -> Incoming:
        if isinstance(request, Hello):
            common = sorted(set(request.versions) & set(SUPPORTED_VERSIONS))
            if not common:
                return Refused(
                    request.id,
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"no common protocol version: client offers {list(request.versions)}, "
                    f"server speaks {list(SUPPORTED_VERSIONS)}",
                    fatal=False,
                    # What to retry with, without parsing a message meant for humans.
                    details={"versions": list(SUPPORTED_VERSIONS)},
                )
            self.version = common[-1]
            return request
        if self.version is None:
            return Refused(
                request.id,
                ErrorCode.INVALID_ARGUMENT,
                f"{request.OP}: send hello first",
                fatal=False,
            )
        return request

    def hello_result(self, server: str) -> dict[str, Any]:
        """The result map of a successful hello."""
        return {
            "version": self.version,
            "server": server,
            "max_frame": self._max_frame,
            "max_reply_frame": MAX_REPLY_FRAME,
            # acquire and release take a key (once): a client sends one only to a
            # server that says so, as an older one refuses the unknown argument.
            "once": True,
        }

    def reply(self, request_id: int | None, result: dict[str, Any]) -> bytes:
        """Frame a success reply."""
        return encode_frame(encode_item(reply_to_wire(request_id, result)), MAX_REPLY_FRAME)

    def error(self, request_id: int | None, code: ErrorCode, message: str, **details: Any) -> bytes:
        """Frame an error reply."""
        return encode_frame(
            encode_item(error_to_wire(request_id, code, message, **details)), MAX_REPLY_FRAME
        )

    def refusal(self, refused: Refused) -> bytes:
        """Frame the error reply for a refused frame."""
        return self.error(refused.request_id, refused.code, refused.message, **refused.details)

    def push(self, item: dict[str, Any]) -> bytes:
        """Frame an unsolicited message (a subscribed event): a map without ``id``."""
        return encode_frame(encode_item(item), MAX_REPLY_FRAME)
