"""A daemon of this build started on the journal an earlier build left (tests/compat):
an upgrade by restart, or the start after an upgrade's crash."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from protocol.names import FILES_LOCKSPACE, lease_name_for_path
from tests.e2e.conftest import MakeDaemon
from tests.e2e.invariants import check, listed
from tests.e2e.test_daemon import events, lease_file, start_run
from tests.e2e.test_fd_store import kill_daemon
from tests.lockd.test_compat import EARLIER
from tests.lockprobe import probe

pytestmark = pytest.mark.e2e


def test_a_start_on_an_earlier_builds_journal_releases_its_gone_owners_and_goes_on(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The earlier build was killed holding two leases whose VMs are gone: this build
    replays its journal, releases both as owner-gone, and writes on after its seq 39;
    a lease taken then is held again after a SIGKILL, from the mixed journal."""
    shutil.copytree(EARLIER / "journal", tmp_path / "old" / "journal")
    (tmp_path / "old" / "journal").chmod(0o700)
    daemon = make_daemon("old")
    started = events(daemon, "--type", "daemon-started")
    assert [e["seq"] for e in started][-1] == 40
    (recovered,) = [e for e in events(daemon, "--type", "recovery-completed") if e["seq"] > 40]
    assert (recovered["held"], recovered["released"], recovered["lost"]) == (0, 2, 0)
    gone = [e for e in events(daemon, "--type", "lease-released") if e["seq"] > 40]
    assert sorted(e["owner"]["name"] for e in gone) == ["vm-a", "vm-b"]
    assert {e["reason"] for e in gone} == {"owner-gone"}
    assert listed(daemon) == {}
    vm = start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    kill_daemon(daemon)
    daemon.start()
    assert probe(lease_file(daemon, "/vm/a.img"), "ofd") == "busy"
    assert listed(daemon) == {
        (FILES_LOCKSPACE, lease_name_for_path("/vm/a.img")): ("exclusive", (vm.pid,))
    }
    assert daemon.lockd("journal-check", "--journal-dir", str(daemon.journal_dir)).returncode == 0
    check(daemon)
