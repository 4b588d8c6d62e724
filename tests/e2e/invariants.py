"""What must hold after any crash and restart, checked from outside the daemon."""

from __future__ import annotations

import os
from pathlib import Path

from actors.recovery_core import ReplayState
from lockd.journal_file import read_entries
from lockd.snapshot import load_newest
from tests.e2e.conftest import DaemonProcess
from tests.lockprobe import probe

INDEX = "org.libvirt.lockd.index"


def journal_state(journal_dir: Path) -> ReplayState:
    """The journal's view, read the way an auditor would: snapshot, then the entries after it."""
    state = load_newest(str(journal_dir)) or ReplayState()
    for entry in read_entries(str(journal_dir), since_seq=state.seq + 1):
        state.fold(entry)
    return state


def listed(daemon: DaemonProcess) -> dict[tuple[str, str], tuple[str, tuple[int, ...]]]:
    with daemon.client("invariants") as client:
        leases = client.call("list-leases")["leases"]
    return {
        (lease["lockspace"], lease["resource"]): (
            lease["mode"],
            tuple(sorted(o["pid"] for o in lease["owners"])),
        )
        for lease in leases
    }


def check(daemon: DaemonProcess, *, others: set[Path] = frozenset()) -> None:  # type: ignore[assignment]
    """Held leases are locked in the kernel, nothing else is, and the journal agrees.

    ``others``: lease files a different process holds on purpose (a thief).
    """
    reported = listed(daemon)
    state = journal_state(daemon.journal_dir)
    from_journal = {
        key: (held.mode.value, tuple(sorted(o.pid for o, _ in held.owners.values())))
        for key, held in state.leases.items()
    }
    assert reported == from_journal, (reported, from_journal)
    for (lockspace, resource), (mode, pids) in reported.items():
        assert pids, f"{lockspace}/{resource} listed without owners"
        assert len(pids) == len(set(pids))
        if mode == "exclusive":
            assert len(pids) == 1, f"{lockspace}/{resource}: two exclusive holders {pids}"
        path = daemon.lock_dir / lockspace / resource
        assert probe(path, "ofd", "write") == "busy", f"{path} is listed but not locked"
        if mode == "exclusive":
            assert probe(path, "classic", "read") == "busy"
    for lockspace in os.listdir(daemon.lock_dir):
        for name in os.listdir(daemon.lock_dir / lockspace):
            path = daemon.lock_dir / lockspace / name
            if name == INDEX or (lockspace, name) in reported or path in others:
                continue
            assert probe(path, "ofd", "write") == "free", f"{path} is locked but not listed"


def check_all(daemons: list[DaemonProcess]) -> int:
    """:func:`check` for daemons sharing one lock directory; returns the leases checked.

    Every lease each daemon reports is locked, with its journal agreeing; no
    lease is reported by two daemons unless both hold it shared; and no lease
    file is locked without some daemon reporting it.
    """
    lock_dir = daemons[0].lock_dir
    reported: dict[tuple[str, str], list[str]] = {}
    for daemon in daemons:
        mine = listed(daemon)
        state = journal_state(daemon.journal_dir)
        from_journal = {
            key: (held.mode.value, tuple(sorted(o.pid for o, _ in held.owners.values())))
            for key, held in state.leases.items()
        }
        assert mine == from_journal, (daemon.root, mine, from_journal)
        for key, (mode, _) in mine.items():
            reported.setdefault(key, []).append(mode)
            path = lock_dir / key[0] / key[1]
            assert probe(path, "ofd", "write") == "busy", f"{path} is listed but not locked"
    for key, modes in reported.items():
        assert len(modes) == 1 or set(modes) == {"shared"}, f"{key} held by two daemons: {modes}"
    for lockspace in os.listdir(lock_dir):
        for name in os.listdir(lock_dir / lockspace):
            if name == INDEX or (lockspace, name) in reported:
                continue
            path = lock_dir / lockspace / name
            assert probe(path, "ofd", "write") == "free", f"{path} is locked but not listed"
    return len(reported)
