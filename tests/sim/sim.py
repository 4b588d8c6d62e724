"""Seeded schedules of VMs, daemons, crashes and thieves on two hosts sharing a lock directory.

``Sim`` drives the real actors (connection, router, lockspace, lease,
journal, owners, recovery) on per-host dispatchers with the fakes of
``world.py``, one step at a time, and checks the invariants after every
step:

1. fcntl's rule holds on every lease file (at most one writer, never a
   writer beside readers), whoever the holders are: daemons or a thief.
2. every lease a running daemon's tables say is held is locked in the
   kernel by that daemon, in the same mode, on the file's current inode;
3. no resource is exclusive on one host and held on the other;
4. replaying a host's journal gives exactly its daemon's tables;
5. every owner a running daemon lists asked for a lease in this boot of
   its host (after a reboot, a process of the new boot can have an old
   owner's pid and start time: only the boot id tells them apart);
6. at the end, once the journal works and timers have run, no dead
   process is listed as an owner.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.connection import ConnectionActor, Received, ServerInfo
from actors.events import DaemonStarted, LeaseLost
from actors.journal import Append, JournalActor
from actors.lease import LeaseActor
from actors.lockspace import LINK_CHECK_SECONDS, LockspaceActor
from actors.model import LeaseMode
from actors.owners import (
    FENCE_GIVE_UP_SECONDS,
    FENCE_GRACE_SECONDS,
    POLL_FULL_EVERY,
    POLL_SECONDS,
    POLL_SLICES,
    OwnersActor,
)
from actors.recovery import RecoveryActor, RecoveryReport
from actors.recovery_core import ReplayState
from actors.router import RouterActor, UseFencer
from actors.runtime import Dispatcher
from protocol.codec import decode_item, encode_item
from protocol.framing import MAX_REPLY_FRAME, FrameDecoder, encode_frame
from protocol.names import FILES_LOCKSPACE
from tests.actors.harness import Clock, FakeTransport
from tests.sim.world import FakeLockspaceDir, Kernel, ProcessTable, ProcessView, SimJournal

RESOURCES = ("a", "b", "c", "d", "e")


class SimConn:
    """A client connection to one daemon incarnation."""

    def __init__(self, host: Host, pid: int) -> None:
        assert host.dispatcher is not None
        self.host = host
        self.transport = FakeTransport(pid, 0)
        self.ref = ConnectionActor.start(
            host.dispatcher, conn_id=next(host.sim.conn_ids), transport=self.transport,
            router=host.router, owners=host.owners, journal=host.journal,
            processes=host.view, info=ServerInfo("sim", 1, 0.0, host.name, boot=host.boot_id),
            clock=host.sim.clock, wall_clock=host.sim.clock,
        )  # fmt: skip
        self.incarnation = host.incarnation
        self._frames = FrameDecoder(MAX_REPLY_FRAME)
        self._ids = itertools.count(1)
        self.call("hello", versions=[1])

    @property
    def alive(self) -> bool:
        return self.incarnation == self.host.incarnation and not self.transport.closed

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        rid = next(self._ids)
        self.ref.tell(Received(encode_frame(encode_item({"op": op, "id": rid, **args}))))
        self.host.run()
        for chunk in self.transport.written:
            self._frames.receive_data(chunk)
        self.transport.written.clear()
        replies = []
        while (frame := self._frames.next_frame()) is not None:
            replies.append(decode_item(frame))
        mine = [r for r in replies if r.get("id") == rid]
        return mine[0] if mine else {"error": {"code": "no-reply"}}

    def close(self) -> None:
        if self.alive:
            self.ref.tell(Received(b""))
            self.host.run()


class VM:
    """An owner process on a host."""

    def __init__(self, host: Host, pid: int) -> None:
        self.host = host
        self.pid = pid
        self.uuid = uuid.UUID(int=pid).bytes
        self.start = host.processes.spawn(pid)
        self.own: SimConn | None = None

    @property
    def alive(self) -> bool:
        return self.host.processes.procs.get(self.pid) == self.start

    def owner_map(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": f"vm{self.pid}", "id": 1, "pid": self.pid}


class Host:
    """One hypervisor: its process table, its journal, and its daemon when running."""

    def __init__(self, sim: Sim, name: str) -> None:
        self.sim = sim
        self.name = name
        self.journal_file = SimJournal()
        self.processes = ProcessTable(sim.clock, lambda: self.journal_file.fail)
        self.dispatcher: Dispatcher | None = None
        self.incarnation = 0
        self.report: RecoveryReport | None = None
        self.manager_pid = 50 + len(sim.hosts)
        self.processes.spawn(self.manager_pid)
        self.boot = 1
        self.acquirers: set[tuple[int, int]] = set()
        """(pid, start time) of every process that asked this host for a lease in this boot."""

    @property
    def boot_id(self) -> bytes:
        return self.boot.to_bytes(16, "big")

    def reboot(self) -> dict[int, int]:
        """Every process ends; a new boot id. Returns the old processes' start times."""
        assert not self.up
        started = dict(self.processes.procs)
        for pid in started:
            self.processes.exit(pid)
        self.processes.ignores_sigterm.clear()
        self.processes.fenced.clear()
        self.processes.unrecorded.clear()
        self.boot += 1
        self.acquirers.clear()
        self.processes.spawn(self.manager_pid, started[self.manager_pid])
        return started

    @property
    def up(self) -> bool:
        return self.dispatcher is not None

    def start(self) -> None:
        assert self.dispatcher is None
        self.incarnation += 1
        state = ReplayState()
        for entry in self.journal_file.entries:
            state.fold(entry)
        d = Dispatcher(clock=self.sim.clock)
        self.dispatcher = d
        self.view = ProcessView(self.processes)
        self.journal = JournalActor.start(d, self.journal_file, host=self.name,
                                          clock=self.sim.clock, state=state)  # fmt: skip
        kernel, name = self.sim.kernel, self.name
        self.router = RouterActor.start(
            d, lock_dir=str(self.sim.lock_dir), journal=self.journal,
            open_lockspace=lambda path: FakeLockspaceDir(kernel, name, path),
            journal_position=lambda: self.journal_file.next_seq - 1,
        )  # fmt: skip
        # A pidfd budget of none, one or two: owners beyond it are polled.
        budget = self.sim.rng.choice((None, 0, 1, 2))
        self.owners = OwnersActor.start(d, processes=self.view, router=self.router,
                                        journal=self.journal, grace=FENCE_GRACE_SECONDS,
                                        max_pidfds=budget, clock=self.sim.clock)  # fmt: skip
        self.router.tell(UseFencer(self.owners))
        self.journal.tell(Append((DaemonStarted("sim", self.incarnation),), 0, None))
        reports: list[RecoveryReport] = []
        RecoveryActor.start(
            d, state=state, router=self.router, owners=self.owners, journal=self.journal,
            processes=self.view, on_done=reports.append, boot=self.boot_id,
            wall_clock=self.sim.clock,
        )  # fmt: skip
        self.run()
        assert reports, f"{self.name}: recovery did not finish"
        self.report = reports[0]

    def crash(self) -> None:
        """kill -9: every fd and pipe of the process goes; the journal stays."""
        assert self.dispatcher is not None
        self.sim.kernel.close_all(self.name)
        self.view.close()
        self.dispatcher.close()
        self.dispatcher = None

    def run(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.run_until_idle()

    def run_partly(self, steps: int) -> None:
        """Run at most ``steps`` actor messages, so that a crash can fall between any two:
        between a journal record and what it records, a signal and its record."""
        d = self.dispatcher
        assert d is not None
        for _ in range(steps):
            d._run_due_timers()
            d._poll(0)
            if not d._ready:
                return
            d._run_ready(1)

    def tables(self) -> dict[tuple[str, str], tuple[str, frozenset[Any]]]:
        """What this daemon's lockspace actors hold: (lockspace, resource) -> (mode, owners)."""
        assert self.dispatcher is not None
        out = {}
        for actor in list(self.dispatcher.actors):
            if isinstance(actor, LockspaceActor) and not actor.actor_stopped.is_set():
                for resource, holding in actor._state.held.items():
                    out[(actor.name, resource)] = (holding.mode.value, frozenset(holding.owners))
        return out

    def journal_lags(self) -> bool:
        """Changes the journal refused are still being retried: it may lag the tables."""
        assert self.dispatcher is not None
        for actor in list(self.dispatcher.actors):
            if isinstance(actor, LockspaceActor) and actor._unjournaled:
                return True
            if isinstance(actor, OwnersActor) and actor.retries_pending:
                return True
        return False

    def journal_view(self) -> dict[tuple[str, str], tuple[str, frozenset[Any]]]:
        state = ReplayState()
        for entry in self.journal_file.entries:
            state.fold(entry)
        return {k: (h.mode.value, frozenset(h.owners)) for k, h in state.leases.items()}


class Sim:
    """One seeded world; ``step()`` does one random thing and checks every invariant."""

    def __init__(self, seed: int, lock_dir: Path, *, hosts: int = 2, vms: int = 4) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.kernel = Kernel()
        self.lock_dir = lock_dir
        (lock_dir / FILES_LOCKSPACE).mkdir(parents=True, exist_ok=True)
        self.conn_ids = itertools.count(1)
        self.hosts: list[Host] = []
        for i in range(hosts):
            self.hosts.append(Host(self, f"host-{'ab'[i]}"))
        self.vms: list[VM] = []
        for host in self.hosts:
            for j in range(vms):
                self.vms.append(VM(host, 100 * (len(self.vms) // vms + 1) + j))
            host.start()
        self.thief_fds: list[int] = []
        self.log: list[str] = []
        self.steps = 0

    # -- operations -----------------------------------------------------------------------
    def _live_vm(self) -> VM | None:
        candidates = [v for v in self.vms if v.alive and v.host.up]
        return self.rng.choice(candidates) if candidates else None

    def _acquire(self) -> None:
        vm = self._live_vm()
        if vm is None:
            return
        picks = self.rng.sample(RESOURCES, self.rng.randint(1, 3))
        leases = [{"lockspace": FILES_LOCKSPACE, "resource": r, "shared": self.rng.random() < 0.4}
                  for r in picks]  # fmt: skip
        vm.host.acquirers.add((vm.pid, vm.start))
        if self.rng.random() < 0.5:  # as QEMU: its own connection, which it keeps
            if vm.own is None or not vm.own.alive:
                vm.own = SimConn(vm.host, vm.pid)
                vm.own.call("register", owner=vm.owner_map())
            reply = vm.own.call("acquire", leases=leases, autocreate=True)
        else:  # as libvirtd: a manager connection registering the VM
            conn = SimConn(vm.host, vm.host.manager_pid)
            conn.call("register", owner=vm.owner_map())
            reply = conn.call("acquire", leases=leases, autocreate=True)
            conn.close()
        self.log.append(f"acquire vm{vm.pid}@{vm.host.name} {picks} -> {list(reply)[-1]}")

    def _release(self) -> None:
        vm = self._live_vm()
        if vm is None:
            return
        conn = SimConn(vm.host, vm.host.manager_pid)
        conn.call("register", owner=vm.owner_map())
        if self.rng.random() < 0.3:
            reply = conn.call("release", all=True)
        else:
            res = self.rng.choice(RESOURCES)
            reply = conn.call("release", leases=[{"lockspace": FILES_LOCKSPACE, "resource": res}])
        conn.close()
        self.log.append(f"release vm{vm.pid}@{vm.host.name} -> {list(reply)[-1]}")

    def _vm_exit(self) -> None:
        vm = self.rng.choice(self.vms)
        if vm.alive:
            vm.host.processes.exit(vm.pid)
            self.log.append(f"vm{vm.pid}@{vm.host.name} exits")
        else:  # a new process (maybe reusing the pid)
            vm.start = vm.host.processes.spawn(vm.pid)
            vm.own = None
            self.log.append(f"pid {vm.pid}@{vm.host.name} reused")
        vm.host.run()

    def _drop_own_connection(self) -> None:
        vm = self.rng.choice(self.vms)
        if vm.own is not None and vm.own.alive:
            if self.rng.random() < 0.7:  # most do: the fence then runs its whole course
                vm.host.processes.ignores_sigterm.add(vm.pid)
            vm.own.close()
            self.log.append(f"vm{vm.pid}@{vm.host.name} closes its own connection")

    def _crash_or_restart(self) -> None:
        host = self.rng.choice(self.hosts)
        if host.up:
            host.crash()
            self.log.append(f"{host.name} crashes")
        else:
            host.start()
            self.log.append(f"{host.name} restarts: {host.report}")

    def _bounce(self) -> None:
        """A daemon crashes and its service manager starts it again at once: a crash loop
        is this, over and over, and fences must still reach their SIGKILL."""
        host = self.rng.choice(self.hosts)
        for _ in range(self.rng.choice((1, 2, 3))):
            if host.up:
                host.crash()
            host.start()
            self.log.append(f"{host.name} bounces: {host.report}")

    def _reboot(self) -> None:
        """The whole host restarts. The VMs autostarted again get their old pids and start
        times (the same boot order, the worst case): only the boot id shows they are new."""
        host = self.rng.choice(self.hosts)
        if host.up:
            host.crash()
        started = host.reboot()
        back = []
        for vm in self.vms:
            if vm.host is host:
                vm.own = None
                if vm.pid in started and self.rng.random() < 0.7:
                    host.processes.spawn(vm.pid, started[vm.pid])
                    back.append(vm.pid)
        host.start()
        self.log.append(f"{host.name} reboots; vms {back} autostart: {host.report}")

    def _crash_mid_run(self) -> None:
        """Something sets a chain of actor messages going, and the daemon is killed a
        random number of messages in (the other operations crash it only once every
        chain has run out). Every window inside an acquire, a release, an exit, a fence
        or a fence's timer is then a crash point."""
        host = self.rng.choice(self.hosts)
        if not host.up:
            return
        vms = [v for v in self.vms if v.host is host and v.alive]
        vm = self.rng.choice(vms) if vms else None
        trigger = self.rng.choice(("acquire", "release", "exit", "drop", "time", "relink"))
        if trigger == "relink":  # the daemon dies while it locks its lease files again
            if self.rng.random() < 0.3:
                self.kernel.replace_folder(str(self.lock_dir / FILES_LOCKSPACE))
            else:
                self._unlink_or_replace()
            self.clock.now += LINK_CHECK_SECONDS
        elif vm is None or trigger == "time":
            self.clock.now += self.rng.choice((0.3, 1.0, 2.0))
            trigger = "time"
        elif trigger == "exit":
            host.processes.exit(vm.pid)
        elif trigger == "drop":
            if vm.own is None or not vm.own.alive:
                return
            if self.rng.random() < 0.7:
                host.processes.ignores_sigterm.add(vm.pid)
            vm.own.ref.tell(Received(b""))
        else:
            conn = SimConn(host, host.manager_pid)
            conn.call("register", owner=vm.owner_map())
            res = self.rng.choice(RESOURCES)
            lease: dict[str, Any] = {"lockspace": FILES_LOCKSPACE, "resource": res}
            if trigger == "acquire":
                host.acquirers.add((vm.pid, vm.start))
                request = {"op": "acquire", "id": 9, "autocreate": True,
                           "leases": [{**lease, "shared": self.rng.random() < 0.4}]}  # fmt: skip
            else:
                request = {"op": "release", "id": 9, "leases": [lease]}
            conn.ref.tell(Received(encode_frame(encode_item(request))))
        steps = self.rng.randint(0, 40)
        host.run_partly(steps)
        host.crash()
        if self.rng.random() < 0.7:
            host.start()
        after = "restarts" if host.up else "stays down"
        who = f"vm{vm.pid}" if vm is not None else "no vm"
        self.log.append(f"{host.name} crashes {steps} messages after a {trigger} ({who}), {after}")

    def _steal(self, res: str | None = None) -> None:
        """Another host without a daemon takes a lease file's lock (only possible if free)."""
        res = res or self.rng.choice(RESOURCES)
        folder = self.kernel.folder(str(self.lock_dir / FILES_LOCKSPACE))
        try:
            fd = self.kernel.open("thief", folder, res, create=True)
        except FileNotFoundError:
            return
        try:
            self.kernel.lock(fd, shared=False)
        except Exception:  # noqa: BLE001 - busy: someone holds it, as expected
            self.kernel.close(fd)
            return
        self.thief_fds.append(fd)
        self.log.append(f"thief locks {res}")

    def _file_removed(self) -> None:
        """Someone removes a lease file, held or not (an operator's rm, virtlockd's
        delete-resource), or renames a new file over it, and sometimes the thief
        creates and locks it again at once; then the daemons' next look at their
        files comes."""
        res = self._unlink_or_replace()
        if self.rng.random() < 0.5:
            self._steal(res)
        self.clock.now += LINK_CHECK_SECONDS
        for host in self.hosts:
            host.run()

    def _unlink_or_replace(self) -> str:
        """Remove a lease file, or rename a new one over it; the resource."""
        res = self.rng.choice(RESOURCES)
        folder = self.kernel.folder(str(self.lock_dir / FILES_LOCKSPACE))
        if self.rng.random() < 0.5:
            self.kernel.unlink(folder, res)
            self.log.append(f"{res} removed")
        else:
            self.kernel.replace(folder, res)
            self.log.append(f"{res} replaced by a new file")
        return res

    def _dir_replaced(self) -> None:
        """The lockspace directory is moved aside, its files in it, and made again empty;
        sometimes the thief locks a lease file there at once. Then the daemons' next
        look at their files comes."""
        self.kernel.replace_folder(str(self.lock_dir / FILES_LOCKSPACE))
        self.log.append("the lockspace directory is moved aside and made again")
        if self.rng.random() < 0.5:
            self._steal()
        self.clock.now += LINK_CHECK_SECONDS
        for host in self.hosts:
            host.run()

    def _thief_lets_go(self) -> None:
        if self.thief_fds:
            self.kernel.close(self.thief_fds.pop(0))
            self.log.append("thief lets go")

    def _journal_trouble(self) -> None:
        host = self.rng.choice(self.hosts)
        host.journal_file.fail = not host.journal_file.fail
        if host.journal_file.fail:  # a crash now may lose what these fences still record
            host.processes.unrecorded.update(host.processes.fenced)
        self.log.append(f"{host.name} journal {'fails' if host.journal_file.fail else 'heals'}")

    def _time_passes(self) -> None:
        step = self.rng.choice((0.3, 1.0, 2.0))
        self.clock.now += step
        self.log.append(f"{step} s pass")
        for host in self.hosts:
            host.run()

    OPS: tuple[tuple[Callable[[Sim], None], int], ...] = (
        (_acquire, 30), (_release, 15), (_vm_exit, 10), (_drop_own_connection, 10),
        (_crash_or_restart, 8), (_bounce, 4), (_reboot, 2), (_steal, 4), (_thief_lets_go, 4),
        (_journal_trouble, 3), (_time_passes, 12), (_crash_mid_run, 6), (_file_removed, 3),
        (_dir_replaced, 2),
    )  # fmt: skip

    def step(self) -> None:
        ops, weights = zip(*self.OPS, strict=True)
        op = self.rng.choices(ops, weights)[0]
        op(self)
        for host in self.hosts:
            host.run()
        self.steps += 1
        self.check()

    def finish(self) -> None:
        """Heal everything, let timers run, restart every host; then the strict checks."""
        for host in self.hosts:
            host.journal_file.fail = False
            if not host.up:
                host.start()
        for _ in range(4):
            self._time_passes()
        # Owners past the pidfd budget are polled a slice per timer tick; a
        # real clock moves through every tick, so let this one do so too, for
        # longer than a fence (grace, SIGKILL, give-up) and the polling rounds
        # up to a full check (a reused pid is only seen by that).
        tick = POLL_SECONDS / POLL_SLICES
        settle = FENCE_GRACE_SECONDS + FENCE_GIVE_UP_SECONDS + POLL_SECONDS * POLL_FULL_EVERY
        for _ in range(int(settle / tick) + 1):
            self.clock.now += tick
            for host in self.hosts:
                host.run()
        self.check()
        for host in self.hosts:
            for _, owners in host.tables().values():
                for key in owners:
                    assert host.processes.procs.get(key.pid) == key.start_time, self.explain(
                        f"{host.name} lists a dead owner {key}"
                    )

    # -- invariants ----------------------------------------------------------------------------
    def explain(self, what: str) -> str:
        tail = "\n  ".join(self.log[-15:])
        return f"{what}\nseed {self.seed}, step {self.steps}; last steps:\n  {tail}"

    def check(self) -> None:
        self.kernel.check()
        path = str(self.lock_dir / FILES_LOCKSPACE)
        tables = {h.name: h.tables() for h in self.hosts if h.up}
        for host in self.hosts:
            if not host.up:
                continue
            held = tables[host.name]
            for (_, resource), (mode, owners) in held.items():
                assert owners, self.explain(f"{host.name}: {resource} held by nobody")
                for key in owners:
                    assert (key.pid, key.start_time) in host.acquirers, self.explain(
                        f"{host.name} holds {resource} for {key}, which asked for no lease "
                        f"in this boot"
                    )
                kernel_mode = self.kernel.holders(path, resource).get(host.name)
                want = "w" if mode == LeaseMode.EXCLUSIVE.value else "r"
                assert kernel_mode == want, self.explain(
                    f"{host.name} holds {resource} {mode} but the kernel says {kernel_mode!r}"
                )
            actors = list(host.dispatcher.actors) if host.dispatcher is not None else []
            running = {id(a) for a in actors if isinstance(a, LeaseActor)}
            mapped = {
                id(ref._actor_weakref())
                for a in actors
                if isinstance(a, LockspaceActor)
                for ref in a._leases.values()
            }
            assert running == mapped, self.explain(
                f"{host.name}: {len(running - mapped)} lease actors run that no lockspace "
                f"knows, {len(mapped - running)} known that do not run"
            )
            table = host.processes
            for key, first in table.fenced.items():
                if key in table.unrecorded or table.procs.get(key[0]) != key[1]:
                    continue
                assert self.clock.now <= first + FENCE_GRACE_SECONDS, self.explain(
                    f"{host.name}: vm{key[0]} still runs {self.clock.now - first:.1f} s after "
                    f"its fence's first SIGTERM (grace {FENCE_GRACE_SECONDS} s)"
                )
            if not host.journal_file.fail and not host.journal_lags():
                assert host.journal_view() == held, self.explain(
                    f"{host.name}: journal {host.journal_view()} != tables {held}"
                )
        if len(tables) == 2:
            (a, ta), (b, tb) = tables.items()
            for key in ta.keys() & tb.keys():
                assert ta[key][0] == tb[key][0] == "shared", self.explain(
                    f"{key} held by {a} ({ta[key][0]}) and {b} ({tb[key][0]})"
                )

    def close(self) -> None:
        for host in self.hosts:
            if host.up:
                host.crash()


def lost_events(host: Host) -> int:
    return sum(isinstance(e.event, LeaseLost) for e in host.journal_file.entries)
