"""The example auditor's feed (contrib/examples/audit_feed.py): every event once, in
order, while the daemon is SIGKILLed and started again and re-executes itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import DaemonProcess, wait_for
from tests.e2e.test_daemon import events
from tests.e2e.test_fd_store import kill_daemon

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "contrib" / "examples" / "audit_feed.py"


def _journal_some(daemon: DaemonProcess, tag: str, count: int = 5) -> None:
    with daemon.client("maker") as client:
        for i in range(count):
            client.call("create-lockspace", lockspace=f"{tag}-{i}")


def test_the_audit_feed_misses_nothing_across_a_crash_and_a_reexec(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    _journal_some(daemon, "before")  # history, from before the feed starts
    state, out = tmp_path / "feed.seq", tmp_path / "feed.out"
    with open(out, "wb") as sink:
        feed = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--socket", str(daemon.socket),
             "--state", str(state), "--since", "1"],
            stdout=sink, stderr=subprocess.PIPE,
        )  # fmt: skip
    children.append(feed)

    def caught_up() -> bool:
        return state.exists() and state.read_text() == str(events(daemon)[-1]["seq"])

    wait_for(caught_up)
    kill_daemon(daemon)  # the feed's connection ends; it connects again
    daemon.start()  # journals its start and recovery before the feed is back
    _journal_some(daemon, "after-crash")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)  # the connection is handed over
    wait_for(lambda: len(events(daemon, "--type", "daemon-started")) == 3)
    _journal_some(daemon, "after-reexec")
    wait_for(caught_up)
    (listed,) = [
        line for line in daemon.lockd("clients").stdout.splitlines() if "subscribed" in line
    ]
    assert f"pid={feed.pid} " in listed  # the operator can tell the feed is connected
    feed.kill()
    _, stderr = feed.communicate()
    printed = [json.loads(line) for line in out.read_text().splitlines()]
    journal = events(daemon)
    assert (
        [e["seq"] for e in printed]
        == [e["seq"] for e in journal]
        == list(range(1, len(journal) + 1))
    )
    assert [e["type"] for e in printed] == [e["type"] for e in journal]
    assert b"connecting again" in stderr  # it did lose the daemon once
