"""``lockd verify``: check from outside that what daemons report is what the kernel holds.

A crash test's question after every step: is every lease a daemon reports locked in
the kernel, in its mode, is no lease file locked that no daemon reports, does no
exclusive lease have two holders (two owners, or two daemons sharing a lock
directory), and does each daemon's journal replay to what it reports? This module
answers it with the daemons' ``list-lockspaces`` and ``list-leases``, their journal
directories read as ``lockd events`` reads them, and ``F_OFD_GETLK``, which asks the
kernel who would conflict without taking any lock (a probe that took the lock, even
for a moment, could make a concurrent acquire fail).
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from actors.recovery_core import ReplayState
from lockd.journal_file import read_entries
from lockd.journal_format import JournalCorruptError
from lockd.lockfiles import lock_conflicts
from lockd.snapshot import load_newest
from protocol.names import INDEX_NAME


def kernel_lock(path: str) -> str | None:
    """The lock on byte 0 of ``path``: ``"write"``, ``"read"``, None when free, or
    ``"missing"`` when no regular file is there. Takes no lock."""
    try:
        # Looked at before it is opened: opening a device node runs its driver's open
        # (a tape rewinds), a tty may become the caller's terminal, and a FIFO's
        # waiting writer is let through.
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return "missing"
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        if os.path.islink(path):
            return "missing"
        raise OSError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "missing"
        # A shared request conflicts only with a write lock; an exclusive one with any.
        if lock_conflicts(fd, shared=True):
            return "write"
        return "read" if lock_conflicts(fd, shared=False) else None
    finally:
        os.close(fd)


@attrs.frozen
class Finding:
    """One thing that does not hold, about one lease (or one daemon's journal)."""

    check: str
    """``not-locked``, ``wrong-mode``, ``owners``, ``two-daemons``, ``not-reported``,
    ``journal-differs`` or ``journal-unreadable``."""
    message: str
    lockspace: str | None = None
    resource: str | None = None
    path: str | None = None


@attrs.frozen
class DaemonView:
    """What one daemon reports: its socket, lockspaces (name to directory), leases, the
    seq its journal is at, and its journal directory when the caller knows it."""

    socket: str
    lockspaces: dict[str, str]
    leases: list[dict[str, Any]]
    journal_seq: int
    journal_dir: str | None = None


def _held(leases: Iterable[dict[str, Any]]) -> dict[tuple[str, str], tuple[str, list[int]]]:
    return {
        (lease["lockspace"], lease["resource"]): (
            lease["mode"],
            # A pid once per hold: an owner holding a shared lease twice must be
            # journaled as holding it twice.
            sorted(o["pid"] for o in lease["owners"] for _ in range(o.get("holds", 1))),
        )
        for lease in leases
    }


def _journal(view: DaemonView) -> list[Finding]:
    """The daemon's leases against its journal's replay (snapshot, then entries)."""
    assert view.journal_dir is not None
    try:
        state = load_newest(view.journal_dir) or ReplayState()
        for entry in read_entries(view.journal_dir, since_seq=state.seq + 1):
            state.fold(entry)
    except (OSError, JournalCorruptError) as exc:
        return [Finding("journal-unreadable", f"{view.journal_dir}: {exc}")]
    if state.seq != view.journal_seq:
        return [
            Finding(
                "journal-differs",
                f"{view.journal_dir} ends at seq {state.seq}, the daemon at {view.socket} is "
                f"at {view.journal_seq}: is it this daemon's journal?",
            )
        ]
    journaled = {
        key: (
            held.mode.value,
            sorted(
                o.pid
                for k, (o, _) in held.owners.items()
                for _ in range((held.holds or {}).get(k, 1))
            ),
        )
        for key, held in state.leases.items()
    }
    reported = _held(view.leases)
    return [
        Finding(
            "journal-differs",
            f"the daemon at {view.socket} reports {_say(reported.get(key))}, its journal "
            f"{view.journal_dir} replays to {_say(journaled.get(key))}",
            key[0],
            key[1],
        )
        for key in sorted(reported.keys() | journaled.keys())
        if reported.get(key) != journaled.get(key)
    ]


def _say(held: tuple[str, list[int]] | None) -> str:
    if held is None:
        return "not held"
    mode, pids = held
    holders = (f"{pid} ({n} holds)" if n > 1 else str(pid) for pid, n in Counter(pids).items())
    return f"held {mode} by pid {', '.join(holders)}"


def verify(
    views: list[DaemonView], lock: Callable[[str], str | None] = kernel_lock
) -> tuple[int, list[Finding]]:
    """Every check over daemons sharing lock directories; returns the lease files checked
    and what does not hold (nothing, when all is well)."""
    findings: list[Finding] = []
    # Who reports each lease file, keyed by the file's real path: two daemons serving a
    # lockspace from one directory (two hosts on one lock dir) meet at the same key.
    holders: dict[str, list[tuple[str, str]]] = {}
    names: dict[str, tuple[str, str]] = {}
    directories: dict[str, str] = {}
    for view in views:
        if view.journal_dir is not None:
            findings.extend(_journal(view))
        for name, directory in view.lockspaces.items():
            directories.setdefault(os.path.realpath(directory), name)
        for lease in view.leases:
            lockspace, resource, mode = lease["lockspace"], lease["resource"], lease["mode"]
            where = view.lockspaces.get(lockspace)
            if where is None:
                message = f"{view.socket} reports it held, but lists no lockspace {lockspace!r}"
                findings.append(Finding("not-locked", message, lockspace, resource))
                continue
            path = os.path.join(os.path.realpath(where), resource)
            holders.setdefault(path, []).append((view.socket, mode))
            names[path] = (lockspace, resource)
            pids = [o["pid"] for o in lease["owners"]]
            if not pids or len(pids) != len(set(pids)) or (mode == "exclusive" and len(pids) > 1):
                listed = ", ".join(map(str, pids)) or "(none)"
                message = f"{view.socket} reports it {mode} with owners pid {listed}"
                findings.append(Finding("owners", message, lockspace, resource, path))
    for path, who in sorted(holders.items()):
        lockspace, resource = names[path]
        modes = {mode for _, mode in who}
        reports = "; ".join(f"{mode} at {socket}" for socket, mode in who)
        if len(who) > 1 and modes != {"shared"}:
            message = f"held by two daemons: {reports}"
            findings.append(Finding("two-daemons", message, lockspace, resource, path))
        found = lock(path)
        if found is None or found == "missing":
            what = "is not locked" if found is None else "does not exist"
            message = f"reported held ({reports}), but its file {what}"
            findings.append(Finding("not-locked", message, lockspace, resource, path))
        elif len(modes) == 1 and found != ("write" if "exclusive" in modes else "read"):
            message = f"reported {reports}, but the kernel has a {found} lock on it"
            findings.append(Finding("wrong-mode", message, lockspace, resource, path))
    for directory, lockspace in sorted(directories.items()):
        try:
            files = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in files:
            path = os.path.join(directory, name)
            if name == INDEX_NAME or path in holders:
                continue
            found = lock(path)
            if found is not None and found != "missing":
                message = (
                    f"{found}-locked, but no daemon checked reports it "
                    "(another host's, virtlockd's, or a leaked lock)"
                )
                findings.append(Finding("not-reported", message, lockspace, name, path))
    return len(holders), findings
