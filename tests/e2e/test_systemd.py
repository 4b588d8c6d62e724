"""systemd integration without a running systemd: socket activation, notify, the units."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from lockd import config
from lockd.commands import EXIT_ERROR, EXIT_NEEDS_OPERATOR, EXIT_USAGE
from lockd.journal_file import lock_journal, segment_name
from lockd.journal_format import FORMAT, VERSION, encode_header
from lockd.lockfiles import try_lock
from protocol.client import Client
from protocol.names import FILES_LOCKSPACE
from tests.e2e.conftest import LOCKD, DaemonProcess, wait_for
from tests.e2e.fake_systemd import LAUNCHER, FakeServiceManager
from tests.lockprobe import probe

pytestmark = pytest.mark.e2e
UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="needs systemd-socket-activate"
)
def test_socket_activation_by_name(tmp_path: Path) -> None:
    """The daemon serves the sockets systemd passes, claimed by their names."""
    sock, admin = tmp_path / "lockd.sock", tmp_path / "admin.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), "-l", str(admin),
         "--fdname=lockd.socket:lockd-admin.socket",
         *LOCKD, "serve", "--lock-dir", str(tmp_path / "locks"),
         "--journal-dir", str(tmp_path / "journal"), "--socket", str(tmp_path / "unused.sock"),
         "--admin-socket", str(tmp_path / "unused2.sock")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(sock.exists)
        status = subprocess.run(
            [*LOCKD, "status", "--json", "--socket", str(sock)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        clients = subprocess.run(
            [*LOCKD, "disconnect", "99", "--admin-socket", str(admin)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert "no client 99" in clients.stderr  # the admin socket answers as the admin socket
        assert not (tmp_path / "unused.sock").exists()  # activated sockets replace binding
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert sock.exists()  # the activated socket file belongs to the manager: left in place


def _activated(tmp_path: Path, log: Path, *serve: str) -> subprocess.Popen[bytes]:
    """``lockd serve`` under systemd-socket-activate, on ``lockd.sock`` and ``admin.sock``
    in ``tmp_path`` (as lockd.socket and lockd-admin.socket), its stderr in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            ["systemd-socket-activate", "-l", str(tmp_path / "lockd.sock"),
             "-l", str(tmp_path / "admin.sock"), "--fdname=lockd.socket:lockd-admin.socket",
             *LOCKD, "serve", "--lock-dir", str(tmp_path / "locks"),
             "--journal-dir", str(tmp_path / "journal"), *serve],
            stderr=out,
        )  # fmt: skip


def _status(sock: Path) -> None:
    done = subprocess.run(
        [*LOCKD, "status", "--json", "--socket", str(sock)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="needs systemd-socket-activate"
)
def test_a_reexec_of_a_socket_activated_daemon_leaves_the_managers_files_at_the_stop(
    tmp_path: Path,
) -> None:
    """`systemctl reload lockd` (SIGUSR1), then a stop: the socket files stay, as
    without the reload, since lockd.socket keeps listening on them; and so does what
    lies at the configured paths, which this daemon never bound (another daemon's)."""
    sock, admin = tmp_path / "lockd.sock", tmp_path / "admin.sock"
    others = [tmp_path / "configured.sock", tmp_path / "configured-admin.sock"]
    for other in others:
        other.write_text("another daemon's\n")
    log = tmp_path / "daemon.log"
    proc = _activated(tmp_path, log, "--socket", str(others[0]), "--admin-socket", str(others[1]))

    try:
        wait_for(sock.exists)
        _status(sock)  # the first connection starts the service
        assert f"serving {sock} (admin {admin})" in log.read_text()  # where it listens
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "re-exec: took over" in log.read_text())
        _status(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "lockd stopped" in log.read_text()
    assert sock.exists()
    assert admin.exists()
    assert all(other.read_text() == "another daemon's\n" for other in others)


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="needs systemd-socket-activate"
)
def test_an_edited_socket_key_does_not_stop_a_reload_under_socket_activation(
    tmp_path: Path,
) -> None:
    """Under lockd.socket the `socket` key moves nothing (the socket unit's ListenStream=
    decides): editing it made SIGUSR1 (`systemctl reload lockd`) refuse to re-exec,
    "the configuration now moves socket", and SIGHUP ask for a restart that would not
    have moved it either."""
    sock = tmp_path / "lockd.sock"
    config = tmp_path / "lockd.toml"
    config.write_text(f'socket = "{tmp_path}/configured.sock"\nfence_grace = 5\n')
    log = tmp_path / "daemon.log"
    proc = _activated(tmp_path, log, "--config", str(config))

    try:
        wait_for(sock.exists)
        _status(sock)  # the first connection starts the service
        # SocketMode=/SocketGroup= of the socket unit decide too, not the file.
        config.write_text(
            f'socket = "{tmp_path}/elsewhere.sock"\nfence_grace = 5\nsocket_mode = "0660"\n'
        )
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: socket, socket_mode changed; not used" in log.read_text())
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "re-exec: took over" in log.read_text() or "abandoned" in log.read_text())
        _status(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert "re-exec: took over" in text
    assert "abandoned" not in text
    assert "takes a restart" not in text
    assert not (tmp_path / "elsewhere.sock").exists()
    # The new program, started with socket_mode in its file, says so too.
    assert text.count("socket_mode set but not used: the service manager's socket") == 1


def test_notify_ready_status_watchdog_and_stopping(tmp_path: Path) -> None:
    fm = FakeServiceManager(tmp_path)
    try:
        env, _ = fm.env()
        env.update({"WATCHDOG_USEC": "200000"})
        import os

        proc = subprocess.Popen(
            [*fm.launcher(), *LOCKD, "serve", "--socket", str(tmp_path / "s"),
             "--admin-socket", str(tmp_path / "a"), "--lock-dir", str(tmp_path / "locks"),
             "--journal-dir", str(tmp_path / "journal")],
            env={**os.environ, **env}, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(lambda: fm.ready_count() == 1)
            wait_for(lambda: sum("WATCHDOG=1" in m for m in fm.messages) >= 3)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        ready = next(m for m in fm.messages if "READY=1" in m)
        assert "STATUS=serving; recovery held 0" in ready
        assert any("STOPPING=1" in m for m in fm.messages)
    finally:
        fm.close()


def test_a_reexec_tells_the_manager_it_reloads_until_ready_again(tmp_path: Path) -> None:
    """SIGUSR1 (`systemctl reload lockd`) said nothing to systemd: the unit never showed
    "reloading" while the re-exec ran. Now RELOADING=1 first, then READY=1: the new
    program's after its recovery, or this one's when the re-exec is abandoned."""
    fm = FakeServiceManager(tmp_path)
    config = tmp_path / "lockd.toml"
    config.write_text("fence_grace = 5\n")
    log = tmp_path / "daemon.log"
    try:
        env, _ = fm.env()
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*fm.launcher(), *LOCKD, "serve", "--config", str(config),
                 "--socket", str(tmp_path / "s"), "--admin-socket", str(tmp_path / "a"),
                 "--lock-dir", str(tmp_path / "locks"),
                 "--journal-dir", str(tmp_path / "journal")],
                env={**os.environ, **env}, stderr=out,
            )  # fmt: skip
        try:
            wait_for(lambda: fm.ready_count() == 1)
            proc.send_signal(signal.SIGUSR1)
            wait_for(lambda: fm.ready_count() == 2)
            config.write_text("fence_grace = 5\nbogus = 1\n")
            proc.send_signal(signal.SIGUSR1)
            wait_for(lambda: fm.ready_count() == 3)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        said = [m for m in fm.messages if "READY=1" in m or "RELOADING=1" in m]
        assert [("RELOADING=1" in m, "READY=1" in m) for m in said] == [
            (False, True), (True, False), (False, True), (True, False), (False, True),
        ]  # fmt: skip
        assert all("MONOTONIC_USEC=" in m for m in said if "RELOADING=1" in m)
        assert "STATUS=serving; recovery held" in said[2]
        assert "STATUS=serving; re-exec abandoned" in said[4]
        assert "unknown key 'bogus'" in said[4]
    finally:
        fm.close()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the shipped units (ExecStart pointed at a real binary),
    with the drop-in beside them (lockd.service.d/hardening.conf), which it reads too."""
    for unit in UNITS.iterdir():
        if unit.is_dir():
            shutil.copytree(unit, tmp_path / unit.name)
            continue
        text = unit.read_text().replace("/usr/local/bin/lockd", "/bin/true")
        (tmp_path / unit.name).write_text(text)
    service = (UNITS / "lockd.service").read_text()
    for needed in ("Type=notify", "OOMScoreAdjust=-900", "FileDescriptorStoreMax=",
                   "ExecReload=/bin/kill -USR1 $MAINPID", "LimitNOFILE=",
                   "\nFileDescriptorStorePreserve=yes\n",
                   # Shared storage mounted at the lock dir: mounted before lockd starts.
                   "\nRequiresMountsFor=/var/lib/libvirt/lockd\n"):  # fmt: skip
        assert needed in service
    # SIGHUP for lockd alone: its other processes have no use for one (they ignore or block it).
    assert "systemctl kill --kill-whom=main -s HUP lockd" in service
    assert "systemctl kill -s HUP" not in service
    for sock in ("lockd.socket", "lockd-admin.socket"):
        text = (UNITS / sock).read_text()
        assert "SocketMode=0600" in text
        assert f"FileDescriptorName={sock}" in text
        # /run/lockd: an auditor given the client socket (SocketMode=, allowed_uids) must
        # get through the directory, whichever unit made it.
        assert "DirectoryMode=0711" in text
        # A stopped socket unit leaves no socket file that refuses every connection.
        assert "\nRemoveOnStop=yes\n" in text
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         "lockd.service", "lockd.socket", "lockd-admin.socket"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if "Failed to" in done.stderr and "manager" in done.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    # Before systemd 254 (this machine has 252) the store's Preserve= is unknown: said,
    # and ignored. Nothing else may be said about the units.
    unknown = "Unknown key 'FileDescriptorStorePreserve' in section [Service], ignoring."
    said = [line for line in done.stderr.splitlines() if "lockd" in line and unknown not in line]
    assert said == [], done.stderr


def _prevented(unit: Path) -> list[int]:
    """The exit statuses a unit's RestartPreventExitStatus= keeps from being restarted."""
    return [
        int(status)
        for line in unit.read_text().splitlines()
        if line.startswith("RestartPreventExitStatus=")
        for status in line.partition("=")[2].split()
    ]


def test_the_units_do_not_restart_what_a_restart_cannot_mend() -> None:
    """The system and the per-user unit keep from restarting exactly the statuses of a
    configuration error and of a start refused for the state on disk, as the code has
    them."""
    for unit in (UNITS / "lockd.service", UNITS / "user" / "lockd.service"):
        assert _prevented(unit) == [EXIT_USAGE, EXIT_NEEDS_OPERATOR], unit


def test_a_configuration_error_exits_with_the_status_the_unit_does_not_restart(
    tmp_path: Path,
) -> None:
    """A typo in lockd.toml made lockd.service restart five times, failing alike each
    time, until systemd's start limit failed the unit: the status a configuration error
    exits with is the unit's RestartPreventExitStatus=, so it fails at once."""
    config = tmp_path / "lockd.toml"
    config.write_text("fence_grace = 5\njournal_synk = 'batch'\n")
    done = subprocess.run(
        [*LOCKD, "serve", "--config", str(config), "--socket", str(tmp_path / "lockd.sock"),
         "--lock-dir", str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "journal")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "lockd.toml:2: unknown key 'journal_synk'" in done.stderr
    assert done.returncode == EXIT_USAGE
    assert done.returncode in _prevented(UNITS / "lockd.service")
    assert not (tmp_path / "journal").exists()  # refused before anything was made


class _Start:
    """A ``lockd serve`` on temp paths, and what a refusal case adds to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.journal = root / "journal"
        self.args = ["--socket", str(root / "lockd.sock"), "--lock-dir", str(root / "locks")]
        self.launcher: list[str] = []
        self.env: dict[str, str] = {}
        self.fds: list[int] = []

    def activated(self, **fds: int) -> None:
        """Pass ``fds`` as the service manager would, by name."""
        self.launcher = [sys.executable, "-c", LAUNCHER]
        self.env = {"FAKE_SD_FDS": ",".join(map(str, fds.values())),
                    "FAKE_SD_NAMES": ":".join(fds)}  # fmt: skip
        self.fds = list(fds.values())

    def run(self) -> subprocess.CompletedProcess[str]:
        argv = [*self.launcher, *LOCKD, "serve", "--config", os.devnull, *self.args,
                "--journal-dir", str(self.journal)]  # fmt: skip
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **self.env}, pass_fds=self.fds,
        )  # fmt: skip


def _damaged_journal(start: _Start) -> str:
    start.journal.mkdir(mode=0o700)
    record = encode_header(1)
    (start.journal / segment_name(1)).write_bytes(record + b"\xff" * 40 + record)
    return "journal corrupt at byte"


def _newer_journal(start: _Start) -> str:
    start.journal.mkdir(mode=0o700)
    header = cbor2.dumps({"format": FORMAT, "version": VERSION + 1, "first_seq": 1})
    (start.journal / segment_name(1)).write_bytes(header)
    return "journal written by a newer lockd"


def _journal_dir_others_write(start: _Start) -> str:
    start.journal.mkdir(mode=0o700)
    os.chmod(start.journal, 0o777)  # noqa: S103 - the misconfiguration under test
    return f"refusing journal_dir {start.journal}: other users can write to it"


def _journal_dir_below_one_others_write(start: _Start) -> str:
    shared = start.root / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # noqa: S103 - the misconfiguration under test
    start.journal = shared / "journal"
    return f"directory {shared} above it can be written by other users"


def _planted_pid_file(start: _Start) -> str:
    pid_file = start.root / "lockd.pid"
    pid_file.symlink_to(start.root / "victim")
    start.args += ["--pid-file", str(pid_file)]
    return f"refusing pid_file {pid_file}: it is a symbolic link"


def _a_file_where_the_socket_goes(start: _Start) -> str:
    (start.root / "lockd.sock").write_text("")
    return f"{start.root / 'lockd.sock'} exists and is not a socket"


def _stored_locks_and_an_empty_journal(start: _Start) -> str:
    lease = os.open(start.root / "lease", os.O_RDWR | os.O_CREAT, 0o600)
    try_lock(lease, shared=False)  # a lock the store kept for a VM
    start.activated(**{"lease-0001": lease})
    return "the service manager's fd store holds the locks of 1 leases"


def _a_socket_lockd_does_not_serve(start: _Start) -> str:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(start.root / "other.sock"))
    other.listen()
    start.activated(**{"other.socket": other.detach()})
    return "socket activation passed a socket lockd does not serve ('other.socket')"


@pytest.mark.parametrize(
    "refusal",
    [
        _damaged_journal,
        _newer_journal,
        _journal_dir_others_write,
        _journal_dir_below_one_others_write,
        _planted_pid_file,
        _a_file_where_the_socket_goes,
        _stored_locks_and_an_empty_journal,
        _a_socket_lockd_does_not_serve,
    ],
    ids=lambda refusal: refusal.__name__.strip("_"),
)
def test_a_start_refused_for_the_state_on_disk_exits_with_a_status_the_unit_does_not_restart(
    tmp_path: Path, refusal: Callable[[_Start], str]
) -> None:
    """A damaged journal, a journal directory others control, a planted pid file, a file
    where the socket goes, the fd store's locks with an empty journal, a socket unit
    misnamed (and a lock directory lockd cannot write: tests/lockd/test_daemon.py, as a
    user; a file where a directory goes: tests/lockd/test_cli.py): each exited 1, so
    lockd.service restarted it five times, refused alike each time, until the start
    limit failed the unit. They exit 78, which the unit does not restart; the fd store
    keeps the locks meanwhile."""
    start = _Start(tmp_path)
    try:
        said = refusal(start)
        done = start.run()
        assert not (start.root / "lockd.sock").is_socket()
    finally:
        for fd in start.fds:
            os.close(fd)
    assert said in done.stderr
    assert done.returncode == EXIT_NEEDS_OPERATOR, done.stderr
    assert done.returncode in _prevented(UNITS / "lockd.service")


def test_a_start_refused_for_what_passes_by_itself_is_restarted(tmp_path: Path) -> None:
    """A pid file, journal or socket still held by a lockd that is exiting frees itself:
    those refusals exit 1, which the unit restarts."""
    start = _Start(tmp_path)
    start.args += ["--pid-file", str(tmp_path / "lockd.pid")]
    pid_file = os.open(tmp_path / "lockd.pid", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(pid_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = start.run()
    finally:
        os.close(pid_file)
    assert "is locked by a running daemon" in held.stderr
    start.journal.mkdir(mode=0o700)
    journal = lock_journal(str(start.journal), "an exiting lockd")
    assert journal is not None
    try:
        in_use = start.run()
    finally:
        os.close(journal)
    assert "is in use by another lockd" in in_use.stderr
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as serving:
        serving.bind(str(tmp_path / "lockd.sock"))
        serving.listen()
        served = start.run()
    assert "another daemon is serving" in served.stderr
    prevented = _prevented(UNITS / "lockd.service")
    for done in (held, in_use, served):
        assert done.returncode == EXIT_ERROR, done.stderr
        assert done.returncode not in prevented


_HARDENED = r"""
set -e
# ProtectSystem=strict and ReadWritePaths=: all read-only but the paths given.
for path in "$@"; do
    [ "$path" = -- ] && break
    mount --bind "$path" "$path"
done
mount -o remount,bind,ro /
while [ "$1" != -- ]; do mount -o remount,bind,rw "$1" "$1"; shift; done
shift
exec "$@"
"""


def _unit_settings(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="capabilities and mounts take root")
@pytest.mark.skipif(
    not (shutil.which("setpriv") and shutil.which("unshare")), reason="needs setpriv and unshare"
)
def test_the_hardening_drop_in_leaves_lockd_what_it_needs(tmp_path: Path) -> None:
    """lockd under contrib's hardening.conf, as systemd would run it: its capabilities
    only, no new privileges, the file system read-only but for ReadWritePaths=. It
    takes a lease, keeps it across a re-exec, and fences a VM running as another uid
    (which takes CAP_KILL)."""
    settings = _unit_settings(UNITS / "lockd.service.d" / "hardening.conf")
    caps = settings["CapabilityBoundingSet"].split()
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["ReadWritePaths"].split() == ["/var/lib/lockd", "/var/lib/libvirt/lockd"]
    if subprocess.run(["unshare", "-m", "true"], check=False).returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    state, locks = tmp_path / "state", tmp_path / "locks"  # /var/lib/lockd, the lock dir
    for directory in (state, locks):
        directory.mkdir(mode=0o700)
    daemon = DaemonProcess(state, locks)  # the journal in state/, the sockets too
    bounding = ",".join(["-all", *(f"+{cap.removeprefix('CAP_').lower()}" for cap in caps)])
    daemon.launcher = [
        "unshare", "-m", "--propagation", "private", "sh", "-c", _HARDENED, "sh",
        str(state), str(locks), "--",
        "setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs",
    ]  # fmt: skip
    go, ready = os.pipe(), os.pipe()
    vm = 0
    try:
        daemon.start()
        vm = os.fork()
        if vm == 0:  # pragma: no cover - child: a VM of uid 65534, its lock driver root's
            try:
                client = Client(str(daemon.socket), timeout=10)
                os.setgid(65534)
                os.setuid(65534)
                owner = {"uuid": uuid.uuid4().bytes, "name": "vm", "id": 1, "pid": os.getpid()}
                client.call("register", owner=owner)
                client.call("acquire", leases=[{"lockspace": FILES_LOCKSPACE,
                                                "resource": "disk"}], autocreate=True)  # fmt: skip
                os.write(ready[1], b"x")
                os.read(go[0], 1)
                client.close()  # running on: fenced
                time.sleep(60)
            finally:
                os._exit(0)
        assert os.read(ready[0], 1) == b"x"
        lease = locks / FILES_LOCKSPACE / "disk"
        assert probe(lease, "ofd") == "busy"
        daemon.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        wait_for(lambda: "re-exec: took over" in daemon.log.read_text(), timeout=30)
        assert probe(lease, "ofd") == "busy"
        os.write(go[1], b"x")
        ended: list[int] = []

        def reaped() -> bool:
            pid, status = os.waitpid(vm, os.WNOHANG)
            ended.extend([status] if pid else [])
            return bool(pid)

        wait_for(reaped, timeout=30)
        status, vm = ended[0], 0
        assert os.WIFSIGNALED(status)
        assert os.WTERMSIG(status) == signal.SIGTERM
        wait_for(lambda: not lease.exists(), timeout=30)  # released, its file removed
    finally:
        if vm:
            os.kill(vm, signal.SIGKILL)
            os.waitpid(vm, 0)
        daemon.stop()
        for fd in (*go, *ready):
            os.close(fd)
    assert "cannot signal" not in daemon.log.read_text()


def _service_lines(unit: Path) -> set[str]:
    """The settings of a unit's [Service] section."""
    section = unit.read_text().split("[Service]", 1)[1].split("\n[", 1)[0]
    return {line for line in section.splitlines() if line and not line.startswith("#")}


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_the_user_units_verify_and_listen_where_lockd_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """contrib/systemd/user: `systemctl --user` units for the per-user daemon, on the
    sockets a user's lockd run, lockd acquire and plugin look for, and otherwise the
    system unit but for what a user manager may not do."""
    user = UNITS / "user"
    runtime = tmp_path / "run"
    runtime.mkdir()
    for unit in user.iterdir():
        text = unit.read_text().replace("/usr/local/bin/lockd", "/bin/true")
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "--user", "verify", "--man=no",
         "lockd.service", "lockd.socket", "lockd-admin.socket"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    unknown = "Unknown key 'FileDescriptorStorePreserve' in section [Service], ignoring."
    said = [line for line in done.stderr.splitlines() if "lockd" in line and unknown not in line]
    assert said == [], done.stderr
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    defaults = config.default_paths(uid=1000)
    for name, key in (("lockd.socket", "socket"), ("lockd-admin.socket", "admin_socket")):
        settings = _unit_settings(user / name)
        assert settings["ListenStream"].replace("%t", str(runtime)) == defaults[key]
        assert settings["FileDescriptorName"] == name
        assert settings["DirectoryMode"] == "0700"  # lockd's clients refuse one others can write
    system = _service_lines(UNITS / "lockd.service")
    left_out = {line for line in system if line.startswith(("OOMScoreAdjust=", "LimitNOFILE="))}
    assert len(left_out) == 2
    assert _service_lines(user / "lockd.service") == system - left_out


def test_a_socket_passed_under_a_name_lockd_does_not_serve_stops_the_start(
    tmp_path: Path,
) -> None:
    """A socket unit renamed by a packager (lockd-main.socket, no FileDescriptorName=)
    passes its fd under that name: lockd logged "not ours", closed it and served on
    paths of its own, and every client of the unit's socket waited in its backlog."""

    fm = FakeServiceManager(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "main.sock"))
    listener.listen()
    proc = None
    try:
        env, _ = fm.env({"lockd-main.socket": listener.fileno()})
        proc = subprocess.Popen(
            [*fm.launcher(), *LOCKD, "serve", "--socket", str(tmp_path / "own.sock"),
             "--lock-dir", str(tmp_path / "locks"), "--journal-dir", str(tmp_path / "journal")],
            env={**os.environ, **env}, stderr=subprocess.PIPE, text=True,
            pass_fds=[listener.fileno()],
        )  # fmt: skip
        wait_for(lambda: proc.poll() is not None or fm.ready_count() > 0)
        assert fm.ready_count() == 0
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == EXIT_NEEDS_OPERATOR
        assert (
            "lockd serve: socket activation passed a socket lockd does not serve "
            "('lockd-main.socket'): lockd serves one socket named lockd.socket and one "
            "named lockd-admin.socket (FileDescriptorName= of the socket units"
        ) in err
        assert not (tmp_path / "own.sock").exists()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        listener.close()
        fm.close()
