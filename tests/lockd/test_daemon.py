"""What ``lockd serve`` sets for its whole process, checked in-process."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockd.config import Config
from lockd.daemon import Daemon


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Config]:
    yield Config(
        socket=str(tmp_path / "s"),
        admin_socket=str(tmp_path / "a"),
        lock_dir=str(tmp_path / "locks"),
        journal_dir=str(tmp_path / "journal"),
    )
    gc.unfreeze()
    gc.enable()


def test_serve_keeps_the_collector_out_of_recovery_and_on_afterwards(config: Config) -> None:
    """Off while recovery builds the state it keeps; on once the daemon serves, with that
    state frozen (left off, reference cycles from other paths would never be freed)."""
    assert gc.get_freeze_count() == 0
    daemon = Daemon(config, sockets=False)
    try:
        assert not gc.isenabled()
        daemon.dispatcher.run_until_idle()
        assert daemon.system.ready.is_set()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    finally:
        daemon.system.shutdown("test done")


def test_an_embedded_lock_system_leaves_the_collector_alone(config: Config) -> None:
    """The collector belongs to the program that embeds lockd."""
    gc.disable()
    daemon = Daemon(config, sockets=False, embedded=True)
    try:
        daemon.dispatcher.run_until_idle()
        assert daemon.system.ready.is_set()
        assert not gc.isenabled()
        assert gc.get_freeze_count() == 0
    finally:
        daemon.system.shutdown("test done")
