"""`lockd verify`'s checks on made-up reports and a fake lock table, and its kernel probe."""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path
from typing import Any

from lockd.verify import DaemonView, kernel_lock, verify

LS = "org.libvirt.lockd.files"


def lease(resource: str, mode: str, *pids: int) -> dict[str, Any]:
    return {"lockspace": LS, "resource": resource, "mode": mode,
            "owners": [{"pid": pid, "name": f"vm{pid}"} for pid in pids]}  # fmt: skip


def view(tmp_path: Path, socket: str, *leases: dict[str, Any]) -> DaemonView:
    directory = tmp_path / LS
    directory.mkdir(exist_ok=True)
    for row in leases:
        (directory / row["resource"]).touch()
    return DaemonView(socket, {LS: str(directory)}, list(leases), journal_seq=0)


def checks(views: list[DaemonView], table: dict[str, str | None]) -> list[tuple[str, str]]:
    """The findings' (check, resource), with the kernel's locks faked by file name."""
    _, found = verify(views, lambda path: table.get(os.path.basename(path)))
    return [(f.check, f.resource or "") for f in found]


def test_what_holds_has_no_findings(tmp_path: Path) -> None:
    """Exclusive leases write-locked, a shared one read-locked by two daemons: all is well."""
    a = view(tmp_path, "a", lease("r1", "exclusive", 10), lease("r2", "shared", 11, 12))
    b = view(tmp_path, "b", lease("r2", "shared", 20))
    assert checks([a, b], {"r1": "write", "r2": "read"}) == []
    assert verify([a, b], lambda _: "write" if _.endswith("r1") else "read")[0] == 2


def test_each_broken_invariant_is_named(tmp_path: Path) -> None:
    """Reported but free, reported exclusive but read-locked, two exclusive owners, one
    lease exclusive at two daemons, a file locked that nobody reports, a file gone."""
    a = view(
        tmp_path, "a",
        lease("free", "exclusive", 1), lease("weak", "exclusive", 2),
        lease("twice", "exclusive", 3, 4), lease("both", "exclusive", 5),
        lease("gone", "shared", 6),
    )  # fmt: skip
    b = view(tmp_path, "b", lease("both", "shared", 7))
    (tmp_path / LS / "stray").touch()
    table: dict[str, str | None] = {
        "free": None, "weak": "read", "twice": "write", "both": "write", "gone": "missing",
        "stray": "write",
    }  # fmt: skip
    assert sorted(checks([a, b], table)) == [
        ("not-locked", "free"),
        ("not-locked", "gone"),
        ("not-reported", "stray"),
        ("owners", "twice"),
        ("two-daemons", "both"),
        ("wrong-mode", "weak"),
    ]


def test_the_probe_tells_write_read_free_and_missing(tmp_path: Path) -> None:
    """F_OFD_GETLK on a file description of its own sees another description's lock, in
    its mode; no file, or a symlink (never followed), is "missing"."""
    path = tmp_path / "lease"
    path.touch()
    assert kernel_lock(str(path)) is None
    fd = os.open(path, os.O_RDWR)
    try:
        for ltype, seen in ((fcntl.F_RDLCK, "read"), (fcntl.F_WRLCK, "write")):
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", ltype, 0, 0, 1, 0))
            assert kernel_lock(str(path)) == seen
    finally:
        os.close(fd)
    assert kernel_lock(str(tmp_path / "nothing")) == "missing"
    os.symlink(path, tmp_path / "link")
    assert kernel_lock(str(tmp_path / "link")) == "missing"


def test_the_probe_opens_no_fifo_or_device_put_at_a_lease_name(tmp_path: Path) -> None:
    """A FIFO at a lease's name is "missing" without being opened: opening it let a
    writer waiting on it through (and a device node's open runs its driver: a tape
    rewinds). The writer here is still waiting after the probe, until the test opens
    the reading end itself."""
    fifo = tmp_path / "lease"
    os.mkfifo(fifo)
    opened: list[int] = []
    writer = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)))
    writer.start()
    try:
        assert kernel_lock(str(fifo)) == "missing"
        writer.join(0.5)
        assert opened == []  # no reader came
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(10)
        os.close(reader)
        for fd in opened:
            os.close(fd)
