"""Crash points: the LOCKD_CRASH_AT spec, and the docs' table naming every point."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actors.faults import POINTS, parse_spec


def test_a_spec_names_a_point_and_which_time_it_fires() -> None:
    """Unset is nothing armed; a bare point fires the first time; ``:n`` the n-th."""
    assert parse_spec("") == ("", 0)
    assert parse_spec("acquire-locked") == ("acquire-locked", 1)
    assert parse_spec("fence-journaled:2") == ("fence-journaled", 2)


@pytest.mark.parametrize(
    "spec", ["acquire", "acquire-locked:0", "acquire-locked:-1", "acquire-locked:²", "x:1", ":1"]
)
def test_a_spec_that_could_never_fire_is_refused(spec: str) -> None:
    """A point lockd lacks, or a count that is not a whole number from 1."""
    with pytest.raises(ValueError, match="LOCKD_CRASH_AT="):
        parse_spec(spec)


def test_the_recovery_docs_table_names_every_crash_point_and_no_other() -> None:
    """docs/recovery.md's table of how a test reaches each point lists exactly POINTS,
    so a point added, renamed or removed shows up there (a test author's only list)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "recovery.md").read_text()
    table = doc.split("How a test brings the daemon to each point", 1)[1].split("\n\n")[1]
    rows = [line.split("|")[1] for line in table.splitlines()[2:]]
    named = [name for row in rows for name in re.findall(r"`([a-z-]+)`", row)]
    assert sorted(named) == sorted(POINTS)
