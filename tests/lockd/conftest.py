"""Fixtures for the lockd package's tests."""

from __future__ import annotations

import io
import os
import socket
import sys
import traceback
from collections.abc import Callable
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


NOBODY = 65534
"""The uid :func:`as_a_user` plays when the tests run as root."""


def as_a_user(action: Callable[[], int]) -> tuple[int, str]:
    """Run ``action`` in a forked child that is not root: uid 65534 when the tests run as
    root, else the tests' own user. Returns what it returned and what it wrote on stderr."""
    here, there = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            here.close()
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            sys.stderr = io.StringIO()
            try:
                status = action()
            except BaseException:  # noqa: BLE001 - reported to the test, which fails
                status = -1
                traceback.print_exc()
            there.sendall(f"{status}\n{sys.stderr.getvalue()}".encode())
        finally:
            os._exit(0)
    there.close()
    try:
        here.settimeout(30)
        data = b""
        while chunk := here.recv(65536):
            data += chunk
    finally:
        here.close()
        os.waitpid(pid, 0)
    said, _, err = data.decode().partition("\n")
    return int(said), err
