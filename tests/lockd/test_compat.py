"""Files an earlier lockd wrote (``tests/compat/b6cb918``, see its README), read by this
build: the journal an upgrade starts on, and the handoff an upgrade by re-exec takes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cbor2

from actors.model import LeaseMode
from lockd.journal_file import FileJournal
from lockd.reexec import Handoff
from lockd.replay import replay
from lockd.snapshot import load_newest
from protocol.names import FILES_LOCKSPACE, lease_name_for_path

EARLIER = Path(__file__).resolve().parents[1] / "compat" / "b6cb918"


def earlier_journal(tmp_path: Path) -> Path:
    """A copy of the earlier build's journal (readers may write beside it)."""
    journal = tmp_path / "journal"
    shutil.copytree(EARLIER / "journal", journal)
    journal.chmod(0o700)
    return journal


def lockd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lockd", *args], capture_output=True, text=True, check=False
    )


def test_the_earlier_builds_journal_replays_to_the_leases_it_held(tmp_path: Path) -> None:
    """Its newest snapshot and the entries after it give what it held when it was killed:
    vm-a's exclusive lease, and the shared one vm-b kept after vm-c exited."""
    journal = earlier_journal(tmp_path)
    snapshot = load_newest(str(journal))
    assert snapshot is not None
    assert snapshot.seq == 34
    writer = FileJournal(str(journal), 4096, first_seq=snapshot.seq + 1)
    try:
        state, replayed = replay(writer, snapshot)
    finally:
        writer.close()
    assert (state.seq, replayed) == (39, 5)
    held = {
        key: (lease.mode, sorted(owner.name for owner, _ in lease.owners.values()))
        for key, lease in state.leases.items()
    }
    assert held == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): (LeaseMode.EXCLUSIVE, ["vm-a"]),
        (FILES_LOCKSPACE, lease_name_for_path("/vm/shared.img")): (LeaseMode.SHARED, ["vm-b"]),
    }
    assert all(
        owner.boot is None for lease in state.leases.values() for owner, _ in lease.owners.values()
    )  # it recorded no boot id: pid and start time decide alone


def test_lockd_events_and_journal_check_read_the_earlier_builds_journal(tmp_path: Path) -> None:
    journal = earlier_journal(tmp_path)
    check = lockd("journal-check", "--journal-dir", str(journal))
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines()[-1] == "journal ok"
    done = lockd("events", "--journal-dir", str(journal), "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, 40))
    kinds = [e["type"] for e in events]
    assert kinds.count("lease-acquired") == 15
    assert kinds.count("lease-released") == 13
    assert [e["reason"] for e in events if e["type"] == "daemon-stopped"] == [
        "re-exec (SIGUSR1)",
        "SIGTERM",
    ]
    assert kinds[-1] == "recovery-completed"
    assert events[-1]["held"] == 2
    assert events[-1]["fencing"] == []  # a field of later builds: none, as its absence says


def test_the_earlier_builds_handoff_is_read_as_it_wrote_it() -> None:
    """The memfd its SIGUSR1 handed on: its listeners, each VM's restricted connection
    (owners without a boot id) and the lease fds; the parts it did not hand (journal
    lock, pid file, counts, logging, socket files bound) are absent, not invented."""
    handoff = Handoff.from_bytes((EARLIER / "handoff.cbor").read_bytes())
    assert [(item.path.rsplit("/", 1)[-1], item.admin) for item in handoff.listeners] == [
        ("lockd.sock", False),
        ("lockd-admin.sock", True),
    ]
    assert sorted((c.owner.name if c.owner else "", c.restricted) for c in handoff.connections) == [
        ("vm-a", True),
        ("vm-b", True),
    ]
    assert all(c.owner is not None and c.owner.boot is None for c in handoff.connections)
    assert all((c.events_from, c.name) == (None, "") for c in handoff.connections)
    assert sorted(resource for _, resource, _ in handoff.leases) == sorted(
        [lease_name_for_path("/vm/a.img"), lease_name_for_path("/vm/shared.img")]
    )
    assert handoff.next_conn_id == 31
    assert handoff.own_fds() == []
    assert (handoff.started, handoff.metrics, handoff.logging, handoff.bound) == (None,) * 4


def earlier_connection_keys() -> set[str]:
    """The keys of each connection map the earlier build wrote: it builds HandedOver
    from such a map as it is, so these are all it takes."""
    raw = cbor2.loads((EARLIER / "handoff.cbor").read_bytes())
    (keys,) = {frozenset(conn) for conn in raw["connections"]}
    return set(keys)
