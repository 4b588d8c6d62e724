"""Snapshots written by a forked child: the daemon goes on, and hears when it is on disk."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.events import JournalEntry, LeaseAcquired
from actors.metrics import REGISTRY
from actors.model import LeaseMode, Owner
from actors.recovery_core import ReplayState
from actors.runtime import Dispatcher
from lockd import snapshot as snapshot_module
from lockd.journal_file import FileJournal, first_seq_of, list_segments
from lockd.lockfiles import try_lock
from lockd.snapshot import (
    STOP_WAIT_S,
    SnapshotWriter,
    list_snapshots,
    load_newest,
    snapshot_name,
)

OWNER = Owner(uuid.uuid4().bytes, "vm", 1, 42, 9)


def acquired(seq: int) -> JournalEntry:
    return JournalEntry(
        seq, 1.0, "h", LeaseAcquired("ls", f"r{seq}", LeaseMode.EXCLUSIVE, OWNER, 1, True)
    )


def state_of(count: int) -> ReplayState:
    state = ReplayState()
    for seq in range(1, count + 1):
        state.fold(acquired(seq))
    return state


def snapshots(result: str) -> float:
    """``lockd_journal_snapshots_total{result}`` so far (operators alert on failed)."""
    return REGISTRY.counters.get("lockd_journal_snapshots_total", {}).get((("result", result),), 0)


def run_until(dispatcher: Dispatcher, done: list[tuple[int, bool]]) -> None:
    deadline = time.monotonic() + 30
    while not done:
        assert time.monotonic() < deadline, "the snapshot child never reported"
        dispatcher.run_once(timeout=0.1)


def children() -> set[int]:
    """This process's children, zombies included (until reaped)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """Every test here reaps the snapshot children it forked."""
    before = children()
    yield
    assert children() <= before


def test_the_child_writes_the_state_as_of_the_call_while_the_caller_goes_on(
    tmp_path: Path, dispatcher: Dispatcher
) -> None:
    """The daemon's state keeps changing after the fork; the snapshot is the one asked for."""
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    writer = SnapshotWriter(str(journal_dir), dispatcher, may_fork=lambda: True)
    state = state_of(500)
    written_before = snapshots("written")
    done: list[tuple[int, bool]] = []
    assert not writer.write(state, lambda seq, ok: done.append((seq, ok)))
    assert done == []  # reported from the loop, once the child has exited
    state.fold(acquired(501))  # the daemon goes on
    run_until(dispatcher, done)
    assert done == [(500, True)]
    assert snapshots("written") == written_before + 1
    written = load_newest(str(journal_dir))
    assert written is not None
    assert written.seq == 500
    assert len(written.leases) == 500


def test_a_failed_child_reports_why_and_covers_nothing(
    tmp_path: Path, dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    journal_dir = tmp_path / "journal"
    (journal_dir / snapshot_name(7) / "in-the-way").mkdir(parents=True)  # rename cannot replace it
    writer = SnapshotWriter(str(journal_dir), dispatcher, may_fork=lambda: True)
    failed = snapshots("failed")
    done: list[tuple[int, bool]] = []
    with caplog.at_level(logging.ERROR):
        writer.write(state_of(7), lambda seq, ok: done.append((seq, ok)))
        run_until(dispatcher, done)
    assert done == [(7, False)]
    assert snapshots("failed") == failed + 1
    assert "journal snapshot at seq 7 failed" in caplog.text
    assert "Error" in caplog.text  # the child's own reason, not only its exit status


def test_a_lease_released_right_after_the_fork_is_free_at_once(
    tmp_path: Path, dispatcher: Dispatcher
) -> None:
    """The child inherits the lease fds; until it has closed them, an OFD lock released
    here would stay held by its copy. write() returns only once the child closed them."""
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    writer = SnapshotWriter(str(journal_dir), dispatcher, may_fork=lambda: True)
    lease = tmp_path / "lease"
    lease.touch()
    for seq in range(1, 21):
        held = os.open(lease, os.O_RDWR)
        try_lock(held, shared=False)
        writer.write(state_of(seq), lambda _seq, _ok: None)
        os.close(held)  # the release: its lock must go now, not when the child exits
        probe = os.open(lease, os.O_RDWR)
        try:
            try_lock(probe, shared=False)  # raises LockBusyError if the child still holds it
        finally:
            os.close(probe)
        writer.wait()


def test_wait_finishes_a_snapshot_in_progress(tmp_path: Path, dispatcher: Dispatcher) -> None:
    """Shutdown and re-exec wait: no snapshot is cut short, no child outlives the daemon."""
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
    done: list[tuple[int, bool]] = []
    writer.write(state_of(3), lambda seq, ok: done.append((seq, ok)))
    writer.wait()
    assert done == [(3, True)]
    assert list_snapshots(str(tmp_path)) == [snapshot_name(3)]
    writer.wait()  # nothing in progress: returns at once


def slow_snapshots(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Children forked from here on take ``seconds`` before writing (a slow or hung disk)."""
    real = snapshot_module.write_snapshot

    def slow(directory: str, state: ReplayState) -> str:
        time.sleep(seconds)
        return real(directory, state)

    monkeypatch.setattr(snapshot_module, "write_snapshot", slow)


def test_a_rotation_while_the_last_snapshot_is_still_written_skips_it_without_waiting(
    tmp_path: Path, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for the previous child would stall every request; the next rotation's
    snapshot covers what this one would have."""
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
    slow_snapshots(monkeypatch, 1.0)
    skipped = snapshots("skipped")
    done: list[tuple[int, bool]] = []
    writer.write(state_of(3), lambda seq, ok: done.append((seq, ok)))
    started = time.monotonic()
    assert not writer.write(state_of(5), lambda seq, ok: done.append((seq, ok)))
    assert time.monotonic() - started < 0.5
    assert snapshots("skipped") == skipped + 1
    run_until(dispatcher, done)
    assert done == [(3, True)]
    monkeypatch.undo()
    writer.write(state_of(8), lambda seq, ok: done.append((seq, ok)))  # the child is done
    writer.wait()
    assert done == [(3, True), (8, True)]
    assert list_snapshots(str(tmp_path)) == [snapshot_name(3), snapshot_name(8)]


def test_a_daemon_with_thousands_of_fds_still_checks_on_its_snapshot_child(
    tmp_path: Path, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon holding leases has fds past 1024, where select() cannot look: the check
    for a finished child at the next rotation must work there too (select() raised, and
    took the journal, and so the daemon, down)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"fd hard limit {hard} is too low to open 1,100 fds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
        done: list[tuple[int, bool]] = []
        writer.write(state_of(3), lambda seq, ok: done.append((seq, ok)))
        writer.write(state_of(5), lambda seq, ok: done.append((seq, ok)))  # skipped or next
        writer.wait()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert done[0] == (3, True)
    assert snapshot_name(3) in list_snapshots(str(tmp_path))


def test_a_stop_at_the_fd_limit_still_waits_for_the_snapshot(
    tmp_path: Path, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lease is an fd: a daemon may stop at its fd limit, and waiting for the child
    must not need one more (an epoll fd raised EMFILE there)."""
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
    slow_snapshots(monkeypatch, 0.5)
    done: list[tuple[int, bool]] = []
    writer.write(state_of(3), lambda seq, ok: done.append((seq, ok)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                filler.append(os.open(os.devnull, os.O_RDONLY))
        writer.wait(STOP_WAIT_S)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert done == [(3, True)]


def test_a_child_stuck_for_minutes_is_killed_at_the_next_rotation(
    tmp_path: Path, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipping while the last child writes must not go on for ever: a child that has
    been at it far longer than any snapshot takes is killed, and a new one forked."""
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
    real = snapshot_module.write_snapshot
    slow_snapshots(monkeypatch, 60.0)
    monkeypatch.setattr(snapshot_module, "CHILD_MAX_S", 0.3)
    done: list[tuple[int, bool]] = []
    writer.write(state_of(3), lambda seq, ok: done.append((seq, ok)))
    assert not writer.write(state_of(4), lambda seq, ok: done.append((seq, ok)))  # skipped
    time.sleep(0.4)
    monkeypatch.setattr(snapshot_module, "write_snapshot", real)  # the disk is back
    writer.write(state_of(5), lambda seq, ok: done.append((seq, ok)))
    writer.wait()
    assert done == [(3, False), (5, True)]
    assert list_snapshots(str(tmp_path)) == [snapshot_name(5)]


def test_a_child_the_loop_cannot_watch_is_waited_for_not_raced_inline(
    tmp_path: Path, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """epoll may refuse another fd (out of memory): the child is then waited for, as an
    inline write would take as long, instead of a second writer on the same file."""

    def refuse(*_args: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(dispatcher, "watch", refuse)
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
    done: list[tuple[int, bool]] = []
    writer.write(state_of(3), lambda seq, ok: done.append((seq, ok)))
    assert done == [(3, True)]
    assert list_snapshots(str(tmp_path)) == [snapshot_name(3)]
    writer.write(state_of(4), lambda seq, ok: done.append((seq, ok)))  # not skipped
    assert done == [(3, True), (4, True)]


def test_wait_kills_a_child_that_does_not_finish_in_time(
    tmp_path: Path,
    dispatcher: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop or re-exec waits a bounded time: a child stuck on the disk is killed, its
    snapshot counts as failed (so nothing is pruned on its account), and none is left."""
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
    slow_snapshots(monkeypatch, 60.0)
    failed = snapshots("failed")
    done: list[tuple[int, bool]] = []
    writer.write(state_of(3), lambda seq, ok: done.append((seq, ok)))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        writer.wait(0.3)
    assert time.monotonic() - started < 5
    assert done == [(3, False)]
    assert snapshots("failed") == failed + 1
    assert "not done after 0.3 s; killed" in caplog.text
    assert list_snapshots(str(tmp_path)) == []


def test_when_forking_is_unsafe_it_writes_inline(tmp_path: Path, dispatcher: Dispatcher) -> None:
    """An embedding program with other threads: written before write() returns."""
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: False)
    done: list[tuple[int, bool]] = []
    assert writer.write(state_of(4), lambda seq, ok: done.append((seq, ok)))
    assert list_snapshots(str(tmp_path)) == [snapshot_name(4)]
    assert done == []  # on disk already: the caller applies retention itself


def test_segments_go_only_once_the_childs_snapshot_is_on_disk(
    tmp_path: Path, dispatcher: Dispatcher
) -> None:
    """Retention waits for the background snapshot that covers the segments."""
    journal = FileJournal(str(tmp_path), 4096, retain_segments=1)
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
    state = ReplayState()
    done: list[tuple[int, bool]] = []

    def rotate(seq: int) -> bool:
        assert state.seq == seq
        return writer.write(state, lambda at, ok: done.append((at, ok)))

    journal.on_rotate = rotate
    seq = 0
    while len(done) < 2:  # two rotations, each snapshot reported
        seq += 1
        journal.append([acquired(seq)])
        state.fold(acquired(seq))
        dispatcher.run_once(timeout=0)
    writer.wait()
    before = list_segments(str(tmp_path))
    assert len(before) >= 3  # nothing pruned before being told
    for at, ok in done:
        assert ok
        journal.retain(at)
    # Rotations that came while a child was still writing were skipped: the segments
    # after the last snapshot stay, with the newest one it covers (retention 1).
    last = done[-1][0]
    uncovered = [name for name in before if first_seq_of(name) > last]
    assert list_segments(str(tmp_path)) == [before[-len(uncovered) - 1], *uncovered]
    journal.close()


def test_a_reload_signal_sent_to_every_lockd_process_spares_the_snapshot_child(
    tmp_path: Path, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP and SIGUSR1 are the daemon's; `systemctl kill -s HUP lockd` (the whole
    unit) or `pkill -HUP lockd` sends them to the child writing a snapshot too, which
    they ended: the snapshot failed, and its segments stayed."""
    writer = SnapshotWriter(str(tmp_path), dispatcher, may_fork=lambda: True)
    slow_snapshots(monkeypatch, 1.0)
    before = children()
    done: list[tuple[int, bool]] = []
    writer.write(state_of(3), lambda seq, ok: done.append((seq, ok)))
    (child,) = children() - before
    os.kill(child, signal.SIGHUP)  # blocked from its fork until it has set them up
    os.kill(child, signal.SIGUSR1)
    run_until(dispatcher, done)
    assert done == [(3, True)]
    assert list_snapshots(str(tmp_path)) == [snapshot_name(3)]
