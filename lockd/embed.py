"""Embedding: the lock actors inside your own program, no daemon needed.

An orchestrator that already runs as a long-lived Python process can keep
the VM disk leases itself, with the same journal, recovery and fencing as
``lockd serve``::

    from lockd.embed import LockService

    with LockService(lock_dir="/srv/locks", journal_dir="/var/lib/orch/journal") as locks:
        client = locks.client()
        client.call("register", owner={"uuid": vm.uuid, "name": vm.name, "id": 1, "pid": vm.pid})
        client.call("acquire", leases=[...], autocreate=True)

``client()`` speaks the same protocol as the socket (``docs/protocol.md``)
through an in-process transport, so every rule (all-or-nothing, busy holders,
journal before reply) is the daemon's own. Pass ``socket=`` to also serve
other processes (``lockd status``, a VM's plugin) on a Unix socket. Restart
your program and ``start()`` recovers: leases of VMs still running are held
again before it returns. ``stop()`` releases nothing.

What it raises, how stopping and starting again behave, and how it lives
beside a daemon: ``docs/embedding.md``. The exceptions it raises are named
here too, for one import.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from types import TracebackType
from typing import Any

import pykka

from actors import faults
from actors.connection import REPLAY_BACKLOG, Drained, Received
from actors.recovery import RecoveryReport
from actors.runtime import tell_if_alive
from lockd import fork_guard
from lockd.config import ConfigError, admin_socket_beside
from lockd.config import from_keys as config_from_keys
from lockd.daemon import Daemon, JournalInUseError, PidFileLockedError
from protocol.client import (
    ConnectionLostError,
    RemoteError,
    SubscriptionEnded,
    event_of,
    result_of,
)
from protocol.codec import decode_item, encode_item
from protocol.errors import ErrorCode, ProtocolError
from protocol.framing import MAX_REPLY_FRAME, FrameDecoder, encode_frame
from protocol.messages import MAX_WAIT_SECONDS, PROTOCOL_VERSION

__all__ = [
    "ConfigError",
    "ConnectionLostError",
    "EmbeddedClient",
    "JournalInUseError",
    "LockService",
    "PidFileLockedError",
    "RecoveryReport",
    "RemoteError",
    "SubscriptionEnded",
]

log = logging.getLogger("lockd")

STOP_SECONDS = 30.0
"""How long ``stop()`` waits for the lock thread by default."""

# A worker the program forks (os.fork, multiprocessing's "fork") must not keep the lock
# system's locks and listening sockets: see lockd.fork_guard.
os.register_at_fork(after_in_child=fork_guard.drop_copies_in_child)


class _InProcessTransport:
    """A connection's bytes, without a socket: replies go to a queue the caller waits on."""

    def __init__(self) -> None:
        # No peer process: the program itself, which cannot hand this connection to a
        # VM. Its close is the program's choice, not an owner that lost or leaked its
        # connection, so it never fences (with this pid, an owner that is the program
        # itself was sent SIGTERM and SIGKILL when its connection closed). An owner's
        # leases end as its process exits, which the pidfd sees.
        self.peer_pid = 0
        self.peer_uid = os.getuid()
        self.peer_gid = os.getgid()
        self.backlog = 0
        """Bytes written and not yet taken by the program: what a socket's unsent bytes
        are to the connection, so a subscriber that reads nothing is disconnected past
        ``MAX_PUSH_BACKLOG`` and a replay waits for the reader, as on the socket (with
        none counted, the events of a subscriber that read none piled up without end)."""
        self.actor: pykka.ActorRef[Any] | None = None
        """The connection, told :class:`Drained` when the program has caught up."""
        self.gone = False
        self.pid = os.getpid()
        """The process whose lock thread serves this connection (see :func:`_forked`)."""
        self.ended: str | None = None
        """Why no reply will come any more (None while the connection serves)."""
        self._frames = FrameDecoder(MAX_REPLY_FRAME)
        self._replies: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
        self._counting = threading.Lock()  # backlog: written on the loop, taken by callers
        self._held_back = False

    def write(self, data: bytes) -> None:
        self._frames.receive_data(data)
        while (frame := self._frames.next_frame()) is not None:
            size = len(frame) + 4
            with self._counting:
                self.backlog += size
                self._held_back = self._held_back or self.backlog > REPLAY_BACKLOG
            self._replies.put((size, decode_item(frame)))

    def take(self, timeout: float | None) -> dict[str, Any] | None:
        """The next reply or event (None: ended); ``queue.Empty`` after ``timeout``."""
        size, message = self._replies.get(timeout=timeout)
        if message is None:
            self._replies.put((0, None))  # for every later call too
            return None
        with self._counting:
            self.backlog -= size
            drained = self._held_back and self.backlog <= REPLAY_BACKLOG // 2
            self._held_back = self._held_back and not drained
        if drained:  # it may have stopped reading requests, or paused a replay
            tell_if_alive(self.actor, Drained())
        return message

    def pause_reading(self) -> None:
        """Nothing to pause: the caller sends one request at a time."""

    def resume_reading(self) -> None:
        """See :meth:`pause_reading`."""

    def close(self) -> None:
        self.end("the embedded lock system closed this connection")

    def end(self, why: str) -> None:
        """No reply will come: a caller waiting for one, and every later call, is told why."""
        if self.ended is None:
            self.ended = why
        self._replies.put((0, None))

    def fileno(self) -> int:
        return -1

    def peer_still_runs(self) -> bool:
        return False  # no peer process (pid 0), which no owner's pid can be

    crowded = False  # the program's own queues, which hold what it has not taken yet


class EmbeddedClient:
    """A connection to an embedded lock system: the ``call()`` of ``protocol.client.Client``.

    Safe to share between threads (one request at a time). Errors: ``RemoteError``
    for an error reply (``busy``, ``not-registered``, ...), ``ConnectionLostError``
    once the connection or the lock service has ended, ``TimeoutError`` when no
    reply came within ``timeout`` (the request may still take effect).
    """

    def __init__(
        self, ref: pykka.ActorRef[Any], transport: _InProcessTransport, name: str = "embedded"
    ) -> None:
        self._ref = ref
        self._transport = transport
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        # Dropped without close(), it ends as a socket client's connection does when its
        # socket is collected: left open, each stayed in the lock system for good (an
        # actor and a `lockd clients` line per client a program made and let go).
        self._ended = weakref.finalize(self, _end_connection, ref, transport)
        self._ended.atexit = False
        self.server = self.call("hello", versions=[PROTOCOL_VERSION], client=name)

    def call(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raise RemoteError on an error reply.

        An ``acquire`` with ``wait`` is given ``timeout`` after its wait, as the socket
        client does: with the wait longer than the timeout, the call raised TimeoutError
        while the lock system waited on, and the lease it took then was held by an owner
        whose caller took the acquire as failed. Events pushed meanwhile (after
        ``subscribe``) are kept for :meth:`next_event`.
        """
        wait = args.get("wait") if op == "acquire" else None
        if timeout is not None and isinstance(wait, int | float) and not isinstance(wait, bool):
            # Past MAX_WAIT_SECONDS (inf too) the wait is refused at once.
            timeout += min(max(0.0, float(wait)), MAX_WAIT_SECONDS)
        with self._lock:
            rid = next(self._ids)
            self._send(Received(encode_frame(encode_item({"op": op, "id": rid, **args}))))
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                message = self._next_message(deadline, f"no reply to {op!r} within {timeout} s")
                if "id" not in message:
                    self._events.append(message)
                elif message["id"] == rid or message["id"] is None:
                    return result_of(message)

    def next_event(self, timeout: float | None = 60.0) -> dict[str, Any]:
        """The next event pushed after ``subscribe``: ``{"event": journal-entry}`` as on the
        socket (docs/protocol.md); TimeoutError if none comes within ``timeout``;
        :class:`SubscriptionEnded` if the daemon ended the subscription."""
        if (forked := _forked(self._transport.pid)) is not None:
            raise ConnectionLostError(forked)
        with self._lock:
            if self._events:
                return event_of(self._events.popleft())
            deadline = None if timeout is None else time.monotonic() + timeout
            return event_of(self._next_message(deadline, f"no event within {timeout} s"))

    def _next_message(self, deadline: float | None, late: str) -> dict[str, Any]:
        transport = self._transport
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            message = transport.take(left)
        except queue.Empty:
            raise TimeoutError(late) from None
        if message is None:
            raise ConnectionLostError(transport.ended or "connection closed")
        return message

    def _send(self, message: Received) -> None:
        if (forked := _forked(self._transport.pid)) is not None:
            raise ConnectionLostError(forked)
        if self._transport.ended is not None:
            raise ConnectionLostError(self._transport.ended)
        try:
            self._ref.tell(message)
        except pykka.ActorDeadError:
            raise ConnectionLostError(self._transport.ended or "connection closed") from None

    def close(self) -> None:
        """End this connection (leases belong to their owners and stay); harmless twice."""
        self._ended()

    def __enter__(self) -> EmbeddedClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _end_connection(ref: pykka.ActorRef[Any], transport: _InProcessTransport) -> None:
    """Close an in-process connection: :meth:`EmbeddedClient.close`, also when the client
    is collected without it."""
    open_until_now = transport.ended is None
    # Said before the lock thread sees the close: it ends the transport too, and a later
    # call named the lock system as what closed the connection.
    transport.end("this connection was closed")
    if open_until_now and _forked(transport.pid) is None:
        tell_if_alive(ref, Received(b""))


def _forked(pid: int) -> str | None:
    """Why this process cannot use a lock system started in process ``pid`` (None: it is
    that process). A forked child has the service's objects but not its lock thread: its
    calls waited out their timeouts, and ``client()`` 60 s, for a reply none would send."""
    if os.getpid() == pid:
        return None
    return (
        f"the embedded lock system runs in process {pid}, not in this process forked "
        "from it: start a LockService of its own here, on other directories"
    )


def _beside(directory: str, name: str) -> str:
    """A path in ``directory``, or ``name`` alone for a relative one (refused for it)."""
    return os.path.join(directory, name) if os.path.isabs(directory) else name


class LockService:
    """The lock system on a background thread of this process."""

    def __init__(
        self,
        *,
        lock_dir: str,
        journal_dir: str,
        socket: str | None = None,
        admin_socket: str | None = None,
        **options: Any,
    ) -> None:
        """``options``: any other configuration key (``journal_sync="batch"``,
        ``fence_grace``, ...; docs/configuration.md). Each is checked as the daemon checks
        its file: a wrong one raises :class:`lockd.config.ConfigError` here, not a broken
        start. Paths are absolute."""
        # Beside the socket, as for `lockd serve --socket` (where `lockd disconnect`
        # looks), not a bound socket named "unused" among the journal's files.
        admin_default = (
            admin_socket_beside(socket) if socket else _beside(journal_dir, "unused-admin.sock")
        )
        self.config = config_from_keys(
            {
                "lock_dir": lock_dir,
                "journal_dir": journal_dir,
                **options,
                "socket": socket or _beside(journal_dir, "unused.sock"),
                "admin_socket": admin_socket or admin_default,
            }
        )
        if faults.SPEC_ERROR is not None:
            raise ConfigError(faults.SPEC_ERROR)
        self._sockets = socket is not None
        self._daemon: Daemon | None = None
        self._thread: threading.Thread | None = None
        self._transports: weakref.WeakSet[_InProcessTransport] = weakref.WeakSet()
        self._ended = False
        self._starting = threading.RLock()
        """Held by start() and stop(): one at a time, whichever threads call them.
        Reentrant: the program's signal handler may call stop() on a thread inside
        start() or stop() (a SIGTERM as it starts), which deadlocked."""
        self._failure: BaseException | None = None
        """What ended the lock thread, if not stop()."""
        self.report: RecoveryReport | None = None
        self._pid = os.getpid()
        """The process that started it: the only one its lock thread runs in."""

    def start(self, timeout: float = 60.0) -> RecoveryReport:
        """Recover from the journal and start serving; returns what recovery did."""
        with self._starting:
            return self._start(timeout)

    def _start(self, timeout: float) -> RecoveryReport:
        if self._daemon is not None and self._thread is not None and not self._thread.is_alive():
            # It stopped by itself (the idle timeout, a crash): what stop() would do, first.
            # It said "already started". A crash is raised here, once, as stop() would.
            self._stop(STOP_SECONDS)
        if self._daemon is not None:
            raise RuntimeError("already started")
        daemon = Daemon(self.config, sockets=self._sockets, embedded=True)
        self._ended = False  # before the daemon is seen: client() on another thread looks
        self._failure = None
        self._daemon = daemon
        self._pid = os.getpid()
        thread = threading.Thread(target=self._run, args=(daemon,), name="lockd", daemon=True)
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not daemon.system.ready.wait(0.02) and self._daemon is daemon:
            if not thread.is_alive():  # died starting: say why now, not at the timeout
                self._daemon = None
                raise RuntimeError(
                    f"the lock service failed to start: {self._failure!r}"
                ) from self._failure
            if time.monotonic() > deadline:
                raise TimeoutError("lock system recovery did not finish in time")
        if self._daemon is not daemon:  # a signal handler of this thread's called stop()
            if thread.is_alive():  # stopped before this thread was its to stop
                daemon.request_stop("embedding program stopped the lock service")
                thread.join(STOP_SECONDS)
            raise RuntimeError("the lock service was stopped while it started")
        assert daemon.system.report is not None
        self.report = daemon.system.report
        return self.report

    def _run(self, daemon: Daemon) -> None:
        try:
            daemon.run()
        except BaseException as exc:  # noqa: BLE001 - raised again by start() or stop()
            log.error("the embedded lock system failed: %r", exc)
            self._failure = exc
        finally:
            # Stopped or crashed: nobody waits for a reply that will not come.
            self._ended = True
            for transport in list(self._transports):
                transport.end("the embedded lock system stopped")

    def client(self, name: str = "embedded") -> EmbeddedClient:
        """A new in-process connection; ``name`` is what ``lockd clients`` shows for it."""
        daemon = self._daemon  # once: stop() on another thread may clear it meanwhile
        if daemon is None:
            raise RuntimeError("start() the lock service first")
        if (forked := _forked(self._pid)) is not None:
            raise RuntimeError(forked)
        # Another thread's start() may be recovering: a request served before recovery
        # held the journal's leases again could take a running VM's disk, and recovery
        # then called the lease lost and fenced the VM. Wait, as a socket client waits in
        # the listener's backlog.
        while not daemon.system.ready.wait(0.02):
            if self._daemon is not daemon or self._ended:
                raise RuntimeError("the lock service stopped before its start was done")
        transport = _InProcessTransport()
        self._transports.add(transport)
        if self._ended:  # stopping meanwhile: its first call says so
            transport.end("the embedded lock system stopped")
        # Never closed for idling: that frees a socket client's slot in max_clients, which
        # in-process connections do not take, and it broke a client kept for queries.
        ref = transport.actor = daemon.system.connect(transport, idle_timeout=0)
        return EmbeddedClient(ref, transport, name)

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop: journal the stop, release nothing, signal nobody (like SIGTERM to the daemon).

        Harmless when stopped already, also from several threads at once."""
        with self._starting:
            self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        # Once: a signal handler's stop() may run (and finish) inside this one.
        daemon, thread = self._daemon, self._thread
        if daemon is None or thread is None:
            return
        if thread.is_alive():  # not ended already (a crash, the idle timeout)
            daemon.request_stop("embedding program stopped the lock service")
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("the lock service did not stop")
        crashes = daemon.dispatcher.crashes
        if self._daemon is daemon:
            self._daemon = None
        if self._failure is not None and not crashes:
            raise RuntimeError(f"the lock service failed: {self._failure!r}") from self._failure
        if crashes:
            raise ProtocolError(ErrorCode.INTERNAL, f"the lock service failed: {crashes[0]!r}")

    def __enter__(self) -> LockService:
        try:
            self.start()
        except BaseException:
            # No __exit__ follows: a recovery that overran start()'s timeout, or Ctrl-C
            # during it, left the lock thread running and the journal locked.
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
