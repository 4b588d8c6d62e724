"""SIGUSR1's check of the new program before it execs: what each answer means."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lockd import reexec
from lockd.reexec import TargetCheck, check_line, check_target

LOCKD = [sys.executable, "-m", "lockd", "serve"]


def test_this_build_reads_its_own_handoff_with_every_fd() -> None:
    assert TargetCheck.of(0, check_line() + "\n", "") == TargetCheck(True, own_fds=True)


def test_a_build_that_also_reads_later_versions_is_accepted() -> None:
    assert TargetCheck.of(0, "lockd-handoff 1,2 own-fds later-thing\n", "").ok


def test_a_build_that_no_longer_reads_this_version_is_refused() -> None:
    check = TargetCheck.of(0, "lockd-handoff 2 own-fds\n", "")
    assert check == TargetCheck(False, why="the new program reads handoff versions 2, not 1")


def test_a_build_from_before_the_check_is_exec_ed_without_the_daemon_s_own_fds() -> None:
    """argparse's answer to an option it does not know: such a build can start, and takes
    the journal lock and the pid file itself."""
    stderr = (
        "usage: lockd [-h] {serve,status} ...\n"
        "lockd: error: unrecognized arguments: --handoff-check\n"
    )
    check = TargetCheck.of(2, "", stderr)
    assert (check.ok, check.own_fds) == (True, False)
    assert "before --handoff-check" in check.why


@pytest.mark.parametrize(
    ("returncode", "stderr", "why"),
    [
        (2, "lockd serve: /etc/lockd.toml: line 3: expected '='\n",
         "lockd serve: /etc/lockd.toml: line 3: expected '='"),
        (1, "Traceback (most recent call last):\n  ...\nImportError: cannot import name 'x'\n",
         "ImportError: cannot import name 'x'"),
        (0, "", "exit status 0"),
        (-9, "", "exit status -9"),
    ],
)  # fmt: skip
def test_a_program_that_cannot_start_is_refused_with_its_last_words(
    returncode: int, stderr: str, why: str
) -> None:
    check = TargetCheck.of(returncode, "", stderr)
    assert check == TargetCheck(False, why=f"the new program fails its start-up check: {why}")


def test_the_real_program_passes_its_check_without_serving() -> None:
    """What SIGUSR1 runs: this build's ``serve --handoff-check`` (config read, daemon
    imported), with no socket bound and nothing written."""
    assert check_target(LOCKD) == TargetCheck(True, own_fds=True)


def test_a_bad_configuration_fails_the_real_check(tmp_path: Path) -> None:
    config = tmp_path / "lockd.toml"
    config.write_text("journal_sync = 'sometimes'\n")
    check = check_target([*LOCKD, "--config", str(config)])
    assert not check.ok
    assert "journal_sync" in check.why


def test_a_check_that_hangs_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reexec, "CHECK_SECONDS", 0.3)
    check = check_target([sys.executable, "-c", "import time; time.sleep(30)"])
    assert check == TargetCheck(
        False, why="the new program did not finish its start-up check within 0.3 s"
    )
