"""The fd store's side of lockd.systemd: what it sends, and how many lease fds it keeps."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockd import systemd
from lockd.systemd import MAX_STORED_LEASES, FdStore, lease_fd_name


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify socket standing in for the service manager's."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram sent so far (their fds closed)."""
    out: list[str] = []
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        except BlockingIOError:
            return out
        for fd in fds:
            os.close(fd)
        out.append(data.decode())


def sent(*messages: tuple[str, str]) -> list[str]:
    """The datagrams that ``(kind, resource)`` pairs of lockspace ``space`` make."""
    return [f"{kind}=1\nFDNAME={lease_fd_name('space', resource)}" for kind, resource in messages]


def test_the_names_of_a_full_store_fit_in_an_exec(tmp_path: Path) -> None:
    """systemd hands a restart the names of every stored fd in LISTEN_FDNAMES, one
    environment string, which the kernel caps at 128 KiB: with 65,536 lease fds allowed
    (about 2,800 were enough) the restarted lockd could not be exec'd (E2BIG), and the
    failed unit let go of the store and every lock in it."""
    names = ["lockd.socket", "lockd-admin.socket"]
    names += [lease_fd_name("org.libvirt.lockd.files", f"r{i}") for i in range(MAX_STORED_LEASES)]
    env = {"LISTEN_FDNAMES": ":".join(names), "LISTEN_FDS": str(len(names))}
    assert len("LISTEN_FDNAMES=" + env["LISTEN_FDNAMES"]) < systemd.ENV_STRING_MAX
    done = subprocess.run(["/bin/sh", "-c", "exit 0"], env=env, check=False)  # no E2BIG
    assert done.returncode == 0


def test_the_store_keeps_no_more_lease_fds_than_a_restart_can_be_handed(
    manager: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the limit a lease is not stored (said once), and a release makes room."""
    store = FdStore(max_leases=2)
    store.kept("space", "adopted")  # handed back after a crash: in the store already
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with caplog.at_level(logging.WARNING, logger="lockd.systemd"):
            store.store("space", "a", fd)
            store.store("space", "b", fd)
            store.store("space", "c", fd)
        assert received(manager) == sent(("FDSTORE", "a"))
        assert caplog.text.count("not: a crash lets their locks go") == 1
        store.remove("space", "adopted")
        store.store("space", "b", fd)
        assert received(manager) == sent(("FDSTOREREMOVE", "adopted"), ("FDSTORE", "b"))
    finally:
        os.close(fd)


def test_a_full_store_warns_once_while_leases_come_and_go_at_its_limit(
    manager: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A host at the limit with VMs starting and stopping: one warning, not one per
    release; once a tenth of the store is free, the next overflow is said again."""
    store = FdStore(max_leases=20)
    fd = os.open(tmp_path, os.O_RDONLY)

    def put(resource: str) -> None:
        store.store("space", resource, fd)
        received(manager)  # the manager reads its queue

    def drop(resource: str) -> None:
        store.remove("space", resource)
        received(manager)

    try:
        with caplog.at_level(logging.WARNING, logger="lockd.systemd"):
            for i in range(21):
                put(f"r{i}")
            for i in range(21, 31):  # one stops, one starts, another finds no room
                drop(f"r{i - 21}")
                put(f"r{i}")
                put(f"late{i}")
            assert caplog.text.count("not: a crash lets their locks go") == 1
            drop("r10")
            drop("r11")
            for resource in ("x", "y", "z"):
                put(resource)
            assert caplog.text.count("not: a crash lets their locks go") == 2
    finally:
        os.close(fd)


def test_the_unit_lets_the_store_hold_every_lease_fd_lockd_stores() -> None:
    """FileDescriptorStoreMax= at least MAX_STORED_LEASES: beyond it systemd drops an fd
    lockd counts as stored, with no error."""
    unit = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "lockd.service"
    (line,) = [
        ln for ln in unit.read_text().splitlines() if ln.startswith("FileDescriptorStoreMax=")
    ]
    assert int(line.partition("=")[2]) >= MAX_STORED_LEASES


def test_a_manager_that_stopped_reading_does_not_stall_the_daemon(
    manager: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PID 1 busy (a long daemon-reload) reads no notifications: once its queue was full
    (net.unix.max_dgram_qlen), the next FDSTORE blocked the daemon's one loop, and every
    acquire and `lockd status` with it, until PID 1 read again. Reproduced with 14
    acquires against a socket nobody read: the 11th and later timed out. Now such a
    send gives up after SEND_TIMEOUT, logged, and the lease is simply not stored."""
    queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    store = FdStore()
    fd = os.open(tmp_path, os.O_RDONLY)
    finished = threading.Event()

    def burst() -> None:
        for i in range(queue + 20):  # 20 past what the queue holds
            store.store("space", f"r{i}", fd)
        finished.set()

    try:
        threading.Thread(target=burst, daemon=True).start()
        assert finished.wait(30), "the fd store blocked"
    finally:
        os.close(fd)
    assert "sd_notify 'FDSTORE=1' failed: timed out" in caplog.text


def fill(path: str) -> None:
    """Fill the manager's queue, as a PID 1 that stopped reading lets it fill."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                s.sendto(b"X=1", path)


def test_a_lease_whose_removal_could_not_be_sent_still_counts_as_stored(
    manager: socket.socket, tmp_path: Path
) -> None:
    """An FDSTOREREMOVE given up (the manager's queue full) leaves the fd in the store,
    and the next restart is handed its name too. It was counted as gone, so leases stored
    later took the store past the limit: past it by about 20 names, a restart's
    LISTEN_FDNAMES fails the exec (E2BIG), the unit fails and the store lets every lock go."""
    store = FdStore(max_leases=2)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        store.store("space", "a", fd)
        store.store("space", "b", fd)
        fill(manager.getsockname())
        store.remove("space", "a")  # gives up: a's fd stays in the store
        received(manager)  # PID 1 reads again
        store.store("space", "c", fd)
        assert received(manager) == []  # a and b are still there: two, the most
        store.remove("space", "a")  # sent this time: it leaves, c fits
        store.store("space", "c", fd)
        assert received(manager) == sent(("FDSTOREREMOVE", "a"), ("FDSTORE", "c"))
    finally:
        os.close(fd)
