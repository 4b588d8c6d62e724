"""`lockd verify`: a crash test's invariants checked from outside, with the CLI alone."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from lockd import verify as checks
from protocol.names import FILES_LOCKSPACE, lease_name_for_path
from tests.e2e.conftest import LOCKD, DaemonProcess, MakeDaemon
from tests.e2e.invariants import _view
from tests.e2e.test_daemon import lease_file, start_run
from tests.e2e.test_recovery import crash, restart, steal

pytestmark = pytest.mark.e2e


def verify(*daemons: DaemonProcess, journals: bool = True) -> subprocess.CompletedProcess[str]:
    args = []
    for daemon in daemons:
        args += ["--socket", str(daemon.socket)]
        if journals:
            args += ["--journal-dir", str(daemon.journal_dir)]
    return subprocess.run(
        [*LOCKD, "verify", "--json", *args], capture_output=True, text=True, timeout=60, check=False
    )


def two_hosts(make_daemon: MakeDaemon, tmp_path: Path) -> tuple[DaemonProcess, DaemonProcess]:
    """Two daemons on one lock directory, each with its own journal and sockets."""
    lock_dir = tmp_path / "shared-locks"
    return (
        make_daemon("host-a", lock_dir, socket_dir=tmp_path / "host-a"),
        make_daemon("host-b", lock_dir, socket_dir=tmp_path / "host-b"),
    )


def test_two_hosts_killed_and_restarted_verify_clean(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Two daemons on one lock dir hold exclusive and shared leases; one is SIGKILLed, a
    VM of it dies while it is down, it starts again: `lockd verify` over both finds
    every reported lease locked in its mode, nothing else locked, the journals agreeing."""
    a, b = two_hosts(make_daemon, tmp_path)
    start_run(a, children, "--disk", "/vm/a.img", "--name", "vm-a")
    gone = start_run(a, children, "--disk", "/vm/gone.img", "--name", "vm-gone")
    start_run(a, children, "--disk", "/vm/base.img:shared", "--name", "vm-a2")
    start_run(b, children, "--disk", "/vm/base.img:shared", "--name", "vm-b")
    start_run(b, children, "--disk", "/vm/b.img", "--name", "vm-b2")
    crash(a)
    gone.kill()
    gone.wait()
    restart(a)
    done = verify(a, b)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["findings"] == []
    assert report["checked"] == 3  # a.img, base.img (both daemons), b.img
    assert [d["socket"] for d in report["daemons"]] == [str(a.socket), str(b.socket)]
    plain = subprocess.run(
        [*LOCKD, "verify", "--socket", str(a.socket), "--journal-dir", str(a.journal_dir),
         "--socket", str(b.socket), "--journal-dir", str(b.journal_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert plain.returncode == 0
    assert plain.stdout.startswith("lockd verify: ok: 3 lease files held by 2 daemon(s)")


def test_without_journal_dirs_the_daemons_own_are_compared(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """`lockd verify` with sockets alone compares each daemon's journal too: the one
    its `status` names (where an operator looks for it, as well)."""
    a, b = two_hosts(make_daemon, tmp_path)
    start_run(a, children, "--disk", "/vm/a.img", "--name", "vm-a")
    start_run(b, children, "--disk", "/vm/b.img", "--name", "vm-b")
    status = json.loads(a.lockd("status", "--json").stdout)
    assert status["journal"]["dir"] == str(a.journal_dir.resolve())
    assert f", in {a.journal_dir.resolve()}" in a.lockd("status").stdout
    done = verify(a, b, journals=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert [d["journal_dir"] for d in report["daemons"]] == [
        str(a.journal_dir.resolve()), str(b.journal_dir.resolve())
    ]  # fmt: skip
    plain = subprocess.run(
        [*LOCKD, "verify", "--socket", str(a.socket), "--socket", str(b.socket)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert plain.stdout.endswith("against the kernel and journals\n"), plain.stdout


def test_a_lock_no_daemon_reports_is_a_finding(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Checking one of two hosts alone, the other's lease is locked but unreported; so is
    a lease file a thief took while its daemon was down. Each is named, exit 1."""
    a, b = two_hosts(make_daemon, tmp_path)
    vm = start_run(a, children, "--disk", "/vm/a.img", "--name", "vm-a")
    start_run(b, children, "--disk", "/vm/b.img", "--name", "vm-b")
    done = verify(a)
    assert done.returncode == 1
    (finding,) = json.loads(done.stdout)["findings"]
    assert finding["check"] == "not-reported"
    assert finding["resource"] == lease_name_for_path("/vm/b.img")
    assert finding["path"] == str(lease_file(b, "/vm/b.img"))
    assert verify(a, b).returncode == 0
    crash(a)
    steal(lease_file(a, "/vm/a.img"), children)
    restart(a)  # a.img reported lost, its VM fenced: no daemon reports it now
    assert vm.wait(10) == -signal.SIGTERM
    findings = json.loads(verify(a, b).stdout)["findings"]
    assert [(f["check"], f["resource"]) for f in findings] == [
        ("not-reported", lease_name_for_path("/vm/a.img"))
    ]


def test_a_journal_not_the_daemons_is_a_finding(
    make_daemon: MakeDaemon, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Given another daemon's journal directory, the replay cannot match: said, exit 1."""
    a, b = two_hosts(make_daemon, tmp_path)
    start_run(a, children, "--disk", "/vm/a.img", "--name", "vm-a")
    done = subprocess.run(
        [*LOCKD, "verify", "--socket", str(a.socket), "--journal-dir", str(b.journal_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.startswith("journal-differs: ")
    assert "is it this daemon's journal?" in done.stdout
    assert "lockd verify: 1 finding(s)" in done.stderr
    # An empty directory (a mistyped path made by the test) is a finding too, not a
    # traceback from reading no segments.
    empty = tmp_path / "empty-journal"
    empty.mkdir()
    done = subprocess.run(
        [*LOCKD, "verify", "--socket", str(a.socket), "--journal-dir", str(empty)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("journal-differs: ")


def test_verify_usage_errors_and_unreachable_daemons(tmp_path: Path) -> None:
    """Journal directories not one per socket: usage (2); no daemon there: 69."""
    done = subprocess.run(
        [*LOCKD, "verify", "--socket", "a.sock", "--socket", "b.sock", "--journal-dir", "j"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "2 --socket and 1 --journal-dir" in done.stderr
    done = subprocess.run(
        [*LOCKD, "verify", "--json", "--socket", str(tmp_path / "none.sock")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 69
    assert json.loads(done.stdout)["error"]["exit"] == 69


def test_a_hold_the_journal_counts_and_the_daemon_does_not_is_a_finding(
    counting_daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """Under ``shared_holds = "each"`` the journal's replay counts holds: a report that
    lists the owner once where the journal says twice is ``journal-differs``, naming the
    holds (a pid list per owner missed it)."""
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    disk = {"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path("/vm/base.img")}
    with counting_daemon.client() as client:
        client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1,
                                       "pid": vm.pid})  # fmt: skip
        for _ in range(2):
            client.call("acquire", leases=[{**disk, "shared": True}], autocreate=True)
    view = _view(counting_daemon)
    assert checks.verify([view])[1] == []
    for owner in view.leases[0]["owners"]:
        assert owner.pop("holds") == 2
    findings = checks.verify([view])[1]
    assert [f.check for f in findings] == ["journal-differs"]
    assert f"pid {vm.pid} (2 holds)" in findings[0].message
