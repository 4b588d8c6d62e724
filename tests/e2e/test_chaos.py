"""Chaos with real processes: many owners killed at random while two daemons are killed too.

Two daemons share one lock directory (two hosts on NFS). Each round kills
some owners and one or both daemons with SIGKILL, restarts them, takes new
leases, and then checks from outside (``check_all``): every reported lease
is locked, nothing else is, no lease has two exclusive holders, and each
journal replays to what its daemon reports. ``LOCKD_CHAOS_OWNERS`` and
``LOCKD_CHAOS_ROUNDS`` scale it up for a soak.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from actors.lockspace import LINK_CHECK_SECONDS
from protocol.client import RemoteError
from protocol.names import FILES_LOCKSPACE
from tests.e2e.conftest import DaemonProcess, MakeDaemon, wait_for
from tests.e2e.invariants import check_all

pytestmark = pytest.mark.e2e

OWNERS = int(os.environ.get("LOCKD_CHAOS_OWNERS", "150"))
ROUNDS = int(os.environ.get("LOCKD_CHAOS_ROUNDS", "5"))
DISKS = [f"disk-{i:03d}" for i in range(OWNERS // 2)]


def acquire_some(
    daemon: DaemonProcess, owners: list[subprocess.Popen[bytes]], rng: random.Random
) -> int:
    """Half the live owners try to take 1-3 disks; refusals must be busy (never anything odd)."""
    granted = 0
    refusals: list[str] = []
    for proc in owners:
        if proc.poll() is not None or rng.random() < 0.5:
            continue
        owner = {"uuid": uuid.uuid4().bytes, "name": f"vm{proc.pid}", "id": 1, "pid": proc.pid}
        leases = [
            {"lockspace": FILES_LOCKSPACE, "resource": disk, "shared": rng.random() < 0.3}
            for disk in rng.sample(DISKS, rng.randint(1, 3))
        ]
        with daemon.client("chaos-owner") as client:
            client.call("register", owner=owner)
            try:
                client.call("acquire", leases=leases, autocreate=True)
                granted += 1
            except RemoteError as exc:
                refusals.append(exc.code)
    assert set(refusals) <= {"busy"}, refusals
    return granted


def test_owners_and_daemons_killed_at_random(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("LOCKD_CHAOS_SEED", "7")))
    shared = tmp_path / "nfs"
    daemons = [make_daemon("host-a", shared), make_daemon("host-b", shared)]
    owners = [subprocess.Popen(["sleep", "600"]) for _ in range(OWNERS)]
    children.extend(owners)
    granted = checked = daemon_kills = owner_kills = 0
    for round_no in range(ROUNDS):
        for daemon in daemons:
            granted += acquire_some(daemon, owners[hash(daemon.root) % 2 :: 2], rng)
        for proc in rng.sample(owners, len(owners) // 10):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                owner_kills += 1
        victims = [d for d in daemons if rng.random() < 0.6] or [rng.choice(daemons)]
        for daemon in victims:
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            daemon_kills += 1
        for proc in rng.sample(owners, len(owners) // 20):  # some die while their daemon is down
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                owner_kills += 1
        for daemon in victims:
            daemon.start()
        for daemon in daemons:  # exits seen by pidfd are processed: wait until the tables settle

            def settled(d: DaemonProcess = daemon) -> bool:
                return _settled(d, owners)

            wait_for(settled, timeout=20)
        checked += check_all(daemons)
        print(f"round {round_no}: {checked} lease checks so far")
    print(
        f"\n{OWNERS} owners, {ROUNDS} rounds: {granted} acquires granted, {owner_kills} owners "
        f"and {daemon_kills} daemons killed, {checked} leases checked against the kernel"
    )
    assert granted > 0
    assert checked > 0


def _settled(daemon: DaemonProcess, owners: list[subprocess.Popen[bytes]]) -> bool:
    dead = {p.pid for p in owners if p.poll() is not None}
    with daemon.client("settle") as client:
        leases = client.call("list-leases")["leases"]
    return not any(o["pid"] in dead for lease in leases for o in lease["owners"])


def _take(daemon: DaemonProcess, owner: subprocess.Popen[bytes], resource: str) -> bool:
    """Whether ``owner`` got ``resource`` from ``daemon`` (refusals: busy, never odd)."""
    registered = {"uuid": uuid.uuid4().bytes, "name": f"vm{owner.pid}", "id": 1, "pid": owner.pid}
    with daemon.client("race-owner") as client:
        client.call("register", owner=registered)
        try:
            client.call("acquire", autocreate=True,
                        leases=[{"lockspace": FILES_LOCKSPACE, "resource": resource}])  # fmt: skip
        except RemoteError as exc:
            refusal = exc.code
        else:
            return True
    assert refusal == "busy", refusal
    return False


def _lists(daemon: DaemonProcess, resource: str) -> bool:
    with daemon.client("race") as client:
        return any(lease["resource"] == resource for lease in client.call("list-leases")["leases"])


def test_lease_files_and_directories_replaced_while_another_daemon_takes_the_disk(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """One daemon holds a VM's lease; its file is removed (or its lockspace directory moved
    aside and made again) while the other daemon's VM asks for the same disk, and sometimes
    the holding daemon is SIGKILLed and restarted meanwhile. Whoever wins, once the loser
    has looked again at its files there is one holder: the winner; a holder that lost
    the file is fenced and reports nothing; every journal agrees with its daemon."""
    rng = random.Random(int(os.environ.get("LOCKD_CHAOS_SEED", "7")))
    shared = tmp_path / "nfs"
    daemons = [make_daemon("host-a", shared), make_daemon("host-b", shared)]
    space = shared / FILES_LOCKSPACE
    outcomes: dict[str, int] = {}
    for round_no in range(10):
        holder, taker = rng.sample(daemons, 2)
        resource = f"race-{round_no:02d}"
        vm, rival = (subprocess.Popen(["sleep", "600"]) for _ in range(2))
        children.extend((vm, rival))
        assert _take(holder, vm, resource)
        how = rng.choice(("file", "directory"))
        if how == "file":
            (space / resource).unlink()
        else:
            space.rename(tmp_path / f"aside-{round_no}")
            space.mkdir()
        killed = rng.random() < 0.4
        back_first = rng.random() < 0.5  # restarted before the other asks, or after
        if killed:
            assert holder.proc is not None
            holder.proc.send_signal(signal.SIGKILL)
            holder.proc.wait()
            if back_first:
                holder.start()
        time.sleep(rng.uniform(0, 2 * LINK_CHECK_SECONDS))  # before or after the next look
        won = _take(taker, rival, resource)
        if killed and not back_first:
            holder.start()
        if won:  # the holder's lease is lost: its VM fenced, the lease no longer listed
            assert vm.wait(10) == -signal.SIGTERM
            wait_for(lambda h=holder, r=resource: not _lists(h, r))  # type: ignore[misc]
        else:  # the holder kept it: locked again where the name is
            wait_for(lambda h=holder, r=resource: _lists(h, r) and (space / r).exists())  # type: ignore[misc]
            assert vm.poll() is None
        check_all(daemons)
        key = f"{how}{', holder killed' if killed else ''}: {'taken' if won else 'kept'}"
        outcomes[key] = outcomes.get(key, 0) + 1
        for proc in (vm, rival):
            proc.kill()
            proc.wait()
        for daemon in daemons:
            wait_for(lambda d=daemon, r=resource: not _lists(d, r))  # type: ignore[misc]
    print(f"\noutcomes: {outcomes}")
