"""Lock probes from a separate process: what another host's daemon would see."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

_PROBE = r"""
import fcntl, os, struct, sys
path, kind, mode = sys.argv[1:4]
fd = os.open(path, os.O_RDWR)
cmd = fcntl.F_OFD_SETLK if kind == "ofd" else fcntl.F_SETLK
ltype = fcntl.F_RDLCK if mode == "read" else fcntl.F_WRLCK
try:
    fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", ltype, os.SEEK_SET, 0, 1, 0))
except OSError:
    print("busy")
else:
    print("free")
"""


def probe(path: Path, kind: str, mode: str = "write") -> str:
    """Try the lock on byte 0 from a separate process, as another host's daemon would."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), kind, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


_WATCH = r"""
import fcntl, os, signal, struct, sys
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
fd = os.open(sys.argv[1], os.O_RDWR)
free = tries = 0
print("watching", flush=True)
while not stop:
    tries += 1
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
    except OSError:
        continue
    free += 1
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 1, 0))
print(tries, free, flush=True)
"""


def start_watch(path: Path) -> subprocess.Popen[str]:
    """A separate process that tries the lock on byte 0 in a tight loop until
    :func:`stop_watch`; returned once it watches. The caller kills it on failure."""
    proc = subprocess.Popen([sys.executable, "-c", _WATCH, str(path)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "watching"
    return proc


def stop_watch(proc: subprocess.Popen[str]) -> tuple[int, int]:
    """Stop a watcher: (tries, how many of them found the lock free)."""
    proc.send_signal(signal.SIGTERM)
    tries, free = map(int, proc.communicate(timeout=10)[0].split())
    return tries, free
