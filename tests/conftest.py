"""Fixtures shared by the tests: a dispatcher driven by the test thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from actors.runtime import Dispatcher

# No per-example deadline: on a loaded 2-vCPU CI machine an example that takes 200 ms
# is scheduling, not a slow path, and a deadline turned it into a failure now and then
# (test_any_map_parses_or_raises_a_protocol_error, once in a walkthrough's runs).
settings.register_profile("lockd", deadline=None)
settings.load_profile("lockd")


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    """A dispatcher with no thread; every actor left is stopped at the end."""
    d = Dispatcher()
    yield d
    d.stop_all()
    d.run_until_idle()
    d.close()
