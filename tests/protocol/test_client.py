"""What the blocking client says when it cannot reach the daemon."""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client, ConnectionLostError, RemoteError, unreachable
from protocol.codec import encode_item
from protocol.framing import encode_frame


def _error(number: int) -> OSError:
    """What ``connect`` raises: OSError picks the subclass (FileNotFoundError, ...)."""
    return OSError(number, os.strerror(number))


@pytest.mark.parametrize(
    ("error", "says", "not_says"),
    [
        (_error(errno.ENOENT), "is `lockd serve` running?", "another user"),
        (_error(errno.ECONNREFUSED), "is `lockd serve` running?", "another user"),
        (_error(errno.EACCES), "another user's", "running?"),
        (TimeoutError("timed out"), "still recovering, waiting for a lockspace", "Errno"),
    ],
    ids=["missing", "refused", "permission", "timeout"],
)  # fmt: skip
def test_an_unreachable_daemon_is_named_with_a_hint_that_fits(
    error: OSError, says: str, not_says: str
) -> None:
    """ "Is it running?" answers a missing socket, not a permission problem or a stuck daemon."""
    message = unreachable("/run/lockd/lockd.sock", error)
    assert "/run/lockd/lockd.sock" in message
    assert says in message
    assert not_says not in message


def test_a_path_that_is_no_socket_is_named_as_such(tmp_path: Path) -> None:
    """``--socket /etc/passwd`` or a directory: connect says "refused", but asking whether
    the daemon runs sends the operator the wrong way."""
    for path in (tmp_path / "a-file", tmp_path):
        if path != tmp_path:
            path.write_text("")
        with socket.socket(socket.AF_UNIX) as sock, pytest.raises(ConnectionRefusedError) as caught:
            sock.connect(str(path))
        message = unreachable(str(path), caught.value)
        assert message == f"not a socket: {path} (is --socket or LOCKD_SOCKET right?)"


def test_a_refused_connection_says_why_even_when_the_hello_meets_the_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon at max_clients (or refusing the uid) sends one error frame and closes.
    A hello sent after that close met EPIPE, and the CLI said "cannot reach lockd:
    Broken pipe" (exit 69) instead of the daemon's reason, most times."""
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    closed = threading.Event()

    def refuse() -> None:
        conn, _ = listener.accept()
        error = {"code": "busy", "message": "the daemon already serves max_clients=1"}
        conn.sendall(encode_frame(encode_item({"id": None, "error": error})))
        conn.close()
        closed.set()

    refuser = threading.Thread(target=refuse, daemon=True)
    refuser.start()
    request = Client.request

    def after_the_close(self: Client, op: str, **args: Any) -> int:
        assert closed.wait(5)
        return request(self, op, **args)

    monkeypatch.setattr(Client, "request", after_the_close)
    try:
        with pytest.raises(RemoteError) as caught:
            Client(path, timeout=5)
    finally:
        refuser.join(5)
        listener.close()
    assert caught.value.code == "busy"
    assert "max_clients=1" in caught.value.message


def _serve_hello_then(path: str, close: threading.Event) -> threading.Thread:
    """A daemon stand-in that answers the hello, then closes when told to, leaving any
    later request unread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()
        conn.recv(65536)  # the hello
        conn.sendall(encode_frame(encode_item({"id": 1, "result": {"version": 1}})))
        assert close.wait(5)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("met_by", ["send", "read"])
def test_a_daemon_gone_mid_connection_is_a_lost_connection_whichever_call_meets_it(
    tmp_path: Path, met_by: str
) -> None:
    """A daemon stopped (or a connection disconnected) between calls: the next call met
    the close in its send (EPIPE) or in its read (a reset, the request left unread),
    which raised ``BrokenPipeError``/``ConnectionResetError``, not the
    ``ConnectionLostError`` the client documents; the CLI takes a ``BrokenPipeError``
    for its stdout's reader having left."""
    path = str(tmp_path / "s.sock")
    close = threading.Event()
    server = _serve_hello_then(path, close)
    client = Client(path, timeout=5)
    try:
        if met_by == "send":
            close.set()
            server.join(5)
            with pytest.raises(ConnectionLostError):
                client.call("status")
        else:
            rid = client.request("status")
            close.set()
            server.join(5)
            with pytest.raises(ConnectionLostError):
                client.result(rid)
    finally:
        close.set()
        server.join(5)
        client.close()
