"""The hypervisor plugin's decisions, against an in-memory daemon and fake device tools."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import io
import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockd.plugin import (
    MAX_LEASES,
    CommandDeviceKeys,
    CommandOutput,
    Connection,
    DeviceKeys,
    Lease,
    LockError,
    LockManager,
    Owner,
    PluginOptions,
    disk_lease,
    format_state,
    parse_state,
    socket_connector,
)
from protocol.client import ConnectionLostError, RemoteError
from protocol.names import FILES_LOCKSPACE, LVM_LOCKSPACE, SCSI_LOCKSPACE, lease_name_for_path

VM_UUID = uuid.UUID("00010203-0405-0607-0809-0a0b0c0d0e0f").bytes


# -- fakes ------------------------------------------------------------------------------------
@attrs.define
class Holding:
    shared: bool
    autocreate: bool
    owners: dict[int, int]
    """Each owner's pid, and how many times it holds the lease (a shared one asked for
    again is held again, as the daemon counts)."""


@attrs.define
class FakeDaemon:
    """The daemon's lease rules in memory: register, acquire all-or-nothing, release, inquire."""

    held: dict[tuple[str, str], Holding] = attrs.field(factory=dict)
    files: set[tuple[str, str]] = attrs.field(factory=set)
    requests: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    opened: int = 0
    reachable: bool = True
    counts_holds: bool = True
    """``shared_holds = "each"``'s rule; False: ``once``'s (a shared lease asked for
    again by its owner is held once still)."""
    takes_once: bool = False
    """Takes request keys (``once``), as lockd does since 2026-11-28."""
    applied: dict[tuple[int, bytes], int] = attrs.field(factory=dict)
    """Releases applied with a key: (pid, key) -> how many leases they released."""

    def connect(self) -> FakeConnection:
        if not self.reachable:
            raise FileNotFoundError(2, "No such file or directory")
        self.opened += 1
        return FakeConnection(self)

    def ops(self) -> list[str]:
        return [op for op, _ in self.requests]

    def leases_of(self, pid: int) -> dict[tuple[str, str], str]:
        return {
            ref: "shared" if h.shared else "exclusive"
            for ref, h in self.held.items()
            if pid in h.owners
        }

    def serve(self, conn: FakeConnection, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((op, args))
        if conn.restricted:
            raise RemoteError("restricted", "restricted", {})
        if op == "register":
            conn.pid = args["owner"]["pid"]
            return {}
        if op in ("restrict", "create-lockspace"):
            conn.restricted = op == "restrict"
            return {}
        pid = conn.pid
        assert pid is not None, f"{op} before register"
        if op == "inquire":
            leases: list[dict[str, Any]] = [
                {"lockspace": ls, "resource": res, "mode": mode}
                for (ls, res), mode in sorted(self.leases_of(pid).items())
            ]
            for lease in leases:
                holds = self.held[lease["lockspace"], lease["resource"]].owners[pid]
                if holds > 1:
                    lease["holds"] = holds
            return {"leases": leases}
        if op == "acquire":
            return self._acquire(pid, args["leases"], args["autocreate"])
        if op == "release":  # all or nothing, as the daemon's
            once = args.get("once")
            if once is not None:
                assert self.takes_once, "a key sent to a lockd that takes none"
                if (pid, once) in self.applied:
                    return {"released": self.applied[pid, once], "repeated": True}
            for ref in args["leases"]:
                key = (ref["lockspace"], ref["resource"])
                holding = self.held.get(key)
                if holding is None or pid not in holding.owners:
                    raise RemoteError("not-held", f"lease {key[0]}/{key[1]} is not held", {})
            for ref in args["leases"]:
                key = (ref["lockspace"], ref["resource"])
                holding = self.held[key]
                holding.owners[pid] -= 1
                if not holding.owners[pid]:
                    del holding.owners[pid]
                if not holding.owners:
                    del self.held[key]
            if once is not None:
                self.applied[pid, once] = len(args["leases"])
            return {"released": len(args["leases"])}
        raise AssertionError(f"unexpected op {op}")

    def _acquire(self, pid: int, leases: list[dict[str, Any]], autocreate: bool) -> dict[str, Any]:
        refs = [(lease["lockspace"], lease["resource"]) for lease in leases]
        if len(set(refs)) < len(refs):
            raise RemoteError("invalid-argument", "a lease is requested twice", {})
        for lease in leases:
            key = (lease["lockspace"], lease["resource"])
            holding = self.held.get(key)
            if holding is not None and not (holding.shared and lease["shared"]):
                raise RemoteError(
                    "busy", f"lease {key[0]}/{key[1]} is held by pid {min(holding.owners)}", {}
                )
            if holding is None and not autocreate and key not in self.files:
                raise RemoteError("not-found", f"no lease file {key[0]}/{key[1]}", {})
        for lease in leases:
            key = (lease["lockspace"], lease["resource"])
            owners = self.held.setdefault(key, Holding(lease["shared"], autocreate, {})).owners
            owners[pid] = owners.get(pid, 0) + 1 if self.counts_holds else 1
        return {"leases": leases}


class FakeConnection:
    """One connection to the fake daemon, with a real socket so its fd can be duplicated."""

    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon
        self.pid: int | None = None
        self.restricted = False
        self.closed = False
        self.timeouts: list[float | None] = []
        self.sock, self.peer = socket.socketpair()
        self.sock.settimeout(30)
        self.server: dict[str, Any] = {"version": 1}
        if daemon.takes_once:
            self.server["once"] = True

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert not self.closed, "call on a closed connection"
        return self.daemon.serve(self, op, args)

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.timeouts.append(timeout)
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.peer.close()


@attrs.define
class FakeKeys:
    """Device keys from tables; records which tool was asked about which path."""

    lvm: dict[str, str] = attrs.field(factory=dict)
    scsi: dict[str, str] = attrs.field(factory=dict)
    asked: list[tuple[str, str]] = attrs.field(factory=list)

    def lvm_key(self, path: str) -> str | None:
        self.asked.append(("lvm", path))
        return self.lvm.get(path)

    def scsi_key(self, path: str) -> str | None:
        self.asked.append(("scsi", path))
        return self.scsi.get(path)


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


def manager(
    daemon: FakeDaemon,
    pid: int = 4242,
    *,
    options: PluginOptions | None = None,
    keys: FakeKeys | None = None,
) -> LockManager:
    def connect() -> Connection:
        return daemon.connect()

    owner = Owner(VM_UUID, "vm1", 7, pid)
    return LockManager(owner, connect=connect, options=options, keys=keys or FakeKeys())


def file_lease(path: str, shared: bool = False) -> Lease:
    return Lease(FILES_LOCKSPACE, lease_name_for_path(path), shared)


# -- owners and options -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uuid_bytes", "name", "owner_id", "pid"),
    [
        (b"short", "vm", 1, 1),
        (VM_UUID, "", 1, 1),
        (VM_UUID, "a\0b", 1, 1),
        (VM_UUID, "vm\n1", 1, 1),  # control characters, as the daemon refuses them
        (VM_UUID, "vm\x7f", 1, 1),
        (VM_UUID, "\u00e9" * 128, 1, 1),  # 256 bytes of UTF-8
        (VM_UUID, "x" * 256, 1, 1),
        (VM_UUID, "vm", 0, 1),
        (VM_UUID, "vm", 1, 0),
        (VM_UUID, "vm", True, 1),
    ],
)
def test_invalid_owner_is_refused(uuid_bytes: bytes, name: str, owner_id: int, pid: int) -> None:
    """An owner libvirt's ``new`` would refuse (id 0, no name, bad uuid) cannot be built."""
    with pytest.raises(LockError) as caught:
        Owner(uuid_bytes, name, owner_id, pid)
    assert caught.value.code == "invalid-argument"


@pytest.mark.parametrize(
    ("auto", "require", "expected"),
    [(True, None, False), (False, None, True), (True, True, True), (False, False, False)],
)
def test_require_lease_defaults_to_not_auto_disk_leases(
    auto: bool, require: bool | None, expected: bool
) -> None:
    """Unset require_lease_for_disks resolves to ``not auto_disk_leases``, as in virtlockd."""
    options = PluginOptions(auto_disk_leases=auto, require_lease_for_disks=require)
    assert options.requires_disk_lease is expected


def test_options_from_a_config_mapping() -> None:
    """Lockspace keys take true (well-known name), false (off) or a name; the rest is refused."""
    options = PluginOptions.from_mapping(
        {"auto_disk_leases": False, "lvm_lockspace": True, "scsi_lockspace": "site.scsi"}
    )
    assert options == PluginOptions(
        auto_disk_leases=False, lvm_lockspace=LVM_LOCKSPACE, scsi_lockspace="site.scsi"
    )
    assert PluginOptions.from_mapping({"file_lockspace": False}).file_lockspace is None
    # virtlockd's qemu-lockd.conf spells its booleans 0 and 1.
    assert PluginOptions.from_mapping(
        {"auto_disk_leases": 0, "require_lease_for_disks": 1}
    ) == PluginOptions(auto_disk_leases=False, require_lease_for_disks=True)
    for bad in (
        {"auto_disk_leases": "yes"},
        {"auto_disk_leases": 2},
        {"lvm_lockspace": 3},
        {"file_lockspace": "../etc"},
        {"file_lockspace_dir": "/var/lib/libvirt/lockd/files"},
    ):
        with pytest.raises(LockError) as caught:
            PluginOptions.from_mapping(bad)
        assert caught.value.code == "invalid-argument"


def test_a_virtlockd_lockspace_dir_option_says_what_lockd_takes_instead() -> None:
    """An operator carrying qemu-lockd.conf over got "unknown option 'file_lockspace_dir'"
    with no word on lockd's key for it (a lockspace name) or where the directory goes."""
    with pytest.raises(LockError) as caught:
        PluginOptions.from_mapping({"file_lockspace_dir": "/var/lib/libvirt/lockd/files"})
    assert caught.value.code == "invalid-argument"
    assert caught.value.message == (
        "option file_lockspace_dir is virtlockd's, a directory: lockd's is file_lockspace, "
        f"a lockspace name (true: {FILES_LOCKSPACE}); lockd.toml's [lockspaces] maps a name "
        f'to a directory ("{FILES_LOCKSPACE}" = "/var/lib/libvirt/lockd/files"; one inside '
        f"lock_dir may only be lock_dir/{FILES_LOCKSPACE}, so keep lock_dir apart from it: "
        'docs/operations.md, "Beside a real virtlockd")'
    )
    with pytest.raises(LockError) as caught:
        PluginOptions.from_mapping({"lvm_lockspace_dir": 1})
    assert caught.value.message.startswith(
        "option lvm_lockspace_dir is virtlockd's, a directory: lockd's is lvm_lockspace"
    )


# -- which disk gets which lease --------------------------------------------------------------
def test_readonly_disk_gets_no_lease_and_needs_none(daemon: FakeDaemon) -> None:
    """A read-only disk adds nothing, even with require_lease_for_disks on."""
    mgr = manager(daemon, options=PluginOptions(require_lease_for_disks=True))
    assert mgr.add_disk("/vm/cd.iso", readonly=True) is None
    assert mgr.acquire().leases == ()
    assert daemon.held == {}


def test_writable_and_shareable_disks_get_exclusive_and_shared_file_leases(
    daemon: FakeDaemon,
) -> None:
    """Leases are named by the SHA-256 of the normalised path; shareable means shared."""
    mgr = manager(daemon)
    assert mgr.add_disk("/vm//x/../a.img") == file_lease("/vm/a.img")
    assert mgr.add_disk("/vm/base.img", shareable=True) == file_lease("/vm/base.img", True)
    mgr.acquire()
    assert daemon.leases_of(4242) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): "exclusive",
        (FILES_LOCKSPACE, lease_name_for_path("/vm/base.img")): "shared",
    }
    assert all(h.autocreate for h in daemon.held.values())


def test_relative_disk_path_is_refused(daemon: FakeDaemon) -> None:
    """Two hosts can only agree on a lease name for an absolute path."""
    with pytest.raises(LockError) as caught:
        manager(daemon).add_disk("vm/a.img")
    assert caught.value.code == "invalid-argument"


def test_same_disk_twice_is_one_lease_but_two_modes_are_refused(daemon: FakeDaemon) -> None:
    """A disk listed twice is leased once; listed as both shareable and exclusive, refused."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    mgr.add_disk("/vm/a.img")
    assert mgr.leases == (file_lease("/vm/a.img"),)
    with pytest.raises(LockError, match="already added"):
        mgr.add_disk("/vm/a.img", shareable=True)


def test_without_auto_disk_leases_a_writable_disk_needs_some_lease(daemon: FakeDaemon) -> None:
    """require_lease_for_disks (on by default then) refuses unleased RW disks before connecting."""
    mgr = manager(daemon, options=PluginOptions(auto_disk_leases=False))
    assert mgr.add_disk("/vm/a.img") is None
    with pytest.raises(LockError) as caught:
        mgr.acquire(register_only=True)
    assert caught.value.code == "lease-required"
    assert "/vm/a.img" in caught.value.message
    assert daemon.opened == 0


def test_an_explicit_lease_covers_the_vm_as_in_libvirt(daemon: FakeDaemon) -> None:
    """With any lease at all, RW disks without their own lease are accepted (libvirt's rule)."""
    daemon.files.add(("site.leases", "vm1"))
    mgr = manager(daemon, options=PluginOptions(auto_disk_leases=False))
    mgr.add_disk("/vm/a.img")
    mgr.add_lease("site.leases", "vm1")
    assert mgr.acquire().leases == (Lease("site.leases", "vm1"),)
    assert daemon.held[("site.leases", "vm1")].autocreate is False


def test_shareable_disks_alone_need_no_lease(daemon: FakeDaemon) -> None:
    """Only read/write exclusive disks trigger require_lease_for_disks."""
    mgr = manager(daemon, options=PluginOptions(auto_disk_leases=False))
    mgr.add_disk("/vm/base.img", shareable=True)
    assert mgr.acquire().leases == ()


def test_require_off_lets_unleased_disks_through(daemon: FakeDaemon) -> None:
    """require_lease_for_disks=false: the VM starts without any lease."""
    options = PluginOptions(auto_disk_leases=False, require_lease_for_disks=False)
    mgr = manager(daemon, options=options)
    mgr.add_disk("/vm/a.img")
    assert mgr.acquire().leases == ()


def test_no_lockspace_for_a_writable_disk_is_an_error() -> None:
    """With file_lockspace off, a non-device disk cannot be leased: refused, not left bare."""
    options = PluginOptions(file_lockspace=None, lvm_lockspace=LVM_LOCKSPACE)
    with pytest.raises(LockError) as caught:
        disk_lease("/vm/a.img", readonly=False, shareable=False, options=options, keys=FakeKeys())
    assert caught.value.code == "no-lockspace"


LVM_UUID = "06UgP5-2rhb-w3Bo-3mdR-WeoL-pytO-SAa2ky"
ALL_SPACES = PluginOptions(lvm_lockspace=LVM_LOCKSPACE, scsi_lockspace=SCSI_LOCKSPACE)


def lease_of(path: str, keys: DeviceKeys, options: PluginOptions = ALL_SPACES) -> Lease | None:
    return disk_lease(path, readonly=False, shareable=False, options=options, keys=keys)


def test_lvm_volume_is_keyed_by_its_uuid() -> None:
    """A /dev path with an LV UUID gets an LVM lease; SCSI is not even asked."""
    keys = FakeKeys(lvm={"/dev/vg/lv": LVM_UUID}, scsi={"/dev/vg/lv": "3600"})
    assert lease_of("/dev/vg/lv", keys) == Lease(LVM_LOCKSPACE, LVM_UUID)
    assert keys.asked == [("lvm", "/dev/vg/lv")]


def test_device_without_lvm_uuid_falls_through_to_scsi_then_file(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No LV UUID: SCSI id; no SCSI id either: the file lease, each step logged."""
    keys = FakeKeys(scsi={"/dev/sdb": "3600508b400105e21"})
    assert lease_of("/dev/sdb", keys) == Lease(SCSI_LOCKSPACE, "3600508b400105e21")
    keys = FakeKeys()
    with caplog.at_level(logging.INFO, logger="lockd.plugin"):
        assert lease_of("/dev/sdc", keys) == file_lease("/dev/sdc")
    assert keys.asked == [("lvm", "/dev/sdc"), ("scsi", "/dev/sdc")]
    assert "no LVM UUID" in caplog.text
    assert "no SCSI id" in caplog.text


def test_device_keys_only_for_dev_paths_and_enabled_lockspaces() -> None:
    """Files are never looked up; a disabled lockspace's tool is never run."""
    keys = FakeKeys(lvm={"/dev/vg/lv": LVM_UUID})
    assert lease_of("/vm/a.img", keys) == file_lease("/vm/a.img")
    assert lease_of("/dev/vg/lv", keys, PluginOptions()) == file_lease("/dev/vg/lv")
    assert keys.asked == []


def test_readonly_device_runs_no_tool() -> None:
    """Read-only returns before any lookup, as virtlockd ignores READONLY first."""
    keys = FakeKeys(lvm={"/dev/vg/lv": LVM_UUID})
    lease = disk_lease("/dev/vg/lv", readonly=True, shareable=False, options=ALL_SPACES, keys=keys)
    assert lease is None
    assert keys.asked == []


def test_a_key_that_cannot_name_a_lease_is_an_error() -> None:
    """Output that is no valid resource name stops the add instead of guessing."""
    with pytest.raises(LockError) as caught:
        lease_of("/dev/vg/lv", FakeKeys(lvm={"/dev/vg/lv": "two words"}))
    assert caught.value.code == "key-lookup-failed"


@attrs.define
class FakeRunner:
    """Stands in for subprocess: canned output per program, or the OSError of a missing one."""

    outputs: dict[str, CommandOutput] = attrs.field(factory=dict)
    calls: list[list[str]] = attrs.field(factory=list)

    def __call__(self, argv: Sequence[str]) -> CommandOutput:
        self.calls.append(list(argv))
        if argv[0] not in self.outputs:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        return self.outputs[argv[0]]


def test_lvs_and_scsi_id_are_run_and_parsed_as_virtlockd_does() -> None:
    """Same argv as libvirt; lvs output left-trimmed, both cut at the first newline."""
    runner = FakeRunner(
        {
            "lvs": CommandOutput(0, f"  {LVM_UUID}\n  ignored\n"),
            "/lib/udev/scsi_id": CommandOutput(0, "3600508b400105e21\nignored\n"),
        }
    )
    keys = CommandDeviceKeys(run=runner)
    assert keys.lvm_key("/dev/vg/lv") == LVM_UUID
    assert keys.scsi_key("/dev/sdb") == "3600508b400105e21"
    assert runner.calls == [
        ["lvs", "--noheadings", "--unbuffered", "--nosuffix", "--options", "uuid", "/dev/vg/lv"],
        ["/lib/udev/scsi_id", "--replace-whitespace", "--whitelisted", "--device", "/dev/sdb"],
    ]


@pytest.mark.parametrize(
    "output", [CommandOutput(0, ""), CommandOutput(0, "\n"), CommandOutput(5, "x\n")]
)
def test_empty_output_or_failure_status_means_no_key(output: CommandOutput) -> None:
    """Nothing printed, or a non-zero exit ("not an LV"): no key, so the plugin falls through."""
    keys = CommandDeviceKeys(run=FakeRunner({"lvs": output, "/lib/udev/scsi_id": output}))
    assert keys.lvm_key("/dev/sdb") is None
    assert keys.scsi_key("/dev/sdb") is None


@pytest.mark.parametrize("tool", ["lvs", "/lib/udev/scsi_id"])
def test_a_missing_tool_fails_the_disk_like_virtlockd(
    tool: str, caplog: pytest.LogCaptureFixture
) -> None:
    """virtlockd fails the add when lvs/scsi_id cannot run: no silent fall-through to files."""
    present = {"lvs": CommandOutput(0, ""), "/lib/udev/scsi_id": CommandOutput(0, "")}
    del present[tool]
    keys = CommandDeviceKeys(run=FakeRunner(present))
    with caplog.at_level(logging.ERROR, logger="lockd.plugin"), pytest.raises(LockError) as caught:
        lease_of("/dev/sdb", keys)
    assert caught.value.code == "key-lookup-failed"
    assert f"cannot run {tool}" in caught.value.message
    assert f"cannot run {tool}" in caplog.text


# -- acquire, release, inquire ----------------------------------------------------------------
def test_acquire_registers_takes_restricts_and_keeps_a_blocking_inheritable_fd(
    daemon: FakeDaemon,
) -> None:
    """The order is register, acquire (autocreate), restrict; the fd is a dup the VM can inherit."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    got = mgr.acquire(restrict=True, keep_fd=True)
    assert got.fd is not None
    try:
        assert daemon.ops() == ["register", "inquire", "acquire", "restrict"]
        assert daemon.requests[0][1]["owner"] == {
            "uuid": VM_UUID, "name": "vm1", "id": 7, "pid": 4242,
        }  # fmt: skip
        assert daemon.requests[2][1]["autocreate"] is True
        assert os.get_inheritable(got.fd)
        assert os.get_blocking(got.fd)
        assert got.leases == (file_lease("/vm/a.img"),)
    finally:
        os.close(got.fd)
    mgr.inquire()
    assert daemon.opened == 2, "a restricted connection is closed and a new one opened"


def test_register_only_takes_nothing(daemon: FakeDaemon) -> None:
    """A VM starting paused is registered; its disks are leased on resume."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    assert mgr.acquire(register_only=True).leases == ()
    assert daemon.ops() == ["register"]
    assert daemon.held == {}


def test_acquire_is_all_or_nothing_across_explicit_and_disk_leases(daemon: FakeDaemon) -> None:
    """A busy disk fails the whole acquire; the explicit lease already taken is given back."""
    daemon.files.add(("site.leases", "vm1"))
    other = manager(daemon, pid=9999)
    other.add_disk("/vm/b.img")
    other.acquire()
    mgr = manager(daemon)
    mgr.add_lease("site.leases", "vm1")
    mgr.add_disk("/vm/a.img")
    mgr.add_disk("/vm/b.img")
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "busy"
    assert caught.value.message.startswith("disk /vm/b.img is busy: ")
    assert daemon.leases_of(4242) == {}
    assert ("site.leases", "vm1") not in daemon.held


def test_explicit_lease_file_must_exist(daemon: FakeDaemon) -> None:
    """Outside the disk lockspaces nothing is autocreated: a missing file is not-found."""
    mgr = manager(daemon)
    mgr.add_lease("site.leases", "nope")
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "not-found"
    assert daemon.requests[-1][1]["autocreate"] is False


def test_retried_acquire_asks_only_for_missing_leases(daemon: FakeDaemon) -> None:
    """Leases already held in the same mode are not requested again (the daemon would say busy)."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    mgr.acquire()
    mgr.add_disk("/vm/hotplug.img")
    mgr.acquire()
    acquires = [args for op, args in daemon.requests if op == "acquire"]
    assert [len(a["leases"]) for a in acquires] == [1, 1]
    assert acquires[1]["leases"][0]["resource"] == lease_name_for_path("/vm/hotplug.img")


def holds_of(daemon: FakeDaemon, path: str, pid: int = 4242) -> int:
    holding = daemon.held.get(file_lease(path, shared=True).ref)
    return 0 if holding is None else holding.owners.get(pid, 0)


def test_a_shareable_image_given_twice_is_held_until_both_are_detached(
    daemon: FakeDaemon,
) -> None:
    """One image on two devices of a VM (share-rw): the VM holds its lease twice, as under
    virtlockd, asked for in two requests (one names a lease once). Detaching one device
    (a manager of its own, as libvirt makes per hot-unplug) ends one hold: the VM still
    writes through the other, and another host must not get the image exclusive."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.add_disk("/vm/a.img")
    mgr.add_disk("/vm/base.img", shareable=True)
    assert mgr.leases == (
        file_lease("/vm/base.img", shared=True),
        file_lease("/vm/base.img", shared=True),
        file_lease("/vm/a.img"),
    )
    mgr.acquire()
    acquires = [args["leases"] for op, args in daemon.requests if op == "acquire"]
    assert [len(leases) for leases in acquires] == [2, 1]
    assert holds_of(daemon, "/vm/base.img") == 2
    mgr.acquire()  # retried: this manager holds all it was given
    assert holds_of(daemon, "/vm/base.img") == 2

    detach = manager(daemon)
    detach.add_disk("/vm/base.img", shareable=True)
    assert detach.release() == (file_lease("/vm/base.img", shared=True),)
    assert holds_of(daemon, "/vm/base.img") == 1
    hotplug = manager(daemon)
    hotplug.add_disk("/vm/base.img", shareable=True)
    hotplug.acquire()
    assert holds_of(daemon, "/vm/base.img") == 2
    assert len(manager(daemon).release(all_held=True)) == 3
    assert daemon.held == {}


def test_the_state_of_a_vm_holding_a_shared_lease_twice_lists_it_twice(
    daemon: FakeDaemon,
) -> None:
    """Migration and pause/resume keep the count: the target holds the image twice too.
    Only a shared lease may be listed twice."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.acquire()
    state = mgr.inquire()
    lease = file_lease("/vm/base.img", shared=True)
    assert parse_state(state).leases == (lease, lease)
    assert len(mgr.release()) == 2
    target = manager(daemon, pid=200)
    target.acquire(state)
    assert holds_of(daemon, "/vm/base.img", pid=200) == 2
    assert target.inquire() == state
    exclusive_twice = state.replace("shared=", "exclusive=")
    with pytest.raises(LockError, match="appears twice"):
        parse_state(exclusive_twice)


@pytest.mark.parametrize("served", [True, False])
def test_an_acquire_cut_off_gives_back_only_the_hold_it_added(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, served: bool
) -> None:
    """A hot-plug of an image the VM holds shared already, cut off by a lockd crash: the
    restarted daemon may count the new hold; it is given back, the VM's first one kept."""
    first = manager(daemon)
    first.add_disk("/vm/base.img", shareable=True)
    first.acquire()
    hotplug = manager(daemon)
    hotplug.add_disk("/vm/base.img", shareable=True)
    crash_at(monkeypatch, 1, served=served)
    with pytest.raises(LockError) as caught:
        hotplug.acquire()
    assert caught.value.code == "unavailable"
    assert holds_of(daemon, "/vm/base.img") == 1


def test_an_acquire_again_takes_what_ended_since_the_managers_last_acquire(
    daemon: FakeDaemon,
) -> None:
    """A manager reused after the VM's leases ended some other way (another manager's
    ``release(all_held=True)``, ``lockd release --all``, a lease lost): its next acquire
    answered success from its memory of what it took, asking lockd for nothing, and the
    VM ran on disks it did not hold, free for another host to take. What it took counts
    only as far as the VM still holds it."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.acquire()
    assert len(manager(daemon).release(all_held=True)) == 3
    mgr.acquire()
    assert daemon.leases_of(4242) == {
        file_lease("/vm/a.img").ref: "exclusive",
        file_lease("/vm/base.img", shared=True).ref: "shared",
    }
    assert holds_of(daemon, "/vm/base.img") == 2
    detach = manager(daemon)
    detach.add_disk("/vm/base.img", shareable=True)
    detach.release()
    mgr.acquire()  # the hold that detach ended is taken again, the other kept
    assert holds_of(daemon, "/vm/base.img") == 2


def release_crash(patch: pytest.MonkeyPatch, *, back: bool, served: bool = True) -> None:
    """The daemon crashes at the first release, having journaled it (``served``: the
    restart holds one hold fewer) or not, and is ``back`` at once (socket activation) or
    not at all."""
    serve = FakeDaemon.serve

    def crashing(self: FakeDaemon, conn: FakeConnection, op: str, args: dict[str, Any]) -> Any:
        if op == "release":
            patch.setattr(FakeDaemon, "serve", serve)  # only the first one
            if served:
                serve(self, conn, op, args)
            self.reachable = back
            raise ConnectionLostError("the daemon closed the connection")
        return serve(self, conn, op, args)

    patch.setattr(FakeDaemon, "serve", crashing)


@pytest.mark.parametrize("takes_once", [False, True])
@pytest.mark.parametrize("served", [True, False])
def test_a_detach_cut_off_by_a_daemon_crash_ends_one_hold_only(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, served: bool, takes_once: bool
) -> None:
    """The VM has one image on two devices; lockd crashes during the release of one
    detach, before its reply (having journaled it, or not). The release failed
    ``unavailable`` and, retried (as the docs say a release may be), ended the other
    device's hold too: another host could take the image the VM still writes through.
    The manager now asks the restarted lockd what is left, and releases only what the
    release had not ended (a lockd that takes keys: repeats it with the same key)."""
    daemon.takes_once = takes_once
    mgr = manager(daemon)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.acquire()
    detach = manager(daemon)
    detach.add_disk("/vm/base.img", shareable=True)
    release_crash(monkeypatch, back=True, served=served)
    assert detach.release() == (file_lease("/vm/base.img", shared=True),)
    assert holds_of(daemon, "/vm/base.img") == 1
    assert detach.release() == (file_lease("/vm/base.img", shared=True),)
    assert holds_of(daemon, "/vm/base.img") == 0


def test_a_detach_cut_off_by_a_crash_repeats_its_keys_whatever_else_changed(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lockd crashes after journaling one device's detach; before the manager asks again,
    another device of the image is attached (a hold more). Judged from the holds before
    and after, the detach looked not done, and was done again: one hold too few, the
    image free while the VM still used it. With lockd's keys the manager repeats the
    request itself, which lockd answers without ending another hold."""
    daemon.takes_once = True
    mgr = manager(daemon)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.acquire()
    detach = manager(daemon)
    detach.add_disk("/vm/base.img", shareable=True)
    serve = FakeDaemon.serve
    image = file_lease("/vm/base.img", shared=True)

    def crash_then_attach(
        self: FakeDaemon, conn: FakeConnection, op: str, args: dict[str, Any]
    ) -> Any:
        if op == "release":
            monkeypatch.setattr(FakeDaemon, "serve", serve)
            serve(self, conn, op, args)
            self.held[image.ref].owners[4242] += 1  # the attach, right after the restart
            raise ConnectionLostError("the daemon closed the connection")
        return serve(self, conn, op, args)

    monkeypatch.setattr(FakeDaemon, "serve", crash_then_attach)
    assert detach.release() == (image,)
    assert holds_of(daemon, "/vm/base.img") == 2
    assert [args.get("once") for op, args in daemon.requests if op == "release"] == [
        daemon.requests[-1][1]["once"]
    ] * 2


def test_a_detach_cut_off_as_the_vm_exited_is_done(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lockd crashes mid-release and the VM's process exits meanwhile: the register on the
    new connection is refused (no such process), and the restarted lockd ends every lease
    of the VM (owner-exit), so the release's goal is met: it succeeds."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.acquire()
    detach = manager(daemon)
    detach.add_disk("/vm/base.img", shareable=True)
    serve = FakeDaemon.serve

    def vm_gone(self: FakeDaemon, conn: FakeConnection, op: str, args: dict[str, Any]) -> Any:
        if op == "release":  # journaled, then lockd dies before its reply
            serve(self, conn, op, args)
            raise ConnectionLostError("the daemon closed the connection")
        if op == "register" and self.opened > 2:
            self.held.clear()  # owner-exit, at the restarted daemon's recovery
            raise RemoteError("not-found", "register: no process with pid 4242", {})
        return serve(self, conn, op, args)

    monkeypatch.setattr(FakeDaemon, "serve", vm_gone)
    assert detach.release() == (file_lease("/vm/base.img", shared=True),)
    assert daemon.held == {}


@pytest.mark.parametrize("takes_once", [False, True])
def test_a_detach_cut_off_with_lockd_gone_says_not_to_release_blindly(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, takes_once: bool
) -> None:
    """lockd does not come back at once: the release fails ``unavailable`` and says that it
    may have ended the hold, so that the caller looks before releasing again."""
    daemon.takes_once = takes_once
    mgr = manager(daemon)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.acquire()
    detach = manager(daemon)
    detach.add_disk("/vm/base.img", shareable=True)
    release_crash(monkeypatch, back=False)
    with pytest.raises(LockError) as caught:
        detach.release()
    assert caught.value.code == "unavailable"
    assert caught.value.message.endswith(
        "; it may have released some of disk /vm/base.img already (lockd could not be "
        "asked again: cannot reach lockd: No such file or directory): see what the VM "
        "holds (inquire, lockd leases) before releasing again, which would end another "
        "hold of a shared lease held more than once"
    )
    assert holds_of(daemon, "/vm/base.img") == 1


def test_a_hot_plug_cut_off_with_lockd_gone_does_not_say_to_release_a_hold_held_before(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hot-plug of an image the VM holds shared already (its other device), cut off by a
    crash, lockd not back: the error said "acquire again, or release them", and if the
    crash came before the new hold was journaled, that release ended the other device's
    hold, unlocking an image the VM writes through. It names what may be released, and
    says not to release the image held before."""
    first = manager(daemon)
    first.add_disk("/vm/base.img", shareable=True)
    first.acquire()
    hotplug = manager(daemon)
    hotplug.add_disk("/vm/base.img", shareable=True)
    hotplug.add_disk("/vm/new.img")
    crash_at(monkeypatch, 1, served=False, back=False)
    with pytest.raises(LockError) as caught:
        hotplug.acquire()
    assert caught.value.code == "unavailable"
    assert caught.value.message.endswith(
        "; it may hold some of disk /vm/base.img, disk /vm/new.img (lockd could not be "
        "asked again: cannot reach lockd: No such file or directory): acquire again, or "
        "release disk /vm/new.img; not disk /vm/base.img, which the VM held before this "
        "acquire: a release could end that hold"
    )
    assert holds_of(daemon, "/vm/base.img") == 1


def test_custom_disk_lockspace_is_created_before_use(daemon: FakeDaemon) -> None:
    """As virtlockd's init creates configured lockspaces, a non-default one is created first."""
    mgr = manager(daemon, options=PluginOptions(file_lockspace="site.files"))
    mgr.add_disk("/vm/a.img")
    mgr.acquire()
    assert daemon.ops() == ["register", "inquire", "create-lockspace", "acquire"]
    assert daemon.requests[2][1] == {"lockspace": "site.files"}


def test_too_many_leases_are_refused_before_asking(daemon: FakeDaemon) -> None:
    """One all-or-nothing request holds at most 256 leases."""
    mgr = manager(daemon)
    for i in range(MAX_LEASES + 1):
        mgr.add_disk(f"/vm/{i}.img")
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "invalid-argument"
    assert "acquire" not in daemon.ops()


def test_release_gives_back_what_is_held_and_skips_the_rest(daemon: FakeDaemon) -> None:
    """Release of a disk not held is not an error; all_held ends every lease of the owner."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    mgr.acquire()
    mgr.add_disk("/vm/never-acquired.img")
    assert mgr.release() == (file_lease("/vm/a.img"),)
    assert daemon.leases_of(4242) == {}
    hot = manager(daemon)
    hot.add_disk("/vm/b.img")
    hot.add_disk("/vm/c.img")
    hot.acquire()
    assert len(manager(daemon).release(all_held=True)) == 2
    assert daemon.held == {}


def test_a_release_racing_another_release_of_the_vm_releases_the_rest() -> None:
    """The VM exits, or another connection of it releases a disk, between the release's
    inquire and its release: the daemon refuses the release (`not-held`, all or
    nothing), and the plugin failed (exit 1) though the disk is not held, as asked,
    and left the other disk held. It now releases the rest and succeeds."""
    gone = (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img"))

    class Racing(FakeDaemon):
        def serve(self, conn: FakeConnection, op: str, args: dict[str, Any]) -> dict[str, Any]:
            if op == "release" and gone in self.held:
                del self.held[gone]  # released on the VM's other connection
            return super().serve(conn, op, args)

    daemon = Racing()
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    mgr.add_disk("/vm/b.img")
    mgr.acquire()
    assert mgr.release() == (file_lease("/vm/b.img"),)
    assert daemon.leases_of(4242) == {}


def test_inquire_then_acquire_on_a_target_takes_exactly_those_leases(daemon: FakeDaemon) -> None:
    """Migration: the state lists modes; the target gets the same leases, autocreate as before."""
    daemon.files.add(("site.leases", "vm1"))
    source = manager(daemon, pid=100)
    source.add_disk("/vm/a.img")
    source.add_disk("/vm/base.img", shareable=True)
    source.add_lease("site.leases", "vm1")
    source.acquire()
    state = source.inquire()
    before = daemon.leases_of(100)
    assert len(before) == 3
    assert len(source.release()) == 3
    target = manager(daemon, pid=200)
    assert target.acquire(state).leases == parse_state(state).leases
    assert daemon.leases_of(200) == before
    assert daemon.held[("site.leases", "vm1")].autocreate is False
    assert daemon.held[file_lease("/vm/a.img").ref].autocreate is True
    assert target.inquire() == state


def test_state_of_another_vm_is_refused_before_asking(daemon: FakeDaemon) -> None:
    """A state string carries the VM uuid; another VM's state cannot be applied."""
    other = format_state(uuid.uuid4().bytes, [file_lease("/vm/a.img")])
    with pytest.raises(LockError) as caught:
        manager(daemon).acquire(other)
    assert caught.value.code == "bad-state"
    assert daemon.opened == 0


def test_empty_state_means_no_state(daemon: FakeDaemon) -> None:
    """An empty string (a source that had nothing to say, like virtlockd) uses the added disks."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    assert mgr.acquire("").leases == (file_lease("/vm/a.img"),)


def test_state_string_format_is_stable() -> None:
    """The documented grammar, canonical order whatever order the leases come in."""
    leases = [Lease("b.space", "r2", True), Lease("a.space", "r:1")]
    assert format_state(VM_UUID, leases) == (
        "lockd-state:1;owner=00010203-0405-0607-0809-0a0b0c0d0e0f"
        ";exclusive=a.space/r:1;shared=b.space/r2"
    )
    assert format_state(VM_UUID, []) == "lockd-state:1;owner=00010203-0405-0607-0809-0a0b0c0d0e0f"


OWNER = "owner=00010203-0405-0607-0809-0a0b0c0d0e0f"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "lockd-state",
        f"lockd:1;{OWNER}",
        f"lockd-state:2;{OWNER}",
        f"lockd-state:01;{OWNER}",
        "lockd-state:1",
        "lockd-state:1;owner=nope",
        "lockd-state:1;owner=00010203-0405-0607-0809-0A0B0C0D0E0F",
        "lockd-state:1;owner={00010203-0405-0607-0809-0a0b0c0d0e0f}",
        f"lockd-state:1;{OWNER};",
        f"lockd-state:1;{OWNER};exclusive=a/",
        f"lockd-state:1;{OWNER};excl=a/b",
        f"lockd-state:1;{OWNER};exclusive=a",
        f"lockd-state:1;{OWNER};shared=../b",
        f"lockd-state:1;{OWNER};shared=a/b/c",
        f"lockd-state:1;{OWNER};shared=a/org.libvirt.lockd.index",
        f"lockd-state:1;{OWNER};shared=a/b;exclusive=a/b",
        f"lockd-state:1;{OWNER};shared=a/b c",
        f"lockd-state:1;{OWNER} ;shared=a/b",
        f"lockd-state:1;shared=a/b;{OWNER}",
        f"lockd-state:1;{OWNER};" + ";".join(f"shared=a/r{i}" for i in range(MAX_LEASES + 1)),
    ],
)
def test_bad_state_strings_are_refused(text: str) -> None:
    """Anything outside the grammar, unknown versions, bad names and duplicates: bad-state."""
    with pytest.raises(LockError) as caught:
        parse_state(text)
    assert caught.value.code == "bad-state"


_names = st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
_resources = st.from_regex(r"[A-Za-z0-9._:@+=-]{1,20}", fullmatch=True).filter(
    lambda s: s not in (".", "..", "org.libvirt.lockd.index")
)


@given(
    st.dictionaries(st.tuples(_names, _resources), st.booleans(), max_size=20),
    st.binary(min_size=16, max_size=16),
)
def test_state_round_trip(leases: dict[tuple[str, str], bool], owner: bytes) -> None:
    """format then parse gives back the same uuid and leases, in canonical order."""
    values = [Lease(ls, res, shared) for (ls, res), shared in leases.items()]
    parsed = parse_state(format_state(owner, values))
    assert parsed.owner_uuid == owner
    assert parsed.leases == tuple(sorted(values))


# -- reaching the daemon ----------------------------------------------------------------------
def test_unreachable_daemon_is_unavailable(daemon: FakeDaemon) -> None:
    """No socket: code unavailable, which the CLI maps to exit 69."""
    daemon.reachable = False
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "unavailable"


def test_broken_connection_is_dropped_and_the_next_call_reconnects(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection lost mid-request fails that call only; the manager opens a fresh one."""
    mgr = manager(daemon)
    mgr.inquire()

    def broken(self: FakeConnection, op: str, **args: Any) -> dict[str, Any]:
        raise ConnectionLostError("the daemon closed the connection")

    with monkeypatch.context() as patch:
        patch.setattr(FakeConnection, "call", broken)
        with pytest.raises(LockError) as caught:
            mgr.inquire()
    assert caught.value.code == "unavailable"
    assert mgr.inquire().startswith("lockd-state:1;")
    assert daemon.opened == 2
    assert daemon.ops().count("register") == 2


def crash_at(patch: pytest.MonkeyPatch, n: int, *, served: bool, back: bool = True) -> None:
    """The daemon crashes at its ``n``-th acquire (from 1), having journaled it (``served``:
    the restart holds it again) or not, and is ``back`` at once (socket activation) or
    not at all: that connection breaks; a new one finds what the journal says."""
    serve = FakeDaemon.serve
    acquires = 0

    def crashing(self: FakeDaemon, conn: FakeConnection, op: str, args: dict[str, Any]) -> Any:
        nonlocal acquires
        if op == "acquire":
            acquires += 1
            if acquires == n:
                if served:
                    serve(self, conn, op, args)
                self.reachable = back
                raise ConnectionLostError("the daemon closed the connection")
        return serve(self, conn, op, args)

    patch.setattr(FakeDaemon, "serve", crashing)


@pytest.mark.parametrize("served", [True, False])
def test_an_acquire_cut_off_by_a_daemon_crash_leaves_nothing_held(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, served: bool
) -> None:
    """lockd crashes mid-acquire, after journaling it or before: the acquire fails
    ``unavailable``, and what it took is given back on a new connection. The VM held
    what the restarted daemon recovered (the disk, or the explicit lease taken by the
    first of the two requests) while the VM manager was told the acquire failed."""
    daemon.files.add(("site.leases", "vm1"))
    daemon.held[file_lease("/vm/kept.img").ref] = Holding(False, True, {4242: 1})
    mgr = manager(daemon)
    mgr.add_lease("site.leases", "vm1")
    mgr.add_disk("/vm/a.img")
    mgr.add_disk("/vm/kept.img")
    crash_at(monkeypatch, 2, served=served)
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "unavailable"
    assert caught.value.message.endswith(
        "; nothing of this acquire is held (given back on a new connection)"
    )
    assert daemon.leases_of(4242) == {file_lease("/vm/kept.img").ref: "exclusive"}
    assert daemon.opened == 2


def test_an_acquire_cut_off_with_lockd_gone_says_what_it_may_hold(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lockd does not come back: the error says which leases may be held, and what to do."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    crash_at(monkeypatch, 1, served=True, back=False)
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "unavailable"
    assert "; it may hold some of disk /vm/a.img (lockd could not be asked " in (
        caught.value.message
    )
    assert caught.value.message.endswith("acquire again, or release them")


def test_an_acquire_cut_off_as_the_vm_exited_says_lockd_releases_it(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lockd crashes mid-acquire and the VM's process exits meanwhile: the register on the
    new connection is refused (no such process), and the error said the VM "may hold"
    the disk, sending the caller after a lease the restarted lockd ends as owner-exit
    (helper-73's find). It says so."""
    mgr = manager(daemon)
    mgr.add_disk("/vm/a.img")
    crash_at(monkeypatch, 1, served=True)
    crashing = FakeDaemon.serve

    def vm_gone(self: FakeDaemon, conn: FakeConnection, op: str, args: dict[str, Any]) -> Any:
        if op == "register" and self.opened > 1:
            self.held.clear()  # owner-exit, at the restarted daemon's recovery
            raise RemoteError("not-found", "register: no process with pid 4242", {})
        return crashing(self, conn, op, args)

    monkeypatch.setattr(FakeDaemon, "serve", vm_gone)
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "unavailable"
    assert caught.value.message.endswith(
        "; the VM's process has exited, so lockd releases whatever of this acquire it "
        "held (register: no process with pid 4242)"
    )
    assert "may hold" not in caught.value.message


def test_a_refused_acquire_whose_rollback_fails_says_what_the_vm_still_holds(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The explicit lease is taken, the disk is busy, and the release of the explicit
    lease is refused (lockd's journal full): the VM holds the lease. The acquire said
    ``busy`` and nothing more, as if the VM held nothing; it now fails with the
    release's error, naming the lease left held."""
    daemon.files.add(("site.leases", "vm1"))
    daemon.held[file_lease("/vm/a.img").ref] = Holding(False, True, {99: 1})
    serve = FakeDaemon.serve

    def full_journal(self: FakeDaemon, conn: FakeConnection, op: str, args: Any) -> Any:
        if op == "release":
            raise RemoteError("io-error", "journal write failed: disk full", {})
        return serve(self, conn, op, args)

    monkeypatch.setattr(FakeDaemon, "serve", full_journal)
    mgr = manager(daemon)
    mgr.add_lease("site.leases", "vm1")
    mgr.add_disk("/vm/a.img")
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "io-error"
    assert caught.value.message.startswith("disk /vm/a.img is busy: ")
    assert caught.value.message.endswith(
        "; and releasing what the acquire took failed, so the VM still holds lease "
        "site.leases/vm1: journal write failed: disk full"
    )
    assert daemon.leases_of(4242) == {("site.leases", "vm1"): "exclusive"}


@pytest.mark.parametrize("counts_holds", [False, True], ids=["once", "each"])
def test_a_refused_acquire_leaves_a_shared_lease_the_vm_held_before_held(
    daemon: FakeDaemon, counts_holds: bool
) -> None:
    """The VM holds a shared explicit lease (its first device's); a second manager's
    acquire of it and of a busy disk is refused, and its rollback gave back the shared
    lease as taken. Under shared_holds = "once" that second acquire added no hold, so the
    release ended the VM's own: the lease free while the first device still used it.
    Now only the holds the acquire added are given back."""
    daemon.counts_holds = counts_holds
    daemon.files.add(("site.leases", "base"))
    daemon.held[file_lease("/vm/a.img").ref] = Holding(False, True, {99: 1})
    first = manager(daemon)
    first.add_lease("site.leases", "base", shared=True)
    first.acquire()
    second = manager(daemon)
    second.add_lease("site.leases", "base", shared=True)
    second.add_disk("/vm/a.img")
    with pytest.raises(LockError) as caught:
        second.acquire()
    assert caught.value.code == "busy"
    assert daemon.leases_of(4242) == {("site.leases", "base"): "shared"}
    assert daemon.held["site.leases", "base"].owners == {4242: 1}


def test_a_refused_acquire_gives_back_the_rest_of_what_it_took_when_part_ended_meanwhile(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The explicit leases are taken, the disk is busy, and one of the two explicit leases
    ended meanwhile (the VM's other connection released it, or the VM exited): the
    rollback's release was refused ``not-held`` as a whole, so the other stayed held,
    and the acquire failed ``not-held`` saying the VM still held both. As lockd's own
    rollback does, the rest is given back, and the acquire fails ``busy``, nothing held."""
    daemon.files.update({("site.leases", "vm1"), ("site.leases", "vm2")})
    daemon.held[file_lease("/vm/a.img").ref] = Holding(False, True, {99: 1})
    serve = FakeDaemon.serve

    def released_meanwhile(self: FakeDaemon, conn: FakeConnection, op: str, args: Any) -> Any:
        if op == "acquire" and args["autocreate"]:  # the disk: vm1 ends before the refusal
            del self.held[("site.leases", "vm1")]
        return serve(self, conn, op, args)

    monkeypatch.setattr(FakeDaemon, "serve", released_meanwhile)
    mgr = manager(daemon)
    mgr.add_lease("site.leases", "vm1")
    mgr.add_lease("site.leases", "vm2")
    mgr.add_disk("/vm/a.img")
    with pytest.raises(LockError) as caught:
        mgr.acquire()
    assert caught.value.code == "busy"
    assert caught.value.message.startswith("disk /vm/a.img is busy: ")
    assert daemon.leases_of(4242) == {}


def test_register_refusal_keeps_the_daemon_code(daemon: FakeDaemon) -> None:
    """A daemon error passes through with its code (here: no such process)."""

    def refuse(self: FakeDaemon, conn: FakeConnection, op: str, args: dict[str, Any]) -> Any:
        raise RemoteError("not-found", "register: no process with pid 4242", {})

    mgr = manager(daemon)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeDaemon, "serve", refuse)
        with pytest.raises(LockError) as caught:
            mgr.inquire()
    assert caught.value.code == "not-found"
    assert "pid 4242" in caught.value.message


def test_an_unreachable_daemon_is_named_by_its_socket(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hypervisor's config may point elsewhere than the daemon listens: the error
    names the socket it tried."""
    monkeypatch.setenv("LOCKD_AUTOSPAWN", "0")
    path = str(tmp_path / "nowhere.sock")
    manager = LockManager(Owner(VM_UUID, "vm1", 7, os.getpid()), connect=socket_connector(path))
    manager.add_disk("/vm/a.img")
    with pytest.raises(LockError) as caught:
        manager.acquire()
    assert caught.value.code == "unavailable"
    assert path in str(caught.value)
    assert "lockd serve" in str(caught.value)
    # As the CLI says it: "cannot reach lockd: No such file or directory: PATH (...)".
    assert caught.value.message.startswith(f"cannot reach lockd: No such file or directory: {path}")


def test_a_daemon_that_never_answers_is_a_timeout_with_the_socket_named(tmp_path: Any) -> None:
    """A listener that accepts nothing (a stuck daemon): the handshake times out. The
    error names the socket and says so, without a bogus ``[Errno None]``."""
    path = str(tmp_path / "stuck.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(path)
        stuck.listen(1)
        connect = socket_connector(path, timeout=0.2)
        manager = LockManager(Owner(VM_UUID, "vm1", 7, os.getpid()), connect=connect)
        manager.add_disk("/vm/a.img")
        with pytest.raises(LockError) as caught:
            manager.acquire()
    assert caught.value.code == "unavailable"
    assert path in caught.value.message
    assert "no answer" in caught.value.message
    assert "Errno" not in caught.value.message


# -- contrib/plugin/lockd-lock-driver: its flags ----------------------------------------------
LOCK_DRIVER = Path(__file__).resolve().parents[2] / "contrib" / "plugin" / "lockd-lock-driver"


@pytest.fixture(scope="module")
def driver() -> ModuleType:
    """The lock-driver script, imported (it has no ``.py``): its flags are parsed without a
    daemon or a process of its own."""
    loader = importlib.machinery.SourceFileLoader("lockd_lock_driver", str(LOCK_DRIVER))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def driver_request(driver: ModuleType, *flags: str) -> dict[str, Any]:
    owner = ["--uuid", str(uuid.UUID(bytes=VM_UUID)), "--name", "vm1", "--pid", "4242"]
    args: argparse.Namespace = driver._parser().parse_args(["acquire", *owner, *flags])
    request: dict[str, Any] = driver._request_from_flags(args)
    return request


@pytest.mark.parametrize(
    ("suffix", "readonly", "shareable"),
    [
        ("", False, False),
        (":exclusive", False, False),
        (":shared", False, True),
        (":shareable", False, True),
        (":readonly", True, False),
    ],
)
def test_lock_driver_takes_the_disk_modes_of_lockd_run_and_libvirt(
    driver: ModuleType, suffix: str, readonly: bool, shareable: bool
) -> None:
    """``--disk /vm/base.img:shared`` is the base image shared, not a disk of that name."""
    request = driver_request(driver, "--disk", f"/vm/base.img{suffix}")
    assert request["disks"] == [
        {"path": "/vm/base.img", "readonly": readonly, "shareable": shareable}
    ]


@pytest.mark.parametrize(
    ("flag", "spec", "modes"),
    [
        ("--disk", "/vm/base.img:bogus", ":exclusive, :shared, :shareable, :readonly;"),
        ("--disk", "/vm/base.img:Shareable", ":exclusive, :shared, :shareable, :readonly;"),
        ("--disk", "/vm/base.img:read-only", ":exclusive, :shared, :shareable, :readonly;"),
        ("--lease", "site/vm1:shareable", ":exclusive, :shared;"),
        ("--lease", "site/vm1:bogus", ":exclusive, :shared;"),
    ],
)
def test_lock_driver_refuses_a_word_that_is_no_mode(
    driver: ModuleType, flag: str, spec: str, modes: str
) -> None:
    """A bad request (exit 2, ``invalid-argument``), naming the modes and the way out."""
    with pytest.raises(driver.RequestError) as caught:
        driver_request(driver, flag, spec)
    assert f"the modes are {modes}" in str(caught.value)
    assert repr(f"{spec}:exclusive") in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "path", "shareable"),
    [
        ("/data/vm:1/disk.img", "/data/vm:1/disk.img", False),
        ("/x/a:1.img", "/x/a:1.img", False),
        ("/vm/a:bogus:shareable", "/vm/a:bogus", True),
        ("/vm/a:shared:exclusive", "/vm/a:shared", False),
    ],
)
def test_lock_driver_keeps_any_other_colon_in_the_path(
    driver: ModuleType, spec: str, path: str, shareable: bool
) -> None:
    (disk,) = driver_request(driver, "--disk", spec)["disks"]
    assert (disk["path"], disk["shareable"]) == (path, shareable)


@pytest.mark.parametrize(
    ("spec", "key", "shared"),
    [
        ("site/vm1", "vm1", False),
        ("site/vm1:exclusive", "vm1", False),
        ("site/vm1:shared", "vm1", True),
        ("site/vm1:1", "vm1:1", False),
    ],
)
def test_lock_driver_lease_modes(driver: ModuleType, spec: str, key: str, shared: bool) -> None:
    assert driver_request(driver, "--lease", spec)["leases"] == [
        {"lockspace": "site", "key": key, "shared": shared}
    ]


@pytest.mark.parametrize("suffix", ["", ":exclusive", ":shared", ":shareable", ":readonly"])
def test_lockd_and_the_lock_driver_lease_a_disk_alike(driver: ModuleType, suffix: str) -> None:
    """One ``--disk`` spec, one lease in both tools; ``:readonly`` (no lease in the driver)
    is refused by ``lockd``, never leased under another name."""
    from lockd.commands import CommandError, parse_leases

    (disk,) = driver_request(driver, "--disk", f"/vm/base.img{suffix}")["disks"]
    by_driver = disk_lease(
        disk["path"], readonly=disk["readonly"], shareable=disk["shareable"],
        options=PluginOptions(), keys=FakeKeys(),
    )  # fmt: skip
    spec = argparse.Namespace(disk=[f"/vm/base.img{suffix}"], lease=[])
    if by_driver is None:
        with pytest.raises(CommandError):
            parse_leases(spec)
        return
    ((lease, _),) = parse_leases(spec)
    assert by_driver == Lease(lease["lockspace"], lease["resource"], lease["shared"])


RunDriver = Callable[..., tuple[int, dict[str, Any]]]


@pytest.fixture
def run_driver(
    driver: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> RunDriver:
    """The driver's ``main`` against a socket nobody serves: a request that got as far as
    the daemon would end ``unavailable`` (exit 69). Returns the exit code and the JSON."""
    monkeypatch.setenv("LOCKD_AUTOSPAWN", "0")

    def run(command: str, *argv: str, stdin: object = None) -> tuple[int, dict[str, Any]]:
        monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(stdin)))
        code = driver.main([command, "--socket", str(tmp_path / "nobody.sock"), *argv])
        reply: dict[str, Any] = json.loads(capsys.readouterr().out)
        return code, reply

    return run


JSON_OWNER = {"uuid": str(uuid.UUID(bytes=VM_UUID)), "name": "vm1", "pid": 4242}


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        ({"owner": JSON_OWNER, "disk": [{"path": "/vm/a.img"}]}, "request has no key 'disk'"),
        (
            {"owner": JSON_OWNER, "disks": [{"path": "/vm/a.img", "shared": True}]},
            "disk has no key 'shared'",
        ),
        (
            {"owner": JSON_OWNER, "leases": [{"lockspace": "site", "resource": "vm1"}]},
            "lease has no key 'resource'",
        ),
        ({"owner": {**JSON_OWNER, "ID": 3}, "disks": []}, "owner has no key 'ID'"),
    ],
)
def test_lock_driver_refuses_a_json_key_it_does_not_know(
    run_driver: RunDriver, request_: dict[str, Any], words: str
) -> None:
    """A misspelt key was ignored: ``"disk"`` for ``"disks"`` took no lease and answered
    ``{"leases": []}``, exit 0, so the VM ran with its disk unprotected. It is a bad
    request now, refused before the daemon is asked."""
    code, reply = run_driver("acquire", "--json", stdin=request_)
    assert code == 2, reply
    assert reply["error"]["code"] == "invalid-argument"
    assert words in reply["error"]["message"]


def test_lock_driver_refuses_a_json_release_naming_nothing(run_driver: RunDriver) -> None:
    """As with the flags, a JSON release with no disks, no leases and no ``"all": true``
    is a bad request, not ``{"released": []}`` with the VM's leases still held."""
    code, reply = run_driver("release", "--json", stdin={"owner": JSON_OWNER, "all": False})
    assert code == 2, reply
    assert reply["error"] == {
        "code": "invalid-argument",
        "message": 'name "disks" or "leases" to release, or give "all": true',
    }


def test_lock_driver_refuses_request_flags_beside_json(run_driver: RunDriver) -> None:
    """``--json --disk /vm/b.img`` leased what stdin named and dropped the flag unsaid."""
    request = {"owner": JSON_OWNER, "disks": [{"path": "/vm/a.img"}]}
    code, reply = run_driver("acquire", "--json", "--disk", "/vm/b.img", stdin=request)
    assert code == 2, reply
    assert reply["error"]["message"] == (
        "--json reads the whole request from stdin: put --disk in it"
    )


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["acquire", "--pid", "abc"], "argument --pid: invalid int value: 'abc'"),
        (["acquire", "--disks", "/vm/a.img"], "unrecognized arguments: --disks /vm/a.img"),
        (["lock"], "invalid choice: 'lock'"),
    ],
)
def test_lock_driver_answers_a_usage_error_in_json(
    driver: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    """A flag argparse refuses printed usage text on stderr and nothing on stdout, where
    the caller reads the JSON answer every other error gives."""
    with pytest.raises(SystemExit) as caught:
        driver.main(argv)
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert error["code"] == "invalid-argument"
    assert words in error["message"]
    assert err.startswith("usage: lockd-lock-driver")


def test_lock_driver_run_by_a_python_without_lockd_s_packages_says_which_python(
    tmp_path: Path,
) -> None:
    """Run by the system's python3 (its shebang), where lockd's dependencies are not
    installed, the driver died with a ModuleNotFoundError traceback and an empty stdout
    (helper-71's find). It prints the JSON error and one line naming the Python to use.
    (``-S``: no site-packages, as a Python without them.)"""
    done = subprocess.run(
        [sys.executable, "-S", str(LOCK_DRIVER), "inquire", "--uuid", str(uuid.UUID(bytes=VM_UUID)),
         "--name", "vm1", "--pid", "4242"],
        capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "internal"
    assert "No module named" in error["message"]
    assert "with the Python lockd is installed in" in error["message"]
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("lockd-lock-driver: No module named")
