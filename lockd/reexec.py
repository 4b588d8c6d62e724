"""SIGUSR1: re-execute the daemon in place, keeping every lock, listening socket and connection.

The old process stops accepting, lets each connection finish the request it
is serving, collects every lease fd once each lockspace is idle, journals
``daemon-stopped`` and execs itself with a handoff (a memfd holding a CBOR
description of the fds). The fds stay open across ``exec``, so the kernel
never sees a lease lock released: an outside probe finds them held
throughout. The new process replays the journal as after any restart, but
adopts the inherited lease fds instead of reopening files, takes over the
listening sockets, and goes on serving each client connection where it
stopped (including bytes the client sent meanwhile).

Before any of that, the new program is run once with ``--handoff-check``:
it reads the configuration the exec would give it and imports its daemon,
then prints the handoff it understands. A reload after a bad config edit or
a broken install is then abandoned, the old program serving on, instead of
exec'ing into a program that exits at once and takes every lock with it.
"""

from __future__ import annotations

import ast
import contextlib
import enum
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import cbor2
import pykka

from actors.connection import Gone, HandedOver, Quiesce, Resume
from actors.events import DaemonStarted, DaemonStopped
from actors.journal import Append, Appended, AppendFailed
from actors.lockspace import Unfreeze
from actors.metrics import REGISTRY
from actors.model import Owner
from actors.owners import Fencing, QueryFencing
from actors.router import AllFds, CollectFds
from actors.runtime import DispatchedActor, Dispatcher, tell_if_alive
from lockd import build, logs
from lockd.procs import DAEMON_SIGNALS
from lockd.systemd import StoreNames

log = logging.getLogger(__name__)

HANDOFF_VERSION = 1

HANDOFF_FEATURES = ("own-fds",)
"""What this build takes over beyond version 1's fds, as ``--handoff-check`` prints it.
``own-fds``: the journal directory's lock and the pid file, with the daemon's signals
blocked across the exec (this build unblocks them once its handlers are in). The first
builds took both locks themselves and never unblocked those signals."""

PATH_KEYS = ("socket", "admin_socket", "lock_dir", "journal_dir", "pid_file")
"""Settings a re-exec cannot change: the new program carries on with the running
daemon's sockets, lease files, journal and pid file, which it finds through them."""

LOCKSPACES = "lockspaces"
"""Also a setting a re-exec cannot change, said and compared beside :data:`PATH_KEYS`:
the directories of ``[lockspaces]`` hold lease files too. Moved, the new program adopted
the handed fds (locks on the old files) as leases in the new directory, where the files
are not locked: another host configured alike took the same disk. A build from before
it does not say it, and is not compared on it."""

CHECK_SECONDS = 10.0
"""How long the new program's start-up check may take before the re-exec is abandoned."""

_SERVICE_ENV = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
"""Kept from the check: it must never look like the service to the service manager."""

Paths = dict[str, Any]
""":data:`PATH_KEYS` (a path or None each) and :data:`LOCKSPACES` (name => directory)."""


def paths_of(config: Any) -> Paths:
    """The paths a re-exec cannot change, as a :class:`lockd.config.Config` gives them."""
    paths: Paths = {key: getattr(config, key) for key in PATH_KEYS}
    paths[LOCKSPACES] = dict(config.lockspaces)
    return paths


def settings_of(config: Any) -> dict[str, Any]:
    """A :class:`lockd.config.Config`'s settings as plain CBOR values (text for a choice,
    lists for tuples, maps for tables), to compare across a re-exec."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        if isinstance(value, Mapping):
            return {str(key): plain(item) for key, item in value.items()}
        return value

    return {
        field.name: plain(getattr(config, field.name))
        for field in attrs.fields(type(config))
        if field.name != "config_file"
    }


def check_output(config: Any) -> str:
    """What ``lockd serve --handoff-check`` prints: handoff versions read and features,
    then the paths its configuration gives (a :class:`lockd.config.Config`)."""
    paths = paths_of(config)
    return (
        f"lockd-handoff {HANDOFF_VERSION} {' '.join(HANDOFF_FEATURES)}\n"
        f"lockd-paths {json.dumps(paths, sort_keys=True)}"
    )


@attrs.frozen
class TargetCheck:
    """What the program a re-exec would run said about itself."""

    ok: bool
    own_fds: bool = False
    """It takes over the journal lock and the pid file (and expects its signals blocked)."""
    why: str = ""
    paths: Paths = attrs.field(factory=dict, hash=False)
    """The :data:`PATH_KEYS` its configuration gives."""

    @classmethod
    def of(cls, returncode: int, stdout: str, stderr: str) -> TargetCheck:
        """Read the answer to ``--handoff-check`` (pure: every answer is tested without
        processes). A build from before the check gets ``why`` = :data:`BEFORE_CHECK`."""
        handoff: list[str] | None = None
        paths: Paths | None = None
        for line in stdout.splitlines():
            head, _, rest = line.partition(" ")
            if head == "lockd-handoff":
                handoff = rest.split()
            elif head == "lockd-paths":
                paths = json.loads(rest)
        if handoff is not None:
            versions = handoff[0].split(",") if handoff else []
            if str(HANDOFF_VERSION) not in versions:
                read = ",".join(versions) or "none"
                why = f"the new program reads handoff versions {read}, not {HANDOFF_VERSION}"
                return cls(False, why=why)
            if paths is None:
                return cls(False, why="the new program did not say which paths it would use")
            return cls(True, own_fds="own-fds" in handoff[1:], paths=paths)
        if returncode == 2 and "unrecognized arguments: --handoff-check" in stderr:
            return cls(False, why=BEFORE_CHECK)
        return cls(
            False, why=f"the new program fails its start-up check: {_last(stderr, returncode)}"
        )

    @classmethod
    def before_check(cls, returncode: int, stdout: str, stderr: str) -> TargetCheck:
        """Read the answer of a build from before the check to ``--check-config``: its
        configuration, printed as ``  name = value`` lines, the value a Python repr in
        those builds (TOML from this one on, an unset ``pid_file`` a comment; read too:
        the downgrade test runs a copy of this build)."""
        if returncode != 0:
            last = _last(stderr, returncode)
            return cls(False, why=f"{BEFORE_CHECK}, and it fails --check-config: {last}")
        paths: Paths = {}
        for line in stdout.splitlines():
            name, sep, value = line.strip().partition(" = ")
            if sep and name in (*PATH_KEYS, LOCKSPACES):
                paths[name] = _printed_value(value)
        if "pid_file" not in paths and "# pid_file is not set" in stdout.splitlines():
            paths["pid_file"] = None
        if not set(PATH_KEYS) <= set(paths):
            return cls(False, why=f"{BEFORE_CHECK}, and --check-config did not print its paths")
        return cls(True, own_fds=False, why=BEFORE_CHECK, paths=paths)


def _printed_value(text: str) -> Any:
    """One value as a ``--check-config`` printed it: JSON, a Python repr, or TOML."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return ast.literal_eval(text)


BEFORE_CHECK = "the new program is a lockd from before --handoff-check"


def _last(stderr: str, returncode: int) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {returncode}"


def moved_paths(running: Paths, new: Paths) -> list[str]:
    """The settings of :data:`PATH_KEYS` the new program would not share with this one,
    and the lockspaces of :data:`LOCKSPACES` it would serve from another directory
    (or from ``lock_dir``), if it says them. A key ``running`` leaves out is not
    compared: a socket the service manager passed, which no setting moves."""
    moved = [
        f"{key} ({running.get(key)} -> {new.get(key)})"
        for key in PATH_KEYS
        if key in running and running.get(key) != new.get(key)
    ]
    if isinstance(new.get(LOCKSPACES), dict):
        now, then = running.get(LOCKSPACES) or {}, new[LOCKSPACES]
        moved += [
            f"{LOCKSPACES}.{name} ({now.get(name)} -> {then.get(name)})"
            for name in sorted(set(now) | set(then))
            if now.get(name) != then.get(name)
        ]
    return moved


Spawn = Callable[[list[str]], "subprocess.Popen[str]"]
"""Starts a check's process and returns once it has exec'd (as ``Popen`` does)."""


def check_target(argv: Sequence[str], spawn: Spawn | None = None) -> TargetCheck:
    """Ask the program a re-exec would run whether it starts, and with which paths.

    ``argv --handoff-check``; a build from before that option is asked for
    ``--check-config`` instead, so a broken configuration is caught there too.
    Blocks for the check's run: call it off the loop, and give it a ``spawn``
    that starts the process on the loop (:func:`spawn_on`).
    """
    done = _run([*argv, "--handoff-check"], spawn or _popen)
    if isinstance(done, TargetCheck):
        return done
    check = TargetCheck.of(done.returncode, done.stdout, done.stderr)
    if check.why != BEFORE_CHECK:
        return check
    again = _run([*argv, "--check-config"], spawn or _popen)
    if isinstance(again, TargetCheck):
        return again
    return TargetCheck.before_check(again.returncode, again.stdout, again.stderr)


def _check_or_say_why(argv: Sequence[str], spawn: Spawn | None = None) -> TargetCheck:
    """:func:`check_target` on the check's thread: whatever goes wrong there must still
    answer the actor, or the re-exec would wait for ever (and every SIGUSR1 after it be
    ignored as "a re-exec is under way")."""
    try:
        return check_target(argv, spawn)
    except Exception as exc:  # noqa: BLE001 - reported as the reason the re-exec is abandoned
        return TargetCheck(False, why=f"the new program's answer could not be read: {exc!r}")


_FOR_THE_DAEMON = {signal.SIGHUP, signal.SIGUSR1}
"""Signals the check never takes: blocked from its start, they stay pending until it
exits. Sent to the whole unit or by name (systemctl kill, pkill -HUP lockd), they ended
it (their default), and with it the re-exec."""


def _popen(argv: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_ENV}
    was = signal.pthread_sigmask(signal.SIG_BLOCK, _FOR_THE_DAEMON)  # the child inherits it
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", env=env,
        )  # fmt: skip
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, was)


def spawn_on(dispatcher: Dispatcher) -> Spawn:
    """A :data:`Spawn` for a thread of the daemon: the process starts on the loop.

    Between its fork and its exec a child holds a copy of every fd the daemon
    has open, and so a share of every OFD lock on them: a lease closed
    meanwhile stays locked (its release already answered), and the lockspace
    index lock refuses the daemon's next create as "busy". ``Popen`` returns
    only once the child has exec'd (which closes those copies), so run on the
    loop it lets no request through in that window. The snapshot writer's
    fork guards against the same (lockd.snapshot).
    """

    def spawn(argv: list[str]) -> subprocess.Popen[str]:
        box: list[subprocess.Popen[str] | Exception] = []
        spawned = threading.Event()
        lock = threading.Lock()  # held while the loop starts it: a wait given up sees it

        def step() -> None:
            with lock:
                try:
                    if not spawned.is_set():  # not given up on
                        box.append(_popen(argv))
                except Exception as exc:  # noqa: BLE001 - handed to the check's thread
                    box.append(exc)
                finally:
                    spawned.set()

        dispatcher.submit(step)
        if not spawned.wait(CHECK_SECONDS):
            with lock:
                spawned.set()  # too late now: the step starts nothing
                started = box[0] if box else None
            if isinstance(started, subprocess.Popen):  # started as the wait ran out
                started.kill()
                started.communicate()
            raise OSError("the daemon's loop did not start it in time")
        started = box[0]
        if isinstance(started, Exception):
            raise started
        return started

    return spawn


def _run(argv: list[str], spawn: Spawn) -> subprocess.CompletedProcess[str] | TargetCheck:
    try:
        proc = spawn(argv)
    except OSError as exc:
        return TargetCheck(False, why=f"cannot run {argv[0]}: {exc}")
    try:
        stdout, stderr = proc.communicate(timeout=CHECK_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        why = f"the new program did not finish its start-up check within {CHECK_SECONDS:g} s"
        return TargetCheck(False, why=why)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


@attrs.frozen
class ListenerFd:
    """A listening socket handed over."""

    fd: int
    path: str
    admin: bool


@attrs.frozen
class Handoff:
    """Everything the next daemon process takes over."""

    listeners: tuple[ListenerFd, ...]
    connections: tuple[HandedOver, ...]
    leases: tuple[tuple[str, str, int], ...]
    next_conn_id: int
    journal_lock: int | None = None
    """The journal directory's locked ``.lock`` fd: its flock goes with its open file
    description, so the journal is never unguarded while the new program starts
    (a second ``lockd serve`` could take it then, and the re-exec would fail)."""
    pid_file: int | None = None
    """The locked pid file's fd: its POSIX lock is the process's, and stays only while
    an fd of the file stays open."""
    started: float | None = None
    """When the process first started (CLOCK_MONOTONIC, which an exec keeps): uptime
    counts from it, so ``status`` does not show a reload as a restart."""
    metrics: dict[str, Any] | None = None
    """The counters and histograms so far (:meth:`Metrics.carried`): they go on counting."""
    logging: dict[str, str] | None = None
    """The logging in force (``level``, ``filters``) and the configuration's when the
    re-exec began (``config_level``, ``config_filters``, ``config_outputs``). The next
    program keeps a level set at runtime (``lockd log-level``) unless the file's logging
    changed since, as SIGHUP does."""
    bound: tuple[str, ...] | None = None
    """The listeners' socket files this daemon created, to remove when it stops; not
    those of socket activation, which are the service manager's (None, from an earlier
    build: every listener's)."""
    settings: dict[str, Any] | None = None
    """The settings the process ran with (:func:`settings_of`): the next program journals
    those its configuration changes (None, from an earlier build: not known)."""
    fd_names: StoreNames | None = None
    """The names of the fd store's lease fds (:meth:`FdStore.names`). None, from an
    earlier build: each lease's is the hash of its lockspace and resource."""

    def own_fds(self) -> list[int]:
        """The daemon's own locks handed over (journal directory, pid file)."""
        return [fd for fd in (self.journal_lock, self.pid_file) if fd is not None]

    def all_fds(self) -> list[int]:
        """Every fd this handoff passes on."""
        return (
            [item.fd for item in self.listeners]
            + [c.fd for c in self.connections]
            + [fd for _, _, fd in self.leases]
            + self.own_fds()
        )

    def to_bytes(self) -> bytes:
        return cbor2.dumps(
            {
                "version": HANDOFF_VERSION,
                "listeners": [[item.fd, item.path, item.admin] for item in self.listeners],
                "connections": [_conn_to_wire(c) for c in self.connections],
                "leases": [list(lease) for lease in self.leases],
                "next_conn_id": self.next_conn_id,
                "journal_lock": self.journal_lock,
                "pid_file": self.pid_file,
                "started": self.started,
                "metrics": self.metrics,
                "logging": self.logging,
                "bound": None if self.bound is None else list(self.bound),
                "settings": self.settings,
                # Apart from the connections' maps: a build before it passes each
                # map's keys to HandedOver as they are, and would fail on a new one.
                "events_from": {
                    c.conn_id: c.events_from for c in self.connections if c.events_from
                },
                "names": {c.conn_id: c.name for c in self.connections if c.name},
                "identified": [c.conn_id for c in self.connections if c.identified],
                "opened": {c.conn_id: c.opened_seq for c in self.connections if c.opened_seq},
                # Ignored by an earlier build (it keeps them under hashed names).
                **_store_names_to_wire(self.fd_names),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Handoff:
        raw = cbor2.loads(data)
        if raw.get("version") != HANDOFF_VERSION:
            raise ValueError(f"unsupported handoff version {raw.get('version')!r}")
        return cls(
            tuple(ListenerFd(fd, path, admin) for fd, path, admin in raw["listeners"]),
            _conns_from_wire(
                raw["connections"],
                raw.get("events_from"),
                raw.get("names"),
                raw.get("identified"),
                raw.get("opened"),
            ),
            tuple((ls, res, fd) for ls, res, fd in raw["leases"]),
            raw["next_conn_id"],
            raw.get("journal_lock"),  # absent in a handoff from before they were passed
            raw.get("pid_file"),
            raw.get("started"),
            raw.get("metrics"),
            raw.get("logging"),
            _paths_or_none(raw.get("bound")),
            raw.get("settings") if isinstance(raw.get("settings"), dict) else None,
            _store_names(raw.get("fd_names"), raw.get("fd_held")),
        )


def _store_names_to_wire(names: StoreNames | None) -> dict[str, Any]:
    if names is None:
        return {}
    return {"fd_names": [list(item) for item in names[0]], "fd_held": list(names[1])}


def _store_names(leases: Any, held: Any) -> StoreNames | None:
    """The fd store's names as handed over; None when absent (an earlier build's)."""
    if leases is None:
        return None
    return tuple((ls, res, name) for ls, res, name in leases), tuple(held or ())


def _paths_or_none(value: Any) -> tuple[str, ...] | None:
    """A list of paths as handed over, or None for anything else (an earlier build's
    absent key, or nonsense: removing more socket files at the stop beats not starting)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _conn_to_wire(c: HandedOver) -> dict[str, Any]:
    out = attrs.asdict(c, recurse=False)
    del out["events_from"], out["name"], out["identified"], out["opened_seq"]  # see to_bytes
    out["owner"] = None if c.owner is None else c.owner.to_wire()
    return out


_CONN_KEYS = frozenset(field.name for field in attrs.fields(HandedOver))


def _conn_from_wire(data: dict[str, Any]) -> HandedOver:
    """A connection's map; keys this build does not know (a later build's, which should
    have put them beside the maps) are left behind with a warning: passed on to
    HandedOver they stopped the start, and every lock handed over with it."""
    owner = data.pop("owner")
    if unknown := data.keys() - _CONN_KEYS:
        log.warning("re-exec: client %s's %s left behind: this lockd does not know them",
                    data.get("conn_id"), ", ".join(sorted(map(repr, unknown))))  # fmt: skip
        data = {key: value for key, value in data.items() if key in _CONN_KEYS}
    return HandedOver(owner=None if owner is None else Owner.from_wire(owner), **data)


def _conns_from_wire(
    conns: list[dict[str, Any]],
    events_from: Any,
    names: Any = None,
    identified: Any = None,
    opened: Any = None,
) -> tuple[HandedOver, ...]:
    """The connections, each subscriber with the seq its events go on from (absent in
    a handoff from an earlier build: its subscribers go on from the next event), each
    with its ``hello`` name (absent from an earlier build: none), whether its
    ``connection-opened`` is journaled (absent from an earlier build: not), and the
    seq of that record's last copy (absent from an earlier build: not known)."""
    seqs = events_from if isinstance(events_from, dict) else {}
    named = names if isinstance(names, dict) else {}
    known = {c for c in identified if isinstance(c, int)} if isinstance(identified, list) else set()
    copies = opened if isinstance(opened, dict) else {}
    out = []
    for data in conns:
        conn = _conn_from_wire(data)
        seq = seqs.get(conn.conn_id)
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
            conn = attrs.evolve(conn, events_from=seq)
        name = named.get(conn.conn_id)
        if isinstance(name, str):
            conn = attrs.evolve(conn, name=name)
        if conn.conn_id in known:
            conn = attrs.evolve(conn, identified=True)
            copy = copies.get(conn.conn_id)
            if isinstance(copy, int) and not isinstance(copy, bool) and copy > 0:
                conn = attrs.evolve(conn, opened_seq=copy)
        out.append(conn)
    return tuple(out)


def read_handoff(fd: int) -> Handoff:
    """Read and close the handoff memfd given on the command line."""
    with os.fdopen(fd, "rb") as f:
        f.seek(0)
        handoff = Handoff.from_bytes(f.read())
    good = []
    for conn in handoff.connections:
        try:
            os.set_inheritable(conn.fd, False)
        except OSError as exc:
            log.error(
                "re-exec: client %d's socket did not survive (%s); dropped", conn.conn_id, exc
            )
            continue
        good.append(conn)
    listeners = [item.fd for item in handoff.listeners]
    for inherited in listeners + [f for _, _, f in handoff.leases] + handoff.own_fds():
        os.set_inheritable(inherited, False)  # these must be there: failing loudly is right
    return attrs.evolve(handoff, connections=tuple(good))


def exec_with(handoff: Handoff, argv: Sequence[str], *, block_signals: bool = True) -> None:
    """Replace this process by ``argv`` plus ``--handoff-fd``; the handed fds stay open.

    Raises OSError (and leaves this process as it was) when an fd is no longer
    open or the exec itself fails. The daemon's signals are blocked across the
    exec (:data:`lockd.procs.DAEMON_SIGNALS`) unless ``block_signals`` is off
    (a program from before the check would never unblock them).
    """
    for fd in handoff.all_fds():
        os.fstat(fd)  # every fd handed over must still be open
    memfd = os.memfd_create("lockd-handoff", os.MFD_CLOEXEC)
    os.write(memfd, handoff.to_bytes())
    for fd in handoff.all_fds():
        os.set_inheritable(fd, True)
    os.set_inheritable(memfd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS if block_signals else ())
    try:
        os.execv(argv[0], [*argv, "--handoff-fd", str(memfd)])  # noqa: S606 - our own binary
    finally:  # only reached when the exec failed
        os.close(memfd)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


REEXEC_DEADLINE_SECONDS = 10.0
"""How long a re-exec may wait for connections and lockspaces to go quiet before it gives up."""

AFTER_ABORT_SECONDS = 5.0
"""How long an abandoned re-exec waits for the answers of connections it quiesced
(each answers at once to :class:`Resume`) before it ends without them."""


@attrs.frozen
class _Deadline:
    """Self-sent when the re-exec took too long."""


@attrs.frozen
class _GiveUp:
    """Self-sent :data:`AFTER_ABORT_SECONDS` after the re-exec was abandoned."""


@attrs.frozen
class _Checked:
    """Self-sent (from the check's thread) with the new program's answer."""

    result: TargetCheck


class ReexecActor(DispatchedActor):
    """Quiesces the daemon and execs it; on any failure, resumes serving instead. Runs once."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        connections: Callable[[], Sequence[pykka.ActorRef[Any]]],
        stop_accepting: Callable[[], None],
        router: pykka.ActorRef[Any],
        journal: pykka.ActorRef[Any],
        owners: pykka.ActorRef[Any],
        listeners: Sequence[ListenerFd],
        next_conn_id: Callable[[], int],
        argv: Sequence[str],
        on_abort: Callable[[list[HandedOver], str], None],
        fences_resume: bool = True,
        before_exec: Callable[[], None] | None = None,
        own_fds: tuple[int | None, int | None] = (None, None),
        paths: Paths | None = None,
        started: float | None = None,
        log_config: tuple[str, str, str] | None = None,
        bound: Sequence[str] | None = None,
        on_done: Callable[[], None] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        openings: Callable[[], Mapping[int, int]] = dict,
        settings: Mapping[str, Any] | None = None,
        allowed_uids: tuple[int, ...] | None = None,
        fd_names: Callable[[], StoreNames] | None = None,
    ) -> None:
        """``connections``: the open client connections, asked once the new program
        passed its check and ``stop_accepting`` was called (until then the daemon
        serves as usual). ``before_exec``: last work of this process (a snapshot
        being written by a child is finished, so the next process is not left a
        child it does not know). ``on_done``: the re-exec is over in this process
        without an exec (abandoned, and every connection it quiesced has answered):
        until then a second one would quiesce connections whose answers come here.
        ``openings``: per connection, the seq of its ``connection-opened``'s last copy
        in the journal (read at the exec), which the next program keeps as this one.
        ``settings``: those in force (:func:`settings_of`), handed on; ``allowed_uids``:
        the ones in force, which a re-exec given up after its ``daemon-stopped`` names
        again in the ``daemon-started`` that says this program serves on."""
        super().__init__(dispatcher)
        self._fd_names = fd_names
        """The fd store's names, read at the exec (None: no store's, for tests)."""
        self._openings = openings
        self._settings = None if settings is None else dict(settings)
        self._allowed_uids = allowed_uids
        self._on_done = on_done
        self._stopping = stopping
        """True once the daemon is stopping (SIGTERM): the stop runs the messages still
        queued, and an exec from them would replace a daemon asked to stop."""
        self._before_exec = before_exec
        self._own_fds = own_fds
        """The journal directory's lock and the pid file (see :class:`Handoff`)."""
        self._paths = paths
        """This daemon's :data:`PATH_KEYS` (None: not compared, for tests)."""
        self._started = started
        """When this process first started (see :attr:`Handoff.started`)."""
        self._bound = None if bound is None else tuple(bound)
        """Socket files this daemon created (see :attr:`Handoff.bound`)."""
        self._log_config = log_config
        """The configuration's ``log_level``, ``log_filters`` and ``log_outputs`` (None:
        logging not handed on)."""
        self._fences_dropped: str | None = (
            None if fences_resume else "lost_lease_policy = log would not resume their fences"
        )
        """Why the next process would drop fences in progress, which then put the re-exec
        off; None: it resumes them, deadlines kept (lost_lease_policy = fence)."""
        self._list_connections = connections
        self._stop_accepting = stop_accepting
        self._connections: list[pykka.ActorRef[Any]] = []
        self._block_signals = True
        self._router = router
        self._journal = journal
        self._owners = owners
        self._listeners = tuple(listeners)
        self._next_conn_id = next_conn_id
        self._argv = list(argv)
        self._on_abort = on_abort
        self._waiting = 0
        self._handed: list[HandedOver] = []
        self._leases: tuple[tuple[str, str, int], ...] = ()
        self._done = False
        self._why = ""
        """Why it was abandoned (once ``_done``)."""
        self._stop_journaled = False
        """The journal says ``daemon-stopped`` (re-exec): an exec that fails after it
        says, with a ``daemon-started``, that this program serves on."""
        self._check_started = 0.0

    def on_start(self) -> None:
        if not os.access(self._argv[0], os.X_OK):
            self._abort(f"{self._argv[0]} is not executable")
            return
        ref, argv = self.actor_ref, tuple(self._argv)
        spawn = spawn_on(self.dispatcher)
        log.info("re-exec: checking that the new program starts")
        self._check_started = self.dispatcher.now()
        threading.Thread(
            target=lambda: tell_if_alive(ref, _Checked(_check_or_say_why(argv, spawn))),
            name="lockd-reexec-check",
            daemon=True,
        ).start()

    def _checked(self, result: TargetCheck) -> None:
        if self._stopping():
            self._abort("the daemon is stopping")
            return
        if not result.ok:
            self._abort(result.why)
            return
        moved = moved_paths(self._paths, result.paths) if self._paths is not None else []
        if moved:
            self._abort(
                f"the configuration now moves {', '.join(moved)}; a re-exec carries on with "
                "the running paths: restart lockd to change them, or undo the edit"
            )
            return
        took = (self.dispatcher.now() - self._check_started) * 1000
        log.info("re-exec: the new program passed its start-up check in %.0f ms", took)
        if not result.own_fds:
            log.warning(
                "re-exec: %s (its configuration passed --check-config): it takes the journal "
                "directory lock and the pid file itself (both are free while it starts), and "
                "signals are not blocked across the exec",
                result.why,
            )
            self._own_fds = (None, None)
            self._block_signals = False
            # Builds before 2026-11-26 07:10 resume no fence: the VM being killed ran on.
            self._fences_dropped = self._fences_dropped or (
                "the new program, a lockd from before --handoff-check, may not resume them"
            )
        ref = self.actor_ref
        self.dispatcher.call_later(REEXEC_DEADLINE_SECONDS, lambda: tell_if_alive(ref, _Deadline()))
        self._stop_accepting()
        self._connections = list(self._list_connections())
        # A fence in progress has its SIGKILL on a timer of this process: the next
        # process must take it over (recovery resumes it, its deadline kept).
        self._owners.tell(QueryFencing(self.actor_ref))

    def _quiesce(self) -> None:
        count = len(self._connections)
        log.info("re-exec: quiescing %d connection%s", count, "" if count == 1 else "s")
        for ref in self._connections:
            if ref.is_alive():
                self._waiting += 1
                ref.tell(Quiesce(self.actor_ref))
        if not self._waiting:
            self._router.tell(CollectFds(0, self.actor_ref))

    def on_receive(self, message: Any) -> Any:
        if self._done:
            self._after_abort(message)
            return None
        if isinstance(message, _Checked):
            self._checked(message.result)
        elif isinstance(message, Fencing):
            # A fence whose SIGKILL was sent only waits for the exit, which the next
            # process sees too; one whose SIGKILL is still to come needs resuming.
            timed = [f for f in message.fences if f.next_signal is not None]
            if timed and self._fences_dropped is not None:
                self._abort(
                    f"{len(timed)} owner(s) are being fenced and {self._fences_dropped}; "
                    "send SIGUSR1 again later"
                )
                return None
            if timed:
                log.info("re-exec: the next process resumes %d fence(s), deadlines kept",
                         len(timed))  # fmt: skip
            self._quiesce()
        elif isinstance(message, HandedOver | Gone):
            if isinstance(message, HandedOver):
                self._handed.append(message)
            self._waiting -= 1
            if self._waiting == 0:
                self._router.tell(CollectFds(0, self.actor_ref))
        elif isinstance(message, AllFds):
            if self._stopping():  # the stop journals its own DaemonStopped
                self._abort("the daemon is stopping")
                return None
            self._leases = message.fds
            self._journal.tell(Append((DaemonStopped("re-exec (SIGUSR1)"),), 0, self.actor_ref))
        elif isinstance(message, Appended | AppendFailed):
            self._stop_journaled = isinstance(message, Appended)
            self._exec()
        elif isinstance(message, _Deadline):
            self._abort(f"not quiet after {REEXEC_DEADLINE_SECONDS:g} s")
        else:
            return super().on_receive(message)
        return None

    def _logging(self) -> dict[str, str] | None:
        if self._log_config is None:
            return None
        now = logs.current()
        level, filters, outputs = self._log_config
        return {"level": now["level"], "filters": now["filters"], "config_level": level,
                "config_filters": filters, "config_outputs": outputs}  # fmt: skip

    def _exec(self) -> None:
        if self._stopping():
            self._abort("the daemon is stopping")
            return
        if self._before_exec is not None:
            try:
                self._before_exec()
            except OSError as exc:  # the next program does without what it finishes
                log.warning("re-exec: before exec: %s; going on", exc)
            if self._stopping():  # a SIGTERM's handler ran meanwhile: the exec would lose it
                self._abort("the daemon is stopping")
                return
        copies = self._openings()
        handed = tuple(
            attrs.evolve(c, opened_seq=copies.get(c.conn_id, c.opened_seq)) for c in self._handed
        )
        handoff = Handoff(
            self._listeners, handed, self._leases, self._next_conn_id(),
            *self._own_fds, self._started, REGISTRY.carried(), self._logging(), self._bound,
            self._settings, None if self._fd_names is None else self._fd_names(),
        )  # fmt: skip
        log.info(
            "re-exec: handing over %d listeners, %d connections, %d lease fds",
            len(self._listeners),
            len(self._handed),
            len(self._leases),
        )
        try:
            exec_with(handoff, self._argv, block_signals=self._block_signals)
        except OSError as exc:
            for fd in handoff.all_fds():
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
            self._abort(f"exec {self._argv[0]} failed: {exc}")

    def _abort(self, why: str) -> None:
        """Give up the re-exec and go on serving: the same process, the same locks."""
        self._done = True
        self._why = why
        log.error("re-exec abandoned: %s%s", why, "" if self._stopping() else "; serving on")
        if self._stop_journaled and not self._stopping():
            # Not an auditor's "stopped" with lease events after it and no start: the
            # same process, its version, pid and allowed uids, serves on (a stop
            # journals its own). Until 2026-11-28 it named no uids.
            started = DaemonStarted(build.version(), os.getpid(), self._allowed_uids)
            self._journal.tell(Append((started,), 0, None))
        self._router.tell(Unfreeze())
        self._on_abort(self._handed, why)
        self._handed = []
        if self._waiting <= 0:
            self.stop()
            return
        # Connections still finishing a request: they serve on; one that hands over
        # all the same (its answer crossed this) is taken back as it arrives.
        for ref in self._connections:
            tell_if_alive(ref, Resume(self.actor_ref))
        ref = self.actor_ref
        self.dispatcher.call_later(AFTER_ABORT_SECONDS, lambda: tell_if_alive(ref, _GiveUp()))

    def on_stop(self) -> None:
        if self._on_done is not None:
            self._on_done()

    def _after_abort(self, message: Any) -> None:
        if isinstance(message, _GiveUp):
            log.warning("re-exec: %d quiesced connection(s) never answered; "
                        "SIGUSR1 is taken again", self._waiting)  # fmt: skip
            self.stop()
            return
        if not isinstance(message, HandedOver | Gone):
            return
        if isinstance(message, HandedOver):
            self._on_abort([message], self._why)
        self._waiting -= 1
        if self._waiting <= 0:
            self.stop()
