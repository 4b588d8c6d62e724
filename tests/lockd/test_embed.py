"""lockd.embed without a lock thread: what LockService takes, the in-process transport."""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path
from typing import Any

import pytest

from actors.connection import REPLAY_BACKLOG, Drained
from actors.model import SyncPolicy
from actors.runtime import Dispatcher, tell_if_alive
from lockd.config import ConfigError
from lockd.embed import ConnectionLostError, LockService, _InProcessTransport
from protocol.codec import encode_item
from protocol.framing import encode_frame
from tests.actors.harness import Recorder


def test_options_are_converted_as_the_configuration_file_s(tmp_path: Path) -> None:
    """``journal_sync="batch"``, as the docstring shows it, is the policy, not a string that
    broke the start."""
    service = LockService(
        lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"), journal_sync="batch"
    )
    assert service.config.journal_sync is SyncPolicy.BATCH


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"journal_sync": "sometimes"}, "journal_sync must be one of none | batch | always"),
        ({"fence_grace": -5}, "fence_grace must be a finite number >= 0"),
        ({"journal_synk": "always"}, "unknown key 'journal_synk' (did you mean 'journal_sync'?)"),
        ({"lockspaces": {"../x": "/srv"}}, "invalid lockspace name"),
        ({"lockspaces": {"a": "/srv/x", "b": "/srv/x"}}, "and lockspaces.a /srv/x overlap"),
    ],
)
def test_a_wrong_option_is_refused_at_once(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    """Each option is checked as the daemon checks its file, before anything starts."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"), **options)


def test_a_journal_inside_the_lock_directory_is_refused(tmp_path: Path) -> None:
    """As in the configuration file: the lock directory is the shared storage."""
    with pytest.raises(ConfigError, match=r"journal_dir .* and lock_dir .* overlap"):
        LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "l" / "journal"))
    assert not (tmp_path / "l").exists()


def test_relative_directories_are_refused(tmp_path: Path) -> None:
    """As in the configuration file: a relative path would move with the working directory."""
    with pytest.raises(ConfigError, match="lock_dir must be an absolute path"):
        LockService(lock_dir="locks", journal_dir=str(tmp_path / "j"))


def test_replies_not_yet_taken_are_the_connection_s_backlog(dispatcher: Dispatcher) -> None:
    """An in-process connection counts what the program has not taken, as a socket's unsent
    bytes (so a subscriber that reads nothing is cut off at MAX_PUSH_BACKLOG, not kept
    growing), and taking it tells the connection it may go on."""
    got: list[Any] = []
    transport = _InProcessTransport()
    transport.actor = Recorder.start(dispatcher, got)
    frame = encode_frame(encode_item({"event": {"note": "x" * 1000}}))
    count = REPLAY_BACKLOG // len(frame) + 2
    for _ in range(count):
        transport.write(frame)
    assert transport.backlog == count * len(frame) > REPLAY_BACKLOG
    for _ in range(count):
        assert transport.take(0) == {"event": {"note": "x" * 1000}}
    dispatcher.run_until_idle()
    assert transport.backlog == 0
    assert got == [Drained()]
    transport.end("stopped")
    assert transport.take(0) is None
    assert transport.take(0) is None  # for every later call too


def test_the_admin_socket_goes_beside_the_socket(tmp_path: Path) -> None:
    """Given only ``socket=``, the admin socket is where ``lockd serve --socket`` puts it,
    not a socket named "unused" in the journal directory."""
    service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"),
                          socket=str(tmp_path / "run" / "lockd.sock"))  # fmt: skip
    assert service.config.admin_socket == str(tmp_path / "run" / "lockd-admin.sock")


def test_a_client_opened_as_another_thread_stops_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``client()`` racing ``stop()`` (here: the stop lands just after client() found the
    service running) raises ConnectionLostError, as a call racing it does, not
    AttributeError from the service it had found."""
    service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"))

    class StoppedMeanwhile(_InProcessTransport):
        def __init__(self) -> None:
            super().__init__()
            service.stop()

    service.start()
    try:
        monkeypatch.setattr("lockd.embed._InProcessTransport", StoppedMeanwhile)
        with pytest.raises(ConnectionLostError, match="stopped"):
            service.client()
    finally:
        service.stop()


def test_a_client_in_a_with_block_is_closed_at_its_end(tmp_path: Path) -> None:
    """``with locks.client() as client:``, as with the socket ``Client``: closed after the
    block (it raised AttributeError: no ``__enter__``)."""
    with LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j")) as locks:
        with locks.client() as client:
            assert client.call("status")["clients"] == 1
        with pytest.raises(ConnectionLostError, match="closed"):
            client.call("status")


def test_a_call_after_close_says_the_program_closed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call on a client the program closed says so, also when the lock thread took the
    close before ``close()`` returned (here: made to): it said "the embedded lock system
    closed this connection", as if the lock system had failed."""
    from lockd import embed

    def told_and_taken(ref: Any, message: Any) -> None:
        tell_if_alive(ref, message)
        deadline = time.monotonic() + 5
        while ref.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)

    with LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j")) as locks:
        client = locks.client()
        monkeypatch.setattr(embed, "tell_if_alive", told_and_taken)
        client.close()
        with pytest.raises(ConnectionLostError) as lost:
            client.call("status")
        assert str(lost.value) == "this connection was closed"


def test_a_client_let_go_without_close_ends_its_connection(tmp_path: Path) -> None:
    """A client the program drops without close() ends its connection when collected, as a
    socket client's does: each stayed in the lock system for good, an actor and a
    ``lockd clients`` line per client made for one request."""
    with LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j")) as locks:
        for _ in range(20):
            locks.client().call("status")
        gc.collect()
        with locks.client() as client:
            assert client.call("status")["clients"] == 1
