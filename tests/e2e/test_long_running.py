"""A daemon that runs for months: VMs and clients that come and go leave nothing behind."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.client import RemoteError
from protocol.names import FILES_LOCKSPACE
from tests.e2e.conftest import DaemonProcess, MakeDaemon, wait_for

pytestmark = pytest.mark.e2e

CYCLES = 200
"""A fixed count (a slow machine takes longer, not fewer): a per-cycle leak of one fd or
one lease file shows as 200."""


def _owner(pid: int, name: str) -> dict[str, Any]:
    return {"uuid": uuid.uuid4().bytes, "name": name, "id": 1, "pid": pid}


def _lease(resource: str, *, shared: bool = False) -> dict[str, Any]:
    return {"lockspace": FILES_LOCKSPACE, "resource": resource, "shared": shared}


def _fd_kinds(pid: int) -> collections.Counter[str]:
    """The daemon's descriptors by what they are open on (numbers left out), so that a
    count that is off says which kind leaked."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            kinds[re.sub(r"[0-9]+", "N", os.readlink(f"/proc/{pid}/fd/{fd}"))] += 1
    return kinds


def _quiet_fd_kinds(pid: int, round_trip: Callable[[], object]) -> collections.Counter[str]:
    """:func:`_fd_kinds` once no snapshot is being written: its child process, and the
    daemon's pipe to it, come and go with each rotation, and a baseline taken during
    one counted a pipe the end did not have. Once the child is gone, two round trips
    through the daemon's loop see the pipe's end read and the pipe closed."""

    def no_children() -> bool:
        tasks = os.listdir(f"/proc/{pid}/task")
        return not "".join(
            Path(f"/proc/{pid}/task/{task}/children").read_text() for task in tasks
        ).strip()

    wait_for(no_children)
    round_trip()
    round_trip()
    return _fd_kinds(pid)


def _journal_files(daemon: DaemonProcess) -> collections.Counter[str]:
    return collections.Counter(
        name.split("-")[0] for name in os.listdir(daemon.journal_dir) if name.endswith(".cbor")
    )


def _a_day(daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], day: int) -> None:
    """What a hypervisor host does all day, once: a VM starts with its own disk and a
    shared base image the way libvirt's lock driver starts it (its connection restricted
    and inherited by the VM) and stops; a monitor asks for the status; every tenth
    time, a client refused as busy, an auditor that catches up and leaves, a client
    that leaves while its acquire waits, and a client that sends junk."""
    driver = daemon.client("lockd-lock-driver")
    vm = subprocess.Popen(["sleep", "600"], pass_fds=[driver.fileno()])
    children.append(vm)
    driver.call("register", owner=_owner(vm.pid, f"vm{day}"))
    driver.call(
        "acquire", leases=[_lease(f"disk-{day}"), _lease("base", shared=True)], autocreate=True
    )
    if day % 10 == 0:
        with pytest.raises(RemoteError, match="busy"):
            driver.call("acquire", leases=[_lease(f"new-{day}"), _lease("held")], autocreate=True)
    driver.call("restrict")
    driver.close()
    with daemon.client("monitor") as monitor:
        monitor.call("status")
    if day % 10 == 0:
        with daemon.client("audit") as auditor:
            auditor.call("subscribe", since=1)
            auditor.next_event()
        waiter = daemon.client("waiter")
        waiter.call("register", owner=_owner(vm.pid, f"vm{day}"))
        waiter.request("acquire", leases=[_lease("held")], wait=60)
        waiter.close()
        with socket.socket(socket.AF_UNIX) as junk:
            junk.connect(str(daemon.socket))
            junk.sendall(b"\x00\x00\x00\x03\xff\xff\xff")
            junk.shutdown(socket.SHUT_WR)
            junk.settimeout(10)
            while junk.recv(4096):
                pass
    vm.kill()
    vm.wait()


def test_vms_and_clients_that_come_and_go_leave_the_daemon_as_it_was(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """200 VM starts and stops, with monitors, auditors, waiters and junk between them,
    over a journal that rotates every few hundred events: afterwards the daemon has the
    descriptors it had before (no lease file, pidfd, socket or snapshot pipe left open),
    serves the clients and leases it did before, the lock directory holds the files it
    held before, and retention kept the journal at its bound (the current segment, two
    old ones, two snapshots)."""
    config = tmp_path / "lockd.toml"
    config.write_text("journal_segment_bytes = 4096\njournal_retain_segments = 2\n")
    daemon = make_daemon("d", None, "--config", str(config))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    holder = subprocess.Popen(["sleep", "600"])
    children.append(holder)
    files = daemon.lock_dir / FILES_LOCKSPACE
    with daemon.client("manager") as manager:
        manager.call("register", owner=_owner(holder.pid, "holder"))
        manager.call("acquire", leases=[_lease("held")], autocreate=True)

        def settled() -> bool:
            status = manager.call("status")
            return bool(status["leases"] == 1 and status["clients"] == 1)

        for day in range(10):  # first uses, before the baseline
            _a_day(daemon, children, day)
        wait_for(settled)
        fds = _quiet_fd_kinds(pid, lambda: manager.call("status"))
        lock_files = sorted(os.listdir(files))
        for day in range(10, 10 + CYCLES):
            _a_day(daemon, children, day)
        wait_for(settled)
        # A snapshot being written keeps a pipe to its child open for a moment.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: _fd_kinds(pid) == fds)
        assert _fd_kinds(pid) == fds
        assert sorted(os.listdir(files)) == lock_files
        journal = _journal_files(daemon)
        assert journal["journal"] <= 3
        assert journal["snapshot"] <= 2
        assert manager.call("status")["journal_seq"] > 20 * 4096 // 300  # it did rotate
