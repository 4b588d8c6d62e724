"""Counters handed from one program of the daemon to the next (a re-exec)."""

from __future__ import annotations

import cbor2

from actors.metrics import FSYNC_BUCKETS, Metrics


def test_counts_handed_over_go_on_from_where_they_were() -> None:
    """Through CBOR, as the handoff carries them: labels, values and histogram buckets."""
    before = Metrics()
    before.inc("lockd_acquires_total", result="ok")
    before.inc("lockd_acquires_total", 2, result="busy")
    before.inc("lockd_releases_total", reason="client")
    before.inc("custom_total", 3, b="2", a="1")  # two labels: a sorted key
    before.observe("lockd_journal_fsync_seconds", 0.002)
    after = Metrics()
    after.inc("lockd_acquires_total", result="ok")  # counted by the new program already
    after.carry_on(cbor2.loads(cbor2.dumps(before.carried())))
    assert after.counters["lockd_acquires_total"][(("result", "ok"),)] == 2
    assert after.counters["lockd_acquires_total"][(("result", "busy"),)] == 2
    assert after.counters["custom_total"][(("a", "1"), ("b", "2"))] == 3
    after.inc("custom_total", a="1", b="2")
    assert after.counters["custom_total"][(("a", "1"), ("b", "2"))] == 4
    assert 'lockd_journal_fsync_seconds_bucket{le="0.0025"} 1' in after.render()


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
    after.carry_on({"histograms": [["h", counts, 0.0, list(FSYNC_BUCKETS)]]})
    assert "h" in after.histograms
