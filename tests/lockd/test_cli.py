"""The lockd command line, run as a user runs it."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from actors.events import DaemonStarted, JournalEntry, LeaseAcquired, LeaseReleased, ReleaseReason
from actors.model import LeaseMode, Owner
from lockd.commands import EXIT_NEEDS_OPERATOR, EXIT_USAGE, CommandError, parse_leases
from lockd.journal_file import FileJournal
from protocol.names import FILES_LOCKSPACE, lease_name_for_path


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


def test_a_fences_since_is_printed_as_a_time_like_the_events(tmp_path: Path) -> None:
    """``recovery-completed`` lists resumed fences with the time each began: the line
    format printed it as seconds since the epoch, beside the event's own ISO time."""
    from actors.events import Fence, RecoveryCompleted

    owner = Owner(uuid=b"\x05" * 16, name="vm5", id=5, pid=505, start_time=50)
    journal = FileJournal(str(tmp_path))
    fence = Fence(owner, "admin disconnect", 1764000000.5)
    journal.append(
        [JournalEntry(1, 1764000001.0, "hv1", RecoveryCompleted(1, 0, 0, 2.0, (fence,)))]
    )
    journal.close()
    (line,) = _lockd("events", "--journal-dir", str(tmp_path)).stdout.splitlines()
    assert "reason:admin disconnect,since:2025-11-24T16:00:00.500000Z]" in line


def test_events_json_since(tmp_path: Path) -> None:
    """--json --since prints objects from a seq on, ready for jq."""
    _journal_with_leases(tmp_path)
    done = _lockd("events", "--journal-dir", str(tmp_path), "--json", "--since", "2")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [2, 3]
    assert rows[0]["owner"]["uuid"] == "05050505-0505-0505-0505-050505050505"
    assert rows[1]["reason"] == "owner-exit"


def _segment_from(directory: Path, seq: int) -> None:
    """A segment starting at ``seq``, as retention leaves the oldest one kept."""
    apart = directory / f"apart-{seq}"
    journal = FileJournal(str(apart), first_seq=seq)
    journal.append([JournalEntry(seq, 1764000100.0 + seq, "hv1", DaemonStarted("0.1.0", 11))])
    journal.close()
    for segment in apart.iterdir():
        segment.rename(directory / segment.name)
    apart.rmdir()


def test_events_names_the_seqs_retention_deleted(tmp_path: Path) -> None:
    """Events asked for whose segments retention deleted are named on stderr, at the
    start and between segments: an auditor can tell a cut history from a whole one."""
    _segment_from(tmp_path, 5)
    _segment_from(tmp_path, 9)
    done = _lockd("events", "--journal-dir", str(tmp_path), "--json", "--since", "2")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["seq"] for line in done.stdout.splitlines()] == [5, 9]
    assert done.stderr.splitlines() == [
        f"lockd events: events {first}-{last} are no longer in the journal (deleted by "
        f"journal_retain_segments, or set aside by journal-check --repair); going on from "
        f"{last + 1}"
        for first, last in ((2, 4), (6, 8))
    ]
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    both = subprocess.run(
        [sys.executable, "-m", "lockd", "events", "--journal-dir", str(tmp_path), "--since", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, env=buffered,
    )  # fmt: skip
    # In one stream the note stands between the events around the gap.
    assert [line.split()[0] for line in both.stdout.splitlines()] == ["5", "lockd", "9"]
    whole = _lockd("events", "--journal-dir", str(tmp_path), "--since", "5")
    assert "2-4" not in whole.stderr
    later = _lockd("events", "--journal-dir", str(tmp_path), "--since", "2025-11-24T16:01:47Z")
    assert [line.split()[0] for line in later.stdout.splitlines()] == ["9"]
    assert "events 6-8 " in later.stderr  # they may fall after the time asked for
    assert "1-4" not in later.stderr  # written before seq 5, before the time asked for


def test_events_prints_as_it_reads_not_the_whole_journal_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full journal (128 MiB by default) was read whole before its first line was
    printed: about 10 s, and 500 MB for its entries. No read takes it all now."""
    from lockd import cli
    from lockd.journal_file import JournalFollower

    owner = Owner(uuid=b"\x05" * 16, name="vm5", id=5, pid=505, start_time=50)
    journal = FileJournal(str(tmp_path))
    count = 8000  # about 2 MiB
    journal.append(
        [JournalEntry(seq, 1764000000.0 + seq, "hv1",
                      LeaseAcquired("ls", f"r{seq}", LeaseMode.EXCLUSIVE, owner, 3, True))
         for seq in range(1, count + 1)]
    )  # fmt: skip
    journal.close()
    batches: list[int] = []
    poll = JournalFollower.poll

    def counted(self: JournalFollower, max_bytes: int = -1) -> list[JournalEntry]:
        entries = poll(self, max_bytes)
        batches.append(len(entries))
        return entries

    monkeypatch.setattr(JournalFollower, "poll", counted)
    monkeypatch.setattr(cli, "READ_BYTES", 1 << 16, raising=False)  # its 1 MiB, scaled down
    assert cli.main(["events", "--journal-dir", str(tmp_path), "--json"]) == 0
    seqs = [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
    assert seqs == list(range(1, count + 1))
    assert max(batches) < count // 4


def test_events_since_a_time_leaves_out_nothing_after_it(tmp_path: Path) -> None:
    """``--since TIME`` starts at the first event of that time: one after it stamped
    earlier (the clock stepped back) was left out, by a follower for as long as the
    step lasted."""
    journal = FileJournal(str(tmp_path))
    stamps = [1764000000.0, 1764000200.0, 1764000100.0, 1764000300.0]  # seq 3: stepped back
    journal.append(
        [JournalEntry(seq, stamp, "hv1", DaemonStarted("0.1.0", seq))
         for seq, stamp in enumerate(stamps, start=1)]
    )  # fmt: skip
    journal.close()
    since = "2025-11-24T16:02:30Z"  # 1764000150: after seq 1, before seq 2
    done = _lockd("events", "--journal-dir", str(tmp_path), "--json", "--since", since)
    assert [json.loads(line)["seq"] for line in done.stdout.splitlines()] == [2, 3, 4]


def test_events_since_the_time_an_event_is_printed_with_starts_at_that_event(
    tmp_path: Path,
) -> None:
    """A line's time, given back to ``--since``, starts at that line's event: the line
    prints the time to the microsecond, rounded, and a stamp rounded up (``.5190055``
    printed ``.519006``) fell before it, so the event was left out."""
    journal = FileJournal(str(tmp_path))
    stamps = [1764000000.1234567, 1764000000.2345678, 1764000000.3456789]  # each rounds up
    journal.append(
        [JournalEntry(seq, stamp, "hv1", DaemonStarted("0.1.0", seq))
         for seq, stamp in enumerate(stamps, start=1)]
    )  # fmt: skip
    journal.close()
    lines = _lockd("events", "--journal-dir", str(tmp_path)).stdout.splitlines()
    for seq, line in enumerate(lines, start=1):
        printed_time = line.split()[1]
        done = _lockd("events", "--journal-dir", str(tmp_path), "--since", printed_time)
        assert [int(row.split()[0]) for row in done.stdout.splitlines()] == list(
            range(seq, len(stamps) + 1)
        ), printed_time


@pytest.mark.parametrize(("asked", "printed"), [(-60.0, [2, 3]), (3600.0, [])])
def test_events_follow_since_a_time_goes_on_through_a_clock_stepped_back(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    asked: float,
    printed: list[int],
) -> None:
    """``events --follow --since TIME`` with no event of TIME or later yet: a clock
    stepped back (NTP) stamps the next events earlier than TIME, and the follower left
    them out for as long as the step, though each came after it began following. A
    TIME still to come (by the clock) waits for events stamped that late, as before."""
    import datetime
    import time

    from lockd import cli
    from lockd.dirwatch import DirWatch

    now = time.time()
    journal = FileJournal(str(tmp_path))
    journal.append([JournalEntry(1, now - 600.0, "hv1", DaemonStarted("0.1.0", 1))])
    journal.close()
    waits: list[float] = []

    def wait(self: DirWatch, timeout: float) -> bool:
        """The follower is at the journal's end: the daemon, its clock stepped back an
        hour, writes two events; the next wait is the operator's Ctrl-C."""
        waits.append(timeout)
        if len(waits) > 1:
            raise KeyboardInterrupt
        later = FileJournal(str(tmp_path))
        later.append(
            [JournalEntry(seq, now - 3600.0 + seq, "hv1", DaemonStarted("0.1.0", seq))
             for seq in (2, 3)]
        )  # fmt: skip
        later.close()
        return True

    monkeypatch.setattr(DirWatch, "wait", wait)
    since = datetime.datetime.fromtimestamp(now + asked, datetime.UTC).isoformat()
    args = ["events", "--journal-dir", str(tmp_path), "--follow", "--json", "--since", since]
    assert cli.main(args) == 130
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == printed


def test_events_prints_what_comes_before_damage_then_names_it(tmp_path: Path) -> None:
    """An auditor reading a damaged journal gets every event before the damage, and
    the file and byte of it, with exit code 1."""
    _journal_with_leases(tmp_path)
    (segment,) = tmp_path.iterdir()
    data = bytearray(segment.read_bytes())
    data[data.index(b"vm5")] ^= 0x20  # the owner's name in seq 2: its CRC fails
    segment.write_bytes(bytes(data))
    done = _lockd("events", "--journal-dir", str(tmp_path), "--json")
    assert [json.loads(line)["seq"] for line in done.stdout.splitlines()] == [1]
    assert done.returncode == 1
    assert f"{segment.name}: CRC mismatch" in done.stderr


def test_events_follow_ends_on_ctrl_c_with_130(tmp_path: Path) -> None:
    """As every command interrupted: a script running it sees it did not end by itself."""
    import signal
    import time

    _journal_with_leases(tmp_path)
    follow = subprocess.Popen(
        [sys.executable, "-m", "lockd", "events", "--journal-dir", str(tmp_path), "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        for _ in range(3):
            follow.stdout.readline()  # the three events: it is following now
        time.sleep(0.2)
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 130
        assert "Traceback" not in (follow.stderr.read() if follow.stderr else "")
    finally:
        follow.kill()
        follow.wait()


def test_events_follow_goes_on_at_a_cut_of_the_journal_and_says_so(tmp_path: Path) -> None:
    """A follower placed past a ``journal-check --repair`` cut prints the new events from
    the cut on, naming the cut; it waited for bytes past its old place, printing nothing."""
    import select

    _journal_with_leases(tmp_path)
    follow = subprocess.Popen(
        [sys.executable, "-m", "lockd", "events", "--journal-dir", str(tmp_path), "--follow",
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        assert follow.stderr is not None
        assert [json.loads(follow.stdout.readline())["seq"] for _ in range(3)] == [1, 2, 3]
        (segment,) = tmp_path.glob("journal-*.cbor")
        data = bytearray(segment.read_bytes())
        data[data.index(b"vm5")] ^= 0x20  # seq 2's CRC fails: the repair cuts it and seq 3
        segment.write_bytes(bytes(data))
        assert _lockd("journal-check", "--journal-dir", str(tmp_path), "--repair").returncode == 0
        journal = FileJournal(str(tmp_path))
        journal.append([JournalEntry(2, 1764000009.0, "hv1", DaemonStarted("0.1.0", 12))])
        journal.close()
        ready, _, _ = select.select([follow.stdout], [], [], 10)
        assert ready, "the follower printed nothing after the cut"
        row = json.loads(follow.stdout.readline())
        assert (row["seq"], row["type"], row["pid"]) == (2, "daemon-started", 12)
        follow.terminate()
        assert follow.stderr.read().count("the journal was cut after seq 1 ") == 1
    finally:
        follow.kill()
        follow.wait()


def test_events_names_the_journals_cut_where_its_history_passes_it(tmp_path: Path) -> None:
    """After ``journal-check --repair`` the seqs from the cut on name new events: an
    auditor reading the history later was not told where it breaks."""
    from lockd.journal_file import new_epoch

    _journal_with_leases(tmp_path)
    new_epoch(str(tmp_path), 3)  # as the repair of damage in seq 3 records it
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "events", "--journal-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, env=buffered,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "lockd", "3"]
    assert "the journal was cut after seq 2 " in lines[2]
    assert (
        "cut after" not in _lockd("events", "--journal-dir", str(tmp_path), "--since", "4").stderr
    )
    new_epoch(str(tmp_path), 1)  # what a daemon records on a journal of an older lockd
    assert "cut after" not in _lockd("events", "--journal-dir", str(tmp_path)).stderr


def test_events_follow_ends_when_its_reader_left_though_nothing_new_comes(
    tmp_path: Path,
) -> None:
    """``lockd events --follow | head -3``: head had its lines and left, and the
    follower, with nothing more to write to learn it from, ran on for ever. It looks
    at each wake (about once a second), as ``tail -f`` does, and ends with 141."""
    _journal_with_leases(tmp_path)
    follow = subprocess.Popen(
        [sys.executable, "-m", "lockd", "events", "--journal-dir", str(tmp_path), "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        for _ in range(3):
            follow.stdout.readline()
        follow.stdout.close()  # as head does
        assert follow.wait(10) == 141
        assert follow.stderr is not None
        assert follow.stderr.read() == b""
    finally:
        follow.kill()
        follow.wait()


def test_events_of_a_type_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    """``--type lease-aquired`` would match nothing, with --follow for ever: the typo is
    named, with the types there are. A real type still filters."""
    _journal_with_leases(tmp_path)
    done = _lockd("events", "--journal-dir", str(tmp_path), "--type", "lease-aquired")
    assert done.returncode == 2
    assert "unknown event type 'lease-aquired'" in done.stderr
    assert "lease-acquired" in done.stderr
    good = _lockd("events", "--journal-dir", str(tmp_path), "--type", "lease-acquired")
    assert len(good.stdout.splitlines()) == 1


def test_events_filters_that_no_event_can_match_are_usage_errors(tmp_path: Path) -> None:
    """``--resource /vm/a.img`` (a disk's path, not its lease name) and a lockspace name
    that no lockspace can have matched nothing, in silence: refused, the disk with
    the command that names its lease. Lease names still filter."""
    _journal_with_leases(tmp_path)
    disk = _lockd("events", "--journal-dir", str(tmp_path), "--resource", "/vm/a.img")
    assert disk.returncode == 2
    assert "`lockd lease-name /vm/a.img`" in disk.stderr
    space = _lockd("events", "--journal-dir", str(tmp_path), "--lockspace", "a/b")
    assert space.returncode == 2
    assert "invalid lockspace name 'a/b'" in space.stderr
    good = _lockd("events", "--journal-dir", str(tmp_path), "--lockspace", "ls", "--resource", "r1")
    assert len(good.stdout.splitlines()) == 2


@pytest.mark.parametrize(
    "spelling", ["vm5", "505", "05050505-0505-0505-0505-050505050505",
                 "05050505050505050505050505050505", "{05050505-0505-0505-0505-050505050505}"],
)  # fmt: skip
def test_events_owner_takes_a_uuid_as_any_tool_spells_it(tmp_path: Path, spelling: str) -> None:
    """``--owner`` matches an owner's name, pid or uuid, the uuid also without hyphens,
    in braces or in capitals (it matched only the form events print)."""
    _journal_with_leases(tmp_path)
    done = _lockd("events", "--journal-dir", str(tmp_path), "--owner", spelling)
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["2", "3"]


def test_events_owner_matches_the_owners_recovery_goes_on_fencing(tmp_path: Path) -> None:
    """``--owner`` finds the ``recovery-completed`` that resumed an owner's fence (its
    owners are in its ``fencing`` list): an auditor asking why lockd killed vm5 was shown
    nothing of it, and a record of another owner's fence is still left out."""
    from actors.events import Fence, RecoveryCompleted

    vm5 = Owner(uuid=b"\x05" * 16, name="vm5", id=5, pid=505, start_time=50)
    vm6 = Owner(uuid=b"\x06" * 16, name="vm6", id=6, pid=606, start_time=60)
    journal = FileJournal(str(tmp_path))
    journal.append(
        [
            JournalEntry(
                1, 1764000001.0, "hv1", RecoveryCompleted(1, 0, 0, 2.0, (Fence(vm5, "x"),))
            ),
            JournalEntry(
                2, 1764000002.0, "hv1", RecoveryCompleted(1, 0, 0, 2.0, (Fence(vm6, "y"),))
            ),
        ]
    )
    journal.close()
    for spelling in ("vm5", "505", "05050505-0505-0505-0505-050505050505"):
        done = _lockd("events", "--journal-dir", str(tmp_path), "--owner", spelling)
        assert [line.split()[0] for line in done.stdout.splitlines()] == ["1"], spelling


def test_events_conn_prints_one_connection_s_records(tmp_path: Path) -> None:
    """``--conn`` prints a connection's ``connection-opened`` (its repeats too) and the
    changes journaled with its id, and nothing of another connection; 0 is lockd's own
    doing. With ``--type`` both must match; an id that is no number is a usage error."""
    from actors.events import ConnectionOpened

    vm = Owner(uuid=b"\x05" * 16, name="vm5", id=5, pid=505, start_time=50)
    lease = ("ls", "r1", LeaseMode.EXCLUSIVE, vm)
    events = [
        DaemonStarted("0.1.0", 10),
        ConnectionOpened(1, 505, 107, 107, False, 1764000000.5),
        LeaseAcquired(*lease, conn=1, autocreate=True),
        ConnectionOpened(2, 4242, 0, 0, False, 1764000003.5),
        LeaseReleased(*lease, conn=2, reason=ReleaseReason.CLIENT),
        LeaseReleased(*lease, conn=0, reason=ReleaseReason.OWNER_EXIT),
        ConnectionOpened(1, 505, 107, 107, False, 1764000000.5, repeat=True),
    ]
    journal = FileJournal(str(tmp_path))
    journal.append([JournalEntry(seq, 1764000000.0 + seq, "hv1", event)
                    for seq, event in enumerate(events, 1)])  # fmt: skip
    journal.close()

    def seqs(*args: str) -> list[int]:
        done = _lockd("events", "--journal-dir", str(tmp_path), *args)
        assert done.returncode == 0, done.stderr
        return [int(line.split()[0]) for line in done.stdout.splitlines()]

    assert seqs("--conn", "1") == [2, 3, 7]
    assert seqs("--conn", "2") == [4, 5]
    assert seqs("--conn", "0") == [6]
    assert seqs("--conn", "1", "--type", "lease-acquired") == [3]
    assert seqs("--conn", "3") == []
    done = _lockd("events", "--journal-dir", str(tmp_path), "--conn", "1", "--json")
    assert [json.loads(line).get("repeat") for line in done.stdout.splitlines()] == [
        None, None, True
    ]  # fmt: skip
    wrong = _lockd("events", "--journal-dir", str(tmp_path), "--conn", "vm5")
    assert wrong.returncode == EXIT_USAGE
    assert "'vm5' is not a connection id" in wrong.stderr


def test_events_without_a_journal_is_an_error(tmp_path: Path) -> None:
    """A wrong directory is reported, not printed as an empty journal."""
    done = _lockd("events", "--journal-dir", str(tmp_path / "nope"))
    assert done.returncode == 1
    assert "no journal" in done.stderr


def test_a_journal_that_cannot_be_read_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """An auditor who may not read root's journal (0700) got a PermissionError traceback
    from ``lockd events`` and ``lockd journal-check``. Here the segment cannot be read by
    root either: it is a directory."""
    (tmp_path / "journal-00000000000000000001.cbor").mkdir()
    for command in ("events", "journal-check"):
        done = _lockd(command, "--journal-dir", str(tmp_path))
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith(
            f"lockd {command}: cannot read the journal at {tmp_path}: "
            f"{tmp_path / 'journal-00000000000000000001.cbor'}: Is a directory"
        ), done.stderr


def test_a_daemon_message_names_the_lease_asked_for_not_one_it_prefixes() -> None:
    """``--lease ls/vm --lease ls/vm1``: a message about ls/vm1 is about that lease."""
    from lockd.commands import _label_of
    from protocol.client import RemoteError

    labels = {("ls", "vm"): "lease ls/vm", ("ls", "vm1"): "lease ls/vm1"}
    exc = RemoteError("not-held", "lease ls/vm1 is not held by pid-7", {})
    assert _label_of(exc, labels) == "lease ls/vm1"


# -- --disk and --lease modes -----------------------------------------------------------------
def _parsed(disks: list[str], leases: list[str] = []) -> list[tuple[dict[str, Any], str]]:  # noqa: B006
    return parse_leases(argparse.Namespace(disk=disks, lease=leases))


def _usage_error(disks: list[str], leases: list[str] = []) -> str:  # noqa: B006
    with pytest.raises(CommandError) as caught:
        _parsed(disks, leases)
    assert caught.value.code == EXIT_USAGE
    return str(caught.value)


@pytest.mark.parametrize(
    ("suffix", "shared"),
    [("", False), (":exclusive", False), (":shared", True), (":shareable", True)],
)
def test_disk_modes_of_lockd_and_libvirt_lease_the_disk_itself(suffix: str, shared: bool) -> None:
    """``:shareable`` (libvirt's word, as lockd-lock-driver takes it) is ``:shared``, never a
    path ``/vm/base.img:shareable`` that would leave base.img unprotected."""
    lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/base.img")}
    assert _parsed([f"/vm/base.img{suffix}"]) == [
        ({**lease, "shared": shared}, "disk /vm/base.img")
    ]


@pytest.mark.parametrize("suffix", [":bogus", ":Shared", ":EXCLUSIVE", ":read-only", ":"])
def test_a_word_after_the_last_colon_that_is_no_mode_is_a_usage_error(suffix: str) -> None:
    """Refused with the modes named and the way to give a path that does end in it."""
    message = _usage_error([f"/vm/base.img{suffix}"])
    assert "the modes are :exclusive, :shared, :shareable" in message
    assert f"'/vm/base.img{suffix}:exclusive'" in message


def test_a_readonly_disk_is_refused_by_the_cli_as_it_gets_no_lease() -> None:
    """lockd-lock-driver (as libvirt) takes no lease for a read-only disk: lockd run, whose
    only job is to lease, refuses the word rather than run with the disk left out."""
    message = _usage_error(["/vm/a.img", "/vm/cd.iso:readonly"])
    assert "read-only disk gets no lease" in message
    assert ":shared" in message
    assert "'/vm/cd.iso:readonly:exclusive'" in message


@pytest.mark.parametrize(
    ("spec", "path", "shared"),
    [
        ("/data/vm:1/disk.img", "/data/vm:1/disk.img", False),
        ("/x/a:1.img", "/x/a:1.img", False),
        ("/x/disk:2", "/x/disk:2", False),
        ("/vm/a:bogus:exclusive", "/vm/a:bogus", False),
        ("/vm/a:shared:exclusive", "/vm/a:shared", False),
        ("/vm/a:readonly:shared", "/vm/a:readonly", True),
    ],
)
def test_any_other_colon_is_part_of_the_path(spec: str, path: str, shared: bool) -> None:
    """Only a mode word after the last colon is a mode; an explicit mode frees the rest."""
    ((lease, label),) = _parsed([spec])
    assert (lease["resource"], lease["shared"], label) == (
        lease_name_for_path(path), shared, f"disk {path}"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "resource", "shared"),
    [
        ("site/vm1", "vm1", False),
        ("site/vm1:exclusive", "vm1", False),
        ("site/vm1:shared", "vm1", True),
        ("site/vm1:1", "vm1:1", False),
        ("site/vm1:a:shared", "vm1:a", True),
        ("a:b/vm1", "vm1", False),
    ],
)
def test_lease_modes(spec: str, resource: str, shared: bool) -> None:
    """--lease takes :exclusive or :shared after the last colon; other colons are the name's."""
    ((lease, _),) = _parsed([], [spec])
    assert (lease["resource"], lease["shared"]) == (resource, shared)


@pytest.mark.parametrize("suffix", [":bogus", ":Shared", ":shareable", ":readonly"])
def test_a_lease_word_that_is_no_lease_mode_is_a_usage_error(suffix: str) -> None:
    """A lease has no disk words: ``site/vm1:shareable`` is refused, not a lease of that name."""
    message = _usage_error([], [f"site/vm1{suffix}"])
    assert "the modes are :exclusive, :shared;" in message
    assert f"'site/vm1{suffix}:exclusive'" in message


@pytest.mark.parametrize("command", ["run", "acquire", "release"])
def test_an_unknown_mode_is_refused_before_any_daemon_is_asked(
    command: str, tmp_path: Path
) -> None:
    """Exit 2 naming the modes, whether or not a daemon runs (none is started either)."""
    env = {**os.environ, "LOCKD_SOCKET": str(tmp_path / "none.sock"), "LOCKD_AUTOSPAWN": "0"}
    who = ["--name", "vm1"] if command == "run" else ["--owner-pid", str(os.getpid())]
    done = subprocess.run(
        [sys.executable, "-m", "lockd", command, *who, "--disk", "/vm/base.img:bogus",
         *(["--", "true"] if command == "run" else [])],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "':bogus' is not a mode" in done.stderr
    assert "'/vm/base.img:bogus:exclusive'" in done.stderr


def test_no_daemon_with_autospawn_off_says_why_none_was_started(tmp_path: Path) -> None:
    """``LOCKD_AUTOSPAWN=0`` and nothing listening: the message says a daemon was not
    started on purpose, besides where none answered."""
    env = {**os.environ, "LOCKD_SOCKET": str(tmp_path / "none.sock"), "LOCKD_AUTOSPAWN": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "run", "--name", "vm1", "--disk", "/vm/a.img", "--",
         "true"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 69
    assert str(tmp_path / "none.sock") in done.stderr
    assert "LOCKD_AUTOSPAWN=0 keeps one from being started" in done.stderr


def test_a_second_daemon_on_a_served_socket_says_so_without_errno_noise(
    tmp_path: Path,
) -> None:
    """`lockd serve` where another daemon serves: one plain line, no ``[Errno 98]``; and
    refused before it makes or writes a journal (a new --journal-dir was left behind,
    with a daemon-started record of a daemon that never served)."""
    sock = tmp_path / "lockd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(sock))
        listener.listen()
        done = subprocess.run(
            [sys.executable, "-m", "lockd", "serve", "--socket", str(sock),
             "--lock-dir", str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "j")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        listener.close()
    assert done.returncode != 0
    assert f"lockd serve: another daemon is serving {sock}" in done.stderr
    assert "Errno" not in done.stderr
    assert not (tmp_path / "j").exists()
    assert not (tmp_path / "locks").exists()


@pytest.mark.parametrize("key", ["lock_dir", "journal_dir"])
def test_a_directory_setting_that_is_a_file_is_named(tmp_path: Path, key: str) -> None:
    """It said "lockd serve: File exists (PATH)", for either setting alike."""
    paths = {"lock_dir": tmp_path / "locks", "journal_dir": tmp_path / "journal"}
    paths[key].write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "serve", "--socket", str(tmp_path / "lockd.sock"),
         "--lock-dir", str(paths["lock_dir"]), "--journal-dir", str(paths["journal_dir"])],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_NEEDS_OPERATOR  # a restart would meet the same file
    assert done.stderr == (
        f"lockd serve: {key} {paths[key]}: it, or a directory on the way to it, is not a "
        "directory\n"
    )


def test_a_pid_file_that_is_a_directory_is_named_not_the_socket_in_it(tmp_path: Path) -> None:
    """``pid_file = "/run/lockd"`` (the directory, not a file in it) stopped the start
    with "socket /run/lockd/lockd.sock: Is a directory (/run/lockd)": the wrong setting."""
    run = tmp_path / "run"
    run.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "serve", "--socket", str(run / "lockd.sock"),
         "--lock-dir", str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "j"),
         "--pid-file", str(run)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_NEEDS_OPERATOR
    assert done.stderr == f"lockd serve: pid_file {run}: Is a directory\n"


@pytest.mark.parametrize("name", ["", "vm\n1", "x" * 256, "é" * 128])
@pytest.mark.parametrize("command", ["run", "acquire", "release"])
def test_a_bad_owner_name_is_a_usage_error_naming_the_flag(name: str, command: str) -> None:
    """``--name "a<newline>b"`` was refused by the daemon as "hello: client must be ..."
    (a name the user never gave), and ``--name ""`` ran as pid-PID without a word."""
    who = ["--owner-pid", str(os.getpid())] if command != "run" else []
    end = ["--", "true"] if command == "run" else []
    env = {**os.environ, "LOCKD_SOCKET": "/nonexistent/lockd.sock", "LOCKD_AUTOSPAWN": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "lockd", command, *who, "--name", name, "--disk", "/vm/a.img",
         *end],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert f"--name must be 1-255 bytes of UTF-8 without control characters, not {name!r}" in (
        done.stderr
    )


def test_an_owner_name_that_is_not_utf8_is_a_usage_error_not_a_traceback() -> None:
    """A name in another locale's encoding reaches Python as lone surrogates; counting its
    UTF-8 bytes raised UnicodeEncodeError."""
    env = {**os.environ, "LOCKD_SOCKET": "/nonexistent/lockd.sock", "LOCKD_AUTOSPAWN": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "run", "--name", b"vm\xff", "--disk", "/vm/a.img",
         "--", "true"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "Traceback" not in done.stderr
    assert "--name must be 1-255 bytes of UTF-8 without control characters" in done.stderr


def test_a_daemon_a_test_starts_reads_no_host_configuration() -> None:
    """``lockd serve`` without ``--config`` in a test reads the harness's empty file, not
    the host's ``/etc/lockd/lockd.toml``: on a host with lockd installed, its pid file and
    lockspace directories reached the tests' daemons."""
    from lockd.config import default_paths

    done = _lockd("serve", "--check-config")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    used = first.removeprefix("# configuration ok (").removesuffix(")")
    assert first == f"# configuration ok ({used})"
    assert used != default_paths()["config"]
    assert Path(used).read_text() == ""


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_serve_refuses_a_timeout_that_is_no_finite_number(value: str) -> None:
    """``lockd serve --timeout nan`` started a daemon that never timed out; a usage error."""
    done = _lockd("serve", "--timeout", value, "--check-config")
    assert done.returncode == EXIT_USAGE
    assert "timeout must be a finite number >= 0" in done.stderr


@pytest.mark.parametrize("command", ["acquire", "run"])
@pytest.mark.parametrize("wait", ["nan", "inf", "-1", "3601", "soon"])
def test_a_wait_out_of_range_is_a_usage_error_before_any_daemon_is_asked(
    tmp_path: Path, command: str, wait: str
) -> None:
    """``--wait nan`` or ``inf`` ended in a traceback (the socket's timeout); any wait the
    daemon would refuse is a usage error, found before a daemon is looked for (none runs
    here: that was exit 69)."""
    sock = tmp_path / "lockd.sock"
    who = ["--owner-pid", str(os.getpid())] if command == "acquire" else ["--name", "vm"]
    tail = ["--", "true"] if command == "run" else []
    done = subprocess.run(
        [sys.executable, "-m", "lockd", command, "--socket", str(sock), *who,
         "--disk", "/vm/a.img", "--wait", wait, *tail],
        capture_output=True, text=True, check=False,
        env={**os.environ, "LOCKD_AUTOSPAWN": "0"},
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert f"argument --wait: takes seconds from 0 to 3600, not '{wait}'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["events"], ["events", "--follow"], ["journal-check"],
                                     ["journal-check", "--repair"]])  # fmt: skip
def test_a_directory_no_lockd_wrote_a_journal_in_is_no_journal(
    tmp_path: Path, command: list[str]
) -> None:
    """``--journal-dir`` naming the journal's parent (or any other directory): ``events``
    printed nothing and exited 0 (``--follow`` waited for ever), ``journal-check`` said
    "journal ok", and ``--repair`` left a lock file there. Now an error, and nothing is
    written in that directory."""
    _journal_with_leases(tmp_path / "journal")
    done = subprocess.run(
        [sys.executable, "-m", "lockd", *command, "--journal-dir", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"no journal at {tmp_path}: no lockd has written one there" in done.stderr
    assert "journal ok" not in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal"]
    assert _lockd(*command[:1], "--journal-dir", str(tmp_path / "journal")).returncode == 0


@pytest.mark.parametrize("command", [["events"], ["journal-check"]])
def test_without_journal_dir_the_configurations_journal_is_read(
    tmp_path: Path, command: list[str]
) -> None:
    """An operator whose lockd.toml moves ``journal_dir`` runs ``lockd events`` or
    ``lockd journal-check`` with no ``--journal-dir``: they read the built-in default
    instead, the journal of no daemon (or of an older one left there), while ``lockd
    serve`` reads the file. Now they take the journal_dir ``lockd serve`` would."""
    journal = tmp_path / "journal"
    _journal_with_leases(journal)
    config = tmp_path / "lockd.toml"
    config.write_text(f'journal_dir = "{journal}"\n')
    env = {**os.environ, "LOCKD_CONFIG": str(config)}
    done = subprocess.run(
        [sys.executable, "-m", "lockd", *command],
        capture_output=True, text=True, check=False, timeout=30, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    if command == ["events"]:
        assert [line.split()[0] for line in done.stdout.splitlines()] == ["1", "2", "3"]
    else:
        assert "seq 1..3" in done.stdout


def test_a_configuration_that_cannot_be_read_names_itself_and_the_flag(tmp_path: Path) -> None:
    """With no ``--journal-dir``, a broken configuration file is named, with the way
    round it, instead of a silent fall back to another journal."""
    config = tmp_path / "lockd.toml"
    config.write_text('journl_dir = "/x"\n')
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "events", "--json"],
        capture_output=True, text=True, check=False, timeout=30,
        env={**os.environ, "LOCKD_CONFIG": str(config)},
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE
    assert f"{config}:1: unknown key 'journl_dir'" in done.stderr
    assert "--journal-dir" in done.stderr
    assert json.loads(done.stdout)["error"]["exit"] == EXIT_USAGE


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ops", "0"], "argument --ops: takes a number >= 1, not '0'"),
        (["--ops", "-3"], "argument --ops: takes a number >= 1, not '-3'"),
        (["--tp-ops", "0"], "argument --tp-ops: takes a number >= 1, not '0'"),
        (["--warmup", "-1"], "argument --warmup: takes a number >= 0, not '-1'"),
        (["--owners", "0"], "argument --owners: takes a number >= 1, not '0'"),
        (["--ops", "many"], "argument --ops: takes a whole number, not 'many'"),
        (["--concurrency", "0"], "--concurrency takes connection counts >= 1"),
        (["--concurrency", "1,-1"], "--concurrency takes connection counts >= 1"),
        (["--concurrency", "x"], "--concurrency takes connection counts >= 1"),
    ],
)
def test_bench_counts_out_of_range_are_usage_errors(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    """``lockd bench --ops 0`` and ``--concurrency 0`` ended in tracebacks, ``--concurrency
    -1`` waited for ever, ``--owners 0`` measured nothing: each is a usage error, found
    before any daemon is asked (none runs at this socket: that was exit 69)."""
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "bench", "--socket", str(tmp_path / "none.sock"),
         "--scenarios", "sequential,concurrent,many-owners", *flags],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("command", "exit_code", "message"),
    [
        (["--", "no-such-command-h49"], 127, "cannot run no-such-command-h49: no such command"),
        (["--", "/etc/passwd"], 126, "cannot run /etc/passwd: not executable"),
        ([], 2, "give the command to run after --"),
    ],
)
def test_run_json_prints_a_command_it_cannot_run_as_json(
    tmp_path: Path, command: list[str], exit_code: int, message: str
) -> None:
    """``lockd run --json`` with no such command (127), one not executable (126) or none
    (2) printed its error on stderr only: stdout, which README says has the failure as
    JSON, was empty. No daemon is asked (none runs at this socket)."""
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "run", "--json", "--socket", str(tmp_path / "none.sock"),
         "--name", "vm", "--disk", "/vm/a.img", *command],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == exit_code
    assert json.loads(done.stdout) == {
        "error": {"code": None, "message": message, "exit": exit_code}
    }
    assert done.stderr == f"lockd run: {message}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["acquire", "--owner-pid", "1", "--disk", "/vm/a.img", "--wait", "5000"],
         "argument --wait: takes seconds from 0 to 3600, not '5000'"),
        (["acquire", "--owner-pid", "abc", "--disk", "/vm/a.img"],
         "argument --owner-pid: invalid int value: 'abc'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)  # fmt: skip
def test_a_usage_error_under_json_is_printed_as_json(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    """README: with --json a failure is also printed as JSON on stdout. A usage error
    argparse finds printed nothing there: ``--wait 5000``, which the daemon refused as
    invalid-argument in JSON, is found before asking it."""
    done = subprocess.run(
        [sys.executable, "-m", "lockd", *argv, "--json", "--socket", str(tmp_path / "x.sock")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE
    assert json.loads(done.stdout) == {"error": {"code": None, "message": message, "exit": 2}}
    assert f"error: {message}" in done.stderr


def test_check_config_warns_of_a_log_filter_for_no_module(tmp_path: Path) -> None:
    """A filter for a module lockd lacks (a typo) is warned of at start; ``--check-config``,
    the way to check a file before a start, passed it in silence."""
    config = tmp_path / "lockd.toml"
    config.write_text('log_filters = "debug:actors.owner 3:lockd.server"\n')
    done = _lockd("serve", "--config", str(config), "--check-config")
    assert done.returncode == 0
    assert done.stderr == (
        "lockd serve: warning: log_filters: lockd has no module 'actors.owner', so its filter "
        "logs nothing (a typo? see docs/configuration.md)\n"
    )


def test_serve_help_says_where_the_configuration_comes_from() -> None:
    """``lockd serve --help`` said only "TOML configuration file": not that LOCKD_CONFIG
    sets it, nor which file is read without it, nor what the signals do."""
    done = _lockd("serve", "--help")
    text = " ".join(done.stdout.split())
    assert "env LOCKD_CONFIG" in text
    assert "/etc/lockd/lockd.toml for root" in text
    assert "SIGHUP re-reads the configuration" in text
    assert "(default 0: never)" in text


@pytest.mark.parametrize(
    ("argv", "message", "status"),
    [
        (["lease-name", "vm/a.img"], "disk path 'vm/a.img' is relative; give an absolute path", 2),
        (["events", "--type", "lease-aquired"], "unknown event type 'lease-aquired'", 2),
        (["events", "--journal-dir", "/nonexistent/journal"], "no journal at /nonexistent", 1),
    ],
)
def test_local_commands_print_a_failure_as_json_under_json(
    tmp_path: Path, argv: list[str], message: str, status: int
) -> None:
    """README: with --json a failure is also printed as JSON on stdout. ``lease-name`` and
    ``events`` printed theirs on stderr only; without --json stdout stays empty."""
    _journal_with_leases(tmp_path)
    extra = ["--journal-dir", str(tmp_path)] if "--type" in argv else []
    for json_flag in (["--json"], []):
        done = subprocess.run(
            [sys.executable, "-m", "lockd", *argv, *extra, *json_flag],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == status
        assert f"lockd {argv[0]}: {message}" in done.stderr
        if json_flag:
            error = json.loads(done.stdout)["error"]
            assert error["code"] is None
            assert error["message"].startswith(message)
            assert error["exit"] == status
        else:
            assert done.stdout == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--disk", "/vm/a.img", "--all"], "give --disk/--lease or --all, not both"),
        ([], "name --disk/--lease to release, or --all"),
    ],
)
def test_release_says_what_is_wrong_with_what_it_was_given(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    """``lockd release --disk D --all`` was told to "name --disk/--lease to release, or
    --all", which it had done: both were given. A usage error, before any daemon is asked."""
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "release", "--socket", str(tmp_path / "none.sock"),
         "--owner-pid", str(os.getpid()), *flags],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE
    assert done.stderr == f"lockd release: {message}\n"


def test_check_config_prints_toml_for_any_path_a_file_can_hold(tmp_path: Path) -> None:
    """``--check-config`` prints TOML that, pasted into a file, is that configuration:
    a path with a character beyond U+FFFF (an emoji) was printed as JSON's surrogate pair
    ``"\\ud83d\\ude00"``, and one with DEL raw, neither of which TOML reads."""
    import tomllib

    written = str(tmp_path / r"locks \U0001F600 \u00e9\u007f\t\"q\\")  # TOML's escapes
    lock_dir = str(tmp_path / 'locks \U0001f600 \u00e9\x7f\t"q\\')
    config = tmp_path / "lockd.toml"
    config.write_text(f'lock_dir = "{written}"\n[lockspaces]\n"san" = "{written}/san"\n')
    done = _lockd("serve", "--config", str(config), "--check-config")
    assert done.returncode == 0, done.stderr
    printed = tomllib.loads(done.stdout)
    assert printed["lock_dir"] == lock_dir
    assert printed["lockspaces"] == {"san": lock_dir + "/san"}


def test_verify_says_a_usage_error_as_json_with_json(tmp_path: Path) -> None:
    """With ``--json`` a failure is also printed as JSON on stdout (README): ``lockd
    verify --json`` given two sockets and one journal directory printed nothing there."""
    done = _lockd(
        "verify", "--json", "--socket", str(tmp_path / "a.sock"),
        "--socket", str(tmp_path / "b.sock"), "--journal-dir", str(tmp_path / "journal"),
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE
    error = json.loads(done.stdout)["error"]
    assert error["exit"] == EXIT_USAGE
    assert "2 --socket and 1 --journal-dir" in error["message"]
    assert "lockd verify: 2 --socket and 1 --journal-dir" in done.stderr


def _documented_flags() -> list[tuple[str, str, str, str]]:
    """(page, subcommand, flag, where) for each ``lockd SUB ... --flag`` in a code line
    or code span of README.md and docs/ (a flag up to the next command, ``;``, ``|`` or
    ``#``)."""
    import re

    root = Path(__file__).resolve().parents[2]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    found = []
    for page in (p for p in pages if p.name != "changelog.md"):
        text = page.read_text()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
        prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
        lines = [line for block in blocks for line in block.splitlines()]
        for code in [*lines, *re.findall(r"`([^`\n]+)`", prose)]:
            command = r"\blockd ([a-z][a-z-]+)\b(.*?)(?=\blockd [a-z]|[;|#]|$)"
            for sub, rest in re.findall(command, code):
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
                    found.append((page.name, sub, flag, code))
    return found


def test_every_flag_the_docs_give_a_subcommand_is_one_it_takes() -> None:
    """A page naming ``lockd events --journal-dir`` or ``lockd serve --check-config``
    names flags of that subcommand: a flag renamed or dropped in the code, and left in
    the docs, sends an operator to a usage error."""
    from lockd.cli import build_parser

    subparsers = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    takes = {
        name: {flag for action in parser._actions for flag in action.option_strings}
        for name, parser in subparsers.choices.items()
    }
    documented = [found for found in _documented_flags() if found[1] in takes]
    assert len(documented) > 20  # the pages' commands are found at all
    wrong = [found for found in documented if found[2] != "--" and found[2] not in takes[found[1]]]
    assert wrong == []


def test_the_client_commands_start_without_the_actor_system() -> None:
    """``lockd run``, ``acquire``, ``status`` and the rest load no pykka and no actors but
    the shared values: importing the journal actor cost every command about 60 ms."""
    code = "import sys, lockd.cli, lockd.commands; print(*sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "pykka" not in loaded
    assert [m for m in loaded if m.startswith("actors.")] == ["actors.model"]
