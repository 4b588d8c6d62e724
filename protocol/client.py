"""A blocking client for the lockd socket protocol.

For the CLI, the hypervisor plugin and tests. One request at a time per
connection, as the server serves them; subscribed events that arrive while a
reply is awaited are kept for :meth:`Client.next_event`.
"""

from __future__ import annotations

import collections
import errno
import itertools
import os
import socket
import stat
from typing import Any

from protocol.codec import decode_item, encode_item
from protocol.errors import ErrorCode, ProtocolError
from protocol.framing import DEFAULT_MAX_FRAME, MAX_REPLY_FRAME, FrameDecoder, encode_frame
from protocol.messages import MAX_WAIT_SECONDS, PROTOCOL_VERSION


class RemoteError(Exception):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class SubscriptionEnded(Exception):
    """The daemon ended this connection's event subscription, and kept the connection.

    It does so, rather than disconnect, only on a connection that registered an owner
    (closing that would fence the owner) when it fell too far behind on its events.
    Subscribe again with ``since=next_seq`` to miss nothing.
    """

    def __init__(self, next_seq: int | None, reason: str) -> None:
        super().__init__(f"the daemon ended the event subscription: {reason}")
        self.next_seq = next_seq
        self.reason = reason


def event_of(message: dict[str, Any]) -> dict[str, Any]:
    """A pushed frame as :meth:`Client.next_event` returns it: ``{"event": entry}``;
    :class:`SubscriptionEnded` for the frame that ends a subscription."""
    if "id" in message:
        raise ProtocolError(ErrorCode.INTERNAL, "unexpected reply while waiting for an event")
    ended = message.get("subscription-ended")
    if isinstance(ended, dict):
        next_seq = ended.get("next")
        raise SubscriptionEnded(
            next_seq if isinstance(next_seq, int) else None, str(ended.get("reason", ""))
        )
    return message


def result_of(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply's result; :class:`RemoteError` if it is an error reply."""
    if "error" in reply:
        error = dict(reply["error"])
        raise RemoteError(str(error.pop("code", "internal")), str(error.pop("message", "")), error)
    result: dict[str, Any] = reply["result"]
    return result


class ConnectionLostError(ConnectionError):
    """The daemon closed the connection before replying."""


_HINTS = {
    errno.ENOENT: "is `lockd serve` running?",
    errno.ECONNREFUSED: "is `lockd serve` running?",
    errno.EACCES: "the socket is another user's: run as that user or give your own socket",
    errno.EAGAIN: "the daemon is not keeping up with new connections",
}


def unreachable(path: str, exc: OSError) -> str:
    """Why connecting to the daemon at ``path`` failed, in words for an operator.

    The socket is named (a hypervisor's config may point elsewhere than the
    daemon listens), and the hint fits the failure: "is it running?" answers a
    missing socket, not a permission or a timeout. A timeout has no errno, and
    ``OSError(None, ...)`` would print ``[Errno None]``.
    """
    if isinstance(exc, TimeoutError):
        # A daemon answers once its start-up recovery is done, which waits up to about
        # 35 s for a lockspace directory (shared storage) that is not there yet.
        return (
            f"no answer within the timeout: {path} (still recovering, waiting for a "
            "lockspace directory? its log says; else the daemon is stuck)"
        )
    if exc.errno == errno.ECONNREFUSED and _exists_but_not_a_socket(path):
        # connect() says "refused" for a regular file or a directory too.
        return f"not a socket: {path} (is --socket or LOCKD_SOCKET right?)"
    why = exc.strerror or str(exc) or type(exc).__name__
    hint = _HINTS.get(exc.errno) if exc.errno is not None else None
    return f"{why}: {path}" + (f" ({hint})" if hint else "")


def _exists_but_not_a_socket(path: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class Client:
    """One connection to the daemon, with the hello handshake done."""

    def __init__(
        self,
        path: str,
        *,
        timeout: float | None = 30.0,
        name: str = "lockd-client",
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
        except BaseException:
            self._sock.close()
            raise
        self._frames = FrameDecoder(MAX_REPLY_FRAME)
        self._max_frame = max_frame
        self._ids = itertools.count(1)
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._early: dict[Any, dict[str, Any]] = {}
        """Replies read while waiting for another request's (pipelined requests)."""
        try:
            self.server = self.call("hello", versions=[PROTOCOL_VERSION], client=name)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        """The socket fd (``lockd run`` leaves it open across exec)."""
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Change how long a call may wait for its reply (None: forever)."""
        self._sock.settimeout(timeout)

    def close(self) -> None:
        """Close the connection; leases owned by this process end with it."""
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raise :class:`RemoteError` on error.

        An ``acquire`` with ``wait`` may be answered that much later: its reply is
        waited for up to the timeout plus the wait (a timeout shorter than the wait
        gave up while the daemon went on waiting, and the lease, granted later, was
        held by an owner whose caller took the acquire as failed).
        """
        rid = self.request(op, **args)
        timeout = self._sock.gettimeout()
        wait = args.get("wait") if op == "acquire" else None
        if timeout is None or not isinstance(wait, int | float) or isinstance(wait, bool):
            return self.result(rid)
        # A wait the daemon refuses (past MAX_WAIT_SECONDS, inf) is answered at once: the
        # bound only keeps the timeout one a socket can hold (inf raised OverflowError
        # here, the request sent and its invalid-argument left unread).
        self._sock.settimeout(timeout + min(max(0.0, float(wait)), MAX_WAIT_SECONDS))
        try:
            return self.result(rid)
        finally:
            self._sock.settimeout(timeout)

    def request(self, op: str, **args: Any) -> int:
        """Send one request without waiting for its reply; :meth:`result` gets it.

        Requests on one connection are answered in the order sent, so take
        their results in that order.
        """
        rid = next(self._ids)
        try:
            self.send_raw(encode_item({"op": op, "id": rid, **args}))
        except (BrokenPipeError, ConnectionResetError) as exc:
            # A daemon that refuses the connection (max_clients, a uid not allowed) sends
            # one error frame and closes, maybe before this request went out: that frame,
            # still readable, says why better than "Broken pipe".
            refusal = self._refusal()
            if refusal is not None:
                result_of(refusal)  # raises its RemoteError
            # Whether the close met the send or the read is a race: callers catch one
            # exception for both (a BrokenPipeError also read as "stdout's reader left").
            raise ConnectionLostError("the daemon closed the connection") from exc
        return rid

    def _refusal(self) -> dict[str, Any] | None:
        """The error frame (``"id": null``) a closed connection left unread, if any."""
        try:
            message = self._read_message()
        except (OSError, ProtocolError, ValueError):
            return None
        return message if message.get("id") is None and "error" in message else None

    def result(self, rid: int) -> dict[str, Any]:
        """Wait for the reply to request ``rid``; raise :class:`RemoteError` on error.

        Replies to other requests read meanwhile are kept for their own ``result``.
        """
        message = self._early.pop(rid, None)
        while message is None:
            message = self._read_message()
            if "id" not in message:
                self._events.append(message)
                message = None
            elif message["id"] != rid and message["id"] is not None:
                self._early[message["id"]] = message
                message = None
        return result_of(message)

    def next_event(self) -> dict[str, Any]:
        """The next event pushed after ``subscribe`` (blocks up to the socket timeout);
        :class:`SubscriptionEnded` if the daemon ended the subscription."""
        if self._events:
            return event_of(self._events.popleft())
        return event_of(self._read_message())

    def send_raw(self, payload: bytes) -> None:
        """Send one already-encoded payload as a frame (tests use it for bad input)."""
        self._sock.sendall(encode_frame(payload, self._max_frame))

    def _read_message(self) -> dict[str, Any]:
        while True:
            frame = self._frames.next_frame()
            if frame is not None:
                message = decode_item(frame)
                if not isinstance(message, dict):
                    raise ProtocolError(ErrorCode.INTERNAL, "daemon sent a non-map message")
                return message
            try:
                data = self._sock.recv(65536)
            except ConnectionResetError as exc:  # it closed with our request unread
                raise ConnectionLostError("the daemon closed the connection") from exc
            if not data:
                raise ConnectionLostError("the daemon closed the connection")
            self._frames.receive_data(data)
