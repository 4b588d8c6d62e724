#!/usr/bin/env python3
"""Restart time with a big live state and a long history.

A thin wrapper over ``lockd bench --scenarios recovery`` (lockd/bench_recovery.py),
kept because earlier notes and runs name this script, with the issue's
target sizes as defaults: it builds a journal with ``--events`` events of
history that ends with ``--leases`` leases held by ``--owners`` live
processes, starts ``lockd serve`` on it, SIGKILLs it, starts it again and
prints one JSON object (exec to first answer, recovery-completed duration,
leases held again, RSS, threads).

    .venv/bin/python contrib/bench/recovery.py --leases 16384 --owners 1024 --events 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lockd.bench_recovery import BenchError, build, run  # noqa: E402

__all__ = ["build", "main"]  # build: tests import it from here to make a big journal


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=16384)
    parser.add_argument("--owners", type=int, default=1024)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    try:
        result = run(leases=args.leases, owners=args.owners, events=args.events, keep=args.keep)
    except BenchError as exc:
        print(f"recovery.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
