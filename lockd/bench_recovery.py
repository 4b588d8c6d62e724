"""``lockd bench --scenarios recovery``: how long a crashed daemon takes to serve again.

A lock daemon's restart is the window in which no VM can start or stop, so
its length at scale is a headline number. This scenario builds a journal
with a long history (acquire/release churn) that ends with many leases held
by live owner processes, starts ``lockd serve`` on it, SIGKILLs it (a crash:
no clean shutdown, no final snapshot), starts it again and measures that
second start: from exec to the first answer, the ``recovery-completed``
duration the daemon journals, how many leases it holds again, its RSS and
threads.

The history is written straight into the journal files (the daemon's own
writer and snapshot code) rather than through the socket: a million events
through a live daemon would take many minutes, and recovery only reads
what is on disk. ``contrib/bench/recovery.py`` is a thin wrapper over this
module, so the scenario and the script cannot drift apart.

Every process started here (the daemon, each owner) is stopped by pid before
:func:`run` returns or raises, KeyboardInterrupt included.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.events import (
    Event,
    JournalEntry,
    LeaseAcquired,
    LeaseReleased,
    LockspaceCreated,
    RecoveryCompleted,
    ReleaseReason,
)
from actors.model import LeaseMode, Owner
from actors.recovery_core import ReplayState
from lockd import procs
from lockd.autospawn import PACKAGE_ROOT
from lockd.daemon import PIDFD_SHARE
from lockd.journal_file import FileJournal, read_entries
from lockd.snapshot import SnapshotWriter
from protocol.client import Client
from protocol.names import FILES_LOCKSPACE

DEFAULT_LEASES = 1024
DEFAULT_OWNERS = 64
DEFAULT_EVENTS = 20_000
"""Small enough to run in a few seconds; the issue's target is 16,384 / 1,024 / 1,000,000."""

_FD_MARGIN = 256
"""Descriptors the daemon needs besides one per lease (clients, journal, some pidfds)."""


class BenchError(Exception):
    """The scenario could not run or the daemon misbehaved; the message says which."""


def build(
    journal_dir: Path, lock_dir: Path, owners: Sequence[Owner], leases: int, events: int
) -> None:
    """Write a journal of ``events`` events ending with ``leases`` leases held by ``owners``.

    The history is one VM starting and stopping over and over on 997 disks,
    so the retained segments and snapshots look like a long-lived host's. The
    lock directory gets the lease files a live daemon would have left.
    """
    state = ReplayState()
    journal = FileJournal(str(journal_dir), retain_segments=4)

    writer = SnapshotWriter(str(journal_dir))

    def snapshot(seq: int) -> bool:
        assert state.seq == seq
        return writer.write(state)

    journal.on_rotate = snapshot
    seq = 0
    batch: list[JournalEntry] = []

    def flush() -> None:
        if batch:
            journal.append(batch)
            for e in batch:
                state.fold(e)
            batch.clear()

    def emit(event: Event) -> None:
        nonlocal seq
        seq += 1
        batch.append(JournalEntry(seq, time.time(), "bench", event))
        if len(batch) >= 512:
            flush()

    (lock_dir / FILES_LOCKSPACE).mkdir(parents=True)
    emit(LockspaceCreated(FILES_LOCKSPACE, str(lock_dir / FILES_LOCKSPACE), 0))
    churn_owner = owners[0]
    for i in range(max(0, events - leases - 1) // 2):
        name = f"churn-{i % 997}"
        emit(LeaseAcquired(FILES_LOCKSPACE, name, LeaseMode.EXCLUSIVE, churn_owner, 1, True))
        emit(LeaseReleased(FILES_LOCKSPACE, name, LeaseMode.EXCLUSIVE, churn_owner, 1,
                           ReleaseReason.CLIENT))  # fmt: skip
    for i in range(leases):  # the live state: every owner holds leases/owners disks
        name = f"disk-{i:06d}"
        (lock_dir / FILES_LOCKSPACE / name).touch(mode=0o600)
        emit(LeaseAcquired(FILES_LOCKSPACE, name, LeaseMode.EXCLUSIVE, owners[i % len(owners)],
                           1, True))  # fmt: skip
    flush()
    journal.close()


def _proc_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {key: value.strip() for key, value in (line.split(":", 1) for line in f)}


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Run:
    """The temp paths and every child process of one run, so all can be stopped by pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "lockd.sock"
        self.journal_dir = root / "journal"
        self.lock_dir = root / "locks"
        self.log = root / "daemon.log"
        self.owners: list[subprocess.Popen[bytes]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.exec_at = 0.0
        """time.monotonic() just before the daemon's fork and exec."""

    def start_owner(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL)
        self.owners.append(proc)
        return proc

    def start_daemon(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            self.exec_at = time.monotonic()
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "lockd", "serve", "--socket", str(self.socket),
                 "--admin-socket", str(self.root / "admin.sock"), "--lock-dir",
                 str(self.lock_dir), "--journal-dir", str(self.journal_dir)],
                cwd=PACKAGE_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        return self.daemon

    def first_answer(self, timeout: float) -> tuple[float, dict[str, Any]]:
        """Seconds from exec to the first ``status`` answer (clients wait out recovery)."""
        assert self.daemon is not None
        t0 = self.exec_at
        while True:
            try:
                with Client(str(self.socket), name="lockd-bench-recovery", timeout=timeout) as c:
                    status = c.call("status")
                return time.monotonic() - t0, status
            except OSError:
                if self.daemon.poll() is not None:
                    raise BenchError(
                        f"lockd serve exited with {self.daemon.returncode}:\n{_log_tail(self.log)}"
                    ) from None
                if time.monotonic() - t0 > timeout:
                    raise BenchError(
                        f"lockd serve did not answer within {timeout:.0f} s:\n{_log_tail(self.log)}"
                    ) from None
                time.sleep(0.002)

    def kill_daemon(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: nothing is flushed or snapshotted."""
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait()
            self.daemon = None

    def stop_all(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and every owner, each by its pid."""
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            procs.stop_child(daemon)
        while self.owners:
            proc = self.owners.pop()
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _recovery_completed(journal_dir: Path, since_seq: int, timeout: float) -> RecoveryCompleted:
    """The restarted daemon's ``recovery-completed`` event (journaled before it serves)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            e.event
            for e in read_entries(str(journal_dir), since_seq)
            if isinstance(e.event, RecoveryCompleted)
        ]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise BenchError(f"no recovery-completed event after seq {since_seq - 1}")
        time.sleep(0.01)


def run(
    *,
    leases: int = DEFAULT_LEASES,
    owners: int = DEFAULT_OWNERS,
    events: int = DEFAULT_EVENTS,
    keep: bool = False,
) -> dict[str, Any]:
    """Build the state, start, SIGKILL and restart ``lockd serve``; return the JSON-ready result.

    Raises :class:`BenchError` if the sizes do not fit this host's descriptor
    limit or the daemon does not come back; every child is stopped either way.
    """
    if leases < 1 or owners < 1 or events < 0:
        raise BenchError("recovery needs at least 1 lease and 1 owner, and events >= 0")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # One fd per lease, a pidfd per owner up to the daemon's budget (owners past
    # it are polled), and a margin for clients and the journal.
    need = leases + min(owners, hard // PIDFD_SHARE) + _FD_MARGIN
    if hard != resource.RLIM_INFINITY and need > hard:
        raise BenchError(
            f"{leases} leases and {owners} owners need about {need} descriptors in the "
            f"daemon; this host's hard limit is {hard}"
        )
    # The daemon inherits the limit: one fd per lease plus pidfds for (some) owners.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(tempfile.mkdtemp(prefix="lockd-bench-recovery-"))
    state = _Run(root)
    # Generous: the 1,000,000-event target replays in about a second on a small VM.
    timeout = 60.0 + (leases + events / 100) / 100
    try:
        owner_list = []
        for i in range(owners):
            proc = state.start_owner()
            started = procs.start_time(proc.pid)
            if started is None:
                raise BenchError(f"owner process {proc.pid} vanished at start")
            owner_list.append(Owner(uuid.uuid4().bytes, f"vm{i}", i + 1, proc.pid, started))
        t0 = time.monotonic()
        build(state.journal_dir, state.lock_dir, owner_list, leases, events)
        build_s = time.monotonic() - t0
        journal_bytes = sum(f.stat().st_size for f in state.journal_dir.iterdir())

        state.start_daemon()
        first_s, first = state.first_answer(timeout)
        if first["leases"] != leases:
            raise BenchError(
                f"the first start holds {first['leases']} of {leases} leases:\n"
                f"{_log_tail(state.log)}"
            )
        state.kill_daemon()

        daemon = state.start_daemon()
        serving_s, status = state.first_answer(timeout)
        recovered = _recovery_completed(state.journal_dir, first["journal_seq"] + 1, timeout)
        fields = _proc_fields(daemon.pid)
        return {
            "leases": leases,
            "owners": owners,
            "events": events,
            "journal_bytes": journal_bytes,
            "build_s": round(build_s, 2),
            "first_start_ms": round(first_s * 1000, 1),
            "exec_to_first_answer_ms": round(serving_s * 1000, 1),
            "recovery_completed_ms": round(recovered.duration_ms, 1),
            "held_again": recovered.held,
            "released": recovered.released,
            "lost": recovered.lost,
            "leases_listed": status["leases"],
            "daemon_rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "daemon_threads": int(fields["Threads"]),
            "daemon_fds": len(os.listdir(f"/proc/{daemon.pid}/fd")),
        }
    finally:
        state.stop_all()
        if keep:
            print(f"lockd bench: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def format_result(result: dict[str, Any]) -> str:
    """One human-readable line of :func:`run`'s result."""
    return (
        f"recovery ({result['leases']} leases, {result['owners']} owners, "
        f"{result['events']} events): exec to first answer {result['exec_to_first_answer_ms']} "
        f"ms, recovery-completed {result['recovery_completed_ms']} ms, held again "
        f"{result['held_again']}, RSS {result['daemon_rss_mib']} MiB, "
        f"{result['daemon_threads']} thread(s)"
    )
