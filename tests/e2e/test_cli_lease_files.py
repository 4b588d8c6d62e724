"""``lockd create-lockspace``, ``create-resource`` and ``delete-resource``: the lease files of
explicit leases (libvirt's ``<lease>``) made and removed from the command line, against a
real daemon, with the locks checked from another process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import DaemonProcess
from tests.lockprobe import probe

pytestmark = pytest.mark.e2e


def _tree(root: Path) -> list[str]:
    """Every path under ``root``, for checking that a refused command changed nothing."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_an_explicit_lease_is_set_up_and_taken_from_the_command_line(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """A user of ``<lease>`` elements makes the lockspace and its lease file with ``lockd``
    (docs/plugin.md had a Python one-liner for it); the file is then taken without
    autocreate, and another process finds it locked."""
    made = daemon.lockd("create-lockspace", "site.leases")
    assert made.returncode == 0, made.stderr
    assert made.stdout == "created lockspace site.leases\n"
    created = daemon.lockd("create-resource", "site.leases/vm1")
    assert created.returncode == 0, created.stderr
    assert created.stdout == ("lease file site.leases/vm1 exists (created unless it was already)\n")
    lease = daemon.lock_dir / "site.leases" / "vm1"
    assert lease.is_file()
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    done = daemon.lockd("acquire", "--owner-pid", str(vm.pid), "--no-autocreate",
                        "--lease", "site.leases/vm1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert probe(lease, "ofd") == "busy"


def test_creating_again_keeps_what_is_there(daemon: DaemonProcess) -> None:
    """Both are idempotent, as the protocol's operations: the second create says the
    lockspace was there, and a lease file there already is kept, with what it holds."""
    assert daemon.lockd("create-lockspace", "site.leases").returncode == 0
    again = daemon.lockd("create-lockspace", "site.leases", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"lockspace": "site.leases", "created": False}
    assert daemon.lockd("create-lockspace", "site.leases").stdout == (
        "lockspace site.leases exists already\n"
    )
    assert daemon.lockd("create-resource", "site.leases/vm1").returncode == 0
    lease = daemon.lock_dir / "site.leases" / "vm1"
    lease.write_text("kept")
    for _ in range(2):
        done = daemon.lockd("create-resource", "site.leases/vm1", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "lockspace": "site.leases", "resource": "vm1", "created": True,
        }  # fmt: skip
    assert lease.read_text() == "kept"


def test_the_same_text_names_the_same_lease_as_acquire_lease(daemon: DaemonProcess) -> None:
    """``LOCKSPACE/RESOURCE`` is read as ``--lease`` reads it: text copied from an acquire,
    mode word and all, makes the file that acquire takes, not one named ``vm1:shared``."""
    assert daemon.lockd("create-lockspace", "site.leases").returncode == 0
    done = daemon.lockd("create-resource", "site.leases/vm1:shared")
    assert done.returncode == 0, done.stderr
    assert "vm1" in os.listdir(daemon.lock_dir / "site.leases")
    assert "vm1:shared" not in os.listdir(daemon.lock_dir / "site.leases")


def test_a_held_lease_file_is_not_deleted(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """``delete-resource`` of a held lease is busy (75), naming the holder, and the file
    stays locked; released, it is deleted; deleted again, it is not found (1)."""
    assert daemon.lockd("create-lockspace", "site.leases").returncode == 0
    assert daemon.lockd("create-resource", "site.leases/vm1").returncode == 0
    lease = daemon.lock_dir / "site.leases" / "vm1"
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    held = daemon.lockd("acquire", "--owner-pid", str(vm.pid), "--name", "vm1",
                        "--no-autocreate", "--lease", "site.leases/vm1")  # fmt: skip
    assert held.returncode == 0, held.stderr
    busy = daemon.lockd("delete-resource", "site.leases/vm1", "--json")
    assert busy.returncode == 75
    error = json.loads(busy.stdout)["error"]
    assert error["code"] == "busy"
    assert [h["name"] for h in error["details"]["holders"]] == ["vm1"]
    assert "lockd delete-resource: busy: " in busy.stderr
    assert probe(lease, "ofd") == "busy"
    released = daemon.lockd("release", "--owner-pid", str(vm.pid), "--all")
    assert released.returncode == 0, released.stderr
    assert lease.exists()  # made by create-resource: a release keeps it
    deleted = daemon.lockd("delete-resource", "site.leases/vm1")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == "deleted lease file site.leases/vm1\n"
    assert not lease.exists()
    gone = daemon.lockd("delete-resource", "site.leases/vm1", "--json")
    assert gone.returncode == 1
    assert json.loads(gone.stdout)["error"]["code"] == "not-found"
    assert "lease site.leases/vm1 does not exist" in gone.stderr


def test_a_lease_file_in_no_lockspace_is_not_found(daemon: DaemonProcess) -> None:
    """``create-resource`` in a lockspace nobody created fails (1) saying how one is made,
    and creates nothing."""
    before = _tree(daemon.lock_dir)
    done = daemon.lockd("create-resource", "site.leases/vm1")
    assert done.returncode == 1
    assert "lockspace site.leases does not exist" in done.stderr
    assert "create-lockspace makes it" in done.stderr
    assert _tree(daemon.lock_dir) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create-lockspace", ".."], "invalid lockspace name '..'"),
        (["create-lockspace", "a/b"], "invalid lockspace name 'a/b'"),
        (["create-resource", "vm1"], "the lease takes LOCKSPACE/RESOURCE, not 'vm1'"),
        (["create-resource", "/vm/a.img"], "the lease takes LOCKSPACE/RESOURCE"),
        (["create-resource", "site.leases/a b"], "invalid resource name 'a b'"),
        (["create-resource", "site.leases/vm1:bogus"], "':bogus' is not a mode"),
        (["delete-resource", "site.leases/org.libvirt.lockd.index"], "reserved"),
    ],
)
def test_a_bad_name_is_a_usage_error_that_changes_nothing(
    daemon: DaemonProcess, argv: list[str], message: str
) -> None:
    """A name no lockspace or lease file can have is a usage error (2), also as JSON, and
    nothing is created or deleted."""
    assert daemon.lockd("create-lockspace", "site.leases").returncode == 0
    assert daemon.lockd("create-resource", "site.leases/vm1").returncode == 0
    before = _tree(daemon.lock_dir)
    done = daemon.lockd(*argv, "--json")
    assert done.returncode == 2
    assert f"lockd {argv[0]}: " in done.stderr
    assert message in done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["exit"] == 2
    assert message in error["message"]
    assert _tree(daemon.lock_dir) == before


def test_a_symbolic_link_at_a_lockspace_or_lease_name_is_named_as_one(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """A symbolic link where a lockspace directory or a lease file should be is refused
    (lockd never follows one) and the error says it is a symbolic link: it said "is not
    a directory" of a link to a directory, and "Too many levels of symbolic links" of a
    link at a lease's name. Nothing is created where the links point."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (daemon.lock_dir / "linked").symlink_to(elsewhere)
    assert daemon.lockd("create-lockspace", "site").returncode == 0
    (daemon.lock_dir / "site" / "vm1").symlink_to(elsewhere / "target")
    space = daemon.lockd("create-resource", "linked/vm1")
    assert space.returncode == 1
    assert f"{daemon.lock_dir / 'linked'} is a symbolic link, which lockd never follows" in (
        space.stderr
    )
    for command in ("create-resource", "delete-resource"):
        lease = daemon.lockd(command, "site/vm1")
        assert lease.returncode == 1
        assert "not a lease file but a symbolic link (lockd never follows one)" in lease.stderr
    assert list(elsewhere.iterdir()) == []
