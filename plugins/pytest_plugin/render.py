"""What the pytest plugin shows: a test's report section and reason, the terminal summary,
the JSON report, and the record (one dict per violation) behind all of them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sanitizer.plugins.pytest_plugin import REPORT_OPTION, _say

if TYPE_CHECKING:
    from sanitizer.plugins.pytest_plugin.session import ThreadViolation, _Plugin

# The user property (JUnit XML, xdist) that carries a record as JSON.
PROPERTY = "thread_affinity_violation"


def record(plugin: _Plugin, violation: ThreadViolation, nodeid: str | None) -> dict[str, Any]:
    """The event's fields (as in log_file), with the test, the thread and the sites."""
    from sanitizer import stacks
    from sanitizer.plugins.pytest_plugin import xdist
    from sanitizer.render import EVENT

    found = violation.violation
    event = found.event()
    event["count"] = violation.count
    site, created = found.access_site, found.creation_site
    return {
        "id": violation.id,
        "nodeid": nodeid,
        "when": violation.when,
        "expected": violation.expected,
        "thread_name": violation.thread,
        "child_pid": violation.child_pid,
        "origin": ({"nodeid": violation.origin[0], "when": violation.origin[1]}
                   if violation.origin else None),
        "worker": xdist.worker_id(plugin.config),
        "access_site": stacks.frame_dict(site) if site else None,
        "creation_site": stacks.frame_dict(created) if created else None,
        "event": EVENT,
        **event,
    }


def sites(config: pytest.Config, data: dict[str, Any]) -> list[str]:
    """Where it was used and created, and the thread or child it happened in."""
    lines = []
    for label, key in (("used at", "access_site"), ("created at", "creation_site")):
        site = data.get(key)
        if site:
            lines.append(f"{label} {_relative(config, site['file'])}:{site['line']} in "
                         f"{site['function']}")
    origin = data.get("origin")
    started = f" started during {origin['when']} of {origin['nodeid']}" if origin else ""
    if data.get("child_pid") is not None:
        lines.append(f"in child process {data['child_pid']}{started}")
    elif origin:
        lines.append(f"in thread {data.get('thread_name')!r}{started}")
    return lines


def _relative(config: pytest.Config, filename: str) -> str:
    root = str(config.rootpath) + os.sep
    return filename[len(root):] if filename.startswith(root) else filename


def section(plugin: _Plugin, violation: ThreadViolation) -> str:
    """The full report of one violation, for the test's report section."""
    from sanitizer.render import render_console

    text = render_console(None, "warning", record(plugin, violation, None))
    started = (f", started during {violation.origin[1]} of {violation.origin[0]}"
               if violation.origin else "")
    if violation.child_pid is not None:
        text += f"\n  (in child process {violation.child_pid}{started})"
    elif violation.origin:
        text += f"\n  (in thread {violation.thread!r}{started})"
    return text


def reason(plugin: _Plugin, violations: list[ThreadViolation]) -> str:
    """The failed phase's one-line reason, and the sites of each violation."""
    first = violations[0]
    head = (f"thread-affinity violation ({first.policy}): {first.message}"
            if len(violations) == 1 else
            f"{len(violations)} thread-affinity violations; first ({first.policy}): "
            f"{first.message}")
    lines = [head]
    for violation in violations:
        if len(violations) > 1:
            lines.append(f"  ({violation.policy}) {violation.message}")
        lines += ["  " + line for line in sites(plugin.config, record(plugin, violation, None))]
    return "\n".join(lines)


def summary(plugin: _Plugin, terminalreporter: pytest.TerminalReporter) -> None:
    """The terminal summary: stale suppressions, then the violations per test."""
    write = terminalreporter.write_line
    unused = [(origin, rule) for origin, (rule, hits) in plugin.rule_hits.items() if not hits]
    if unused:  # stale rules get noticed, as at the end of a program
        write("sanitize-threads: suppressions that never matched:")
        for origin, rule in unused:
            write(f"  {origin}: {rule}")
    failing = [r for r in plugin.records if not r.get("expected")]
    if not failing:
        return
    terminalreporter.write_sep("=", "thread-affinity violations")
    groups: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
    for data in failing:
        groups.setdefault((data["nodeid"], data["when"]), []).append(data)
    for (nodeid, when), records in groups.items():
        where = f"{nodeid} ({when})" if nodeid else f"outside any test ({when})"
        worker = records[0].get("worker")
        write(where + (f" [{worker}]" if worker else ""), bold=True)
        for data in records:
            count = f" [{data['count']}x]" if data.get("count", 1) > 1 else ""
            write(f"  ({data['policy']}) {data['message']}{count}")
            for line in sites(plugin.config, data):
                write("      " + line)
    tests = len({r["nodeid"] for r in failing if r["nodeid"]})
    outside = sum(1 for r in failing if not r["nodeid"])
    total = sum(int(r.get("count", 1)) for r in failing)
    text = f"sanitize-threads: {total} violation(s) in {tests} test(s)"
    if outside:
        text += f", {outside} outside any test"
    write(text, red=True)


def write_report(plugin: _Plugin, session: pytest.Session) -> None:
    """--sanitize-threads-report: every record as one JSON document."""
    config = plugin.config
    path = config.option.sanitize_threads_report
    if not path:
        return
    target = Path(config.invocation_params.dir, path)
    document = {"options": plugin.options.to_string(), "records": plugin.records}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=2, default=repr) + "\n")
    except OSError as exc:  # the user's path: a usage error, not a bug
        _say(config, f"sanitize-threads: cannot write the {REPORT_OPTION} file: {exc}")
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
