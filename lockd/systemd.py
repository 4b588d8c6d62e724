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


SEND_TIMEOUT = 0.1
"""How long a routine message (the fd store's, the watchdog's) may wait for room in
the manager's queue: one PID 1 has stopped reading (a long daemon-reload) fills at
``net.unix.max_dgram_qlen`` datagrams, and a send that waited for it stalled every
request of the daemon's single loop meanwhile."""


def notify(state: str, fds: list[int] | None = None, *, timeout: float | None = None) -> bool:
    """Send one sd_notify datagram (with fds via SCM_RIGHTS); False when not under a
    manager, or when it could not be sent (within ``timeout`` seconds, if given: READY=1
    and the like wait, as they must arrive)."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
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


ENV_STRING_MAX = 32 * 4096
"""The kernel's limit on one environment string (MAX_ARG_STRLEN): an exec whose
environment holds a longer one fails with E2BIG."""

MAX_STORED_LEASES = (ENV_STRING_MAX - 1024) // (len(lease_fd_name("", "")) + 1)
"""Lease fds kept in the fd store at most (2,766). The service manager passes the names
of all the fds it hands back in one variable, ``LISTEN_FDNAMES``: with more names than
fit in :data:`ENV_STRING_MAX` (1 KiB left for the sockets' and the variable's own), the
exec of the restarted lockd fails (E2BIG), the unit fails, and the store, every lock
with it, is let go."""


class FdStore:
    """Keeps lease fds in the service manager's fd store (a no-op when there is none),
    :data:`MAX_STORED_LEASES` of them at most."""

    def __init__(self, max_leases: int = MAX_STORED_LEASES) -> None:
        self.enabled = _address() is not None
        self._max = max_leases
        self._stored: dict[str, int] = {}
        """The lease fds in the store by name, as far as this process knows: more than one
        under a name whose FDSTOREREMOVE could not be sent (its copy stays there)."""
        self._count = 0
        """How many fds that is: each is one more name in a restart's LISTEN_FDNAMES."""
        self._full = False
        """Said that the store is full, until a tenth of it is free again: with leases
        coming and going at the limit, once per release was a warning a minute."""
        self._room_again = max_leases - max(1, max_leases // 10)

    def _add(self, name: str) -> None:
        self._stored[name] = self._stored.get(name, 0) + 1
        self._count += 1

    def kept(self, lockspace: str, resource: str) -> None:
        """A lease fd the store holds already: handed back after a crash, or handed over
        by a re-exec (counted as stored, whether or not it is: the safe side)."""
        name = lease_fd_name(lockspace, resource)
        if self.enabled and name not in self._stored:
            self._add(name)

    def store(self, lockspace: str, resource: str, fd: int) -> None:
        if not self.enabled:
            return
        name = lease_fd_name(lockspace, resource)
        if self._count >= self._max:
            if not self._full:
                self._full = True
                log.warning(
                    "fd store: %d lease fds kept there, the most whose names the service "
                    "manager can hand back to a restart (LISTEN_FDNAMES); %s/%s and later "
                    "leases are not: a crash lets their locks go until recovery takes "
                    "them again",
                    self._count, lockspace, resource,
                )  # fmt: skip
            return
        if notify(f"FDSTORE=1\nFDNAME={name}", [fd], timeout=SEND_TIMEOUT):
            self._add(name)

    def remove(self, lockspace: str, resource: str) -> None:
        """Drop a lease's fds from the store. If the message cannot be sent, they stay
        there until the next start, and are still counted: uncounted, later leases
        stored in their place took a restart's LISTEN_FDNAMES past what an exec takes."""
        if self.enabled:
            name = lease_fd_name(lockspace, resource)
            if notify(f"FDSTOREREMOVE=1\nFDNAME={name}", timeout=SEND_TIMEOUT):
                self._count -= self._stored.pop(name, 0)
                self._full = self._full and self._count > self._room_again

    def forget(self, name: str, fd: int) -> None:
        """Drop a stored fd nobody needs any more (its lease ended while we were down)."""
        if self.enabled and not notify(f"FDSTOREREMOVE=1\nFDNAME={name}", timeout=SEND_TIMEOUT):
            self._add(name)  # still there, handed to the next start with the others
        with contextlib.suppress(OSError):
            # Unlocked first: the store's copy, until the manager drops it, would keep it.
            unlock(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
