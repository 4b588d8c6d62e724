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


def _format_event(row: dict[str, object]) -> str:
    """One readable line per event: seq, UTC time, host, type, then the other fields."""
    import datetime

    when = datetime.datetime.fromtimestamp(float(row["time"]), datetime.UTC)  # type: ignore[arg-type]
    rest = " ".join(
        f"{key}={_plain(value)}"
        for key, value in row.items()
        if key not in ("seq", "time", "host", "type")
    )
    return f"{row['seq']} {when:%Y-%m-%dT%H:%M:%S.%fZ} {row['host']} {row['type']} {rest}".rstrip()


def _plain(value: object) -> object:
    """Owner maps and bytes as short text for the line format."""
    import uuid

    if isinstance(value, bytes) and len(value) == 16:
        return uuid.UUID(bytes=value)
    if isinstance(value, dict):
        if "name" in value and "pid" in value:
            return f"{value['name']}[pid={value['pid']}]"
        return ",".join(f"{k}:{_plain(v)}" for k, v in value.items())
    return value


def _json_ready(value: object) -> object:
    import uuid

    if isinstance(value, bytes):
        return str(uuid.UUID(bytes=value)) if len(value) == 16 else value.hex()
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def _cmd_events(args: argparse.Namespace) -> int:
    """Print the journal, read straight from its segment files."""
    from lockd.journal_file import read_entries
    from lockd.journal_format import JournalCorruptError

    try:
        for entry in read_entries(args.journal_dir, since_seq=args.since):
            row = entry.to_wire()
            if args.json:
                print(json.dumps(_json_ready(row)))
            else:
                print(_format_event(row))
    except FileNotFoundError:
        print(f"lockd events: no journal at {args.journal_dir}", file=sys.stderr)
        return 1
    except JournalCorruptError as exc:
        print(f"lockd events: {exc}", file=sys.stderr)
        return 1
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

    events = sub.add_parser(
        "events",
        help="print the journal (works while the daemon is down)",
        description="Read journal segment files directly and print one event per line.",
    )
    events.add_argument("--journal-dir", required=True, help="the daemon's journal directory")
    events.add_argument("--since", type=int, default=1, metavar="SEQ", help="first seq to show")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(func=_cmd_events)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lockd`` console script."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
