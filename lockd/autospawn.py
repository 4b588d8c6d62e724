"""Start a per-user daemon on first use, as virtlockd does for unprivileged sessions.

A user who is not root runs ``lockd run ... -- qemu ...`` on a fresh login:
no daemon is running, so the client starts one (``lockd serve`` on the
per-user default paths, detached, with an idle timeout so it goes away once
the last lease ends) and waits for it to answer. Root never auto-spawns:
system daemons belong to the service manager.

``LOCKD_AUTOSPAWN=0`` turns it off, ``=1`` turns it on for any user;
``LOCKD_AUTOSPAWN_TIMEOUT`` is the idle timeout in seconds (default 30).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from lockd.config import admin_socket_beside


def wanted() -> bool:
    """Whether a missing daemon should be started for this user."""
    setting = os.environ.get("LOCKD_AUTOSPAWN", "")
    if setting in ("0", "1"):
        return setting == "1"
    return os.getuid() != 0


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def spawn(path: str, wait: float = 15.0) -> None:
    """Start ``lockd serve`` for ``path`` in the background and wait until it accepts."""
    runtime = os.path.dirname(path)
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    # Beside the socket, as ``lockd serve`` would put it (the defaults are so placed too).
    admin = os.environ.get("LOCKD_ADMIN_SOCKET") or admin_socket_beside(path)
    timeout = os.environ.get("LOCKD_AUTOSPAWN_TIMEOUT", "30")
    log_path = os.path.join(runtime, "lockd.log")
    with open(log_path, "ab") as log:
        started = log.tell()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lockd", "serve", "--socket", path, "--admin-socket", admin,
             "--timeout", timeout],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + wait
    while not _answers(path):
        if daemon.poll() is not None:
            said = _lines_since(log_path, started)
            # Lost a race with another client's daemon, which serves once it has read
            # its journal: wait for that one. Otherwise it will not answer: say why now.
            # Any line, not the last: the winner shares the log and may have written since.
            if not any("in use" in line for line in said):
                last = said[-1] if said else "nothing logged"
                raise SpawnFailed(f"started lockd for {path}, but it exited ({last}); "
                                  f"see {log_path}")  # fmt: skip
        if time.monotonic() > deadline:
            raise SpawnFailed(f"started lockd for {path}, but it did not answer; see {log_path}")
        time.sleep(0.02)


class SpawnFailed(OSError):
    """The daemon started for a client did not come up."""


def _lines_since(log_path: str, since: int) -> list[str]:
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            return f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ["no log"]
