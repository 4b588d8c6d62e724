"""Named crash points for crash tests: the daemon SIGKILLs itself at one of them.

Enabled only by the environment variable ``LOCKD_CRASH_AT=<point>[:<n>]``
(crash at the n-th time the point is reached, default the first), read once
at import. Unset, :func:`crash_point` is one comparison. The points, in
the order an operation reaches them:

- ``acquire-locked``: the kernel lock is taken, nothing is journaled yet.
- ``acquire-journaled``: ``lease-acquired`` is written, the client has no reply.
- ``release-journaled``: ``lease-released`` is written, the kernel lock is still held.
- ``release-dropped``: the kernel lock is dropped, the client has no reply.
- ``lockspace-mkdir``: a lockspace directory exists, ``lockspace-created`` is not written.
- ``segment-started``: a rotation's new segment exists; its snapshot may still be
  being written (by a forked child in ``lockd serve``, which goes on without the daemon).
- ``snapshot-tmp``: a snapshot's temporary file is written, not yet renamed
  (reached in the snapshot's child: it kills the daemon, then itself).
- ``snapshot-written``: a rotation's snapshot is on disk, old segments are not pruned.
- ``restore-journaled``: start-up recovery wrote a lockspace's findings
  (``lease-released`` for owners gone, ``lease-lost``); recovery has not completed.
- ``recovery-completed``: ``recovery-completed`` is written; the fences it lists
  are not started.
- ``fence-journaled``: a fence's ``owner-fenced`` is written, its signal not sent
  (``:1`` the SIGTERM, ``:2`` the SIGKILL of a fence that began in this daemon).
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "acquire-locked",
    "acquire-journaled",
    "release-journaled",
    "release-dropped",
    "lockspace-mkdir",
    "segment-started",
    "snapshot-tmp",
    "snapshot-written",
    "restore-journaled",
    "recovery-completed",
    "fence-journaled",
)

_SPEC = os.environ.get("LOCKD_CRASH_AT", "")
_POINT, _, _NTH = _SPEC.partition(":")
_remaining = int(_NTH) if _NTH.isdigit() else 1
_also: int | None = None


def also_kill(pid: int) -> None:
    """In a helper process the daemon forked: a crash point kills the daemon (``pid``) too."""
    global _also  # noqa: PLW0603 - set once, in the child
    _also = pid


def counted_in_child(name: str) -> None:
    """A child just forked will reach ``name`` in its own copy of the countdown: count it
    here too, so that ``<point>:<n>`` counts over the children (``snapshot-tmp:2`` is
    the second snapshot child's), not n within each child, which never came."""
    global _remaining  # noqa: PLW0603 - the same process-wide countdown
    if name == _POINT:
        _remaining -= 1


def crash_point(name: str) -> None:
    """SIGKILL this process if ``LOCKD_CRASH_AT`` names this point (and its count is reached)."""
    global _remaining  # noqa: PLW0603 - a process-wide countdown, by design
    if name != _POINT:
        return
    _remaining -= 1
    if _remaining <= 0:
        if _also is not None:
            os.kill(_also, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
