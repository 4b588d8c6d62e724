"""Read the journal back into a :class:`ReplayState`: newest snapshot, then the entries after it."""

from __future__ import annotations

import os

from actors.recovery_core import ReplayState
from lockd.journal_file import FileJournal, first_seq_of, list_segments
from lockd.journal_format import JournalCorruptError, decode_segment


def replay(journal: FileJournal, snapshot: ReplayState | None) -> tuple[ReplayState, int]:
    """The state the journal describes, and how many entries were replayed after the snapshot.

    Raises JournalCorruptError when entries after the snapshot are missing or damaged.
    """
    state = snapshot or ReplayState()
    directory = journal.directory
    names = list_segments(directory)
    firsts = [first_seq_of(n) for n in names]
    needed = [
        name for i, name in enumerate(names) if i + 1 == len(names) or firsts[i + 1] - 1 > state.seq
    ]
    if needed and first_seq_of(needed[0]) > state.seq + 1:
        raise JournalCorruptError(
            0,
            f"{os.path.join(directory, needed[0])}: entries {state.seq + 1} to "
            f"{first_seq_of(needed[0]) - 1} are missing and no snapshot covers them",
        )
    replayed = 0
    for name in needed:
        scan = journal.last_scan
        if scan is None or scan.first_seq != first_seq_of(name):
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                try:
                    scan = decode_segment(f.read(), raw=True)
                except JournalCorruptError as exc:
                    raise exc.in_file(path) from None
        for record in scan.records:
            if record["seq"] > state.seq:
                try:
                    state.fold_wire(record)
                except (KeyError, TypeError, ValueError) as exc:
                    raise JournalCorruptError(
                        0, f"{directory}: entry {record['seq']} cannot be replayed: {exc!r}"
                    ) from None
                replayed += 1
    journal.last_scan = None  # recovery has what it needs; free the memory
    state.replayed()
    if state.seq != journal.next_seq - 1:
        raise JournalCorruptError(
            0, f"{directory}: replay ends at seq {state.seq}, the journal at {journal.next_seq - 1}"
        )
    return state, replayed
