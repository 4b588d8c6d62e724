"""Subcommands that talk to the daemon, and ``lockd serve`` itself.

Exit codes are part of the interface (scripts and VM managers branch on
them): 0 ok, 1 error, 2 usage, 69 daemon unreachable (EX_UNAVAILABLE),
75 lease busy (EX_TEMPFAIL, "try again later"); for ``lockd run`` 126 the command
is not executable or would not run, 127 no such command; 130 interrupted, 141 the
reader of the output left (README.md, operations.md "Errors").
"""

from __future__ import annotations

import argparse
import datetime
import enum
import errno
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, NoReturn

import attrs

from lockd import autospawn, logs, procs
from lockd.config import (
    Config,
    ConfigError,
    UnsafePathError,
    admin_socket_beside,
    default_admin_socket,
    default_socket,
    secure_runtime_dir,
)
from protocol.client import Client, ConnectionLostError, RemoteError, unreachable
from protocol.messages import MAX_WAIT_SECONDS, once_key
from protocol.names import (
    CONTROL_CHARACTERS,
    FILES_LOCKSPACE,
    InvalidNameError,
    check_lockspace_name,
    check_resource_name,
    lease_name_for_path,
    printable,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_BUSY = 75
EXIT_NEEDS_OPERATOR = 78
"""``lockd serve``: start refused, the state on disk needs an operator (a damaged journal,
a journal or lock directory others control or lockd cannot write, ...): sysexits'
EX_CONFIG, "found in an unconfigured or misconfigured state", which systemctl shows as
``78/CONFIG``. lockd.service does not restart it (``RestartPreventExitStatus=``): a
restart meets the same refusal."""
EXIT_CANNOT_EXEC = 126
"""``lockd run``: the command is not executable, or its exec failed (as a shell says)."""
EXIT_NOT_FOUND = 127
"""``lockd run``: no such command (as a shell says)."""

OWNER_NAMESPACE = uuidlib.UUID("5c1b7e3e-6f1e-4d0a-9a8b-2f3c4d5e6f70")
"""Namespace of the owner uuids the CLI derives from (pid, start time)."""


class CommandError(Exception):
    """A failure already phrased for the user, with its exit code."""

    def __init__(
        self, message: str, code: int = EXIT_ERROR, remote: RemoteError | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.remote = remote
        """The daemon's error this rephrases (its code and details go to ``--json``)."""


EXIT_PIPE = 128 + signal.SIGPIPE
"""The reader of our output left (``lockd status | head -2``): what a shell reports for a
program killed by SIGPIPE, which Python ignores."""


def reader_gone() -> bool:
    """Whether standard output is a pipe nobody reads any more; then it is quietly
    pointed at /dev/null, so nothing more is written to it (nor fails at exit)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return gone


def json_ready(value: object) -> object:
    """CBOR values as JSON: 16-byte strings (uuids) as uuids, other bytes as hex."""
    if isinstance(value, bytes):
        return str(uuidlib.UUID(bytes=value)) if len(value) == 16 else value.hex()
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


def _fail(args: argparse.Namespace, exc: Exception) -> int:
    name = f"lockd {args.command}"
    if isinstance(exc, BrokenPipeError) and reader_gone():
        return EXIT_PIPE
    remote = exc if isinstance(exc, RemoteError) else getattr(exc, "remote", None)
    if isinstance(exc, RemoteError):
        message, shown = exc.message, f"{exc.code}: {exc.message}"
        # invalid-argument: what was typed (a name, a --wait), found wrong by the daemon
        # rather than here; a usage error all the same.
        status = {"busy": EXIT_BUSY, "invalid-argument": EXIT_USAGE}.get(exc.code, EXIT_ERROR)
    else:
        message = shown = str(exc)
        status = exc.code if isinstance(exc, CommandError) else EXIT_ERROR
    if remote is not None:
        # The daemon's words carry names other clients chose (a busy lease's holder):
        # escaped like every name lockd prints, or a right-to-left override in one
        # turns the rest of the line around on the operator's terminal.
        shown = printable(shown)
    print(f"{name}: {shown}", file=sys.stderr)
    if getattr(args, "json", False):
        # A script reading --json gets the failure as JSON too, not an empty stdout:
        # the daemon's error code when there is one (busy, not-held, ...), and the
        # holders of a busy lease.
        details = json_ready(remote.details) if remote is not None and remote.details else None
        print_json_error(message, status, None if remote is None else remote.code, details)
    return status


def print_json_error(
    message: str, status: int, code: str | None = None, details: Any = None
) -> None:
    """A failure on stdout for ``--json``: ``{"error": {code, message, exit, ? details}}``
    (README), the same from every command and from a usage error."""
    error: dict[str, Any] = {"code": code, "message": message, "exit": status}
    if details is not None:
        error["details"] = details
    print(json.dumps({"error": error}), flush=True)


@contextmanager
def _connect(
    path: str | None, name: str, *, wait: float = 0.0, spawn: bool = False, admin: bool = False
) -> Iterator[Client]:
    """A client of the daemon at ``path`` (the default socket if None); ``admin``: it is
    an admin socket, which the journal's holder does not name (see :func:`_unreachable`)."""
    path = path or default_socket()
    try:
        secure_runtime_dir(path, create=False)  # a socket planted by another user: refused
    except UnsafePathError as exc:
        raise CommandError(str(exc), EXIT_UNAVAILABLE) from None

    def attempt() -> Client:
        try:
            return Client(path, name=name, timeout=30.0 + wait)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if not (spawn and autospawn.wanted()):
                if spawn and os.environ.get("LOCKD_AUTOSPAWN") == "0":
                    why = _unreachable(path, exc, admin=admin)
                    raise CommandError(
                        f"cannot reach lockd: {why}; LOCKD_AUTOSPAWN=0 keeps one from being "
                        "started",
                        EXIT_UNAVAILABLE,
                    ) from None
                raise
            try:
                autospawn.spawn(path)
            except autospawn.SpawnFailed:
                raise
            except OSError as exc:  # its runtime directory, its log, the exec
                raise CommandError(
                    f"cannot start lockd for {path}: {exc}", EXIT_UNAVAILABLE
                ) from None
            return Client(path, name=name, timeout=30.0 + wait)

    try:
        try:
            client = attempt()
        except ConnectionLostError:
            # Closed before its hello was answered: a daemon killed as it accepted (its
            # exit closes the listening socket, then the rest). Asked again, the socket
            # is refused (a daemon is started on demand) or queued for socket
            # activation's next, as the plugin's connector does.
            client = attempt()
    except autospawn.SpawnFailed as exc:
        raise CommandError(str(exc), EXIT_UNAVAILABLE) from None
    except ConnectionLostError as exc:
        raise CommandError(
            f"lockd at {path} closed the connection: {exc}", EXIT_UNAVAILABLE
        ) from None
    except OSError as exc:
        raise CommandError(
            f"cannot reach lockd: {_unreachable(path, exc, admin=admin)}", EXIT_UNAVAILABLE
        ) from None
    with client:
        yield client


def _unreachable(path: str, exc: OSError, *, admin: bool) -> str:
    """:func:`protocol.client.unreachable`, but for a socket nothing listens on while the
    user's lockd serves another (started with another ``XDG_RUNTIME_DIR``, or
    ``LOCKD_SOCKET`` mistyped): that one is named, with how to reach it, not "is `lockd
    serve` running?"."""
    if not admin and isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        elsewhere = autospawn.served_elsewhere(path)
        if elsewhere is not None:
            return f"{exc.strerror}: {path}; {elsewhere}"
    return unreachable(path, exc)


def _admin_socket(args: argparse.Namespace) -> str:
    """``--admin-socket``, else the admin socket beside ``--socket``, else the default."""
    if args.admin_socket:
        return str(args.admin_socket)
    if args.socket:
        return admin_socket_beside(args.socket)
    return default_admin_socket()


def _run(args: argparse.Namespace, body: Callable[[], int]) -> int:
    try:
        return body()
    except (CommandError, RemoteError, ConnectionLostError, OSError) as exc:
        return _fail(args, exc)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=None, sort_keys=False))


# -- serve -------------------------------------------------------------------------------
def _config_line(name: str, value: Any) -> str:
    """A setting as ``--check-config`` prints it: a TOML line the file could hold as it
    is (``"none"`` for a policy, not ``<SyncPolicy.NONE: 'none'>``; ``[lockspaces]`` as
    an inline table), so the output pasted into a file is that configuration. TOML has
    no null: an unset setting is a comment."""
    if value is None:
        return f"# {name} is not set"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, frozenset):
        value = sorted(value)
    try:
        return f"{name} = {_toml(value)}"
    except UnicodeError:  # a path given as a flag in bytes that are no UTF-8
        return f"# {name} is not UTF-8, which TOML cannot hold: {value!r}"


def _toml(value: Any) -> str:
    """``value`` (text, a number, a boolean, or a list or table of them) as TOML."""
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Mapping):
        entries = ", ".join(f"{_toml_string(k)} = {_toml(v)}" for k, v in value.items())
        return f"{{ {entries} }}" if entries else "{}"
    if isinstance(value, list | tuple):
        return f"[{', '.join(_toml(v) for v in value)}]"
    return json.dumps(value)  # a number or boolean: JSON's is TOML's


def _toml_string(text: str) -> str:
    """A TOML basic string, in ASCII. Not JSON's: it writes a character beyond U+FFFF as
    a surrogate pair (``"\\ud83d\\ude00"``) and DEL raw, neither of which TOML reads.
    Raises UnicodeError for a lone surrogate (bytes that were no UTF-8)."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif 0xD800 <= code <= 0xDFFF:
            raise UnicodeError(f"{text!r} is not UTF-8")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(f"\\U{code:08X}")
    return '"' + "".join(out) + '"'


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    from actors import faults
    from lockd import config as config_mod
    from lockd.daemon import JournalInUseError, PidFileLockedError, StartRefusedError, serve

    overrides = {
        "socket": args.socket,
        "admin_socket": args.admin_socket,
        "lock_dir": args.lock_dir,
        "journal_dir": args.journal_dir,
        "pid_file": args.pid_file,
        "timeout": args.timeout,
        "journal_sync": args.journal_sync,
        "log_level": "debug" if args.verbose else None,
    }
    try:
        overrides = {k: (os.path.abspath(v) if k.endswith(("socket", "_dir", "_file")) and v else v)
                     for k, v in overrides.items()}  # fmt: skip
        config = config_mod.load(args.config or os.environ.get("LOCKD_CONFIG"), overrides)
    except ConfigError as exc:
        _serve_failed(str(exc))
        return EXIT_USAGE
    if faults.SPEC_ERROR is not None:
        _serve_failed(faults.SPEC_ERROR)
        return EXIT_USAGE
    if args.check_config:
        print(f"# configuration ok ({config.config_file or 'defaults and flags only'})")
        for field in attrs.fields(type(config)):
            if field.name != "config_file":  # in the line above; not a setting
                print(_config_line(field.name, getattr(config, field.name)))
        # What the start warns of, shown here too: the check passed a typo in silence.
        for name in logs.unknown_modules(logs.parse_filters(config.log_filters)):
            warning = f"log_filters: lockd has no module {name!r}, so its filter logs nothing"
            print(f"lockd serve: warning: {warning} (a typo? see docs/configuration.md)",
                  file=sys.stderr)  # fmt: skip
        return EXIT_OK
    if args.handoff_check:
        import lockd.daemon  # a broken install fails here, not after the exec
        from lockd.journal_file import check_writable
        from lockd.reexec import check_output

        try:
            # What this program refuses at start that an older one served from (or a
            # chmod since): refused after the exec, it ended the daemon, every lock too.
            if os.path.isdir(config.journal_dir):
                lockd.daemon.check_journal_dir(config.journal_dir)
            # A lock directory this uid cannot write (chowned since): refused too.
            if os.path.isdir(config.lock_dir):
                lockd.daemon.refuse_unwritable_lock_dir(config.lock_dir)
        except OSError as exc:
            _serve_failed(str(exc))
            return EXIT_ERROR
        try:
            # A journal whose filesystem went read-only or fails (EIO) since the start:
            # the new program could not open it, and exited holding every lock.
            if os.path.isdir(config.journal_dir):
                check_writable(config.journal_dir)
        except OSError as exc:
            _serve_failed(_startup_error(exc, config))
            return EXIT_ERROR
        print(check_output(config))
        return EXIT_OK

    logs.configure(config.log_level, config.log_filters, config.log_outputs)
    logs.log_uncaught()
    try:
        return serve(
            config,
            frozenset(k for k, v in overrides.items() if v is not None),
            handoff_fd=args.handoff_fd,
        )
    except StartRefusedError as refused:
        why = refused.refusal
        _serve_failed(_startup_error(why, config) if isinstance(why, OSError) else str(why))
        return EXIT_NEEDS_OPERATOR
    except (JournalInUseError, PidFileLockedError) as exc:  # passes once that lockd exits
        _serve_failed(str(exc))
        return EXIT_ERROR
    except OSError as exc:
        _serve_failed(_startup_error(exc, config))
        return EXIT_ERROR


def _serve_failed(text: str) -> None:
    """Why ``lockd serve`` cannot start, on stderr: at priority error (``<3>``) when that
    is the journal (lockd.service), which took an unmarked line for info."""
    from lockd.logs import stderr_is_journal

    prefix = "<3>" if stderr_is_journal() else ""
    lines = f"lockd serve: {text}".splitlines()
    print("\n".join(prefix + line for line in lines), file=sys.stderr)


def _startup_error(exc: OSError, config: Config) -> str:
    """Words for an OSError that stopped ``lockd serve``: the setting whose path it is
    about (``lock_dir /srv/x: not a directory``), not only "File exists (/srv/x)"."""
    from lockd.reexec import PATH_KEYS

    # Our own errors carry their words in strerror ("[Errno 98] ..." says nothing
    # more); the system's name the file they are about.
    where = f" ({exc.filename})" if exc.filename else ""
    text = f"{exc.strerror}{where}" if exc.strerror and not exc.filename2 else str(exc)
    name = exc.filename if isinstance(exc.filename, str) and not exc.filename2 else None
    if name is None:
        return text
    paths = [(key, getattr(config, key)) for key in PATH_KEYS if getattr(config, key)]
    # The setting that is the path itself first, then one the path is in, then one it is
    # on the way to: `pid_file /run/lockd`, a directory, was named as the socket in it.
    matches = (
        [(key, path) for key, path in paths if path == name]
        + [(key, path) for key, path in paths if name.startswith(path + os.sep)]
        + [(key, path) for key, path in paths if path.startswith(name + os.sep)]
    )
    for key, path in matches[:1]:
        if isinstance(exc, FileExistsError | NotADirectoryError):
            why = "it, or a directory on the way to it, is not a directory"
        else:
            why = exc.strerror or str(exc)
        inside = f" ({name})" if name != path else ""
        return f"{key} {path}: {why}{inside}"
    return text


# -- queries -------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    """Print daemon status."""

    def body() -> int:
        with _connect(args.socket, "lockd-status") as client:
            status = client.call("status")
        if args.json:
            fences = [{**f, "owner": json_ready(f["owner"])} for f in status.get("fencing", [])]
            _print_json({**status, "fencing": fences} if "fencing" in status else status)
        else:
            fencing = status.pop("fencing", None)  # None: a daemon older than the field
            timeline = status.get("journal")
            if isinstance(timeline, dict):  # words, not a dict's repr: "{'id': '3f…', ...}"
                words = f"id {timeline.get('id')}, seqs from {timeline.get('from')}"
                status["journal"] = f"{words}, in {timeline['dir']}" if "dir" in timeline else words
            trouble = status.get("journal_error")
            if isinstance(trouble, dict):
                since = _when(float(trouble.get("since", 0)))
                status["journal_error"] = (
                    f"{trouble.get('message')} (since {since}, {trouble.get('refused')} writes "
                    "refused: nothing is granted or released until it is written again)"
                )
            for key, value in status.items():
                print(f"{key}: {value}")
            if fencing is not None:
                print(f"fencing: {len(fencing)}")
                for fence in fencing:
                    print(f"  {_fence_line(fence)}")
        return EXIT_OK

    return _run(args, body)


def _fence_line(fence: dict[str, Any]) -> str:
    """One fence in progress: who, what comes next and when, why."""
    owner = fence["owner"]
    who = f"{printable(owner['name'])} (pid {owner['pid']})"
    if fence.get("next_signal") is None:
        step = "SIGKILL sent, waiting for it to exit"
    else:
        step = f"{fence['next_signal']} in {fence['due_in_s']:.1f} s"
    return f"{who}: {step}: {fence['reason']}"


def cmd_lockspaces(args: argparse.Namespace) -> int:
    """List lockspaces."""

    def body() -> int:
        with _connect(args.socket, "lockd-lockspaces") as client:
            rows = client.call("list-lockspaces")["lockspaces"]
        if args.json:
            _print_json(rows)
        else:
            for row in rows:
                print(f"{row['name']}  leases={row['leases']}  {row['path']}")
        return EXIT_OK

    return _run(args, body)


def _holds_text(owner: dict[str, Any]) -> str:
    """``, held 2 times`` for an owner holding a shared lease more than once, else empty."""
    holds = owner.get("holds", 1)
    return f", held {holds} times" if holds > 1 else ""


def cmd_leases(args: argparse.Namespace) -> int:
    """List held leases with their owners."""

    def body() -> int:
        extra = {"lockspace": args.lockspace} if args.lockspace else {}
        with _connect(args.socket, "lockd-leases") as client:
            rows = client.call("list-leases", **extra)["leases"]
            if not rows and args.lockspace:
                # The daemon lists nothing for a lockspace it does not serve: a typo
                # would read as "nothing held there".
                known = client.call("list-lockspaces")["lockspaces"]
                if args.lockspace not in {ls["name"] for ls in known}:
                    raise CommandError(f"no lockspace {args.lockspace!r} (see lockd lockspaces)")
        if args.json:
            _print_json([{**row, "owners": [json_ready(o) for o in row["owners"]]} for row in rows])
            return EXIT_OK
        for row in rows:
            owners = ", ".join(
                f"{printable(o['name'])} (uuid {json_ready(o['uuid'])}, pid {o['pid']}, "
                f"since {_when(o['since'])}{_holds_text(o)})"
                for o in row["owners"]
            )
            print(f"{row['lockspace']}/{row['resource']}  {row['mode']}  {owners}")
        return EXIT_OK

    return _run(args, body)


def cmd_clients(args: argparse.Namespace) -> int:
    """List client connections."""

    def body() -> int:
        with _connect(args.socket, "lockd-clients") as client:
            rows = client.call("list-clients")["clients"]
        if args.json:
            _print_json(
                [{**r, "owner": json_ready(r["owner"])} if "owner" in r else r for r in rows]
            )
            return EXIT_OK
        for r in rows:
            owner = r.get("owner")
            who = (
                f"owner {printable(owner['name'])} (pid {owner['pid']}), "
                f"{r.get('leases', 0)} lease(s)"
                if owner
                else "no owner"
            )
            flags = [
                flag
                for flag, on in (
                    ("restricted", r["restricted"]),
                    ("admin", r["admin"]),
                    ("subscribed", r.get("subscribed")),  # to events: an auditor
                )
                if on
            ]
            # After a semicolon, apart from the lease count: "0 lease(s) restricted" read
            # as "no lease is restricted".
            marks = f"; {', '.join(flags)}" if flags else ""
            name = f"  {printable(r['name'])}" if r.get("name") else ""  # from its hello
            print(
                f"{r['id']}  pid={r['pid']} uid={r['uid']}{name}  {who}{marks}  "
                f"since {_when(r['connected_since'])}"
            )
        return EXIT_OK

    return _run(args, body)


def cmd_disconnect(args: argparse.Namespace) -> int:
    """Close a client connection through the admin socket."""

    def body() -> int:
        with _connect(_admin_socket(args), "lockd-disconnect", admin=True) as client:
            result = client.call("disconnect", client=args.client)
        if args.json:
            _print_json(result)  # the daemon's answer, as every --json prints it
        else:
            print(f"client {args.client} disconnected")
        return EXIT_OK

    return _run(args, body)


def cmd_log_level(args: argparse.Namespace) -> int:
    """Show or change logging on the admin socket."""

    def body() -> int:
        extra: dict[str, str] = {}
        if args.level:
            extra["level"] = args.level
        if args.filters is not None:
            extra["filters"] = args.filters
        with _connect(_admin_socket(args), "lockd-log-level", admin=True) as client:
            result = client.call("set-log", **extra)
        if args.json:
            _print_json(result)
        else:
            print(logs.describe(result))
        return EXIT_OK

    return _run(args, body)


def cmd_verify(args: argparse.Namespace) -> int:
    """Check daemons' leases against the kernel's locks and their journals (a crash
    test's invariants, from outside)."""
    from lockd.verify import DaemonView, verify

    sockets: list[str] = args.socket or [default_socket()]
    journals: list[str | None] = args.journal_dir or [None] * len(sockets)

    def body() -> int:
        if len(journals) != len(sockets):  # in body: with --json, said as JSON too
            raise CommandError(
                f"{len(sockets)} --socket and {len(journals)} --journal-dir: give each "
                "daemon's journal directory after its socket, or none",
                EXIT_USAGE,
            )
        views = []
        for path, journal in zip(sockets, journals, strict=True):
            with _connect(path, "lockd-verify") as client:
                rows = client.call("list-lockspaces")["lockspaces"]
                leases = client.call("list-leases")["leases"]
                status = client.call("status")
            lockspaces = {row["name"]: row["path"] for row in rows}
            journal_dir = os.path.abspath(journal) if journal else _told_journal(status)
            views.append(DaemonView(path, lockspaces, leases, status["journal_seq"], journal_dir))
        checked, findings = verify(views)
        if args.json:
            _print_json(
                {
                    "ok": not findings,
                    "checked": checked,
                    "daemons": [{"socket": v.socket, "journal_dir": v.journal_dir} for v in views],
                    "findings": [attrs.asdict(f) for f in findings],
                }
            )
        else:
            for f in findings:
                where = f"{f.lockspace}/{f.resource}: " if f.resource else ""
                print(f"{f.check}: {where}{f.message}")
            compared = sum(1 for v in views if v.journal_dir)
            against = (
                "kernel and journals"
                if compared == len(views)
                else f"kernel and {compared} of {len(views)} journals (give --journal-dir)"
                if compared
                else "kernel (no journal readable here: give --journal-dir)"
            )
            summary = f"{checked} lease files held by {len(views)} daemon(s), against the {against}"
            if findings:
                print(f"lockd verify: {len(findings)} finding(s); {summary}", file=sys.stderr)
            else:
                print(f"lockd verify: ok: {summary}")
        return EXIT_ERROR if findings else EXIT_OK

    return _run(args, body)


def _told_journal(status: dict[str, Any]) -> str | None:
    """The journal directory a daemon's ``status`` names, if this process can read it
    (``verify`` by a user against root's daemon cannot: then only the kernel is
    compared, as it says, rather than a finding that is about the reader)."""
    timeline = status.get("journal")
    where = timeline.get("dir") if isinstance(timeline, dict) else None
    if isinstance(where, str) and os.access(where, os.R_OK | os.X_OK):
        return where
    return None


def cmd_metrics(args: argparse.Namespace) -> int:
    """Print metrics in the Prometheus text format."""

    def body() -> int:
        with _connect(args.socket, "lockd-metrics") as client:
            text = client.call("metrics")["text"]
        if args.json:
            _print_json({"text": text})  # the daemon's answer, as every --json prints it
        else:
            print(text, end="")
        return EXIT_OK

    return _run(args, body)


# -- leases ----------------------------------------------------------------------------------
def add_lease_arguments(parser: argparse.ArgumentParser, *, acquire: bool) -> None:
    """--disk / --lease (and --wait, --no-autocreate or --all) for acquire, release and run."""
    parser.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="PATH[:exclusive|:shared|:shareable]",
        help=f"a disk image or device: lease in {FILES_LOCKSPACE} named by SHA-256 of the path; "
        "exclusive unless :shared (or libvirt's :shareable); :readonly is refused (no lease); "
        "a path ending in :WORD takes an explicit mode after it (PATH:WORD:exclusive)",
    )
    parser.add_argument(
        "--lease",
        action="append",
        default=[],
        metavar="LOCKSPACE/RESOURCE[:exclusive|:shared]",
        help="an explicit lease, exclusive unless :shared",
    )
    if acquire:
        parser.add_argument(
            "--wait",
            type=_wait_seconds,
            default=0.0,
            metavar="SECONDS",
            help=f"wait for busy leases, up to {MAX_WAIT_SECONDS:g} seconds",
        )
        parser.add_argument(
            "--no-autocreate",
            action="store_true",
            help="require existing lease files (default: create them, delete on last release)",
        )
    else:
        parser.add_argument("--all", action="store_true", help="release every lease of the owner")
        parser.add_argument(
            "--request-id",
            type=_request_id,
            metavar="ID",
            help="names this release: repeated with the same ID (after a lost reply), "
            "lockd applies it at most once",
        )


def _request_id(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _wait_seconds(text: str) -> float:
    """``--wait``: seconds, as the daemon takes them. ``nan`` and ``inf`` (which ``float``
    reads) ended in a traceback from the socket's timeout; checked here, a wait out of
    range is a usage error before any daemon is asked (or started)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise argparse.ArgumentTypeError(
            f"takes seconds from 0 to {MAX_WAIT_SECONDS:g}, not {text!r}"
        )
    return seconds


DISK_MODES: Mapping[str, str] = {
    "exclusive": "exclusive",
    "shared": "shared",
    "shareable": "shared",
    "readonly": "readonly",
}
"""The mode words of ``--disk PATH[:MODE]`` in ``lockd`` and ``lockd-lock-driver``, and what
each means: ``shareable`` and ``readonly`` are libvirt's (``<shareable/>``, ``<readonly/>``).
A read-only disk gets no lease (``lockd.plugin.disk_lease``), so ``lockd`` refuses it."""

LEASE_MODES: Mapping[str, str] = {"exclusive": "exclusive", "shared": "shared"}
"""The mode words of ``--lease LOCKSPACE/RESOURCE[:MODE]`` in both tools."""

READONLY_REFUSED = (
    "a read-only disk gets no lease (as in libvirt's lockd driver and lockd-lock-driver), "
    "so there is nothing to hold: leave the disk out, or give :shared for a shared lease, "
    "which keeps exclusive holders out while it is in use"
)
"""Why ``lockd acquire/release/run --disk PATH:readonly`` is refused."""

CLI_DISK_MODES: Mapping[str, str] = {
    word: mode for word, mode in DISK_MODES.items() if mode != "readonly"
}
"""What ``lockd acquire/release/run --disk`` take: :data:`DISK_MODES` but ``readonly``."""

_MODE_LIKE = re.compile(r"(?:[^\W\d]|-)*")
"""Text after a name's last colon that reads as a mode word: letters (also ``-``, ``_``,
as in ``read-only``), or nothing at all (``"$DISK:$MODE"`` with ``MODE`` unset)."""


class ModeError(ValueError):
    """A ``NAME:MODE`` whose mode is not one the option accepts."""


def split_mode(
    option: str,
    spec: str,
    modes: Mapping[str, str],
    *,
    what: str = "name",
    refused: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """``spec`` (``NAME[:MODE]``) as its name and what its mode means (see :data:`DISK_MODES`);
    no mode means ``exclusive``.

    Only the text after the last colon can be a mode. One that reads as a mode word
    (see ``_MODE_LIKE``) but is not in ``modes`` is refused, never taken as part of the
    name: ``/vm/base.img:shareable`` would otherwise lease a path nobody uses and leave
    the disk unprotected. ``refused`` maps a known word to why this tool refuses it;
    ``what`` is what the message calls the name (``path``).
    Any other colon is part of the name (``/data/vm:1/disk.img``, ``/x/a:1.img``); a
    name that does end in ``:WORD`` is given with its mode after it (``/x/a:b:exclusive``).
    """
    name, colon, word = spec.rpartition(":")
    if not colon:
        return spec, "exclusive"
    if word in modes:
        return name, modes[word]
    escape = (
        f"A {what} that really ends in ':{word}' is given with an explicit mode after it: "
        f"{spec + ':exclusive'!r} (or ':shared')"
    )
    if refused and word in refused:
        raise ModeError(f"{option} {spec!r}: {refused[word]}. {escape}")
    if _MODE_LIKE.fullmatch(word) is None:
        return spec, "exclusive"
    listing = ", ".join(f":{mode}" for mode in modes)
    problem = f"{':' + word!r} is not a mode" if word else "no mode follows its last ':'"
    raise ModeError(
        f"{option} {spec!r}: {problem} (the modes are {listing}; none means exclusive). {escape}"
    )


def parse_leases(args: argparse.Namespace) -> list[tuple[dict[str, Any], str]]:
    """The requested leases as wire maps, each with the label to show the user."""
    out: list[tuple[dict[str, Any], str]] = []
    for spec in args.disk:
        try:
            path, mode = split_mode(
                "--disk", spec, CLI_DISK_MODES, what="path", refused={"readonly": READONLY_REFUSED}
            )
            resource = lease_name_for_path(path)
        except (ModeError, InvalidNameError) as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        shared = mode == "shared"
        lease = {"lockspace": FILES_LOCKSPACE, "resource": resource, "shared": shared}
        out.append((lease, f"disk {path}"))
    for spec in args.lease:
        lockspace, resource, mode = split_lease("--lease", spec)
        shared = mode == "shared"
        out.append(
            (
                {"lockspace": lockspace, "resource": resource, "shared": shared},
                f"lease {lockspace}/{resource}",
            )
        )
    return out


def split_lease(option: str, spec: str) -> tuple[str, str, str]:
    """``spec`` (``LOCKSPACE/RESOURCE[:MODE]``, as ``--lease`` takes it) as its lockspace,
    resource and mode; a usage error if it is not that."""
    try:
        text, mode = split_mode(option, spec, LEASE_MODES, what="lease name")
    except ModeError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    lockspace, sep, resource = text.partition("/")
    if not sep or not lockspace or not resource:
        raise CommandError(f"{option} takes LOCKSPACE/RESOURCE, not {spec!r}", EXIT_USAGE)
    return lockspace, resource, mode


def _owner_map(pid: int, name: str | None, uuid_text: str | None, owner_id: int) -> dict[str, Any]:
    if uuid_text:
        try:
            owner_uuid = uuidlib.UUID(uuid_text)
        except ValueError:
            raise CommandError(f"--uuid {uuid_text!r} is not a UUID", EXIT_USAGE) from None
    else:
        started = procs.start_time(pid)
        if started is None:
            raise CommandError(f"no process with pid {pid}")
        owner_uuid = uuidlib.uuid5(OWNER_NAMESPACE, f"{pid}:{started}")
    if owner_id < 1:
        raise CommandError("--id must be greater than 0", EXIT_USAGE)
    if name is not None and (not 1 <= _utf8_length(name) <= 255 or CONTROL_CHARACTERS.search(name)):
        # Checked here: the daemon would refuse it as the hello's client name first
        # ("hello: client must be ..."), or an empty one would become pid-PID unsaid.
        raise CommandError(
            f"--name must be 1-255 bytes of UTF-8 without control characters, not {name!r}",
            EXIT_USAGE,
        )
    return {"uuid": owner_uuid.bytes, "name": name or f"pid-{pid}", "id": owner_id, "pid": pid}


def _utf8_length(name: str) -> int:
    """Bytes ``name`` takes in UTF-8; 0 (refused) if it has none: an argument that is not
    UTF-8 (a name in another locale's encoding) comes as lone surrogates, which
    ``encode()`` raised on (a traceback, exit 1, instead of the usage error)."""
    try:
        return len(name.encode())
    except UnicodeEncodeError:
        return 0


def _label_of(exc: RemoteError, labels: dict[tuple[str, str], str]) -> str | None:
    """The user's name (``disk PATH``) of the lease the daemon's message is about.

    Whole words, as the plugin matches them: a substring would take ``ls/vm`` for
    ``ls/vm1``."""
    words = set(exc.message.split())
    for (lockspace, resource), label in labels.items():
        if f"{lockspace}/{resource}" in words:
            return label
    return None


def _busy_message(exc: RemoteError, labels: dict[tuple[str, str], str]) -> str:
    """Name the disk the user asked for, then who holds it."""
    label = _label_of(exc, labels)
    return f"{label} is busy: {exc.message}" if label else exc.message


def _leases_to_acquire(args: argparse.Namespace) -> list[tuple[dict[str, Any], str]]:
    """:func:`parse_leases`, at least one: read before connecting, so that a usage error
    is reported as one whether or not a daemon runs (and starts none)."""
    leases = parse_leases(args)
    if not leases:
        raise CommandError("name at least one --disk or --lease", EXIT_USAGE)
    return leases


def _acquire(
    client: Client,
    leases: list[tuple[dict[str, Any], str]],
    args: argparse.Namespace,
    owner: dict[str, Any],
) -> list[dict[str, Any]]:
    client.call("register", owner=owner)
    labels = {(lease["lockspace"], lease["resource"]): label for lease, label in leases}
    # A retry (after a timeout, or of a script) succeeds: what the owner holds already
    # in the mode asked is kept, not asked for again (the daemon would call it busy,
    # held by the owner itself), as the plugin does.
    held = {
        (lease["lockspace"], lease["resource"]): lease["mode"]
        for lease in client.call("inquire").get("leases", [])
    }
    wanted = [lease for lease, _ in leases]
    missing = [
        lease
        for lease in wanted
        if held.get((lease["lockspace"], lease["resource"]))
        != ("shared" if lease.get("shared") else "exclusive")
    ]
    if missing:
        try:
            client.call(
                "acquire", leases=missing, autocreate=not args.no_autocreate, wait=args.wait
            )
        except RemoteError as exc:
            if exc.code == "busy":
                raise CommandError(_busy_message(exc, labels), EXIT_BUSY, exc) from None
            raise
    return [
        {"lockspace": lease["lockspace"], "resource": lease["resource"],
         "mode": "shared" if lease.get("shared") else "exclusive"}
        for lease in wanted
    ]  # fmt: skip


def cmd_acquire(args: argparse.Namespace) -> int:
    """Acquire leases for an existing process; they end when it exits or releases them."""

    def body() -> int:
        owner = _owner_map(args.owner_pid, args.name, args.uuid, args.id)
        leases = _leases_to_acquire(args)
        with _connect(args.socket, "lockd-acquire", wait=args.wait, spawn=True) as client:
            granted = _acquire(client, leases, args, owner)
        if args.json:
            _print_json({"owner": json_ready(owner), "leases": granted})
        else:
            # The disk as given, then the lease it is (its name is a hash of the path).
            labels = {(lease["lockspace"], lease["resource"]): label for lease, label in leases}
            for lease in granted:
                name = f"{lease['lockspace']}/{lease['resource']}"
                label = labels[(lease["lockspace"], lease["resource"])]
                what = f"{label} ({name})" if label.startswith("disk ") else label
                print(f"acquired {what} {lease['mode']} for pid {args.owner_pid}")
        return EXIT_OK

    return _run(args, body)


def cmd_release(args: argparse.Namespace) -> int:
    """Release leases of an existing process."""

    def body() -> int:
        owner = _owner_map(args.owner_pid, args.name, args.uuid, args.id)
        leases = parse_leases(args)
        if leases and args.all:  # which one was meant is not for us to guess
            raise CommandError("give --disk/--lease or --all, not both", EXIT_USAGE)
        if not leases and not args.all:
            raise CommandError("name --disk/--lease to release, or --all", EXIT_USAGE)
        still: list[str] = []
        if args.request_id is not None and args.all:
            raise CommandError("--request-id names a release of --disk/--lease, not --all",
                               EXIT_USAGE)  # fmt: skip
        with _connect(args.socket, "lockd-release") as client:
            client.call("register", owner=owner)
            if args.all:
                result = client.call("release", all=True)
            else:
                refs = [
                    {"lockspace": le["lockspace"], "resource": le["resource"]} for le, _ in leases
                ]
                key = _release_key(client, args.request_id)
                try:
                    result = client.call("release", leases=refs, **key)
                except RemoteError as exc:
                    if exc.code != "not-held":
                        raise
                    labels = {(le["lockspace"], le["resource"]): label for le, label in leases}
                    label = _label_of(exc, labels)
                    if not label:
                        raise CommandError(exc.message, remote=exc) from None
                    lease = next(f"{ls}/{res}" for (ls, res), text in labels.items()
                                 if text == label)  # fmt: skip
                    # Not the daemon's message: it names the owner by this command's
                    # registration, pid-PID unless --name was given, not the owner's name.
                    raise CommandError(
                        f"{label} is not held by pid {args.owner_pid}"
                        + (f" (lease {lease})" if lease != label.removeprefix("lease ") else ""),
                        remote=exc,  # --json's code: not-held, the daemon's
                    ) from None
                if not args.json:
                    still = _still_held(client, leases, args.owner_pid)
        if args.json:
            _print_json(result)
        elif result.get("repeated"):
            print(
                f"released {result['released']} lease(s) of pid {args.owner_pid} already, by "
                f"the first release with request id {args.request_id!r}: nothing more"
            )
            for line in still:
                print(line)
        else:
            print(f"released {result['released']} lease(s) of pid {args.owner_pid}")
            for line in still:
                print(line)
        return EXIT_OK

    return _run(args, body)


def _release_key(client: Client, request_id: str | None) -> dict[str, bytes]:
    """The ``once`` argument of a release named ``request_id`` (none without one). A lockd
    that takes no keys is refused it: ignored, a repeat could end another hold."""
    if request_id is None:
        return {}
    if client.server.get("once") is not True:
        raise CommandError(
            "this lockd takes no request ids (a build before 2026-11-28): see what the "
            "process holds (lockd leases) and release without --request-id"
        )
    return {"once": once_key("release", request_id)}


def _still_held(client: Client, leases: list[tuple[dict[str, Any], str]], pid: int) -> list[str]:
    """What ``release`` left held: a shared lease the owner asked for more than once (a VM
    with one image on two devices) ends one hold per release, and "released 1 lease(s)"
    alone told an operator the disk was free."""
    holds = {
        (lease["lockspace"], lease["resource"]): lease.get("holds", 1)
        for lease in client.call("inquire").get("leases", [])
    }
    return [
        f"{label} is still held by pid {pid} ({n} more hold{'s' if n > 1 else ''}: a shared "
        f"lease asked for more than once ends one hold per release; --all ends every hold)"
        for lease, label in leases
        if (n := holds.get((lease["lockspace"], lease["resource"]), 0))
    ]


# -- lockspaces and lease files ----------------------------------------------------------------
def _checked(check: Callable[[str], str], name: str) -> str:
    """``name`` if ``check`` finds it valid; else a usage error before any daemon is asked."""
    try:
        return check(name)
    except InvalidNameError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def _lease_file_name(spec: str) -> tuple[str, str]:
    """``LOCKSPACE/RESOURCE`` of ``create-resource`` and ``delete-resource``: written as
    ``--lease`` takes it, so the same text names the same lease file (a mode word after it
    is allowed, and changes nothing: a lease file has no mode)."""
    lockspace, resource, _ = split_lease("the lease", spec)
    return _checked(check_lockspace_name, lockspace), _checked(check_resource_name, resource)


def cmd_create_lockspace(args: argparse.Namespace) -> int:
    """Create a lockspace (its directory in the lock directory); one there already is kept."""

    def body() -> int:
        name = _checked(check_lockspace_name, args.lockspace)
        with _connect(args.socket, "lockd-create-lockspace", spawn=True) as client:
            result = client.call("create-lockspace", lockspace=name)
        if args.json:
            _print_json(result)  # the daemon's answer, as every --json prints it
        elif result.get("created"):
            print(f"created lockspace {name}")
        else:
            print(f"lockspace {name} exists already")
        return EXIT_OK

    return _run(args, body)


def cmd_create_resource(args: argparse.Namespace) -> int:
    """Create a lease file, for an explicit lease (libvirt's ``<lease>``); one there
    already is kept."""
    return _lease_file_command(args, "create-resource", "lease file {} exists (created "
                               "unless it was already)", spawn=True)  # fmt: skip


def cmd_delete_resource(args: argparse.Namespace) -> int:
    """Delete a lease file nobody holds."""
    return _lease_file_command(args, "delete-resource", "deleted lease file {}", spawn=False)


def _lease_file_command(args: argparse.Namespace, op: str, done: str, *, spawn: bool) -> int:
    """``op`` on the lease file ``args.lease`` names; ``done`` says what happened to
    ``LOCKSPACE/RESOURCE``. Only a create starts a per-user daemon: a delete has
    nothing to do where none runs."""

    def body() -> int:
        lockspace, resource = _lease_file_name(args.lease)
        with _connect(args.socket, f"lockd-{op}", spawn=spawn) as client:
            result = client.call(op, lockspace=lockspace, resource=resource)
        if args.json:
            _print_json({"lockspace": lockspace, "resource": resource, **result})
        else:
            print(done.format(f"{lockspace}/{resource}"))
        return EXIT_OK

    return _run(args, body)


def cmd_run(args: argparse.Namespace) -> int:
    """Acquire, restrict, then exec the command with the connection open."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    # Through _fail, as every failure: with --json on stdout too (126 and 127 printed
    # nothing there, the codes a script branches on).
    if not cmd:
        return _fail(args, CommandError("give the command to run after --", EXIT_USAGE))
    program = shutil.which(cmd[0])
    if program is None:
        # Found out only after the leases were taken, the failed exec would close a
        # connection still holding them: the daemon would fence this very process.
        # A file that exists is not executable (mode, noexec mount), as a shell says.
        if _exists(cmd[0]):
            what = CommandError(f"cannot run {cmd[0]}: not executable", EXIT_CANNOT_EXEC)
        else:
            what = CommandError(f"cannot run {cmd[0]}: no such command", EXIT_NOT_FOUND)
        return _fail(args, what)

    def body() -> int:
        owner = _owner_map(os.getpid(), args.name, args.uuid or str(uuidlib.uuid4()), args.id)
        leases = _leases_to_acquire(args)
        path = args.socket or default_socket()
        with _connect(path, f"lockd-run {args.name}", wait=args.wait, spawn=True) as client:
            _acquire(client, leases, args, owner)
            client.call("restrict")
            fd = client.fileno()
            client.settimeout(None)  # the command inherits a blocking socket
            os.set_inheritable(fd, True)
            env = dict(os.environ, LOCKD_FD=str(fd), LOCKD_SOCKET=path)
            try:
                # The path found above: a PATH search again could find another file.
                os.execve(program, cmd, env)  # noqa: S606 - running the user's command is the point
            except OSError as exc:
                _give_back(path, owner, cmd[0], exc)
        return EXIT_ERROR  # pragma: no cover - execve does not return

    return _run(args, body)


def _exists(command: str) -> bool:
    """``command`` names a file, executable or not: a path, or a name on ``PATH``."""
    if os.sep in command:
        return os.path.exists(command)
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return any(os.path.isfile(os.path.join(d or ".", command)) for d in path)


def _why_exec_failed(failure: OSError) -> str:
    """The exec's error in the terms of the file that was found: "No such file or
    directory" for a script that exists means its ``#!`` interpreter is missing, and
    "Exec format error" a script without ``#!`` (which a shell would run, exec does not)."""
    if failure.errno == errno.ENOENT and failure.filename and os.path.exists(failure.filename):
        interpreter = _interpreter_of(failure.filename)
        if interpreter is not None:
            return f"its interpreter {interpreter} (the #! line) does not exist"
    if failure.errno == errno.ENOEXEC:
        return "not a program the kernel can run (a script needs a #! line)"
    return failure.strerror or str(failure)


def _interpreter_of(program: str) -> str | None:
    try:
        with open(program, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].split()
    return words[0].decode(errors="replace") if words else None


def _give_back(path: str, owner: dict[str, Any], command: str, failure: OSError) -> NoReturn:
    """Release what ``lockd run`` took when its exec failed, then fail with the reason.

    ``which`` cannot see every failure (a script without ``#!``, a missing
    interpreter). The restricted connection can no longer release, and closing
    it with the leases held would make the daemon fence this process, the
    owner. A second connection of the same owner releases them first, so both
    close holding nothing. If that fails too, the reason is printed while the
    restricted connection is still open: its close brings the fence's SIGTERM,
    which would end this process before any later message."""
    what = f"cannot run {command}: {_why_exec_failed(failure)}"
    try:
        with _connect(path, "lockd-run-give-back") as client:
            client.call("register", owner=owner)
            client.call("release", all=True)
    except (CommandError, RemoteError, ConnectionLostError, OSError) as exc:
        print(f"lockd run: {what}; its leases could not be given back ({exc}): lockd ends "
              f"them as for a VM whose connection closed", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(EXIT_ERROR) from None
    raise CommandError(what, EXIT_CANNOT_EXEC)


def cmd_bench(args: argparse.Namespace) -> int:
    """Acquire+release pairs against a daemon of its own, or the one ``--socket`` names;
    ``recovery`` always runs a daemon of its own."""
    from lockd import bench

    def body() -> int:
        try:
            levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        except ValueError:
            levels = [0]
        if any(level < 1 for level in levels):  # 0 was a traceback, -1 a hang
            raise CommandError(
                f"--concurrency takes connection counts >= 1 like 1,4,16, not {args.concurrency!r}",
                EXIT_USAGE,
            )
        scenarios = tuple(s for s in args.scenarios.split(",") if s)
        unknown = set(scenarios) - set(bench.SCENARIOS)
        if unknown:
            raise CommandError(f"unknown scenarios {sorted(unknown)}", EXIT_USAGE)
        if "recovery" in scenarios and (
            args.recovery_leases < 1 or args.recovery_owners < 1 or args.recovery_events < 0
        ):
            raise CommandError(
                "--recovery-leases and --recovery-owners take at least 1, --recovery-events 0",
                EXIT_USAGE,
            )
        target = args.socket or os.environ.get("LOCKD_SOCKET")
        with ExitStack() as stack:
            if target is None and set(scenarios) - {"recovery"}:
                target = stack.enter_context(_bench_daemon())
            return _bench(args, target or default_socket(), levels, scenarios)

    return _run(args, body)


@contextmanager
def _bench_daemon() -> Iterator[str]:
    """A daemon of the benchmark's own, on temp paths, for as long as it runs.

    Without ``--socket`` the benchmark does not touch the daemon that serves this
    host: its thousands of events would go into that journal, and its lockspace
    (``lockd.bench``) into a lock directory other hosts may share.
    """
    with tempfile.TemporaryDirectory(prefix="lockd-bench-") as tmp:
        sock = os.path.join(tmp, "lockd.sock")
        log_path = os.path.join(tmp, "daemon.log")
        # An empty configuration of its own: the host's (its pid file, its log
        # outputs) is the serving daemon's alone.
        config = os.path.join(tmp, "lockd.toml")
        with open(config, "w", encoding="utf-8"):
            pass
        with open(log_path, "wb") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "lockd", "serve", "--config", config, "--socket", sock,
                 "--admin-socket", os.path.join(tmp, "admin.sock"),
                 "--lock-dir", os.path.join(tmp, "locks"),
                 "--journal-dir", os.path.join(tmp, "journal")],
                cwd=autospawn.PACKAGE_ROOT, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=log_file,
            )  # fmt: skip
        try:
            try:
                procs.wait_listening(sock, daemon, log=log_path)
            except RuntimeError as exc:
                raise CommandError(f"cannot start a daemon to measure: {exc}") from None
            print(f"lockd bench: measuring a daemon of its own ({tmp}); --socket PATH "
                  "measures a running one", file=sys.stderr)  # fmt: skip
            yield sock
        finally:
            procs.stop_child(daemon)


def _bench(
    args: argparse.Namespace, path: str, levels: list[int], scenarios: tuple[str, ...]
) -> int:
    from lockd import bench, bench_recovery

    try:
        result = bench.run(
            path,
            ops=args.ops,
            warmup=args.warmup,
            levels=levels,
            tp_ops=args.tp_ops,
            scenarios=scenarios,
            owners=args.owners,
            recovery_leases=args.recovery_leases,
            recovery_owners=args.recovery_owners,
            recovery_events=args.recovery_events,
        )
    except bench_recovery.BenchError as exc:
        raise CommandError(f"recovery: {exc}") from None
    if args.json:
        _print_json(result)
    else:
        print(bench.format_table(result))
    return EXIT_OK
