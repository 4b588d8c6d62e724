"""The build's digest: the code decides it, and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

from lockd import __version__, build

REPO = Path(__file__).resolve().parents[2]


def _copy(to: Path) -> Path:
    for package in build.PACKAGES:
        shutil.copytree(REPO / package, to / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return to


def test_the_same_code_anywhere_has_the_same_digest_and_any_edit_another(tmp_path: Path) -> None:
    """Installed elsewhere, with compiled caches and data files beside it, the same
    code is the same build; one byte of it changed is another."""
    copy = _copy(tmp_path / "a")
    assert build.source_digest(copy) == build.source_digest(REPO)
    (copy / "lockd" / "__pycache__").mkdir(exist_ok=True)
    (copy / "lockd" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (copy / "lockd" / "notes.txt").write_text("not code")
    assert build.source_digest(copy) == build.source_digest(REPO)
    code = copy / "protocol" / "framing.py"
    code.write_text(code.read_text() + "\n")
    assert build.source_digest(copy) != build.source_digest(REPO)


def test_the_version_is_the_release_and_this_code_s_digest() -> None:
    assert build.version() == f"{__version__}+{build.source_digest(REPO)}"
