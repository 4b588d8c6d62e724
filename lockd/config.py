"""Daemon configuration: per-user defaults, an optional TOML file, then command-line flags.

Defaults follow PRODUCT.md: a root daemon uses system paths, any other user
their home and XDG directories. Unknown keys and wrong types in the file are
errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import math
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from actors.model import SyncPolicy
from protocol.names import InvalidNameError, check_lockspace_name


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the file."""

    def __init__(self, message: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.entry = entry
        """The entry of a table (``[lockspaces]``) at fault: its line is named, not the
        table's."""


def _home() -> str:
    """The user's home: ``$HOME`` when it is an absolute path, else the password
    database's (as systemd's ``get_home_dir`` does). A relative ``HOME`` (``HOME=.``)
    put the lock dir and journal under wherever lockd was started: a daemon started on
    demand, which runs in the package's directory, kept them there, and ``lockd events``
    run elsewhere found no journal."""
    value = os.environ.get("HOME")
    if value and os.path.isabs(value):
        return value
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # no entry (a container's arbitrary uid): as an empty HOME is taken
        return "/"


def _xdg(var: str, fallback: str) -> str:
    value = os.environ.get(var)
    return value if value and os.path.isabs(value) else os.path.join(_home(), fallback)


FALLBACK_RUNTIME_DIR = "/tmp/lockd-{uid}"  # noqa: S108 - made 0700 and checked: see below
"""The base of a user's runtime directory when ``$XDG_RUNTIME_DIR`` is unset (runuser, su,
cron, ssh without pam_systemd): in a directory every user can write to, so it is created
0700 and used only if it is this user's own (:func:`secure_runtime_dir`)."""


def _xdg_runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR`` when it is an absolute path: the XDG spec has a relative one
    ignored (it named sockets relative to wherever lockd was started, which a client
    started elsewhere never found), as :func:`_xdg` does for the others."""
    value = os.environ.get("XDG_RUNTIME_DIR")
    return value if value and os.path.isabs(value) else None


def runtime_dir(uid: int | None = None) -> str | None:
    """The directory of a user's default sockets and of the log of a daemon started on demand
    (``lockd.log``): ``$XDG_RUNTIME_DIR/lockd``, else ``/tmp/lockd-UID/lockd``; None for
    root, whose sockets are in /run/lockd."""
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return None
    base = _xdg_runtime_dir() or FALLBACK_RUNTIME_DIR.format(uid=uid)
    return os.path.join(base, "lockd")


def default_paths(uid: int | None = None) -> dict[str, str]:
    """Socket, admin socket, lock dir, journal dir and config path for this user."""
    uid = os.getuid() if uid is None else uid
    runtime = runtime_dir(uid)
    if runtime is None:
        return {
            "socket": "/run/lockd/lockd.sock",
            "admin_socket": "/run/lockd/lockd-admin.sock",
            "lock_dir": "/var/lib/libvirt/lockd",
            "journal_dir": "/var/lib/lockd/journal",
            "config": "/etc/lockd/lockd.toml",
        }
    return {
        "socket": os.path.join(runtime, "lockd.sock"),
        "admin_socket": os.path.join(runtime, "lockd-admin.sock"),
        "lock_dir": os.path.join(_home(), ".libvirt", "lockd"),
        "journal_dir": os.path.join(_xdg("XDG_STATE_HOME", ".local/state"), "lockd", "journal"),
        "config": os.path.join(_xdg("XDG_CONFIG_HOME", ".config"), "lockd", "lockd.toml"),
    }


PARENT_DIR_MODE = 0o755
"""Mode of a missing parent directory lockd makes on its way to one of its own (less the
umask): others may pass through, never write there."""


def make_dirs(path: str, mode: int) -> None:
    """``os.makedirs(path, mode, exist_ok=True)``, but each missing parent is made
    :data:`PARENT_DIR_MODE` at most. ``os.makedirs`` makes parents 0777 less the umask:
    a root lockd started with a umask of 0 (from a shell or a container that sets it)
    on a fresh host made ``/var/lib/lockd`` 0777, and any local user could move the
    journal directory aside and have the next start forget every lease held (or swap
    in a lock directory of their own, and fence the VMs). Raises FileExistsError if
    ``path`` or a parent is there and is no directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        make_dirs(parent, PARENT_DIR_MODE)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


class UnsafePathError(OSError):
    """A directory or file lockd would trust could have been made or changed by another user."""


def check_own_dir(path: str) -> None:
    """Refuse ``path`` unless it is a directory (not a symbolic link) of this user that no
    other user can write to; never changes it. Raises FileNotFoundError if it is missing.

    Compared with the effective uid: the owner of whatever this process creates.
    """
    st = os.lstat(path)
    uid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        problem = "it is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory"
    elif st.st_uid != uid:
        problem = "it is another user's"
    elif mode & 0o022:
        problem = "other users can write to it"
    else:
        return
    if st.st_uid == uid and stat.S_ISDIR(st.st_mode):
        fix = f"run chmod go-w {path} or remove it"
    else:
        fix = "remove it (ask root if it is not yours)"
    raise UnsafePathError(
        f"refusing {path}: {problem} (owner uid {st.st_uid}, mode {mode:04o}; you are uid "
        f"{uid}). lockd keeps its sockets and log only in a directory that is yours alone: "
        f"{fix}, or set XDG_RUNTIME_DIR to a private directory, or pass --socket (or set "
        "LOCKD_SOCKET) for a socket elsewhere"
    )


def open_own_file(path: str, flags: int, mode: int, *, what: str, remedy: str) -> int:
    """Open ``path`` (made with ``mode`` if missing) only if it is a plain file of this
    user's with no other name: never through a symbolic link, nor into a file another
    user planted or hard-linked in a directory they can write to (its truncate or
    append would then change the file it names: the log of a daemon started on demand,
    a pid file under /tmp, /etc/shadow). The open does not wait on a FIFO and gives no
    controlling tty; the fd is blocking once checked. Raises :class:`UnsafePathError`
    naming ``what``, the file, and ``remedy``."""
    extra = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UnsafePathError(f"refusing {what} {path}: it is a symbolic link; {remedy}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            kind = "a plain file" if stat.S_ISREG(st.st_mode) else "not a plain file"
            raise UnsafePathError(
                f"refusing {what} {path}: {kind} of uid {st.st_uid} with {st.st_nlink} "
                f"link(s), mode {stat.S_IMODE(st.st_mode):04o} (lockd runs as uid "
                f"{os.geteuid()}); {remedy}"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def secure_runtime_dir(socket_path: str, *, create: bool) -> bool:
    """If ``socket_path`` is in this user's :func:`runtime_dir`, make sure nobody else
    controls that directory (nor, for the ``/tmp`` fallback, its parent): ``create``
    makes what is missing with mode 0700, then each is checked with :func:`check_own_dir`.
    Without ``create`` a missing directory is left for the caller to find missing.

    Returns False, checking nothing, for a socket elsewhere (given with ``--socket``,
    ``$LOCKD_SOCKET`` or the file: the user's choice) and for root. Under
    ``$XDG_RUNTIME_DIR`` (made 0700 for the user by the login manager) only lockd's own
    subdirectory is checked: cheap, and it catches ``XDG_RUNTIME_DIR`` pointed at a
    shared directory such as /tmp.
    """
    runtime = runtime_dir()
    if runtime is None or os.path.abspath(os.path.dirname(socket_path)) != os.path.abspath(runtime):
        return False
    base = os.path.dirname(runtime)
    fallback = _xdg_runtime_dir() is None
    try:
        if create and not fallback:
            make_dirs(base, 0o700)
        for path in (base, runtime) if fallback else (runtime,):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o700)
            try:
                check_own_dir(path)
            except FileNotFoundError:
                if create:
                    raise
                return True
    except PermissionError as exc:
        raise UnsafePathError(_runtime_dir_denied(runtime, exc, xdg=not fallback)) from None
    return True


def _runtime_dir_denied(runtime: str, exc: PermissionError, *, xdg: bool) -> str:
    """Why this user cannot use its runtime directory ``runtime``. Most often
    ``$XDG_RUNTIME_DIR`` is another user's: ``su`` and ``sudo`` keep the caller's
    (``/run/user/0`` after ``su alice``), and lockd named only the errno, exiting 1."""
    uid = os.geteuid()
    where = f" ({exc.filename})" if exc.filename and exc.filename != runtime else ""
    text = f"cannot use {runtime} (you are uid {uid}): {exc.strerror}{where}"
    if xdg:
        base = os.path.dirname(runtime)
        try:
            st = os.stat(base)
        except OSError as why:  # not there, or in a directory of another user's
            whose, theirs = why.strerror or str(why), why.errno != errno.ENOENT
        else:
            whose = f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
            theirs = st.st_uid != uid
        hint = " a shell from su or sudo keeps the caller's;" if theirs else ""
        text += (
            f"; XDG_RUNTIME_DIR is {base} ({whose}):{hint} set XDG_RUNTIME_DIR to your "
            "own runtime directory, or unset it"
        )
    return text + ", or pass --socket (or set LOCKD_SOCKET) for a socket elsewhere"


def default_socket() -> str:
    """Where clients look for the daemon: ``$LOCKD_SOCKET`` or the per-user default."""
    return os.environ.get("LOCKD_SOCKET") or default_paths()["socket"]


ADMIN_SOCKET_NAME = "lockd-admin.sock"


def admin_socket_beside(socket_path: str) -> str:
    """The admin socket's default place once the client socket is given: beside it."""
    return os.path.join(os.path.dirname(socket_path), ADMIN_SOCKET_NAME)


def default_admin_socket() -> str:
    """``$LOCKD_ADMIN_SOCKET``, else beside ``$LOCKD_SOCKET``, else the per-user default."""
    explicit = os.environ.get("LOCKD_ADMIN_SOCKET")
    if explicit:
        return explicit
    socket_path = os.environ.get("LOCKD_SOCKET")
    return admin_socket_beside(socket_path) if socket_path else default_paths()["admin_socket"]


def _abs_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
        raise ConfigError(f"{key} must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def _lockspace_dirs(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError("lockspaces must be a table of lockspace name = directory")
    out = {}
    for name, path in value.items():
        try:
            check_lockspace_name(name)
        except InvalidNameError as exc:
            raise ConfigError(f"lockspaces.{name}: {exc}", entry=name) from None
        try:
            out[name] = _abs_path(f"lockspaces.{name}", path)
        except ConfigError as exc:
            raise ConfigError(str(exc), entry=name) from None
    return out


UID_MAX = 2**32 - 2
"""The highest uid: uid_t is 32 bits, and its all-ones value is the kernel's "no uid"."""


def _uids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= UID_MAX for v in value
    ):
        # One past uid_t (a digit too many) was taken, and matched no peer ever.
        raise ConfigError(
            f"allowed_uids must be a list of uids (whole numbers from 0 to {UID_MAX}, such "
            f"as [107]), got {value!r}"
        )
    return tuple(value)


def _socket_mode(key: str, value: Any) -> str:
    """Octal digits in a string, as libvirtd's ``unix_sock_rw_perms`` and systemd's
    ``SocketMode=``: a TOML integer is refused, since ``660`` (decimal) is not 0o660."""
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
        raise ConfigError(f'{key} must be an octal mode in quotes, such as "0660", got {value!r}')
    mode = int(value, 8)
    if mode & 0o600 != 0o600:
        raise ConfigError(
            f"{key} {value!r} must let lockd's own uid connect: read and write for the "
            'owner, such as "0600" or "0660"'
        )
    return f"{mode:04o}"


def _socket_group(key: str, value: Any) -> str | int:
    """A group name that exists here, or a gid."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UID_MAX:
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f'{key} must be a group name (such as "libvirt") or a gid (0 to {UID_MAX}), '
            f"got {value!r}"
        )
    try:
        grp.getgrnam(value)
    except KeyError:
        raise ConfigError(f"{key}: no group named {value!r} on this host") from None
    return value


def socket_gid(group: str | int | None) -> int | None:
    """The gid of a ``socket_group`` setting (a name looked up again: it may have moved)."""
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group: no group named {group!r} on this host") from None


@attrs.frozen
class Config:
    """Everything ``lockd serve`` needs."""

    socket: str
    admin_socket: str
    lock_dir: str
    journal_dir: str
    pid_file: str | None = None
    timeout: float = 0.0
    """Exit after this many idle seconds (no clients, no leases); 0 = never."""
    max_clients: int = 1024
    admin_max_clients: int = 16
    """Admin-socket connections, counted apart so a full client table never locks operators out."""
    idle_timeout: float = 60.0
    """Close connections with no registered owner (nor subscription) after this long; 0 = never."""
    journal_sync: SyncPolicy = SyncPolicy.NONE
    journal_segment_bytes: int = 8 * 1024 * 1024
    """Segment size; a snapshot is taken at each rotation, so this bounds what recovery replays."""
    journal_retain_segments: int = 16
    """Old segments kept for auditors once a snapshot covers them (0 = keep all)."""
    max_lockspaces: int = 4096
    lost_lease_policy: str = "fence"
    """``fence``: terminate an owner whose lease was taken while lockd was down; ``log``: log."""
    shared_holds: str = "once"
    """``once``: an owner asking again for a shared lease it holds is counted once, and one
    release ends its hold; ``each``: it holds it once more, until as many releases, as in
    virtlockd (a VM given one shareable image on two devices keeps it until the last
    detach)."""
    allowed_uids: tuple[int, ...] = ()
    """Peer uids served besides the daemon's own."""
    socket_mode: str = "0600"
    """Mode of a client socket lockd binds itself (octal digits), not the admin socket's."""
    socket_group: str | int | None = None
    """Group of a client socket lockd binds itself (a name or a gid); None: lockd's own."""
    lockspaces: Mapping[str, str] = attrs.field(factory=dict)
    """Lockspaces mapped to explicit directories instead of ``<lock_dir>/<name>``."""
    fence_grace: float = 1.6
    log_level: str = "info"
    log_filters: str = ""
    """Space-separated ``LEVEL:module`` entries, as virtlockd's ``log_filters``."""
    log_outputs: str = "stderr"
    """``stderr`` or ``journald``."""
    config_file: str | None = None


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _check_int(key: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def _check_number(key: str, value: Any) -> float:
    """Seconds: ``nan`` (``--timeout nan`` too) passed ``< 0`` and made ``fence_grace`` no
    grace at all (SIGKILL with the SIGTERM) and ``timeout`` never; ``inf`` is ``0``'s
    "never" for the timeouts and, for ``fence_grace``, a fence that never ends."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def _enum(key: str, value: Any) -> SyncPolicy:
    try:
        return SyncPolicy(value)
    except ValueError:
        choices = " | ".join(p.value for p in SyncPolicy)
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}") from None


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {' | '.join(choices)}, got {value!r}")
    return str(value)


def _filters(key: str, value: Any) -> str:
    from lockd.logs import LogFilterError, parse_filters

    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string of LEVEL:module entries")
    try:
        parse_filters(value)
    except LogFilterError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return value


def _level(key: str, value: Any) -> str:
    if value not in _LOG_LEVELS:
        raise ConfigError(f"{key} must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return str(value)


_CONVERT: dict[str, Any] = {
    "socket": _abs_path,
    "admin_socket": _abs_path,
    "lock_dir": _abs_path,
    "journal_dir": _abs_path,
    "pid_file": _abs_path,
    "timeout": _check_number,
    "idle_timeout": _check_number,
    "max_clients": lambda k, v: _check_int(k, v, 1),
    "admin_max_clients": lambda k, v: _check_int(k, v, 1),
    "journal_sync": _enum,
    "journal_segment_bytes": lambda k, v: _check_int(k, v, 4096),
    "journal_retain_segments": lambda k, v: _check_int(k, v, 0),
    "max_lockspaces": lambda k, v: _check_int(k, v, 3),
    "lost_lease_policy": lambda k, v: _choice(k, v, ("fence", "log")),
    "shared_holds": lambda k, v: _choice(k, v, ("once", "each")),
    "allowed_uids": lambda _k, v: _uids(v),
    "socket_mode": _socket_mode,
    "socket_group": _socket_group,
    "lockspaces": lambda _k, v: _lockspace_dirs(v),
    "fence_grace": _check_number,
    "log_level": _level,
    "log_filters": _filters,
    "log_outputs": lambda k, v: _choice(k, v, ("stderr", "journald")),
}


def _dotted(key: str) -> list[str]:
    """A TOML key's parts: dots inside quotes (``"org.libvirt.lockd.lvm"``) do not split."""
    parts, current, quote = [], "", ""
    for char in key.strip():
        if quote:
            if char == quote:
                quote = ""
            else:
                current += char
        elif char in "\"'":
            quote = char
        elif char == ".":
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def _keys(text: str) -> Iterator[tuple[int, list[str]]]:
    """Each assignment's line number and full key (the table it sits in, then its own
    dotted parts), and each table header's; tomllib reports no line numbers."""
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            table = _dotted(stripped.strip("[]"))
            yield number, table
        elif "=" in stripped and not stripped.startswith("#"):
            yield number, [*table, *_dotted(stripped.split("=", 1)[0])]


def _line_of(text: str, key: str) -> int:
    """Line number of the first assignment or table header under the top-level ``key``,
    dotted (``log.level = 1``, ``[log.x]``) too; 0 if none."""
    return next((number for number, parts in _keys(text) if parts[0] == key), 0)


def _line_of_entry(text: str, table: str, entry: str) -> int:
    """Line number of ``entry``'s assignment in the table ``table`` (under its header,
    or dotted as ``table.entry``); the table's own line if not found."""
    found = (number for number, parts in _keys(text) if parts == [table, entry])
    return next(found, None) or _line_of(text, table)


def _closest(key: str) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(_CONVERT), n=1)
    return matches[0] if matches else None


def _within(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or lies under it (the paths as written, normalised)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _overlap(values: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """Directories that would share files: the problem, the key (and ``[lockspaces]``
    entry) to name it at, or None. The journal inside the lock directory (the shared
    storage) is one any lockspace of that name could write lease files into, and remove
    them from; two lockspaces in one directory are one set of lease files under two
    names; the lock directory inside a lockspace's makes each of its lockspaces a lease
    name there."""
    lock_dir, journal_dir = values.get("lock_dir"), values.get("journal_dir")
    spaces: Mapping[str, str] = values.get("lockspaces") or {}
    if not isinstance(lock_dir, str) or not isinstance(journal_dir, str):
        return None
    if _within(journal_dir, lock_dir) or _within(lock_dir, journal_dir):
        return (
            f"journal_dir {journal_dir} and lock_dir {lock_dir} overlap: keep the journal "
            "on this host's own storage, apart from the lease files (a lockspace there "
            "could name its files)",
            "journal_dir",
            None,
        )
    seen: dict[str, str] = {}
    for name, directory in spaces.items():
        key = f"lockspaces.{name}"
        if _within(journal_dir, directory) or _within(directory, journal_dir):
            return (f"{key} {directory} and journal_dir {journal_dir} overlap", "lockspaces", name)
        if _within(lock_dir, directory):
            return (
                f"{key} {directory} and lock_dir {lock_dir} overlap: the lock directory's "
                "lockspaces would be lease names in it",
                "lockspaces",
                name,
            )
        inside = os.path.relpath(directory, lock_dir).split(os.sep)[0]
        if _within(directory, lock_dir) and inside != name:
            return (
                f"{key} {directory} is inside lock_dir {lock_dir}, where lockspace "
                f"{inside} keeps its files (its own place there is "
                f"{os.path.join(lock_dir, name)})",
                "lockspaces",
                name,
            )
        for other, there in seen.items():
            if _within(directory, there) or _within(there, directory):
                return (
                    f"{key} {directory} and lockspaces.{other} {there} overlap: one set of "
                    "lease files under two names",
                    "lockspaces",
                    name,
                )
        seen[name] = directory
    return None


def from_keys(values: Mapping[str, Any]) -> Config:
    """A Config from keys and values as the file gives them (``journal_sync="batch"``),
    each checked as :func:`load` checks the file's; for a program that embeds lockd."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _CONVERT:
            hint = _closest(key)
            raise ConfigError(
                f"unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
        checked[key] = _CONVERT[key](key, value)
    if checked.get("admin_socket") == checked.get("socket"):
        raise ConfigError(f"socket and admin_socket are both {checked.get('socket')}")
    if (overlap := _overlap(checked)) is not None:
        raise ConfigError(overlap[0])
    return Config(**checked)


def load(path: str | None, overrides: Mapping[str, Any]) -> Config:
    """Defaults, then the TOML file (if ``path`` or the default file exists), then overrides."""
    defaults = default_paths()
    values: dict[str, Any] = {k: v for k, v in defaults.items() if k != "config"}
    given: set[str] = {k for k, v in overrides.items() if v is not None}
    config_path = path or defaults["config"]
    text, data = "", {}
    if path is not None or os.path.exists(config_path):
        try:
            with open(config_path, "rb") as f:
                raw = f.read()
            data = tomllib.loads(raw.decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{config_path}: no such file") from None
        except OSError as exc:  # a directory, no permission, ...
            raise ConfigError(f"{config_path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_path}: {exc}") from None
        text = raw.decode("utf-8")
        for key, value in data.items():
            where = f"{config_path}:{_line_of(text, key)}"
            if key not in _CONVERT:
                hint = _closest(key)
                raise ConfigError(
                    f"{where}: unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                )
            try:
                values[key] = _CONVERT[key](key, value)
            except ConfigError as exc:
                if exc.entry is not None:
                    where = f"{config_path}:{_line_of_entry(text, key, exc.entry)}"
                raise ConfigError(f"{where}: {exc}") from None
        values["config_file"] = config_path
        given.update(data)
    for key, value in overrides.items():
        if value is not None:
            values[key] = _CONVERT[key](key, value) if key in _CONVERT else value
    if "socket" in given and "admin_socket" not in given:
        # Moved with the client socket: left at the default, it would be another
        # daemon's (or a directory the daemon cannot create).
        values["admin_socket"] = admin_socket_beside(values["socket"])
    if values["admin_socket"] == values["socket"]:
        problem = f"socket and admin_socket are both {values['socket']}"
        line = next((_line_of(text, k) for k in ("admin_socket", "socket") if k in data), 0)
        raise ConfigError(f"{config_path}:{line}: {problem}" if line else problem)
    if (overlap := _overlap(values)) is not None:
        problem, key, entry = overlap
        if key not in data and "lock_dir" in data:
            key = "lock_dir"  # the file's side of a clash with a flag
        if key not in data:
            line = 0
        elif entry is not None:
            line = _line_of_entry(text, key, entry)
        else:
            line = _line_of(text, key)
        raise ConfigError(f"{config_path}:{line}: {problem}" if line else problem)
    return Config(**values)
