"""The fds whose copies a forked child must not keep: lease and index locks, the
journal's lock, listening sockets and clients' connections.

OFD locks and flock belong to the open file description, which ``fork()`` shares
with the child: a copy in a child that goes on without ``exec`` (a program
embedding lockd that forks a worker, ``multiprocessing`` with its ``fork`` start
method) kept each lock held after the lock system closed its fd. After ``stop()``,
or the program's crash, the next ``start()`` was refused as "in use by another
lockd" for as long as the worker ran, and took its own leases for lost. A
listening socket's copy likewise answered the next start's probe, which then
refused the path as "served by another daemon"; and a copy of a client's connection
kept it open, the client waiting out its timeout rather than seeing lockd gone.

:func:`drop_copies_in_child`, run after every fork in a program that embeds lockd
(``lockd.embed`` registers it), points each such fd of the child at
``/dev/null``: the child's share of the lock or socket ends, and its fd numbers
stay taken, so a later close by the child's copy of an object closes
``/dev/null``, never one of the child's own files.
"""

from __future__ import annotations

import os

_HELD: dict[int, tuple[int, int]] = {}
"""fd -> (device, inode) of what it was opened on, so that an fd number closed without
:func:`forget` and then reused by the program for another file is left alone."""


def remember(fd: int, st: os.stat_result | None = None) -> int:
    """Note ``fd`` (``st``: its ``fstat``, if the caller has it) as one a forked child
    must let go; returns ``fd``."""
    if st is None:
        st = os.fstat(fd)
    _HELD[fd] = (st.st_dev, st.st_ino)
    return fd


def forget(fd: int) -> None:
    """``fd`` is about to be closed (or was never noted): nothing to do for it in a child."""
    _HELD.pop(fd, None)


def close(fd: int) -> None:
    """:func:`forget`, then close ``fd``."""
    _HELD.pop(fd, None)
    os.close(fd)


def drop_copies_in_child() -> None:
    """In a child just forked: point every remembered fd at ``/dev/null``."""
    held = list(_HELD.items())
    _HELD.clear()  # the child is no lock system: what it opens later is its own
    if not held:
        return
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd, identity in held:
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == identity:
                os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)
