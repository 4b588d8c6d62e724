"""``lockd bench``: acquire+release pairs, as a VM start and stop do, against a running daemon.

Each worker is its own process with its own connection and owner (its pid),
and loops acquire (exclusive, autocreate) + release of its own lease in the
lockspace ``lockd.bench``, the same shape as the virtlockd peer's client. The
floors are measured in the same run: an OFD lock+unlock pair on a local file,
a request/reply round trip on a socketpair between two processes, and a
minimal Python server answering the same client's requests without doing
any lock work (what a Python daemon costs before it does anything).

The ``recovery`` scenario (:mod:`lockd.bench_recovery`) starts its own daemon
on temp paths instead, so it is not in the default set.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from typing import Any

from lockd import bench_recovery
from lockd.bench_floor import work_floors
from lockd.lockfiles import try_lock, unlock
from lockd.procs import cpu_seconds
from protocol.client import Client
from protocol.codec import decode_item, encode_item
from protocol.framing import MAX_REPLY_FRAME, FrameDecoder, encode_frame
from protocol.messages import PROTOCOL_VERSION

BENCH_LOCKSPACE = "lockd.bench"
PAIR_SCENARIOS = ("sequential", "concurrent", "shared", "many-owners")
"""Scenarios that measure pairs against the daemon at ``--socket``."""
SCENARIOS = (*PAIR_SCENARIOS, "recovery")
DEFAULT_SCENARIOS = ("sequential", "concurrent")
"""Not ``recovery``: it starts (and SIGKILLs) a daemon of its own, which nobody asked for."""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summary(samples_us: list[float], wall_s: float) -> dict[str, float]:
    """Percentiles and rate of pair times, the one way every daemon's run is summarised
    (``contrib/bench/compare.py`` uses it for virtlockd's too)."""
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
    path: str,
    count: int,
    ops: int,
    warmup: int,
    *,
    shared: bool = False,
    daemon_pid: int | None = None,
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
    cpu0 = None if daemon_pid is None else cpu_seconds(daemon_pid)
    t0 = time.perf_counter()
    samples: list[float] = []
    for _ in procs:
        samples.extend(out.get())
    wall = time.perf_counter() - t0
    cpu1 = None if daemon_pid is None else cpu_seconds(daemon_pid)
    # The daemon's CPU over the measured pairs (warm-up excluded): clock ticks of
    # 10 ms, so a few thousand pairs are needed for a figure good to a few percent.
    cpu = {}
    if cpu0 is not None and cpu1 is not None and samples:
        cpu = {"daemon_cpu_us_per_pair": round((cpu1 - cpu0) / len(samples) * 1e6, 1)}
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"bench worker failed with exit code {p.exitcode}")
    return {"concurrency": count, "total_pairs": len(samples), "wall_s": round(wall, 3),
            **summary(samples, wall), **cpu}  # fmt: skip


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


def _floor_server(listener: socket.socket) -> None:
    """Answer every request with an empty result from an epoll loop: no locks, no journal.

    Decodes and encodes with the daemon's own codec and framing, so the
    difference to lockd is the lock work and the actor system, not the wire.
    Returns when its one client disconnects.
    """
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, FrameDecoder]] = {}
    served = False
    while not served or conns:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                conn, _ = listener.accept()
                conn.setblocking(False)
                poller.register(conn.fileno(), select.EPOLLIN)
                conns[conn.fileno()] = (conn, FrameDecoder())
                served = True
                continue
            conn, frames = conns[fd]
            data = conn.recv(65536)
            if not data:
                poller.unregister(fd)
                conn.close()
                del conns[fd]
                continue
            frames.receive_data(data)
            while (frame := frames.next_frame()) is not None:
                request = decode_item(frame)
                result = {"version": PROTOCOL_VERSION, "server": "floor"}
                reply = {"id": request["id"], "result": result if request["op"] == "hello" else {}}
                conn.sendall(encode_frame(encode_item(reply), MAX_REPLY_FRAME))
    poller.close()


def python_server_floor(ops: int = 5000, warmup: int = 200) -> float:
    """Median µs of one request to a minimal Python epoll server in another process.

    The same client, codec and request as a pair's acquire, so twice this is
    what a pair costs a Python server and client that do no lock work at all:
    the part of lockd's pair time no change to the lock path can remove.
    """
    with tempfile.TemporaryDirectory(prefix="lockd-bench-floor-") as tmp:
        path = os.path.join(tmp, "floor.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        proc = multiprocessing.get_context("fork").Process(target=_floor_server, args=(listener,))
        proc.start()
        listener.close()
        samples: list[float] = []
        try:
            lease = {"lockspace": BENCH_LOCKSPACE, "resource": "floor"}
            with Client(path, name="lockd-bench-floor", timeout=30) as client:
                for _ in range(warmup):
                    client.call("acquire", leases=[lease], autocreate=True)
                for _ in range(ops):
                    t0 = time.perf_counter()
                    client.call("acquire", leases=[lease], autocreate=True)
                    samples.append((time.perf_counter() - t0) * 1e6)
        finally:
            proc.join(10)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
    return round(statistics.median(samples), 2)


def floors() -> dict[str, float]:
    """Every floor, measured in the caller's CPU affinity (compare.py pins it).

    Besides the wire floors: the file syscalls of one pair done the virtlockd
    way and the lockd way, and lockd's two journal records
    (:mod:`lockd.bench_floor`), so a pair's time splits into kernel work,
    journal, and the rest. They run in the client's temp directory (the
    client does not know where the daemon's lock dir is): on a host whose
    lock dir is on another file system, pass it to ``work_floors`` instead.
    """
    return {
        "fcntl_pair_us": fcntl_floor(),
        "socket_rpc_us": socket_floor(),
        "python_server_rpc_us": python_server_floor(),
        **work_floors(),
    }


def _hold_many(path: str, owners: int, leases_each: int) -> list[subprocess.Popen[bytes]]:
    """``owners`` live processes holding ``leases_each`` leases each: a dense host.

    If filling fails part way (or is interrupted), the processes started so
    far are killed before the error propagates: the caller never sees them.
    """
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(owners):
            proc = subprocess.Popen(["sleep", "3600"])
            procs.append(proc)
            with Client(path, name="lockd-bench-filler") as client:
                client.call("register", owner={"uuid": uuid.uuid4().bytes, "name": f"filler{i}",
                                               "id": 1, "pid": proc.pid})  # fmt: skip
                client.call("acquire", autocreate=True, leases=[
                    {"lockspace": BENCH_LOCKSPACE, "resource": f"filler{i}-{j}-{proc.pid}"}
                    for j in range(leases_each)
                ])  # fmt: skip
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    return procs


def run(
    path: str | None,
    *,
    ops: int,
    warmup: int,
    levels: list[int],
    tp_ops: int,
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS,
    owners: int = 256,
    recovery_leases: int = bench_recovery.DEFAULT_LEASES,
    recovery_owners: int = bench_recovery.DEFAULT_OWNERS,
    recovery_events: int = bench_recovery.DEFAULT_EVENTS,
) -> dict[str, Any]:
    """Run the chosen scenarios; returns the JSON-ready result.

    ``sequential``/``concurrent``: one exclusive lease per worker; ``shared``:
    every worker on one shared lease; ``many-owners``: sequential pairs again
    while ``owners`` other processes hold 4 leases each. Those use the daemon
    at ``path`` and add the floors. ``recovery`` starts its own daemon on temp
    paths (``path`` is not touched when it is the only scenario).
    """
    out: dict[str, Any] = {"cpus": sorted(os.sched_getaffinity(0))}
    if set(scenarios) & set(PAIR_SCENARIOS):
        if path is None:
            raise ValueError("the pair scenarios need a daemon's socket")
        out.update(_run_pairs(path, ops=ops, warmup=warmup, levels=levels, tp_ops=tp_ops,
                              scenarios=scenarios, owners=owners))  # fmt: skip
    if "recovery" in scenarios:
        out["recovery"] = bench_recovery.run(
            leases=recovery_leases, owners=recovery_owners, events=recovery_events
        )
    return out


def _run_pairs(
    path: str,
    *,
    ops: int,
    warmup: int,
    levels: list[int],
    tp_ops: int,
    scenarios: tuple[str, ...],
    owners: int,
) -> dict[str, Any]:
    with Client(path, name="lockd-bench") as client:
        client.call("create-lockspace", lockspace=BENCH_LOCKSPACE)
        server = client.server
        # The daemon's own pid (SO_PEERCRED would name systemd under socket
        # activation): its CPU per pair is measured too.
        pid: int | None = client.call("status").get("pid")

    def strip(result: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in result.items() if k not in ("concurrency", "total_pairs")}

    out: dict[str, Any] = {"server": server.get("server")}
    if "sequential" in scenarios or "many-owners" in scenarios:
        out["sequential"] = strip(_run_workers(path, 1, ops, warmup, daemon_pid=pid))
    if "concurrent" in scenarios:
        out["concurrent"] = [
            _run_workers(path, level, max(1, tp_ops // level), min(warmup, 50), daemon_pid=pid)
            for level in levels
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
    out["floor"] = floors()
    return out


def format_table(result: dict[str, Any]) -> str:
    """Human-readable form of :func:`run`'s result."""
    lines = [f"{result['server']}  client cpus {result['cpus']}"] if "server" in result else []
    s = result.get("sequential")
    if s:
        lines.append(
            f"sequential: median {s['pair_median_us']} us  p99 {s['pair_p99_us']} us  "
            f"{s['pairs_per_s']} pairs/s{_cpu(s)}"
        )
    for label in ("concurrent", "shared"):
        for c in result.get(label, []):
            lines.append(
                f"{label} {c['concurrency']:>3}: median {c['pair_median_us']} us  "
                f"p99 {c['pair_p99_us']} us  {c['pairs_per_s']} pairs/s{_cpu(c)}"
            )
    many = result.get("many_owners")
    if many:
        lines.append(
            f"with {many['owners']} owners holding {many['leases']} leases: median "
            f"{many['pair_median_us']} us ({many['median_vs_empty']}x empty)"
        )
    f = result.get("floor")
    if f:
        lines.append(
            f"floor: fcntl lock+unlock {f['fcntl_pair_us']} us, socket rpc {f['socket_rpc_us']} "
            f"us, minimal python server {f['python_server_rpc_us']} us per request"
        )
        lines.append(
            f"pair work: file syscalls virtlockd-style {f['virtlockd_files_pair_us']} us, "
            f"lockd-style {f['lockd_files_pair_us']} us, journal records {f['journal_pair_us']} us"
            f", actor hop {f.get('actor_hop_us', '?')} us"
        )
    if "recovery" in result:
        lines.append(bench_recovery.format_result(result["recovery"]))
    return "\n".join(lines)


def _cpu(row: dict[str, Any]) -> str:
    cpu = row.get("daemon_cpu_us_per_pair")
    return "" if cpu is None else f"  daemon cpu {cpu} us/pair"


def format_number(value: float | None) -> str:
    """A table cell: thousands grouped, one decimal below 100, "—" for no value."""
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def format_ratio(value: float | None, base: float | None) -> str:
    """``value / base`` as "1.23x", or "—" when either is missing."""
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}x"


def compare_table(compare: dict[str, Any]) -> list[str]:
    """Markdown rows of lockd vs virtlockd from compare.py's ``--json`` object.

    The one rendering, used by compare.py's own output and report.py's
    generated block in docs/performance.md.
    """
    virt = compare["virtlockd"]
    lockd: dict[str, Any] = compare["lockd"]
    syncs = list(lockd)
    lines = [
        "| scenario | metric | virtlockd | "
        + " | ".join(f"lockd ({s})" for s in syncs)
        + " | "
        + " | ".join(f"ratio ({s})" for s in syncs)
        + " |",
        "|---|---|---:|" + "---:|" * (2 * len(syncs)),
    ]

    def row(scenario: str, metric: str, base: float | None, values: list[float | None]) -> None:
        lines.append(
            f"| {scenario} | {metric} | {format_number(base)} | "
            + " | ".join(format_number(v) for v in values)
            + " | "
            + " | ".join(format_ratio(v, base) for v in values)
            + " |"
        )

    for key, label in (
        ("pair_median_us", "pair p50 µs"),
        ("pair_p99_us", "pair p99 µs"),
        ("pair_p999_us", "pair p999 µs"),
        ("pairs_per_s", "pairs/s"),
        ("daemon_cpu_us_per_pair", "daemon CPU µs per pair"),
    ):
        row("sequential", label, virt["sequential"].get(key),
            [lockd[s]["sequential"].get(key) for s in syncs])  # fmt: skip
    for i, level in enumerate(virt["concurrent"]):
        for key, label in (("pair_median_us", "pair p50 µs"), ("pairs_per_s", "pairs/s")):
            row(f"concurrency {level['concurrency']}", label, level.get(key),
                [lockd[s]["concurrent"][i].get(key) for s in syncs])  # fmt: skip
    return lines
