"""The journal on disk: segment files in a local directory.

Segments are named ``journal-<first seq, 20 digits>.cbor`` so they sort in
order. Opening the journal reads the newest segment to find the next sequence
number, truncating a torn tail (what a crash mid-write leaves) with a log
line; damage before the tail raises :class:`JournalCorruptError` and start-up
stops. Appends are one ``write()`` per batch, so a reply sent after
:meth:`FileJournal.append` returns survives a crash of the daemon process;
:meth:`FileJournal.sync` (``fdatasync``) makes it survive a host crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from actors.events import JournalEntry
from actors.faults import crash_point
from lockd.config import make_dirs
from lockd.journal_format import (
    JournalCorruptError,
    SegmentScan,
    decode_records,
    decode_segment,
    encode_header,
    encode_record,
    header_length,
    is_torn_tail,
    skip_records,
)

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "journal-"
SEGMENT_SUFFIX = ".cbor"
DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record is ``first_seq``."""
    return f"{SEGMENT_PREFIX}{first_seq:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: str) -> list[str]:
    """Segment file names in sequence order."""
    names = [
        n
        for n in os.listdir(directory)
        if n.startswith(SEGMENT_PREFIX) and n.endswith(SEGMENT_SUFFIX)
    ]
    return sorted(names)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _holds_only(path: str, header: bytes) -> bool:
    """Whether the file at ``path`` holds ``header`` and nothing else."""
    try:
        with open(path, "rb") as f:
            return f.read(len(header) + 1) == header
    except OSError:
        return False


LOCK_FILE = ".lock"
"""Locked (flock) by whatever writes the journal: a daemon, or ``journal-check
--repair``; it holds a line saying which, for the message of one refused."""


def lock_journal(directory: str, holder: str) -> int | None:
    """Take the journal directory's lock and write who holds it (``holder``: "serving
    SOCKET", say); the fd, which keeps the lock until closed; None if another holds it."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock is what keeps others out, the line only explains it
    return fd


def journal_holder(directory: str) -> str | None:
    """Who holds the journal's lock, as it wrote (``pid N, serving SOCKET``); None when
    unknown (a lockd from before the line, or none)."""
    try:
        with open(os.path.join(directory, LOCK_FILE), encoding="utf-8") as f:
            pid, _, holder = f.read(4096).strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return None
    return f"pid {pid}, {holder}" if pid.isdigit() and holder else None


EPOCH_FILE = ".epoch"
"""``ID FROM``: the journal's timeline. A cut (start-up after a reboot, or
``journal-check --repair``) hands seqs out again from ``FROM`` and draws a new
``ID``, so an auditor that kept a seq can tell an event of the old timeline from
the new one's under the same seq."""


def read_epoch(directory: str) -> tuple[str, int] | None:
    """The journal's epoch: (id, the first seq of its timeline); None if not recorded."""
    try:
        with open(os.path.join(directory, EPOCH_FILE), encoding="ascii") as f:
            ident, _, first = f.read(256).strip().partition(" ")
        return (ident, int(first)) if ident else None
    except (OSError, ValueError):
        return None


def new_epoch(directory: str, first_seq: int) -> tuple[str, int]:
    """Record, durably, that the journal's timeline starts again at ``first_seq``."""
    epoch = (os.urandom(8).hex(), first_seq)
    _write_durably(directory, EPOCH_FILE, f"{epoch[0]} {epoch[1]}\n".encode())
    return epoch


def _write_durably(directory: str, name: str, data: bytes) -> None:
    """Replace ``directory/name`` with ``data``, whole or not at all, and on disk."""
    path = os.path.join(directory, name)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        written = 0
        while written < len(data):  # until done, or the kernel says why not (ENOSPC)
            written += os.write(fd, data[written:])
        os.fsync(fd)
        os.rename(tmp, path)
    except BaseException:
        # Refused (a full disk, or the rename itself: EIO, a read-only remount): no
        # temporary is left behind, holding what it got.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    _fsync_dir(directory)


def aside_path(path: str, stamp: str) -> str:
    """Where ``path`` is kept set aside as damaged: ``<path>.damaged-<stamp>``, or that
    with ``.2``, ``.3``, ... after it when the name is taken.

    ``stamp`` is the wall clock's, to the second, and a wall clock repeats: stepped
    back, or on a host without a working RTC, which boots at the same time each boot
    (and cuts a reboot's damage then). Two cuts of one segment with one stamp gave
    one name, and the second copy replaced the first, with the records it kept."""
    candidate, n = f"{path}.damaged-{stamp}", 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}.damaged-{stamp}.{n}"
    return candidate


BOOT_FILE = ".boot"
"""The boot id (16 bytes) of the host's boot in which a daemon last started on the journal."""


def last_boot(directory: str) -> bytes | None:
    """The boot id :func:`record_boot` last wrote; None if none was (an older lockd)."""
    try:
        with open(os.path.join(directory, BOOT_FILE), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data if len(data) == 16 else None


def check_writable(directory: str) -> None:
    """Raise OSError where a daemon starting on the journal in ``directory`` would stop
    at once: its ``.boot`` unreadable, or its newest segment not to be opened for
    appending (a filesystem gone read-only, or failing with EIO). Writes nothing."""
    last_boot(directory)
    names = list_segments(directory)
    if names:
        path = os.path.join(directory, names[-1])
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))


def record_boot(directory: str, boot: bytes) -> None:
    """Say durably that a daemon started on the journal in boot ``boot``."""
    _write_durably(directory, BOOT_FILE, boot)


def _written_before_this_boot(path: str) -> bool:
    """Whether the segment was last written before this boot began, by its mtime.

    ``.boot`` says which boot a lockd that records it last started in, not that the
    journal was not written since: an older lockd (which writes no ``.boot``) may
    have run in this boot, and damage it left is not a reboot's.

    A clock behind at boot (a dead RTC battery, which timesyncd sets to its last
    saved time; an RTC kept in local time west of UTC) makes the previous boot's
    last writes look newer than the boot: their damage was refused, and the host
    came back without lockd. A segment stamped later than the clock's now was
    written by a clock ahead of this one, which within one boot only a step back
    since makes: taken as the previous boot's. Stamped between the boot and now, a
    segment is taken as this boot's, and its damage refused, by a wrong clock too.
    """
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        now, written = time.time(), os.stat(path).st_mtime
        return written < now - uptime or written > now
    except (OSError, ValueError, IndexError):
        return False


def first_seq_of(name: str) -> int:
    """The first seq a segment holds, from its name."""
    return int(name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)])


def read_entries(directory: str, since_seq: int = 1) -> Iterator[JournalEntry]:
    """Every entry with seq >= ``since_seq``, across segments; works while the daemon is down."""
    names = list_segments(directory)
    if not names:  # no history (yet): zip below would find its lists unequal
        return
    for name, later in zip(names, [*names[1:], None], strict=True):
        if later is not None and first_seq_of(later) <= since_seq:
            continue  # every entry of this segment is older than since_seq
        with open(os.path.join(directory, name), "rb") as f:
            scan = decode_segment(f.read())
        yield from (e for e in scan.entries if e.seq >= since_seq)


class FileJournal:
    """Appends journal entries to segment files; one writer per directory."""

    def __init__(
        self,
        directory: str,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        *,
        retain_segments: int = 0,
        first_seq: int = 1,
        cut_damage: bool = False,
    ) -> None:
        """``cut_damage``: the host rebooted since a daemon last wrote this journal, so
        damage in the newest segment is cut there rather than refused (see
        :meth:`_cut`)."""
        self.directory = directory
        self._cut_damage = cut_damage
        self._segment_bytes = segment_bytes
        self._retain = retain_segments
        make_dirs(directory, 0o700)
        self._fd = -1
        self._size = 0
        self._torn = False
        """A write cut short left bytes past ``_size`` that could not be truncated then
        (EIO): they are, before anything else is appended after them."""
        self.path = ""
        """The segment appends go to."""
        self._snapshot_tried = 0
        self._snapshot_covered = False
        """The seq ``on_rotate`` was last called for, and what it answered."""
        self.next_seq = first_seq
        self.bytes_written = 0
        """Bytes appended by this process (the journal metrics count them)."""
        self.on_rotate: Callable[[int], bool] | None = None
        """Called with the last seq before a new segment starts (the closing segment is
        synced). True: a snapshot covering that seq is on disk now; otherwise call
        :meth:`retain` once one is."""
        self.last_scan: SegmentScan | None = None
        """The newest segment as read at open (recovery replays it without reading it again)."""
        for stray in os.listdir(directory):
            if stray.startswith(f".{SEGMENT_PREFIX}") and stray.endswith(".tmp"):
                os.unlink(os.path.join(directory, stray))  # a rotation cut short by a crash
        names = list_segments(directory)
        if names:
            self._open_last(names[-1])
        else:
            self._start_segment(first_seq)

    def _open_last(self, name: str) -> None:
        path = os.path.join(self.directory, name)
        with open(path, "rb") as f:
            data = f.read()
        try:
            scan = decode_segment(data, raw=True)
        except JournalCorruptError as exc:
            if not (self._cut_damage and exc.offset > 0 and _written_before_this_boot(path)):
                raise exc.in_file(path) from None
            scan = self._cut(path, data, exc)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.path = path
        if scan.torn_bytes:
            log.warning(
                "journal %s: truncating a torn tail of %d bytes after seq %d",
                path,
                scan.torn_bytes,
                scan.first_seq + scan.count - 1,
            )
            os.ftruncate(self._fd, scan.valid_length)
            os.fsync(self._fd)
        self._size = scan.valid_length
        self.next_seq = scan.first_seq + scan.count
        self.last_scan = scan

    def _cut(self, path: str, data: bytes, damage: JournalCorruptError) -> SegmentScan:
        """Cut the newest segment at ``damage``, after a reboot; keep the whole as
        ``<segment>.damaged-<time>``.

        Writes not yet synced when the host went down reach the disk in no set
        order: with ``journal_sync = none`` (and the last batch of ``batch``), a page
        of the tail can keep older contents, zeros where later records were, while
        pages after it hold their records. That is damage with good records after
        it, which start-up refuses, so the host came back with no lockd until an
        operator ran ``journal-check --repair``. A journal last written in another
        boot loses nothing a lock needs at the cut: every lease it names ended with
        that boot (its owners are gone), and the snapshot is older than the newest
        segment. Within one boot damage is refused as before.
        """
        copy = aside_path(path, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        # 0600 as the segment it copies (a plain open() left it readable by every user
        # the journal directory lets in, owners' names and pids with it).
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        _fsync_dir(self.directory)  # the copy's name too, before the segment is cut
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, damage.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        scan = decode_segment(data[: damage.offset], raw=True)
        new_epoch(self.directory, scan.first_seq + scan.count)  # its seqs come again
        log.error(
            "journal %s: %s at byte %d, written before the host's last reboot (what a "
            "crash leaves of writes not yet synced): cut there, after seq %d; the whole "
            "segment is kept as %s",
            path,
            damage.reason,
            damage.offset,
            scan.first_seq + scan.count - 1,
            copy,
        )
        return scan

    def _start_segment(self, first_seq: int) -> None:
        # Header first under a temporary name, then rename: a crash never
        # leaves a segment without its header (which would stop start-up).
        path = os.path.join(self.directory, segment_name(first_seq))
        tmp = os.path.join(self.directory, f".{segment_name(first_seq)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        header = encode_header(first_seq)
        # A rotation that fails (disk full, EIO) is tried again at the next append, and
        # each append while the disk stays full gets here: the temporary's fd is closed
        # on the way out (it leaked, one fd per refused request, until the daemon ran
        # out of them). A segment renamed in whose directory sync failed holds only
        # its header: the next try renames over it and syncs again (it found the name
        # taken, and the journal refused every write until a restart).
        try:
            if os.write(fd, header) != len(header):
                raise OSError(f"short write of the header of {path}")
            os.fsync(fd)
            if os.path.exists(path) and not _holds_only(path, header):
                raise FileExistsError(f"journal segment {path} exists already")
            os.rename(tmp, path)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._size = fd, len(header)
        self.path = path

    def append(self, entries: Sequence[JournalEntry]) -> None:
        """Write entries (their seqs must continue the journal) with one write(); raises OSError."""
        for offset, entry in enumerate(entries):
            if entry.seq != self.next_seq + offset:
                raise ValueError(f"entry seq {entry.seq} does not continue the journal")
        if self._torn:
            # Appended after the torn bytes, the next record sat behind garbage in the
            # middle of the segment, and the next start refused the journal as corrupt.
            try:
                self._truncate_torn()
            except OSError as exc:
                raise OSError(
                    exc.errno, f"{exc.strerror} (truncating a write cut short)", self.path
                ) from None
        if self._size >= self._segment_bytes:
            try:
                self.rotate()
            except OSError as exc:
                if exc.filename is not None or exc.errno is None:
                    raise
                raise OSError(
                    exc.errno, f"{exc.strerror} (rotating the journal)", self.path
                ) from None
        data = (
            encode_record(entries[0])
            if len(entries) == 1
            else b"".join(map(encode_record, entries))
        )
        written = 0
        try:
            # A write cut short (the disk filled up in its middle) is carried on until
            # the kernel says why it stops: the error names the cause (ENOSPC, EIO) and
            # the segment; until 2026-11-27 it said only "short journal write (85 of
            # 223 bytes)".
            while written < len(data):
                written += os.write(self._fd, data[written:] if written else data)
        except OSError as exc:
            if written:
                # A torn record: truncate it back so the next append is clean; if that
                # fails too, the next append tries again first, and is refused until
                # it works. The write's error is the one raised.
                self._torn = True
                with contextlib.suppress(OSError):
                    self._truncate_torn()
            raise OSError(exc.errno, exc.strerror, self.path) from None
        self._size += written
        self.bytes_written += written
        self.next_seq += len(entries)

    def _truncate_torn(self) -> None:
        """Cut the segment back to its last whole record (after a write cut short)."""
        os.ftruncate(self._fd, self._size)
        self._torn = False

    def rotate(self) -> None:
        """Start a new segment; snapshot first (``on_rotate``), then apply retention."""
        # Synced here, before the next segment's header is made durable: otherwise
        # a host crash could keep the next segment and lose the end of this one, a
        # gap in the middle of the journal that stops start-up.
        self.sync()
        last_seq = self.next_seq - 1
        if self.on_rotate is not None and self._snapshot_tried != last_seq:
            # Once per seq: a rotation the disk refuses is tried again at every append
            # while it stays full, and each try forked a snapshot child (which failed,
            # and logged it, for the same seq). A snapshot that failed is taken at the
            # next rotation, as after any failed one; old segments stay meanwhile.
            self._snapshot_tried, self._snapshot_covered = last_seq, False
            try:
                self._snapshot_covered = self.on_rotate(last_seq)
            except OSError as exc:
                log.error("journal snapshot at seq %d failed: %s", last_seq, exc)
        covered = self._snapshot_covered and self._snapshot_tried == last_seq
        self._start_segment(self.next_seq)
        self.last_scan = None
        crash_point("segment-started")
        if covered:
            self.retain(last_seq)

    def retain(self, covered_seq: int) -> None:
        """A snapshot up to ``covered_seq`` is on disk: delete the segments it covers
        beyond the newest ``retain_segments`` of them (0 keeps all).

        Old segments are history for auditors only once a snapshot covers them.
        """
        for name in self._doomed(covered_seq):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, name))

    def _doomed(self, covered_seq: int) -> list[str]:
        """The segments :meth:`retain` deletes for a snapshot up to ``covered_seq``."""
        if self._retain <= 0:
            return []
        names = list_segments(self.directory)
        covered = [
            name
            for name, later in itertools.pairwise(names)
            if first_seq_of(later) - 1 <= covered_seq
        ]
        return covered[: -self._retain]

    def retained_from(self, covered_seq: int) -> int | None:
        """The first seq of the journal :meth:`retain` keeps for a snapshot up to
        ``covered_seq``; None if it deletes nothing."""
        doomed = self._doomed(covered_seq)
        if not doomed:
            return None
        names = list_segments(self.directory)
        return first_seq_of(names[names.index(doomed[-1]) + 1])

    def reader(self, since_seq: int) -> JournalFollower:
        """The entries from ``since_seq`` on, read back from the segment files."""
        return JournalFollower(self.directory, since_seq)

    def sync(self) -> None:
        """fdatasync the current segment (host-crash durability)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Close the current segment."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


SKIP_STEPS = 16
"""Reads of ``max_bytes`` one bounded poll makes while it skips records before its
``next_seq`` (1 MiB at the daemon's 64 KiB replay steps: about 20 ms here)."""


class JournalFollower:
    """Reads new entries as the daemon appends them, across segment rotation.

    Keeps the current segment open at the end of the last complete record, so
    each poll costs only the new bytes.
    """

    def __init__(self, directory: str, since_seq: int = 1) -> None:
        self.directory = directory
        self.next_seq = since_seq
        self._name: str | None = None
        self._file: Any = None
        self._pending = b""
        self._pending_at = 0
        """Where ``_pending`` starts in the open segment: damage is reported at its byte
        in the file, as ``lockd serve`` and ``journal-check`` report it."""
        self._expected = 0
        self.more = False
        """The last poll stopped at its budget while skipping to ``next_seq``: it
        returned nothing, yet entries are left to read."""

    def close(self) -> None:
        """Close the open segment."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def read_to(self) -> int:
        """The seq after the last record read: the journal's next, once a poll read to
        its end (0 before a segment was opened)."""
        return self._expected

    def park(self) -> None:
        """Close the open segment but keep the place: the next poll opens it again
        there. A replay waiting for a slow subscriber holds no fd meanwhile, nor the
        disk of a segment that retention deletes (the replay then goes on from the
        oldest segment kept, and the gap shows in the seqs)."""
        self.close()

    def skip_segment(self) -> int | None:
        """After damage in the open segment: go on at the start of the next one (the
        rest of this one is lost to this reader); the seq it goes on from, or None
        when no later segment is there."""
        self.close()
        later = [
            n for n in list_segments(self.directory)
            if first_seq_of(n) > self.next_seq and (self._name is None or n > self._name)
        ]  # fmt: skip
        if not later:
            return None
        self._name, self._pending = None, b""
        self.next_seq = first_seq_of(later[0])
        return self.next_seq

    def _reopen(self, name: str) -> None:
        try:
            self._file = open(os.path.join(self.directory, name), "rb")  # noqa: SIM115
        except FileNotFoundError:
            self._name, self._pending = None, b""  # deleted meanwhile: start again
            return
        self._file.seek(self._pending_at + len(self._pending))

    def _open(self, name: str) -> None:
        self.close()
        file = open(os.path.join(self.directory, name), "rb")  # noqa: SIM115 - kept open
        try:
            # Read before it is taken on: a header refused (a newer lockd's, or damaged)
            # left the follower reading its records from byte 256, called corrupt there.
            first_seq, length = header_length(file.read(256))
        except JournalCorruptError as exc:
            file.close()
            raise exc.in_file(name) from None
        except BaseException:
            file.close()
            raise
        self._file = file
        self._name = name
        self._file.seek(length)
        self._pending = b""
        self._pending_at = length
        self._expected = first_seq

    def _take(self, used: int, count: int) -> None:
        """``used`` bytes of ``_pending`` held ``count`` records: move past them."""
        self._pending = self._pending[used:]
        self._pending_at += used
        self._expected += count

    def _read(self, max_bytes: int, out: list[JournalEntry]) -> int:
        """Read on in the open segment; add the entries from ``next_seq`` on that it
        completed to ``out``; how many bytes it got."""
        assert self._file is not None
        carried, carried_at = len(self._pending), self._pending_at
        data = self._file.read(max_bytes)
        if carried and self._rewritten(carried_at, carried):
            # The writer cut back the record begun in an earlier read (a write cut
            # short) and wrote others there: read those from where it began. Damage
            # below catches this too, but only once the cut record's length has
            # been read, which may be long after: the file may now end before where
            # this read began.
            self._file.seek(carried_at)
            self._pending = b""
            return self._read(max_bytes, out)
        self._pending += data
        if self._expected < self.next_seq:
            skipped, used = skip_records(self._pending, self._expected, self.next_seq)
            self._take(used, skipped)
        try:
            entries, used = decode_records(self._pending, self._expected)
        except JournalCorruptError as exc:
            if exc.offset == 0 and carried and self._pending_at == carried_at:
                # Damage where a record begun in an earlier read went on: the writer
                # may have cut that record back (a write cut short, truncated) and
                # written others there, after which this read went on. Read it again
                # from the file; damage that is there is met again, and raised.
                self._file.seek(carried_at)
                self._pending = b""
                return self._read(max_bytes, out)
            # The records before the damage are good: take them (poll returns them,
            # and raises at the damage next time).
            entries, used = decode_records(self._pending[: exc.offset], self._expected)
            self._take(used, len(entries))
            out.extend(e for e in entries if e.seq >= self.next_seq)
            raise JournalCorruptError(
                self._pending_at + exc.offset - used, f"{self._name}: {exc.reason}"
            ) from None
        self._take(used, len(entries))
        out.extend(e for e in entries if e.seq >= self.next_seq)
        return len(data)

    def _rewritten(self, at: int, length: int) -> bool:
        """True if the file's ``length`` bytes at ``at`` are no longer ``_pending``'s
        first ones (read while a record there was still being written)."""
        assert self._file is not None
        return os.pread(self._file.fileno(), length, at) != self._pending[:length]

    def _read_on(self, names: list[str], max_bytes: int, out: list[JournalEntry]) -> None:
        reads = 0
        while True:
            got = self._read(max_bytes, out)
            reads += 1
            if 0 < max_bytes <= got:
                if out:
                    return
                if reads >= SKIP_STEPS:
                    self.more = True
                    return
                continue  # more of this segment is there to read
            if not self._next_segment(names):
                return
            if out and max_bytes > 0:
                return

    def _next_segment(self, names: list[str]) -> bool:
        """At the end of the open segment: open the next one if the writer went on to
        it (the writer rotated); True if so."""
        later = [n for n in names if self._name is not None and n > self._name]
        if not later:
            return False
        if self._pending:
            # The writer went on to a later segment, so this one is whole: what is
            # left of it never becomes a record (a length head pointing past its
            # end). A torn tail is skipped, as decode_segment does; damage is not.
            if not is_torn_tail(self._pending, self._expected):
                raise JournalCorruptError(
                    self._pending_at, f"{self._name}: record runs past the segment's end"
                )
            self._pending = b""
        self._open(later[0])
        return True

    def poll(self, max_bytes: int = -1) -> list[JournalEntry]:
        """Entries with seq >= next_seq written since the last poll (may be empty).

        ``max_bytes`` > 0 reads about that much at a time and returns once it has
        entries: the daemon replays a subscriber's backlog in such steps, between
        other work, and never holds a whole segment's entries at once. Skipping to a
        ``next_seq`` deep in a segment stops after :data:`SKIP_STEPS` reads, with
        nothing and :attr:`more` set (the next poll goes on), so that no step holds
        the daemon for the whole of an 8 MiB segment.

        An OSError (opening the next segment) or damage is raised only when nothing
        was read before it: entries already taken are returned first, and the next
        poll tries again, from where the error was.
        """
        self.more = False
        names = list_segments(self.directory)
        if not names:
            return []
        if self._name is not None and self._file is None:
            self._reopen(self._name)  # parked
        if self._name is None:
            start = names[0]
            for name in names:
                if first_seq_of(name) <= self.next_seq:
                    start = name
            self._open(start)
        out: list[JournalEntry] = []
        try:
            self._read_on(names, max_bytes, out)
        except (OSError, JournalCorruptError):
            if not out:
                raise
            # What this poll took is not lost: it is returned, and the next poll
            # meets the error again (damage) or gets past it (an open that failed).
        if out:
            self.next_seq = out[-1].seq + 1
        return out
