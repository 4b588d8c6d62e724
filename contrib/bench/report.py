#!/usr/bin/env python3
"""Regenerate the measured numbers in docs/performance.md with one command.

Numbers pasted by hand drift from the code and lose the machine they were
measured on; this script runs every benchmark the document quotes and
rewrites only the block between the markers below, so the prose around it
stays the author's:

- ``contrib/bench/compare.py --json``: lockd (journal_sync none and batch) vs
  the real virtlockd, pinned to one CPU, with the floors measured in the same
  runs. Needs root and the virtlockd peer (``../shared/peers/virtlockd``);
  skipped with the reason written into the block otherwise.
- ``contrib/bench/scale.py``: a dense host (``--owners``/``--leases``). When
  this host's descriptor limit cannot hold the target, the largest size that
  fits is run and the size row fails, saying why.
- ``lockd bench --scenarios recovery``: SIGKILL and restart at scale.

    sudo .venv/bin/python contrib/bench/report.py            # about 4 minutes
    .venv/bin/python contrib/bench/report.py --quick --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lockd.bench import compare_table, format_number  # noqa: E402

DOC = REPO / "docs" / "performance.md"
DEFAULT_PEER = REPO.parent / "shared" / "peers" / "virtlockd"
BEGIN = "<!-- BEGIN GENERATED: contrib/bench/report.py -->"
END = "<!-- END GENERATED -->"

TARGET_OWNERS = 4096
TARGET_LEASES = 16384
QUICK_OWNERS = 256
QUICK_LEASES = 1024
RECOVERY_FULL = {"leases": 16384, "owners": 1024, "events": 1_000_000}
RECOVERY_QUICK = {"leases": 1024, "owners": 64, "events": 20_000}
MAX_LOADED_VS_EMPTY = 1.2
MAX_RSS_MIB = 256.0
MAX_RESTART_MS = 2000.0
MAX_FOLLOW_LAG_P99_MS = 50.0
FD_MARGIN = 512
"""Descriptors the scale daemon needs besides its leases' and owners' (clients, journal)."""


class MarkerError(ValueError):
    """The document lacks the generated block's markers, or has them twice or swapped."""


# -- the Markdown (pure: results in, text out) --------------------------------------------
def replace_block(doc: str, body: str) -> str:
    """``doc`` with the text between the markers replaced by ``body``; nothing else changes."""
    for marker in (BEGIN, END):
        count = doc.count(marker)
        if count != 1:
            raise MarkerError(
                f"expected the marker {marker!r} exactly once in the document, found {count}; "
                f"add both markers where the generated numbers belong"
            )
    start = doc.index(BEGIN) + len(BEGIN)
    stop = doc.index(END)
    if stop < start:
        raise MarkerError(f"{END!r} comes before {BEGIN!r}")
    return doc[:start] + "\n" + body.strip("\n") + "\n" + doc[stop:]


def rewrite(doc: str, results: dict[str, Any]) -> str:
    """The new document: the generated block rendered from ``results``, the rest as it was."""
    return replace_block(doc, render(results))


def _runs(repeat: int | None) -> str:
    if repeat == 1:
        return "one run per daemon"
    return f"medians of {repeat or '?'} rounds, the daemons in turn in each"


def _cell(text: str) -> str:
    """Free text (an error, a note) made safe inside a Markdown table row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("pass" if ok else "**fail**")


def _size_verdict(reached: bool, quick: bool) -> bool | None:
    """A quick run's sizes are below the targets on purpose: not judged, rather than failed."""
    return None if quick else reached


def _scale_rows(scale: dict[str, Any], target: dict[str, Any], quick: bool) -> list[str]:
    if "error" in scale:
        return [f"| scale | ran | not run: {_cell(scale['error'])} | **fail** |"]
    size_ok = _size_verdict(
        scale["owners"] >= target["owners"] and scale["leases"] >= target["leases"], quick
    )
    size_note = scale.get("size_note") or scale.get("fill_error") or ""
    ratio = scale["loaded_vs_empty_median"]
    rows = [
        (
            "scale: live owners / leases held",
            f"{target['owners']:,} / {target['leases']:,}",
            f"{scale['owners']:,} / {scale['leases']:,}"
            + (f" ({_cell(size_note)})" if size_note else ""),
            size_ok,
        ),
        (
            "scale: pair p50, loaded / empty",
            f"≤ {MAX_LOADED_VS_EMPTY}x",
            f"{ratio:.2f}x ({format_number(scale['loaded_pair_median_us'])} / "
            f"{format_number(scale['empty_pair_median_us'])} µs)",
            ratio <= MAX_LOADED_VS_EMPTY,
        ),
        (
            "scale: pair p99, loaded / empty",
            "—",
            f"{format_number(scale['loaded_pair_p99_us'])} / "
            f"{format_number(scale['empty_pair_p99_us'])} µs",
            None,
        ),
        (
            "scale: pair p50 of the two daemons before the fill (measurement noise)",
            "about 1x",
            f"{scale['twins_before_fill_median']:.2f}x"
            if "twins_before_fill_median" in scale
            else "—",
            None,
        ),
        (
            "scale: daemon RSS with that state",
            f"< {MAX_RSS_MIB:.0f} MiB",
            f"{scale['daemon_rss_mib']} MiB",
            scale["daemon_rss_mib"] < MAX_RSS_MIB,
        ),
        (
            "scale: daemon threads",
            f"constant ({scale['empty_daemon_threads']} when empty)",
            str(scale["daemon_threads"]),
            scale["daemon_threads"] == scale["empty_daemon_threads"],
        ),
        (
            "scale: `lockd events --follow` lag p99 (p50)",
            f"< {MAX_FOLLOW_LAG_P99_MS:.0f} ms",
            f"{scale['follow_lag_p99_ms']} ms ({scale['follow_lag_p50_ms']} ms)",
            scale["follow_lag_p99_ms"] < MAX_FOLLOW_LAG_P99_MS,
        ),
        (
            f"scale: {scale.get('boot_storm_owners', 0):,} VMs booting at once, each its own "
            "disk and a shared base image (twin daemon), until the last reply",
            "—",
            f"{scale['boot_storm_s']} s" if "boot_storm_s" in scale else "—",
            None,
        ),
        (
            f"scale: then {scale.get('rolling_restart_vms', 0):,} of them stopping while as "
            "many others start, requests interleaved, until the last reply",
            "—",
            f"{scale['rolling_restart_s']} s" if scale.get("rolling_restart_s") else "—",
            None,
        ),
        (
            "scale: every owner killed at once, until no lease is held",
            "—",
            "over 300 s"
            if scale.get("mass_exit_release_s", 0) is None
            else f"{scale['mass_exit_release_s']} s"
            if "mass_exit_release_s" in scale
            else "—",
            None,
        ),
        (
            "scale: time to fill, daemon fds",
            "—",
            f"{scale['fill_s']} s, {scale['daemon_fds']:,} fds",
            None,
        ),
        (
            "scale: owners watched by pidfd / by polling (daemon fd limit)",
            "—",
            f"{scale.get('owners_watched_by_pidfd', 0):,} / "
            f"{scale.get('owners_watched_by_poll', 0):,} ({scale.get('daemon_fd_limit', 0):,})",
            None,
        ),
    ]
    return [f"| {a} | {b} | {c} | {_verdict(d)} |" for a, b, c, d in rows]


def _recovery_rows(
    rec: dict[str, Any], target: dict[str, Any], empty_threads: int | None, quick: bool
) -> list[str]:
    if "error" in rec:
        return [f"| restart | ran | not run: {_cell(rec['error'])} | **fail** |"]
    size_ok = _size_verdict(all(rec[k] >= target[k] for k in ("leases", "owners", "events")), quick)
    rows = [
        (
            "restart: leases / owners / events of history",
            f"{target['leases']:,} / {target['owners']:,} / {target['events']:,}",
            f"{rec['leases']:,} / {rec['owners']:,} / {rec['events']:,}",
            size_ok,
        ),
        (
            "restart after SIGKILL: exec to first answer",
            f"< {MAX_RESTART_MS / 1000:g} s",
            f"{rec['exec_to_first_answer_ms'] / 1000:.2f} s",
            rec["exec_to_first_answer_ms"] < MAX_RESTART_MS,
        ),
        (
            "restart: `recovery-completed` duration",
            "—",
            f"{format_number(rec['recovery_completed_ms'])} ms",
            None,
        ),
        (
            "restart: leases held again",
            f"all {rec['leases']:,}",
            f"{rec['held_again']:,} (lost {rec['lost']}, listed {rec['leases_listed']:,})",
            rec["held_again"] == rec["leases"] == rec["leases_listed"] and rec["lost"] == 0,
        ),
        (
            "restart: daemon RSS",
            f"< {MAX_RSS_MIB:.0f} MiB",
            f"{rec['daemon_rss_mib']} MiB",
            rec["daemon_rss_mib"] < MAX_RSS_MIB,
        ),
        (
            "restart: daemon threads",
            "constant" + (f" ({empty_threads} when empty)" if empty_threads is not None else ""),
            str(rec["daemon_threads"]),
            None if empty_threads is None else rec["daemon_threads"] == empty_threads,
        ),
    ]
    return [f"| {a} | {b} | {c} | {_verdict(d)} |" for a, b, c, d in rows]


def render(results: dict[str, Any]) -> str:
    """The generated block's Markdown (between the markers) for ``results``."""
    m = results["machine"]
    lines = [
        "<!-- Written by contrib/bench/report.py: edits between these markers are overwritten. -->",
        "",
        "## Latest run (generated)",
        "",
        f"Machine: {m['cpu']}, {m['nproc']} CPUs, Linux {m['kernel']}, Python {m['python']}, "
        f"lockd {m['lockd']}"
        + (f", virtlockd {m['virtlockd']}" if m.get("virtlockd") else "")
        + f"; {m['date']}.",
        "",
        f"Command: `{results['command']}`"
        + (" (quick: sizes below the targets)" if results.get("quick") else ""),
        "",
        "### lockd vs virtlockd",
        "",
    ]
    compare = results.get("compare")
    if compare and "error" not in compare:
        settings = results.get("compare_settings", {})
        lines += compare_table(compare)
        lines += [
            "",
            f"Daemons and clients pinned to CPU {settings.get('cpu', 0)}; "
            + _runs(settings.get("repeat"))
            + ". Ratio = lockd / virtlockd (below 1x "
            "is better for latency, above 1x for pairs/s). virtlockd's sequential rows are "
            "timed by compare.py through the peer's protocol client; its concurrency rows "
            "are the peer's own benchmark.",
        ]
    else:
        reason = (compare or {}).get("error") or results.get("compare_skipped") or "not run"
        lines.append(f"Not measured in this run: {reason}.")
    floor = results["floor"]
    lines += [
        "",
        "### Floors",
        "",
        "| floor | µs |",
        "|---|---:|",
        f"| OFD lock + unlock, in-process | {format_number(floor['fcntl_pair_us'])} |",
        f"| request/reply on a Unix socket between two processes | "
        f"{format_number(floor['socket_rpc_us'])} |",
        f"| minimal Python epoll server, per request (same client, no lock work) | "
        f"{format_number(floor.get('python_server_rpc_us'))} |",
        f"| a pair's file syscalls, virtlockd's way (open O_CREAT + lock; unlink + close) | "
        f"{format_number(floor.get('virtlockd_files_pair_us'))} |",
        f"| a pair's file syscalls, lockd's way (index lock, link check) | "
        f"{format_number(floor.get('lockd_files_pair_us'))} |",
        f"| a pair's two journal records, encoded and written | "
        f"{format_number(floor.get('journal_pair_us'))} |",
        f"| one actor hop in lockd's runtime (message built, told, dispatched, handled; "
        f"a pair makes 13) | {format_number(floor.get('actor_hop_us'))} |",
        "",
        "Measured "
        + (
            "in compare.py's lockd runs, pinned like them."
            if results.get("floor_source") == "compare"
            else "by report.py itself, not pinned (compare.py did not run)."
        ),
        "",
        "### Scale and restart targets",
        "",
        "| check | target | measured | result |",
        "|---|---|---|---|",
    ]
    scale = results["scale"]
    quick = bool(results.get("quick"))
    lines += _scale_rows(scale, results["scale_target"], quick)
    empty_threads = scale.get("empty_daemon_threads") if "error" not in scale else None
    lines += _recovery_rows(results["recovery"], results["recovery_target"], empty_threads, quick)
    return "\n".join(lines)


# -- running the benchmarks ---------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the numbers were measured on: they mean little without it."""
    from lockd import build

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "lockd": build.version(),
        "virtlockd": virtlockd_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def virtlockd_version() -> str | None:
    """The virtlockd package's version, None if it is not installed (yet: on a new machine
    compare.py's run of the peer's setup installs it)."""
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "libvirt-daemon"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    except OSError:
        return None
    if done.returncode == 0 and done.stdout.strip():
        return f"from libvirt-daemon {done.stdout.strip()}"
    return None


def _last_line(text: str, limit: int = 200) -> str:
    """The line that says what went wrong (a traceback's last), fit for a table cell."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    return last[:limit]


def _json_tail(stdout: str) -> dict[str, Any]:
    """The JSON object a tool printed last (compare.py indents it; others print one line)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError("no JSON in the output")
    result: dict[str, Any] = json.loads(stdout[start:])
    return result


def _run_tool(argv: list[str], label: str) -> dict[str, Any]:
    """Run one benchmark (its progress on our stderr); its JSON, or ``{"error": ...}``."""
    print(f"report.py: {label}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": f"{label} exited with {done.returncode}: {_last_line(done.stderr)}"}
    try:
        return _json_tail(done.stdout)
    except ValueError as exc:
        return {"error": f"{label} printed no JSON ({exc})"}


def compare_skip_reason(peer: Path) -> str | None:
    """Why compare.py cannot run here, or None."""
    if os.geteuid() != 0:
        return "compare.py needs root (the virtlockd peer serves uid 0 only); rerun with sudo"
    if not (peer / "setup.sh").is_file() or not (peer / "client.py").is_file():
        return f"the virtlockd peer is not at {peer}"
    return None


def fd_need(owners: int, leases: int, limit: int) -> int:
    """Descriptors the scale daemon needs: one per lease, a pidfd per owner up to its budget
    (an eighth of the limit; owners past it are polled), and a margin."""
    from lockd.daemon import PIDFD_SHARE

    return leases + min(owners, limit // PIDFD_SHARE) + FD_MARGIN


def fit_scale(owners: int, leases: int) -> tuple[int, int, str | None]:
    """The scale size to run: the target if this host's descriptors hold it, else the largest
    size that fits with the same leases per owner (and a note saying why)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = owners + leases + FD_MARGIN  # every owner on a pidfd: nothing polled
    try:  # root may raise the hard limit up to fs.nr_open; scale.py tries the same
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
        return owners, leases, None
    except (ValueError, OSError):
        pass
    if fd_need(owners, leases, hard) <= hard:
        return owners, leases, None
    per_owner = max(1, leases // owners)
    fit = owners
    while fit > 64 and fd_need(fit, fit * per_owner, hard) > hard:
        fit -= 64
    note = (
        f"descriptor hard limit {hard:,} < {fd_need(owners, leases, hard):,} needed; "
        "ran the largest size that fits"
    )
    return fit, fit * per_owner, note


def gather(args: argparse.Namespace) -> dict[str, Any]:
    """Run every benchmark and collect the results dict :func:`render` takes."""
    py = sys.executable
    bench = REPO / "contrib" / "bench"
    results: dict[str, Any] = {
        "machine": machine(),
        "command": _command(sys.argv[1:]),
        "quick": args.quick,
    }
    compare_args = ["--repeat", "1", "--ops", "500", "--tp-ops", "1000"] if args.quick else []
    skip = "--no-compare given" if args.no_compare else compare_skip_reason(args.peer)
    if skip:
        print(f"report.py: skipping lockd vs virtlockd: {skip}", file=sys.stderr)
        results["compare_skipped"] = skip
    else:
        results["compare"] = _run_tool(
            [py, str(bench / "compare.py"), "--json", "--peer", str(args.peer), *compare_args],
            "compare.py",
        )
        results["compare_settings"] = {"cpu": 0, "repeat": 1 if args.quick else 3}
        # The run installs virtlockd on a machine that had none: asked before, the
        # machine line named no virtlockd beside the numbers measured against it.
        results["machine"]["virtlockd"] = virtlockd_version()
    compare = results.get("compare")
    if compare and "error" not in compare:
        results["floor"] = next(iter(compare["lockd"].values()))["floor"]
        results["floor_source"] = "compare"
    else:
        from lockd.bench import floors

        results["floor"] = floors()
        results["floor_source"] = "report"

    results["scale_target"] = {"owners": TARGET_OWNERS, "leases": TARGET_LEASES}
    owners, leases, note = fit_scale(args.owners, args.leases)
    scale = _run_tool(
        [py, str(bench / "scale.py"), "--owners", str(owners), "--leases", str(leases),
         *(["--pairs", "300"] if args.quick else [])],
        "scale.py",
    )  # fmt: skip
    if note and "error" not in scale:
        scale["size_note"] = note
    results["scale"] = scale

    target = RECOVERY_FULL
    size = RECOVERY_QUICK if args.quick else RECOVERY_FULL
    results["recovery_target"] = target
    recovery = _run_tool(
        [py, "-m", "lockd", "bench", "--scenarios", "recovery", "--json",
         "--recovery-leases", str(size["leases"]), "--recovery-owners", str(size["owners"]),
         "--recovery-events", str(size["events"])],
        "lockd bench --scenarios recovery",
    )  # fmt: skip
    results["recovery"] = recovery.get("recovery", recovery)
    return results


OUTPUT_FLAGS = {"--no-write": 0, "--save": 1, "--load": 1, "--doc": 1}
"""Flags that change where results go, not what is measured: left out of the command shown."""


def _command(argv: list[str]) -> str:
    """The command that measured these numbers, as a reader would type it to repeat them."""
    exe = Path(sys.executable)
    shown = str(exe.relative_to(REPO)) if exe.is_relative_to(REPO) else exe.name
    kept: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg.split("=", 1)[0] in OUTPUT_FLAGS:
            skip = 0 if "=" in arg else OUTPUT_FLAGS[arg]
        else:
            kept.append(arg)
    return shlex.join([shown, "contrib/bench/report.py", *kept])


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so an interrupted run never leaves half a document."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--owners", type=int, help=f"scale: live owners (default {TARGET_OWNERS}, --quick 256)"
    )
    parser.add_argument(
        "--leases", type=int, help=f"scale: leases held (default {TARGET_LEASES}, --quick 1024)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and one compare run (tooling check)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the generated block, leave the doc alone"
    )
    parser.add_argument("--no-compare", action="store_true", help="skip lockd vs virtlockd")
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="virtlockd peer directory")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document to rewrite")
    parser.add_argument("--save", type=Path, help="also write the raw results here (JSON)")
    parser.add_argument(
        "--load", type=Path, help="render results saved by --save instead of measuring"
    )
    args = parser.parse_args()
    if args.owners is None:
        args.owners = QUICK_OWNERS if args.quick else TARGET_OWNERS
    if args.leases is None:
        args.leases = QUICK_LEASES if args.quick else TARGET_LEASES
    if args.owners < 1 or args.leases < args.owners:
        parser.error("--owners must be at least 1 and --leases at least --owners")
    doc = None
    if not args.no_write:
        doc = args.doc.read_text()
        try:
            replace_block(doc, "")  # fail before minutes of measuring, not after
        except MarkerError as exc:
            print(f"report.py: {args.doc}: {exc}", file=sys.stderr)
            return 1
    results = json.loads(args.load.read_text()) if args.load else gather(args)
    if args.save:
        args.save.write_text(json.dumps(results, indent=1) + "\n")
    if doc is None:
        print(render(results))
        return 0
    write_atomically(args.doc, rewrite(doc, results))
    print(f"report.py: rewrote the generated block of {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
