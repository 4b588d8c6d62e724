"""The example auditor's feed (contrib/examples/audit_feed.py): every event once, in
order, while the daemon is SIGKILLed and started again and re-executes itself."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import ClassVar

import attrs
import pytest

from actors.events import DaemonStarted, DaemonStopped, Event, JournalEntry
from lockd.journal_file import FileJournal, first_seq_of, list_segments
from tests.e2e.conftest import DaemonProcess, MakeDaemon, journaled, wait_for
from tests.e2e.test_daemon import events
from tests.e2e.test_fd_store import kill_daemon
from tests.e2e.test_reexec import _copy_of_this_build

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "contrib" / "examples" / "audit_feed.py"


def _journal_some(daemon: DaemonProcess, tag: str, count: int = 5) -> None:
    """``count`` lockspaces created on one new connection: ``count`` + 1 events, its
    ``connection-opened`` first."""
    with daemon.client("maker") as client:
        for i in range(count):
            client.call("create-lockspace", lockspace=f"{tag}-{i}")


def _saved(state: Path) -> int | None:
    """The last seq the feed saved (its state file: "SEQ EPOCH")."""
    return int(state.read_text().split()[0]) if state.exists() else None


def _start_feed(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], tmp_path: Path, *since: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The example feed on ``daemon``: (its process, its state file, its output file)."""
    state, out = tmp_path / "feed.seq", tmp_path / "feed.out"
    with open(out, "wb") as sink:
        feed = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--socket", str(daemon.socket),
             "--state", str(state), *since],
            stdout=sink, stderr=subprocess.PIPE,
        )  # fmt: skip
    children.append(feed)
    return feed, state, out


def test_the_audit_feed_misses_nothing_across_a_crash_and_a_reexec(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    _journal_some(daemon, "before")  # history, from before the feed starts
    feed, state, out = _start_feed(daemon, children, tmp_path, "--since", "1")

    def caught_up() -> bool:
        return bool(_saved(state) == events(daemon)[-1]["seq"])

    wait_for(caught_up)
    kill_daemon(daemon)  # the feed's connection ends; it connects again
    daemon.start()  # journals its start and recovery before the feed is back
    _journal_some(daemon, "after-crash")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)  # the connection is handed over
    wait_for(lambda: journaled(daemon, "daemon-started") == 3)
    _journal_some(daemon, "after-reexec")
    wait_for(caught_up)
    (listed,) = [
        line for line in daemon.lockd("clients").stdout.splitlines() if "subscribed" in line
    ]
    assert f"pid={feed.pid} " in listed  # the operator can tell the feed is connected
    feed.kill()
    _, stderr = feed.communicate()
    printed = [json.loads(line) for line in out.read_text().splitlines()]
    journal = events(daemon)
    assert (
        [e["seq"] for e in printed]
        == [e["seq"] for e in journal]
        == list(range(1, len(journal) + 1))
    )
    assert [e["type"] for e in printed] == [e["type"] for e in journal]
    assert b"connecting again" in stderr  # it did lose the daemon once


def test_the_audit_feed_reports_what_damage_in_an_old_segment_cost(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A record damaged in an old segment (disk trouble that start-up, reading from
    the newest snapshot, never meets): the feed gets every event before it and
    every event from the next segment on, and names the seqs it lost."""
    config = tmp_path / "lockd.toml"
    config.write_text("journal_segment_bytes = 4096\njournal_retain_segments = 100\n")
    daemon = make_daemon("damage", None, "--config", str(config))
    _journal_some(daemon, "pool", count=120)  # a few 4 KiB segments
    names = list_segments(str(daemon.journal_dir))
    assert len(names) > 3
    damaged = daemon.journal_dir / names[1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a record in the middle of the second segment
    damaged.write_bytes(bytes(data))
    with daemon.client("status") as client:
        last = client.call("status")["journal_seq"]
    feed, state, out = _start_feed(daemon, children, tmp_path, "--since", "1")
    wait_for(lambda: (_saved(state) or 0) >= last)
    feed.kill()
    _, stderr = feed.communicate()
    printed = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    second, third = first_seq_of(names[1]), first_seq_of(names[2])
    lost = sorted(set(range(1, printed[-1] + 1)) - set(printed))
    assert lost == list(range(lost[0], third))  # the damaged record to the segment's end
    assert second < lost[0] < third  # the events before it in its segment came
    assert f"events {lost[0]}-{third - 1} could not be read back".encode() in stderr
    assert daemon.lockd("status").returncode == 0  # the daemon serves on


def test_the_audit_feed_goes_on_when_the_journal_was_cut_below_its_place(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """`journal-check --repair`, or damage cut at start-up after a host crash, can
    leave the journal ending before the seq the feed saved: the feed says so and
    goes on from the journal's next event instead of failing for ever."""
    (tmp_path / "feed.seq").write_text("100000")
    feed, state, out = _start_feed(daemon, children, tmp_path)
    wait_for(lambda: "subscribed" in daemon.lockd("clients").stdout)
    _journal_some(daemon, "after-cut", count=3)
    last = events(daemon)[-1]["seq"]
    wait_for(lambda: _saved(state) == last)
    feed.kill()
    _, stderr = feed.communicate()
    printed = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    assert printed == list(range(last - 3, last + 1))
    assert b"events were cut from it" in stderr


@pytest.mark.parametrize("more", [True, False], ids=["events-come", "idle"])
def test_the_audit_feed_ends_when_its_reader_leaves(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], tmp_path: Path, more: bool
) -> None:
    """``audit_feed.py | head -1``: the pipe's BrokenPipeError is a ConnectionError, and
    the feed took it for the daemon's connection lost: it connected again twice a
    second for ever, replaying the journal each time; with no new event it waited for
    ever. It ends with 141 now, the event it could not print not saved."""
    state = tmp_path / "feed.seq"
    feed = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--socket", str(daemon.socket), "--state", str(state),
         "--since", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    children.append(feed)
    assert feed.stdout is not None
    assert json.loads(feed.stdout.readline())["seq"] == 1
    last = events(daemon)[-1]["seq"]
    wait_for(lambda: _saved(state) == last)  # every event printed: the feed waits
    feed.stdout.close()  # as head does after its line
    if more:
        _journal_some(daemon, "after-head", count=2)  # the feed has more to print
    assert feed.wait(10) == 141
    assert feed.stderr is not None
    assert b"connecting again" not in feed.stderr.read()
    saved = _saved(state)
    assert saved is not None
    if more:
        assert saved < events(daemon)[-1]["seq"]  # the event it could not print: unsaved


def test_an_event_with_owners_in_a_list_is_printed() -> None:
    """``recovery-completed`` lists the fences it starts, each with its owner, whose uuid
    is bytes: the feed died on it ("Object of type bytes is not JSON serializable")
    after any restart that fenced a VM."""
    spec = importlib.util.spec_from_file_location("audit_feed", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    feed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(feed)
    owner = {"uuid": b"\x01" * 16, "name": "vm1", "id": 1, "pid": 4242, "boot": b"\x02" * 16}
    event = {"seq": 7, "type": "recovery-completed", "held": 0, "released": 0, "lost": 1,
             "fencing": [{"owner": owner, "reason": "lease ls/r was taken while lockd was down",
                          "since": 1795771375.0}]}  # fmt: skip
    line = json.loads(json.dumps(feed.printable(event)))
    assert line["fencing"][0]["owner"]["uuid"] == str(uuid.UUID(bytes=b"\x01" * 16))
    assert line["fencing"][0]["reason"] == "lease ls/r was taken while lockd was down"


def test_after_a_cut_the_audit_feed_prints_the_new_timeline_from_the_cut(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The journal cut below the feed's saved seq (start-up after a reboot cut damage
    in its newest segment), and the new timeline already past that seq: by seq alone
    the feed would go on after its saved seq and never print the new events below it.
    Told the journal's epoch by the daemon, it prints the new timeline from the cut."""
    _journal_some(daemon, "old", count=200)  # a few 4 KiB pages of one segment
    feed, state, out = _start_feed(daemon, children, tmp_path, "--since", "1")
    saved = events(daemon)[-1]["seq"]
    wait_for(lambda: _saved(state) == saved)
    feed.kill()
    feed.wait()
    kill_daemon(daemon)
    (segment,) = sorted(daemon.journal_dir.glob("journal-*.cbor"))
    data = bytearray(segment.read_bytes())
    data[4096 + 1000 : 2 * 4096] = bytes(4096 - 1000)  # a page lost in a power cut
    segment.write_bytes(bytes(data))
    os.utime(segment, (1, 1))
    (daemon.journal_dir / ".boot").write_bytes(uuid.uuid4().bytes)  # as after a reboot
    daemon.start()
    with daemon.client("status") as client:
        cut_from = client.call("status")["journal"]["from"]
    assert cut_from < saved
    _journal_some(daemon, "new", count=saved - cut_from + 20)  # the new timeline goes past
    last = events(daemon)[-1]["seq"]
    assert last > saved
    feed, state, out = _start_feed(daemon, children, tmp_path)
    wait_for(lambda: _saved(state) == last)
    feed.kill()
    _, stderr = feed.communicate()
    printed = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    assert printed == list(range(cut_from, last + 1))
    assert f"the journal was cut after seq {cut_from - 1}".encode() in stderr


def _as_an_earlier_build(build: Path, since: bool) -> None:
    """Edit the copy at ``build`` into a build whose ``subscribe`` reply says no
    ``first`` (before 2026-11-27 07:44), and, without ``since``, one that refuses that
    argument too (before 07:10)."""
    connection = build / "actors" / "connection.py"
    reply = '{"first": first, **self._epoch()}'
    assert reply in connection.read_text()
    connection.write_text(connection.read_text().replace(reply, "{}"))
    if since:
        return
    messages = build / "protocol" / "messages.py"
    args = 'ARGS: ClassVar[frozenset[str]] = frozenset({"since"})\n    since: int | None = None'
    assert args in messages.read_text()
    messages.write_text(messages.read_text().replace(args, args.replace('{"since"}', "")))


@pytest.mark.parametrize("since", [False, True], ids=["before-since", "before-first"])
def test_the_audit_feed_follows_a_lockd_from_before_subscribe_since(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path, since: bool
) -> None:
    """A daemon built before ``subscribe`` took ``since`` refuses it, and one built before
    its reply said ``first`` replies without it: the feed died on that reply (``KeyError:
    'first'``), on every run. It follows the new events; from the first, it names the seqs
    journaled while it was away, which that daemon cannot send, and says why; the second
    sends them."""
    build = _copy_of_this_build(tmp_path)
    _as_an_earlier_build(build, since)
    daemon = make_daemon("old", None, cwd=build)
    _journal_some(daemon, "away", count=3)
    away = events(daemon)[-1]["seq"]
    (tmp_path / "feed.seq").write_text(str(away - 3))  # the feed saw up to there
    feed, state, out = _start_feed(daemon, children, tmp_path)
    wait_for(lambda: "subscribed" in daemon.lockd("clients").stdout)
    _journal_some(daemon, "new", count=2)
    last = events(daemon)[-1]["seq"]
    wait_for(lambda: _saved(state) == last)
    feed.kill()
    _, stderr = feed.communicate()
    printed = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    if since:
        assert printed == list(range(away - 2, last + 1))
        assert b"audit-feed:" not in stderr
    else:
        assert printed == [last - 2, last - 1, last]
        assert b"predates subscribe's since" in stderr
        missed = f"events {away - 2}-{last - 3} were journaled while this feed was away"
        assert missed.encode() in stderr


@attrs.frozen
class _LaterEvent(Event):
    """An event of a type this build does not know, as a later lockd would journal it."""

    TYPE: ClassVar[str] = "quota-changed"
    changed: str


def test_an_event_of_a_type_a_later_lockd_added_is_read_as_it_is(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A journal holding an event of a type a later lockd added (after a downgrade):
    ``lockd events`` called it corrupt there and stopped (``journal-check`` said ok),
    and a subscriber's replay skipped the rest of its segment as damaged. Both pass the
    event on as it is, and every event after it."""
    journal_dir = tmp_path / "later" / "journal"
    journal = FileJournal(str(journal_dir))
    journal.append(
        [JournalEntry(1, 1764000000.0, "hv1", DaemonStarted("0.2.0", 4242)),
         JournalEntry(2, 1764000001.0, "hv1", _LaterEvent("log_level\nforged line")),
         JournalEntry(3, 1764000002.0, "hv1", DaemonStopped("SIGTERM"))]
    )  # fmt: skip
    journal.close()
    daemon = make_daemon("later")
    _journal_some(daemon, "after", count=2)
    journal_json = events(daemon)
    last = journal_json[-1]["seq"]
    assert [e["seq"] for e in journal_json] == list(range(1, last + 1))
    later = {"seq": 2, "time": 1764000001.0, "host": "hv1", "type": "quota-changed"}
    assert journal_json[1] == {**later, "changed": "log_level\nforged line"}
    text = daemon.lockd("events", "--journal-dir", str(daemon.journal_dir))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == last  # one line each: the text is escaped
    assert lines[1].endswith(" hv1 quota-changed changed=log_level\\x0aforged line")
    feed, state, out = _start_feed(daemon, children, tmp_path, "--since", "1")
    wait_for(lambda: _saved(state) == last)
    feed.kill()
    _, stderr = feed.communicate()
    printed = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == journal_json
    assert b"could not be read back" not in stderr
