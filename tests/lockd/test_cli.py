"""The lockd command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from actors.events import DaemonStarted, JournalEntry, LeaseAcquired, LeaseReleased, ReleaseReason
from actors.model import LeaseMode, Owner
from lockd.journal_file import FileJournal
from protocol.names import lease_name_for_path


def _lockd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lockd", *args], capture_output=True, text=True, check=False
    )


def test_lease_name_prints_the_hash_and_normalised_path() -> None:
    """`lockd lease-name` shows which lease file protects a disk."""
    done = _lockd("lease-name", "/vm//a.img")
    assert done.returncode == 0
    assert done.stdout.split() == [lease_name_for_path("/vm/a.img"), "/vm/a.img"]


def test_lease_name_json() -> None:
    """--json prints one object per path, ready for jq."""
    done = _lockd("lease-name", "--json", "/a", "/b")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["path"] for r in rows] == ["/a", "/b"]
    assert rows[0]["lockspace"] == "org.libvirt.lockd.files"


def test_relative_path_is_a_usage_error() -> None:
    """A relative path is refused with exit code 2 and a message."""
    done = _lockd("lease-name", "rel/a.img")
    assert done.returncode == 2
    assert "relative" in done.stderr


def _journal_with_leases(directory: Path) -> None:
    owner = Owner(uuid=b"\x05" * 16, name="vm5", id=5, pid=505, start_time=50)
    journal = FileJournal(str(directory))
    journal.append(
        [
            JournalEntry(1, 1764000000.0, "hv1", DaemonStarted("0.1.0", 10)),
            JournalEntry(
                2,
                1764000001.0,
                "hv1",
                LeaseAcquired("ls", "r1", LeaseMode.EXCLUSIVE, owner, 3, True),
            ),
            JournalEntry(
                3,
                1764000002.0,
                "hv1",
                LeaseReleased("ls", "r1", LeaseMode.EXCLUSIVE, owner, 0, ReleaseReason.OWNER_EXIT),
            ),
        ]
    )
    journal.close()


def test_events_prints_one_line_per_event_with_owner_and_reason(tmp_path: Path) -> None:
    """An auditor sees who held which lease and why it ended."""
    _journal_with_leases(tmp_path)
    done = _lockd("events", "--journal-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("2 2025-11-24T16:00:01")
    assert "lease-acquired" in lines[1]
    assert "owner=vm5[pid=505]" in lines[1]
    assert "reason=owner-exit" in lines[2]


def test_events_json_since(tmp_path: Path) -> None:
    """--json --since prints objects from a seq on, ready for jq."""
    _journal_with_leases(tmp_path)
    done = _lockd("events", "--journal-dir", str(tmp_path), "--json", "--since", "2")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [2, 3]
    assert rows[0]["owner"]["uuid"] == "05050505-0505-0505-0505-050505050505"
    assert rows[1]["reason"] == "owner-exit"


def test_events_without_a_journal_is_an_error(tmp_path: Path) -> None:
    """A wrong directory is reported, not printed as an empty journal."""
    done = _lockd("events", "--journal-dir", str(tmp_path / "nope"))
    assert done.returncode == 1
    assert "no journal" in done.stderr


def test_a_daemon_message_names_the_lease_asked_for_not_one_it_prefixes() -> None:
    """``--lease ls/vm --lease ls/vm1``: a message about ls/vm1 is about that lease."""
    from lockd.commands import _label_of
    from protocol.client import RemoteError

    labels = {("ls", "vm"): "lease ls/vm", ("ls", "vm1"): "lease ls/vm1"}
    exc = RemoteError("not-held", "lease ls/vm1 is not held by pid-7", {})
    assert _label_of(exc, labels) == "lease ls/vm1"
