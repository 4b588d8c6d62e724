"""What the blocking client says when it cannot reach the daemon."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from protocol.client import unreachable


def _error(number: int) -> OSError:
    """What ``connect`` raises: OSError picks the subclass (FileNotFoundError, ...)."""
    return OSError(number, os.strerror(number))


@pytest.mark.parametrize(
    ("error", "says", "not_says"),
    [
        (_error(errno.ENOENT), "is `lockd serve` running?", "another user"),
        (_error(errno.ECONNREFUSED), "is `lockd serve` running?", "another user"),
        (_error(errno.EACCES), "another user's", "running?"),
        (TimeoutError("timed out"), "no answer", "Errno"),
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
