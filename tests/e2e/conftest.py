"""Real daemons on temp paths, stopped (by pid) even when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lockd.journal_file import JournalFollower
from protocol.client import Client
from tests.e2e.fake_systemd import FakeServiceManager

LOCKD = [sys.executable, "-m", "lockd"]


class DaemonProcess:
    """One ``lockd serve`` subprocess and its paths."""

    def __init__(
        self,
        root: Path,
        lock_dir: Path,
        *extra: str,
        socket_dir: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.root = root
        self.socket = (socket_dir or root) / "lockd.sock"
        self.admin_socket = (socket_dir or root) / "lockd-admin.sock"
        self.lock_dir = lock_dir
        self.journal_dir = root / "journal"
        self.log = root / "daemon.log"
        self.extra = extra
        self.env_extra: dict[str, str] = {}
        """Extra environment for the next start (e.g. LOCKD_CRASH_AT)."""
        self.launcher: list[str] = []
        """A command the daemon runs under (e.g. the fake service manager's launcher)."""
        self.pass_fds: list[int] = []
        self.cwd = cwd
        """Where ``python -m lockd`` runs: a directory holding another build of the packages
        runs that build (the current directory comes first on its import path)."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for CLI subprocesses aimed at this daemon."""
        return {
            **os.environ,
            "LOCKD_SOCKET": str(self.socket),
            "LOCKD_ADMIN_SOCKET": str(self.admin_socket),
        }

    def start(self) -> DaemonProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.launcher, *LOCKD, "serve", "--verbose",
                    "--socket", str(self.socket),
                    "--admin-socket", str(self.admin_socket),
                    "--lock-dir", str(self.lock_dir),
                    "--journal-dir", str(self.journal_dir),
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env_extra},
                pass_fds=self.pass_fds,
                cwd=self.cwd,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited at start:\n{self.log.read_text()}")
            try:
                with Client(str(self.socket), timeout=2) as client:
                    client.call("status")
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"daemon did not serve in time:\n{self.log.read_text()}")

    def client(self, name: str = "test") -> Client:
        return Client(str(self.socket), name=name, timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def lockd(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run the CLI against this daemon."""
        return subprocess.run(
            [*LOCKD, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip


MakeDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[MakeDaemon]:
    """Factory: ``make_daemon(name, lock_dir=None, *extra_flags)`` starts a daemon."""
    started: list[DaemonProcess] = []

    def make(
        name: str = "d",
        lock_dir: Path | None = None,
        *extra: str,
        socket_dir: Path | None = None,
        cwd: Path | None = None,
    ) -> DaemonProcess:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        daemon = DaemonProcess(
            root, lock_dir or tmp_path / "locks", *extra, socket_dir=socket_dir, cwd=cwd
        )
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def counting_daemon(make_daemon: MakeDaemon, tmp_path: Path) -> DaemonProcess:
    """A daemon with ``shared_holds = "each"``: a shared lease asked for again by its owner
    is held again, until as many releases (virtlockd's rule)."""
    config = tmp_path / "each.toml"
    config.write_text('shared_holds = "each"\n')
    return make_daemon("each", None, "--config", str(config))


@pytest.fixture
def daemon(make_daemon: MakeDaemon) -> DaemonProcess:
    """One running daemon on temp paths."""
    return make_daemon()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeServiceManager]:
    """A fake service manager (notify socket, fd store); its stored fds closed at the end."""
    fm = FakeServiceManager(tmp_path)
    yield fm
    fm.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed (SIGKILL, by pid) at the end whatever happens."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``predicate()`` until true; fail the test with its last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def journaled(daemon: DaemonProcess, kind: str) -> int:
    """How many events of type ``kind`` (``"daemon-started"``) the daemon's journal holds,
    read in the test's process the way ``lockd events`` reads it. For polls: a poll of
    ``lockd events`` started a Python at every try, each a quarter of a CPU second taken
    from the daemon the test waits on."""
    follower = JournalFollower(str(daemon.journal_dir))
    count = 0
    try:
        while (entries := follower.poll()) or follower.more:
            count += sum(1 for entry in entries if kind == entry.event.TYPE)
    finally:
        follower.close()
    return count


_DROPPING_OWNER = """
import os, signal, sys, time, uuid
from lockd.journal_file import JournalFollower
from protocol.client import Client
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def term(*_):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
c = Client(sys.argv[1])
c.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": os.getpid()})
c.call("acquire", leases=[{"lockspace": "org.libvirt.lockd.files", "resource": "r1"}],
       autocreate=True)
print("held", flush=True)
if sys.argv[3] == "on-cue":
    sys.stdin.readline()
c.close()
time.sleep(60)
"""


def start_dropping_owner(
    daemon: DaemonProcess,
    children: list[subprocess.Popen[bytes]],
    *,
    ignore_sigterm: bool,
    on_cue: bool = False,
) -> subprocess.Popen[str]:
    """A VM that takes a lease over its own connection, then drops the connection and
    keeps running (printing "held", and "got SIGTERM" unless it ignores SIGTERM).
    ``on_cue``: it drops the connection only once a line is written to its stdin."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _DROPPING_OWNER, str(daemon.socket),
         "ignore" if ignore_sigterm else "report", "on-cue" if on_cue else "at-once"],
        stdin=subprocess.PIPE if on_cue else None,
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    children.append(owner)  # type: ignore[arg-type]
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "held"
    return owner
