"""What docs/operations.md gives a fleet's monitoring, against a real daemon's output:
the unit that ships `lockd metrics` to node_exporter, and the alert rules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from protocol.names import FILES_LOCKSPACE
from tests.e2e.conftest import DaemonProcess
from tests.e2e.test_daemon import start_run

pytestmark = pytest.mark.e2e

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"

Series = dict[str, list[dict[str, str]]]


def doc_block(language: str, first_line: str) -> str:
    """The fenced block of ``language`` in operations.md that starts with ``first_line``."""
    text = OPERATIONS.read_text()
    for block in re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"no {language} block starting {first_line!r} in {OPERATIONS}")


def alert_expressions() -> dict[str, str]:
    """Each alert's name and expression, from the rules in the doc (YAML, read as text:
    no YAML parser among lockd's dependencies)."""
    rules = doc_block("yaml", "groups:")
    found = re.findall(r"- alert: (\w+)\n\s+expr: (\|\n(?:\s{10}.*\n)+|.*\n)", rules, re.MULTILINE)
    assert len(found) == rules.count("- alert:"), rules
    return {name: expr.removeprefix("|") for name, expr in found}


def parse_exposition(text: str) -> Series:
    """Prometheus text -> {metric name: [labels of each sample]}, checking its shape."""
    series: Series = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) [a-z_]+ .+", line), line
            continue
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        assert match is not None, line
        name, labels, value = match.groups()
        float(value)
        pairs = re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', labels or "")
        series.setdefault(name, []).append(dict(pairs))
    return series


def test_each_series_and_label_the_alert_rules_name_is_in_lockd_metrics(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """Every metric an alert names exists with the labels it selects (a rule on a name
    lockd does not export never fires), and each `without`/`ignoring` names exactly the
    labels lockd puts on that metric (otherwise the sides of `+` match nothing: the
    page's first descriptor rule summed with `sum()` and never fired)."""
    start_run(daemon, children, "--disk", "/vm/a.img", "--name", "vm1")
    exported = parse_exposition(daemon.lockd("metrics").stdout)
    expressions = alert_expressions()
    assert len(expressions) >= 10, expressions
    for alert, expr in expressions.items():
        # An aggregation without `by`/`without` drops `instance`: one element for the
        # fleet, which matches no host's series on the other side of an operator.
        assert not re.search(r"\b(sum|min|max|avg|count) *\(", expr), (alert, expr)
        named = re.findall(r"\b(lockd_[a-z_]+)(?:\{([^}]*)\})?", expr)
        assert named or alert == "LockdMetricsMissing", alert
        for metric, selector in named:
            assert metric in exported, f"{alert}: {metric} is not in lockd metrics"
            wanted = dict(re.findall(r'([a-z_]+)="([^"]*)"', selector))
            assert any(wanted.items() <= labels.items() for labels in exported[metric]), (
                f"{alert}: no {metric} with {wanted}"
            )
        for labels, metric in re.findall(r"without \(([^)]*)\) \((lockd_[a-z_]+)\)", expr):
            names = {name.strip() for name in labels.split(",")}
            assert all(set(series) == names for series in exported[metric]), (alert, metric)
        for labels, metric in re.findall(r"ignoring \(([^)]*)\) (lockd_[a-z_]+)", expr):
            names = {name.strip() for name in labels.split(",")}
            assert all(set(series) == names for series in exported[metric]), (alert, metric)


def test_the_collection_unit_writes_the_text_whole_and_removes_it_when_lockd_is_down(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """The doc's lockd-metrics.service command, run as written (the textfile directory
    moved here): it leaves node_exporter a whole file and no temporary one; with lockd
    down it removes the file, so the series go away rather than stand still."""
    unit = doc_block("ini", "# /etc/systemd/system/lockd-metrics.service")
    command = re.search(r"^ExecStart=/bin/sh -c '(.*)'$", unit, re.MULTILINE)
    assert command is not None, unit
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    script = command.group(1).replace(TEXTFILE_DIR, str(textfiles))
    env = {**daemon.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def collect() -> None:
        done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True,
                              text=True, timeout=30, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr

    collect()
    assert sorted(p.name for p in textfiles.iterdir()) == ["lockd.prom"]
    shipped = parse_exposition((textfiles / "lockd.prom").read_text())
    assert "lockd_uptime_seconds" in shipped
    assert "lockd_journal_refusing" in shipped
    daemon.stop()
    collect()
    assert not (textfiles / "lockd.prom").exists()


def test_metrics_say_which_build_runs(daemon: DaemonProcess) -> None:
    """Across a fleet, an upgrade's progress is `count by (version) (lockd_build_info)`:
    only `lockd status` said which build a host ran, which Prometheus does not read."""
    version = json.loads(daemon.lockd("status", "--json").stdout)["version"]
    assert daemon.lockd("--version").stdout == f"lockd {version}\n"
    exported = parse_exposition(daemon.lockd("metrics").stdout)
    assert exported["lockd_build_info"] == [{"version": version}]
    assert f'\nlockd_build_info{{version="{version}"}} 1\n' in daemon.lockd("metrics").stdout


def test_leases_held_is_0_in_each_lockspace_with_none_rather_than_absent(
    daemon: DaemonProcess, children: list[subprocess.Popen[bytes]]
) -> None:
    """`lockd_leases_held` had a series only while a lease was held: an idle host showed
    no data in a fleet's sum (not 0), and a series ended at each last release."""
    disk = {"lockspace": FILES_LOCKSPACE, "resource": "r1"}
    exclusive = f'lockd_leases_held{{lockspace="{FILES_LOCKSPACE}",mode="exclusive"}}'
    shared = f'lockd_leases_held{{lockspace="{FILES_LOCKSPACE}",mode="shared"}}'
    before = daemon.lockd("metrics").stdout
    assert f"\n{exclusive} 0\n" in before
    assert f"\n{shared} 0\n" in before
    vm = subprocess.Popen(["sleep", "600"])
    children.append(vm)
    with daemon.client("libvirtd") as client:  # a manager's connection: its close fences no one
        owner = {"uuid": uuid.uuid4().bytes, "name": "vm1", "id": 1, "pid": vm.pid}
        client.call("register", owner=owner)
        client.call("acquire", leases=[disk], autocreate=True)
        assert f"\n{exclusive} 1\n" in daemon.lockd("metrics").stdout
        client.call("release", leases=[disk])
    after = daemon.lockd("metrics").stdout
    assert f"\n{exclusive} 0\n" in after
    assert f"\n{shared} 0\n" in after
    lockspaces = re.search(r"^lockd_lockspaces (\d+)$", after, re.MULTILINE)
    assert lockspaces is not None
    assert len(parse_exposition(after)["lockd_leases_held"]) == 2 * int(lockspaces.group(1))
