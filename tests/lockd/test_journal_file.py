"""The journal on disk: continues after restart, truncates torn tails, rotates."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest

from actors.events import DaemonStarted, JournalEntry
from lockd.journal_file import (
    FileJournal,
    first_seq_of,
    list_segments,
    read_entries,
    read_epoch,
)
from lockd.journal_format import JournalCorruptError, encode_header


def entry(seq: int) -> JournalEntry:
    return JournalEntry(seq, 1.0, "hv", DaemonStarted("0.1.0", seq))


def write(journal: FileJournal, count: int) -> None:
    for _ in range(count):
        journal.append([entry(journal.next_seq)])


def test_reopen_continues_the_sequence(tmp_path: Path) -> None:
    """After a restart, sequence numbers carry on with no gap."""
    journal = FileJournal(str(tmp_path))
    write(journal, 3)
    journal.close()
    reopened = FileJournal(str(tmp_path))
    assert reopened.next_seq == 4
    write(reopened, 1)
    reopened.close()
    assert [e.seq for e in read_entries(str(tmp_path))] == [1, 2, 3, 4]


def test_torn_tail_is_truncated_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash mid-write leaves a partial record; reopening drops it and says so."""
    journal = FileJournal(str(tmp_path))
    write(journal, 2)
    journal.close()
    segment = tmp_path / list_segments(str(tmp_path))[0]
    with segment.open("ab") as f:
        f.write(b"\x83\x03\x1a")
    with caplog.at_level(logging.WARNING):
        reopened = FileJournal(str(tmp_path))
    assert "torn tail of 3 bytes" in caplog.text
    assert reopened.next_seq == 3
    write(reopened, 1)
    reopened.close()
    assert [e.seq for e in read_entries(str(tmp_path))] == [1, 2, 3]


def test_corruption_stops_the_open(tmp_path: Path) -> None:
    """Damage before the tail is an error naming the file, never skipped."""
    journal = FileJournal(str(tmp_path))
    write(journal, 3)
    journal.close()
    segment = tmp_path / list_segments(str(tmp_path))[0]
    data = bytearray(segment.read_bytes())
    data[len(encode_header(1)) + 10] ^= 0xFF  # inside the first record
    segment.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match=r"journal-\d+\.cbor: CRC mismatch"):
        FileJournal(str(tmp_path))


def test_the_follower_reports_damage_where_the_daemon_does(tmp_path: Path) -> None:
    """`lockd events` and `lockd serve` name the same file and byte for the same damage
    (the follower counted from where its read began, not from the file's start)."""
    from lockd.journal_file import JournalFollower

    journal = FileJournal(str(tmp_path))
    write(journal, 3)
    journal.close()
    segment = tmp_path / list_segments(str(tmp_path))[0]
    data = bytearray(segment.read_bytes())
    second = len(encode_header(1)) + (len(data) - len(encode_header(1))) // 3
    data[second + 10] ^= 0xFF  # inside the second record
    segment.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError) as by_daemon:
        FileJournal(str(tmp_path))
    follower = JournalFollower(str(tmp_path))
    try:
        assert [e.seq for e in follower.poll()] == [1]  # what comes before the damage
        with pytest.raises(JournalCorruptError) as by_follower:
            follower.poll()
    finally:
        follower.close()
    assert by_follower.value.offset == by_daemon.value.offset == second
    assert segment.name in str(by_follower.value)


def test_rotation_starts_a_new_segment_and_reading_spans_them(tmp_path: Path) -> None:
    """Segments rotate by size; readers see one gapless stream, from any seq."""
    journal = FileJournal(str(tmp_path), segment_bytes=200)
    write(journal, 10)
    journal.close()
    assert len(list_segments(str(tmp_path))) > 1
    assert [e.seq for e in read_entries(str(tmp_path))] == list(range(1, 11))
    assert [e.seq for e in read_entries(str(tmp_path), since_seq=7)] == [7, 8, 9, 10]


def test_out_of_sequence_append_is_refused(tmp_path: Path) -> None:
    """A second writer or a bug cannot leave a gap."""
    journal = FileJournal(str(tmp_path))
    with pytest.raises(ValueError, match="continue"):
        journal.append([entry(5)])
    journal.close()


def test_segments_are_private(tmp_path: Path) -> None:
    """Journal files are mode 0600: they name every VM's owner."""
    FileJournal(str(tmp_path / "j")).close()
    (segment,) = (tmp_path / "j").iterdir()
    assert segment.stat().st_mode & 0o777 == 0o600


def test_follower_reads_appends_across_rotation_and_waits_for_whole_records(
    tmp_path: Path,
) -> None:
    """`lockd events --follow` sees each entry once, across segment rotation."""
    from lockd.journal_file import JournalFollower
    from lockd.journal_format import encode_record

    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    follower = JournalFollower(str(tmp_path))
    assert follower.poll() == []
    seen: list[int] = []
    for seq in range(1, 120):
        journal.append([entry(seq)])
        if seq % 7 == 0:
            seen.extend(e.seq for e in follower.poll())
    seen.extend(e.seq for e in follower.poll())
    assert seen == list(range(1, 120))
    assert len(list_segments(str(tmp_path))) > 1
    # A record written in two pieces is returned only once it is whole.
    record = encode_record(entry(120))
    segment = tmp_path / list_segments(str(tmp_path))[-1]
    with open(segment, "ab") as f:
        f.write(record[:5])
    assert follower.poll() == []
    with open(segment, "ab") as f:
        f.write(record[5:])
    assert [e.seq for e in follower.poll()] == [120]
    follower.close()
    journal.close()


def test_follower_starts_at_since(tmp_path: Path) -> None:
    from lockd.journal_file import JournalFollower

    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    journal.append([entry(seq) for seq in range(1, 60)])
    follower = JournalFollower(str(tmp_path), since_seq=50)
    assert [e.seq for e in follower.poll()] == list(range(50, 60))
    follower.close()
    journal.close()


def test_a_rotation_cut_short_leaves_no_headerless_segment(tmp_path: Path) -> None:
    """Segments appear only once their header is on disk; a stray temporary is cleaned up."""
    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    write(journal, 60)
    journal.close()
    stray = tmp_path / ".journal-00000000000000000999.cbor.tmp"
    stray.write_bytes(b"")  # what a crash between create and rename leaves
    reopened = FileJournal(str(tmp_path), segment_bytes=4096)
    assert not stray.exists()
    assert reopened.next_seq == 61
    for name in list_segments(str(tmp_path)):
        assert (tmp_path / name).stat().st_size > 0
    reopened.close()


def test_follower_reads_a_bounded_step_at_a_time_across_rotation(tmp_path: Path) -> None:
    """The daemon replays a subscriber's backlog in steps of about ``max_bytes``: each
    step has entries, follows the last exactly, and the end is an empty step."""
    from lockd.journal_file import JournalFollower

    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    write(journal, 300)
    assert len(list_segments(str(tmp_path))) > 3
    follower = journal.reader(37)
    steps: list[list[int]] = []
    while step := [e.seq for e in follower.poll(512)]:
        steps.append(step)
    assert [seq for step in steps for seq in step] == list(range(37, 301))
    assert max(len(step) for step in steps) < 30  # an entry is about 60 bytes
    write(journal, 2)
    assert [e.seq for e in follower.poll(512)] == [301, 302]
    follower.close()
    journal.close()
    assert isinstance(follower, JournalFollower)


def test_skip_records_reads_heads_only_and_stops_at_anything_odd() -> None:
    from lockd.journal_format import encode_record, skip_records

    records = [encode_record(entry(seq)) for seq in range(1, 11)]
    data = b"".join(records)
    at = [sum(len(r) for r in records[:n]) for n in range(11)]
    assert skip_records(data, 1, 6) == (5, at[5])
    assert skip_records(data, 1, 99) == (10, at[10])
    assert skip_records(data, 1, 1) == (0, 0)
    assert skip_records(data[: at[7] - 3], 1, 99) == (6, at[6])  # the 7th is cut short
    assert skip_records(data, 5, 99) == (0, 0)  # not the seq expected: decoding says why
    damaged = bytearray(data)
    damaged[at[3]] = 0x82  # record 4 is no longer [seq, crc, entry]
    assert skip_records(bytes(damaged), 1, 99) == (3, at[3])


def _length_head_damaged(records: list[bytes], index: int, delta: int) -> bytes:
    """The records, the ``index``-th one's entry length ``delta`` bytes too long."""
    damaged = bytearray(records[index])
    at = 7  # 0x83, a one-byte seq, a five-byte CRC: then the bstr head 0x58 <length>
    assert damaged[at] == 0x58
    damaged[at + 1] += delta
    return b"".join([*records[:index], bytes(damaged), *records[index + 1 :]])


def test_skip_records_does_not_step_over_a_record_whose_length_is_damaged() -> None:
    """A length head that is wrong but within the data would move the skip into the
    middle of a later record: decoding would then report the damage at the wrong byte,
    or take what it finds there for a record cut short and report nothing."""
    from lockd.journal_format import encode_record, skip_records

    records = [encode_record(entry(seq)) for seq in range(1, 11)]
    at = [sum(len(r) for r in records[:n]) for n in range(11)]
    for delta in (7, 39, len(records[3])):
        data = _length_head_damaged(records, 2, delta)
        assert skip_records(data, 1, 99) == (2, at[2])


@pytest.mark.parametrize("delta", [7, 39])
def test_a_follower_from_a_later_seq_reports_damage_where_journal_check_does(
    tmp_path: Path, delta: int
) -> None:
    from lockd.journal_file import JournalFollower
    from lockd.journal_format import decode_segment, encode_record

    records = [encode_record(entry(seq)) for seq in range(1, 11)]
    data = encode_header(1) + _length_head_damaged(records, 2, delta)
    (tmp_path / "journal-00000000000000000001.cbor").write_bytes(data)
    (tmp_path / "journal-00000000000000000011.cbor").write_bytes(
        encode_header(11) + encode_record(entry(11))
    )
    with pytest.raises(JournalCorruptError) as whole:
        decode_segment(data)
    follower = JournalFollower(str(tmp_path), since_seq=8)
    with pytest.raises(JournalCorruptError) as read:
        follower.poll(512)
    follower.close()
    assert read.value.offset == whole.value.offset
    assert "CRC mismatch in record 3" in read.value.reason


def test_a_parked_follower_holds_no_fd_and_goes_on_where_it_was(tmp_path: Path) -> None:
    """A replay waiting for a slow subscriber parks its reader: no segment is held open
    (nor kept on disk once retention deletes it); the next poll goes on at the same
    record, or, its segment deleted meanwhile, at the oldest segment kept."""
    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    write(journal, 300)
    follower = journal.reader(1)
    first = [e.seq for e in follower.poll(512)]
    follower.park()
    assert follower._file is None
    second = [e.seq for e in follower.poll(512)]
    assert first + second == list(range(1, len(first) + len(second) + 1))
    follower.park()
    names = list_segments(str(tmp_path))
    (tmp_path / names[0]).unlink()  # retention, while it was parked
    kept_from = int(names[1][len("journal-") : -len(".cbor")])
    rest: list[int] = []
    while step := [e.seq for e in follower.poll(512)]:
        rest += step
        follower.park()
    assert rest == list(range(kept_from, 301))  # the gap shows in the seqs
    journal.close()


def test_a_damaged_record_in_the_newest_segment_is_refused_not_cut_off(tmp_path: Path) -> None:
    """One flipped byte in the middle of the segment being written: the daemon must not
    take it for a crash's torn tail, cut off the 35 good records after it and hand
    their seqs out again. It refuses to start, naming the byte (journal-check --repair
    is the operator's way on)."""
    from lockd.journal_format import encode_record

    journal = FileJournal(str(tmp_path))
    write(journal, 40)
    journal.close()
    (name,) = list_segments(str(tmp_path))
    data = bytearray((tmp_path / name).read_bytes())
    at = len(encode_header(1)) + sum(len(encode_record(entry(seq))) for seq in range(1, 6))
    assert data[at] == 0x83
    data[at] = 0x7C
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError) as info:
        FileJournal(str(tmp_path))
    assert info.value.offset == at
    assert (tmp_path / name).stat().st_size == len(data)  # nothing truncated


@pytest.mark.parametrize("max_bytes", [-1, 512])
def test_a_follower_reports_a_length_head_past_the_end_of_an_older_segment(
    tmp_path: Path, max_bytes: int
) -> None:
    """A damaged length head that points past the end of a segment the writer has left:
    decode_segment calls it corruption (good records after it); the follower took it
    for a record still being written and waited for the rest of it for ever, reporting
    nothing and never reaching the later segments."""
    from lockd.journal_file import JournalFollower
    from lockd.journal_format import decode_segment, encode_record

    records = [encode_record(entry(seq)) for seq in range(1, 11)]
    data = bytearray(encode_header(1) + b"".join(records))
    at = len(encode_header(1)) + len(records[0]) + len(records[1])
    data[at + 7 : at + 9] = b"\x5a\x7f"  # the bstr head: now four bytes, 2 GiB
    (tmp_path / "journal-00000000000000000001.cbor").write_bytes(bytes(data))
    (tmp_path / "journal-00000000000000000011.cbor").write_bytes(
        encode_header(11) + encode_record(entry(11))
    )
    with pytest.raises(JournalCorruptError) as whole:
        decode_segment(bytes(data))
    follower = JournalFollower(str(tmp_path))

    def read_on() -> None:
        for _ in range(3):  # the entries before the damage come first
            follower.poll(max_bytes)

    try:
        with pytest.raises(JournalCorruptError) as read:
            read_on()
    finally:
        follower.close()
    assert read.value.offset == whole.value.offset == at


def test_a_follower_that_cannot_open_the_next_segment_loses_nothing_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's descriptors all in use when a replay reaches a rotation: the
    entries read before come out, and the next poll opens the segment and goes on."""
    import builtins
    import errno

    import lockd.journal_file

    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    write(journal, 100)
    second = list_segments(str(tmp_path))[1]
    refused: list[str] = []

    def short_of_fds(path: str, mode: str = "r") -> object:
        if path.endswith(second) and not refused:
            refused.append(path)
            raise OSError(errno.EMFILE, "Too many open files")
        return builtins.open(path, mode)

    monkeypatch.setattr(lockd.journal_file, "open", short_of_fds, raising=False)
    follower = journal.reader(1)
    first = [e.seq for e in follower.poll()]
    assert refused
    assert first == list(range(1, len(first) + 1))
    assert len(first) < 100
    assert [e.seq for e in follower.poll()] == list(range(len(first) + 1, 101))
    refused.clear()
    from_second = journal.reader(first[-1] + 1)
    with pytest.raises(OSError, match="Too many"):  # nothing read before it: raised
        from_second.poll()
    follower.close()
    journal.close()


def test_a_follower_skips_a_damaged_segment_never_back_before_its_place(
    tmp_path: Path,
) -> None:
    """After damage a replay goes on at the next segment, and never at an earlier
    one: not even when the error came before any segment was open."""
    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    write(journal, 200)
    names = list_segments(str(tmp_path))
    follower = journal.reader(first_seq_of(names[1]) + 3)
    assert follower.skip_segment() == first_seq_of(names[2])  # nothing open yet
    assert [e.seq for e in follower.poll()] == list(range(first_seq_of(names[2]), 201))
    assert follower.skip_segment() is None  # the newest: nothing after it
    follower.close()
    journal.close()


def _full_rotation(journal: FileJournal) -> None:
    """Fill the current segment so that the next append rotates."""
    while journal._size < journal._segment_bytes:
        write(journal, 1)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_rotation_refused_by_a_full_disk_leaks_no_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every append while the disk is full tries the rotation again: each try must
    close the new segment's temporary file (it leaked one fd per refused request)."""
    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    _full_rotation(journal)
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    before = _open_fds()
    for _ in range(20):
        with pytest.raises(OSError, match="No space"):
            write(journal, 1)
    assert _open_fds() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    monkeypatch.undo()
    write(journal, 1)  # space again: the rotation goes through
    assert len(list_segments(str(tmp_path))) == 2
    journal.close()


def test_a_rotation_whose_directory_sync_fails_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new segment is renamed in, then the directory's fsync fails (EIO): the next
    append must be able to rotate again, not find the segment's name taken for ever."""
    journal = FileJournal(str(tmp_path), segment_bytes=4096)
    _full_rotation(journal)
    last = journal.next_seq - 1
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output"):
        write(journal, 1)
    monkeypatch.undo()
    write(journal, 3)
    journal.close()
    assert [e.seq for e in read_entries(str(tmp_path))] == list(range(1, last + 4))
    assert len(list_segments(str(tmp_path))) == 2


def test_damage_in_the_newest_segment_is_cut_only_when_told_the_host_rebooted(
    tmp_path: Path,
) -> None:
    """A hole of zeros with records after it: refused (within one boot nothing but
    real damage leaves that), or, with ``cut_damage`` (written in the previous boot,
    where unsynced pages reach the disk in any order), cut there with a copy kept."""
    journal = FileJournal(str(tmp_path))
    write(journal, 40)
    journal.close()
    (name,) = list_segments(str(tmp_path))
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    hole = len(data) // 2
    data[hole : hole + 100] = bytes(100)
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError):
        FileJournal(str(tmp_path))
    with pytest.raises(JournalCorruptError):  # told so, but the segment says this boot
        FileJournal(str(tmp_path), cut_damage=True)
    os.utime(path, (1, 1))  # last written before this boot
    umask = os.umask(0o022)
    try:
        cut = FileJournal(str(tmp_path), cut_damage=True)
    finally:
        os.umask(umask)
    assert 1 < cut.next_seq < 40
    epoch = read_epoch(str(tmp_path))  # a new timeline, from the first seq handed out again
    assert epoch is not None
    assert epoch[1] == cut.next_seq
    assert path.stat().st_size < hole
    (kept,) = tmp_path.glob(f"{name}.damaged-*")
    assert kept.read_bytes() == bytes(data)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # as private as the segment itself
    write(cut, 1)
    cut.close()
    assert [e.seq for e in read_entries(str(tmp_path))] == list(range(1, cut.next_seq))


def _holed(path: Path) -> bytes:
    """Zeros in the middle of the segment, records after them (as a host crash leaves
    unsynced pages), and its mtime before this boot; its bytes, hole and all."""
    data = bytearray(path.read_bytes())
    hole = len(data) // 2
    data[hole : hole + 100] = bytes(100)
    path.write_bytes(bytes(data))
    os.utime(path, (1, 1))
    return bytes(data)


def test_two_reboot_cuts_stamped_the_same_second_keep_both_copies(tmp_path: Path) -> None:
    """A host without a working RTC boots at the same time each boot, and lockd cuts a
    reboot's damage then: the second cut's copy, named by the same second, replaced the
    first's, and the records only the first kept (those its cut removed) were gone."""
    from freezegun import freeze_time

    journal = FileJournal(str(tmp_path))
    write(journal, 40)
    journal.close()
    (name,) = list_segments(str(tmp_path))
    path = tmp_path / name
    damaged = []
    with freeze_time("2026-01-01T00:00:07Z"):  # the clock at each boot
        for _ in range(2):
            damaged.append(_holed(path))
            cut = FileJournal(str(tmp_path), cut_damage=True)
            write(cut, 40)
            cut.close()
    kept = sorted(tmp_path.glob(f"{name}.damaged-*"))  # the second: the same name, then .2
    assert [p.read_bytes() for p in kept] == damaged
    assert [e.seq for e in read_entries(str(tmp_path))] == list(range(1, cut.next_seq))


def test_a_reboots_damage_is_cut_though_the_clock_is_behind_at_boot(tmp_path: Path) -> None:
    """A host whose clock starts behind (a dead RTC battery, set to timesyncd's last
    saved time; an RTC kept in local time west of UTC) crashed with unsynced writes: by
    that clock the segment, written just before the crash, looked written in this
    boot, its damage was refused, and lockd did not start until journal-check
    --repair. A segment stamped later than the clock's now was written by a clock
    ahead of this one: the previous boot's, whose damage is cut."""
    import datetime
    import time

    from freezegun import freeze_time

    journal = FileJournal(str(tmp_path))
    write(journal, 40)
    journal.close()
    (name,) = list_segments(str(tmp_path))
    path = tmp_path / name
    damaged = _holed(path)
    os.utime(path)  # written just before the crash
    behind = datetime.datetime.fromtimestamp(time.time() - 5 * 3600, datetime.UTC)
    with freeze_time(behind):
        cut = FileJournal(str(tmp_path), cut_damage=True)
    cut.close()
    assert 1 < cut.next_seq < 40
    (kept,) = tmp_path.glob(f"{name}.damaged-*")
    assert kept.read_bytes() == damaged


def test_the_boot_a_daemon_last_started_in_is_kept_beside_the_journal(tmp_path: Path) -> None:
    from lockd.journal_file import last_boot, record_boot

    assert last_boot(str(tmp_path)) is None  # never said (a journal of an older lockd)
    record_boot(str(tmp_path), b"\x01" * 16)
    assert last_boot(str(tmp_path)) == b"\x01" * 16
    record_boot(str(tmp_path), b"\x02" * 16)
    assert last_boot(str(tmp_path)) == b"\x02" * 16


def test_a_torn_write_whose_truncation_failed_is_truncated_before_the_next_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills in the middle of a write and the truncation back fails too (EIO):
    the torn bytes must not stay in the middle of the segment. The next append cuts them
    first (refused while it cannot), so the journal still reads whole and a restart
    replays it (the next record landed after them and the next start refused the
    journal as corrupt)."""
    journal = FileJournal(str(tmp_path))
    write(journal, 3)
    real_write = os.write
    fail_truncate = [True]

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 8:
            return real_write(fd, data[:8])
        raise OSError(errno.ENOSPC, "No space left on device")

    def ftruncate(fd: int, length: int) -> None:
        if fail_truncate[0]:
            raise OSError(errno.EIO, "Input/output error")
        real_ftruncate(fd, length)

    real_ftruncate = os.ftruncate
    monkeypatch.setattr(os, "write", half_then_full)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(OSError, match="No space left"):
        write(journal, 1)  # the write's error, not the truncation's
    monkeypatch.setattr(os, "write", real_write)
    with pytest.raises(OSError, match=r"Input/output error \(truncating a write cut short\)"):
        write(journal, 1)  # the torn bytes still there: nothing goes after them
    assert journal.next_seq == 4
    fail_truncate[0] = False
    write(journal, 2)
    journal.close()
    assert [e.seq for e in read_entries(str(tmp_path))] == [1, 2, 3, 4, 5]
    reopened = FileJournal(str(tmp_path))
    assert reopened.next_seq == 6
    assert reopened.last_scan is not None
    assert reopened.last_scan.torn_bytes == 0
    reopened.close()


def test_a_small_file_whose_rename_fails_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``.boot`` (and ``.epoch``) are written to a temporary and renamed over: a rename
    that fails (EIO) raises and keeps the old file, and the temporary is deleted (it
    stayed beside the journal)."""
    from lockd.journal_file import last_boot, record_boot

    record_boot(str(tmp_path), b"\x01" * 16)
    before = sorted(os.listdir(tmp_path))

    def failing(_src: str, _dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="Input/output"):
        record_boot(str(tmp_path), b"\x02" * 16)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before
    assert last_boot(str(tmp_path)) == b"\x01" * 16


@pytest.mark.parametrize("torn_version", ["0.1.0", "0.1.0+" + "x" * 4000])
def test_a_follower_that_read_a_torn_write_reads_on_once_it_is_cut_and_written_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn_version: str
) -> None:
    """A follower (a subscriber catching up, ``lockd events --follow``) reads the bytes
    of a write the disk cut short before they are truncated back; the next records are
    written where they were. It must read those records, not report damage where the
    torn bytes and the new ones meet (it read on from the end of the torn bytes), and
    at once: not only once the torn record's whole length (4 KiB) was written over."""
    journal = FileJournal(str(tmp_path))
    write(journal, 3)
    follower = journal.reader(1)
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 8:
            return real_write(fd, data[:8])
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_ftruncate(_fd: int, _length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", half_then_full)
    monkeypatch.setattr(os, "ftruncate", failing_ftruncate)
    with pytest.raises(OSError, match="No space left"):
        journal.append([JournalEntry(4, 2.0, "hv", DaemonStarted(torn_version, 99))])
    monkeypatch.undo()
    assert [e.seq for e in follower.poll()] == [1, 2, 3]  # and the torn bytes after them
    write(journal, 2)  # other entries: other bytes where the torn ones were
    assert [e.seq for e in follower.poll()] == [4, 5]
    follower.close()
    journal.close()
