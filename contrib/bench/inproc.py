#!/usr/bin/env python3
"""The daemon's own cost of an acquire+release pair: the actors and lease files, no sockets.

Runs a LockSystem on temp paths, drives one in-process connection on the
test thread (``run_until_idle``), and prints the mean microseconds per pair;
``--profile`` adds a cProfile table. This is the number the hot-path changes
in docs/performance.md are measured with. On the 2-vCPU test VM single runs
vary by about 20%, so it runs several rounds and reports the fastest (noise
only adds time) with the median beside it; compare runs made back to back.

    .venv/bin/python contrib/bench/inproc.py [--pairs 3000] [--rounds 5] [--profile]

``--profile`` also prints the function calls per pair, which, unlike the
time, this VM's noise does not move; ``--opcodes`` counts the Python
bytecode instructions a pair executes (a trace function sees each one; code
in C, the kernel's and cbor2's, is not counted): the most direct measure of
interpreter work, and as deterministic as the calls.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from actors.connection import Received
from lockd.config import Config
from lockd.daemon import LockSystem
from protocol.codec import decode_item, encode_item
from protocol.framing import encode_frame


class Transport:
    """Replies land in a list; nothing to pause."""

    peer_pid = os.getpid()
    peer_uid = os.getuid()
    peer_gid = os.getgid()
    backlog = 0
    gone = False
    crowded = False

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...

    def fileno(self) -> int:
        return -1

    def peer_still_runs(self) -> bool:
        return True  # this very process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3000, help="pairs per round")
    parser.add_argument("--rounds", type=int, default=5, help="the minimum is the cost")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--opcodes", action="store_true", help="count bytecodes per pair")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lockd-inproc-"))
    try:
        config = Config(socket=str(tmp / "s"), admin_socket=str(tmp / "a"),
                        lock_dir=str(tmp / "locks"), journal_dir=str(tmp / "journal"))  # fmt: skip
        system = LockSystem(config)
        system.dispatcher.run_until_idle()
        transport = Transport()
        ref = system.connect(transport)

        def call(op: str, **fields: Any) -> None:
            ref.tell(Received(encode_frame(encode_item({"op": op, "id": 1, **fields}))))
            system.dispatcher.run_until_idle(poll_io=False)
            reply = decode_item(transport.out.pop()[4:])
            assert "result" in reply, reply

        call("hello", versions=[1])
        call("register", owner={"uuid": uuid.uuid4().bytes, "name": "b", "id": 1,
                                "pid": os.getpid()})  # fmt: skip
        lease = {"lockspace": "org.libvirt.lockd.files", "resource": "r1"}

        def loop() -> None:
            for _ in range(args.pairs):
                call("acquire", leases=[lease], autocreate=True)
                call("release", leases=[lease])

        rounds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            loop()
            rounds.append((time.perf_counter() - start) / args.pairs * 1e6)
        # On a shared VM interference only ever adds time: the fastest round
        # is the best estimate of the code's own cost, the median shows the spread.
        print(f"{min(rounds):.1f} us per pair in-process (min of {args.rounds} rounds; "
              f"median {statistics.median(rounds):.1f})")  # fmt: skip
        if args.profile:
            cProfile.runctx("loop()", globals(), {"loop": loop}, str(tmp / "prof"))
            stats = pstats.Stats(str(tmp / "prof"))
            # Unlike the time, the count does not move with this VM's spells: it
            # shows a hot-path change that the timing noise would hide.
            calls = stats.total_calls / args.pairs  # type: ignore[attr-defined]
            print(f"{calls:.0f} function calls per pair (cProfile's count, this benchmark's "
                  f"own encoding and decoding included)")  # fmt: skip
            stats.sort_stats("tottime").print_stats(30)
        if args.opcodes:
            counted = _opcodes(loop) / args.pairs
            print(f"{counted:.0f} bytecode instructions per pair (Python code only, this "
                  f"benchmark's own included)")  # fmt: skip
        system.shutdown("benchmark done")
    finally:
        shutil.rmtree(tmp)
    return 0


def _opcodes(run: Any) -> int:
    """Bytecode instructions executed by ``run()``, counted by a trace function."""
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(None)
    return count


if __name__ == "__main__":
    sys.exit(main())
