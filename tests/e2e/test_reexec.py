"""SIGUSR1: the daemon re-executes itself without ever letting go of a lock or a client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from protocol.names import FILES_LOCKSPACE
from tests.e2e.conftest import DaemonProcess, start_dropping_owner, wait_for
from tests.e2e.invariants import check, listed
from tests.e2e.test_daemon import events, lease_file, start_run

pytestmark = pytest.mark.e2e

_WATCH = r"""
import fcntl, os, struct, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_RDWR)
free = tries = 0
end = time.monotonic() + seconds
print("watching", flush=True)
while time.monotonic() < end:
    tries += 1
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
    except OSError:
        continue
    free += 1
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 1, 0))
print(tries, free, flush=True)
"""


def test_sigusr1_keeps_every_lock_and_connection(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCH, str(lease_file(daemon, "/vm/a.img")), "4"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    children.append(watcher)  # type: ignore[arg-type]
    assert watcher.stdout is not None
    assert watcher.stdout.readline().strip() == "watching"

    # A client under load across the re-exec: every call must succeed.
    errors: list[BaseException] = []
    calls = [0]
    stop = threading.Event()
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)

    def load() -> None:
        try:
            with daemon.client("load") as client:
                owner = {"uuid": uuid.uuid4().bytes, "name": "load", "id": 1, "pid": sleeper.pid}
                client.call("register", owner=owner)
                lease = {"lockspace": FILES_LOCKSPACE, "resource": "load"}
                while not stop.is_set():
                    client.call("acquire", leases=[lease], autocreate=True)
                    client.call("release", leases=[lease])
                    calls[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    idle = daemon.client("idle")  # an idle connection opened before the re-exec
    try:
        wait_for(lambda: calls[0] > 20)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: len(events(daemon, "--type", "daemon-started")) == 2)
        before = calls[0]
        wait_for(lambda: calls[0] > before + 20)
    finally:
        stop.set()
        loader.join(30)
    assert errors == []
    assert idle.call("status")["pid"] == daemon.proc.pid  # same process, same connection
    idle.close()
    tries, free = map(int, watcher.communicate(timeout=30)[0].split())
    assert tries > 100
    assert free == 0, f"the lock was seen free {free} times during the re-exec"
    stopped = events(daemon, "--type", "daemon-stopped")
    assert stopped[-1]["reason"] == "re-exec (SIGUSR1)"
    check(daemon)
    # The VM's inherited connection was handed over too: closing it fences as before.
    clients = daemon.lockd("clients", "--json").stdout
    assert f'"pid": {vm.pid}' in clients
    vm.kill()
    vm.wait()
    wait_for(lambda: not listed(daemon))
    assert events(daemon, "--type", "lease-released")[-1]["reason"] == "owner-exit"
    os.kill(sleeper.pid, signal.SIGKILL)
    time.sleep(0.1)


def test_sigusr1_during_a_fence_is_put_off_and_the_fence_completes(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """The SIGKILL of a fence is a timer in this process: a re-exec must not drop it."""
    owner = start_dropping_owner(daemon, children, ignore_sigterm=True)
    wait_for(lambda: bool(events(daemon, "--type", "owner-fenced")))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "re-exec abandoned" in daemon.log.read_text())
    assert owner.wait(10) == -signal.SIGKILL
    assert [e["signal"] for e in events(daemon, "--type", "owner-fenced")] == ["SIGTERM", "SIGKILL"]
    assert daemon.lockd("status").returncode == 0
    assert len(events(daemon, "--type", "daemon-started")) == 1  # no re-exec happened
