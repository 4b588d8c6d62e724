"""Counters and histograms for ``lockd metrics``, in the Prometheus text format.

One registry per process (``REGISTRY``): every actor runs on the dispatcher
thread, so plain integers need no locks, and an embedding program that runs
the lock system in-process shares it the way Prometheus client libraries
share their default registry. Gauges that describe state (leases held,
clients) are computed when asked, from a snapshot, not kept here.
"""

from __future__ import annotations

import bisect
import gc
from collections.abc import Iterable, Mapping
from typing import Any

from actors.events import ReleaseReason

LabelSet = tuple[tuple[str, str], ...]

GC_STATS = ("collections", "collected", "uncollectable")
"""The keys of ``gc.get_stats()`` exported, in the order a handoff carries them."""

FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

HELP = {
    "lockd_acquires_total": ("counter", "Acquire requests by result (ok or error code)."),
    "lockd_releases_total": ("counter", "Leases released, by reason."),
    "lockd_conflicts_total": (
        "counter",
        "Acquire attempts that found a lease held (busy); each retry of a waiting acquire counts.",
    ),
    "lockd_fence_actions_total": ("counter", "Signals sent to fence owners, by signal."),
    "lockd_leases_lost_total": ("counter", "Leases found taken by another process or host."),
    "lockd_journal_appends_total": ("counter", "Journal write() calls."),
    "lockd_journal_entries_total": ("counter", "Events written to the journal."),
    "lockd_journal_bytes_total": ("counter", "Bytes written to the journal."),
    "lockd_journal_write_errors_total": (
        "counter",
        "Journal writes that failed (nothing granted).",
    ),
    "lockd_journal_sync_errors_total": (
        "counter",
        "Journal fdatasyncs that failed (the changes stand; they may not survive a host crash).",
    ),
    "lockd_events_replayed_total": (
        "counter",
        "Events read back from the journal for subscribers catching up (subscribe since).",
    ),
    "lockd_replay_failures_total": (
        "counter",
        "Subscriber replays cut short by a journal read error (damage, or a passing one "
        "that lasted 5 s): a gap in a subscriber's feed.",
    ),
    "lockd_journal_refusing": (
        "gauge",
        "1 while the journal cannot be written (a full or failing disk): every change is "
        "refused with io-error; 0 otherwise.",
    ),
    "lockd_event_subscribers": (
        "gauge",
        "Connections subscribed to the event feed: live, or catching up from an earlier seq.",
    ),
    "lockd_journal_snapshots_total": (
        "counter",
        "Snapshots at segment rotations, by result (written; failed or skipped while the "
        "last was still being written: old segments stay).",
    ),
    "lockd_owners_watched": (
        "gauge",
        "Registered owners watched for exit, by pidfd or by polling (beyond the pidfd budget).",
    ),
    "lockd_recovery_duration_seconds": ("gauge", "How long the last start-up recovery took."),
    "lockd_journal_fsync_seconds": ("histogram", "fdatasync latency of the journal."),
}


ZERO: dict[str, tuple[LabelSet, ...]] = {
    "lockd_acquires_total": ((("result", "ok"),), (("result", "busy"),)),
    "lockd_releases_total": tuple((("reason", reason.value),) for reason in ReleaseReason),
    "lockd_conflicts_total": ((),),
    "lockd_fence_actions_total": ((("signal", "SIGTERM"),), (("signal", "SIGKILL"),)),
    "lockd_leases_lost_total": ((),),
    "lockd_journal_appends_total": ((),),
    "lockd_journal_entries_total": ((),),
    "lockd_journal_bytes_total": ((),),
    "lockd_journal_write_errors_total": ((),),
    "lockd_journal_sync_errors_total": ((),),
    "lockd_events_replayed_total": ((),),
    "lockd_replay_failures_total": ((),),
    "lockd_journal_snapshots_total": tuple(
        (("result", result),) for result in ("written", "skipped", "failed")
    ),
}
"""Series exported at 0 from the start. A series that first appears at its first
increment hides that increment from ``rate()`` and ``increase()``, so alerts on
``lockd_leases_lost_total`` or ``lockd_journal_write_errors_total`` would miss the
first loss or failure. Error codes other than busy stay out: they are rare, and
their series appear as they happen."""


class Metrics:
    """Named counters with labels, gauges, and fixed-bucket histograms."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[LabelSet, float]] = {
            name: dict.fromkeys(series, 0) for name, series in ZERO.items()
        }
        self.gauges: dict[str, dict[LabelSet, float]] = {}
        self.histograms: dict[str, tuple[list[int], list[float]]] = {}
        self.gc_before: list[tuple[int, ...]] = []
        """The collector's counts (:data:`GC_STATS`) by generation in the earlier programs
        of this process: each re-exec's ``gc.get_stats()`` starts again at 0."""

    def gc_totals(self) -> list[tuple[int, ...]]:
        """The collector's counts (:data:`GC_STATS`) by generation since the process started."""
        totals = [tuple(stats[key] for key in GC_STATS) for stats in gc.get_stats()]
        for generation, before in enumerate(self.gc_before[: len(totals)]):
            totals[generation] = tuple(map(sum, zip(totals[generation], before, strict=True)))
        return totals

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        series = self.counters.get(name)
        if series is None:
            series = self.counters[name] = {}
        # Most series have one label or none: no sort needed (on every request's path).
        key = tuple(labels.items()) if len(labels) < 2 else tuple(sorted(labels.items()))
        series[key] = series.get(key, 0) + amount

    def add(self, name: str, amount: float = 1) -> None:
        """:meth:`inc` for a counter without labels, on a path every request takes
        (the journal's three per write): no keyword dict, no key to build."""
        series = self.counters.get(name)
        if series is None:
            series = self.counters[name] = {}
        series[()] = series.get((), 0) + amount

    def series(self, name: str) -> dict[LabelSet, float]:
        """The live counts of counter ``name``, for a path every request takes.

        The caller keeps the dict and adds to it in place (``series[key] += n``),
        without a call, a keyword dict or a key built per count; only for
        label sets in :data:`ZERO`, which are there from the start. The dict
        is never replaced (``carry_on`` adds to it), so one kept stays live."""
        return self.counters.setdefault(name, {})

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges.setdefault(name, {})[tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float) -> None:
        counts, sums = self.histograms.setdefault(name, ([0] * (len(FSYNC_BUCKETS) + 1), [0.0]))
        counts[bisect.bisect_left(FSYNC_BUCKETS, value)] += 1
        sums[0] += value

    def carried(self) -> dict[str, Any]:
        """Counters and histograms as plain data, for the next program of a re-exec.

        A re-exec is not a restart (the pid, the leases and the uptime stay), so
        the counts go on from where they were rather than dropping to 0, which
        ``rate()`` would read as a restart."""
        return {
            "counters": [
                [name, [[list(map(list, key)), value] for key, value in series.items()]]
                for name, series in self.counters.items()
            ],
            "histograms": [
                [name, list(counts), sums[0], list(FSYNC_BUCKETS)]
                for name, (counts, sums) in self.histograms.items()
            ],
            "gc": [list(counts) for counts in self.gc_totals()],
        }

    def carry_on(self, state: Mapping[str, Any]) -> None:
        """Add the counts a previous program of this process handed over (see :meth:`carried`).

        Counters and histograms this build does not declare (in :data:`HELP`) are
        left behind: a series nothing counts any more would be exported, frozen,
        until the next restart. So are histograms with other buckets than this
        build's: their counts would land in the wrong bounds. The collector's counts
        (``gc``) are added to the new program's own, which ``gc.get_stats()`` starts at 0."""
        # Absent from a build before 2026-11-27, which handed no collector counts over.
        before = [tuple(counts) for counts in state.get("gc", ())]
        if any(len(counts) != len(GC_STATS) for counts in before):
            raise ValueError(f"collector counts not of {len(GC_STATS)}: {before!r}")
        if not all(isinstance(n, int) and n >= 0 for counts in before for n in counts):
            raise ValueError(f"collector counts not counts: {before!r}")
        for name, series in state.get("counters", ()):
            if HELP.get(name, ("",))[0] != "counter":
                continue
            counted = self.counters.setdefault(name, {})
            for key, value in series:
                label_set = tuple((k, v) for k, v in key)
                counted[label_set] = counted.get(label_set, 0) + value
        for name, counts, total, *bounds in state.get("histograms", ()):
            # Without bounds (the first builds to hand histograms over) they are unknown.
            if bounds != [list(FSYNC_BUCKETS)] or len(counts) != len(FSYNC_BUCKETS) + 1:
                continue
            if HELP.get(name, ("",))[0] != "histogram":
                continue
            mine, sums = self.histograms.setdefault(name, ([0] * len(counts), [0.0]))
            for i, count in enumerate(counts):
                mine[i] += count
            sums[0] += total
        self.gc_before = before

    def render(
        self,
        extra_gauges: Iterable[tuple[str, str, Mapping[LabelSet, float]]] = (),
        extra_counters: Iterable[tuple[str, str, Mapping[LabelSet, float]]] = (),
    ) -> str:
        """The exposition text; the extras are (name, help, series) computed by the caller."""
        lines: list[str] = []
        for name, series in sorted(self.counters.items()):
            lines.extend(_family(name, series))
        for name, series in sorted(self.gauges.items()):
            lines.extend(_family(name, series))
        for name, (counts, sums) in sorted(self.histograms.items()):
            kind, text = HELP.get(name, ("histogram", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            running = 0
            for bound, count in zip((*FSYNC_BUCKETS, float("inf")), counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'{name}_bucket{{le="{le}"}} {running}')
            lines += [f"{name}_sum {sums[0]:.6f}", f"{name}_count {running}"]
        for kind, extras in (("gauge", extra_gauges), ("counter", extra_counters)):
            for name, text, extra in extras:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                lines.extend(f"{name}{_labels(k)} {_num(v)}" for k, v in sorted(extra.items()))
        return "\n".join(lines) + "\n"


def gc_counters() -> list[tuple[str, str, dict[LabelSet, float]]]:
    """The cyclic collector's work, by generation, under the Prometheus client's names,
    counted since the process started (across re-execs, as every counter is).

    A full collection (generation 2) stops every request for as long as it
    walks the heap: 40-60 ms with 16,384 leases held on the test VM.
    """
    totals = REGISTRY.gc_totals()
    out: list[tuple[str, str, dict[LabelSet, float]]] = []
    for i, (name, text) in enumerate((
        ("python_gc_collections_total", "Collections, by generation."),
        ("python_gc_objects_collected_total", "Objects freed, by generation."),
        ("python_gc_objects_uncollectable_total", "Objects found uncollectable, by generation."),
    )):  # fmt: skip
        out.append((name, text, {(("generation", str(g)),): t[i] for g, t in enumerate(totals)}))
    return out


def gc_gauges() -> list[tuple[str, str, dict[LabelSet, float]]]:
    """Objects frozen after start-up recovery: later collections skip them."""
    return [("lockd_gc_frozen_objects", "Objects frozen after start-up recovery (the collector "
             "skips them).", {(): gc.get_freeze_count()})]  # fmt: skip


def _family(name: str, series: Mapping[LabelSet, float]) -> list[str]:
    kind, text = HELP.get(name, ("gauge", name))
    out = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    out.extend(f"{name}{_labels(k)} {_num(v)}" for k, v in sorted(series.items()))
    return out


def _labels(labels: LabelSet) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)  # fmt: skip
    return "{" + inner + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6f}"


REGISTRY = Metrics()
"""The process's registry."""
