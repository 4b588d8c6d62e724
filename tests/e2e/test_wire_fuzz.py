"""Generated hostile streams against a real daemon, judged by the sans-I/O layer.

The streams are the ones ``tests/protocol/test_wire_properties.py`` draws (raw CBOR of
every encoding, valid requests with one field changed, length heads past the cap or
cut short, loose bytes), kept to what the protocol refuses: after a hello, no frame of
them is a request the daemon would carry out. Each example writes one to three such
streams at once, on the client and the admin socket, cut into pieces and interleaved,
then half-closes them. The daemon must answer each exactly as
:class:`protocol.server.ServerProtocol` does on the same bytes (same ids, codes and
messages, nothing more), then close.

Meanwhile a plugin's connection holds a lease for a live process and a VM holds
another through ``lockd run``; around the whole run: both leases are still locked in
the kernel (probed from another process), the plugin's connection still answers, the
journal's files are byte for byte as they were, the log has nothing at WARNING or
above, and the daemon's descriptors are back to their count.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import uuid
from collections.abc import Iterator

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.client import Client
from protocol.framing import encode_frame
from protocol.names import FILES_LOCKSPACE
from protocol.server import Refused, ServerProtocol
from tests.e2e.conftest import DaemonProcess, wait_for
from tests.e2e.invariants import check
from tests.e2e.test_daemon import lease_file, start_run
from tests.e2e.test_hostile import Raw, _fds, _rss_kib, assert_well_formed
from tests.lockprobe import probe
from tests.protocol.test_wire_properties import streams

pytestmark = pytest.mark.e2e

HELLO = encode_frame(cbor2.dumps({"op": "hello", "id": 0, "versions": [1]}))
VM_DISK = "/vm/wire-fuzz.img"
EXAMPLES = 150


def expected_replies(stream: bytes) -> list[bytes] | None:
    """The frames :class:`ServerProtocol` answers ``stream`` (hello first, then end of
    stream) with, as the daemon must; None when a frame after the hello is a request
    the daemon would carry out (such a stream is not drawn)."""
    proto = ServerProtocol()
    proto.receive_data(HELLO + stream)
    proto.receive_data(b"")
    replies: list[bytes] = []
    while (item := proto.next_incoming()) is not None:
        if isinstance(item, Refused):
            replies.append(proto.refusal(item))
        elif replies:
            return None
        else:
            replies.append(b"")  # the hello's reply: its content is the daemon's to say
    return replies


@st.composite
def refused_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A hostile stream that holds no request to carry out, and its expected replies."""
    for _ in range(20):
        stream = draw(streams())
        replies = expected_replies(stream)
        if replies is not None:
            return stream, replies
    return b"", [b""]  # the hello alone


def _frames(data: bytes) -> list[bytes]:
    """Split a run of frames as the daemon wrote them."""
    out = []
    while data:
        length = int.from_bytes(data[:4], "big")
        out.append(data[: 4 + length])
        data = data[4 + length :]
    return out


def _journal_files(daemon: DaemonProcess) -> dict[str, bytes]:
    return {
        str(path.relative_to(daemon.journal_dir)): path.read_bytes()
        for path in sorted(daemon.journal_dir.rglob("*"))
        if path.is_file()
    }


def _read_all(conn: Raw) -> bytes:
    """Every byte the daemon sends until it closes the stream (bounded by the timeout)."""
    out = bytearray()
    while True:
        try:
            chunk = conn.sock.recv(65536)
        except ConnectionResetError:
            return bytes(out)
        except TimeoutError:
            raise AssertionError("the daemon neither answered nor closed in time") from None
        if not chunk:
            return bytes(out)
        out += chunk


@pytest.fixture
def plugin(daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]) -> Iterator[Client]:
    """A plugin's connection that registered a live process and holds a lease for it."""
    sleeper = subprocess.Popen(["sleep", "600"])
    children.append(sleeper)
    with daemon.client("plugin") as client:
        owner = {"uuid": uuid.uuid4().bytes, "name": "fuzz-owner", "id": 1, "pid": sleeper.pid}
        client.call("register", owner=owner)
        client.call(
            "acquire", leases=[{"lockspace": FILES_LOCKSPACE, "resource": "held"}], autocreate=True
        )
        yield client


def test_generated_hostile_streams_get_exactly_the_refusals(
    daemon: DaemonProcess, plugin: Client, children: list[subprocess.Popen[bytes]]
) -> None:
    """Every generated stream is answered as the sans-I/O layer answers it and closed;
    nothing else on the host changes (see the module docstring)."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    vm = start_run(daemon, children, "--disk", VM_DISK, "--name", "vm-fuzz")
    held = daemon.lock_dir / FILES_LOCKSPACE / "held"
    log_start = daemon.log.stat().st_size
    before = plugin.call("inquire")["leases"]
    for _ in range(5):  # warm up: the first connections allocate what later ones reuse
        with Raw(daemon.socket) as conn:
            conn.send(HELLO)
            conn.sock.shutdown(socket.SHUT_WR)
            _read_all(conn)
    journal = _journal_files(daemon)
    fds, rss = _fds(pid), _rss_kib(pid)
    sockets = {"client": daemon.socket, "admin": daemon.admin_socket}
    counts: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        st.lists(
            st.tuples(refused_streams(), st.sampled_from(sorted(sockets))), min_size=1, max_size=3
        ),
        st.data(),
    )
    def one(cases: list[tuple[tuple[bytes, list[bytes]], str]], data: st.DataObject) -> None:
        conns = [Raw(sockets[which], timeout=10) for _, which in cases]
        try:
            queues: list[list[bytes]] = []
            for (stream, _), _ in cases:
                whole = HELLO + stream
                cuts = sorted(data.draw(st.sets(st.integers(1, len(whole) - 1), max_size=4)))
                queues.append([whole[a:b] for a, b in itertools.pairwise([0, *cuts, len(whole)])])
            # Interleaved across the connections, each connection's pieces in order.
            while waiting := [i for i, queue in enumerate(queues) if queue]:
                index = data.draw(st.sampled_from(waiting))
                conns[index].send(queues[index].pop(0))
            for conn in conns:
                conn.sock.shutdown(socket.SHUT_WR)
            for conn, ((_, expected), which) in zip(conns, cases, strict=True):
                got = _frames(_read_all(conn))
                counts[which] = counts.get(which, 0) + 1
                assert got, "closed without answering the hello"
                for frame in got:
                    assert_well_formed(cbor2.loads(frame[4:]))
                assert "result" in cbor2.loads(got[0][4:])  # the hello
                # A refusal of a length past the cap ends the connection with unread
                # bytes on it, and the kernel may then drop that last reply.
                tail_may_drop = expected[-1:] and b"too-large" in expected[-1]
                assert got[1:] == expected[1:] or (tail_may_drop and got[1:] == expected[1:-1]), (
                    got,
                    expected,
                )
        finally:
            for conn in conns:
                conn.close()
        assert plugin.call("status")["pid"] == pid  # another client, served throughout

    one()
    assert plugin.call("inquire")["leases"] == before
    assert probe(held, "ofd") == "busy"
    assert probe(lease_file(daemon, VM_DISK), "ofd") == "busy"
    assert vm.poll() is None
    check(daemon)
    assert _journal_files(daemon) == journal, "a refused request changed the journal"
    wait_for(lambda: _fds(pid) <= fds)
    assert _rss_kib(pid) - rss < 32 * 1024
    with open(daemon.log, "rb") as log:
        log.seek(log_start)
        lines = log.read().decode(errors="replace").splitlines()
    loud = [line for line in lines if ": WARNING: " in line or ": ERROR: " in line]
    assert not loud, loud[:5]
    assert not [line for line in lines if "Traceback" in line], lines[:20]
    assert counts.get("client", 0) > EXAMPLES // 2
    assert counts.get("admin", 0) > EXAMPLES // 4
