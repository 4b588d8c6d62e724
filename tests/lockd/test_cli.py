"""The lockd command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from protocol.names import lease_name_for_path


def _lockd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lockd", *args], capture_output=True, text=True, check=False
    )


def test_lease_name_prints_the_hash_and_normalised_path() -> None:
    """`lockd lease-name` shows which lease file protects a disk."""
    done = _lockd("lease-name", "/vm//a.img")
    assert done.returncode == 0
    assert done.stdout.split() == [lease_name_for_path("/vm/a.img"), "/vm/a.img"]


def test_lease_name_json() -> None:
    """--json prints one object per path, ready for jq."""
    done = _lockd("lease-name", "--json", "/a", "/b")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["path"] for r in rows] == ["/a", "/b"]
    assert rows[0]["lockspace"] == "org.libvirt.lockd.files"


def test_relative_path_is_a_usage_error() -> None:
    """A relative path is refused with exit code 2 and a message."""
    done = _lockd("lease-name", "rel/a.img")
    assert done.returncode == 2
    assert "relative" in done.stderr
