"""Sockets on the dispatcher: listeners, peer credentials, and the per-connection transport.

All of it runs on the dispatcher thread as fd callbacks; nothing blocks.
Accepted sockets are non-blocking; a reply the kernel cannot take at once is
queued and sent when the socket becomes writable.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pykka

from actors.connection import MAX_UNSENT_TOTAL, Drained, PeerGone, Received
from actors.runtime import Dispatcher, Timer, tell_if_alive
from lockd import fork_guard
from lockd.config import make_dirs
from protocol.codec import encode_item
from protocol.errors import ErrorCode
from protocol.framing import encode_frame
from protocol.messages import error_to_wire

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
READ_CHUNK = 65536


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, from SO_PEERCRED."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


SO_PEERPIDFD = 77
"""A pidfd for the peer that connected (Linux 6.5+; Python 3.11 has no constant)."""


def peer_still_runs(sock: socket.socket) -> bool:
    """True only if the process that connected to ``sock`` runs still (not even a zombie),
    so that its pid from SO_PEERCRED names it. SO_PEERPIDFD pins that very process: its
    pidfd polls readable once it exits. Any failure (an older kernel, no fd free, the
    peer reaped) proves nothing, and is False."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return not poller.poll(0)
    finally:
        os.close(fd)


PROBE_TIMEOUT = 2.0
"""Seconds a probe of a socket file waits for its connect."""


def refuse_if_served(path: str) -> None:
    """Raise OSError (EADDRINUSE) if a daemon accepts connections on ``path``, or
    (EEXIST) if it is another kind of file; a stale socket file is left for the bind.

    Asked again before anything else is started too: a second ``lockd serve`` on a
    served socket made and wrote its journal before its bind found out."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A daemon that listens but does not accept (hung, its backlog full) makes a
    # blocking connect wait for ever: it still holds the socket.
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (TimeoutError, BlockingIOError):  # EAGAIN: its backlog is full
        raise OSError(
            errno.EADDRINUSE,
            f"another daemon is serving {path} (it does not accept connections: stuck?)",
        ) from None
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: nobody listens any more
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another daemon is serving {path}")


def bind_unix(
    path: str, backlog: int = 128, *, mode: int = 0o600, group: int | None = None
) -> socket.socket:
    """Listen on ``path`` with ``mode`` (and ``group``), replacing a stale socket but
    never another file.

    The directory is created 0700 if missing (0711 if ``mode`` lets others connect: they
    must pass through it). A socket file that still accepts connections belongs to a
    running daemon: refuse rather than steal.

    Race-free, and no symbolic link at ``path`` is followed: the file ``bind`` makes takes
    the mode of the socket's own inode less the umask, so that is set to 0600 on the
    socket fd first (a process-wide umask around ``bind`` would also apply to whatever
    the daemon's other threads, running by then, create meanwhile: a directory made 0700
    would come out 0600, unusable). Then the file is opened by ``O_PATH|O_NOFOLLOW``,
    checked to be a socket of this uid's, and only that very inode is given ``group``
    and ``mode``: a ``chmod(path)`` after ``bind`` followed a symbolic link that another
    user swapped in meanwhile (in a directory they can write to), and changed the mode
    of the file it named.
    """
    make_dirs(os.path.dirname(path) or ".", 0o711 if mode & 0o077 else 0o700)
    refuse_if_served(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket: nobody listens any more
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        # At once: a client that finds the file (one polling for it, as scripts and
        # `lockd bench` do) is refused until then. The socket's own 0600 lets only this
        # uid in meanwhile.
        sock.listen(backlog)
        try:
            set_socket_access(path, mode, group)
        except OSError:
            with contextlib.suppress(OSError):
                if _is_own_socket(os.lstat(path)):
                    os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _is_own_socket(st: os.stat_result) -> bool:
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid()


def set_socket_access(path: str, mode: int, group: int | None) -> None:
    """Give the socket file at ``path`` ``group`` (None: leave it) and then ``mode``,
    never following a symbolic link: OSError if ``path`` is no socket of this uid's (one
    swapped in by whoever can write to its directory)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not _is_own_socket(st):
            raise OSError(
                errno.EEXIST,
                f"{path} is no longer the socket lockd bound (another user can write to "
                f"its directory?): found a file of mode {st.st_mode:o}, uid {st.st_uid}",
            )
        # The inode this fd holds, whatever is at the path by now (fchmod and fchown
        # refuse an O_PATH fd).
        here = f"/proc/self/fd/{fd}"
        if group is not None and st.st_gid != group:
            try:
                os.chown(here, -1, group)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot give socket {path} to group {group}: {exc.strerror}"
                ) from None
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(here, mode)
    finally:
        os.close(fd)
    if mode & 0o077:
        _warn_if_unreachable(path, mode, group)


def _warn_if_unreachable(path: str, mode: int, group: int | None) -> None:
    """``mode`` lets other users connect, but the directory may not let them through."""
    directory = os.path.dirname(path) or "."
    st = os.stat(directory)
    dir_mode = stat.S_IMODE(st.st_mode)
    sock_gid = os.getegid() if group is None else group
    if not (dir_mode & 0o001 or (dir_mode & 0o010 and st.st_gid == sock_gid)):
        log.warning(
            "socket %s has mode %04o, but its directory %s (mode %04o, gid %d) lets no "
            "other user through to it: chmod o+x %s",
            path, mode, directory, dir_mode, st.st_gid, directory,
        )  # fmt: skip


class SocketTransport:
    """A connected client socket driven by dispatcher callbacks."""

    unsent_total = 0
    """Bytes queued and not yet sent by every connection of this process together (all
    counted on the dispatcher thread): past MAX_UNSENT_TOTAL each is :attr:`crowded`."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        sock: socket.socket,
        peer: tuple[int, int, int],
        on_closed: Callable[[], None],
    ) -> None:
        self._dispatcher = dispatcher
        self._sock = sock
        # A forked child's copy would keep the connection open after this process's
        # end: the client would wait out its timeout instead of seeing the close.
        self._fd = fork_guard.remember(sock.fileno())
        self.peer_pid, self.peer_uid, self.peer_gid = peer
        self._out: collections.deque[memoryview] = collections.deque()
        self._backlog = 0
        self._reading = True
        self._closed = False
        self.gone = False
        """A send failed because the peer closed its socket (EPIPE, ECONNRESET)."""
        self._on_closed = on_closed
        self.actor: pykka.ActorRef[Any] | None = None

    def start(self, actor: pykka.ActorRef[Any]) -> None:
        """Begin reading for ``actor``."""
        self.actor = actor
        self._update()

    @property
    def backlog(self) -> int:
        return self._backlog

    def _update(self) -> None:
        if self._closed:
            return
        events = (selectors.EVENT_READ if self._reading else 0) | (
            selectors.EVENT_WRITE if self._out else 0
        )
        if events:  # one epoll_ctl: a watch replaces the events the fd had
            self._dispatcher.watch(self._fd, events, self._ready)
        else:
            self._dispatcher.unwatch(self._fd)

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and self._reading and not self._closed:
            try:
                data = self._sock.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._reading = False
                self._update()
            tell_if_alive(self.actor, Received(data))

    def write(self, data: bytes) -> None:
        if self._closed or self.gone:
            return
        if not self._out:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._send_failed(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._out.append(memoryview(data))
            self._backlog += len(data)
            SocketTransport.unsent_total += len(data)
            self._update()
            return
        self._out.append(memoryview(data))
        self._backlog += len(data)
        SocketTransport.unsent_total += len(data)

    def _flush(self) -> None:
        while self._out:
            chunk = self._out[0]
            try:
                sent = self._sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._send_failed(exc)
                break
            self._backlog -= sent
            SocketTransport.unsent_total -= sent
            if sent == len(chunk):
                self._out.popleft()
            else:
                self._out[0] = chunk[sent:]
                break
        self._update()
        if not self._out and not self.gone:
            tell_if_alive(self.actor, Drained())  # the connection may take requests again

    def _send_failed(self, exc: OSError) -> None:
        """Drop what was queued; if the peer closed its socket, the connection ends."""
        self._drop_unsent()
        if isinstance(exc, ConnectionError) or exc.errno == errno.ENOTCONN:
            if not self.gone:
                self.gone = True
                tell_if_alive(self.actor, PeerGone())
        else:
            # Not the peer's doing (ENOBUFS, ENOMEM): the reply is lost, as before,
            # but the connection, and with it the owner's leases, is kept.
            log.warning("client socket: send failed (%s); a reply was lost", exc)

    def pause_reading(self) -> None:
        self._reading = False
        self._update()

    def resume_reading(self) -> None:
        self._reading = True
        self._update()

    def close(self) -> None:
        if self._closed:
            return
        if self._out:
            # Best effort: push the last error reply out before closing.
            with contextlib.suppress(OSError):
                self._sock.send(b"".join(bytes(c) for c in self._out))
        self._closed = True
        self._drop_unsent()
        self._dispatcher.unwatch(self._fd)
        fork_guard.forget(self._fd)
        self._sock.close()
        self._on_closed()

    def hang_up(self) -> None:
        """Close the socket as the daemon's exit would, the peer seeing EOF: the lock
        system embedded in a program stopped, with its dispatcher and actors, so nothing
        is unwatched or told; harmless once closed."""
        if self._closed:
            return
        self._closed = True
        self._drop_unsent()
        fork_guard.forget(self._fd)
        self._sock.close()

    def _drop_unsent(self) -> None:
        """Forget every byte queued (sent as far as it goes, handed over, or for no one)."""
        self._out.clear()
        SocketTransport.unsent_total -= self._backlog
        self._backlog = 0

    def fileno(self) -> int:
        """The socket fd (for re-exec and the fd store)."""
        return self._fd

    def peer_still_runs(self) -> bool:
        """Whether the process that connected runs still (see :func:`peer_still_runs`)."""
        return not self._closed and peer_still_runs(self._sock)

    @property
    def crowded(self) -> bool:
        return SocketTransport.unsent_total > MAX_UNSENT_TOTAL

    def take_unsent(self) -> bytes:
        """Hand the socket over (re-exec): return the bytes not yet sent, and let go of the fd.

        The Python socket object is detached so that collecting it never
        closes the fd the next owner of the connection uses.
        """
        data = b"".join(bytes(chunk) for chunk in self._out)
        self._drop_unsent()
        self._dispatcher.unwatch(self._fd)
        self._closed = True
        fork_guard.forget(self._fd)
        self._sock.detach()
        return data


REFUSAL_LOG_SECONDS = 60.0
"""At most one log warning per this period for each kind of refused connection."""
REFUSAL_KINDS = 256
"""Kinds of refusal (a cause and a uid) remembered before the quiet ones are forgotten."""


class RefusalLog:
    """Warnings about refused connections, at most one per :data:`REFUSAL_LOG_SECONDS`
    for each kind; the refusals not logged meanwhile are counted, and the count logged
    once the period is over.

    A client refused in a loop (a manager retrying at ``max_clients``, a uid not in
    ``allowed_uids`` that can reach the socket) wrote a line per attempt: thousands a
    second, an operator's disk filled, or journald's rate limit reached, which then
    drops lockd's own fencing and lease-lost lines too."""

    def __init__(
        self,
        period: float = REFUSAL_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._period = period
        self._clock = clock
        self._quiet_until: dict[str, float] = {}
        self._not_logged: dict[str, int] = {}
        self._last: dict[str, tuple[logging.Logger, str, tuple[object, ...]]] = {}
        """The latest refusal of each kind not logged: the count's line shows it."""
        self._count_timers: dict[str, Timer] = {}

    def warn(
        self,
        logger: logging.Logger,
        kind: str,
        message: str,
        *args: object,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        """Log ``message`` (``%`` style, with ``args``) unless one of ``kind`` was logged in
        the last period. A kind per cause and uid: a uid refused in a loop must not hide
        another's first refusal. Kinds quiet for a period are forgotten past
        :data:`REFUSAL_KINDS` of them. Refusals not logged are counted, and the count is
        logged on ``dispatcher`` (the caller's loop) once the period ends; with none
        given, only with the next refusal after it, never if none comes (as every count
        was until 2026-11-27: the last minute of a loop went unsaid)."""
        now = self._clock()
        if now < self._quiet_until.get(kind, now):
            self._not_logged[kind] = self._not_logged.get(kind, 0) + 1
            self._last[kind] = (logger, message, args)
            if dispatcher is not None and kind not in self._count_timers:
                self._count_timers[kind] = dispatcher.call_later(
                    self._quiet_until[kind] - now, lambda: self._log_count(kind)
                )
            return
        timer = self._count_timers.pop(kind, None)
        if timer is not None:
            timer.cancel()  # the count goes with this line
        self._last.pop(kind, None)
        if len(self._quiet_until) >= REFUSAL_KINDS:
            for old in [k for k, until in self._quiet_until.items() if until <= now]:
                del self._quiet_until[old]
                if old not in self._count_timers:  # else its count is about to be logged
                    self._not_logged.pop(old, None)
                    self._last.pop(old, None)
        self._quiet_until[kind] = now + self._period
        missed = self._not_logged.pop(kind, 0)
        if missed:
            message += "; %d more refused so since the last such line, not logged"
            args = (*args, missed)
        logger.warning(message, *args)

    def flush(self) -> None:
        """Log every count not logged yet, now: the daemon is stopping or re-executing,
        and its timers go with this process (the last minute of a loop went unsaid)."""
        for timer in self._count_timers.values():
            timer.cancel()
        for kind in list(self._not_logged):
            self._log_count(kind)

    def _log_count(self, kind: str) -> None:
        """The period is over: log how many of ``kind`` were refused unlogged in it, with
        the latest of them; the next period starts (a loop still refused is counted on)."""
        self._count_timers.pop(kind, None)
        missed = self._not_logged.pop(kind, 0)
        last = self._last.pop(kind, None)
        if not missed or last is None:
            return
        logger, message, args = last
        self._quiet_until[kind] = self._clock() + self._period
        logger.warning(
            "%d more refused so since the last such line, not logged; the latest: " + message,
            missed,
            *args,
        )


refusals = RefusalLog()
"""The daemon's: its listeners' and the client limits' refusals."""


def refuse(conn: socket.socket, code: ErrorCode, message: str) -> None:
    """Tell a connection why it is turned away (one error frame, id null), then close it."""
    with contextlib.suppress(OSError):
        conn.send(encode_frame(encode_item(error_to_wire(None, code, message))))
    conn.close()


class FdReserve:
    """Descriptors held back so a listener still accepts at the fd limit.

    Every lease holds a descriptor, so a host with more leases than the limit
    fills it; then no connection could be accepted: the operator could not
    ask ``lockd status`` why, nor a manager release a lease (which would free
    one). A few spare descriptors (``/dev/null``) are kept open; when an
    accept fails with EMFILE one is closed and the accept tried again.
    :meth:`refill` takes them back as descriptors free up (a connection
    closing).
    """

    def __init__(self, count: int) -> None:
        self._count = count
        self._fds: list[int] = []
        self.refill()

    def refill(self) -> None:
        """Hold ``count`` spares again, as far as the limit allows."""
        while len(self._fds) < self._count:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def close(self) -> None:
        """Close every spare, and keep none from now on (a program that goes on after the
        lock system, which embedded it)."""
        self._count = 0
        while self._fds:
            os.close(self._fds.pop())

    def release_one(self) -> bool:
        """Free one spare for an accept; False when none is left."""
        if not self._fds:
            return False
        os.close(self._fds.pop())
        return True


class Listener:
    """Accepts connections on one listening socket and hands them to ``on_accept``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        sock: socket.socket,
        *,
        admin: bool,
        allowed_uids: Iterable[int],
        on_accept: Callable[[socket.socket, tuple[int, int, int], bool], None],
        reserve: FdReserve | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self.sock = sock
        self.admin = admin
        self._reserve = reserve
        self._allowed = frozenset(allowed_uids)
        self._on_accept = on_accept
        self._starved = False
        self._retry: Timer | None = None
        """Accepting again after running out of descriptors: cancelled by :meth:`stop`
        (else a re-exec's quiesce would start accepting again under it)."""
        sock.setblocking(False)
        fork_guard.remember(sock.fileno())  # a forked child's copy would answer a probe

    def start(self) -> None:
        """Begin accepting (after recovery: until then, connections wait in the backlog).

        Harmless when already accepting."""
        self._cancel_retry()
        self._dispatcher.watch(self.sock.fileno(), selectors.EVENT_READ, self._ready)

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _ready(self, _mask: int) -> None:
        for _ in range(64):  # bounded, so one busy listener cannot starve the loop
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                reserve = self._reserve if exc.errno == errno.EMFILE else None
                if reserve is not None and reserve.release_one():
                    continue  # a spare descriptor freed for this accept
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The pending connection stays readable: stop listening for a
                    # moment instead of spinning, and say so once per episode.
                    if not self._starved:
                        log.error("cannot accept connections: %s (out of descriptors or "
                                  "memory); retrying every 100 ms", exc)  # fmt: skip
                    self._starved = True
                    self._dispatcher.unwatch(self.sock.fileno())
                    self._retry = self._dispatcher.call_later(0.1, self.start)
                    return
                raise
            if self._starved:
                log.warning("accepting connections again")
                self._starved = False
            conn.setblocking(False)
            peer = peer_credentials(conn)
            if peer[1] not in self._allowed:
                refusals.warn(
                    log, f"uid-{self.admin}-{peer[1]}",
                    "refused a connection from pid %d uid %d: uid not allowed", peer[0], peer[1],
                    dispatcher=self._dispatcher,
                )  # fmt: skip
                what = (
                    "this daemon's admin socket (only the daemon's own uid may)"
                    if self.admin
                    else "this daemon (not in its allowed_uids)"
                )
                refuse(conn, ErrorCode.PERMISSION_DENIED, f"uid {peer[1]} may not use {what}")
                continue
            self._on_accept(conn, peer, self.admin)

    def stop(self) -> None:
        """Stop accepting (connections wait in the backlog); the socket stays open."""
        self._cancel_retry()
        self._dispatcher.unwatch(self.sock.fileno())

    def close(self) -> None:
        """Stop accepting; the socket file stays for the next daemon to replace."""
        self.stop()
        fork_guard.forget(self.sock.fileno())
        self.sock.close()


class ConnIds:
    """Connection ids, unique for the daemon's lifetime, also across re-exec.

    Embedding programs open connections from their own threads, hence the lock.
    """

    def __init__(self) -> None:
        self.next = 1
        self._lock = threading.Lock()

    def __next__(self) -> int:
        with self._lock:
            value = self.next
            self.next += 1
            return value


conn_ids = ConnIds()
