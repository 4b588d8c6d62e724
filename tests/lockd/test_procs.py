"""/proc and pidfd adapters, on real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from actors.model import Owner
from lockd import procs


def test_start_time_and_uid_of_a_live_process() -> None:
    started = procs.start_time(os.getpid())
    assert isinstance(started, int)
    assert started > 0
    assert procs.uid_of(os.getpid()) == os.getuid()
    assert procs.start_time(2**22 + 11) is None
    assert procs.uid_of(2**22 + 11) is None


def test_comm_with_spaces_and_parens_does_not_confuse_the_parser(tmp_path: Path) -> None:
    """Field 22 is found after the last ')', whatever the command name holds."""
    odd = tmp_path / "a) 1 2 (b"
    shutil.copy("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            assert ") 1 2 (" in f.read()
        with open(f"/proc/{os.getpid()}/stat") as f:
            ours = int(f.read().rsplit(")", 1)[1].split()[19])
        theirs = procs.start_time(proc.pid)
        assert theirs is not None
        assert theirs >= ours
    finally:
        proc.kill()
        proc.wait()


def test_watch_signal_and_exit() -> None:
    """The pidfd becomes readable at exit; signals never reach a process with another start time."""
    proc = subprocess.Popen(["sleep", "30"])
    table = procs.ProcTable()
    started = procs.start_time(proc.pid)
    assert started is not None
    owner = Owner(uuid.uuid4().bytes, "vm", 1, proc.pid, started)
    impostor = Owner(uuid.uuid4().bytes, "vm", 1, proc.pid, started + 1)
    fd = table.open_watch(owner)
    assert fd is not None
    try:
        assert table.open_watch(impostor) is None
        assert not table.is_gone(owner)
        assert table.is_gone(impostor)
        assert table.signal(impostor, signal.SIGTERM) is False
        assert proc.poll() is None
        assert table.signal(owner, signal.SIGTERM) is True
        proc.wait(5)
        deadline = time.monotonic() + 5
        import select

        assert select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0] == [fd]
        assert table.is_gone(owner)
        assert table.signal(owner, signal.SIGKILL) is False
    finally:
        table.close_watch(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
