"""Two hosts' actors on one real lock directory, its files and directory pulled away under them.

A hypothesis state machine: two daemons (the real actors, each on its own
dispatcher, with real lease files and real OFD locks; both in this process,
whose open file descriptions conflict like two hosts') acquire and release
leases while lease files are removed or replaced by renamed new ones, the
lockspace directory is moved aside and made again, and a third party (a host
without a daemon) locks files; after each of those the daemons look at their
files again. After every step, on the real kernel: each lease a daemon
reports is locked, in its mode, through the fd it keeps, on the file its
name names now; no file is locked that nobody reports (or the third party
holds); no lease is exclusive on one host and held on the other; no daemon
removed a file the third party holds; and each journal replays to its
daemon's table.
"""

from __future__ import annotations

import fcntl
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from actors.lockspace import LINK_CHECK_SECONDS, LockspaceActor
from actors.recovery_core import ReplayState
from lockd.lockfiles import holds_lock
from protocol.names import FILES_LOCKSPACE, INDEX_NAME
from tests.actors.harness import Conn, Harness

RESOURCES = ("a", "b")
VMS = (100, 101, 102)
_FLOCK = struct.Struct("hhqqi4x")


def locked_by_anyone(path: Path) -> bool:
    """Whether some description holds a lock on byte 0 of ``path`` (F_OFD_GETLK)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 1, 0))
        return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def lock_mode(fd: int) -> str | None:
    """The mode of the OFD lock ``fd``'s description holds, from /proc (None: none)."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        for line in info:
            if line.startswith("lock:") and " OFDLCK " in line:
                return "shared" if " READ " in line else "exclusive"
    return None


class Host:
    """One daemon's actors on the shared lock directory, and its VMs' connections."""

    def __init__(self, lock_dir: Path) -> None:
        self.harness = Harness(lock_dir)
        self.conns: dict[int, Conn] = {}
        for pid in VMS:
            self.harness.processes.spawn(pid)
            conn = self.harness.connect(pid)
            conn.register(pid, f"vm{pid}")
            self.conns[pid] = conn

    def lockspace(self) -> LockspaceActor | None:
        for actor in list(self.harness.dispatcher.actors):
            if isinstance(actor, LockspaceActor) and actor.name == FILES_LOCKSPACE:
                return actor
        return None

    def table(self) -> dict[str, tuple[str, frozenset[Any]]]:
        actor = self.lockspace()
        if actor is None:
            return {}
        return {r: (h.mode.value, frozenset(h.owners)) for r, h in actor._state.held.items()}

    def journal_view(self) -> dict[str, tuple[str, frozenset[Any]]]:
        state = ReplayState()
        for entry in self.harness.journal_writer.entries:
            state.fold(entry)
        return {
            resource: (held.mode.value, frozenset(held.owners))
            for (lockspace, resource), held in state.leases.items()
            if lockspace == FILES_LOCKSPACE
        }


class LeaseFilesWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        self.lock_dir = Path(self._tmp.name) / "locks"
        self.space = self.lock_dir / FILES_LOCKSPACE
        self.hosts = [Host(self.lock_dir), Host(self.lock_dir)]
        self.thief: list[tuple[str, int]] = []
        """Resources a host without a daemon locked, and its fds (the file may be gone since)."""
        self.pulled: set[int] = set()
        """The thief's fds whose file this test removed, replaced or moved away."""
        self.moved = 0
        self.unseen = False
        """Files were pulled away since the daemons' last look: until the next, what they
        report may be on a file no name leads to (the window the look closes)."""

    def _thief_holds(self) -> set[str]:
        """The resources whose file, the one their name names now, the thief has locked."""
        held = set()
        for resource, fd in self.thief:
            try:
                now = os.stat(self.space / resource, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if os.path.samestat(os.fstat(fd), now):
                held.add(resource)
        return held

    def _look_again(self) -> None:
        """Time for every daemon's next look at its files."""
        for host in self.hosts:
            host.harness.advance(LINK_CHECK_SECONDS)
        self.unseen = False

    def _maybe_look_again(self, look: bool) -> None:
        if look:
            self._look_again()
        else:
            self.unseen = True

    @rule(host=st.integers(0, 1), pid=st.sampled_from(VMS),
          picks=st.lists(st.sampled_from(RESOURCES), min_size=1, max_size=2, unique=True),
          shared=st.booleans())  # fmt: skip
    def acquire(self, host: int, pid: int, picks: list[str], shared: bool) -> None:
        leases = [{"lockspace": FILES_LOCKSPACE, "resource": r, "shared": shared} for r in picks]
        reply = self.hosts[host].conns[pid].call("acquire", leases=leases, autocreate=True)
        assert "result" in reply or reply["error"]["code"] in ("busy", "io-error"), reply

    def _held(self) -> list[tuple[int, int, str]]:
        """(host, pid, resource) of every lease the daemons hold."""
        return sorted(
            (i, key.pid, resource)
            for i, host in enumerate(self.hosts)
            for resource, (_, owners) in host.table().items()
            for key in owners
        )

    @precondition(lambda self: bool(self._held()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        host, pid, resource = data.draw(st.sampled_from(self._held()))
        lease = {"lockspace": FILES_LOCKSPACE, "resource": resource}
        reply = self.hosts[host].conns[pid].call("release", leases=[lease])
        assert "result" in reply, reply

    @rule(resource=st.sampled_from(RESOURCES), replace=st.booleans(), steal=st.booleans(),
          look=st.booleans())  # fmt: skip
    def file_pulled_away(self, resource: str, replace: bool, steal: bool, look: bool) -> None:
        """Removed (an operator's rm), or a new file renamed over it; maybe locked at once;
        the daemons' next look comes now, or after other steps."""
        path = self.space / resource
        self.pulled.update(fd for r, fd in self.thief if r == resource)
        if replace:
            fresh = Path(self._tmp.name) / "fresh"
            fresh.touch()
            if path.exists():
                fresh.rename(path)
            else:
                fresh.unlink()
        else:
            path.unlink(missing_ok=True)
        if steal:
            self.steal(resource)
        self._maybe_look_again(look)

    @rule(steal=st.sampled_from((None, *RESOURCES)), look=st.booleans())
    def directory_replaced(self, steal: str | None, look: bool) -> None:
        """The lockspace directory moved aside and made again, empty."""
        if not self.space.exists():
            return
        self.moved += 1
        self.pulled.update(fd for _, fd in self.thief)
        self.space.rename(self.lock_dir.with_name(f"aside-{self.moved}"))
        self.space.mkdir()
        if steal is not None:
            self.steal(steal)
        self._maybe_look_again(look)

    @rule(resource=st.sampled_from(RESOURCES))
    def steal(self, resource: str) -> None:
        """A host without a daemon creates the file and takes an exclusive lock, if free."""
        if resource in self._thief_holds() or not self.space.exists():
            return
        fd = os.open(self.space / resource, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 1, 0))
        except BlockingIOError:  # EAGAIN: a daemon holds it
            os.close(fd)
            return
        self.thief.append((resource, fd))

    @precondition(lambda self: bool(self.thief))
    @rule(data=st.data())
    def thief_lets_go(self, data: st.DataObject) -> None:
        _, fd = self.thief.pop(data.draw(st.integers(0, len(self.thief) - 1)))
        self.pulled.discard(fd)
        os.close(fd)

    @rule()
    def time_passes(self) -> None:
        self._look_again()

    @invariant()
    def the_kernel_backs_what_is_reported(self) -> None:
        reported: dict[str, list[str]] = {}
        for i, host in enumerate(self.hosts):
            table = host.table()
            actor = host.lockspace()
            for resource, (mode, owners) in table.items():
                assert owners
                assert actor is not None
                reported.setdefault(resource, []).append(mode)
                fd = actor.fds[resource]
                assert lock_mode(fd) == mode, f"host {i}: {resource} {mode}, fd {lock_mode(fd)}"
                if self.unseen:
                    continue
                now = os.stat(self.space / resource, follow_symlinks=False)
                assert os.path.samestat(os.fstat(fd), now), (
                    f"host {i} holds {resource} on a file its name no longer names"
                )
            assert host.journal_view() == table, f"host {i}: journal != table"
        thief = self._thief_holds()
        for resource, fd in self.thief:
            assert fd in self.pulled or resource in thief, f"a daemon removed {resource}, held"
        for resource, modes in reported.items():
            if self.unseen:
                break
            assert len(modes) == 1 or set(modes) == {"shared"}, f"{resource}: {modes}"
            assert resource not in thief, f"{resource} reported and held by the thief"
        if self.space.exists():
            for name in os.listdir(self.space):
                if name == INDEX_NAME or name in reported or name in thief:
                    continue
                assert not locked_by_anyone(self.space / name), f"{name} locked, unreported"

    @invariant()
    def every_held_lease_fd_holds_its_lock(self) -> None:
        for host in self.hosts:
            actor = host.lockspace()
            for fd in actor.fds.values() if actor is not None else ():
                assert holds_lock(fd)

    def teardown(self) -> None:
        try:
            for host in self.hosts:
                host.harness.close()
        finally:
            for _, fd in self.thief:
                os.close(fd)
            self._tmp.cleanup()


TestLeaseFilesWorld = LeaseFilesWorld.TestCase
EXAMPLES = int(os.environ.get("LOCKD_FILES_EXAMPLES", "100"))
"""Schedules per run (about 2 s for 100); ``LOCKD_FILES_EXAMPLES=3000`` is the soak."""
TestLeaseFilesWorld.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=30, deadline=None
)
