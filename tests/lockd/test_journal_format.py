"""Journal segments: round trip, torn tails truncated, corruption refused."""

from __future__ import annotations

import io

import cbor2
import pytest

from actors.events import DaemonStarted, JournalEntry, LeaseAcquired
from actors.model import LeaseMode, Owner
from lockd.journal_format import (
    JournalCorruptError,
    decode_segment,
    encode_header,
    encode_record,
)

OWNER = Owner(uuid=b"\x02" * 16, name="vm2", id=2, pid=77, start_time=5)


def entries(first: int, count: int) -> list[JournalEntry]:
    out = [JournalEntry(first, 1.0, "hv", DaemonStarted("0.1.0", 10))]
    out += [
        JournalEntry(
            first + i, 1.0 + i, "hv", LeaseAcquired("ls", f"r{i}", LeaseMode.SHARED, OWNER, 3, True)
        )
        for i in range(1, count)
    ]
    return out


def segment(first: int = 1, count: int = 4) -> bytes:
    return encode_header(first) + b"".join(encode_record(e) for e in entries(first, count))


def test_segment_round_trip() -> None:
    """What is written is read back, in order, with nothing torn."""
    scan = decode_segment(segment(first=10))
    assert scan.first_seq == 10
    assert list(scan.entries) == entries(10, 4)
    assert scan.torn_bytes == 0


def test_segment_is_a_plain_cbor_sequence() -> None:
    """Any CBOR tool reads the segment item by item."""
    data = segment()
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    items = []
    while stream.tell() < len(data):
        items.append(decoder.decode())
    assert items[0]["format"] == "lockd-journal"
    assert len(items) == 5
    assert cbor2.loads(items[1][2])["type"] == "daemon-started"


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_torn_tail_is_reported_not_fatal(cut: int) -> None:
    """A last record cut short by a crash is dropped and measured."""
    data = segment()
    scan = decode_segment(data[:-cut])
    assert len(scan.entries) == 3
    assert scan.valid_length + scan.torn_bytes == len(data) - cut


def test_zero_filled_tail_is_torn() -> None:
    """Zero bytes after the last record (a filesystem's torn write) are a torn tail."""
    scan = decode_segment(segment() + b"\0" * 64)
    assert len(scan.entries) == 4
    assert scan.torn_bytes == 64


def test_corruption_before_the_tail_is_an_error_naming_the_offset() -> None:
    """A flipped byte inside an earlier record stops the read; it is never skipped."""
    data = bytearray(segment())
    header_len = len(encode_header(1))
    data[header_len + 12] ^= 0xFF
    with pytest.raises(JournalCorruptError) as info:
        decode_segment(bytes(data))
    assert info.value.offset == header_len


def test_sequence_gap_is_an_error() -> None:
    """A missing record (or a second writer) shows up as a gap."""
    es = entries(1, 4)
    data = encode_header(1) + b"".join(encode_record(e) for e in (es[0], es[2], es[3]))
    with pytest.raises(JournalCorruptError, match="gap"):
        decode_segment(data)


def test_bad_header_is_an_error() -> None:
    """A file that is not a lockd segment is refused."""
    with pytest.raises(JournalCorruptError, match="header"):
        decode_segment(cbor2.dumps({"format": "other"}))


def test_hand_written_record_heads_match_cbor2() -> None:
    """encode_record writes the outer array by hand; it must be the bytes cbor2 would write."""
    import uuid
    import zlib

    import cbor2

    from actors.events import LeaseAcquired
    from actors.model import LeaseMode, Owner

    owner = Owner(uuid.uuid4().bytes, "vm", 1, 5, 100)
    for seq in (1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40):
        entry = JournalEntry(
            seq, 1.0, "h", LeaseAcquired("ls", "r", LeaseMode.EXCLUSIVE, owner, 1, True)
        )
        payload = cbor2.dumps(entry.to_wire())
        assert encode_record(entry) == cbor2.dumps([seq, zlib.crc32(payload), payload])


@pytest.mark.parametrize("crc", [None, 0, 23, 0xFFFF, 0x10000])
def test_record_heads_match_cbor2_across_every_width(
    monkeypatch: pytest.MonkeyPatch, crc: int | None
) -> None:
    """Seqs, CRCs and entry lengths at each edge of a head's width (a CRC forced where
    given): the usual record's heads are packed at once, the others head by head, and
    both must be the bytes cbor2 writes for ``[seq, crc, entry]``."""
    import zlib

    if crc is not None:
        monkeypatch.setattr(zlib, "crc32", lambda _data: crc)
    for seq in (1, 255, 256, 65535, 65536, 2**32 - 1, 2**32):
        for resource in ("r", "r" * 40, "r" * 200, "r" * 255):
            event = LeaseAcquired("ls", resource, LeaseMode.EXCLUSIVE, OWNER, 1, True)
            entry = JournalEntry(seq, 1.0, "h", event)
            payload = cbor2.dumps(entry.to_wire())
            expected = cbor2.dumps([seq, zlib.crc32(payload) if crc is None else crc, payload])
            assert encode_record(entry) == expected, (seq, len(payload))


def test_a_record_with_a_negative_seq_is_refused_not_misencoded() -> None:
    """Heads are unsigned: a negative seq must fail loudly, not become another number."""
    import pytest

    from actors.events import LeaseAcquired
    from actors.model import LeaseMode

    entry = JournalEntry(
        -1, 1.0, "h", LeaseAcquired("ls", "r", LeaseMode.EXCLUSIVE, OWNER, 1, True)
    )
    with pytest.raises(ValueError, match="negative"):
        encode_record(entry)


def _record_starts(first: int = 1, count: int = 40) -> tuple[bytes, list[int]]:
    """A segment of ``count`` records and where each record starts in it."""
    at = len(encode_header(first))
    starts = []
    for e in entries(first, count):
        starts.append(at)
        at += len(encode_record(e))
    return segment(first, count), starts


@pytest.mark.parametrize(
    "damage",
    [
        lambda data, at: data.__setitem__(at, 0x7C),  # no longer an array head
        lambda data, at: data.__setitem__(slice(at + 1, at + 3), b"\x1b\xff"),  # a seq head cut
        lambda data, at: data.__setitem__(at + 7, 0x5A),  # a length head: 4 bytes, huge
        lambda data, at: data.__setitem__(slice(at, at + 40), b"\0" * 40),  # a hole of zeros
    ],
    ids=["array-head", "seq-head", "length-head", "zero-hole"],
)
def test_damage_with_good_records_after_it_is_corruption_not_a_torn_tail(damage: object) -> None:
    """Not what a crash in the middle of a write leaves: the good records after the
    damage must not be cut off (their seqs reused by the next appends). The decoder
    reads ahead to the end of the data, which once passed for "the tail"."""
    data, starts = _record_starts()
    damaged = bytearray(data)
    damage(damaged, starts[5])  # type: ignore[operator]
    with pytest.raises(JournalCorruptError) as info:
        decode_segment(bytes(damaged))
    assert info.value.offset == starts[5]


def test_a_garbled_last_record_is_a_torn_tail() -> None:
    """The last write half on disk (a page of it lost): its CRC fails, nothing follows."""
    data, starts = _record_starts(count=6)
    damaged = bytearray(data)
    damaged[-3] ^= 0xFF
    scan = decode_segment(bytes(damaged) + b"\0" * 100)
    assert len(scan.entries) == 5
    assert scan.valid_length == starts[5]


def test_a_write_cut_in_a_record_s_heads_then_zeros_is_a_torn_tail() -> None:
    """A host crash keeps the page with the start of the last record and not the next
    one (zeros): the zeros stand where its heads would be, and read as heads of the
    wrong kind. Every cut of a write of several records, with zeros after it, is a
    torn tail."""
    data, starts = _record_starts(count=12)
    write_at = starts[4]
    for cut in range(write_at, len(data)):
        scan = decode_segment(data[:cut] + b"\0" * 4096)
        good = sum(1 for end in [*starts[1:], len(data)] if end <= cut)
        assert (scan.count, scan.valid_length) == (good, starts[good]), cut


def test_a_whole_last_record_with_its_crc_right_and_a_seq_gap_is_corruption() -> None:
    """A crash leaves a record cut short or garbled, never one whose CRC is right: a
    damaged seq head (the CRC covers the entry only) must not pass for a torn tail and
    have its record cut off."""
    data, starts = _record_starts(count=6)
    damaged = bytearray(data)
    damaged[starts[5] + 1] ^= 1
    with pytest.raises(JournalCorruptError, match="sequence gap") as info:
        decode_segment(bytes(damaged))
    assert info.value.offset == starts[5]


def test_a_tail_of_garbage_is_judged_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Megabytes of 0x83 after a record running past the end: the search for a good
    record after it gives up (corruption, for the operator) instead of taking seconds,
    and fake heads whose lengths would make each CRC long do not make it quadratic
    (unbounded: 8 million places looked at, and 11 GB of CRCs)."""
    from lockd import journal_format

    looked: list[int] = []
    checked_record = journal_format._checked_record

    def counting(data: bytes, at: int) -> tuple[int, int] | None:
        looked.append(at)
        return checked_record(data, at)

    monkeypatch.setattr(journal_format, "_checked_record", counting)
    cut = segment(1, 3) + b"\x83\x04\x1a\0\0\0\0\x5a\x01\0\0\0"  # record 4, 16 MiB: cut
    fake = b"\x83\x01\x1a\0\0\0\0\x5a\x00\x01\x00\x00"  # [1, crc 0, 64 KiB of bytes]
    for garbage, bound in (
        (cut + b"\x83" * (8 * 1024 * 1024), journal_format._SCAN_CANDIDATES + 1),
        (cut + fake * (2 * 1024 * 1024 // len(fake)), 4 * 2 * 1024 * 1024 // 65536 + 2),
    ):
        looked.clear()
        with pytest.raises(JournalCorruptError):
            journal_format.decode_segment(garbage)
        assert 0 < len(looked) <= bound


def test_a_record_a_client_hid_in_its_uuid_does_not_make_a_torn_tail_corruption() -> None:
    """An owner's uuid is 16 bytes the client chooses, kept as they are in each of its
    records; ``[2**32 - 1, 0, h'']`` fits, its CRC right. The last record cut short
    after them (a crash in the middle of its write) is a torn tail all the same:
    counted as a good record after the damage, it made the journal corrupt, and the
    daemon refused to start."""
    fake = cbor2.dumps([2**32 - 1, 0, b""])
    hostile = Owner(uuid=fake.ljust(16, b"\0"), name="vm3", id=3, pid=78, start_time=6)
    last = JournalEntry(5, 5.0, "hv", LeaseAcquired("ls", "r", LeaseMode.SHARED, hostile, 3, True))
    data = segment(count=4)
    whole = data + encode_record(last)
    after_fake = whole.index(fake) + len(fake)
    for cut in range(after_fake, len(whole)):
        scan = decode_segment(whole[:cut])
        assert (scan.count, scan.valid_length) == (4, len(data)), cut
    assert decode_segment(whole).count == 5
