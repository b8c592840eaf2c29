"""Reading sanitizer logs: JSON lines from any number of processes, merged into findings.

A log is what ``log_file=`` (or ``format=json`` on stderr) wrote: one
``thread_affinity_violation`` event per kind of misuse per process (the first
occurrence, with its stacks), and at exit one ``thread_affinity_summary`` per
process (or per run of the sanitizer, where a process stopped it before exit) with
each kind's exact count, times and threads. Many processes (gunicorn
workers, xdist workers, several CI jobs) may append to one file or write their own.

Reading never raises on bad input: a line that is not JSON, not a sanitizer
event, or malformed is counted and skipped; a newer schema is read as far as
its known fields go. ``Reading.problems`` says each of those once.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from sanitizer.render import EVENT, SCHEMA, SUMMARY_EVENT

#: A process, as logs from several machines tell them apart.
Process = tuple[str, int]  # (host, pid)


@dataclasses.dataclass
class Finding:
    """One kind of misuse, merged over every process that reported it."""

    fingerprint: str
    #: The first full event of this kind met in the logs (stacks, threads, message).
    event: dict[str, Any]
    #: Exact counts per process: the summary's where the process wrote one, else its events.
    counts: dict[Process, int] = dataclasses.field(default_factory=dict)
    #: Every occurrence known (from the summaries): at, host, pid, thread (serial), task.
    occurrences: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: Threads involved, by (host, pid, serial): their descriptions.
    threads: dict[tuple[str, int, int], dict[str, Any]] = dataclasses.field(
        default_factory=dict)
    first_at: str = ""
    last_at: str = ""
    # Per process: the counts of its summaries so far (a process that stopped and
    # started the sanitizer again wrote one per run), and its events since the last.
    _summed: dict[Process, int] = dataclasses.field(default_factory=dict, repr=False)
    _pending: dict[Process, int] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def processes(self) -> set[Process]:
        return set(self.counts)

    @property
    def hosts(self) -> set[str]:
        return {host for host, _ in self.counts}

    @property
    def policy(self) -> str:
        return str(self.event.get("policy", "?"))

    @property
    def object_type(self) -> str:
        return str(self.event.get("object_type", "?"))

    @property
    def operation(self) -> str:
        return str(self.event.get("operation", "?"))

    @property
    def access_site(self) -> dict[str, Any] | None:
        return _site(self.event, "access")

    @property
    def creation_site(self) -> dict[str, Any] | None:
        return _site(self.event, "creation")

    def _count(self, process: Process, summed: int = 0, *, event: bool = False) -> None:
        """An event (one more, until a summary covers it), or a summary's exact count
        (which includes the events of its run that came before it)."""
        if event:
            self._pending[process] = self._pending.get(process, 0) + 1
        else:
            self._summed[process] = self._summed.get(process, 0) + summed
            self._pending[process] = 0
        self.counts[process] = self._summed.get(process, 0) + self._pending[process]

    def _thread(self, process: Process, info: object) -> None:
        """Remember a thread dict of an event or summary, by its serial in ``process``."""
        if isinstance(info, dict) and isinstance(info.get("serial"), int):
            self.threads.setdefault((*process, info["serial"]), info)

    def _seen(self, at: str) -> None:
        if at and (not self.first_at or at < self.first_at):
            self.first_at = at
        if at and at > self.last_at:
            self.last_at = at


@dataclasses.dataclass
class Reading:
    """What a set of logs held: findings, most frequent first, and what was skipped."""

    findings: list[Finding]
    #: Events read, lines skipped by reason, files that could not be read (with why).
    events: int = 0
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    newer: int = 0
    unreadable: list[str] = dataclasses.field(default_factory=list)
    #: Files (and stdin) read to their end.
    sources: int = 0

    @property
    def total(self) -> int:
        return sum(f.count for f in self.findings)

    def problems(self) -> list[str]:
        """One line per kind of trouble met, for stderr."""
        lines = [f"cannot read {what}" for what in self.unreadable]
        lines += [f"skipped {n} line(s): {reason}" for reason, n in sorted(self.skipped.items())]
        if self.newer:
            lines.append(f"{self.newer} event(s) have a newer schema than {SCHEMA}: read "
                         "as far as their known fields go (upgrade sanitize-threads)")
        return lines


def _site(event: dict[str, Any], which: str) -> dict[str, Any] | None:
    site = event.get(f"{which}_site")
    if isinstance(site, dict):
        return site
    stack = event.get(f"{which}_stack")
    return stack[0] if isinstance(stack, list) and stack and isinstance(stack[0], dict) else None


def _where(site: dict[str, Any] | None) -> tuple[object, object]:
    return (site.get("file"), site.get("line")) if site else (None, None)


def fingerprint_of(event: dict[str, Any]) -> str:
    """The event's own fingerprint, or one made the same way from its fields (Violation.key)."""
    value = event.get("fingerprint")
    if isinstance(value, str) and value:
        return value
    key = (event.get("policy"), event.get("object_type"), event.get("operation"),
           _where(_site(event, "creation")), _where(_site(event, "access")))
    return hashlib.sha1(repr(key).encode(), usedforsecurity=False).hexdigest()[:16]


# -- input ------------------------------------------------------------------------------


def expand(sources: Iterable[str]) -> Iterator[str]:
    """Files, ``-`` for stdin, and globs (a pattern that names no file as it is)."""
    for source in sources:
        if source == "-" or os.path.exists(source) or not glob.has_magic(source):
            yield source
        else:
            matches = sorted(glob.glob(source, recursive=True))
            yield from matches or [source]  # no match: reported as unreadable


def _lines(source: str) -> Iterator[str]:
    if source == "-":
        stream: IO[bytes] = sys.stdin.buffer
        for raw in stream:
            yield raw.decode("utf-8", "replace")
        return
    with open(source, "rb") as file:
        for raw in file:
            yield raw.decode("utf-8", "replace")


def read(sources: Iterable[str]) -> Reading:
    """Read and merge every event of ``sources``; never raises on their content."""
    merger = _Merger()
    done: set[str] = set()
    for source in expand(sources):
        real = source if source == "-" else os.path.realpath(source)
        if real in done:
            continue  # named twice (a glob and a name): its counts are not doubled
        done.add(real)
        try:
            for line in _lines(source):
                merger.line(line)
            merger.reading.sources += 1
        except OSError as exc:
            merger.reading.unreadable.append(f"{source}: {exc.strerror or exc}")
        except UnicodeError as exc:  # pragma: no cover - decoding uses "replace"
            merger.reading.unreadable.append(f"{source}: {exc}")
    return merger.finish()


# What a sanitizer event with fields of the wrong types raises while it is merged.
_MALFORMED = (TypeError, ValueError, AttributeError, KeyError)
_MALFORMED_REASON = "a sanitizer event with malformed fields"


class _Merger:
    def __init__(self) -> None:
        self.reading = Reading(findings=[])
        self.by_fingerprint: dict[str, Finding] = {}
        # Applied at the end: files may come in any order, a summary before its events.
        self.summaries: list[dict[str, Any]] = []

    def line(self, line: str) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError:
            self.reading.skipped["not JSON (a truncated or foreign line)"] += 1
            return
        name = event.get("event") if isinstance(event, dict) else None
        if name not in (EVENT, SUMMARY_EVENT):
            self.reading.skipped["not a sanitizer event"] += 1
            return
        schema = event.get("schema", SCHEMA)
        if isinstance(schema, int) and schema > SCHEMA:
            self.reading.newer += 1
        try:
            if name == EVENT:
                self.violation(event)
            elif isinstance(event.get("violations") or [], list):
                self.summaries.append(event)
            else:
                raise TypeError("violations")
        except _MALFORMED:
            self.reading.skipped[_MALFORMED_REASON] += 1
            return
        self.reading.events += 1

    def violation(self, event: dict[str, Any]) -> None:
        if not isinstance(event.get("policy"), str):
            raise ValueError("no policy")
        process = _process(event)
        key = fingerprint_of(event)
        finding = self.by_fingerprint.get(key)
        if finding is None:
            finding = self.by_fingerprint[key] = Finding(key, event)
        finding._count(process, event=True)
        at = str(event.get("timestamp", ""))
        finding._seen(at)
        for field in ("thread", "owner_thread", "holder_thread"):
            finding._thread(process, event.get(field))

    def summary(self, event: dict[str, Any]) -> None:
        process = _process(event)
        for tally in event.get("violations") or ():
            key = tally.get("fingerprint")
            finding = self.by_fingerprint.get(key) if isinstance(key, str) else None
            if finding is None:
                continue  # its event was lost (a full disk) or is in a log not given
            finding._count(process, int(tally.get("count", 1)))
            finding._seen(str(tally.get("first_at", "")))
            finding._seen(str(tally.get("last_at", "")))
            for info in tally.get("threads") or ():
                finding._thread(process, info)
            for occurrence in tally.get("occurrences") or ():
                if isinstance(occurrence, dict):
                    finding.occurrences.append(
                        {**occurrence, "host": process[0], "pid": process[1]})

    def finish(self) -> Reading:
        for summary in self.summaries:
            try:
                self.summary(summary)
            except _MALFORMED:
                self.reading.skipped[_MALFORMED_REASON] += 1
                self.reading.events -= 1  # counted as read when it was deferred
        findings = list(self.by_fingerprint.values())
        for finding in findings:
            finding.occurrences.sort(key=lambda o: str(o.get("at", "")))
        findings.sort(key=lambda f: (-f.count, f.first_at))
        self.reading.findings = findings
        return self.reading


def _process(event: dict[str, Any]) -> Process:
    pid = event.get("pid")
    return (str(event.get("host", "")), pid if isinstance(pid, int) else 0)
