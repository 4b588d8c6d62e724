"""JournalActor: every event reaches the journal before the reply that makes it visible.

Actors send :class:`Append` and get :class:`Appended` back once the entries
are written (``write()`` has returned, so they survive a crash of the daemon
process) and, for ``journal_sync = batch | always``, flushed to the disk.

Group commit (``batch``): appends queue in this actor's inbox while the
dispatcher runs other work. The first append of a batch sends :class:`Flush`
to the actor itself, which lands behind every append already queued; the
flush then writes them all with one ``write()`` and one ``fdatasync``.
``none`` writes each append at once (a ``write()`` costs microseconds; a
flush hop would cost more), and ``always`` syncs every append on its own.

Subscribers (``subscribe`` connections, ``lockd events`` followers through
the socket) get each written entry as :class:`Published`.
"""

from __future__ import annotations

import enum
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import pykka

from actors.events import Event, JournalEntry
from actors.metrics import REGISTRY
from actors.recovery_core import ReplayState
from actors.runtime import DispatchedActor, Dispatcher, tell_if_alive

log = logging.getLogger(__name__)


class SyncPolicy(enum.StrEnum):
    """What an appended event survives before its reply goes out."""

    NONE = "none"
    """write() only: survives a daemon crash, not a host crash."""
    BATCH = "batch"
    """One fdatasync per group of appends queued together: survives a host crash."""
    ALWAYS = "always"
    """One fdatasync per append: survives a host crash, no grouping."""


class JournalWriter(Protocol):
    """Where entries go (real: lockd.journal_file.FileJournal)."""

    next_seq: int

    def append(self, entries: Sequence[JournalEntry]) -> None: ...
    def sync(self) -> None: ...


class Snapshots(Protocol):
    """Where snapshots of the journal's state go (real: lockd.snapshot.SnapshotWriter)."""

    def write(self, state: ReplayState, done: Callable[[int, bool], None] | None = None) -> bool:
        """Write ``state``'s snapshot; True if on disk now, else ``done`` may follow."""
        ...


@attrs.frozen
class Append:
    """Journal ``events`` and tell ``reply_to`` :class:`Appended` or :class:`AppendFailed`."""

    events: tuple[Event, ...]
    token: int
    reply_to: pykka.ActorRef[Any] | None


@attrs.frozen
class Appended:
    """Reply: the events are in the journal as these entries."""

    token: int
    entries: tuple[JournalEntry, ...]


@attrs.frozen
class AppendFailed:
    """Reply: the journal could not be written; nothing was appended."""

    token: int
    message: str


@attrs.frozen
class Flush:
    """Self-sent: write every append queued so far."""


@attrs.frozen
class SnapshotWritten:
    """Self-sent when a snapshot written in the background is done (``ok``: on disk)."""

    seq: int
    ok: bool


@attrs.frozen
class Subscribe:
    """Send every entry written from now on to ``subscriber`` as :class:`Published`."""

    subscriber: pykka.ActorRef[Any]


@attrs.frozen
class Unsubscribe:
    """Stop sending entries to ``subscriber``."""

    subscriber: pykka.ActorRef[Any]


@attrs.frozen
class Published:
    """Entries just written, for a subscriber."""

    entries: tuple[JournalEntry, ...]


class JournalActor(DispatchedActor):
    """The only writer of the journal."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        writer: JournalWriter,
        *,
        sync: SyncPolicy = SyncPolicy.NONE,
        host: str | None = None,
        clock: Callable[[], float] = time.time,
        state: ReplayState | None = None,
        snapshots: Snapshots | None = None,
    ) -> None:
        super().__init__(dispatcher)
        self._writer = writer
        self._state = state
        """The journal's own fold of what it wrote: the source of snapshots."""
        self._snapshots = snapshots
        if state is not None and snapshots is not None and hasattr(writer, "on_rotate"):
            writer.on_rotate = self._take_snapshot
        self._sync = sync
        self._host = host or socket.gethostname()
        self._clock = clock
        self._pending: list[Append] = []
        self._subscribers: dict[str, pykka.ActorRef[Any]] = {}
        self.failed_writes = 0
        self.failed_syncs = 0

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Append):
            if self._sync is SyncPolicy.BATCH:
                if not self._pending:
                    self.actor_ref.tell(Flush())
                self._pending.append(message)
            else:
                # none: a write() is cheap and grouping would only add a hop;
                # always: every append gets its own fdatasync by definition.
                self._write([message])
            return None
        if isinstance(message, Flush):
            batch, self._pending = self._pending, []
            if batch:
                self._write(batch)
            return None
        if isinstance(message, SnapshotWritten):
            if message.ok and hasattr(self._writer, "retain"):
                self._writer.retain(message.seq)  # the segments it covers may go
            return None
        if isinstance(message, Subscribe):
            self._subscribers[message.subscriber.actor_urn] = message.subscriber
            return None
        if isinstance(message, Unsubscribe):
            self._subscribers.pop(message.subscriber.actor_urn, None)
            return None
        return super().on_receive(message)

    def _take_snapshot(self, seq: int) -> bool:
        """At a segment boundary: snapshot the state as of ``seq``; True once it is on disk.

        False while a child process writes it: :class:`SnapshotWritten` follows.
        """
        assert self._state is not None
        assert self._snapshots is not None
        if self._state.seq != seq:
            log.error("journal state at seq %d, rotation at %d: no snapshot", self._state.seq, seq)
            return False
        ref = self.actor_ref
        return self._snapshots.write(
            self._state, lambda at, ok: tell_if_alive(ref, SnapshotWritten(at, ok))
        )

    def _write(self, batch: list[Append]) -> None:
        now = self._clock()
        seq = self._writer.next_seq
        host = self._host
        groups: list[tuple[Append, tuple[JournalEntry, ...]]] = []
        everything: list[JournalEntry] = []
        for append in batch:
            entries = tuple(
                JournalEntry(seq + i, now, host, event) for i, event in enumerate(append.events)
            )
            seq += len(entries)
            groups.append((append, entries))
            everything += entries
        bytes_before = getattr(self._writer, "bytes_written", 0)
        try:
            self._writer.append(everything)
        except OSError as exc:
            self.failed_writes += 1
            REGISTRY.inc("lockd_journal_write_errors_total")
            log.error("journal write failed, refusing the changes it carried: %s", exc)
            for append, _ in groups:
                if append.reply_to is not None:
                    tell_if_alive(
                        append.reply_to, AppendFailed(append.token, f"journal write failed: {exc}")
                    )
            return
        REGISTRY.add("lockd_journal_appends_total")
        REGISTRY.add("lockd_journal_entries_total", len(everything))
        REGISTRY.add(
            "lockd_journal_bytes_total", getattr(self._writer, "bytes_written", 0) - bytes_before
        )
        if self._sync is not SyncPolicy.NONE:
            started = time.perf_counter()
            try:
                self._writer.sync()
                REGISTRY.observe("lockd_journal_fsync_seconds", time.perf_counter() - started)
            except OSError as exc:
                # The records are written: the state they describe is what the
                # daemon now holds, so the changes stand. Only host-crash
                # durability of these seqs is lost; say so loudly.
                self.failed_syncs += 1
                log.error(
                    "journal fdatasync failed after seq %d was written: %s; the changes stand "
                    "but may not survive a host crash",
                    everything[-1].seq,
                    exc,
                )
        if self._state is not None:
            for entry in everything:
                self._state.fold(entry)
        for append, entries in groups:
            if append.reply_to is not None:
                tell_if_alive(append.reply_to, Appended(append.token, entries))
        if self._subscribers and everything:
            published = Published(tuple(everything))
            for ref in list(self._subscribers.values()):
                tell_if_alive(ref, published)
