"""Many clients racing for a few disks on one real daemon, checked against a model and the kernel.

A seeded random driver: each step, several client threads (each its own
connection; some owners have two) send one request each at the same instant:
acquires of 1-3 leases (exclusive or shared, some waiting, some autocreating),
releases, release of everything, inquire; some on a restricted connection,
some abandoned by a close right after sending, some with their owner killed;
and a client that owns nothing creates or deletes a lease file meanwhile.
After the step the daemon's ``list-leases`` must be exactly what the model
derives from the replies, every listed lease must be locked in the kernel in
its mode on the file at its name (``F_OFD_GETLK`` from this process, which
takes nothing), and every refusal must be one the request could meet, a
``busy`` naming owners that could hold the disk. ``LOCKD_CONTENTION_SEED``
replays a run (the plan; the interleaving is the machine's),
``LOCKD_CONTENTION_STEPS`` and ``LOCKD_CONTENTION_OWNERS`` scale it for a soak.
"""

from __future__ import annotations

import fcntl
import functools
import os
import random
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client, RemoteError
from protocol.names import FILES_LOCKSPACE
from tests.e2e.conftest import DaemonProcess, MakeDaemon, wait_for

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("LOCKD_CONTENTION_SEED", "0")) or random.randrange(1, 2**32)
STEPS = int(os.environ.get("LOCKD_CONTENTION_STEPS", "40"))
DISKS = ["d0", "d1", "d2", "d3"]
OWNERS = int(os.environ.get("LOCKD_CONTENTION_OWNERS", "5"))
REPLY_TIMEOUT = 15.0


def kernel_mode(path: Path) -> str | None:
    """The lock another process holds on byte 0 of ``path`` ("exclusive", "shared", None,
    or "no file"), asked with F_OFD_GETLK, which takes nothing."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return "no file"
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
    finally:
        os.close(fd)
    ltype = struct.unpack("hhqqi4x", got)[0]
    return {fcntl.F_UNLCK: None, fcntl.F_RDLCK: "shared", fcntl.F_WRLCK: "exclusive"}[ltype]


class Owner:
    """A live process (``sleep``) registered as owner over one or two connections, plus
    a restricted one (as a VM holds it)."""

    def __init__(self, daemon: DaemonProcess, proc: subprocess.Popen[bytes], n: int, conns: int):
        self.daemon = daemon
        self.proc = proc
        self.name = f"vm{n}"
        self.n = n
        self.clients = [self.connect() for _ in range(conns)]
        self.restricted = self.connect()
        self.restricted.call("restrict")

    def connect(self) -> Client:
        client = self.daemon.client(self.name)
        client.settimeout(REPLY_TIMEOUT)
        owner = {
            "uuid": uuid.uuid4().bytes,
            "name": self.name,
            "id": self.n + 1,
            "pid": self.proc.pid,
        }
        client.call("register", owner=owner)
        return client

    def close(self) -> None:
        for client in [*self.clients, self.restricted]:
            client.close()


Held = dict[str, dict[int, str]]
"""disk -> {owner pid: mode}"""


def listed(client: Client) -> Held:
    held: Held = {}
    for lease in client.call("list-leases", lockspace=FILES_LOCKSPACE)["leases"]:
        owners = held.setdefault(lease["resource"], {})
        for owner in lease["owners"]:
            assert owner["pid"] not in owners, lease
            owners[owner["pid"]] = lease["mode"]
    return held


def hold_nothing(client: Client, pids: set[int]) -> bool:
    """True once none of ``pids`` holds a disk."""
    return not pids & {pid for owners in listed(client).values() for pid in owners}


def check_exclusion(held: Held, context: str) -> None:
    for disk, owners in held.items():
        modes = set(owners.values())
        assert len(modes) == 1, f"{context}: {disk} held in two modes {owners}"
        if modes == {"exclusive"}:
            assert len(owners) == 1, f"{context}: {disk} has two exclusive holders {owners}"


def check_kernel(lock_dir: Path, held: Held, context: str) -> None:
    for disk in DISKS:
        path = lock_dir / FILES_LOCKSPACE / disk
        want = next(iter(held[disk].values())) if held.get(disk) else None
        assert kernel_mode(path) in ({want, "no file"} if want is None else {want}), (
            f"{context}: {disk} kernel {kernel_mode(path)}, listed {want}"
        )


def expected_after(
    before: dict[int, dict[str, str]],
    pid: int,
    op: str,
    args: dict[str, Any],
    reply: dict[str, Any] | RemoteError,
) -> dict[str, str]:
    """What owner ``pid`` holds after its one request of the step."""
    mine = dict(before.get(pid, {}))
    if isinstance(reply, RemoteError):
        return mine
    if op == "acquire":
        for lease in args["leases"]:
            mine[lease["resource"]] = "shared" if lease.get("shared") else "exclusive"
    elif op == "release" and args.get("all"):
        mine = {}
    elif op == "release":
        for lease in args["leases"]:
            mine.pop(lease["resource"], None)
    return mine


def random_request(rng: random.Random, mine: dict[str, str]) -> tuple[str, dict[str, Any]]:
    roll = rng.random()
    if roll < 0.55 or not mine:
        disks = rng.sample(DISKS, rng.randint(1, 3))
        leases = [
            {"lockspace": FILES_LOCKSPACE, "resource": d, "shared": rng.random() < 0.5}
            for d in disks
        ]
        args: dict[str, Any] = {"leases": leases, "autocreate": rng.random() < 0.5}
        if rng.random() < 0.25:
            args["wait"] = rng.choice([0.05, 0.3])
        return "acquire", args
    if roll < 0.65:
        return "release", {"all": True}
    if roll < 0.9:
        disks = rng.sample(sorted(mine), rng.randint(1, len(mine)))
        if rng.random() < 0.15:
            disks.append(rng.choice([d for d in DISKS if d not in disks] or disks[:1]))
            disks = sorted(set(disks))
        return "release", {"leases": [{"lockspace": FILES_LOCKSPACE, "resource": d} for d in disks]}
    return "inquire", {}


@pytest.fixture
def owners(make_daemon: MakeDaemon) -> Iterator[tuple[DaemonProcess, list[Owner]]]:
    """The daemon, its four disks and the owners; every owner process killed at the end."""
    daemon = make_daemon()
    made: list[Owner] = []
    try:
        with daemon.client() as setup:
            for disk in DISKS:
                setup.call("create-resource", lockspace=FILES_LOCKSPACE, resource=disk)
        for n in range(OWNERS):
            made.append(Owner(daemon, subprocess.Popen(["sleep", "600"]), n, 2 if n < 2 else 1))
        yield daemon, made
    finally:
        for owner in made:
            owner.close()
            owner.proc.kill()
            owner.proc.wait()


Reply = dict[str, Any] | RemoteError | BaseException | None


class Step:
    """One request per chosen owner, sent at once from threads; some connections close
    right after sending (the reply abandoned), and some owners are killed meanwhile."""

    def __init__(
        self, rng: random.Random, everyone: list[Owner], state: dict[int, dict[str, str]]
    ) -> None:
        self.plan: list[tuple[Owner, Client, str, dict[str, Any], str]] = []
        for owner in rng.sample(everyone, rng.randint(2, len(everyone))):
            op, args = random_request(rng, state.get(owner.proc.pid, {}))
            roll = rng.random()
            how = (
                "abandon"
                if roll < 0.1
                else "kill"
                if roll < 0.15
                else "restricted"
                if roll < 0.2
                else "call"
            )
            client = owner.restricted if how == "restricted" else rng.choice(owner.clients)
            self.plan.append((owner, client, op, args, how))
        self.replies: list[Reply] = [None] * len(self.plan)
        self.files_op: tuple[str, dict[str, Any]] | None = None
        """A lease file created or deleted by a client that owns nothing, at the same time."""
        if rng.random() < 0.3:
            op = rng.choice(["create-resource", "delete-resource"])
            self.files_op = (op, {"lockspace": FILES_LOCKSPACE, "resource": rng.choice(DISKS)})
        self.files_reply: Reply = None

    def run(self, context: str, files: Client) -> None:
        barrier = threading.Barrier(len(self.plan) + (self.files_op is not None))

        def on_files(op: str, args: dict[str, Any]) -> None:
            barrier.wait()
            try:
                self.files_reply = files.call(op, **args)
            except BaseException as exc:  # noqa: BLE001 (checked by the main thread)
                self.files_reply = exc

        def one(i: int) -> None:
            owner, client, op, args, how = self.plan[i]
            barrier.wait()
            try:
                if how == "abandon":
                    client.request(op, **args)
                    client.close()
                    return
                if how == "kill":
                    rid = client.request(op, **args)
                    owner.proc.kill()
                    self.replies[i] = client.result(rid)
                else:
                    self.replies[i] = client.call(op, **args)
            except BaseException as exc:  # noqa: BLE001 (checked by the main thread)
                self.replies[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(self.plan))]
        if self.files_op is not None:
            threads.append(threading.Thread(target=on_files, args=self.files_op))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REPLY_TIMEOUT + 5)
            assert not thread.is_alive(), f"{context}: a client hung"
        if self.files_op is not None:
            reply = self.files_reply
            desc = f"{context}: {self.files_op} -> {reply!r}"
            assert isinstance(reply, dict | RemoteError), desc
            assert not isinstance(reply, RemoteError) or reply.code in ("busy", "not-found"), desc


def test_racing_clients_agree_with_the_model_and_the_kernel(
    owners: tuple[DaemonProcess, list[Owner]],
) -> None:
    """Concurrent acquires, waits, releases and inquiries of five owners (some over two
    connections, some abandoned mid-request, some owners killed mid-request) never give
    two exclusive holders; the daemon's listing, the kernel and the replies agree."""
    daemon, everyone = owners
    rng = random.Random(SEED)
    print(f"LOCKD_CONTENTION_SEED={SEED}")
    with daemon.client("observer") as observer, daemon.client("files") as files:
        state: dict[int, dict[str, str]] = {}
        for step_no in range(STEPS):
            context = f"LOCKD_CONTENTION_SEED={SEED} step {step_no}"
            step = Step(rng, everyone, state)
            step.run(context, files)
            killed = {owner.proc.pid for owner, *_, how in step.plan if how == "kill"}
            for owner, *_, how in step.plan:
                if how == "kill":
                    owner.proc.wait()
            # A killed owner's leases end with it (its pidfd), whatever its request did.
            wait_for(functools.partial(hold_nothing, observer, killed))
            held = listed(observer)
            check_exclusion(held, context)
            before = state
            state = {pid: dict(v) for pid, v in before.items() if pid not in killed}
            could = could_hold(before, held, step)
            actual: dict[int, dict[str, str]] = {}
            for disk, holders in held.items():
                for pid, mode in holders.items():
                    actual.setdefault(pid, {})[disk] = mode
            for (owner, _, op, args, how), reply in zip(step.plan, step.replies, strict=True):
                pid = owner.proc.pid
                desc = f"{context}: {owner.name} {how} {op} {args} -> {reply!r}"
                if how == "kill":
                    assert pid not in actual, desc
                    continue
                if how == "abandon":
                    # The reply may have been sent before the close was seen: either
                    # the whole request took effect or none of it.
                    done = expected_after(before, pid, op, args, {})
                    assert actual.get(pid, {}) in (before.get(pid, {}), done), desc
                    state[pid] = actual.get(pid, {})
                    owner.clients[owner.clients.index(step_client(step, owner))] = owner.connect()
                    continue
                if how == "restricted":
                    assert isinstance(reply, RemoteError), desc
                    assert reply.code == "restricted", desc
                check_reply(desc, pid, op=op, args=args, reply=reply, could_hold=could)
                state[pid] = expected_after(before, pid, op, args, reply)  # type: ignore[arg-type]
                if op == "inquire" and isinstance(reply, dict):
                    got = {lease["resource"]: lease["mode"] for lease in reply["leases"]}
                    assert got in (before.get(pid, {}), state[pid]), desc
            state = {pid: mine for pid, mine in state.items() if mine}
            assert actual == state, f"{context}: listed {actual}, replies say {state}"
            check_kernel(daemon.lock_dir, held, context)
            for owner, *_, how in step.plan:
                if how == "kill":
                    owner.close()
                    owner.proc = subprocess.Popen(["sleep", "600"])
                    owner.clients = [owner.connect() for _ in owner.clients]
                    owner.restricted = owner.connect()
                    owner.restricted.call("restrict")


def step_client(step: Step, owner: Owner) -> Client:
    return next(client for o, client, *_ in step.plan if o is owner)


def check_reply(
    desc: str,
    pid: int,
    *,
    op: str,
    args: dict[str, Any],
    reply: Reply,
    could_hold: dict[str, set[int]],
) -> None:
    """A reply is a result, or a refusal the request could meet: busy naming owners that
    could hold a wanted disk during the step, not-held, restricted."""
    assert reply is not None, desc
    if not isinstance(reply, RemoteError):
        assert isinstance(reply, dict), desc
        return
    allowed = {"acquire": {"busy"}, "release": {"not-held"}}.get(op, set()) | {"restricted"}
    if op == "acquire" and not args["autocreate"]:
        allowed.add("not-found")  # a lease file deleted (and not made again) meanwhile
    assert reply.code in allowed, desc
    if reply.code == "busy":
        holders = {h["pid"] for h in reply.details["holders"]}
        could = {p for lease in args["leases"] for p in could_hold[lease["resource"]]}
        assert holders, desc
        assert holders <= could | {pid}, desc


def could_hold(before: dict[int, dict[str, str]], held: Held, step: Step) -> dict[str, set[int]]:
    """Owners that held each disk at some moment of the step: at its start, at its end,
    or for a moment, granted to a request abandoned or killed (then rolled back or
    released as owner-exit)."""
    could = {
        d: {p for p, mine in before.items() if d in mine} | set(held.get(d, {})) for d in DISKS
    }
    for owner, _, op, args, how in step.plan:
        if op == "acquire" and how in ("abandon", "kill"):
            for lease in args["leases"]:
                could[lease["resource"]].add(owner.proc.pid)
    return could


def at_once(plan: list[tuple[Client, str, dict[str, Any]]], context: str) -> list[Reply]:
    """Send each request on its connection from its own thread, all at one instant."""
    replies: list[Reply] = [None] * len(plan)
    barrier = threading.Barrier(len(plan))

    def one(i: int, client: Client, op: str, args: dict[str, Any]) -> None:
        barrier.wait()
        try:
            replies[i] = client.call(op, **args)
        except BaseException as exc:  # noqa: BLE001 (checked by the caller)
            replies[i] = exc

    threads = [threading.Thread(target=one, args=(i, *p)) for i, p in enumerate(plan)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REPLY_TIMEOUT + 5)
        assert not thread.is_alive(), f"{context}: a client hung"
    return replies


def applied(mine: dict[str, str], op: str, args: dict[str, Any], reply: Reply) -> dict[str, str]:
    """What an owner holds after one of its requests, given its reply."""
    if isinstance(reply, BaseException) or reply is None:
        return dict(mine)
    return expected_after({0: mine}, 0, op, args, reply)


def test_one_owner_racing_itself_over_two_connections(
    owners: tuple[DaemonProcess, list[Owner]],
) -> None:
    """Two connections of one owner sending at once (acquire against release, release
    against release-all, shared against exclusive) end as one of the two orders of
    their requests would, replies included, while a second owner contends."""
    daemon, everyone = owners
    rng = random.Random(SEED + 1)
    me, other = everyone[0], everyone[2]
    with daemon.client("observer") as observer:
        for step_no in range(STEPS):
            context = f"LOCKD_CONTENTION_SEED={SEED} step {step_no}"
            held = listed(observer)
            mine = {d: m[me.proc.pid] for d, m in held.items() if me.proc.pid in m}
            theirs = {d: m[other.proc.pid] for d, m in held.items() if other.proc.pid in m}
            plan = [
                (me.clients[0], *random_request(rng, mine)),
                (me.clients[1], *random_request(rng, mine)),
                (other.clients[0], *random_request(rng, theirs)),
            ]
            replies = at_once(plan, context)
            for reply in replies:
                assert not isinstance(reply, RemoteError) or reply.code in (
                    "busy", "not-held", "not-found"), f"{context}: {plan} {replies}"  # fmt: skip
                assert isinstance(reply, dict | RemoteError), f"{context}: {plan} {replies}"
            after = listed(observer)
            check_exclusion(after, context)
            check_kernel(daemon.lock_dir, after, context)
            (_, op1, a1), (_, op2, a2) = plan[0], plan[1]
            orders = [
                applied(applied(mine, op1, a1, replies[0]), op2, a2, replies[1]),
                applied(applied(mine, op2, a2, replies[1]), op1, a1, replies[0]),
            ]
            got = {d: m[me.proc.pid] for d, m in after.items() if me.proc.pid in m}
            assert got in orders, f"{context}: {plan} -> {replies}: holds {got}, not {orders}"


def test_a_wait_longer_than_the_client_timeout_gets_its_reply(
    owners: tuple[DaemonProcess, list[Owner]],
) -> None:
    """An acquire asked to wait longer than the client's timeout is answered once the
    lease frees: the client gave up at its timeout while the daemon waited on, and the
    lease granted then was held by an owner whose caller took the acquire as failed."""
    daemon, (holder, waiter, *_) = owners
    disk = {"lockspace": FILES_LOCKSPACE, "resource": "d0"}
    holder.clients[0].call("acquire", leases=[disk])
    client = waiter.clients[0]
    client.settimeout(0.5)
    release = threading.Timer(1.5, holder.clients[0].call, ("release",), {"all": True})
    release.start()
    try:
        reply = client.call("acquire", leases=[disk], wait=60)
    finally:
        release.join()
    assert reply["leases"] == [{**disk, "mode": "exclusive"}]
    with daemon.client() as observer:
        assert listed(observer) == {"d0": {waiter.proc.pid: "exclusive"}}
