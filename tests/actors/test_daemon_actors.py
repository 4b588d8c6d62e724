"""The daemon's actors together: connection, router, lockspaces, leases, journal, owners.

Fakes stand in for the socket, the process table and the journal file; lease
files and their OFD locks are real, so "is it locked" is asked of the kernel.
"""

from __future__ import annotations

import errno
import gc
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from actors import connection
from actors.events import (
    ConnectionOpened,
    JournalEntry,
    JournalResumed,
    LeaseAcquired,
    LeaseReleased,
    LockspaceCreated,
    OwnerFenced,
    ReleaseReason,
    ResourceCreated,
)
from actors.lease import LockBusyError
from actors.metrics import REGISTRY
from actors.model import Owner, SyncPolicy
from actors.owners import POLL_FULL_EVERY, POLL_SECONDS, POLL_SLICES
from lockd.lockfiles import HeldFile, LockspaceDir, try_lock, unlock
from protocol.codec import decode_item, encode_item
from protocol.framing import FrameDecoder, encode_frame
from tests.actors.harness import Conn, FakeTransport, Harness

FILES = "org.libvirt.lockd.files"
VM1, VM2, LIBVIRTD = 4001, 4002, 4000
VM3 = 4003


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "locks")
    for pid in (VM1, VM2, LIBVIRTD):
        harness.processes.spawn(pid)
    yield harness
    harness.close()


def lease(resource: str, lockspace: str = FILES, **extra: object) -> dict[str, object]:
    return {"lockspace": lockspace, "resource": resource, **extra}


def kernel_locked(path: Path) -> bool:
    """Ask the kernel from a separate open file description (conflicts like another process)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try_lock(fd, shared=False)
    except LockBusyError:
        return True
    finally:
        os.close(fd)
    return False


def test_acquire_journals_before_replying_and_locks_the_file(h: Harness) -> None:
    """The reply comes after the event is journaled; the file is locked in the kernel."""
    vm = h.connect(VM1)
    vm.register(VM1)
    result = vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    assert result["leases"] == [{"lockspace": FILES, "resource": "disk-a", "mode": "exclusive"}]
    (acquired,) = h.journal_writer.events(LeaseAcquired)
    assert (acquired.resource, acquired.owner.pid, acquired.autocreate) == ("disk-a", VM1, True)
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    assert vm.ok("inquire")["leases"] == [
        {"lockspace": FILES, "resource": "disk-a", "mode": "exclusive"}
    ]


def test_busy_names_the_holder_and_changes_nothing(h: Harness) -> None:
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1, "vm1")
    vm2.register(VM2, "vm2")
    vm1.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    before = len(h.journal_writer.entries)
    error = vm2.error("acquire", leases=[lease("disk-a")], autocreate=True)
    assert error["code"] == "busy"
    assert "vm1" in error["message"]
    assert [o["pid"] for o in error["holders"]] == [VM1]
    assert len(h.journal_writer.entries) == before


def test_multi_lockspace_acquire_is_all_or_nothing(h: Harness) -> None:
    """The second lockspace is busy: what the first lockspace gave is rolled back."""
    (h.lock_dir / "other").mkdir()
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[lease("x", "other")], autocreate=True)
    error = vm2.error("acquire", leases=[lease("free"), lease("x", "other")], autocreate=True)
    assert error["code"] == "busy"
    rollback = [e for e in h.journal_writer.events(LeaseReleased) if e.owner.pid == VM2]
    assert [(e.resource, e.reason) for e in rollback] == [("free", ReleaseReason.ROLLBACK)]
    assert not (h.lock_dir / FILES / "free").exists()
    assert vm2.ok("inquire")["leases"] == []


def test_a_refused_multi_lockspace_acquire_is_answered_after_its_rollback(h: Harness) -> None:
    """The busy reply of an acquire whose second lockspace refused leaves only once the
    first lockspace's lease is released again, journaled, unlocked and its file gone:
    a reply is written after its events are in the journal (docs/protocol.md,
    Durability). Before, it went out first, and a daemon killed in between came back
    with the lease held for an owner that had been told it got nothing."""
    (h.lock_dir / "other").mkdir()
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[lease("x", "other")], autocreate=True)
    free = h.lock_dir / FILES / "free"
    seen: list[tuple[bytes, list[Any], bool, bool]] = []
    write = vm2.transport.write

    def write_and_look(data: bytes) -> None:
        released = h.journal_writer.events(LeaseReleased)
        seen.append((data, released, kernel_locked(free), free.exists()))
        write(data)

    vm2.transport.write = write_and_look  # type: ignore[method-assign]
    error = vm2.error("acquire", leases=[lease("free"), lease("x", "other")], autocreate=True)
    assert error["code"] == "busy"
    ((data, released, locked, exists),) = seen
    assert decode_item(data[4:])["error"]["code"] == "busy"
    assert [(e.resource, e.reason) for e in released] == [("free", ReleaseReason.ROLLBACK)]
    assert not locked
    assert not exists


def test_a_keyed_acquire_cut_off_between_lockspaces_is_finished_or_undone_by_its_repeat(
    h: Harness,
) -> None:
    """An acquire with a key journaled in its first lockspace only (as a crash before the
    second leaves it): repeated while the second is busy, its rollback gives back the
    first lockspace's lease too and forgets the key; repeated once the second is free,
    it runs anew and takes both. Repeated again, it changes nothing."""
    (h.lock_dir / "other").mkdir()
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[lease("x", "other")], autocreate=True)
    key = b"\x05" * 16
    both = [lease("free"), lease("x", "other")]
    vm2.ok("acquire", leases=[lease("free")], autocreate=True, once=key)  # the journaled part
    assert vm2.error("acquire", leases=both, autocreate=True, once=key)["code"] == "busy"
    rollback = h.journal_writer.events(LeaseReleased)[-1]
    assert (rollback.resource, rollback.reason, rollback.once) == (
        "free",
        ReleaseReason.ROLLBACK,
        key,
    )
    assert vm2.ok("inquire")["leases"] == []
    vm1.ok("release", leases=[lease("x", "other")])
    result = vm2.ok("acquire", leases=both, autocreate=True, once=key)
    assert "repeated" not in result
    before = len(h.journal_writer.entries)
    again = vm2.ok("acquire", leases=both, autocreate=True, once=key)
    assert again == {**result, "repeated": True}
    assert len(h.journal_writer.entries) == before
    assert {(ls["resource"], ls["mode"]) for ls in vm2.ok("inquire")["leases"]} == {
        ("free", "exclusive"),
        ("x", "exclusive"),
    }


def test_a_keyed_acquire_cut_off_between_lockspaces_is_completed_by_its_repeat(
    h: Harness,
) -> None:
    """Journaled in its first lockspace only, an acquire repeated with its key takes the
    second lockspace's lease and answers as granted, the first one's not taken twice."""
    (h.lock_dir / "other").mkdir()
    vm = h.connect(VM1)
    vm.register(VM1)
    key = b"\x06" * 16
    vm.ok("acquire", leases=[lease("s", shared=True)], autocreate=True, once=key)
    both = [lease("s", shared=True), lease("y", "other")]
    result = vm.ok("acquire", leases=both, autocreate=True, once=key)
    assert result["repeated"] is True
    acquired = [(e.resource, e.holds) for e in h.journal_writer.events(LeaseAcquired)]
    assert acquired == [("s", None), ("y", None)]
    error = vm.error("release", leases=[lease("s")], once=key)
    assert error["code"] == "invalid-argument"
    assert str(uuid.UUID(bytes=key)) in error["message"]


def _vm2_behind_vm1_with_the_disk_filling_at_a_release(h: Harness) -> Conn:
    """VM2 registered, VM1 holding ``other/x``, and the journal's disk filling at the next
    release: an acquire of ``free`` and ``other/x`` takes ``free``, then its rollback
    cannot be journaled."""
    (h.lock_dir / "other").mkdir()
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[lease("x", "other")], autocreate=True)

    def fill_disk_at_a_release(entries: Sequence[JournalEntry]) -> None:
        if any(isinstance(e.event, LeaseReleased) for e in entries):
            h.journal_writer.fail = True

    h.journal_writer.during_append = fill_disk_at_a_release
    return vm2


def acquires_by_result() -> Counter[str]:
    """``lockd_acquires_total`` now, by result."""
    series = REGISTRY.counters.get("lockd_acquires_total", {})
    return Counter({dict(labels)["result"]: int(n) for labels, n in series.items()})


def test_a_rollback_the_journal_refuses_is_reported_not_hidden(h: Harness) -> None:
    """The disk fills between an acquire's first lockspace and its rollback: the release
    cannot be journaled, so the lease it took stays held (too long beats too early).
    The reply says so, io-error naming that lease, where before it said ``busy``: the
    client believed it held nothing, and nothing would release the lease until its
    owner exited."""
    vm2 = _vm2_behind_vm1_with_the_disk_filling_at_a_release(h)
    before = acquires_by_result()
    error = vm2.error("acquire", leases=[lease("free"), lease("x", "other")], autocreate=True)
    h.journal_writer.during_append = None
    h.journal_writer.fail = False
    assert error["code"] == "io-error"
    assert acquires_by_result() - before == Counter({"io-error": 1}), "counted as answered"
    assert "lease other/x is held exclusive by" in error["message"]
    assert f"{FILES}/free: journal write failed" in error["message"]
    assert vm2.ok("inquire")["leases"] == [
        {"lockspace": FILES, "resource": "free", "mode": "exclusive"}
    ]
    assert kernel_locked(h.lock_dir / FILES / "free")
    assert vm2.ok("release", all=True) == {"released": 1}


def test_a_rollback_after_part_of_it_was_released_meanwhile_releases_the_rest(
    h: Harness,
) -> None:
    """An acquire of two disks and a busy lease elsewhere; between the disks' grant and
    the rollback, another connection of the same VM releases one disk. The rollback,
    all or nothing, was refused ``not-held`` for that disk: the other disk stayed held
    and locked for good, and the reply was io-error saying the journal could not record
    the release. The rollback's goal is "not held": it releases what is still held, and
    the reply is the refusal that caused it."""
    (h.lock_dir / "other").mkdir()
    vm1, vm2, mgr = h.connect(VM1), h.connect(VM2), h.connect(LIBVIRTD)
    vm1.register(VM1)
    vm2.register(VM2)
    mgr.register(VM2)
    vm1.ok("acquire", leases=[lease("x", "other")], autocreate=True)

    def release_a_at_the_grant(entries: Sequence[JournalEntry]) -> None:
        if any(isinstance(e.event, LeaseAcquired) for e in entries):
            h.journal_writer.during_append = None
            mgr.send("release", leases=[{"lockspace": FILES, "resource": "a"}])

    h.journal_writer.during_append = release_a_at_the_grant
    error = vm2.error(
        "acquire", leases=[lease("a"), lease("b"), lease("x", "other")], autocreate=True
    )
    assert error["code"] == "busy", error
    assert [m["result"] for m in mgr.messages()] == [{"released": 1}]
    released = [(e.resource, e.reason) for e in h.journal_writer.events(LeaseReleased)]
    assert released == [("a", ReleaseReason.CLIENT), ("b", ReleaseReason.ROLLBACK)]
    assert vm2.ok("inquire")["leases"] == []
    assert not kernel_locked(h.lock_dir / FILES / "b")


@pytest.mark.parametrize("steps", range(14))
@pytest.mark.parametrize("same_lockspace", [False, True])
def test_an_acquire_arriving_during_anothers_rollback_never_meets_its_lock(
    tmp_path: Path, steps: int, same_lockspace: bool
) -> None:
    """VM2's acquire takes ``free`` and is refused by ``x``: VM1 holds it in another
    lockspace, or another host holds it in the same one (``free`` is locked, then its
    lock dropped); VM3 asks for ``free`` at each point of that, until after the rollback.
    VM3 gets ``free`` or is refused ``busy`` naming VM2 (the holder of the moment),
    never refused as held by "another process or host" (the kernel lock of the lease
    being dropped: the drop is done before the next lock on it is taken), and never
    granted while VM2 holds it: the journal gives ``free`` one holder at a time."""
    h = Harness(tmp_path / "locks")
    other_host: int | None = None
    try:
        for pid in (VM1, VM2, VM3):
            h.processes.spawn(pid)
        where = FILES if same_lockspace else "other"
        vm1, vm2, vm3 = h.connect(VM1), h.connect(VM2), h.connect(VM3)
        vm1.register(VM1, "vm1")
        vm2.register(VM2, "vm2")
        vm3.register(VM3, "vm3")
        if same_lockspace:
            (h.lock_dir / FILES).mkdir(exist_ok=True)
            other_host = os.open(h.lock_dir / FILES / "x", os.O_RDWR | os.O_CREAT, 0o600)
            try_lock(other_host, shared=False)
        else:
            (h.lock_dir / "other").mkdir()
            vm1.ok("acquire", leases=[lease("x", where)], autocreate=True)
        vm3.ok("inquire")  # its lockspace is looked up: its acquire is one hop away
        vm2.send("acquire", leases=[lease("free"), lease("x", where)], autocreate=True)
        for _ in range(steps):
            h.dispatcher._run_ready(1)
        vm3.send("acquire", leases=[lease("free")], autocreate=True)
        h.run()
        (refused,) = vm2.messages()
        assert refused["error"]["code"] == "busy"
        (answer,) = vm3.messages()
        holders: set[int] = set()
        for entry in h.journal_writer.entries:
            event = entry.event
            if getattr(event, "resource", None) != "free":
                continue
            if isinstance(event, LeaseAcquired):
                assert not holders, f"free granted to {event.owner.pid} while {holders} held it"
                holders.add(event.owner.pid)
            elif isinstance(event, LeaseReleased):
                holders.discard(event.owner.pid)
        if "error" in answer:
            assert answer["error"]["code"] == "busy"
            assert [o["pid"] for o in answer["error"]["holders"]] == [VM2], answer
            assert holders == set()
            assert not kernel_locked(h.lock_dir / FILES / "free")
        else:
            assert holders == {VM3}
            assert kernel_locked(h.lock_dir / FILES / "free")
    finally:
        if other_host is not None:
            os.close(other_host)
        h.close()


def test_a_waiting_acquire_whose_rollback_the_journal_refuses_says_so(h: Harness) -> None:
    """As above, for an acquire with ``wait``: its first try takes ``free`` and meets the
    busy lease; the rollback's release cannot be journaled, so ``free`` stays held. That
    was dropped unsaid: the next tries found the owner holding ``free`` itself and the
    wait ended ``busy`` naming the asking owner, the lease held all the same. It ends at
    once, io-error naming ``free``, as without a wait."""
    vm2 = _vm2_behind_vm1_with_the_disk_filling_at_a_release(h)
    rid = vm2.send("acquire", leases=[lease("free"), lease("x", "other")], autocreate=True, wait=2)
    h.run()
    h.journal_writer.during_append = None
    h.journal_writer.fail = False
    for _ in range(30):
        h.advance(0.1)
    (reply,) = vm2.messages()
    assert reply["id"] == rid
    error = reply["error"]
    assert error["code"] == "io-error", error
    assert f"{FILES}/free: journal write failed" in error["message"]
    assert vm2.ok("inquire")["leases"] == [
        {"lockspace": FILES, "resource": "free", "mode": "exclusive"}
    ]


def test_rollback_keeps_a_shared_lease_held_before(h: Harness) -> None:
    """A failed acquire never releases what the owner already held."""
    (h.lock_dir / "other").mkdir()
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm2.ok("acquire", leases=[lease("s", shared=True)], autocreate=True)
    vm1.ok("acquire", leases=[lease("x", "other")], autocreate=True)
    vm2.error("acquire", leases=[lease("s", shared=True), lease("x", "other")], autocreate=True)
    assert vm2.ok("inquire")["leases"] == [{"lockspace": FILES, "resource": "s", "mode": "shared"}]


def test_journal_failure_grants_nothing(h: Harness) -> None:
    """ENOSPC on the journal: io-error, no lease, no kernel lock left behind."""
    vm = h.connect(VM1)
    vm.register(VM1)
    h.journal_writer.fail = True
    error = vm.error("acquire", leases=[lease("disk-a")], autocreate=True)
    assert error["code"] == "io-error"
    assert not kernel_locked(h.lock_dir / FILES / "disk-a")
    h.journal_writer.fail = False
    assert vm.ok("inquire")["leases"] == []


def test_unjournaled_release_keeps_the_lease(h: Harness) -> None:
    """A release that cannot be journaled fails and the lock stays: too long beats too early."""
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    h.journal_writer.fail = True
    assert vm.error("release", leases=[lease("disk-a")])["code"] == "io-error"
    h.journal_writer.fail = False
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    assert vm.ok("release", leases=[lease("disk-a")])["released"] == 1
    assert not (h.lock_dir / FILES / "disk-a").exists()


def test_pipelined_requests_are_answered_in_order(h: Harness) -> None:
    vm = h.connect(VM1)
    vm.register(VM1)
    requests: list[tuple[str, dict[str, object]]] = [
        ("acquire", {"leases": [lease("a")], "autocreate": True}),
        ("release", {"leases": [lease("a")]}),
        ("acquire", {"leases": [lease("a")], "autocreate": True}),
        ("inquire", {}),
    ]
    burst = b"".join(
        encode_frame(encode_item({"op": op, "id": i, **args}))
        for i, (op, args) in enumerate(requests, start=10)
    )
    vm.send_raw(burst)
    h.run()
    replies = vm.messages()
    assert [r["id"] for r in replies] == [10, 11, 12, 13]
    assert all("result" in r for r in replies)
    assert len(replies[-1]["result"]["leases"]) == 1


def test_many_pipelined_requests_answered_at_once_are_all_answered(h: Harness) -> None:
    """Thousands of pipelined requests that need no other actor (hello, a refusal) are
    each answered; the VM's own connection stays open and its lease held, no fence.

    Each such reply used to take the next request from inside itself: a few hundred
    nested past Python's recursion limit, and the connection closed as an internal
    error, fencing the VM."""
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    hello = encode_frame(encode_item({"op": "hello", "id": 7, "versions": [1]}))
    refused = encode_frame(encode_item({"op": "disconnect", "id": 8, "client": 1}))
    vm.send_raw((hello + refused) * 1500)
    h.run()
    replies = vm.messages()
    assert [r["id"] for r in replies] == [7, 8] * 1500
    assert all("result" in r for r in replies[::2])
    assert {r["error"]["code"] for r in replies[1::2]} == {"permission-denied"}
    assert not vm.transport.closed
    assert h.processes.signals == []
    assert len(vm.ok("inquire")["leases"]) == 1
    assert kernel_locked(h.lock_dir / FILES / "disk-a")


def test_register_rules(h: Harness) -> None:
    """Own pid: fine. Someone else's: only root or that process's uid. Unknown pid: not-found."""
    h.processes.spawn(5000, uid=1000)
    h.processes.spawn(5001, uid=1001)
    assert h.connect(5000, uid=1000).register(5000)
    assert h.connect(5000, uid=0).register(5001)  # root (libvirtd) registers a VM
    other = h.connect(5000, uid=1000)
    error = other.error("register", owner={"uuid": b"u" * 16, "name": "x", "id": 1, "pid": 5001})
    assert error["code"] == "permission-denied"
    missing = h.connect(5000, uid=1000).error(
        "register", owner={"uuid": b"u" * 16, "name": "x", "id": 1, "pid": 9999}
    )
    assert missing["code"] == "not-found"


def test_a_refused_register_says_who_may_register_the_pid(h: Harness) -> None:
    """A user naming root's process (``lockd acquire --owner-pid 1``) read "only root or
    uid 0 may register it"; the message now names the user's uid, and root once."""
    h.processes.spawn(5000, uid=1000)
    user = h.connect(5000, uid=1000)
    for pid, uid, may in ((5001, 0, "only root may"), (5002, 1001, "only root or uid 1001 may")):
        h.processes.spawn(pid, uid=uid)
        error = user.error("register", owner={"uuid": b"u" * 16, "name": "x", "id": 1, "pid": pid})
        assert error["code"] == "permission-denied"
        assert error["message"] == (
            f"register: pid {pid} runs as uid {uid}; you are uid 1000: {may} register it"
        )


def test_the_daemons_own_pid_is_no_owner(h: Harness) -> None:
    """Registering lockd's own pid (the harness's daemon is pid 1) is refused, even as
    root: a lost lease's fence would signal the daemon, which stops it, and every lease
    it holds with it."""
    h.processes.spawn(1, uid=0)
    conn = h.connect(LIBVIRTD, uid=0)
    error = conn.error("register", owner={"uuid": b"u" * 16, "name": "x", "id": 1, "pid": 1})
    assert error["code"] == "invalid-argument"
    assert "is this lockd itself" in error["message"]
    assert conn.error("inquire")["code"] == "not-registered"
    assert conn.register(VM1)


def test_a_peers_pid_is_its_own_only_while_the_peer_runs(h: Harness) -> None:
    """A peer registers its own pid whatever that process's uid; once the peer has exited,
    its pid (from SO_PEERCRED) may be another user's process and takes the uid rule.
    Before, the pid alone counted, and that process was fenced when the connection closed."""
    h.processes.spawn(5002, uid=0)
    alive = h.connect(5002, uid=1000)  # euid 1000 at connect, real uid 0
    assert alive.register(5002)
    reused = h.connect(5002, uid=1000)
    reused.transport.peer_runs = False  # the peer exited; root's process got its pid
    error = reused.error("register", owner={"uuid": b"u" * 16, "name": "x", "id": 1, "pid": 5002})
    assert error["code"] == "permission-denied"
    assert "the process that connected as pid 5002 has exited" in error["message"]


def test_a_thread_id_is_not_an_owner(h: Harness) -> None:
    """A thread id opens in /proc like a pid; registering one is refused with the process
    to register instead, and the connection stays unregistered."""
    h.processes.spawn(VM1 + 10)
    h.processes.threads[VM1 + 10] = VM1
    conn = h.connect(LIBVIRTD)
    owner = {"uuid": b"u" * 16, "name": "vm", "id": 1, "pid": VM1 + 10}
    error = conn.error("register", owner=owner)
    assert error["code"] == "invalid-argument"
    assert f"thread of process {VM1}" in error["message"]
    assert conn.error("inquire")["code"] == "not-registered"
    assert conn.register(VM1)


def test_order_rules(h: Harness) -> None:
    """Acquire before register, register twice, anything after restrict."""
    c = h.connect(VM1)
    assert c.error("acquire", leases=[lease("a")])["code"] == "not-registered"
    c.register(VM1)
    assert (
        c.error("register", owner={"uuid": b"u" * 16, "name": "x", "id": 1, "pid": VM1})["code"]
        == "invalid-argument"
    )
    c.ok("restrict")
    assert c.error("inquire")["code"] == "restricted"
    assert c.error("hello", versions=[1])["code"] == "restricted"


def test_owner_connection_closing_fences_then_releases(h: Harness) -> None:
    """The VM's own connection drops while it runs: SIGTERM, SIGKILL, and only once it is
    dead are its leases released: a second writer never shares the disk with it."""
    h.processes.ignores_sigterm.add(VM1)
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    vm.close()
    assert h.processes.signals == [(VM1, "SIGTERM")]
    assert h.journal_writer.events(LeaseReleased) == []
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    h.advance(1.0)
    assert h.processes.signals == [(VM1, "SIGTERM")]
    h.advance(1.0)
    assert h.processes.signals == [(VM1, "SIGTERM"), (VM1, "SIGKILL")]
    released = h.journal_writer.events(LeaseReleased)
    assert [(e.resource, e.reason) for e in released] == [("disk-a", ReleaseReason.DISCONNECT)]
    assert not (h.lock_dir / FILES / "disk-a").exists()
    assert [e.signal for e in h.journal_writer.events(OwnerFenced)] == ["SIGTERM", "SIGKILL"]


USER = 1000
"""A user's uid (in allowed_uids of a root daemon)."""


def _user_vm_holding_a_lease(h: Harness, *, ignores_sigterm: bool = False) -> Conn:
    """VM3, a process of uid USER that registered itself on its own connection and holds
    ``disk-a``."""
    h.processes.spawn(VM3, uid=USER)
    if ignores_sigterm:
        h.processes.ignores_sigterm.add(VM3)
    vm = h.connect(VM3, uid=USER)
    vm.register(VM3)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    return vm


def _becomes_root(h: Harness, pid: int) -> None:
    """The process runs a set-user-ID root program that makes itself root (sudo)."""
    start, _ = h.processes.procs[pid]
    h.processes.procs[pid] = (start, 0)


def test_a_user_s_own_process_is_fenced_when_its_connection_closes(h: Harness) -> None:
    """A user's process whose own connection drops while it holds a lease is fenced, as
    root's VMs are: the user could signal it too."""
    _user_vm_holding_a_lease(h).close()
    assert h.processes.signals == [(VM3, "SIGTERM")]
    released = h.journal_writer.events(LeaseReleased)
    assert [(e.resource, e.reason) for e in released] == [("disk-a", ReleaseReason.DISCONNECT)]


def test_a_user_s_process_that_became_root_is_not_fenced_when_its_connection_closes(
    h: Harness,
) -> None:
    """A user's process registered itself, then ran a set-user-ID program that made it
    root's: its connection closing no longer has lockd SIGTERM and SIGKILL a root
    process on that user's behalf. Its lease stays held until it exits."""
    vm = _user_vm_holding_a_lease(h)
    _becomes_root(h, VM3)
    vm.close()
    h.advance(2.0)
    h.advance(2.0)
    assert h.processes.signals == []
    assert h.journal_writer.events(OwnerFenced) == []
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    h.processes.exit(VM3)
    h.run()
    released = h.journal_writer.events(LeaseReleased)
    assert [(e.resource, e.reason) for e in released] == [("disk-a", ReleaseReason.OWNER_EXIT)]


def test_a_user_s_process_that_becomes_root_after_the_sigterm_gets_no_sigkill(
    h: Harness,
) -> None:
    """The same process, signalled while still the user's, makes itself root on SIGTERM
    (it runs sudo): the SIGKILL a grace period later is not sent, and its lease stays
    held until it exits."""
    vm = _user_vm_holding_a_lease(h, ignores_sigterm=True)
    vm.close()
    assert h.processes.signals == [(VM3, "SIGTERM")]
    _becomes_root(h, VM3)
    h.advance(2.0)
    h.advance(2.0)
    assert h.processes.signals == [(VM3, "SIGTERM")]
    assert [e.signal for e in h.journal_writer.events(OwnerFenced)] == ["SIGTERM"]
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    h.processes.exit(VM3)
    h.run()
    released = h.journal_writer.events(LeaseReleased)
    assert [(e.resource, e.reason) for e in released] == [("disk-a", ReleaseReason.OWNER_EXIT)]


def test_a_fence_the_journal_cannot_record_is_signalled_anyway_and_recorded_later(
    h: Harness,
) -> None:
    """The disk under the journal is full when the VM's own connection drops: the SIGTERM
    goes all the same (better a fenced VM than a writer on a disk it lost), and its
    record is written once the journal heals, so a crash after that still leaves the
    next daemon the fence; the signal is not sent again."""
    h.processes.ignores_sigterm.add(VM1)
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    h.journal_writer.fail = True
    vm.close()
    assert h.processes.signals == [(VM1, "SIGTERM")]
    assert h.journal_writer.events(OwnerFenced) == []
    h.advance(0.5)
    h.journal_writer.fail = False
    h.advance(0.6)  # the retry, a second after the failure
    assert [e.signal for e in h.journal_writer.events(OwnerFenced)] == ["SIGTERM"]
    assert h.processes.signals == [(VM1, "SIGTERM")]
    h.advance(1.0)
    assert h.processes.signals == [(VM1, "SIGTERM"), (VM1, "SIGKILL")]
    assert [e.signal for e in h.journal_writer.events(OwnerFenced)] == ["SIGTERM", "SIGKILL"]
    released = h.journal_writer.events(LeaseReleased)
    assert [(e.resource, e.reason) for e in released] == [("disk-a", ReleaseReason.DISCONNECT)]
    h.advance(5.0)
    assert len(h.journal_writer.events(OwnerFenced)) == 2  # nothing left to retry


def test_status_shows_each_fence_in_progress_and_when_its_sigkill_comes(h: Harness) -> None:
    """What lockd is about to kill, why, and when: the grace period counting down, then
    the wait for the exit after SIGKILL; nothing once the fence is over. Metrics count
    them, for an alert."""
    h.processes.signal = lambda owner, signum: True  # type: ignore[method-assign]
    vm = h.connect(VM1)
    vm.register(VM1, "vm1")
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    admin = h.connect(LIBVIRTD, admin=True)
    assert admin.ok("status")["fencing"] == []
    assert "\nlockd_fences_in_progress 0\n" in admin.ok("metrics")["text"]
    vm.close()
    h.advance(0.5)
    assert "\nlockd_fences_in_progress 1\n" in admin.ok("metrics")["text"]
    (fence,) = admin.ok("status")["fencing"]
    assert (fence["owner"]["name"], fence["owner"]["pid"]) == ("vm1", VM1)
    assert fence["reason"] == "connection closed while holding leases"
    assert (fence["next_signal"], fence["due_in_s"]) == ("SIGKILL", pytest.approx(1.1))
    seen_while_recorded: list[tuple[str | None, float | None]] = []

    def look(entries: Sequence[JournalEntry]) -> None:
        if any(isinstance(e.event, OwnerFenced) for e in entries):
            (now,) = h.owners_actor()._fences_now(0).fences
            seen_while_recorded.append((now.next_signal, now.due_in))

    h.journal_writer.during_append = look
    h.advance(1.5)  # SIGKILL sent; the process has not exited yet
    # While its record is written, the SIGKILL is due now, not yet sent.
    assert seen_while_recorded == [("SIGKILL", 0.0)]
    h.journal_writer.during_append = None
    (fence,) = admin.ok("status")["fencing"]
    assert (fence["next_signal"], fence["due_in_s"]) == (None, None)
    h.processes.exit(VM1)
    h.run()
    assert admin.ok("status")["fencing"] == []
    assert "\nlockd_fences_in_progress 0\n" in admin.ok("metrics")["text"]


def test_owner_that_survives_sigkill_keeps_its_lock(h: Harness) -> None:
    """A VM stuck in the kernel keeps the disk locked rather than sharing it."""
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    h.processes.signal = lambda owner, signum: True  # type: ignore[method-assign]
    vm.close()
    h.advance(2.0)
    h.advance(2.0)
    assert h.journal_writer.events(LeaseReleased) == []
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    h.processes.exit(VM1)
    h.run()
    assert [e.reason for e in h.journal_writer.events(LeaseReleased)] == [ReleaseReason.DISCONNECT]


def test_a_sigkill_that_cannot_be_sent_is_sent_again(h: Harness) -> None:
    """Out of descriptors when the SIGKILL is due (its pidfd cannot be opened): not
    "survived SIGKILL", but sent again once it can be, and the fence completes."""
    h.processes.ignores_sigterm.add(VM1)
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    vm.close()
    h.processes.unsignallable.add(VM1)
    h.advance(2.0)
    h.advance(2.0)
    assert h.processes.signals == [(VM1, "SIGTERM")]
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    h.processes.unsignallable.clear()
    h.advance(0.5)
    assert h.processes.signals == [(VM1, "SIGTERM"), (VM1, "SIGKILL")]
    released = h.journal_writer.events(LeaseReleased)
    assert [(e.resource, e.reason) for e in released] == [("disk-a", ReleaseReason.DISCONNECT)]


def test_fencing_does_not_stall_other_clients(h: Harness) -> None:
    """During the grace period another client is served at once (busy on the fenced disk)."""
    h.processes.ignores_sigterm.add(VM1)
    vm = h.connect(VM1)
    vm.register(VM1, "vm1")
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    vm.close()
    other = h.connect(VM2)
    other.register(VM2)
    assert other.ok("acquire", leases=[lease("disk-b")], autocreate=True)
    assert "vm1" in other.error("acquire", leases=[lease("disk-a")], autocreate=True)["message"]
    h.advance(2.0)
    assert other.ok("acquire", leases=[lease("disk-a")], autocreate=True)


def test_no_fencing_without_leases(h: Harness) -> None:
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.close()
    h.advance(5.0)
    assert h.processes.signals == []


def test_managers_connection_closing_keeps_the_vms_leases(h: Harness) -> None:
    """libvirtd acquires for a VM then disconnects: the VM keeps the lease until it exits."""
    mgr = h.connect(LIBVIRTD)
    mgr.register(VM1)
    mgr.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    mgr.close()
    assert h.journal_writer.events(LeaseReleased) == []
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    h.processes.exit(VM1)
    h.run()
    (released,) = h.journal_writer.events(LeaseReleased)
    assert released.reason is ReleaseReason.OWNER_EXIT
    assert h.processes.signals == []


def managed_vms(h: Harness, *vms: tuple[int, str]) -> None:
    """libvirtd registers each VM and takes its disk, a connection per VM closed after."""
    h.processes.spawn(LIBVIRTD)
    for pid, disk in vms:
        h.processes.spawn(pid)
        mgr = h.connect(LIBVIRTD)
        mgr.register(pid)
        mgr.ok("acquire", leases=[lease(disk)], autocreate=True)
        mgr.close()


def test_owners_beyond_the_pidfd_budget_are_polled(tmp_path: Path) -> None:
    """At the fd limit leases come first: owners past the budget are still released on exit."""
    h = Harness(tmp_path / "locks", max_pidfds=1)
    try:
        managed_vms(h, (VM1, "disk-a"), (VM2, "disk-b"))
        assert h.owners_actor().watch_counts == (1, 1)
        h.processes.exit(VM2)  # polled: nothing wakes lockd at once
        h.run()
        assert h.journal_writer.events(LeaseReleased) == []
        assert kernel_locked(h.lock_dir / FILES / "disk-b")
        h.advance(POLL_SECONDS)
        (released,) = h.journal_writer.events(LeaseReleased)
        assert (released.resource, released.reason) == ("disk-b", ReleaseReason.OWNER_EXIT)
        assert not kernel_locked(h.lock_dir / FILES / "disk-b")
        assert h.owners_actor().watch_counts == (1, 0)
        h.processes.exit(VM1)  # the pidfd-watched owner is released without waiting
        h.run()
        assert [e.resource for e in h.journal_writer.events(LeaseReleased)] == ["disk-b", "disk-a"]
        assert h.owners_actor().watch_counts == (0, 0)
    finally:
        h.close()


def test_a_freed_pidfd_goes_to_a_polled_owner(tmp_path: Path) -> None:
    """Once an owner with a pidfd exits, the owner polled longest gets the pidfd, so its
    exit (even as a zombie, which polling sees only at a full check) is seen at once."""
    h = Harness(tmp_path / "locks", max_pidfds=1)
    try:
        managed_vms(h, (VM1, "disk-a"), (VM2, "disk-b"), (VM3, "disk-c"))
        assert h.owners_actor().watch_counts == (1, 2)
        h.processes.exit(VM1)
        h.run()
        assert h.owners_actor().watch_counts == (1, 1)  # VM2 took VM1's pidfd
        h.processes.exit(VM2)
        h.processes.zombies.add(VM2)
        h.run()  # no polling tick: the pidfd alone wakes lockd
        released = [(e.resource, e.reason) for e in h.journal_writer.events(LeaseReleased)]
        assert released == [
            ("disk-a", ReleaseReason.OWNER_EXIT),
            ("disk-b", ReleaseReason.OWNER_EXIT),
        ]
        assert h.owners_actor().watch_counts == (1, 0)  # and then VM3 took it
    finally:
        h.close()


def test_a_polled_owner_stays_polled_while_pidfds_cannot_be_opened(tmp_path: Path) -> None:
    """A freed budget slot is no use at EMFILE: the owner stays polled and is still
    released when it exits; one found gone while promoting is released at once."""
    h = Harness(tmp_path / "locks", max_pidfds=1)
    try:
        managed_vms(h, (VM1, "disk-a"), (VM2, "disk-b"), (VM3, "disk-c"))
        h.processes.no_pidfds = True
        h.processes.exit(VM1)
        h.run()
        assert h.owners_actor().watch_counts == (0, 2)
        h.processes.exit(VM2)
        h.advance(POLL_SECONDS)
        assert {e.resource for e in h.journal_writer.events(LeaseReleased)} == {"disk-a", "disk-b"}
        h.processes.no_pidfds = False
        vm4 = h.processes.spawn(VM3 + 1)
        h.connect(LIBVIRTD).register(vm4)
        assert h.owners_actor().watch_counts == (1, 1)  # a new owner takes the free slot
        h.processes.gone.add(VM3)  # exited and reaped; no poll has looked yet
        h.processes.exit(vm4)
        h.run()  # no polling tick: VM3 is found gone as it is given vm4's pidfd
        assert "disk-c" in {e.resource for e in h.journal_writer.events(LeaseReleased)}
        assert h.owners_actor().watch_counts == (0, 0)
    finally:
        h.close()


def test_polling_spreads_its_proc_reads_and_reaches_every_owner_within_a_second(
    tmp_path: Path,
) -> None:
    """200 polled owners: at most ceil(200/slices) /proc reads per tick, so no request
    waits behind a long scan; an owner that exits, also one registered in the middle of
    a round, is released within one polling period."""
    h = Harness(tmp_path / "locks", max_pidfds=0)
    tick = POLL_SECONDS / POLL_SLICES
    reads: list[int] = []
    is_gone, pid_gone = h.processes.is_gone, h.processes.pid_gone

    def counted(check: Callable[[Owner], bool]) -> Callable[[Owner], bool]:
        def wrapped(owner: Owner) -> bool:
            reads.append(owner.pid)
            return check(owner)

        return wrapped

    h.processes.is_gone = counted(is_gone)  # type: ignore[method-assign,assignment]
    h.processes.pid_gone = counted(pid_gone)  # type: ignore[method-assign,assignment]
    try:
        pids = list(range(5000, 5200))
        conns = []
        for pid in pids:
            h.processes.spawn(pid)
            conn = h.connect(pid)
            conn.register(pid)
            conns.append(conn)
        conns[7].ok("acquire", leases=[lease("disk-7")], autocreate=True)
        per_tick = -(-len(pids) // POLL_SLICES)
        for _ in range(POLL_SLICES // 2):  # half a round
            reads.clear()
            h.advance(tick)
            assert 0 < len(reads) <= per_tick
        late = 6000  # joins the round under way
        h.processes.spawn(late)
        conn = h.connect(late)
        conn.register(late)
        conn.ok("acquire", leases=[lease("disk-late")], autocreate=True)
        h.processes.exit(late)
        h.processes.exit(pids[7])
        for _ in range(POLL_SLICES + 1):
            h.advance(tick)
        released = {e.resource for e in h.journal_writer.events(LeaseReleased)}
        assert released == {"disk-7", "disk-late"}
        assert h.owners_actor().watch_counts == (0, len(pids) - 1)
    finally:
        h.close()


def test_a_few_polled_owners_are_checked_once_a_round_not_once_a_tick(tmp_path: Path) -> None:
    """Three polled owners: three checks a second, not three per 10 ms tick (which would
    be 300 /proc reads a second for nothing, a quarter of a CPU at 99 owners)."""
    h = Harness(tmp_path / "locks", max_pidfds=0)
    checks: list[int] = []
    pid_gone = h.processes.pid_gone

    def counted(owner: Owner) -> bool:
        checks.append(owner.pid)
        return pid_gone(owner)

    h.processes.pid_gone = counted  # type: ignore[method-assign]
    try:
        for pid in (VM1, VM2, LIBVIRTD):
            h.processes.spawn(pid)
            h.connect(pid).register(pid)
        for _ in range(POLL_SLICES * 3):  # three rounds
            h.advance(POLL_SECONDS / POLL_SLICES)
        assert sorted(checks) == sorted([VM1, VM2, LIBVIRTD] * 3)
    finally:
        h.close()


def test_a_polled_owner_left_a_zombie_is_released_at_the_next_full_check(
    tmp_path: Path,
) -> None:
    """Most polling rounds only ask whether the pid exists (cheap); a zombie still has
    its pid, so the full /proc check, every POLL_FULL_EVERY rounds, is what ends it."""
    h = Harness(tmp_path / "locks", max_pidfds=0)
    try:
        h.processes.spawn(LIBVIRTD)
        h.processes.spawn(VM1)
        mgr = h.connect(LIBVIRTD)
        mgr.register(VM1)
        mgr.ok("acquire", leases=[lease("disk-a")], autocreate=True)
        mgr.close()
        tick = POLL_SECONDS / POLL_SLICES
        for _ in range(POLL_SLICES + 1):  # round 1 (quick) done: the full check is round 5
            h.advance(tick)
        h.processes.exit(VM1)
        h.processes.zombies.add(VM1)
        for _ in range(POLL_SLICES):
            h.advance(tick)
        assert h.journal_writer.events(LeaseReleased) == []  # kill 0 still finds the pid
        for _ in range(POLL_FULL_EVERY * POLL_SLICES):
            h.advance(tick)
        (released,) = h.journal_writer.events(LeaseReleased)
        assert released.reason is ReleaseReason.OWNER_EXIT
    finally:
        h.close()


def test_owner_whose_pidfd_cannot_be_opened_is_polled(h: Harness) -> None:
    """EMFILE on pidfd_open used to leave the owner unwatched; its leases would never end."""
    h.processes.no_pidfds = True
    mgr = h.connect(LIBVIRTD)
    mgr.register(VM1)
    mgr.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    mgr.close()
    h.advance(POLL_SECONDS * 3)
    assert h.journal_writer.events(LeaseReleased) == []  # alive: polling releases nothing
    h.processes.exit(VM1)
    h.advance(POLL_SECONDS)
    (released,) = h.journal_writer.events(LeaseReleased)
    assert released.reason is ReleaseReason.OWNER_EXIT
    assert h.processes.signals == []


def test_owner_whose_pidfd_epoll_cannot_watch_is_polled(h: Harness) -> None:
    """epoll out of watches (ENOSPC): the pidfd is closed, not leaked, and the owner polled."""
    real_watch = h.dispatcher.watch

    def watch(fd: int, events: int, callback: Callable[[int], None]) -> None:
        if h.processes.is_watch(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_watch(fd, events, callback)

    h.dispatcher.watch = watch  # type: ignore[method-assign]
    mgr = h.connect(LIBVIRTD)
    mgr.register(VM1)
    mgr.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    mgr.close()
    assert h.owners_actor().watch_counts == (0, 1)
    assert h.processes.open_watches == 0
    h.processes.exit(VM1)
    h.advance(POLL_SECONDS)
    (released,) = h.journal_writer.events(LeaseReleased)
    assert released.reason is ReleaseReason.OWNER_EXIT


def test_exited_owner_is_released_not_fenced(h: Harness) -> None:
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    h.processes.gone.add(VM1)
    vm.close()
    (released,) = h.journal_writer.events(LeaseReleased)
    assert released.reason is ReleaseReason.OWNER_EXIT
    assert h.processes.signals == []


def test_wait_gets_the_lease_once_it_is_released(h: Harness) -> None:
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    rid = vm2.send("acquire", leases=[lease("disk-a")], autocreate=True, wait=5)
    h.advance(0.5)
    assert vm2.messages() == []
    vm1.ok("release", leases=[lease("disk-a")])
    h.advance(0.6)
    (reply,) = vm2.messages()
    assert reply["id"] == rid
    assert "result" in reply


def test_wait_times_out_busy(h: Harness) -> None:
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    vm2.send("acquire", leases=[lease("disk-a")], autocreate=True, wait=1)
    for _ in range(20):
        h.advance(0.2)
    (reply,) = vm2.messages()
    assert reply["error"]["code"] == "busy"


def test_wait_tries_again_at_its_deadline(h: Harness) -> None:
    """A lease freed after the last back-off step but before the deadline is granted:
    the wait does not give up early because a whole step would overshoot it."""
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    rid = vm2.send("acquire", leases=[lease("disk-a")], autocreate=True, wait=0.3)
    for _ in range(25):  # tries at 0, 0.02, 0.07, 0.17; the next step (0.2) overshoots
        h.advance(0.01)
    assert vm2.messages() == []
    vm1.ok("release", leases=[lease("disk-a")])
    for _ in range(10):
        h.advance(0.01)
    (reply,) = vm2.messages()
    assert reply["id"] == rid
    assert "result" in reply


@pytest.mark.parametrize(
    ("meanwhile", "ends"), [("exited", True), ("zombie", True), ("unreadable", False)]
)
def test_a_wait_ends_once_its_owner_is_known_to_have_exited(
    h: Harness, meanwhile: str, ends: bool
) -> None:
    """A waiting acquire whose owner process exits is answered not-found at its next
    try: it neither waits on for the dead VM nor takes the lease once it frees (it was
    granted to the dead owner, away from live waiters, and answered as a success). So
    is one whose owner is a zombie (exited, not reaped: its pid and start time still
    answer in /proc). One whose owner's /proc entry cannot be read (the daemon at its
    descriptor limit) waits on and takes the lease: "cannot tell" is no exit, and it
    was answered "owner process exited" for a VM that ran on."""
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    rid = vm2.send("acquire", leases=[lease("disk-a")], autocreate=True, wait=30)
    h.advance(0.1)
    if meanwhile == "unreadable":
        h.processes.unreadable.add(VM2)
    else:
        h.processes.exit(VM2)
    if meanwhile == "zombie":
        h.processes.zombies.add(VM2)
        assert h.processes.start_time(VM2) is not None  # /proc still answers for it
    vm1.ok("release", leases=[lease("disk-a")])
    h.advance(0.6)
    (reply,) = vm2.messages()
    assert reply["id"] == rid
    if not ends:
        assert "error" not in reply, reply
        assert [e.owner.pid for e in h.journal_writer.events(LeaseAcquired)] == [VM1, VM2]
        return
    assert reply["error"]["code"] == "not-found"
    assert f"owner process {VM2} exited" in reply["error"]["message"]
    assert len(h.journal_writer.events(LeaseAcquired)) == 1  # vm1's only
    vm3 = h.connect(h.processes.spawn(VM3))
    vm3.register(VM3)
    vm3.ok("acquire", leases=[lease("disk-a")], autocreate=True)  # free at once


def test_wait_takes_nothing_while_a_later_lockspace_stays_busy(h: Harness) -> None:
    """A waiting acquire whose busy lease is in its second lockspace does not take and
    roll back the first lockspace's free lease at every try: that filled the journal
    and made the free lease busy for others, on and off, for the whole wait."""
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("create-lockspace", lockspace="pool")
    vm1.ok("acquire", leases=[lease("p", "pool")], autocreate=True)
    rid = vm2.send("acquire", leases=[lease("free"), lease("p", "pool")], autocreate=True, wait=3)
    for _ in range(20):
        h.advance(0.1)
    assert vm2.messages() == []
    # One try took "free" and gave it back; the tries since began with "pool".
    assert len(h.journal_writer.events(LeaseReleased)) == 1
    vm1.ok("release", leases=[lease("p", "pool")])
    for _ in range(10):
        h.advance(0.1)
    (reply,) = vm2.messages()
    assert reply["id"] == rid
    assert [(le["lockspace"], le["resource"]) for le in reply["result"]["leases"]] == [
        (FILES, "free"),
        ("pool", "p"),
    ]


def test_client_leaving_mid_acquire_changes_nothing(h: Harness) -> None:
    """The manager's connection closes before the reply: the lease is rolled back."""
    mgr = h.connect(LIBVIRTD)
    mgr.register(VM1)
    mgr.send("acquire", leases=[lease("disk-a")], autocreate=True)
    mgr.send_raw(b"")  # EOF queued right behind the request
    h.run()
    acquired = h.journal_writer.events(LeaseAcquired)
    released = h.journal_writer.events(LeaseReleased)
    assert len(acquired) == len(released) == 1
    assert released[0].reason is ReleaseReason.ROLLBACK
    assert not kernel_locked(h.lock_dir / FILES / "disk-a")


@pytest.mark.parametrize("steps", range(1, 25))
def test_an_owner_whose_abandoned_acquire_was_rolled_back_is_not_fenced(
    tmp_path: Path, steps: int
) -> None:
    """A VM's own connection closes while its acquire is in flight (a plugin timing
    out, say); the VM runs on. The acquire is rolled back: the VM holds nothing, so
    its connection closing must not get it SIGTERM, then SIGKILL. Whenever the close
    comes (each step count puts it elsewhere, granted or not yet), the owners actor
    must not see the rolled-back leases as held. Once the reply went out, the VM
    holds them: then the close fences it."""
    h = Harness(tmp_path / "locks")
    try:
        h.processes.spawn(VM1)
        vm = h.connect(VM1)
        vm.register(VM1)
        rid = vm.send("acquire", leases=[lease("disk-a"), lease("disk-b")], autocreate=True)
        for _ in range(steps):
            h.dispatcher._run_ready(1)
        vm.close()
        h.advance(5.0)  # past the grace period
        if any(m.get("id") == rid for m in vm.messages()):  # answered before the close
            assert h.processes.signals[:1] == [(VM1, "SIGTERM")]
            return
        assert h.processes.signals == []
        assert h.journal_writer.events(OwnerFenced) == []
        released = h.journal_writer.events(LeaseReleased)
        assert len(h.journal_writer.events(LeaseAcquired)) == len(released)
        assert all(e.reason is ReleaseReason.ROLLBACK for e in released)
    finally:
        h.close()


def test_backlog_pauses_reading(h: Harness) -> None:
    """A client that floods requests while one is in flight is read no further."""
    vm = h.connect(VM1)
    vm.register(VM1)
    h.journal_writer.fail = False
    frame = encode_frame(encode_item({"op": "status", "id": 1}))
    vm.send_raw(encode_frame(encode_item({"op": "acquire", "id": 0, "leases": [lease("a")],
                                          "autocreate": True})) + frame * 20000)  # fmt: skip
    h.dispatcher.run_once(0)  # the acquire is now in flight; the rest waits in the decoder
    assert vm.transport.reading is False
    h.run()
    assert vm.transport.reading is True
    assert len(vm.messages()) == 20001


def test_the_journal_names_the_process_and_uid_behind_each_connection_that_changes_things(
    h: Harness,
) -> None:
    """An auditor ties the ``conn`` of each change to a process and uid: a connection's
    first change (a create before any register, or its register) journals its peer's
    credentials in ``connection-opened``, before the change and once; a connection
    that only reads journals nothing."""
    reader = h.connect(LIBVIRTD, uid=107)
    reader.ok("status")
    manager = h.connect(LIBVIRTD)
    manager.ok("create-lockspace", lockspace="pool")
    client = manager.register(VM1)["client"]
    manager.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    manager.ok("release", leases=[lease("disk-a")])
    vm = h.connect(VM2, uid=107)
    h.processes.spawn(VM3, uid=107)
    vm.register(VM3)
    kinds = [type(e) for e in h.journal_writer.events()]
    assert kinds == [ConnectionOpened, LockspaceCreated, LeaseAcquired, LeaseReleased,
                     ConnectionOpened]  # fmt: skip
    opened, *_, acquired, released, users = h.journal_writer.events()
    assert opened == ConnectionOpened(client, LIBVIRTD, 0, 0, False, opened.connected)
    assert acquired.conn == released.conn == client
    assert (users.pid, users.uid, users.gid) == (VM2, 107, 107)


def test_a_register_the_journal_cannot_record_fails_and_registers_nothing(h: Harness) -> None:
    """With the journal refusing writes, a register (whose connection-opened it cannot
    write) fails with io-error and the connection has no owner: no change can be
    journaled under a connection no record names. Once the journal heals, it works."""
    vm = h.connect(VM1)
    h.journal_writer.fail = True
    error = vm.error("register", owner={"uuid": b"\x01" * 16, "name": "vm", "id": 1, "pid": VM1})
    assert (error["code"], error["message"]) == (
        "io-error", "register: journal write failed: [Errno 28] No space left on device"
    )  # fmt: skip
    assert vm.error("acquire", leases=[lease("disk-a")])["code"] == "not-registered"
    assert vm.error("create-lockspace", lockspace="pool")["code"] == "io-error"
    h.journal_writer.fail = False
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    kinds = [type(e) for e in h.journal_writer.events()]
    assert kinds == [JournalResumed, ConnectionOpened, LeaseAcquired]


def test_subscriber_gets_events_and_a_stuck_one_is_dropped(h: Harness) -> None:
    auditor = h.connect(LIBVIRTD)
    auditor.ok("subscribe")
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    pushed = [m["event"] for m in auditor.messages() if "event" in m]
    assert [e["type"] for e in pushed] == ["connection-opened", "lease-acquired"]
    auditor.transport.stuck_bytes = 5 * 1024 * 1024
    vm.ok("release", leases=[lease("disk-a")])
    assert auditor.transport.closed


def test_a_crowded_daemon_lets_each_connection_fall_only_64_kib_behind(h: Harness) -> None:
    """While all connections together are 32 MiB behind, a subscriber 100 KiB behind is
    disconnected at its next event, and a client 100 KiB behind on replies gets no
    more requests served; uncrowded, both would have been let fall 4 MiB and 1 MiB."""
    auditor = h.connect(LIBVIRTD)
    auditor.ok("subscribe")
    reader = h.connect(LIBVIRTD)
    vm = h.connect(VM1)
    vm.register(VM1)
    for conn in (auditor, reader):
        conn.transport.stuck_bytes = 100 * 1024
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    reader.send_raw(encode_frame(encode_item({"op": "status", "id": 1})))
    h.run()
    assert not auditor.transport.closed
    assert len(reader.messages()) == 1
    for conn in (auditor, reader):
        conn.transport.crowded = True
    vm.ok("release", leases=[lease("disk-a")])
    reader.send_raw(encode_frame(encode_item({"op": "status", "id": 2})))
    h.run()
    assert auditor.transport.closed
    assert reader.messages() == []
    assert reader.transport.reading is False


def _events_and_end(conn: Conn) -> tuple[list[str], dict[str, Any] | None]:
    """The event types pushed to ``conn`` and the frame ending its subscription, if any
    (replies must be successes)."""
    types, ended = [], None
    for message in conn.messages():
        if "id" in message:
            assert "result" in message, message
        elif "event" in message:
            assert ended is None, "an event after the subscription ended"
            types.append(message["event"]["type"])
        elif "subscription-ended" in message:
            ended = message["subscription-ended"]
    return types, ended


@pytest.mark.parametrize("crowded", [False, True], ids=["4-mib-behind", "crowded"])
def test_an_owner_s_own_connection_too_far_behind_loses_only_its_subscription(
    h: Harness, crowded: bool
) -> None:
    """A VM's own connection that also follows events falls behind: 4 MiB, or 100 KiB
    while other clients crowd the daemon. Closing it, as a plain subscriber's is, would
    fence the VM over unread events. Its subscription ends instead, with a last frame
    saying where to subscribe again from; from there it misses nothing."""
    vm2 = h.connect(VM2)
    vm2.register(VM2)
    vm2.ok("acquire", leases=[lease("disk-b")], autocreate=True)
    vm2.ok("subscribe")
    if crowded:
        vm2.transport.stuck_bytes = 100 * 1024
        vm2.transport.crowded = True
    else:
        vm2.transport.stuck_bytes = 5 * 1024 * 1024
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    h.run()
    assert not vm2.transport.closed
    assert h.processes.signals == []
    types, ended = _events_and_end(vm2)
    assert types == ["connection-opened"]  # vm's; its lease-acquired put vm2 behind
    assert ended is not None
    assert "behind" in ended["reason"]
    vm.ok("release", leases=[lease("disk-a")])  # journaled after the end: not pushed
    h.run()
    assert _events_and_end(vm2) == ([], None)
    listed = vm.ok("list-clients")["clients"]
    assert [c["subscribed"] for c in listed if c.get("owner", {}).get("pid") == VM2] == [False]
    vm2.transport.stuck_bytes = 0
    vm2.transport.crowded = False
    vm2.send("subscribe", since=ended["next"])
    h.run()
    assert _events_and_end(vm2) == (["lease-acquired", "lease-released"], None)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    h.run()
    assert _events_and_end(vm2) == (["lease-acquired"], None)  # live again, once


def test_admin_disconnect(h: Harness) -> None:
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    plain = h.connect(LIBVIRTD)
    clients = plain.ok("list-clients")["clients"]
    vm_id = next(c["id"] for c in clients if c.get("owner", {}).get("pid") == VM1)
    assert plain.error("disconnect", client=vm_id)["code"] == "permission-denied"
    admin = h.connect(LIBVIRTD, admin=True)
    assert admin.ok("disconnect", client=vm_id) == {"client": vm_id}
    assert vm.transport.closed
    (released,) = h.journal_writer.events(LeaseReleased)
    assert released.reason is ReleaseReason.ADMIN
    assert h.processes.signals == [(VM1, "SIGTERM")]
    assert admin.error("disconnect", client=9999)["code"] == "not-found"


def test_a_users_lockd_signals_no_process_its_uid_may_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's lockd: the user's process registered itself, then became root's (sudo),
    and the user disconnected it (admin). Each SIGKILL was refused (EPERM) and sent again
    every 0.2 s, an error logged each time, for as long as the process ran. Now lockd
    sends nothing it may not send, says so once, and the leases end when it exits; a
    process still the user's is fenced as before."""
    user = 1000
    h = Harness(tmp_path / "locks", signals_as=user)
    try:
        for pid in (VM1, VM2):
            h.processes.spawn(pid, uid=user)
        sudo, vm = h.connect(VM1, uid=user), h.connect(VM2, uid=user)
        for conn, pid, disk in ((sudo, VM1, "disk-a"), (vm, VM2, "disk-b")):
            conn.register(pid, name=f"vm{pid}")
            conn.ok("acquire", leases=[lease(disk)], autocreate=True)
        h.processes.procs[VM1] = (100, 0)  # exec'd a set-user-ID root program
        admin = h.connect(LIBVIRTD, uid=user, admin=True)
        clients = admin.ok("list-clients")["clients"]
        for pid in (VM1, VM2):
            conn_id = next(c["id"] for c in clients if c.get("owner", {}).get("pid") == pid)
            admin.ok("disconnect", client=conn_id)
        h.advance(5.0)
        assert h.processes.refused == 0
        assert h.processes.signals == [(VM2, "SIGTERM")]
        warnings = [r.getMessage() for r in caplog.records if "not fencing" in r.getMessage()]
        assert len(warnings) == 1
        assert f"vm{VM1}" in warnings[0]
        assert f"lockd, uid {user}, could not signal it (it runs as uid 0 now" in warnings[0]
        assert kernel_locked(h.lock_dir / FILES / "disk-a")
        assert admin.ok("status")["fencing"] == []
        h.processes.exit(VM1)
        h.run()
        released = h.journal_writer.events(LeaseReleased)
        assert sorted(e.resource for e in released) == ["disk-a", "disk-b"]
        assert not kernel_locked(h.lock_dir / FILES / "disk-a")
    finally:
        h.close()


def test_create_lockspace_past_the_limit_says_so(tmp_path: Path) -> None:
    """At max_lockspaces a new lockspace is refused with io-error naming the limit (it
    said ``not-found``, "does not exist", to a request to create it); nothing is made;
    one served already is still found."""
    h = Harness(tmp_path / "locks", max_lockspaces=2)
    try:
        c = h.connect(VM1)
        assert c.ok("create-lockspace", lockspace="pool-a")["created"] is True
        assert c.ok("create-lockspace", lockspace="pool-b")["created"] is True
        error = c.error("create-lockspace", lockspace="pool-c")
        assert error["code"] == "io-error", error
        assert "at most 2 lockspaces" in error["message"]
        assert not (h.lock_dir / "pool-c").exists()
        assert c.ok("create-lockspace", lockspace="pool-a")["created"] is False
        assert [e.lockspace for e in h.journal_writer.events(LockspaceCreated)] == [
            "pool-a",
            "pool-b",
        ]
    finally:
        h.close()


def test_an_admin_connection_disconnecting_itself_gets_its_reply(h: Harness) -> None:
    """Disconnecting one's own admin connection is answered, then closed (it was closed
    first, the answer lost: the operator saw the connection drop, not why)."""
    admin = h.connect(LIBVIRTD, admin=True)
    (me,) = [c["id"] for c in admin.ok("list-clients")["clients"]]
    assert admin.ok("disconnect", client=me) == {"client": me}
    assert admin.transport.closed


def test_lockspaces_resources_and_queries(h: Harness) -> None:
    c = h.connect(VM1)
    assert c.ok("create-lockspace", lockspace="pool") == {"lockspace": "pool", "created": True}
    assert c.ok("create-lockspace", lockspace="pool")["created"] is False
    assert c.error("create-resource", lockspace="nope", resource="r")["code"] == "not-found"
    assert c.ok("create-resource", lockspace="pool", resource="r") == {"created": True}
    assert (h.lock_dir / "pool" / "r").exists()
    c.register(VM1)
    c.ok("acquire", leases=[lease("r", "pool")])
    assert c.error("delete-resource", lockspace="pool", resource="r")["code"] == "busy"
    c.ok("release", all=True)
    assert (h.lock_dir / "pool" / "r").exists()  # not autocreated: stays after release
    assert c.ok("delete-resource", lockspace="pool", resource="r") == {"deleted": True}
    assert not (h.lock_dir / "pool" / "r").exists()
    names = [row["name"] for row in c.ok("list-lockspaces")["lockspaces"]]
    assert "pool" in names
    assert FILES in names
    status = c.ok("status")
    assert status["leases"] == 0
    assert status["journal_seq"] == h.journal_writer.next_seq - 1


def test_creating_a_lease_file_that_is_there_journals_nothing(h: Harness) -> None:
    """create-resource of a file already there succeeds as before, but journals no
    resource-created: the history had the file created at every such call."""
    c = h.connect(VM1)
    c.ok("create-lockspace", lockspace="pool")
    assert c.ok("create-resource", lockspace="pool", resource="r") == {"created": True}
    assert c.ok("create-resource", lockspace="pool", resource="r") == {"created": True}
    assert [e.resource for e in h.journal_writer.events(ResourceCreated)] == ["r"]


def test_batch_sync_groups_appends(tmp_path: Path) -> None:
    """journal_sync=batch: appends queued together share one fdatasync."""
    h = Harness(tmp_path / "locks", sync=SyncPolicy.BATCH)
    try:
        conns = []
        for pid in range(6000, 6008):
            h.processes.spawn(pid)
            conn = h.connect(pid)
            conn.register(pid)
            conns.append(conn)
        syncs = h.journal_writer.syncs
        for i, conn in enumerate(conns):
            conn.send("acquire", leases=[lease(f"d{i}")], autocreate=True)
        h.run()
        assert all("result" in conn.messages()[0] for conn in conns)
        assert h.journal_writer.syncs - syncs < len(conns)
    finally:
        h.close()


def test_unlocked_file_check_helper(tmp_path: Path) -> None:
    """kernel_locked() itself tells locked from free (so the tests above can fail)."""
    path = tmp_path / "f"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    try:
        assert not kernel_locked(path)
        try_lock(fd, shared=False)
        assert kernel_locked(path)
        unlock(fd)
        assert not kernel_locked(path)
    finally:
        os.close(fd)


def test_acquire_landing_after_the_owner_exited_is_released(h: Harness) -> None:
    """The VM dies between registration and the grant: the lease does not outlive it."""
    mgr = h.connect(LIBVIRTD)
    mgr.register(VM1)
    mgr.send("acquire", leases=[lease("disk-a")], autocreate=True)
    h.processes.exit(VM1)  # its pidfd fires while the acquire is on its way
    h.run()
    assert "result" in mgr.messages()[0]
    assert mgr.ok("list-leases")["leases"] == []
    assert not kernel_locked(h.lock_dir / FILES / "disk-a")


def test_owner_exit_release_is_retried_until_journaled(h: Harness) -> None:
    mgr = h.connect(LIBVIRTD)
    mgr.register(VM1)
    mgr.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    h.journal_writer.fail = True
    h.processes.exit(VM1)
    h.run()
    assert kernel_locked(h.lock_dir / FILES / "disk-a")
    h.journal_writer.fail = False
    h.advance(1.0)
    (released,) = h.journal_writer.events(LeaseReleased)
    assert released.reason is ReleaseReason.OWNER_EXIT
    assert not kernel_locked(h.lock_dir / FILES / "disk-a")


def test_release_all_reports_a_journal_failure(h: Harness) -> None:
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
    h.journal_writer.fail = True
    error = vm.error("release", all=True)
    assert error["code"] == "io-error"
    assert kernel_locked(h.lock_dir / FILES / "disk-a")


def test_sync_failure_after_write_keeps_the_change(tmp_path: Path) -> None:
    """fdatasync fails after the records were written: the grant stands, it is not undone;
    the failure is counted for an alert (the grant may not survive a host crash)."""
    h = Harness(tmp_path / "locks", sync=SyncPolicy.ALWAYS)
    failed = REGISTRY.counters["lockd_journal_sync_errors_total"][()]
    try:
        h.processes.spawn(VM1)

        def broken_sync() -> None:
            raise OSError(5, "Input/output error")

        vm = h.connect(VM1)
        vm.register(VM1)
        h.journal_writer.sync = broken_sync  # type: ignore[method-assign]
        assert vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
        assert kernel_locked(h.lock_dir / FILES / "disk-a")
        assert len(h.journal_writer.events(LeaseAcquired)) == 1
        assert REGISTRY.counters["lockd_journal_sync_errors_total"][()] == failed + 1
    finally:
        h.close()


def test_unread_replies_stop_the_reading(h: Harness) -> None:
    """A client that pipelines requests and never reads gets no more requests served."""
    c = h.connect(VM1)
    c.transport.stuck_bytes = 2 * 1024 * 1024
    frame = encode_frame(encode_item({"op": "status", "id": 1}))
    c.send_raw(frame * 50)
    h.run()
    assert c.messages() == []
    assert c.transport.reading is False
    c.transport.stuck_bytes = 0
    from actors.connection import Drained

    c.ref.tell(Drained())
    h.run()
    assert len(c.messages()) == 50
    assert c.transport.reading is True


def test_big_listings_fit_in_a_reply(h: Harness) -> None:
    """600 leases list in one reply (more than the 64 KiB request cap)."""
    vm = h.connect(VM1)
    vm.register(VM1)
    for batch in range(6):
        names = [lease(f"disk-{batch}-{i}") for i in range(100)]
        vm.ok("acquire", leases=names, autocreate=True)
    listing = vm.ok("list-leases")["leases"]
    assert len(listing) == 600
    assert len(encode_item(listing)) > 65536


def test_a_bug_on_one_connection_closes_only_that_connection(h: Harness) -> None:
    vm = h.connect(VM1)
    vm.register(VM1)
    other = h.connect(VM2)

    def broken_write(_data: bytes) -> None:
        raise RuntimeError("injected bug")

    vm.transport.write = broken_write  # type: ignore[method-assign,assignment]
    vm.send("status")
    h.run()
    assert vm.transport.closed
    assert other.ok("status")
    assert h.dispatcher.crashes == []


def test_a_bug_answers_the_request_in_progress_internal(h: Harness) -> None:
    """A request that meets a bug in the daemon is answered ``internal`` before its
    connection closes: the client saw only the close, as if the daemon had died."""
    vm = h.connect(VM1)
    other = h.connect(VM2)
    other.register(VM2)

    def broken_start_time(_pid: int) -> int | None:
        raise RuntimeError("injected bug")

    h.processes.start_time = broken_start_time  # type: ignore[method-assign,assignment]
    rid = vm.send("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                     "pid": VM1})  # fmt: skip
    h.run()
    (reply,) = vm.messages()
    assert reply["id"] == rid
    assert reply["error"]["code"] == "internal"
    assert "register: internal error" in reply["error"]["message"]
    assert vm.transport.closed
    assert other.ok("inquire")["leases"] == []
    assert h.dispatcher.crashes == []


def test_a_bug_after_a_reply_went_out_sends_no_second_reply(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met after a request's reply was sent (``subscribe``'s events, sent after
    its reply) closes the connection without a second reply to that request: it was
    answered ``internal`` too, two replies with one id."""
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)

    def broken(_self: Any, _entries: Any) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(connection.ConnectionActor, "_send_events", broken)
    rid = vm.send("subscribe", since=1)
    h.run()
    replies = [m for m in vm.messages() if m.get("id") == rid]
    assert len(replies) == 1, replies
    assert "result" in replies[0]
    assert vm.transport.closed
    assert h.dispatcher.crashes == []


def test_idle_unregistered_connections_are_closed(h: Harness) -> None:
    """A connection that never registers (half-open, forgotten) gives back its slot."""
    idle = h.connect(VM1, idle_timeout=5.0)
    working = h.connect(VM2, idle_timeout=5.0)
    working.register(VM2)
    admin = h.connect(LIBVIRTD, admin=True, idle_timeout=5.0)
    h.advance(4.0)
    assert not idle.transport.closed
    h.advance(1.5)
    assert idle.transport.closed
    assert not working.transport.closed
    assert not admin.transport.closed


def test_a_request_in_flight_at_the_idle_check_only_postpones_it(h: Harness) -> None:
    """An unregistered connection answering a request when idle_timeout runs out is
    checked again later, and closed then if still idle: the check ran once, so being
    busy at that instant kept the slot for good."""
    conn = h.connect(VM1, idle_timeout=5.0)
    h.advance(4.9)
    conn.send("status")  # in flight (router, lockspaces) when the check runs
    h.advance(0.2)
    assert [r["id"] for r in conn.messages()] == [2]
    assert not conn.transport.closed
    h.advance(20.0)
    assert conn.transport.closed


def test_connections_that_come_and_go_leave_nothing_behind(h: Harness) -> None:
    """A monitor or a VM manager connects and disconnects all day: a closed connection
    leaves no object behind, its idle_timeout check included (each stayed queued, with
    the connection's ref and inbox, until its 60 s were up: 1.6 KiB per connection,
    a minute's worth of them at any time)."""

    def come_and_go() -> None:
        conn = h.connect(VM1, idle_timeout=60.0)
        conn.ok("status")
        conn.close()

    for _ in range(20):  # first uses (metrics labels, lockspace refs) before the baseline
        come_and_go()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(500):
        come_and_go()
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    h.advance(61.0)  # and the checks of the connections still open run as before
    assert h.connect(VM2).ok("status")


def test_inquire_and_the_disconnect_check_ask_only_for_the_owners_leases(h: Harness) -> None:
    """Snapshots filtered by owner: a VM's inquiry does not carry the whole host's leases."""
    from actors.lockspace import LockspaceActor

    other = h.connect(VM2)
    other.register(VM2)
    other.ok("acquire", leases=[lease(f"other-{i}") for i in range(50)], autocreate=True)
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("mine")], autocreate=True)
    (actor,) = [a for a in h.dispatcher.actors if isinstance(a, LockspaceActor)]
    key = next(iter(actor._state.held["mine"].owners))
    assert [v.resource for v in actor.snapshot(key).leases] == ["mine"]
    assert len(actor.snapshot().leases) == 51
    assert vm.ok("inquire")["leases"] == [
        {"lockspace": FILES, "resource": "mine", "mode": "exclusive"}
    ]


class ReplacedAndHeldElsewhere(LockspaceDir):
    """Another host replaces lease file "r" right after our first open and locks the new one."""

    thief: int | None = None

    def open_lease(self, name: str, *, create: bool) -> HeldFile:
        held = super().open_lease(name, create=create)
        if name == "r" and ReplacedAndHeldElsewhere.thief is None:
            path = os.path.join(self.path, name)
            os.unlink(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try_lock(fd, shared=False)
            ReplacedAndHeldElsewhere.thief = fd
        return held


def test_delete_resource_never_unlinks_a_file_replaced_and_held_by_another_host(
    tmp_path: Path,
) -> None:
    """The lock taken on the inode opened first protects nothing once the name names
    another file: deleting by name then would delete the other host's held lease."""
    h = Harness(tmp_path / "locks", open_lockspace=ReplacedAndHeldElsewhere)
    try:
        c = h.connect(VM1)
        c.ok("create-lockspace", lockspace="pool")
        (h.lock_dir / "pool" / "r").touch()
        assert c.error("delete-resource", lockspace="pool", resource="r")["code"] == "busy"
        assert (h.lock_dir / "pool" / "r").exists()
        assert kernel_locked(h.lock_dir / "pool" / "r")
    finally:
        if ReplacedAndHeldElsewhere.thief is not None:
            os.close(ReplacedAndHeldElsewhere.thief)
        h.close()


def test_status_metrics_and_lockspace_list_count_without_lease_views(h: Harness) -> None:
    """These ask lockspaces for counts only (a dense host has 16,384 leases): the counts
    must be what the full listing says, by mode and with each owner once."""
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("create-lockspace", lockspace="pool")
    vm1.ok("acquire", leases=[lease("a"), {**lease("s"), "shared": True}], autocreate=True)
    vm2.ok("acquire", leases=[{**lease("s"), "shared": True}, lease("p", "pool")], autocreate=True)
    listed = vm1.ok("list-leases")["leases"]
    assert len(listed) == 3
    status = vm1.ok("status")
    assert (status["leases"], status["owners"], status["lockspaces"]) == (3, 2, 2)
    text = vm1.ok("metrics")["text"]
    assert f'lockd_leases_held{{lockspace="{FILES}",mode="exclusive"}} 1' in text
    assert f'lockd_leases_held{{lockspace="{FILES}",mode="shared"}} 1' in text
    assert 'lockd_leases_held{lockspace="pool",mode="exclusive"} 1' in text
    assert "lockd_owners 2" in text
    rows = {r["name"]: r["leases"] for r in vm1.ok("list-lockspaces")["lockspaces"]}
    assert (rows[FILES], rows["pool"]) == (2, 1)


def test_a_pair_leaves_nothing_for_the_cyclic_collector(h: Harness) -> None:
    """Acquire and release free everything they make by reference counting, the stopped
    lease actor included: what only the cyclic collector frees piles up until a full
    collection, which stalls every request (about 0.1 s with 16,384 leases held)."""
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[lease("warm-up")], autocreate=True)  # the lockspace actor starts
    vm.ok("release", leases=[lease("warm-up")])
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            vm.ok("acquire", leases=[lease("disk-a")], autocreate=True)
            vm.ok("release", leases=[lease("disk-a")])
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_bug_in_a_handed_over_request_ends_that_connection_not_the_daemon(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a re-exec a connection replays the request bytes it carried over as it starts:
    a bug met there answers that request ``internal`` and closes that connection, as it
    would in any later message, and the daemon serves on (an on_start failure is
    otherwise a crash of the whole loop)."""
    from actors.connection import ConnectionActor, HandedOver
    from actors.connection import ServerInfo as Info
    from tests.actors.harness import FakeTransport

    def broken(self: ConnectionActor, request: object) -> None:
        raise RuntimeError("bug")

    transport = FakeTransport(VM1, 0)
    carried = HandedOver(
        conn_id=99, fd=-1, peer_pid=VM1, peer_uid=0, admin=False, connected_since=0.0,
        owner=None, restricted=False, subscribed=False, version=1,
        pending=encode_frame(encode_item({"op": "status", "id": 5})), unsent=b"",
    )  # fmt: skip
    monkeypatch.setattr(ConnectionActor, "_handle", broken)
    ConnectionActor.start(
        h.dispatcher, conn_id=99, transport=transport, router=h.router, owners=h.owners,
        journal=h.journal, processes=h.processes, info=Info("test", 1, 0.0, "test"),
        clock=h.clock, restored=carried,
    )  # fmt: skip
    h.run()  # raises ActorCrashedError if the bug crashed the loop
    assert transport.closed
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(transport.written))
    frame = decoder.next_frame()
    assert frame is not None
    assert decoder.next_frame() is None  # that answer only
    reply = decode_item(frame)
    assert reply["id"] == 5
    assert reply["error"]["code"] == "internal"
    assert reply["error"]["message"].startswith("status: internal error in lockd")
    monkeypatch.undo()
    assert h.connect(VM2).ok("status")["clients"] >= 1


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Count the calls of ``owner.name`` (still calling it)."""
    calls = [0]
    real = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _registered_vms(h: Harness, count: int) -> list[Conn]:
    """``count`` VM processes (pids from 5000), each registered on a connection of its own."""
    vms = []
    for i in range(count):
        h.processes.spawn(5000 + i)
        vm = h.connect(5000 + i)
        vm.register(5000 + i)
        vms.append(vm)
    return vms


def test_vms_sharing_a_base_image_exiting_at_once_are_released_in_linear_work(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host shutting down: 200 VMs, each with its own disks and the shared base image,
    exit together. Every lease ends and the base image's lock is dropped once the last
    holder is gone; releases of different owners do not queue behind each other, so the
    scheduling work grows with the VMs, not with their square (1,024 such VMs took
    685 s to release when each release waited for the one before)."""
    from actors.lockspace import LockspaceActor

    vms = _registered_vms(h, 200)
    for i, vm in enumerate(vms):
        disks = [lease(f"vm{i}-{d}") for d in range(2)]
        vm.ok("acquire", leases=[*disks, lease("base", shared=True)], autocreate=True)
    assert kernel_locked(h.lock_dir / FILES / "base")
    looked_up = _count_calls(monkeypatch, LockspaceActor, "_resources_of")
    for i, vm in enumerate(vms):
        h.processes.gone.add(5000 + i)
        vm.send_raw(b"")  # every connection closes before the daemon runs again
    h.run()
    assert len(h.journal_writer.events(LeaseReleased)) == 600
    assert h.connect(VM1).ok("list-leases")["leases"] == []
    assert not kernel_locked(h.lock_dir / FILES / "base")
    assert looked_up[0] <= 2 * 200, looked_up[0]


def test_vms_sharing_a_base_image_starting_at_once_are_scheduled_in_linear_work(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host booting its VMs: 200 VMs ask at once for their own disk and the shared base
    image. Every one gets both; shared acquires joining a lease held shared do not queue
    behind each other, and a command arriving behind a queue is not a pass over it, so the
    scheduling work grows with the VMs, not with their square (1,024 such VMs took 4 s to
    start when each join waited for the one before)."""
    from actors.lockspace import LockspaceActor

    vms = _registered_vms(h, 200)
    looked_up = _count_calls(monkeypatch, LockspaceActor, "_resources_of")
    for i, vm in enumerate(vms):
        vm.send("acquire", leases=[lease(f"vm{i}"), lease("base", shared=True)], autocreate=True)
    h.run()
    for vm in vms:
        (reply,) = vm.messages()
        assert reply.get("error") is None, reply
    (base,) = [x for x in h.connect(VM1).ok("list-leases")["leases"] if x["resource"] == "base"]
    assert len(base["owners"]) == 200
    assert kernel_locked(h.lock_dir / FILES / "base")
    assert looked_up[0] <= 2 * 200, looked_up[0]


def test_vms_stopping_while_others_start_are_scheduled_in_linear_work(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling restart: 150 VMs sharing a base image stop while 150 others start, their
    requests interleaved. Every stop and start goes through, and a finish that frees
    nothing a waiting command needs runs no pass over the waiting ones (1,000 of each
    took 3.4 s when every finish and every arrival walked the queue)."""
    from actors.lockspace import LockspaceActor

    vms = _registered_vms(h, 300)
    stopping, starting = vms[:150], vms[150:]
    for i, vm in enumerate(stopping):
        vm.ok("acquire", leases=[lease("base", shared=True), lease(f"vm{i}")], autocreate=True)
    looked_up = _count_calls(monkeypatch, LockspaceActor, "_resources_of")
    for i in range(150):
        stopping[i].send("release", leases=[lease("base"), lease(f"vm{i}")])
        starting[i].send(
            "acquire", leases=[lease("base", shared=True), lease(f"vm{150 + i}")], autocreate=True
        )
    h.run()
    for vm in stopping + starting:
        (reply,) = vm.messages()
        assert reply.get("error") is None, reply
    (base,) = [x for x in h.connect(VM1).ok("list-leases")["leases"] if x["resource"] == "base"]
    assert {o["pid"] for o in base["owners"]} == {5150 + i for i in range(150)}
    assert kernel_locked(h.lock_dir / FILES / "base")
    assert looked_up[0] <= 4 * 300, looked_up[0]


def test_one_process_with_many_connections_ending_is_released_once(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases belong to a process: 100 connections of one process (one owner) close
    together and queue 100 releases of that owner. The first ends every lease; the
    rest are passed over without listing its leases again and again."""
    from actors.lockspace_core import LockspaceState

    conns = []
    for i in range(100):
        vm = h.connect(VM1)
        vm.register(VM1, name=f"vm-{i}")
        vm.ok("acquire", leases=[lease(f"disk-{i}-{d}") for d in range(5)], autocreate=True)
        conns.append(vm)
    listed = _count_calls(monkeypatch, LockspaceState, "leases_of")
    h.processes.gone.add(VM1)
    for vm in conns:
        vm.send_raw(b"")
    h.run()
    assert len(h.journal_writer.events(LeaseReleased)) == 500
    assert not any(kernel_locked(h.lock_dir / FILES / f"disk-{i}-0") for i in range(100))
    assert listed[0] <= 3 * 100, listed[0]


def test_a_connection_opened_as_the_router_stops_is_no_crash(h: Harness) -> None:
    """An embedding program's thread opening a connection as the lock system stops (its
    router stopped already) starts it quietly: it told the dead router and crashed,
    logged as "an actor failed" at each such stop."""
    h.router.stop(block=False)
    h.run()
    ref = connection.ConnectionActor.start(
        h.dispatcher, conn_id=99, transport=FakeTransport(1, 0), router=h.router,
        owners=h.owners, journal=h.journal, processes=h.processes,
        info=connection.ServerInfo("test", 1, 0.0, "test"), clock=h.clock,
    )  # fmt: skip
    h.run()  # raises ActorCrashedError if the start crashed the loop
    assert h.dispatcher.crashes == []
    ref.stop(block=False)
    h.run()


@pytest.mark.parametrize("identified", [True, False], ids=["this-build", "earlier-build"])
def test_a_handed_over_connection_is_journaled_once(h: Harness, identified: bool) -> None:
    """A re-exec hands a registered connection on: the next program writes no second
    ``connection-opened`` for it; one handed on by a build that wrote none gets its
    record as it is taken over, before any change it makes there."""
    from actors.connection import ConnectionActor, HandedOver
    from actors.connection import ServerInfo as Info

    owner = Owner(b"\x07" * 16, "vm", 1, VM1, h.processes.start_time(VM1) or 0)
    carried = HandedOver(
        conn_id=99, fd=-1, peer_pid=VM1, peer_uid=0, admin=False, connected_since=5.0,
        owner=owner, restricted=False, subscribed=False, version=1, pending=b"", unsent=b"",
        identified=identified,
    )  # fmt: skip
    ConnectionActor.start(
        h.dispatcher, conn_id=99, transport=FakeTransport(VM1, 0), router=h.router,
        owners=h.owners, journal=h.journal, processes=h.processes,
        info=Info("test", 1, 0.0, "test"), clock=h.clock, restored=carried,
    )  # fmt: skip
    h.run()
    expected = [] if identified else [ConnectionOpened(99, VM1, 0, 0, False, 5.0)]
    assert h.journal_writer.events(ConnectionOpened) == expected
