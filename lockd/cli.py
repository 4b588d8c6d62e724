"""The ``lockd`` command line.

Local subcommands (``lease-name``, ``events``) live here; the ones that talk
to the daemon are in :mod:`lockd.commands`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from lockd.config import ConfigError
from lockd.config import load as load_config
from protocol.names import (
    FILES_LOCKSPACE,
    InvalidNameError,
    check_lockspace_name,
    check_resource_name,
    lease_name_for_path,
    normalise_disk_path,
    printable,
)

if TYPE_CHECKING:
    from actors.events import JournalEntry
    from lockd.journal_file import JournalFollower

EXIT_USAGE = 2


class _PrintVersion(argparse.Action):
    """``--version``: the digest of the code is taken only when asked (reading the
    source at every command's start would slow each ``lockd run``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        from lockd import build

        print(f"lockd {build.version()}")
        parser.exit()


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
            return _failed(args, "lease-name", str(exc), EXIT_USAGE)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['resource']}  {row['path']}")
    return 0


def _field(key: str, value: object) -> object:
    """An event's field for the line format: a time (``connected``) as the event's own."""
    return _utc(value) if key == "connected" and isinstance(value, float) else _plain(value)


def _format_event(row: dict[str, object]) -> str:
    """One readable line per event: seq, UTC time, host, type, then the other fields."""
    rest = " ".join(
        f"{printable(key)}={_field(key, value)}"
        for key, value in row.items()
        if key not in ("seq", "time", "host", "type")
    )
    when = _utc(float(row["time"]))  # type: ignore[arg-type]
    host, kind = printable(str(row["host"])), printable(str(row["type"]))
    return f"{row['seq']} {when} {host} {kind} {rest}".rstrip()


def _utc(stamp: float) -> str:
    """A wall-clock time as the line format prints it: ISO 8601, UTC, microseconds."""
    import datetime

    return f"{datetime.datetime.fromtimestamp(stamp, datetime.UTC):%Y-%m-%dT%H:%M:%S.%fZ}"


def _as_printed(stamp: float) -> float:
    """``stamp`` to the microsecond, rounded as :func:`_utc` prints it: ``--since`` given
    a line's time starts at that line's event (``.5190055``, printed ``.519006``, fell
    before it and was left out until 2026-11-27)."""
    import datetime

    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).timestamp()


def _plain(value: object) -> object:
    """Owner maps and bytes as short text for the line format."""
    import uuid

    if isinstance(value, bytes) and len(value) == 16:
        return uuid.UUID(bytes=value)
    if isinstance(value, dict):
        if "name" in value and "pid" in value:
            return f"{printable(str(value['name']))}[pid={value['pid']}]"
        # A fence's since is a time, printed as the event's own.
        return ",".join(
            f"{k}:{_utc(v) if k == 'since' and isinstance(v, float) else _plain(v)}"
            for k, v in value.items()
        )
    if isinstance(value, list):  # recovery-completed's fences: owner:reason pairs
        return "[" + ";".join(str(_plain(v)) for v in value) + "]"
    if isinstance(value, str):  # a later lockd's event may hold any text: one line each
        return printable(value)
    return value


def _parse_since(text: str) -> tuple[int, float]:
    """``--since``: a sequence number, or an ISO 8601 time (UTC unless it says otherwise)."""
    import datetime

    if text.isdigit():
        return int(text), 0.0
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since takes a sequence number or an ISO 8601 time, not {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return 1, when.timestamp()


def _lockspace_filter(text: str) -> str:
    """``events --lockspace``: a name no lockspace can have would match nothing, for
    ever with --follow: refused as --type's typos are."""
    try:
        return check_lockspace_name(text)
    except InvalidNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _resource_filter(text: str) -> str:
    """``events --resource``: a lease name; a disk's path (what an auditor has at hand)
    matched nothing, with no word why."""
    try:
        return check_resource_name(text)
    except InvalidNameError as exc:
        hint = ""
        if text.startswith("/"):
            hint = f"; a disk's lease is named by `lockd lease-name {text}`"
        raise argparse.ArgumentTypeError(f"{exc}{hint}") from None


def _matches(row: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.type and row["type"] not in args.type:
        return False
    if args.lockspace and row.get("lockspace") != args.lockspace:
        return False
    if args.resource and row.get("resource") != args.resource:
        return False
    if args.conn is not None and row.get("conn") != args.conn:
        return False
    if args.owner:
        import uuid

        # An event's own owner, and those recovery-completed goes on fencing.
        fences = row.get("fencing")
        owners = [row.get("owner")]
        if isinstance(fences, list):
            owners += [fence.get("owner") for fence in fences if isinstance(fence, dict)]
        names: set[str] = set()
        for owner in owners:
            if not isinstance(owner, dict):
                continue
            names.update((str(owner.get("name")), str(owner.get("pid"))))
            raw = owner.get("uuid")
            if isinstance(raw, bytes) and len(raw) == 16:
                names.add(str(uuid.UUID(bytes=raw)))
        if names.isdisjoint(args.owner):
            return False
    return True


def _conn_filter(text: str) -> int:
    """``events --conn``: a connection id as events print it (0: lockd's own doing)."""
    try:
        conn = int(text, 10)
    except ValueError:
        conn = -1
    if conn < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a connection id (a number, as `conn=` prints it)"
        )
    return conn


def _owner_filter(text: str) -> frozenset[str]:
    """``events --owner``: the spellings it matches: the text (a name, a pid), and, if
    it is a uuid, the uuid as events print it (lower case, with hyphens): one copied
    from libvirt in capitals (``virsh domuuid`` prints lower case, others do not) or
    without hyphens matched nothing."""
    import uuid

    try:
        return frozenset({text, str(uuid.UUID(text))})
    except ValueError:
        return frozenset({text})


def _cmd_events(args: argparse.Namespace) -> int:  # noqa: PLR0915 - one reading loop
    """Print the journal, read straight from its segment files; --follow keeps reading."""
    from lockd.commands import EXIT_PIPE, reader_gone
    from lockd.dirwatch import DirWatch
    from lockd.journal_file import JournalFollower, read_epoch
    from lockd.journal_format import JournalCorruptError

    if unknown := _unknown_types(args.type or ()):
        return _failed(args, "events", unknown, EXIT_USAGE)
    since_seq, since_time = args.since
    directory = _journal_dir(args)
    if isinstance(directory, ConfigError):
        return _failed(args, "events", _unread_config(directory), EXIT_USAGE)
    if missing := _no_journal_at(directory):
        return _failed(args, "events", missing, 1)
    epoch = read_epoch(directory)
    cut_at = _cut_at(epoch)
    follower = JournalFollower(directory, since_seq)
    # Set up before the first read: a write between that read and the first wait
    # still wakes it.
    watch = DirWatch(directory) if args.follow else None
    expected, told_past_the_end = max(since_seq, 1), False
    try:
        while True:
            try:
                looked, entries = time.time(), follower.poll(READ_BYTES)
            except JournalCorruptError:
                # A follower placed past a cut reads the new records from the middle.
                if watch is None or _cut_below(read_epoch(directory), epoch, expected) is None:
                    raise
                looked, entries = -math.inf, []  # not at the end: the cut is next
            expected, since_time = _print_entries(entries, args, expected, since_time, cut_at)
            if entries or follower.more:
                continue  # more to read (or to skip to --since), or damage after these
            told_past_the_end = told_past_the_end or _past_the_end(
                expected, follower.read_to, waits=watch is not None
            )  # said once: a follower waits on for it
            if watch is None:
                return 0
            # At the end, --since TIME passed when it looked: what is written from now
            # on comes after TIME, whatever its stamp (a clock stepped back, by NTP or a
            # wrong RTC corrected, stamps it earlier: left out for as long as the step).
            since_time = -math.inf if since_time <= looked else since_time
            if reader_gone():  # `| head`: its lines are out, and no write is to fail now
                return EXIT_PIPE
            now = read_epoch(directory)
            cut = _cut_below(now, epoch, expected)
            if now != epoch:  # a cut the follower is short of is named as it passes it
                cut_at = _cut_at(now) if cut is None else None
            epoch = now
            if cut is not None:
                follower = _back_to_the_cut(follower, cut)
                expected = cut
                continue
            watch.wait(FOLLOW_LOOK_SECONDS)
    except JournalCorruptError as exc:
        # On stderr only, also with --json: stdout is a stream of events already begun.
        _note(f"{directory}: {exc}")
        return 1
    except BrokenPipeError:
        raise  # the reader left: main() says so
    except OSError as exc:  # a journal this user may not read (root's, 0700), ...
        print(f"lockd events: {_unreadable(exc, directory)}", file=sys.stderr)
        return 1
    finally:  # Ctrl-C ends --follow with 130, as any command (the shell's convention)
        follower.close()
        if watch is not None:
            watch.close()


def _journal_dir(args: argparse.Namespace) -> str | ConfigError:
    """``--journal-dir``, else the ``journal_dir`` ``lockd serve`` would use: the
    configuration file's (``$LOCKD_CONFIG``, else the default file if it exists), else
    the default. The default alone read another journal than the daemon's whenever
    lockd.toml moved it."""
    if args.journal_dir:
        return str(args.journal_dir)
    try:
        return load_config(os.environ.get("LOCKD_CONFIG"), {}).journal_dir
    except ConfigError as exc:
        return exc


def _unread_config(exc: ConfigError) -> str:
    return f"{exc} (the journal_dir is read from it: mend it, or give --journal-dir)"


def _no_journal_at(directory: str) -> str | None:
    """Why ``directory`` is no journal lockd wrote, for ``events`` and ``journal-check``;
    None if it is one.

    A directory that no lockd ever wrote (no segment, and no lock file, which each
    daemon and ``--repair`` leaves) is a mistyped ``--journal-dir``, such as the
    journal's parent: ``events`` printed nothing and exited 0 (with ``--follow``
    waited for ever) and ``journal-check`` said "journal ok"."""
    from lockd.journal_file import LOCK_FILE, list_segments

    if not os.path.isdir(directory):
        return f"no journal at {directory}"
    try:
        if list_segments(directory) or os.path.exists(os.path.join(directory, LOCK_FILE)):
            return None
    except OSError:
        return None  # unreadable: the read says so, in its own words
    return (
        f"no journal at {directory}: no lockd has written one there (no journal-*.cbor "
        f"segment); give the daemon's journal_dir with --journal-dir"
    )


def _unknown_types(types: Sequence[str]) -> str | None:
    """What is wrong with the ``--type``s that are no event type; None if each is one. A
    typo would match nothing, for ever with --follow."""
    from actors.events import EVENT_TYPES

    unknown = sorted(set(types) - set(EVENT_TYPES))
    if not unknown:
        return None
    return (
        f"unknown event type {', '.join(map(repr, unknown))}; the types are "
        f"{', '.join(sorted(EVENT_TYPES))}"
    )


def _failed(args: argparse.Namespace, command: str, message: str, status: int) -> int:
    """Say why ``lockd COMMAND`` failed, on stderr and, with ``--json``, as the client
    commands do on stdout (README): ``lease-name`` and ``events`` printed nothing there."""
    print(f"lockd {command}: {message}", file=sys.stderr)
    if args.json:
        from lockd.commands import print_json_error

        print_json_error(message, status)
    return status


def _print_entries(
    entries: list[JournalEntry],
    args: argparse.Namespace,
    expected: int,
    since_time: float,
    cut_at: int | None,
) -> tuple[int, float]:
    """Print those of ``entries`` the filters let through; the seq to expect next, and
    the ``--since`` time still to wait for (-inf once an event reached it).

    ``expected``: the seq expected first (an entry after it names the gap); ``cut_at``:
    the first seq after the journal's last cut (named as it is passed). ``--since TIME``
    starts at the first event of that time or later and leaves out none after it: a
    clock stepped back (NTP) stamps later events with earlier times, which, each
    compared with TIME, were left out, a follower's for as long as the step."""
    from lockd.commands import json_ready

    for entry in entries:
        if since_time != -math.inf and _as_printed(entry.time) >= since_time:
            since_time = -math.inf
        if entry.seq > expected and since_time == -math.inf:
            _missing(expected, entry.seq - 1)
        if entry.seq == cut_at and since_time == -math.inf:
            _note(
                f"the journal was cut after seq {cut_at - 1} (journal-check --repair, or damage "
                f"cut at start-up after a reboot): the events from {cut_at} on were written "
                f"after the cut; those it cut are kept beside the segments, as *.damaged-*"
            )
        expected = entry.seq + 1
        row = entry.to_wire()
        if since_time != -math.inf or not _matches(row, args):
            continue
        if args.json:
            print(json.dumps(json_ready(row)), flush=args.follow)
        else:
            print(_format_event(row), flush=args.follow)
    return expected, since_time


def _back_to_the_cut(follower: JournalFollower, cut: int) -> JournalFollower:
    """A follower for the journal's new timeline from ``cut`` on, in place of
    ``follower`` (closed), which printed seqs from ``cut`` on of the old one."""
    from lockd.journal_file import JournalFollower

    _note(
        f"the journal was cut after seq {cut - 1} (journal-check --repair, or damage cut at "
        f"start-up after a reboot); the events from {cut} on are new ones, under seqs "
        f"printed above for others; going on from {cut}"
    )
    follower.close()
    return JournalFollower(follower.directory, cut)


def _cut_at(epoch: tuple[str, int] | None) -> int | None:
    """The first seq after the journal's last cut, None if it was never cut: the epoch
    a daemon records on a journal with none starts at 1."""
    return epoch[1] if epoch is not None and epoch[1] > 1 else None


def _cut_below(
    now: tuple[str, int] | None, before: tuple[str, int] | None, expected: int
) -> int | None:
    """The seq a follower goes on from when the journal was cut below ``expected`` (the
    seq it is to print next) since it read the epoch ``before``; None if it was not.

    A cut (``journal-check --repair``, or damage cut after a reboot) truncates the
    segment the follower reads and hands the seqs from the cut on out again, with a
    new epoch: the follower's place is past the new records, so it printed nothing of
    them, or read a record from its middle and called the journal corrupt."""
    if now is None or now == before or now[1] >= expected:
        return None
    if before is None and now[1] == 1:
        return None  # the epoch a daemon records on a journal of an older lockd: no cut
    return now[1]


def _past_the_end(expected: int, end: int, *, waits: bool) -> bool:
    """At the journal's end (``end``: its next seq), whether ``--since`` asked for seqs
    past it (``expected``: the seq to print next), saying so if it did: a seq kept from
    another host's journal, or from this one before a cut, printed nothing and said
    nothing (the ``subscribe`` operation refuses such a since)."""
    if not 0 < end < expected:
        return False
    then = f"; waiting for seq {expected}" if waits else ""
    _note(
        f"--since {expected} is past the end of the journal, whose last event is seq "
        f"{end - 1}{then}"
    )
    return True


def _missing(first: int, last: int) -> None:
    """Say that the events ``first``-``last`` are no longer in the journal: retention
    deleted their segments (before this read, or while a follower was behind), or
    journal-check --repair set a damaged one aside. Without it an auditor could not tell
    a history cut short from a complete one."""
    _note(
        f"events {first}-{last} are no longer in the journal (deleted by "
        f"journal_retain_segments, or set aside by journal-check --repair); going on from "
        f"{last + 1}"
    )


def _note(text: str) -> None:
    """A line on stderr about the events, after those printed before it: stdout is
    flushed first, so that in one stream (``2>&1``) it stands where it belongs."""
    sys.stdout.flush()
    print(f"lockd events: {text}", file=sys.stderr)


def _unreadable(exc: OSError, directory: str) -> str:
    """Why the journal cannot be read, for a user (not a traceback)."""
    where = "" if exc.filename in (None, directory) else f"{exc.filename}: "
    return f"cannot read the journal at {directory}: {where}{exc.strerror or exc}"


READ_BYTES = 1 << 20
"""``events`` reads the journal this much at a time, printing as it goes: in one read
of every segment, as until 2026-11-27, the first line of a 128 MiB journal came after
about 10 s, and its entries all held at once took about 500 MB."""

FOLLOW_LOOK_SECONDS = 1.0
"""``events --follow`` sleeps until the journal directory changes, but looks at least
this often anyway (a change inotify could not report: a replaced directory)."""


def _cmd_journal_check(args: argparse.Namespace) -> int:
    """Report journal damage; with --repair, cut the journal at it."""
    directory = _journal_dir(args)
    if isinstance(directory, ConfigError):
        print(f"lockd journal-check: {_unread_config(directory)}", file=sys.stderr)
        return EXIT_USAGE
    if missing := _no_journal_at(directory):  # before --repair's lock, which leaves a .lock
        print(f"lockd journal-check: {missing}", file=sys.stderr)
        return 1
    lock: int | str | None = None
    if args.repair:
        from lockd.daemon import check_journal_dir

        # As lockd serve refuses it: the cut follows the segments' names, and another
        # user's symlink there had root truncate (or move) a file of their choosing.
        try:
            check_journal_dir(directory)
        except OSError as exc:
            print(f"lockd journal-check: {exc.strerror}; nothing was changed", file=sys.stderr)
            return 1
        # Taken before the journal is read, not after: between the two a daemon could
        # start (after a reboot it cuts damage in the newest segment itself), write,
        # and stop, and the cut made from what was read earlier would then fall on
        # the records it wrote. Not had, it refuses the cut (below), not the check.
        try:
            lock = _journal_unused(directory)
        except OSError as exc:  # a journal this user may read but not write
            lock = f"cannot lock the journal at {directory}: {exc.strerror or exc}"
    try:
        return _check(args, directory, lock)
    finally:
        if isinstance(lock, int):
            os.close(lock)  # held until the cut is made: no daemon starts on it meanwhile


def _check(args: argparse.Namespace, directory: str, lock: int | str | None) -> int:
    """journal-check on ``directory``; ``lock``: its journal lock, held for --repair (or
    why it could not be taken; None: a running lockd holds it, or no --repair)."""
    from lockd.journal_check import find_damage, repair
    from lockd.journal_format import JournalTooNewError

    try:
        notes, damage = find_damage(directory)
    except JournalTooNewError as exc:
        print(f"lockd journal-check: {directory}: {exc}; nothing was changed", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lockd journal-check: {_unreadable(exc, directory)}", file=sys.stderr)
        return 1
    for note in notes:
        print(note)
    if damage is None:
        print("journal ok")
        return 0
    print(
        f"DAMAGED: {damage.segment} at byte {damage.offset}: {damage.reason} "
        f"(entries from seq {damage.first_bad_seq} on are affected)"
    )
    if not args.repair:
        print("lockd serve will not start on it; see docs/recovery.md, then rerun with --repair")
        return 1
    if isinstance(lock, str):
        print(f"lockd journal-check: {lock}", file=sys.stderr)
        return 1
    if lock is None:
        from lockd.journal_file import journal_holder

        who = journal_holder(directory)
        print(
            f"lockd journal-check: journal {directory} is in use by a running lockd"
            + (f" ({who})" if who else "")
            + "; stop it before --repair (a cut under it would lose what it writes)",
            file=sys.stderr,
        )
        return 1
    for line in repair(directory, damage):
        print(line)
    print(
        "repaired: leases acquired after the cut are not held again at the next start; "
        "their owners must acquire them again"
    )
    return 0


def _journal_unused(directory: str) -> int | None:
    """The journal directory's lock (the one ``lockd serve`` takes), held; None while a
    daemon holds it."""
    from lockd.journal_file import lock_journal

    return lock_journal(directory, "journal-check --repair")


_SOCKET_HELP = "the daemon's socket (env LOCKD_SOCKET, else the per-user default)"


def _add_client_options(
    parser: argparse.ArgumentParser, *, admin: bool = False, socket_help: str = _SOCKET_HELP
) -> None:
    if admin:
        parser.add_argument(
            "--admin-socket",
            default=None,
            help="the daemon's admin socket (default: lockd-admin.sock beside --socket, else "
            "env LOCKD_ADMIN_SOCKET, else beside LOCKD_SOCKET, else the per-user default)",
        )
    parser.add_argument("--socket", default=None, help=socket_help)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= low``. ``lockd bench --ops 0`` ended in a
    traceback (no median of nothing), ``--owners 0`` measured 0 owners holding 0 leases."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number, not {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"takes a number >= {low}, not {text!r}")
        return value

    return count


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are also printed as JSON on stdout when the
    command line asks for ``--json`` (README: "with --json a failure is also printed as
    JSON on stdout"): ``lockd acquire --json --wait 5000`` printed nothing there."""

    json_errors = False
    """Set by :func:`main` when ``--json`` is among the arguments."""

    def error(self, message: str) -> NoReturn:
        if self.json_errors:  # also for an unknown flag, which the top parser reports
            from lockd.commands import print_json_error

            print_json_error(message, EXIT_USAGE)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one flat table of subcommands
    """The argument parser, separate from main() so tests can inspect it."""
    from lockd import commands

    parser = _Parser(
        prog="lockd",
        description="Disk lease daemon and client.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 69 daemon unreachable, 75 lease busy; "
        "lockd run: 126 the command is not executable, 127 no such command; 130 interrupted, "
        "141 the reader of the output left.",
    )
    parser.add_argument("--version", action=_PrintVersion, help="print the build and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the daemon in the foreground",
        description="Run the daemon in the foreground. Flags override the configuration "
        "file. SIGTERM stops it (releasing nothing), SIGHUP re-reads the configuration "
        "(logging applies at once, other keys at the next re-exec, the paths only at a "
        "restart), SIGUSR1 re-executes it in place keeping every lock, socket and "
        "connection.",
    )
    serve.add_argument(
        "--config",
        help="TOML configuration file (env LOCKD_CONFIG; default, if it exists: "
        "/etc/lockd/lockd.toml for root, $XDG_CONFIG_HOME/lockd/lockd.toml otherwise)",
    )
    serve.add_argument("--socket", help="client socket path")
    serve.add_argument("--admin-socket", help="admin socket path")
    serve.add_argument("--lock-dir", help="directory of lockspaces (shared storage for hosts)")
    serve.add_argument("--journal-dir", help="local directory of the event journal")
    serve.add_argument("--pid-file", help="write (and lock) the daemon pid here")
    serve.add_argument(
        "--timeout",
        type=float,
        help="exit after this many seconds with no clients and no leases (default 0: never)",
    )
    serve.add_argument(
        "--journal-sync", choices=["none", "batch", "always"], help="journal durability"
    )
    serve.add_argument("--verbose", "-v", action="store_true", help="log at debug level")
    serve.add_argument(
        "--check-config", action="store_true", help="validate the configuration, print it, exit"
    )
    serve.add_argument("--handoff-fd", type=int, help=argparse.SUPPRESS)  # set by SIGUSR1 re-exec
    # Run by SIGUSR1 before it execs: read the configuration, import the daemon, say what
    # handoff this program reads, exit (lockd.reexec.check_target).
    serve.add_argument("--handoff-check", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=commands.cmd_serve)

    for name, func, text in (
        ("status", commands.cmd_status, "daemon version, uptime and counts"),
        ("lockspaces", commands.cmd_lockspaces, "list lockspaces"),
        ("clients", commands.cmd_clients, "list client connections"),
    ):
        p = sub.add_parser(name, help=text)
        _add_client_options(p)
        p.set_defaults(func=func)

    leases = sub.add_parser("leases", help="list held leases")
    _add_client_options(leases)
    leases.add_argument("--lockspace", help="only this lockspace")
    leases.set_defaults(func=commands.cmd_leases)

    log_level = sub.add_parser(
        "log-level", help="show or change the log level and filters (admin socket)"
    )
    _add_client_options(log_level, admin=True)
    log_level.add_argument("level", nargs="?", choices=["debug", "info", "warning", "error"])
    log_level.add_argument("--filters", help='e.g. "debug:actors.owners 3:lockd.server"')
    log_level.set_defaults(func=commands.cmd_log_level)

    metrics = sub.add_parser("metrics", help="Prometheus text metrics")
    _add_client_options(metrics)
    metrics.set_defaults(func=commands.cmd_metrics)

    disconnect = sub.add_parser(
        "disconnect", help="close a client connection (its owner's leases end as on disconnect)"
    )
    _add_client_options(disconnect, admin=True)
    disconnect.add_argument("client", type=int, metavar="ID", help="client id (see lockd clients)")
    disconnect.set_defaults(func=commands.cmd_disconnect)

    for name, func, text in (
        ("acquire", commands.cmd_acquire, "acquire leases for an existing process"),
        ("release", commands.cmd_release, "release leases of an existing process"),
    ):
        p = sub.add_parser(name, help=text)
        _add_client_options(p)
        p.add_argument(
            "--owner-pid", type=int, required=True, help="the process the lease protects"
        )
        p.add_argument("--name", help="owner name (default: pid-PID)")
        p.add_argument("--uuid", help="owner uuid (default: derived from pid and start time)")
        p.add_argument("--id", type=int, default=1, help="owner id (> 0)")
        commands.add_lease_arguments(p, acquire=name == "acquire")
        p.set_defaults(func=func)

    create_lockspace = sub.add_parser(
        "create-lockspace",
        help="create a lockspace (a directory in the lock directory)",
        description="Create a lockspace for explicit leases (libvirt's <lease> elements); "
        "one that exists already is kept. The disk lockspaces exist from the daemon's start.",
    )
    _add_client_options(create_lockspace)
    create_lockspace.add_argument("lockspace", metavar="NAME", help="the lockspace's name")
    create_lockspace.set_defaults(func=commands.cmd_create_lockspace)

    for name, func, text in (
        ("create-resource", commands.cmd_create_resource,
         "create a lease file for an explicit lease (one there already is kept)"),
        ("delete-resource", commands.cmd_delete_resource,
         "delete a lease file that nobody holds"),
    ):  # fmt: skip
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _add_client_options(p)
        p.add_argument(
            "lease",
            metavar="LOCKSPACE/RESOURCE",
            help="the lease, as --lease names it (a mode word after it changes nothing)",
        )
        p.set_defaults(func=func)

    run = sub.add_parser(
        "run",
        help="acquire leases, then exec a command holding them",
        description="Acquire the leases (all or nothing), restrict the connection and exec "
        "CMD with it: the leases last exactly as long as CMD. A busy lease exits 75.",
    )
    _add_client_options(run)
    run.add_argument("--name", required=True, help="owner name (e.g. the VM name)")
    run.add_argument("--uuid", help="owner uuid (default: random)")
    run.add_argument("--id", type=int, default=1, help="owner id (> 0)")
    commands.add_lease_arguments(run, acquire=True)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    run.set_defaults(func=commands.cmd_run)

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
    events.add_argument(
        "--journal-dir",
        help="the daemon's journal directory (default: journal_dir of $LOCKD_CONFIG or the "
        "default configuration file, else the per-user default)",
    )
    events.add_argument(
        "--since",
        type=_parse_since,
        default=(1, 0.0),
        metavar="SEQ|TIME",
        help="first sequence number, or an ISO 8601 time",
    )
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--type", action="append", help="only this event type (repeatable)")
    events.add_argument("--lockspace", type=_lockspace_filter, help="only events of this lockspace")
    events.add_argument(
        "--resource",
        type=_resource_filter,
        help="only events of this resource (a lease name: see lockd lease-name)",
    )
    events.add_argument(
        "--owner", type=_owner_filter, help="only events of this owner (name, uuid or pid)"
    )
    events.add_argument(
        "--conn",
        type=_conn_filter,
        metavar="ID",
        help="only events of this client connection: its connection-opened and the "
        "changes it made (ids count from 1 again at each start)",
    )
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(func=_cmd_events)

    check = sub.add_parser(
        "journal-check",
        help="check the journal for damage; --repair cuts it at the damage (daemon stopped)",
    )
    check.add_argument(
        "--journal-dir",
        help="the journal directory (default: journal_dir of $LOCKD_CONFIG or the default "
        "configuration file, else the per-user default)",
    )
    check.add_argument(
        "--repair",
        action="store_true",
        help="truncate at the last good record; damaged parts are kept as *.damaged-* files",
    )
    check.set_defaults(func=_cmd_journal_check)

    verify = sub.add_parser(
        "verify",
        help="check that the daemons' leases are the kernel's locks and their journals'",
        description="For crash tests: asks each daemon (--socket, repeatable for daemons "
        "sharing a lock directory) what it holds, and checks that every lease is locked in "
        "the kernel in its mode, that no exclusive lease has two holders, that no lease file "
        "is locked that no daemon reports, and that each daemon's journal (the one its status "
        "names, or its --journal-dir) replays to what it reports. Takes no lock; run it "
        "while no request is in flight. Exit 0 when all holds, 1 with the findings.",
    )
    verify.add_argument(
        "--socket",
        action="append",
        help="a daemon's socket (repeatable; default: env LOCKD_SOCKET, else the per-user one)",
    )
    verify.add_argument(
        "--journal-dir",
        action="append",
        help="that daemon's journal directory (repeatable, one per --socket, in order; "
        "default: the one its status names)",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=commands.cmd_verify)

    bench = sub.add_parser(
        "bench",
        help="measure acquire+release pairs: on a daemon of its own, or --socket's",
        description="Measures acquire+release pairs on a daemon it starts on temp paths, or "
        "with --socket (or LOCKD_SOCKET) on that running daemon, whose journal then gets "
        "the benchmark's events and whose lock dir a lockd.bench lockspace.",
    )
    _add_client_options(
        bench,
        socket_help="a running daemon's socket to measure (env LOCKD_SOCKET); without "
        "either, a daemon of the benchmark's own on temp paths",
    )
    bench.add_argument("--ops", type=_at_least(1), default=2000, help="sequential pairs")
    bench.add_argument(
        "--concurrency",
        default="1,4,16",
        help="comma-separated connection counts for the concurrent runs ('' to skip)",
    )
    bench.add_argument("--tp-ops", type=_at_least(1), default=8000, help="pairs per concurrent run")
    bench.add_argument("--warmup", type=_at_least(0), default=200, help="pairs before measuring")
    bench.add_argument(
        "--scenarios",
        default="sequential,concurrent",
        help="comma-separated: sequential, concurrent, shared, many-owners, recovery "
        "(recovery starts, SIGKILLs and restarts a daemon of its own on temp paths)",
    )
    bench.add_argument(
        "--owners",
        type=_at_least(1),
        default=256,
        help="many-owners: processes holding 4 leases each",
    )
    bench.add_argument(
        "--recovery-leases", type=int, default=1024, help="recovery: leases held at the crash"
    )
    bench.add_argument(
        "--recovery-owners", type=int, default=64, help="recovery: live processes holding them"
    )
    bench.add_argument(
        "--recovery-events", type=int, default=20000, help="recovery: events of history"
    )
    bench.set_defaults(func=commands.cmd_bench)
    return parser


def _std_fds_open() -> None:
    """Open fds 0-2 on /dev/null where they are closed (``lockd run ... >&-``).

    Otherwise the first file or socket opened takes the number: the daemon connection
    became fd 1, and the command ``lockd run`` execs wrote its output into the daemon's
    socket, which took it for a broken client, closed the connection and fenced the
    command. Daemons have long done the same (``daemon(3)``).
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free number: this one; inherited, as a standard fd is.
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)
    if sys.stdout is None:  # Python found fd 1 closed at start
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - as stdout


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lockd`` console script."""
    from lockd import commands

    _std_fds_open()
    words = list(sys.argv[1:] if argv is None else argv)
    # Before a "--": what follows is lockd run's command's (`-- jq --json`), not ours.
    _Parser.json_errors = "--json" in words[: words.index("--") if "--" in words else None]
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        if not commands.reader_gone():
            raise
        return commands.EXIT_PIPE
    except KeyboardInterrupt:
        # Ctrl-C, e.g. during --wait: the shell's convention, without a traceback. An
        # acquire still in flight ends with the connection (rolled back by the daemon).
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    return result


EXIT_INTERRUPTED = 128 + signal.SIGINT
"""Exit status after Ctrl-C, as a shell reports a command SIGINT ended (130)."""


if __name__ == "__main__":
    sys.exit(main())
