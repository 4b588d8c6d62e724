"""Fixtures for the lockd package's tests."""

from __future__ import annotations

import io
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lockd import config

USER = 4242
"""The uid a test plays, a user other than root; what it creates is still the test's own
(the effective uid, which ownership is checked against)."""


@pytest.fixture
def fallback_user(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user who is not root and has no ``$XDG_RUNTIME_DIR`` (runuser, su, cron), whose
    ``/tmp/lockd-UID`` fallback is put in a fresh directory; yields that fallback's path.

    The directory is made in /tmp, not under ``tmp_path``: the sockets bound in it must
    fit AF_UNIX's 108 bytes whatever ``TMPDIR`` the suite runs under."""
    monkeypatch.setattr(os, "getuid", lambda: USER)
    for name in ("XDG_RUNTIME_DIR", "LOCKD_SOCKET", "LOCKD_ADMIN_SOCKET", "LOCKD_AUTOSPAWN"):
        monkeypatch.delenv(name, raising=False)
    short = Path(tempfile.mkdtemp(prefix="lockd-fb-", dir="/tmp"))
    monkeypatch.setattr(config, "FALLBACK_RUNTIME_DIR", str(short / "lockd-{uid}"))
    try:
        yield short / f"lockd-{USER}"
    finally:
        shutil.rmtree(short, ignore_errors=True)


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
