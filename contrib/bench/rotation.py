"""How long requests wait while the journal rotates with many leases held.

At each segment rotation the daemon snapshots its whole state. This starts
``lockd serve`` on temp paths with small segments (so rotations come often),
fills it with ``--leases`` leases held through connections of this process,
then times ``--pairs`` sequential acquire+release pairs and prints their
p50/p99/p999, the slowest, how many took over 50 ms (one per rotation
when the snapshot is written by the daemon itself), and the snapshots by
result (``skipped``: the rotation came while the last was being written)::

    .venv/bin/python contrib/bench/rotation.py [--leases 16384] [--pairs 20000] [--cpu 0]

Daemon and client are pinned to one CPU, as in compare.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lockd.procs import wait_listening  # noqa: E402
from protocol.client import Client  # noqa: E402

LOCKSPACE = "lockd.bench.rotation"
PER_OWNER = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=16384)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--segment-bytes", type=int, default=1 << 20)
    parser.add_argument("--cpu", type=int, default=0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    with tempfile.TemporaryDirectory(prefix="lockd-rotation-") as tmp:
        config = Path(tmp, "lockd.toml")
        config.write_text(  # every segment kept, so that they count the rotations
            f"journal_segment_bytes = {args.segment_bytes}\njournal_retain_segments = 0\n"
        )
        sock = f"{tmp}/lockd.sock"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lockd", "serve", "--config", str(config), "--socket", sock,
             "--admin-socket", f"{tmp}/admin.sock", "--lock-dir", f"{tmp}/locks",
             "--journal-dir", f"{tmp}/journal"],
            stderr=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        holders: list[Client] = []
        try:
            wait_listening(sock, daemon)
            with Client(sock) as admin:
                admin.call("create-lockspace", lockspace=LOCKSPACE)
            for i in range(args.leases // PER_OWNER):
                holder = Client(sock, name=f"holder-{i}", timeout=None)
                holders.append(holder)
                owner = {"uuid": uuid.uuid4().bytes, "name": f"h{i}", "id": i + 1,
                         "pid": os.getpid()}  # fmt: skip
                holder.call("register", owner=owner)
                leases = [{"lockspace": LOCKSPACE, "resource": f"d{i}-{j}"}
                          for j in range(PER_OWNER)]  # fmt: skip
                holder.call("acquire", leases=leases, autocreate=True)
            client = Client(sock, name="rotation", timeout=None)
            holders.append(client)
            owner = {"uuid": uuid.uuid4().bytes, "name": "pairs", "id": 1 << 30, "pid": os.getpid()}
            client.call("register", owner=owner)
            lease = {"lockspace": LOCKSPACE, "resource": "pairs"}
            samples = []
            for _ in range(args.pairs):
                t0 = time.perf_counter()
                client.call("acquire", leases=[lease], autocreate=True)
                client.call("release", leases=[lease])
                samples.append((time.perf_counter() - t0) * 1e3)
            rotations = len(list(Path(tmp, "journal").glob("journal-*.cbor"))) - 1
            with Client(sock, name="rotation-metrics") as asking:
                metrics = asking.call("metrics")["text"]
            snapshots = {
                line.split('result="', 1)[1].split('"', 1)[0]: int(float(line.rsplit(" ", 1)[1]))
                for line in metrics.splitlines()
                if line.startswith("lockd_journal_snapshots_total{")
            }
        finally:
            # Stopped first: a holder connection closing under a live daemon would
            # have it fence this process, the leases' owner.
            daemon.terminate()
            daemon.wait(60)
            for holder in holders:
                holder.close()
    samples.sort()

    def pct(q: float) -> float:
        return samples[min(len(samples) - 1, int(len(samples) * q))]

    print(
        f"{args.leases} leases held, {args.pairs} pairs, {rotations} rotations: "
        f"p50 {pct(0.5):.2f} ms, p99 {pct(0.99):.2f}, p999 {pct(0.999):.2f}, "
        f"max {samples[-1]:.1f} ms; {sum(s > 50 for s in samples)} pairs over 50 ms; "
        f"snapshots {', '.join(f'{k} {v}' for k, v in sorted(snapshots.items())) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
