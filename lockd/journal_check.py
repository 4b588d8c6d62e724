"""``lockd journal-check``: find journal damage, and cut the journal at it when told to.

Start-up refuses a journal that is damaged before its tail, because replaying
around a hole could forget a lease. This is the way out an operator takes,
knowingly: ``--repair`` keeps a copy of everything it removes (``*.damaged``
files the daemon ignores), truncates the damaged segment at the last good
record and moves later segments aside. The daemon then recovers what the
journal says up to that record; leases taken after it are not held again
until their owners ask again, which is why the command prints the range of
sequence numbers it cut.
"""

from __future__ import annotations

import os
import shutil
import time

import attrs

from lockd.journal_file import list_segments
from lockd.journal_format import JournalCorruptError, decode_segment
from lockd.snapshot import decode_snapshot, list_snapshots


@attrs.frozen
class Damage:
    """Where the journal is damaged."""

    segment: str
    offset: int
    reason: str
    first_bad_seq: int


def find_damage(directory: str) -> tuple[list[str], Damage | None]:
    """Check every segment and snapshot; return notes on snapshots and the first damage."""
    notes = []
    for name in list_snapshots(directory):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                state = decode_snapshot(f.read())
            notes.append(f"{name}: ok, seq {state.seq}, {len(state.leases)} leases")
        except (OSError, ValueError) as exc:
            notes.append(f"{name}: unusable ({exc}); an older snapshot is used instead")
    expected: int | None = None
    for name in list_segments(directory):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            data = f.read()
        try:
            scan = decode_segment(data, raw=True)
        except JournalCorruptError as exc:
            first = expected if expected is not None else 0
            return notes, Damage(name, exc.offset, exc.reason, first)
        if expected is not None and scan.first_seq != expected:
            return notes, Damage(name, 0, f"segment starts at {scan.first_seq}, not {expected}",
                                 expected)  # fmt: skip
        expected = scan.first_seq + scan.count
        torn = f", torn tail of {scan.torn_bytes} bytes" if scan.torn_bytes else ""
        notes.append(f"{name}: ok, seq {scan.first_seq}..{expected - 1}{torn}")
    return notes, None


def repair(directory: str, damage: Damage) -> list[str]:
    """Cut the journal at ``damage``; return what was done, for the operator."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    done = []
    names = list_segments(directory)
    index = names.index(damage.segment)
    path = os.path.join(directory, damage.segment)
    copy = f"{path}.damaged-{stamp}"
    shutil.copy2(path, copy)
    done.append(f"copied {damage.segment} to {os.path.basename(copy)}")
    if damage.offset > 0:
        with open(path, "r+b") as f:
            f.truncate(damage.offset)
            os.fsync(f.fileno())
        done.append(f"truncated {damage.segment} at byte {damage.offset}")
    else:
        os.rename(path, copy.replace(".damaged-", ".removed-"))
        done.append(f"moved {damage.segment} aside")
    for later in names[index + 1 :]:
        os.rename(
            os.path.join(directory, later), os.path.join(directory, f"{later}.damaged-{stamp}")
        )
        done.append(f"moved {later} aside")
    return done
