"""Events and owners survive the trip to their CBOR map and back."""

from __future__ import annotations

import cbor2
import pytest

from actors.events import (
    EVENT_TYPES,
    ConfigReloaded,
    ConnectionOpened,
    DaemonStarted,
    DaemonStopped,
    Fence,
    JournalEntry,
    JournalResumed,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    LockspaceCreated,
    OwnerFenced,
    RecoveryCompleted,
    ReleaseReason,
    ResourceCreated,
    ResourceDeleted,
    UnknownEvent,
    event_from_wire,
    event_to_wire,
)
from actors.model import LeaseMode, Owner

OWNER = Owner(uuid=b"\x01" * 16, name="vm1", id=3, pid=4242, start_time=99)


def test_entry_round_trips_through_cbor() -> None:
    """An entry encoded as a CBOR map decodes to an equal entry."""
    entry = JournalEntry(
        seq=7,
        time=1764000000.5,
        host="hv1",
        event=LeaseReleased("ls", "r1", LeaseMode.SHARED, OWNER, 5, ReleaseReason.OWNER_EXIT),
    )
    data = cbor2.loads(cbor2.dumps(entry.to_wire()))
    assert data["type"] == "lease-released"
    assert data["reason"] == "owner-exit"
    assert JournalEntry.from_wire(data) == entry


def test_recovery_completed_carries_its_fences_and_reads_older_records() -> None:
    """The fences a recovery goes on with round-trip with their owners (boot id included);
    a record of an older lockd, without them, reads as none; a malformed one is refused."""
    owner = Owner(b"\x01" * 16, "vm1", 3, 4242, 99, b"\x02" * 16)
    event = RecoveryCompleted(5, 1, 1, 12.5, (Fence(owner, "lease ls/r1 was taken"),))
    entry = JournalEntry(seq=9, time=1764000000.5, host="hv1", event=event)
    data = cbor2.loads(cbor2.dumps(entry.to_wire()))
    assert data["fencing"] == [{"owner": owner.to_wire(), "reason": "lease ls/r1 was taken"}]
    assert JournalEntry.from_wire(data) == entry
    del data["fencing"]
    assert JournalEntry.from_wire(data).event == RecoveryCompleted(5, 1, 1, 12.5)
    with pytest.raises(ValueError, match="malformed"):
        JournalEntry.from_wire({**data, "fencing": [{"owner": owner.to_wire()}]})


def test_a_fence_keeps_the_time_it_began_and_ignores_keys_it_does_not_know() -> None:
    """A resumed fence carries when it began (its deadline counts from then); a fence
    that begins now carries none; keys a later lockd may add are skipped."""
    owner = Owner(b"\x01" * 16, "vm1", 3, 4242, 99)
    begun = Fence(owner, "connection closed", since=1764000000.25)
    event = RecoveryCompleted(1, 0, 0, 3.0, (begun, Fence(owner, "lease ls/r1 was taken")))
    data = cbor2.loads(cbor2.dumps(JournalEntry(2, 1764000001.0, "hv1", event).to_wire()))
    assert [fence.get("since") for fence in data["fencing"]] == [1764000000.25, None]
    data["fencing"][0]["later"] = "something"
    assert JournalEntry.from_wire(data).event == event
    data["fencing"][0]["since"] = "soon"
    with pytest.raises(ValueError, match="malformed"):
        JournalEntry.from_wire(data)


def test_a_user_s_fence_names_its_uid_and_root_s_leaves_the_key_out() -> None:
    """``owner-fenced`` and a handed-on fence name the uid a user's fence signals for
    (``on_behalf_of``); root's fence leaves the key out, as records of an older lockd
    have none, and both read back as they were; a uid that is no uid is refused."""
    owner = Owner(b"\x01" * 16, "vm1", 3, 4242, 99)
    users = OwnerFenced(owner, "SIGTERM", "connection closed", on_behalf_of=1000)
    assert event_to_wire(users)["on_behalf_of"] == 1000
    assert event_from_wire(cbor2.loads(cbor2.dumps(event_to_wire(users)))) == users
    roots = OwnerFenced(owner, "SIGTERM", "admin disconnect by uid 0, pid 7")
    assert "on_behalf_of" not in event_to_wire(roots)
    assert event_from_wire(event_to_wire(roots)).on_behalf_of is None  # type: ignore[attr-defined]
    handed = RecoveryCompleted(1, 0, 0, 3.0, (Fence(owner, "closed", 5.0, on_behalf_of=1000),))
    data = cbor2.loads(cbor2.dumps(event_to_wire(handed)))
    assert data["fencing"][0]["on_behalf_of"] == 1000
    assert event_from_wire(data) == handed
    for bad in ("root", -1, 1.5):
        with pytest.raises(ValueError, match="uid"):
            event_from_wire({**event_to_wire(roots), "on_behalf_of": bad})


SAMPLES = [
    DaemonStarted("0.1.0", 10),
    DaemonStopped("SIGTERM"),
    DaemonStarted("0.1.0", 10, (0, 65534)),
    ConfigReloaded("/etc/lockd/lockd.toml", ["allowed_uids", "log_level"], ["log_level"]),
    ConnectionOpened(3, 4242, 1000, 100, False, 1764000000.25),
    LockspaceCreated("ls", "/locks/ls", 1),
    ResourceCreated("ls", "r1", 1),
    ResourceDeleted("ls", "r1", 1),
    LeaseAcquired("ls", "r1", "shared", OWNER.to_wire(), 2, True),  # wire forms converted
    LeaseReleased("ls", "r1", LeaseMode.EXCLUSIVE, OWNER, 2, "owner-exit"),
    LeaseLost("ls", "r1", LeaseMode.SHARED, OWNER, "taken by another host"),
    OwnerFenced(OWNER, "SIGTERM", "connection closed while holding leases", 1000),
    RecoveryCompleted(3, 1, 1, 2.5, (Fence(OWNER, "lost", since=5.0),)),
    JournalResumed(1764000000.5, 3, "[Errno 28] No space left on device"),
]


def test_every_event_type_is_sampled() -> None:
    assert {type(e) for e in SAMPLES} == set(EVENT_TYPES.values())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.TYPE)
def test_each_event_goes_on_the_wire_as_plain_values_and_comes_back(event: object) -> None:
    """Every field, as the compiled writer puts it: plain CBOR types (an enum as its
    string, an owner as its map), the same bytes as the map built by hand, and the
    same event read back."""
    wire = event_to_wire(event)  # type: ignore[arg-type]
    plain = (str, int, float, bool, bytes, dict, list, type(None))

    def check(value: object) -> None:
        assert type(value) in plain, (value, type(value))
        for item in (
            value.values()
            if isinstance(value, dict)
            else (value if isinstance(value, list) else ())
        ):
            check(item)

    check(wire)
    assert wire["type"] == event.TYPE  # type: ignore[attr-defined]
    assert event_from_wire(cbor2.loads(cbor2.dumps(wire))) == event


def test_every_event_type_has_a_unique_wire_name() -> None:
    """Auditors filter by type; no two event classes share one."""
    assert len(EVENT_TYPES) == len({cls.TYPE for cls in EVENT_TYPES.values()})
    assert all(name and name == name.lower() for name in EVENT_TYPES)


def test_an_event_of_a_type_this_version_does_not_know_is_kept_as_it_is() -> None:
    """A record of a type a later lockd added is neither skipped nor called corrupt: it
    is rebuilt as an UnknownEvent that goes back on the wire key for key."""
    data = {"type": "lease-stolen", "lockspace": "ls", "by": {"host": "hv2"}}
    event = event_from_wire(data)
    assert event == UnknownEvent("lease-stolen", (("lockspace", "ls"), ("by", {"host": "hv2"})))
    assert event_to_wire(event) == data


@pytest.mark.parametrize("kind", [None, "", 7])
def test_an_event_with_no_type_is_an_error(kind: object) -> None:
    """A map with no type (or not a name) is no event of any lockd: refused."""
    data = {} if kind is None else {"type": kind}
    with pytest.raises(ValueError, match="bad event type"):
        event_from_wire(data)


def test_missing_field_is_an_error() -> None:
    """A truncated event map is refused with the missing field named."""
    data = {"type": LeaseAcquired.TYPE, "lockspace": "ls"}
    with pytest.raises(ValueError, match="resource"):
        event_from_wire(data)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uuid": b"short"},
        {"id": 0},
        {"pid": -1},
        {"name": ""},
        {"start_time": -5},
    ],
)
def test_invalid_owner_cannot_exist(kwargs: dict[str, object]) -> None:
    """An owner with a bad uuid, id, pid, name or start time cannot be built."""
    fields = {"uuid": b"\x01" * 16, "name": "vm", "id": 1, "pid": 1, "start_time": 0, **kwargs}
    with pytest.raises(ValueError):  # noqa: PT011 - attrs validators raise plain ValueError
        Owner(**fields)  # type: ignore[arg-type]
