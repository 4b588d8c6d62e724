"""The client socket's send errors: a closed peer ends the connection; others lose a reply."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from actors.connection import PeerGone
from actors.runtime import DispatchedActor, Dispatcher
from lockd import server
from lockd.server import Listener, SocketTransport


class Inbox(DispatchedActor):
    """Stands in for the connection actor: keeps what the transport tells it."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher)
        self.got: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        self.got.append(message)


class FailingSocket:
    """A real socket whose sends raise ``error`` while it is set."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.error: OSError | None = None

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        return self._sock.send(data)

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def transport_on(dispatcher: Dispatcher, sock: FailingSocket) -> tuple[SocketTransport, Inbox]:
    transport = SocketTransport(dispatcher, sock, (1, 0, 0), lambda: None)  # type: ignore[arg-type]
    ref = Inbox.start(dispatcher)
    transport.start(ref)
    dispatcher.run_until_idle(poll_io=False)
    (inbox,) = [a for a in dispatcher.actors if isinstance(a, Inbox)]
    return transport, inbox


def test_a_send_failing_for_lack_of_buffers_loses_the_reply_not_the_connection(
    dispatcher: Dispatcher, pair: tuple[socket.socket, socket.socket]
) -> None:
    """ENOBUFS is the host's trouble, not the client's: closing the connection would end
    a live VM's leases (or fence it). The reply is lost; the next one goes out."""
    ours, theirs = pair
    sock = FailingSocket(ours)
    transport, inbox = transport_on(dispatcher, sock)
    sock.error = OSError(errno.ENOBUFS, "No buffer space available")
    transport.write(b"lost")
    sock.error = None
    transport.write(b"sent")
    dispatcher.run_until_idle(poll_io=False)
    assert not transport.gone
    assert not any(isinstance(m, PeerGone) for m in inbox.got)
    assert theirs.recv(64) == b"sent"


@pytest.mark.parametrize("code", [errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN])
def test_a_send_to_a_closed_peer_ends_the_connection(
    dispatcher: Dispatcher, pair: tuple[socket.socket, socket.socket], code: int
) -> None:
    """The client is gone: the connection actor hears it at once, and nothing more is sent."""
    ours, _theirs = pair
    sock = FailingSocket(ours)
    transport, inbox = transport_on(dispatcher, sock)
    sock.error = (
        OSError(code, "not connected") if code == errno.ENOTCONN else ConnectionError(code, "gone")
    )
    transport.write(b"reply")
    dispatcher.run_until_idle(poll_io=False)
    assert transport.gone
    assert [m for m in inbox.got if isinstance(m, PeerGone)] == [PeerGone()]


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class _Starved:
    """A listening socket whose accept fails as at the descriptor limit."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def accept(self) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)


def test_a_listener_stopped_while_starved_of_descriptors_stays_stopped(
    tmp_path: Any,
) -> None:
    """Out of descriptors, a listener stops watching and starts again 100 ms later. A
    stop meanwhile (a re-exec quiescing) must win: accepting again under the quiesce
    would take connections nobody hands over. A start on a started listener is harmless."""
    clock = _Clock()
    dispatcher = Dispatcher(clock)
    real = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    real.bind(str(tmp_path / "s"))
    real.listen()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener = Listener(
        dispatcher, _Starved(real), admin=False, allowed_uids=[0],  # type: ignore[arg-type]
        on_accept=lambda *_: None,
    )  # fmt: skip
    try:
        listener.start()
        listener.start()
        client.connect(str(tmp_path / "s"))
        dispatcher.run_once(timeout=1.0)  # EMFILE: unwatched, a retry in 100 ms
        assert not dispatcher.watching(real.fileno())
        listener.stop()
        clock.now += 1.0
        dispatcher.run_once(timeout=0.0)
        assert not dispatcher.watching(real.fileno())
        listener.start()
        assert dispatcher.watching(real.fileno())
    finally:
        client.close()
        real.close()
        dispatcher.close()


def test_a_socket_whose_daemon_does_not_accept_is_refused_not_waited_on(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung daemon that still listens, its backlog full: `lockd serve` on its socket
    waited in connect() for ever. It is refused as served, saying it does not accept."""
    monkeypatch.setattr(server, "PROBE_TIMEOUT", 0.2)
    path = str(tmp_path / "hung.sock")
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(path)
    hung.listen(0)
    waiting: list[socket.socket] = []
    outcome: list[BaseException] = []
    try:
        while True:  # fill the backlog
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(path)
            except BlockingIOError:
                break

        def probe() -> None:
            try:
                server.refuse_if_served(path)
            except OSError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the probe waited on a daemon that does not accept"
        (exc,) = outcome
        assert isinstance(exc, OSError)
        assert exc.errno == errno.EADDRINUSE
        assert "does not accept connections" in str(exc)
    finally:
        for s in (hung, *waiting):
            s.close()


def test_refusals_are_logged_once_a_minute_per_kind_with_the_count_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first refusal of each kind is logged at once; more of it within the minute are
    only counted, and the next line after the minute says how many there were."""
    now = [0.0]
    refusals = server.RefusalLog(60.0, clock=lambda: now[0])
    logger = logging.getLogger("lockd.test-refusals")
    with caplog.at_level(logging.WARNING, logger="lockd.test-refusals"):
        for _ in range(50):
            refusals.warn(logger, "max_clients", "refused pid %d", 7)
            now[0] += 1.0
        refusals.warn(logger, "uid-False", "refused uid %d", 1000)
        now[0] += 11.0
        refusals.warn(logger, "max_clients", "refused pid %d", 8)
    assert [r.getMessage() for r in caplog.records] == [
        "refused pid 7",
        "refused uid 1000",
        "refused pid 8; 49 more refused so since the last such line, not logged",
    ]


def test_the_count_of_refusals_not_logged_is_logged_once_the_minute_is_over(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A uid not allowed connects four times, then stops: the first refusal is logged,
    and once the minute is over a line says how many more there were (the count waited
    for a next refusal, and was never logged when none came); then nothing more."""
    clock = _Clock()
    dispatcher = Dispatcher(clock)
    monkeypatch.setattr(server, "refusals", server.RefusalLog(60.0, clock=clock))
    real = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    real.bind(str(tmp_path / "s"))
    real.listen()
    listener = Listener(
        dispatcher, real, admin=False, allowed_uids=[os.getuid() + 1], on_accept=lambda *_: None
    )
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    try:
        listener.start()
        with caplog.at_level(logging.WARNING, logger="lockd.server"):
            for client in clients:
                client.connect(str(tmp_path / "s"))
            dispatcher.run_until_idle()
            assert all(client.recv(4096) for client in clients)  # each told why, and closed
            assert len(caplog.records) == 1
            clock.now += 59.0
            dispatcher.run_until_idle()
            assert len(caplog.records) == 1  # still within the minute
            clock.now += 1.0
            dispatcher.run_until_idle()
            clock.now += 600.0
            dispatcher.run_until_idle()
        pid, uid = os.getpid(), os.getuid()
        assert [r.getMessage() for r in caplog.records] == [
            f"refused a connection from pid {pid} uid {uid}: uid not allowed",
            "3 more refused so since the last such line, not logged; the latest: refused a "
            f"connection from pid {pid} uid {uid}: uid not allowed",
        ]
    finally:
        for client in clients:
            client.close()
        listener.close()
        dispatcher.close()


def test_a_client_refused_in_a_loop_gets_one_line_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused every second for three minutes: the first refusal, then one count a
    minute (each count starts the next minute), never a line per refusal."""
    clock = _Clock()
    dispatcher = Dispatcher(clock)
    refusals = server.RefusalLog(60.0, clock=clock)
    logger = logging.getLogger("lockd.test-refusals")
    try:
        with caplog.at_level(logging.WARNING, logger="lockd.test-refusals"):
            for i in range(180):
                refusals.warn(logger, "max_clients", "refused pid %d", i, dispatcher=dispatcher)
                clock.now += 1.0
                dispatcher.run_until_idle(poll_io=False)
            clock.now += 60.0
            dispatcher.run_until_idle(poll_io=False)
    finally:
        dispatcher.close()
    assert [r.getMessage() for r in caplog.records] == [
        "refused pid 0",
        *(
            f"{count} more refused so since the last such line, not logged; the latest: "
            f"refused pid {last}"
            for count, last in ((59, 59), (60, 119), (60, 179))
        ),
    ]  # 180 in all
