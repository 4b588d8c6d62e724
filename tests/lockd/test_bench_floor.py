"""The floors the benchmark reports: each times the real steps and leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

from actors.events import LeaseAcquired, LeaseReleased
from lockd.bench_floor import (
    actor_hop_us,
    journal_pair_us,
    lockd_files_pair_us,
    virtlockd_files_pair_us,
    work_floors,
)
from lockd.journal_file import FileJournal, read_entries
from protocol.names import INDEX_NAME


def test_file_floors_time_real_pairs_and_leave_no_lease_file(tmp_path: Path) -> None:
    for floor in (virtlockd_files_pair_us, lockd_files_pair_us):
        assert floor(str(tmp_path), ops=50) > 0
    # Each pair unlinks what it created; lockd's index lock file is all that stays.
    assert sorted(os.listdir(tmp_path)) == [INDEX_NAME]


def test_journal_floor_writes_records_that_read_back_as_pairs(tmp_path: Path) -> None:
    assert journal_pair_us(str(tmp_path), ops=20) > 0
    entries = list(read_entries(str(tmp_path)))
    kinds = [type(e.event) for e in entries]
    assert kinds == [LeaseAcquired, LeaseReleased] * (len(kinds) // 2)
    assert len(kinds) == 2 * (20 + 200)  # the warm-up pairs are real records too
    journal = FileJournal(str(tmp_path))
    try:
        assert journal.next_seq == len(kinds) + 1
    finally:
        journal.close()


def test_work_floors_uses_the_lock_dirs_file_system_and_cleans_up(tmp_path: Path) -> None:
    floors = work_floors(str(tmp_path), ops=20)
    assert set(floors) == {
        "virtlockd_files_pair_us", "lockd_files_pair_us", "journal_pair_us", "actor_hop_us"
    }  # fmt: skip
    assert all(v > 0 for v in floors.values())
    assert os.listdir(tmp_path) == []


def test_an_actor_hop_is_timed_over_real_dispatched_actors() -> None:
    """Every hop is handled (the floor raises if a message was lost: a ping that did not
    bounce would time nothing) and costs something."""
    assert actor_hop_us(ops=2000) > 0
