"""Names of lockspaces and resources, and the lease name of a disk path.

These rules are part of the wire contract: a request carrying a bad name is
refused before it reaches any actor, so no path outside the configured
directories can ever be formed from client input.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

FILES_LOCKSPACE = "org.libvirt.lockd.files"
LVM_LOCKSPACE = "org.libvirt.lockd.lvm"
SCSI_LOCKSPACE = "org.libvirt.lockd.scsi"
WELL_KNOWN_LOCKSPACES = (FILES_LOCKSPACE, LVM_LOCKSPACE, SCSI_LOCKSPACE)

INDEX_NAME = "org.libvirt.lockd.index"
"""Reserved file in every lockspace directory, locked around lease-file create and delete."""
_INDEX_LENGTH = len(INDEX_NAME)

MAX_NAME_LENGTH = 255

_LOCKSPACE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,255}")
# Resource names also admit '@', '+' and '=', which appear in device keys; SCSI ids
# from scsi_id(8) use '_', and LVM UUIDs are letters, digits and '-'.
_RESOURCE_NAME = re.compile(r"[A-Za-z0-9._:@+=-]{1,255}")


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""C0 and C1 controls and DEL: refused in owner and client names, which lockd's text
output prints (a newline in one would forge a line of ``lockd events``; an escape
sequence would drive the operator's terminal)."""


_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f\U000e0100-\U000e01ef]"
)
"""Bidirectional controls and characters that show as nothing: allowed in names (a VM's
name may be in any script), but printed escaped: a right-to-left override in one would
make it show as another name in ``lockd leases``. Not only the zero-width spaces and
joiners: tag characters (U+E0020-E007F), variation selectors, the soft hyphen, Hangul
fillers and the like are as invisible (``vm1`` and ``vm1`` + U+E0031 printed alike), and
the line and paragraph separators (U+2028, U+2029) end a line for some readers."""


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN`` and invisible ones
    (bidirectional controls, zero-width) as ``\\uNNNN``: for names in text output,
    also those journaled before they were refused."""
    text = CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return _INVISIBLE.sub(lambda m: _escape(m.group()), text)


class InvalidNameError(ValueError):
    """A lockspace or resource name that breaks the naming rules."""


_DOTS = (".", "..")


def _check_name(name: str, pattern: re.Pattern[str], kind: str, allowed: str) -> str:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise InvalidNameError(f"invalid {kind} name {name!r}: use 1-255 characters of {allowed}")
    if name in _DOTS:
        raise InvalidNameError(f"invalid {kind} name {name!r}")
    return name


def check_lockspace_name(name: str) -> str:
    """Return ``name`` if it is a valid lockspace name, else raise InvalidNameError."""
    # Every name of every request comes here: a valid one returns at once, and only an
    # invalid one goes on to _check_name for its error.
    if type(name) is str and _LOCKSPACE_NAME.fullmatch(name) and name not in _DOTS:
        return name
    return _check_name(name, _LOCKSPACE_NAME, "lockspace", "[A-Za-z0-9._:-]")


def check_resource_name(name: str) -> str:
    """Return ``name`` if it is a valid resource (lease file) name, else raise InvalidNameError."""
    if (
        type(name) is str
        and _RESOURCE_NAME.fullmatch(name)
        and name not in _DOTS
        and (len(name) != _INDEX_LENGTH or name.lower() != INDEX_NAME)
    ):
        return name  # as for lockspaces: the checks below, for the error
    _check_name(name, _RESOURCE_NAME, "resource", "[A-Za-z0-9._:@+=-]")
    if name.lower() == INDEX_NAME:
        # In any case: on a case-insensitive filesystem (vfat, an ext4 or a share with
        # case folding) ORG.LIBVIRT.LOCKD.INDEX is the index file itself, and a lease
        # taken on it would be the lock every create and delete in the lockspace takes.
        raise InvalidNameError(
            f"resource name {name!r} is reserved for the lockspace index lock "
            "(in any case: a case-insensitive filesystem makes it the same file)"
        )
    return name


def normalise_disk_path(path: str) -> str:
    """Normalise an absolute disk path as a string, without touching the filesystem.

    Every host must name a shared disk by the same string: no symlink
    resolution is done, exactly as virtlockd hashes the path from the domain.
    """
    if not isinstance(path, str) or not path:
        raise InvalidNameError("disk path must be a non-empty string")
    if "\0" in path:
        raise InvalidNameError("disk path must not contain NUL")
    if not path.startswith("/"):
        raise InvalidNameError(f"disk path {path!r} is relative; give an absolute path")
    normal = posixpath.normpath(path)
    # POSIX keeps a leading '//' as implementation-defined; fold it so the
    # lease name does not depend on how many slashes a caller typed.
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    return normal


def lease_name_for_path(path: str) -> str:
    """Lease name of a disk: lowercase hex SHA-256 of its normalised absolute path."""
    return hashlib.sha256(normalise_disk_path(path).encode("utf-8")).hexdigest()
