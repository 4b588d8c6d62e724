"""Another local user against a root daemon that serves it (``allowed_uids``).

PRODUCT.md: a root daemon serves the uids it is told to; what it does for
them must stay within what they could do themselves. Above all it never
signals (fences) a process its requester could not signal itself. Each
test here plays uid 65534 (nobody) from a forked child, against a real
daemon whose socket that uid may reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lockd.commands import EXIT_NEEDS_OPERATOR
from lockd.journal_file import list_segments
from protocol.client import RemoteError, result_of
from protocol.codec import decode_item, encode_item
from protocol.framing import MAX_REPLY_FRAME, FrameDecoder, encode_frame
from tests.e2e.conftest import LOCKD, DaemonProcess, MakeDaemon, journaled, wait_for
from tests.e2e.test_daemon import start_run
from tests.lockd.test_snapshot_replay import fill
from tests.lockprobe import probe

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="playing another uid takes root"),
]

OTHER_UID = 65534
"""The other user (nobody), in the daemon's ``allowed_uids``."""


@pytest.fixture
def open_daemon(make_daemon: MakeDaemon, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A root daemon serving uid 65534 too, its socket reachable by that uid; 16 clients
    at most (the last 2 kept for root)."""
    with serving_other_user(make_daemon, tmp_path) as daemon:
        yield daemon


@contextlib.contextmanager
def serving_other_user(
    make_daemon: MakeDaemon, tmp_path: Path, settings: str = ""
) -> Iterator[DaemonProcess]:
    """:func:`open_daemon`, its configuration ending with ``settings``."""
    config = tmp_path / "lockd.toml"
    config.write_text(f"allowed_uids = [{OTHER_UID}]\nmax_clients = 16\n{settings}")
    socket_dir = Path(tempfile.mkdtemp(prefix="lockd-users-"))
    try:
        os.chmod(socket_dir, 0o711)  # noqa: S103 - the other uid must reach the socket
        daemon = make_daemon("users", None, "--config", str(config), socket_dir=socket_dir)
        for path in (daemon.socket, daemon.admin_socket):  # what SocketMode= does for a group
            os.chmod(path, 0o666)  # noqa: S103
        yield daemon
        daemon.stop()
    finally:
        for name in os.listdir(socket_dir):
            os.unlink(socket_dir / name)
        os.rmdir(socket_dir)


def fork_as(
    uid: int, child: Callable[[socket.socket], None], *, effective_only: bool = False
) -> tuple[socket.socket, int]:
    """Fork a child that runs ``child(there)`` as ``uid`` (``effective_only``: as its
    effective uid, its real uid still 0) and exits; returns this end of the socket pair
    it was given, and its pid (the caller reaps it)."""
    here, there = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            here.close()
            if effective_only:
                os.setegid(uid)
                os.seteuid(uid)
            else:
                os.setgid(uid)
                os.setuid(uid)
            child(there)
        finally:
            os._exit(0)
    there.close()
    return here, pid


def connect_as(uid: int, path: Path) -> tuple[socket.socket, int]:
    """A connection to ``path`` made by a child running as ``uid``, which then hands it to
    this process and exits (reaped: its pid is free). Returns the socket and that pid."""

    def connect(there: socket.socket) -> None:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(path))
        socket.send_fds(there, [b"x"], [conn.fileno()])

    here, pid = fork_as(uid, connect)
    try:
        _, fds, _, _ = socket.recv_fds(here, 1, 1)
    finally:
        here.close()
        os.waitpid(pid, 0)
    assert fds, "the child could not connect"
    return socket.socket(fileno=fds[0]), pid


class _CloneArgs(ctypes.Structure):
    """struct clone_args (linux/sched.h), up to set_tid_size (CLONE_ARGS_SIZE_VER1)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
                     "stack_size", "tls", "set_tid", "set_tid_size")
    ]  # fmt: skip


def spawn_with_pid(pid: int, *argv: str) -> int:
    """Run ``argv`` as a child whose pid is exactly ``pid`` (clone3 with set_tid, which
    takes root): how a freed pid comes back as someone else's process. Raises
    FileExistsError if another process got ``pid`` first."""
    # PyDLL keeps the GIL across the call: the child is a copy of this one thread, and a
    # GIL another thread took while the call ran would never be given back in it.
    libc = ctypes.PyDLL(None, use_errno=True)
    tid = ctypes.c_int32(pid)
    args = _CloneArgs(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tid), set_tid_size=1)
    child = libc.syscall(435, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))  # clone3
    if child == 0:  # pragma: no cover - child
        try:
            os.execvp(argv[0], argv)  # noqa: S606 - a fixed test command, no shell
        finally:
            os._exit(127)
    if child < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone3 with pid {pid}: {os.strerror(err)}")
    assert child == pid
    return int(child)


def reap(pid: int) -> None:
    """Kill and reap a child of this process, if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def request(conn: socket.socket, op: str, **args: Any) -> dict[str, Any]:
    """One request over a socket made elsewhere, and its reply (as docs/protocol.md frames
    them); an error reply raises RemoteError. A daemon that turned the connection away
    at once may have closed it: its error frame is read all the same."""
    conn.settimeout(10)
    with contextlib.suppress(BrokenPipeError):
        conn.sendall(encode_frame(encode_item({"op": op, "id": 1, **args})))
    frames = FrameDecoder(MAX_REPLY_FRAME)
    while (frame := frames.next_frame()) is None:
        data = conn.recv(65536)
        assert data, f"the daemon closed the connection instead of answering {op}"
        frames.receive_data(data)
    return result_of(decode_item(frame))


def test_socket_mode_and_group_let_an_allowed_uid_connect_without_systemd(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """Without socket activation lockd's own socket was 0600 and root's: a uid in
    allowed_uids could not connect, whatever the file said, without a chmod after each
    start. socket_mode and socket_group give the client socket (only) to a group, and
    the directory lockd makes for it lets others through."""
    config = tmp_path / "lockd.toml"
    config.write_text(
        f'allowed_uids = [{OTHER_UID}]\nsocket_mode = "0660"\nsocket_group = {OTHER_UID}\n'
    )
    base = Path(tempfile.mkdtemp(prefix="lockd-users-"))
    socket_dir = base / "run"  # made by lockd
    try:
        os.chmod(base, 0o711)  # noqa: S103 - the other uid must reach the socket
        daemon = make_daemon("group", None, "--config", str(config), socket_dir=socket_dir)
        conn, _pid = connect_as(OTHER_UID, daemon.socket)
        with conn:
            assert request(conn, "hello", versions=[1])["version"] == 1
            assert request(conn, "status")["leases"] == 0
        made = os.stat(daemon.socket)
        assert (stat.S_IMODE(made.st_mode), made.st_gid) == (0o660, OTHER_UID)
        assert stat.S_IMODE(os.stat(daemon.admin_socket).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o711
        assert "lets no other user through" not in daemon.log.read_text()
        daemon.stop()
    finally:
        shutil.rmtree(base)


def test_a_pid_reused_after_its_peer_exited_is_not_the_peers_own(
    open_daemon: DaemonProcess,
) -> None:
    """A user connects, hands the connection on and exits; its pid comes back as root's
    process. Registering that pid "as itself" is refused: before, the pid from
    SO_PEERCRED counted as the peer's own, so the user got root's process registered,
    and dropping the connection with a lease made lockd SIGTERM and SIGKILL it."""
    conn, peer = connect_as(OTHER_UID, open_daemon.socket)
    victim = None
    try:
        try:
            victim = spawn_with_pid(peer, "sleep", "600")
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            pytest.skip(f"another process took pid {peer} before the test could")
        request(conn, "hello", versions=[1])
        owner = {"uuid": uuid.uuid4().bytes, "name": "evil", "id": 1, "pid": victim}
        with pytest.raises(RemoteError) as refused:
            request(conn, "register", owner=owner)
        assert refused.value.code == "permission-denied"
        assert f"the process that connected as pid {peer} has exited" in refused.value.message
        lease = {"lockspace": "org.libvirt.lockd.files", "resource": "evil"}
        with pytest.raises(RemoteError) as unregistered:
            request(conn, "acquire", leases=[lease], autocreate=True)
        assert unregistered.value.code == "not-registered"
        assert os.waitpid(victim, os.WNOHANG) == (0, 0), "root's process was signalled"
        assert open_daemon.lockd("status").returncode == 0
    finally:
        conn.close()
        if victim is not None:
            reap(victim)


def test_a_live_peer_registers_itself_whatever_its_uid(open_daemon: DaemonProcess) -> None:
    """A process that connected with euid 65534 but real uid 0 registers its own pid (its
    real uid is not the peer's): while it runs, that pid is the peer itself."""

    def register_itself() -> str:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(open_daemon.socket))
            request(conn, "hello", versions=[1])
            owner = {"uuid": uuid.uuid4().bytes, "name": "self", "id": 1, "pid": os.getpid()}
            try:
                registered = str(request(conn, "register", owner=owner)["owner"]["pid"])
            except RemoteError as exc:
                registered = exc.message
        return f"{os.getpid()} {registered}"

    itself, registered = as_other_user(register_itself, effective_only=True).split(" ", 1)
    assert registered == itself


def as_other_user(action: Callable[[], str], *, effective_only: bool = False) -> str:
    """What ``action`` returns when a forked child runs it as uid 65534 (``effective_only``:
    only as its effective uid, its real uid still 0)."""

    def run(there: socket.socket) -> None:
        try:
            answer = action()
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails
            answer = f"{type(exc).__name__}: {exc}"
        there.sendall(answer.encode())

    here, pid = fork_as(OTHER_UID, run, effective_only=effective_only)
    try:
        here.settimeout(30)
        return here.recv(65536).decode()
    finally:
        here.close()
        reap(pid)


def test_a_user_s_process_that_became_root_is_not_fenced_for_its_closed_connection(
    open_daemon: DaemonProcess,
) -> None:
    """uid 65534's process registers itself and takes a lease, then becomes root (as a
    set-user-ID program such as sudo makes itself) and closes its connection: lockd does
    not SIGTERM and SIGKILL that root process on the user's behalf, and holds the lease
    until it exits. Before, it fenced it: a user could have root's daemon kill its sudo
    (or any root process it was exec'd into) at a moment of its choosing."""
    lease = {"lockspace": "org.libvirt.lockd.files", "resource": "became-root"}
    path = open_daemon.lock_dir / lease["lockspace"] / lease["resource"]

    def become_root_and_close(there: socket.socket) -> None:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(open_daemon.socket))
            request(conn, "hello", versions=[1])
            owner = {"uuid": uuid.uuid4().bytes, "name": "sudo", "id": 1, "pid": os.getpid()}
            request(conn, "register", owner=owner)
            request(conn, "acquire", leases=[lease], autocreate=True)
            os.seteuid(0)  # its saved uid is root's: as a set-user-ID root program runs
            os.setresuid(0, 0, 0)
        there.sendall(b"closed")
        there.recv(1)  # runs on until the test lets it go

    here, pid = fork_as(OTHER_UID, become_root_and_close, effective_only=True)
    try:
        here.settimeout(30)
        assert here.recv(16) == b"closed"
        wait_for(lambda: "fencing sudo" in open_daemon.log.read_text())  # or not fencing
        assert "not fencing sudo" in open_daemon.log.read_text()
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the root process was signalled"
        assert probe(path, "ofd") == "busy"
    finally:
        here.close()
        reap(pid)
    wait_for(lambda: not path.exists())  # released when it exited


def test_a_users_fence_resumed_after_a_crash_still_signals_only_what_the_user_could(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """uid 65534's process (its saved uid root's) registers itself, takes a lease, closes
    its connection and ignores the SIGTERM lockd sends for that user. lockd is SIGKILLed
    before its SIGKILL; the process becomes root; lockd starts again. The fence it resumes
    still signals only what uid 65534 could: the root process is left alone. Before, the
    uid was not journaled and the next daemon resumed the fence as root's, SIGTERM then
    SIGKILL to a root process for that user."""
    from tests.e2e.test_daemon import events
    from tests.e2e.test_recovery import crash, restart

    lease = {"lockspace": "org.libvirt.lockd.files", "resource": "resumed-fence"}

    def fenced_then_root(there: socket.socket) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.setresuid(OTHER_UID, OTHER_UID, 0)  # uid 65534's, able to become root later
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(daemon.socket))
            request(conn, "hello", versions=[1])
            owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": os.getpid()}
            request(conn, "register", owner=owner)
            request(conn, "acquire", leases=[lease], autocreate=True)
        there.sendall(b"closed")
        there.recv(1)  # the daemon is down now
        os.setresuid(0, 0, 0)
        there.sendall(b"root")
        there.recv(1)  # runs on until the test lets it go

    with serving_other_user(make_daemon, tmp_path, "fence_grace = 60\n") as daemon:
        here, pid = fork_as(0, fenced_then_root)
        try:
            here.settimeout(30)
            assert here.recv(16) == b"closed"
            wait_for(lambda: journaled(daemon, "owner-fenced") > 0)
            (term,) = events(daemon, "--type", "owner-fenced")
            assert (term["owner"]["pid"], term["on_behalf_of"]) == (pid, OTHER_UID)
            crash(daemon)
            here.sendall(b"x")
            assert here.recv(16) == b"root"
            restart(daemon)
            status = json.loads(daemon.lockd("status", "--json").stdout)
            assert status["fencing"] == []
            assert "not fencing vm" in daemon.log.read_text()
            assert len(events(daemon, "--type", "owner-fenced")) == 1  # no SIGTERM resent
            done = events(daemon, "--type", "recovery-completed")[-1]
            assert done["fencing"][0]["on_behalf_of"] == OTHER_UID
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the root process was signalled"
        finally:
            here.close()
            reap(pid)


def test_a_uid_taken_out_of_allowed_uids_loses_its_connections_at_a_reload(
    open_daemon: DaemonProcess, tmp_path: Path
) -> None:
    """An operator takes uid 65534 out of allowed_uids and reloads (SIGUSR1, as
    ``systemctl reload``): its subscription is turned away (permission-denied, then
    closed), as a new connection of its would be. Its process holding a lease through its
    own connection keeps both: that close would fence it. Before, the subscriber kept
    receiving every event for as long as it stayed connected."""
    auditor, _ = connect_as(OTHER_UID, open_daemon.socket)
    request(auditor, "hello", versions=[1])
    request(auditor, "subscribe")
    lease = {"lockspace": "org.libvirt.lockd.files", "resource": "kept"}

    def hold_a_lease(there: socket.socket) -> None:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(open_daemon.socket))
            request(conn, "hello", versions=[1])
            owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": os.getpid()}
            request(conn, "register", owner=owner)
            request(conn, "acquire", leases=[lease], autocreate=True)
            there.sendall(b"held")
            there.recv(1)  # holds on until the test lets it go

    here, vm = fork_as(OTHER_UID, hold_a_lease)
    try:
        here.settimeout(30)
        assert here.recv(16) == b"held"
        (tmp_path / "lockd.toml").write_text("max_clients = 16\n")  # 65534 taken out
        assert open_daemon.proc is not None
        open_daemon.proc.send_signal(signal.SIGUSR1)
        frames = FrameDecoder(MAX_REPLY_FRAME)
        auditor.settimeout(30)
        last: dict[str, Any] = {}
        while data := auditor.recv(65536):  # events, then the refusal, then the close
            frames.receive_data(data)
            while (frame := frames.next_frame()) is not None:
                last = decode_item(frame)
        assert last["error"]["code"] == "permission-denied"
        assert "no longer in its allowed_uids" in last["error"]["message"]
        assert os.waitpid(vm, os.WNOHANG) == (0, 0), "the VM was fenced"
        leases = json.loads(open_daemon.lockd("leases", "--json").stdout)
        assert [(le["resource"], le["owners"][0]["pid"]) for le in leases] == [("kept", vm)]
    finally:
        auditor.close()
        here.close()
        reap(vm)


def test_an_allowed_user_cannot_use_the_admin_socket(
    open_daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """allowed_uids opens the client socket, not the admin socket: even with its mode
    opened up, uid 65534 is turned away there (permission-denied), and root's VM runs on.
    Before, it was served, and its disconnect of the VM's connection fenced the VM."""
    vm = start_run(open_daemon, children, "--disk", "/vm/admin.img", "--name", "vm1")
    clients = json.loads(open_daemon.lockd("clients", "--json").stdout)
    (vm_client,) = [c["id"] for c in clients if c.get("owner", {}).get("pid") == vm.pid]

    def disconnect_the_vm() -> str:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(open_daemon.admin_socket))
            try:
                request(conn, "hello", versions=[1])
                request(conn, "disconnect", client=vm_client)
            except RemoteError as exc:
                return f"{exc.code}: {exc.message}"
            return "disconnected"

    answer = as_other_user(disconnect_the_vm)
    expected = (
        f"permission-denied: uid {OTHER_UID} may not use this daemon's admin socket "
        "(only the daemon's own uid may)"
    )
    assert answer == expected
    assert vm.poll() is None
    assert vm_client in [c["id"] for c in json.loads(open_daemon.lockd("clients", "--json").stdout)]
    assert open_daemon.lockd("disconnect", str(vm_client)).returncode == 0  # root still may


def test_another_uid_cannot_take_the_last_clients_from_root(open_daemon: DaemonProcess) -> None:
    """uid 65534 opens connections and registers an owner on each (so they never idle
    out): with max_clients = 16 it gets 14, refused with busy past them, and root's VM
    manager still connects and takes a lease. Before, it got all 16 and root none."""
    here, there = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            here.close()
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            held, refused = [], ""
            owner = {"uuid": uuid.uuid4().bytes, "name": "hog", "id": 1, "pid": os.getpid()}
            for _ in range(16):
                conn = socket.socket(socket.AF_UNIX)
                conn.connect(str(open_daemon.socket))
                try:
                    request(conn, "hello", versions=[1])
                    request(conn, "register", owner=owner)
                except (RemoteError, OSError) as exc:
                    refused = str(exc)
                    conn.close()
                    break
                held.append(conn)
            there.sendall(f"{len(held)}|{refused}".encode())
            there.recv(1)  # holds its connections until the test is done
        finally:
            os._exit(0)
    there.close()
    try:
        here.settimeout(30)
        count, _, refused = here.recv(65536).decode().partition("|")
        assert int(count) == 14, refused
        assert "the last 2 of max_clients=16 are kept for uid 0" in refused
        with open_daemon.client("libvirtd") as manager:
            owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": os.getpid()}
            manager.call("register", owner=owner)
            lease = {"lockspace": "org.libvirt.lockd.files", "resource": "vm-disk"}
            manager.call("acquire", leases=[lease], autocreate=True)
            manager.call("release", leases=[lease])  # else its close would fence this process
    finally:
        with contextlib.suppress(OSError):
            here.sendall(b"x")
        here.close()
        reap(pid)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_journal_dir_other_users_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    """Recovery replays the journal as lockd's own word: it holds the leases it names and
    fences owners whose lease was lost. A journal directory other users can write to
    (chmod'ed by mistake, or a --journal-dir in a shared place) would let them plant a
    segment naming any process: `lockd serve` refuses to start, saying which directory
    and how to fix it, and binds nothing. Before, it started."""
    journal = tmp_path / "journal"
    journal.mkdir()
    os.chmod(journal, mode)
    config = tmp_path / "lockd.toml"
    config.write_text("")
    done = subprocess.run(
        [*LOCKD, "serve", "--config", str(config), "--socket", str(tmp_path / "lockd.sock"),
         "--lock-dir", str(tmp_path / "locks"), "--journal-dir", str(journal)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_NEEDS_OPERATOR, done.stderr
    assert f"refusing journal_dir {journal}: other users can write to it" in done.stderr
    assert f"chmod go-w {journal}" in done.stderr
    assert not (tmp_path / "lockd.sock").exists()
    assert os.listdir(journal) == []
    assert not (tmp_path / "locks").exists()  # nothing made


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "other-users-file"])
def test_a_planted_pid_file_is_refused_and_its_target_untouched(tmp_path: Path, plant: str) -> None:
    """pid_file in a directory others can write to (/tmp): a user who put a symlink or a
    hard link there to a file of root's, or a file of their own, had root's lockd
    truncate it and write its pid in it at the next start (/etc/shadow, say). Now
    `lockd serve` refuses with a message naming the pid file, and the file is as it was."""
    victim = tmp_path / "victim"
    victim.write_text("root:secret\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # noqa: S103 - /tmp's mode, the case under test
    pid_file = shared / "lockd.pid"
    if plant == "symlink":
        os.symlink(victim, pid_file)
    elif plant == "hardlink":
        os.link(victim, pid_file)
    else:
        pid_file.write_text("mine\n")
        os.chown(pid_file, OTHER_UID, OTHER_UID)
    config = tmp_path / "lockd.toml"
    config.write_text("")
    done = subprocess.run(
        [*LOCKD, "serve", "--config", str(config), "--socket", str(tmp_path / "lockd.sock"),
         "--lock-dir", str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "journal"),
         "--pid-file", str(pid_file)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_NEEDS_OPERATOR, done.stderr
    assert f"lockd serve: refusing pid_file {pid_file}: " in done.stderr
    assert victim.read_text() == "root:secret\n"
    if plant == "other-users-file":
        assert pid_file.read_text() == "mine\n"
    assert not (tmp_path / "lockd.sock").exists()


def test_a_lock_dir_other_users_can_write_is_warned_about(tmp_path: Path) -> None:
    """A user who can write to the lock directory can replace a lease file and have
    lockd fence its VM; on shared storage the mode is the storage's, so lockd serves
    but says so (it said nothing)."""
    locks = tmp_path / "locks"
    locks.mkdir()
    os.chmod(locks, 0o777)  # noqa: S103 - the misconfiguration under test
    log = tmp_path / "lockd.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [*LOCKD, "serve", "--socket", str(tmp_path / "lockd.sock"),
             "--lock-dir", str(locks), "--journal-dir", str(tmp_path / "journal")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for((tmp_path / "lockd.sock").exists)
        assert daemon.poll() is None  # served
        text = log.read_text()
        assert f"lock_dir {locks}: other users can write to it" in text
        assert f"chmod go-w {locks}" in text
    finally:
        daemon.terminate()
        daemon.wait(10)


def test_a_daemon_started_under_umask_0_makes_no_directory_others_can_write() -> None:
    """A root lockd started with a umask of 0 on a fresh host makes its journal, lock,
    socket and pid file directories and their missing parents: none of them may be
    another user's to write, or that user could move the journal aside (the next start
    forgets every lease held) or put a lock directory of their own in its place. Before,
    the parents (``/var/lib/lockd``) were made 0777."""
    base = Path(tempfile.mkdtemp(prefix="lockd-umask-"))
    os.chmod(base, 0o755)  # noqa: S103 - the other uid must reach what lockd makes
    journal = base / "var" / "lib" / "lockd" / "journal"
    pid_file = base / "run" / "pid" / "lockd.pid"
    root = base / "daemon"
    root.mkdir()
    daemon = DaemonProcess(
        root, base / "var" / "lib" / "libvirt" / "lockd",
        "--journal-dir", str(journal), "--pid-file", str(pid_file),
        socket_dir=base / "run" / "lockd",
    )  # fmt: skip
    daemon.launcher = ["sh", "-c", 'umask 0 && exec "$@"', "sh"]
    try:
        daemon.start()

        def move_aside(path: Path) -> str:
            def rename() -> str:
                try:
                    os.rename(path, path.with_name("moved"))
                except OSError as exc:
                    return type(exc).__name__
                return "moved"

            return as_other_user(rename)

        assert move_aside(journal) == "PermissionError"
        assert move_aside(daemon.lock_dir) == "PermissionError"
        assert journal.is_dir()
        assert daemon.lock_dir.is_dir()
        made = [Path(d) for d, _, _ in os.walk(base) if Path(d) not in (base, root)]
        assert {journal, daemon.lock_dir, pid_file.parent} <= set(made)
        others_write = {str(d): oct(d.stat().st_mode & 0o777) for d in made
                        if d.stat().st_mode & 0o022}  # fmt: skip
        assert others_write == {}
    finally:
        daemon.stop()
        shutil.rmtree(base)


def test_journal_check_repair_refuses_a_journal_dir_other_users_can_write(tmp_path: Path) -> None:
    """``lockd serve`` refuses a journal directory other users can write to; root's
    ``journal-check --repair`` on it (the way out a damaged journal's error names) does
    too, and changes nothing. Before, it cut the damaged segment wherever its name led:
    another user's symlink there had root truncate a file of that user's choosing."""
    journal = tmp_path / "journal"
    fill(journal, 200)
    newest = journal / list_segments(str(journal))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damage half way: the cut would keep the first half
    victim = tmp_path / "victim"
    victim.write_bytes(bytes(data))
    newest.unlink()
    newest.symlink_to(victim)  # planted by a user who can write to the directory
    os.chmod(journal, 0o777)  # noqa: S103 - the misconfiguration under test
    done = subprocess.run(
        [*LOCKD, "journal-check", "--journal-dir", str(journal), "--repair"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"refusing journal_dir {journal}: other users can write to it" in done.stderr
    assert victim.read_bytes() == bytes(data)
    assert newest.is_symlink()


def test_a_uid_refused_in_a_loop_does_not_hide_another_uid_s_refusal(
    open_daemon: DaemonProcess,
) -> None:
    """Refused connections are logged once a minute: per uid, so that one uid refused in
    a loop (a monitor with the wrong user) does not hide another's refusal (a new VM
    manager's, whose uid allowed_uids lacks) for as long as the loop lasts."""

    def refused(uid: int) -> dict[str, Any]:
        conn, _ = connect_as(uid, open_daemon.socket)
        with conn:
            frames = FrameDecoder(MAX_REPLY_FRAME)
            while (frame := frames.next_frame()) is None:
                data = conn.recv(4096)
                assert data, "closed without a word"
                frames.receive_data(data)
        reply: dict[str, Any] = decode_item(frame)
        return reply

    for _ in range(3):
        assert refused(65533)["error"]["code"] == "permission-denied"
    assert refused(65532)["error"]["code"] == "permission-denied"
    log = open_daemon.log.read_text()
    assert log.count("uid 65533: uid not allowed") == 1
    assert log.count("uid 65532: uid not allowed") == 1


def test_the_handoff_check_refuses_a_lock_dir_the_new_program_would_refuse(tmp_path: Path) -> None:
    """A re-exec first runs the new program's `lockd serve --handoff-check`: what it
    passes, the new program must start on, since it exits after the exec holding every
    lock (exit 78, not restarted). It refuses a lock directory its uid cannot write (a
    user's lockd whose lock_dir was chowned to root since it started): the check passed
    it, and the re-exec lost every lease. Now the check refuses it, naming it, and the
    re-exec is abandoned. Played by uid 65534 in a forked child, the check run in it."""
    import lockd.cli
    import lockd.daemon
    import lockd.journal_file
    import lockd.reexec

    base = Path(tempfile.mkdtemp(prefix="handoff-", dir="/var/tmp"))
    try:
        os.chmod(base, 0o755)  # noqa: S103 - for uid 65534 to reach what is in it
        journal, locks = base / "journal", base / "locks"
        journal.mkdir(mode=0o700)
        os.chown(journal, OTHER_UID, OTHER_UID)
        locks.mkdir(mode=0o755)  # root's: uid 65534 cannot make lockspaces in it
        config = base / "lockd.toml"
        config.write_text("")
        config.chmod(0o644)
        err = base / "stderr"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                fd = os.open(err, os.O_WRONLY | os.O_CREAT, 0o644)
                sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115
                os.setgid(OTHER_UID)
                os.setuid(OTHER_UID)
                code = lockd.cli.main(
                    ["serve", "--handoff-check", "--config", str(config),
                     "--socket", str(base / "lockd.sock"), "--lock-dir", str(locks),
                     "--journal-dir", str(journal), "--pid-file", str(journal / "lockd.pid")]
                )  # fmt: skip
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        said = err.read_text()
        assert os.waitstatus_to_exitcode(status) != 0, said
        assert f"refusing lock_dir {locks}: uid {OTHER_UID} cannot write to it" in said, said
    finally:
        shutil.rmtree(base)
