"""The journal keeps a record of each open connection: retention deletes no segment
holding the last ``connection-opened`` of a connection still open before writing it
again, so that the kept journal names who is behind the ``conn`` of its later changes."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest

from actors.events import ConnectionOpened, DaemonStopped
from actors.journal import (
    Append,
    ConnectionEnded,
    Identify,
    JournalActor,
    SnapshotWritten,
)
from actors.model import SyncPolicy
from actors.runtime import Dispatcher
from tests.actors.harness import MemoryJournal


class RetainingJournal(MemoryJournal):
    """A journal whose retention would keep the records from ``kept_from`` on (None:
    it deletes nothing), and says what it was asked to delete."""

    def __init__(self) -> None:
        super().__init__()
        self.kept_from: int | None = None
        self.retained: list[int] = []

    def retained_from(self, covered: int) -> int | None:
        return self.kept_from

    def retain(self, covered: int) -> None:
        self.retained.append(covered)


VM = ConnectionOpened(5, 4242, 107, 107, False, 1764000000.5)
BRIEF = ConnectionOpened(6, 4343, 0, 0, False, 1764000001.5)


@pytest.fixture(params=[SyncPolicy.NONE, SyncPolicy.BATCH])
def journal(request: pytest.FixtureRequest) -> Any:
    dispatcher = Dispatcher()
    writer = RetainingJournal()
    ref = JournalActor.start(dispatcher, writer, sync=request.param, host="test")

    def tell(message: Any) -> None:
        ref.tell(message)
        dispatcher.run_until_idle()

    yield writer, tell
    ref.stop(block=False)
    dispatcher.run_until_idle()


def test_a_live_connection_s_record_is_written_again_before_its_segment_goes(
    journal: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Written again (``repeat``) when retention would delete its last copy, once per
    copy; not while the copy is kept, nor once the connection closed. A journal that
    refuses the copy puts the deletion off (the segments stay) until a later snapshot."""
    writer, tell = journal
    tell(Identify(VM, 0, None))
    tell(Identify(BRIEF, 0, None))
    tell(Append((DaemonStopped("filler"),), 0, None))
    tell(ConnectionEnded(BRIEF.conn))
    writer.kept_from = 2  # the first record's segment goes; BRIEF's is kept
    writer.fail = True
    tell(SnapshotWritten(3, True))
    assert writer.retained == []
    assert "retention at seq 3 put off" in caplog.text
    writer.fail = False
    tell(SnapshotWritten(3, True))
    assert writer.retained == [3]
    resumed, copy = writer.entries[-2:]  # the refusal's end is said first
    assert (resumed.seq, resumed.event.TYPE) == (4, "journal-resumed")
    assert (copy.seq, copy.event) == (5, attrs.evolve(VM, repeat=True))
    writer.kept_from = 5  # the copy is kept: nothing to write again
    tell(SnapshotWritten(5, True))
    assert (len(writer.entries), writer.retained) == (5, [3, 5])
    writer.kept_from = 10  # BRIEF closed: not written again; VM's copy is
    tell(SnapshotWritten(6, True))
    assert [e.event.conn for e in writer.entries[5:]] == [VM.conn]
    tell(ConnectionEnded(VM.conn))
    writer.kept_from = 20
    tell(SnapshotWritten(7, True))
    assert len(writer.entries) == 6
    assert writer.retained == [3, 5, 6, 7]


def test_a_connection_handed_on_by_a_reexec_is_kept_from_the_seq_it_names(
    journal: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-exec hands each connection on with the seq of its record's last copy: kept
    from there, nothing written now; one from an earlier build (0) is written again at
    the first deletion."""
    writer, tell = journal
    caplog.set_level(logging.WARNING)
    tell(Append(tuple(DaemonStopped("filler") for _ in range(9)), 0, None))
    tell(Identify(VM, 0, None, written=7))
    tell(Identify(BRIEF, 0, None, written=0))
    assert len(writer.entries) == 9
    writer.kept_from = 5
    tell(SnapshotWritten(4, True))
    assert [(e.event.conn, e.event.repeat) for e in writer.entries[9:]] == [(BRIEF.conn, True)]
