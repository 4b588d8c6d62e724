"""Start a per-user daemon on first use, as virtlockd does for unprivileged sessions.

A user who is not root runs ``lockd run ... -- qemu ...`` on a fresh login:
no daemon is running, so the client starts one (``lockd serve`` on the
per-user default paths, detached, with an idle timeout so it goes away once
the last lease ends) and waits for it to answer. Root never auto-spawns:
system daemons belong to the service manager.

``LOCKD_AUTOSPAWN=0`` turns it off, ``=1`` turns it on for any user;
``LOCKD_AUTOSPAWN_TIMEOUT`` is the idle timeout in seconds (default 30).

The daemon's output goes to ``lockd.log`` beside the socket. In the per-user
default directory (``/tmp/lockd-UID/lockd`` without ``$XDG_RUNTIME_DIR``) that
directory is created 0700 and refused unless it is the user's own
(:func:`lockd.config.secure_runtime_dir`); the log itself is opened without
following a symbolic link and refused unless it is a plain file of the user's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lockd.config import (
    admin_socket_beside,
    default_paths,
    make_dirs,
    open_own_file,
    secure_runtime_dir,
)

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
"""Where ``python -m lockd`` finds this very package, installed or not: a daemon this
client starts runs there, not in the user's current directory, whose own ``lockd``
(a checkout cloned as ``~/lockd``, say) would come first on its import path."""


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
    """Start ``lockd serve`` for ``path`` in the background and wait until it accepts.

    The daemon runs in :data:`PACKAGE_ROOT`, not in the current directory, so every
    path it is given is made absolute here first: a relative ``--socket`` (or
    ``$LOCKD_ADMIN_SOCKET``, ``$LOCKD_CONFIG``) meant this directory, and the daemon
    bound its socket under the package's directory while the client waited here for
    one that never answered.
    """
    path = os.path.abspath(path)
    runtime = os.path.dirname(path)
    if not secure_runtime_dir(path, create=True):
        make_dirs(runtime, 0o700)  # the user's own choice of place
    # Beside the socket, as ``lockd serve`` would put it (the defaults are so placed too).
    admin = os.path.abspath(os.environ.get("LOCKD_ADMIN_SOCKET") or admin_socket_beside(path))
    env = dict(os.environ)
    if env.get("LOCKD_CONFIG"):
        env["LOCKD_CONFIG"] = os.path.abspath(env["LOCKD_CONFIG"])
    timeout = os.environ.get("LOCKD_AUTOSPAWN_TIMEOUT", "30")
    log_path = os.path.join(runtime, "lockd.log")
    log = open_log(log_path)
    try:
        started = os.fstat(log).st_size
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lockd", "serve", "--socket", path, "--admin-socket", admin,
             "--timeout", timeout],
            cwd=PACKAGE_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + wait
        in_use = None
        while not _answers(path):
            if in_use is None and daemon.poll() is not None:
                said = _lines_since(log, started)
                # Lost a race with another client's daemon, which serves once it has read
                # its journal: wait for that one. Otherwise it will not answer: say why now.
                # Any line, not the last: the winner shares the log and may have written since.
                in_use = next((line for line in said if "in use by another lockd" in line), None)
                serving = _serving(in_use)
                if in_use is not None and serving is not None and serving != path:
                    # The journal's daemon says which socket it serves: not this one, so
                    # no race's winner will answer here (LOCKD_SOCKET mistyped, or
                    # XDG_RUNTIME_DIR not the same as the daemon's).
                    raise SpawnFailed(
                        f"started lockd for {path}, but it exited: {in_use.strip()}; none "
                        f"serves {path}{_another_socket(path, serving)}"
                    )
                if in_use is None:
                    last = said[-1] if said else "nothing logged"
                    raise SpawnFailed(f"started lockd for {path}, but it exited ({last}); "
                                      f"see {log_path}")  # fmt: skip
            if time.monotonic() > deadline:
                # The journal's daemon serves another socket (LOCKD_SOCKET mistyped?): say so,
                # not only that nothing answered.
                why = f" (it exited: {in_use}, and none serves this socket)" if in_use else ""
                raise SpawnFailed(
                    f"started lockd for {path}, but it did not answer{why}; see {log_path}"
                )
            time.sleep(0.02)
    finally:
        os.close(log)


def open_log(path: str) -> int:
    """The spawned daemon's log, opened to append to and read back (mode 0600 if new).

    Never through a symbolic link (O_NOFOLLOW), and only a plain file of this user's
    with no other link: a file planted by another user is refused, not written to.
    An older lockd's log (0644) is narrowed to 0600, as it is the user's own.
    """
    remedy = "lockd writes its log only to a file of its own: remove it"
    fd = open_own_file(path, os.O_RDWR | os.O_APPEND, 0o600, what="log", remedy=remedy)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _another_socket(path: str, serving: str) -> str:
    """Why the journal's daemon serves ``serving``, not ``path``, and what to do. The
    user's default socket depends on ``$XDG_RUNTIME_DIR``, which a desktop login sets and
    su, cron and ssh without pam_systemd do not: a daemon started in one was not found
    from the other, and the client asked whether LOCKD_SOCKET, never set, was mistyped."""
    if os.environ.get("LOCKD_SOCKET") or path != default_paths()["socket"]:
        return " (is LOCKD_SOCKET or --socket mistyped?)"
    here = os.environ.get("XDG_RUNTIME_DIR")
    return (
        f", the default socket with XDG_RUNTIME_DIR {f'={here}' if here else 'unset'}, and "
        f"that lockd was started with another: set LOCKD_SOCKET={serving} to use it"
    )


def served_elsewhere(path: str) -> str | None:
    """Why no daemon answers at ``path`` when a running lockd holds this user's journal
    (``$LOCKD_CONFIG``'s, or the default) and serves another socket, and how to reach it;
    None when none does, or it cannot be told (no journal, an embedded or older lockd).
    A start says so through the daemon it spawns ("in use by another lockd"); a client
    that spawns none (``lockd status``) said only "is `lockd serve` running?"."""
    from lockd.config import ConfigError, load
    from lockd.journal_file import LOCK_FILE, journal_holder

    try:
        journal = load(os.environ.get("LOCKD_CONFIG"), {}).journal_dir
    except (ConfigError, OSError):
        journal = default_paths()["journal_dir"]
    holder = journal_holder(journal)
    serving = _serving(holder)
    if holder is None or serving is None or serving == os.path.abspath(path):
        return None
    pid = int(holder.split(",", 1)[0].removeprefix("pid "))
    if not _has_open(pid, os.path.join(journal, LOCK_FILE)):
        return None  # the line a lockd that has stopped left behind
    return (
        f"the lockd holding journal {journal} (pid {pid}) serves {serving}, not "
        f"{path}{_another_socket(path, serving)}"
    )


def _has_open(pid: int, path: str) -> bool:
    """Whether process ``pid`` has ``path`` open: the journal's lock is held by an fd a
    lockd keeps open while it runs (read from /proc, not by taking the lock to see,
    which a lockd starting that moment would find taken, and refuse to start)."""
    target = os.path.realpath(path)
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(os.path.join(fd_dir, name)) == target:
                return True
        except OSError:
            continue
    return False


def _serving(in_use: str | None) -> str | None:
    """The socket a journal's holder serves, from a refused daemon's "in use by another
    lockd (pid N, serving SOCKET)"; None if it does not say (an older lockd)."""
    if in_use is None or "serving " not in in_use:
        return None
    return in_use.rsplit("serving ", 1)[1].strip().removesuffix(")")


class SpawnFailed(OSError):
    """The daemon started for a client did not come up."""


def _lines_since(log: int, since: int) -> list[str]:
    """What the log (its fd) holds past ``since``, by lines."""
    chunks = []
    try:
        while chunk := os.pread(log, 65536, since):
            chunks.append(chunk)
            since += len(chunk)
    except OSError:
        return ["no log"]
    return b"".join(chunks).decode("utf-8", "replace").strip().splitlines()
