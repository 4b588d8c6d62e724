"""The daemon end to end: real sockets, real lease files, locks checked from other processes."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest

from lockd.commands import EXIT_NEEDS_OPERATOR
from protocol.client import Client, RemoteError
from protocol.names import FILES_LOCKSPACE, LVM_LOCKSPACE, lease_name_for_path
from tests.e2e.conftest import (
    LOCKD,
    DaemonProcess,
    MakeDaemon,
    journaled,
    start_dropping_owner,
    wait_for,
)
from tests.e2e.invariants import check, check_all, listed
from tests.lockprobe import probe

pytestmark = pytest.mark.e2e


def lease_file(daemon: DaemonProcess, disk: str) -> Path:
    return daemon.lock_dir / FILES_LOCKSPACE / lease_name_for_path(disk)


def start_run(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], *args: str
) -> subprocess.Popen[bytes]:
    """`lockd run ... -- sleep 600`, returned once its lease is held and it runs `sleep`.

    Not as soon as the lease is listed: `lockd run` still calls `restrict` before its
    exec, and a daemon stopped in between makes it fail (the VM never started), which
    tests that stop daemons must not mistake for lockd losing a running VM's lease.
    """
    proc = subprocess.Popen(
        [*LOCKD, "run", *args, "--", "sleep", "600"],
        env=daemon.env,
        stderr=subprocess.PIPE,
    )
    children.append(proc)
    wait_for(lambda: proc.poll() is not None or (_owner_pids(daemon) & {proc.pid}
                                                 and _comm(proc.pid) == "sleep"))  # fmt: skip
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _holding_the_base_image(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], holds: int
) -> subprocess.Popen[bytes]:
    """A VM (a sleeper) holding /vm/base.img shared ``holds`` times (as many devices)."""
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    disk = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/base.img")}
    with daemon.client() as client:
        client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                       "pid": sleeper.pid})  # fmt: skip
        for _ in range(holds):
            client.call("acquire", leases=[{**disk, "shared": True}], autocreate=True)
    return sleeper


def _owner_pids(daemon: DaemonProcess) -> set[int]:
    with daemon.client() as client:
        leases = client.call("list-leases")["leases"]
    return {o["pid"] for lease in leases for o in lease["owners"]}


def events(daemon: DaemonProcess, *args: str) -> list[dict[str, Any]]:
    done = daemon.lockd("events", "--journal-dir", str(daemon.journal_dir), "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_status_and_socket_modes(daemon: DaemonProcess) -> None:
    """`lockd status` answers; both sockets are 0600; well-known lockspaces exist."""
    done = daemon.lockd("status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["pid"] == daemon.proc.pid if daemon.proc else False
    for path in (daemon.socket, daemon.admin_socket):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    names = {row["name"] for row in json.loads(daemon.lockd("lockspaces", "--json").stdout)}
    assert {"org.libvirt.lockd.files", "org.libvirt.lockd.lvm", "org.libvirt.lockd.scsi"} <= names
    plain = daemon.lockd("status").stdout
    timeline = status["journal"]
    # Words, not a Python dict's repr ("journal: {'id': ..., 'from': 1}").
    assert (
        f"\njournal: id {timeline['id']}, seqs from {timeline['from']}, in {timeline['dir']}\n"
        in plain
    )
    assert "{" not in plain


def test_run_holds_the_disk_lock_until_the_command_dies(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """The VM start path: lease held on byte 0 while CMD runs, gone when it is killed."""
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    path = lease_file(daemon, "/vm/a.img")
    assert probe(path, "ofd") == "busy"
    assert probe(path, "classic") == "busy"
    assert probe(path, "classic", "read") == "busy"

    second = daemon.lockd("run", "--disk", "/vm/a.img", "--name", "vm2", "--", "true")
    assert second.returncode == 75
    assert "vm1" in second.stderr
    assert str(vm.pid) in second.stderr
    assert "disk /vm/a.img is busy" in second.stderr

    leases = json.loads(daemon.lockd("leases", "--json").stdout)
    assert len(leases) == 1
    (owner,) = leases[0]["owners"]
    assert (owner["name"], owner["pid"], leases[0]["mode"]) == ("vm1", vm.pid, "exclusive")
    uuid.UUID(owner["uuid"])

    vm.send_signal(signal.SIGKILL)
    vm.wait()
    wait_for(lambda: not path.exists())  # autocreated: deleted on last release, like virtlockd
    released = list(events(daemon, "--type", "lease-released"))
    assert released[-1]["reason"] == "owner-exit"
    assert daemon.lockd("leases", "--json").stdout.strip() == "[]"
    here = daemon.lockd("leases", "--lockspace", FILES_LOCKSPACE)
    assert (here.returncode, here.stdout) == (0, "")  # served, nothing held
    typo = daemon.lockd("leases", "--lockspace", "org.libvirt.lockd.file")
    assert typo.returncode == 1
    assert "no lockspace 'org.libvirt.lockd.file'" in typo.stderr  # not "nothing held"
    third = daemon.lockd("run", "--disk", "/vm/a.img", "--name", "vm3", "--", "true")
    assert third.returncode == 0, third.stderr


def test_shared_disks_and_all_or_nothing(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """Shared leases coexist; a multi-disk run that hits one busy disk takes none."""
    start_run(daemon, children, "--disk", "/vm/shared.img:shared", "--name", "vm1")
    start_run(daemon, children, "--disk", "/vm/shared.img:shared", "--name", "vm2")
    shared = lease_file(daemon, "/vm/shared.img")
    assert probe(shared, "ofd", "read") == "free"
    assert probe(shared, "ofd", "write") == "busy"

    both = daemon.lockd(
        "run", "--disk", "/vm/free.img", "--disk", "/vm/shared.img", "--name", "vm3", "--", "true"
    )
    assert both.returncode == 75
    assert not lease_file(daemon, "/vm/free.img").exists()
    leases = json.loads(daemon.lockd("leases", "--json").stdout)
    assert [(lease["mode"], len(lease["owners"])) for lease in leases] == [("shared", 2)]


def test_killed_run_child_frees_a_precreated_lease(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """A lease file that was created beforehand stays, and is unlocked once the owner dies."""
    with daemon.client() as client:
        client.call("create-lockspace", lockspace="test.space")
        client.call("create-resource", lockspace="test.space", resource="disk-1")
    path = daemon.lock_dir / "test.space" / "disk-1"
    vm = subprocess.Popen(
        [*LOCKD, "run", "--lease", "test.space/disk-1", "--no-autocreate", "--name", "vm1",
         "--", "sleep", "600"],
        env=daemon.env,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    children.append(vm)
    # Wait on the daemon's word, not on a probe: a probe is itself a lock taker,
    # and one racing the acquire would make it fail busy.
    wait_for(lambda: vm.poll() is not None or vm.pid in _owner_pids(daemon))
    assert vm.poll() is None, vm.stderr.read() if vm.stderr else ""
    assert probe(path, "classic") == "busy"
    vm.kill()
    vm.wait()
    wait_for(lambda: probe(path, "classic") == "free")
    assert path.exists()


def test_two_daemons_on_one_lock_dir_exclude_each_other(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Two hosts on a shared lock directory: the second cannot take what the first holds."""
    shared = tmp_path / "nfs"
    a = make_daemon("host-a", shared)
    b = make_daemon("host-b", shared)
    start_run(a, children, "--disk", "/vm/a.img", "--name", "vm-on-a")
    busy = b.lockd("run", "--disk", "/vm/a.img", "--name", "vm-on-b", "--", "true")
    assert busy.returncode == 75
    assert "another process or host" in busy.stderr
    start_run(b, children, "--disk", "/vm/b.img", "--name", "vm-on-b")
    assert a.lockd("run", "--disk", "/vm/b.img", "--name", "x", "--", "true").returncode == 75


def test_acquire_for_another_process_ends_when_it_exits(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """`lockd acquire --owner-pid`: the lease outlives the CLI and ends with the process."""
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    done = daemon.lockd("acquire", "--owner-pid", str(sleeper.pid), "--name", "vm9",
                        "--disk", "/vm/9.img")  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = lease_file(daemon, "/vm/9.img")
    assert probe(path, "ofd") == "busy"
    assert _owner_pids(daemon) == {sleeper.pid}
    sleeper.kill()
    sleeper.wait()
    wait_for(lambda: not _owner_pids(daemon))
    assert events(daemon, "--type", "lease-released")[-1]["reason"] == "owner-exit"


def test_the_journal_names_the_process_and_uid_that_took_and_released_a_disk(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """An auditor asks which process, as which uid, acquired and released a VM's disk: the
    ``conn`` of each names a ``connection-opened`` with the pid, uid and gid the kernel
    gave for that connection (here two `lockd` commands, each its own process), in
    ``lockd events --json`` and in the line format."""
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    pids = []
    for command in ("acquire", "release"):
        cli = subprocess.Popen([*LOCKD, command, "--owner-pid", str(sleeper.pid), "--disk",
                                "/vm/who.img"], env=daemon.env)  # fmt: skip
        assert cli.wait(30) == 0
        pids.append(cli.pid)
    rows = events(daemon, "--type", "connection-opened", "--type", "lease-acquired",
                  "--type", "lease-released")  # fmt: skip
    opened = {row["conn"]: row for row in rows if row["type"] == "connection-opened"}
    acquired, released = (row for row in rows if row["type"] != "connection-opened")
    for change, pid in zip((acquired, released), pids, strict=True):
        who = opened[change["conn"]]
        assert who["seq"] < change["seq"]
        assert (who["pid"], who["uid"], who["gid"], who["admin"]) == (
            pid, os.getuid(), os.getgid(), False
        )  # fmt: skip
    text = daemon.lockd("events", "--journal-dir", str(daemon.journal_dir), "--type",
                        "connection-opened").stdout  # fmt: skip
    assert f" pid={pids[0]} uid={os.getuid()} gid={os.getgid()} admin=False connected=20" in text


def test_retention_keeps_the_record_of_a_connection_still_open(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A manager's connection registered early lives on while churn lets retention delete
    the segment with its ``connection-opened``: before deleting it, the daemon writes the
    record again (``repeat``), so the kept journal still names the pid and uid behind the
    ``conn`` of its later release. A connection closed meanwhile is not repeated."""
    config = tmp_path / "lockd.toml"
    config.write_text("journal_segment_bytes = 4096\njournal_retain_segments = 1\n")
    daemon = make_daemon("retain", None, "--config", str(config))
    vm, churner, other = (subprocess.Popen(["sleep", "600"]) for _ in range(3))
    children += [vm, churner, other]
    disk = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/early.img")}
    with daemon.client("early") as early, daemon.client("churn") as churn:
        conn = early.call("register", owner=an_owner(vm.pid, "vm"))["client"]
        early.call("acquire", leases=[disk], autocreate=True)
        with daemon.client("brief") as brief:
            closed = brief.call("register", owner=an_owner(other.pid, "brief"))["client"]
        (first,) = (row for row in events(daemon, "--type", "connection-opened")
                    if row["conn"] == conn)  # fmt: skip
        churn.call("register", owner=an_owner(churner.pid, "churn"))
        churn_past(daemon, churn, first["seq"])
        early.call("release", leases=[disk])
    rows = events(daemon)
    (released,) = (row for row in rows if row["type"] == "lease-released"
                   and row["resource"] == disk["resource"])  # fmt: skip
    assert released["conn"] == conn
    named = [row for row in rows if row["type"] == "connection-opened"
             and row["conn"] == conn and row["seq"] < released["seq"]]  # fmt: skip
    assert named, "the kept journal does not say who conn is"
    assert named[-1]["repeat"] is True
    assert {key: named[-1][key] for key in ("pid", "uid", "gid", "admin", "connected")} == {
        key: first[key] for key in ("pid", "uid", "gid", "admin", "connected")
    }
    assert (first["pid"], first["uid"]) == (os.getpid(), os.getuid())
    assert "repeat" not in first
    assert not [row for row in rows if row["type"] == "connection-opened"
                and row["conn"] == closed]  # fmt: skip
    text = daemon.lockd("events", "--journal-dir", str(daemon.journal_dir), "--since",
                        str(named[-1]["seq"]), "--type", "connection-opened").stdout  # fmt: skip
    assert f"conn={conn} pid={os.getpid()}" in text
    assert "repeat=True" in text


def an_owner(pid: int, name: str) -> dict[str, Any]:
    return {"uuid": uuid.uuid4().bytes, "name": name, "id": 1, "pid": pid}


def churn_past(daemon: DaemonProcess, churn: Client, seq: int) -> None:
    """Acquire and release with ``churn`` (registered) until retention has deleted the
    journal up to ``seq`` (a snapshot is written by a child, and its segments go once it
    is: churn on until they have)."""
    lease = {"lockspace": FILES_LOCKSPACE, "resource": "churn"}

    def deleted() -> bool:
        oldest = min(
            int(path.name[len("journal-") : -len(".cbor")])
            for path in daemon.journal_dir.glob("journal-*.cbor")
        )
        if oldest > seq:
            return True
        for _ in range(20):
            churn.call("acquire", leases=[lease], autocreate=True)
            churn.call("release", leases=[lease])
        return False

    wait_for(deleted, timeout=30)


def test_release_cli_and_wait(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """`lockd release` frees a lease; an acquire with --wait gets it once it is free."""
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    pid = str(sleeper.pid)
    assert daemon.lockd("acquire", "--owner-pid", pid, "--disk", "/vm/w.img").returncode == 0
    other = subprocess.Popen(["sleep", "600"])
    children.append(other)
    waiter = subprocess.Popen(
        [*LOCKD, "acquire", "--owner-pid", str(other.pid), "--disk", "/vm/w.img", "--wait", "20"],
        env=daemon.env,
    )
    children.append(waiter)
    time.sleep(0.3)
    assert waiter.poll() is None
    done = daemon.lockd("release", "--owner-pid", pid, "--disk", "/vm/w.img")
    assert done.returncode == 0, done.stderr
    assert waiter.wait(20) == 0
    assert _owner_pids(daemon) == {other.pid}
    again = daemon.lockd("release", "--owner-pid", pid, "--disk", "/vm/w.img")
    assert again.returncode == 1
    # The disk, not a hash; and not the "pid-N" name this release registered with.
    name = lease_name_for_path("/vm/w.img")
    assert f"disk /vm/w.img is not held by pid {pid} (lease {FILES_LOCKSPACE}/{name})\n" in (
        again.stderr
    )


def test_release_cli_says_a_shared_lease_held_more_than_once_is_still_held(
    counting_daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """A VM holds a shareable image twice (two devices): ``lockd release --disk`` ends one
    hold. It said only "released 1 lease(s)", and the operator took the image for free;
    it now says the disk is still held, how many times, and that --all ends every hold."""
    daemon = counting_daemon  # shared_holds = "each"
    sleeper = _holding_the_base_image(daemon, children, 3)
    pid = str(sleeper.pid)
    done = daemon.lockd("release", "--owner-pid", pid, "--disk", "/vm/base.img")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"released 1 lease(s) of pid {pid}\n"
        f"disk /vm/base.img is still held by pid {pid} (2 more holds: a shared lease asked "
        "for more than once ends one hold per release; --all ends every hold)\n"
    )
    daemon.lockd("release", "--owner-pid", pid, "--disk", "/vm/base.img")
    done = daemon.lockd("release", "--owner-pid", pid, "--disk", "/vm/base.img")
    assert done.stdout == f"released 1 lease(s) of pid {pid}\n"
    assert _owner_pids(daemon) == set()


def test_release_cli_with_a_request_id_repeated_ends_one_hold_only(
    counting_daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """``lockd release --request-id`` run twice (a script's retry after a lost reply) ends
    one hold of a shareable image held twice, and says so; another id ends the other."""
    daemon = counting_daemon  # shared_holds = "each"
    sleeper = _holding_the_base_image(daemon, children, 2)
    pid = str(sleeper.pid)
    detach = ["release", "--owner-pid", pid, "--disk", "/vm/base.img", "--request-id"]
    assert daemon.lockd(*detach, "vm/disk1").returncode == 0
    done = daemon.lockd(*detach, "vm/disk1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        f"released 1 lease(s) of pid {pid} already, by the first release with request id "
        "'vm/disk1': nothing more\ndisk /vm/base.img is still held by pid"
    )
    assert _owner_pids(daemon) == {sleeper.pid}
    done = daemon.lockd(*detach, "vm/disk2", "--json")
    assert json.loads(done.stdout) == {"released": 1}
    assert _owner_pids(daemon) == set()
    done = daemon.lockd("release", "--owner-pid", pid, "--all", "--request-id", "x")
    assert done.returncode == 2
    assert "--request-id names a release of --disk/--lease, not --all" in done.stderr


def test_release_json_of_a_lease_not_held_gives_the_daemons_code(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """``lockd release --json`` of a disk the process does not hold: ``code`` is the
    daemon's ``not-held`` (README: null only for a mistake found before asking it), so a
    script can tell "already released" from other failures; it was null."""
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    done = daemon.lockd("release", "--json", "--owner-pid", str(sleeper.pid), "--disk", "/vm/n.img")
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "not-held"
    assert error["message"].startswith(f"disk /vm/n.img is not held by pid {sleeper.pid}")


def test_owner_whose_connection_closes_is_fenced(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """A running owner that drops its own connection loses its leases and gets SIGTERM."""
    owner = start_dropping_owner(daemon, children, ignore_sigterm=False)
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "got SIGTERM"
    assert owner.wait(10) == 0
    kinds = [(e["type"], e.get("reason")) for e in events(daemon)]
    assert ("lease-released", "disconnect") in kinds
    fenced = list(events(daemon, "--type", "owner-fenced"))
    assert fenced[0]["signal"] == "SIGTERM"


def test_garbage_on_the_socket_leaves_others_untouched(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """Random bytes, a huge length prefix and bad requests: errors, and the VM keeps its lease."""
    start_run(daemon, children, "--disk", "/vm/g.img", "--name", "vm1")
    for junk in (b"\xff" * 64, struct.pack(">I", 2**31) + b"x", b"\x00\x00\x00\x02\xa1"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(daemon.socket))
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    with daemon.client() as client:
        with pytest.raises(RemoteError) as bad:
            client.call("acquire", leases=[{"lockspace": "../etc", "resource": "x"}])
        assert bad.value.code == "invalid-argument"
        with pytest.raises(RemoteError) as unregistered:
            client.call("acquire", leases=[{"lockspace": FILES_LOCKSPACE, "resource": "x"}])
        assert unregistered.value.code == "not-registered"
        with pytest.raises(RemoteError) as unknown:
            client.call("frobnicate")
        assert unknown.value.code == "invalid-argument"
        assert client.call("status")["leases"] == 1
    assert probe(lease_file(daemon, "/vm/g.img"), "ofd") == "busy"


def test_restrict_is_one_way(daemon: DaemonProcess) -> None:
    """After restrict, every request is refused with `restricted`."""
    with daemon.client() as client:
        client.call("restrict")
        for op in ("status", "restrict", "list-leases"):
            with pytest.raises(RemoteError) as exc:
                client.call(op)
            assert exc.value.code == "restricted"


def test_register_someone_elses_pid_as_root(daemon: DaemonProcess) -> None:
    """Root may register any process as owner (as libvirtd does for its VMs)."""
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        owner = {"uuid": uuid.uuid4().bytes, "name": "x", "id": 1, "pid": sleeper.pid}
        with daemon.client() as client:
            assert client.call("register", owner=owner)["owner"]["pid"] == sleeper.pid
        with daemon.client() as client:
            owner["pid"] = 2**22 + 7  # above pid_max: no such process
            with pytest.raises(RemoteError) as exc:
                client.call("register", owner=owner)
            assert exc.value.code == "not-found"
    finally:
        sleeper.kill()
        sleeper.wait()


def _as_nobody(path: Path) -> bytes:
    """Connect as uid 65534 from a forked child; return what the daemon sent before closing."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(path))
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            os.write(write_end, data)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data


@pytest.mark.skipif(os.geteuid() != 0, reason="playing another uid takes root")
def test_peer_of_another_uid_is_refused(make_daemon: MakeDaemon) -> None:
    """Even with the socket opened up by mistake, SO_PEERCRED keeps other uids out; the
    refusal says which setting would let the uid in."""
    import tempfile

    socket_dir = Path(tempfile.mkdtemp(prefix="lockd-peercred-"))
    try:
        os.chmod(socket_dir, 0o711)  # noqa: S103 - the misconfiguration under test
        daemon = make_daemon("peercred", None, socket_dir=socket_dir)
        os.chmod(daemon.socket, 0o666)  # noqa: S103 - the misconfiguration under test
        reply = _as_nobody(daemon.socket)
        assert b"permission-denied" in reply
        assert b"uid 65534 may not use this daemon (not in its allowed_uids)" in reply
        assert daemon.lockd("status").returncode == 0
    finally:
        for name in os.listdir(socket_dir):
            os.unlink(socket_dir / name)
        os.rmdir(socket_dir)


def test_admin_disconnect_ends_the_owners_leases(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """`lockd disconnect ID` on the admin socket: the VM's leases end and the VM is fenced."""
    vm = start_run(daemon, children, "--disk", "/vm/d.img", "--name", "vm1")
    rows = json.loads(daemon.lockd("clients", "--json").stdout)
    (row,) = [r for r in rows if r.get("owner", {}).get("pid") == vm.pid]
    assert row["restricted"] is True
    assert row["name"] == "lockd-run vm1"  # what the connection called itself in hello
    text = daemon.lockd("clients").stdout
    # The flags apart from the count: "1 lease(s) restricted" read as one restricted lease.
    assert f"lockd-run vm1  owner vm1 (pid {vm.pid}), 1 lease(s); restricted  since" in text
    refused = daemon.lockd("disconnect", "--admin-socket", str(daemon.socket), str(row["id"]))
    assert refused.returncode == 1
    assert "admin socket" in refused.stderr
    done = daemon.lockd("disconnect", str(row["id"]))
    assert done.returncode == 0, done.stderr
    assert vm.wait(10) == -signal.SIGTERM
    assert not lease_file(daemon, "/vm/d.img").exists()
    reasons = [e.get("reason") for e in events(daemon, "--type", "lease-released")]
    assert reasons[-1] == "admin"


def test_the_journal_names_the_operator_who_disconnected_a_vm(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """An auditor asking why a VM was killed read only "admin disconnect": the admin
    socket may serve several uids (``allowed_uids``), and neither the journal nor the
    log said which one asked. The fence's reason names the operator's uid and pid."""
    vm = start_run(daemon, children, "--disk", "/vm/d.img", "--name", "vm1")
    rows = json.loads(daemon.lockd("clients", "--json").stdout)
    (row,) = [r for r in rows if r.get("owner", {}).get("pid") == vm.pid]
    operator = subprocess.Popen(
        [*LOCKD, "disconnect", str(row["id"])], env=daemon.env, stdout=subprocess.PIPE
    )
    children.append(operator)
    assert operator.wait(30) == 0
    assert vm.wait(10) == -signal.SIGTERM
    (fenced,) = events(daemon, "--type", "owner-fenced")
    who = f"uid {os.getuid()}, pid {operator.pid}"
    assert fenced["reason"] == f"admin disconnect by {who}"
    assert fenced["owner"]["pid"] == vm.pid
    assert f"client {row['id']} disconnected by an operator ({who})" in daemon.log.read_text()


def test_a_lockspace_that_does_not_exist_is_named_with_the_directory_looked_for(
    daemon: DaemonProcess,
) -> None:
    """``lockd run --lease foo/bar`` said only "lockspace foo does not exist": not where
    the daemon looked (a lock directory not mounted reads the same) nor how to make it."""
    done = daemon.lockd("run", "--lease", "foo/bar", "--name", "vm", "--", "true")
    assert done.returncode == 1
    assert (
        f"not-found: lockspace foo does not exist: no directory {daemon.lock_dir / 'foo'} "
        "(create-lockspace makes it; or is the lock directory's storage not mounted?)"
    ) in done.stderr


def test_a_lockspace_directory_removed_under_the_daemon_is_named_and_made_again_by_hand(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """An operator's cleanup removes the disks' lockspace directory while a VM holds a
    lease in it. A new acquire said "no file .../org.libvirt.lockd.index (... an
    acquire with autocreate makes it)", to an acquire with autocreate: it says the
    directory is gone and how to make it, and makes nothing (a shared lock directory
    not mounted would hand out locks no other host sees). `create-lockspace` makes it
    again; the held lease is locked again there, and acquires work."""
    start_run(daemon, children, "--disk", "/vm/held.img", "--name", "vm1")
    space = daemon.lock_dir / FILES_LOCKSPACE
    shutil.rmtree(space)
    done = daemon.lockd("run", "--disk", "/vm/new.img", "--name", "vm2", "--", "true")
    assert done.returncode == 1
    assert (
        f"lockspace directory {space} is gone (removed, or its filesystem not mounted)"
        in done.stderr
    ), done.stderr
    assert f"`lockd create-lockspace {FILES_LOCKSPACE}`" in done.stderr
    assert "org.libvirt.lockd.index" not in done.stderr
    created = daemon.lockd("create-resource", f"{FILES_LOCKSPACE}/vm9")
    assert created.returncode == 1
    assert f"lockspace directory {space} is gone" in created.stderr, created.stderr
    assert not space.exists()
    made = daemon.lockd("create-lockspace", FILES_LOCKSPACE)
    assert made.returncode == 0, made.stderr
    held = lease_file(daemon, "/vm/held.img")
    wait_for(lambda: held.exists() and probe(held, "ofd") == "busy", timeout=20)
    start_run(daemon, children, "--disk", "/vm/new.img", "--name", "vm2")
    assert probe(lease_file(daemon, "/vm/new.img"), "ofd") == "busy"
    check(daemon)


def test_a_well_known_lockspace_that_cannot_be_made_at_start_up_is_logged(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """``[lockspaces]`` mapping the LVM lockspace to storage not mounted yet: the daemon
    serves without it, and its log says why (the mkdir error vanished, unlogged)."""
    lvm = tmp_path / "not-mounted" / "lvm"
    config = tmp_path / "lockd.toml"
    config.write_text(f'[lockspaces]\n"{LVM_LOCKSPACE}" = "{lvm}"\n')
    daemon = make_daemon("d", None, "--config", str(config))
    log = daemon.log.read_text()
    assert f"cannot create lockspace {LVM_LOCKSPACE} at {lvm}: No such file or directory" in log
    with daemon.client() as client:
        names = [ls["name"] for ls in client.call("list-lockspaces")["lockspaces"]]
    assert LVM_LOCKSPACE not in names
    assert FILES_LOCKSPACE in names


def test_disconnect_json_prints_the_client_it_closed(daemon: DaemonProcess) -> None:
    """``lockd disconnect --json ID`` printed nothing at all on success, where every other
    ``--json`` prints the daemon's answer: a script had an empty stdout to parse."""
    with daemon.client("to-close") as victim:
        rows = json.loads(daemon.lockd("clients", "--json").stdout)
        (row,) = [r for r in rows if r["pid"] == os.getpid()]
        done = daemon.lockd("disconnect", "--json", str(row["id"]))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"client": row["id"]}
        with pytest.raises(ConnectionError):  # ConnectionLostError, or a reset
            victim.call("status")


def test_events_follow_prints_new_events(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """`lockd events --follow --json` prints an acquire as it happens, and costs next to
    no CPU in between (it sleeps until the journal changes; it polled every 10 ms)."""
    follower = subprocess.Popen(
        [*LOCKD, "events", "--follow", "--json", "--journal-dir", str(daemon.journal_dir),
         "--type", "lease-acquired"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    children.append(follower)  # type: ignore[arg-type]
    start_run(daemon, children, "--disk", "/vm/f.img", "--name", "vm-follow")
    assert follower.stdout is not None
    event = json.loads(follower.stdout.readline())
    assert event["type"] == "lease-acquired"
    assert event["owner"]["name"] == "vm-follow"
    assert event["mode"] == "exclusive"
    before = _cpu_ticks(follower.pid)
    time.sleep(3.0)
    assert _cpu_ticks(follower.pid) - before <= 2  # 10 ms ticks; polling took about 6
    start_run(daemon, children, "--disk", "/vm/g.img", "--name", "vm-later")
    assert json.loads(follower.stdout.readline())["owner"]["name"] == "vm-later"


def test_unreachable_daemon_exit_code(tmp_path: Path) -> None:
    """No daemon: exit 69 and a hint."""
    done = subprocess.run(
        [*LOCKD, "status", "--socket", str(tmp_path / "none.sock")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 69
    assert "lockd serve" in done.stderr


def test_max_clients(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """Past max_clients a connection gets a clear error; the others keep working."""
    config = tmp_path / "lockd.toml"
    config.write_text("max_clients = 2\n")
    daemon = make_daemon("small", None, "--config", str(config))
    with daemon.client() as first, daemon.client() as second:
        with pytest.raises(RemoteError) as exc:
            Client(str(daemon.socket))
        assert "max_clients=2" in exc.value.message
        assert first.call("status")["clients"] == 2
        assert second.call("status")["clients"] == 2


@pytest.mark.parametrize("then", ["stop", "re-exec"])
def test_a_client_refused_in_a_loop_does_not_fill_the_log(
    make_daemon: MakeDaemon, tmp_path: Path, then: str
) -> None:
    """A manager that retries at once when refused at max_clients is told why every
    time, but the log says so once (then at most once a minute, with how many were not
    logged): a line per attempt filled an operator's disk, or journald's rate limit,
    which then dropped lockd's fencing lines too. A stop or a re-exec within the minute
    logs the count first: its timer went with the process, and the count unsaid."""
    config = tmp_path / "lockd.toml"
    config.write_text("max_clients = 2\n")
    daemon = make_daemon("small", None, "--config", str(config))
    with daemon.client() as first, daemon.client():
        for _ in range(300):
            with pytest.raises(RemoteError, match="max_clients=2"):
                Client(str(daemon.socket))
        assert first.call("status")["clients"] == 2
    assert daemon.log.read_text().count("refused a connection") == 1
    count = "299 more refused so since the last such line, not logged; the latest: "
    assert count not in daemon.log.read_text()
    assert daemon.proc is not None
    if then == "stop":
        daemon.stop()
    else:
        daemon.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: journaled(daemon, "daemon-started") == 2)
    assert count in daemon.log.read_text()


def test_sigterm_releases_nothing_and_journals_the_stop(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """Stopping the daemon neither releases leases in the journal nor signals the VM."""
    vm = start_run(daemon, children, "--disk", "/vm/s.img", "--name", "vm1")
    daemon.stop()
    assert daemon.proc is not None
    assert daemon.proc.returncode == 0
    time.sleep(0.2)
    assert vm.poll() is None  # the VM was not killed
    kinds = [e["type"] for e in events(daemon)]
    assert kinds[-1] == "daemon-stopped"
    assert "lease-released" not in kinds
    assert not daemon.socket.exists()


def test_idle_timeout_and_pid_file(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """--timeout: exits once idle with no clients and no leases; --pid-file holds its pid."""
    pid_file = tmp_path / "run" / "lockd.pid"
    daemon = make_daemon("idle", None, "--timeout", "1", "--pid-file", str(pid_file))
    assert daemon.proc is not None
    assert pid_file.read_text().strip() == str(daemon.proc.pid)
    assert daemon.proc.wait(15) == 0
    assert not pid_file.exists()
    assert "idle" in daemon.log.read_text()


def test_metrics_and_log_level_on_the_admin_socket(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    # Series alerts watch exist at 0 before their first increment (rate() would miss it).
    fresh = daemon.lockd("metrics").stdout
    for series in ("lockd_leases_lost_total 0", "lockd_journal_write_errors_total 0",
                   'lockd_fence_actions_total{signal="SIGKILL"} 0',
                   'lockd_journal_snapshots_total{result="failed"} 0',
                   "lockd_replay_failures_total 0", "lockd_journal_sync_errors_total 0",
                   'lockd_event_subscribers{state="live"} 0',
                   'lockd_event_subscribers{state="catching-up"} 0'):  # fmt: skip
        assert f"\n{series}\n" in fresh
    # --json, as every command's: the same text, in the daemon's answer (it printed the text).
    assert json.loads(daemon.lockd("metrics", "--json").stdout)["text"].startswith("# HELP")
    start_run(daemon, children, "--disk", "/vm/m.img", "--name", "vm1")
    assert (
        daemon.lockd("run", "--disk", "/vm/m.img", "--name", "vm2", "--", "true").returncode == 75
    )
    sleeper = subprocess.Popen(["sleep", "60"])
    children.append(sleeper)
    waited = daemon.lockd("acquire", "--owner-pid", str(sleeper.pid), "--disk", "/vm/m.img",
                          "--wait", "0.5")  # fmt: skip
    assert waited.returncode == 75
    text = daemon.lockd("metrics").stdout
    # One request each, however many attempts the waiting one made; each attempt conflicts.
    assert 'lockd_acquires_total{result="busy"} 2' in text
    conflicts = re.search(r"^lockd_conflicts_total (\d+)", text, re.MULTILINE)
    assert conflicts is not None
    assert int(conflicts.group(1)) > 2
    assert "# TYPE lockd_acquires_total counter" in text
    assert 'lockd_acquires_total{result="ok"} 1' in text
    assert 'lockd_leases_held{lockspace="org.libvirt.lockd.files",mode="exclusive"} 1' in text
    assert "lockd_recovery_duration_seconds" in text
    assert "lockd_journal_bytes_total" in text
    assert "\nlockd_fences_in_progress 0\n" in text
    # The collector: counted by generation, and the state recovery built frozen.
    assert "# TYPE python_gc_collections_total counter" in text
    assert 'python_gc_collections_total{generation="2"}' in text
    frozen = re.search(r"^lockd_gc_frozen_objects (\d+)$", text, re.MULTILINE)
    assert frozen is not None
    assert int(frozen.group(1)) > 0
    shown = daemon.lockd("log-level", "--json")
    assert shown.returncode == 0, shown.stderr
    changed = daemon.lockd("log-level", "warning", "--filters", "debug:actors.owners", "--json")
    assert json.loads(changed.stdout)["filters"] == "debug:actors.owners"
    refused = daemon.lockd("log-level", "--filters", "loud:x")
    assert refused.returncode == 2  # a usage error, found by the daemon
    assert "bad log filter" in refused.stderr
    typo = daemon.lockd("log-level", "--filters", "debug:actors.owner")
    assert typo.returncode == 2
    assert "no module 'actors.owner' in lockd" in typo.stderr
    assert json.loads(daemon.lockd("log-level", "--json").stdout)["filters"] == (
        "debug:actors.owners"
    )
    clients = json.loads(daemon.lockd("clients", "--json").stdout)
    assert [c["leases"] for c in clients if "owner" in c] == [1]


def test_metrics_merge_into_node_exporters_textfile_collector(daemon: DaemonProcess) -> None:
    """Hosts ship ``lockd metrics`` through node_exporter's textfile collector, which
    exports process_*, go_*, promhttp_* and node_* families of its own: a lockd family of
    one of those names clashed (lockd's fd limit was process_max_fds), and node_exporter
    logged an error at every scrape and kept only one of the two."""
    text = daemon.lockd("metrics").stdout
    families = re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)
    assert "lockd_max_fds" in families
    owned = ("process_", "go_", "promhttp_", "node_")
    assert [name for name in families if name.startswith(owned)] == []


def test_a_pid_file_locked_by_another_daemon_stops_the_start_before_anything(
    tmp_path: Path,
) -> None:
    """A pid file another daemon holds: a one-line error naming its pid, exit 1. It was
    a traceback, after the journal was replayed and written and both socket files bound
    (and left behind)."""
    pid_file = tmp_path / "run" / "lockd.pid"
    pid_file.parent.mkdir()
    pid_file.write_text("4242\n")
    held = os.open(pid_file, os.O_RDWR)
    try:
        fcntl.lockf(held, fcntl.LOCK_EX)
        done = subprocess.run(
            [*LOCKD, "serve", "--socket", str(tmp_path / "lockd.sock"),
             "--lock-dir", str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "journal"),
             "--pid-file", str(pid_file)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(held)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"lockd serve: pid file {pid_file} is locked by a running daemon (pid 4242)" in (
        done.stderr
    )
    assert not (tmp_path / "lockd.sock").exists()
    assert not (tmp_path / "lockd-admin.sock").exists()
    assert not (tmp_path / "journal").exists()
    assert pid_file.read_text() == "4242\n"  # the other daemon's, untouched


def test_a_start_that_cannot_bind_the_admin_socket_leaves_no_client_socket_file(
    tmp_path: Path,
) -> None:
    """The client socket is bound first: a start that then failed on the admin socket
    exited with the client socket's file left behind, looking like a daemon's."""
    (tmp_path / "afile").write_text("")
    done = subprocess.run(
        [*LOCKD, "serve", "--socket", str(tmp_path / "run" / "lockd.sock"),
         "--admin-socket", str(tmp_path / "afile" / "admin.sock"),
         "--lock-dir", str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "journal")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_NEEDS_OPERATOR, done.stderr  # a file on the way to it
    assert "admin_socket" in done.stderr
    assert not (tmp_path / "run" / "lockd.sock").exists()


def test_a_start_error_on_a_journal_stream_is_at_priority_error(tmp_path: Path) -> None:
    """Under lockd.service stderr is the journal, which takes an unmarked line for info:
    "lockd serve: ... unknown key" did not show in `journalctl -p err`."""
    config = tmp_path / "lockd.toml"
    config.write_text("journal_synk = 'batch'\n")
    err = tmp_path / "stderr"
    with err.open("w") as out:
        st = os.fstat(out.fileno())
        done = subprocess.run(
            [*LOCKD, "serve", "--config", str(config)], stderr=out, timeout=60, check=False,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )  # fmt: skip
    assert done.returncode == 2
    assert err.read_text().startswith("<3>lockd serve: ")
    assert "unknown key 'journal_synk'" in err.read_text()


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('max_clients = 8\nlog_filters = "debug:actors"\n'
                    '[lockspaces]\n"org.example.san" = "/srv/san-locks"\n')  # fmt: skip
    done = subprocess.run([*LOCKD, "serve", "--config", str(good), "--check-config"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# configuration ok ({good})\n")
    assert "\nmax_clients = 8\n" in done.stdout
    # Values as the file writes them, not Python reprs; unset ones (TOML has no null)
    # as comments.
    assert '\nlog_filters = "debug:actors"\n' in done.stdout
    assert '\njournal_sync = "none"\n' in done.stdout
    assert "\n# pid_file is not set\n" in done.stdout
    # Pasted into a file, the output is that configuration: it checks the same.
    printed = tomllib.loads(done.stdout)
    assert printed["lockspaces"] == {"org.example.san": "/srv/san-locks"}
    pasted = tmp_path / "pasted.toml"
    pasted.write_text(done.stdout)
    again = subprocess.run([*LOCKD, "serve", "--config", str(pasted), "--check-config"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout.replace(str(pasted), str(good)) == done.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("\nmax_clients = 8\njournal_synk = 'batch'\n")
    done = subprocess.run([*LOCKD, "serve", "--config", str(bad), "--check-config"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "bad.toml:3: unknown key 'journal_synk' (did you mean 'journal_sync'?)" in done.stderr


def test_lockd_run_starts_a_per_user_daemon_when_none_runs(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """virtlockd's auto-spawn: one command works on a fresh login, and the daemon goes away."""
    config = tmp_path / "lockd.toml"
    config.write_text(
        f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{tmp_path / "journal"}"\n'
    )
    sock = tmp_path / "run" / "lockd.sock"
    env = {
        **os.environ,
        "LOCKD_AUTOSPAWN": "1",  # we run as root here; users other than root get it by default
        "LOCKD_AUTOSPAWN_TIMEOUT": "1",
        "LOCKD_CONFIG": str(config),
        "LOCKD_SOCKET": str(sock),
        "LOCKD_ADMIN_SOCKET": str(tmp_path / "run" / "admin.sock"),
    }
    vm = subprocess.Popen([*LOCKD, "run", "--disk", "/vm/auto.img", "--name", "vm", "--",
                           "sleep", "600"], env=env)  # fmt: skip
    children.append(vm)
    path = tmp_path / "locks" / FILES_LOCKSPACE / lease_name_for_path("/vm/auto.img")

    def vm_holds_it() -> bool:  # the daemon's word first: a probe would race the acquire
        if vm.poll() is not None or not sock.exists():
            return vm.poll() is not None
        try:
            with Client(str(sock), timeout=5) as client:
                leases = client.call("list-leases")["leases"]
        except OSError:
            return False
        return any(o["pid"] == vm.pid for lease in leases for o in lease["owners"])

    wait_for(vm_holds_it, timeout=20)
    assert vm.poll() is None
    assert probe(path, "ofd") == "busy"
    status = subprocess.run([*LOCKD, "status", "--json"], env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    daemon_pid = json.loads(status.stdout)["pid"]
    vm.kill()
    vm.wait()
    # Idle (no clients, no leases) for its timeout: the spawned daemon exits by itself.
    wait_for(lambda: not os.path.exists(f"/proc/{daemon_pid}"), timeout=20)
    assert "idle" in (tmp_path / "run" / "lockd.log").read_text()
    done = subprocess.run([*LOCKD, "events", "--journal-dir", str(tmp_path / "journal"),
                           "--json", "--type", "lease-released"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(done.stdout.splitlines()[-1])["reason"] == "owner-exit"
    no_spawn = subprocess.run([*LOCKD, "status"], env={**env, "LOCKD_AUTOSPAWN": "1"},
                              capture_output=True, text=True, check=False)  # fmt: skip
    assert no_spawn.returncode == 69  # status never spawns a daemon


def test_a_client_whose_daemon_lost_the_start_race_waits_for_the_winner(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """Two VMs start on a fresh login at once: each client starts a daemon, and one
    daemon wins the journal. The other exits "journal in use" before the winner
    listens; its client must wait for the winner, not fail. The test holds the journal
    lock as the winner would, then starts the winner itself."""
    journal = tmp_path / "journal"
    journal.mkdir()
    config = tmp_path / "lockd.toml"
    config.write_text(f'lock_dir = "{tmp_path / "locks"}"\njournal_dir = "{journal}"\n')
    sock = tmp_path / "run" / "lockd.sock"
    admin = tmp_path / "run" / "admin.sock"
    env = {**os.environ, "LOCKD_AUTOSPAWN": "1", "LOCKD_AUTOSPAWN_TIMEOUT": "1",
           "LOCKD_CONFIG": str(config), "LOCKD_SOCKET": str(sock),
           "LOCKD_ADMIN_SOCKET": str(admin)}  # fmt: skip
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    winner_lock = os.open(journal / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(winner_lock, fcntl.LOCK_EX)
    client = subprocess.Popen(
        [*LOCKD, "acquire", "--owner-pid", str(vm.pid), "--disk", "/vm/a.img", "--name", "vm"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    children.append(client)  # type: ignore[arg-type]
    winner: subprocess.Popen[bytes] | None = None
    try:
        wait_for(
            lambda: "in use" in _text_of(sock.parent / "lockd.log") or client.poll() is not None
        )
        assert client.poll() is None, client.communicate()
        os.close(winner_lock)  # the winner, done with its start-up, now listens
        winner = subprocess.Popen(
            [*LOCKD, "serve", "--socket", str(sock), "--admin-socket", str(admin),
             "--timeout", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        children.append(winner)
        _, err = client.communicate(timeout=30)
        assert client.returncode == 0, err
        status = subprocess.run([*LOCKD, "status", "--json"], env=env, capture_output=True,
                                text=True, check=True)  # fmt: skip
        assert json.loads(status.stdout)["pid"] == winner.pid
        assert json.loads(status.stdout)["leases"] == 1
    finally:
        vm.kill()
        vm.wait()
        if winner is not None:  # idle once its owner is gone: it exits by itself
            winner.wait(timeout=20)


def _text_of(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return sum(int(x) for x in stat.rsplit(")", 1)[1].split()[11:13])


def test_running_out_of_descriptors_is_survived(daemon: DaemonProcess) -> None:
    """EMFILE on accept: a log line, no busy loop, and service resumes when fds free up."""
    import resource

    assert daemon.proc is not None
    pid = daemon.proc.pid
    used = len(os.listdir(f"/proc/{pid}/fd"))
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 5, old[1]))  # soft limit only
    extra: list[socket.socket] = []
    try:
        for _ in range(15):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(daemon.socket))
            extra.append(s)
        wait_for(lambda: "cannot accept connections" in daemon.log.read_text())
        before = _cpu_ticks(pid)
        time.sleep(1.0)
        assert _cpu_ticks(pid) - before < 50  # ticks: well under half a CPU, not spinning
    finally:
        for s in extra:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    wait_for(lambda: daemon.lockd("status").returncode == 0)
    assert "accepting connections again" in daemon.log.read_text()


def test_bench_scenarios_json(daemon: DaemonProcess) -> None:
    """`lockd bench --json` runs every scenario and reports the documented keys."""
    done = daemon.lockd(
        "bench", "--json", "--ops", "30", "--warmup", "5", "--tp-ops", "40",
        "--concurrency", "1,2", "--scenarios", "sequential,concurrent,shared,many-owners",
        "--owners", "6", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ("pair_median_us", "pair_p99_us", "pair_p999_us", "pairs_per_s"):
        assert result["sequential"][key] > 0
    # The daemon (found through SO_PEERCRED) is measured too; 30 pairs may take < 1 tick.
    assert result["sequential"]["daemon_cpu_us_per_pair"] >= 0
    assert all(c["daemon_cpu_us_per_pair"] >= 0 for c in result["concurrent"])
    assert [c["concurrency"] for c in result["concurrent"]] == [1, 2]
    assert [c["total_pairs"] for c in result["shared"]] == [40, 40]
    assert result["many_owners"]["leases"] == 24
    assert result["many_owners"]["median_vs_empty"] > 0
    floor = result["floor"]
    for key in ("fcntl_pair_us", "socket_rpc_us", "python_server_rpc_us",
                "virtlockd_files_pair_us", "lockd_files_pair_us", "journal_pair_us"):  # fmt: skip
        assert floor[key] > 0, key
    wait_for(lambda: daemon.lockd("leases", "--json").stdout.strip() == "[]")  # fillers gone
    bad = daemon.lockd("bench", "--scenarios", "warp-speed")
    assert bad.returncode == 2


def test_a_daemon_out_of_descriptors_says_how_to_fix_it_and_recovers(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]]
) -> None:
    """At its fd limit (64 here) an acquire is refused with io-error naming the limit and
    LimitNOFILE, the log says so once, nothing is half-held, both sockets still accept
    (spare descriptors), `lockd metrics` shows the limit, and a release makes room."""
    daemon = make_daemon("nofds")
    daemon.stop()
    daemon.launcher = ["prlimit", "--nofile=64:64"]
    daemon.start()
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    with daemon.client("libvirtd") as client:
        client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                       "pid": vm.pid})  # fmt: skip
        refused = None
        for i in range(64):
            disk = {"lockspace": FILES_LOCKSPACE, "resource": f"disk{i}"}
            try:
                client.call("acquire", autocreate=True, leases=[disk])
            except RemoteError as exc:
                refused = (i, exc)
                break
        assert refused is not None, "64 leases fit in 64 descriptors"
        i, error = refused
        assert error.code == "io-error"
        assert "all 64 of its file descriptors" in error.message
        assert "LimitNOFILE" in error.message
        held = listed(daemon)
        assert (FILES_LOCKSPACE, f"disk{i}") not in held
        assert len(held) == i
        assert daemon.log.read_text().count("refusing new leases") == 1
        # Clients take the last descriptors, then the client socket's spares, until one
        # waits unaccepted in the backlog; the admin socket's spares still let the
        # operator in.
        crowd: list[Client] = []
        try:
            for _ in range(16):
                try:
                    crowd.append(Client(str(daemon.socket), timeout=2, name="crowd"))
                except OSError:
                    break
            else:
                raise AssertionError("16 more clients fit: the fd limit was not reached")
            status = daemon.lockd("status", "--json", "--socket", str(daemon.admin_socket),
                                  timeout=10)  # fmt: skip
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["leases"] == i
        finally:
            for other in crowd:
                other.close()
        client.call("release", leases=[{"lockspace": FILES_LOCKSPACE, "resource": "disk0"}])
        # The freed descriptor serves an admin connection: the gauges to alert on
        # before acquires fail (leases held + owners with a pidfd + clients vs the limit).
        text = daemon.lockd("metrics").stdout
        assert "lockd_max_fds 64" in text
        assert (
            f'lockd_leases_held{{lockspace="{FILES_LOCKSPACE}",mode="exclusive"}} {i - 1}' in text
        )
        assert 'lockd_owners_watched{by="pidfd"} 1' in text
        client.call("acquire", autocreate=True,
                    leases=[{"lockspace": FILES_LOCKSPACE, "resource": f"disk{i}"}])  # fmt: skip
        assert (FILES_LOCKSPACE, f"disk{i}") in listed(daemon)
    check(daemon)


def test_owners_past_the_pidfd_budget_are_released_when_they_exit(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]]
) -> None:
    """A daemon short of descriptors (limit 128: 16 pidfds) polls the other owners: killed
    and reaped, they are released within about a second; a zombie, within five."""
    daemon = make_daemon("fewfds")
    daemon.stop()
    daemon.launcher = ["prlimit", "--nofile=128:128"]
    daemon.start()
    vms = []
    for i in range(24):
        vm = subprocess.Popen(["sleep", "600"])
        children.append(vm)
        vms.append(vm)
        with daemon.client("libvirtd") as client:  # a manager's connection, closed after
            client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": f"vm{i}",
                                           "id": 1, "pid": vm.pid})  # fmt: skip
            disk = {"lockspace": FILES_LOCKSPACE, "resource": f"disk{i}"}
            client.call("acquire", autocreate=True, leases=[disk])
    text = daemon.lockd("metrics").stdout
    assert 'lockd_owners_watched{by="pidfd"} 16' in text
    assert 'lockd_owners_watched{by="poll"} 8' in text
    zombie = vms.pop()  # polled (registered last): killed but not reaped by its parent
    zombie.kill()
    for vm in vms:
        vm.kill()
        vm.wait()
    # Reaped: gone at the next quick round (a second), pidfd or not; the zombie still
    # answers kill 0 and waits for a full round (five seconds), unless a pidfd freed
    # by the others reaches it first (when exactly depends on where the rounds
    # stand, so only the bound is checked).
    wait_for(lambda: set(listed(daemon)) <= {(FILES_LOCKSPACE, "disk23")}, timeout=5)
    wait_for(lambda: not listed(daemon), timeout=10)
    zombie.wait()
    released = events(daemon, "--type", "lease-released")
    assert len(released) == 24
    assert {e["reason"] for e in released} == {"owner-exit"}
    check(daemon)


def test_vms_booting_at_once_share_their_base_image(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """A host starting 16 VMs together: each VM's connection sends one acquire for its own
    disk and the shared base image, all before any reply is read. Every VM gets both, the
    base image is locked shared (another host can read it, not write it), and it is free
    once the last VM is gone."""
    base = {"lockspace": FILES_LOCKSPACE, "resource": "base", "shared": True}
    clients: list[Client] = []
    try:
        for i in range(16):
            vm = subprocess.Popen(["sleep", "600"])
            children.append(vm)
            client = daemon.client(f"vm{i}")
            clients.append(client)
            client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": f"vm{i}",
                                           "id": i + 1, "pid": vm.pid})  # fmt: skip
        own = [{"lockspace": FILES_LOCKSPACE, "resource": f"vm{i}"} for i in range(16)]
        sent = [c.request("acquire", autocreate=True, leases=[base, own[i]])
                for i, c in enumerate(clients)]  # fmt: skip
        for client, rid in zip(clients, sent, strict=True):
            client.result(rid)
    finally:
        for client in clients:
            client.close()
    pids = tuple(sorted(vm.pid for vm in children))
    assert listed(daemon)[(FILES_LOCKSPACE, "base")] == ("shared", pids)
    base_file = daemon.lock_dir / FILES_LOCKSPACE / "base"
    assert probe(base_file, "ofd", "read") == "free"
    assert probe(base_file, "ofd") == "busy"
    check(daemon)
    for vm in children:
        vm.kill()
        vm.wait()
    wait_for(lambda: not listed(daemon))
    assert not base_file.exists()  # autocreated: deleted with its last holder
    check(daemon)


def test_a_client_pipelines_requests_and_takes_their_replies_in_any_order(
    daemon: DaemonProcess,
) -> None:
    """`Client.request` sends without waiting; `result` finds each reply by its id, keeping
    the ones read while waiting for another, and a refusal stays with its own request."""
    with daemon.client() as client:
        lease = {"lockspace": FILES_LOCKSPACE, "resource": "never-registered"}
        first = client.request("status")
        refused = client.request("acquire", leases=[lease], autocreate=True)
        last = client.request("list-leases")
        assert client.result(last) == {"leases": []}
        with pytest.raises(RemoteError):
            client.result(refused)  # no owner registered on this connection
        assert client.result(first)["leases"] == 0
        assert client.call("status")["leases"] == 0  # the connection is still in step


def test_a_daemon_spawned_for_a_client_that_dies_at_once_is_reported_at_once(
    tmp_path: Path,
) -> None:
    """The started daemon exits (here: its config file is broken): the client says so,
    with the daemon's last words, instead of waiting out the whole start-up wait."""
    config = tmp_path / "lockd.toml"
    config.write_text("journal_sync = 'sometimes'\n")
    env = {**os.environ, "LOCKD_AUTOSPAWN": "1", "LOCKD_CONFIG": str(config),
           "LOCKD_SOCKET": str(tmp_path / "run" / "lockd.sock")}  # fmt: skip
    env.pop("LOCKD_ADMIN_SOCKET", None)
    started = time.monotonic()
    done = subprocess.run(
        [*LOCKD, "run", "--disk", "/vm/a.img", "--name", "vm", "--", "true"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert time.monotonic() - started < 10  # the wait is 15 s
    assert done.returncode == 69
    assert "it exited" in done.stderr
    assert "journal_sync" in done.stderr


def test_lockd_run_with_a_command_that_does_not_exist_takes_no_lease(
    daemon: DaemonProcess,
) -> None:
    """A typo after ``--``: found before any lease is taken. Found after, the failed exec
    closed a connection still holding the lease, and the daemon fenced the caller."""
    done = daemon.lockd("run", "--disk", "/vm/a.img", "--name", "vm1", "--", "/nonexistent")
    assert done.returncode == 127
    assert "cannot run /nonexistent" in done.stderr
    assert events(daemon, "--type", "lease-acquired") == []
    assert events(daemon, "--type", "owner-fenced") == []


@pytest.mark.parametrize(
    ("script", "says"),
    [
        pytest.param("echo no interpreter line\n",
                     "not a program the kernel can run (a script needs a #! line)",
                     id="no-shebang"),
        pytest.param("#!/nonexistent/interpreter\necho\n",
                     "its interpreter /nonexistent/interpreter (the #! line) does not exist",
                     id="missing-interpreter"),
    ],
)  # fmt: skip
def test_lockd_run_whose_exec_fails_gives_its_leases_back_unfenced(
    daemon: DaemonProcess, tmp_path: Path, script: str, says: str
) -> None:
    """An exec that fails where ``which`` cannot tell: the leases were already taken and
    the connection restricted. They are released, not left to a fence of the caller;
    the reason is said of the file that exists ("No such file or directory" would be
    about the interpreter, not the script)."""
    command = tmp_path / "start-vm"
    command.write_text(script)
    command.chmod(0o755)
    disk = tmp_path / "a.img"
    done = daemon.lockd("run", "--disk", str(disk), "--name", "vm1", "--", str(command))
    assert done.returncode == 126, done.stderr
    assert f"cannot run {command}: {says}" in done.stderr
    assert [e["reason"] for e in events(daemon, "--type", "lease-released")] == ["client"]
    assert events(daemon, "--type", "owner-fenced") == []
    again = daemon.lockd("run", "--disk", str(disk), "--name", "vm2", "--", "true")
    assert again.returncode == 0, again.stderr


def test_lockd_run_of_a_file_that_is_not_executable_takes_no_lease(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """A path that exists but cannot be executed (its mode, a noexec mount): 126, as a
    shell says, found before any lease is taken."""
    command = tmp_path / "start-vm"
    command.write_text("#!/bin/sh\n")
    command.chmod(0o644)
    done = daemon.lockd("run", "--disk", "/vm/a.img", "--name", "vm1", "--", str(command))
    assert done.returncode == 126
    assert f"cannot run {command}: not executable" in done.stderr
    on_path = subprocess.run(
        [*LOCKD, "run", "--disk", "/vm/a.img", "--name", "vm1", "--", "start-vm"],
        env={**daemon.env, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert on_path.returncode == 126
    assert "cannot run start-vm: not executable" in on_path.stderr
    assert events(daemon, "--type", "lease-acquired") == []


def test_lockd_run_whose_leases_cannot_be_given_back_says_why_before_it_is_fenced(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """The exec failed and the second connection is refused (``max_clients`` is 1): the
    leases stay, and closing the restricted connection brings the fence. The reason is
    on stderr before that, not lost to the SIGTERM."""
    config = tmp_path / "lockd.toml"
    config.write_text("max_clients = 1\n")
    daemon = make_daemon("full", None, "--config", str(config))
    command = tmp_path / "start-vm"
    command.write_text("echo no interpreter line\n")
    command.chmod(0o755)
    done = daemon.lockd("run", "--disk", "/vm/a.img", "--name", "vm1", "--", str(command))
    assert done.returncode in (1, -signal.SIGTERM), done.stderr
    assert f"cannot run {command}" in done.stderr
    assert "could not be given back" in done.stderr


def test_admin_commands_find_the_admin_socket_beside_the_given_socket(
    daemon: DaemonProcess,
) -> None:
    """``--socket`` alone: the admin socket beside it, as ``lockd serve`` puts it, never
    the default one (another daemon's, whose log level or clients it would change)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCKD_SOCKET", "LOCKD_ADMIN_SOCKET")}
    done = subprocess.run(
        [*LOCKD, "log-level", "--socket", str(daemon.socket), "--json"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert daemon.admin_socket == daemon.socket.parent / "lockd-admin.sock"


@pytest.mark.parametrize("command", [["status"], ["metrics"], ["clients"], ["events"]])
def test_output_to_a_reader_that_left_ends_quietly(
    daemon: DaemonProcess, command: list[str]
) -> None:
    """``lockd status | head -1``: the reader closes the pipe before lockd writes. That is
    no error of lockd's to report: no message, and the status a shell gives SIGPIPE."""
    if command == ["events"]:  # read from the journal files, no daemon asked
        command = [*command, "--journal-dir", str(daemon.journal_dir)]
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [*LOCKD, *command], env=daemon.env, stdout=write, stderr=subprocess.PIPE,
            text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize("command", ["acquire", "run"])
def test_ctrl_c_while_waiting_for_a_busy_disk_ends_quietly_holding_nothing(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], command: str
) -> None:
    """An operator gives up on ``--wait`` with Ctrl-C: the status a shell gives SIGINT
    (130), no traceback, and no lease taken for the interrupted owner."""
    holder = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    tail = ["--", "true"] if command == "run" else []
    owner = ["--owner-pid", str(os.getpid())] if command == "acquire" else []
    waiter = subprocess.Popen(
        [*LOCKD, command, "--disk", "/vm/a.img", "--name", "vm2", "--wait", "30", *owner,
         *tail],
        env=daemon.env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    children.append(waiter)  # type: ignore[arg-type]
    wait_for(lambda: "lockd_conflicts_total 1" in daemon.lockd("metrics").stdout)
    waiter.send_signal(signal.SIGINT)
    _, stderr = waiter.communicate(timeout=30)
    assert waiter.returncode == 130
    assert "Traceback" not in stderr
    key = (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img"))
    assert listed(daemon)[key] == ("exclusive", (holder.pid,))  # vm1's, and only vm1's


def test_a_disk_locked_by_another_host_is_named_in_the_busy_message(
    daemon: DaemonProcess,
) -> None:
    """Another host (here: this process, as virtlockd would) holds the lease file's lock.
    The user gave several disks: the message says which one is busy."""
    path = lease_file(daemon, "/vm/b.img")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
        done = daemon.lockd("acquire", "--owner-pid", str(os.getpid()), "--name", "vm1",
                            "--disk", "/vm/a.img", "--disk", "/vm/b.img")  # fmt: skip
    finally:
        os.close(fd)
    assert done.returncode == 75
    assert done.stderr.strip().endswith(
        f"disk /vm/b.img is busy: lease {FILES_LOCKSPACE}/{path.name} is held by another "
        "process or host"
    ), done.stderr
    assert listed(daemon) == {}  # all or nothing: a.img was given back


def test_a_retried_acquire_succeeds_and_keeps_what_the_owner_holds(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """``lockd acquire`` run again (a script retrying after a timeout) for leases its
    owner holds already: granted, as the plugin's retried acquire is, not "busy, held by
    vm3" (the owner itself). Asked in the other mode, it is still busy."""
    sleeper = subprocess.Popen(["sleep", "120"])
    children.append(sleeper)
    args = ["acquire", "--owner-pid", str(sleeper.pid), "--name", "vm3"]
    first = daemon.lockd(*args, "--disk", "/vm/c.img")
    assert first.returncode == 0, first.stderr
    again = daemon.lockd(*args, "--disk", "/vm/c.img", "--disk", "/vm/d.img")
    assert again.returncode == 0, again.stderr
    # Each disk as given, and the lease it is.
    for disk in ("/vm/c.img", "/vm/d.img"):
        name = f"{FILES_LOCKSPACE}/{lease_name_for_path(disk)}"
        assert f"acquired disk {disk} ({name}) exclusive for pid {sleeper.pid}" in again.stdout
    held = listed(daemon)
    for disk in ("/vm/c.img", "/vm/d.img"):
        assert held[(FILES_LOCKSPACE, lease_name_for_path(disk))] == ("exclusive", (sleeper.pid,))
    other_mode = daemon.lockd(*args, "--disk", "/vm/c.img:shared")
    assert other_mode.returncode == 75
    assert "disk /vm/c.img is busy" in other_mode.stderr


@pytest.mark.parametrize(
    "args",
    [["--lease", "x/na me"], ["--lease", "x/" + "r" * 300]],
)  # fmt: skip
def test_a_mistake_the_daemon_finds_is_a_usage_error_too(
    daemon: DaemonProcess, args: list[str]
) -> None:
    """Exit 2, as for the mistakes the CLI finds itself: a script tells a typo from a
    failure the same way whoever noticed it."""
    done = daemon.lockd("acquire", "--owner-pid", str(os.getpid()), *args)
    assert done.returncode == 2, done.stderr
    assert "invalid-argument" in done.stderr
    assert listed(daemon) == {}


def test_bench_without_a_socket_measures_a_daemon_of_its_own(tmp_path: Path) -> None:
    """`lockd bench` on a host: the daemon serving it is left alone (its journal and its
    lock dir, which other hosts may share); the benchmark's own daemon is gone after."""
    env = {k: v for k, v in os.environ.items() if k != "LOCKD_SOCKET"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")  # were it used, the default would be here
    host_config = tmp_path / "host.toml"  # the host daemon's: its pid file is its own
    host_config.write_text(f'pid_file = "{tmp_path / "host" / "lockd.pid"}"\n')
    env["LOCKD_CONFIG"] = str(host_config)
    done = subprocess.run(
        [*LOCKD, "bench", "--json", "--ops", "20", "--warmup", "2", "--concurrency", "",
         "--scenarios", "sequential"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sequential"]["pairs_per_s"] > 0
    match = re.search(r"a daemon of its own \((\S+)\)", done.stderr)
    assert match, done.stderr
    assert not Path(match.group(1)).exists()  # stopped, its temp paths removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.toml"]


def test_a_failure_with_json_is_json_on_stdout_too(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """A script reading ``--json`` gets the failure as JSON: the daemon's code, the
    message, the exit status and, for a busy lease, who holds it; stderr says it too."""
    holder = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    done = daemon.lockd("acquire", "--json", "--owner-pid", str(os.getpid()), "--name", "vm2",
                        "--disk", "/vm/a.img")  # fmt: skip
    assert done.returncode == 75
    error = json.loads(done.stdout)["error"]
    assert (error["code"], error["exit"]) == ("busy", 75)
    assert "/vm/a.img is busy" in error["message"]
    assert [h["pid"] for h in error["details"]["holders"]] == [holder.pid]
    assert "busy" in done.stderr
    usage = daemon.lockd("acquire", "--json", "--owner-pid", str(os.getpid()),
                         "--disk", "/vm/a.img:bogus")  # fmt: skip
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["error"]["code"] is None  # found here, not by the daemon


def test_a_held_lease_file_removed_is_locked_again_where_its_name_is(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]]
) -> None:
    """A held lease's file removed (an operator's rm, virtlockd's delete-resource, which
    takes no lock) is created and locked again: another host cannot take the disk."""
    a = make_daemon("a")
    b = make_daemon("b")
    vm = start_run(a, children, "--disk", "/vm/a.img", "--name", "vm1")
    path = lease_file(a, "/vm/a.img")
    path.unlink()
    wait_for(lambda: path.exists() and probe(path, "classic") == "busy", timeout=5)
    other = b.lockd("acquire", "--owner-pid", str(os.getpid()), "--disk", "/vm/a.img")
    assert other.returncode != 0, other.stdout
    assert listed(a) == {(FILES_LOCKSPACE, path.name): ("exclusive", (vm.pid,))}
    check_all([a, b])


def test_a_replaced_lockspace_directory_gets_the_held_leases_files_again(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]]
) -> None:
    """The lockspace's directory moved aside and made again (or another mount over it):
    the held lease's file is made and locked in the new one, and another host cannot
    take the disk there. Through the old directory fd its name still looked fine."""
    a = make_daemon("a")
    b = make_daemon("b")
    vm = start_run(a, children, "--disk", "/vm/a.img", "--name", "vm1")
    path = lease_file(a, "/vm/a.img")
    path.parent.rename(path.parent.with_name("aside"))
    path.parent.mkdir()
    wait_for(lambda: path.exists() and probe(path, "classic") == "busy", timeout=5)
    other = b.lockd("acquire", "--owner-pid", str(os.getpid()), "--disk", "/vm/a.img")
    assert other.returncode != 0, other.stdout
    assert listed(a) == {(FILES_LOCKSPACE, path.name): ("exclusive", (vm.pid,))}
    assert "was replaced: its lease files are opened in the new one" in a.log.read_text()
    check_all([a, b])


def test_a_lease_tampered_with_again_after_a_release_is_warned_about_again(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A held lease's file replaced by a symlink is warned about once (lockd tries again
    each round). Released and taken again, then tampered with again, it is a new event
    the operator must see: the lockspace still holding another lease kept the first
    warning's mark, and the second went unlogged."""
    start_run(daemon, children, "--disk", "/vm/b.img", "--name", "vm2")
    path = lease_file(daemon, "/vm/a.img")
    warning = "cannot lock its file again yet"

    def warned(times: int) -> bool:
        return daemon.log.read_text().count(warning) == times

    for round_ in (1, 2):
        vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere")
        wait_for(functools.partial(warned, round_), timeout=5)
        vm.kill()
        vm.wait()
        wait_for(lambda: path.name not in {r for _, r in listed(daemon)}, timeout=5)
        path.unlink()


_THIEF = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_held_lease_file_replaced_and_taken_elsewhere_is_reported_lost_and_fenced(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """Removed, then created and locked by another host before lockd looked again: the
    lease is no longer reported held, `lease-lost` is journaled and the VM fenced."""
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    path = lease_file(daemon, "/vm/a.img")
    path.unlink()
    thief = subprocess.Popen([sys.executable, "-c", _THIEF, str(path)], stdout=subprocess.PIPE)
    children.append(thief)
    assert thief.stdout is not None
    assert thief.stdout.readline().strip() == b"locked"
    assert vm.wait(5) == -signal.SIGTERM
    (lost,) = events(daemon, "--type", "lease-lost")
    assert (lost["resource"], lost["owner"]["pid"]) == (path.name, vm.pid)
    assert listed(daemon) == {}
    check(daemon, others={path})


def test_lockd_run_with_stdout_closed_gives_the_command_no_socket_as_stdout(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """``lockd run ... >&-`` (a manager that closed stdout): the connection to the daemon
    took the free number 1, and the command it execs wrote its output into the daemon's
    socket. fds 0-2 closed are opened on /dev/null first, as daemons do."""
    seen = tmp_path / "fd1"
    done = subprocess.run(
        [*LOCKD, "run", "--disk", "/vm/closed.img", "--name", "vm1", "--",
         sys.executable, "-c", "import os, sys; open(sys.argv[1], 'w').write("
         "os.readlink('/proc/self/fd/1')); print('written', flush=True)", str(seen)],
        env=daemon.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        timeout=30, check=False, pass_fds=(), preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert seen.read_text().strip() == "/dev/null"
    assert daemon.lockd("status").returncode == 0
    closed = subprocess.run(
        [*LOCKD, "lease-name", "/vm/a.img"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, timeout=30, check=False, preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert (closed.returncode, closed.stderr) == (0, "")


def test_the_debug_log_names_each_client_as_it_connects_and_closes(
    daemon: DaemonProcess,
) -> None:
    """`--verbose` said when a client connected, never when it closed, nor which
    connection of `lockd clients` it was."""
    with daemon.client("traced") as client:
        me = client.call("list-clients")["clients"]
        (row,) = [c for c in me if c.get("name") == "traced"]
        wait_for(lambda: f"client {row['id']} (pid {os.getpid()} uid {os.getuid()}) connected" in
                 daemon.log.read_text())  # fmt: skip
    wait_for(lambda: f"client {row['id']} closed" in daemon.log.read_text())


def test_an_acquire_wait_out_of_range_is_refused_by_the_daemon_through_client_call(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """``Client.call("acquire", wait=W)`` waits for its reply up to its timeout plus W: a W
    past what a socket timeout can hold (inf, 1e10) raised OverflowError from the client,
    its request already sent, instead of the daemon's invalid-argument; and the
    connection still serves the next call."""
    disk = {"lockspace": FILES_LOCKSPACE, "resource": "d0"}
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    with daemon.client() as client:
        owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": vm.pid}
        client.call("register", owner=owner)
        for wait in (float("inf"), 1e10):
            with pytest.raises(RemoteError) as caught:
                client.call("acquire", leases=[disk], autocreate=True, wait=wait)
            assert caught.value.code == "invalid-argument"
            assert "wait must be between 0 and" in caught.value.message
        assert listed(daemon) == {}
        assert client.call("acquire", leases=[disk], autocreate=True, wait=1)["leases"]
        assert (FILES_LOCKSPACE, "d0") in listed(daemon)


def test_events_since_a_seq_past_the_journals_end_says_so(daemon: DaemonProcess) -> None:
    """``lockd events --since SEQ`` past the journal's end (a seq kept from another host's
    journal, or from this one before a cut) printed nothing and said nothing, as if no
    event had come since: it says where the journal ends. The next seq is no news."""
    last = events(daemon)[-1]["seq"]
    journal = ("events", "--journal-dir", str(daemon.journal_dir))
    nothing_new = daemon.lockd(*journal, "--since", str(last + 1))
    assert (nothing_new.returncode, nothing_new.stdout, nothing_new.stderr) == (0, "", "")
    past = daemon.lockd(*journal, "--since", str(last + 5))
    assert (past.returncode, past.stdout) == (0, "")
    assert past.stderr == (
        f"lockd events: --since {last + 5} is past the end of the journal, whose last event "
        f"is seq {last}\n"
    )
