"""SIGUSR1: re-execute the daemon in place, keeping every lock, listening socket and connection.

The old process stops accepting, lets each connection finish the request it
is serving, collects every lease fd once each lockspace is idle, journals
``daemon-stopped`` and execs itself with a handoff (a memfd holding a CBOR
description of the fds). The fds stay open across ``exec``, so the kernel
never sees a lease lock released: an outside probe finds them held
throughout. The new process replays the journal as after any restart, but
adopts the inherited lease fds instead of reopening files, takes over the
listening sockets, and goes on serving each client connection where it
stopped (including bytes the client sent meanwhile).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import cbor2
import pykka

from actors.connection import HandedOver, Quiesce
from actors.events import DaemonStopped
from actors.journal import Append, Appended, AppendFailed
from actors.model import Owner
from actors.router import AllFds, CollectFds
from actors.runtime import DispatchedActor, Dispatcher

log = logging.getLogger(__name__)

HANDOFF_VERSION = 1


@attrs.frozen
class ListenerFd:
    """A listening socket handed over."""

    fd: int
    path: str
    admin: bool


@attrs.frozen
class Handoff:
    """Everything the next daemon process takes over."""

    listeners: tuple[ListenerFd, ...]
    connections: tuple[HandedOver, ...]
    leases: tuple[tuple[str, str, int], ...]
    next_conn_id: int

    def all_fds(self) -> list[int]:
        """Every fd this handoff passes on."""
        return (
            [item.fd for item in self.listeners]
            + [c.fd for c in self.connections]
            + [fd for _, _, fd in self.leases]
        )

    def to_bytes(self) -> bytes:
        return cbor2.dumps(
            {
                "version": HANDOFF_VERSION,
                "listeners": [[item.fd, item.path, item.admin] for item in self.listeners],
                "connections": [_conn_to_wire(c) for c in self.connections],
                "leases": [list(lease) for lease in self.leases],
                "next_conn_id": self.next_conn_id,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Handoff:
        raw = cbor2.loads(data)
        if raw.get("version") != HANDOFF_VERSION:
            raise ValueError(f"unsupported handoff version {raw.get('version')!r}")
        return cls(
            tuple(ListenerFd(fd, path, admin) for fd, path, admin in raw["listeners"]),
            tuple(_conn_from_wire(c) for c in raw["connections"]),
            tuple((ls, res, fd) for ls, res, fd in raw["leases"]),
            raw["next_conn_id"],
        )


def _conn_to_wire(c: HandedOver) -> dict[str, Any]:
    out = attrs.asdict(c, recurse=False)
    out["owner"] = None if c.owner is None else c.owner.to_wire()
    return out


def _conn_from_wire(data: dict[str, Any]) -> HandedOver:
    owner = data.pop("owner")
    return HandedOver(owner=None if owner is None else Owner.from_wire(owner), **data)


def read_handoff(fd: int) -> Handoff:
    """Read and close the handoff memfd given on the command line."""
    with os.fdopen(fd, "rb") as f:
        f.seek(0)
        handoff = Handoff.from_bytes(f.read())
    for inherited in handoff.all_fds():
        os.set_inheritable(inherited, False)
    return handoff


def exec_with(handoff: Handoff, argv: Sequence[str]) -> None:
    """Replace this process by ``argv`` plus ``--handoff-fd``; the handed fds stay open."""
    memfd = os.memfd_create("lockd-handoff", 0)
    os.write(memfd, handoff.to_bytes())
    for fd in handoff.all_fds():
        os.set_inheritable(fd, True)
    os.set_inheritable(memfd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], [*argv, "--handoff-fd", str(memfd)])  # noqa: S606 - our own binary


@attrs.frozen
class _Done:
    """Self-sent when a step completes with nothing to wait for."""


class ReexecActor(DispatchedActor):
    """Quiesces the daemon and execs it; runs once."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        connections: Sequence[pykka.ActorRef[Any]],
        router: pykka.ActorRef[Any],
        journal: pykka.ActorRef[Any],
        listeners: Sequence[ListenerFd],
        next_conn_id: int,
        argv: Sequence[str],
    ) -> None:
        super().__init__(dispatcher)
        self._connections = list(connections)
        self._router = router
        self._journal = journal
        self._listeners = tuple(listeners)
        self._next_conn_id = next_conn_id
        self._argv = list(argv)
        self._waiting = 0
        self._handed: list[HandedOver] = []
        self._leases: tuple[tuple[str, str, int], ...] = ()

    def on_start(self) -> None:
        log.info("re-exec: quiescing %d connections", len(self._connections))
        for ref in self._connections:
            if ref.is_alive():
                self._waiting += 1
                ref.tell(Quiesce(self.actor_ref))
        if not self._waiting:
            self._router.tell(CollectFds(0, self.actor_ref))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, HandedOver):
            self._handed.append(message)
            self._waiting -= 1
            if self._waiting == 0:
                self._router.tell(CollectFds(0, self.actor_ref))
        elif isinstance(message, AllFds):
            self._leases = message.fds
            self._journal.tell(Append((DaemonStopped("re-exec (SIGUSR1)"),), 0, self.actor_ref))
        elif isinstance(message, Appended | AppendFailed):
            handoff = Handoff(
                self._listeners, tuple(self._handed), self._leases, self._next_conn_id
            )
            log.info(
                "re-exec: handing over %d listeners, %d connections, %d lease fds",
                len(self._listeners),
                len(self._handed),
                len(self._leases),
            )
            exec_with(handoff, self._argv)
        else:
            return super().on_receive(message)
        return None
