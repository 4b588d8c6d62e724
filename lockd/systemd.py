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
import heapq
import logging
import os
import re
import socket
import string
import threading
from collections.abc import Iterable

from lockd.lockfiles import unlock

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3

StoreNames = tuple[tuple[tuple[str, str, str], ...], tuple[str, ...]]
"""The fd store's names a re-exec hands on: each stored lease's (lockspace, resource,
name), and the names of fds stored for no lease (see :meth:`FdStore.held`)."""


def lease_fd_name(lockspace: str, resource: str) -> str:
    """FDNAME builds before 2026-11-28 stored a lease fd under (``lease-`` and 40 hex
    digits of a hash), still understood in a store they filled: 47 bytes a name, which
    kept 2,766 leases at most in a restart's LISTEN_FDNAMES."""
    digest = hashlib.sha256(f"{lockspace}/{resource}".encode()).hexdigest()[:40]
    return f"lease-{digest}"


_DIGITS = string.digits + string.ascii_letters
_SHORT_NAME = re.compile(r"l[0-9A-Za-z]+")


def short_fd_name(number: int) -> str:
    """FDNAME of the store's lease fd ``number``: ``l`` and the number in base 62 (ASCII,
    no ':', which separates names); 16,384 leases need at most 4 bytes a name."""
    digits = ""
    while True:
        number, digit = divmod(number, len(_DIGITS))
        digits = _DIGITS[digit] + digits
        if not number:
            return "l" + digits


def _short_number(name: str) -> int | None:
    """The number of a :func:`short_fd_name`, None for any other name."""
    if not _SHORT_NAME.fullmatch(name) or (len(name) > 2 and name[1] == "0"):
        return None
    number = 0
    for char in name[1:]:
        number = number * len(_DIGITS) + _DIGITS.index(char)
    return number


def is_lease_fd_name(name: str) -> bool:
    """A name lockd stores a lease fd under: a short one, or an earlier build's."""
    return name.startswith("lease-") or _short_number(name) is not None


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

NAMES_BUDGET = ENV_STRING_MAX - 1024
"""Bytes of ``LISTEN_FDNAMES`` the lease fds' names may take, a ':' after each (1 KiB
left for the sockets' names and the variable's own)."""


def _fitting(budget: int) -> int:
    """How many short names, from the first on, fit in ``budget`` bytes (a ':' each)."""
    count = used = 0
    while used + len(short_fd_name(count)) + 1 <= budget:
        used += len(short_fd_name(count)) + 1
        count += 1
    return count


MAX_STORED_LEASES = _fitting(NAMES_BUDGET)
"""Lease fds kept in the fd store at most (26,790). The service manager passes the names
of all the fds it hands back in one variable, ``LISTEN_FDNAMES``: with more names than
fit in :data:`NAMES_BUDGET`, the exec of the restarted lockd fails (E2BIG), the unit
fails, and the store, every lock with it, is let go. Names are numbered smallest free
first, so no name in use is numbered :data:`MAX_STORED_LEASES` or more and the names
of any that many fit; an earlier build's longer names, and names kept for a copy the
manager was not told to drop, are counted by their bytes too."""


class FdStore:
    """Keeps lease fds in the service manager's fd store (a no-op when there is none),
    :data:`MAX_STORED_LEASES` of them at most, each under a short name of its own.

    Called from every lockspace's actor and from recovery, each on its own thread: one
    name given to two leases would have one's FDSTOREREMOVE drop the other's fd too."""

    def __init__(self, max_leases: int = MAX_STORED_LEASES) -> None:
        self.enabled = _address() is not None
        self._max = max_leases
        self._lock = threading.Lock()
        self._names: dict[tuple[str, str], str] = {}
        """Each stored lease's name."""
        self._copies: dict[str, int] = {}
        """How many fds the store holds under each name, as far as this process knows:
        more than one under a name whose FDSTOREREMOVE could not be sent (its copy stays
        there); a name of no lease any more while such a copy is left."""
        self._taken: set[int] = set()
        """The numbers of the short names in :attr:`_copies`."""
        self._free: list[int] = []
        """Numbers given back (a heap; some may be taken again since): smallest first."""
        self._next = 0
        """No number from here on was ever given."""
        self._count = 0
        """How many fds the store holds: each is one more name in a restart's LISTEN_FDNAMES."""
        self._bytes = 0
        """The bytes their names take there, a ':' each."""
        self._full = False
        """Said that the store is full, until a tenth of it is free again: with leases
        coming and going at the limit, once per release was a warning a minute."""
        self._room_again = max_leases - max(1, max_leases // 10)

    def _add(self, name: str) -> None:
        number = _short_number(name)
        if number is not None:
            self._taken.add(number)
            self._next = max(self._next, number + 1)
        self._copies[name] = self._copies.get(name, 0) + 1
        self._count += 1
        self._bytes += len(name) + 1

    def _drop(self, name: str, copies: int | None = None) -> None:
        """The store holds ``copies`` fds fewer under ``name`` (None: none left)."""
        left = self._copies.pop(name, 0)
        copies = left if copies is None else min(copies, left)
        self._count -= copies
        self._bytes -= copies * (len(name) + 1)
        if left > copies:
            self._copies[name] = left - copies
        elif (number := _short_number(name)) is not None and left:
            self._taken.discard(number)
            heapq.heappush(self._free, number)
        self._full = self._full and self._count > self._room_again

    def _new_name(self) -> str:
        while self._free and self._free[0] in self._taken:
            heapq.heappop(self._free)
        if self._free:
            return short_fd_name(self._free[0])
        while self._next in self._taken:
            self._next += 1
        return short_fd_name(self._next)

    def kept(self, lockspace: str, resource: str, name: str) -> None:
        """A lease fd the store holds already under ``name``: handed back after a crash,
        or handed over by a re-exec (for a re-exec from an earlier build, counted as
        stored under its hashed name whether or not it is: the safe side)."""
        with self._lock:
            if self.enabled and (lockspace, resource) not in self._names:
                self._names[lockspace, resource] = name
                self._add(name)

    def held(self, names: Iterable[str]) -> None:
        """Names the store holds an fd under that is no lease's (its FDSTOREREMOVE could
        not be sent): counted, and given to no lease, until they are dropped."""
        with self._lock:
            for name in names:
                if self.enabled:
                    self._add(name)

    def store(self, lockspace: str, resource: str, fd: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            # A lease stored again (its FDSTOREREMOVE lost) keeps its name: the next
            # FDSTOREREMOVE drops both copies.
            name = self._names.get((lockspace, resource)) or self._new_name()
            fits = self._bytes + len(name) + 1 <= NAMES_BUDGET and self._count < self._max
            if fits:
                self._names[lockspace, resource] = name
                self._add(name)  # taken now: no other lease's store can be given it
            elif not self._full:
                self._full = True
                log.warning(
                    "fd store: %d lease fds kept there, the most whose names the service "
                    "manager can hand back to a restart (LISTEN_FDNAMES); %s/%s and later "
                    "leases are not: a crash lets their locks go until recovery takes "
                    "them again",
                    self._count, lockspace, resource,
                )  # fmt: skip
        if fits and not notify(f"FDSTORE=1\nFDNAME={name}", [fd], timeout=SEND_TIMEOUT):
            with self._lock:
                self._drop(name, 1)
                if name not in self._copies:
                    self._names.pop((lockspace, resource), None)

    def remove(self, lockspace: str, resource: str) -> None:
        """Drop a lease's fds from the store. If the message cannot be sent, they stay
        there until the next start, and are still counted (uncounted, later leases
        stored in their place took a restart's LISTEN_FDNAMES past what an exec takes);
        their name stays the lease's, given to no other, and the next remove of the
        lease drops them too."""
        if not self.enabled:
            return
        with self._lock:
            name = self._names.get((lockspace, resource))
        if name is None:
            return  # not stored
        # Freed only once sent: the manager reads it before the FDSTORE of the next
        # lease given the name (one queue, in order), which it then does not drop.
        if notify(f"FDSTOREREMOVE=1\nFDNAME={name}", timeout=SEND_TIMEOUT):
            with self._lock:
                del self._names[lockspace, resource]
                self._drop(name)

    def forget(self, name: str, fd: int, *, unlock_first: bool = True) -> None:
        """Drop a stored fd nobody needs any more (its lease ended while we were down;
        ``unlock_first=False``: a second fd of a lease whose lock another one holds)."""
        if self.enabled and not notify(f"FDSTOREREMOVE=1\nFDNAME={name}", timeout=SEND_TIMEOUT):
            self.held([name])  # still there, handed to the next start with the others
        if unlock_first:
            with contextlib.suppress(OSError):
                # Unlocked first: the store's copy, until the manager drops it, would keep it.
                unlock(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def names(self) -> StoreNames:
        """What a re-exec hands on: each lease's name (a lease that ended with its
        FDSTOREREMOVE lost, too), and the names of the other fds the store holds (see
        :meth:`held`), once per fd."""
        with self._lock:
            leases = tuple((ls, res, name) for (ls, res), name in self._names.items())
            theirs = set(self._names.values())
            others = tuple(
                name
                for name, copies in self._copies.items()
                for _ in range(copies - (name in theirs))
            )
        return leases, others
