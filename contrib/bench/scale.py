#!/usr/bin/env python3
"""A dense host: many owners holding many leases. Does an acquire get slower, does lockd grow?

Starts ``lockd serve`` on temp paths, and a twin daemon that stays empty;
registers ``--owners`` live processes (sleep) holding ``--leases`` leases
between them on the first (through a manager connection each, as libvirtd
would), then measures acquire+release pairs on both in turns of 100, so
that "empty" and "loaded" see the same moments of a machine whose speed
drifts (``twins_before_fill_median`` is the same comparison before the
fill: it should be about 1). Everything runs on one CPU (``--cpu``), as in
compare.py. Reports the ratio, the
daemon's RSS and thread count (and both on the empty daemon, so a growing
thread count shows), and how far ``lockd events --follow`` lags behind the
replies (p50/p99) under that load. Then ``--storm`` of the owners (1,000:
the default ``max_clients`` is 1,024) start at once on the twin, as a host
booting its VMs does: each VM's connection sends one acquire for its own
disk and the base image they all share, before any reply is read, and
``boot_storm_s`` is how long until the last reply; then half of them stop
while as many others start (``rolling_restart_s``), each stop and start a
connection's one request, interleaved. Last, every owner is
killed at once (a host shutting its VMs down) and ``mass_exit_release_s``
is how long until the daemon holds no lease. If the daemon refuses leases while
filling (EMFILE on a host whose descriptor limit is too low), filling stops
there and ``fill_error`` says why; ``leases`` is what it holds. Prints one
JSON object.

    .venv/bin/python contrib/bench/scale.py --owners 4096 --leases 16384
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lockd.procs import stop_child, wait_listening  # noqa: E402
from protocol.client import Client, RemoteError  # noqa: E402

FILES = "org.libvirt.lockd.files"


def pairs(sock: str, count: int) -> list[float]:
    """Acquire+release pairs by a fresh owner (this process), in microseconds."""
    with Client(sock, name="scale-probe") as c:
        c.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "probe", "id": 1,
                                  "pid": os.getpid()})  # fmt: skip
        lease = {"lockspace": FILES, "resource": "probe-disk"}
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            c.call("acquire", leases=[lease], autocreate=True)
            c.call("release", leases=[lease])
            out.append((time.perf_counter() - t0) * 1e6)
    return out


def alternate(
    sock: str, twin: str, count: int, batch: int = 100
) -> tuple[list[float], list[float]]:
    """``count`` pairs on each daemon, in turns of ``batch``: (pairs on sock, pairs on twin)."""
    mine: list[float] = []
    theirs: list[float] = []
    while len(mine) < count:
        n = min(batch, count - len(mine))
        mine += pairs(sock, n)
        theirs += pairs(twin, n)
    return mine, theirs


def start_daemon(tmp: Path, name: str) -> subprocess.Popen[bytes]:
    """``lockd serve`` on paths under ``tmp`` (``name`` "" for the measured daemon)."""
    base = name or "lockd"
    prefix = f"{name}-" if name else ""
    return subprocess.Popen(
        [sys.executable, "-m", "lockd", "serve", "--socket", str(tmp / f"{base}.sock"),
         "--admin-socket", str(tmp / f"{prefix}admin.sock"), "--lock-dir",
         str(tmp / f"{prefix}locks"), "--journal-dir", str(tmp / f"{prefix}journal")],
        cwd=REPO, stderr=open(tmp / f"{name or 'daemon'}.log", "wb"),
    )  # fmt: skip


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def follow_lag(sock: str, journal: Path, count: int) -> list[float]:
    """ms from an acquire's reply to ``lockd events --follow`` printing it.

    The event is journaled before the reply is sent, so the follower may print
    it before the client has read its reply: that counts as no lag (0), not as
    a negative one, which rounded to a "-0.0 ms" that read like a clock fault.
    """
    with Client(sock, name="scale-position") as c:
        since = str(c.call("status")["journal_seq"] + 1)
    follower = subprocess.Popen(
        [sys.executable, "-m", "lockd", "events", "--follow", "--json",
         "--journal-dir", str(journal), "--type", "lease-acquired", "--since", since],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: dict[str, float] = {}

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            seen[json.loads(line)["resource"]] = time.perf_counter()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    lags = []
    try:
        time.sleep(1.0)
        with Client(sock, name="scale-follow") as c:
            c.call("register", owner={"uuid": uuid.uuid4().bytes, "name": "follow", "id": 1,
                                      "pid": os.getpid()})  # fmt: skip
            for i in range(count):
                name = f"follow-{i}"
                c.call("acquire", leases=[{"lockspace": FILES, "resource": name}], autocreate=True)
                replied = time.perf_counter()
                deadline = replied + 5
                while name not in seen and time.perf_counter() < deadline:
                    time.sleep(0.0005)
                lags.append(max(0.0, seen.get(name, deadline) - replied) * 1000)
                c.call("release", leases=[{"lockspace": FILES, "resource": name}])
    finally:  # the follower never outlives the measurement, whatever happened
        stop_child(follower, signal.SIGINT, wait=10)
    return lags


BASE = {"lockspace": FILES, "resource": "base-image", "shared": True}


def boot_owner(i: int, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    """The owner VM ``i`` of the boot storm registers as (the same at each connection)."""
    return {"uuid": uuid.UUID(int=i + 1).bytes, "name": f"boot{i}", "id": i + 1, "pid": proc.pid}


def at_once(sock: str, owners: list[dict[str, object]], requests: list[dict[str, Any]]) -> float:
    """A connection per owner sends its request, all before any reply is read: seconds
    from the first request sent to the last reply."""
    clients: list[Client] = []
    try:
        for owner in owners:
            client = Client(sock, name="scale-boot", timeout=300)
            clients.append(client)
            client.call("register", owner=owner)
        t0 = time.monotonic()
        sent = [
            client.request(**request) for client, request in zip(clients, requests, strict=True)
        ]
        for client, rid in zip(clients, sent, strict=True):
            client.result(rid)
        return round(time.monotonic() - t0, 2)
    finally:
        for client in clients:  # the leases stay: they are the owners', who live on
            client.close()


def boot_storm(sock: str, sleepers: list[subprocess.Popen[bytes]]) -> float:
    """Every owner asks at once for its own disk and the shared base image."""
    return at_once(sock, [boot_owner(i, proc) for i, proc in enumerate(sleepers)], [
        {"op": "acquire", "autocreate": True,
         "leases": [BASE, {"lockspace": FILES, "resource": f"boot{i}-disk"}]}
        for i in range(len(sleepers))
    ])  # fmt: skip


def rolling_restart(
    sock: str, booted: list[subprocess.Popen[bytes]], fresh: list[subprocess.Popen[bytes]]
) -> float:
    """After :func:`boot_storm`: the first ``len(fresh)`` VMs booted stop (release their
    disk and the base image) while as many new ones start, the requests interleaved."""
    owners: list[dict[str, object]] = []
    requests: list[dict[str, Any]] = []
    for i, proc in enumerate(fresh):
        owners.append(boot_owner(i, booted[i]))
        requests.append(
            {
                "op": "release",
                "leases": [
                    {"lockspace": FILES, "resource": BASE["resource"]},
                    {"lockspace": FILES, "resource": f"boot{i}-disk"},
                ],
            }
        )
        n = len(booted) + i
        owners.append(boot_owner(n, proc))
        requests.append(
            {
                "op": "acquire",
                "autocreate": True,
                "leases": [BASE, {"lockspace": FILES, "resource": f"boot{n}-disk"}],
            }
        )
    return at_once(sock, owners, requests)


def mass_exit(sock: str, sleepers: list[subprocess.Popen[bytes]]) -> float | None:
    """Kill every owner at once (a host shutting its VMs down): seconds until the
    daemon holds no lease, None if that took over 300 s."""
    t0 = time.monotonic()
    for proc in sleepers:
        proc.kill()
    for proc in sleepers:
        proc.wait()
    with Client(sock, name="scale-mass-exit", timeout=120) as client:
        while client.call("status")["leases"]:
            if time.monotonic() - t0 > 300:
                return None
            time.sleep(0.1)  # status counts every lease: not too often
    return round(time.monotonic() - t0, 2)


def owners_watched(metrics: str) -> dict[str, int]:
    """``lockd_owners_watched`` by ``by`` label from ``lockd metrics`` text."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("lockd_owners_watched{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('by="', 1)[1].split('"', 1)[0]] = int(float(value))
    return out


def fd_limit(pid: int) -> int:
    """The daemon's soft RLIMIT_NOFILE (its pidfd budget is an eighth of it)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no fd limit in /proc/{pid}/limits")


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a map (VmRSS, Threads, ...)."""
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())


def main() -> int:  # noqa: PLR0915 - one measurement story, top to bottom
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--owners", type=int, default=4096)
    parser.add_argument("--leases", type=int, default=16384)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument(
        "--storm", type=int, default=1000, help="owners booting at once (on the twin daemon)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, journal)")
    parser.add_argument(
        "--cpu", type=int, default=0, help="run everything on this CPU (-1: unpinned)"
    )
    args = parser.parse_args()
    if args.cpu >= 0:
        # Unpinned, a pair costs ~0.7 ms when client and daemon share a CPU and
        # ~2.5 ms when they do not (a cross-CPU wake-up on this VM), and the
        # scheduler flips between the two: noise far above the effect measured.
        # Children (the daemons, owners, follower) inherit the affinity.
        os.sched_setaffinity(0, {args.cpu})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # One fd per lease and per watched owner: 16,384 + 4,096 is past many hosts'
    # default hard limit (lockd.service sets LimitNOFILE=524288). Root may raise it.
    want = max(hard, 2 * (args.leases + args.owners) + 1024)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="lockd-scale-"))
    sock = str(tmp / "lockd.sock")
    daemon = start_daemon(tmp, "")
    # A twin that stays empty, measured in turns with the loaded daemon: on a
    # shared VM the machine's speed drifts by more than the effect measured,
    # so "empty" must be measured at the same moments as "loaded".
    twin_sock = str(tmp / "twin.sock")
    twin = start_daemon(tmp, "twin")
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        wait_listening(sock, daemon, timeout=60, log=str(tmp / "daemon.log"))
        wait_listening(twin_sock, twin, timeout=60, log=str(tmp / "twin.log"))
        time.sleep(0.3)
        empty_a, empty_b = alternate(sock, twin_sock, args.pairs)
        empty_fields = proc_status(daemon.pid)
        for _ in range(args.owners):
            sleepers.append(subprocess.Popen(["sleep", "3600"]))
        t0 = time.monotonic()
        per_owner = args.leases // args.owners
        fill_error = None
        registered = 0
        with Client(sock, name="scale-manager", timeout=120) as manager:
            for i, proc in enumerate(sleepers):
                with Client(sock, name="scale-manager") as c:
                    c.call("register", owner={"uuid": uuid.uuid4().bytes, "name": f"vm{i}",
                                              "id": i + 1, "pid": proc.pid})  # fmt: skip
                    try:
                        c.call("acquire", autocreate=True, leases=[
                            {"lockspace": FILES, "resource": f"vm{i}-disk{j}"}
                            for j in range(per_owner)
                        ])  # fmt: skip
                    except RemoteError as exc:
                        fill_error = f"owner {i}: {exc}"
                        break
                registered = i + 1
            status = manager.call("status")
            watched = owners_watched(manager.call("metrics")["text"])
        fill_s = time.monotonic() - t0
        loaded, empty = alternate(sock, twin_sock, args.pairs)
        lags = follow_lag(sock, tmp / "journal", 200)
        fields = proc_status(daemon.pid)
        daemon_fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        # On the twin: the loaded daemon's descriptors are near this host's limit.
        storm = sleepers[: args.storm]
        storm_s = boot_storm(twin_sock, storm)
        fresh = sleepers[args.storm : args.storm + len(storm) // 2]
        restart_s = rolling_restart(twin_sock, storm, fresh) if fresh else None
        released_s = mass_exit(sock, sleepers)
        result = {
            "owners": registered,
            "owners_requested": args.owners,
            "owners_watched_by_pidfd": watched.get("pidfd", 0),
            "owners_watched_by_poll": watched.get("poll", 0),
            "daemon_fd_limit": fd_limit(daemon.pid),
            "leases_requested": per_owner * args.owners,
            "leases": status["leases"],
            "fill_error": fill_error,
            "fill_s": round(fill_s, 1),
            "empty_pair_median_us": round(statistics.median(empty), 1),
            "empty_pair_p99_us": p(empty, 0.99),
            "twins_before_fill_median": round(
                statistics.median(empty_a) / statistics.median(empty_b), 3
            ),
            "loaded_pair_median_us": round(statistics.median(loaded), 1),
            "loaded_pair_p99_us": p(loaded, 0.99),
            "loaded_vs_empty_median": round(
                statistics.median(loaded) / statistics.median(empty), 3
            ),
            "daemon_rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "daemon_threads": int(fields["Threads"]),
            "empty_daemon_rss_mib": round(int(empty_fields["VmRSS"].split()[0]) / 1024, 1),
            "empty_daemon_threads": int(empty_fields["Threads"]),
            "daemon_fds": daemon_fds,
            "follow_lag_p50_ms": p(lags, 0.5),
            "follow_lag_p99_ms": p(lags, 0.99),
            "boot_storm_owners": len(storm),
            "boot_storm_s": storm_s,
            "rolling_restart_vms": len(fresh),
            "rolling_restart_s": restart_s,
            "mass_exit_release_s": released_s,
        }
        print(json.dumps(result))
    finally:
        stop_child(daemon, wait=60)
        stop_child(twin, wait=60)
        for proc in sleepers:
            proc.kill()
            proc.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if args.keep:
            print(f"scale.py: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
