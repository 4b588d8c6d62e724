"""Wait for files in a directory to change: Linux inotify, without a dependency.

``lockd events --follow`` used to poll the journal every 10 ms, about 2% of a
CPU per follower while nothing happened. With inotify it sleeps until the
daemon writes, and sees the write at once. Where inotify is missing (no
libc symbol, out of watches), :meth:`DirWatch.wait` falls back to sleeping
the poll interval, which is what the caller did before.
"""

from __future__ import annotations

import ctypes
import os
import select
import time

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

FALLBACK_POLL_SECONDS = 0.01
"""The sleep when inotify is unavailable (the follower's old poll interval)."""


class DirWatch:
    """Wakes its caller when a file in ``path`` is written, created or moved in."""

    def __init__(self, path: str) -> None:
        self._fd: int | None = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd < 0:
            return
        mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        if libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
            os.close(fd)
            return
        self._fd = fd

    @property
    def notified(self) -> bool:
        """True when changes wake :meth:`wait` (inotify works here)."""
        return self._fd is not None

    def wait(self, timeout: float) -> bool:
        """Sleep until something in the directory changes (True) or ``timeout`` passes.

        Without inotify, sleeps :data:`FALLBACK_POLL_SECONDS` and returns True: the
        caller looks again, as it would have after a change.
        """
        if self._fd is None:
            time.sleep(min(timeout, FALLBACK_POLL_SECONDS))
            return True
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return False
        try:
            while os.read(self._fd, 65536):  # drain: one look covers every queued change
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
