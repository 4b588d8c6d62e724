"""``lockd bench --scenarios recovery``: a real SIGKILL and restart, tiny sizes.

The scenario starts a daemon and owner processes of its own, so besides the
numbers these tests check the part that is easy to get wrong: nothing it
started outlives it, whether it finishes, fails or is interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lockd import bench_recovery

pytestmark = pytest.mark.e2e


def _session_members(sid: int) -> list[int]:
    """Pids of live processes in session ``sid`` (field 6 of /proc/PID/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members


def _children() -> set[int]:
    """Pids of this process's unreaped children, from every thread's list."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        text = Path(f"/proc/self/task/{task}/children").read_text()
        pids.update(int(pid) for pid in text.split())
    return pids


def test_recovery_scenario_reports_a_full_restart(tmp_path: Path) -> None:
    """--json has the documented keys with sane values, and needs no daemon of the user's."""
    env = {**os.environ, "LOCKD_SOCKET": str(tmp_path / "nobody-listens.sock")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockd", "bench", "--scenarios", "recovery", "--json",
         "--recovery-leases", "64", "--recovery-owners", "4", "--recovery-events", "500"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its session holds everything it starts
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    leftovers = _session_members(proc.pid)
    assert leftovers == [], f"bench left processes behind: {leftovers}"
    result = json.loads(out)
    assert "sequential" not in result  # only what was asked for
    assert "floor" not in result
    rec = result["recovery"]
    assert (rec["leases"], rec["owners"], rec["events"]) == (64, 4, 500)
    assert rec["held_again"] == rec["leases_listed"] == 64
    assert rec["lost"] == 0
    assert rec["released"] == 0  # every owner is alive: nothing to release
    assert rec["exec_to_first_answer_ms"] > 0
    assert rec["recovery_completed_ms"] > 0
    assert rec["first_start_ms"] > 0
    assert rec["exec_to_first_answer_ms"] >= rec["recovery_completed_ms"]  # serves after recovery
    assert 0 < rec["daemon_rss_mib"] < 256
    assert rec["daemon_threads"] >= 1
    assert rec["daemon_fds"] >= 64  # one per lease held
    assert rec["journal_bytes"] > 0


def test_bad_recovery_sizes_are_a_usage_error() -> None:
    """Zero owners cannot hold leases: refused before anything starts."""
    done = subprocess.run(
        [sys.executable, "-m", "lockd", "bench", "--scenarios", "recovery",
         "--recovery-owners", "0"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--recovery-owners" in done.stderr


@pytest.mark.parametrize("where", ["build", "restart"])
def test_an_interrupted_run_stops_every_process_it_started(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Ctrl-C while owners (and, at restart, the daemon) run: all are stopped and reaped."""
    before = _children()

    def interrupt(*_args: object, **_kwargs: object) -> None:
        assert len(_children() - before) >= (3 if where == "build" else 4)  # owners (+ daemon)
        raise KeyboardInterrupt

    if where == "build":
        monkeypatch.setattr(bench_recovery, "build", interrupt)
    else:
        monkeypatch.setattr(bench_recovery, "_recovery_completed", interrupt)
    with pytest.raises(KeyboardInterrupt):
        bench_recovery.run(leases=6, owners=3, events=20)
    assert _children() - before == set()
