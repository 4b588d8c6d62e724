"""``lockd journal-check``: find journal damage, and cut the journal at it when told to.

Start-up refuses a journal that is damaged where recovery needs it, because
replaying around a hole could forget a lease. This is the way out an
operator takes, knowingly:

- damage in a segment the newest usable snapshot already covers is history
  only: ``--repair`` moves that segment aside (recovery does not need it);
- damage after the snapshot is cut: ``--repair`` keeps a copy of the
  damaged segment, truncates it at the last good record, and moves later
  segments and any snapshot newer than the cut aside. The daemon then
  recovers what the journal says up to that record; leases taken after it
  are not held again until their owners ask again, which is why the command
  prints the sequence numbers it cut.

Everything removed is kept as ``*.damaged-<time>`` files, which the daemon ignores.
"""

from __future__ import annotations

import os
import shutil
import time

import attrs

from lockd.journal_file import aside_path, first_seq_of, list_segments, new_epoch
from lockd.journal_format import JournalCorruptError, JournalTooNewError, decode_segment
from lockd.snapshot import decode_snapshot, list_snapshots, seq_of


@attrs.frozen
class Damage:
    """Where the journal is damaged, and whether recovery needs that part."""

    segment: str
    offset: int
    reason: str
    first_bad_seq: int
    history_only: bool
    """The newest usable snapshot covers the whole segment."""


def _snapshot_seq(directory: str, notes: list[str]) -> int:
    best = 0
    for name in list_snapshots(directory):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                state = decode_snapshot(f.read())
            notes.append(f"{name}: ok, seq {state.seq}, {len(state.leases)} leases")
            best = max(best, state.seq)
        except (OSError, ValueError) as exc:
            notes.append(f"{name}: unusable ({exc}); an older snapshot is used instead")
    return best


def find_damage(directory: str) -> tuple[list[str], Damage | None]:
    """Check every segment and snapshot; return notes and the first damage found.

    Raises JournalTooNewError for a segment a newer lockd wrote: that is no damage."""
    notes: list[str] = []
    covered = _snapshot_seq(directory, notes)
    names = list_segments(directory)
    for i, name in enumerate(names):
        first = first_seq_of(name)
        last = first_seq_of(names[i + 1]) - 1 if i + 1 < len(names) else None
        history = last is not None and last <= covered
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        try:
            scan = decode_segment(data, raw=True)
        except JournalTooNewError as exc:
            raise exc.in_file(name) from None  # not damage: nothing here may cut it
        except JournalCorruptError as exc:
            bad_seq = first + _good_records(data)
            return notes, Damage(name, exc.offset, exc.reason, bad_seq, history)
        end = scan.first_seq + scan.count - 1
        torn = f", torn tail of {scan.torn_bytes} bytes" if scan.torn_bytes else ""
        notes.append(f"{name}: ok, seq {first}..{end}{torn}" + (" (history)" if history else ""))
    return notes, None


def _good_records(data: bytes) -> int:
    """How many records of a damaged segment read back before the damage."""
    from lockd.journal_format import decode_records, header_length

    try:
        first, length = header_length(data)
    except JournalCorruptError:
        return 0
    good = 0
    body = data[length:]
    while body:
        try:
            entries, used = decode_records(body, first + good)
        except JournalCorruptError as exc:
            entries, used = decode_records(body[: exc.offset], first + good)
            return good + len(entries)
        good += len(entries)
        if not used:
            break
        body = body[used:]
    return good


def repair(directory: str, damage: Damage) -> list[str]:
    """Act on ``damage`` as the module docstring says; return what was done."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    done = []
    names = list_segments(directory)
    path = os.path.join(directory, damage.segment)
    copy = aside_path(path, stamp)
    if damage.history_only:
        os.rename(path, copy)
        done.append(f"moved {damage.segment} aside (history only: the snapshot covers it)")
        return done
    shutil.copy2(path, copy)
    done.append(f"copied {damage.segment} to {os.path.basename(copy)}")
    if damage.offset > 0:
        with open(path, "r+b") as f:
            f.truncate(damage.offset)
            os.fsync(f.fileno())
        done.append(f"truncated {damage.segment} at byte {damage.offset}")
    else:
        os.unlink(path)
        done.append(f"removed {damage.segment} (its header was unreadable)")
    for later in names[names.index(damage.segment) + 1 :]:
        moved = os.path.join(directory, later)
        os.rename(moved, aside_path(moved, stamp))
        done.append(f"moved {later} aside")
    for snap in list_snapshots(directory):
        if seq_of(snap) >= damage.first_bad_seq:
            os.rename(
                os.path.join(directory, snap), aside_path(os.path.join(directory, snap), stamp)
            )
            done.append(f"moved {snap} aside (newer than the cut)")
    new_epoch(directory, damage.first_bad_seq)  # those seqs are handed out again
    done.append(f"entries from seq {damage.first_bad_seq} on were cut")
    return done
