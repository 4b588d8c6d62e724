"""Journal segment format: a CBOR Sequence (RFC 8742) with per-record CRC and gapless seqs.

Pure bytes in, entries out; the file handling lives beside it. A segment is::

    header  = {"format": "lockd-journal", "version": 1, "first_seq": uint}
    record  = [seq: uint, crc: uint, entry: bstr .cbor journal-entry]

The CRC (zlib CRC-32) covers the entry bytes, so a record can be checked
without trusting its decoding. Any CBOR tool can read a segment as a
sequence; see ``docs/journal.md``.

A torn tail (the last record cut short, or garbage that is only zero bytes)
is what a crash mid-write leaves; it is reported so the writer can truncate
it with a log line. Anything wrong before the tail is corruption: a lock
daemon must never silently forget a lease, so that is an error.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import attrs
import cbor2

from actors.events import JournalEntry

FORMAT = "lockd-journal"
VERSION = 1


class JournalCorruptError(Exception):
    """The journal is damaged before its tail; start-up must stop and say where."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"journal corrupt at byte {offset}: {reason}")
        self.offset = offset
        self.reason = reason

    def in_file(self, path: str) -> JournalCorruptError:
        """The same error, its reason naming the file ``path``."""
        return type(self)(self.offset, f"{path}: {self.reason}")


class JournalTooNewError(JournalCorruptError):
    """A segment of a journal version later than this build reads: a newer lockd wrote it.

    Refused wherever damage is (start-up, readers), but it is not damage: ``journal-check
    --repair`` would set the whole segment aside, every lease in it with it, so it never
    repairs one; the newer lockd, or any later one, reads it."""

    def __init__(self, offset: int, reason: str) -> None:
        Exception.__init__(
            self,
            f"journal written by a newer lockd: {reason}; run that lockd (or a later one): "
            "this one cannot read it, and journal-check --repair would throw it away",
        )
        self.offset = offset
        self.reason = reason


@attrs.frozen
class SegmentScan:
    """What a segment holds: its entries, and how many bytes of it are valid."""

    first_seq: int
    entries: tuple[JournalEntry, ...]
    valid_length: int
    torn_bytes: int
    records: tuple[dict[str, Any], ...] = ()
    """With ``raw=True``: the entries as decoded maps (integrity-checked, not yet typed)."""

    @property
    def count(self) -> int:
        """How many records the segment holds."""
        return len(self.entries) or len(self.records)


def encode_header(first_seq: int) -> bytes:
    """The first item of every segment."""
    return cbor2.dumps({"format": FORMAT, "version": VERSION, "first_seq": first_seq})


_SMALL_HEADS = tuple(tuple(bytes([major << 5 | v]) for v in range(24)) for major in range(8))
_HEAD_1 = struct.Struct(">BB")
_HEAD_2 = struct.Struct(">BH")
_HEAD_4 = struct.Struct(">BI")
_HEAD_8 = struct.Struct(">BQ")


def _head(major: int, value: int) -> bytes:
    """A CBOR item head (RFC 8949 3.1) in its shortest form (three per journal record)."""
    if value < 0:
        raise ValueError(f"{value} is negative: not an unsigned CBOR head")
    if value < 24:
        return _SMALL_HEADS[major][value]
    first = major << 5
    if value < 0x100:
        return _HEAD_1.pack(first | 24, value)
    if value < 0x10000:
        return _HEAD_2.pack(first | 25, value)
    if value < 0x100000000:
        return _HEAD_4.pack(first | 26, value)
    if value < 0x10000000000000000:
        return _HEAD_8.pack(first | 27, value)
    raise ValueError(f"{value} does not fit a CBOR head")


_USUAL_HEADS = tuple(tuple(struct.Struct(f">BB{seq}BIB{size}") for size in "BH") for seq in "HI")
"""The outer heads of the usual record in one pack, by the width of its seq (2 or 4
bytes) and of its entry's length (1 or 2): a CRC takes 4 bytes in all but one record
in 65,536, and an entry is 24 bytes to 64 KiB (an acquire about 150-350)."""


def encode_record(entry: JournalEntry) -> bytes:
    """One record: seq, CRC of the entry bytes, the entry bytes.

    The outer ``[seq, crc, bstr]`` is written by hand (it is three heads):
    one ``cbor2.dumps`` per record instead of two, on every acquire's path,
    and from seq 256 on, one ``struct`` pack instead of three heads.
    """
    payload = cbor2.dumps(entry.to_wire())
    seq, crc, size = entry.seq, zlib.crc32(payload), len(payload)
    if crc >= 0x10000 and 0x100 <= seq <= 0xFFFFFFFF and 24 <= size <= 0xFFFF:
        wide_seq, wide_size = seq > 0xFFFF, size > 0xFF
        return (
            _USUAL_HEADS[wide_seq][wide_size].pack(
                0x83, 0x19 + wide_seq, seq, 0x1A, crc, 0x58 + wide_size, size
            )
            + payload
        )
    return b"\x83" + _head(0, seq) + _head(0, crc) + _head(2, size) + payload


def _strict_decoder(stream: io.BytesIO) -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        stream, max_depth=16, allow_indefinite=False, allow_duplicate_keys=False
    )


def _check_header(item: Any) -> int:
    if not isinstance(item, dict) or item.get("format") != FORMAT:
        raise JournalCorruptError(0, "not a lockd journal segment (bad header)")
    version = item.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise JournalTooNewError(0, f"journal version {version}, this lockd reads {VERSION}")
    if version != VERSION:
        raise JournalCorruptError(0, f"unsupported journal version {version!r}")
    first_seq = item.get("first_seq")
    if not isinstance(first_seq, int) or first_seq < 1:
        raise JournalCorruptError(0, "header has no valid first_seq")
    return first_seq


def decode_segment(data: bytes, *, raw: bool = False) -> SegmentScan:
    """Read a whole segment; raise JournalCorruptError for damage before the tail.

    ``raw=True`` skips building typed entries (recovery folds the maps
    directly, several times faster); CRCs and sequence numbers are checked
    either way.
    """
    stream = io.BytesIO(data)
    decoder = _strict_decoder(stream)
    try:
        first_seq = _check_header(decoder.decode())
    except JournalCorruptError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode failure of the header is corruption
        raise JournalCorruptError(0, f"unreadable header: {exc}") from None
    entries: list[Any] = []
    expected = first_seq
    good = stream.tell()
    while good < len(data):
        reason = _read_record(decoder, expected, entries, raw=raw)
        if reason is None:
            good = stream.tell()
            expected += 1
            continue
        tail = data[good:]
        if is_torn_tail(tail, expected):
            return _scan(first_seq, entries, good, len(tail), raw=raw)
        raise JournalCorruptError(good, reason)
    return _scan(first_seq, entries, good, 0, raw=raw)


def is_torn_tail(tail: bytes, expected: int) -> bool:
    """Whether ``tail``, from the first bad record to the end of a segment, is what a
    crash in the middle of a write leaves: zero bytes, or the last record cut short or garbled with
    only zeros after it, and no good record anywhere after its start.

    Judged from the bytes, not from where the decoder stopped: cbor2 reads ahead to
    the end of the data, so "the decoder reached the end" held after any undecodable
    record, and a damaged byte in the middle of the newest segment cut off every
    good record after it (their seqs then reused).
    """
    if not tail.strip(b"\0"):
        return True
    if _checked_record(tail, 0) is not None:
        return False  # whole and its CRC right, yet bad (a seq gap): no crash leaves that
    written = tail.rstrip(b"\0")  # zeros after a cut may fall where its heads would be
    extent = _record_extent(written)
    if extent is None:
        return False  # not the start of a record: no write leaves that
    if extent < len(written):
        return False  # a whole record, and more after it
    return not _good_record_after(tail, expected)


def _record_extent(data: bytes, at: int = 0) -> int | None:
    """Where the record starting at ``at`` ends, as its heads say (beyond the data if
    they or it are cut short); None if no record starts there."""
    if data[at] != 0x83:
        return None
    at += 1
    value = 0
    for major in (0, 0, 2):  # seq, crc, the entry's byte string
        if at >= len(data):
            return len(data) + 1
        head = _uint_head(data, at, major)
        if head is None:
            info = data[at] & 0x1F
            size = _HEAD_SIZES.get(info)
            if data[at] >> 5 == major and size is not None and at + 1 + size > len(data):
                return len(data) + 1  # the head itself is cut short
            return None
        value, at = head
    return at + value


_SCAN_CANDIDATES = 1_000_000
"""Places :func:`_good_record_after` looks at before it gives up (about half a second)."""


def _good_record_after(tail: bytes, expected: int) -> bool:
    """A complete record with a matching CRC and a seq not below ``expected`` starts
    somewhere after the first byte of ``tail``: the data goes on past the damage.

    Only a tail that starts with a record running past the end gets here, at start-up.
    A tail of megabytes of 0x83 bytes, or of fake heads whose lengths make each CRC
    long, could take minutes; past :data:`_SCAN_CANDIDATES` places, or four times the
    tail's bytes in CRCs, it answers True: corruption, the operator's to look at, not
    a tail to cut off unseen."""
    start = tail.find(0x83, 1)
    budget = 4 * len(tail)
    for _ in range(_SCAN_CANDIDATES):
        if start == -1:
            return False
        extent = _record_extent(tail, start)
        if extent is not None and extent <= len(tail):  # whole: worth its CRC
            budget -= extent - start
            if budget < 0:
                return True
            record = _checked_record(tail, start)
            if record is not None and record[0] >= expected and _holds_entry(tail, start):
                return True
        start = tail.find(0x83, start + 1)
    return start != -1


def _holds_entry(data: bytes, at: int) -> bool:
    """Whether the record at ``at`` (whole, its CRC right) holds a journal entry of its
    seq, as a record the daemon wrote does.

    A client chooses its owner's 16-byte uuid, which the journal keeps as bytes in
    each of that owner's records: ``[2**32 - 1, 0, h'']`` fits in it with its CRC
    right. Counted as a good record after the damage, that made a crash cutting
    such a record short (a page of the tail lost with the host) corruption, and
    the daemon refused to start. A whole entry takes far more than 16 bytes, and no
    text a client gives can hold a record's heads (control characters are refused)."""
    seq = _uint_head(data, at + 1, 0)
    crc = None if seq is None else _uint_head(data, seq[1], 0)
    length = None if crc is None else _uint_head(data, crc[1], 2)
    if seq is None or length is None:
        return False
    payload = data[length[1] : length[1] + length[0]]
    try:
        return JournalEntry.from_wire(cbor2.loads(payload)).seq == seq[0]
    except Exception:  # noqa: BLE001 - anything that is not an entry is no good record
        return False


def _scan(first_seq: int, items: list[Any], good: int, torn: int, *, raw: bool) -> SegmentScan:
    if raw:
        return SegmentScan(first_seq, (), good, torn, tuple(items))
    return SegmentScan(first_seq, tuple(items), good, torn)


def _read_record(
    decoder: cbor2.CBORDecoder, expected: int, entries: list[Any], *, raw: bool = False
) -> str | None:
    """Decode one record into ``entries``; return why it is bad, or None."""
    try:
        item = decoder.decode()
    except cbor2.CBORDecodeEOF:
        return "record cut short (truncated)"
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for bad input
        return f"undecodable record: {exc}"
    if not (isinstance(item, list) and len(item) == 3):
        return "record is not [seq, crc, entry]"
    seq, crc, payload = item
    if not isinstance(payload, bytes) or zlib.crc32(payload) != crc:
        return f"CRC mismatch in record {seq!r}"
    if seq != expected:
        return f"sequence gap: expected {expected}, found {seq!r}"
    if raw:
        try:
            record = cbor2.loads(payload)
        except Exception as exc:  # noqa: BLE001 - a CRC-valid but unreadable entry is corruption
            return f"unreadable entry {seq}: {exc}"
        if not isinstance(record, dict) or record.get("seq") != seq:
            return f"record {seq} does not hold entry {seq}"
        entries.append(record)
        return None
    try:
        entry = JournalEntry.from_wire(cbor2.loads(payload))
    except Exception as exc:  # noqa: BLE001 - a CRC-valid but unreadable entry is corruption
        return f"unreadable entry {seq}: {exc}"
    if entry.seq != seq:
        return f"record {seq} holds entry {entry.seq}"
    entries.append(entry)
    return None


def decode_records(data: bytes, expected: int) -> tuple[list[JournalEntry], int]:
    """Complete records at the start of ``data`` (a segment body, after its header).

    Returns the entries and how many bytes they took; an incomplete record at
    the end is left for the next call (a follower reading while the daemon
    writes). A damaged complete record raises JournalCorruptError.
    """
    stream = io.BytesIO(data)
    decoder = _strict_decoder(stream)
    entries: list[JournalEntry] = []
    good = 0
    while good < len(data):
        reason = _read_record(decoder, expected, entries)
        if reason is not None:
            if reason.endswith("(truncated)"):
                break
            raise JournalCorruptError(good, reason)
        good = stream.tell()
        expected += 1
    return entries, good


_HEAD_SIZES = {24: 1, 25: 2, 26: 4, 27: 8}


def _uint_head(data: bytes, at: int, major: int) -> tuple[int, int] | None:
    """(value, offset after) of the CBOR head of ``major`` at ``at``; None if it is
    not one, or not all there."""
    if at >= len(data) or data[at] >> 5 != major:
        return None
    info = data[at] & 0x1F
    if info < 24:
        return info, at + 1
    size = _HEAD_SIZES.get(info)
    if size is None or at + 1 + size > len(data):
        return None
    return int.from_bytes(data[at + 1 : at + 1 + size], "big"), at + 1 + size


def skip_records(data: bytes, expected: int, until: int) -> tuple[int, int]:
    """Step over the complete records at the start of ``data`` whose seq is below
    ``until``, reading their heads and checking their CRCs but decoding no entry:
    (records skipped, bytes they took).

    A subscriber that resumes at a seq in the middle of an 8 MiB segment would
    otherwise have every entry before it decoded (0.7 s for a full segment, on the
    dispatcher thread). Stops early at anything unexpected (a cut-short record,
    damage): :func:`decode_records` reads from there and says what is wrong. The CRC
    is what catches a damaged length head, which would otherwise move the skip into
    the middle of a later record (damage reported at the wrong byte, or not at all).
    """
    at = 0
    count = 0
    while expected + count < until:
        record = _checked_record(data, at)
        if record is None or record[0] != expected + count:
            break
        at = record[1]
        count += 1
    return count, at


def _checked_record(data: bytes, at: int) -> tuple[int, int] | None:
    """(seq, end) of the complete record at ``at`` if its CRC matches; else None.
    Its entry is not decoded."""
    if at >= len(data) or data[at] != 0x83:
        return None
    seq = _uint_head(data, at + 1, 0)
    crc = None if seq is None else _uint_head(data, seq[1], 0)
    length = None if crc is None else _uint_head(data, crc[1], 2)
    if seq is None or crc is None or length is None:
        return None
    end = length[1] + length[0]
    if end > len(data) or zlib.crc32(memoryview(data)[length[1] : end]) != crc[0]:
        return None
    return seq[0], end


def header_length(data: bytes) -> tuple[int, int]:
    """(first_seq, bytes taken by the header) of a segment that starts with ``data``."""
    stream = io.BytesIO(data)
    try:
        first_seq = _check_header(_strict_decoder(stream).decode())
    except JournalCorruptError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode failure of the header is corruption
        raise JournalCorruptError(0, f"unreadable header: {exc}") from None
    return first_seq, stream.tell()
