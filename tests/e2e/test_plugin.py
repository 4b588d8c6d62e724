"""The hypervisor plugin against a real daemon: leases seen as fcntl locks from other processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from lockd.plugin import LockError, LockManager, Owner, parse_state, socket_connector
from protocol.names import FILES_LOCKSPACE, lease_name_for_path
from tests.e2e.conftest import LOCKD, DaemonProcess, wait_for
from tests.lockprobe import probe

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "contrib" / "qemu" / "lockd-qemu-wrapper"
LOCK_DRIVER = REPO / "contrib" / "plugin" / "lockd-lock-driver"
Children = list[subprocess.Popen[bytes]]


def lease_file(daemon: DaemonProcess, disk: str) -> Path:
    return daemon.lock_dir / FILES_LOCKSPACE / lease_name_for_path(disk)


def locked(daemon: DaemonProcess, disk: str) -> bool:
    """Whether another process (as another host would) finds the disk's lease locked.

    The probe asks for a write lock, which any lock on byte 0, shared or not, refuses.
    No lease file (never created, or unlinked on last release) means not locked.
    """
    path = lease_file(daemon, disk)
    try:
        return probe(path, "classic") == "busy"
    except subprocess.CalledProcessError:
        if path.exists():
            raise
        return False


def sleeper(children: Children) -> subprocess.Popen[bytes]:
    """A stand-in VM process."""
    proc = subprocess.Popen(["sleep", "600"])
    children.append(proc)
    return proc


def manager(daemon: DaemonProcess, pid: int, vm_uuid: bytes | None = None) -> LockManager:
    owner = Owner(vm_uuid or uuid.uuid4().bytes, f"vm-{pid}", 1, pid)
    return LockManager(owner, connect=socket_connector(str(daemon.socket), timeout=10))


def leases_by_pid(daemon: DaemonProcess) -> dict[int, dict[str, str]]:
    """pid -> {resource: mode}, from the daemon's own listing."""
    out: dict[int, dict[str, str]] = {}
    with daemon.client() as client:
        for lease in client.call("list-leases")["leases"]:
            for owner in lease["owners"]:
                out.setdefault(owner["pid"], {})[lease["resource"]] = lease["mode"]
    return out


def clients(daemon: DaemonProcess) -> list[dict[str, Any]]:
    with daemon.client() as client:
        rows: list[dict[str, Any]] = client.call("list-clients")["clients"]
    return rows


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def test_acquire_for_a_vm_process_outlives_the_manager_and_ends_with_the_vm(
    daemon: DaemonProcess, children: Children
) -> None:
    """keep_fd+restrict for another pid: held after manager and fd close, freed when it exits."""
    vm = sleeper(children)
    mgr = manager(daemon, vm.pid)
    mgr.add_disk("/vm/a.img")
    assert mgr.add_disk("/vm/cd.iso", readonly=True) is None
    got = mgr.acquire(restrict=True, keep_fd=True)
    assert got.fd is not None
    assert os.get_inheritable(got.fd)
    assert locked(daemon, "/vm/a.img")
    assert not lease_file(daemon, "/vm/cd.iso").exists()
    restricted = [c for c in clients(daemon) if c["restricted"]]
    assert [c["owner"]["pid"] for c in restricted] == [vm.pid]
    mgr.close()
    os.close(got.fd)
    wait_for(lambda: not any(c["restricted"] for c in clients(daemon)))
    assert locked(daemon, "/vm/a.img"), "closing a manager's connection ends no lease"
    kill(vm)
    wait_for(lambda: not locked(daemon, "/vm/a.img"))
    assert leases_by_pid(daemon) == {}


def test_libvirt_start_flow_the_vm_inherits_a_restricted_connection(
    daemon: DaemonProcess, children: Children
) -> None:
    """Start: the VM registers itself (register-only, restrict, keep fd), execs; resume leases."""
    code = textwrap.dedent(
        f"""
        import os, uuid
        from lockd.plugin import LockManager, Owner, socket_connector
        owner = Owner(uuid.uuid4().bytes, "vm-start", 1, os.getpid())
        mgr = LockManager(owner, connect=socket_connector({str(daemon.socket)!r}))
        mgr.add_disk("/vm/start.img")
        got = mgr.acquire(register_only=True, restrict=True, keep_fd=True)
        assert got.leases == ()
        os.execvp("sleep", ["sleep", "600"])
        """
    )
    vm = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    children.append(vm)
    wait_for(lambda: vm.poll() is not None or any(c["pid"] == vm.pid for c in clients(daemon)))
    assert vm.poll() is None
    wait_for(lambda: Path(f"/proc/{vm.pid}/comm").read_text().strip() == "sleep")
    (row,) = [c for c in clients(daemon) if c["pid"] == vm.pid]
    assert row["restricted"]
    assert row["owner"]["pid"] == vm.pid, "the exec'd VM holds its own registered connection"
    assert not locked(daemon, "/vm/start.img"), "register-only takes no lease"
    with manager(daemon, vm.pid) as resume:
        resume.add_disk("/vm/start.img")
        resume.acquire()
    assert locked(daemon, "/vm/start.img")
    kill(vm)
    wait_for(lambda: not locked(daemon, "/vm/start.img"))


def test_acquire_is_all_or_nothing_when_one_disk_is_busy(
    daemon: DaemonProcess, children: Children
) -> None:
    """vm2 asks for a free disk and vm1's disk: refused with the holder named, nothing taken."""
    vm1, vm2 = sleeper(children), sleeper(children)
    with manager(daemon, vm1.pid) as first:
        first.add_disk("/vm/busy.img")
        first.acquire()
    with manager(daemon, vm2.pid) as second:
        second.add_disk("/vm/free.img")
        second.add_disk("/vm/busy.img")
        with pytest.raises(LockError) as caught:
            second.acquire()
        assert caught.value.code == "busy"
        assert caught.value.message.startswith("disk /vm/busy.img is busy")
        assert f"pid {vm1.pid}" in caught.value.message
        assert [h["pid"] for h in caught.value.details["holders"]] == [vm1.pid]
        assert second.inquire().count(";") == 1, "the state lists no lease"
    assert not locked(daemon, "/vm/free.img")
    assert leases_by_pid(daemon) == {vm1.pid: {lease_name_for_path("/vm/busy.img"): "exclusive"}}


def test_migration_inquire_release_then_acquire_the_state_on_the_target(
    daemon: DaemonProcess, children: Children
) -> None:
    """The target VM process gets exactly the source's leases, in the same modes."""
    vm_uuid = uuid.uuid4().bytes
    source_vm, target_vm = sleeper(children), sleeper(children)
    with manager(daemon, source_vm.pid, vm_uuid) as source:
        source.add_disk("/vm/root.img")
        source.add_disk("/vm/base.img", shareable=True)
        source.add_disk("/vm/seed.iso", readonly=True)
        source.acquire()
        state = source.inquire()
        assert len(source.release()) == 2
    assert not locked(daemon, "/vm/root.img")
    expected = {
        lease_name_for_path("/vm/root.img"): "exclusive",
        lease_name_for_path("/vm/base.img"): "shared",
    }
    assert {le.resource: le.mode for le in parse_state(state).leases} == expected
    with manager(daemon, target_vm.pid, vm_uuid) as target:
        assert len(target.acquire(state).leases) == 2
        assert target.inquire() == state
    assert leases_by_pid(daemon) == {target_vm.pid: expected}
    assert locked(daemon, "/vm/root.img")
    assert locked(daemon, "/vm/base.img")
    with manager(daemon, source_vm.pid) as other_vm, pytest.raises(LockError) as caught:
        other_vm.acquire(state)
    assert caught.value.code == "bad-state", "another VM's state is refused"


def fake_qemu(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def wrapper_env(daemon: DaemonProcess, qemu: Path) -> dict[str, str]:
    return {**daemon.env, "LOCKD_QEMU": str(qemu), "LOCKD_CLI": f"{sys.executable} -m lockd"}


def test_qemu_wrapper_leases_the_writable_drives_for_the_life_of_qemu(
    daemon: DaemonProcess, children: Children, tmp_path: Path
) -> None:
    """-drive file= exclusive, share-rw device shared, readonly and cdrom skipped; ends at exit."""
    vm_uuid = str(uuid.uuid4())
    qemu_args = [
        "-name", "guest=vm9,debug-threads=on", "-uuid", vm_uuid,
        "-drive", "file=/vm/w.img,format=raw,if=virtio",
        "-drive", "file=/vm/ro.img,readonly=on",
        "-drive", "file=/vm/cd.iso,media=cdrom",
        "-drive", "if=none,id=s0,file=/vm/s.img",
        "-device", "virtio-blk-pci,drive=s0,share-rw=on",
    ]  # fmt: skip
    env = wrapper_env(daemon, fake_qemu(tmp_path, "exec sleep 600"))
    vm = subprocess.Popen([str(WRAPPER), *qemu_args], env=env)
    children.append(vm)
    wait_for(lambda: vm.poll() is not None or vm.pid in leases_by_pid(daemon))
    assert vm.poll() is None
    assert leases_by_pid(daemon)[vm.pid] == {
        lease_name_for_path("/vm/w.img"): "exclusive",
        lease_name_for_path("/vm/s.img"): "shared",
    }
    (row,) = [c for c in clients(daemon) if c["pid"] == vm.pid]
    assert row["restricted"]
    assert row["owner"]["name"] == "vm9"
    assert row["owner"]["uuid"] == uuid.UUID(vm_uuid).bytes
    busy = subprocess.run(
        [str(WRAPPER), "-name", "vm10", "-hda", "/vm/w.img"], env=env, capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip
    assert busy.returncode == 75, busy.stderr
    assert "disk /vm/w.img is busy" in busy.stderr
    kill(vm)
    wait_for(lambda: not locked(daemon, "/vm/w.img") and not locked(daemon, "/vm/s.img"))


def _wrapper_without_daemon(
    tmp_path: Path, *qemu_args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The wrapper with no daemon to ask, and a QEMU that only says what it was given."""
    echo = fake_qemu(tmp_path, 'echo "ran: $*"')
    env = {**os.environ, "LOCKD_QEMU": str(echo), "LOCKD_SOCKET": str(tmp_path / "none.sock"),
           **(env or {})}  # fmt: skip
    return subprocess.run(
        [str(WRAPPER), *qemu_args],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_qemu_wrapper_refuses_a_qemu_that_would_fork_away_from_its_leases(
    tmp_path: Path,
) -> None:
    """-daemonize: QEMU would run on in a child once the process holding its leases
    exits, its disks unprotected. Refused before any lease or daemon is asked."""
    done = _wrapper_without_daemon(tmp_path, "-hda", "/vm/w.img", "-daemonize")
    assert done.returncode == 2
    assert "-daemonize" in done.stderr
    assert done.stdout == ""


def test_qemu_wrapper_without_writable_disks_runs_qemu_directly(tmp_path: Path) -> None:
    """Capability probes and read-only guests need no daemon at all."""
    done = _wrapper_without_daemon(tmp_path, "-drive", "file=/vm/ro.img,readonly=on", "-version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran: -drive file=/vm/ro.img,readonly=on -version\n"


def lock_driver(
    daemon: DaemonProcess, *args: str, stdin: str | None = None
) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(LOCK_DRIVER), *args], env=daemon.env, input=stdin,
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    reply: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, reply


def test_lock_driver_script_acquire_inquire_release(
    daemon: DaemonProcess, children: Children
) -> None:
    """The command takes JSON or flags, prints JSON, and exits 75 on a busy disk."""
    vm1, vm2 = sleeper(children), sleeper(children)
    request = {
        "owner": {"uuid": str(uuid.uuid4()), "name": "vm1", "id": 3, "pid": vm1.pid},
        "disks": [
            {"path": "/vm/d.img"},
            {"path": "/vm/base.img", "shareable": True},
            {"path": "/vm/cd.iso", "readonly": True},
        ],
    }
    code, reply = lock_driver(daemon, "acquire", "--json", stdin=json.dumps(request))
    assert code == 0, reply
    assert sorted(le["mode"] for le in reply["leases"]) == ["exclusive", "shared"]
    assert locked(daemon, "/vm/d.img")
    code, reply = lock_driver(daemon, "inquire", "--json", stdin=json.dumps(request))
    assert code == 0, reply
    assert len(parse_state(reply["state"]).leases) == 2
    flags = ["--uuid", str(uuid.uuid4()), "--name", "vm2", "--pid", str(vm2.pid)]
    code, reply = lock_driver(daemon, "acquire", *flags, "--disk", "/vm/d.img")
    assert code == 75
    assert reply["error"]["code"] == "busy"
    code, reply = lock_driver(daemon, "acquire", *flags, "--disk", "/vm/base.img:shareable")
    assert code == 0, reply
    code, reply = lock_driver(daemon, "release", "--json", stdin=json.dumps(request))
    assert code == 0, reply
    assert len(reply["released"]) == 2
    assert not locked(daemon, "/vm/d.img")
    assert locked(daemon, "/vm/base.img"), "vm2 still shares the base image"
    code, reply = lock_driver(daemon, "acquire", *flags, "--state", "lockd-state:9")
    assert code == 2
    assert reply["error"]["code"] == "bad-state"


def test_lockd_run_and_the_lock_driver_share_the_disk_modes(
    daemon: DaemonProcess, children: Children
) -> None:
    """``lockd run --disk P:shareable`` holds P itself, shared: an exclusive run is busy, the
    driver's ``P:shared`` joins it; ``P:bogus`` is refused by both, leasing nothing."""
    vm1 = subprocess.Popen(
        [*LOCKD, "run", "--disk", "/vm/base.img:shareable", "--name", "vm1", "--", "sleep", "600"],
        env=daemon.env,
    )
    children.append(vm1)
    wait_for(lambda: vm1.poll() is not None or vm1.pid in leases_by_pid(daemon))
    assert vm1.poll() is None
    base = lease_name_for_path("/vm/base.img")
    assert leases_by_pid(daemon) == {vm1.pid: {base: "shared"}}
    busy = daemon.lockd("run", "--disk", "/vm/base.img", "--name", "vm2", "--", "true")
    assert busy.returncode == 75, busy.stderr
    assert "disk /vm/base.img is busy" in busy.stderr

    vm3 = sleeper(children)
    flags = ["--uuid", str(uuid.uuid4()), "--name", "vm3", "--pid", str(vm3.pid)]
    code, reply = lock_driver(daemon, "acquire", *flags, "--disk", "/vm/base.img:shared")
    assert code == 0, reply
    assert reply["leases"] == [{"lockspace": FILES_LOCKSPACE, "resource": base, "mode": "shared"}]

    code, reply = lock_driver(daemon, "acquire", *flags, "--disk", "/vm/base.img:bogus")
    assert code == 2
    assert reply["error"]["code"] == "invalid-argument"
    bogus = daemon.lockd("run", "--disk", "/vm/base.img:bogus", "--name", "vm4", "--", "true")
    assert bogus.returncode == 2
    assert "'/vm/base.img:bogus:exclusive'" in bogus.stderr
    assert leases_by_pid(daemon) == {vm1.pid: {base: "shared"}, vm3.pid: {base: "shared"}}


def test_an_explicit_lease_with_no_file_names_the_file_and_how_it_is_made(
    daemon: DaemonProcess, children: Children
) -> None:
    """A ``<lease>`` in a site lockspace must exist before a VM takes it (the driver never
    creates it); the refusal said only "lease file vm1 does not exist": not which
    lockspace, not where the daemon looked, not how a lease file is made."""
    vm = sleeper(children)
    with daemon.client() as client:
        client.call("create-lockspace", lockspace="site.leases")
    flags = ["--uuid", str(uuid.uuid4()), "--name", "vm1", "--pid", str(vm.pid)]
    code, reply = lock_driver(daemon, "acquire", *flags, "--lease", "site.leases/vm1")
    assert code == 1, reply
    assert reply["error"] == {
        "code": "not-found",
        "message": "lease site.leases/vm1 does not exist: no file "
        f"{daemon.lock_dir / 'site.leases' / 'vm1'} (create-resource makes it, as does an "
        "acquire with autocreate)",
    }
    assert leases_by_pid(daemon) == {}
    with daemon.client() as client:
        client.call("create-resource", lockspace="site.leases", resource="vm1")
    code, reply = lock_driver(daemon, "acquire", *flags, "--lease", "site.leases/vm1")
    assert code == 0, reply
    assert leases_by_pid(daemon) == {vm.pid: {"vm1": "exclusive"}}
    assert probe(daemon.lock_dir / "site.leases" / "vm1", "classic") == "busy"


def test_lock_driver_release_naming_nothing_is_refused(
    daemon: DaemonProcess, children: Children
) -> None:
    """``release`` with neither ``--disk``/``--lease`` nor ``--all`` answered
    ``{"released": []}`` and exit 0, so a forgotten ``--all`` looked done while the
    VM's leases stayed held; it is a bad request, as ``lockd release`` says."""
    vm = sleeper(children)
    flags = ["--uuid", str(uuid.uuid4()), "--name", "vm1", "--pid", str(vm.pid)]
    code, reply = lock_driver(daemon, "acquire", *flags, "--disk", "/vm/d.img")
    assert code == 0, reply
    code, reply = lock_driver(daemon, "release", *flags)
    assert code == 2
    assert reply["error"] == {
        "code": "invalid-argument",
        "message": "name --disk/--lease to release, or --all",
    }
    assert locked(daemon, "/vm/d.img")
    code, reply = lock_driver(daemon, "release", *flags, "--all")
    assert code == 0, reply
    assert not locked(daemon, "/vm/d.img")


def test_a_disk_asked_for_in_the_other_mode_says_the_vm_holds_it_already(
    daemon: DaemonProcess, children: Children
) -> None:
    """A VM holding its disk exclusive asks for it shareable (a disk made shareable
    while the VM runs): busy, as in virtlockd, but the message only said the disk "is
    busy" and "held exclusive by vm1", the asking VM itself, with no word on what to do.
    It now says the VM holds it already and that the mode changes only by a release."""
    vm = sleeper(children)
    flags = ["--uuid", str(uuid.uuid4()), "--name", "vm1", "--pid", str(vm.pid)]
    code, reply = lock_driver(daemon, "acquire", *flags, "--disk", "/vm/d.img")
    assert code == 0, reply
    code, reply = lock_driver(daemon, "acquire", *flags, "--disk", "/vm/d.img:shareable")
    assert code == 75, reply
    message = reply["error"]["message"]
    assert message.startswith("disk /vm/d.img is busy: "), message
    assert message.endswith(
        f"pid {vm.pid}); that is the asking owner, which holds it exclusive already (a held "
        "lease's mode is never changed: release it, then acquire it shared)"
    ), message
    assert leases_by_pid(daemon) == {vm.pid: {lease_name_for_path("/vm/d.img"): "exclusive"}}
    other = sleeper(children)
    busy = daemon.lockd("acquire", "--owner-pid", str(other.pid), "--disk", "/vm/d.img:shared")
    assert busy.returncode == 75
    assert "asking owner" not in busy.stderr, "another owner is not told it holds the disk"


_LIBVIRT_BLOCKDEV_ARGS = [
    # As a recent libvirt gives them: a qcow2 on a file with a read-only backing chain,
    # a shareable raw disk, a CD-ROM, and a disk in QEMU's key=value syntax.
    "-blockdev", '{"driver":"file","filename":"/vm/top.img","node-name":"libvirt-2-storage"}',
    "-blockdev", '{"node-name":"libvirt-2-format","read-only":false,"driver":"qcow2",'
                 '"file":"libvirt-2-storage","backing":"libvirt-3-format"}',
    "-blockdev", '{"driver":"file","filename":"/vm/base.img","node-name":"libvirt-3-storage",'
                 '"read-only":true}',
    "-blockdev", '{"node-name":"libvirt-3-format","read-only":true,"driver":"qcow2",'
                 '"file":"libvirt-3-storage"}',
    "-device", '{"driver":"virtio-blk-pci","drive":"libvirt-2-format","id":"virtio-disk0"}',
    "-blockdev", '{"driver":"file","filename":"/vm/shared.img","node-name":"s-storage"}',
    "-blockdev", '{"node-name":"s-format","read-only":false,"driver":"raw","file":"s-storage"}',
    "-device", '{"driver":"virtio-blk-pci","drive":"s-format","share-rw":true}',
    "-blockdev", '{"driver":"file","filename":"/vm/cd.iso","node-name":"cd","read-only":true}',
    "-device", "ide-cd,bus=ide.0,drive=cd",
    "-blockdev", "driver=file,filename=/vm/kv.img,node-name=kv",
    "-device", "virtio-blk-pci,drive=kv",
]  # fmt: skip


def test_qemu_wrapper_leases_the_disks_a_libvirt_gives_as_blockdev(
    daemon: DaemonProcess, children: Children, tmp_path: Path
) -> None:
    """A recent libvirt gives every disk as -blockdev JSON, which the wrapper did not
    read: its VMs ran with no lease at all. A disk is a node a -device opens, followed
    to its file: leased exclusive, shared for share-rw, not for read-only nodes (a
    backing chain, a CD-ROM)."""
    env = wrapper_env(daemon, fake_qemu(tmp_path, "exec sleep 600"))
    vm = subprocess.Popen([str(WRAPPER), "-name", "guest=vm1", *_LIBVIRT_BLOCKDEV_ARGS], env=env)
    children.append(vm)
    wait_for(lambda: vm.poll() is not None or vm.pid in leases_by_pid(daemon))
    assert vm.poll() is None
    assert leases_by_pid(daemon)[vm.pid] == {
        lease_name_for_path("/vm/top.img"): "exclusive",
        lease_name_for_path("/vm/shared.img"): "shared",
        lease_name_for_path("/vm/kv.img"): "exclusive",
    }
    assert locked(daemon, "/vm/top.img")
    kill(vm)
    wait_for(lambda: not locked(daemon, "/vm/top.img"))


def test_qemu_wrapper_says_when_it_cannot_read_a_blockdev(tmp_path: Path) -> None:
    """Unreadable JSON is refused before QEMU runs (exit 2); without python3 each
    -blockdev is named on stderr as not leased, and QEMU runs as before."""
    bad = _wrapper_without_daemon(tmp_path, "-blockdev", "{bad", "-device", "x,drive=y")
    assert bad.returncode == 2
    assert "cannot read -blockdev {bad" in bad.stderr
    assert bad.stdout == ""
    node = '{"driver":"file","filename":"/vm/b.img","node-name":"b"}'
    done = _wrapper_without_daemon(
        tmp_path, "-blockdev", node, "-device", "virtio-blk-pci,drive=b",
        env={"LOCKD_PYTHON": str(tmp_path / "no-python")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ran: -blockdev {node} -device virtio-blk-pci,drive=b\n"
    assert done.stderr == (
        f"lockd-qemu-wrapper: -blockdev not read (no {tmp_path / 'no-python'}), its disk "
        f"gets no lease: {node}\n"
    )


def a_vm_with_one_image_twice(
    daemon: DaemonProcess, children: Children
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A VM given /vm/base.img on two devices through the lock driver: its owner and disk."""
    vm = sleeper(children)
    owner = {"uuid": str(uuid.uuid4()), "name": "vm", "id": 3, "pid": vm.pid}
    shared = {"path": "/vm/base.img", "shareable": True}
    code, reply = lock_driver(
        daemon, "acquire", "--json", stdin=json.dumps({"owner": owner, "disks": [shared] * 2})
    )
    assert code == 0, reply
    assert [le["mode"] for le in reply["leases"]] == ["shared", "shared"]
    return owner, shared


def test_a_shareable_image_on_two_devices_stays_locked_until_both_are_detached(
    counting_daemon: DaemonProcess, children: Children
) -> None:
    """The lock driver given one shareable image twice (two devices, share-rw), then a
    hot-unplug of one of them: the image stays locked while the VM writes through the
    other device, and another VM's exclusive attach is refused until the last detach."""
    daemon = counting_daemon  # shared_holds = "each"
    owner, shared = a_vm_with_one_image_twice(daemon, children)
    detach = json.dumps({"owner": owner, "disks": [shared]})
    code, reply = lock_driver(daemon, "release", "--json", stdin=detach)
    assert code == 0, reply
    assert locked(daemon, "/vm/base.img"), "the other device still uses the image"
    other = ["--uuid", str(uuid.uuid4()), "--name", "vm2", "--pid", str(sleeper(children).pid)]
    code, reply = lock_driver(daemon, "acquire", *other, "--disk", "/vm/base.img")
    assert code == 75, reply
    code, reply = lock_driver(daemon, "release", "--json", stdin=detach)
    assert code == 0, reply
    assert not locked(daemon, "/vm/base.img")
    code, reply = lock_driver(daemon, "acquire", *other, "--disk", "/vm/base.img")
    assert code == 0, reply


def test_a_detach_cut_off_by_a_lockd_crash_says_not_to_release_again_blindly(
    counting_daemon: DaemonProcess, children: Children
) -> None:
    """lockd is SIGKILLed after journaling the release of one of two devices' holds,
    before its reply, and is not back at once: the lock driver exits 69 saying the hold
    may be released already, so that nobody's retry ends the other device's hold too.
    The restarted lockd holds the image once, locked, as the journal says."""
    daemon = counting_daemon  # shared_holds = "each"
    owner, shared = a_vm_with_one_image_twice(daemon, children)
    daemon.stop()
    daemon.env_extra = {"LOCKD_CRASH_AT": "release-journaled"}
    daemon.start()
    code, reply = lock_driver(
        daemon, "release", "--json", stdin=json.dumps({"owner": owner, "disks": [shared]})
    )
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == -9
    assert code == 69, reply
    assert reply["error"]["message"].endswith(
        "before releasing again, which would end another hold of a shared lease held more than once"
    )
    assert "it may have released some of disk /vm/base.img already" in reply["error"]["message"]
    daemon.env_extra = {}
    daemon.start()
    assert locked(daemon, "/vm/base.img")
    with daemon.client() as client:
        [lease] = client.call("list-leases")["leases"]
    assert [(o["pid"], o.get("holds", 1)) for o in lease["owners"]] == [(owner["pid"], 1)]


def test_a_detach_with_a_request_id_cut_off_by_a_crash_is_repeated_safely(
    counting_daemon: DaemonProcess, children: Children
) -> None:
    """lockd is SIGKILLed after journaling one device's detach, before its reply, and is
    not back at once: the lock driver, given a request id, exits 69 saying to repeat it
    with the same id. Repeated (a new process) once lockd is back, it exits 0 and ends
    nothing more: the other device's hold keeps the image locked until its own detach,
    with another id."""
    daemon = counting_daemon  # shared_holds = "each"
    owner, shared = a_vm_with_one_image_twice(daemon, children)
    daemon.stop()
    daemon.env_extra = {"LOCKD_CRASH_AT": "release-journaled"}
    daemon.start()
    detach = json.dumps({"owner": owner, "disks": [shared], "request_id": "vm/virtio-disk1"})
    code, reply = lock_driver(daemon, "release", "--json", stdin=detach)
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == -9
    assert code == 69, reply
    assert reply["error"]["message"].endswith(
        "repeat this release with the same request id, which lockd applies at most once"
    )
    daemon.env_extra = {}
    daemon.start()
    for _ in range(2):
        code, reply = lock_driver(daemon, "release", "--json", stdin=detach)
        assert code == 0, reply
        assert locked(daemon, "/vm/base.img"), "the other device still uses the image"
    with daemon.client() as client:
        [lease] = client.call("list-leases")["leases"]
    assert [(o["pid"], o.get("holds", 1)) for o in lease["owners"]] == [(owner["pid"], 1)]
    code, reply = lock_driver(
        daemon, "release", "--uuid", owner["uuid"], "--name", "vm", "--pid", str(owner["pid"]),
        "--disk", "/vm/base.img:shareable", "--request-id", "vm/virtio-disk2",
    )  # fmt: skip
    assert code == 0, reply
    assert not locked(daemon, "/vm/base.img")


def test_a_reused_manager_takes_again_what_an_operator_released(
    daemon: DaemonProcess, children: Children
) -> None:
    """An operator's ``lockd release --all`` ends the VM's leases; the VM manager's next
    acquire with the same manager answered success from its memory, asked lockd for
    nothing, and the disks stayed unlocked while the VM ran on them."""
    vm = sleeper(children)
    mgr = manager(daemon, vm.pid)
    mgr.add_disk("/vm/a.img")
    mgr.add_disk("/vm/base.img", shareable=True)
    mgr.acquire()
    done = daemon.lockd("release", "--owner-pid", str(vm.pid), "--all")
    assert done.returncode == 0, done.stderr
    assert not locked(daemon, "/vm/a.img")
    mgr.acquire()
    assert locked(daemon, "/vm/a.img")
    assert locked(daemon, "/vm/base.img")
    assert leases_by_pid(daemon)[vm.pid] == {
        lease_name_for_path("/vm/a.img"): "exclusive",
        lease_name_for_path("/vm/base.img"): "shared",
    }
    mgr.close()
