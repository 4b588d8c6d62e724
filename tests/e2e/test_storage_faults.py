"""Real storage faults under a running daemon: a journal or lock directory on a small
tmpfs that fills up, as an operator's disk does (partial writes included, which the
simulated faults never make)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol.client import Client, RemoteError
from protocol.names import FILES_LOCKSPACE
from tests.e2e.conftest import DaemonProcess, MakeDaemon, start_dropping_owner, wait_for
from tests.e2e.fake_systemd import FakeServiceManager
from tests.e2e.test_fd_store import start_under
from tests.e2e.test_recovery import crash, restart
from tests.lockprobe import probe, start_watch, stop_watch

pytestmark = pytest.mark.e2e

Mount = Callable[..., Path]


@pytest.fixture
def small_fs() -> Iterator[Mount]:
    """``small_fs(path, "size=256k", ...)`` mounts a tmpfs there; unmounted at the end
    (after the daemons: ask for this fixture before ``make_daemon``). Skips the test
    where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(path: Path, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(("mode=0700", *(options or ("size=256k",)))),
             "tmpfs", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the small filesystem mounted at ``directory`` to its last byte; the file
    that does it (a name lockd never reads)."""
    assert os.path.ismount(directory), f"{directory} is no mount: not filling the disk it is on"
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        assert _write_until_refused(fd) == errno.ENOSPC
    finally:
        os.close(fd)
    return path


def _write_until_refused(fd: int) -> int | None:
    """Write to ``fd`` until the kernel refuses: its errno."""
    try:
        while True:
            os.write(fd, b"x" * 512)
    except OSError as exc:
        return exc.errno


def owner_client(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], name: str
) -> Client:
    """A client registered for a running process (a VM) of its own."""
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    client = daemon.client(name)
    client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": name, "id": 1,
                                   "pid": vm.pid})  # fmt: skip
    return client


def lease(resource: str) -> dict[str, str]:
    return {"lockspace": FILES_LOCKSPACE, "resource": resource}


def held(client: Client) -> list[str]:
    return sorted(item["resource"] for item in client.call("inquire")["leases"])


def acquire_until_refused(client: Client, prefix: str) -> tuple[str, RemoteError]:
    """Acquire new leases until the journal refuses one (the page the segment's last
    records are in may still have room): the refused one and its error."""
    for i in range(200):
        try:
            client.call("acquire", leases=[lease(f"{prefix}{i}")], autocreate=True)
        except RemoteError as exc:
            return f"{prefix}{i}", exc
    raise AssertionError("200 acquires on a full disk were all granted")


def lease_path(daemon: DaemonProcess, resource: str) -> Path:
    return daemon.lock_dir / FILES_LOCKSPACE / resource


def kernel_state(daemon: DaemonProcess, resource: str) -> str:
    """ "busy" if a lock is held on the lease file, "free", or "absent" (no file)."""
    path = lease_path(daemon, resource)
    try:
        return probe(path, "ofd") if path.exists() else "absent"
    except subprocess.CalledProcessError:
        if path.exists():
            raise
        return "absent"  # deleted between the look and the probe (a release ended it)


def after_a_crash_it_holds(daemon: DaemonProcess, resources: list[str]) -> None:
    """SIGKILLed and started again after the fault: the daemon holds ``resources``
    (sorted), `journal-check` finds the journal sound, and `lockd verify` finds every
    held lease locked in the kernel and the journal replaying to them."""
    crash(daemon)
    restart(daemon)
    listed = json.loads(daemon.lockd("leases", "--json").stdout)
    assert sorted(item["resource"] for item in listed) == resources
    check = daemon.lockd("journal-check", "--journal-dir", str(daemon.journal_dir))
    assert check.returncode == 0, check.stdout + check.stderr
    verify = daemon.lockd("verify", "--journal-dir", str(daemon.journal_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_full_journal_disk_refuses_acquires_keeps_releases_and_recovers_without_restart(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The journal's filesystem fills up: an acquire gets `io-error` saying the disk is
    full, with no lock left in the kernel and no lease reported; a release gets
    `io-error` and the lease stays held; other clients are served. Once space comes
    back the release goes through, without a restart; killed and started again, the
    daemon holds the same leases, its journal checks ok and `lockd verify` is clean."""
    small_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    vm = owner_client(daemon, children, "vm1")
    vm.call("acquire", leases=[lease("kept")], autocreate=True)
    filler = fill(daemon.journal_dir)

    refused, exc = acquire_until_refused(vm, "new")
    assert exc.code == "io-error"
    assert "No space left on device" in exc.message, exc.message
    assert str(daemon.journal_dir) in exc.message, exc.message
    assert kernel_state(daemon, refused) != "busy"
    assert refused not in held(vm)

    with pytest.raises(RemoteError) as released:
        vm.call("release", leases=[lease("kept")])
    assert released.value.code == "io-error"
    assert kernel_state(daemon, "kept") == "busy"
    assert "kept" in held(vm)
    with daemon.client("other") as other:
        assert other.call("status")["leases"] == len(held(vm))

    filler.unlink()
    vm.call("release", leases=[lease("kept")])
    assert kernel_state(daemon, "kept") != "busy"
    vm.call("acquire", leases=[lease(refused)], autocreate=True)
    assert kernel_state(daemon, refused) == "busy"
    before = held(vm)
    vm.close()

    after_a_crash_it_holds(daemon, before)


def metrics(daemon: DaemonProcess) -> str:
    done = daemon.lockd("metrics")
    assert done.returncode == 0, done.stderr
    return done.stdout


def newest_segment_size(journal_dir: Path) -> int:
    return sorted(journal_dir.glob("journal-*.cbor"))[-1].stat().st_size


def test_a_rotation_refused_by_a_full_disk_leaves_no_debris_and_replays(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The disk fills up just as the segment is due to rotate: the snapshot and the new
    segment both fail, at every refused request. They leave no temporary file behind
    (each kept its part of the space, and an inode); once space is back the rotation
    goes through, and after SIGKILL the daemon replays to the same leases, its journal
    checks ok and `lockd verify` is clean."""
    small_fs(tmp_path / "d" / "journal", "size=256k")
    config = tmp_path / "lockd.toml"
    config.write_text("journal_segment_bytes = 4096\njournal_retain_segments = 1\n")
    daemon = make_daemon("d", None, "--config", str(config))
    vm = owner_client(daemon, children, "vm1")
    i = 0
    while newest_segment_size(daemon.journal_dir) < 4096:  # the next append rotates
        vm.call("acquire", leases=[lease(f"old{i}")], autocreate=True)
        i += 1
    filler = fill(daemon.journal_dir)
    for n in range(5):
        with pytest.raises(RemoteError) as refused:
            vm.call("acquire", leases=[lease(f"new{n}")], autocreate=True)
        assert refused.value.code == "io-error"
        assert "No space left on device" in refused.value.message
    with pytest.raises(RemoteError):
        vm.call("release", leases=[lease("old0")])
    assert kernel_state(daemon, "old0") == "busy"
    wait_for(lambda: 'lockd_journal_snapshots_total{result="failed"} 1' in metrics(daemon))
    # One snapshot tried for the seq, not one (and a log line) per refused request.
    assert daemon.log.read_text().count("journal snapshot at seq") == 1
    assert 'lockd_journal_snapshots_total{result="skipped"} 0' in metrics(daemon)
    debris = [p.name for p in daemon.journal_dir.iterdir() if p.name.endswith(".tmp")]
    assert debris == []

    filler.unlink()
    vm.call("release", leases=[lease("old0")])
    vm.call("acquire", leases=[lease("new0")], autocreate=True)
    assert len(list(daemon.journal_dir.glob("journal-*.cbor"))) >= 2
    before = held(vm)
    vm.close()
    after_a_crash_it_holds(daemon, before)


def test_a_full_journal_disk_is_logged_once_and_shown_in_status(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """Requests refused while the journal disk is full are logged once, not a line per
    request (the log may be on that disk too); `lockd status` says the journal cannot
    be written and since when, and once space is back, the log says it is written
    again and status no longer names an error."""
    small_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    vm = owner_client(daemon, children, "vm1")
    filler = fill(daemon.journal_dir)
    acquire_until_refused(vm, "a")
    for n in range(20):
        with pytest.raises(RemoteError):
            vm.call("acquire", leases=[lease(f"b{n}")], autocreate=True)
    status = daemon.lockd("status")
    assert status.returncode == 0, status.stderr
    assert "journal_error: [Errno 28] No space left on device" in status.stdout, status.stdout
    assert "21 writes refused" in status.stdout, status.stdout
    assert "lockd_journal_refusing 1" in metrics(daemon)
    errors = [line for line in daemon.log.read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1, errors
    assert "No space left on device" in errors[0]

    filler.unlink()
    vm.call("acquire", leases=[lease("b0")], autocreate=True)
    assert "journal written again after 21 refused writes" in daemon.log.read_text()
    status = daemon.lockd("status", "--json")
    assert "journal_error" not in json.loads(status.stdout)
    assert "lockd_journal_refusing 0" in metrics(daemon)


def test_systemctl_status_says_the_journal_refuses_writes_while_it_does(
    small_fs: Mount, make_daemon: MakeDaemon, manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """Under systemd, `systemctl status lockd` went on saying "serving; recovery held ..."
    while every change was refused: the STATUS= line now says so from the first refused
    write, and goes back to the start's counts once the journal is written again."""
    small_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    daemon.stop()
    start_under(daemon, manager)
    wait_for(lambda: manager.ready_count() == 1)
    serving = statuses(manager)[-1]
    assert serving.startswith("serving; recovery held 0")
    vm = owner_client(daemon, children, "vm1")
    filler = fill(daemon.journal_dir)
    acquire_until_refused(vm, "a")
    wait_for(lambda: "journal cannot be written" in statuses(manager)[-1])
    refusing = statuses(manager)[-1]
    assert refusing.startswith("serving, but every change is refused (io-error)"), refusing
    assert "No space left on device" in refusing, refusing
    filler.unlink()
    vm.call("acquire", leases=[lease("b0")], autocreate=True)
    wait_for(lambda: statuses(manager)[-1] == serving)


def statuses(manager: FakeServiceManager) -> list[str]:
    """Each STATUS= the daemon sent, in order."""
    with manager.lock:
        messages = list(manager.messages)
    return [line.removeprefix("STATUS=") for m in messages for line in m.splitlines()
            if line.startswith("STATUS=")]  # fmt: skip


def use_up_inodes(directory: Path) -> list[Path]:
    """Create empty files in the small filesystem at ``directory`` until it has no inode
    left (the way a lock directory full of lease files meets its end); the files."""
    assert os.path.ismount(directory), f"{directory} is no mount: not filling it"
    made: list[Path] = []
    while True:
        path = directory / f"filler-{len(made)}"
        try:
            path.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc  # noqa: PT017 - the loop's end
            return made
        made.append(path)


def test_a_lease_file_that_cannot_be_created_in_a_full_lock_dir_names_the_directory(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The lock directory's filesystem has no inode left: an acquire of a new disk gets
    `io-error` naming the lockspace directory and the full filesystem, no lease is
    reported, and the leases held stay held and can be released; once room is made,
    the acquire goes through without a restart."""
    locks = small_fs(tmp_path / "locks", "size=256k", "nr_inodes=64")
    daemon = make_daemon("d", locks)
    vm = owner_client(daemon, children, "vm1")
    vm.call("acquire", leases=[lease("held")], autocreate=True)
    fillers = use_up_inodes(locks)

    with pytest.raises(RemoteError) as refused:
        vm.call("acquire", leases=[lease("new")], autocreate=True)
    assert refused.value.code == "io-error"
    message = refused.value.message
    assert str(locks / FILES_LOCKSPACE / "new") in message, message
    assert "No space left on device" in message, message
    assert "out of inodes" in message, message
    assert held(vm) == ["held"]
    assert kernel_state(daemon, "held") == "busy"
    with daemon.client("other") as other:
        assert other.call("status")["leases"] == 1

    vm.call("release", leases=[lease("held")])
    assert kernel_state(daemon, "held") != "busy"
    for path in fillers[:4]:
        path.unlink()
    vm.call("acquire", leases=[lease("new")], autocreate=True)
    assert kernel_state(daemon, "new") == "busy"
    assert held(vm) == ["new"]


def test_a_read_only_lock_dir_refuses_acquires_naming_it_until_it_is_writable(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The lock directory is remounted read-only: an acquire, of an existing lease file
    or a new one, gets `io-error` naming the path and saying read-only; nothing is
    held. Mounted read-write again, the same acquire goes through, no restart."""
    locks = small_fs(tmp_path / "locks")
    daemon = make_daemon("d", locks)
    vm = owner_client(daemon, children, "vm1")
    vm.call("create-resource", lockspace=FILES_LOCKSPACE, resource="there")
    remount = ["mount", "-o", "remount,ro", str(locks)]
    subprocess.run(remount, check=True)
    try:
        for resource in ("there", "new"):
            with pytest.raises(RemoteError) as refused:
                vm.call("acquire", leases=[lease(resource)], autocreate=True)
            assert refused.value.code == "io-error"
            assert str(locks / FILES_LOCKSPACE) in refused.value.message
            assert "mounted read-only" in refused.value.message
        assert held(vm) == []
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(locks)], check=True)
    vm.call("acquire", leases=[lease("there"), lease("new")], autocreate=True)
    assert held(vm) == ["new", "there"]
    assert kernel_state(daemon, "new") == "busy"


def write_errors(daemon: DaemonProcess) -> int:
    """``lockd_journal_write_errors_total``: one per refused journal write."""
    for line in metrics(daemon).splitlines():
        if line.startswith("lockd_journal_write_errors_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no lockd_journal_write_errors_total")


def errors_saying(daemon: DaemonProcess, text: str) -> int:
    """How many ERROR lines of the daemon's log say ``text`` (the tests run it --verbose:
    its DEBUG lines say it too)."""
    return sum(
        1 for line in daemon.log.read_text().splitlines() if "ERROR" in line and text in line
    )


def test_an_owner_that_exits_while_the_journal_disk_is_full_is_released_once_space_is_back(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """A VM exits while its release cannot be journaled: the lease stays held (never
    dropped unrecorded), the refusal is logged once however often it is retried, and
    once space is back the lease is released without a restart."""
    small_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    vm = owner_client(daemon, children, "vm1")
    vm.call("acquire", leases=[lease("disk")], autocreate=True)
    filler = fill(daemon.journal_dir)
    acquire_until_refused(vm, "pad")
    listed = held(vm)
    refused = write_errors(daemon)
    children[-1].kill()
    children[-1].wait()
    wait_for(lambda: write_errors(daemon) >= refused + 3)  # the release, retried twice
    assert kernel_state(daemon, "disk") == "busy"
    assert errors_saying(daemon, "could not journal the release") == 1

    filler.unlink()
    wait_for(lambda: all(kernel_state(daemon, r) != "busy" for r in listed))
    assert json.loads(daemon.lockd("leases", "--json").stdout) == []
    assert "journaled the release of pid" in daemon.log.read_text()


def test_a_fence_whose_record_the_full_journal_refuses_still_signals(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """A VM drops its own connection while the journal disk is full: its `owner-fenced`
    record is refused, the SIGTERM goes all the same (recovery.md), the refusals are
    logged once each, and once space is back its lease is released; killed and
    started again, the daemon holds nothing, its journal checks ok, verify is clean."""
    small_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    owner = start_dropping_owner(daemon, children, ignore_sigterm=False, on_cue=True)
    assert owner.stdin is not None
    assert owner.stdout is not None
    filler = fill(daemon.journal_dir)
    pad = owner_client(daemon, children, "pad")
    acquire_until_refused(pad, "pad")
    with pytest.raises(RemoteError):
        pad.call("release", leases=[lease(r) for r in held(pad)])  # refused: they stay
    refused = write_errors(daemon)

    owner.stdin.write("close\n")
    owner.stdin.flush()
    assert owner.stdout.readline().strip() == "got SIGTERM"
    assert owner.wait(10) == 0
    wait_for(lambda: write_errors(daemon) >= refused + 4)  # fence record, release, retries
    assert kernel_state(daemon, "r1") == "busy"
    assert errors_saying(daemon, "could not journal fencing") == 1
    assert errors_saying(daemon, "could not journal the release") == 1

    filler.unlink()
    wait_for(lambda: kernel_state(daemon, "r1") != "busy")
    after_a_crash_it_holds(daemon, held(pad))  # the pad's, not the fenced VM's r1


def test_a_daemon_started_on_a_full_journal_disk_serves_and_leaves_no_debris(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """Started with its journal's disk full (and its `.boot` to write again): the daemon
    serves, recovers the lease held, refuses changes with `io-error`, and leaves no
    temporary file in the journal directory; once space is back it takes changes."""
    small_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    vm = owner_client(daemon, children, "vm1")
    vm.call("acquire", leases=[lease("disk")], autocreate=True)
    vm.close()
    crash(daemon)
    (daemon.journal_dir / ".boot").unlink()  # as an older lockd left it: written at start
    filler = fill(daemon.journal_dir)
    restart(daemon)
    assert kernel_state(daemon, "disk") == "busy"
    assert "disk" in daemon.lockd("leases").stdout
    debris = [p.name for p in daemon.journal_dir.iterdir() if p.name.endswith(".tmp")]
    assert debris == []
    filler.unlink()
    with daemon.client("other") as other:
        other.call("create-resource", lockspace=FILES_LOCKSPACE, resource="later")


def test_a_reexec_on_a_full_journal_disk_keeps_every_lock(
    small_fs: Mount, make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """SIGUSR1 while the journal's disk is full (the new program's `daemon-started` and
    `recovery-completed` refused): it takes over with the lease never seen free,
    serves the connection it was handed, and takes the refused release once space is
    back."""
    small_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    vm = owner_client(daemon, children, "vm1")
    vm.call("acquire", leases=[lease("disk")], autocreate=True)
    filler = fill(daemon.journal_dir)
    acquire_until_refused(vm, "pad")
    watcher = start_watch(lease_path(daemon, "disk"))
    children.append(watcher)  # type: ignore[arg-type]
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: daemon.log.read_text().count(" serving ") == 2)
    tries, free = stop_watch(watcher)
    assert tries > 0
    assert free == 0, f"the lock was seen free {free} times during the re-exec"
    assert vm.call("status")["pid"] == daemon.proc.pid
    with pytest.raises(RemoteError):
        vm.call("release", leases=[lease("disk")])
    filler.unlink()
    vm.call("release", leases=[lease("disk")])
    assert kernel_state(daemon, "disk") != "busy"


class FailingFs:
    """An ext4 filesystem on a loop device, mounted with ``errors=remount-ro``: the kernel
    makes it read-only under its writers on an error (an administrator's ``mount -o
    remount,ro`` is refused while a file there is open for writing, as lockd's segment
    and lease files are), or shuts it down, after which every access fails with EIO."""

    def __init__(self, image: Path, path: Path) -> None:
        self.image = image
        self.path = path

    def mount(self) -> None:
        subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.path)],
                       check=True, capture_output=True)  # fmt: skip

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=True, capture_output=True)

    def make_read_only(self) -> None:
        """An error as a failing disk gives: ext4 remounts itself read-only."""
        source = subprocess.run(["findmnt", "-no", "SOURCE", str(self.path)],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        trigger = Path("/sys/fs/ext4", os.path.basename(source.strip()), "trigger_fs_error")
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger} to make ext4 fail with")
        trigger.write_text("lockd test: the disk fails")
        with pytest.raises(OSError, match="Read-only file system"):
            (self.path / "probe").touch()

    def fail(self) -> None:
        """Every access fails with EIO from now on (EXT4_IOC_SHUTDOWN, no log flush)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, _EXT4_IOC_SHUTDOWN, struct.pack("I", _EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def break_as(self, how: str) -> str:
        """Make it ``"read-only"`` or fail with ``"EIO"``; the error lockd meets then."""
        if how == "read-only":
            self.make_read_only()
            return "[Errno 30] Read-only file system"
        self.fail()
        return "[Errno 5] Input/output error"


_EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
_EXT4_GOING_FLAGS_NOLOGFLUSH = 2


@pytest.fixture
def failing_fs(tmp_path: Path) -> Iterator[Callable[[Path], FailingFs]]:
    """``failing_fs(path)`` mounts a 16 MiB ext4 there (ask for this fixture before
    ``make_daemon``: it is unmounted after the daemons stop). Skips the test where
    mounting a loop device is not permitted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    made: list[FailingFs] = []

    def make(path: Path) -> FailingFs:
        path.mkdir(parents=True, exist_ok=True)
        image = tmp_path / f"{path.name}.ext4"
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        done = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True, text=True,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot make an ext4 filesystem here: {done.stderr.strip()}")
        fs = FailingFs(image, path)
        try:
            fs.mount()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot mount a loop device here: {exc.stderr.strip()}")
        made.append(fs)
        path.chmod(0o700)
        return fs

    yield make
    for fs in reversed(made):
        if subprocess.run(["umount", str(fs.path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(fs.path)], capture_output=True, check=False)


def locked_inodes() -> set[tuple[int, int]]:
    """Files (device, inode) with an OFD lock on them, from /proc/locks: what the kernel
    holds, read without opening the files (a failed filesystem refuses every open)."""
    found = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "OFDLCK" in fields:
            major, minor, inode = fields[fields.index("OFDLCK") + 4].split(":")
            found.add((os.makedev(int(major, 16), int(minor, 16)), int(inode)))
    return found


def test_a_lease_a_read_only_lock_dir_keeps_from_being_locked_at_a_restart_is_not_said_taken(
    failing_fs: Callable[[Path], FailingFs], make_daemon: MakeDaemon,
    children: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """The lock directory's filesystem went read-only while lockd was down: at the
    restart the VM's lease file cannot be opened for its lock, and after the retries the
    lease is lost and the VM fenced. The log and the fence say why (the file could not be
    locked: read-only), not that another process or host took the lease, which would
    send the operator looking for a second host."""
    fs = failing_fs(tmp_path / "locks")
    daemon = make_daemon("d", fs.path)
    vm = owner_client(daemon, children, "vm1")
    vm.call("acquire", leases=[lease("disk")], autocreate=True)
    vm.close()
    crash(daemon)
    fs.make_read_only()
    restart(daemon)  # waits out the retries (RESTORE_RETRY_SECONDS) before it serves

    lost = [line for line in daemon.log.read_text().splitlines() if "lost lease" in line]
    assert len(lost) == 1, lost
    assert "to another process or host" not in lost[0], lost[0]
    assert "its lease file could not be locked" in lost[0], lost[0]
    assert "Read-only file system" in lost[0], lost[0]
    fenced = [line for line in daemon.log.read_text().splitlines() if "fencing vm1" in line]
    assert fenced, daemon.log.read_text()
    assert "was taken while lockd was down" not in fenced[0], fenced[0]
    assert "Read-only file system" in fenced[0], fenced[0]
    events = daemon.lockd("events", "--journal-dir", str(daemon.journal_dir), "--type",
                          "lease-lost")  # fmt: skip
    assert "Read-only file system" in events.stdout, events.stdout + events.stderr


@pytest.mark.parametrize("how", ["read-only", "EIO"])
def test_a_journal_disk_that_fails_under_the_daemon_refuses_changes_and_loses_no_lease(
    how: str, failing_fs: Callable[[Path], FailingFs], make_daemon: MakeDaemon,
    children: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """The journal's filesystem goes read-only (ext4's errors=remount-ro) or fails with
    EIO under the daemon, just as its segment is due to rotate: an acquire, a release and
    a register are refused `io-error` naming the error, nothing changes in the kernel,
    `status` and `lockd_journal_refusing` say so. Such a filesystem is back only once
    unmounted: killed, the filesystem mounted again and the daemon started, it holds
    every lease it reported (journal_sync = "batch": each was on the disk before its
    reply), its journal checks ok and `lockd verify` is clean."""
    fs = failing_fs(tmp_path / "d" / "journal")
    config = tmp_path / "lockd.toml"
    config.write_text('journal_sync = "batch"\njournal_segment_bytes = 4096\n')
    daemon = make_daemon("d", None, "--config", str(config))
    vm = owner_client(daemon, children, "vm1")
    i = 0
    while newest_segment_size(daemon.journal_dir) < 4096:  # the next append rotates
        vm.call("acquire", leases=[lease(f"old{i}")], autocreate=True)
        i += 1
    before = held(vm)
    error = fs.break_as(how)

    with pytest.raises(RemoteError) as refused:
        vm.call("acquire", leases=[lease("new")], autocreate=True)
    assert refused.value.code == "io-error"
    assert f"{error} (rotating the journal)" in refused.value.message, refused.value.message
    assert kernel_state(daemon, "new") != "busy"
    with pytest.raises(RemoteError) as released:
        vm.call("release", leases=[lease("old0")])
    assert released.value.code == "io-error"
    with pytest.raises(RemoteError) as registered:
        owner_client(daemon, children, "vm2")
    assert registered.value.code == "io-error"
    assert held(vm) == before
    status = daemon.lockd("status")
    assert f"journal_error: {error}" in status.stdout, status.stdout
    assert "lockd_journal_refusing 1" in metrics(daemon)
    assert errors_saying(daemon, error) == 1

    vm.close()
    crash(daemon)
    fs.unmount()
    fs.mount()
    restart(daemon)
    listed = json.loads(daemon.lockd("leases", "--json").stdout)
    assert sorted(item["resource"] for item in listed) == before
    check = daemon.lockd("journal-check", "--journal-dir", str(daemon.journal_dir))
    assert check.returncode == 0, check.stdout + check.stderr
    verify = daemon.lockd("verify", "--journal-dir", str(daemon.journal_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("how", ["read-only", "EIO"])
def test_a_lock_dir_that_fails_under_the_daemon_keeps_held_locks_and_lets_releases_through(
    how: str, failing_fs: Callable[[Path], FailingFs], make_daemon: MakeDaemon,
    children: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """The lock directory's filesystem goes read-only or fails with EIO while a VM holds
    leases: the kernel keeps their locks, and the look at held leases' names neither
    reports them lost nor warns (their names stay cached: the open files pin them). A
    release goes through, unlocking in the kernel, also of an autocreated lease whose
    file cannot be removed (it stays, as an empty file harms nothing); an acquire of a
    new disk or an existing file is refused `io-error` naming the error and locks
    nothing."""
    fs = failing_fs(tmp_path / "locks")
    daemon = make_daemon("d", fs.path)
    vm = owner_client(daemon, children, "vm1")
    vm.call("create-resource", lockspace=FILES_LOCKSPACE, resource="there")
    vm.call("acquire", leases=[lease("kept"), lease("auto")], autocreate=True)
    inodes = {
        r: (st.st_dev, st.st_ino)
        for r in ("kept", "auto", "there")
        for st in [lease_path(daemon, r).stat()]
    }
    assert {inodes["kept"], inodes["auto"]} <= locked_inodes()
    error = fs.break_as(how)
    logged = len(daemon.log.read_text())
    deadline = time.monotonic() + 1.2  # two looks at every held lease (LINK_CHECK_SECONDS)
    while time.monotonic() < deadline:
        assert held(vm) == ["auto", "kept"]
        time.sleep(0.1)
    assert {inodes["kept"], inodes["auto"]} <= locked_inodes()
    assert "removed or replaced" not in daemon.log.read_text()[logged:]

    vm.call("release", leases=[lease("auto")])
    assert held(vm) == ["kept"]
    assert inodes["auto"] not in locked_inodes()
    assert inodes["kept"] in locked_inodes()
    for resource in ("new", "there"):
        with pytest.raises(RemoteError) as refused:
            vm.call("acquire", leases=[lease(resource)], autocreate=True)
        assert refused.value.code == "io-error"
        assert error in refused.value.message, refused.value.message
        assert str(fs.path / FILES_LOCKSPACE) in refused.value.message, refused.value.message
    assert held(vm) == ["kept"]
    assert inodes["there"] not in locked_inodes()
    events = daemon.lockd("events", "--journal-dir", str(daemon.journal_dir), "--json")
    kinds = [(e["type"], e.get("resource")) for e in map(json.loads, events.stdout.splitlines())]
    assert kinds[-1] == ("lease-released", "auto"), kinds


def test_a_journal_copied_off_its_read_only_filesystem_replays_every_lease(
    failing_fs: Callable[[Path], FailingFs], make_daemon: MakeDaemon,
    children: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """With `journal_sync = "none"` the records on a journal filesystem that went read-only
    may exist only in the kernel's cache, lost at the unmount; the log says so at the
    first refused write, with the remedy in operations.md: stop lockd, copy the journal
    directory while it is still mounted, and start lockd on the copy. It holds every
    lease the VM had, and verify is clean."""
    fs = failing_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    vm = owner_client(daemon, children, "vm1")
    for i in range(5):
        vm.call("acquire", leases=[lease(f"disk{i}")], autocreate=True)
    before = held(vm)
    fs.make_read_only()
    with pytest.raises(RemoteError):
        vm.call("acquire", leases=[lease("refused")], autocreate=True)
    told = [line for line in daemon.log.read_text().splitlines() if "ERROR" in line]
    assert len(told) == 1, told
    assert "copy the journal directory elsewhere and start lockd on the copy" in told[0]
    vm.close()
    daemon.stop()
    copy = tmp_path / "d" / "journal-copy"
    subprocess.run(["cp", "-a", str(daemon.journal_dir), str(copy)], check=True)
    daemon.journal_dir = copy
    restart(daemon)
    listed = json.loads(daemon.lockd("leases", "--json").stdout)
    assert sorted(item["resource"] for item in listed) == before
    verify = daemon.lockd("verify", "--journal-dir", str(copy))
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("how", ["read-only", "EIO"])
def test_a_reexec_on_a_failed_journal_disk_is_abandoned_and_every_lock_kept(
    how: str, failing_fs: Callable[[Path], FailingFs], make_daemon: MakeDaemon,
    children: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """SIGUSR1 (`systemctl reload`) while the journal's filesystem is read-only or fails
    with EIO: the new program could not open the journal and would exit, every lock
    with it. Its start-up check now says so, the re-exec is abandoned with that reason,
    and the old program serves on: the lease never seen free, the VM's connection
    answered by the same pid."""
    fs = failing_fs(tmp_path / "d" / "journal")
    daemon = make_daemon("d")
    vm = owner_client(daemon, children, "vm1")
    vm.call("acquire", leases=[lease("disk")], autocreate=True)
    error = fs.break_as(how)
    watcher = start_watch(lease_path(daemon, "disk"))
    children.append(watcher)  # type: ignore[arg-type]
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "re-exec abandoned" in daemon.log.read_text(), timeout=30)
    tries, free = stop_watch(watcher)
    assert tries > 0
    assert free == 0, f"the lock was seen free {free} times during the re-exec"
    abandoned = [line for line in daemon.log.read_text().splitlines() if "abandoned" in line]
    assert f"journal_dir {daemon.journal_dir}: {error.split('] ')[1]}" in abandoned[0], abandoned
    assert daemon.proc.poll() is None
    assert vm.call("status")["pid"] == daemon.proc.pid
    assert held(vm) == ["disk"]
    assert kernel_state(daemon, "disk") == "busy"
