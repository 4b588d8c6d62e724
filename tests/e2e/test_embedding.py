"""Embedding: the example orchestrator runs, restarts, and its VMs keep their disks."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from actors import connection
from actors.router import Gather, RouterActor
from lockd.embed import (
    ConnectionLostError,
    LockService,
    PidFileLockedError,
    RecoveryReport,
    SubscriptionEnded,
)
from lockd.journal_format import JournalCorruptError
from protocol.client import Client, RemoteError
from protocol.errors import ProtocolError
from protocol.names import FILES_LOCKSPACE, lease_name_for_path
from tests.lockprobe import probe

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "contrib" / "examples" / "orchestrator.py"


def run(state: Path, phase: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLE), "--state", str(state), phase],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_example_orchestrator_survives_its_restart(tmp_path: Path) -> None:
    state = tmp_path / "orch"
    out = run(state, "start")
    assert "intruder refused: busy" in out
    vms = json.loads((state / "vms.json").read_text())
    try:
        out = run(state, "resume")
        assert "recovered: 4 leases held again, 0 released, 0 lost" in out
        # Started again while they run: no second VM gets their disks, none is left
        # running, and the first ones stay recorded.
        out = run(state, "start")
        assert out.count("not started: busy") == 3
        assert json.loads((state / "vms.json").read_text()) == vms
        out = run(state, "stop")
        assert "leases left: 0" in out
        assert out.count("stopped") == 3
    finally:
        for pid, _started in vms.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_lock_service_api_with_a_socket_for_others(tmp_path: Path) -> None:
    """Embedded, plus a socket: other processes see the same leases."""
    vm = subprocess.Popen(["sleep", "600"])
    sock = tmp_path / "lockd.sock"
    try:
        service = LockService(
            lock_dir=str(tmp_path / "locks"),
            journal_dir=str(tmp_path / "j"),
            socket=str(sock),
            admin_socket=str(tmp_path / "a.sock"),
        )
        with service as locks:
            client = locks.client("orchestrator")
            owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": vm.pid}
            client.call("register", owner=owner)
            lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/x.img")}
            client.call("acquire", leases=[lease], autocreate=True)
            path = tmp_path / "locks" / FILES_LOCKSPACE / lease["resource"]
            assert probe(path, "ofd") == "busy"
            with Client(str(sock)) as other:
                assert other.call("status")["leases"] == 1
                names = {c.get("name") for c in other.call("list-clients")["clients"]}
                assert "orchestrator" in names  # client(name): which connection is whose
            with pytest.raises(RemoteError) as exc:
                client.call("acquire", leases=[lease], autocreate=True)
            assert exc.value.code == "busy"
            vm.kill()
            vm.wait()
            deadline = time.monotonic() + 10
            while client.call("list-leases")["leases"]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert not sock.exists()
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()


def test_closing_a_connection_never_fences_the_embedding_program(tmp_path: Path) -> None:
    """An owner that is the embedding program itself keeps its leases, and is not signalled,
    when its in-process connection closes."""
    script = textwrap.dedent(f"""
        import os, time, uuid
        from lockd.embed import LockService
        from protocol.names import FILES_LOCKSPACE, lease_name_for_path

        lease = {{"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/me.img")}}
        with LockService(lock_dir={str(tmp_path / "locks")!r}, journal_dir={str(tmp_path / "j")!r},
                         fence_grace=0.1) as locks:
            client = locks.client()
            me = {{"uuid": uuid.uuid4().bytes, "name": "me", "id": 1, "pid": os.getpid()}}
            client.call("register", owner=me)
            client.call("acquire", leases=[lease], autocreate=True)
            client.close()
            time.sleep(1.0)
            print(len(locks.client().call("list-leases")["leases"]), "held")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout == "1 held\n"


def test_stop_closes_what_it_opened_and_a_restart_holds_the_leases_again(tmp_path: Path) -> None:
    """After stop() no fd of the lock system is left open, so start() again in the same
    program holds a running VM's lease again, rather than finding it taken and fencing the VM."""
    vm = subprocess.Popen(["sleep", "600"])
    lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/x.img")}
    path = tmp_path / "locks" / FILES_LOCKSPACE / lease["resource"]
    service = LockService(lock_dir=str(tmp_path / "locks"), journal_dir=str(tmp_path / "j"))
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        service.start()
        client = service.client()
        client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                       "pid": vm.pid})  # fmt: skip
        client.call("acquire", leases=[lease], autocreate=True)
        service.stop()
        assert sorted(os.listdir("/proc/self/fd")) == before
        assert probe(path, "ofd") == "free"  # as after the daemon's exit
        report = service.start()
        assert (report.held, report.lost) == (1, 0)
        assert probe(path, "ofd") == "busy"
        service.stop()
        assert vm.poll() is None  # not fenced
    finally:
        service.stop()
        vm.kill()
        vm.wait()


def test_calls_fail_at_once_when_the_connection_or_the_service_ends(tmp_path: Path) -> None:
    """A call waiting as stop() runs, and any call after stop() or close(), raises
    ConnectionLostError at once; a reply not in time raises TimeoutError."""
    vm = subprocess.Popen(["sleep", "600"])
    lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/x.img")}
    service = LockService(lock_dir=str(tmp_path / "locks"), journal_dir=str(tmp_path / "j"))
    try:
        service.start()
        holder, waiter, idle = service.client(), service.client(), service.client()
        holder.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                       "pid": vm.pid})  # fmt: skip
        holder.call("acquire", leases=[lease], autocreate=True)
        holder.close()
        holder.close()
        with pytest.raises(ConnectionLostError):
            holder.call("status")
        me = {"uuid": uuid.uuid4().bytes, "name": "me", "id": 1, "pid": os.getpid()}
        waiter.call("register", owner=me)
        with pytest.raises(RemoteError, match="busy"):  # the wait, then the timeout
            waiter.call("acquire", leases=[lease], wait=0.3, timeout=0.1)
        locks = service._daemon
        assert locks is not None
        locks.dispatcher.submit(lambda: time.sleep(1.0))  # the lock thread busy for a second
        with pytest.raises(TimeoutError):
            waiter.call("status", timeout=0.1)
        failed: list[BaseException] = []

        def wait() -> None:
            try:
                waiter.call("acquire", leases=[lease], wait=30, timeout=20)
            except Exception as exc:  # noqa: BLE001 - checked below
                failed.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.2)
        started = time.monotonic()
        service.stop()
        thread.join(5)
        assert time.monotonic() - started < 5
        assert [type(exc) for exc in failed] == [ConnectionLostError]
        with pytest.raises(ConnectionLostError, match="stopped"):
            idle.call("status")
    finally:
        service.stop()
        vm.kill()
        vm.wait()


def test_an_in_process_connection_is_never_closed_for_idling(tmp_path: Path) -> None:
    """A client kept for queries, never registered, outlives ``idle_timeout``."""
    service = LockService(
        lock_dir=str(tmp_path / "locks"), journal_dir=str(tmp_path / "j"), idle_timeout=0.1
    )
    with service as locks:
        client = locks.client()
        time.sleep(0.5)
        assert client.call("status")["leases"] == 0


def test_events_reach_an_in_process_subscriber(tmp_path: Path) -> None:
    """A subscribed client gets the events from ``next_event``, and a call meanwhile
    still gets its own reply."""
    lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/x.img")}
    with LockService(lock_dir=str(tmp_path / "locks"), journal_dir=str(tmp_path / "j")) as locks:
        feed = locks.client()
        first = feed.call("subscribe")["first"]
        client = locks.client()
        me = {"uuid": uuid.uuid4().bytes, "name": "me", "id": 1, "pid": os.getpid()}
        client.call("register", owner=me)
        client.call("acquire", leases=[lease], autocreate=True)
        client.call("release", leases=[lease])
        assert feed.call("status")["leases"] == 0
        events = [feed.next_event(timeout=5)["event"] for _ in range(3)]
        assert [(e["seq"], e["type"]) for e in events] == [
            (first, "connection-opened"),
            (first + 1, "lease-acquired"),
            (first + 2, "lease-released"),
        ]
        assert (events[0]["pid"], events[0]["uid"], events[0]["gid"]) == (  # in-process
            0, os.getuid(), os.getgid()
        )  # fmt: skip
        assert events[1]["conn"] == events[0]["conn"]
        with pytest.raises(TimeoutError):
            feed.next_event(timeout=0.1)


def test_an_owner_s_connection_far_behind_on_events_keeps_its_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An orchestrator registers a VM and follows events on one connection, and stops
    taking events (a stuck thread). Closing the connection, as a plain subscriber's is,
    would fence the VM: only the subscription ends, ``next_event`` says where to go on
    from, and subscribing again from there misses no event."""
    # 4 MiB in a real daemon; 8 KiB is about 28 of the 40 events below, and a replay
    # of the rest in one step stays under it.
    monkeypatch.setattr(connection, "MAX_PUSH_BACKLOG", 8192)
    disk = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/a.img")}
    other = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/b.img")}
    vm = subprocess.Popen(["sleep", "60"])
    try:
        with LockService(lock_dir=str(tmp_path / "locks"), journal_dir=str(tmp_path / "j"),
                         fence_grace=0.1) as locks:  # fmt: skip
            client = locks.client()
            owner = {"uuid": uuid.uuid4().bytes, "name": "vm1", "id": 1, "pid": vm.pid}
            client.call("register", owner=owner)
            client.call("acquire", leases=[disk], autocreate=True)
            first = client.call("subscribe")["first"]
            busy = locks.client()
            me = {"uuid": uuid.uuid4().bytes, "name": "me", "id": 2, "pid": os.getpid()}
            busy.call("register", owner=me)
            for _ in range(20):
                busy.call("acquire", leases=[other], autocreate=True)
                busy.call("release", leases=[other])
            seqs: list[int] = []
            with pytest.raises(SubscriptionEnded) as ended:  # noqa: PT012 - events, then the end
                while True:
                    seqs.append(client.next_event(timeout=5)["event"]["seq"])
            assert "behind" in ended.value.reason
            assert ended.value.next_seq == first + len(seqs)
            client.call("subscribe", since=ended.value.next_seq)
            while (last := seqs[-1]) < first + 40:  # busy's connection-opened, then 40
                seqs.append(client.next_event(timeout=5)["event"]["seq"])
            assert seqs == list(range(first, last + 1))
            with pytest.raises(TimeoutError):
                client.next_event(timeout=0.1)  # live again: nothing more, and no end
            assert vm.poll() is None
            held = client.call("list-leases")["leases"]
            assert [(lease["resource"], [o["pid"] for o in lease["owners"]]) for lease in held] == [
                (disk["resource"], [vm.pid])
            ]
    finally:
        vm.kill()
        vm.wait()


def test_a_start_refused_for_its_pid_file_says_why_at_once(tmp_path: Path) -> None:
    """A pid file another process locks makes start() raise PidFileLockedError naming
    it, at once (the pid file is taken before anything else, in start() itself, not in
    the lock thread); it leaves nothing open (the journal's lock, its socket), so start()
    again works once the cause is gone."""
    pid_file = tmp_path / "pid"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.lockf(fd, fcntl.LOCK_EX); "
         "print(flush=True); time.sleep(60)", str(pid_file)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
        sock = tmp_path / "s.sock"
        service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"),
                              pid_file=str(pid_file), socket=str(sock))  # fmt: skip
        before = sorted(os.listdir("/proc/self/fd"))
        started = time.monotonic()
        with pytest.raises(PidFileLockedError, match=r"pid file .* is locked by a running daemon"):
            service.start(timeout=10)
        assert time.monotonic() - started < 5
        assert sorted(os.listdir("/proc/self/fd")) == before
        assert not sock.exists()
        holder.kill()
        holder.wait()
        service.start()
        service.stop()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:  # not left to the collector, amid another test's fd count
            holder.stdout.close()


def test_a_lock_thread_that_dies_starting_says_why_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock thread ending before recovery is done (here: its loop fails at once) makes
    start() raise with the cause, rather than wait out its timeout."""

    def fail(self: Any) -> None:
        raise OSError(errno.EIO, "the loop could not start")

    monkeypatch.setattr("lockd.daemon.Daemon.run", fail)
    service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"failed to start: .*the loop could not start"):
        service.start(timeout=10)
    assert time.monotonic() - started < 5


def test_stop_from_many_threads_at_once(tmp_path: Path) -> None:
    """Threads of the program that stop the service together (a signal handler's and the
    main thread's ``with``) all return; one of them stops it."""
    failed: list[BaseException] = []
    for _ in range(20):
        service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"))
        service.start()
        together = threading.Barrier(8)

        def stop(service: LockService = service, together: threading.Barrier = together) -> None:
            together.wait()
            try:
                service.stop()
            except Exception as exc:  # noqa: BLE001 - checked below
                failed.append(exc)

        threads = [threading.Thread(target=stop) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert failed == []


def test_after_a_crash_the_service_starts_again_in_the_same_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An actor's crash ends the lock system: stop() reports it, no fd of it stays open
    (the journal's lock included), and start() again holds the running VM's lease again."""
    vm = subprocess.Popen(["sleep", "600"])
    lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/x.img")}
    service = LockService(lock_dir=str(tmp_path / "locks"), journal_dir=str(tmp_path / "j"))
    before = sorted(os.listdir("/proc/self/fd"))
    try:
        service.start()
        client = service.client()
        client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                       "pid": vm.pid})  # fmt: skip
        client.call("acquire", leases=[lease], autocreate=True)
        receive = RouterActor.on_receive

        def bug(self: RouterActor, message: Any) -> Any:
            if isinstance(message, Gather):
                raise ValueError("a bug")
            return receive(self, message)

        monkeypatch.setattr(RouterActor, "on_receive", bug)
        with pytest.raises(ConnectionLostError):
            client.call("list-lockspaces")
        monkeypatch.undo()
        with pytest.raises(ProtocolError, match="a bug"):
            service.stop()
        assert sorted(os.listdir("/proc/self/fd")) == before
        report = service.start()
        assert (report.held, report.lost) == (1, 0)
    finally:
        service.stop()
        vm.kill()
        vm.wait()


def test_stop_after_the_idle_timeout_ended_the_service(tmp_path: Path) -> None:
    """The service stopped itself (``timeout``): stop() after it only waits, and writes
    to none of its closed fds."""
    service = LockService(
        lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"), timeout=0.2
    )
    service.start()
    _wait_until_it_stops_by_itself(service)
    service.stop()


def _wait_until_it_stops_by_itself(service: LockService) -> None:
    """Until the service's idle ``timeout`` has ended it (a client is refused)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            service.client().close()
        except ConnectionLostError:
            return
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_a_damaged_journal_can_be_repaired_and_started_again_in_the_same_program(
    tmp_path: Path,
) -> None:
    """start() refused for damage leaves nothing open: ``journal-check --repair`` is not
    refused as if the program were a running lockd, and start() again works."""
    journal = tmp_path / "j"
    service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(journal))
    with service as locks:
        client = locks.client()
        for name in ("a", "b", "c"):
            client.call("create-lockspace", lockspace=name)
    (segment,) = journal.glob("journal-*.cbor")
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(JournalCorruptError):
        service.start()
    assert sorted(os.listdir("/proc/self/fd")) == before
    repair = subprocess.run(
        [sys.executable, "-m", "lockd", "journal-check", "--journal-dir", str(journal), "--repair"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert repair.returncode == 0, repair.stdout + repair.stderr
    service.start()
    service.stop()


def test_the_admin_socket_leaves_the_program_s_logging_alone(tmp_path: Path) -> None:
    """``lockd log-level`` on an embedded service's admin socket is refused: it replaced the
    program's own root log handlers with lockd's."""
    root = logging.getLogger()
    mine = logging.NullHandler()
    root.addHandler(mine)
    try:
        handlers = list(root.handlers)
        service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"),
                              socket=str(tmp_path / "s.sock"),
                              admin_socket=str(tmp_path / "a.sock"))  # fmt: skip
        with service, Client(str(tmp_path / "a.sock")) as admin:
            with pytest.raises(RemoteError, match="whose logging is its own") as refused:
                admin.call("set-log", level="debug")
            assert refused.value.code == "permission-denied"  # by design, not a bug
            assert root.handlers == handlers
    finally:
        root.removeHandler(mine)


def test_stop_with_a_socket_closes_what_it_opened(tmp_path: Path) -> None:
    """With ``socket=``: the listeners, their spare fds and their socket files go at stop()."""
    sock = tmp_path / "s.sock"
    service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"),
                          socket=str(sock))  # fmt: skip
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(2):
        service.start()
        with Client(str(sock)) as other:
            assert other.call("status")["leases"] == 0
        service.stop()
        assert sorted(os.listdir("/proc/self/fd")) == before
        assert not sock.exists()


def test_stop_hangs_up_on_socket_clients_still_connected(tmp_path: Path) -> None:
    """A socket client still connected when stop() runs (a VM's plugin, or one whose close
    the lock thread had not read yet) sees its connection end at once, and none of its
    fds in the program outlives stop() (each stayed open until the garbage collector ran,
    and the client's next call waited out its timeout)."""
    sock = tmp_path / "s.sock"
    service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"),
                          socket=str(sock))  # fmt: skip
    before = sorted(os.listdir("/proc/self/fd"))
    service.start()
    with (
        Client(str(sock), timeout=30) as other,
        Client(str(tmp_path / "lockd-admin.sock")) as admin,
    ):
        assert other.call("status")["leases"] == 0
        assert admin.call("list-clients")["clients"]
        service.stop()
        started = time.monotonic()
        with pytest.raises(OSError):  # noqa: PT011 - EOF or EPIPE, whichever the call meets
            other.call("status")
        assert time.monotonic() - started < 5
        with pytest.raises(OSError):  # noqa: PT011
            admin.call("status")
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_start_refused_for_its_admin_socket_leaves_no_fd_open(tmp_path: Path) -> None:
    """Another program serves the admin socket's path: start() raises, leaves the client
    socket's file removed and no fd open (each refused start kept the listeners' four
    spare fds), and starts once the path is free."""
    sock, busy = tmp_path / "s.sock", tmp_path / "busy.sock"
    service = LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"),
                          socket=str(sock), admin_socket=str(busy))  # fmt: skip
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(busy))
        other.listen()
        before = sorted(os.listdir("/proc/self/fd"))
        for _ in range(2):
            with pytest.raises(OSError, match="another daemon is serving"):
                service.start()
            assert sorted(os.listdir("/proc/self/fd")) == before
            assert not sock.exists()
    busy.unlink()
    service.start()
    service.stop()


def test_a_worker_forked_by_the_program_keeps_none_of_its_locks(tmp_path: Path) -> None:
    """The embedding program forks a worker (multiprocessing's "fork") and is SIGKILLed
    while the worker runs on: the kernel drops the program's locks, and the next start
    holds the running VM's lease again, rather than being refused (the worker's copies of
    the journal's lock and of the listening socket) or finding the lease taken (its copy
    of the lease's lock). A socket client connected at the fork sees its connection
    end with the program, as with a killed daemon: the worker's copy of the accepted
    socket kept it open, and the client's calls waited out their timeout."""
    vm = subprocess.Popen(["sleep", "600"])
    lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/x.img")}
    path = tmp_path / "locks" / FILES_LOCKSPACE / lease["resource"]
    dirs: dict[str, Any] = {"lock_dir": str(tmp_path / "locks"), "journal_dir": str(tmp_path / "j"),
            "socket": str(tmp_path / "s.sock"), "fence_grace": 0.1}  # fmt: skip
    script = textwrap.dedent(f"""
        import multiprocessing, sys, time, uuid
        from lockd.embed import LockService

        locks = LockService(**{dirs!r})
        locks.start()
        client = locks.client()
        client.call("register", owner={{"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                        "pid": {vm.pid}}})
        client.call("acquire", leases=[{lease!r}], autocreate=True)
        print("started", flush=True)
        sys.stdin.readline()  # a socket client has connected
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
        worker.start()
        print(worker.pid, flush=True)
        time.sleep(600)
    """)
    program = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    worker = 0
    watcher: Client | None = None
    try:
        assert program.stdout is not None
        assert program.stdin is not None
        assert program.stdout.readline() == "started\n"
        watcher = Client(dirs["socket"], timeout=5)
        program.stdin.write("\n")
        program.stdin.flush()
        worker = int(program.stdout.readline())
        assert probe(path, "ofd") == "busy"
        program.kill()
        program.wait()
        assert probe(path, "ofd") == "free"  # as after a killed daemon: the worker has none
        with pytest.raises(ConnectionLostError):
            watcher.call("status")
        with LockService(**dirs) as locks:
            assert locks.report is not None
            assert (locks.report.held, locks.report.lost) == (1, 0)
            assert probe(path, "ofd") == "busy"
        assert vm.poll() is None  # not fenced
    finally:
        program.kill()
        program.wait()
        if watcher is not None:
            watcher.close()
        for pipe in (program.stdout, program.stdin):
            if pipe is not None:
                pipe.close()
        if worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        vm.kill()
        vm.wait()


def test_a_with_block_whose_start_fails_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``with LockService(...)`` whose start() raises (here: recovery overran its timeout;
    Ctrl-C during it is the same) stops what it started: no ``__exit__`` follows a failed
    ``__enter__``, and the lock thread ran on, the journal locked, until the program's
    exit."""
    from lockd.daemon import Daemon

    gate = threading.Event()
    run, request_stop = Daemon.run, Daemon.request_stop

    def slow_run(self: Daemon) -> None:
        gate.wait(60)  # recovery is not done until someone asks the service to stop
        run(self)

    def stop_asked(self: Daemon, reason: str) -> None:
        gate.set()
        request_stop(self, reason)

    monkeypatch.setattr(Daemon, "run", slow_run)
    monkeypatch.setattr(Daemon, "request_stop", stop_asked)
    dirs = {"lock_dir": str(tmp_path / "l"), "journal_dir": str(tmp_path / "j")}

    class Impatient(LockService):
        def start(self, timeout: float = 0.05) -> RecoveryReport:
            return super().start(timeout)

    service = Impatient(**dirs)
    try:
        with pytest.raises(TimeoutError), service:
            pytest.fail("the block ran")
        assert [t for t in threading.enumerate() if t.name == "lockd"] == []
        monkeypatch.undo()
        with LockService(**dirs) as again:  # the journal is free
            assert again.report is not None
    finally:
        gate.set()
        service.stop()


def test_a_forked_child_is_told_at_once_that_the_service_is_its_parent_s(
    tmp_path: Path,
) -> None:
    """In a child forked by the program, a client's call and ``client()`` fail at once,
    saying why: the lock thread is the parent's (a call waited out its timeout, and
    ``client()`` 60 s, then raised TimeoutError). The parent's service is unaffected."""
    with LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j")) as locks:
        client = locks.client()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, which never returns to pytest
            try:
                said = []
                for attempt in (lambda: client.call("status", timeout=10), locks.client):
                    started = time.monotonic()
                    try:
                        attempt()
                        said.append("no error")
                    except Exception as exc:  # noqa: BLE001 - told to the parent
                        quick = time.monotonic() - started < 5
                        said.append(f"{type(exc).__name__} {quick} {exc}")
                os.write(write, json.dumps(said).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            said = json.loads(pipe.read())
        os.waitpid(pid, 0)
        why = f"runs in process {os.getpid()}, not in this process forked from it"
        assert [s.partition(" runs")[0] for s in said] == [
            "ConnectionLostError True the embedded lock system",
            "RuntimeError True the embedded lock system",
        ]
        assert all(why in s for s in said)
        assert client.call("status")["clients"] == 1


def test_a_crash_point_kills_the_embedding_program_and_the_next_start_recovers(
    tmp_path: Path,
) -> None:
    """As embedding.md tells test authors: ``LOCKD_CRASH_AT`` in an embedding program's
    environment SIGKILLs the whole program at that point, and the next start holds the
    running VM's lease (journaled before the crash) again."""
    vm = subprocess.Popen(["sleep", "600"])
    lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/x.img")}
    dirs = {"lock_dir": str(tmp_path / "locks"), "journal_dir": str(tmp_path / "j")}
    script = textwrap.dedent(f"""
        import uuid
        from lockd.embed import LockService

        with LockService(**{dirs!r}) as locks:
            client = locks.client()
            client.call("register", owner={{"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                            "pid": {vm.pid}}})
            client.call("acquire", leases=[{lease!r}], autocreate=True)
            print("not crashed")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, "LOCKD_CRASH_AT": "acquire-journaled"},
                              timeout=60, check=False)  # fmt: skip
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert done.stdout == ""
        with LockService(**dirs) as locks:
            assert locks.report is not None
            assert (locks.report.held, locks.report.lost) == (1, 0)
    finally:
        vm.kill()
        vm.wait()


def test_a_signal_handler_may_stop_the_service_while_it_starts(tmp_path: Path) -> None:
    """The program's SIGTERM handler calls stop() as start() runs (the service manager
    stops the program during its recovery): start() raises, saying so, and nothing is
    left running (the handler waited for a lock its own thread held: a deadlock)."""
    dirs = {"lock_dir": str(tmp_path / "l"), "journal_dir": str(tmp_path / "j")}
    script = textwrap.dedent(f"""
        import os, signal, threading
        import lockd.daemon
        from lockd.embed import LockService

        locks = LockService(**{dirs!r})
        handled = threading.Event()

        def on_term(signum, frame):
            handled.set()
            locks.stop()

        signal.signal(signal.SIGTERM, on_term)
        run = lockd.daemon.Daemon.run

        def run_once_terminated(self):  # recovery waits for the handler to have run
            os.kill(os.getpid(), signal.SIGTERM)
            handled.wait(30)
            run(self)

        lockd.daemon.Daemon.run = run_once_terminated
        try:
            locks.start()
        except RuntimeError as exc:
            print(exc)
        print(sorted(t.name for t in threading.enumerate()))
        lockd.daemon.Daemon.run = run
        with LockService(**{dirs!r}):  # the journal is free
            print("started again")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "the lock service was stopped while it started",
        "['MainThread']",
        "started again",
    ]


def test_start_after_the_idle_timeout_ended_the_service_starts_it_again(tmp_path: Path) -> None:
    """As embedding.md says, a service that stopped by itself (``timeout``) may be started
    again: ``start()`` did not say "already started" of a service that was not running."""
    service = LockService(
        lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"), timeout=0.2
    )
    service.start()
    try:
        _wait_until_it_stops_by_itself(service)
        report = service.start()  # (it may stop again 0.2 s on: nothing is asked of it)
        assert report.held == 0
    finally:
        service.stop()


def test_a_client_opened_while_start_recovers_waits_for_the_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread of the program (a web handler) opening a client while the main thread's
    start() still recovers is served once recovery is done: served before, it took a
    running VM's disk, and recovery then called the lease lost and fenced the VM."""
    from actors.recovery import RecoveryActor

    vm, other = subprocess.Popen(["sleep", "600"]), subprocess.Popen(["sleep", "600"])
    disk = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/x.img")}
    dirs: dict[str, Any] = {"lock_dir": str(tmp_path / "l"), "journal_dir": str(tmp_path / "j"),
                            "fence_grace": 0.1}  # fmt: skip
    service = LockService(**dirs)
    gate = threading.Event()
    try:
        with LockService(**dirs) as locks, locks.client() as client:
            client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                           "pid": vm.pid})  # fmt: skip
            client.call("acquire", leases=[disk], autocreate=True)

        class GatedRecovery:
            @staticmethod
            def start(d: Any, **kw: Any) -> None:
                def later() -> None:
                    if gate.is_set():
                        RecoveryActor.start(d, **kw)
                    else:
                        d.call_later(0.01, later)

                d.call_later(0, later)

        monkeypatch.setattr("lockd.daemon.RecoveryActor", GatedRecovery)
        starter = threading.Thread(target=service.start)
        starter.start()
        while service._daemon is None:
            time.sleep(0.01)
        answers: list[str] = []

        def intrude() -> None:
            with service.client() as client:
                client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "other",
                                               "id": 2, "pid": other.pid})  # fmt: skip
                try:
                    client.call("acquire", leases=[disk], autocreate=True)
                    answers.append("granted")
                except RemoteError as exc:
                    answers.append(exc.code)

        intruder = threading.Thread(target=intrude)
        intruder.start()
        intruder.join(1.0)  # unfixed, served at once; fixed, it waits for the gate
        gate.set()
        starter.join(30)
        intruder.join(30)
        assert answers == ["busy"]
        assert service.report is not None
        assert (service.report.held, service.report.lost) == (1, 0)
        assert vm.poll() is None
    finally:
        gate.set()
        service.stop()
        for proc in (vm, other):
            proc.kill()
            proc.wait()
