"""The `sanitize-threads html` command: a static, self-contained HTML report with timelines.

Like coverage.py's HTML report: plain files written into one directory (an
index, one page per finding, a stylesheet and a few lines of script copied from
``sanitizer/htmlfiles``), no CDN and no server, so it opens from disk and works
offline. Every text that came from a log is escaped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from sanitizer import logs, stacks, timeline
from sanitizer.logs import Finding, Reading

STATIC_DIR = Path(__file__).parent / "htmlfiles"
STATIC_FILES = ("style.css", "report.js")
#: Source lines shown either side of each frame's line.
CONTEXT = 2
DEFAULT_OUTPUT = "sanitizer-html"


def add_parser(commands: Any) -> None:
    """The ``sanitize-threads html`` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "html", help="write a static HTML report (index, one page per violation, timelines)",
        description="Merge JSON-lines logs (files, globs, - for stdin) and write a static "
        "HTML report into DIR: index.html and one page per violation.")
    parser.add_argument("logs", nargs="+", metavar="LOG")
    parser.add_argument("-o", "--output", metavar="DIR", default=DEFAULT_OUTPUT,
                        help=f"the directory to write (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--title", default="Thread-affinity violations",
                        help="the report's title")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    reading = logs.read(args.logs)
    for problem in reading.problems():
        print(f"sanitize-threads html: {problem}", file=sys.stderr)
    if reading.unreadable and not reading.events:
        return 2
    try:
        index = write(reading, Path(args.output), args.title)
    except OSError as exc:
        print(f"sanitize-threads html: cannot write {args.output}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    print(f"Wrote the HTML report: {index}")
    return 0


def page_name(finding: Finding) -> str:
    """The finding's page, named by its fingerprint (hex digits only, so always a safe name)."""
    safe = "".join(c for c in finding.fingerprint if c.isalnum())[:40] or "unknown"
    return f"v-{safe}.html"


def write(reading: Reading, directory: Path, title: str) -> Path:
    """Write the report for ``reading`` into ``directory``; return the index's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:
        shutil.copyfile(STATIC_DIR / name, directory / name)
    names: dict[str, str] = {}
    for finding in reading.findings:
        name = names[finding.fingerprint] = page_name(finding)
        _write_page(directory / name, finding_page(finding, title))
    index = directory / "index.html"
    _write_page(index, index_page(reading, title, names))
    return index


def _write_page(path: Path, text: str) -> None:
    # ASCII with character references, as coverage.py does: right whatever the reader assumes.
    path.write_bytes(text.encode("ascii", "xmlcharrefreplace"))


# -- pieces ---------------------------------------------------------------------------------


def _page(title: str, body: str, script: bool = False) -> str:
    js = '<script src="report.js" defer></script>' if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{escape(title)}</title>\n<link rel="stylesheet" href="style.css">\n'
            f'{js}\n</head>\n<body>\n{body}\n</body>\n</html>\n')


def short_path(filename: str) -> str:
    """A frame's file as a reader wants it: relative to here if under it, else as is."""
    if not filename or filename.startswith("<"):
        return filename
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return filename if relative.startswith("..") else relative


def site_html(site: dict[str, Any] | None) -> str:
    if not site:
        return '<span class="none">unknown</span>'
    file = str(site.get("file", "?"))
    return (f'<span class="site" title="{escape(file)}">'
            f'{escape(short_path(file))}:{escape(str(site.get("line", "?")))}</span> '
            f'<span class="function">in {escape(str(site.get("function", "?")))}</span>')


def _site_key(site: dict[str, Any] | None) -> str:
    if not site:
        return ""
    line = site.get("line")
    return f"{short_path(str(site.get('file', '')))}:{line:08d}" if isinstance(line, int) \
        else short_path(str(site.get("file", "")))


def _processes(finding: Finding) -> str:
    processes, hosts = len(finding.processes), len(finding.hosts)
    text = f"{processes} process{'es' if processes != 1 else ''}"
    return text + (f" on {hosts} hosts" if hosts > 1 else "")


def _object(finding: Finding) -> str:
    name = finding.event.get("object_name")
    text = escape(finding.object_type)
    return text + (f' <span class="object-name">{escape(str(name))}</span>' if name else "")


# -- the index ------------------------------------------------------------------------------


def index_page(reading: Reading, title: str, names: dict[str, str]) -> str:
    findings = reading.findings
    parts = [f"<header><h1>{escape(title)}</h1>"]
    processes = {p for f in findings for p in f.processes}
    hosts = {h for h, _ in processes}
    if findings:
        parts.append(f'<p class="totals">{reading.total} violation(s), {len(findings)} unique, '
                     f"in {len(processes)} process(es) on {len(hosts)} host(s)</p>")
    for problem in reading.problems():
        parts.append(f'<p class="problem">{escape(problem)}</p>')
    parts.append("</header>\n<main>")
    if not findings:
        parts.append('<p class="empty">No thread-affinity violations in these logs '
                     f"({reading.events} sanitizer event(s) read).</p></main>")
        return _page(title, "\n".join(parts))
    parts.append(_filters(findings))
    parts.append('<table id="findings" class="findings">\n<thead><tr>'
                 + "".join(f'<th data-sort="{kind}" aria-sort="none">'
                           f'<button type="button">{label}</button></th>'
                           for label, kind in (("Count", "number"), ("Policy", "text"),
                                               ("Object", "text"), ("Access site", "text"),
                                               ("Creation site", "text"),
                                               ("Processes", "number")))
                 + "</tr></thead>\n<tbody>")
    for finding in findings:
        page = escape(names[finding.fingerprint])
        parts.append(
            f'<tr class="finding" data-policy="{escape(finding.policy)}" '
            f'data-type="{escape(finding.object_type)}">'
            f'<td class="count" data-value="{finding.count}">{finding.count}</td>'
            f'<td class="policy"><span class="badge {escape(finding.policy)}">'
            f"{escape(finding.policy)}</span></td>"
            f'<td class="object" data-value="{escape(finding.object_type)}">'
            f'<a href="{page}">{_object(finding)}</a>'
            f' <span class="operation">.{escape(finding.operation)}</span></td>'
            f'<td data-value="{escape(_site_key(finding.access_site))}">'
            f"{site_html(finding.access_site)}</td>"
            f'<td data-value="{escape(_site_key(finding.creation_site))}">'
            f"{site_html(finding.creation_site)}</td>"
            f'<td data-value="{len(finding.processes)}">{escape(_processes(finding))}</td>'
            "</tr>")
    parts.append("</tbody></table>")
    parts.append('<p id="no-match" class="empty" hidden>No violation matches the filters.</p>')
    parts.append("</main>")
    return _page(title, "\n".join(parts), script=True)


def _filters(findings: Iterable[Finding]) -> str:
    findings = list(findings)

    def select(name: str, label: str, values: set[str]) -> str:
        options = "".join(f'<option value="{escape(v)}">{escape(v)}</option>'
                          for v in sorted(values))
        return (f'<label>{label} <select id="filter-{name}" data-filter="{name}">'
                f'<option value="">all</option>{options}</select></label>')

    return ('<div class="filters">'
            + select("policy", "Policy", {f.policy for f in findings})
            + select("type", "Object type", {f.object_type for f in findings})
            + "</div>")


# -- one finding ----------------------------------------------------------------------------


def finding_page(finding: Finding, title: str) -> str:
    event = finding.event
    parts = ['<header><p class="crumbs"><a href="index.html">'
             f"{escape(title)}</a></p>"
             f'<h1><span class="badge {escape(finding.policy)}">{escape(finding.policy)}</span> '
             f"{_object(finding)}.{escape(finding.operation)}</h1>"
             f'<p class="where">at {site_html(finding.access_site)}</p></header>\n<main>']
    parts.append(f'<pre class="message">{escape(str(event.get("message", "")))}</pre>')
    hint = event.get("hint")
    if hint:
        parts.append(f'<p class="hint"><strong>Hint:</strong> {escape(str(hint))}</p>')
    parts.append(_facts(finding))
    parts.append(_timeline(finding))
    thread = timeline.thread_label(event.get("thread"))
    holder = event.get("holder_thread")
    holder_task = event.get("holder_task")
    holder_who = (timeline.thread_label(holder) if isinstance(holder, dict)
                  else f"task {_task(holder_task)}" if holder_task else "the holder")
    parts.append(stack_html("access", f"Access stack: {finding.operation} by {thread}",
                            event.get("access_stack")))
    if event.get("holder_stack"):
        parts.append(stack_html("holder", f"Holder stack: {holder_who}, inside a call",
                                event.get("holder_stack")))
    creator = _creator(event)
    parts.append(stack_html("creation", "Creation stack" + (
        f": made by {timeline.thread_label(creator)}" if creator else ""),
        event.get("creation_stack")))
    if event.get("bound_stack"):
        parts.append(stack_html("bound", "Bound stack: where it was bound to its loop",
                                event.get("bound_stack")))
    parts.append("</main>")
    return _page(f"{finding.policy} {finding.object_type}.{finding.operation}",
                 "\n".join(parts))


def _creator(event: dict[str, Any]) -> dict[str, Any] | None:
    # After a transfer owner_thread is the new owner: the creator is the story's first hand.
    story = [s for s in event.get("story") or () if isinstance(s, dict)]
    if any(s.get("what") == "transfer" for s in story):
        return None
    owner = event.get("owner_thread")
    return owner if isinstance(owner, dict) else None


def _task(info: object) -> str:
    if isinstance(info, dict):
        name = info.get("name", "?")
        coro = info.get("coro")
        return f"'{name}'" + (f" ({coro})" if coro else "")
    return f"'{info}'"


def _loop(info: object) -> str:
    if isinstance(info, dict):
        text = f"L{info.get('serial', '?')} {info.get('type', '')} ({info.get('state', '?')})"
        thread = info.get("thread")
        if isinstance(thread, dict):
            text += f" in thread {timeline.thread_label(thread)}"
        return text
    return str(info)


def _facts(finding: Finding) -> str:
    event = finding.event
    rows: list[tuple[str, str]] = []

    def add(label: str, value: object) -> None:
        if value not in (None, "", [], {}):
            rows.append((label, escape(str(value))))

    add("object", f"{finding.object_type} at {event.get('object_id', '?')}")
    add("name", event.get("object_name"))
    add("root type", event.get("root_type"))
    add("operation", finding.operation)
    add("role", event.get("role"))
    add("resource", event.get("resource"))
    owner = event.get("owner_thread")
    add("owner thread", timeline.thread_label(owner) + (
        "" if event.get("owner_alive", True) else ", which has exited"))
    add("owner context", event.get("owner_context"))
    add("accessing thread", timeline.thread_label(event.get("thread")))
    add("context", event.get("context"))
    if isinstance(event.get("holder_thread"), dict):
        add("holder thread", timeline.thread_label(event["holder_thread"]))
    for key, label in (("owner_loop", "owner loop"), ("loop", "loop")):
        if event.get(key):
            add(label, _loop(event[key]))
    for key, label in (("owner_task", "owner task"), ("task", "task"),
                       ("holder_task", "holder task"), ("bound_task", "bound in task")):
        if event.get(key):
            add(label, _task(event[key]))
    if event.get("after_the_fact"):
        add("reported", "after the fact (the call had already run)")
    args = event.get("args")
    if isinstance(args, dict) and args:
        add("arguments", ", ".join(f"{k}={v}" for k, v in args.items()))
    add("created at", event.get("created_at"))
    add("count", finding.count)
    add("first", finding.first_at)
    add("last", finding.last_at)
    processes = ", ".join(f"pid {pid}" + (f" on {host}" if host else "")
                          for host, pid in sorted(finding.processes))
    add(f"processes ({len(finding.processes)})", processes)
    if len(finding.hosts) > 1:
        add("hosts", ", ".join(sorted(finding.hosts)))
    threads = ", ".join(f"{timeline.thread_label(info)} (pid {pid})"
                        for (_, pid, _), info in sorted(finding.threads.items(),
                                                        key=lambda kv: kv[0]))
    add("threads", threads)
    body = "".join(f"<tr><th>{escape(label)}</th><td>{value}</td></tr>" for label, value in rows)
    return f'<table class="facts">{body}</table>'


def _timeline(finding: Finding) -> str:
    line = timeline.build(finding)
    drawing = timeline.svg(line)
    if not drawing:
        return ('<section class="timeline-section"><h2>Timeline</h2>'
                '<p class="none">The events carry no times to draw.</p></section>')
    event = finding.event
    notes = [f"The object in pid {escape(str(event.get('pid', '?')))}"
             + (f" on {escape(str(event.get('host')))}" if event.get("host") else "")
             + "; hover a mark for its time and site."]
    if line.others:
        notes.append(f"{line.others} other process(es) reported it too (not drawn).")
    if line.holder == "history":
        notes.append("The holder's interval starts at its last access in the history.")
    elif line.holder == "mark":
        notes.append("The holder is marked at the violation (no access history: set history=N "
                     "to see when it entered).")
    legend = ('<ul class="legend"><li><span class="key created"></span>created</li>'
              '<li><span class="key transfer"></span>transfer</li>'
              '<li><span class="key shared-window"></span>shared window</li>'
              '<li><span class="key access"></span>access (history)</li>'
              '<li><span class="key holder"></span>holder</li>'
              '<li><span class="key violation"></span>violation</li></ul>')
    return (f'<section class="timeline-section"><h2>Timeline</h2>'
            f'<p class="note">{" ".join(notes)}</p>{drawing}{legend}</section>')


# -- stacks -----------------------------------------------------------------------------------


def stack_html(kind: str, heading: str, stack: object) -> str:
    frames = [f for f in stack if isinstance(f, dict)] if isinstance(stack, list) else []
    parts = [f'<section class="stack {escape(kind)}-stack" id="{escape(kind)}-stack">'
             f"<h2>{escape(heading)}</h2>"]
    if not frames:
        parts.append('<p class="none">No stack recorded.</p></section>')
        return "".join(parts)
    parts.append('<ol class="frames" start="0">')
    number = 0
    for run in stacks.fold(frames):
        items = []
        for frame in run.frames:
            items.append(frame_html(frame, number))
            number += 1
        if run.library is not None and len(run.frames) > 1:
            parts.append(f'<li class="folded"><details><summary>… {len(run.frames)} frames in '
                         f"{escape(run.library)}</summary><ol class=\"frames\" "
                         f'start="{number - len(run.frames)}">{"".join(items)}</ol>'
                         "</details></li>")
        else:
            parts.extend(items)
    parts.append("</ol></section>")
    return "".join(parts)


def frame_html(frame: dict[str, Any], number: int) -> str:
    file = str(frame.get("file", "?"))
    line = frame.get("line")
    library = stacks.library_of(file)
    css = "frame library" if library else "frame user"
    head = (f'<div class="frame-head"><span class="frame-number">#{number}</span> '
            f"{site_html(frame)}</div>")
    source = stacks.source_lines(file, line, CONTEXT) if isinstance(line, int) else []
    if not source:
        return f'<li class="{css}">{head}</li>'
    rows = "".join(
        f'<tr class="{"marked" if n == line else "context"}"><td class="lineno">{n}</td>'
        f"<td><code>{escape(text) or ' '}</code></td></tr>"
        for n, text in source)
    return f'<li class="{css}">{head}<table class="source">{rows}</table></li>'
