"""The service manager's side channels, without libsystemd: sd_notify, the fd store, LISTEN_FDS.

Under systemd (``NOTIFY_SOCKET`` set, ``FileDescriptorStoreMax=`` in the unit),
every held lease's fd is also kept in the service's fd store. The store
keeps the open file description, and with it the OFD lock, alive while the
daemon crashes and restarts; the next start gets the fds back through
``LISTEN_FDS``/``LISTEN_FDNAMES`` and adopts them, so a lock is never free
between the crash and the recovery.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket

from lockd.lockfiles import unlock

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3


def lease_fd_name(lockspace: str, resource: str) -> str:
    """FDNAME of a lease fd: ASCII, no ':' (names are ':'-separated), well under 255 chars."""
    digest = hashlib.sha256(f"{lockspace}/{resource}".encode()).hexdigest()[:40]
    return f"lease-{digest}"


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def notify(state: str, fds: list[int] | None = None) -> bool:
    """Send one sd_notify datagram (with fds via SCM_RIGHTS); False when not under a manager."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            if fds:
                socket.send_fds(s, [state.encode()], fds)
            else:
                s.sendall(state.encode())
    except OSError as exc:
        log.error("sd_notify %r failed: %s", state.split("\n", 1)[0], exc)
        return False
    return True


def listen_fds() -> list[tuple[str, int]]:
    """Fds passed by the service manager, with their names; clears the LISTEN_* variables."""
    try:
        if int(os.environ.get("LISTEN_PID", "-1")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    raw = os.environ.get("LISTEN_FDNAMES", "")
    names = raw.split(":") if raw else []
    names += ["unknown"] * (count - len(names))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    out = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append((names[i], fd))
    return out


class FdStore:
    """Keeps lease fds in the service manager's fd store (a no-op when there is none)."""

    def __init__(self) -> None:
        self.enabled = _address() is not None

    def store(self, lockspace: str, resource: str, fd: int) -> None:
        if self.enabled:
            name = lease_fd_name(lockspace, resource)
            notify(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove(self, lockspace: str, resource: str) -> None:
        if self.enabled:
            notify(f"FDSTOREREMOVE=1\nFDNAME={lease_fd_name(lockspace, resource)}")

    def forget(self, name: str, fd: int) -> None:
        """Drop a stored fd nobody needs any more (its lease ended while we were down)."""
        if self.enabled:
            notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        with contextlib.suppress(OSError):
            # Unlocked first: the store's copy, until the manager drops it, would keep it.
            unlock(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
