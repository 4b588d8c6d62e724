"""SIGUSR1's check of the new program before it execs: what each answer means."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest

from actors.runtime import Dispatcher
from lockd import reexec
from lockd.config import Config
from lockd.reexec import (
    BEFORE_CHECK,
    LOCKSPACES,
    PATH_KEYS,
    TargetCheck,
    check_output,
    check_target,
    moved_paths,
    paths_of,
)

LOCKD = [sys.executable, "-m", "lockd", "serve"]


PATHS = {"socket": "/run/l.sock", "admin_socket": "/run/a.sock", "lock_dir": "/locks",
         "journal_dir": "/journal", "pid_file": None}  # fmt: skip


def test_this_build_reads_its_own_handoff_with_every_fd_and_says_its_paths() -> None:
    config = Config(
        socket="/run/l.sock", admin_socket="/run/a.sock", lock_dir="/locks", journal_dir="/journal"
    )
    assert TargetCheck.of(0, check_output(config) + "\n", "") == TargetCheck(
        True, own_fds=True, paths={**PATHS, LOCKSPACES: {}}
    )


def test_a_lockspace_served_from_another_directory_is_a_moved_path() -> None:
    """``[lockspaces]`` directories hold lease files: the new program would take the
    handed fds (locks on the old files) for leases in the new directory."""
    config = Config(
        socket="/run/l.sock", admin_socket="/run/a.sock", lock_dir="/locks",
        journal_dir="/journal", lockspaces={"pool": "/srv/pool"},
    )  # fmt: skip
    running = paths_of(config)
    assert moved_paths(running, paths_of(config)) == []
    for changed, said in (
        ({"pool": "/srv/elsewhere"}, "lockspaces.pool (/srv/pool -> /srv/elsewhere)"),
        ({}, "lockspaces.pool (/srv/pool -> None)"),
        ({"pool": "/srv/pool", "new": "/srv/new"}, "lockspaces.new (None -> /srv/new)"),
    ):
        assert moved_paths(running, paths_of(attrs.evolve(config, lockspaces=changed))) == [said]
    # A build from before it does not say its lockspaces: not compared on them.
    assert moved_paths(running, {key: running[key] for key in PATH_KEYS}) == []


def test_a_build_that_also_reads_later_versions_is_accepted() -> None:
    stdout = f"lockd-handoff 1,2 own-fds later-thing\nlockd-paths {json.dumps(PATHS)}\n"
    assert TargetCheck.of(0, stdout, "").ok


def test_a_build_that_no_longer_reads_this_version_is_refused() -> None:
    check = TargetCheck.of(0, f"lockd-handoff 2 own-fds\nlockd-paths {json.dumps(PATHS)}", "")
    assert check == TargetCheck(False, why="the new program reads handoff versions 2, not 1")


def test_a_build_that_does_not_say_its_paths_is_refused() -> None:
    assert not TargetCheck.of(0, "lockd-handoff 1 own-fds\n", "").ok


ARGPARSE = "usage: lockd [-h] {serve,status} ...\nlockd: error: unrecognized arguments: "


def test_a_build_from_before_the_check_is_asked_for_check_config_instead() -> None:
    """argparse's answer to an option it does not know: such a build is asked for
    ``--check-config``, and exec'd without the daemon's own fds if that passes."""
    assert TargetCheck.of(2, "", ARGPARSE + "--handoff-check\n").why == BEFORE_CHECK
    for form in (repr, json.dumps):  # those builds print reprs; this one JSON
        printed = "configuration ok (/etc/lockd.toml)\n" + "".join(
            f"  {k} = {form(v)}\n" for k, v in {**PATHS, "fence_grace": 30.0}.items()
        )
        assert TargetCheck.before_check(0, printed, "") == TargetCheck(
            True, own_fds=False, why=BEFORE_CHECK, paths=PATHS
        )


def test_check_config_s_toml_is_read_as_a_build_from_before_the_check_would_print_it() -> None:
    """This build prints TOML (an unset pid_file as a comment, lockspaces as an inline
    table); the downgrade path reads it as well as the reprs and JSON of earlier ones."""
    printed = (
        "# configuration ok (/etc/lockd.toml)\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in PATHS.items() if v is not None)
        + '# pid_file is not set\nlockspaces = { "org.example.san" = "/srv/san" }\n'
    )
    assert TargetCheck.before_check(0, printed, "") == TargetCheck(
        True, own_fds=False, why=BEFORE_CHECK,
        paths={**PATHS, "lockspaces": {"org.example.san": "/srv/san"}},
    )  # fmt: skip


def test_a_build_from_before_the_check_with_a_broken_configuration_is_refused() -> None:
    check = TargetCheck.before_check(2, "", "lockd serve: /etc/lockd.toml: bad value\n")
    assert not check.ok
    assert check.why.endswith("fails --check-config: lockd serve: /etc/lockd.toml: bad value")
    assert not TargetCheck.before_check(2, "", ARGPARSE + "--check-config\n").ok


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


def test_the_real_program_passes_its_check_without_serving(tmp_path: Path) -> None:
    """What SIGUSR1 runs: this build's ``serve --handoff-check`` (config read, daemon
    imported), with no socket bound and nothing written; flags resolved as serve does."""
    check = check_target([*LOCKD, "--journal-dir", "j", "--lock-dir", str(tmp_path)])
    assert (check.ok, check.own_fds) == (True, True)
    assert set(check.paths) == {*PATH_KEYS, LOCKSPACES}
    assert check.paths["journal_dir"] == os.path.abspath("j")
    assert check.paths["lock_dir"] == str(tmp_path)
    assert not os.path.exists("j")


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


def test_an_answer_that_cannot_be_read_abandons_the_re_exec_rather_than_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check runs on a thread: an exception there would leave the re-exec waiting for
    an answer that never comes, and every later SIGUSR1 ignored."""
    garbled = "lockd-handoff 1 own-fds\nlockd-paths {not json\n"
    monkeypatch.setattr(
        reexec, "_run", lambda argv, _spawn: subprocess.CompletedProcess(argv, 0, garbled, "")
    )
    check = reexec._check_or_say_why(LOCKD)
    assert not check.ok
    assert "could not be read" in check.why


def test_the_check_process_is_started_on_the_loop_and_read_off_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between its fork and its exec a child holds a copy of every fd of the daemon, and
    with it a share of each OFD lock: a lease closed meanwhile stays locked after its
    release was answered, and the index lock refuses the next create as busy. Started
    on the loop, no request runs in that window (``Popen`` returns once the child has
    exec'd); the wait for its answer is the check thread's."""
    dispatcher = Dispatcher()
    dispatcher.start("loop")
    started_on: list[str] = []
    real_popen = reexec._popen

    def popen(argv: list[str]) -> Any:
        started_on.append(threading.current_thread().name)
        return real_popen(argv)

    monkeypatch.setattr(reexec, "_popen", popen)
    answered: list[TargetCheck] = []
    try:
        thread = threading.Thread(
            target=lambda: answered.append(
                reexec._check_or_say_why(LOCKD, reexec.spawn_on(dispatcher))
            ),
            name="check",
        )
        thread.start()
        thread.join(30)
    finally:
        dispatcher.stop()
        dispatcher.close()
    assert started_on == ["loop"]
    assert answered == [TargetCheck(True, own_fds=True, paths=answered[0].paths)]


def test_a_check_the_loop_cannot_start_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that does not run the start in time (stopped, or stuck): the re-exec is
    abandoned with the reason, and the start, should the loop run it later, is dropped."""
    monkeypatch.setattr(reexec, "CHECK_SECONDS", 0.2)
    dispatcher = Dispatcher()  # never run
    try:
        check = check_target(LOCKD, reexec.spawn_on(dispatcher))
        assert not check.ok
        assert "did not start it in time" in check.why
        monkeypatch.setattr(reexec, "_popen", lambda argv: pytest.fail("started late"))
        dispatcher.run_until_idle()
    finally:
        dispatcher.close()
