"""RecoveryActor: after a restart, hold again what the journal says is held, before serving.

For every lease in the replayed state:

- owners still alive (pid and start time match) get their lease back: the
  lockspace actor takes the kernel lock again, or adopts an fd that still
  carries it (re-exec, the service manager's fd store), so there is no gap;
- owners that died while the daemon was down are released (``owner-gone``);
- when another process or host took the lease meanwhile, every live owner of
  it gets ``lease-lost``, and the fencing policy applies (default: terminate
  the owner, since it may be writing a disk someone else now holds).

Then every live owner is watched with a pidfd; ``recovery-completed``
records the counts, the duration and the fences to run (owners of leases
lost now, and fences a previous daemon began or owed and did not finish,
whose owner still runs); once it is written those fences start, and
``on_done`` lets the daemon serve.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import pykka

from actors.events import (
    Event,
    Fence,
    LeaseLost,
    LeaseReleased,
    RecoveryCompleted,
    ReleaseReason,
)
from actors.faults import crash_point
from actors.journal import Append, Appended, AppendFailed
from actors.lockspace import FdStoreLike, Restore, Restored, RestoreLease
from actors.lockspace_core import Applied
from actors.metrics import REGISTRY
from actors.model import Owner, OwnerKey
from actors.owners import FenceLost, Processes, Watch
from actors.recovery_core import ReplayState, lost_lease_reason
from actors.router import Found, Lookup
from actors.runtime import DispatchedActor, Dispatcher, tell_if_alive

log = logging.getLogger(__name__)

RESUMED = "; fence resumed after a lockd restart"
"""Added to the reason of a resumed fence (once, however many crashes or re-execs)."""
_RESUMED_BEFORE = "; fence resumed after a lockd crash"
"""What :data:`RESUMED` read until re-execs resumed fences too (in older journals)."""
LOOKUP_RETRIES = 30
"""Seconds recovery waits for a missing lockspace directory (shared storage mounted late)."""


@attrs.frozen
class RecoveryReport:
    """What recovery did (also journaled as ``recovery-completed``)."""

    held: int
    released: int
    lost: int
    duration_ms: float
    lost_owners: tuple[tuple[Owner, str], ...] = ()


class RecoveryActor(DispatchedActor):
    """Runs once at start-up, then stops."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        state: ReplayState,
        router: pykka.ActorRef[Any],
        owners: pykka.ActorRef[Any],
        journal: pykka.ActorRef[Any],
        processes: Processes,
        on_done: Callable[[RecoveryReport], None],
        adopted: Mapping[tuple[str, str], int] | None = None,
        fence_lost: bool = True,
        started: float | None = None,
        boot_time: float = 0.0,
        boot: bytes | None = None,
        wall_clock: Callable[[], float] = time.time,
        fd_store: FdStoreLike | None = None,
        release_fd: Callable[[int], None] = os.close,
    ) -> None:
        super().__init__(dispatcher)
        self._fd_store = fd_store
        """Told to drop an adopted fd recovery closes (its copy would keep the lock)."""
        self._release_fd = release_fd
        """Unlocks, then closes, an adopted fd recovery lets go (real:
        ``LockspaceDir.release_fd``): closed only, the lock lived on in the fd store's copy
        (or a re-exec's) until the service manager dropped it, never if it did not."""
        self._wall_clock = wall_clock
        self._state = state
        self._router = router
        self._owners = owners
        self._journal = journal
        self._processes = processes
        self._on_done = on_done
        self._adopted = dict(adopted or {})
        self._fence_lost = fence_lost
        self._boot_time = boot_time
        """Wall-clock time of this boot: a fence begun before it was begun on processes
        of another boot, whose (pid, start time) may now name an unrelated process.
        Only for owners journaled without a boot id (or with none known now): a clock
        stepped forward after boot (NTP at start-up) makes a fence of this boot look
        older than the boot, and a lost lease's owner went on writing a disk another
        host held. It must never decide that a lease's owner is gone."""
        self._boot = boot
        """This boot's id: an owner journaled with another is gone (see ``Owner.boot``)."""
        self._started = time.monotonic() if started is None else started
        self._tokens = itertools.count(1)
        self._waiting = 0
        self._held = self._released = 0
        self._lost: list[tuple[Owner, str]] = []
        self._lost_why: dict[str, str] = {}
        """Leases lost for a reason other than another process or host taking them (their
        lockspace directory gone, their file not lockable), by ``lockspace/resource``: what
        the log and fence say."""
        self._plan: dict[str, list[RestoreLease]] = {}
        self._live: dict[Any, Owner] = {}
        self._fences: list[tuple[Owner, str, float | None, int | None]] = []
        """Fences to resume: owner, reason, the first SIGTERM's time (None: only owed), and
        the uid they signal for (None: root's)."""
        self._lookups: dict[str, int] = {}
        self._once: dict[str, tuple[tuple[OwnerKey, bytes, Applied], ...]] = {}
        """Per lockspace, the keys of recent keyed requests it is to keep."""
        self._handed: tuple[Fence, ...] = ()
        """The fences ``recovery-completed`` lists, started once it is written."""

    def _of_this_boot(self, owner: Owner) -> bool:
        """The boot ids say ``owner`` registered in this boot, whatever the clock says."""
        return owner.boot is not None and owner.boot == self._boot

    def _gone(self, owner: Owner) -> bool:
        return owner.of_another_boot(self._boot) or self._processes.is_gone(owner)

    def on_start(self) -> None:
        # The plan is copied out of the replayed state here, before any
        # recovery event is journaled (the journal actor folds into it).
        gone: dict[Any, bool] = {}
        earlier_boot = 0
        for (lockspace, resource), held in self._state.leases.items():
            live: list[tuple[Owner, float]] = []
            dead: list[Owner] = []
            for key, (owner, since) in held.owners.items():
                if key not in gone:
                    earlier = owner.of_another_boot(self._boot)
                    earlier_boot += earlier
                    gone[key] = earlier or self._processes.is_gone(owner)
                if gone[key]:
                    dead.append(owner)
                else:
                    live.append((owner, since))
                    self._live[key] = owner
            fd = self._adopted.pop((lockspace, resource), None)
            holds = () if held.holds is None else tuple(
                (key, n) for key, n in held.holds.items() if not gone[key]
            )  # fmt: skip
            self._plan.setdefault(lockspace, []).append(
                RestoreLease(
                    resource, held.mode, held.autocreate, tuple(live), tuple(dead), fd, holds
                )
            )
        for lockspace, keys in self._state.once.items():
            # Keys outlive the leases they ended (a repeated release answers from its
            # key): the lockspace gets them even when it holds nothing now. Those of
            # owners found gone go, as their owner-gone releases will say.
            records = tuple(r for r in keys.export() if not gone.get(r[0], False))
            if records:
                self._plan.setdefault(lockspace, [])
                self._once[lockspace] = records
        if earlier_boot:
            log.info("recovery: %d owners registered before this boot of the host; "
                     "their leases end as owner-gone", earlier_boot)  # fmt: skip
        owed = self._state.owed
        self._fences = [
            (owner, reason, None if owner.key in owed else since, uid)
            for owner, reason, since, uid in self._state.fencing.values()
            if (self._of_this_boot(owner) or since >= self._boot_time) and not self._gone(owner)
        ]
        if self._fences and not self._fence_lost:
            # lost_lease_policy = log is the operator's "kill no VM" switch: killing
            # lockd mid-fence and starting it so configured stops the fence.
            for owner, reason, _, _ in self._fences:
                log.warning("recovery: not resuming the fence of %s (%s): lost_lease_policy "
                            "is log", owner.describe(), reason)  # fmt: skip
            self._fences = []
        for (lockspace, resource), fd in self._adopted.items():
            log.warning("no journaled lease for adopted fd %d (%s/%s); closing it",
                        fd, lockspace, resource)  # fmt: skip
            self._release_fd(fd)
        self._waiting = len(self._plan)
        for lockspace in self._plan:
            self._router.tell(Lookup(lockspace, next(self._tokens), self.actor_ref))
        if not self._plan:
            self._complete()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Found):
            self._found(message)
        elif isinstance(message, Restored):
            self._restored(message)
        elif isinstance(message, (Appended, AppendFailed)):
            self._journaled(message)
        else:
            return super().on_receive(message)
        return None

    def _found(self, found: Found) -> None:
        leases = self._plan[found.lockspace]
        if found.ref is not None:
            found.ref.tell(
                Restore(
                    tuple(leases), found.token, self.actor_ref, self._once.get(found.lockspace, ())
                )
            )
            return
        # The directory is missing or unusable: often shared storage mounted
        # late. Wait for it (requests wait too) rather than fence VMs whose
        # lease nobody took; give up only after LOOKUP_RETRIES seconds.
        tries = self._lookups.get(found.lockspace, 0) + 1
        self._lookups[found.lockspace] = tries
        # Waiting only spares live owners a fence. With every owner gone (after a
        # reboot, all of them) there is no lock to take again there: it held every
        # request up for LOOKUP_RETRIES seconds for nothing, at each start while that
        # storage stayed away, local lockspaces included.
        if tries < LOOKUP_RETRIES and any(lease.live for lease in leases):
            if tries == 1:
                log.error("recovery: lockspace %s unavailable (%s); waiting for it",
                          found.lockspace, found.message)  # fmt: skip
            ref, name = self.actor_ref, found.lockspace
            self.dispatcher.call_later(
                1.0, lambda: tell_if_alive(self._router, Lookup(name, found.token, ref))
            )
            return
        if tries < LOOKUP_RETRIES:
            log.warning("recovery: lockspace %s unavailable (%s); the owners of its leases are "
                        "all gone, so they are released without waiting for it",
                        found.lockspace, found.message)  # fmt: skip
        else:
            log.error("recovery: lockspace %s still unavailable; its leases are lost",
                      found.lockspace)  # fmt: skip
        events: list[Event] = []
        for lease in leases:
            if lease.fd is not None:
                self._release_fd(lease.fd)
                if self._fd_store is not None:
                    # The manager's copy would hold the lock on, unreported.
                    self._fd_store.remove(found.lockspace, lease.resource)
            self._released += len(lease.dead)
            events.extend(
                LeaseReleased(found.lockspace, lease.resource, lease.mode, owner, 0,
                              ReleaseReason.OWNER_GONE)
                for owner in lease.dead
            )  # fmt: skip
            for owner, _ in lease.live:
                self._lost.append((owner, f"{found.lockspace}/{lease.resource}"))
                self._lost_why[f"{found.lockspace}/{lease.resource}"] = (
                    f"its lockspace directory is unavailable ({found.message})"
                )
                events.append(
                    LeaseLost(found.lockspace, lease.resource, lease.mode, owner,
                              f"lockspace directory unavailable: {found.message}")
                )  # fmt: skip
        if events:
            self._journal.tell(Append(tuple(events), 0, None))
        self._part_done()

    def _restored(self, restored: Restored) -> None:
        self._held += restored.held
        self._released += restored.released
        self._lost.extend(
            (owner, f"{restored.lockspace}/{resource}") for owner, resource in restored.lost
        )
        for resource, error in restored.unlocked:
            self._lost_why[f"{restored.lockspace}/{resource}"] = (
                f"its lease file could not be locked ({error})"
            )
        self._part_done()

    def _part_done(self) -> None:
        self._waiting -= 1
        if self._waiting == 0:
            self._complete()

    def _complete(self) -> None:
        for owner in self._live.values():
            self._owners.tell(Watch(owner))
        fences: dict[OwnerKey, Fence] = {}
        now = self._wall_clock()
        for owner, lease in self._lost:
            why = self._lost_why.get(lease)
            how = f"while lockd was down: {why}" if why else "to another process or host"
            log.error("recovery: %s lost lease %s %s", owner.describe(), lease, how)
            if self._fence_lost:
                fence = Fence(owner, lost_lease_reason(lease, why))
                fences.setdefault(owner.key, fence)
        for owner, reason, begun, uid in self._fences:
            # SIGTERM again (harmless to a process already exiting), then SIGKILL when
            # the interrupted fence would have sent it: a grace period after it began.
            # A start in the future (the clock stepped back) counts from now, so the
            # next daemon does not get a full grace period again.
            since = None if begun is None else min(begun, now)
            log.warning("recovery: resuming the fence of %s (%s)", owner.describe(), reason)
            lost_now = fences.get(owner.key)
            if lost_now is None:
                plain = reason.removesuffix(RESUMED).removesuffix(_RESUMED_BEFORE)
                fences[owner.key] = Fence(owner, plain + RESUMED, since, uid)
            else:  # it lost a lease now too: the fence keeps that reason and its deadline
                fences[owner.key] = attrs.evolve(lost_now, since=since)
        duration = round((time.monotonic() - self._started) * 1000, 3)
        REGISTRY.set("lockd_recovery_duration_seconds", duration / 1000)
        self._report = RecoveryReport(
            self._held, self._released, len(self._lost), duration, tuple(self._lost)
        )
        # The fences go in the record that ends recovery, so a crash before the
        # owners actor journals its signals still leaves them to the next start.
        self._handed = tuple(fences.values())
        event = RecoveryCompleted(
            self._held, self._released, len(self._lost), duration, self._handed
        )
        self._journal.tell(Append((event,), 0, self.actor_ref))

    def _journaled(self, _message: Appended | AppendFailed) -> None:
        # Recorded first, then acted on. Should the record have failed, the
        # fences still start: better a fenced VM than one writing a lost disk.
        crash_point("recovery-completed")
        for fence in self._handed:
            self._owners.tell(FenceLost(fence.owner, fence.reason, fence.since, fence.on_behalf_of))
        log.info(
            "recovery: %d leases held again, %d released (owner gone), %d lost, in %.1f ms",
            self._report.held,
            self._report.released,
            self._report.lost,
            self._report.duration_ms,
        )
        self._on_done(self._report)
        self.stop()
