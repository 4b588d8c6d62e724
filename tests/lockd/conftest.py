"""Fixtures for the lockd package's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lockd import config

USER = 4242
"""The uid a test plays, a user other than root; what it creates is still the test's own
(the effective uid, which ownership is checked against)."""


@pytest.fixture
def fallback_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A user who is not root and has no ``$XDG_RUNTIME_DIR`` (runuser, su, cron), whose
    ``/tmp/lockd-UID`` fallback is put under ``tmp_path``; returns that fallback's path."""
    monkeypatch.setattr(os, "getuid", lambda: USER)
    for name in ("XDG_RUNTIME_DIR", "LOCKD_SOCKET", "LOCKD_ADMIN_SOCKET", "LOCKD_AUTOSPAWN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config, "FALLBACK_RUNTIME_DIR", str(tmp_path / "lockd-{uid}"))
    return tmp_path / f"lockd-{USER}"


OTHER = 1234
"""Another user, who made a directory first."""

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user takes root")
