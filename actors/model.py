"""Domain values shared by the actors: owners, lease modes, lease keys, sync policies."""

from __future__ import annotations

import enum
import uuid as uuidlib
from typing import Any, NamedTuple

import attrs


class LeaseMode(enum.StrEnum):
    """How a lease is held: write lock (exclusive) or read lock (shared) on byte 0."""

    EXCLUSIVE = "exclusive"
    SHARED = "shared"


class SyncPolicy(enum.StrEnum):
    """What an appended event survives before its reply goes out."""

    NONE = "none"
    """write() only: survives a daemon crash, not a host crash."""
    BATCH = "batch"
    """One fdatasync per group of appends queued together: survives a host crash."""
    ALWAYS = "always"
    """One fdatasync per append: survives a host crash, no grouping."""


def _check_uuid(_inst: object, _attr: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 16:
        raise ValueError("owner uuid must be exactly 16 bytes")


def _check_boot(_inst: object, _attr: object, value: bytes | None) -> None:
    if value is not None and (not isinstance(value, bytes) or len(value) != 16):
        raise ValueError("owner boot must be absent or exactly 16 bytes")


def _check_positive(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"owner {attr.name} must be a positive integer")


def _check_name(_inst: object, _attr: object, value: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= 255 or "\0" in value:
        raise ValueError("owner name must be 1-255 characters without NUL")


@attrs.frozen
class Owner:
    """What a lease protects: a process, identified beyond its pid by its start time.

    ``start_time`` is field 22 of ``/proc/PID/stat`` (clock ticks since boot), so
    a pid reused by another process is never mistaken for the owner.
    """

    uuid: bytes = attrs.field(validator=_check_uuid)
    name: str = attrs.field(validator=_check_name)
    id: int = attrs.field(validator=_check_positive)
    pid: int = attrs.field(validator=_check_positive)
    start_time: int = attrs.field(validator=attrs.validators.ge(0))
    boot: bytes | None = attrs.field(default=None, validator=_check_boot)
    """The host's boot id (``/proc/sys/kernel/random/boot_id``) when the owner registered.

    A (pid, start time) pair names one process within one boot only: VMs a
    host autostarts can get the same pid and start time after a reboot. None
    in journals written before lockd recorded it. Leases are keyed by
    :attr:`key`, which leaves it out: within one boot it adds nothing.
    """
    key: OwnerKey = attrs.field(init=False, eq=False, repr=False)
    """The identity leases are keyed by: the exact process, not its descriptive fields.

    Computed once: every table lookup on the acquire and recovery paths uses it.
    """

    @key.default
    def _key(self) -> OwnerKey:
        return OwnerKey(self.pid, self.start_time)

    def of_another_boot(self, boot: bytes | None) -> bool:
        """True if this owner registered in another boot than ``boot`` (the current one).

        Such an owner is gone, whatever process now has its pid and start
        time. Unknown on either side (an old journal, no boot id in the
        kernel) is not another boot: lockd then holds the lease as long as a
        process with that pid and start time runs, which is late but safe.
        """
        return self.boot is not None and boot is not None and self.boot != boot

    def describe(self) -> str:
        """Human-readable form used in error messages and logs."""
        return f"{self.name} (uuid {uuidlib.UUID(bytes=self.uuid)}, pid {self.pid})"

    def to_wire(self) -> dict[str, Any]:
        """CBOR-ready map, as used on the wire and in the journal."""
        wire = {
            "uuid": self.uuid,
            "name": self.name,
            "id": self.id,
            "pid": self.pid,
            "start_time": self.start_time,
        }
        if self.boot is not None:
            wire["boot"] = self.boot
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> Owner:
        """Build from a decoded map; raises ValueError/TypeError/KeyError on bad input."""
        if not isinstance(data, dict):
            raise TypeError("owner must be a map")
        return cls(
            uuid=data["uuid"],
            name=data["name"],
            id=data["id"],
            pid=data["pid"],
            start_time=data["start_time"],
            boot=data.get("boot"),
        )


class OwnerKey(NamedTuple):
    """(pid, start time): the process a lease belongs to.

    A named tuple, not an attrs class: leases, owners and fences are all
    tables keyed by it, and a pair of requests hashes it about twenty times.
    A tuple hashes and compares in C; an attrs class calls its generated
    ``__hash__`` each time, even with the hash cached."""

    pid: int
    start_time: int
