"""The embedding examples of README.md and docs/embedding.md run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def examples() -> list[tuple[str, str]]:
    """(where, code) of every ``python`` block that uses lockd.embed."""
    found = []
    for page in ("README.md", "docs/embedding.md"):
        text = (ROOT / page).read_text()
        for n, code in enumerate(re.findall(r"```python\n(.*?)```", text, re.DOTALL)):
            if "lockd.embed" in code:
                found.append((f"{page}#{n}", code))
    return found


def test_each_page_has_its_example() -> None:
    """README.md and docs/embedding.md each show one (else the test below checks nothing)."""
    assert sorted(where.partition("#")[0] for where, _ in examples()) == [
        "README.md", "docs/embedding.md"
    ]  # fmt: skip


@pytest.mark.parametrize(("where", "code"), examples(), ids=[w for w, _ in examples()])
def test_the_example_runs_as_written(tmp_path: Path, where: str, code: str) -> None:
    """Copied into a file of a new user's, outside the checkout, it runs and says what its
    comment says."""
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, (where, done.stderr)
    assert done.stdout == "vm1\n", where
