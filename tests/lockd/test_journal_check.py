"""journal-check: damage is found where it is, and --repair cuts only what it must."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest

from lockd.journal_check import find_damage, repair
from lockd.journal_file import list_segments, lock_journal, new_epoch, read_epoch
from lockd.journal_format import VERSION, JournalTooNewError, header_length
from lockd.snapshot import list_snapshots, seq_of
from tests.lockd.test_snapshot_replay import fill, reopen


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damage_in_covered_history_moves_only_that_segment(tmp_path: Path) -> None:
    """The snapshot covers it: recovery never needed it, and nothing else is touched."""
    written = fill(tmp_path, 200)
    oldest = tmp_path / list_segments(str(tmp_path))[0]
    flip(oldest, len(oldest.read_bytes()) // 2)
    assert reopen(tmp_path)[0].seq == 200  # start-up is not affected
    _, damage = find_damage(str(tmp_path))
    assert damage is not None
    assert damage.history_only
    repair(str(tmp_path), damage)
    state, _ = reopen(tmp_path)
    assert set(state.leases) == set(written.leases)
    assert find_damage(str(tmp_path))[1] is None


def test_damage_after_the_snapshot_is_cut_and_reported(tmp_path: Path) -> None:
    fill(tmp_path, 200)
    newest = tmp_path / list_segments(str(tmp_path))[-1]
    flip(newest, len(newest.read_bytes()) // 2)
    _, damage = find_damage(str(tmp_path))
    assert damage is not None
    assert not damage.history_only
    assert damage.first_bad_seq > 0
    done = repair(str(tmp_path), damage)
    assert any("were cut" in line for line in done)
    state, _ = reopen(tmp_path)
    assert state.seq == damage.first_bad_seq - 1
    assert all(seq_of(n) < damage.first_bad_seq for n in list_snapshots(str(tmp_path)))
    assert find_damage(str(tmp_path))[1] is None


def test_a_second_repair_in_the_same_second_keeps_the_first_ones_copy(tmp_path: Path) -> None:
    """``--repair`` names its copies by the wall clock's second: a second repair of the
    segment in that second (or once the clock stepped back to it) replaced the first's
    copy, the only one left of the records that repair cut."""
    from freezegun import freeze_time

    fill(tmp_path, 200)
    newest = tmp_path / list_segments(str(tmp_path))[-1]
    damaged = []
    with freeze_time("2026-01-01T00:00:07Z"):
        for _ in range(2):
            flip(newest, len(newest.read_bytes()) // 2)
            damaged.append(newest.read_bytes())
            _, damage = find_damage(str(tmp_path))
            assert damage is not None
            assert not damage.history_only
            repair(str(tmp_path), damage)
    kept = sorted(tmp_path.glob(f"{newest.name}.damaged-*"))  # the same name, then .2
    assert [p.read_bytes() for p in kept] == damaged


def test_repair_refuses_a_journal_a_daemon_holds(tmp_path: Path) -> None:
    """``--repair`` is for a stopped daemon (docs/recovery.md): it used to cut a journal
    a running lockd was writing. The journal's lock says one is."""
    fill(tmp_path, 200)
    newest = tmp_path / list_segments(str(tmp_path))[-1]
    flip(newest, len(newest.read_bytes()) // 2)
    damaged = newest.read_bytes()
    fd = lock_journal(str(tmp_path), "serving /run/lockd/lockd.sock")  # as lockd serve
    assert fd is not None
    try:
        command = [sys.executable, "-m", "lockd", "journal-check", "--journal-dir",
                   str(tmp_path), "--repair"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        os.close(fd)
    assert done.returncode == 1
    # Which lockd: the operator finds the one to stop.
    running = f"is in use by a running lockd (pid {os.getpid()}, serving /run/lockd/lockd.sock)"
    assert running in done.stderr
    assert newest.read_bytes() == damaged
    assert not [name for name in os.listdir(tmp_path) if ".damaged-" in name]
    before = new_epoch(str(tmp_path), 1)
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert "were cut" in again.stdout
    after = read_epoch(str(tmp_path))  # the cut seqs are handed out again: a new timeline
    assert after is not None
    assert after[0] != before[0]
    assert after[1] == int(again.stdout.split("entries from seq ")[1].split()[0])


def test_repair_holds_the_journal_lock_from_before_it_reads_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lock was taken only once the damage had been found: a daemon starting in
    between (after a reboot it cuts such damage itself and goes on writing) could
    write and stop, and the cut made from the earlier reading fell on its records."""
    from lockd import cli, journal_check

    fill(tmp_path, 200)
    newest = tmp_path / list_segments(str(tmp_path))[-1]
    flip(newest, len(newest.read_bytes()) // 2)
    started: list[bool] = []
    found = journal_check.find_damage

    def then_a_daemon_starts(directory: str) -> Any:
        damage = found(directory)
        fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            started.append(True)  # it would take the journal, write, and stop
        except BlockingIOError:
            started.append(False)
        finally:
            os.close(fd)
        return damage

    monkeypatch.setattr(journal_check, "find_damage", then_a_daemon_starts)
    assert cli.main(["journal-check", "--journal-dir", str(tmp_path), "--repair"]) == 0
    assert started == [False]
    assert "were cut" in capsys.readouterr().out


def test_repair_of_a_journal_this_user_cannot_lock_is_an_error_not_a_traceback(
    tmp_path: Path,
) -> None:
    fill(tmp_path, 200)
    newest = tmp_path / list_segments(str(tmp_path))[-1]
    flip(newest, len(newest.read_bytes()) // 2)
    (tmp_path / ".lock").mkdir()  # as unopenable for writing as root's is for an auditor
    command = [sys.executable, "-m", "lockd", "journal-check", "--journal-dir", str(tmp_path),
               "--repair"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"cannot lock the journal at {tmp_path}: Is a directory" in done.stderr
    assert not [name for name in os.listdir(tmp_path) if ".damaged-" in name]


def as_written_by_a_newer_lockd(segment: Path) -> None:
    """Give ``segment`` the header a later journal version would have (records as they are)."""
    data = segment.read_bytes()
    first_seq, length = header_length(data)
    newer = cbor2.dumps({"format": "lockd-journal", "version": VERSION + 1, "first_seq": first_seq})
    segment.write_bytes(newer + data[length:])


def test_a_segment_of_a_newer_journal_version_is_refused_as_such_and_never_repaired(
    tmp_path: Path,
) -> None:
    """After a downgrade to this build, a journal a newer lockd wrote is no damage: it was
    called "corrupt", and the ``--repair`` the message sent the operator to set the whole
    segment aside, every lease in it with it. Now every reader says which lockd wrote it,
    and ``--repair`` changes nothing."""
    fill(tmp_path, 200)
    newest = tmp_path / list_segments(str(tmp_path))[-1]
    as_written_by_a_newer_lockd(newest)

    def files() -> dict[str, bytes]:  # not .lock: --repair locks the journal, writing its line
        return {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n != ".lock"}

    before = files()
    with pytest.raises(JournalTooNewError, match="newer lockd") as refused:
        reopen(tmp_path)  # start-up
    assert "corrupt" not in str(refused.value)
    for args in (["journal-check"], ["journal-check", "--repair"], ["events"]):
        command = [sys.executable, "-m", "lockd", *args, "--journal-dir", str(tmp_path)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 1, args
        assert f"{newest.name}: journal version {VERSION + 1}, this lockd reads {VERSION}" in (
            done.stderr
        ), args
        assert "corrupt" not in done.stderr + done.stdout, args
        assert "DAMAGED" not in done.stdout, args
    assert files() == before
