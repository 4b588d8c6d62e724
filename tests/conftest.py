"""Fixtures shared by the tests: a dispatcher driven by the test thread."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import settings

from actors.runtime import Dispatcher

# No per-example deadline: on a loaded 2-vCPU CI machine an example that takes 200 ms
# is scheduling, not a slow path, and a deadline turned it into a failure now and then
# (test_any_map_parses_or_raises_a_protocol_error, once in a walkthrough's runs).
settings.register_profile("lockd", deadline=None)
settings.load_profile("lockd")


def pytest_configure(config: pytest.Config) -> None:
    """Every daemon the tests start reads an empty configuration file, not this host's:
    as root that is /etc/lockd/lockd.toml, which a lockd installed here (an operator's,
    or a walkthrough of the docs) fills with its own max_clients, log level and paths."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Run in the background by a shell (`make test &`, nohup), the tests start with
        # SIGINT ignored, which every command they start inherits: the tests of Ctrl-C
        # on `lockd events --follow` or `--wait` saw it ignored and failed.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if "LOCKD_CONFIG" not in os.environ:
        fd, path = tempfile.mkstemp(prefix="lockd-test-", suffix=".toml")
        os.close(fd)
        os.environ["LOCKD_CONFIG"] = path
        config.add_cleanup(lambda: os.unlink(path))


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    """A dispatcher with no thread; every actor left is stopped at the end."""
    d = Dispatcher()
    yield d
    d.stop_all()
    d.run_until_idle()
    d.close()
