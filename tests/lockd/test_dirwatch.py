"""``events --follow``'s wait for the journal to change."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any

import pytest

from lockd import dirwatch
from lockd.dirwatch import DirWatch


@pytest.fixture
def watch(tmp_path: Path) -> Any:
    w = DirWatch(str(tmp_path))
    yield w
    w.close()


def test_an_idle_directory_lets_the_wait_time_out(watch: DirWatch) -> None:
    assert watch.notified
    started = time.monotonic()
    assert watch.wait(0.2) is False
    assert time.monotonic() - started >= 0.19


def test_an_append_wakes_the_wait_and_is_drained(watch: DirWatch, tmp_path: Path) -> None:
    segment = tmp_path / "seg"
    segment.write_bytes(b"header")  # created: one wake-up
    assert watch.wait(5.0) is True
    with open(segment, "ab") as f:
        for _ in range(50):  # many writes: still one wake-up, then quiet
            f.write(b"record")
            f.flush()
    assert watch.wait(5.0) is True
    assert watch.wait(0.05) is False


def test_a_new_segment_moved_in_wakes_the_wait(watch: DirWatch, tmp_path: Path) -> None:
    staged = tmp_path.parent / f"{tmp_path.name}-staged"
    staged.write_bytes(b"x")
    staged.rename(tmp_path / "moved")
    assert watch.wait(5.0) is True


def test_without_inotify_it_polls_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_libc(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    w = DirWatch(str(tmp_path))
    assert not w.notified
    started = time.monotonic()
    assert w.wait(5.0) is True  # look again: a change cannot be ruled out
    assert time.monotonic() - started < dirwatch.FALLBACK_POLL_SECONDS + 0.5
