"""The re-exec's quiesce against requests in flight, every interleaving tried in turn.

The real actors on the test thread (tests/actors/harness.py), with the re-exec
actor's check thread and its exec replaced: a race between the quiesce and a
request is ordered step by step instead of hoped for with real timing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.connection import Gone, HandedOver, Quiesce, Resume, _Retry
from actors.events import DaemonStarted, DaemonStopped, LeaseAcquired, LeaseReleased
from actors.runtime import DispatchedActor
from lockd import reexec
from protocol.codec import decode_item
from tests.actors.harness import Conn, Harness, Recorder

MANAGER, VM = 4000, 4001
FILES, LVM = "org.libvirt.lockd.files", "org.libvirt.lockd.lvm"


class _NoThread:
    """The check's thread, never started: the test answers for the check."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def start(self) -> None:
        pass


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> list[reexec.Handoff]:
    """What would have been exec'd with, instead of the exec."""
    execs: list[reexec.Handoff] = []
    monkeypatch.setattr("lockd.reexec.threading.Thread", _NoThread)
    monkeypatch.setattr(reexec, "exec_with", lambda handoff, _argv, **_kw: execs.append(handoff))
    return execs


def _manager_of_vm(h: Harness) -> Conn:
    """A manager's connection (libvirtd's), registered for its VM."""
    for pid in (MANAGER, VM):
        h.processes.spawn(pid)
    conn = h.connect(MANAGER)
    conn.register(VM)
    return conn


def _reexec(
    h: Harness,
    conns: list[Conn],
    taken_back: list[int],
    said: list[str] | None = None,
) -> pykka.ActorRef[Any]:
    """A re-exec of the daemon whose connections are ``conns``, listed as the daemon
    lists them: every connection whose actor still runs, its socket closed or not.
    ``said`` gets "abandoned" and "over" as the re-exec reports them."""
    said = [] if said is None else said

    def abandoned(states: list[HandedOver], _why: str) -> None:
        taken_back.extend(state.conn_id for state in states)
        said.append("abandoned")

    return reexec.ReexecActor.start(
        h.dispatcher,
        connections=lambda: [c.ref for c in conns if c.ref.is_alive()],
        stop_accepting=lambda: None,
        router=h.router, journal=h.journal, owners=h.owners, listeners=[],
        next_conn_id=lambda: 100, argv=[sys.executable],
        on_abort=abandoned,
        on_done=lambda: said.append("over"),
    )  # fmt: skip


def _quiesced_mid_request(h: Harness, actor: pykka.ActorRef[Any], conn: Conn) -> int:
    """The check passes while ``conn``'s acquire is in progress: step until the quiesce
    reached the connection, its request still running; the request's id."""
    rid = conn.send("acquire", leases=[{"lockspace": FILES, "resource": "a"}], autocreate=True)
    h.dispatcher._run_ready(1)  # the connection takes the request
    _passed(actor)
    connection = conn.ref._actor_weakref()
    assert connection is not None
    for _ in range(50):
        h.dispatcher._run_ready(1)
        if connection._quiesce_to is not None:
            break
    assert connection._quiesce_to is not None
    assert connection._busy
    return rid


def _passed(actor: pykka.ActorRef[Any]) -> None:
    actor.tell(reexec._Checked(reexec.TargetCheck(True, own_fds=True)))


@pytest.mark.parametrize("steps", range(0, 40, 3))
def test_an_acquire_whose_client_left_is_rolled_back_before_the_lockspaces_freeze(
    tmp_path: Path, handed: list[reexec.Handoff], steps: int
) -> None:
    """A manager sent an acquire over two lockspaces and closed its connection; the
    daemon saw the close with the acquire in flight, and rolls the acquire back once it
    completes. The quiesce must wait for that rollback: the lockspaces freeze once idle,
    and a rollback arriving after would never run. The next program would then hold,
    for a VM never told of it, half of an all-or-nothing acquire."""
    h = Harness(tmp_path / "locks")
    try:
        (tmp_path / "locks" / LVM).mkdir(exist_ok=True)
        conn = _manager_of_vm(h)
        actor = _reexec(h, [conn], [])
        h.run()
        both = [{"lockspace": FILES, "resource": "a"}, {"lockspace": LVM, "resource": "b"}]
        conn.send("acquire", leases=both, autocreate=True)
        conn.send_raw(b"")  # gone, its acquire in flight
        for _ in range(steps):
            h.dispatcher._run_ready(1)
        _passed(actor)  # the check answers now: the quiesce begins
        h.run()
        assert len(handed) == 1
        held: dict[tuple[str, str], int] = {}
        for event in h.journal_writer.events():
            if isinstance(event, LeaseAcquired | LeaseReleased):
                key = (event.lockspace, event.resource)
                held[key] = held.get(key, 0) + (1 if isinstance(event, LeaseAcquired) else -1)
        assert [key for key, n in held.items() if n > 0] == []
        assert handed[0].leases == ()
    finally:
        h.close()


def test_a_reexec_given_up_while_a_request_runs_serves_that_connection_on(
    tmp_path: Path, handed: list[reexec.Handoff]
) -> None:
    """The re-exec gives up (not quiet within its deadline) while a connection still
    finishes its request. That connection must serve on: it may not hand itself over
    afterwards to a re-exec that is gone, its socket detached and never read again."""
    h = Harness(tmp_path / "locks")
    try:
        conn = _manager_of_vm(h)
        taken_back: list[int] = []
        actor = _reexec(h, [conn], taken_back)
        h.run()
        rid = _quiesced_mid_request(h, actor, conn)
        actor.tell(reexec._Deadline())  # and the deadline runs out first
        h.run()
        assert handed == []
        assert not actor.is_alive()
        assert [m.get("id") for m in conn.messages()] == [rid]
        assert conn.ref.is_alive()
        assert not conn.transport.closed
        status = conn.ok("status")  # served, by the same actor, in this process
        assert status["clients"] >= 1
        assert taken_back == []
    finally:
        h.close()


def test_an_acquire_waiting_for_a_busy_lease_is_handed_over_with_what_is_left_of_its_wait(
    tmp_path: Path, handed: list[reexec.Handoff]
) -> None:
    """A VM asked to wait up to 3 s for a disk another VM holds; 2 s in, a reload. The
    next program asks again for the 1 s left: from the whole 3 s, every reload would
    extend the wait, and repeated reloads without end."""
    h = Harness(tmp_path / "locks")
    try:
        for pid in (VM, VM + 1):
            h.processes.spawn(pid)
        holder = h.connect(VM + 1)
        holder.register(VM + 1)
        holder.ok("acquire", leases=[{"lockspace": FILES, "resource": "a"}], autocreate=True)
        waiter = h.connect(VM)
        waiter.register(VM)
        actor = _reexec(h, [holder, waiter], [])
        h.run()
        waiter.send("acquire", leases=[{"lockspace": FILES, "resource": "a"}], autocreate=True,
                    wait=3.0)  # fmt: skip
        h.run()  # refused busy: it waits
        h.advance(2.0)
        _passed(actor)
        h.run()
        (handoff,) = handed
        (state,) = [c for c in handoff.connections if c.peer_pid == VM]
        request = decode_item(state.pending[4:])
        assert request["op"] == "acquire"
        assert 0.9 <= request["wait"] <= 1.0
    finally:
        h.close()


def _waiting_vm(h: Harness) -> tuple[Conn, Conn]:
    """The other VM holds disk b; the VM holds a and waits (``wait``) for b, refused busy."""
    for pid in (VM, VM + 1):
        h.processes.spawn(pid)
    holder = h.connect(VM + 1)
    holder.register(VM + 1, name="other")
    holder.ok("acquire", leases=[{"lockspace": FILES, "resource": "b"}], autocreate=True)
    vm = h.connect(VM)
    vm.register(VM)
    vm.ok("acquire", leases=[{"lockspace": FILES, "resource": "a"}], autocreate=True)
    vm.send("acquire", leases=[{"lockspace": FILES, "resource": "b"}], autocreate=True, wait=3.0)
    h.run()
    return holder, vm


def test_an_answer_queued_behind_the_hand_over_neither_fences_nor_answers_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry timer of a waiting acquire fires while the quiesce waits in the
    connection's inbox. The quiesce hands the connection over (its stop queued behind
    the retry); the retry must not then report the connection closed (which fences the
    VM) nor answer the re-exec again. Here the exec fails: the connection is taken back
    and serves on, and its VM runs on unfenced."""
    monkeypatch.setattr("lockd.reexec.threading.Thread", _NoThread)

    def exec_fails(_handoff: Any, _argv: Any, **_kw: Any) -> None:
        raise OSError(8, "Exec format error")

    monkeypatch.setattr(reexec, "exec_with", exec_fails)
    h = Harness(tmp_path / "locks")
    try:
        _holder, vm = _waiting_vm(h)
        answers: list[str] = []
        actor = reexec.ReexecActor.start(
            h.dispatcher,
            connections=lambda: [vm.ref],
            stop_accepting=lambda: None,
            router=h.router, journal=h.journal, owners=h.owners, listeners=[],
            next_conn_id=lambda: 100, argv=[sys.executable],
            on_abort=lambda states, _why: answers.extend(type(s).__name__ for s in states),
        )  # fmt: skip
        h.run()
        connection = vm.ref._actor_weakref()
        assert connection is not None
        assert connection._waiting_retry
        (token,) = connection._waits  # the retry's
        _passed(actor)
        for _ in range(100):
            if any(isinstance(m, Quiesce) for m in connection.actor_inbox):
                break
            h.dispatcher._run_ready(1)
        assert any(isinstance(m, Quiesce) for m in connection.actor_inbox)
        vm.ref.tell(_Retry(token))  # the retry's timer, come due now
        h.run()
        assert answers == ["HandedOver"]  # taken back once
        h.advance(5.0)  # past the grace period
        assert h.processes.signals == []
    finally:
        h.close()


def test_a_resume_crossing_the_hand_over_is_not_answered(tmp_path: Path) -> None:
    """The re-exec gave up just as the connection handed over: one answer per quiesced
    connection, the HandedOver (which the re-exec takes back), no Gone after it."""
    answers: list[str] = []

    class Recorder(DispatchedActor):
        def on_receive(self, message: Any) -> Any:
            answers.append(type(message).__name__)

    h = Harness(tmp_path / "locks")
    try:
        h.processes.spawn(VM)
        vm = h.connect(VM)
        vm.register(VM)
        recorder = Recorder.start(h.dispatcher)
        vm.ref.tell(Quiesce(recorder))  # idle: hands over at once, its stop queued
        vm.ref.tell(Resume(recorder))  # queued before that stop
        h.run()
        assert answers == ["HandedOver"]
    finally:
        h.close()


def test_an_abandoned_reexec_is_over_once_every_quiesced_connection_answered(
    tmp_path: Path, handed: list[reexec.Handoff]
) -> None:
    """Given up while a connection still finishes its request, the re-exec is over only
    when that connection has answered: a SIGUSR1 taken earlier would start a second
    re-exec that quiesces it while its answer still goes to the first, and misses a
    connection the first takes back meanwhile."""
    h = Harness(tmp_path / "locks")
    try:
        conn = _manager_of_vm(h)
        over: list[str] = []
        actor = _reexec(h, [conn], [], said=over)
        h.run()
        _quiesced_mid_request(h, actor, conn)
        actor.tell(reexec._Deadline())
        for _ in range(50):
            h.dispatcher._run_ready(1)
            if over:
                break
        assert over == ["abandoned"]  # the connection has not answered yet
        h.run()
        assert over == ["abandoned", "over"]
        assert not actor.is_alive()
    finally:
        h.close()


def test_an_abandoned_reexec_does_not_wait_for_ever_for_an_answer(
    tmp_path: Path, handed: list[reexec.Handoff]
) -> None:
    class Mute(DispatchedActor):
        """A connection that never answers (a bug): SIGUSR1 must not be refused for ever."""

        def on_receive(self, message: Any) -> Any:
            return None

    h = Harness(tmp_path / "locks")
    try:
        mute = Mute.start(h.dispatcher)
        over: list[str] = []
        actor = reexec.ReexecActor.start(
            h.dispatcher,
            connections=lambda: [mute],
            stop_accepting=lambda: None,
            router=h.router, journal=h.journal, owners=h.owners, listeners=[],
            next_conn_id=lambda: 100, argv=[sys.executable],
            on_abort=lambda _states, _why: None, on_done=lambda: over.append("over"),
        )  # fmt: skip
        _passed(actor)
        h.run()
        actor.tell(reexec._Deadline())
        h.run()
        assert over == []
        h.advance(reexec.AFTER_ABORT_SECONDS)
        assert over == ["over"]
    finally:
        h.close()


@pytest.mark.parametrize("request_args", [{"op": "subscribe", "since": 1}, {"op": "status"}],
                         ids=["subscribe", "status"])  # fmt: skip
def test_a_connection_closed_with_a_request_in_flight_is_not_handed_over(
    tmp_path: Path, request_args: dict[str, Any]
) -> None:
    """The client left while its request was answered; the quiesce reaches the actor
    before the answer. Its socket is closed: it answers Gone once the answer is in, and
    is never handed over (its fd number, closed, may be another file's by then: the next
    program would take that for the client's socket, and an abandoned re-exec would
    take it back)."""
    h = Harness(tmp_path / "locks")
    try:
        h.processes.spawn(MANAGER)
        conn = h.connect(MANAGER)
        got: list[Any] = []
        conn.send(**request_args)
        conn.send_raw(b"")  # gone, its request in flight
        conn.ref.tell(Quiesce(Recorder.start(h.dispatcher, got)))
        h.run()
        assert [type(answer) for answer in got] == [Gone]
        assert not conn.ref.is_alive()
    finally:
        h.close()


def test_an_exec_that_fails_after_the_stop_names_the_uids_the_daemon_serves_on_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exec fails once ``daemon-stopped`` is journaled: the ``daemon-started`` that
    says the same process serves on names the ``allowed_uids`` in force, as every other
    one does (an auditor reads who may connect from the last one)."""

    def refused(_handoff: reexec.Handoff, _argv: Any, **_kw: Any) -> None:
        raise OSError(7, "Argument list too long")

    monkeypatch.setattr("lockd.reexec.threading.Thread", _NoThread)
    monkeypatch.setattr(reexec, "exec_with", refused)
    h = Harness(tmp_path / "locks")
    try:
        actor = reexec.ReexecActor.start(
            h.dispatcher, connections=list, stop_accepting=lambda: None, router=h.router,
            journal=h.journal, owners=h.owners, listeners=[], next_conn_id=lambda: 1,
            argv=[sys.executable], on_abort=lambda _states, _why: None,
            allowed_uids=(107, 64055),
        )  # fmt: skip
        h.run()
        _passed(actor)
        h.run()
        kinds = [type(event) for event in h.journal_writer.events()]
        assert kinds[-2:] == [DaemonStopped, DaemonStarted]
        assert h.journal_writer.events(DaemonStarted)[-1].allowed_uids == (107, 64055)
    finally:
        h.close()
