"""A journal that cannot be written (a full disk): said once, again once a minute while it
lasts, and once when it is written again; not a log line per refused request."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from actors.events import DaemonStopped, JournalResumed
from actors.journal import PROBE_S, Append, JournalActor
from actors.metrics import REGISTRY
from actors.model import SyncPolicy
from actors.runtime import Dispatcher
from tests.actors.harness import Clock, MemoryJournal


class Journaled:
    """A journal actor on a manual clock (its stamps' wall clock ``wall_offset()``
    seconds off it), whose writer fails at will, and what the log said."""

    def __init__(
        self, caplog: pytest.LogCaptureFixture, wall_offset: Callable[[], float] = lambda: 0.0
    ) -> None:
        self.clock = Clock()
        self.dispatcher = Dispatcher(clock=self.clock)
        self.writer = MemoryJournal()
        self.ref = JournalActor.start(
            self.dispatcher, self.writer, host="test",
            clock=lambda: self.clock.now + wall_offset(),
        )  # fmt: skip
        actor = self.ref._actor_weakref()
        assert isinstance(actor, JournalActor)
        self.actor = actor
        self._caplog = caplog
        caplog.set_level(logging.INFO, logger="actors.journal")

    def append(self) -> None:
        self.ref.tell(Append((DaemonStopped("test"),), 0, None))
        self.dispatcher.run_until_idle()

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self._caplog.records if r.levelno >= logging.ERROR]

    def stop(self) -> None:
        self.ref.stop(block=False)
        self.dispatcher.run_until_idle()


def test_a_journal_that_stays_unwritable_is_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    j = Journaled(caplog)
    clock, writer, actor, append, errors = j.clock, j.writer, j.actor, j.append, j.errors
    writer.fail = True
    for _ in range(50):
        append()
        clock.now += 1
    assert len(errors()) == 1
    assert "No space left on device" in errors()[0]
    assert actor.trouble.refused == 50
    assert actor.trouble.since == 1000.0
    clock.now += 10  # 60 s since the first refused write
    append()
    assert len(errors()) == 2
    assert "51 writes refused in 60 s" in errors()[1]

    writer.fail = False
    append()
    assert "journal written again after 51 refused writes in 60 s" in caplog.text
    assert actor.trouble.error is None
    j.stop()


def _refusing() -> float:
    return REGISTRY.gauges["lockd_journal_refusing"][()]


def test_an_idle_journal_says_by_itself_that_it_takes_writes_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Space freed on a host where no VM starts or stops: within PROBE_S the journal
    writes ``journal-resumed`` of its own accord, and ``lockd_journal_refusing`` (what an
    alert watches) and ``status`` say it is written again. Until 2026-11-28 only the next
    change's write ended the spell. Its own tries while the disk stays full are no
    refused changes: neither counted nor logged as errors."""
    j = Journaled(caplog)
    clock, writer, actor, append, errors = j.clock, j.writer, j.actor, j.append, j.errors
    writer.fail = True
    append()
    append()
    assert _refusing() == 1
    for _ in range(3):  # three of its tries meet the full disk
        clock.now += PROBE_S
        j.dispatcher.run_until_idle()
    assert (actor.trouble.refused, len(errors()), writer.entries) == (2, 1, [])
    writer.fail = False  # space freed; no request comes
    clock.now += PROBE_S
    j.dispatcher.run_until_idle()
    assert _refusing() == 0
    assert actor.trouble.error is None
    assert "journal written again after 2 refused writes in 40 s" in caplog.text
    assert writer.events() == [JournalResumed(1000.0, 2, "[Errno 28] No space left on device")]
    clock.now += PROBE_S  # the spell is over: nothing more is written
    j.dispatcher.run_until_idle()
    assert len(writer.entries) == 1
    j.stop()


def test_the_first_change_after_a_spell_follows_the_record_of_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A change let through before the journal's own try comes first: one write holds
    ``journal-resumed``, then the change, so a reader meets the spell's end before it."""
    j = Journaled(caplog)
    j.writer.fail = True
    j.append()
    j.clock.now += 2
    j.writer.fail = False
    j.append()
    assert [(e.seq, e.event) for e in j.writer.entries] == [
        (1, JournalResumed(1000.0, 1, "[Errno 28] No space left on device")),
        (2, DaemonStopped("test")),
    ]
    j.clock.now += PROBE_S  # its try, due now, finds the spell over
    j.dispatcher.run_until_idle()
    assert len(j.writer.entries) == 2
    j.stop()


class FailingSync(MemoryJournal):
    """Writes go through; fdatasync fails while ``sync_fails`` (a disk failing EIO)."""

    def __init__(self) -> None:
        super().__init__()
        self.sync_fails = True

    def sync(self) -> None:
        if self.sync_fails:
            raise OSError(5, "Input/output error")
        super().sync()


def test_failing_fdatasyncs_are_logged_once_until_one_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With journal_sync = always on a disk whose syncs fail, every change still stands;
    the log says so once, not once per request, and says when a sync works again."""
    dispatcher = Dispatcher(clock=Clock())
    writer = FailingSync()
    ref = JournalActor.start(dispatcher, writer, sync=SyncPolicy.ALWAYS, host="test")
    caplog.set_level(logging.INFO, logger="actors.journal")
    for _ in range(30):
        ref.tell(Append((DaemonStopped("test"),), 0, None))
        dispatcher.run_until_idle()
    assert len(writer.entries) == 30  # the changes stand
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "Input/output error" in errors[0]
    writer.sync_fails = False
    ref.tell(Append((DaemonStopped("test"),), 0, None))
    dispatcher.run_until_idle()
    assert "journal fdatasync works again after 30 failed" in caplog.text
    ref.stop(block=False)
    dispatcher.run_until_idle()


@pytest.mark.parametrize("step", [-3 * 3600.0, 3 * 3600.0])
def test_a_wall_clock_step_moves_neither_the_reminder_nor_the_spell_s_length(
    caplog: pytest.LogCaptureFixture, step: float
) -> None:
    """The once-a-minute reminder is timed on the monotonic clock: timed on the wall
    clock, a step back of three hours (NTP, a wrong RTC corrected) silenced it for three
    hours while every change was refused, and the lines gave the spell a negative
    length; ``status``'s ``since`` stays the wall clock's."""
    wall = {"offset": 0.0}
    j = Journaled(caplog, wall_offset=lambda: wall["offset"])
    mono, writer, actor, append, errors = j.clock, j.writer, j.actor, j.append, j.errors
    writer.fail = True
    append()
    assert actor.trouble.since == 1000.0
    wall["offset"] = step
    mono.now += 30
    append()
    assert len(errors()) == 1
    mono.now += 30  # a minute since the first refused write
    append()
    assert len(errors()) == 2
    assert "3 writes refused in 60 s" in errors()[1]
    writer.fail = False
    append()
    assert "journal written again after 3 refused writes in 60 s" in caplog.text
    j.stop()
