"""Fixtures shared by the tests: a dispatcher driven by the test thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from actors.runtime import Dispatcher


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    """A dispatcher with no thread; every actor left is stopped at the end."""
    d = Dispatcher()
    yield d
    d.stop_all()
    d.run_until_idle()
    d.close()
