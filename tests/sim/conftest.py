"""Options for the simulation: replay one seed, or run a longer soak."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lockd simulation")
    group.addoption("--sim-seed", type=int, default=None, help="replay one schedule by its seed")
    group.addoption(
        "--sim-schedules", type=int, default=300, help="random schedules to run (CI: 300)"
    )
    group.addoption("--sim-steps", type=int, default=40, help="steps per schedule")


@pytest.fixture(autouse=True)
def quiet_logs() -> object:
    """The simulated daemons log every refusal and fence; thousands of schedules drown a run."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    yield None
    logging.disable(previous)
