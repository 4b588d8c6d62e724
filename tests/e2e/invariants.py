"""What must hold after any crash and restart, checked from outside the daemon.

The checks are `lockd verify`'s (:mod:`lockd.verify`), which a crash test outside this
repository runs from the command line; here they run in the test's process, plus the
view of a classic POSIX lock (virtlockd's) on every exclusive lease.
"""

from __future__ import annotations

import os
from pathlib import Path

from lockd.verify import DaemonView, Finding, verify
from tests.e2e.conftest import DaemonProcess
from tests.lockprobe import probe


def listed(daemon: DaemonProcess) -> dict[tuple[str, str], tuple[str, tuple[int, ...]]]:
    with daemon.client("invariants") as client:
        leases = client.call("list-leases")["leases"]
    return {
        (lease["lockspace"], lease["resource"]): (
            lease["mode"],
            tuple(sorted(o["pid"] for o in lease["owners"])),
        )
        for lease in leases
    }


def _view(daemon: DaemonProcess) -> DaemonView:
    """What ``lockd verify --socket S --journal-dir J`` asks the daemon."""
    with daemon.client("invariants") as client:
        rows = client.call("list-lockspaces")["lockspaces"]
        leases = client.call("list-leases")["leases"]
        seq = client.call("status")["journal_seq"]
    lockspaces = {row["name"]: row["path"] for row in rows}
    return DaemonView(str(daemon.socket), lockspaces, leases, seq, str(daemon.journal_dir))


def _verified(daemons: list[DaemonProcess], others: set[Path]) -> list[DaemonView]:
    views = [_view(daemon) for daemon in daemons]
    _, findings = verify(views)
    allowed = {os.path.realpath(path) for path in others}

    def expected(finding: Finding) -> bool:
        return finding.check == "not-reported" and finding.path in allowed

    unexpected = [finding for finding in findings if not expected(finding)]
    assert not unexpected, "\n".join(f"{f.check}: {f.path}: {f.message}" for f in unexpected)
    for view in views:
        for lease in view.leases:
            if lease["mode"] == "exclusive":
                path = Path(view.lockspaces[lease["lockspace"]]) / lease["resource"]
                assert probe(path, "classic", "read") == "busy", f"{path}: free to virtlockd"
    return views


def check(daemon: DaemonProcess, *, others: set[Path] = frozenset()) -> None:  # type: ignore[assignment]
    """Held leases are locked in the kernel, nothing else is, and the journal agrees.

    ``others``: lease files a different process holds on purpose (a thief).
    """
    _verified([daemon], others)


def check_all(daemons: list[DaemonProcess]) -> int:
    """:func:`check` for daemons sharing one lock directory; returns the leases checked.

    Every lease each daemon reports is locked, with its journal agreeing; no
    lease is reported by two daemons unless both hold it shared; and no lease
    file is locked without some daemon reporting it.
    """
    views = _verified(daemons, set())
    return len({(lease["lockspace"], lease["resource"]) for v in views for lease in v.leases})
