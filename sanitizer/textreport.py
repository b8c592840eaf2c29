"""The `sanitize-threads report` command: merged findings as text, markdown, JSON or SARIF."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from sanitizer import logs
from sanitizer.exceptions import ConfigError
from sanitizer.render import SCHEMA
from sanitizer.suppressions import Rule, load_suppressions

PROG = "sanitize-threads report"
FORMATS = ("text", "markdown", "json", "sarif")
USAGE_ERROR = 2
#: Thread names shown in a table cell; the rest are counted.
THREADS_SHOWN = 4


def add_parser(commands: Any) -> None:
    """The ``sanitize-threads report`` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "report", help="merge JSON-lines logs and list each violation once, most frequent first",
        description="Merge the JSON-lines logs of any number of processes and hosts "
        "(log_file=, format=json) and list each kind of violation once, most frequent first, "
        "with its count, processes and hosts.")
    parser.add_argument("logs", nargs="+", metavar="LOG",
                        help="a log file, a glob (quoted: 'logs/*.jsonl'), or - for stdin")
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text for terminals, markdown for CI job summaries, json for "
                        "machines, sarif (2.1.0) for code scanning (default: text)")
    parser.add_argument("--fail", action="store_true",
                        help="exit 1 when anything is reported (after suppressions)")
    parser.add_argument("--suppressions", metavar="FILE",
                        help="a suppressions file (as suppressions=FILE), applied to the logs")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    parser.set_defaults(handler=main)


@dataclasses.dataclass
class Report:
    """What the logs held, after the suppressions: the findings and what was left out."""

    reading: logs.Reading
    findings: list[logs.Finding]
    rules: list[Rule]
    #: Occurrences each rule took out (every finding goes to its first matching rule).
    suppressed: dict[int, int]

    @property
    def total(self) -> int:
        return sum(f.count for f in self.findings)

    @property
    def processes(self) -> set[logs.Process]:
        return {p for f in self.findings for p in f.processes}

    @property
    def hosts(self) -> set[str]:
        return {h for f in self.findings for h in f.hosts}


def build(reading: logs.Reading, rules: Sequence[Rule] = ()) -> Report:
    """Apply ``rules`` to the findings of ``reading``, counting each rule's occurrences."""
    kept: list[logs.Finding] = []
    suppressed: dict[int, int] = {}
    for finding in reading.findings:
        for index, rule in enumerate(rules):
            if rule.matches(finding):
                rule.hits += finding.count
                suppressed[index] = suppressed.get(index, 0) + finding.count
                break
        else:
            kept.append(finding)
    return Report(reading, kept, list(rules), suppressed)


def main(args: argparse.Namespace) -> int:
    try:
        rules = load_suppressions(args.suppressions) if args.suppressions else []
    except ConfigError as exc:
        return _usage_error(str(exc))
    reading = logs.read(args.logs)
    if reading.unreadable and not reading.sources:
        return _usage_error("nothing could be read: " + "; ".join(reading.unreadable))
    for line in reading.problems():
        print(f"{PROG}: {line}", file=sys.stderr)
    report = build(reading, rules)
    for index, rule in enumerate(rules):
        if index not in report.suppressed:
            print(f"{PROG}: suppression never matched: {rule.origin}: {rule}", file=sys.stderr)
    text = render(report, args.format)
    try:
        if args.output:
            with open(args.output, "w", encoding="utf-8") as file:
                file.write(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except OSError as exc:
        return _usage_error(f"cannot write {args.output or 'stdout'}: {exc.strerror or exc}")
    return 1 if args.fail and report.findings else 0


def _usage_error(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return USAGE_ERROR


def render(report: Report, format: str) -> str:
    """The report in ``format`` (one of FORMATS), ending with a newline."""
    if format == "json":
        return json.dumps(as_json(report), indent=2) + "\n"
    if format == "sarif":
        from sanitizer import sarifreport

        return json.dumps(sarifreport.sarif(report.findings), indent=2) + "\n"
    if format == "markdown":
        return markdown(report)
    return text(report)


# -- cells ------------------------------------------------------------------------------


def relative(path: str) -> str:
    """``path`` relative to the current directory when under it, else as it is."""
    if not path or path.startswith("<") or not os.path.isabs(path):
        return path
    here = os.path.join(os.getcwd(), "")
    return path[len(here):] if path.startswith(here) else path


def site_text(site: dict[str, Any] | None) -> str:
    if not site:
        return "<unknown>"
    where = f"{relative(str(site.get('file', '?')))}:{site.get('line', '?')}"
    function = site.get("function")
    return f"{where} in {function}" if function else where


def thread_names(finding: logs.Finding) -> list[str]:
    """The names of the threads (and tasks) involved, each once, in the order met;
    the owner last."""
    names: dict[str, None] = {}
    owner = finding.event.get("owner_thread")
    owner_name = owner.get("name") if isinstance(owner, dict) else None
    for info in finding.threads.values():
        if info.get("name") != owner_name:
            names.setdefault(str(info.get("name", "?")))
    if owner_name:
        names.setdefault(f"{owner_name} (owner)")
    tasks = [finding.event.get(field) for field in ("task", "holder_task", "owner_task")]
    for task in tasks:
        if isinstance(task, dict) and task.get("name"):
            names.setdefault(f"task {task['name']}")
    for occurrence in finding.occurrences:
        if occurrence.get("task"):
            names.setdefault(f"task {occurrence['task']}")
    return list(names)


def threads_cell(finding: logs.Finding) -> str:
    names = thread_names(finding)
    shown = ", ".join(names[:THREADS_SHOWN])
    return shown + (f" (+{len(names) - THREADS_SHOWN} more)" if len(names) > THREADS_SHOWN
                    else "")


HEADERS = ("count", "policy", "object", "access site", "creation site", "threads",
           "processes", "hosts")


def rows(report: Report) -> list[tuple[str, ...]]:
    return [(str(f.count), f.policy, f.object_type, site_text(f.access_site),
             site_text(f.creation_site), threads_cell(f), str(len(f.processes)),
             str(len(f.hosts))) for f in report.findings]


def headline(report: Report) -> str:
    unique = len(report.findings)
    if not unique:
        line = "no thread-affinity violations"
    else:
        line = (f"{report.total} thread-affinity violation(s), {unique} unique, in "
                f"{_plural(len(report.processes), 'process', 'processes')} on "
                f"{_plural(len(report.hosts), 'host', 'hosts')}")
    suppressed = sum(report.suppressed.values())
    if suppressed:
        line += f" ({suppressed} suppressed)"
    return line


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


# -- formats --------------------------------------------------------------------------


def text(report: Report) -> str:
    """A table for terminals: columns as wide as their widest cell, messages below."""
    lines = [f"sanitize-threads: {headline(report)}"]
    if report.findings:
        table = [HEADERS, *rows(report)]
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
        right = {0, 6, 7}  # numbers
        for row in table:
            cells = [cell.rjust(w) if i in right else cell.ljust(w)
                     for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
        for number, finding in enumerate(report.findings, 1):
            lines.append(f"{number}. {finding.event.get('message', '')}")
    return "\n".join(lines) + "\n"


def _md(cell: str) -> str:
    """A table cell's text, with what markdown tables would take as syntax escaped."""
    return cell.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_code(cell: str) -> str:
    return f"`{cell}`" if "`" not in cell else _md(cell)


def markdown(report: Report) -> str:
    """GitHub-flavoured markdown, for a CI job summary ($GITHUB_STEP_SUMMARY)."""
    lines = [f"### sanitize-threads: {headline(report)}", ""]
    if report.findings:
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "|".join("---:" if h in ("count", "processes", "hosts") else "---"
                                    for h in HEADERS) + "|")
        for row in rows(report):
            cells = [_md(c) if i not in (3, 4) else _md_code(c) for i, c in enumerate(row)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("<details><summary>Messages</summary>")
        lines.append("")
        for number, finding in enumerate(report.findings, 1):
            lines.append(f"{number}. {_md(str(finding.event.get('message', '')))}")
        lines.append("")
        lines.append("</details>")
    problems = report.reading.problems()
    if problems:
        lines.append("")
        lines += [f"> {_md(line)}" for line in problems]
    return "\n".join(lines) + "\n"


def as_json(report: Report) -> dict[str, Any]:
    """A stable machine form: findings with their first full event, and what was skipped."""
    reading = report.reading
    return {
        "schema": SCHEMA,
        "total": report.total,
        "unique": len(report.findings),
        "processes": len(report.processes),
        "hosts": sorted(report.hosts),
        "findings": [_finding_json(f) for f in report.findings],
        "suppressed": [{"rule": str(rule), "origin": rule.origin,
                        "count": report.suppressed.get(index, 0)}
                       for index, rule in enumerate(report.rules)],
        "read": {"events": reading.events, "skipped": dict(sorted(reading.skipped.items())),
                 "newer": reading.newer, "unreadable": list(reading.unreadable)},
    }


def _finding_json(finding: logs.Finding) -> dict[str, Any]:
    return {
        "fingerprint": finding.fingerprint,
        "count": finding.count,
        "policy": finding.policy,
        "object_type": finding.object_type,
        "operation": finding.operation,
        "access_site": finding.access_site,
        "creation_site": finding.creation_site,
        "threads": thread_names(finding),
        "processes": [{"host": host, "pid": pid, "count": count}
                      for (host, pid), count in sorted(finding.counts.items())],
        "hosts": sorted(finding.hosts),
        "first_at": finding.first_at,
        "last_at": finding.last_at,
        "message": finding.event.get("message", ""),
        "occurrences": finding.occurrences,
        "event": finding.event,
    }

