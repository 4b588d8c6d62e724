"""Crash-proof ownership: kill -9 the daemon, restart it, and the VMs' disks stay protected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest

from actors.faults import POINTS
from actors.recovery import RESUMED
from lockd.journal_format import decode_records, encode_header, encode_record, header_length
from lockd.procs import boot_time
from protocol.names import FILES_LOCKSPACE, lease_name_for_path
from tests.e2e.conftest import (
    LOCKD,
    DaemonProcess,
    MakeDaemon,
    journaled,
    start_dropping_owner,
    wait_for,
)
from tests.e2e.invariants import check, listed
from tests.e2e.test_daemon import events, lease_file, start_run
from tests.lockprobe import probe

pytestmark = pytest.mark.e2e


def crash(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()


def restart(daemon: DaemonProcess, **env: str) -> DaemonProcess:
    daemon.env_extra = env
    return daemon.start()


def steal(path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    """Another host takes the lease file's lock (a classic POSIX lock, as virtlockd's)."""
    thief = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, struct, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\n"
         "fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 1, 0))\n"
         "print('locked', flush=True)\n"
         "time.sleep(600)\n", str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    children.append(thief)  # type: ignore[arg-type]
    assert thief.stdout is not None
    assert thief.stdout.readline().strip() == "locked"


def start_fence(
    make_daemon: MakeDaemon,
    children: list[subprocess.Popen[bytes]],
    config: Path,
    settings: str,
    name: str,
) -> tuple[DaemonProcess, subprocess.Popen[str]]:
    """A daemon with ``settings`` fencing a VM that ignores SIGTERM (its own connection
    dropped while it held a lease); returns once the first SIGTERM is journaled."""
    config.write_text(settings)
    daemon = make_daemon(name, None, "--config", str(config))
    owner = start_dropping_owner(daemon, children, ignore_sigterm=True)
    wait_for(lambda: journaled(daemon, "owner-fenced") > 0)
    return daemon, owner


def test_kill_9_then_restart_holds_live_owners_and_releases_dead_ones(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    vm1 = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    vm2 = start_run(daemon, children, "--disk", "/vm/b.img", "--name", "vm2")
    crash(daemon)
    vm2.kill()  # dies while the daemon is down
    vm2.wait()
    restart(daemon)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm1.pid,))
    }
    assert probe(lease_file(daemon, "/vm/a.img"), "classic") == "busy"
    assert not lease_file(daemon, "/vm/b.img").exists()  # autocreated: cleaned up
    check(daemon)
    kinds = events(daemon)
    gone = [e for e in kinds if e["type"] == "lease-released"]
    assert [(e["owner"]["pid"], e["reason"]) for e in gone] == [(vm2.pid, "owner-gone")]
    done = [e for e in kinds if e["type"] == "recovery-completed"][-1]
    assert (done["held"], done["released"], done["lost"]) == (1, 1, 0)
    # The recovered owner is watched without any connection: its exit ends the lease.
    vm1.kill()
    vm1.wait()
    wait_for(lambda: not listed(daemon))
    assert events(daemon, "--type", "lease-released")[-1]["reason"] == "owner-exit"
    check(daemon)


def journal_owners_as_of_another_boot(journal_dir: Path, pid: int) -> None:
    """Rewrite the journal as if the owner ``pid`` had registered in an earlier boot.

    What a host reboot leaves, when a VM autostarted in the same order gets the
    old owner's pid and start time (here: it is the very same process).
    """
    earlier = uuid.UUID(int=1).bytes
    for segment in sorted(journal_dir.glob("journal-*.cbor")):
        data = segment.read_bytes()
        first_seq, start = header_length(data)
        entries, _ = decode_records(data[start:], first_seq)
        out = [encode_header(first_seq)]
        for entry in entries:
            event: Any = entry.event
            owner = getattr(event, "owner", None)
            if owner is not None and owner.pid == pid:
                event = attrs.evolve(event, owner=attrs.evolve(owner, boot=earlier))
                out.append(encode_record(attrs.evolve(entry, event=event)))
            else:
                out.append(encode_record(entry))
        segment.write_bytes(b"".join(out))


def test_after_a_reboot_an_owner_of_the_earlier_boot_is_gone_though_its_pid_recurs(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """A process of the new boot with the old owner's pid and start time holds no lease."""
    vm1 = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    vm2 = start_run(daemon, children, "--disk", "/vm/b.img", "--name", "vm2")
    registered = [e["owner"] for e in events(daemon, "--type", "lease-acquired")]
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        assert {o["boot"] for o in registered} == {f.read().strip()}  # as `events --json` shows it
    crash(daemon)
    journal_owners_as_of_another_boot(daemon.journal_dir, vm1.pid)
    restart(daemon)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/b.img")): ("exclusive", (vm2.pid,))
    }
    assert not lease_file(daemon, "/vm/a.img").exists()  # autocreated: cleaned up
    gone = events(daemon, "--type", "lease-released")
    assert [(e["owner"]["pid"], e["reason"]) for e in gone] == [(vm1.pid, "owner-gone")]
    assert vm1.poll() is None  # never signalled: it is not the owner that held the lease
    assert not events(daemon, "--type", "owner-fenced")
    check(daemon)


def test_lease_stolen_while_down_is_reported_lost_and_the_owner_fenced(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    path = lease_file(daemon, "/vm/a.img")
    crash(daemon)
    steal(path, children)
    restart(daemon)
    assert vm.wait(10) == -signal.SIGTERM  # fenced: it may be writing someone else's disk
    lost = events(daemon, "--type", "lease-lost")
    assert [(e["owner"]["name"], e["owner"]["pid"]) for e in lost] == [("vm1", vm.pid)]
    # The lease named in full, as every other message names one: the hash alone did not
    # say which lockspace (and so which kind of lease) was lost.
    assert lost[0]["reason"] == (
        f"lease {FILES_LOCKSPACE}/{path.name} is held by another process or host"
    )
    fenced = events(daemon, "--type", "owner-fenced")
    assert fenced[0]["signal"] == "SIGTERM"
    assert listed(daemon) == {}
    check(daemon, others={path})


def test_a_fence_cut_short_by_a_crash_is_finished_by_the_next_daemon(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A VM whose own connection dropped while it held a lease ignores SIGTERM; the daemon
    is SIGKILLed inside the grace period, before its SIGKILL. The next daemon sends SIGTERM
    again and, after its grace period, SIGKILL; the lease then ends as owner-exit."""
    slow, quick = tmp_path / "slow.toml", tmp_path / "quick.toml"
    quick.write_text("fence_grace = 0.5\n")
    daemon, owner = start_fence(make_daemon, children, slow, "fence_grace = 60\n", "fence")
    crash(daemon)
    assert owner.poll() is None  # SIGTERM ignored, SIGKILL never sent
    daemon.extra = ("--config", str(quick))
    restart(daemon)
    assert owner.wait(10) == -signal.SIGKILL
    fenced = events(daemon, "--type", "owner-fenced")
    assert [e["signal"] for e in fenced] == ["SIGTERM", "SIGTERM", "SIGKILL"]
    assert fenced[1]["reason"].endswith(RESUMED)
    wait_for(lambda: not listed(daemon))
    (released,) = events(daemon, "--type", "lease-released")
    assert (released["owner"]["pid"], released["reason"]) == (owner.pid, "owner-exit")
    check(daemon)
    # Finished: a further crash and start resume nothing.
    crash(daemon)
    restart(daemon)
    assert len(events(daemon, "--type", "owner-fenced")) == 3
    check(daemon)


def test_status_shows_a_fence_in_progress_and_when_sigkill_comes(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """An operator asks what lockd is about to kill: `lockd status` names the VM, the next
    signal and when, and why; a resumed fence after a crash keeps counting down."""
    config = tmp_path / "lockd.toml"
    daemon, owner = start_fence(make_daemon, children, config, "fence_grace = 60\n", "status")
    done = daemon.lockd("status", "--json")
    assert done.returncode == 0, done.stderr
    (fence,) = json.loads(done.stdout)["fencing"]
    assert fence["owner"]["pid"] == owner.pid
    assert fence["next_signal"] == "SIGKILL"
    assert 50 < fence["due_in_s"] <= 60
    assert fence["reason"] == "connection closed while holding leases"
    crash(daemon)
    restart(daemon)
    text = daemon.lockd("status").stdout
    (line,) = [row for row in text.splitlines() if f"(pid {owner.pid})" in row]
    due = float(line.split("SIGKILL in ")[1].split(" s")[0])
    assert due < 60 - 0.1  # the deadline of the fence begun before the crash
    assert line.endswith(RESUMED)
    assert "fencing: 1" in text


def test_a_daemon_crashing_within_every_grace_period_still_kills_in_the_end(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A fence's SIGKILL is due a grace period after its first SIGTERM, however often lockd
    restarts in between. Each daemon here lives about a second of a 3 s grace period; with
    a full grace period at every start, the VM would never be killed."""
    grace = 3.0
    config = tmp_path / "lockd.toml"
    daemon, owner = start_fence(make_daemon, children, config, f"fence_grace = {grace}\n", "loop")
    deadline = time.monotonic() + grace + 2.5
    while owner.poll() is None and time.monotonic() < deadline:
        time.sleep(1.0)
        crash(daemon)
        restart(daemon)
    assert owner.poll() == -signal.SIGKILL
    fenced = events(daemon, "--type", "owner-fenced")
    first, kill = fenced[0], fenced[-1]
    assert (first["signal"], kill["signal"]) == ("SIGTERM", "SIGKILL")
    resumed = fenced[1:-1]
    assert resumed
    assert all(e["signal"] == "SIGTERM" for e in resumed)
    assert all(e["reason"].endswith(RESUMED) for e in resumed)
    assert kill["time"] - first["time"] < grace + 2.5
    check(daemon)


def test_sigterm_then_start_recovers(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    vm = start_run(daemon, children, "--disk", "/vm/a.img:shared", "--name", "vm1")
    vm2 = start_run(daemon, children, "--disk", "/vm/a.img:shared", "--name", "vm2")
    daemon.stop()
    assert vm.poll() is None
    restart(daemon)
    (mode, pids) = listed(daemon)[(FILES_LOCKSPACE, lease_name_for_path("/vm/a.img"))]
    assert (mode, pids) == ("shared", tuple(sorted((vm.pid, vm2.pid))))
    check(daemon)


def test_corruption_stops_start_up_with_a_clear_message(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    start_run(daemon, children, "--disk", "/vm/b.img", "--name", "vm2")
    crash(daemon)
    (segment,) = sorted(daemon.journal_dir.glob("journal-*.cbor"))
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte in the middle: not a torn tail
    segment.write_bytes(bytes(data))
    with pytest.raises(RuntimeError) as exc:
        restart(daemon)
    assert "journal corrupt" in str(exc.value)
    assert str(segment) in str(exc.value)
    # The documented way out: check, then repair (keeping copies), then start.
    check_run = daemon.lockd("journal-check", "--journal-dir", str(daemon.journal_dir))
    assert check_run.returncode == 1
    assert "DAMAGED" in check_run.stdout
    repaired = daemon.lockd("journal-check", "--journal-dir", str(daemon.journal_dir), "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert list(daemon.journal_dir.glob("journal-*.cbor.damaged-*"))
    restart(daemon)
    check(daemon)
    assert daemon.lockd("journal-check", "--journal-dir", str(daemon.journal_dir)).returncode == 0


@pytest.mark.parametrize("clock", ["right", "behind"])
def test_after_a_reboot_a_hole_left_in_the_newest_segment_is_cut_not_refused(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], clock: str
) -> None:
    """Unsynced writes reach the disk in no set order: after a power loss a page of the
    tail can keep older contents (zeros after an earlier end) with the next pages whole.
    That is damage with good records after it. Written in the host's previous boot, the
    journal is cut there and the daemon starts (it refused, and the host came back with
    no lockd); written in this boot, it is still refused (above). Also when the clock
    is hours behind at boot (a dead RTC battery): the segment's mtime is then later than
    the clock's now, and was refused as written in this boot."""
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    with daemon.client() as client:
        owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": sleeper.pid}
        client.call("register", owner=owner)
        for i in range(60):
            lease = {"lockspace": FILES_LOCKSPACE, "resource": f"r{i}"}
            client.call("acquire", leases=[lease], autocreate=True)
    crash(daemon)
    (segment,) = sorted(daemon.journal_dir.glob("journal-*.cbor"))
    data = bytearray(segment.read_bytes())
    assert len(data) > 3 * 4096
    page = 2 * 4096
    data[page + 1000 : page + 4096] = bytes(4096 - 1000)  # page 2 as it was, earlier
    segment.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="journal corrupt"):
        restart(daemon)  # in this boot: damage, refused
    (daemon.journal_dir / ".boot").write_bytes(uuid.uuid4().bytes)  # as after a reboot
    with pytest.raises(RuntimeError, match="journal corrupt"):
        restart(daemon)  # but the segment was written in this boot (an older lockd's?)
    # As after a reboot: written before it, or by a clock 5 hours ahead of this one.
    written = 1.0 if clock == "right" else time.time() + 5 * 3600
    os.utime(segment, (written, written))
    restart(daemon)
    log = daemon.log.read_text()
    assert "written before the host's last reboot" in log
    assert list(daemon.journal_dir.glob("journal-*.cbor.damaged-*"))
    check(daemon)
    held = listed(daemon)
    assert 0 < len(held) < 60  # the leases journaled before the hole (their VM runs here)
    assert daemon.lockd("journal-check", "--journal-dir", str(daemon.journal_dir)).returncode == 0
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert (daemon.journal_dir / ".boot").read_bytes() == uuid.UUID(f.read().strip()).bytes


CRASH_CASES = [
    ("acquire-locked", "acquire"),
    ("acquire-journaled", "acquire"),
    ("release-journaled", "release"),
    ("release-dropped", "release"),
    ("lockspace-mkdir", "create-lockspace"),
    ("snapshot-tmp", "rotate"),
    ("snapshot-tmp:2", "rotate"),  # the second snapshot child, not the second time in each
    ("snapshot-written", "rotate"),
    ("segment-started", "rotate"),
]


RECOVERY_CRASH_POINTS = ["restore-journaled", "recovery-completed"]
FENCE_CRASH_POINTS = ["fence-journaled"]


def test_every_crash_point_is_covered() -> None:
    named = [point.partition(":")[0] for point, _ in CRASH_CASES]
    covered = named + RECOVERY_CRASH_POINTS + FENCE_CRASH_POINTS
    assert set(covered) == set(POINTS)


@pytest.mark.parametrize(
    "spec",
    ["acquire-lockd", "Acquire-Locked", "acquire-locked:0", "acquire-locked:x", "acquire-locked:"],
)
def test_a_crash_point_that_could_never_fire_stops_serve(tmp_path: Path, spec: str) -> None:
    """A mistyped LOCKD_CRASH_AT (no such point, a count that is not 1 or more) stops
    `lockd serve` naming the points, before it journals or binds anything: it used to
    serve on with no crash armed, and a crash test passed without its crash."""
    done = subprocess.run(
        [*LOCKD, "serve", "--socket", str(tmp_path / "s.sock"), "--lock-dir",
         str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "journal"), "--timeout", "0.2"],
        env={**os.environ, "LOCKD_CRASH_AT": spec}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"LOCKD_CRASH_AT={spec!r}" in done.stderr
    assert ", ".join(POINTS) in done.stderr or "a whole number from 1" in done.stderr
    assert not (tmp_path / "journal").exists()
    assert not (tmp_path / "s.sock").exists()


def test_an_armed_crash_point_is_logged_and_a_bad_one_refused_in_process(tmp_path: Path) -> None:
    """`lockd serve` says at start which crash point is armed (the crash test can see the
    variable reached it); an embedding program with a mistyped one gets ConfigError."""
    done = subprocess.run(
        [*LOCKD, "serve", "--socket", str(tmp_path / "s.sock"), "--lock-dir",
         str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "journal"), "--timeout", "0.2"],
        env={**os.environ, "LOCKD_CRASH_AT": "acquire-locked:3"}, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "LOCKD_CRASH_AT=acquire-locked:3: this lockd will SIGKILL itself" in done.stderr
    embedded = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom lockd.embed import ConfigError, LockService\n"
         "try:\n    LockService(lock_dir=sys.argv[1], journal_dir=sys.argv[2])\n"
         "except ConfigError as exc:\n    print(exc)\n",
         str(tmp_path / "locks"), str(tmp_path / "j2")],
        env={**os.environ, "LOCKD_CRASH_AT": "release-jounaled"}, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr
    assert "no crash point 'release-jounaled'" in embedded.stdout


def _fencing_daemon_that_crashes(
    make_daemon: MakeDaemon, tmp_path: Path, name: str, crash_at: str, grace: float = 1.0
) -> DaemonProcess:
    config = tmp_path / "lockd.toml"
    config.write_text(f"fence_grace = {grace}\n")
    daemon = make_daemon(name, None, "--config", str(config))
    daemon.stop()  # armed in a fresh process: the variable is read at start
    return restart(daemon, LOCKD_CRASH_AT=crash_at)


def test_a_crash_between_journaling_a_sigterm_and_sending_it_loses_no_fence(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A VM's own connection drops while it holds a lease. lockd journals the SIGTERM and
    is killed before it sends it. The fence is not lost with it: the next daemon reads
    the record and sends the SIGTERM. (Sent first, as it once was, a crash in between
    left a fence no record told of, on a VM still holding its disk.)"""
    # A grace period well past the restart: the resumed fence's SIGKILL is due a grace
    # period after the first SIGTERM, and with 1 s a slow restart made it due at once,
    # racing the owner's exit on SIGTERM (seen as a flaky -9).
    daemon = _fencing_daemon_that_crashes(
        make_daemon, tmp_path, "term", "fence-journaled", grace=30.0
    )
    owner = start_dropping_owner(daemon, children, ignore_sigterm=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == -signal.SIGKILL
    assert owner.poll() is None  # journaled, not sent
    assert [e["signal"] for e in events(daemon, "--type", "owner-fenced")] == ["SIGTERM"]
    restart(daemon)
    assert owner.wait(10) == 0
    assert owner.stdout is not None
    assert owner.stdout.read().strip() == "got SIGTERM"
    fenced = events(daemon, "--type", "owner-fenced")
    assert [e["signal"] for e in fenced] == ["SIGTERM", "SIGTERM"]
    assert fenced[1]["reason"].endswith(RESUMED)
    wait_for(lambda: not listed(daemon))
    check(daemon)


def test_a_crash_between_journaling_a_sigkill_and_sending_it_still_kills(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The VM ignores SIGTERM; lockd journals the SIGKILL a grace period later and is
    killed before it sends it. The next daemon finds the VM still running: the fence
    goes on, SIGKILL at once, its deadline having passed, not a new grace period."""
    daemon = _fencing_daemon_that_crashes(make_daemon, tmp_path, "kill", "fence-journaled:2")
    owner = start_dropping_owner(daemon, children, ignore_sigterm=True)
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == -signal.SIGKILL
    assert owner.poll() is None
    restart(daemon)
    assert owner.wait(10) == -signal.SIGKILL
    fenced = events(daemon, "--type", "owner-fenced")
    assert [e["signal"] for e in fenced] == ["SIGTERM", "SIGKILL", "SIGTERM", "SIGKILL"]
    assert fenced[2]["reason"].endswith(RESUMED)
    assert fenced[3]["time"] - fenced[2]["time"] < 1.0  # not a grace period of its own
    wait_for(lambda: not listed(daemon))
    check(daemon)
    crash(daemon)  # finished: the next start resumes nothing
    restart(daemon)
    assert len(events(daemon, "--type", "owner-fenced")) == 4


@pytest.mark.parametrize("point", RECOVERY_CRASH_POINTS)
def test_a_crash_inside_recovery_still_fences_the_owner_of_a_lost_lease(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], point: str
) -> None:
    """Recovery finds a lease stolen while lockd was down and dies before it signals the
    owner: the next start fences it (it may be writing a disk another host holds)."""
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    crash(daemon)
    steal(lease_file(daemon, "/vm/a.img"), children)
    with pytest.raises(RuntimeError, match="exited at start"):
        restart(daemon, LOCKD_CRASH_AT=point)
    assert daemon.proc is not None
    assert daemon.proc.returncode == -signal.SIGKILL
    assert vm.poll() is None  # not signalled yet
    assert events(daemon, "--type", "lease-lost")  # what the crashed recovery found
    restart(daemon)
    assert vm.wait(10) == -signal.SIGTERM
    (fenced,) = events(daemon, "--type", "owner-fenced")
    assert fenced["reason"].endswith(RESUMED)
    done = events(daemon, "--type", "recovery-completed")[-1]
    assert [f["owner"]["pid"] for f in done["fencing"]] == [vm.pid]  # listed before signalled
    assert listed(daemon) == {}


def journal_shifted(journal_dir: Path, seconds: float) -> None:
    """Rewrite every record's time ``seconds`` earlier: what a clock stepped forward by
    that much after they were written makes of them (the boot time moves with it)."""
    for segment in sorted(journal_dir.glob("journal-*.cbor")):
        data = segment.read_bytes()
        first_seq, start = header_length(data)
        entries, _ = decode_records(data[start:], first_seq)
        out = [encode_header(first_seq)]
        out.extend(encode_record(attrs.evolve(e, time=e.time - seconds)) for e in entries)
        segment.write_bytes(b"".join(out))


def test_a_fence_owed_before_a_clock_step_forward_is_still_resumed(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """A VM's lease was stolen and recovery died before fencing it; then NTP stepped the
    clock forward (at boot, by hours), so the records now look older than this boot.
    The owner is of this boot (its boot id says so): its fence is resumed, not dropped
    (until 2026-11-27 it was, and the VM went on writing a disk another host held)."""
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    crash(daemon)
    steal(lease_file(daemon, "/vm/a.img"), children)
    with pytest.raises(RuntimeError, match="exited at start"):
        restart(daemon, LOCKD_CRASH_AT="recovery-completed")
    journal_shifted(daemon.journal_dir, time.time() - boot_time() + 3600)
    restart(daemon)
    assert vm.wait(10) == -signal.SIGTERM
    (fenced,) = events(daemon, "--type", "owner-fenced")
    assert fenced["reason"].endswith(RESUMED)
    assert listed(daemon) == {}


@pytest.mark.parametrize(("point", "action"), CRASH_CASES)
def test_crash_at_each_point_then_restart(
    make_daemon: MakeDaemon,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    point: str,
    action: str,
) -> None:
    """SIGKILL inside the operation; after restart the invariants hold and nothing is lost."""
    config = tmp_path / "lockd.toml"
    config.write_text("journal_segment_bytes = 4096\njournal_retain_segments = 1\n")
    daemon = make_daemon("crash", None, "--config", str(config))
    survivor = start_run(daemon, children, "--disk", "/vm/keep.img", "--name", "keeper")
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    pid = str(sleeper.pid)
    if action == "release":
        assert daemon.lockd("acquire", "--owner-pid", pid, "--disk", "/vm/x.img").returncode == 0
    # Arm the crash point in a fresh daemon process (the variable is read at start).
    daemon.stop()
    restart(daemon, LOCKD_CRASH_AT=point)
    if action == "acquire":
        done = daemon.lockd("acquire", "--owner-pid", pid, "--disk", "/vm/x.img")
    elif action == "release":
        done = daemon.lockd("release", "--owner-pid", pid, "--disk", "/vm/x.img")
    elif action == "create-lockspace":
        done = subprocess.run(
            [sys.executable, "-c",
             "import sys; from protocol.client import Client\n"
             "Client(sys.argv[1]).call('create-lockspace', lockspace='pool')", str(daemon.socket)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    else:
        # Enough journal traffic to rotate a 4 KiB segment: what `lockd acquire --owner-pid`
        # sends, a connection each, from this process (a command per acquire took seconds).
        owner = {"uuid": uuid.uuid4().bytes, "name": f"pid-{pid}", "id": 1, "pid": sleeper.pid}
        for i in range(200):
            lease = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path(f"/vm/r{i}.img")}
            try:
                with daemon.client("lockd-acquire") as client:
                    client.call("register", owner=owner)
                    client.call("acquire", leases=[lease], autocreate=True)
            except OSError:  # refused, or ConnectionLostError: the daemon died
                break
        done = subprocess.CompletedProcess([], 0)
    assert daemon.proc is not None
    assert daemon.proc.wait(20) == -signal.SIGKILL, f"crash point {point} was not reached"
    assert done.returncode != 0 or action == "rotate"  # the client saw the daemon die
    restart(daemon)
    check(daemon)
    held = listed(daemon)
    assert (FILES_LOCKSPACE, lease_name_for_path("/vm/keep.img")) in held
    assert held[(FILES_LOCKSPACE, lease_name_for_path("/vm/keep.img"))][1] == (survivor.pid,)
    # The journal says how the restart ended: recovery completed, nothing lost.
    assert events(daemon, "--type", "recovery-completed")[-1]["lost"] == 0
    if action == "release":
        # Interrupted before or after the journal write: either still held by
        # its owner (and locked, see check) or released; never anyone else's.
        x = held.get((FILES_LOCKSPACE, lease_name_for_path("/vm/x.img")))
        assert x is None or x[1] == (sleeper.pid,)
    sleeper.kill()
    sleeper.wait()
    wait_for(lambda: all(sleeper.pid not in pids for _, pids in listed(daemon).values()))
    check(daemon)


def test_history_is_compacted_and_recovery_reads_only_the_tail(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Small segments: snapshots at each rotation, old segments pruned to the retention."""
    config = tmp_path / "lockd.toml"
    config.write_text("journal_segment_bytes = 4096\njournal_retain_segments = 2\n")
    daemon = make_daemon("compact", None, "--config", str(config))
    vm = start_run(daemon, children, "--disk", "/vm/keep.img", "--name", "keeper")
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    with daemon.client() as client:
        owner = {"uuid": os.urandom(16), "name": "churn", "id": 1, "pid": sleeper.pid}
        client.call("register", owner=owner)
        lease = {"lockspace": FILES_LOCKSPACE, "resource": "churn"}
        for _ in range(300):
            client.call("acquire", leases=[lease], autocreate=True)
            client.call("release", leases=[lease])

        def compacted() -> bool:
            """The last rotation's snapshot is written by a child: its segments go once
            it has. A rotation that came while the one before was still being written
            (a loaded machine) skipped its snapshot, and its segments stay until a later
            rotation's snapshot covers them: churn on until one has."""
            segments = len(list(daemon.journal_dir.glob("journal-*.cbor")))
            if segments <= 3 and len(list(daemon.journal_dir.glob("snapshot-*.cbor"))) <= 2:
                return True
            for _ in range(10):
                client.call("acquire", leases=[lease], autocreate=True)
                client.call("release", leases=[lease])
            return False

        wait_for(compacted, timeout=20)
    snapshots = sorted(daemon.journal_dir.glob("snapshot-*.cbor"))
    assert 1 <= len(snapshots) <= 2
    crash(daemon)
    restart(daemon)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/keep.img")): ("exclusive", (vm.pid,))
    }
    check(daemon)
    log = daemon.log.read_text()
    assert "snapshot at" in log
    follow = daemon.lockd("events", "--journal-dir", str(daemon.journal_dir), "--json")
    seqs = [json.loads(line)["seq"] for line in follow.stdout.splitlines()]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # retained history is gapless


def test_requests_during_recovery_wait_for_it(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A client that connects while recovery runs is served after it, not refused."""
    import importlib.util
    import uuid

    from actors.model import Owner
    from lockd import procs
    from protocol.client import Client

    spec = importlib.util.spec_from_file_location(
        "recovery_bench", Path(__file__).resolve().parents[2] / "contrib/bench/recovery.py"
    )
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    started = procs.start_time(sleeper.pid)
    assert started is not None
    owner = Owner(uuid.uuid4().bytes, "vm", 1, sleeper.pid, started)
    daemon = make_daemon("slow")
    daemon.stop()
    for path in daemon.journal_dir.iterdir():
        path.unlink()
    bench.build(daemon.journal_dir, tmp_path / "big-locks", [owner], 3000, 3100)
    daemon.lock_dir = tmp_path / "big-locks"
    daemon.proc = subprocess.Popen(
        [*LOCKD, "serve", "--socket", str(daemon.socket), "--admin-socket",
         str(daemon.admin_socket), "--lock-dir", str(daemon.lock_dir), "--journal-dir",
         str(daemon.journal_dir)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            client = Client(str(daemon.socket), timeout=30)  # waits in the backlog
            break
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline
            time.sleep(0.002)
    with client:
        status = client.call("status")
    assert status["leases"] == 3000
    done = events(daemon, "--type", "recovery-completed")[-1]
    assert status["journal_seq"] >= done["seq"]


def test_sighup_rereads_the_configuration(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """SIGHUP re-reads the file, says what needs a restart, and drops nothing. The journal
    tells an auditor which settings the reload changed (allowed_uids among them), and each
    daemon-started which allowed_uids are in force from then on."""
    config = tmp_path / "lockd.toml"
    config.write_text("max_clients = 50\nallowed_uids = [65534]\n")
    daemon = make_daemon("hup", None, "--config", str(config))
    assert events(daemon, "--type", "daemon-started")[-1]["allowed_uids"] == [65534]
    # A re-exec applies max_clients (the message said "at the next start" only); a moved
    # pid file takes a restart.
    config.write_text(f'max_clients = 5\npid_file = "{tmp_path / "hup.pid"}"\n')
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    # The record is journaled after the log lines, by the journal's own thread.
    wait_for(lambda: journaled(daemon, "config-reloaded") > 0)
    text = daemon.log.read_text()
    assert "max_clients, allowed_uids changed; not applied until a re-exec (SIGUSR1" in text
    assert "pid_file changed; that takes a restart" in text
    (reloaded,) = events(daemon, "--type", "config-reloaded")
    assert reloaded["file"] == str(config)
    assert sorted(reloaded["changed"]) == ["allowed_uids", "max_clients", "pid_file"]
    assert reloaded["applied"] == []  # logging only applies now
    config.write_text("max_clients = [\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the running configuration" in daemon.log.read_text())
    assert daemon.lockd("status").returncode == 0


def test_a_shared_lease_held_twice_stays_held_until_the_last_release_across_a_crash(
    counting_daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """Under ``shared_holds = "each"`` a VM given one shareable image twice holds its lease
    twice, as under virtlockd: the first detach leaves it held (in the kernel too), a
    lockd SIGKILLed and restarted in between still counts two, and the last release
    frees it."""
    daemon = counting_daemon  # shared_holds = "each"
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    disk = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/base.img")}
    path = daemon.lock_dir / FILES_LOCKSPACE / disk["resource"]
    owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": vm.pid}

    def holds() -> list[int]:
        with daemon.client() as client:
            client.call("register", owner=owner)
            return [lease.get("holds", 1) for lease in client.call("inquire")["leases"]]

    with daemon.client() as client:
        client.call("register", owner=owner)
        for _ in range(3):
            client.call("acquire", leases=[{**disk, "shared": True}], autocreate=True)
        client.call("release", leases=[disk])
    assert holds() == [2]
    assert probe(path, "classic", "write") == "busy"
    assert probe(path, "classic", "read") == "free"  # shared: other hosts may join
    check(daemon)

    crash(daemon)
    restart(daemon)
    assert holds() == [2]
    check(daemon)
    assert f"pid {vm.pid}, since " in daemon.lockd("leases").stdout
    assert ", held 2 times)" in daemon.lockd("leases").stdout
    with daemon.client() as client:
        client.call("register", owner=owner)
        client.call("release", leases=[disk])
        assert [e.get("holds") for e in client.call("inquire")["leases"]] == [None]
        assert probe(path, "classic", "write") == "busy"
        client.call("release", leases=[disk])
        assert client.call("inquire")["leases"] == []
    assert not path.exists()  # autocreated: removed with the last hold
    check(daemon)
    journaled = [(e["type"], e.get("holds")) for e in events(daemon, "--owner", "vm")
                 if e["type"].startswith("lease-")]  # fmt: skip
    assert journaled == [
        ("lease-acquired", None), ("lease-acquired", 2), ("lease-acquired", 3),
        ("lease-released", 2), ("lease-released", 1), ("lease-released", None),
    ]  # fmt: skip


def test_a_release_repeated_with_its_key_after_a_crash_ends_one_hold_only(
    counting_daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """One shareable image on two devices is held twice (shared_holds = "each"). lockd
    is SIGKILLed after journaling one device's release, before its reply; the caller
    repeats the release with the same key: the restarted lockd answers that it released
    it already and ends nothing, so the other device's hold keeps the image locked,
    also across a re-exec, and an acquire repeated with its key takes no third hold."""
    daemon = counting_daemon
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    owner = {"uuid": uuid.uuid4().bytes, "name": "vm1", "id": 1, "pid": vm.pid}
    ref = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/base.img")}
    attach, detach = [bytes([n]) * 16 for n in (1, 2)], bytes([3]) * 16
    with daemon.client() as client:
        assert client.server["once"] is True
        client.call("register", owner=owner)
        for key in attach:  # two devices: two holds
            client.call("acquire", leases=[{**ref, "shared": True}], autocreate=True, once=key)
    daemon.stop()
    restart(daemon, LOCKD_CRASH_AT="release-journaled")
    with daemon.client() as client:
        client.call("register", owner=owner)
        with pytest.raises(ConnectionError):
            client.call("release", leases=[ref], once=detach)
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == -9
    restart(daemon)

    def repeat() -> None:
        with daemon.client() as client:
            client.call("register", owner=owner)
            assert client.call("release", leases=[ref], once=detach) == {
                "released": 1,
                "repeated": True,
            }
            again = client.call("acquire", leases=[{**ref, "shared": True}], once=attach[1])
            assert again["repeated"] is True
            [lease] = client.call("inquire")["leases"]
            assert "holds" not in lease  # held once: the other device's hold
        assert probe(lease_file(daemon, "/vm/base.img"), "classic") == "busy"

    repeat()
    started = len(events(daemon, "--type", "daemon-started"))
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: len(events(daemon, "--type", "daemon-started")) > started, timeout=30)
    repeat()
    with daemon.client() as client:
        client.call("register", owner=owner)
        assert client.call("release", leases=[ref], once=bytes([4]) * 16) == {"released": 1}
    assert not lease_file(daemon, "/vm/base.img").exists()
    check(daemon)
