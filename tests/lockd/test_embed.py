"""lockd.embed without starting anything: what LockService takes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from actors.journal import SyncPolicy
from lockd.config import ConfigError
from lockd.embed import LockService


def test_options_are_converted_as_the_configuration_file_s(tmp_path: Path) -> None:
    """``journal_sync="batch"``, as the docstring shows it, is the policy, not a string that
    broke the start."""
    service = LockService(
        lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"), journal_sync="batch"
    )
    assert service.config.journal_sync is SyncPolicy.BATCH


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"journal_sync": "sometimes"}, "journal_sync must be one of none | batch | always"),
        ({"fence_grace": -5}, "fence_grace must be a number >= 0"),
        ({"journal_synk": "always"}, "unknown key 'journal_synk' (did you mean 'journal_sync'?)"),
        ({"lockspaces": {"../x": "/srv"}}, "invalid lockspace name"),
    ],
)
def test_a_wrong_option_is_refused_at_once(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    """Each option is checked as the daemon checks its file, before anything starts."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        LockService(lock_dir=str(tmp_path / "l"), journal_dir=str(tmp_path / "j"), **options)


def test_relative_directories_are_refused(tmp_path: Path) -> None:
    """As in the configuration file: a relative path would move with the working directory."""
    with pytest.raises(ConfigError, match="lock_dir must be an absolute path"):
        LockService(lock_dir="locks", journal_dir=str(tmp_path / "j"))
