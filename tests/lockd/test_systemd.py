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
from lockd.systemd import MAX_STORED_LEASES, FdStore, lease_fd_name, short_fd_name


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
    """The datagrams that ``(kind, name)`` pairs make."""
    return [f"{kind}=1\nFDNAME={name}" for kind, name in messages]


def listen_fdnames(leases: int) -> str:
    """LISTEN_FDNAMES of a restart handed the sockets and ``leases`` lease fds."""
    names = ["lockd.socket", "lockd-admin.socket"]
    return "LISTEN_FDNAMES=" + ":".join(names + [short_fd_name(i) for i in range(leases)])


def test_the_names_of_a_full_store_fit_in_an_exec(tmp_path: Path) -> None:
    """systemd hands a restart the names of every stored fd in LISTEN_FDNAMES, one
    environment string, which the kernel caps at 128 KiB: with 65,536 lease fds allowed
    (about 2,800 were enough) the restarted lockd could not be exec'd (E2BIG), and the
    failed unit let go of the store and every lock in it."""
    variable = listen_fdnames(MAX_STORED_LEASES)
    assert len(variable) < systemd.ENV_STRING_MAX
    name, _, value = variable.partition("=")
    done = subprocess.run(["/bin/sh", "-c", "exit 0"], env={name: value}, check=False)
    assert done.returncode == 0  # no E2BIG


def test_the_store_keeps_every_lease_of_the_scale_target() -> None:
    """16,384 leases (4,096 VMs, issue #6) all stored: under names of 47 bytes the
    store kept 2,709 at most, and after a crash the rest were free until recovery."""
    assert MAX_STORED_LEASES >= 16_384
    # As many as fit in the lease fds' share of the variable, and no more.
    names = [short_fd_name(i) for i in range(MAX_STORED_LEASES + 1)]
    assert len(":".join(names[:-1])) + 1 <= systemd.NAMES_BUDGET < len(":".join(names)) + 1


def test_lease_fds_are_stored_under_the_shortest_free_names(
    manager: socket.socket, tmp_path: Path
) -> None:
    """Each lease gets a name no other stored fd has, the smallest number free: a
    released lease's name is given again, so names stay short."""
    store = FdStore()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for resource in ("a", "b", "c"):
            store.store("space", resource, fd)
        store.remove("space", "b")
        store.store("space", "d", fd)
        store.store("space", "e", fd)
        assert received(manager) == sent(
            ("FDSTORE", "l0"), ("FDSTORE", "l1"), ("FDSTORE", "l2"), ("FDSTOREREMOVE", "l1"),
            ("FDSTORE", "l1"), ("FDSTORE", "l3"),
        )  # fmt: skip
        assert [short_fd_name(n) for n in (61, 62, 3844)] == ["lZ", "l10", "l100"]
    finally:
        os.close(fd)


def test_names_handed_back_are_given_to_no_other_lease(
    manager: socket.socket, tmp_path: Path
) -> None:
    """The names a restart or a re-exec found in the store stay taken: a second fd under
    one, the lease's FDSTOREREMOVE would drop both."""
    store = FdStore()
    store.kept("space", "adopted", "l1")
    store.held(["l0"])  # a copy of no lease, its FDSTOREREMOVE lost
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        store.store("space", "new", fd)
        store.remove("space", "adopted")
        store.store("space", "newer", fd)
        assert received(manager) == sent(
            ("FDSTORE", "l2"), ("FDSTOREREMOVE", "l1"), ("FDSTORE", "l1")
        )
        assert store.names() == (
            (("space", "new", "l2"), ("space", "newer", "l1")), ("l0",)
        )  # fmt: skip
    finally:
        os.close(fd)


def test_an_earlier_builds_names_count_by_their_bytes(
    manager: socket.socket, tmp_path: Path
) -> None:
    """A store an earlier build filled (46-byte names) leaves room for fewer new names:
    counted as short ones, the restart's LISTEN_FDNAMES went past what an exec takes."""
    store = FdStore()
    size = len(lease_fd_name("space", "old")) + 1  # 47 bytes, the ':' after it
    legacy = systemd.NAMES_BUDGET // size  # 2,766: as many as an earlier build stored
    for i in range(legacy):
        store.kept("space", f"old{i}", lease_fd_name("space", f"old{i}"))
    room = (systemd.NAMES_BUDGET - legacy * size) // 3  # "l0:" and the like
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        stored = []
        for i in range(room + 1):
            store.store("space", f"new{i}", fd)
            stored += received(manager)  # the manager reads its queue
        assert len(stored) == room
    finally:
        os.close(fd)


def test_the_store_keeps_no_more_lease_fds_than_a_restart_can_be_handed(
    manager: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the limit a lease is not stored (said once), and a release makes room."""
    store = FdStore(max_leases=2)
    # Handed back after a crash, in an earlier build's store: in the store already.
    store.kept("space", "adopted", lease_fd_name("space", "adopted"))
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with caplog.at_level(logging.WARNING, logger="lockd.systemd"):
            store.store("space", "a", fd)
            store.store("space", "b", fd)
            store.store("space", "c", fd)
        assert received(manager) == sent(("FDSTORE", "l0"))
        assert caplog.text.count("not: a crash lets their locks go") == 1
        store.remove("space", "adopted")
        store.store("space", "b", fd)
        assert received(manager) == sent(
            ("FDSTOREREMOVE", lease_fd_name("space", "adopted")), ("FDSTORE", "l1")
        )
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
        assert received(manager) == sent(("FDSTOREREMOVE", "l0"), ("FDSTORE", "l0"))
    finally:
        os.close(fd)
