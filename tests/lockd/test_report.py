"""contrib/bench/report.py's rewriting of docs/performance.md, without running benchmarks.

The author edits the prose around the generated block by hand, so the one
promise that matters is that a run touches nothing outside the markers and
refuses loudly when they are missing rather than appending or guessing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "contrib/bench/report.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()

RESULTS: dict[str, Any] = {
    "machine": {"cpu": "Test CPU 9000", "nproc": 2, "kernel": "6.1.0", "python": "3.11.7",
                "lockd": "0.1.0", "virtlockd": None, "date": "2026-11-26 03:59 UTC"},
    "command": ".venv/bin/python contrib/bench/report.py",
    "quick": False,
    "compare": {
        "virtlockd": {
            "sequential": {"pair_median_us": 200.0, "pair_p99_us": 400.0, "pairs_per_s": 5000.0},
            "concurrent": [{"concurrency": c, "pair_median_us": 180.0 * c, "pairs_per_s": 5000.0}
                           for c in (1, 4, 16)],
        },
        "lockd": {
            sync: {
                "sequential": {"pair_median_us": 200.0 * k, "pair_p99_us": 400.0 * k,
                               "pair_p999_us": 900.0 * k, "pairs_per_s": 5000.0 / k},
                "concurrent": [{"concurrency": c, "pair_median_us": 180.0 * c * k,
                                "pairs_per_s": 5000.0 / k} for c in (1, 4, 16)],
                "floor": {"fcntl_pair_us": 2.7, "socket_rpc_us": 13.4,
                          "python_server_rpc_us": 65.0},
            }
            for sync, k in (("none", 4), ("batch", 8))
        },
    },
    "compare_settings": {"cpu": 0, "repeat": 3},
    "floor": {"fcntl_pair_us": 2.7, "socket_rpc_us": 13.4, "python_server_rpc_us": 65.0},
    "floor_source": "compare",
    "scale_target": {"owners": 4096, "leases": 16384},
    "scale": {"owners": 4096, "leases": 16384, "fill_error": None, "fill_s": 7.0,
              "empty_pair_median_us": 800.0, "empty_pair_p99_us": 1300.0,
              "loaded_pair_median_us": 880.0, "loaded_pair_p99_us": 2700.0,
              "loaded_vs_empty_median": 1.1, "daemon_rss_mib": 90.5, "daemon_threads": 1,
              "empty_daemon_threads": 1, "daemon_fds": 20500, "follow_lag_p50_ms": 9.0,
              "follow_lag_p99_ms": 9.7},
    "recovery_target": {"leases": 16384, "owners": 1024, "events": 1000000},
    "recovery": {"leases": 16384, "owners": 1024, "events": 1000000,
                 "exec_to_first_answer_ms": 1560.0, "recovery_completed_ms": 1035.0,
                 "held_again": 16384, "released": 0, "lost": 0, "leases_listed": 16384,
                 "daemon_rss_mib": 83.0, "daemon_threads": 1},
}  # fmt: skip

BEFORE = "# Performance\n\nHow it was measured, by hand.\n\n"
AFTER = "\n\n## First numbers\n\nProse the author keeps editing. 729 µs.\n"
DOC = f"{BEFORE}{report.BEGIN}\nNot generated yet.\n{report.END}{AFTER}"


def _block(doc: str) -> str:
    return doc[doc.index(report.BEGIN) + len(report.BEGIN) : doc.index(report.END)]


def test_only_the_block_between_the_markers_changes() -> None:
    """Everything outside the markers, markers included, is byte-for-byte the same."""
    new = report.rewrite(DOC, RESULTS)
    assert new.startswith(BEFORE + report.BEGIN)
    assert new.endswith(report.END + AFTER)
    assert "Not generated yet." not in new
    assert report.rewrite(new, RESULTS) == new  # a second run with the same results: no change


def test_the_block_holds_machine_command_table_floors_and_targets() -> None:
    """What the issue asks for: machine, command, ratios to virtlockd, floors, pass/fail."""
    block = _block(report.rewrite(DOC, RESULTS))
    assert "Test CPU 9000, 2 CPUs, Linux 6.1.0, Python 3.11.7" in block
    assert "2026-11-26 03:59 UTC" in block
    assert "`.venv/bin/python contrib/bench/report.py`" in block
    header = "| scenario | metric | virtlockd | lockd (none) | lockd (batch) | ratio (none) |"
    assert header in block
    assert "| sequential | pair p50 µs | 200 | 800 | 1,600 | 4.00x | 8.00x |" in block
    assert "| sequential | pair p999 µs | — | 3,600 | 7,200 | — | — |" in block
    assert "| concurrency 16 | pairs/s | 5,000 | 1,250 | 625 | 0.25x | 0.12x |" in block
    assert "| minimal Python epoll server" in block
    assert "| 65.0 |" in block
    assert "| scale: pair p50, loaded / empty | ≤ 1.2x | 1.10x (880 / 800 µs) | pass |" in block
    assert "| restart after SIGKILL: exec to first answer | < 2 s | 1.56 s | pass |" in block
    assert "**fail**" not in block


def test_missed_targets_are_marked_fail() -> None:
    """A target missed shows as **fail**, next to the number that missed it."""
    results = copy.deepcopy(RESULTS)
    results["scale"].update(daemon_rss_mib=300.0, daemon_threads=3, follow_lag_p99_ms=80.0)
    results["recovery"].update(exec_to_first_answer_ms=2500.0, held_again=16000, lost=384)
    block = _block(report.rewrite(DOC, results))
    assert "| scale: daemon RSS with that state | < 256 MiB | 300.0 MiB | **fail** |" in block
    assert "| scale: daemon threads | constant (1 when empty) | 3 | **fail** |" in block
    assert "| < 50 ms | 80.0 ms (9.0 ms) | **fail** |" in block
    assert "| restart after SIGKILL: exec to first answer | < 2 s | 2.50 s | **fail** |" in block
    assert "| all 16,384 | 16,000 (lost 384, listed 16,384) | **fail** |" in block


def test_skipped_or_failed_runs_say_why() -> None:
    """No virtlockd (not root) and a benchmark that failed are written down, not dropped."""
    results = copy.deepcopy(RESULTS)
    del results["compare"]
    results["compare_skipped"] = "compare.py needs root"
    results["floor_source"] = "report"
    results["scale"] = {"error": "scale.py exited with 1: EMFILE"}
    results["recovery"] = {"error": "exited with 1: a | b"}
    block = _block(report.rewrite(DOC, results))
    assert "Not measured in this run: compare.py needs root." in block
    assert "| scale | ran | not run: scale.py exited with 1: EMFILE | **fail** |" in block
    assert "| restart | ran | not run: exited with 1: a \\| b | **fail** |" in block  # one cell
    assert "not pinned (compare.py did not run)" in block


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("# Performance\n\nNo markers at all.\n", "BEGIN GENERATED"),
        (f"{report.BEGIN}\nan end marker was deleted\n", "END GENERATED"),
        (f"{report.BEGIN}\n{report.END}\n{report.BEGIN}\n{report.END}\n", "found 2"),
        (f"{report.END}\nswapped\n{report.BEGIN}\n", "comes before"),
    ],
)
def test_missing_or_broken_markers_fail_clearly(doc: str, message: str) -> None:
    """No guessing where the numbers go: a clear error naming the marker."""
    with pytest.raises(report.MarkerError, match=message):
        report.rewrite(doc, RESULTS)


def test_the_performance_doc_has_the_markers() -> None:
    """docs/performance.md is ready for the script: one block, prose outside it kept."""
    doc = (REPO / "docs" / "performance.md").read_text()
    new = report.rewrite(doc, RESULTS)
    head, tail = doc.split(report.BEGIN)
    assert new.startswith(head + report.BEGIN)
    assert new.endswith(report.END + tail.split(report.END)[1])


def test_load_renders_saved_results_into_a_document(tmp_path: Path) -> None:
    """--load re-renders saved results without measuring: the whole command path, in a second."""
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(RESULTS))
    doc = tmp_path / "performance.md"
    doc.write_text(DOC)
    done = subprocess.run(
        [sys.executable, str(REPO / "contrib/bench/report.py"), "--load", str(saved),
         "--doc", str(doc)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert doc.read_text() == report.rewrite(DOC, RESULTS)
    doc.write_text("# no markers\n")
    refused = subprocess.run(
        [sys.executable, str(REPO / "contrib/bench/report.py"), "--load", str(saved),
         "--doc", str(doc)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "BEGIN GENERATED" in refused.stderr
    assert doc.read_text() == "# no markers\n"


def test_the_command_shown_leaves_out_output_only_flags() -> None:
    """--save/--no-write change where results go, not what they are: a reader repeats the rest."""
    shown = report._command(["--quick", "--no-write", "--save", "/tmp/r.json", "--doc=x.md"])
    assert shown.endswith("contrib/bench/report.py --quick")
    assert report._command(["--owners", "64", "--leases", "256"]).endswith(
        "report.py --owners 64 --leases 256"
    )


def test_a_quick_run_does_not_fail_its_sizes() -> None:
    """--quick runs small sizes on purpose: the size rows are not judged, the rest still are."""
    results = copy.deepcopy(RESULTS)
    results["quick"] = True
    results["scale"].update(owners=256, leases=1024, daemon_rss_mib=300.0)
    results["recovery"].update(leases=1024, owners=64, events=10000, held_again=1024,
                               leases_listed=1024)  # fmt: skip
    block = _block(report.rewrite(DOC, results))
    assert "| scale: live owners / leases held | 4,096 / 16,384 | 256 / 1,024 | — |" in block
    assert "| 16,384 / 1,024 / 1,000,000 | 1,024 / 64 / 10,000 | — |" in block
    assert "| scale: daemon RSS with that state | < 256 MiB | 300.0 MiB | **fail** |" in block
    assert block.count("**fail**") == 1
