"""The wall clock stepped (NTP, ``date -s``, a wrong RTC corrected) while the daemon runs.

Durations (fence grace, acquire waits, ``idle_timeout``, uptime) are measured on
the monotonic clock, which no step moves; the wall clock only stamps (journal
``time``, ``connected_since``). Each test steps the harness's wall clock by
hours, forward and back, and checks that what an operator meets is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.events import JournalEntry, LeaseAcquired, OwnerFenced
from tests.actors.harness import Harness

FILES = "org.libvirt.lockd.files"
VM1, VM2, LIBVIRTD = 4001, 4002, 4000
STEPS = [3 * 3600.0, -3 * 3600.0]
"""Three hours forward, three hours back."""


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "locks")
    for pid in (VM1, VM2, LIBVIRTD):
        harness.processes.spawn(pid)
    yield harness
    harness.close()


def disk(resource: str) -> dict[str, object]:
    return {"lockspace": FILES, "resource": resource}


@pytest.mark.parametrize("step", STEPS)
def test_a_step_during_a_fence_neither_hastens_nor_delays_its_sigkill(
    h: Harness, step: float
) -> None:
    """SIGKILL comes fence_grace (1.6 s) after SIGTERM whatever the wall clock did meanwhile,
    and ``status`` counts down the same seconds: on the wall clock a step forward would
    kill at once and a step back would leave the VM writing for three hours."""
    h.processes.ignores_sigterm.add(VM1)
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[disk("a")], autocreate=True)
    admin = h.connect(LIBVIRTD, admin=True)
    vm.close()
    h.step_wall(step)
    assert h.processes.signals == [(VM1, "SIGTERM")]
    h.advance(1.0)
    (fence,) = admin.ok("status")["fencing"]
    assert (fence["next_signal"], fence["due_in_s"]) == ("SIGKILL", pytest.approx(0.6))
    assert h.processes.signals == [(VM1, "SIGTERM")]
    h.advance(0.7)
    assert h.processes.signals == [(VM1, "SIGTERM"), (VM1, "SIGKILL")]
    stamps = [e.time for e in h.journal_writer.entries if isinstance(e.event, OwnerFenced)]
    assert stamps == [0.0, pytest.approx(step + 1.7)]  # the SIGKILL's record: the new time


@pytest.mark.parametrize("step", STEPS)
def test_a_step_ends_no_acquire_wait_early_nor_makes_it_endless(h: Harness, step: float) -> None:
    """An acquire waiting for a busy lease gives up ``wait`` seconds after it was sent."""
    vm1, vm2 = h.connect(VM1), h.connect(VM2)
    vm1.register(VM1)
    vm2.register(VM2)
    vm1.ok("acquire", leases=[disk("a")], autocreate=True)
    rid = vm2.send("acquire", leases=[disk("a")], autocreate=True, wait=1)
    h.advance(0.1)
    h.step_wall(step)
    for _ in range(7):
        h.advance(0.1)
    assert vm2.messages() == []
    for _ in range(5):
        h.advance(0.1)
    (reply,) = vm2.messages()
    assert (reply["id"], reply["error"]["code"]) == (rid, "busy")


@pytest.mark.parametrize("step", STEPS)
def test_a_step_closes_no_idle_connection_early_nor_keeps_it_for_ever(
    h: Harness, step: float
) -> None:
    """A connection that registers nothing is closed ``idle_timeout`` after it opened."""
    idle = h.connect(VM1, idle_timeout=5.0)
    h.advance(1.0)
    h.step_wall(step)
    h.advance(3.5)
    assert not idle.transport.closed
    h.advance(1.0)
    assert idle.transport.closed


@pytest.mark.parametrize("step", STEPS)
def test_a_step_moves_stamps_not_uptime_nor_a_leases_holding(h: Harness, step: float) -> None:
    """``status`` uptime and ``lockd_uptime_seconds`` go on from where they were; a lease
    held across the step stays held; ``connected_since`` and the journal's stamps are
    the wall clock's, and show the step."""
    vm = h.connect(VM1)
    vm.register(VM1)
    vm.ok("acquire", leases=[disk("a")], autocreate=True)
    admin = h.connect(LIBVIRTD, admin=True)
    before = admin.ok("status")["uptime_s"]
    h.step_wall(step)
    h.advance(2.0)
    assert admin.ok("status")["uptime_s"] == pytest.approx(before + 2.0)
    (uptime,) = [
        float(line.split()[1])
        for line in admin.ok("metrics")["text"].splitlines()
        if line.startswith("lockd_uptime_seconds ")
    ]
    assert uptime == pytest.approx(before + 2.0)
    assert [r["resource"] for r in vm.ok("inquire")["leases"]] == ["a"]
    late = h.connect(VM2)
    clients = {c["pid"]: c["connected_since"] for c in admin.ok("list-clients")["clients"]}
    assert clients[VM1] == 0.0
    assert clients[VM2] == pytest.approx(step + 2.0)
    late.register(VM2)
    late.ok("acquire", leases=[disk("b")], autocreate=True)
    acquired: list[JournalEntry] = [
        e for e in h.journal_writer.entries if isinstance(e.event, LeaseAcquired)
    ]
    assert [e.time for e in acquired] == [0.0, pytest.approx(step + 2.0)]
