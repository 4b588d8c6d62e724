"""Fakes shared by the actor tests and the simulation."""

from __future__ import annotations

import os

from actors.events import JournalEntry


class PipeWatches:
    """pidfd stand-ins: one pipe per watch, made readable when its process exits.

    The owners actor polls the read end exactly as it polls a pidfd, so the
    same dispatcher code path runs in tests and in the simulation.
    """

    def __init__(self) -> None:
        self._pipes: dict[int, tuple[int, int]] = {}
        """read end -> (pid, write end)"""

    def open(self, pid: int) -> int:
        """A new watch on ``pid``: the fd to poll."""
        r, w = os.pipe()
        self._pipes[r] = (pid, w)
        return r

    def close(self, fd: int) -> None:
        """Close one watch (both ends)."""
        _, w = self._pipes.pop(fd)
        os.close(fd)
        os.close(w)

    def __contains__(self, fd: object) -> bool:
        return fd in self._pipes

    def __len__(self) -> int:
        return len(self._pipes)

    def fire(self, pid: int) -> None:
        """``pid`` exited: every watch on it becomes readable."""
        for p, w in self._pipes.values():
            if p == pid:
                os.write(w, b"x")

    def close_all(self) -> None:
        """The watcher is gone (test end, daemon crash): every pipe closes."""
        for r, (_, w) in list(self._pipes.items()):
            os.close(r)
            os.close(w)
        self._pipes.clear()


class ListReader:
    """A journal reader over entries kept in a list (the in-memory journals' ``reader``):
    ``max_bytes`` counts one entry as 100 bytes, so tests can make replay steps small."""

    def __init__(self, entries: list[JournalEntry], since_seq: int) -> None:
        self._entries = entries
        self.next_seq = since_seq
        self.closed = False
        self.parked = 0
        self.more = False
        self.failures: list[Exception] = []
        """Raised by the next polls, one each, as reading segment files can."""

    def poll(self, max_bytes: int = -1) -> list[JournalEntry]:
        if self.failures:
            raise self.failures.pop(0)
        out = [e for e in self._entries if e.seq >= self.next_seq]
        if max_bytes > 0:
            out = out[: max(1, max_bytes // 100)]
        if out:
            self.next_seq = out[-1].seq + 1
        return out

    def park(self) -> None:
        self.parked += 1

    def skip_segment(self) -> int | None:
        return None  # one list, no segments to go on in

    def close(self) -> None:
        self.closed = True
