"""/proc and pidfd adapters, on real processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from actors.model import Owner
from lockd import procs
from tests.threads import other_thread_id


def test_start_time_and_uid_of_a_live_process() -> None:
    started = procs.start_time(os.getpid())
    assert isinstance(started, int)
    assert started > 0
    assert procs.uid_of(os.getpid()) == os.getuid()
    real, _effective, saved = os.getresuid()
    assert procs.uids_of(os.getpid()) == (real, saved)  # what a fence's uid check reads
    assert procs.start_time(2**22 + 11) is None
    assert procs.uid_of(2**22 + 11) is None
    assert procs.uids_of(2**22 + 11) is None


def test_leader_of_a_process_and_of_a_thread() -> None:
    """A process is its own leader; a thread id (which /proc opens too) names its process."""
    assert procs.leader_of(os.getpid()) == os.getpid()
    assert procs.leader_of(2**22 + 11) is None
    with other_thread_id() as tid:
        assert tid != os.getpid()
        assert procs.start_time(tid) is not None  # what registration took for a process
        assert procs.leader_of(tid) == os.getpid()


def test_cpu_seconds_counts_the_cpu_a_process_used() -> None:
    """What `lockd bench` reports as the daemon's CPU per pair: /proc's user+system time."""
    before = procs.cpu_seconds(os.getpid())
    assert before is not None
    spin_until = time.process_time() + 0.3
    while time.process_time() < spin_until:
        pass
    after = procs.cpu_seconds(os.getpid())
    assert after is not None
    assert 0.25 <= after - before <= 0.5  # clock ticks of 10 ms, and the loop's own overshoot
    assert procs.cpu_seconds(2**22 + 11) is None


def test_boot_time_is_in_the_past_and_before_this_process() -> None:
    booted = procs.boot_time()
    assert 0 < booted < time.time()
    ticks = os.sysconf("SC_CLK_TCK")
    started = procs.start_time(os.getpid())
    assert started is not None
    assert booted + started / ticks <= time.time() + 1


def test_boot_id_is_the_kernels_and_stays_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id stamped on owners is the kernel's boot id; unreadable, it is unknown (None)."""
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        expected = uuid.UUID(f.read().strip()).bytes
    assert procs.boot_id() == expected == procs.boot_id()
    monkeypatch.setattr(procs, "BOOT_ID_PATH", str(tmp_path / "missing"))
    assert procs.boot_id() is None
    garbled = tmp_path / "garbled"
    garbled.write_text("not a uuid\n")
    monkeypatch.setattr(procs, "BOOT_ID_PATH", str(garbled))
    assert procs.boot_id() is None


def test_comm_with_spaces_and_parens_does_not_confuse_the_parser(tmp_path: Path) -> None:
    """Field 22 is found after the last ')', whatever the command name holds."""
    odd = tmp_path / "a) 1 2 (b"
    shutil.copy("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            assert ") 1 2 (" in f.read()
        with open(f"/proc/{os.getpid()}/stat") as f:
            ours = int(f.read().rsplit(")", 1)[1].split()[19])
        theirs = procs.start_time(proc.pid)
        assert theirs is not None
        assert theirs >= ours
    finally:
        proc.kill()
        proc.wait()


def test_watch_signal_and_exit() -> None:
    """The pidfd becomes readable at exit; signals never reach a process with another start time."""
    proc = subprocess.Popen(["sleep", "30"])
    table = procs.ProcTable()
    started = procs.start_time(proc.pid)
    assert started is not None
    owner = Owner(uuid.uuid4().bytes, "vm", 1, proc.pid, started)
    impostor = Owner(uuid.uuid4().bytes, "vm", 1, proc.pid, started + 1)
    fd = table.open_watch(owner)
    assert fd is not None
    try:
        assert table.open_watch(impostor) is None
        assert not table.is_gone(owner)
        assert table.is_gone(impostor)
        assert table.signal(impostor, signal.SIGTERM) is False
        assert proc.poll() is None
        assert table.signal(owner, signal.SIGTERM) is True
        proc.wait(5)
        deadline = time.monotonic() + 5
        import select

        assert select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0] == [fd]
        assert table.is_gone(owner)
        assert table.signal(owner, signal.SIGKILL) is False
    finally:
        table.close_watch(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _out_of_descriptors() -> tuple[list[int], tuple[int, int]]:
    """Fill this process's descriptor table (lowering the soft limit first); undo with
    :func:`_restore_descriptors`."""
    import resource

    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, limits[1]))
    filler: list[int] = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    return filler, limits


def _restore_descriptors(filler: list[int], limits: tuple[int, int]) -> None:
    import resource

    for fd in filler:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_out_of_descriptors_a_live_process_is_never_taken_for_gone() -> None:
    """At the fd limit, exactly when owners are polled: "cannot read /proc" is not "exited",
    and open_watch raises (the owner is then polled) instead of reporting it gone."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        started = procs.start_time(proc.pid)
        assert started is not None
        owner = Owner(uuid.uuid4().bytes, "vm", 1, proc.pid, started)
        filler, limits = _out_of_descriptors()
        try:
            gone = procs.is_exiting(proc.pid, started)
            os.close(filler.pop())  # one fd free: pidfd_open gets it, /proc then fails
            try:
                procs.ProcTable().open_watch(owner)
                watch_error = None
            except OSError as exc:
                watch_error = exc
        finally:
            _restore_descriptors(filler, limits)
        assert gone is False
        assert watch_error is not None, "open_watch reported a live owner gone"
    finally:
        proc.kill()
        proc.wait()


_MAIN_THREAD_EXITS = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(30,)).start()
time.sleep(0.2)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_exited_is_alive_while_other_threads_run() -> None:
    """/proc shows the leader as a zombie with PF_EXITING, but the process (a VM's
    other threads) runs on: a polled owner must not be released, as a pidfd would not fire."""
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _MAIN_THREAD_EXITS])
    try:
        started = procs.start_time(proc.pid)
        assert started is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z":
                break
            time.sleep(0.02)
        assert state == b"Z", "the main thread did not exit"
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 2
        assert procs.is_exiting(proc.pid, started) is False
        proc.kill()
        proc.wait()
        assert procs.is_exiting(proc.pid, started) is True
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="playing a uid without the right to signal")
def test_a_signal_refused_again_and_again_is_logged_once() -> None:
    """A fence retries its SIGKILL every 0.2 s; where lockd may not signal the VM (no
    CAP_KILL in the unit's bounding set) each try logged an ERROR line, five a second
    for as long as the VM ran. Once now, and again only after a signal went through."""
    target = subprocess.Popen(["sleep", "60"])
    try:
        started = procs.start_time(target.pid)
        assert started is not None
        owner = Owner(uuid.uuid4().bytes, "vm", 1, target.pid, started)
        said, told = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - child: uid 65534 may not signal root's sleep
            try:
                os.setuid(65534)
                lines: list[str] = []
                handler = logging.Handler()
                handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
                logging.getLogger("lockd.procs").addHandler(handler)
                table = procs.ProcTable()
                refused = [table.signal(owner, 0) for _ in range(5)]
                os.write(told, json.dumps([refused, lines]).encode())
            finally:
                os._exit(0)
        os.close(told)
        with os.fdopen(said, "rb") as reader:
            refused, lines = json.loads(reader.read())
        os.waitpid(child, 0)
    finally:
        target.kill()
        target.wait()
    assert refused == [False] * 5
    assert len(lines) == 1
    assert lines[0].startswith("cannot signal vm (")
    assert "Operation not permitted (lockd lacks CAP_KILL?)" in lines[0]


def test_wait_listening_returns_once_the_daemon_accepts_not_when_its_file_appears(
    tmp_path: Path,
) -> None:
    """The socket file exists from ``bind``, before ``listen``: `lockd bench` connected in
    between, on a loaded machine, and failed "Connection refused"."""
    sock = tmp_path / "s"
    late = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.bind(sys.argv[1])\n"
        "time.sleep(1.0)\n"
        "s.listen()\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", late, str(sock)])
    try:
        procs.wait_listening(str(sock), child, timeout=10)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock))  # refused, were it the file's appearance only
    finally:
        procs.stop_child(child, signal.SIGKILL)
