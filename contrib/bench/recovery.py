#!/usr/bin/env python3
"""Restart time with a big live state and a long history.

Builds a journal with ``--events`` events of history (acquire/release churn)
that ends with ``--leases`` leases held by ``--owners`` live processes (sleep),
then starts ``lockd serve`` on it and measures the time from exec until
``lockd status`` answers, and the ``recovery-completed`` duration the daemon
records. The lock directory is pre-populated like the live daemon would have
left it. Prints one JSON object.

    .venv/bin/python contrib/bench/recovery.py --leases 16384 --owners 1024 --events 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from actors.events import (  # noqa: E402
    JournalEntry,
    LeaseAcquired,
    LeaseReleased,
    LockspaceCreated,
    ReleaseReason,
)
from actors.model import LeaseMode, Owner  # noqa: E402
from actors.recovery_core import ReplayState  # noqa: E402
from lockd import procs  # noqa: E402
from lockd.journal_file import FileJournal  # noqa: E402
from lockd.snapshot import prune, write_snapshot  # noqa: E402
from protocol.client import Client  # noqa: E402

FILES = "org.libvirt.lockd.files"


def build(journal_dir: Path, lock_dir: Path, owners: list[Owner], leases: int, events: int) -> None:
    state = ReplayState()
    journal = FileJournal(str(journal_dir), retain_segments=4)

    def snapshot(seq: int) -> bool:
        assert state.seq == seq
        write_snapshot(str(journal_dir), state)
        prune(str(journal_dir))
        return True

    journal.on_rotate = snapshot
    seq = 0
    batch: list[JournalEntry] = []

    def emit(event: object) -> None:
        nonlocal seq
        seq += 1
        entry = JournalEntry(seq, time.time(), "bench", event)  # type: ignore[arg-type]
        batch.append(entry)
        if len(batch) >= 512:
            flush()

    def flush() -> None:
        if batch:
            journal.append(batch)
            for e in batch:
                state.fold(e)
            batch.clear()

    (lock_dir / FILES).mkdir(parents=True)
    emit(LockspaceCreated(FILES, str(lock_dir / FILES), 0))
    churn_owner = owners[0]
    churn = max(0, events - leases - 1) // 2
    for i in range(churn):  # history: a VM starting and stopping, over and over
        emit(LeaseAcquired(FILES, f"churn-{i % 997}", LeaseMode.EXCLUSIVE, churn_owner, 1, True))
        emit(LeaseReleased(FILES, f"churn-{i % 997}", LeaseMode.EXCLUSIVE, churn_owner, 1,
                           ReleaseReason.CLIENT))  # fmt: skip
    for i in range(leases):  # the live state: every owner holds leases/owners disks
        owner = owners[i % len(owners)]
        name = f"disk-{i:06d}"
        (lock_dir / FILES / name).touch(mode=0o600)
        emit(LeaseAcquired(FILES, name, LeaseMode.EXCLUSIVE, owner, 1, True))
    flush()
    journal.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=16384)
    parser.add_argument("--owners", type=int, default=1024)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="lockd-recovery-"))
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(args.owners)]
    daemon = None
    try:
        owners = []
        for i, p in enumerate(sleepers):
            started = procs.start_time(p.pid)
            assert started is not None
            owners.append(Owner(uuid.uuid4().bytes, f"vm{i}", i + 1, p.pid, started))
        t0 = time.monotonic()
        build(tmp / "journal", tmp / "locks", owners, args.leases, args.events)
        build_s = time.monotonic() - t0
        history = sum(f.stat().st_size for f in (tmp / "journal").glob("journal-*"))
        sock = tmp / "lockd.sock"
        t0 = time.monotonic()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lockd", "serve", "--socket", str(sock),
             "--admin-socket", str(tmp / "admin.sock"), "--lock-dir", str(tmp / "locks"),
             "--journal-dir", str(tmp / "journal")],
            cwd=REPO, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        while True:
            try:
                with Client(str(sock), timeout=60) as client:
                    status = client.call("status")
                break
            except OSError:
                time.sleep(0.005)
        serving_s = time.monotonic() - t0
        with open(f"/proc/{daemon.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        done = subprocess.run(
            [sys.executable, "-m", "lockd", "events", "--journal-dir", str(tmp / "journal"),
             "--type", "recovery-completed", "--json"],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        recovery = json.loads(done.stdout.splitlines()[-1])
        print(json.dumps({
            "leases": args.leases, "owners": args.owners, "events": args.events,
            "journal_bytes_on_disk": history, "build_s": round(build_s, 1),
            "start_to_serving_s": round(serving_s, 3),
            "recovery_completed_ms": recovery["duration_ms"],
            "held_again": recovery["held"], "leases_listed": status["leases"],
            "daemon_rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "daemon_threads": int(fields["Threads"]),
        }))  # fmt: skip
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        for p in sleepers:
            p.kill()
            p.wait()
        if not args.keep:
            shutil.rmtree(tmp)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
