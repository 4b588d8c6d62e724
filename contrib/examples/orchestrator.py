#!/usr/bin/env python3
"""A toy orchestrator that keeps its VMs' disk leases itself, and survives its own restart.

    orchestrator.py --state DIR start   # start 3 fake VMs, lease their disks, exit
    orchestrator.py --state DIR resume  # start again: the running VMs' leases are held again
    orchestrator.py --state DIR stop    # stop the VMs; their leases end as they exit

A second ``start`` while the VMs run starts none: each new VM is refused its disks
(they are held) and is stopped at once. ``stop`` signals only the processes it started
(their pid and start time are in ``vms.json``), never a pid reused since.

The "VMs" are `sleep` processes; each VM's disks are leased for that process
(owner pid = the VM), so they outlive the orchestrator and end with the VM.
Nothing but `lockd.embed` is used: no daemon, no socket.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lockd.embed import LockService
from lockd.procs import start_time
from protocol.client import RemoteError
from protocol.names import FILES_LOCKSPACE, lease_name_for_path

VMS = {"web": ["/vm/web.qcow2"], "db": ["/vm/db.qcow2", "/vm/db-data.raw"], "cache": ["/vm/c.img"]}


def service(state: Path) -> LockService:
    state = state.resolve()  # LockService takes absolute paths only, as the config file
    return LockService(lock_dir=str(state / "locks"), journal_dir=str(state / "journal"))


def disk_leases(paths: list[str]) -> list[dict[str, object]]:
    return [{"lockspace": FILES_LOCKSPACE, "resource": lease_name_for_path(p)} for p in paths]


def start(state: Path) -> None:
    state.mkdir(parents=True, exist_ok=True)
    record = state / "vms.json"
    vms = json.loads(record.read_text()) if record.exists() else {}
    with service(state) as locks:
        for name, disks in VMS.items():
            # A real orchestrator execs QEMU here; the VM runs in its own session.
            vm = subprocess.Popen(
                ["sleep", "600"],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            client = locks.client(f"orchestrator/{name}")
            owner = {"uuid": uuid.uuid4().bytes, "name": name, "id": 1, "pid": vm.pid}
            client.call("register", owner=owner)
            try:
                client.call("acquire", leases=disk_leases(disks), autocreate=True)
            except RemoteError as exc:
                # Its disks are another VM's (this one, from an earlier start): it may
                # not run. A real orchestrator takes the leases before it execs QEMU.
                vm.kill()
                vm.wait()
                print(f"{name} not started: {exc}")
                continue
            finally:
                client.close()
            vms[name] = [vm.pid, start_time(vm.pid)]
            print(f"started {name} (pid {vm.pid}) holding {len(disks)} disk lease(s)")
        # A second VM on the same disk is refused, as it must be.
        intruder = locks.client("orchestrator/intruder")
        owner = {"uuid": uuid.uuid4().bytes, "name": "intruder", "id": 1, "pid": os.getpid()}
        intruder.call("register", owner=owner)
        try:
            intruder.call("acquire", leases=disk_leases(VMS["web"]), autocreate=True)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            print(f"intruder refused: {exc}")
        intruder.close()
    record.write_text(json.dumps(vms))
    print("orchestrator exiting; the VMs keep running")


def resume(state: Path) -> None:
    with service(state) as locks:
        report = locks.report
        assert report is not None
        print(f"recovered: {report.held} leases held again, {report.released} released, "
              f"{report.lost} lost, in {report.duration_ms:.0f} ms")  # fmt: skip
        for lease in locks.client().call("list-leases")["leases"]:
            owners = ", ".join(f"{o['name']} (pid {o['pid']})" for o in lease["owners"])
            print(f"holding {lease['resource'][:12]}… for {owners}")


def stop(state: Path) -> None:
    vms = json.loads((state / "vms.json").read_text())
    with service(state) as locks:
        client = locks.client()
        for name, (pid, started) in vms.items():
            if start_time(pid) != started:  # exited, and its pid perhaps another's now
                print(f"{name} (pid {pid}) is not running")
                continue
            os.kill(pid, signal.SIGTERM)
            print(f"stopped {name}")
        deadline = time.monotonic() + 10
        while client.call("list-leases")["leases"] and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"leases left: {len(client.call('list-leases')['leases'])}")
    (state / "vms.json").unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, required=True, help="lock dir and journal go here")
    parser.add_argument("phase", choices=["start", "resume", "stop"])
    args = parser.parse_args()
    {"start": start, "resume": resume, "stop": stop}[args.phase](args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
