"""A thread of this process kept running, for tests that need a thread id (a /proc
entry like a pid's, which registration must not take for a process)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def other_thread_id() -> Iterator[int]:
    """The native id of a thread of this process, running until the block ends."""
    ready, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(60)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(10)
        yield tids[0]
    finally:
        done.set()
        thread.join()
