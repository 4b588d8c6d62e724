"""Under a service manager, lease fds live in its fd store: a crash keeps every lock held."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.names import FILES_LOCKSPACE, lease_name_for_path
from tests.e2e.conftest import DaemonProcess, MakeDaemon, wait_for
from tests.e2e.fake_systemd import FakeServiceManager
from tests.e2e.invariants import check, listed
from tests.e2e.test_daemon import events, lease_file, start_run
from tests.lockprobe import probe

pytestmark = pytest.mark.e2e


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeServiceManager]:
    fm = FakeServiceManager(tmp_path)
    yield fm
    fm.close()


def start_under(daemon: DaemonProcess, fm: FakeServiceManager, **extra: int) -> None:
    env, fds = fm.env(extra)
    daemon.env_extra = env
    daemon.pass_fds = fds
    daemon.launcher = fm.launcher()
    daemon.start()


def test_a_crash_keeps_the_lock_held_through_the_fd_store(
    make_daemon: MakeDaemon,
    manager: FakeServiceManager,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    daemon = make_daemon("sd")
    daemon.stop()
    start_under(daemon, manager)
    assert manager.ready_count() == 1
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    wait_for(lambda: len(manager.stored_names()) == 1)
    path = lease_file(daemon, "/vm/a.img")

    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    # The daemon is dead, and the disk is still locked: the manager holds the fd.
    assert probe(path, "ofd") == "busy"
    assert probe(path, "classic") == "busy"

    junk = tmp_path / "junk"
    junk.touch()
    stale = os.open(junk, os.O_RDWR)
    other = os.open(junk, os.O_RDWR)
    start_under(daemon, manager, **{"lease-0000": stale, "bogus": other})
    wait_for(lambda: manager.ready_count() == 2)
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm.pid,))
    }
    assert "lease-0000" not in manager.stored_names()  # stale: removed from the store
    log = daemon.log.read_text()
    assert "refusing an fd named 'bogus'" in log
    assert events(daemon, "--type", "recovery-completed")[-1]["held"] == 1
    check(daemon)

    vm.kill()
    vm.wait()
    wait_for(lambda: not manager.stored_names())  # FDSTOREREMOVE on release
    wait_for(lambda: not path.exists())
    check(daemon)
    os.close(stale)
    os.close(other)
