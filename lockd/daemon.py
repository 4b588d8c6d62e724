"""``lockd serve``: the lock actors, the journal and the sockets, on one dispatcher.

:class:`LockSystem` assembles the actors around a journal directory and a
lock directory; :class:`Daemon` adds the listening sockets, signals, the pid
file and the idle timeout. Stopping (SIGTERM, SIGINT) releases nothing and
signals no owner: the journal records ``daemon-stopped`` and the process
exits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import FrameType
from typing import Any

import attrs
import pykka

from actors import faults
from actors.connection import ConnectionActor, HandedOver, ServerInfo
from actors.events import ConfigReloaded, DaemonStarted, DaemonStopped
from actors.journal import Append, JournalActor, Openings, WriteTrouble
from actors.metrics import REGISTRY
from actors.model import Owner
from actors.owners import OwnersActor
from actors.recovery import RecoveryActor, RecoveryReport
from actors.recovery_core import ReplayState
from actors.router import Gather, Gathered, RouterActor, UseFencer
from actors.runtime import ActorCrashedError, DispatchedActor, Dispatcher
from lockd import build, fork_guard, logs, procs
from lockd.autospawn import PACKAGE_ROOT
from lockd.config import (
    Config,
    ConfigError,
    UnsafePathError,
    make_dirs,
    open_own_file,
    secure_runtime_dir,
    socket_gid,
)
from lockd.journal_file import (
    BOOT_FILE,
    LOCK_FILE,
    FileJournal,
    journal_holder,
    last_boot,
    lock_journal,
    new_epoch,
    read_epoch,
    record_boot,
)
from lockd.journal_format import JournalCorruptError
from lockd.lockfiles import LockspaceDir, holds_lock, unlock
from lockd.reexec import (
    LOCKSPACES,
    PATH_KEYS,
    Handoff,
    ListenerFd,
    ReexecActor,
    paths_of,
    read_handoff,
    settings_of,
)
from lockd.replay import replay
from lockd.server import (
    FdReserve,
    Listener,
    SocketTransport,
    bind_unix,
    conn_ids,
    peer_credentials,
    refusals,
    refuse,
    refuse_if_served,
    set_socket_access,
)
from lockd.snapshot import STOP_WAIT_S, SnapshotWriter, load_newest
from lockd.systemd import (
    SEND_TIMEOUT,
    FdStore,
    StoreNames,
    is_lease_fd_name,
    lease_fd_name,
    listen_fds,
)  # fmt: skip
from lockd.systemd import notify as sd_notify
from protocol.errors import ErrorCode
from protocol.names import WELL_KNOWN_LOCKSPACES

log = logging.getLogger("lockd")


ACTIVATION_NAMES = ("lockd.socket", "lockd-admin.socket")
"""FileDescriptorName= of the client and admin sockets in contrib/systemd."""


class JournalInUseError(RuntimeError):
    """Another daemon (or embedded system) writes this journal directory."""


class PidFileLockedError(RuntimeError):
    """Another daemon holds the lock on the configured pid file."""


class StoredLeasesUnknownError(RuntimeError):
    """The service manager's fd store holds leases' locks, and the journal is empty."""


class UnsafeJournalDirError(UnsafePathError, PermissionError):
    """A journal directory other users could write a journal of their own in (it, or a
    directory above it)."""


class UnwritableLockDirError(PermissionError):
    """A lock directory this uid cannot make lockspaces in."""


class _ProcessInfo:
    """Registration's view of /proc."""

    @staticmethod
    def start_time(pid: int) -> int | None:
        return procs.start_time(pid)

    @staticmethod
    def uid_of(pid: int) -> int | None:
        return procs.uid_of(pid)

    @staticmethod
    def leader_of(pid: int) -> int | None:
        return procs.leader_of(pid)

    @staticmethod
    def is_gone(owner: Owner) -> bool:
        return procs.is_exiting(owner.pid, owner.start_time)


def _log_control(level: str | None, filters: str | None) -> dict[str, str]:
    """The admin socket's ``set-log``: change level and filters now; returns what is in force.

    Without either it only shows them (``lockd log-level``), and logs nothing."""
    state = logs.current()
    if level is None and filters is None:
        return state
    if filters is not None:
        logs.check_modules(filters)
    logs.configure(
        level or state["level"],
        state["filters"] if filters is None else filters,
        logs.asked_output(),
    )
    result = logs.current()
    log.info("logging set on the admin socket: %s", logs.describe(result))
    return result


PIDFD_SHARE = 8
"""One descriptor in this many may be an owner's pidfd (see :class:`Daemon`)."""
FD_RESERVE = 2
"""Spare descriptors kept per listening socket, so that each still accepts when leases
fill the fd limit: an operator's ``lockd status``, a manager's release (which frees
descriptors)."""


@attrs.frozen
class _Replayed:
    """What start-up read from the journal directory."""

    journal_file: FileJournal
    state: ReplayState
    replayed: int
    snapshot_seq: int | None
    boot: bytes | None
    before: bytes | None
    """The boot the journal was last started in."""


def _read_journal(config: Config, journal_lock: int | None) -> _Replayed:
    """The newest snapshot and the journal after it, folded; raises on damage."""
    snapshot = load_newest(config.journal_dir)
    # Read now: replay folds the journal into the snapshot's own state, so after it
    # snapshot.seq is the journal's end, and the log named a snapshot that is not on
    # disk (after a cut, one seemingly newer than the cut).
    snapshot_seq = snapshot.seq if snapshot else None
    boot = procs.boot_id()
    if boot is None:
        # Said, not silently left out: a host's reboot is then told only by owners'
        # start times, which a process of the next boot can have again, pid and all.
        log.warning(
            "cannot read this boot's id (%s): owners are journaled without it, and after a "
            "reboot one could be taken for a new process with the same pid and start time "
            "(/proc mounted with subset=pid, as systemd's ProcSubset=pid does?)",
            procs.BOOT_ID_PATH,
        )
    before = last_boot(config.journal_dir)
    journal_file = FileJournal(
        config.journal_dir,
        config.journal_segment_bytes,
        retain_segments=config.journal_retain_segments,
        first_seq=snapshot.seq + 1 if snapshot else 1,
        # Written in another boot: damage in the newest segment is what the host's
        # crash left of writes not yet synced, cut rather than refused.
        # Never for a journal a re-exec hands on: it was written in this boot.
        cut_damage=(
            journal_lock is None and before is not None and boot is not None and before != boot
        ),
    )
    state, replayed = replay(journal_file, snapshot)
    return _Replayed(journal_file, state, replayed, snapshot_seq, boot, before)


class LockSystem:
    """The actor system without sockets: what the daemon serves and an orchestrator embeds."""

    def __init__(
        self,
        config: Config,
        dispatcher: Dispatcher | None = None,
        *,
        adopted: Mapping[tuple[str, str], int] | None = None,
        stored: Sequence[tuple[str, int]] | None = None,
        handed_names: StoreNames | None = None,
        on_ready: Callable[[RecoveryReport], None] | None = None,
        max_pidfds: int | None = None,
        journal_lock: int | None = None,
        serving_since: float | None = None,
        holder: str = "embedded",
        controls_logging: bool = True,
    ) -> None:
        """``max_pidfds``: owners watched by pidfd at most (the rest are polled), see
        :class:`actors.owners.OwnersActor`; None for no budget. ``journal_lock``: the
        journal directory's lock, still held, from the program before a re-exec.
        ``serving_since``: when the process started, before re-execs (monotonic).
        ``controls_logging``: False in a program that embeds it, whose logging is its own:
        ``set-log`` on the admin socket is refused (it replaced the program's handlers)."""
        self.config = config
        self._log_control = _log_control if controls_logging else None
        self.started = time.monotonic()
        self.serving_since = self.started if serving_since is None else serving_since
        """What ``status`` counts uptime from: the pid's, so a re-exec is no restart."""
        self.ready = threading.Event()
        """Set once recovery is done and requests are served."""
        self.report: RecoveryReport | None = None
        self._on_ready = on_ready
        # The journal directory first: refused, it leaves no lock directory made.
        make_dirs(config.journal_dir, 0o700)
        check_journal_dir(config.journal_dir)
        make_dirs(config.lock_dir, 0o700)
        refuse_unwritable_lock_dir(config.lock_dir)
        _warn_if_others_write(config.lock_dir)
        self.journal_lock = self._lock_journal_dir(config.journal_dir, journal_lock, holder)
        self._journal_open = True
        """The fd whose flock keeps every other lockd out of this journal directory."""
        try:
            read = _read_journal(config, journal_lock)
            _refuse_an_empty_journal_for(stored or (), read.state, config.journal_dir)
        except BaseException:
            # Refused (a damaged journal): a program that goes on (embedding) must be
            # able to repair it (journal-check --repair) and start again, which the
            # lock left held refused, naming this very program as the lockd using it.
            fork_guard.close(self.journal_lock)
            self._journal_open = False
            raise
        self.journal_file = read.journal_file
        state, replayed, snapshot_seq, boot = (
            read.state,
            read.replayed,
            read.snapshot_seq,
            read.boot,
        )
        self.dispatcher = dispatcher or Dispatcher()  # only now: nothing to leak before
        # The journal's timeline (see lockd.journal_file.EPOCH_FILE), told to subscribers.
        self.epoch = read_epoch(config.journal_dir) or new_epoch(config.journal_dir, 1)
        if boot is not None and read.before != boot:
            _record_boot(config.journal_dir, boot)
        self.fd_store = FdStore()
        adopted = self._pair_stored(state, dict(adopted or {}), list(stored or ()), handed_names)
        log.info(
            "journal replayed to seq %d (%s, %d entries after it): %d leases held by %d owners",
            state.seq,
            "no snapshot" if snapshot_seq is None else f"snapshot at {snapshot_seq}",
            replayed,
            len(state.leases),
            len(state.owners()),
        )
        d = self.dispatcher
        self.snapshots = SnapshotWriter(config.journal_dir, d)
        # The journal's refused writes (for status), and the live connections'
        # connection-opened records it keeps (a re-exec hands on where each is).
        self.journal_trouble, self.journal_openings = WriteTrouble(), Openings()
        self.journal = JournalActor.start(
            d, self.journal_file, sync=config.journal_sync, state=state, snapshots=self.snapshots,
            trouble=self.journal_trouble, openings=self.journal_openings,
        )  # fmt: skip
        self.router = RouterActor.start(
            d,
            lock_dir=config.lock_dir,
            journal=self.journal,
            open_lockspace=LockspaceDir,
            explicit=config.lockspaces,
            journal_position=lambda: self.journal_file.next_seq - 1,
            max_lockspaces=config.max_lockspaces,
            fd_store=self.fd_store,
            count_holds=config.shared_holds == "each",
        )
        processes = procs.ProcTable()
        self.owners = OwnersActor.start(
            d,
            processes=processes,
            router=self.router,
            journal=self.journal,
            grace=config.fence_grace,
            max_pidfds=max_pidfds,
            signals_as=None if os.geteuid() == 0 else os.geteuid(),
        )
        if config.lost_lease_policy == "fence":
            self.router.tell(UseFencer(self.owners))
        started = DaemonStarted(build.version(), os.getpid(), config.allowed_uids)
        self.journal.tell(Append((started,), 0, None))
        router = self.router.proxy()
        for name in WELL_KNOWN_LOCKSPACES:
            router.ensure(name)
        router.adopt_all()  # serve every lockspace directory there is, from the start
        self.info = ServerInfo(
            build.version(), os.getpid(), self.serving_since, socket.gethostname(), procs.fd_limit,
            boot, self.epoch, self.journal_trouble, os.path.abspath(config.journal_dir),
        )  # fmt: skip
        RecoveryActor.start(
            d,
            state=state,
            router=self.router,
            owners=self.owners,
            journal=self.journal,
            processes=processes,
            on_done=self._recovered,
            adopted=adopted,
            fence_lost=config.lost_lease_policy == "fence",
            started=self.started,
            boot_time=procs.boot_time(),
            boot=boot,
            fd_store=self.fd_store,
            release_fd=LockspaceDir.release_fd,
        )

    def _pair_stored(
        self,
        state: ReplayState,
        adopted: dict[tuple[str, str], int],
        stored: list[tuple[str, int]],
        handed_names: StoreNames | None,
    ) -> dict[tuple[str, str], int]:
        """The lease fds recovery adopts: a re-exec's, then the fd store's for the rest.

        A stored fd is a lease's by its name in an earlier build's store (a hash of the
        lease), else by the file it is open on. A stored fd of a lease the re-exec
        handed over too is closed (the handoff's is the same lock); of two for one lease,
        the one holding the lock is kept; one of a lease the journal does not hold is
        removed from the store. ``handed_names``: the store's names a re-exec handed on
        (None: a re-exec from an earlier build, whose leases are under hashed names)."""
        found: dict[tuple[str, str], list[tuple[str, int]]] = {}
        # Only for a store that hands fds back: a start without one (no service
        # manager, an empty store) pays nothing per lease here.
        by_file = _lease_files(self.config, state.leases.keys() if stored else ())
        by_hash = (
            {lease_fd_name(*key): key for key in state.leases}
            if any(name.startswith("lease-") for name, _ in stored)
            else {}
        )
        unmatched: list[tuple[str, int]] = []
        for name, fd in stored:
            key = by_hash.get(name) if name.startswith("lease-") else by_file(fd)
            if key is None:
                unmatched.append((name, fd))
            else:
                found.setdefault(key, []).append((name, fd))
        names: dict[tuple[str, str], str] = {}
        for key, fds in found.items():
            if len(fds) > 1:
                # The one holding the lock: the other can be a stale copy from an
                # earlier hold of the lease, or of the file a relink replaced (its
                # FDSTOREREMOVE lost), unlocked, and closing the holder would free the
                # lease until recovery.
                log.warning("fd store returned %s for %s/%s; closing the extra fd",
                            " and ".join(name for name, _ in fds), *key)  # fmt: skip
                fds.sort(key=lambda item: not _holds_the_lock(item[1]))
            if key in adopted:  # the re-exec handed over this lease's fd already
                for _, fd in fds:
                    os.close(fd)
                continue
            names[key], adopted[key] = fds.pop(0)
            for name, fd in fds:
                if name == names[key]:
                    os.close(fd)  # the same name: dropped with the one kept, in time
                else:  # not unlocked: the same lock as the one kept, maybe
                    self.fd_store.forget(name, fd, unlock_first=False)
        leases_names = set(names.values())
        for name, fd in unmatched:
            if name in leases_names:
                # A stale copy under a lease's name (of the file a relink replaced, its
                # FDSTOREREMOVE lost): removing it would drop the lease's fd as well.
                log.warning("fd store: an fd under %s is not its lease's; closing it", name)
                self.fd_store.held([name])
                with contextlib.suppress(OSError):
                    unlock(fd)
                os.close(fd)
            else:
                log.info("fd store: %s belongs to no held lease; removing it", name)
                self.fd_store.forget(name, fd)
        if handed_names is None:
            names.update((key, names.get(key) or lease_fd_name(*key)) for key in adopted)
        else:
            handed, others = handed_names
            names.update(((ls, res), name) for ls, res, name in handed if (ls, res) in adopted)
            ended = [name for ls, res, name in handed if (ls, res) not in adopted]
            self.fd_store.held([*others, *ended])
        for key in adopted.keys() & names.keys():  # recovery removes one of no held lease
            self.fd_store.kept(*key, names[key])
        return adopted

    def _recovered(self, report: RecoveryReport) -> None:
        self.report = report
        self.ready.set()
        if self._on_ready is not None:
            self._on_ready(report)

    @staticmethod
    def _lock_journal_dir(directory: str, inherited: int | None, holder: str) -> int:
        path = os.path.join(directory, LOCK_FILE)
        kept = _if_still(path, inherited)
        if kept is not None:
            fcntl.flock(kept, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held already, by its description
            return kept
        fd = lock_journal(directory, holder)
        if fd is None:
            who = journal_holder(directory)
            raise JournalInUseError(
                f"journal {directory} is in use by another lockd" + (f" ({who})" if who else "")
            )
        return fork_guard.remember(fd)

    def connect(
        self,
        transport: Any,
        *,
        admin: bool = False,
        conn_id: int | None = None,
        restored: HandedOver | None = None,
        on_stopped: Callable[[int, pykka.ActorRef[Any]], None] | None = None,
        idle_timeout: float | None = None,
    ) -> pykka.ActorRef[Any]:
        """Start a ConnectionActor for ``transport`` (see actors.connection.Transport).

        ``idle_timeout``: close it if it neither registers nor subscribes in that many
        seconds (0: never; None: the configuration's ``idle_timeout``)."""
        return ConnectionActor.start(
            self.dispatcher,
            conn_id=next(conn_ids) if conn_id is None else conn_id,
            restored=restored,
            transport=transport,
            router=self.router,
            owners=self.owners,
            journal=self.journal,
            processes=_ProcessInfo(),
            info=self.info,
            admin=admin,
            log_control=self._log_control,
            idle_timeout=self.config.idle_timeout if idle_timeout is None else idle_timeout,
            on_stopped=on_stopped,
        )

    def shutdown(self, reason: str) -> None:
        """Journal the stop and close the journal; leases are not released. Loop thread only."""
        self.journal.tell(Append((DaemonStopped(reason),), 0, None))
        self.dispatcher.run_until_idle(poll_io=False)
        self.snapshots.wait(STOP_WAIT_S)  # a snapshot being written is finished, not orphaned
        self.journal_file.close()
        fork_guard.close(self.journal_lock)
        self._journal_open = False

    def abandon(self) -> None:
        """A start given up before the dispatcher ran anything (a program that goes on):
        close the journal, its lock and the dispatcher; no actor has opened anything."""
        self.journal_file.close()
        fork_guard.close(self.journal_lock)
        self._journal_open = False
        self.dispatcher.close()

    def close(self) -> None:
        """After :meth:`shutdown`, for a program that runs on (embedding): stop every actor,
        which closes each lease fd, lockspace directory fd and pidfd, then the dispatcher.

        The daemon's exit closes them all the same: the kernel locks drop, the journal
        keeps the leases, and the next start takes them again. Left open in a program
        that starts the lock system again, they were that start's own conflict: each
        lease recorded ``lease-lost`` and its running owner fenced. Loop thread only.

        Also after an actor's crash, which ended the loop and perhaps :meth:`shutdown`
        half way (its journal lock left held, a start again in the program was refused
        as "in use by another lockd", naming the program): the crash stays in
        ``dispatcher.crashes`` for the caller, and any that stopping meets is logged.
        """
        d = self.dispatcher
        crashes = list(d.crashes)
        d.crashes.clear()
        try:
            for _ in range(3):  # another actor crashing meanwhile: stop what is left again
                d.stop_all()
                try:
                    d.run_until_idle(poll_io=False)
                    break
                except ActorCrashedError as exc:
                    log.error("an actor failed while the lock system stopped: %r", exc.__cause__)
                    d.crashes.clear()
        finally:
            d.crashes[:0] = crashes
            if self._journal_open:
                self.journal_file.close()
                fork_guard.close(self.journal_lock)
                self._journal_open = False
            d.close()


class _IdleWatch(DispatchedActor):
    """Stops the daemon after ``timeout`` seconds with no clients and no leases."""

    def __init__(
        self, dispatcher: Dispatcher, router: pykka.ActorRef[Any], timeout: float, stop: Any
    ) -> None:
        super().__init__(dispatcher)
        self._router = router
        self._timeout = timeout
        self._request_stop = stop
        self._idle_since: float | None = None

    def on_start(self) -> None:
        self._schedule()

    def _schedule(self) -> None:
        ref = self.actor_ref
        self.dispatcher.call_later(
            min(1.0, self._timeout), lambda: self._router.tell(Gather(0, ref, counts_only=True))
        )

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Gathered):
            busy = message.clients or any(
                s.counts is not None and s.counts.leases for s in message.lockspaces
            )
            now = time.monotonic()
            if busy:
                self._idle_since = None
            elif self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since >= self._timeout:
                log.info("idle for %.0f s with no clients and no leases: exiting", self._timeout)
                self._request_stop("idle timeout")
                return None
            self._schedule()
            return None
        return super().on_receive(message)


class UnclaimedSocketError(OSError):
    """The service manager passed a socket lockd does not serve."""


def _passed_fds() -> tuple[dict[str, int], list[tuple[str, int]]]:
    """The fds the service manager passed, by name: the activated sockets, and the lease
    fds its fd store gives back; any other is refused and closed. A refused socket stops
    the start (:class:`UnclaimedSocketError`), as virtlockd's "Some activation file
    descriptors are unclaimed": served on paths of its own meanwhile, lockd left every
    client of that socket waiting in its backlog (the manager keeps it listening)."""
    activated: dict[str, int] = {}
    stored: list[tuple[str, int]] = []
    unclaimed: list[str] = []
    for name, fd in listen_fds():
        if is_lease_fd_name(name):
            stored.append((name, fd))
        elif name in ACTIVATION_NAMES and name not in activated:
            activated[name] = fd
        else:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    unclaimed.append(name)
            log.error("refusing an fd named %r from the service manager: not ours", name)
            os.close(fd)
    if unclaimed:
        names = ", ".join(repr(name) for name in unclaimed)
        raise UnclaimedSocketError(
            errno.EINVAL,
            f"socket activation passed a socket lockd does not serve ({names}): lockd "
            f"serves one socket named {ACTIVATION_NAMES[0]} and one named "
            f"{ACTIVATION_NAMES[1]} (FileDescriptorName= of the socket units, one "
            "ListenStream= each); not started, rather than leave that socket's clients "
            "waiting",
        )
    return activated, stored


def _lease_files(
    config: Config, held: Iterable[tuple[str, str]]
) -> Callable[[int], tuple[str, str] | None]:
    """Which of the ``held`` leases a stored fd is, by the file it is open on: the
    lease file's name is the resource, its directory the lockspace's (as configured,
    or through the symlinks on the way to it; else the file that name links now, a
    directory reached another way, a bind mount). None: no held lease's file (the file
    a relink replaced, one deleted, one of a lease that ended while lockd was down).

    The directories are resolved once per lockspace, not per lease: a ``realpath`` per
    lease took a restart with 16,384 leases from 0.9 to 1.4 s of recovery."""
    leases = set(held)
    dirs: dict[str, str] = {}
    lockspace_at: dict[str, str] = {}
    for lockspace in {lockspace for lockspace, _ in leases}:
        path = dirs[lockspace] = config.lockspaces.get(lockspace) or os.path.join(
            config.lock_dir, lockspace
        )
        for directory in (os.path.normpath(path), os.path.realpath(path)):
            lockspace_at[directory] = lockspace

    def lease_of(fd: int) -> tuple[str, str] | None:
        try:
            directory, name = os.path.split(os.readlink(f"/proc/self/fd/{fd}"))
            lockspace = lockspace_at.get(directory)
            if lockspace is not None and (lockspace, name) in leases:
                return lockspace, name
            opened = os.fstat(fd)
        except OSError:
            return None
        for lockspace, path in dirs.items():
            if (lockspace, name) not in leases:
                continue
            try:
                now = os.stat(os.path.join(path, name), follow_symlinks=False)
            except OSError:
                continue
            if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
                return lockspace, name
        return None

    return lease_of


def _holds_the_lock(fd: int) -> bool:
    """Whether a lease fd handed back by the fd store is the one locking its file."""
    try:
        return holds_lock(fd)
    except OSError:
        return False


def _if_still(path: str, inherited: int | None) -> int | None:
    """An fd handed over by a re-exec, if it is still the file at ``path``; else it is
    closed (the configuration names another file now, or none) and None is returned."""
    if inherited is None:
        return None
    try:
        if os.path.samestat(os.fstat(inherited), os.stat(path)):
            return inherited
    except OSError:
        pass
    os.close(inherited)
    return None


def _secure_socket_dirs(config: Config, activated: Mapping[str, int], *, binding: bool) -> None:
    """Before anything starts: sockets go in the per-user runtime directory only if that is
    the user's own (made 0700 when missing), never in one another user made or can write
    to (:func:`lockd.config.secure_runtime_dir`). ``binding``: False when no socket is
    bound (embedded, or a re-exec's, bound already); activated sockets are the service
    manager's. A socket another daemon serves is refused here, before anything is
    made."""
    if not binding:
        return
    for name, path in (("lockd.socket", config.socket),
                       ("lockd-admin.socket", config.admin_socket)):  # fmt: skip
        if name not in activated:
            secure_runtime_dir(path, create=True)
            refuse_if_served(path)  # before a journal is made or written


def _reapply_socket_access(path: str, config: Config) -> None:
    """After a re-exec, give the client socket this daemon bound the configuration's
    ``socket_mode`` and ``socket_group`` (changed since, they apply now, as the other
    keys do). A failure is logged, never raised: it would end the daemon, every lock
    with it, while the socket serves on as it was."""
    try:
        set_socket_access(path, int(config.socket_mode, 8), socket_gid(config.socket_group))
    except (OSError, ConfigError) as exc:
        log.warning("re-exec: socket_mode and socket_group not applied to %s: %s", path, exc)


def _collector_off_for_recovery() -> None:
    """Start-up recovery builds the state the daemon will keep: keep the collector out of it.

    The cyclic collector runs whenever allocations outnumber frees, and
    recovery allocates little else than what it keeps: at 16,384 leases and
    a million events of history, 717 collections took 300-375 ms of a
    1.1 s recovery and found nothing to free (measured). Start-up garbage
    (imports, the command line) is collected first, while the heap is small.
    """
    gc.collect()
    gc.disable()


FULL_COLLECTION_AFTER = 100
"""Generation-1 collections before a full one is considered (Python's default: 10)."""


def _collector_on_after_recovery() -> None:
    """Freeze what recovery built, then collect, rarely walking the whole heap.

    Frozen objects are skipped by every later collection (a full one over
    the restored state would stall requests 40-60 ms per 16,384 leases);
    they are still freed by reference counting when their lease
    ends. Acquire, release and whole client connections make no reference
    cycles (tests keep them so), so the young collections free what little
    cyclic garbage there is, and a full collection walks the live state for
    nothing while every request waits: measured in-process, Python's default
    ran 5 of them (up to 89 ms each) over a 16,000-lease fill and 60,000
    pairs after it, and ``FULL_COLLECTION_AFTER`` none.
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)
    gc.enable()


def _record_boot(directory: str, boot: bytes) -> None:
    """Say beside the journal that a daemon started on it in this boot."""
    try:
        record_boot(directory, boot)
    except OSError as exc:
        # A full disk must not stop the start. Left naming the previous boot, the file
        # would let a later start in this boot cut real damage.
        log.error("cannot record this boot beside the journal (%s)", exc)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, BOOT_FILE))


def _import_from_here() -> None:
    """Make ``python -m lockd``, which a re-exec runs, import lockd from where this
    program did, not from the daemon's current directory.

    The exec keeps the directory the daemon was started in, and ``-m`` puts it first on
    the import path: a ``lockd`` directory there (a checkout cloned as ``~/lockd``,
    whose packages are one level down) was taken for the package, and the re-exec died
    with an ImportError; another build's package there would be run in its place.
    ``PYTHONSAFEPATH`` leaves the directory out; ``PYTHONPATH`` names where this
    program's lockd is, unless the interpreter finds it there anyway (site-packages,
    which on ``PYTHONPATH`` would come before the standard library); an upgrade in
    place is what a re-exec is for.
    """
    here = PACKAGE_ROOT
    os.environ["PYTHONSAFEPATH"] = "1"
    if here in sys.path[1:]:
        return  # found there anyway (site-packages): not put before the standard library
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *rest])


class Daemon:
    """``lockd serve``: a LockSystem behind its sockets."""

    def __init__(
        self,
        config: Config,
        overridden: frozenset[str] = frozenset(),
        handoff: Handoff | None = None,
        *,
        sockets: bool = True,
        embedded: bool = False,
    ) -> None:
        """``sockets=False``: no listening sockets (embedding). ``embedded``: a guest in
        another program, so leave its fd limit and service-manager fds alone."""
        self.config = config
        self._overridden = overridden
        """Settings given on the command line: a reload of the file does not change them."""
        self._handoff = handoff
        self._embedded = embedded
        self._pid_fd = self._write_pid_file(handoff.pid_file if handoff else None)
        """The locked pid file (inherited across a re-exec): taken before anything else, so
        a daemon refused for it has replayed, journaled and bound nothing."""
        # What a failure below must undo, as far as it got.
        self._bound: set[str] = set()
        """The listeners' socket files this daemon created: removed when it stops. Not
        those of socket activation, which belong to the service manager (its socket
        units keep listening on them across a stop)."""
        self._spares: dict[bool, FdReserve] = {}
        system: LockSystem | None = None
        try:
            if not embedded:  # the collector is the host program's business
                _collector_off_for_recovery()
            limit = procs.raise_fd_limit() if not embedded else 0
            adopted = {(ls, res): fd for ls, res, fd in handoff.leases} if handoff else None
            activated, stored = _passed_fds() if not embedded else ({}, [])
            _secure_socket_dirs(config, activated, binding=sockets and handoff is None)
            # An eighth of the descriptors for owner pidfds: leases cannot exist
            # without their fd, owners beyond this are polled (16,384 leases and
            # 4,096 owners then fit in 20,000 fds; 65,536 pidfds under the unit's
            # LimitNOFILE).
            self.system = system = LockSystem(
                config,
                adopted=adopted,
                stored=stored,
                handed_names=handoff.fd_names if handoff else None,
                on_ready=self._serve,
                max_pidfds=limit // PIDFD_SHARE if limit else None,
                journal_lock=handoff.journal_lock if handoff else None,
                serving_since=handoff.started if handoff else None,
                # Written beside the journal: a second daemon refused names the socket this
                # one serves (a mistyped LOCKD_SOCKET shows at once).
                holder=f"serving {config.socket}" if sockets else "embedded",
                controls_logging=not embedded,
            )
            if handoff is not None:
                self._carry_on(handoff)
            self.dispatcher = self.system.dispatcher
            self._serving_status: str | None = None
            """STATUS= while serving (the start's counts); None until READY."""
            system.journal_trouble.on_change = self._journal_trouble_changed
            self._clients = 0
            self._admin_clients = 0
            self._connections: dict[int, pykka.ActorRef[Any]] = {}
            self._sockets: dict[int, SocketTransport] = {}
            """Client sockets open, by connection id: hung up by an embedded stop."""
            self._stop_reason = ""
            self._reexecing = False
            # By listener, admin or not: closed only by exit (O_CLOEXEC: not by a re-exec).
            self._spares = {
                admin: FdReserve(FD_RESERVE if sockets else 0) for admin in (False, True)
            }
            self.listeners: list[Listener] = (
                self._listen(config, handoff, activated) if sockets else []
            )
            self._settings_said(handoff)
            log.debug("file descriptor limit: %d", limit)
            if config.timeout > 0:
                _IdleWatch.start(
                    self.dispatcher, self.system.router, config.timeout, self.request_stop
                )
        except BaseException:
            for path in self._bound:  # a socket bound before the failure
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if embedded and system is not None:  # the program goes on, may start again
                system.abandon()
            for spares in self._spares.values():  # a listener's bind failed
                spares.close()
            self._drop_pid_file()
            raise

    def _listen(
        self, config: Config, handoff: Handoff | None, activated: dict[str, int]
    ) -> list[Listener]:
        """The two listeners: handed over by a re-exec, from socket activation, or bound
        here (only those are this daemon's files to remove when it stops)."""
        allowed = {os.getuid(), *config.allowed_uids}
        # The admin socket is the daemon's own uid's only: a disconnect there fences any
        # VM, which an auditor's uid in allowed_uids must never do (should a socket mode
        # let it reach that socket).
        admins = {os.getuid()}
        if handoff is not None:
            # Past every connection handed over, whatever the handoff's counter says.
            conn_ids.next = max(
                [handoff.next_conn_id, *(c.conn_id + 1 for c in handoff.connections)]
            )
            self._bound = set(
                handoff.bound if handoff.bound is not None else (i.path for i in handoff.listeners)
            )
            for item in handoff.listeners:
                if not item.admin and item.path in self._bound:
                    _reapply_socket_access(item.path, config)
            return [
                Listener(self.dispatcher, socket.socket(fileno=item.fd), admin=item.admin,
                         allowed_uids=admins if item.admin else allowed, on_accept=self._accept,
                         reserve=self._spares[item.admin])
                for item in handoff.listeners
            ]  # fmt: skip

        def listening(
            name: str, path: str, mode: int = 0o600, group: int | None = None
        ) -> socket.socket:
            fd = activated.get(name)
            if fd is not None:
                return socket.socket(fileno=fd)
            bound = bind_unix(path, mode=mode, group=group)
            self._bound.add(path)
            return bound

        # socket_mode and socket_group are the client socket's: the admin socket serves
        # the daemon's own uid only, so it stays 0600.
        client = listening("lockd.socket", config.socket, int(config.socket_mode, 8),
                           socket_gid(config.socket_group))  # fmt: skip
        return [
            Listener(self.dispatcher, client, admin=False, allowed_uids=allowed,
                     on_accept=self._accept, reserve=self._spares[False]),
            Listener(self.dispatcher, listening("lockd-admin.socket", config.admin_socket),
                     admin=True, allowed_uids=admins, on_accept=self._accept,
                     reserve=self._spares[True]),
        ]  # fmt: skip

    def _serve(self, report: RecoveryReport) -> None:
        """Recovery is done: accept the connections waiting in the backlog, tell systemd."""
        if not self._embedded:
            _collector_on_after_recovery()
        if self._handoff is not None:
            for state in self._handoff.connections:
                self._adopt_connection(state)
            log.info("re-exec: took over %d client connections", len(self._handoff.connections))
            self._handoff = None
        for listener in self.listeners:
            listener.start()
        self._start_watchdog()
        self._serving_status = (
            f"serving; recovery held {report.held}, released {report.released}, "
            f"lost {report.lost} leases"
        )
        sd_notify(f"READY=1\nSTATUS={self._status()}")

    def _status(self) -> str:
        """What ``systemctl status`` shows while serving: the start's counts, and while the
        journal refuses writes, that (the counts alone stood through a full disk)."""
        trouble = self.system.journal_trouble
        if trouble.error is None:
            return self._serving_status or "serving"
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(trouble.since))
        return (
            f"serving, but every change is refused (io-error): journal cannot be written "
            f"since {since}: {trouble.error}"
        )

    def _journal_trouble_changed(self) -> None:
        if self._serving_status is not None:  # before READY, READY says it
            sd_notify(f"STATUS={self._status()}")

    def _accept(self, sock: socket.socket, peer: tuple[int, int, int], admin: bool) -> None:
        # The admin socket has its own small budget: clients filling the client
        # table must never lock the operator out (virtlockd: admin_max_clients).
        count, limit, key = (
            (self._admin_clients, self.config.admin_max_clients, "admin_max_clients")
            if admin
            else (self._clients, self.config.max_clients, "max_clients")
        )
        if count >= limit:
            refusals.warn(
                log, key, "refused a connection from pid %d: %s (%d) reached", peer[0], key, limit,
                dispatcher=self.dispatcher,
            )  # fmt: skip
            refuse(
                sock,
                ErrorCode.BUSY,
                f"the daemon already serves {key}={limit}",
            )
            return
        kept = limit // 8
        if kept and count >= limit - kept and peer[1] != os.getuid():
            # The last eighth is the daemon's own uid's: another uid (allowed_uids) holding
            # every connection (registered ones never idle out) left root's VM manager
            # refused, and no VM could start.
            refusals.warn(
                log, f"{key}-kept-{peer[1]}",
                "refused a connection from pid %d uid %d: the last %d of %s (%d) are kept "
                "for uid %d", peer[0], peer[1], kept, key, limit, os.getuid(),
                dispatcher=self.dispatcher,
            )  # fmt: skip
            refuse(
                sock,
                ErrorCode.BUSY,
                f"the daemon already serves {count} clients; the last {kept} of {key}={limit} "
                f"are kept for uid {os.getuid()}",
            )
            return
        if admin:
            self._admin_clients += 1
        else:
            self._clients += 1
        conn_id = next(conn_ids)
        transport = SocketTransport(
            self.dispatcher, sock, peer, lambda: self._closed(conn_id, admin=admin)
        )
        ref = self.system.connect(
            transport, admin=admin, conn_id=conn_id, on_stopped=self._connection_stopped
        )
        self._connections[conn_id] = ref
        self._sockets[conn_id] = transport
        transport.start(ref)
        log.debug("client %d (pid %d uid %d) connected%s", conn_id, peer[0], peer[1],
                  " to the admin socket" if admin else "")  # fmt: skip

    def _start_watchdog(self) -> None:
        """Feed systemd's watchdog from the dispatcher: a stuck loop stops feeding it."""
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", "0"))
            pid = int(os.environ.get("WATCHDOG_PID", str(os.getpid())))
        except ValueError:
            return
        if usec <= 0 or pid != os.getpid():
            return
        interval = usec / 2_000_000

        def feed() -> None:
            sd_notify("WATCHDOG=1", timeout=SEND_TIMEOUT)
            self.dispatcher.call_later(interval, feed)

        log.info("feeding the service manager's watchdog every %.1f s", interval)
        feed()

    def _adopt_connection(self, state: HandedOver) -> None:
        sock = socket.socket(fileno=state.fd)
        if not self._still_allowed(state, sock):
            return
        sock.setblocking(False)
        conn_id = state.conn_id
        # The kernel keeps what SO_PEERCRED said at connect() with the socket: the gid,
        # which the handoff does not carry, is read again (the pid and uid are the same).
        peer = (state.peer_pid, state.peer_uid, peer_credentials(sock)[2])
        if state.admin:
            self._admin_clients += 1
        else:
            self._clients += 1
        transport = SocketTransport(
            self.dispatcher, sock, peer, lambda: self._closed(conn_id, admin=state.admin)
        )
        ref = self.system.connect(
            transport, admin=state.admin, conn_id=conn_id, restored=state,
            on_stopped=self._connection_stopped,
        )  # fmt: skip
        self._connections[conn_id] = ref
        self._sockets[conn_id] = transport
        transport.start(ref)

    def _still_allowed(self, state: HandedOver, sock: socket.socket) -> bool:
        """Whether a connection handed over by a re-exec may stay: its uid still allowed,
        or else the connection an owner's own (its close would fence that owner, which a
        change of allowed_uids must not do). The others are turned away (permission-denied,
        as a new connection of theirs is): an auditor's uid taken out of allowed_uids and
        applied with ``systemctl reload`` kept its connection, and every event, for good."""
        allowed = {os.getuid()} if state.admin else {os.getuid(), *self.config.allowed_uids}
        if state.peer_uid in allowed:
            return True
        if state.owner is not None and state.owner.pid == state.peer_pid:
            log.warning(
                "re-exec: kept client %d of uid %d, no longer in allowed_uids: it is owner "
                "%s's own connection, whose close would fence it",
                state.conn_id, state.peer_uid, state.owner.describe(),
            )  # fmt: skip
            return True
        log.warning(
            "re-exec: closed client %d of uid %d: no longer in allowed_uids",
            state.conn_id, state.peer_uid,
        )  # fmt: skip
        why = f"uid {state.peer_uid} may not use this daemon (no longer in its allowed_uids)"
        refuse(sock, ErrorCode.PERMISSION_DENIED, why)
        return False

    def _closed(self, conn_id: int, *, admin: bool = False) -> None:
        """The socket closed: a client less for ``max_clients``. Its actor stays in
        :attr:`_connections` until it stops (:meth:`_connection_stopped`): a request of
        its in flight, and the rollback that follows, must end before a re-exec."""
        if admin:
            self._admin_clients -= 1
        else:
            self._clients -= 1
        self._sockets.pop(conn_id, None)
        log.debug("client %d closed", conn_id)  # the id `lockd clients` showed
        for spares in self._spares.values():
            spares.refill()  # a descriptor just freed: the listeners' spares come first

    def _connection_stopped(self, conn_id: int, ref: pykka.ActorRef[Any]) -> None:
        if self._connections.get(conn_id) is ref:  # not one taken back under its id since
            del self._connections[conn_id]

    def _settings_said(self, handoff: Handoff | None) -> None:
        """Once listening: warn of settings socket activation leaves unused, and journal
        those a re-exec changes."""
        activated = self._activated_keys()
        unused = [
            key
            for key, value in (("socket_mode", "0600"), ("socket_group", None))
            if key in activated and getattr(self.config, key) != value
        ]
        if unused:  # said at every start, not only when a reload changes them
            log.warning("%s set but not used: the service manager's socket is served, "
                        "whose socket unit's SocketMode= and SocketGroup= decide",
                        " and ".join(unused))  # fmt: skip
        if handoff is not None and handoff.settings is not None:
            self._journal_reexec_changes(handoff.settings, activated)

    def _journal_reexec_changes(self, before: Mapping[str, Any], activated: set[str]) -> None:
        """A re-exec runs with the configuration file as it is now: journal the settings
        that changes from those the previous program ran with, all in force now (with no
        SIGHUP before the re-exec, no record said so until 2026-11-28). Those socket
        activation stands in for are not in force, and not named."""
        now = settings_of(self.config)
        changed = [
            key
            for key, value in now.items()
            if key in before and before[key] != value and key not in activated
        ]
        if not changed:
            return
        log.info("re-exec: %s changed since the previous program started; in force now",
                 ", ".join(changed))  # fmt: skip
        reloaded = ConfigReloaded(self.config.config_file or "", changed, changed)
        self.system.journal.tell(Append((reloaded,), 0, None))

    def _carry_on(self, handoff: Handoff) -> None:
        """Keep what a re-exec is not meant to reset: the counts, and logging set at runtime."""
        if handoff.metrics is not None:
            try:
                REGISTRY.carry_on(handoff.metrics)
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                # Counts are not worth a failed start: it would free every lease.
                log.warning("re-exec: counters not carried over (%r); they start again", exc)
        carried = handoff.logging
        if carried is None or self._embedded:
            return
        try:
            self._keep_logging(carried)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("re-exec: logging set at runtime not kept (%r)", exc)

    def _keep_logging(self, carried: dict[str, str]) -> None:
        """The level and filters set at runtime, unless the file's logging changed."""
        # What SIGHUP compares: a file whose logging was edited applies.
        # (A handoff without outputs comes from a build that did not compare them.)
        was = (carried.get("config_level"), carried.get("config_filters"),
               carried.get("config_outputs", self.config.log_outputs))  # fmt: skip
        unchanged = was == (self.config.log_level, self.config.log_filters, self.config.log_outputs)
        if not unchanged:
            log.info("re-exec: the configuration's logging changed; it applies")
            return
        now = logs.current()
        if (carried["level"], carried["filters"]) == (now["level"], now["filters"]):
            return
        logs.configure(carried["level"], carried["filters"], self.config.log_outputs)
        log.info("re-exec: logging set at runtime kept: %s", logs.describe(logs.current()))

    def reexec(self) -> None:
        """SIGUSR1: hand everything to a fresh copy of this program (see lockd.reexec)."""
        if self._reexecing or not self.system.ready.is_set():
            why = "a re-exec is under way" if self._reexecing else "recovery is running"
            log.warning("SIGUSR1 ignored: %s", why)
            return
        self._reexecing = True
        # systemd shows the unit "reloading" until READY=1: the new program's, once its
        # recovery is done, or this one's if the re-exec is abandoned.
        sd_notify(
            f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\n"
            "STATUS=re-executing (SIGUSR1)"
        )
        activated = self._activated_keys()
        _import_from_here()
        argv = list(sys.argv[1:])
        if "--handoff-fd" in argv:
            i = argv.index("--handoff-fd")
            del argv[i : i + 2]
        ReexecActor.start(
            self.dispatcher,
            connections=lambda: list(self._connections.values()),
            stop_accepting=self._stop_accepting,
            router=self.system.router,
            journal=self.system.journal,
            listeners=[
                ListenerFd(listener.sock.fileno(), self._path_of(listener), listener.admin)
                for listener in self.listeners
            ],
            # Read at the exec, not now: the listeners accept until the check passes.
            next_conn_id=lambda: conn_ids.next,
            argv=[sys.executable, "-m", "lockd", *argv],
            owners=self.system.owners,
            on_abort=self._reexec_abandoned,
            fences_resume=self.config.lost_lease_policy == "fence",
            before_exec=self._before_exec,
            own_fds=(self.system.journal_lock, self._pid_fd),
            paths={k: v for k, v in paths_of(self.config).items() if k not in activated},
            started=self.system.serving_since,
            log_config=(self.config.log_level, self.config.log_filters, self.config.log_outputs),
            bound=sorted(self._bound),
            on_done=self._reexec_over,
            stopping=lambda: bool(self._stop_reason),
            openings=lambda: {c: seq for c, (seq, _) in self.system.journal_openings.items()},
            fd_names=self.system.fd_store.names,
            settings=settings_of(self.config),
            allowed_uids=self.config.allowed_uids,
        )

    def _before_exec(self) -> None:
        """What this process finishes before a re-exec replaces it: a snapshot being
        written, and the counts of refusals not logged yet (their timers die with it)."""
        refusals.flush()
        self.system.snapshots.wait(STOP_WAIT_S)

    def _activated_keys(self) -> set[str]:
        """The socket settings that socket activation stands in for: the service
        manager's sockets, which this daemon did not bind and no setting moves."""
        keys = {
            "admin_socket" if listener.admin else "socket"
            for listener in self.listeners
            if self._path_of(listener) not in self._bound
        }
        if "socket" in keys:  # the socket unit's SocketMode= and SocketGroup= decide
            keys |= {"socket_mode", "socket_group"}
        return keys

    def _stop_accepting(self) -> None:
        for listener in self.listeners:
            listener.stop()

    def _reexec_abandoned(self, handed: list[HandedOver], why: str) -> None:
        """Take back the connections already handed over and serve on, in this process."""
        for state in handed:
            if state.admin:
                self._admin_clients -= 1
            else:
                self._clients -= 1
            self._adopt_connection(state)
        if self._stop_reason:
            return  # stopping: the listeners are closed, and stay so
        for listener in self.listeners:
            listener.start()
        sd_notify(f"READY=1\nSTATUS=serving; re-exec abandoned: {why}")

    def _reexec_over(self) -> None:
        """The abandoned re-exec has every answer it waited for: a SIGUSR1 is taken
        again (earlier, a second re-exec would quiesce the connections still
        answering the first, and miss one the first takes back meanwhile)."""
        self._reexecing = False

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply the log level, report what needs a restart."""
        from lockd import config as config_mod

        path = self.config.config_file
        if path == config_mod.default_paths()["config"]:
            # Optional, as at the start (and a re-exec's or a restart's): removed since,
            # the defaults apply, not "no such file" that kept the removed file's keys.
            path = None
        try:
            # The flags' paths again: an admin socket placed beside --socket is no change.
            flags = {k: getattr(self.config, k) for k in PATH_KEYS if k in self._overridden}
            fresh = config_mod.load(path, flags)
        except config_mod.ConfigError as exc:
            log.error("reload: %s; keeping the running configuration", exc)
            return
        # Read from the default file when it exists: made since the start, too.
        log.info(
            "reload: configuration re-read from %s", fresh.config_file or "the defaults (no file)"
        )
        if "log_level" in self._overridden:
            fresh = attrs.evolve(fresh, log_level=self.config.log_level)  # --verbose wins
        logging_keys = ("log_level", "log_filters", "log_outputs")
        relogged = [k for k in logging_keys if getattr(fresh, k) != getattr(self.config, k)]
        if relogged:
            logs.configure(fresh.log_level, fresh.log_filters, fresh.log_outputs)
            log.info("reload: logging is now %s", logs.describe(logs.current()))
        changed = [
            field.name
            for field in attrs.fields(Config)
            if field.name not in ("log_level", "log_filters", "log_outputs", "config_file")
            and getattr(fresh, field.name) != getattr(self.config, field.name)
            and field.name not in self._overridden
        ]
        activated = [key for key in changed if key in self._activated_keys()]
        if activated:
            log.info(
                "reload: %s changed; not used while lockd serves the service manager's "
                "sockets (socket activation: its socket units' ListenStream=, SocketMode= "
                "and SocketGroup=)",
                ", ".join(activated),
            )
            changed = [key for key in changed if key not in activated]
        # SIGUSR1 applies the others (docs/configuration.md); it refuses to move a path,
        # a directory of [lockspaces] included.
        moved = [key for key in changed if key in (*PATH_KEYS, LOCKSPACES)]
        applied = [key for key in changed if key not in moved]
        if applied:
            log.warning(
                "reload: %s changed; not applied until a re-exec (SIGUSR1, systemctl reload "
                "lockd) or a restart",
                ", ".join(applied),
            )
        if moved:
            log.warning(
                "reload: %s changed; that takes a restart (a re-exec is refused meanwhile)",
                ", ".join(moved),
            )
        # An auditor tells when a setting (allowed_uids, say) changed: here, and in force
        # from the next daemon-started (which names allowed_uids).
        reloaded = ConfigReloaded(
            fresh.config_file or "", (*relogged, *changed, *activated), relogged
        )
        self.system.journal.tell(Append((reloaded,), 0, None))
        self.config = attrs.evolve(
            self.config,
            log_level=fresh.log_level,
            log_filters=fresh.log_filters,
            log_outputs=fresh.log_outputs,
        )

    def request_stop(self, reason: str) -> None:
        """Make :meth:`run` return; safe from signal handlers."""
        self._stop_reason = self._stop_reason or reason
        self.dispatcher.stop()

    def run(self) -> None:
        """Serve until stopped, then journal the stop; the leases stay for the next start."""
        serving = {listener.admin: self._path_of(listener) for listener in self.listeners}
        log.info(
            "lockd %s serving %s (admin %s), lock dir %s, journal %s (sync %s)",
            build.version(),
            serving.get(False, self.config.socket),
            serving.get(True, self.config.admin_socket),
            self.config.lock_dir,
            self.config.journal_dir,
            self.config.journal_sync.value,
        )
        if (crash_at := faults.armed()) is not None:
            log.warning(
                "LOCKD_CRASH_AT=%s: this lockd will SIGKILL itself at that crash point "
                "(a crash test: docs/recovery.md)",
                crash_at,
            )
        try:
            self.dispatcher.run_forever()
        finally:
            sd_notify("STOPPING=1")
            self._close_listeners()
            refusals.flush()
            try:
                self.system.shutdown(self._stop_reason or "stopped")
            finally:
                if self._embedded:
                    self.system.close()
                    self._hang_up()
            self._drop_pid_file()
            log.info(
                "lockd stopped (%s): nothing released in the journal, no owner signalled",
                self._stop_reason,
            )

    def _hang_up(self) -> None:
        """Close the client sockets still open, once every actor is stopped (embedding):
        the daemon's exit closes them. Left to the garbage collector, each stayed open
        after ``stop()``, and its client's next call waited out its timeout."""
        for transport in self._sockets.values():
            transport.hang_up()
        self._sockets.clear()

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            path = self._path_of(listener)
            listener.close()
            if path in self._bound:  # not systemd's: its socket units listen on
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if self._embedded:  # the daemon's exit closes them (a re-exec keeps none)
            for spares in self._spares.values():
                spares.close()

    def _path_of(self, listener: Listener) -> str:
        """Where ``listener`` listens: the configured path, or socket activation's."""
        try:
            name = listener.sock.getsockname()
        except OSError:
            name = None
        if isinstance(name, str) and name:
            return name
        return self.config.admin_socket if listener.admin else self.config.socket

    def _write_pid_file(self, inherited: int | None) -> int | None:
        """Open, lock and fill the pid file; ``inherited``: its fd from before a re-exec,
        whose POSIX lock this process holds still (a new fd's close would drop it)."""
        path = self.config.pid_file
        kept = _if_still(path or "", inherited)
        if kept is not None:
            return kept
        if not path:
            return None
        make_dirs(os.path.dirname(path), 0o755)
        # Never through a symlink, nor into another user's file or a hard link: a pid
        # file in a directory others can write to (/tmp) was a way to have root's lockd
        # truncate and overwrite any file (/etc/shadow) at its next start.
        fd = open_own_file(path, os.O_RDWR, 0o644, what="pid_file", remedy=(
            "remove it, or choose a pid_file in a directory no other user can write to"
        ))  # fmt: skip
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PidFileLockedError(
                f"pid file {path} is locked by a running daemon{_pid_in(path)}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _drop_pid_file(self) -> None:
        """Remove and unlock the pid file, if this daemon holds one."""
        if self._pid_fd is not None and self.config.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.pid_file)
            os.close(self._pid_fd)
            self._pid_fd = None


def _not_only_ours(path: str) -> tuple[str, str] | None:
    """Why a directory is not this uid's alone (another user's, or others can write to
    it), with its owner and mode in words; None when it is."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.geteuid() and not mode & 0o022:
        return None
    problem = "it is another user's" if st.st_uid != os.geteuid() else "other users can write to it"
    return problem, f"owner uid {st.st_uid}, mode {mode:04o}; lockd runs as uid {os.geteuid()}"


def _warn_if_others_write(lock_dir: str) -> None:
    """Warn of a lock directory other users can write to: one could replace a lease file
    or a lockspace directory and lock the new one, and lockd would report the lease lost
    and fence its VM. Only a warning: on shared storage the mode is the storage's to
    decide (a group of hypervisor hosts' uids, say)."""
    found = _not_only_ours(lock_dir)
    if found is not None:
        log.warning(
            "lock_dir %s: %s (%s): one could replace a lease file and have lockd fence its "
            "VM; unless the storage decides this, run chmod go-w %s (or chown it)",
            lock_dir, *found, lock_dir,
        )  # fmt: skip


def refuse_unwritable_lock_dir(path: str) -> None:
    """Refuse a lock directory this uid cannot make lockspaces in (a user's lockd given
    root's /var/lib/libvirt/lockd): it started, warned that others could write to it,
    and then failed every request with io-error, "Permission denied"."""
    if os.access(path, os.W_OK | os.X_OK):
        return
    st = os.stat(path)
    raise UnwritableLockDirError(
        errno.EACCES,
        f"refusing lock_dir {path}: uid {os.geteuid()} cannot write to it (owner uid "
        f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}), where lockd makes its "
        "lockspace directories and lease files: choose a lock_dir of your own, or run "
        "lockd as a uid that may write there",
    )


def check_journal_dir(path: str) -> None:
    """Refuse a journal directory (followed, if a symlink) that is another user's or that
    other users can write to: recovery believes what the journal says, so a segment
    planted there could make lockd hold a lease for anyone, or fence (SIGKILL) any
    process it names as an owner whose lease was lost."""
    found = _not_only_ours(path)
    if found is not None:
        problem, owner = found
        raise UnsafeJournalDirError(
            errno.EPERM,
            f"refusing journal_dir {path}: {problem} ({owner}); events planted there would "
            f"be replayed as lockd's own: {_remedy(path)}",
        )
    ancestor = _unsafe_ancestor(path)
    if ancestor is not None:
        where, why = ancestor
        raise UnsafeJournalDirError(
            errno.EPERM,
            f"refusing journal_dir {path}: directory {where} above it {why}; whoever can "
            "write there can move the journal aside and put one of their own in its place: "
            f"{_remedy(where)}",
        )


def _remedy(directory: str) -> str:
    """What to do about a directory refused for the journal: a user's lockd can neither
    chmod nor chown one that is another uid's (root's /var/lib/lockd), and was told to."""
    if os.stat(directory).st_uid != os.geteuid() and os.geteuid() != 0:
        return "choose a journal_dir of your own"
    return f"run chmod go-w {directory} (or chown it), or choose another journal_dir"


def _unsafe_ancestor(path: str) -> tuple[str, str] | None:
    """The first directory above ``path`` (as named, and as its symlinks resolve) that a
    user other than root and this uid could rename entries in, and why; None if none.

    The rule ssh's StrictModes applies: owned by root or this uid, and not group- or
    world-writable unless sticky (in a sticky directory, as ``/tmp``, only an entry's
    owner may rename it, and the entry below is checked to be this uid's).
    """
    me = os.geteuid()
    seen: set[str] = set()
    for start in (os.path.abspath(path), os.path.realpath(path)):
        parent = os.path.dirname(start)
        while parent not in seen:
            seen.add(parent)
            st = os.stat(parent)
            mode = stat.S_IMODE(st.st_mode)
            if st.st_uid not in (0, me):
                return parent, f"is uid {st.st_uid}'s (mode {mode:04o})"
            if mode & 0o022 and not mode & stat.S_ISVTX:
                return parent, f"can be written by other users (mode {mode:04o}, not sticky)"
            if parent == "/":
                break
            parent = os.path.dirname(parent)
    return None


def _refuse_an_empty_journal_for(
    stored: Sequence[tuple[str, int]], state: ReplayState, journal_dir: str
) -> None:
    """Refuse to start on a journal with no event at all while the service manager's fd
    store gives back leases' locks: they are locks a lockd took for running VMs, and
    this journal cannot be the one that says whose (a new or mistyped ``journal_dir``,
    a journal moved or deleted). Started, lockd removed every one from the store as
    "no held lease", and each VM's disk was free for another host. The store keeps
    them while lockd is refused; a journal with history is trusted to say which are
    still held (a release journaled before the crash ended one)."""
    if not stored or state.seq != 0:
        return
    # A copy whose lock is gone (its removal from the store lost in a crash) holds no
    # VM's disk: it is removed as usual, and alone it refuses nothing.
    locked = sum(1 for _, fd in stored if _holds_the_lock(fd))
    if not locked:
        return
    raise StoredLeasesUnknownError(
        f"the service manager's fd store holds the locks of {locked} leases, but "
        f"journal_dir {journal_dir} holds no event: not the journal that took them (a new "
        "or mistyped journal_dir, or a journal moved or deleted?). Refusing to start, "
        "which would let every one of them go: start with the journal that took them "
        '(docs/operations.md, "Moving and backing up the journal"); to let them go, '
        "stop the service so that its fd store is emptied (`systemctl clean "
        "--what=fdstore lockd` with FileDescriptorStorePreserve=yes) and start it again"
    )


def _pid_in(path: str) -> str:
    """`` (pid N)``: what a locked pid file says, for the error; empty if unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(32).strip()
    except (OSError, ValueError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


NEEDS_AN_OPERATOR: tuple[type[Exception], ...] = (
    JournalCorruptError,  # lockd journal-check --repair; too new: the newer lockd
    StoredLeasesUnknownError,
    UnsafePathError,  # the journal's directory, the pid file, the runtime directory
    UnwritableLockDirError,
    UnclaimedSocketError,  # the socket units' names
    # A path that is not what its setting needs: a file where a directory goes (or on
    # the way to one), a directory where the pid file goes, a file that is no socket
    # where the socket goes.
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)
"""What stops a start until an operator changes something on disk or in the units: a
start again, by the service manager, meets the same refusal (``lockd serve`` exits
:data:`lockd.commands.EXIT_NEEDS_OPERATOR`, which lockd.service does not restart).
What can pass by itself is not here: a pid file, journal or socket still held by a
lockd that is exiting."""


class StartRefusedError(Exception):
    """:func:`serve` refused to start for one of :data:`NEEDS_AN_OPERATOR` (``refusal``);
    raised only before anything is served, so a failure of a daemon that was serving is
    never taken for one."""

    def __init__(self, refusal: Exception) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


def serve(
    config: Config, overridden: frozenset[str] = frozenset(), handoff_fd: int | None = None
) -> int:
    """Serve in the foreground until SIGTERM or SIGINT; SIGHUP reloads, SIGUSR1 re-execs."""
    # Blocked until the handlers below are installed (already, after a re-exec):
    # by default each of these signals would end the daemon mid-start.
    signal.pthread_sigmask(signal.SIG_BLOCK, procs.DAEMON_SIGNALS)
    handoff = read_handoff(handoff_fd) if handoff_fd is not None else None
    try:
        daemon = Daemon(config, overridden, handoff)
    except NEEDS_AN_OPERATOR as exc:
        raise StartRefusedError(exc) from exc

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        daemon.request_stop(signal.Signals(signum).name)

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        daemon.dispatcher.submit(daemon.reload)
        daemon.dispatcher.wake()

    def on_usr1(_signum: int, _frame: FrameType | None) -> None:
        daemon.dispatcher.submit(daemon.reexec)
        daemon.dispatcher.wake()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK, procs.DAEMON_SIGNALS
    )  # those sent meanwhile arrive now
    daemon.run()
    return 0
