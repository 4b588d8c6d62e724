"""Snapshots on disk and replay from them: fallbacks, gaps and damage are explicit."""

from __future__ import annotations

import errno
import gc
import os
import uuid
from pathlib import Path

import pytest

from actors.events import (
    DaemonStarted,
    JournalEntry,
    LeaseAcquired,
    LeaseReleased,
    ReleaseReason,
)
from actors.model import LeaseMode, Owner
from actors.recovery_core import ReplayState
from lockd.journal_file import FileJournal, list_segments
from lockd.journal_format import JournalCorruptError
from lockd.replay import replay
from lockd.snapshot import SnapshotWriter, list_snapshots, load_newest, prune, write_snapshot

OWNER = Owner(uuid.uuid4().bytes, "vm", 1, 42, 9)


def acquired(seq: int) -> JournalEntry:
    return JournalEntry(
        seq, 1.0, "h", LeaseAcquired("ls", f"r{seq}", LeaseMode.EXCLUSIVE, OWNER, 1, True)
    )


def fill(directory: Path, count: int, segment_bytes: int = 4096) -> ReplayState:
    """Write ``count`` acquisitions with a snapshot at every rotation, like the daemon."""
    state = ReplayState()
    journal = FileJournal(str(directory), segment_bytes, retain_segments=1)

    writer = SnapshotWriter(str(directory))

    def snap(seq: int) -> bool:
        assert state.seq == seq
        return writer.write(state)

    journal.on_rotate = snap
    for seq in range(1, count + 1):
        entry = acquired(seq)
        journal.append([entry])
        state.fold(entry)
    journal.close()
    return state


def reopen(directory: Path) -> tuple[ReplayState, int]:
    snapshot = load_newest(str(directory))
    journal = FileJournal(str(directory), 4096, first_seq=snapshot.seq + 1 if snapshot else 1)
    try:
        return replay(journal, snapshot)
    finally:
        journal.close()


def test_replay_from_snapshot_reads_only_the_tail(tmp_path: Path) -> None:
    written = fill(tmp_path, 200)
    assert len(list_snapshots(str(tmp_path))) == 2
    assert len(list_segments(str(tmp_path))) == 2  # retention 1 + the current one
    state, replayed = reopen(tmp_path)
    assert state.seq == 200
    assert set(state.leases) == set(written.leases)
    assert replayed < 60


def test_a_damaged_newest_snapshot_falls_back_to_the_older_one(tmp_path: Path) -> None:
    """Retention keeps the segment after the older snapshot, so nothing is lost."""
    written = fill(tmp_path, 200)
    newest = tmp_path / list_snapshots(str(tmp_path))[-1]
    newest.write_bytes(newest.read_bytes()[:-3] + b"xyz")
    state, _ = reopen(tmp_path)
    assert state.seq == 200
    assert set(state.leases) == set(written.leases)


def test_history_missing_after_the_snapshot_is_refused(tmp_path: Path) -> None:
    fill(tmp_path, 200)
    for name in list_snapshots(str(tmp_path)):
        (tmp_path / name).unlink()
    with pytest.raises(JournalCorruptError, match="missing and no snapshot covers them"):
        reopen(tmp_path)  # segments 1.. were pruned: refuse, never guess


def test_a_torn_snapshot_tmp_is_ignored_and_cleaned(tmp_path: Path) -> None:
    fill(tmp_path, 100)
    (tmp_path / ".snapshot-00000000000000000999.cbor.tmp").write_bytes(b"half")
    state, _ = reopen(tmp_path)
    assert state.seq == 100
    prune(str(tmp_path))
    assert not list(tmp_path.glob(".snapshot-*"))


def test_a_snapshot_whose_rename_fails_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename that puts a written snapshot in place fails (EIO, a read-only
    remount): the error is raised and its temporary file, a whole state's size, is
    deleted (it stayed until a later snapshot was written and pruned it)."""
    state = ReplayState()
    for seq in range(1, 50):
        state.fold(acquired(seq))

    def failing(_src: str, _dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="Input/output"):
        write_snapshot(str(tmp_path), state)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_no_snapshot_replays_everything(tmp_path: Path) -> None:
    journal = FileJournal(str(tmp_path))
    journal.append([JournalEntry(1, 0.0, "h", DaemonStarted("1", 1)), acquired(2)])
    journal.close()
    state, replayed = reopen(tmp_path)
    assert (state.seq, replayed, len(state.leases)) == (2, 2, 1)


def test_snapshot_without_segments_continues_the_numbering(tmp_path: Path) -> None:
    fill(tmp_path, 200)
    for name in list_segments(str(tmp_path)):
        (tmp_path / name).unlink()
    snapshot = load_newest(str(tmp_path))
    assert snapshot is not None
    journal = FileJournal(str(tmp_path), first_seq=snapshot.seq + 1)
    assert journal.next_seq == snapshot.seq + 1
    journal.close()


def test_an_orphaned_snapshot_child_never_renames_the_next_daemons_half_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon SIGKILLed while its child writes the snapshot of seq N leaves the child
    running; the next daemon rotates at the same seq and writes that snapshot too. The
    child's rename must take only its own file, never the other's half-written one."""
    import os

    from lockd import snapshot

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:  # the orphaned child: its file is written, it waits before the rename
        try:
            orphans = fill(tmp_path / "a", 30)
            monkeypatch.setattr(
                snapshot, "crash_point", lambda _name: (os.write(ready_w, b"."), os.read(go_r, 1))
            )
            snapshot.write_snapshot(str(tmp_path), orphans)
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    real_write, halves = os.write, [0]

    def half_then_the_child_renames(fd: int, data: bytes | memoryview) -> int:
        if halves[0]:
            return real_write(fd, data)
        halves[0] = 1
        written = real_write(fd, data[: len(data) // 2])
        real_write(go_w, b".")  # the child renames now, this file half written
        os.waitpid(child, 0)
        return written

    state = fill(tmp_path / "b", 30)
    monkeypatch.setattr(os, "write", half_then_the_child_renames)
    snapshot.write_snapshot(str(tmp_path), state)
    monkeypatch.undo()
    assert load_newest(str(tmp_path)) == state  # whole, whichever rename came last


def _owners_in(state: ReplayState) -> set[Owner]:
    """Every Owner the state's containers and lockd objects lead to."""
    found: set[Owner] = set()
    seen: set[int] = set()
    todo: list[object] = [state]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Owner):
            found.add(item)
        elif isinstance(item, (dict, list, tuple, set, frozenset)) or type(
            item
        ).__module__.startswith("actors."):
            todo.extend(gc.get_referents(item))
    return found


def test_the_replayed_state_keeps_no_owner_of_the_history_it_read(tmp_path: Path) -> None:
    """The replayed state lives on as the journal's own fold for as long as the daemon:
    the owners of the VMs that started and stopped in the history it read are not kept
    in it (they were, about 4 MiB per 8 MiB segment, until the next restart); the owner
    of a lease still held is."""
    journal = FileJournal(str(tmp_path), 8 * 1024 * 1024)
    seq = 0
    for vm in range(2000):
        owner = Owner(uuid.uuid4().bytes, f"vm{vm}", 1, 10_000 + vm, 5)
        lease = ("ls", f"disk{vm}", LeaseMode.EXCLUSIVE, owner, 1)
        journal.append([
            JournalEntry(seq + 1, 1.0, "h", LeaseAcquired(*lease, True)),
            JournalEntry(seq + 2, 2.0, "h", LeaseReleased(*lease, ReleaseReason.OWNER_EXIT)),
        ])  # fmt: skip
        seq += 2
    running = Owner(uuid.uuid4().bytes, "running", 1, 9_999, 5)
    journal.append(
        [JournalEntry(seq + 1, 3.0, "h", LeaseAcquired("ls", "kept", LeaseMode.EXCLUSIVE,
                                                        running, 1, True))]
    )  # fmt: skip
    journal.close()
    journal = FileJournal(str(tmp_path), 8 * 1024 * 1024, first_seq=1)
    try:
        state, replayed = replay(journal, None)
    finally:
        journal.close()
    assert replayed == 4001
    assert set(state.leases) == {("ls", "kept")}
    assert _owners_in(state) == {running}
