#!/usr/bin/env python3
"""lockd vs the real virtlockd, side by side in one run, same workload, same CPU pinning.

Starts the virtlockd peer (``shared/peers/virtlockd``, needs root), runs its
benchmark client, stops it; then starts ``lockd serve`` on temp paths for each
journal_sync policy and runs ``lockd bench`` with the same shape: one
connection per worker, one exclusive autocreated lease per worker, acquire +
release pairs. That is one round; ``--repeat`` rounds run in turn and each
number is the median over them, so every daemon samples the same spells of a
VM whose speed drifts over minutes. Daemon and clients are pinned to the same
CPU (``--cpu``), or the clients to another (``--client-cpu``, as a client on
another core of a real host would be). Prints a Markdown table with ratios to virtlockd (and to the
floors measured in the same run) and, with ``--json``, everything raw.

    sudo .venv/bin/python contrib/bench/compare.py --repeat 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lockd.bench import compare_table, summary  # noqa: E402
from lockd.procs import cpu_seconds, stop_child, wait_listening  # noqa: E402

DEFAULT_PEER = REPO.parent / "shared" / "peers" / "virtlockd"


WARMUP = 100
"""Warm-up pairs before virtlockd's timed sequential run (as ``lockd bench``'s)."""

PEER_LOCKSPACE = "/tmp/virtlockd-peer/lockspace"  # noqa: S108 - the peer client's default
"""The lockspace directory the peer's client uses by default."""


def _virtlockd_pairs(peer: Path, cpu: int, ops: int, daemon_pid: int, out: Any) -> None:
    """Child process: :func:`_timed_pairs`, its result or its error sent to the parent."""
    try:
        out.send(_timed_pairs(peer, cpu, ops, daemon_pid))
    except BaseException as exc:  # noqa: BLE001 - reported, never left to hang the parent
        out.send({"error": repr(exc)})


def _timed_pairs(peer: Path, cpu: int, ops: int, daemon_pid: int) -> dict[str, Any]:
    """Sequential pairs through the peer's own protocol client, timed and summarised as
    ``lockd bench`` does lockd's (p999 included: the peer's client reports none), and the
    daemon's CPU over exactly the timed pairs."""
    os.sched_setaffinity(0, {cpu})
    spec = importlib.util.spec_from_file_location("virtlockd_peer_client", peer / "client.py")
    assert spec is not None
    assert spec.loader is not None
    peer_client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer_client)
    client = peer_client.connect_and_register(peer_client.DEFAULT_SOCKET, "bench-seq", 1)
    client.create_lockspace(PEER_LOCKSPACE)
    name = f"seq-{os.getpid()}"
    for _ in range(WARMUP):
        client.acquire(PEER_LOCKSPACE, name, autocreate=True)
        client.release(PEER_LOCKSPACE, name)
    samples: list[float] = []
    clock = time.perf_counter
    cpu0 = cpu_seconds(daemon_pid)
    t0 = clock()
    for _ in range(ops):
        started = clock()
        client.acquire(PEER_LOCKSPACE, name, autocreate=True)
        client.release(PEER_LOCKSPACE, name)
        samples.append((clock() - started) * 1e6)
    wall = clock() - t0
    cpu1 = cpu_seconds(daemon_pid)
    client.close()
    result: dict[str, Any] = summary(samples, wall)
    if cpu0 is not None and cpu1 is not None:
        result["daemon_cpu_us_per_pair"] = round((cpu1 - cpu0) / ops * 1e6, 1)
    return result


def virtlockd_sequential(peer: Path, cpu: int, ops: int, daemon_pid: int) -> dict[str, float]:
    """:func:`_timed_pairs` in a process of its own, pinned like the peer's client."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_virtlockd_pairs, args=(peer, cpu, ops, daemon_pid, send))
    child.start()
    send.close()  # the child's end only: a child that dies unheard ends the wait (EOF)
    try:
        if not receive.poll(600):
            raise RuntimeError("virtlockd sequential run: no result in 600 s")
        try:
            result: dict[str, Any] = receive.recv()
        except EOFError:
            raise RuntimeError("virtlockd sequential run: the child died") from None
    finally:
        child.join(10)
        if child.is_alive():
            child.terminate()
            child.join()
    if "error" in result:
        raise RuntimeError(f"virtlockd sequential run failed: {result['error']}")
    return result


def run_virtlockd(
    peer: Path, cpu: int, ops: int, tp_ops: int, client_cpu: int | None = None
) -> dict[str, Any]:
    """One round of the peer's client (sequential, then 1, 4 and 16 connections)."""
    env = dict(os.environ, VIRTLOCKD_CPU=str(cpu))
    ccpu = cpu if client_cpu is None else client_cpu
    subprocess.run(["bash", str(peer / "setup.sh")], env=env, check=True, stdout=subprocess.PIPE)
    try:
        client = [sys.executable, str(peer / "client.py"), "--pin-cpu", str(ccpu), "--no-checks"]
        done = subprocess.run(
            [*client, "--ops", str(ops), "--tp-ops", str(tp_ops), "--concurrency", "1,4,16",
             "--repeat", "1"],
            check=True, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        status = subprocess.run(
            ["bash", str(peer / "setup.sh"), "status"], check=True, capture_output=True, text=True
        )
        match = re.search(r"pid (\d+)", status.stdout + status.stderr)
        if match is None:
            raise RuntimeError(f"no virtlockd pid in {status.stdout + status.stderr!r}")
        pid = int(match.group(1))
        # The sequential row: the peer's client's protocol code, timed here, with
        # the daemon's CPU read around exactly the timed pairs.
        seq_m = virtlockd_sequential(peer, ccpu, ops, pid)
    finally:
        subprocess.run(["bash", str(peer / "setup.sh"), "stop"], check=False)
    raw = json.loads(done.stdout)
    conc = []
    for level in raw["throughput"]:
        m = level.get("median_of_runs") or {
            "pair_median_us": level["pair_latency"]["median_us"],
            "pair_p99_us": level["pair_latency"]["p99_us"],
            "pairs_per_s": level["pairs_per_s"],
        }
        conc.append({"concurrency": level["concurrency"], **m})
    return {"sequential": seq_m, "concurrent": conc, "raw": raw}


def run_lockd(
    sync: str, cpu: int, ops: int, tp_ops: int, client_cpu: int | None = None
) -> dict[str, Any]:
    """One round of ``lockd bench`` against a fresh daemon with this journal_sync."""
    lockd = [sys.executable, "-m", "lockd"]
    ccpu = cpu if client_cpu is None else client_cpu
    with tempfile.TemporaryDirectory(prefix="lockd-bench-") as tmp:
        sock = f"{tmp}/lockd.sock"
        daemon = subprocess.Popen(
            ["taskset", "-c", str(cpu), *lockd, "serve", "--socket", sock,
             "--admin-socket", f"{tmp}/admin.sock", "--lock-dir", f"{tmp}/locks",
             "--journal-dir", f"{tmp}/journal", "--journal-sync", sync],
            stderr=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        try:
            wait_listening(sock, daemon)
            done = subprocess.run(
                ["taskset", "-c", str(ccpu), *lockd, "bench", "--socket", sock, "--json",
                 "--ops", str(ops), "--tp-ops", str(tp_ops)],
                check=True, stdout=subprocess.PIPE, text=True, cwd=REPO,
            )  # fmt: skip
        finally:
            stop_child(daemon)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _rounds(rounds: list[dict[str, Any]], raw_key: str) -> dict[str, Any]:
    """Medians over the rounds of one daemon; the rounds themselves under ``raw_key``."""
    out: dict[str, Any] = {
        "sequential": _median(r["sequential"] for r in rounds),
        "concurrent": [
            {"concurrency": lvl["concurrency"], **_median(r["concurrent"][i] for r in rounds)}
            for i, lvl in enumerate(rounds[0]["concurrent"])
        ],
        raw_key: rounds,
    }
    if "floor" in rounds[0]:
        out["floor"] = _median(r["floor"] for r in rounds)
    return out


def _median(rows: Any) -> dict[str, float]:
    rows = list(rows)
    keys = [k for k, v in rows[0].items() if isinstance(v, int | float) and k != "concurrency"]
    keys = [k for k in keys if all(k in r for r in rows)]  # e.g. a run whose /proc read failed
    return {k: round(statistics.median(r[k] for r in rows), 1) for k in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="virtlockd peer directory")
    parser.add_argument("--cpu", type=int, default=0, help="CPU for every daemon and client")
    parser.add_argument(
        "--client-cpu", type=int, default=None, help="CPU for the clients (default: --cpu)"
    )
    parser.add_argument("--ops", type=int, default=3000, help="sequential pairs per run")
    parser.add_argument("--tp-ops", type=int, default=6000, help="pairs per concurrent run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, in turn; medians reported")
    parser.add_argument("--sync", default="none,batch", help="lockd journal_sync policies to run")
    parser.add_argument("--json", action="store_true", help="print raw JSON instead of the table")
    args = parser.parse_args()
    syncs = args.sync.split(",")
    v_rounds: list[dict[str, Any]] = []
    lockd_rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in syncs}
    for _ in range(args.repeat):
        v_rounds.append(run_virtlockd(args.peer, args.cpu, args.ops, args.tp_ops, args.client_cpu))
        for s in syncs:
            lockd_rounds[s].append(run_lockd(s, args.cpu, args.ops, args.tp_ops, args.client_cpu))
    v = _rounds(v_rounds, "raw")
    lockd = {s: _rounds(rounds, "runs") for s, rounds in lockd_rounds.items()}
    if args.json:
        print(json.dumps({"virtlockd": v, "lockd": lockd}, indent=1))
        return 0
    floor = next(iter(lockd.values()))["floor"]
    where = (
        f"CPU {args.cpu} for daemons and clients"
        if args.client_cpu in (None, args.cpu)
        else f"CPU {args.cpu} for daemons, CPU {args.client_cpu} for clients and floors"
    )
    print(f"{where}; {args.repeat} rounds in turn, medians.\n")
    print("\n".join(compare_table({"virtlockd": v, "lockd": lockd})))
    print(
        f"\nFloors (same run): OFD lock+unlock in-process {floor['fcntl_pair_us']} us; "
        f"Unix-socket request/reply between two processes {floor['socket_rpc_us']} us "
        f"(a pair is two RPCs); minimal Python epoll server "
        f"{floor.get('python_server_rpc_us', '?')} us per request.\n"
        f"A pair's own work: file syscalls the virtlockd way (open O_CREAT, lock; unlink, "
        f"close) {floor.get('virtlockd_files_pair_us', '?')} us, the lockd way (under the "
        f"index lock, with the link check) {floor.get('lockd_files_pair_us', '?')} us; "
        f"lockd's two journal records {floor.get('journal_pair_us', '?')} us; one actor hop "
        f"{floor.get('actor_hop_us', '?')} us (a pair makes 13)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
