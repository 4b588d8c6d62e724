#!/usr/bin/env python3
"""What interpreter work between system calls does to the calls' own cost.

The daemon's file calls cost several times their floor (the floors table
measures them back to back). This times the same ``open(O_CREAT)`` of a
lease file, the call a sampling profile of the daemon finds most of its time
in, with a given number of microseconds of interpreter work before each: a
walk over a heap of a few hundred thousand small objects, as a daemon's own
work walks its heap, evicting what the kernel had cached. Each call is timed
on its own (``perf_counter`` around the ``open``), so the work between is not
in the number.

    .venv/bin/python contrib/bench/coldcache.py [--dir D] [--calls 3000] [--between 0,100,300,1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _work_for(micros: float, heap: list[dict[str, int]]) -> int:
    """Iterations of the heap walk that take about ``micros`` on this machine."""
    if micros <= 0:
        return 0
    steps = 10_000
    start = time.perf_counter()
    _walk(heap, steps, 0)
    per_step = (time.perf_counter() - start) / steps
    return max(1, round(micros / 1e6 / per_step))


def _walk(heap: list[dict[str, int]], steps: int, seed: int) -> int:
    total = 0
    size = len(heap)
    for j in range(steps):
        total += heap[(j * 7919 + seed * 104729) % size]["a"]
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to create the file (default: a temp dir)")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--between", default="0,100,300,1000",
                        help="microseconds of interpreter work before each call")  # fmt: skip
    args = parser.parse_args()
    heap = [{"a": i, "b": i * 2} for i in range(300_000)]
    with tempfile.TemporaryDirectory(prefix="lockd-cold-", dir=args.dir) as where:
        dirfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            base = None
            for micros in (float(x) for x in args.between.split(",")):
                steps = _work_for(micros, heap)
                times = []
                for i in range(args.calls):
                    if steps:
                        _walk(heap, steps, i)
                    start = time.perf_counter()
                    fd = os.open("lease", flags, 0o600, dir_fd=dirfd)
                    times.append(time.perf_counter() - start)
                    os.unlink("lease", dir_fd=dirfd)
                    os.close(fd)
                median = statistics.median(times) * 1e6
                base = base or median
                print(f"{micros:6.0f} us of work before each: open(O_CREAT) median "
                      f"{median:6.1f} us ({median / base:.1f}x back to back)")  # fmt: skip
        finally:
            os.close(dirfd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
