"""The hypervisor plugin: libvirt's lock-driver contract on top of the lockd socket.

A VM manager's lock driver creates one :class:`LockManager` per VM operation,
for the VM as owner (uuid, name, id, pid); adds the VM's disks and explicit
leases; then calls :meth:`~LockManager.acquire`, :meth:`~LockManager.release`
or :meth:`~LockManager.inquire`, as libvirt's ``lockd.so`` plugin
(``src/locking/lock_driver_lockd.c``) does against virtlockd. The mapping of a
VM's life (start, pause, resume, hot-plug, migrate, stop) onto these calls is
in ``docs/plugin.md``.

Which disk gets which lease follows virtlockd's plugin and its
``qemu-lockd.conf`` options (:class:`PluginOptions`): read-only disks get
none, shareable disks a shared one; ``/dev`` paths may be keyed by LVM UUID
(``lvs``) or SCSI id (``scsi_id``) and fall through to the next lockspace
exactly where virtlockd falls through. Two things virtlockd lacks are added:
:meth:`~LockManager.inquire` returns a versioned state string that
:meth:`~LockManager.acquire` takes back on a migration target, and a
multi-lease acquire is all-or-nothing.

The effects sit behind two small interfaces so the decisions can be tested
without a daemon: a :data:`Connector` opens a :class:`Connection` (the real one
is :class:`protocol.client.Client`), and :class:`DeviceKeys` finds device keys
(the real one, :class:`CommandDeviceKeys`, runs the tools). Every failure is a
:class:`LockError` whose ``code`` is either a daemon error code
(:class:`protocol.errors.ErrorCode`, passed through unchanged) or one of
:class:`PluginErrorCode`.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import os
import subprocess
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import attrs

from lockd import autospawn
from lockd.config import UnsafePathError, secure_runtime_dir
from protocol.client import Client, ConnectionLostError, RemoteError, unreachable
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import once_key
from protocol.names import (
    CONTROL_CHARACTERS,
    FILES_LOCKSPACE,
    LVM_LOCKSPACE,
    SCSI_LOCKSPACE,
    WELL_KNOWN_LOCKSPACES,
    InvalidNameError,
    check_lockspace_name,
    check_resource_name,
    lease_name_for_path,
    normalise_disk_path,
)

log = logging.getLogger(__name__)

STATE_PREFIX = "lockd-state"
STATE_VERSION = 1
"""Version of the :meth:`LockManager.inquire` state string this module writes and reads."""

MAX_LEASES = 256
"""Most leases one acquire may take: the protocol's cap on one all-or-nothing request."""

TOOL_TIMEOUT = 60.0
"""Seconds ``lvs`` or ``scsi_id`` may run: a hung storage stack must not hang a VM start forever."""


class PluginErrorCode(enum.StrEnum):
    """Codes the plugin raises itself, before or instead of asking the daemon.

    Daemon refusals keep the daemon's code (``busy``, ``not-found``, ...), so a
    caller branches on one ``LockError.code`` whatever side refused.
    """

    INVALID_ARGUMENT = "invalid-argument"
    """A bad owner, disk path, lease name or option (same spelling as the daemon's)."""
    LEASE_REQUIRED = "lease-required"
    """``require_lease_for_disks``: read/write disks and no lease at all (CONFIG_UNSUPPORTED)."""
    NO_LOCKSPACE = "no-lockspace"
    """A writable disk no enabled lockspace can hold (lockd has no direct leases)."""
    KEY_LOOKUP_FAILED = "key-lookup-failed"
    """``lvs`` or ``scsi_id`` could not be run, or printed a key no lease can be named after."""
    BAD_STATE = "bad-state"
    """A state string given to :meth:`LockManager.acquire` is malformed or belongs to another VM."""
    UNAVAILABLE = "unavailable"
    """The daemon cannot be reached, or the connection broke mid-request."""


class LockError(Exception):
    """A lock operation failed; ``code`` says why in a stable spelling, ``message`` for humans."""

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        """Extra fields from the daemon, e.g. ``holders`` on ``busy``."""


def _invalid(message: str) -> LockError:
    return LockError(PluginErrorCode.INVALID_ARGUMENT, message)


# -- values ---------------------------------------------------------------------------------
def _check_uuid(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 16:
        raise _invalid(f"owner uuid must be 16 raw bytes, not {value!r}")


def _check_owner_name(_: object, __: attrs.Attribute[str], value: str) -> None:
    # The daemon's rule (text255): refused here, a bad name never reaches it, as a
    # bad state string does not; only NUL was, so "vm\n1" got as far as register.
    if (
        not isinstance(value, str)
        or not 1 <= len(value.encode("utf-8")) <= 255
        or CONTROL_CHARACTERS.search(value) is not None
    ):
        raise _invalid(
            f"owner name must be 1-255 bytes of UTF-8 without control characters, not {value!r}"
        )


def _check_positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
        raise _invalid(f"owner {attribute.name} must be an integer from 1 to 2^32-1, not {value!r}")


@attrs.frozen
class Owner:
    """The VM a lease protects, as libvirt passes it to the lock driver's ``new``.

    ``pid`` is the VM process: leases end when it exits. ``id`` must be > 0,
    as libvirt requires ("Missing ID parameter for domain object").
    """

    uuid: bytes = attrs.field(validator=_check_uuid)
    name: str = attrs.field(validator=_check_owner_name)
    id: int = attrs.field(validator=_check_positive)
    pid: int = attrs.field(validator=_check_positive)

    @property
    def uuid_text(self) -> str:
        """The uuid in its canonical 36-character form, for logs and state strings."""
        return str(uuidlib.UUID(bytes=self.uuid))

    def to_wire(self) -> dict[str, Any]:
        """The ``owner`` map of the ``register`` request."""
        return {"uuid": self.uuid, "name": self.name, "id": self.id, "pid": self.pid}


def _valid_lockspace(value: str) -> str:
    try:
        return check_lockspace_name(value)
    except InvalidNameError as exc:
        raise _invalid(str(exc)) from None


def _valid_resource(value: str) -> str:
    try:
        return check_resource_name(value)
    except InvalidNameError as exc:
        raise _invalid(str(exc)) from None


@attrs.frozen(order=True)
class Lease:
    """One lease: a resource in a lockspace, shared or exclusive. Invalid names cannot exist."""

    lockspace: str = attrs.field(converter=_valid_lockspace)
    resource: str = attrs.field(converter=_valid_resource)
    shared: bool = False

    @property
    def ref(self) -> tuple[str, str]:
        """(lockspace, resource): what identifies the lease whatever its mode."""
        return (self.lockspace, self.resource)

    @property
    def mode(self) -> str:
        """``shared`` or ``exclusive``, the daemon's spelling."""
        return "shared" if self.shared else "exclusive"

    def __str__(self) -> str:
        return f"{self.lockspace}/{self.resource} ({self.mode})"

    @classmethod
    def from_wire(cls, item: Mapping[str, Any]) -> Lease:
        """A lease from a daemon reply (``{lockspace, resource, mode}``)."""
        return cls(str(item["lockspace"]), str(item["resource"]), item.get("mode") == "shared")

    def to_wire(self) -> dict[str, Any]:
        """The ``lease`` map of an ``acquire`` request."""
        return {"lockspace": self.lockspace, "resource": self.resource, "shared": self.shared}

    def ref_to_wire(self) -> dict[str, Any]:
        """The ``lease-ref`` map of a ``release`` request."""
        return {"lockspace": self.lockspace, "resource": self.resource}


def _optional_lockspace(value: str | None) -> str | None:
    return None if value is None else _valid_lockspace(value)


@attrs.frozen
class PluginOptions:
    """The plugin's settings: virtlockd's ``qemu-lockd.conf`` keys, with lockspaces by name.

    virtlockd takes a *directory* per lockspace (``file_lockspace_dir`` ...);
    lockd takes the lockspace *name* and maps names to directories in its own
    configuration (``[lockspaces]`` in ``lockd.toml``, else ``<lock_dir>/<name>``).
    ``None`` turns a lockspace off. The file lockspace is on by default because
    lockd has no direct leases (virtlockd's default locks the disk file itself).
    """

    auto_disk_leases: bool = True
    """Lease every disk automatically; when off only explicit leases are taken."""
    require_lease_for_disks: bool | None = None
    """Refuse a VM with read/write disks and no lease at all; None: ``not auto_disk_leases``."""
    file_lockspace: str | None = attrs.field(default=FILES_LOCKSPACE, converter=_optional_lockspace)
    """Lockspace of disk leases named by the SHA-256 of the path."""
    lvm_lockspace: str | None = attrs.field(default=None, converter=_optional_lockspace)
    """Lockspace of ``/dev`` disks keyed by LVM UUID (off by default, as in virtlockd)."""
    scsi_lockspace: str | None = attrs.field(default=None, converter=_optional_lockspace)
    """Lockspace of ``/dev`` disks keyed by SCSI id (off by default, as in virtlockd)."""

    @property
    def requires_disk_lease(self) -> bool:
        """``require_lease_for_disks`` as virtlockd resolves it (default: not auto_disk_leases)."""
        if self.require_lease_for_disks is None:
            return not self.auto_disk_leases
        return self.require_lease_for_disks

    @property
    def disk_lockspaces(self) -> frozenset[str]:
        """Lockspaces whose lease files are created on demand and removed on last release."""
        names = (self.file_lockspace, self.lvm_lockspace, self.scsi_lockspace)
        return frozenset(name for name in names if name is not None)

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any]) -> PluginOptions:
        """Options from a parsed config file or JSON object; unknown keys and wrong types refused.

        A lockspace key takes a name, ``true`` (the well-known name) or ``false`` (off).
        """
        well_known = {
            "file_lockspace": FILES_LOCKSPACE,
            "lvm_lockspace": LVM_LOCKSPACE,
            "scsi_lockspace": SCSI_LOCKSPACE,
        }
        kwargs: dict[str, Any] = {}
        for key, value in conf.items():
            if key in ("auto_disk_leases", "require_lease_for_disks"):
                # 0 and 1 as well: how virtlockd's qemu-lockd.conf spells them.
                if not isinstance(value, bool) and value not in (0, 1):
                    raise _invalid(f"option {key} must be true or false (or 1 or 0), not {value!r}")
                kwargs[key] = bool(value)
            elif key in well_known:
                if isinstance(value, bool):
                    kwargs[key] = well_known[key] if value else None
                elif isinstance(value, str):
                    kwargs[key] = value
                else:
                    raise _invalid(f"option {key} must be a lockspace name or a boolean")
            elif key.removesuffix("_dir") in well_known:
                # virtlockd's qemu-lockd.conf names a directory; "unknown option" left an
                # operator carrying that file over with no idea what lockd wants instead.
                ours = key.removesuffix("_dir")
                name = well_known[ours]
                # The line alone was refused at start for virtlockd's usual directory
                # (/var/lib/libvirt/lockd/files lies in lockd's default lock_dir).
                mapping = f'"{name}" = {json.dumps(value)}; ' if isinstance(value, str) else ""
                raise _invalid(
                    f"option {key} is virtlockd's, a directory: lockd's is {ours}, a "
                    f"lockspace name (true: {name}); lockd.toml's [lockspaces] maps a name "
                    f"to a directory ({mapping}one inside lock_dir may only be "
                    f"lock_dir/{name}, so keep lock_dir apart from it: docs/operations.md, "
                    '"Beside a real virtlockd")'
                )
            else:
                raise _invalid(f"unknown option {key!r}")
        return cls(**kwargs)


# -- device keys ----------------------------------------------------------------------------
class DeviceKeys(Protocol):
    """Finds the key of a block device; the real one runs ``lvs`` and ``scsi_id``.

    Each method returns the key, or None when the device has none (the
    plugin then falls through to the next lockspace), and raises
    :class:`LockError` (``key-lookup-failed``) when the tool cannot be run,
    which virtlockd also treats as fatal for the disk.
    """

    def lvm_key(self, path: str) -> str | None:
        """The LV UUID of ``path``, or None when it is not a logical volume."""
        ...

    def scsi_key(self, path: str) -> str | None:
        """The SCSI id of ``path``, or None when it has none."""
        ...


@attrs.frozen
class CommandOutput:
    """What a finished tool printed on stdout, and its exit status."""

    status: int
    stdout: str


CommandRunner = Callable[[Sequence[str]], CommandOutput]
"""Runs argv to completion; raises OSError when the program cannot be run."""


def run_command(argv: Sequence[str]) -> CommandOutput:
    """Run a tool with no stdin and no inherited fds, capturing stdout (stderr goes to ours)."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            check=False,
            timeout=TOOL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{argv[0]} did not finish in {TOOL_TIMEOUT:g} s") from None
    return CommandOutput(done.returncode, done.stdout.decode("utf-8", "replace"))


@attrs.frozen
class CommandDeviceKeys:
    """Device keys from the same commands virtlockd's plugin runs, parsed the same way.

    Same keys means a lockd host and a virtlockd host sharing one lock
    directory name an LV or a LUN by the same lease file.
    """

    run: CommandRunner = run_command
    lvs_program: str = "lvs"
    scsi_id_program: str = "/lib/udev/scsi_id"

    def lvm_key(self, path: str) -> str | None:
        """``lvs --noheadings --unbuffered --nosuffix --options uuid PATH``: first line, trimmed.

        The UUID keeps its dashes (``06UgP5-2rhb-...``) as in virtlockd. A
        non-zero exit means "not an LV": no key.
        """
        argv = [self.lvs_program, "--noheadings", "--unbuffered", "--nosuffix"]
        out = self._run("an LVM UUID", [*argv, "--options", "uuid", path], path)
        if out.status != 0:
            log.info("%s exited with status %d for %s: no LVM UUID", argv[0], out.status, path)
            return None
        return out.stdout.lstrip().split("\n", 1)[0] or None

    def scsi_key(self, path: str) -> str | None:
        """``/lib/udev/scsi_id --replace-whitespace --whitelisted --device PATH``, first line.

        A non-zero exit means "no SCSI id" (scsi_id prints nothing then).
        """
        argv = [self.scsi_id_program, "--replace-whitespace", "--whitelisted", "--device", path]
        out = self._run("a SCSI id", argv, path)
        if out.status != 0:
            log.info("%s exited with status %d for %s: no SCSI id", argv[0], out.status, path)
            return None
        return out.stdout.split("\n", 1)[0] or None

    def _run(self, what: str, argv: list[str], path: str) -> CommandOutput:
        try:
            return self.run(argv)
        except OSError as exc:
            message = (
                f"cannot run {argv[0]} to find {what} for disk {path}: {exc}; the disk cannot "
                "be added (virtlockd fails the same way): install the tool or turn its "
                "lockspace option off"
            )
            log.error("%s", message)
            raise LockError(PluginErrorCode.KEY_LOOKUP_FAILED, message) from None


def _device_lease(lockspace: str, key: str, tool: str, path: str, shared: bool) -> Lease:
    try:
        return Lease(lockspace, key, shared)
    except LockError:
        raise LockError(
            PluginErrorCode.KEY_LOOKUP_FAILED,
            f"{tool} gave {key!r} for disk {path}, which cannot name a lease",
        ) from None


def disk_lease(
    path: str, *, readonly: bool, shareable: bool, options: PluginOptions, keys: DeviceKeys
) -> Lease | None:
    """The lease a disk needs (None: no lease), decided as virtlockd's plugin decides it.

    Read-only: none. ``auto_disk_leases`` off: none. A path starting with
    ``/dev`` tries the LVM lockspace (key from ``lvs``), then the SCSI
    lockspace (key from ``scsi_id``); a device without a key falls through
    to the file lockspace (SHA-256 of the normalised path). Where virtlockd
    would then take a direct lease on the disk file itself, lockd refuses:
    the daemon never locks files outside its lockspaces.
    """
    try:
        normal = normalise_disk_path(path)
    except InvalidNameError as exc:
        raise _invalid(str(exc)) from None
    if readonly or not options.auto_disk_leases:
        return None
    # virtlockd's test is the string prefix "/dev", not a stat of the file; kept as is.
    if normal.startswith("/dev"):
        if options.lvm_lockspace is not None:
            key = keys.lvm_key(normal)
            if key:
                return _device_lease(options.lvm_lockspace, key, "lvs", normal, shareable)
            log.info("disk %s has no LVM UUID: trying the next lockspace", normal)
        if options.scsi_lockspace is not None:
            key = keys.scsi_key(normal)
            if key:
                return _device_lease(options.scsi_lockspace, key, "scsi_id", normal, shareable)
            log.info("disk %s has no SCSI id: trying the next lockspace", normal)
    if options.file_lockspace is not None:
        return Lease(options.file_lockspace, lease_name_for_path(normal), shareable)
    raise LockError(
        PluginErrorCode.NO_LOCKSPACE,
        f"disk {normal} needs a lease but no lockspace can hold it: turn file_lockspace on "
        "(lockd has no direct leases on the disk file)",
    )


# -- state strings --------------------------------------------------------------------------
@attrs.frozen
class LeaseState:
    """What :meth:`LockManager.inquire` reports: the VM's uuid and the leases it holds."""

    owner_uuid: bytes = attrs.field(validator=_check_uuid)
    leases: tuple[Lease, ...]


def format_state(owner_uuid: bytes, leases: Iterable[Lease]) -> str:
    """The state string of ``leases``: canonical (sorted), so equal states compare equal.

    Grammar (``docs/plugin.md``)::

        state = "lockd-state:1;owner=" uuid *( ";" mode "=" lockspace "/" resource )
        mode  = "exclusive" / "shared"
    """
    uuid_text = str(uuidlib.UUID(bytes=owner_uuid))
    parts = [f"{STATE_PREFIX}:{STATE_VERSION}", f"owner={uuid_text}"]
    # A shared lease held twice is listed twice (the target holds it twice too).
    parts.extend(f"{le.mode}={le.lockspace}/{le.resource}" for le in sorted(leases))
    return ";".join(parts)


def _bad_state(message: str) -> LockError:
    return LockError(PluginErrorCode.BAD_STATE, f"bad state string: {message}")


def parse_state(text: str) -> LeaseState:
    """Read a state string; anything but exactly the documented grammar is refused.

    Names are checked as the daemon checks them, a lease may appear once,
    and at most :data:`MAX_LEASES` leases fit (one acquire must take them all).
    """
    if not isinstance(text, str):
        raise _bad_state("not a string")
    head, *fields = text.split(";")
    prefix, _, version = head.partition(":")
    if prefix != STATE_PREFIX:
        raise _bad_state(f"it does not start with {STATE_PREFIX}:")
    if version != str(STATE_VERSION):
        raise _bad_state(f"version {version!r} is not supported (this lockd reads {STATE_VERSION})")
    if not fields or not fields[0].startswith("owner="):
        raise _bad_state("the owner uuid must follow the version")
    uuid_text = fields[0].removeprefix("owner=")
    try:
        owner_uuid = uuidlib.UUID(uuid_text)
    except ValueError:
        raise _bad_state(f"owner {uuid_text!r} is not a uuid") from None
    if str(owner_uuid) != uuid_text:
        raise _bad_state(f"owner {uuid_text!r} is not a canonical lowercase uuid")
    leases: list[Lease] = []
    seen: dict[tuple[str, str], bool] = {}
    for field in fields[1:]:
        mode, _, ref = field.partition("=")
        lockspace, slash, resource = ref.partition("/")
        if mode not in ("exclusive", "shared") or not slash:
            raise _bad_state(f"{field!r} is not MODE=LOCKSPACE/RESOURCE")
        try:
            lease = Lease(lockspace, resource, mode == "shared")
        except LockError as exc:
            raise _bad_state(exc.message) from None
        if lease.ref in seen and not (lease.shared and seen[lease.ref]):
            # Only a shared lease can be held twice (a shareable image on two devices).
            raise _bad_state(f"lease {lockspace}/{resource} appears twice")
        seen[lease.ref] = lease.shared
        leases.append(lease)
    if len(leases) > MAX_LEASES:
        raise _bad_state(f"{len(leases)} leases; one acquire takes at most {MAX_LEASES}")
    return LeaseState(owner_uuid.bytes, tuple(leases))


def _by_hold(leases: list[Lease]) -> list[list[Lease]]:
    """``leases`` as requests that each name a lease once: the first holds of each, then
    the second holds of those listed twice, and so on."""
    rounds: list[list[Lease]] = []
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for lease in leases:
        n = seen[lease.ref]
        seen[lease.ref] += 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(lease)
    return rounds


# -- the connection -------------------------------------------------------------------------
class Connection(Protocol):
    """One daemon connection with the hello done: what :class:`protocol.client.Client` offers."""

    server: dict[str, Any]
    """The daemon's answer to ``hello`` (``once``: it takes request keys)."""

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request; raises RemoteError on an error reply, OSError on a broken socket."""
        ...

    def fileno(self) -> int:
        """The socket fd, which ``keep_fd`` duplicates for the VM process."""
        ...

    def settimeout(self, timeout: float | None) -> None:
        """Socket timeout; None makes the socket blocking, as the VM must inherit it."""
        ...

    def close(self) -> None:
        """Close this handle (a duplicated fd keeps the connection open)."""
        ...


Connector = Callable[[], Connection]
"""Opens a new connection to the daemon."""


def _add_to(error: LockError, text: str) -> None:
    """Append ``text`` to ``error``'s message (and to what ``str(error)`` says)."""
    error.message += text
    error.args = (f"{error.code}: {error.message}",)


def socket_connector(path: str, *, timeout: float = 30.0, name: str = "lockd-plugin") -> Connector:
    """Connect to the daemon socket at ``path`` with the blocking client.

    For a user who is not root, a missing daemon is started first, as
    virtlockd's client does for a session (``lockd.autospawn``).
    """

    def attempt() -> Connection:
        try:
            return Client(path, timeout=timeout, name=name)
        except (FileNotFoundError, ConnectionRefusedError):
            if not autospawn.wanted():
                raise
            autospawn.spawn(path)
            return Client(path, timeout=timeout, name=name)

    def connect() -> Connection:
        try:
            secure_runtime_dir(path, create=False)  # a socket planted by another user: refused
            try:
                return attempt()
            except ConnectionLostError:
                # Closed before its hello was answered: a daemon killed as it accepted
                # (its exit closes the listening socket, then the rest). The manager
                # connects again at once after a crash, to give back what an acquire
                # cut off took, and met it there. Asked again, the socket is refused (a
                # daemon is started on demand) or queued for socket activation's next.
                return attempt()
        except (autospawn.SpawnFailed, UnsafePathError):
            raise  # names the socket and the daemon's log, or the directory, already
        except OSError as exc:
            message = unreachable(path, exc)
            if exc.errno is None:
                raise type(exc)(message) from None
            raise OSError(exc.errno, message) from None

    return connect


@attrs.frozen
class Acquired:
    """Result of :meth:`LockManager.acquire`."""

    leases: tuple[Lease, ...]
    """The leases asked for, all now held by the owner (empty with ``register_only``)."""
    fd: int | None = None
    """With ``keep_fd``: an inheritable duplicate of the connection for the VM process to keep."""


# -- the lock manager -----------------------------------------------------------------------
class LockManager:
    """Locks for one VM (the owner), as a libvirt lock-driver manager object.

    The manager keeps one registered connection between calls and closes it
    on :meth:`close`, after ``restrict`` or ``keep_fd``, and when it breaks. Closing it never
    ends a lease unless the manager runs in the owner process itself: the
    daemon then treats the close as the VM's death (leases end, the process
    is fenced), so a VM process that holds leases must keep its connection
    (``keep_fd``), as QEMU does under libvirt.
    """

    def __init__(
        self,
        owner: Owner,
        *,
        connect: Connector,
        options: PluginOptions | None = None,
        keys: DeviceKeys | None = None,
    ) -> None:
        self.owner = owner
        self.options = options or PluginOptions()
        self._connect = connect
        self._keys: DeviceKeys = keys or CommandDeviceKeys()
        self._leases: dict[tuple[str, str], Lease] = {}
        self._labels: dict[tuple[str, str], str] = {}
        self._got: collections.Counter[tuple[str, str]] = collections.Counter()
        """The holds this manager's acquires took and its releases have not given back: a
        retried acquire asks only for the rest."""
        self._twice: dict[tuple[str, str], int] = {}
        """Shared leases added more than once (one image, two devices), and how many times:
        the VM holds them that many times, as under virtlockd, so each detach ends one."""
        self._unleased_rw_disks: list[str] = []
        self._conn: Connection | None = None

    def __enter__(self) -> LockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def leases(self) -> tuple[Lease, ...]:
        """The leases added so far, in the order added; a shared one added again is
        listed again."""
        return tuple(self._each_hold(self._leases.values()))

    def _each_hold(self, leases: Iterable[Lease]) -> Iterator[Lease]:
        for lease in leases:
            yield lease
            for _ in range(self._twice.get(lease.ref, 1) - 1):
                yield lease

    # -- resources ---------------------------------------------------------------------------
    def add_disk(
        self, path: str, *, readonly: bool = False, shareable: bool = False
    ) -> Lease | None:
        """Add a disk of the VM; returns the lease it needs, or None (see :func:`disk_lease`)."""
        lease = disk_lease(
            path, readonly=readonly, shareable=shareable, options=self.options, keys=self._keys
        )
        if lease is None:
            if not readonly and not shareable:
                self._unleased_rw_disks.append(path)
            return None
        self._add(lease, f"disk {path}")
        return lease

    def add_lease(self, lockspace: str, key: str, *, shared: bool = False) -> Lease:
        """Add an explicit lease (libvirt's ``<lease>``).

        Its lease file must exist (``create-resource``) unless its lockspace
        is one of the disk lockspaces, whose files are created on demand.
        """
        lease = Lease(lockspace, key, shared)
        self._add(lease, f"lease {lockspace}/{key}")
        return lease

    def _add(self, lease: Lease, label: str) -> None:
        known = self._leases.get(lease.ref)
        if known is not None and known.shared != lease.shared:
            raise _invalid(
                f"{label} is already added as {self._labels[lease.ref]} in {known.mode} mode"
            )
        if known is not None and known.shared:
            # A shareable image given to the VM twice: each device holds it, so the
            # first detach leaves it held. An exclusive one stays one hold (the daemon
            # refuses it again: there is nothing to count).
            self._twice[lease.ref] = self._twice.get(lease.ref, 1) + 1
        self._leases.setdefault(lease.ref, lease)
        self._labels.setdefault(lease.ref, label)

    # -- operations --------------------------------------------------------------------------
    def acquire(
        self,
        state: str | None = None,
        *,
        register_only: bool = False,
        restrict: bool = False,
        keep_fd: bool = False,
    ) -> Acquired:
        """Register the owner, take the leases all or none, then optionally restrict.

        ``state`` (from :meth:`inquire` on a migration source) replaces the
        added leases with exactly the ones it lists; None or ``""`` means no
        state. ``register_only`` takes no lease (a VM starting paused);
        ``restrict`` makes the connection refuse everything from now on, so
        the VM that inherits it cannot release or steal leases; ``keep_fd``
        returns an inheritable, blocking duplicate of the connection, which
        the caller must leak into the VM process (or close). With ``restrict``
        or ``keep_fd`` the manager closes its own handle afterwards; a later
        call opens a new connection. What this manager took and the owner still
        holds, and leases it holds exclusive, are kept, not asked for again, so a
        retried acquire succeeds; a shareable disk is asked for once more per time
        it was added beyond those (the daemon counts the holds).
        """
        wanted = self._wanted(state)
        conn = self._connection()
        granted = () if register_only else self._acquire_all(conn, wanted)
        if restrict:
            self._call(conn, "restrict")
        fd = None
        if keep_fd:
            try:
                conn.settimeout(None)
                fd = os.dup(conn.fileno())
                os.set_inheritable(fd, True)
            except OSError as exc:
                if fd is not None:
                    os.close(fd)
                raise LockError(
                    ErrorCode.IO_ERROR, f"cannot duplicate the connection: {exc}"
                ) from None
        if restrict or keep_fd:
            # Restricted, it is useless; kept, it belongs to the VM, which needs it
            # blocking while our socket timeout would set O_NONBLOCK on it again.
            self._drop(conn)
        log.info(
            "owner %s: %s%s",
            self.owner.name,
            "registered" if register_only else f"holds {len(granted)} lease(s)",
            ", connection restricted" if restrict else "",
        )
        return Acquired(granted, fd)

    def release(
        self, *, all_held: bool = False, request_id: str | None = None
    ) -> tuple[Lease, ...]:
        """Release the added leases (or, with ``all_held``, every lease the owner holds).

        Added leases the owner does not hold are skipped with a log line: the
        goal, "not held by this VM", is already met (a pause after a failed
        resume, a retried release). Returns the leases released.

        ``request_id`` names this one release (a detach) for a caller that may
        repeat it, from another process too, after a lost reply: each request to
        lockd carries a key derived from it (``once``), so that lockd applies it at
        most once, and a repeat with the same id ends no other hold of a shareable
        image held more than once (another device's). Two releases meant as two
        (two devices detached one by one) need two ids. A lockd that takes no keys
        (before 2026-11-28) gets none, and the release is judged from what the VM
        holds as without an id.
        """
        if request_id is not None and all_held:
            raise _invalid("a request id names a release of the added leases, not of all held")
        conn = self._connection()
        if not all_held and conn.server.get("once") is True:
            # Without an id of the caller's, one of ours: a repeat on a new connection
            # after a crash then carries the same keys, however the holds changed.
            return self._release_once(conn, request_id or uuidlib.uuid4().hex, request_id)
        held = self._held(conn)
        if all_held:
            targets = held
        else:
            # Each added lease as many times as it was added (a shareable image added
            # twice, both detached), at most as many times as it is held.
            added = collections.Counter(le.ref for le in self._each_hold(self._leases.values()))
            targets = []
            for lease in held:
                if added[lease.ref] > 0:
                    added[lease.ref] -= 1
                    targets.append(lease)
            held_refs = {lease.ref for lease in held}
            for ref, lease in self._leases.items():
                if ref not in held_refs:
                    log.info(
                        "owner %s does not hold %s: nothing to release", self.owner.name, lease
                    )
        try:
            released = self._release_holds(conn, targets)
        except LockError as exc:
            if exc.code != PluginErrorCode.UNAVAILABLE:
                raise
            # The connection broke mid-release (lockd crashed or was restarted): what was
            # asked may be journaled, and released again it would end another hold of a
            # shared lease held more than once (the other device's). Finished on a new
            # connection, from what the VM holds now.
            released = self._release_in_doubt(targets, held, exc)
        if all_held:
            self._got.clear()
        else:
            self._got.subtract(lease.ref for lease in released)
            self._got = +self._got  # drop counts at or below 0
        return tuple(released)

    def _release_once(
        self, conn: Connection, request_id: str, named: str | None
    ) -> tuple[Lease, ...]:
        """:meth:`release` with keys: each added lease the owner holds at all, as many times
        as it was added. A hold the first try of this request ended is released again
        with the same key, which lockd answers from its record without ending another.
        ``named``: the caller's id (None: ``request_id`` is ours, which it cannot repeat)."""
        held = {lease.ref for lease in self._held(conn)}
        targets = [le for le in self._each_hold(self._leases.values()) if le.ref in held]
        for ref, lease in self._leases.items():
            if ref not in held:
                log.info("owner %s does not hold %s: nothing to release", self.owner.name, lease)
        try:
            released = self._release_holds(conn, targets, request_id)
        except LockError as exc:
            if exc.code != PluginErrorCode.UNAVAILABLE:
                raise
            try:  # cut off: the same requests with the same keys, on a new connection
                released = self._release_holds(self._connection(), targets, request_id)
            except LockError as again:
                if self._conn is None and again.code == ErrorCode.NOT_FOUND:
                    # The register was refused: the VM's process is gone, and lockd ends
                    # every lease it held (owner-exit): the release's goal is met.
                    return tuple(targets)
                if again.code != PluginErrorCode.UNAVAILABLE:
                    raise
                advice = (
                    "repeat this release with the same request id, which lockd applies at most once"
                    if named is not None
                    else "see what the VM holds (inquire, lockd leases) before releasing "
                    "again, which would end another hold of a shared lease held more than once"
                )
                _add_to(
                    exc,
                    f"; it may have released some of {self._named(list(dict.fromkeys(targets)))}"
                    f" already (lockd could not be asked again: {again.message}): {advice}",
                )
                raise exc from None
        self._got.subtract(lease.ref for lease in released)
        self._got = +self._got
        return tuple(released)

    def inquire(self) -> str:
        """The state string of every lease the owner holds, for :meth:`acquire` on a target."""
        conn = self._connection()
        return format_state(self.owner.uuid, self._held(conn))

    def close(self) -> None:
        """Close the manager's connection; leases stay (see the class docstring)."""
        if self._conn is not None:
            self._drop(self._conn)

    # -- internals ---------------------------------------------------------------------------
    def _wanted(self, state: str | None) -> list[Lease]:
        if state:
            parsed = parse_state(state)
            if parsed.owner_uuid != self.owner.uuid:
                raise _bad_state(
                    f"it belongs to VM {uuidlib.UUID(bytes=parsed.owner_uuid)}, "
                    f"not {self.owner.uuid_text}"
                )
            return list(parsed.leases)
        if not self._leases and self._unleased_rw_disks and self.options.requires_disk_lease:
            raise LockError(
                PluginErrorCode.LEASE_REQUIRED,
                "read/write, exclusive access, disks were present, but no leases specified: "
                f"{', '.join(self._unleased_rw_disks)} (require_lease_for_disks is on)",
            )
        return list(self._each_hold(self._leases.values()))

    def _acquire_all(self, conn: Connection, wanted: list[Lease]) -> tuple[Lease, ...]:
        if len(wanted) > MAX_LEASES:
            raise _invalid(f"{len(wanted)} leases; one acquire takes at most {MAX_LEASES}")
        if not wanted:
            return ()
        before = self._held(conn)
        exclusive = {lease.ref for lease in before if not lease.shared}
        # What this manager took already, or the VM holds exclusive (a retried acquire,
        # another manager's), is kept, not asked for again. A shared one is asked for
        # each other time it is wanted, and the daemon counts the holds (as virtlockd):
        # one per device the VM has the image on, each ended by its detach. One held in
        # the other mode is asked for, and refused (busy). What it took counts only as
        # far as the VM still holds it: a lease ended some other way since (another
        # manager's release, a lease lost) is asked for again, not answered from memory.
        holding = collections.Counter(lease.ref for lease in before)
        self._got = +collections.Counter(
            {ref: min(n, holding[ref]) for ref, n in self._got.items()}
        )
        got = self._got.copy()
        asked: list[Lease] = []
        for lease in wanted:
            if got[lease.ref] > 0:
                got[lease.ref] -= 1
            elif lease.shared or lease.ref not in exclusive:
                asked.append(lease)
        disk_spaces = self.options.disk_lockspaces
        # One request names a lease once (a second hold goes in a second request), and
        # cannot mix autocreated and pre-existing lease files, so explicit leases go
        # first and are rolled back if the disk leases are refused.
        requests: list[tuple[bool, list[Lease]]] = []
        for holds in _by_hold(asked):
            requests.append((False, [le for le in holds if le.lockspace not in disk_spaces]))
            requests.append((True, [le for le in holds if le.lockspace in disk_spaces]))
        taken: list[Lease] = []
        try:
            for autocreate, group in requests:
                if not group:
                    continue
                if autocreate:
                    for lockspace in sorted({le.lockspace for le in group}):
                        if lockspace not in WELL_KNOWN_LOCKSPACES:
                            self._call(conn, "create-lockspace", lockspace=lockspace)
                leases = [lease.to_wire() for lease in group]
                self._call(conn, "acquire", leases=leases, autocreate=autocreate)
                taken.extend(group)
        except LockError as exc:
            if exc.code == PluginErrorCode.UNAVAILABLE:
                # The connection broke mid-request (lockd crashed or was restarted): the
                # request cut off may have been granted before, and what it took is held
                # again after the restart. Given back on a new connection, so that an
                # acquire that failed leaves nothing held, as a refused one does.
                self._rollback_in_doubt(asked, before, exc)
            elif taken:
                self._rollback(conn, taken, before, exc)
            raise
        self._got.update(lease.ref for lease in asked)
        return tuple(wanted)

    def _release_holds(
        self, conn: Connection, leases: list[Lease], request_id: str | None = None
    ) -> list[Lease]:
        """Release ``leases``, a lease listed twice twice (one hold per request, which
        names a lease once), as :meth:`_release_those_held` does. Returns those released.
        With ``request_id``, the n-th request carries the key
        :func:`protocol.messages.once_key` derives for it (the same requests, repeated,
        carry the same keys)."""
        released: list[Lease] = []
        n = 0
        for holds in _by_hold(leases):
            for start in range(0, len(holds), MAX_LEASES):
                key = None if request_id is None else once_key("release", request_id, n)
                released += self._release_those_held(conn, holds[start : start + MAX_LEASES], key)
                n += 1
        return released

    def _release_those_held(
        self, conn: Connection, leases: list[Lease], once: bytes | None = None
    ) -> list[Lease]:
        """Release ``leases``; those that ended meanwhile (the VM exited, or its other
        connection released them) are skipped: the release, all or nothing, is refused
        ``not-held`` for them, though its goal is met, and the rest go in a second one, as
        lockd's own rollback skips what is no longer held. Returns those released. A
        refused request journals nothing, so the second one carries the same key."""
        key = {} if once is None else {"once": once}
        try:
            self._call(conn, "release", leases=[lease.ref_to_wire() for lease in leases], **key)
        except LockError as exc:
            if exc.code != ErrorCode.NOT_HELD:
                raise
            held = {lease.ref for lease in self._held(conn)}
            leases = [lease for lease in leases if lease.ref in held]
            if leases:
                self._call(conn, "release", leases=[lease.ref_to_wire() for lease in leases], **key)
        return leases

    def _rollback(
        self, conn: Connection, taken: list[Lease], before: list[Lease], cause: LockError
    ) -> None:
        """Give back the explicit leases of a refused acquire, so none of it holds.

        Only the holds it added: a shared lease the VM held before (through another
        device) is taken again as a no-op under ``shared_holds = "once"``, and released
        as taken, it ended that hold too, the other device still writing. If that fails,
        raises the release's error, saying what the VM still holds: the refusal alone
        (``busy``) told the caller the VM got nothing."""
        try:
            self._release_holds(conn, self._gained(conn, taken, before))
        except LockError as exc:
            if exc.code == PluginErrorCode.UNAVAILABLE:
                self._rollback_in_doubt(taken, before, cause)
                return
            named = self._named(taken)
            log.error(
                "owner %s: acquire failed (%s) and rolling back %s failed too: %s",
                self.owner.name,
                cause,
                named,
                exc,
            )
            raise LockError(
                exc.code,
                f"{cause.message}; and releasing what the acquire took failed, so the VM "
                f"still holds {named}: {exc.message}",
                exc.details,
            ) from None

    def _rollback_in_doubt(self, asked: list[Lease], before: list[Lease], cause: LockError) -> None:
        """Release, on a new connection, the holds of ``asked`` the owner has now beyond
        those it had ``before`` the acquire; say in ``cause``'s message what is left held
        if that cannot be done."""
        back: list[Lease] = []
        try:
            if asked:
                conn = self._connection()
                back = self._release_holds(conn, self._gained(conn, asked, before))
        except LockError as exc:
            if self._conn is None and exc.code == ErrorCode.NOT_FOUND:
                # The register was refused: the VM's process is gone, so lockd ends
                # whatever it held (owner-exit); "it may hold" would send the caller
                # after leases nobody holds.
                _add_to(cause, "; the VM's process has exited, so lockd releases whatever "
                               f"of this acquire it held ({exc.message})")  # fmt: skip
                return
            log.error(
                "owner %s: the connection to lockd broke mid-acquire, and releasing what "
                "it may have taken failed: %s",
                self.owner.name,
                exc,
            )
            # A shared lease the VM held before this acquire is not to be released: if
            # the acquire's hold was never taken, that would end the hold it had.
            had = {lease.ref for lease in before}
            fresh = [lease for lease in dict.fromkeys(asked) if lease.ref not in had]
            again = [lease for lease in dict.fromkeys(asked) if lease.ref in had]
            advice = "acquire again, or release them"
            if again:
                advice = (
                    f"acquire again{f', or release {self._named(fresh)}' if fresh else ''}; "
                    f"not {self._named(again)}, which the VM held before this acquire: a "
                    "release could end that hold"
                )
            _add_to(
                cause,
                f"; it may hold some of {self._named(list(dict.fromkeys(asked)))} (lockd "
                f"could not be asked again: {exc.message}): {advice}",
            )
            return
        if back:
            log.warning(
                "owner %s: the connection to lockd broke mid-acquire; released again what "
                "it had taken: %s",
                self.owner.name,
                ", ".join(map(str, back)),
            )
        _add_to(cause, "; nothing of this acquire is held (given back on a new connection)")

    def _release_in_doubt(
        self, targets: list[Lease], before: list[Lease], cause: LockError
    ) -> list[Lease]:
        """Release, on a new connection, those of ``targets`` a release cut off did not,
        judged by what the owner held ``before`` it and holds now; returns ``targets``.
        Raises ``cause``, saying what may be released already, if lockd cannot be asked."""
        try:
            conn = self._connection()
            had, now = self._holds_since(conn, before)
            rest: list[Lease] = []
            for lease, times in collections.Counter(targets).items():
                done = max(0, had[lease.ref] - now[lease.ref])
                rest += [lease] * min(max(0, times - done), now[lease.ref])
            self._release_holds(conn, rest)
        except LockError as exc:
            if self._conn is None and exc.code == ErrorCode.NOT_FOUND:
                # The register was refused: the VM's process is gone, and lockd ends
                # every lease it held (owner-exit): the release's goal is met.
                return targets
            named = self._named(list(dict.fromkeys(targets)))
            _add_to(
                cause,
                f"; it may have released some of {named} already (lockd could not be asked "
                f"again: {exc.message}): see what the VM holds (inquire, lockd leases) "
                "before releasing again, which would end another hold of a shared lease "
                "held more than once",
            )
            raise cause from None
        log.warning(
            "owner %s: the connection to lockd broke mid-release; released on a new "
            "connection what it had not: %s",
            self.owner.name,
            ", ".join(map(str, rest)) or "nothing",
        )
        return targets

    def _named(self, leases: list[Lease]) -> str:
        """The leases as the caller added them (``disk /vm/a.img``), for messages."""
        return ", ".join(self._labels.get(lease.ref, str(lease)) for lease in leases)

    def _held(self, conn: Connection) -> list[Lease]:
        """The owner's leases, one held twice listed twice."""
        result = self._call(conn, "inquire")
        return [
            lease
            for item in result.get("leases", [])
            for lease in [Lease.from_wire(item)] * item.get("holds", 1)
        ]

    def _holds_since(
        self, conn: Connection, before: list[Lease]
    ) -> tuple[collections.Counter[tuple[str, str]], collections.Counter[tuple[str, str]]]:
        """How many times the owner held each lease ``before`` a request cut off, and holds
        it now: what the request did, judged after a crash."""
        had = collections.Counter(lease.ref for lease in before)
        return had, collections.Counter(lease.ref for lease in self._held(conn))

    def _gained(self, conn: Connection, asked: list[Lease], before: list[Lease]) -> list[Lease]:
        """The holds of ``asked`` the owner has now beyond those it had ``before``: what an
        acquire cut off gave it, each at most as often as it was asked for."""
        had, now = self._holds_since(conn, before)
        gained: list[Lease] = []
        for lease, times in collections.Counter(asked).items():
            gained += [lease] * max(0, min(times, now[lease.ref] - had[lease.ref]))
        return gained

    def _connection(self) -> Connection:
        if self._conn is not None:
            return self._conn
        try:
            conn = self._connect()
        except RemoteError as exc:
            raise LockError(exc.code, exc.message, exc.details) from None
        except (OSError, ProtocolError) as exc:
            # strerror: socket_connector's words (unreachable()), without "[Errno 2]", as
            # the CLI prints them.
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise LockError(PluginErrorCode.UNAVAILABLE, f"cannot reach lockd: {why}") from None
        self._conn = conn
        self._call(conn, "register", owner=self.owner.to_wire())
        return conn

    def _call(self, conn: Connection, op: str, **args: Any) -> dict[str, Any]:
        try:
            return conn.call(op, **args)
        except RemoteError as exc:
            if op == "register":
                self._drop(conn)
            raise LockError(exc.code, self._explain(exc), exc.details) from None
        except (ConnectionLostError, OSError, ProtocolError) as exc:
            self._drop(conn)
            raise LockError(
                PluginErrorCode.UNAVAILABLE, f"{op}: the connection to lockd broke: {exc}"
            ) from None

    def _explain(self, exc: RemoteError) -> str:
        """Name the disk the caller added when the daemon names its lease, as ``lockd run`` does."""
        if exc.code == ErrorCode.BUSY:
            words = set(exc.message.split())
            for (lockspace, resource), label in self._labels.items():
                if f"{lockspace}/{resource}" in words:
                    return f"{label} is busy: {exc.message}"
        return exc.message

    def _drop(self, conn: Connection) -> None:
        if self._conn is conn:
            self._conn = None
        conn.close()
