"""Lock probes from a separate process: what another host's daemon would see."""

from __future__ import annotations

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
