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

Subscribers (``subscribe`` connections) get each written entry as
:class:`Published`; one that asks from an earlier seq (``since``, or the seq a
re-exec handed over) is first given the entries read back from the journal,
a step per :class:`Subscribe`, and is made live in the step that reaches the
end: between the two, no entry is missed or sent twice.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import pykka

from actors.events import ConnectionOpened, Event, JournalEntry, JournalResumed
from actors.metrics import REGISTRY
from actors.model import SyncPolicy
from actors.recovery_core import ReplayState
from actors.runtime import DispatchedActor, Dispatcher, Timer, tell_if_alive

log = logging.getLogger(__name__)


class EntryReader(Protocol):
    """Entries read back from where a writer put them, oldest first
    (real: lockd.journal_file.JournalFollower)."""

    more: bool
    """The last poll returned [] only because it stopped at its budget: poll again."""

    def poll(self, max_bytes: int = -1) -> list[JournalEntry]:
        """The next entries, about ``max_bytes`` of them; [] when none are left
        (or :attr:`more`).

        Raises what reading the files meets: OSError, JournalCorruptError."""
        ...

    def park(self) -> None:
        """Let go of open files until the next poll (which picks up where this left)."""
        ...

    def skip_segment(self) -> int | None:
        """After damage: go on from the next segment; the seq it starts at, or None."""
        ...

    def close(self) -> None: ...


class JournalWriter(Protocol):
    """Where entries go (real: lockd.journal_file.FileJournal)."""

    next_seq: int

    def append(self, entries: Sequence[JournalEntry]) -> None: ...
    def sync(self) -> None: ...
    def reader(self, since_seq: int) -> EntryReader:
        """The entries written from ``since_seq`` on (those before the writer's
        retention kept are gone: the first one read may be later)."""
        ...


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


@attrs.define
class WriteTrouble:
    """Whether the journal refuses writes now (a full or failing disk), for ``status``:
    written by the journal actor, read by connections."""

    error: str | None = None
    """What the last refused write met; None while the journal is written."""
    since: float = 0.0
    """When the first refused write of this spell was (wall clock)."""
    refused: int = 0
    """Writes refused in this spell (each carried one or more clients' changes)."""
    on_change: Callable[[], None] | None = None
    """Called (on the dispatcher thread) as a spell begins and as it ends: the daemon
    tells the service manager, whose ``systemctl status`` an operator reads."""


TROUBLE_REMINDER_S = 60.0
"""While the journal stays unwritable, how often the log says so again: one line
per refused request would flood the log (which may be on the full disk too)."""

PROBE_S = 10.0
"""While the journal refuses writes, how often it tries to write the spell's end
(``journal-resumed``) itself. Ended only by a change's write, a spell outlived the
freed space on a host where no VM started or stopped: ``status`` and
``lockd_journal_refusing`` went on saying the journal refused, and an alert on it
fired on, until the next request."""


@attrs.frozen
class _Probe:
    """Self-sent every :data:`PROBE_S` while the journal refuses writes."""


@attrs.frozen
class Flush:
    """Self-sent: write every append queued so far."""


@attrs.frozen
class Identify:
    """Journal a connection's ``connection-opened`` (answered as an :class:`Append` of it
    is) and keep it while the connection is open: retention deletes no segment holding
    the last record of a live connection before writing that record again, marked as
    a repeat, in the current segment.

    ``written``: the record is in the journal already, at that seq (a connection a
    re-exec handed on; 0: at a seq not known, as from an earlier build), so nothing is
    written now."""

    opened: ConnectionOpened
    token: int
    reply_to: pykka.ActorRef[Any] | None
    written: int | None = None


@attrs.frozen
class ConnectionEnded:
    """Connection ``conn`` closed: its ``connection-opened`` need not be kept any more."""

    conn: int


Openings = dict[int, tuple[int, ConnectionOpened]]
"""Per live connection identified in the journal: the seq of its last record, and the
record (its first form, not a repeat)."""


@attrs.frozen
class SnapshotWritten:
    """Self-sent when a snapshot is done (``ok``: on disk); its segments may then go."""

    seq: int
    ok: bool


@attrs.frozen
class Subscribe:
    """Send every entry written from now on to ``subscriber`` as :class:`Published`;
    answered with :class:`Subscribed`.

    With ``since``, the entries from that seq on come first, read back from the
    journal in steps: each answer carries one step, and the subscriber asks for the
    next (``since`` = its ``next_seq``) when it has sent them on, so a slow reader
    sets the pace. The answer that reaches the end of the journal makes the
    subscription live, in the same step: no entry is missed or sent twice.
    """

    subscriber: pykka.ActorRef[Any]
    since: int | None = None
    token: int = 0


@attrs.frozen
class Subscribed:
    """Answer to :class:`Subscribe`."""

    token: int
    entries: tuple[JournalEntry, ...]
    """Read back from the journal, from ``since`` on (a later first seq: older ones
    are no longer kept)."""
    next_seq: int
    """The seq the subscriber is to get next: Subscribe again from it unless ``live``.
    Below the ``since`` asked: that seq is not written yet, and nothing is subscribed."""
    live: bool
    """Every entry from ``next_seq`` on will come as :class:`Published`."""


@attrs.frozen
class Unsubscribe:
    """Stop sending entries to ``subscriber``."""

    subscriber: pykka.ActorRef[Any]


@attrs.frozen
class Published:
    """Entries just written, for a subscriber."""

    entries: tuple[JournalEntry, ...]


@attrs.frozen
class _TryAgain:
    """Self-sent: try a replay step again (unless the subscriber left meanwhile)."""

    step: Subscribe


REPLAY_BYTES = 64 * 1024
"""About how much of the journal one replay step reads for a catching-up subscriber:
a few hundred entries, a few milliseconds of the dispatcher between other work."""

REPLAY_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0)
"""Seconds between the tries of a replay step that met a passing error (about 5 s
in all, below a re-exec's 10 s wait for a subscribe being answered); then the
replay ends with a gap, as for damage."""

PASSING_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR,
     errno.ENOENT}
)  # fmt: skip
"""Read errors a later try may not meet: the daemon's descriptors all in use (a
dense host near its limit), memory, or a segment that retention deleted between
listing and opening it (the next try lists again)."""


# Counted at every write, kept at hand (REGISTRY.series): three method calls per
# write were 1.5% of a pair's bytecodes.
_APPENDS = REGISTRY.series("lockd_journal_appends_total")
_ENTRIES = REGISTRY.series("lockd_journal_entries_total")
_BYTES = REGISTRY.series("lockd_journal_bytes_total")


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
        replay_bytes: int = REPLAY_BYTES,
        trouble: WriteTrouble | None = None,
        openings: Openings | None = None,
    ) -> None:
        """``openings``: where to keep the live connections' records (shared with the
        daemon, which hands them on in a re-exec)."""
        super().__init__(dispatcher)
        self.trouble = WriteTrouble() if trouble is None else trouble
        self.openings: Openings = {} if openings is None else openings
        REGISTRY.set("lockd_journal_refusing", 0)  # exported from the start
        self._refusing = self.trouble.error is not None
        """``trouble.error is not None``, kept as one flag: every write tests it."""
        self._spell_began = self._reminded = 0.0
        """When the spell of refused writes began and was last logged, on the dispatcher's
        monotonic clock: a wall clock stepped back silenced the reminder for as long."""
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
        self._replays: dict[str, EntryReader] = {}
        """Subscribers catching up from an earlier seq: where each has read to."""
        self._retries: dict[str, tuple[int, Timer]] = {}
        """Replays waiting to try a step again after a passing error: tries so far."""
        self._replay_bytes = replay_bytes
        self._count_subscribers()  # exported at 0 from the start
        self.failed_writes = 0
        self.failed_syncs = 0
        self._syncs_failing = 0
        """fdatasyncs failed since the last that worked."""

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
            if message.ok and hasattr(self._writer, "retain") and self._keep_openings(message.seq):
                self._writer.retain(message.seq)  # the segments it covers may go
            return None
        if isinstance(message, Identify):
            self._identify(message)
            return None
        if isinstance(message, _Probe):
            # A change's write may have ended the spell since; and appends queued for
            # a batch's write are about to try, with the record in front of them.
            if self.trouble.error is not None and not self._pending:
                self._write([], probing=True)
            return None
        if isinstance(message, ConnectionEnded):
            self.openings.pop(message.conn, None)
            return None
        if isinstance(message, Subscribe):
            self._subscribe(message)
            return None
        if isinstance(message, _TryAgain):
            # Sent by a timer, so it may come after the subscriber's Unsubscribe
            # (which ended the tries): then it would subscribe a connection gone.
            if message.step.subscriber.actor_urn in self._retries:
                self._subscribe(message.step)
            return None
        if isinstance(message, Unsubscribe):
            urn = message.subscriber.actor_urn
            self._subscribers.pop(urn, None)
            self._end_replay(urn)
            self._count_subscribers()
            return None
        return super().on_receive(message)

    def _write_now(self, append: Append) -> tuple[JournalEntry, ...] | None:
        """Write ``append`` at once, after the appends a batch holds (they came first);
        its entries, or None if the journal refused them."""
        batch, self._pending = self._pending, []
        everything = self._write([*batch, append])
        return None if everything is None else tuple(everything[-len(append.events) :])

    def _identify(self, message: Identify) -> None:
        opened = message.opened
        if message.written is not None:
            # Kept already when a re-exec given up takes the connection back: the seq
            # known here is the newest.
            self.openings.setdefault(opened.conn, (message.written, opened))
            return
        entries = self._write_now(Append((opened,), message.token, message.reply_to))
        if entries is not None:
            self.openings[opened.conn] = (entries[0].seq, opened)

    def _keep_openings(self, covered: int) -> bool:
        """Before retention deletes the segments the snapshot at ``covered`` lets go:
        write again the record of each live connection whose last one is in them, so
        that the kept journal still names who is behind the ``conn`` of its later
        changes. True once they are written (or none is needed); False if the journal
        refused them, and the segments stay until the next snapshot."""
        kept_from = getattr(self._writer, "retained_from", lambda _: None)(covered)
        if kept_from is None:
            return True
        stale = [opened for seq, opened in self.openings.values() if seq < kept_from]
        if not stale:
            return True
        again = tuple(attrs.evolve(opened, repeat=True) for opened in stale)
        entries = self._write_now(Append(again, 0, None))
        if entries is None:
            log.warning("journal retention at seq %d put off: the records of %d open "
                        "connections could not be written again", covered, len(stale))  # fmt: skip
            return False
        for opened, entry in zip(stale, entries, strict=True):
            self.openings[opened.conn] = (entry.seq, opened)
        return True

    def _subscribe(self, message: Subscribe) -> None:
        ref = message.subscriber
        urn = ref.actor_urn
        end = self._writer.next_seq
        since = end if message.since is None else max(1, message.since)
        if since > end:
            self._end_replay(urn)
            tell_if_alive(ref, Subscribed(message.token, (), end, live=False))
            return
        entries: list[JournalEntry] = []
        next_seq = end
        if since < end:
            reader = self._replays.get(urn)
            if reader is None:
                reader = self._replays[urn] = self._writer.reader(since)
            try:
                entries = reader.poll(self._replay_bytes)
            except Exception as exc:  # noqa: BLE001 - JournalCorruptError is no ValueError
                if self._try_again_later(message, reader, exc):
                    return
                next_seq = self._skip_damage(reader, since, end, exc)
            else:
                REGISTRY.add("lockd_events_replayed_total", len(entries))
                if entries:
                    next_seq = entries[-1].seq + 1
                elif reader.more:
                    next_seq = since  # a budget spent skipping to since: go on next step
                # Else nothing read though seqs are missing: they cannot be read, and
                # the subscriber sees the gap rather than wait for them.
            self._cancel_retry(urn)
        live = next_seq >= end
        if live:
            self._end_replay(urn)
            self._subscribers[urn] = ref
        elif urn in self._replays:
            # The next step waits for the subscriber's socket, maybe for long: hold no
            # fd, nor a segment that retention deletes, meanwhile.
            self._replays[urn].park()
        self._count_subscribers()
        tell_if_alive(ref, Subscribed(message.token, tuple(entries), next_seq, live))

    def _skip_damage(self, reader: EntryReader, since: int, end: int, exc: Exception) -> int:
        """Damage, or an error that lasts, ends the replay of its segment, never the
        journal actor (whose death stops the daemon): the replay goes on from the
        next segment, else from the journal's end. The seq it goes on from."""
        REGISTRY.inc("lockd_replay_failures_total")
        try:
            after = reader.skip_segment()
        except Exception:  # noqa: BLE001 - the directory itself unreadable: to the end
            after = None
        then = end if after is None else min(after, end)
        log.error("replaying the journal from seq %d for a subscriber failed: %s; it "
                  "goes on from seq %d", since, exc, then)  # fmt: skip
        return then

    def _try_again_later(self, message: Subscribe, reader: EntryReader, exc: Exception) -> bool:
        """A replay step that met a passing error is tried again a little later, the
        subscriber waiting meanwhile; True if it will be."""
        urn = message.subscriber.actor_urn
        tries = self._retries.pop(urn, (0, None))[0]
        if not (isinstance(exc, OSError) and exc.errno in PASSING_ERRORS):
            return False
        if tries >= len(REPLAY_RETRY_DELAYS):
            return False
        delay = REPLAY_RETRY_DELAYS[tries]
        if tries == 0:
            log.warning("replaying the journal for a subscriber: %s; trying again for "
                        "%g s", exc, sum(REPLAY_RETRY_DELAYS))  # fmt: skip
        reader.park()  # no fd held meanwhile: it may be what ran short
        ref = self.actor_ref
        again = _TryAgain(message)
        timer = self.dispatcher.call_later(delay, lambda: tell_if_alive(ref, again))
        self._retries[urn] = (tries + 1, timer)
        self._count_subscribers()
        return True

    def _cancel_retry(self, urn: str) -> None:
        retry = self._retries.pop(urn, None)
        if retry is not None:
            retry[1].cancel()

    def _count_subscribers(self) -> None:
        """The gauge of subscribed connections, live or catching up."""
        REGISTRY.set("lockd_event_subscribers", len(self._subscribers), state="live")
        REGISTRY.set("lockd_event_subscribers", len(self._replays), state="catching-up")

    def _end_replay(self, urn: str) -> None:
        self._cancel_retry(urn)
        reader = self._replays.pop(urn, None)
        if reader is not None:
            reader.close()

    def on_stop(self) -> None:
        for urn in list(self._replays):
            self._end_replay(urn)

    def _take_snapshot(self, seq: int) -> bool:
        """At a segment boundary: snapshot the state as of ``seq``. Always False (the
        writer deletes nothing itself): :class:`SnapshotWritten` follows once it is on
        disk, written inline or by a child, and retention runs then."""
        assert self._state is not None
        assert self._snapshots is not None
        if self._state.seq != seq:
            log.error("journal state at seq %d, rotation at %d: no snapshot", self._state.seq, seq)
            return False
        ref = self.actor_ref
        if self._snapshots.write(
            self._state, lambda at, ok: tell_if_alive(ref, SnapshotWritten(at, ok))
        ):
            # Written inline: retention waits all the same, for the write under way (in
            # the middle of an append) to end, since it may first write records again.
            ref.tell(SnapshotWritten(seq, True))
        return False

    def _refused(self, exc: OSError, now: float) -> None:
        """Log a refused write: the first of a spell, then once a minute (or when the
        error changes), not once per request as until 2026-11-27."""
        trouble = self.trouble
        trouble.refused += 1
        elapsed = self.dispatcher.now()
        if trouble.error is None:
            trouble.error, trouble.since = str(exc), now  # since: a wall-clock stamp
            self._spell_began = self._reminded = elapsed
            REGISTRY.set("lockd_journal_refusing", 1)
            self._refusing = True
            if trouble.on_change is not None:
                trouble.on_change()
            self._probe_later()
            log.error("journal write failed: %s; every change is refused (io-error) until "
                      "the journal can be written again, leases held stay held; said again "
                      "once a minute while it lasts (`lockd status` shows it)%s", exc,
                      self._failed_disk_hint(exc))  # fmt: skip
        elif str(exc) != trouble.error or elapsed - self._reminded >= TROUBLE_REMINDER_S:
            trouble.error, self._reminded = str(exc), elapsed
            log.error("journal write still failing: %s; %d writes refused in %.0f s",
                      exc, trouble.refused, elapsed - self._spell_began)  # fmt: skip
        else:
            log.debug("journal write failed: %s", exc)

    def _write_failed(self, exc: OSError, now: float, batch: list[Append], probing: bool) -> None:
        if probing:
            log.debug("journal still refuses writes: %s", exc)
            self._probe_later()
            return
        self.failed_writes += 1
        REGISTRY.inc("lockd_journal_write_errors_total")
        self._refused(exc, now)
        for append in batch:
            if append.reply_to is not None:
                tell_if_alive(
                    append.reply_to, AppendFailed(append.token, f"journal write failed: {exc}")
                )

    def _probe_later(self) -> None:
        ref = self.actor_ref
        self.dispatcher.call_later(PROBE_S, lambda: tell_if_alive(ref, _Probe()))

    def _failed_disk_hint(self, exc: OSError) -> str:
        """What the operator must know first of a journal filesystem gone read-only or
        failing: it comes back only unmounted, and with ``none`` the records the kernel
        had not written yet go with it, so a lockd started on it forgets live leases."""
        if exc.errno not in {errno.EROFS, errno.EIO} or self._sync is not SyncPolicy.NONE:
            return ""
        return (". The filesystem failed, and with journal_sync = none records not yet "
                "on the disk are lost when it is unmounted: copy the journal directory "
                "elsewhere and start lockd on the copy (docs/operations.md, \"When a disk "
                "fills up or fails\")")  # fmt: skip

    def _written_again(self) -> None:
        trouble = self.trouble
        log.warning("journal written again after %d refused writes in %.0f s (%s)",
                    trouble.refused, self.dispatcher.now() - self._spell_began,
                    trouble.error)  # fmt: skip
        trouble.error, trouble.since, trouble.refused = None, 0.0, 0
        REGISTRY.set("lockd_journal_refusing", 0)
        self._refusing = False
        if trouble.on_change is not None:
            trouble.on_change()

    def _write(self, batch: list[Append], probing: bool = False) -> list[JournalEntry] | None:
        """Write the batch's events; the entries written, None if the journal refused.

        The first write after a spell of refused ones begins with ``journal-resumed``,
        in the same write as the changes it lets through; ``probing``: nothing but it,
        the journal's own try (:class:`_Probe`), which, refused, is no refused change."""
        now = self._clock()
        if self._refusing:
            trouble = self.trouble
            resumed = JournalResumed(trouble.since, trouble.refused, trouble.error or "")
            batch = [Append((resumed,), 0, None), *batch]
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
            self._write_failed(exc, now, batch, probing)
            return None
        if self._refusing:
            self._written_again()
        _APPENDS[()] += 1
        _ENTRIES[()] += len(everything)
        _BYTES[()] += getattr(self._writer, "bytes_written", 0) - bytes_before
        if self._sync is not SyncPolicy.NONE:
            started = time.perf_counter()
            try:
                self._writer.sync()
                REGISTRY.observe("lockd_journal_fsync_seconds", time.perf_counter() - started)
            except OSError as exc:
                # The records are written: the state they describe is what the
                # daemon now holds, so the changes stand. Only host-crash
                # durability of these seqs is lost; say so loudly.
                # Logged at the first of a run of failures (a failing disk fails
                # every sync: until 2026-11-27 each request logged a line), then
                # counted only, until a sync works again.
                self.failed_syncs += 1
                REGISTRY.inc("lockd_journal_sync_errors_total")
                log.log(
                    logging.DEBUG if self._syncs_failing else logging.ERROR,
                    "journal fdatasync failed after seq %d was written: %s; the changes stand "
                    "but may not survive a host crash (further failures are counted in "
                    "lockd_journal_sync_errors_total, not logged, until one works)",
                    everything[-1].seq,
                    exc,
                )
                self._syncs_failing += 1
            else:
                if self._syncs_failing:
                    log.warning("journal fdatasync works again after %d failed",
                                self._syncs_failing)  # fmt: skip
                    self._syncs_failing = 0
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
        return everything
