"""The ``lockd`` command line.

Subcommands are added as the capabilities land (see the open issues); each one
that exists here works end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lockd import __version__
from protocol.names import (
    FILES_LOCKSPACE,
    InvalidNameError,
    lease_name_for_path,
    normalise_disk_path,
)

EXIT_USAGE = 2


def _cmd_lease_name(args: argparse.Namespace) -> int:
    """Print the lease name (lockspace-relative file name) of each disk path."""
    rows = []
    for path in args.paths:
        try:
            rows.append(
                {
                    "path": normalise_disk_path(path),
                    "lockspace": FILES_LOCKSPACE,
                    "resource": lease_name_for_path(path),
                }
            )
        except InvalidNameError as exc:
            print(f"lockd lease-name: {exc}", file=sys.stderr)
            return EXIT_USAGE
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['resource']}  {row['path']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main() so tests can inspect it."""
    parser = argparse.ArgumentParser(prog="lockd", description="Disk lease daemon and client.")
    parser.add_argument("--version", action="version", version=f"lockd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    lease_name = sub.add_parser(
        "lease-name",
        help="print the lease name of disk paths",
        description="Lease name = lowercase hex SHA-256 of the normalised absolute path "
        f"(lockspace {FILES_LOCKSPACE}). No filesystem access is made.",
    )
    lease_name.add_argument("paths", nargs="+", metavar="PATH")
    lease_name.add_argument("--json", action="store_true", help="one JSON object per line")
    lease_name.set_defaults(func=_cmd_lease_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lockd`` console script."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
