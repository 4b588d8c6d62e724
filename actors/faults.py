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
- ``snapshot-written``: a rotation's snapshot is on disk, the new segment is not.
- ``segment-started``: the new segment exists, old segments are not pruned.
- ``snapshot-tmp``: a snapshot's temporary file is written, not yet renamed.
- ``restore-journaled``: start-up recovery wrote a lockspace's findings
  (``lease-released`` for owners gone, ``lease-lost``); recovery has not completed.
- ``recovery-completed``: ``recovery-completed`` is written; the fences it lists
  are not started.
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
    "snapshot-written",
    "segment-started",
    "snapshot-tmp",
    "restore-journaled",
    "recovery-completed",
)

_SPEC = os.environ.get("LOCKD_CRASH_AT", "")
_POINT, _, _NTH = _SPEC.partition(":")
_remaining = int(_NTH) if _NTH.isdigit() else 1


def crash_point(name: str) -> None:
    """SIGKILL this process if ``LOCKD_CRASH_AT`` names this point (and its count is reached)."""
    global _remaining  # noqa: PLW0603 - a process-wide countdown, by design
    if name != _POINT:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
