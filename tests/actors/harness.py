"""The daemon's actors on one dispatcher, with fake transports, processes and journal.

Lease files are real (a temp lock dir), so kernel locks can be checked; the
rest is fake and driven step by step with ``run_until_idle`` on the test
thread: no sockets, no threads, no sleeps.
"""

from __future__ import annotations

import errno
import itertools
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pykka

from actors.connection import ConnectionActor, Received, ServerInfo
from actors.events import Event, JournalEntry
from actors.journal import REPLAY_BYTES, JournalActor
from actors.model import Owner, SyncPolicy
from actors.owners import OwnersActor
from actors.router import RouterActor
from actors.runtime import DispatchedActor, Dispatcher
from lockd.lockfiles import LockspaceDir
from protocol.codec import decode_item, encode_item
from protocol.framing import MAX_REPLY_FRAME, FrameDecoder, encode_frame
from protocol.names import WELL_KNOWN_LOCKSPACES
from tests.fakes import ListReader, PipeWatches


class Recorder(DispatchedActor):
    """Stands for an actor that is answered (the re-exec actor, a lockspace): keeps
    every message it gets in ``got``."""

    def __init__(self, dispatcher: Dispatcher, got: list[Any]) -> None:
        super().__init__(dispatcher)
        self.got = got

    def on_receive(self, message: Any) -> Any:
        self.got.append(message)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTransport:
    """Collects what the connection writes; records pause/resume and close."""

    def __init__(self, pid: int, uid: int, gid: int | None = None) -> None:
        self.peer_pid = pid
        self.peer_uid = uid
        self.peer_gid = uid if gid is None else gid
        self.gone = False
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True
        self.stuck_bytes = 0
        """Pretend this many bytes could not be sent (a client that does not read)."""
        self.peer_runs = True
        """False: the process that connected has exited (its pid may be another's now)."""
        self.crowded = False
        """True: all connections together have too many bytes unsent."""

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.written.append(data)

    @property
    def backlog(self) -> int:
        return self.stuck_bytes

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def fileno(self) -> int:
        return -1

    def peer_still_runs(self) -> bool:
        return self.peer_runs


class FakeProcesses:
    """A process table: pids with start times and uids; watches are pipes the test fires."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[int, int]] = {}
        self.gone: set[int] = set()
        self.signals: list[tuple[int, str]] = []
        self.ignores_sigterm: set[int] = set()
        self._watches = PipeWatches()
        self.zombies: set[int] = set()
        """Exited (in ``gone`` too) but not reaped: their pid still answers kill 0, and
        /proc their start time, uid and leader."""
        self.no_pidfds = False
        """True: open_watch fails like pidfd_open at the fd limit (EMFILE)."""
        self.unsignallable: set[int] = set()
        """Alive, but a signal cannot be sent to them (EMFILE on the pidfd it goes through)."""
        self.signaller_uid: int | None = None
        """The uid lockd runs as when not root: a signal to a process whose uids are
        others' is refused (EPERM), counted in ``refused``, as the kernel would."""
        self.refused = 0
        self.threads: dict[int, int] = {}
        """Thread ids (spawned like pids: /proc answers for them) and their process."""
        self.unreadable: set[int] = set()
        """Alive, but /proc cannot be read for them (EMFILE): the registration lookups
        answer None, as for no process, while is_gone says not known to be gone."""

    def spawn(self, pid: int, uid: int = 0, start: int = 100) -> int:
        self.procs[pid] = (start, uid)
        return pid

    def _in_proc(self, pid: int) -> bool:
        """Whether /proc has the pid: running, or a zombie (exited, not reaped)."""
        return pid in self.procs and (pid not in self.gone or pid in self.zombies)

    # ProcessInfo (registration)
    def start_time(self, pid: int) -> int | None:
        if not self._in_proc(pid) or pid in self.unreadable:
            return None
        return self.procs[pid][0]

    def uid_of(self, pid: int) -> int | None:
        return self.procs[pid][1] if self._in_proc(pid) else None

    def leader_of(self, pid: int) -> int | None:
        return self.threads.get(pid, pid) if self._in_proc(pid) else None

    def uids_of(self, pid: int) -> tuple[int, int] | None:
        uid = self.uid_of(pid)
        return None if uid is None else (uid, uid)

    # Processes (owners actor)
    def open_watch(self, owner: Owner) -> int | None:
        if self.is_gone(owner):
            return None
        if self.no_pidfds:
            raise OSError(errno.EMFILE, "Too many open files")
        return self._watches.open(owner.pid)

    def close_watch(self, fd: int) -> None:
        self._watches.close(fd)

    def is_watch(self, fd: int) -> bool:
        """True for a watch fd this table handed out and has not closed."""
        return fd in self._watches

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def is_gone(self, owner: Owner) -> bool:
        return self._gone(owner)

    def pid_gone(self, owner: Owner) -> bool:
        """A zombie (exited, not reaped) still has its pid: only is_gone sees it."""
        return self._gone(owner) and owner.pid not in self.zombies

    def _gone(self, owner: Owner) -> bool:
        if owner.pid in self.unreadable:
            return owner.pid in self.gone
        return owner.pid in self.gone or self.start_time(owner.pid) != owner.start_time

    def signal(self, owner: Owner, signum: int) -> bool:
        import signal as sig

        if self.is_gone(owner) or owner.pid in self.unsignallable:
            return False
        uids = self.uids_of(owner.pid)
        if self.signaller_uid is not None and uids is not None and self.signaller_uid not in uids:
            self.refused += 1
            return False
        name = sig.Signals(signum).name
        self.signals.append((owner.pid, name))
        if name == "SIGKILL" or owner.pid not in self.ignores_sigterm:
            self.exit(owner.pid)
        return True

    def exit(self, pid: int) -> None:
        """The process exits: its pidfd-like pipe becomes readable."""
        self.gone.add(pid)
        self._watches.fire(pid)

    def close(self) -> None:
        self._watches.close_all()


class MemoryJournal:
    """JournalWriter in memory; ``fail`` makes appends raise like a full disk, and
    ``during_append`` runs inside each write (what the daemon looks like meanwhile)."""

    def __init__(self) -> None:
        self.readers: list[ListReader] = []
        self.next_seq = 1
        self.entries: list[JournalEntry] = []
        self.fail = False
        self.syncs = 0
        self.during_append: Callable[[Sequence[JournalEntry]], None] | None = None

    def append(self, entries: Sequence[JournalEntry]) -> None:
        if self.during_append is not None:
            self.during_append(entries)
        if self.fail:
            raise OSError(28, "No space left on device")
        self.entries.extend(entries)
        self.next_seq += len(entries)

    def reader(self, since_seq: int) -> ListReader:
        self.readers.append(ListReader(self.entries, since_seq))
        return self.readers[-1]

    def sync(self) -> None:
        self.syncs += 1

    def events(self, kind: type[Event] | None = None) -> list[Any]:
        return [e.event for e in self.entries if kind is None or isinstance(e.event, kind)]


class Conn:
    """A test client on a fake transport: call() sends one request and returns its reply."""

    def __init__(
        self, harness: Harness, ref: pykka.ActorRef[Any], transport: FakeTransport
    ) -> None:
        self.harness = harness
        self.ref = ref
        self.transport = transport
        self._ids = itertools.count(1)
        self._frames = FrameDecoder(MAX_REPLY_FRAME)

    def send(self, op: str, **args: Any) -> int:
        rid = next(self._ids)
        self.send_raw(encode_frame(encode_item({"op": op, "id": rid, **args})))
        return rid

    def send_raw(self, data: bytes) -> None:
        self.ref.tell(Received(data))

    def messages(self) -> list[dict[str, Any]]:
        """Everything written to this client since the last call, decoded."""
        for chunk in self.transport.written:
            self._frames.receive_data(chunk)
        self.transport.written.clear()
        out = []
        while (frame := self._frames.next_frame()) is not None:
            out.append(decode_item(frame))
        return out

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        rid = self.send(op, **args)
        self.harness.run()
        replies = [m for m in self.messages() if m.get("id") == rid]
        assert len(replies) == 1, replies
        return replies[0]

    def ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.call(op, **args)
        assert "result" in reply, reply
        result: dict[str, Any] = reply["result"]
        return result

    def error(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.call(op, **args)
        assert "error" in reply, reply
        error: dict[str, Any] = reply["error"]
        return error

    def register(self, pid: int, name: str = "vm") -> dict[str, Any]:
        owner = {"uuid": uuid.uuid4().bytes, "name": name, "id": 1, "pid": pid}
        return self.ok("register", owner=owner)

    def close(self) -> None:
        """The peer closes its end."""
        self.send_raw(b"")
        self.harness.run()


class Harness:
    """Journal, router and owners actors on a manual-clock dispatcher."""

    def __init__(
        self,
        lock_dir: Path,
        sync: SyncPolicy = SyncPolicy.NONE,
        max_pidfds: int | None = None,
        open_lockspace: Callable[[str], LockspaceDir] = LockspaceDir,
        replay_bytes: int = REPLAY_BYTES,
        *,
        max_lockspaces: int = 4096,
        signals_as: int | None = None,
    ) -> None:
        self.clock = Clock()
        self.wall_offset = 0.0
        """How far the wall clock was stepped (:meth:`step_wall`); the monotonic clock never is."""
        self.dispatcher = Dispatcher(clock=self.clock)
        self.lock_dir = lock_dir
        self.journal_writer = MemoryJournal()
        self.processes = FakeProcesses()
        self.processes.signaller_uid = signals_as
        self.journal = JournalActor.start(
            self.dispatcher,
            self.journal_writer,
            sync=sync,
            host="test",
            clock=self.wall_clock,
            replay_bytes=replay_bytes,
        )
        self.router = RouterActor.start(
            self.dispatcher, lock_dir=str(lock_dir), journal=self.journal,
            open_lockspace=open_lockspace,
            journal_position=lambda: self.journal_writer.next_seq - 1,
            max_lockspaces=max_lockspaces,
        )  # fmt: skip
        self.owners = OwnersActor.start(
            self.dispatcher, processes=self.processes, router=self.router, journal=self.journal,
            grace=1.6, max_pidfds=max_pidfds, clock=self.wall_clock, signals_as=signals_as,
        )  # fmt: skip
        self.run()
        for name in WELL_KNOWN_LOCKSPACES:
            os.makedirs(lock_dir / name, exist_ok=True)
        self._ids = itertools.count(1)

    def run(self) -> None:
        self.dispatcher.run_until_idle()

    def owners_actor(self) -> OwnersActor:
        """The owners actor itself, for its counters (the test thread runs the dispatcher)."""
        actor = self.owners._actor_weakref()
        assert isinstance(actor, OwnersActor)
        return actor

    def wall_clock(self) -> float:
        """Wall-clock time (journal stamps, connections' ``connected_since``, the owners
        actor): 0 at the start, moved by :meth:`advance` and stepped by :meth:`step_wall`."""
        return self.clock.now - 1000.0 + self.wall_offset

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.run()

    def step_wall(self, seconds: float) -> None:
        """The wall clock steps (NTP, an operator's ``date -s``, a wrong RTC corrected)
        by ``seconds``, back if negative; no time passes."""
        self.wall_offset += seconds
        self.run()

    def connect(
        self, pid: int, uid: int = 0, *, admin: bool = False, idle_timeout: float = 0.0
    ) -> Conn:
        transport = FakeTransport(pid, uid)
        ref = ConnectionActor.start(
            self.dispatcher,
            conn_id=next(self._ids),
            transport=transport,
            router=self.router,
            owners=self.owners,
            journal=self.journal,
            processes=self.processes,
            info=ServerInfo("test", 1, 0.0, "test"),
            admin=admin,
            clock=self.clock,
            wall_clock=self.wall_clock,
            idle_timeout=idle_timeout,
        )
        conn = Conn(self, ref, transport)
        assert "result" in conn.call("hello", versions=[1])
        return conn

    def close(self) -> None:
        self.dispatcher.stop_all()
        self.run()
        self.processes.close()
        self.dispatcher.close()
