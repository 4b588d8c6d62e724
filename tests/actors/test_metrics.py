"""Counters handed from one program of the daemon to the next (a re-exec)."""

from __future__ import annotations

import gc

import cbor2
import pytest

from actors.events import ReleaseReason
from actors.metrics import FSYNC_BUCKETS, Metrics


def test_counts_handed_over_go_on_from_where_they_were() -> None:
    """Through CBOR, as the handoff carries them: labels, values and histogram buckets."""
    before = Metrics()
    before.inc("lockd_acquires_total", result="ok")
    before.inc("lockd_acquires_total", 2, result="busy")
    before.inc("lockd_releases_total", reason="client")
    before.inc("lockd_journal_snapshots_total", 3, result="written", why="rotation")
    before.observe("lockd_journal_fsync_seconds", 0.002)
    after = Metrics()
    after.inc("lockd_acquires_total", result="ok")  # counted by the new program already
    after.carry_on(cbor2.loads(cbor2.dumps(before.carried())))
    assert after.counters["lockd_acquires_total"][(("result", "ok"),)] == 2
    assert after.counters["lockd_acquires_total"][(("result", "busy"),)] == 2
    snapshots = after.counters["lockd_journal_snapshots_total"]
    assert snapshots[(("result", "written"), ("why", "rotation"))] == 3  # two labels: sorted
    after.inc("lockd_journal_snapshots_total", why="rotation", result="written")
    assert snapshots[(("result", "written"), ("why", "rotation"))] == 4
    assert 'lockd_journal_fsync_seconds_bucket{le="0.0025"} 1' in after.render()


def test_what_this_build_does_not_count_is_left_behind() -> None:
    """A counter or histogram an earlier build had and this one dropped: exported, it
    would stay frozen at its last value until the next restart."""
    before = Metrics()
    before.inc("lockd_dropped_total", 3, reason="gone")
    before.observe("lockd_dropped_seconds", 0.002)
    before.inc("lockd_conflicts_total")
    after = Metrics()
    after.carry_on(before.carried())
    assert after.counters["lockd_conflicts_total"] == {(): 1}
    assert "lockd_dropped_total" not in after.counters
    assert after.histograms == {}
    assert "lockd_dropped" not in after.render()


def test_a_histogram_with_other_buckets_is_left_behind() -> None:
    """Another build's bounds: its counts would land in the wrong buckets."""
    after = Metrics()
    counts = [0] * (len(FSYNC_BUCKETS) + 1)
    moved = [*FSYNC_BUCKETS[:-1], 2.0]  # as many bounds, one of them moved
    after.carry_on({"histograms": [["lockd_journal_fsync_seconds", [1, 2], 0.5, [0.1]],
                                   ["h1", counts, 0.0, moved]]})  # fmt: skip
    assert after.histograms == {}
    after.carry_on({"histograms": [["h0", counts, 0.0]]})  # an earlier build's: no bounds
    assert after.histograms == {}
    fsync = "lockd_journal_fsync_seconds"
    after.carry_on({"histograms": [[fsync, counts, 0.0, list(FSYNC_BUCKETS)]]})
    assert fsync in after.histograms


def test_every_release_reason_is_exported_at_0() -> None:
    """``rollback`` (an acquire whose client left) was missing: its first increment
    was lost to ``increase()``, as for any series that appears with it."""
    text = Metrics().render()
    for reason in ReleaseReason:
        assert f'lockd_releases_total{{reason="{reason.value}"}} 0' in text


def test_a_series_kept_at_hand_counts_in_the_registry_and_is_handed_over() -> None:
    """The hot path adds to a counter's series in place: the count is what ``metrics``
    shows, and what a re-exec hands over adds to it without replacing the dict kept."""
    before = Metrics()
    acquires = before.series("lockd_acquires_total")
    acquires[(("result", "ok"),)] += 2
    assert 'lockd_acquires_total{result="ok"} 2' in before.render()
    after = Metrics()
    kept = after.series("lockd_acquires_total")
    after.carry_on(cbor2.loads(cbor2.dumps(before.carried())))
    kept[(("result", "ok"),)] += 1
    assert 'lockd_acquires_total{result="ok"} 3' in after.render()
    assert after.series("lockd_acquires_total") is kept


def test_the_collectors_counts_go_on_across_a_reexec() -> None:
    """``gc.get_stats()`` starts at 0 in each program: the python_gc_* counters dropped at
    every reload, which ``rate()`` reads as a restart. The counts handed over are added."""
    before = Metrics()
    before.gc_before = [(10**6, 5 * 10**6, 1)] * len(gc.get_stats())
    handed = cbor2.loads(cbor2.dumps(before.carried()))
    after = Metrics()
    after.carry_on(handed)
    for was, now in zip(before.gc_totals(), after.gc_totals(), strict=True):
        assert all(n >= w for w, n in zip(was, now, strict=True))


@pytest.mark.parametrize("gc_counts", [[[1, 2]], [[1, 2, "x"]], [[1, 2, -3]]])
def test_collector_counts_that_make_no_sense_carry_nothing(gc_counts: list[list[object]]) -> None:
    """Refused whole (the daemon logs it and starts), before any counter is added."""
    after = Metrics()
    with pytest.raises(ValueError, match="collector counts"):
        after.carry_on({"counters": [["lockd_conflicts_total", [[[], 5]]]], "gc": gc_counts})
    assert after.counters["lockd_conflicts_total"] == {(): 0}
    assert after.gc_before == []
