"""``lockd bench``: acquire+release pairs, as a VM start and stop do, against a running daemon.

Each worker is its own process with its own connection and owner (its pid),
and loops acquire (exclusive, autocreate) + release of its own lease in the
lockspace ``lockd.bench``, the same shape as the virtlockd peer's client. The
floors are measured in the same run: an OFD lock+unlock pair on a local file
and a request/reply round trip on a socketpair between two processes.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from typing import Any

from lockd.lockfiles import try_lock, unlock
from protocol.client import Client

BENCH_LOCKSPACE = "lockd.bench"
SCENARIOS = ("sequential", "concurrent", "shared", "many-owners")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _summary(samples_us: list[float], wall_s: float) -> dict[str, float]:
    return {
        "pair_median_us": round(statistics.median(samples_us), 1),
        "pair_p99_us": round(_percentile(samples_us, 0.99), 1),
        "pair_p999_us": round(_percentile(samples_us, 0.999), 1),
        "pairs_per_s": round(len(samples_us) / wall_s, 1) if wall_s > 0 else 0.0,
    }


def _worker(  # noqa: PLR0917 - a Process target takes positional args
    path: str, name: str, ops: int, warmup: int, start: Any, out: Any, shared: bool = False
) -> None:
    with Client(path, name=name) as client:
        owner = {"uuid": uuid.uuid4().bytes, "name": name, "id": 1, "pid": os.getpid()}
        client.call("register", owner=owner)
        if shared:  # every worker on the same disk, all shared (a common base image)
            lease: dict[str, Any] = {"lockspace": BENCH_LOCKSPACE, "resource": "shared-base",
                                     "shared": True}  # fmt: skip
        else:
            lease = {"lockspace": BENCH_LOCKSPACE, "resource": f"{name}-{os.getpid()}"}
        ref = {"lockspace": lease["lockspace"], "resource": lease["resource"]}
        for _ in range(warmup):
            client.call("acquire", leases=[lease], autocreate=True)
            client.call("release", leases=[ref])
        if start is not None:
            start.wait()
        samples: list[float] = []
        clock = time.perf_counter
        for _ in range(ops):
            t0 = clock()
            client.call("acquire", leases=[lease], autocreate=True)
            client.call("release", leases=[ref])
            samples.append((clock() - t0) * 1e6)
    out.put(samples)


def _run_workers(
    path: str, count: int, ops: int, warmup: int, *, shared: bool = False
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(count + 1)
    out: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker, args=(path, f"bench-{count}-{i}", ops, warmup, start, out, shared)
        )
        for i in range(count)
    ]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    samples: list[float] = []
    for _ in procs:
        samples.extend(out.get())
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"bench worker failed with exit code {p.exitcode}")
    return {"concurrency": count, "total_pairs": len(samples), "wall_s": round(wall, 3),
            **_summary(samples, wall)}  # fmt: skip


def fcntl_floor(ops: int = 20000) -> float:
    """Median µs of an OFD write lock + unlock on a local file: the kernel's share of a pair."""
    with tempfile.NamedTemporaryFile() as f:
        fd = f.fileno()
        samples = []
        for _ in range(ops):
            t0 = time.perf_counter()
            try_lock(fd, shared=False)
            unlock(fd)
            samples.append((time.perf_counter() - t0) * 1e6)
    return round(statistics.median(samples), 2)


def _echo(sock: socket.socket, other: socket.socket) -> None:
    other.close()  # else our copy of the parent's end keeps the pair open forever
    while data := sock.recv(4096):
        sock.sendall(data)


def socket_floor(ops: int = 5000) -> float:
    """Median µs of one request/reply on a Unix socketpair to another process (one RPC)."""
    a, b = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_echo, args=(b, a))
    proc.start()
    b.close()
    samples = []
    payload = b"x" * 64
    for _ in range(ops):
        t0 = time.perf_counter()
        a.sendall(payload)
        a.recv(4096)
        samples.append((time.perf_counter() - t0) * 1e6)
    a.close()
    proc.join()
    return round(statistics.median(samples), 2)


def _hold_many(path: str, owners: int, leases_each: int) -> list[subprocess.Popen[bytes]]:
    """``owners`` live processes holding ``leases_each`` leases each: a dense host."""
    procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(owners)]
    for i, proc in enumerate(procs):
        with Client(path, name="lockd-bench-filler") as client:
            client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": f"filler{i}",
                                           "id": 1, "pid": proc.pid})  # fmt: skip
            client.call("acquire", autocreate=True, leases=[
                {"lockspace": BENCH_LOCKSPACE, "resource": f"filler{i}-{j}-{proc.pid}"}
                for j in range(leases_each)
            ])  # fmt: skip
    return procs


def run(
    path: str,
    *,
    ops: int,
    warmup: int,
    levels: list[int],
    tp_ops: int,
    scenarios: tuple[str, ...] = ("sequential", "concurrent"),
    owners: int = 256,
) -> dict[str, Any]:
    """Run the chosen scenarios; returns the JSON-ready result.

    ``sequential``/``concurrent``: one exclusive lease per worker; ``shared``:
    every worker on one shared lease; ``many-owners``: sequential pairs again
    while ``owners`` other processes hold 4 leases each.
    """
    with Client(path, name="lockd-bench") as client:
        client.call("create-lockspace", lockspace=BENCH_LOCKSPACE)
        server = client.server

    def strip(result: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in result.items() if k not in ("concurrency", "total_pairs")}

    out: dict[str, Any] = {"server": server.get("server"), "cpus": sorted(os.sched_getaffinity(0))}
    if "sequential" in scenarios or "many-owners" in scenarios:
        out["sequential"] = strip(_run_workers(path, 1, ops, warmup))
    if "concurrent" in scenarios:
        out["concurrent"] = [
            _run_workers(path, level, max(1, tp_ops // level), min(warmup, 50)) for level in levels
        ]
    if "shared" in scenarios:
        out["shared"] = [
            _run_workers(path, level, max(1, tp_ops // level), min(warmup, 50), shared=True)
            for level in levels
        ]
    if "many-owners" in scenarios:
        fillers = _hold_many(path, owners, 4)
        try:
            loaded = strip(_run_workers(path, 1, ops, warmup))
        finally:
            for proc in fillers:
                proc.kill()
                proc.wait()
        base = out["sequential"]["pair_median_us"]
        out["many_owners"] = {
            "owners": owners,
            "leases": owners * 4,
            **loaded,
            "median_vs_empty": round(loaded["pair_median_us"] / base, 3) if base else None,
        }
    out["floor"] = {"fcntl_pair_us": fcntl_floor(), "socket_rpc_us": socket_floor()}
    return out


def format_table(result: dict[str, Any]) -> str:
    """Human-readable form of :func:`run`'s result."""
    lines = [f"{result['server']}  client cpus {result['cpus']}"]
    s = result.get("sequential")
    if s:
        lines.append(
            f"sequential: median {s['pair_median_us']} us  p99 {s['pair_p99_us']} us  "
            f"{s['pairs_per_s']} pairs/s"
        )
    for label in ("concurrent", "shared"):
        for c in result.get(label, []):
            lines.append(
                f"{label} {c['concurrency']:>3}: median {c['pair_median_us']} us  "
                f"p99 {c['pair_p99_us']} us  {c['pairs_per_s']} pairs/s"
            )
    many = result.get("many_owners")
    if many:
        lines.append(
            f"with {many['owners']} owners holding {many['leases']} leases: median "
            f"{many['pair_median_us']} us ({many['median_vs_empty']}x empty)"
        )
    f = result["floor"]
    lines.append(
        f"floor: fcntl lock+unlock {f['fcntl_pair_us']} us, socket rpc {f['socket_rpc_us']} us"
    )
    return "\n".join(lines)
