#!/usr/bin/env python3
"""An auditor's event feed over the socket that misses nothing, across daemon restarts.

    audit_feed.py --socket PATH --state FILE [--since SEQ] [--count N]

Prints each journal event as one JSON line, and keeps the seq of the last one
printed in FILE. When the connection ends (the daemon restarted, crashed, or
dropped a reader that fell 4 MiB behind), it connects again and subscribes with
``since`` = that seq + 1: the daemon replays what it journaled meanwhile, then
goes on live, with no event missed or printed twice. A re-exec (SIGUSR1) does not
even end the connection. Events the daemon cannot send are reported on stderr:
those the journal no longer keeps (from the reply's ``first``), and those lost to
damage in a journal segment or deleted while a replay waited (a jump in the seqs).

The feed itself killed between printing an event and saving its seq prints that
event again when started again (at least once, never lost): a consumer that must
not take one twice skips seqs it has taken (they only grow). FILE also keeps the id
of the journal's timeline: after a cut (``journal-check --repair``, or damage cut at
start-up after a reboot) the seqs from the cut on are handed out again to new events,
and the feed, told so by ``status``, prints those from the cut on, saying so.

Its reader gone (``audit_feed.py ... | head``) ends it with status 141, as SIGPIPE
ends a shell command: at the next event (which it does not save), or, with none
coming, within a second, as ``tail -f`` does.

A lockd built before ``subscribe`` took ``since`` (2026-11-27 07:10) replays nothing:
the feed follows its new events, and names on stderr the seqs it missed meanwhile,
which ``lockd events --since`` reads from the journal; one built before the reply said
``first`` (07:44) is followed as any other. Until then the feed died on their replies.

Unlike ``lockd events --follow``, which reads the journal directory (root's), this
needs only a connection to the socket.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocol.client import Client, RemoteError

RETRY_SECONDS = 0.5
LOOK_SECONDS = 1.0
"""How often a feed waiting for events looks whether its reader left."""
EXIT_PIPE = 141
"""The exit status when standard output's reader left (``| head``): the shell's, for SIGPIPE."""


class ReaderGone(Exception):
    """Standard output is a pipe nobody reads any more."""


def reader_gone() -> bool:
    """Whether standard output is a pipe whose reader left (poll reports an error)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def next_event(client: Client) -> dict[str, Any]:
    """The next event; while none comes, see every LOOK_SECONDS whether the reader left
    (``| head`` with its lines had the feed wait for ever for an event to fail on)."""
    client.settimeout(LOOK_SECONDS)
    while True:
        try:
            event: dict[str, Any] = client.next_event()["event"]
        except TimeoutError:  # what came of a frame is kept: the next call goes on
            if reader_gone():
                raise ReaderGone from None
            continue
        return event


def emit(event: dict[str, Any]) -> None:
    """Print one event as a JSON line; its reader gone is :class:`ReaderGone`, not the
    ``BrokenPipeError`` (a ``ConnectionError``) that a lost daemon connection is."""
    try:
        print(json.dumps(printable(event)), flush=True)
    except BrokenPipeError:
        raise ReaderGone from None


def last_seq(state: Path) -> tuple[int | None, str | None]:
    """The last seq printed, and the id of the journal's timeline it belongs to (None
    from a state file written before the daemon told it)."""
    try:
        seq, *epoch = state.read_text().split()
        return int(seq), epoch[0] if epoch else None
    except (FileNotFoundError, ValueError):
        return None, None


def save_seq(state: Path, seq: int, epoch: str | None) -> None:
    """Written whole or not at all: a crash of this feed never leaves half a number."""
    tmp = state.with_name(f".{state.name}.tmp")
    tmp.write_text(f"{seq} {epoch}" if epoch else str(seq))
    os.replace(tmp, state)


def after_a_cut(client: Client, seen: int, epoch: str | None) -> int:
    """The seq to go on after: ``seen``, or, when the journal was cut below it since (a
    new timeline, its seqs handed out again), the last one before the cut."""
    journal = client.call("status").get("journal")
    if epoch is None or journal is None or journal["id"] == epoch or seen < journal["from"]:
        return seen
    print(f"audit-feed: the journal was cut after seq {journal['from'] - 1}; its events from "
          f"{journal['from']} on are new ones, under seqs this feed printed up to {seen} for "
          f"others; going on from {journal['from']}", file=sys.stderr, flush=True)  # fmt: skip
    return int(journal["from"]) - 1


def printable(value: Any) -> Any:
    """CBOR bytes (owner uuids) as text, for JSON."""
    if isinstance(value, bytes):
        return str(uuid.UUID(bytes=value)) if len(value) == 16 else value.hex()
    if isinstance(value, dict):
        return {key: printable(item) for key, item in value.items()}
    if isinstance(value, list):  # recovery-completed's fencing: each with its owner
        return [printable(item) for item in value]
    return value


def missing(first: int, last: int, why: str) -> None:
    print(f"audit-feed: events {first}-{last} {why}", file=sys.stderr, flush=True)


def no_replay(seen: int | None) -> int | None:
    """A lockd built before ``subscribe`` took ``since`` (2026-11-27) sends only the
    events journaled from now on, and says nowhere which seq comes first: the seq to
    expect next (after ``seen``, so a gap before the first event is named), saying so.
    This feed died on its reply (``KeyError: 'first'``), and on each run after."""
    print("audit-feed: this lockd replays no events (it predates subscribe's since): "
          "following its new events", file=sys.stderr, flush=True)  # fmt: skip
    return None if seen is None else seen + 1


def follow(socket_path: str, state: Path, since: int | None, count: int | None) -> None:
    printed = 0
    while count is None or printed < count:
        seen, epoch = last_seq(state)
        if seen is None and since is not None:
            seen = since - 1  # the first run: from --since (without it, from now)
        try:
            with Client(socket_path, name="audit-feed", timeout=None) as client:
                if seen is not None:
                    seen = after_a_cut(client, seen, epoch)
                args = {} if seen is None else {"since": seen + 1}
                replays = True
                try:
                    reply = client.call("subscribe", **args)
                except RemoteError as exc:
                    if exc.code != "invalid-argument" or seen is None:
                        raise
                    reply = client.call("subscribe")
                    replays = "first" in reply
                    if replays:
                        # The journal ends before what this feed printed: its newest
                        # records were cut (journal-check --repair, or a host crash's
                        # damage cut at start-up), and their seqs are handed out again.
                        print(f"audit-feed: the journal's next event is {reply['first']}, not "
                              f"after {seen}: events were cut from it; going on from "
                              f"{reply['first']}", file=sys.stderr, flush=True)  # fmt: skip
                first, epoch = reply.get("first"), reply.get("journal", {}).get("id")
                gap = "could not be read back from the journal (the daemon's log says why)"
                if not replays:
                    first = no_replay(seen)
                    gap = (
                        "were journaled while this feed was away, and this lockd does not "
                        "send them (lockd events --since reads them from the journal)"
                    )
                elif first is None:  # a lockd from before the reply said (07:44)
                    first = None if seen is None else seen + 1
                elif seen is not None and first > seen + 1:
                    missing(seen + 1, first - 1, "are no longer kept by the journal")
                expected = first
                while count is None or printed < count:
                    event = next_event(client)
                    if expected is None:
                        expected = event["seq"]  # a first run: from the first event
                    if event["seq"] > expected:
                        missing(expected, event["seq"] - 1, gap)
                    emit(event)
                    save_seq(state, event["seq"], epoch)
                    expected = event["seq"] + 1
                    printed += 1
        except (ConnectionError, FileNotFoundError) as exc:
            print(f"audit-feed: {exc}; connecting again", file=sys.stderr, flush=True)
            time.sleep(RETRY_SECONDS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the daemon's client socket")
    parser.add_argument("--state", required=True, type=Path, help="keeps the last seq printed")
    parser.add_argument(
        "--since",
        type=int,
        help="the first run starts at this seq (1: "
        "every event the journal keeps); later runs go on from --state",
    )
    parser.add_argument("--count", type=int, help="exit after this many events")
    args = parser.parse_args()
    try:
        follow(args.socket, args.state, args.since, args.count)
    except KeyboardInterrupt:
        return 130
    except ReaderGone:
        # Nothing more is written there (nor flushed at exit, which would fail again);
        # the event not printed is not saved: the next run prints it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
