"""What ``lockd serve`` sets for its whole process, checked in-process."""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.connection import ConnectionActor
from lockd.config import Config
from lockd.daemon import FULL_COLLECTION_AFTER, Daemon
from protocol.client import Client
from protocol.names import FILES_LOCKSPACE


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Config]:
    threshold = gc.get_threshold()
    yield Config(
        socket=str(tmp_path / "s"),
        admin_socket=str(tmp_path / "a"),
        lock_dir=str(tmp_path / "locks"),
        journal_dir=str(tmp_path / "journal"),
    )
    gc.unfreeze()
    gc.set_threshold(*threshold)
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
        assert gc.get_threshold()[2] == FULL_COLLECTION_AFTER
    finally:
        daemon.system.shutdown("test done")


def test_client_connections_leave_nothing_for_the_cyclic_collector(config: Config) -> None:
    """Whole connections over the real socket (register, acquire, release, status, close)
    free what they make by reference counting (why full collections can be rare), and
    the actors they start (connection, lease) stop."""
    daemon = Daemon(config, embedded=True)
    serving = threading.Thread(target=daemon.run, name="lockd-test")
    serving.start()
    try:
        assert daemon.system.ready.wait(10)

        def session() -> None:
            with Client(config.socket) as client:
                owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": os.getpid()}
                client.call("register", owner=owner)
                lease = {"lockspace": FILES_LOCKSPACE, "resource": "disk"}
                client.call("acquire", leases=[lease], autocreate=True)
                client.call("release", leases=[lease])
                client.call("status")
            # The daemon sees the close on its own thread: wait until it has.
            deadline = time.monotonic() + 10
            while True:
                with Client(config.socket) as probe:
                    if probe.call("status")["clients"] == 1:  # only the probe
                        break
                assert time.monotonic() < deadline
                time.sleep(0.01)

        def running() -> int:
            # Closed connections stop (and leave the set) on the daemon's thread: wait.
            deadline = time.monotonic() + 10
            while True:
                actors = list(daemon.system.dispatcher.actors)
                if sum(isinstance(a, ConnectionActor) for a in actors) == 0:
                    return len(actors)
                assert time.monotonic() < deadline
                time.sleep(0.01)

        session()  # the lockspace actor and the first client start
        before = running()
        gc.collect()
        gc.disable()
        for _ in range(20):
            session()
        assert gc.collect() == 0
        assert running() == before  # and every actor they started has stopped
    finally:
        gc.enable()
        daemon.request_stop("test done")
        serving.join(10)
        assert not serving.is_alive()


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
