"""Which build of lockd this is: the release, and a digest of the code itself.

Every build so far is release 0.1.0, so the release alone could not tell an
operator whether ``systemctl reload`` ran the code just installed, nor tell an
auditor which build wrote a stretch of the journal. The digest can: it is
taken over the Python source of the three packages as installed (each file's
path within them and its bytes), so two installs of the same code give the
same digest and any change to the code gives another, with no version
control or build step needed.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from lockd import __version__

PACKAGES = ("actors", "protocol", "lockd")
"""The packages lockd is made of (``pyproject.toml``'s ``packages``)."""


def source_digest(root: Path) -> str:
    """12 hex digits of SHA-256 over every ``.py`` file of :data:`PACKAGES` under
    ``root``, by path then bytes (compiled caches and other files left out)."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@functools.cache
def version() -> str:
    """The release with the code's digest as a local version label, e.g.
    ``0.1.0+3f2a9c1d0b7e``: what ``--version``, ``status`` and ``daemon-started``
    report. The release alone if the source cannot be read (a zipped install)."""
    try:
        return f"{__version__}+{source_digest(Path(__file__).resolve().parents[1])}"
    except OSError:
        return __version__
