"""ConnectionActor: one client connection, whatever carries its bytes.

It owns the connection's sans-I/O protocol state (``protocol.server``), the
registered owner and the restricted flag, and serves one request at a time:
while a request is in progress, later frames wait in the decoder, and the
transport stops reading once that backlog passes a bound, so a client cannot
make the daemon buffer without limit.

Every cross-actor step is a tell with a token; the reply runs the
continuation registered for that token. Nothing here blocks.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import pykka

from actors.events import ConnectionOpened, JournalEntry, ReleaseReason
from actors.journal import (
    Appended,
    AppendFailed,
    ConnectionEnded,
    Identify,
    Published,
    Subscribe,
    Subscribed,
    Unsubscribe,
    WriteTrouble,
)
from actors.lockspace import (
    AcquireLeases,
    Counts,
    CreateResource,
    DeleteResource,
    Done,
    Holder,
    LeaseView,
    ReleaseLeases,
    Snapshot,
)
from actors.metrics import REGISTRY, LabelSet, gc_counters, gc_gauges
from actors.model import LeaseMode, Owner
from actors.owners import ConnectionClosed, Fencing, QueryFencing, Watch
from actors.router import (
    ClientChanged,
    ClientGone,
    ClientInfo,
    CloseForAdmin,
    CreateLockspace,
    Found,
    Gather,
    Gathered,
    Kick,
    Kicked,
    Lookup,
    OwnerReleased,
    ReleaseOwnerEverywhere,
)
from actors.runtime import DispatchedActor, Dispatcher, Timer, tell_if_alive
from protocol import messages as m
from protocol.codec import decode_item, encode_item
from protocol.errors import ErrorCode, ProtocolError
from protocol.framing import encode_frame
from protocol.names import printable
from protocol.server import Refused, ServerProtocol

log = logging.getLogger(__name__)

MAX_PUSH_BACKLOG = 4 * 1024 * 1024
"""Bytes of unsent events a subscriber may fall behind before it is disconnected."""
REPLAY_BACKLOG = 256 * 1024
"""Unsent bytes past which a subscriber catching up waits for its socket before the
next replay step (well below :data:`MAX_PUSH_BACKLOG`: a replay never trips it)."""
MAX_REPLY_BACKLOG = 1024 * 1024
"""Unsent reply bytes past which no further request is read until the client catches up."""
MAX_REQUEST_BACKLOG = 2 * 65536
"""Unread request bytes past which the socket is no longer read."""
MAX_UNSENT_TOTAL = 32 * 1024 * 1024
"""Unsent bytes of all connections together past which the daemon is *crowded*: then each
connection may keep only :data:`CROWDED_BACKLOG` unsent (its reading paused past it, a
subscriber disconnected past it). Without it, 1,024 subscribers that never read held
4 MiB of events each, gigabytes in all (in a daemon the OOM killer spares, VMs first)."""
CROWDED_BACKLOG = 64 * 1024
"""Unsent bytes a connection may keep while the daemon is crowded."""
WAIT_RETRY_SECONDS = (0.02, 0.05, 0.1, 0.2, 0.5)
"""Back-off between attempts of an acquire that asked to wait for a busy lease."""


class Transport(Protocol):
    """Carries a connection's bytes (real: lockd.server.SocketTransport)."""

    peer_pid: int
    peer_uid: int
    peer_gid: int
    gone: bool
    """A send failed because the peer closed its socket: nothing more reaches it
    (:class:`PeerGone` follows)."""

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer; never blocks."""
        ...

    @property
    def backlog(self) -> int:
        """Bytes queued and not yet sent."""
        ...

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int:
        """The socket fd, handed to a re-executed daemon (-1 when there is none)."""
        ...

    def peer_still_runs(self) -> bool:
        """True only if the process that connected is known to run still, so that
        :attr:`peer_pid` names it and no process that got its pid since."""
        ...

    @property
    def crowded(self) -> bool:
        """True while all connections together have more than :data:`MAX_UNSENT_TOTAL`
        bytes unsent."""
        ...


class ProcessInfo(Protocol):
    """What registration needs to know about a process (real: lockd.procs)."""

    def start_time(self, pid: int) -> int | None: ...
    def uid_of(self, pid: int) -> int | None: ...
    def leader_of(self, pid: int) -> int | None:
        """The process ``pid`` is a thread of (``pid`` itself for a process)."""
        ...

    def is_gone(self, owner: Owner) -> bool:
        """True once the owner's process is known to have exited, a zombie not yet
        reaped too (whose pid and start time still answer), or its pid names another
        process; not when /proc cannot be read (at the descriptor limit, say)."""
        ...


@attrs.frozen
class ServerInfo:
    """Facts about the daemon that ``status`` reports."""

    version: str
    pid: int
    started: float
    host: str
    fd_limit: Callable[[], int] | None = None
    """The process's limit on open descriptors, for ``metrics``; None: not reported."""
    boot: bytes | None = None
    """The host's boot id, stamped on every owner registered (see ``Owner.boot``)."""
    journal: tuple[str, int] | None = None
    """The journal's epoch: its id and the first seq of its timeline (a cut draws a new
    one), in ``status`` and the ``subscribe`` reply; None: not told (in memory)."""
    journal_trouble: WriteTrouble | None = None
    """The journal actor's account of refused writes: ``status`` shows a spell."""
    journal_dir: str | None = None
    """Where the journal is (absolute), in ``status``: ``lockd verify`` compares it with
    no ``--journal-dir`` given, and an operator finds it without reading the unit."""


@attrs.frozen
class Received:
    """Bytes from the peer; ``b""`` means it closed its end."""

    data: bytes


@attrs.frozen
class PeerGone:
    """A send failed: the peer receives nothing more, so no request it sent will be answered.

    The connection ends at once, as at end of stream with a request in flight;
    the requests still buffered are dropped, not worked through one by one for
    a client that is gone (a client that pipelined thousands and closed kept
    its connection open for seconds).
    """


@attrs.frozen
class HandedOver:
    """A connection's state, carried across a re-exec with its socket fd."""

    conn_id: int
    fd: int
    peer_pid: int
    peer_uid: int
    admin: bool
    connected_since: float
    owner: Owner | None
    restricted: bool
    subscribed: bool
    version: int | None
    pending: bytes
    """Request bytes not yet answered: unparsed input, and a waiting acquire's own frame."""
    unsent: bytes
    """Reply bytes the socket had not taken yet."""
    events_from: int | None = None
    """A subscriber's next event seq: the next program replays the journal from it,
    so the events written during the hand-over reach it too. None: from a build that
    did not say; the subscription goes on from the next program's next event."""
    name: str = ""
    """The client's name from its ``hello`` ("": none given, or a build that did not say)."""
    identified: bool = False
    """Its ``connection-opened`` is journaled (False also from a build that wrote none)."""
    opened_seq: int = 0
    """The seq of that record's last copy (see :class:`actors.journal.Identify`); 0: not
    known (an earlier build's handoff), which retention takes for one about to go."""


@attrs.frozen
class Gone:
    """Reply to :class:`Quiesce` (or :class:`Resume`): the connection closed, or serves
    on in this process; nothing to hand over."""

    conn_id: int


@attrs.frozen
class Resume:
    """The re-exec was abandoned: serve on if not handed over yet, and say so."""

    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class Quiesce:
    """Re-exec: stop reading, finish the request in progress, then reply :class:`HandedOver`."""

    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class Drained:
    """From the transport: everything queued has been sent."""


@attrs.frozen
class _IdleCheck:
    """Self-sent ``idle_timeout`` after the connection opened."""


@attrs.frozen
class _Retry:
    token: int


@attrs.define
class _Acquisition:
    request: m.Acquire
    groups: tuple[tuple[str, tuple[tuple[str, LeaseMode], ...]], ...]
    deadline: float
    attempt: int = 0
    taken: list[tuple[str, tuple[str, ...]]] = attrs.field(factory=list)
    """Per lockspace, the resources this acquire newly gave the owner (what a rollback undoes)."""
    repeated: bool = False
    """A lockspace answered from its record of an earlier request with this key."""


# Built once (``A | B`` in an isinstance call builds a union each time it runs).
_ANSWERS = (
    Found, Done, Gathered, Kicked, OwnerReleased, Fencing, Subscribed, _Retry, Appended,
    AppendFailed,
)  # fmt: skip
"""Answers to something this connection asked; each carries the token it waits on."""
_RESOURCE_REQUESTS = (m.CreateResource, m.DeleteResource)
_LIST_REQUESTS = (m.Inquire, m.ListLeases, m.ListLockspaces, m.ListClients)


_ACQUIRES = REGISTRY.series("lockd_acquires_total")
_OK: LabelSet = (("result", "ok"),)
"""Every granted acquire counts here (exported at 0 from the start: see ZERO)."""


def _counts(snapshot: Snapshot) -> Counts:
    """A lockspace's counts, from a query that asked for counts only."""
    assert snapshot.counts is not None, "the query did not ask for counts"
    return snapshot.counts


class ConnectionActor(DispatchedActor):
    """Serves one client connection."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        conn_id: int,
        transport: Transport,
        router: pykka.ActorRef[Any],
        owners: pykka.ActorRef[Any],
        journal: pykka.ActorRef[Any],
        processes: ProcessInfo,
        info: ServerInfo,
        admin: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        restored: HandedOver | None = None,
        log_control: Callable[[str | None, str | None], dict[str, str]] | None = None,
        idle_timeout: float = 0.0,
        on_stopped: Callable[[int, pykka.ActorRef[Any]], None] | None = None,
    ) -> None:
        super().__init__(dispatcher)
        self.conn_id = conn_id
        self._transport = transport
        self._router = router
        self._owners = owners
        self._journal = journal
        self._processes = processes
        self._info = info
        self._admin = admin
        self._clock = clock
        self._protocol = ServerProtocol()
        self._owner: Owner | None = None
        self._restricted = False
        self._subscribed = False
        self._identified = False
        """Its ``connection-opened`` is journaled (see :meth:`_identified_then`)."""
        self._events_next: int | None = None
        """The seq of the next event this subscriber is to be sent (None: not known yet)."""
        self._replay_paused = False
        """Catching up, and waiting for the socket to take what is queued (:class:`Drained`)."""
        self._live = False
        """Subscribed, and caught up: the journal sends this actor each new entry."""
        self._busy = False
        self._current: m.Request | None = None
        """The request taken last: the one in progress while ``_busy``."""
        self._pumping = False
        """In :meth:`_pump`'s loop, handling a request: one answered without leaving this
        actor (hello, restrict, a refusal) ends inside it, and the loop takes the next."""
        self._reading = True
        self._closed = False
        self._waiting_job: _Acquisition | None = None
        """The acquire waiting for a busy lease (``_waiting_retry``): a re-exec hands over
        what is left of its wait."""
        self._closed_by_admin: str | None = None
        """Closed by an operator (`lockd disconnect`): which one (``uid U, pid P``); its
        owner's leases end as ``admin``."""
        self._handed = False
        """Handed over to a re-exec: closed here, but not closed for its client."""
        self._on_stopped = on_stopped
        """Told when this actor stops: after its socket closed, it may still have
        requests in flight (their rollbacks), which a re-exec must wait for."""
        self._tokens = itertools.count(1)
        self._waits: dict[int, Callable[[Any], None]] = {}
        self._lockspaces: dict[str, pykka.ActorRef[Any]] = {}
        self._client = ClientInfo(
            conn_id, transport.peer_pid, transport.peer_uid, admin, wall_clock()
        )
        self._log_control = log_control
        self._idle_timeout = idle_timeout
        self._idle_timer: Timer | None = None
        self._quiesce_to: pykka.ActorRef[Any] | None = None
        self._waiting_retry = False
        self._restored = restored
        if restored is not None:
            self._take_over(restored)

    def _take_over(self, restored: HandedOver) -> None:
        """What the previous process knew of this connection (re-exec); the rest is
        resumed in :meth:`on_start`."""
        self._protocol = ServerProtocol(version=restored.version)
        self._owner = restored.owner
        self._restricted = restored.restricted
        self._subscribed = restored.subscribed
        self._identified = restored.identified
        self._client = attrs.evolve(
            self._client, connected_since=restored.connected_since, name=restored.name
        )

    # -- lifecycle ------------------------------------------------------------------
    def on_start(self) -> None:
        self._publish_info()
        if self._idle_timeout > 0 and not self._admin:
            self._check_idle_later()
        restored = self._restored
        if restored is None:
            return
        self._restored = None
        try:
            self._resume(restored)
        except Exception:  # noqa: BLE001 - as in on_receive: this connection ends, not lockd
            self._internal_error()

    def _check_idle_later(self) -> None:
        ref = self.actor_ref
        self._idle_timer = self.dispatcher.call_later(
            self._idle_timeout, lambda: tell_if_alive(ref, _IdleCheck())
        )

    def _resume(self, restored: HandedOver) -> None:
        """Carry on a connection the previous process handed over (re-exec)."""
        if self._identified:  # its record is kept while it stays open, as before
            self._journal.tell(Identify(self._opened(), 0, None, restored.opened_seq))
        if restored.owner is not None:
            self._owners.tell(Watch(restored.owner))
            if not self._identified:
                # Registered under a build that journaled no connection-opened: its
                # changes from now on are tied to its peer.
                self._journal.tell(Identify(self._opened(), 0, None))
                self._identified = True
        if restored.unsent:
            self._transport.write(restored.unsent)
        if restored.subscribed:
            self._subscribed = True
            self._events_next = restored.events_from
            self._journal.tell(
                Subscribe(self.actor_ref, restored.events_from, self._wait(self._catch_up))
            )
        if restored.pending:
            self._protocol.receive_data(restored.pending)
            self._pump()

    def _publish_info(self) -> None:
        self._client = attrs.evolve(
            self._client, owner=self._owner, restricted=self._restricted,
            subscribed=self._subscribed, ref=self.actor_ref,
        )  # fmt: skip
        # The router is gone only as the lock system stops: a connection an embedding
        # program's thread opened meanwhile is ended with it, not a crash to log.
        tell_if_alive(self._router, ClientChanged(self._client))

    def _close(self, *, admin: str | None = None) -> None:
        """``admin``: closed by that operator (``uid U, pid P``)."""
        if self._closed:
            return
        self._closed = True
        self._closed_by_admin = admin
        if self._idle_timer is not None:
            self._idle_timer.cancel()  # not left queued for the rest of idle_timeout
            self._idle_timer = None
        self._transport.close()
        self._router.tell(ClientGone(self.conn_id))
        if self._subscribed:
            self._journal.tell(Unsubscribe(self.actor_ref))
        if not self._waits:
            self._closed_and_done()

    def _closed_and_done(self) -> None:
        """Closed, and nothing it asked is in flight any more: an acquire granted
        meanwhile is rolled back and that rollback applied. Only now does the owners
        actor hear of the close: it fences an owner that still holds leases, and
        while a rollback was in flight the owner seemed to hold what it never got.

        Not once handed over: the connection lives on in the next program (or is
        taken back here), and an answer still queued before the stop changes that not.
        """
        if self._handed:
            return
        if self._identified:
            self._journal.tell(ConnectionEnded(self.conn_id))
        if self._owner is not None:
            closed = ConnectionClosed(
                self._owner, self.conn_id, self._transport.peer_pid, self._transport.peer_uid,
                self._closed_by_admin,
            )  # fmt: skip
            self._owners.tell(closed)
        if self._quiesce_to is not None:
            # Nothing to hand over, and nothing left half done for the next program
            # (a rollback the frozen lockspaces would no longer run).
            tell_if_alive(self._quiesce_to, Gone(self.conn_id))
            self._quiesce_to = None
        self.stop()

    def on_stop(self) -> None:
        if self._on_stopped is not None:
            self._on_stopped(self.conn_id, self.actor_ref)

    # -- messages -------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        try:
            return self._receive(message)
        except Exception:  # noqa: BLE001 - logged by _internal_error
            self._internal_error()
            return None

    def _internal_error(self) -> None:
        # A bug met on one connection ends that connection (its owner's leases
        # end as on any disconnect), never the daemon. Called in an except block.
        log.exception("client %d: internal error; closing the connection", self.conn_id)
        request = self._current if self._busy else None
        self._busy = self._pumping = False
        if request is not None and not self._closed:
            # The request in progress is answered, so the client can tell a bug from
            # a daemon that went away (it saw only the close); the write may be what
            # failed, and then the close alone is all it gets.
            try:
                self._transport.write(
                    self._protocol.error(
                        request.id,
                        ErrorCode.INTERNAL,
                        f"{request.OP}: internal error in lockd (its log has the details); "
                        "this connection closes",
                    )
                )
            except Exception:  # noqa: BLE001 - logged above; the close follows
                log.debug("client %d: the internal error could not be sent", self.conn_id)
        self._close()

    def _receive(self, message: Any) -> Any:
        if isinstance(message, Received):
            if self._closed:
                return None
            if not message.data and self._busy:
                # The client is gone with a request in flight. Like virtlockd,
                # end of stream is the end of the client: an acquire still in
                # flight is rolled back when it completes, never left to leak.
                self._close()
                return None
            self._protocol.receive_data(message.data)
            self._pump()
        elif isinstance(message, _ANSWERS):
            then = self._waits.pop(message.token, None)
            if then is not None:
                then(message)
            if self._closed and not self._waits:
                self._closed_and_done()
        elif isinstance(message, Published):
            self._push(message)
        elif isinstance(message, Drained):
            if self._replay_paused:
                self._replay_paused = False
                self._replay_step()
            self._pump()
        elif isinstance(message, PeerGone):
            self._close()
        elif isinstance(message, _IdleCheck):
            if self._closed or self._owner or self._subscribed:
                pass
            elif self._busy:
                # Not idle at this instant, but not registered either: look again
                # later (the one check there was let a request in flight now keep
                # the slot for good).
                self._check_idle_later()
            else:
                # Half-open or forgotten: it holds a slot of max_clients for nothing.
                log.info("closing client %d: no owner registered after %g s",
                         self.conn_id, self._idle_timeout)  # fmt: skip
                self._close()
        elif isinstance(message, Quiesce):
            if self._closed and not self._waits:
                tell_if_alive(message.reply_to, Gone(self.conn_id))
                return None
            self._quiesce_to = message.reply_to
            if self._closed:
                return None  # Gone once what it asked is done: see _closed_and_done
            self._transport.pause_reading()
            self._reading = False
            if not self._busy or self._waiting_retry:
                self._hand_over()
        elif isinstance(message, Resume):
            if self._quiesce_to is not None:
                self._quiesce_to = None
                tell_if_alive(message.reply_to, Gone(self.conn_id))
                if not self._closed:
                    self._pump()  # reading again, and a request waiting is taken
        elif isinstance(message, CloseForAdmin):
            log.info("client %d disconnected by an operator (%s)", self.conn_id, message.by)
            self._close(admin=message.by)
        else:
            return super().on_receive(message)
        return None

    def _wait(self, then: Callable[[Any], None]) -> int:
        token = next(self._tokens)
        self._waits[token] = then
        return token

    def _left_to_wait(self, payload: bytes) -> bytes:
        request = decode_item(payload)
        assert self._waiting_job is not None
        request["wait"] = round(max(0.0, self._waiting_job.deadline - self._clock()), 3)
        return encode_item(request)

    def _hand_over(self) -> None:
        """Describe this connection for the next daemon; it takes the socket from here."""
        assert self._quiesce_to is not None
        pending = self._protocol.take_buffered()
        if self._waiting_retry:
            # An acquire waiting for a busy lease: the next daemon asks again, for what
            # is left of its wait (from the whole of it, repeated reloads would extend
            # a wait without end).
            pending = encode_frame(self._left_to_wait(self._protocol.last_payload)) + pending
        take_unsent = getattr(self._transport, "take_unsent", None)
        state = HandedOver(
            self.conn_id,
            self._transport.fileno(),
            self._transport.peer_pid,
            self._transport.peer_uid,
            self._admin,
            self._client.connected_since,
            self._owner,
            self._restricted,
            self._subscribed,
            self._protocol.version,
            pending,
            take_unsent() if take_unsent is not None else b"",
            self._events_next if self._subscribed else None,
            self._client.name,
            self._identified,
        )
        self._closed = True  # this process will not touch the connection again
        self._handed = True
        if self._subscribed:
            self._journal.tell(Unsubscribe(self.actor_ref))
        tell_if_alive(self._quiesce_to, state)
        self._quiesce_to = None  # answered: a Resume crossing this answers nothing more
        self.stop()

    def _pump(self) -> None:
        """Take the next request when idle; apply back-pressure when a backlog grows.

        Not re-entered: a request answered at once replies from inside the loop below,
        and a reply calling the loop again for the next one would nest a call per
        pipelined request, until Python's recursion limit ended the connection (a
        few hundred pipelined ``hello`` did). The loop that is running takes it.
        """
        if self._pumping:
            return  # called by a reply from inside the loop below: it goes on
        if self._quiesce_to is not None:
            if not self._busy and not self._closed:  # closed: Gone, from _closed_and_done
                self._hand_over()
            return
        transport = self._transport
        while (
            not self._busy
            and not self._closed
            and not transport.gone  # the requests left are for no one: PeerGone ends it
            and transport.backlog <= MAX_REPLY_BACKLOG
            and (transport.backlog <= CROWDED_BACKLOG or not transport.crowded)
        ):
            incoming = self._protocol.next_incoming()
            if incoming is None:
                break
            if isinstance(incoming, Refused):
                self._transport.write(self._protocol.refusal(incoming))
                if incoming.fatal:
                    self._closing_unreadable(incoming)
                continue
            self._busy = True
            self._current = incoming
            self._pumping = True  # on the path of every request: no try/finally here;
            self._handle(incoming)  # an exception ends the connection (_internal_error)
            self._pumping = False
        if self._closed:
            return
        if not self._busy and self._protocol.closed:
            self._close()
            return
        backlog = (
            self._protocol.buffered > MAX_REQUEST_BACKLOG
            or self._transport.backlog > MAX_REPLY_BACKLOG
            or (self._transport.backlog > CROWDED_BACKLOG and self._transport.crowded)
        )
        if backlog and self._reading:
            self._reading = False
            self._transport.pause_reading()
        elif not backlog and not self._reading:
            self._reading = True
            self._transport.resume_reading()

    def _closing_unreadable(self, refused: Refused) -> None:
        """Close a stream that cannot be read on (a length past the cap, an end inside a
        frame). When an owner was registered on it, its close fences that owner: the
        log says lockd closed it and why, or the fence's "connection closed" reads as
        the VM's doing."""
        if self._owner is not None:
            log.warning(
                "client %d (pid %d, owner %s): %s; closing it (%s)",
                self.conn_id, self._transport.peer_pid, printable(self._owner.name),
                refused.code.value, refused.message,
            )  # fmt: skip
        else:
            log.debug("client %d: %s; closing it", self.conn_id, refused.message)
        self._close()

    def _reply(self, request: m.Request, result: dict[str, Any]) -> None:
        if not self._closed:
            try:
                data = self._protocol.reply(request.id, result)
            except ProtocolError as exc:
                data = self._protocol.error(request.id, ErrorCode.TOO_LARGE, exc.message)
            self._transport.write(data)
        self._busy = False
        self._pump()

    def _error(self, request: m.Request, code: ErrorCode, message: str, **details: Any) -> None:
        if not self._closed:
            self._transport.write(self._protocol.error(request.id, code, message, **details))
        self._busy = False
        self._pump()

    # -- requests --------------------------------------------------------------------
    def _handle(self, request: m.Request) -> None:
        if self._restricted:
            self._error(
                request, ErrorCode.RESTRICTED, f"{request.OP}: this connection is restricted"
            )
            return
        # The hot path first: each test above a request's own costs it a call.
        if isinstance(request, m.Acquire):
            self._acquire(request)
        elif isinstance(request, m.Release):
            self._release(request)
        elif isinstance(request, m.Hello):
            if request.client is not None and request.client != self._client.name:
                self._client = attrs.evolve(self._client, name=request.client)
                self._publish_info()
            self._reply(request, self._protocol.hello_result(f"lockd {self._info.version}"))
        elif isinstance(request, m.Register):
            self._register(request)
        elif isinstance(request, m.Restrict):
            self._restrict(request)
        elif isinstance(request, m.CreateLockspace):
            self._identified_then(request, lambda: self._create_lockspace(request))
        elif isinstance(request, _RESOURCE_REQUESTS):
            self._resource_op(request)
        elif isinstance(request, _LIST_REQUESTS):
            if isinstance(request, m.Inquire) and self._owner is None:
                self._error(request, ErrorCode.NOT_REGISTERED, "inquire: register an owner first")
                return
            token = self._wait(lambda g: self._query(request, g))
            mine = self._owner.key if isinstance(request, m.Inquire) and self._owner else None
            scan = isinstance(request, m.ListLockspaces)
            self._router.tell(
                Gather(token, self.actor_ref, owner=mine, scan=scan, counts_only=scan)
            )
        elif isinstance(request, m.Status):
            token = self._wait(lambda g: self._status(request, g))
            self._router.tell(Gather(token, self.actor_ref, counts_only=True))
        elif isinstance(request, m.Metrics):
            token = self._wait(lambda g: self._metrics(request, g))
            self._router.tell(Gather(token, self.actor_ref, counts_only=True))
        elif isinstance(request, m.SetLog):
            self._set_log(request)
        elif isinstance(request, m.Subscribe):
            if not self._subscribed:
                self._subscribed = True
                self._publish_info()
                token = self._wait(lambda step: self._subscribed_from(request, step))
                self._journal.tell(Subscribe(self.actor_ref, request.since, token))
            elif request.since is not None:
                self._error(
                    request,
                    ErrorCode.INVALID_ARGUMENT,
                    "subscribe: this connection is subscribed already; since starts a new one",
                )
            else:
                self._reply(request, {})
        elif isinstance(request, m.Disconnect):
            self._disconnect(request)
        else:  # pragma: no cover - request_from_wire only builds the types above
            self._error(request, ErrorCode.INTERNAL, f"{request.OP}: not implemented")

    def _restrict(self, request: m.Restrict) -> None:
        self._restricted = True
        if self._subscribed:
            # The connection is about to be handed to the process it protects (a VM):
            # every tenant's events went on flowing into it.
            self._end_subscription("the connection was restricted")
        else:
            self._publish_info()
        self._reply(request, {})

    def _disconnect(self, request: m.Disconnect) -> None:
        if not self._admin:
            self._error(
                request,
                ErrorCode.PERMISSION_DENIED,
                "disconnect is served on the admin socket only",
            )
            return
        if request.client == self.conn_id:
            # Its own connection: answer, then close. Through the router the close
            # comes first and the answer finds the connection closed.
            self._transport.write(self._protocol.reply(request.id, {"client": self.conn_id}))
            self._busy = False
            log.info("client %d disconnected by an operator (itself)", self.conn_id)
            self._close(admin=self._operator())
            return
        token = self._wait(lambda k: self._kicked(request, k))
        self._router.tell(Kick(request.client, token, self.actor_ref, self._operator()))

    def _operator(self) -> str:
        """Who this admin connection is, as a fence's reason names them: an auditor asks
        who. The admin socket serves the daemon's own uid only (``allowed_uids`` is the
        client socket's), so the pid is what tells two operators' sessions apart."""
        return f"uid {self._transport.peer_uid}, pid {self._transport.peer_pid}"

    def _register(self, request: m.Register) -> None:
        if self._owner is not None:
            self._error(
                request,
                ErrorCode.INVALID_ARGUMENT,
                "register: this connection already has an owner",
            )
            return
        ident = request.owner
        peer_uid = self._transport.peer_uid
        started = self._processes.start_time(ident.pid)
        uid = self._processes.uid_of(ident.pid)
        if started is None or uid is None:
            self._error(request, ErrorCode.NOT_FOUND, f"register: no process with pid {ident.pid}")
            return
        if ident.pid == self._info.pid and self._transport.peer_pid not in (0, ident.pid):
            # Its fence would signal lockd itself: SIGTERM stops the daemon, and every
            # lease it holds with it (a typo of $$ for the VM's pid, or a script's $PPID).
            # A program embedding the lock system may own leases itself (its in-process
            # connections, peer 0): it asks for its own fence, knowingly.
            self._error(
                request,
                ErrorCode.INVALID_ARGUMENT,
                f"register: pid {ident.pid} is this lockd itself; register the process "
                "that uses the disks",
            )
            return
        leader = self._processes.leader_of(ident.pid)
        if leader is not None and leader != ident.pid:
            # A thread id opens in /proc like a pid, but the thread is not what a lease
            # protects: it would end when that thread exits, the process (and its open
            # disk) running on; and no pidfd watches a thread, so it would be polled.
            self._error(
                request,
                ErrorCode.INVALID_ARGUMENT,
                f"register: {ident.pid} is a thread of process {leader}, not a process; "
                f"register pid {leader}",
            )
            return
        if peer_uid not in (0, uid) and not (
            ident.pid == self._transport.peer_pid and self._transport.peer_still_runs()
        ):
            # Its own pid is the peer's to register whatever its uid now; but the pid
            # SO_PEERCRED gave is the one it had at connect(): once that process exits,
            # the pid may name anyone's process, which its fence would then kill.
            gone = (
                f" (the process that connected as pid {ident.pid} has exited: it is "
                "another process now)"
                if ident.pid == self._transport.peer_pid
                else ""
            )
            may = "only root" if uid == 0 else f"only root or uid {uid}"
            self._error(
                request,
                ErrorCode.PERMISSION_DENIED,
                f"register: pid {ident.pid} runs as uid {uid}{gone}; you are uid {peer_uid}: "
                f"{may} may register it",
            )
            return
        owner = Owner(ident.uuid, ident.name, ident.id, ident.pid, started, self._info.boot)
        self._identified_then(request, lambda: self._registered(request, owner))

    def _registered(self, request: m.Register, owner: Owner) -> None:
        self._owner = owner
        self._owners.tell(Watch(owner))
        self._publish_info()
        self._reply(request, {"client": self.conn_id, "owner": owner.to_wire()})

    def _opened(self) -> ConnectionOpened:
        transport = self._transport
        return ConnectionOpened(
            self.conn_id, transport.peer_pid, transport.peer_uid, transport.peer_gid,
            self._admin, self._client.connected_since,
        )  # fmt: skip

    def _identified_then(self, request: m.Request, then: Callable[[], None]) -> None:
        """Run ``then`` (a register, a create or delete) once this connection's
        ``connection-opened`` is journaled: an auditor ties the ``conn`` of each change to
        a pid and uid. Once per connection; a journal that refuses it refuses the request
        (``io-error``), as it would the change, so no change goes unidentified."""
        if self._identified:
            then()
            return

        def written(reply: Appended | AppendFailed) -> None:
            if isinstance(reply, AppendFailed):
                self._error(request, ErrorCode.IO_ERROR, f"{request.OP}: {reply.message}")
                return
            self._identified = True
            if self._closed:
                self._busy = False  # its client left meanwhile: the request is dropped
                return
            then()

        self._journal.tell(Identify(self._opened(), self._wait(written), self.actor_ref))

    def _create_lockspace(self, request: m.CreateLockspace) -> None:
        token = self._wait(lambda found: self._lockspace_created(request, found))
        self._router.tell(CreateLockspace(request.lockspace, self.conn_id, token, self.actor_ref))

    def _lockspace_created(self, request: m.CreateLockspace, found: Found) -> None:
        if found.ref is None:
            assert found.code is not None
            self._error(request, found.code, found.message)
            return
        self._lockspaces[found.lockspace] = found.ref
        self._reply(request, {"lockspace": found.lockspace, "created": found.created})

    def _with_lockspaces(
        self, request: m.Request, names: list[str], then: Callable[[], None]
    ) -> None:
        """Run ``then`` once every named lockspace's actor is known, or reply the lookup error."""
        lockspaces = self._lockspaces
        for name in names:
            if name not in lockspaces:
                break  # the first one unknown is looked up, then the rest again
        else:  # all known, as on every request after a connection's first
            then()
            return

        def found(reply: Found) -> None:
            if reply.ref is None:
                assert reply.code is not None
                self._error(request, reply.code, reply.message)
                return
            self._lockspaces[name] = reply.ref
            self._with_lockspaces(request, names, then)

        self._router.tell(Lookup(name, self._wait(found), self.actor_ref))

    def _resource_op(self, request: m.CreateResource | m.DeleteResource) -> None:
        def send() -> None:
            ref = self._lockspaces[request.lockspace]
            token = self._wait(lambda done: self._resource_done(request, done))
            cls = CreateResource if isinstance(request, m.CreateResource) else DeleteResource
            ref.tell(cls(request.resource, self.conn_id, token, self.actor_ref))

        self._identified_then(
            request, lambda: self._with_lockspaces(request, [request.lockspace], send)
        )

    def _resource_done(self, request: m.CreateResource | m.DeleteResource, done: Done) -> None:
        if done.refusal is not None:
            self._refused(request, done)
            return
        key = "created" if isinstance(request, m.CreateResource) else "deleted"
        self._reply(request, {key: True})

    def _refused(self, request: m.Request, done: Done) -> None:
        assert done.refusal is not None
        details: dict[str, Any] = {}
        if done.refusal.code is ErrorCode.BUSY:
            details["holders"] = [o.to_wire() for o in done.refusal.holders]
        self._error(request, done.refusal.code, done.refusal.message, **details)

    # -- acquire ------------------------------------------------------------------------
    def _acquire(self, request: m.Acquire) -> None:
        if self._owner is None:
            self._error(request, ErrorCode.NOT_REGISTERED, "acquire: register an owner first")
            return
        grouped: dict[str, list[tuple[str, LeaseMode]]] = {}
        for lease in request.leases:
            mode = LeaseMode.SHARED if lease.shared else LeaseMode.EXCLUSIVE
            grouped.setdefault(lease.lockspace, []).append((lease.resource, mode))
        job = _Acquisition(
            request,
            tuple((ls, tuple(items)) for ls, items in grouped.items()),
            self._clock() + request.wait,
        )
        self._with_lockspaces(request, list(grouped), lambda: self._acquire_group(job, 0))

    def _acquire_group(self, job: _Acquisition, index: int) -> None:
        assert self._owner is not None
        lockspace, items = job.groups[index]
        token = self._wait(lambda done: self._acquired_group(job, index, done))
        self._lockspaces[lockspace].tell(
            AcquireLeases(
                self._owner,
                items,
                job.request.autocreate,
                self.conn_id,
                token,
                self.actor_ref,
                job.request.once,
            )
        )

    def _retry(self, job: _Acquisition) -> None:
        self._waiting_retry = False
        owner = self._owner
        assert owner is not None
        if self._processes.is_gone(owner):
            # Waiting on for a process that has exited would take the lease when it
            # frees, away from live waiters, only for the owners actor to release it
            # again, and answer success to a caller whose VM is gone. A zombie has
            # exited too, though its start time still matches until it is reaped; /proc
            # unreadable (EMFILE) is no exit, and the VM may run on.
            REGISTRY.inc("lockd_acquires_total", result=ErrorCode.NOT_FOUND.value)
            self._error(
                job.request,
                ErrorCode.NOT_FOUND,
                f"acquire: owner process {owner.pid} exited while waiting for the lease",
            )
            return
        self._acquire_group(job, 0)

    def _rollback(self, job: _Acquisition, then: Callable[[list[str]], None] | None = None) -> None:
        """Release what this acquire took so far, and only that; once every lockspace has
        answered (at once when nothing was taken), call ``then`` with what could not be
        released (``lockspace/resource: why``; the journal refused it, the lease stays)."""
        assert self._owner is not None
        left = len(job.taken)
        stuck: list[str] = []

        def answered(lockspace: str, resources: tuple[str, ...], done: Done) -> None:
            # The lockspace orders the release before our next command, so a retry need
            # not wait for it; a reply does (``then``), and a closed connection waits
            # for it too: see _closed_and_done.
            nonlocal left
            left -= 1
            if done.refusal is not None:
                stuck.extend(f"{lockspace}/{r}: {done.refusal.message}" for r in resources)
            if not left and then is not None:
                then(stuck)

        for lockspace, resources in job.taken:
            token = self._wait(functools.partial(answered, lockspace, resources))
            self._lockspaces[lockspace].tell(
                ReleaseLeases(
                    self._owner, resources, self.conn_id, ReleaseReason.ROLLBACK, token,
                    self.actor_ref, job.request.once,
                )
            )  # fmt: skip
        job.taken.clear()
        if not left and then is not None:
            then(stuck)

    def _acquired_group(self, job: _Acquisition, index: int, done: Done) -> None:
        lockspace = job.groups[index][0]
        if done.entries:
            job.taken.append((lockspace, tuple(e.event.resource for e in done.entries)))  # type: ignore[attr-defined]
        elif done.repeated:
            # Taken by the first request with this key: undone by this one's rollback,
            # which forgets the key too (a repeat then runs anew).
            job.taken.append((lockspace, done.repeated))
            job.repeated = True
        if done.refusal is None and self._closed:
            self._rollback(job)  # the client left mid-request: it changes nothing
            return
        if done.refusal is not None:
            if done.refusal.code is ErrorCode.BUSY:
                REGISTRY.inc("lockd_conflicts_total")  # each attempt that met a holder
            if done.refusal.code is ErrorCode.BUSY and not self._closed:
                # The last back-off is cut short to end at the deadline: waiting
                # "until then" tries once more at it, where skipping a whole step
                # answered busy up to 0.5 s early (wait=0.3 gave up after 0.17 s)
                # and missed a lease freed in that time.
                remaining = job.deadline - self._clock()
                delay = WAIT_RETRY_SECONDS[min(job.attempt, len(WAIT_RETRY_SECONDS) - 1)]
                delay = min(delay, remaining)
                if remaining > 0:
                    job.attempt += 1
                    if index:
                        # The lockspace that refused goes first next time: while it
                        # stays busy, a try takes nothing. Left in place, each try
                        # took the earlier lockspaces' leases and rolled them back,
                        # two journal events a lease every 0.5 s for the whole wait,
                        # a free lease held for a moment each time (others: busy).
                        groups = job.groups
                        job.groups = (groups[index], *groups[:index], *groups[index + 1 :])
                    # The wait goes on once the rollback is applied: one the journal
                    # refused leaves leases held, which ends the request (io-error),
                    # as without a wait. Not awaited, it was dropped unsaid and the
                    # wait ended busy, its owner holding them all the same.
                    self._rollback(job, lambda stuck: self._wait_on(job, done, delay, stuck))
                    return
            # Answered once the rollback is applied: the reply says the request took
            # nothing, and goes out only when that is journaled. Sent first, a daemon
            # killed before the rollback's release was written came back holding the
            # lease for an owner told it got nothing.
            self._rollback(job, lambda stuck: self._refused_after_rollback(job, done, stuck))
            return
        if done.entries:
            # The owner may have exited while this acquire was on its way;
            # watching it again makes the owners actor release what was just
            # granted to a dead process (a no-op while it is alive).
            assert self._owner is not None
            self._owners.tell(Watch(self._owner))
        if index + 1 < len(job.groups):
            self._acquire_group(job, index + 1)
            return
        _ACQUIRES[_OK] += 1
        result: dict[str, Any] = {
            "leases": [
                {
                    "lockspace": lease.lockspace,
                    "resource": lease.resource,
                    "mode": "shared" if lease.shared else "exclusive",
                }
                for lease in job.request.leases
            ]
        }
        if job.repeated:
            result["repeated"] = True
        self._reply(job.request, result)

    def _wait_on(self, job: _Acquisition, done: Done, delay: float, stuck: list[str]) -> None:
        """Try a busy acquire again in ``delay`` seconds, its rollback applied (``stuck``:
        what the journal would not let it release, which ends the wait)."""
        if self._closed:
            return
        if stuck:
            self._refused_after_rollback(job, done, stuck)
            return
        self._waiting_retry = True
        self._waiting_job = job
        if self._quiesce_to is not None:
            self._hand_over()
            return
        token = self._wait(lambda _r: None if self._closed else self._retry(job))
        ref = self.actor_ref
        self.dispatcher.call_later(delay, lambda: tell_if_alive(ref, _Retry(token)))

    def _refused_after_rollback(self, job: _Acquisition, done: Done, stuck: list[str]) -> None:
        """Answer a refused acquire once its rollback is applied; if the journal refused
        the rollback's release, the leases it took are still held: io-error says which.
        Counted here, once per request by the answer it gets (not per attempt of a wait):
        counted before the rollback, a stuck one was ``busy`` without a wait."""
        assert done.refusal is not None
        if not stuck:
            REGISTRY.inc("lockd_acquires_total", result=done.refusal.code.value)
            self._refused(job.request, done)
            return
        REGISTRY.inc("lockd_acquires_total", result=ErrorCode.IO_ERROR.value)
        self._error(
            job.request,
            ErrorCode.IO_ERROR,
            f"acquire: {done.refusal.message}; and the journal could not record the release "
            f"of what it took, which stays held (release it once the journal can be written, "
            f"or it ends with the owner): {'; '.join(stuck)}",
        )

    # -- release ------------------------------------------------------------------------
    def _release(self, request: m.Release) -> None:
        owner = self._owner
        if owner is None:
            self._error(request, ErrorCode.NOT_REGISTERED, "release: register an owner first")
            return
        if request.all:
            token = self._wait(lambda r: self._released_all(request, r))
            self._router.tell(
                ReleaseOwnerEverywhere(
                    owner.key, self.conn_id, ReleaseReason.CLIENT, token, self.actor_ref
                )
            )
            return
        grouped: dict[str, list[str]] = {}
        for lockspace, resource in request.leases:
            grouped.setdefault(lockspace, []).append(resource)
        groups = list(grouped.items())
        self._with_lockspaces(
            request, list(grouped), lambda: self._release_group(request, owner, groups, 0, 0)
        )

    def _release_group(
        self,
        request: m.Release,
        owner: Owner,
        groups: list[tuple[str, list[str]]],
        index: int,
        released: int,
        *,
        repeated: bool = False,
    ) -> None:
        # A method, not a closure that calls itself: such a closure is a reference
        # cycle, left for the cyclic collector on every release.
        lockspace, resources = groups[index]

        def done(reply: Done) -> None:
            count = released + len(reply.entries or reply.repeated)
            again = repeated or bool(reply.repeated)
            if reply.refusal is not None:
                self._refused(request, reply)
            elif index + 1 < len(groups):
                self._release_group(request, owner, groups, index + 1, count, repeated=again)
            elif again:
                self._reply(request, {"released": count, "repeated": True})
            else:
                self._reply(request, {"released": count})

        self._lockspaces[lockspace].tell(
            ReleaseLeases(
                owner, tuple(resources), self.conn_id, ReleaseReason.CLIENT,
                self._wait(done), self.actor_ref, request.once,
            )
        )  # fmt: skip

    def _released_all(self, request: m.Release, reply: OwnerReleased) -> None:
        if reply.failed:
            self._error(
                request,
                ErrorCode.IO_ERROR,
                f"release: the journal could not record releases in {', '.join(reply.failed)}; "
                "those leases are still held",
                released=len(reply.entries),
            )
            return
        self._reply(request, {"released": len(reply.entries)})

    # -- queries ---------------------------------------------------------------------------
    def _query(self, request: m.Request, gathered: Gathered) -> None:
        if isinstance(request, m.ListLockspaces):
            self._reply(
                request,
                {
                    "lockspaces": [
                        {"name": s.name, "path": s.path, "leases": _counts(s).leases}
                        for s in gathered.lockspaces
                    ]
                },
            )
            return
        if isinstance(request, m.ListClients):
            counts: dict[Any, int] = {}
            for s in gathered.lockspaces:
                for lease in s.leases:
                    for h in lease.holders:
                        counts[h.owner.key] = counts.get(h.owner.key, 0) + 1
            clients = [_client_to_wire(c, counts) for c in gathered.clients]
            self._reply(request, {"clients": clients})
            return
        leases = [lease for s in gathered.lockspaces for lease in s.leases]
        if isinstance(request, m.ListLeases) and request.lockspace is not None:
            leases = [lease for lease in leases if lease.lockspace == request.lockspace]
        if isinstance(request, m.Inquire):
            assert self._owner is not None
            key = self._owner.key
            mine = [
                _held_to_wire(lease, h.holds)
                for lease in leases
                for h in lease.holders
                if h.owner.key == key
            ]
            self._reply(request, {"owner": self._owner.to_wire(), "leases": mine})
            return
        self._reply(
            request,
            {
                "leases": [
                    {
                        "lockspace": lease.lockspace,
                        "resource": lease.resource,
                        "mode": lease.mode.value,
                        "owners": [_holder_to_wire(h) for h in lease.holders],
                    }
                    for lease in leases
                ]
            },
        )

    def _status(self, request: m.Status, gathered: Gathered) -> None:
        # Then the fences in progress: what lockd is about to kill is what an
        # operator looking at a host in trouble needs first.
        self._with_fences(lambda fencing: self._status_reply(request, gathered, fencing))

    def _with_fences(self, then: Callable[[Fencing], None]) -> None:
        """Ask the owners actor which fences run, then call ``then`` with its answer."""
        token = self._wait(then)
        try:
            self._owners.tell(QueryFencing(self.actor_ref, token))
        except pykka.ActorDeadError:  # only as the daemon goes down: answer without fences
            del self._waits[token]
            then(Fencing())

    def _status_reply(self, request: m.Status, gathered: Gathered, fencing: Fencing) -> None:
        owners = set().union(*(_counts(s).owners for s in gathered.lockspaces))
        self._reply(
            request,
            {
                "version": self._info.version,
                "pid": self._info.pid,
                "host": self._info.host,
                "uptime_s": round(self._clock() - self._info.started, 3),
                "clients": len(gathered.clients),
                "lockspaces": len(gathered.lockspaces),
                "leases": sum(_counts(s).leases for s in gathered.lockspaces),
                "owners": len(owners),
                "journal_seq": gathered.last_seq,
                "fencing": [
                    {
                        "owner": fence.owner.to_wire(),
                        "reason": fence.reason,
                        "next_signal": fence.next_signal,
                        "due_in_s": fence.due_in,
                    }
                    for fence in fencing.fences
                ],
                **self._epoch(where=True),
                **self._journal_error(),
            },
        )

    def _journal_error(self) -> dict[str, Any]:
        """``{"journal_error": {message, since, refused}}`` while the journal refuses
        writes (a full or failing disk); {} otherwise."""
        trouble = self._info.journal_trouble
        if trouble is None or trouble.error is None:
            return {}
        return {"journal_error": {"message": trouble.error, "since": trouble.since,
                                  "refused": trouble.refused}}  # fmt: skip

    def _epoch(self, *, where: bool = False) -> dict[str, Any]:
        """``{"journal": {"id", "from"}}``: the journal's timeline, which a cut renews
        (its seqs from ``from`` on handed out again), and with ``where`` its directory
        (``dir``, for ``status``); {} when the daemon does not say."""
        if self._info.journal is None:
            return {}
        ident, first = self._info.journal
        place = {"dir": self._info.journal_dir} if where and self._info.journal_dir else {}
        return {"journal": {"id": ident, "from": first, **place}}

    def _metrics(self, request: m.Metrics, gathered: Gathered) -> None:
        self._with_fences(lambda fencing: self._metrics_reply(request, gathered, fencing))

    def _metrics_reply(self, request: m.Metrics, gathered: Gathered, fencing: Fencing) -> None:
        held: dict[tuple[tuple[str, str], ...], float] = {}
        owners: set[Any] = set()
        for snapshot in gathered.lockspaces:
            counts = _counts(snapshot)
            # At 0 too: a series that vanishes with the last lease leaves a dashboard's
            # sum with no data for an idle host, and `== 0` never true.
            for mode, count in (("exclusive", counts.exclusive), ("shared", counts.shared)):
                held[(("lockspace", snapshot.name), ("mode", mode))] = count
            owners |= counts.owners
        uptime = round(self._clock() - self._info.started, 3)
        text = REGISTRY.render(
            [
                ("lockd_leases_held", "Leases held now, by lockspace and mode.", held),
                ("lockd_owners", "Owners holding leases now.", {(): len(owners)}),
                ("lockd_clients", "Client connections now.", {(): len(gathered.clients)}),
                ("lockd_lockspaces", "Lockspaces served.", {(): len(gathered.lockspaces)}),
                ("lockd_journal_seq", "Seq of the last journal entry.", {(): gathered.last_seq}),
                ("lockd_uptime_seconds", "Seconds since start.", {(): uptime}),
                (
                    "lockd_build_info",
                    "The running build, by version (as lockd --version says it): always 1.",
                    {(("version", self._info.version),): 1},
                ),
                (
                    "lockd_fences_in_progress",
                    "Owners being fenced now (SIGTERM sent, not yet exited).",
                    {(): len(fencing.fences)},
                ),
                *self._fd_gauges(),
                *gc_gauges(),
            ],
            gc_counters(),
        )
        self._reply(request, {"text": text})

    def _fd_gauges(self) -> list[tuple[str, str, dict[LabelSet, float]]]:
        # Every lease held, pidfd-watched owner and client holds a descriptor: their
        # sum against this limit is what to alert on before acquires fail. The exact
        # count (Prometheus' process_open_fds) would mean listing /proc/self/fd,
        # 30-60 ms at 19,000 fds with every request waiting; the limit is free.
        if self._info.fd_limit is None:
            return []
        limit = self._info.fd_limit()
        # Not process_max_fds: the text reaches Prometheus through an exporter
        # (node_exporter's textfile collector) that exports its own under that name.
        text = "The daemon's limit on open file descriptors (its soft RLIMIT_NOFILE)."
        return [("lockd_max_fds", text, {(): limit})]

    def _set_log(self, request: m.SetLog) -> None:
        if not self._admin:
            self._error(
                request, ErrorCode.PERMISSION_DENIED, "set-log is served on the admin socket only"
            )
            return
        if self._log_control is None:
            # Refused by design, not a bug: the program embedding lockd owns its logging.
            self._error(
                request,
                ErrorCode.PERMISSION_DENIED,
                "set-log: this lockd is embedded in a program whose logging is its own",
            )
            return
        try:
            result = self._log_control(request.level, request.filters)
        except ValueError as exc:
            self._error(request, ErrorCode.INVALID_ARGUMENT, f"set-log: {exc}")
            return
        self._reply(request, dict(result))

    def _kicked(self, request: m.Disconnect, kicked: Kicked) -> None:
        if not kicked.found:
            self._error(request, ErrorCode.NOT_FOUND, f"disconnect: no client {request.client}")
            return
        self._reply(request, {"client": request.client})

    # -- events --------------------------------------------------------------------------
    def _subscribed_from(self, request: m.Subscribe, step: Subscribed) -> None:
        """The journal's first answer: reply, then the events it read back, if any."""
        if request.since is not None and step.next_seq < request.since and not step.live:
            self._subscribed = False
            self._publish_info()
            self._error(
                request,
                ErrorCode.INVALID_ARGUMENT,
                f"subscribe: since {request.since} is past the end of the journal; "
                f"the next event will be {step.next_seq}",
            )
            return
        if not self._closed:
            # Where the feed starts: a later seq than since asked for is history the
            # journal no longer keeps, a gap the subscriber sees before any event.
            first = step.entries[0].seq if step.entries else step.next_seq
            self._transport.write(
                self._protocol.reply(request.id, {"first": first, **self._epoch()})
            )
        self._busy = False  # answered: a bug in what follows ends it with no second reply
        self._catch_up(step)
        self._pump()

    def _catch_up(self, step: Subscribed) -> None:
        """Send one replay step on; ask for the next at once, or, past
        :data:`REPLAY_BACKLOG` unsent, once the socket has taken all of it."""
        if self._closed or not self._subscribed:
            return  # a step asked for before the subscription ended (a restrict)
        if step.next_seq < (self._events_next or 0) and not step.live:
            # A since past the journal's end (a handed-over seq the journal lost):
            # go on from the journal's next event.
            self._journal.tell(Subscribe(self.actor_ref, None, self._wait(self._catch_up)))
            return
        self._events_next = step.next_seq
        self._live = step.live
        self._send_events(step.entries)
        if step.live or not self._subscribed or self._closed:
            return
        if self._transport.backlog > REPLAY_BACKLOG:
            self._replay_paused = True  # Drained resumes it
        else:
            self._replay_step()

    def _replay_step(self) -> None:
        if not self._closed:
            token = self._wait(self._catch_up)
            self._journal.tell(Subscribe(self.actor_ref, self._events_next, token))

    def _push(self, published: Published) -> None:
        # Not live: entries the journal sent before it took this actor's Unsubscribe
        # (an ended subscription's), and that a new one replays itself.
        if self._closed or not self._live:
            return
        self._events_next = published.entries[-1].seq + 1
        self._send_events(published.entries)

    def _send_events(self, entries: tuple[JournalEntry, ...]) -> None:
        for entry in entries:
            self._transport.write(self._protocol.push({"event": entry.to_wire()}))
        backlog = self._transport.backlog
        if backlog > MAX_PUSH_BACKLOG:
            self._fell_behind(f"fell {backlog} bytes behind its event subscription")
        elif backlog > CROWDED_BACKLOG and self._transport.crowded:
            self._fell_behind(
                f"fell {backlog} bytes behind its event subscription while all clients "
                f"together have over {MAX_UNSENT_TOTAL} bytes unsent"
            )

    def _fell_behind(self, why: str) -> None:
        """A subscriber too far behind: disconnected (it reconnects with ``since`` and
        misses nothing), unless the connection is an owner's own, whose close would
        fence the owner's VM over unread events: that one's subscription ends, with
        a last frame saying where to subscribe again from, and the connection stays."""
        if self._owner is None:
            log.warning("client %d %s; disconnecting it", self.conn_id, why)
            self._close()
            return
        log.warning(
            "client %d %s; ending its subscription (the connection stays: it is owner "
            "%s's, and closing it would fence the owner)",
            self.conn_id,
            why,
            self._owner.name,
        )
        self._end_subscription(why)

    def _end_subscription(self, why: str) -> None:
        """End the subscription, the connection staying; a last frame says ``why`` and the
        seq to subscribe again from."""
        self._subscribed = False
        self._live = False
        self._replay_paused = False  # a Drained must not resume the replay it ended
        self._journal.tell(Unsubscribe(self.actor_ref))
        self._publish_info()
        ended = {"next": self._events_next, "reason": why}
        self._transport.write(self._protocol.push({"subscription-ended": ended}))


def _held_to_wire(lease: LeaseView, holds: int) -> dict[str, Any]:
    """One of the asking owner's leases, as ``inquire`` answers: ``holds`` only when it holds
    the lease more than once (a shared lease asked for again)."""
    wire: dict[str, Any] = {
        "lockspace": lease.lockspace,
        "resource": lease.resource,
        "mode": lease.mode.value,
    }
    if holds > 1:
        wire["holds"] = holds
    return wire


def _holder_to_wire(holder: Holder) -> dict[str, Any]:
    """A lease's owner as ``list-leases`` answers, ``holds`` as in :func:`_held_to_wire`."""
    wire = {**holder.owner.to_wire(), "since": holder.since}
    if holder.holds > 1:
        wire["holds"] = holder.holds
    return wire


def _client_to_wire(client: ClientInfo, lease_counts: dict[Any, int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "leases": lease_counts.get(client.owner.key, 0) if client.owner is not None else 0,
        "id": client.id,
        "pid": client.pid,
        "uid": client.uid,
        "admin": client.admin,
        "restricted": client.restricted,
        "subscribed": client.subscribed,
        "connected_since": client.connected_since,
    }
    if client.name:
        out["name"] = client.name
    if client.owner is not None:
        out["owner"] = client.owner.to_wire()
    return out
