"""The handoff a re-exec passes to the next program: what an earlier or a later
build reads of it."""

from __future__ import annotations

import logging

import attrs
import cbor2
import pytest

from actors.connection import HandedOver
from lockd.reexec import Handoff, ListenerFd
from tests.lockd.test_compat import earlier_connection_keys


def _conn(
    conn_id: int,
    *,
    subscribed: bool,
    events_from: int | None,
    name: str = "",
    identified: bool = False,
    opened_seq: int = 0,
) -> HandedOver:
    return HandedOver(
        conn_id=conn_id, fd=10 + conn_id, peer_pid=100, peer_uid=0, admin=False,
        connected_since=1.0, owner=None, restricted=False, subscribed=subscribed,
        version=1, pending=b"", unsent=b"", events_from=events_from, name=name,
        identified=identified, opened_seq=opened_seq,
    )  # fmt: skip


def _handoff(*conns: HandedOver) -> Handoff:
    return Handoff((ListenerFd(3, "/run/l.sock", False),), conns, (), 7)


def test_a_subscriber_s_next_seq_is_carried() -> None:
    conns = (
        _conn(1, subscribed=True, events_from=4242, name="lockd-events"),
        _conn(2, subscribed=False, events_from=None),
    )
    assert Handoff.from_bytes(_handoff(*conns).to_bytes()).connections == conns


def test_whether_a_connection_s_peer_is_journaled_is_carried_beside_the_maps() -> None:
    """The next program writes no second ``connection-opened`` for a connection whose
    record is in; the flag travels beside the connection maps (an earlier build takes
    each map's keys as they are), and a handoff without it (an earlier build's) says
    none is."""
    conns = (
        _conn(1, subscribed=False, events_from=None, identified=True),
        _conn(2, subscribed=False, events_from=None),
    )
    raw = cbor2.loads(_handoff(*conns).to_bytes())
    assert raw["identified"] == [1]
    assert set(raw["connections"][0]) == earlier_connection_keys()
    assert Handoff.from_bytes(_handoff(*conns).to_bytes()).connections == conns
    del raw["identified"]
    assert not any(c.identified for c in Handoff.from_bytes(cbor2.dumps(raw)).connections)


def test_where_a_connection_s_record_was_last_written_is_carried_beside_the_maps() -> None:
    """The next program keeps a live connection's ``connection-opened`` from the seq of
    its last copy; a handoff without it (an earlier build's) says it is not known (0),
    and retention then writes it again before deleting any segment."""
    conns = (
        _conn(1, subscribed=False, events_from=None, identified=True, opened_seq=4242),
        _conn(2, subscribed=False, events_from=None, identified=True),
    )
    raw = cbor2.loads(_handoff(*conns).to_bytes())
    assert raw["opened"] == {1: 4242}
    assert set(raw["connections"][0]) == earlier_connection_keys()
    assert Handoff.from_bytes(_handoff(*conns).to_bytes()).connections == conns
    del raw["opened"]
    assert [c.opened_seq for c in Handoff.from_bytes(cbor2.dumps(raw)).connections] == [0, 0]


def test_each_connection_map_keeps_the_keys_an_earlier_build_passes_to_handed_over() -> None:
    """An earlier build builds HandedOver from each connection's map as it is: a key it
    does not know would stop a downgrade's new program. The keys are those of a handoff
    the first day's build wrote (tests/compat). The seq travels beside them."""
    raw = cbor2.loads(_handoff(_conn(1, subscribed=True, events_from=9, name="x")).to_bytes())
    assert set(raw["connections"][0]) == earlier_connection_keys()
    assert raw["events_from"] == {1: 9}
    assert raw["names"] == {1: "x"}


def test_a_handoff_from_an_earlier_build_subscribes_from_the_next_event() -> None:
    raw = cbor2.loads(_handoff(_conn(1, subscribed=True, events_from=9)).to_bytes())
    del raw["events_from"]
    (conn,) = Handoff.from_bytes(cbor2.dumps(raw)).connections
    assert conn.subscribed
    assert conn.events_from is None
    raw["events_from"] = {1: "nonsense"}
    (conn,) = Handoff.from_bytes(cbor2.dumps(raw)).connections
    assert conn.events_from is None
    assert conn.name == ""  # nor did it say the client's name


def test_a_connection_map_with_a_key_this_build_does_not_know_is_taken_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A later build that put a new key into a connection's map (where an earlier build
    takes the keys as they are) stopped this one's start after a downgrade's exec: every
    lock handed over went with it. The key is left behind, and the log says so."""
    conn = _conn(1, subscribed=False, events_from=None)
    raw = cbor2.loads(_handoff(conn).to_bytes())
    raw["connections"][0]["priority"] = 7
    with caplog.at_level(logging.WARNING, logger="lockd.reexec"):
        assert Handoff.from_bytes(cbor2.dumps(raw)).connections == (conn,)
    assert "client 1's 'priority' left behind" in caplog.text


def test_the_fd_stores_names_are_carried_and_an_earlier_builds_handoff_has_none() -> None:
    """The next program knows which name the store keeps each lease under, and which
    names it holds for no lease; a handoff without them (an earlier build's) means each
    lease's is its hashed name."""
    names = ((("files", "disk", "l0"), ("files", "other", "l2")), ("l1",))
    handoff = attrs.evolve(_handoff(), fd_names=names)
    assert Handoff.from_bytes(handoff.to_bytes()).fd_names == names
    raw = cbor2.loads(handoff.to_bytes())
    assert {"fd_names", "fd_held"} <= raw.keys()
    del raw["fd_names"], raw["fd_held"]
    assert Handoff.from_bytes(cbor2.dumps(raw)).fd_names is None
