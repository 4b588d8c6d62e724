"""Named crash points for crash tests: the daemon SIGKILLs itself at one of them.

Enabled only by the environment variable ``LOCKD_CRASH_AT=<point>[:<n>]``
(crash at the n-th time the point is reached, default the first), read once
at import. Unset, :func:`crash_point` is one comparison. A value naming no point,
or a count that is not a whole number from 1, stops ``lockd serve`` (and
``lockd.embed``) at start. The points, in
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


def parse_spec(spec: str) -> tuple[str, int]:
    """``<point>[:<n>]`` as (point, n); ``("", 0)`` for an empty spec (no crash point).

    Raises ValueError naming what is wrong: a point not in :data:`POINTS` or a count that
    is not a whole number from 1 would never fire, and a crash test would pass without
    its crash.
    """
    if not spec:
        return "", 0
    point, colon, nth = spec.partition(":")
    if point not in POINTS:
        raise ValueError(
            f"LOCKD_CRASH_AT={spec!r}: no crash point {point!r}; the points are "
            + ", ".join(POINTS)
        )
    if not colon:
        return point, 1
    if not (nth.isascii() and nth.isdigit()) or int(nth) < 1:
        raise ValueError(
            f"LOCKD_CRASH_AT={spec!r}: the count after the colon is the n-th time the point "
            f"is reached, a whole number from 1, not {nth!r}"
        )
    return point, int(nth)


_SPEC = os.environ.get("LOCKD_CRASH_AT", "")
try:
    _POINT, _remaining = parse_spec(_SPEC)
    SPEC_ERROR: str | None = None
except ValueError as _exc:
    _POINT, _remaining = "", 0
    SPEC_ERROR = str(_exc)
"""Why ``LOCKD_CRASH_AT`` is refused (nothing is armed then): ``lockd serve`` and
``lockd.embed`` refuse to start with it, rather than run a crash test with no crash."""
_also: int | None = None


def armed() -> str | None:
    """``LOCKD_CRASH_AT`` as read at import when it arms a crash point, for the log."""
    return _SPEC if _POINT else None


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
