"""Snapshot files: the replay state at a segment boundary, so recovery skips old history.

``snapshot-<seq, 20 digits>.cbor`` holds one CBOR map
``{"format": "lockd-snapshot", "version": 1, "seq", "crc", "state": bstr}``
where ``state`` is the CBOR of :meth:`ReplayState.to_wire` and ``crc`` its
CRC-32. It is written to a temporary name, synced and renamed, so a crash
never leaves a half-written snapshot under the real name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib

import cbor2

from actors.faults import crash_point
from actors.recovery_core import SNAPSHOT_FORMAT, SNAPSHOT_VERSION, ReplayState

log = logging.getLogger(__name__)

PREFIX = "snapshot-"
SUFFIX = ".cbor"


def snapshot_name(seq: int) -> str:
    """File name of the snapshot taken after entry ``seq``."""
    return f"{PREFIX}{seq:020d}{SUFFIX}"


def seq_of(name: str) -> int:
    """The last journal seq a snapshot includes, from its name."""
    return int(name[len(PREFIX) : -len(SUFFIX)])


def list_snapshots(directory: str) -> list[str]:
    """Snapshot file names, oldest first."""
    return sorted(n for n in os.listdir(directory) if n.startswith(PREFIX) and n.endswith(SUFFIX))


def encode_snapshot(state: ReplayState) -> bytes:
    """The bytes of a snapshot file for ``state``."""
    body = cbor2.dumps(state.to_wire())
    return cbor2.dumps(
        {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "seq": state.seq,
            "crc": zlib.crc32(body),
            "state": body,
        }
    )


def decode_snapshot(data: bytes) -> ReplayState:
    """Read a snapshot file's bytes; raise ValueError if they are not a sound snapshot."""
    try:
        outer = cbor2.loads(data)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for bad input
        raise ValueError(f"undecodable snapshot: {exc}") from None
    if not isinstance(outer, dict) or outer.get("format") != SNAPSHOT_FORMAT:
        raise ValueError("not a lockd snapshot")
    if outer.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"unsupported snapshot version {outer.get('version')!r}")
    body = outer.get("state")
    if not isinstance(body, bytes) or zlib.crc32(body) != outer.get("crc"):
        raise ValueError("snapshot CRC mismatch")
    state = ReplayState.from_wire(cbor2.loads(body))
    if state.seq != outer.get("seq"):
        raise ValueError("snapshot seq does not match its state")
    return state


def write_snapshot(directory: str, state: ReplayState) -> str:
    """Write ``state`` durably (tmp, fsync, rename, fsync dir); return the file name."""
    name = snapshot_name(state.seq)
    tmp = os.path.join(directory, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = encode_snapshot(state)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    crash_point("snapshot-tmp")
    os.rename(tmp, os.path.join(directory, name))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return name


def load_newest(directory: str) -> ReplayState | None:
    """The newest snapshot that reads back sound (older ones are fallbacks), or None."""
    for name in reversed(list_snapshots(directory)):
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                return decode_snapshot(f.read())
        except (OSError, ValueError) as exc:
            log.error("snapshot %s is unusable (%s); trying an older one", path, exc)
    return None


def prune(directory: str, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` snapshots, and stray temporary files."""
    for name in list_snapshots(directory)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    for name in os.listdir(directory):
        if name.startswith(f".{PREFIX}") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
