"""RouterActor: finds (or creates) lockspaces, and keeps the table of client connections.

Lockspaces are directories: ``<lock_dir>/<name>`` unless the configuration
maps a name to an explicit directory. A lockspace directory that exists is
adopted on first use, so lockspaces persist across restarts by construction.
The router never follows a symlink for a lockspace directory and never builds
a path from anything but a validated name.

Queries that span the daemon (status, list-leases, inquire, list-lockspaces,
list-clients) are answered by :class:`Gather`: the router collects a snapshot
from every lockspace and replies once all have answered.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import pykka

from actors.events import JournalEntry, LockspaceCreated, ReleaseReason
from actors.faults import crash_point
from actors.journal import Append, Appended, AppendFailed
from actors.lockspace import (
    Done,
    HandOff,
    LeaseFds,
    LeasesLost,
    LockspaceActor,
    ReleaseOwner,
    Snapshot,
    SnapshotTaken,
    TakeSnapshot,
    Unfreeze,
)
from actors.model import Owner, OwnerKey
from actors.runtime import DispatchedActor, Dispatcher, tell_if_alive
from protocol.errors import ErrorCode
from protocol.names import InvalidNameError, check_lockspace_name

log = logging.getLogger(__name__)

LockspaceFiles = Callable[[str], Any]
"""Opens a lockspace directory for lease-file operations (real: lockd.lockfiles.LockspaceDir)."""


@attrs.frozen
class Lookup:
    """Reply :class:`Found` with the lockspace actor, adopting an existing directory."""

    lockspace: str
    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class Found:
    """Reply to :class:`Lookup` / :class:`CreateLockspace`."""

    token: int
    lockspace: str
    ref: pykka.ActorRef[Any] | None
    code: ErrorCode | None = None
    message: str = ""
    created: bool = False


@attrs.frozen
class CreateLockspace:
    """Create a lockspace directory (idempotent) and reply :class:`Found`."""

    lockspace: str
    conn: int
    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class ReleaseOwnerEverywhere:
    """End every lease of ``owner`` in every lockspace; reply :class:`OwnerReleased`."""

    owner: OwnerKey
    conn: int
    reason: ReleaseReason
    token: int
    reply_to: pykka.ActorRef[Any] | None


@attrs.frozen
class OwnerReleased:
    """Reply: the releases journaled, and the lockspaces that could not release (io-error)."""

    token: int
    entries: tuple[JournalEntry, ...]
    failed: tuple[str, ...]


@attrs.frozen
class ClientInfo:
    """What operators see of one client connection."""

    id: int
    pid: int
    uid: int
    admin: bool
    connected_since: float
    owner: Owner | None = None
    restricted: bool = False
    subscribed: bool = False
    """To the event feed (an auditor, say)."""
    name: str = ""
    """What the client called itself in ``hello`` (``lockd-run``, the plugin's
    ``lockd-lock-driver``): which tool a connection is, for ``lockd clients``."""
    ref: pykka.ActorRef[Any] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class ClientChanged:
    """A connection opened or changed (registered, restricted, subscribed)."""

    info: ClientInfo


@attrs.frozen
class ClientGone:
    """A connection closed."""

    id: int


@attrs.frozen
class Gather:
    """Query: reply :class:`Gathered` with a snapshot of every lockspace and the clients.

    ``owner``: only that owner's leases (inquire, the disconnect check), so the
    reply does not grow with every lease on the host. ``scan``: first adopt
    lockspace directories other hosts created (list-lockspaces only: it reads
    the shared lock directory). ``counts_only``: each lockspace's counts, no
    lease views (status, metrics, list-lockspaces, the idle check).
    """

    token: int
    reply_to: pykka.ActorRef[Any]
    owner: OwnerKey | None = None
    scan: bool = False
    counts_only: bool = False


@attrs.frozen
class Gathered:
    """Reply to :class:`Gather`."""

    token: int
    lockspaces: tuple[Snapshot, ...]
    clients: tuple[ClientInfo, ...]
    last_seq: int


@attrs.frozen
class Kick:
    """Ask the router to close client ``client`` (admin disconnect); reply :class:`Kicked`."""

    client: int
    token: int
    reply_to: pykka.ActorRef[Any]
    by: str = ""
    """Who asked (``uid U, pid P``): what the fence of its owner names."""


@attrs.frozen
class Kicked:
    """Reply to :class:`Kick`: found or not."""

    token: int
    found: bool


@attrs.frozen
class CollectFds:
    """Re-exec: reply :class:`AllFds` with every lockspace's lease fds, once each is idle."""

    token: int
    reply_to: pykka.ActorRef[Any]


@attrs.frozen
class AllFds:
    """Reply to :class:`CollectFds`: (lockspace, resource, fd) of every held lease."""

    token: int
    fds: tuple[tuple[str, str, int], ...]


@attrs.frozen
class UseFencer:
    """Leases lockspaces find lost while lockd runs go to ``ref`` (the owners actor) to
    be fenced; not sent under ``lost_lease_policy = "log"``."""

    ref: pykka.ActorRef[Any]


@attrs.frozen
class CloseForAdmin:
    """Sent to a connection: an operator disconnected it."""

    by: str = ""
    """Which operator (``uid U, pid P``)."""


@attrs.define
class _Gathering:
    reply_to: pykka.ActorRef[Any] | None
    token: int
    waiting: int
    snapshots: list[Snapshot] = attrs.field(factory=list)
    entries: list[JournalEntry] = attrs.field(factory=list)
    failed: list[str] = attrs.field(factory=list)


class RouterActor(DispatchedActor):
    """Lockspace registry and client table."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        lock_dir: str,
        journal: pykka.ActorRef[Any],
        open_lockspace: LockspaceFiles,
        explicit: Mapping[str, str] | None = None,
        journal_position: Callable[[], int] | None = None,
        max_lockspaces: int = 4096,
        fd_store: Any = None,
        count_holds: bool = False,
    ) -> None:
        super().__init__(dispatcher)
        self._fd_store = fd_store
        self._count_holds = count_holds
        """``shared_holds = "each"``, for every lockspace (``LockspaceState.count_holds``)."""
        self._fencer: pykka.ActorRef[Any] | None = None
        self._max_lockspaces = max_lockspaces
        self._lock_dir = lock_dir
        self._journal = journal
        self._open = open_lockspace
        self._explicit = dict(explicit or {})
        self._lockspaces: dict[str, pykka.ActorRef[Any]] = {}
        self._clients: dict[int, ClientInfo] = {}
        self._tokens = itertools.count(1)
        self._gatherings: dict[int, _Gathering] = {}
        self._creating: dict[int, CreateLockspace] = {}
        self._collecting: tuple[CollectFds, int, list[tuple[str, str, int]]] | None = None
        self._journal_position = journal_position or (lambda: 0)
        """The seq of the last journal entry (read, not subscribed: no message per append)."""

    def on_stop(self) -> None:
        for ref in self._lockspaces.values():
            ref.stop(block=False)

    def path_of(self, name: str) -> str:
        """Directory of lockspace ``name`` (a validated name, so no traversal)."""
        return self._explicit.get(name) or os.path.join(self._lock_dir, name)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Lookup):
            tell_if_alive(message.reply_to, self._lookup(message.lockspace, message.token))
        elif isinstance(message, CreateLockspace):
            self._create(message)
        elif isinstance(message, (Appended, AppendFailed)):
            self._created(message)
        elif isinstance(message, ReleaseOwnerEverywhere):
            self._release_owner(message)
        elif isinstance(message, Done):
            self._gathered_part(message.token, done=message)
        elif isinstance(message, SnapshotTaken):
            self._gathered_part(message.token, snapshot=message.snapshot)
        elif isinstance(message, Gather):
            self._gather(message)
        elif isinstance(message, ClientChanged):
            self._clients[message.info.id] = message.info
        elif isinstance(message, ClientGone):
            self._clients.pop(message.id, None)
        elif isinstance(message, CollectFds):
            self._collect_fds(message)
        elif isinstance(message, Unfreeze):
            for ref in self._lockspaces.values():
                ref.tell(message)
        elif isinstance(message, LeaseFds):
            self._collected(message)
        elif isinstance(message, UseFencer):
            self._fencer = message.ref
        elif isinstance(message, LeasesLost):
            if self._fencer is not None:
                tell_if_alive(self._fencer, message)
        elif isinstance(message, Kick):
            info = self._clients.get(message.client)
            if info is not None and info.ref is not None:
                tell_if_alive(info.ref, CloseForAdmin(message.by))
            tell_if_alive(message.reply_to, Kicked(message.token, info is not None))
        else:
            return super().on_receive(message)
        return None

    # -- lockspaces -------------------------------------------------------------
    def ensure(self, name: str, conn: int = 0) -> bool:
        """Create lockspace ``name``'s directory if missing (start-up); True if created."""
        path = self.path_of(name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return False
        except OSError as exc:
            # Asked at start-up through a proxy whose answer nobody reads: raised, the
            # error vanished, and the lockspace was just missing, without a word.
            log.error(
                "cannot create lockspace %s at %s: %s; its requests fail until the "
                "directory exists (create-lockspace makes it)",
                name, path, exc.strerror or exc,
            )  # fmt: skip
            return False
        self._journal.tell(Append((LockspaceCreated(name, path, conn),), 0, None))
        return True

    def _lookup(self, name: str, token: int) -> Found:
        ref = self._lockspaces.get(name)
        if ref is not None:
            return Found(token, name, ref)
        path = self.path_of(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            # Where it looked: a lock directory not mounted (yet) reads as a missing lockspace.
            why = (
                f"lockspace {name} does not exist: no directory {path} (create-lockspace "
                f"makes it; or is the lock directory's storage not mounted?)"
            )
            return Found(token, name, None, ErrorCode.NOT_FOUND, why)
        except OSError as exc:
            return Found(token, name, None, ErrorCode.IO_ERROR, f"lockspace {name}: {exc}")
        if not stat.S_ISDIR(st.st_mode):
            kind = (
                "a symbolic link, which lockd never follows"
                if stat.S_ISLNK(st.st_mode)
                else "not a directory"
            )
            return Found(
                token, name, None, ErrorCode.IO_ERROR, f"lockspace {name}: {path} is {kind}"
            )
        if len(self._lockspaces) >= self._max_lockspaces:
            return self._full(name, token)
        try:
            files = self._open(path)
        except OSError as exc:
            return Found(token, name, None, ErrorCode.IO_ERROR, f"lockspace {name}: {exc}")
        ref = LockspaceActor.start(
            self.dispatcher, name, files, self._journal, self._fd_store,
            router=self.actor_ref, count_holds=self._count_holds,
        )  # fmt: skip
        self._lockspaces[name] = ref
        return Found(token, name, ref)

    def _full(self, name: str, token: int) -> Found:
        return Found(
            token,
            name,
            None,
            ErrorCode.IO_ERROR,
            f"lockspace {name}: the daemon serves at most {self._max_lockspaces} lockspaces",
        )

    def _create(self, message: CreateLockspace) -> None:
        path = self.path_of(message.lockspace)
        if len(self._lockspaces) >= self._max_lockspaces:
            # One served already is found; any other is refused for the limit, not
            # looked up: a lookup of a directory not created answers "does not exist",
            # which tells a client that asked to create it nothing.
            served = message.lockspace in self._lockspaces
            found = (
                self._lookup(message.lockspace, message.token)
                if served
                else self._full(message.lockspace, message.token)
            )
            tell_if_alive(message.reply_to, found)
            return
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            tell_if_alive(message.reply_to, self._lookup(message.lockspace, message.token))
            return
        except OSError as exc:
            tell_if_alive(
                message.reply_to,
                Found(message.token, message.lockspace, None, ErrorCode.IO_ERROR, str(exc)),
            )
            return
        crash_point("lockspace-mkdir")
        token = next(self._tokens)
        self._creating[token] = message
        event = LockspaceCreated(message.lockspace, path, message.conn)
        self._journal.tell(Append((event,), token, self.actor_ref))

    def _created(self, message: Appended | AppendFailed) -> None:
        request = self._creating.pop(message.token, None)
        if request is None:
            return  # a start-up creation: nobody waits
        if isinstance(message, AppendFailed):
            # The directory exists but is not journaled; say so rather than pretend.
            tell_if_alive(
                request.reply_to,
                Found(request.token, request.lockspace, None, ErrorCode.IO_ERROR, message.message),
            )
            return
        found = self._lookup(request.lockspace, request.token)
        tell_if_alive(request.reply_to, attrs.evolve(found, created=True))

    # -- fan-out ------------------------------------------------------------------
    def _release_owner(self, message: ReleaseOwnerEverywhere) -> None:
        token = next(self._tokens)
        refs = list(self._lockspaces.values())
        self._gatherings[token] = _Gathering(message.reply_to, message.token, len(refs))
        for ref in refs:
            ref.tell(
                ReleaseOwner(message.owner, message.conn, message.reason, token, self.actor_ref)
            )
        self._maybe_done(token)

    def adopt_all(self) -> None:
        """Start an actor for every lockspace directory there is (others' too: it is shared)."""
        names = set(self._explicit)
        try:
            with os.scandir(self._lock_dir) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        names.add(entry.name)
        except OSError as exc:
            log.error("cannot list lock directory %s: %s", self._lock_dir, exc)
        for name in sorted(names - set(self._lockspaces)):
            try:
                check_lockspace_name(name)
            except InvalidNameError:
                continue  # not ours to serve: never build a path from an invalid name
            self._lookup(name, 0)

    def _collect_fds(self, message: CollectFds) -> None:
        self._collecting = (message, len(self._lockspaces), [])
        for ref in self._lockspaces.values():
            ref.tell(HandOff(message.token, self.actor_ref))
        if not self._lockspaces:
            tell_if_alive(message.reply_to, AllFds(message.token, ()))

    def _collected(self, part: LeaseFds) -> None:
        assert self._collecting is not None
        request, waiting, fds = self._collecting
        fds.extend((part.lockspace, resource, fd) for resource, fd in part.fds)
        waiting -= 1
        self._collecting = (request, waiting, fds)
        if waiting == 0:
            tell_if_alive(request.reply_to, AllFds(request.token, tuple(fds)))

    def _gather(self, message: Gather) -> None:
        if message.scan:
            self.adopt_all()
        token = next(self._tokens)
        refs = list(self._lockspaces.values())
        self._gatherings[token] = _Gathering(message.reply_to, message.token, len(refs))
        for ref in refs:
            ref.tell(TakeSnapshot(token, self.actor_ref, message.owner, message.counts_only))
        self._maybe_done(token, query=True)

    def _gathered_part(
        self, token: int, *, done: Done | None = None, snapshot: Snapshot | None = None
    ) -> None:
        gathering = self._gatherings[token]
        gathering.waiting -= 1
        if snapshot is not None:
            gathering.snapshots.append(snapshot)
        if done is not None:
            gathering.entries.extend(done.entries)
            if done.refusal is not None:
                gathering.failed.append(done.lockspace)
        self._maybe_done(token, query=snapshot is not None)

    def _maybe_done(self, token: int, *, query: bool = False) -> None:
        gathering = self._gatherings[token]
        if gathering.waiting:
            return
        del self._gatherings[token]
        if gathering.reply_to is None:
            return
        if query:
            tell_if_alive(
                gathering.reply_to,
                Gathered(
                    gathering.token,
                    tuple(sorted(gathering.snapshots, key=lambda s: s.name)),
                    tuple(sorted(self._clients.values(), key=lambda c: c.id)),
                    self._journal_position(),
                ),
            )
        else:
            tell_if_alive(
                gathering.reply_to,
                OwnerReleased(gathering.token, tuple(gathering.entries), tuple(gathering.failed)),
            )
