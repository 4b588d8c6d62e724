"""Thousands of random crash schedules on two hosts: two VMs never hold one disk.

CI runs ``--sim-schedules`` (300) seeded schedules of ``--sim-steps`` (40)
steps; a failure prints its seed and last steps, and ``--sim-seed N``
replays exactly that schedule. ``pytest tests/sim --sim-schedules 5000`` is
the soak. The hypothesis state machine below explores the same world and
shrinks what it finds to a minimal sequence.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.sim.sim import Sim, SimConn


def run_schedule(seed: int, steps: int, root: Path) -> Sim:
    sim = Sim(seed, root / f"seed-{seed}")
    try:
        for _ in range(steps):
            sim.step()
        sim.finish()
    finally:
        sim.close()
    return sim


def test_random_schedules(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    seed = request.config.getoption("--sim-seed")
    schedules = request.config.getoption("--sim-schedules")
    steps = request.config.getoption("--sim-steps")
    seeds = [seed] if seed is not None else range(schedules)
    total_steps = crashes = inside = bounces = reboots = 0
    for s in seeds:
        sim = run_schedule(s, steps, tmp_path)
        total_steps += sim.steps
        crashes += sum(1 for line in sim.log if "crashes" in line)
        inside += sum(1 for line in sim.log if "messages after" in line)
        bounces += sum(1 for line in sim.log if "bounces" in line)
        reboots += sum(1 for line in sim.log if "reboots" in line)
    print(f"\nsimulated {len(seeds)} schedules, {total_steps} steps, {crashes} daemon crashes "
          f"({inside} inside an operation), {bounces} crash-and-restarts in crash loops, "
          f"{reboots} host reboots")  # fmt: skip
    assert total_steps == len(seeds) * steps


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """A daemon whose table claims a lease the kernel does not back is caught."""
    sim = Sim(1, tmp_path)
    try:
        host = sim.hosts[0]
        sim.hosts[1].crash()
        sim.kernel.close_all(host.name)  # the locks vanish under the daemon's feet
        vm = next(v for v in sim.vms if v.host is host)
        conn = SimConn(host, vm.pid)
        host.acquirers.add((vm.pid, vm.start))
        conn.call("register", owner=vm.owner_map())
        conn.call("acquire", leases=[{"lockspace": "org.libvirt.lockd.files", "resource": "a"}],
                  autocreate=True)  # fmt: skip
        sim.kernel.close_all(host.name)
        with pytest.raises(AssertionError, match="the kernel says None"):
            sim.check()
    finally:
        sim.close()


def test_a_reboot_ends_the_leases_of_the_earlier_boot(tmp_path: Path) -> None:
    """A VM autostarted with its old pid and start time holds nothing it did not ask for."""
    sim = Sim(1, tmp_path)
    try:
        host = sim.hosts[0]
        vm = next(v for v in sim.vms if v.host is host)
        conn = SimConn(host, vm.pid)
        host.acquirers.add((vm.pid, vm.start))
        conn.call("register", owner=vm.owner_map())
        lease = {"lockspace": "org.libvirt.lockd.files", "resource": "a"}
        assert "result" in conn.call("acquire", leases=[lease], autocreate=True)
        host.crash()
        started = host.reboot()
        host.processes.spawn(vm.pid, started[vm.pid])
        host.start()
        assert vm.alive  # the same pid and start time, in the new boot
        assert host.tables() == {}
        assert host.report is not None
        assert host.report.released == 1
        sim.check()
    finally:
        sim.close()


class LockdWorld(RuleBasedStateMachine):
    """The same operations as the seeded schedules, chosen (and shrunk) by hypothesis."""

    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        self.sim = Sim(0, Path(self._dir.name))

    @rule(op=st.sampled_from([op for op, _ in Sim.OPS]), seed=st.integers(0, 2**16))
    def act(self, op: object, seed: int) -> None:
        self.sim.rng.seed(seed)
        op(self.sim)  # type: ignore[operator]
        for host in self.sim.hosts:
            host.run()

    @invariant()
    def invariants_hold(self) -> None:
        self.sim.check()

    def teardown(self) -> None:
        try:
            self.sim.finish()
        finally:
            self.sim.close()
            self._dir.cleanup()


TestLockdWorld = LockdWorld.TestCase
TestLockdWorld.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
