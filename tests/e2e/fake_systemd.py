"""A small fake service manager: the notify socket, the fd store, and LISTEN_FDS on start.

Enough of systemd's protocols (sd_notify with SCM_RIGHTS, FDSTORE/FDSTOREREMOVE,
LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES) to test the daemon against, with no
systemd running.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

# Runs in the child between fork and the daemon: fds to 3.., LISTEN_* with our own pid.
LAUNCHER = r"""
import fcntl, os, sys
fds = [int(x) for x in os.environ.pop("FAKE_SD_FDS", "").split(",") if x]
names = os.environ.pop("FAKE_SD_NAMES", "")
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]  # out of the way of 3..
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)
    os.close(fd)
for fd in fds:  # as systemd: the daemon gets 3.. only, not the numbers they had here
    if not 3 <= fd < 3 + len(fds):
        os.close(fd)
if fds:
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.argv[1], sys.argv[1:])
"""


class FakeServiceManager:
    """Receives notifications in a thread; keeps stored fds by name."""

    def __init__(self, root: Path) -> None:
        self.path = root / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.store: dict[str, list[int]] = {}
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 253)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self.lock:
                self.messages.append(text)
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1":
                    self.store.setdefault(name, []).extend(fds)
                    fds = []
                elif fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.store.pop(name, []):
                        os.close(fd)
            for fd in fds:
                os.close(fd)

    def env(self, extra_fds: dict[str, int] | None = None) -> tuple[dict[str, str], list[int]]:
        """Environment and fds for the next start: the stored fds (and extra ones) passed on."""
        with self.lock:
            pairs = [(name, fd) for name, fds in self.store.items() for fd in fds]
        pairs += list((extra_fds or {}).items())
        env = {
            "NOTIFY_SOCKET": str(self.path),
            "FAKE_SD_FDS": ",".join(str(fd) for _, fd in pairs),
            "FAKE_SD_NAMES": ":".join(name for name, _ in pairs),
        }
        return env, [fd for _, fd in pairs]

    def launcher(self) -> list[str]:
        return [sys.executable, "-c", LAUNCHER]

    def ready_count(self) -> int:
        with self.lock:
            return sum("READY=1" in m for m in self.messages)

    def stored_names(self) -> set[str]:
        with self.lock:
            return set(self.store)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
