"""``subscribe``: a live feed, or from a seq on (the journal read back, paced by the
socket), and a subscription that crosses a re-exec without a missing or repeated event.

The real connection and journal actors on the test thread (tests/actors/harness.py);
the journal is in memory and counts an entry as 100 bytes in a replay step, so a
64 KiB step is 655 entries.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.connection import ConnectionActor, Drained, HandedOver, Quiesce, ServerInfo
from actors.events import JournalEntry, LockspaceCreated
from actors.journal import REPLAY_RETRY_DELAYS, Append, Unsubscribe
from actors.metrics import REGISTRY
from lockd.journal_file import JournalFollower
from tests.actors.harness import Conn, FakeTransport, Harness, Recorder
from tests.fakes import ListReader

AUDITOR, VM = 4000, 4001
STEP = 655
"""Entries in one replay step (REPLAY_BYTES at 100 bytes an entry)."""


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "locks")
    for pid in (AUDITOR, VM):
        harness.processes.spawn(pid)
    yield harness
    harness.close()


def _written(h: Harness, count: int) -> None:
    """``count`` entries journaled before the test subscribes (as if over hours)."""
    writer = h.journal_writer
    first = writer.next_seq
    writer.append(
        [JournalEntry(seq, 0.0, "test", LockspaceCreated(f"ls{seq}", "/x", 1))
         for seq in range(first, first + count)]
    )  # fmt: skip


def _seqs(conn: Conn) -> list[int]:
    return [m["event"]["seq"] for m in conn.messages() if "event" in m]


def _subscribe(conn: Conn, **args: Any) -> list[int]:
    """Subscribe; the seqs of the events sent with the reply (which comes first)."""
    rid = conn.send("subscribe", **args)
    conn.harness.run()
    reply, *events = conn.messages()
    assert reply["id"] == rid
    seqs = [m["event"]["seq"] for m in events]
    assert reply["result"] == {"first": seqs[0] if seqs else conn.harness.journal_writer.next_seq}
    return seqs


def _counter(name: str) -> float:
    return REGISTRY.counters.get(name, {}).get((), 0)


def _new_event(h: Harness) -> list[int]:
    """An event journaled through the daemon, as a new client makes it: the seqs of its
    ``connection-opened`` and its ``lockspace-created``."""
    vm = h.connect(VM)
    name = f"pool{h.journal_writer.next_seq}"
    vm.ok("create-lockspace", lockspace=name)
    vm.close()
    return [h.journal_writer.next_seq - 2, h.journal_writer.next_seq - 1]


def test_subscribe_since_replays_the_journal_in_order_then_goes_live(h: Harness) -> None:
    _written(h, 2000)
    auditor = h.connect(AUDITOR)
    replayed = _counter("lockd_events_replayed_total")
    assert _subscribe(auditor, since=3) == list(range(3, 2001))
    assert _counter("lockd_events_replayed_total") == replayed + 1998
    live = _new_event(h)
    assert _seqs(auditor) == live
    assert h.journal_writer.readers[-1].closed  # nothing is left open once live


def test_a_replay_waits_for_a_slow_reader_instead_of_dropping_it(h: Harness) -> None:
    """A subscriber 4 MiB behind is disconnected; one catching up from an old seq is
    given a step at a time, each when its socket has taken most of the last."""
    _written(h, 2000)
    auditor = h.connect(AUDITOR)
    auditor.transport.stuck_bytes = 300 * 1024  # above REPLAY_BACKLOG, far below 4 MiB
    assert _subscribe(auditor, since=1) == list(range(1, STEP + 1))
    assert h.journal_writer.readers[-1].parked == 1  # no fd held while it waits
    auditor.ref.tell(Drained())
    h.run()
    assert _seqs(auditor) == list(range(STEP + 1, 2 * STEP + 1))
    auditor.transport.stuck_bytes = 0
    auditor.ref.tell(Drained())
    h.run()
    assert _seqs(auditor) == list(range(2 * STEP + 1, 2001))
    assert not auditor.transport.closed
    assert _seqs(auditor) == []
    assert _new_event(h) == _seqs(auditor)


def test_meanwhile_requests_are_served_and_new_events_wait_their_turn(h: Harness) -> None:
    _written(h, 2000)
    auditor = h.connect(AUDITOR)
    auditor.transport.stuck_bytes = 300 * 1024
    first = _subscribe(auditor, since=1)
    assert auditor.ok("status")["clients"] >= 1  # not busy while it catches up
    later = _new_event(h)  # journaled during the replay: comes in its place, once
    auditor.transport.stuck_bytes = 0
    auditor.ref.tell(Drained())
    h.run()
    assert first + _seqs(auditor) == list(range(1, later[-1] + 1))


def test_the_reply_says_where_the_feed_starts_when_old_history_is_gone(h: Harness) -> None:
    _written(h, 10)
    del h.journal_writer.entries[:5]  # segments deleted by journal_retain_segments
    auditor = h.connect(AUDITOR)
    rid = auditor.send("subscribe", since=2)
    h.run()
    reply, *events = auditor.messages()
    assert reply == {"id": rid, "result": {"first": 6}}  # the gap, before any event
    assert [m["event"]["seq"] for m in events] == list(range(6, 11))
    assert _subscribe(h.connect(AUDITOR)) == []  # without since: from the next event
    assert _seqs(auditor) == []


def test_a_since_past_the_end_is_refused_and_subscribes_nothing(h: Harness) -> None:
    _written(h, 10)
    auditor = h.connect(AUDITOR)
    error = auditor.error("subscribe", since=12)
    assert error["code"] == "invalid-argument"
    assert "the next event will be 11" in error["message"]
    _new_event(h)
    assert _seqs(auditor) == []
    assert _subscribe(auditor, since=11) == [11, 12]  # the next one: accepted
    assert auditor.error("subscribe", since=1)["code"] == "invalid-argument"  # subscribed
    assert auditor.ok("subscribe") == {}  # again, as before: nothing changes
    assert auditor.error("subscribe", since=0)["code"] == "invalid-argument"


def test_list_clients_shows_which_connections_follow_the_feed(h: Harness) -> None:
    """An operator looking for the auditor's connection (to check it is there, or to
    disconnect it) sees it marked."""
    _written(h, 10)
    auditor, refused, vm = h.connect(AUDITOR), h.connect(AUDITOR), h.connect(VM)

    def subscribed() -> list[bool]:  # in the order they connected
        return [c["subscribed"] for c in sorted(vm.ok("list-clients")["clients"],
                                                key=lambda c: c["id"])]  # fmt: skip

    assert subscribed() == [False, False, False]
    assert refused.error("subscribe", since=99)["code"] == "invalid-argument"
    _subscribe(auditor, since=5)
    assert subscribed() == [True, False, False]
    auditor.close()
    assert subscribed() == [False, False]


def test_closing_during_a_replay_lets_go_of_the_journal(h: Harness) -> None:
    _written(h, 2000)
    auditor = h.connect(AUDITOR)
    auditor.transport.stuck_bytes = 300 * 1024
    auditor.ok("subscribe", since=1)
    auditor.close()
    assert h.journal_writer.readers[-1].closed


@pytest.mark.parametrize("replaying", [False, True], ids=["live", "catching-up"])
def test_a_hand_over_carries_the_next_seq_and_the_next_program_replays_from_it(
    h: Harness, replaying: bool
) -> None:
    """A re-exec: what the old program journals after the hand-over (its last events,
    its daemon-stopped) and the new program's start-up reach the subscriber, read
    back from the journal, after the replies the old program had not sent."""
    _written(h, 2000 if replaying else 5)
    auditor = h.connect(AUDITOR)
    if replaying:
        auditor.transport.stuck_bytes = 300 * 1024
    sent = _subscribe(auditor, since=1)
    assert sent == list(range(1, (STEP if replaying else 5) + 1))
    got: list[Any] = []
    auditor.ref.tell(Quiesce(Recorder.start(h.dispatcher, got)))
    h.run()
    (state,) = got
    assert isinstance(state, HandedOver)
    assert state.events_from == sent[-1] + 1
    missed = _new_event(h)  # journaled between the hand-over and the next program
    assert _seqs(auditor) == []
    assert h.journal_writer.readers[-1].closed or not replaying

    transport = FakeTransport(AUDITOR, 0)
    restored = attrs.evolve(state, unsent=b"\x00\x00\x00\x00")  # a reply not sent yet
    ConnectionActor.start(
        h.dispatcher, conn_id=state.conn_id, transport=transport, router=h.router,
        owners=h.owners, journal=h.journal, processes=h.processes,
        info=ServerInfo("test", 1, 0.0, "test"), clock=h.clock, restored=restored,
    )  # fmt: skip
    h.run()
    assert transport.written[0] == b"\x00\x00\x00\x00"
    again = Conn(h, auditor.ref, transport)
    transport.written = transport.written[1:]
    assert _seqs(again) == list(range(sent[-1] + 1, missed[-1] + 1))
    live = _new_event(h)
    assert _seqs(again) == live
    clients = h.connect(VM).ok("list-clients")["clients"]
    assert [c["subscribed"] for c in clients if c["id"] == state.conn_id] == [True]


def test_a_damaged_segment_ends_the_replay_not_the_journal(
    h: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record damaged in a kept segment (which nothing reads before a replay does)
    is logged and the subscriber goes on live, having got the records before it;
    the journal actor, and with it the daemon, carries on."""
    from lockd.journal_file import FileJournal, JournalFollower, list_segments

    _written(h, 20)
    directory = tmp_path / "journal"
    on_disk = FileJournal(str(directory))
    on_disk.append(h.journal_writer.entries)
    on_disk.close()
    segment = directory / list_segments(str(directory))[0]
    damaged = bytearray(segment.read_bytes())
    damaged[-200] ^= 0xFF  # inside a record near the end: its CRC no longer matches
    segment.write_bytes(bytes(damaged))
    monkeypatch.setattr(
        h.journal_writer, "reader", lambda since: JournalFollower(str(directory), since)
    )
    auditor = h.connect(AUDITOR)
    failures = _counter("lockd_replay_failures_total")
    with caplog.at_level(logging.ERROR):
        sent = _subscribe(auditor, since=1)
    assert "corrupt" in caplog.text
    assert _counter("lockd_replay_failures_total") == failures + 1  # for an alert
    assert h.journal.is_alive()
    assert sent == list(range(1, 18))  # those before the damaged record; the gap shows
    live = _new_event(h)
    assert _seqs(auditor) == live


def test_a_replay_goes_on_in_the_segment_after_a_damaged_one(
    h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old segment's damage costs the feed the rest of that segment only: the
    reply's first event, or the seqs, show the gap, and the later segments come."""
    from lockd.journal_file import FileJournal, JournalFollower, first_seq_of, list_segments

    _written(h, 300)
    directory = tmp_path / "journal"
    on_disk = FileJournal(str(directory), segment_bytes=4096)
    for entry in h.journal_writer.entries:  # a write each, as the daemon's: rotations
        on_disk.append([entry])
    on_disk.close()
    names = list_segments(str(directory))
    assert len(names) > 4
    damaged = bytearray((directory / names[1]).read_bytes())
    damaged[-100] ^= 0xFF  # a record near the end of the second segment
    (directory / names[1]).write_bytes(bytes(damaged))
    monkeypatch.setattr(
        h.journal_writer, "reader", lambda since: JournalFollower(str(directory), since)
    )
    failures = _counter("lockd_replay_failures_total")
    sent = _subscribe(h.connect(AUDITOR), since=1)
    lost_from, back_at = sent.index(first_seq_of(names[1])), first_seq_of(names[2])
    assert sent[:lost_from] == list(range(1, first_seq_of(names[1])))  # the first segment
    got_in_damaged = [seq for seq in sent if first_seq_of(names[1]) <= seq < back_at]
    assert got_in_damaged == list(range(first_seq_of(names[1]), got_in_damaged[-1] + 1))
    assert back_at - got_in_damaged[-1] > 1  # the rest of it is the gap
    assert sent[sent.index(back_at) :] == list(range(back_at, 301))  # every later one
    assert _counter("lockd_replay_failures_total") == failures + 1
    auditor = h.connect(AUDITOR)
    since = first_seq_of(names[1]) + len(got_in_damaged)  # in the damaged part
    rid = auditor.send("subscribe", since=since)
    h.run()
    reply, *events = auditor.messages()
    assert reply == {"id": rid, "result": {"first": back_at}}  # the gap, before any event
    assert [m["event"]["seq"] for m in events] == list(range(back_at, 301))


def _failing_reader(h: Harness, monkeypatch: pytest.MonkeyPatch, *failures: Exception) -> None:
    """The next replay's reader raises ``failures``, one per poll, before reading."""
    writer = h.journal_writer
    make = writer.reader

    def reader(since: int) -> ListReader:
        made = make(since)
        made.failures = list(failures)
        return made

    monkeypatch.setattr(writer, "reader", reader)


def _gauge(state: str) -> float:
    return REGISTRY.gauges["lockd_event_subscribers"][(("state", state),)]


def test_a_replay_step_that_meets_a_passing_error_is_tried_again(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """All of the daemon's descriptors in use (a dense host near its limit) delays
    the feed; it does not leave a gap in it."""
    _written(h, 20)
    _failing_reader(h, monkeypatch, OSError(errno.EMFILE, "Too many open files"),
                    OSError(errno.ENFILE, "Too many open files in system"))  # fmt: skip
    failures = _counter("lockd_replay_failures_total")
    auditor = h.connect(AUDITOR)
    with caplog.at_level(logging.WARNING):
        rid = auditor.send("subscribe", since=3)
        h.run()
    assert auditor.messages() == []  # waiting for the next try, not answered with a gap
    assert "Too many open files" in caplog.text
    assert h.journal_writer.readers[-1].parked >= 1  # no fd held while it waits
    assert _gauge("catching-up") == 1
    h.advance(REPLAY_RETRY_DELAYS[0])
    assert auditor.messages() == []  # the second try failed too
    h.advance(REPLAY_RETRY_DELAYS[1])
    reply, *events = auditor.messages()
    assert reply == {"id": rid, "result": {"first": 3}}
    assert [m["event"]["seq"] for m in events] == list(range(3, 21))
    assert _counter("lockd_replay_failures_total") == failures
    assert (_gauge("live"), _gauge("catching-up")) == (1, 0)
    assert _new_event(h) == _seqs(auditor)
    auditor.close()
    assert _gauge("live") == 0


def test_a_passing_error_that_lasts_ends_the_replay_with_a_gap(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    _written(h, 20)
    emfile = OSError(errno.EMFILE, "Too many open files")
    _failing_reader(h, monkeypatch, *[emfile] * (len(REPLAY_RETRY_DELAYS) + 1))
    failures = _counter("lockd_replay_failures_total")
    auditor = h.connect(AUDITOR)
    rid = auditor.send("subscribe", since=3)
    h.run()
    for delay in REPLAY_RETRY_DELAYS[:-1]:
        h.advance(delay)
        assert auditor.messages() == []
    h.advance(REPLAY_RETRY_DELAYS[-1])
    assert auditor.messages() == [{"id": rid, "result": {"first": 21}}]
    assert _counter("lockd_replay_failures_total") == failures + 1  # the gap, for an alert
    assert _new_event(h) == _seqs(auditor)


def test_closing_while_a_replay_waits_to_try_again_stops_the_tries(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    _written(h, 20)
    _failing_reader(h, monkeypatch, OSError(errno.EMFILE, "Too many open files"))
    auditor = h.connect(AUDITOR)
    auditor.send("subscribe", since=3)
    h.run()
    auditor.close()
    reader = h.journal_writer.readers[-1]
    assert reader.closed
    assert _gauge("catching-up") == 0
    h.advance(sum(REPLAY_RETRY_DELAYS))
    assert reader.next_seq == 3  # never polled again


class _CountingFollower(JournalFollower):
    """Counts the reads each poll makes."""

    def __init__(self, directory: str, since_seq: int) -> None:
        super().__init__(directory, since_seq)
        self.reads: list[int] = []

    def _read(self, max_bytes: int, out: list[JournalEntry]) -> int:
        self.reads[-1] += 1
        return super()._read(max_bytes, out)

    def poll(self, max_bytes: int = -1) -> list[JournalEntry]:
        self.reads.append(0)
        return super().poll(max_bytes)


def test_a_try_again_due_after_the_subscriber_left_subscribes_nothing(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer's message can come after the connection's Unsubscribe (which it
    does not follow in any inbox): it must not make a connection gone a subscriber."""
    _written(h, 20)
    _failing_reader(h, monkeypatch, OSError(errno.EMFILE, "Too many open files"))
    auditor = h.connect(AUDITOR)
    auditor.send("subscribe", since=3)
    h.run()
    h.journal.tell(Unsubscribe(auditor.ref))  # queued, then the timer falls due
    h.advance(REPLAY_RETRY_DELAYS[0])
    assert (_gauge("live"), _gauge("catching-up")) == (0, 0)
    assert auditor.messages() == []


def test_a_since_deep_in_a_segment_is_reached_in_bounded_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipping to a since far into a segment takes the dispatcher a step at a time
    (each at most SKIP_STEPS reads), not the whole segment at once."""
    from lockd.journal_file import SKIP_STEPS, FileJournal

    h = Harness(tmp_path / "locks", replay_bytes=1024)
    try:
        h.processes.spawn(AUDITOR)
        _written(h, 3000)
        directory = tmp_path / "journal"
        on_disk = FileJournal(str(directory))
        on_disk.append(h.journal_writer.entries)
        on_disk.close()
        followers: list[_CountingFollower] = []

        def reader(since: int) -> JournalFollower:
            followers.append(_CountingFollower(str(directory), since))
            return followers[-1]

        monkeypatch.setattr(h.journal_writer, "reader", reader)
        auditor = h.connect(AUDITOR)
        assert _subscribe(auditor, since=2900) == list(range(2900, 3001))
        (follower,) = followers
        assert len(follower.reads) > 2  # steps that sent nothing, between other work
        assert max(follower.reads) == SKIP_STEPS == 16  # 1 MiB at the daemon's 64 KiB
    finally:
        h.close()


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(1, 12)),  # events journaled through the actor
        st.tuples(st.just("run"), st.integers(1, 6)),  # dispatcher steps: any interleaving
        st.tuples(st.just("stuck"), st.booleans()),  # the socket stops / starts taking bytes
        st.tuples(st.just("hand-over"), st.just(0)),  # a re-exec
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.integers(0, 40), since=st.integers(1, 41), steps=_STEPS)
def test_every_event_from_since_arrives_once_in_order_whatever_the_interleaving(
    tmp_path_factory: pytest.TempPathFactory, before: int, since: int, steps: list[Any]
) -> None:
    """Replay steps of 3 entries, live events journaled between them, a socket that
    stops taking bytes, and re-execs at any point (the old program's connection stops;
    the next one replays from the seq handed over): the subscriber gets each event
    from ``since`` on exactly once, in seq order."""
    h = Harness(tmp_path_factory.mktemp("locks"), replay_bytes=300)
    try:
        _written(h, before)
        since = min(since, h.journal_writer.next_seq)
        transport = FakeTransport(AUDITOR, 0)
        ref = _connection(h, transport, None)
        conn = Conn(h, ref, transport)
        conn.send("hello", versions=[1])
        conn.send("subscribe", since=since)
        received: list[dict[str, Any]] = []
        for kind, arg in steps:
            if kind == "write":
                first = h.journal_writer.next_seq
                events = tuple(LockspaceCreated(f"w{first + i}", "/x", 1) for i in range(arg))
                h.journal.tell(Append(events, 0, None))
            elif kind == "run":
                for _ in range(arg):
                    h.dispatcher._run_ready(1)
            elif kind == "stuck":
                transport.stuck_bytes = 300 * 1024 if arg else 0
                if not arg:
                    ref.tell(Drained())
            else:
                got: list[Any] = []
                ref.tell(Quiesce(Recorder.start(h.dispatcher, got)))
                h.run()
                if not got or not isinstance(got[0], HandedOver):
                    continue  # busy with its first step: the quiesce waits (run on)
                received += conn.messages()
                transport = FakeTransport(AUDITOR, 0)
                ref = _connection(h, transport, got[0])
                conn = Conn(h, ref, transport)
        transport.stuck_bytes = 0
        ref.tell(Drained())
        h.run()
        received += conn.messages()
        seqs = [m["event"]["seq"] for m in received if "event" in m]
        assert seqs == list(range(since, h.journal_writer.next_seq))
    finally:
        h.close()


def _connection(h: Harness, transport: FakeTransport, restored: HandedOver | None) -> Any:
    return ConnectionActor.start(
        h.dispatcher, conn_id=7, transport=transport, router=h.router, owners=h.owners,
        journal=h.journal, processes=h.processes, info=ServerInfo("test", 1, 0.0, "test"),
        clock=h.clock, restored=restored,
    )  # fmt: skip


def test_restrict_ends_the_subscription_of_the_connection_it_hands_to_a_vm(h: Harness) -> None:
    """A manager that subscribed on the connection it then restricts (and hands to the VM
    process) no longer feeds the VM every tenant's events: restrict ends the subscription
    with its last frame, and the events after it go to other subscribers only."""
    auditor = h.connect(AUDITOR)
    _subscribe(auditor)
    vm = h.connect(VM)
    vm.register(VM)
    _subscribe(vm)
    rid = vm.send("restrict")
    h.run()
    ended, reply = vm.messages()
    assert ended["subscription-ended"]["reason"] == "the connection was restricted"
    assert reply == {"id": rid, "result": {}}
    seq = _new_event(h)[-1]
    h.run()
    assert vm.messages() == []
    assert seq in _seqs(auditor)


def test_restrict_during_a_replay_ends_it_for_good(h: Harness) -> None:
    """A connection restricted while its replay waits for the socket to drain gets no more
    of the history once the socket drains: the replay went on into the VM's process."""
    _written(h, 2000)
    vm = h.connect(VM)
    vm.register(VM)
    vm.transport.stuck_bytes = 300 * 1024  # the replay waits after its first step
    assert _subscribe(vm, since=1) == list(range(1, STEP + 1))
    rid = vm.send("restrict")
    h.run()
    ended, reply = vm.messages()
    assert ended["subscription-ended"]["reason"] == "the connection was restricted"
    assert reply == {"id": rid, "result": {}}
    vm.transport.stuck_bytes = 0
    vm.ref.tell(Drained())
    h.run()
    assert vm.messages() == []
