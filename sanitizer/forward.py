"""Forwarding violations from child processes to the process that collects them, through a file."""

# Every Sanitizer.start() imports this module: json, tempfile and shutil are
# imported where they are needed, and no dataclass is built at import.
from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
from types import CodeType
from typing import TYPE_CHECKING, Any

from sanitizer import stacks
from sanitizer.render import OwnDescriptor
from sanitizer.report import Violation
from sanitizer.state import fork_safe

if TYPE_CHECKING:
    from sanitizer.report import Occurrence, Reporter

# "<collector pid>:<path>": spawned children inherit it in os.environ, forked ones in memory.
ENV_VAR = "SANITIZE_THREADS_FORWARD"
# What pytest sets for every phase of a test: "<nodeid> (<phase>)".
ORIGIN_VAR = "PYTEST_CURRENT_TEST"

# A record is one JSON object per line. The first occurrence of a kind in a
# process writes the whole record:
#   {"ref": "<pid>-<n>", "child_pid": ..., "thread_name": ..., "origin": ...,
#    "access_site": {file, line, function} | null, "creation_site": ..., "violation": {...}}
# with "violation" the fields of Violation.event(); later ones only {"again": "<ref>"}.


def announced() -> tuple[int, str] | None:
    """The collector's pid and channel path, if one is announced in the environment."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    pid, sep, path = value.partition(":")
    if not sep or not path or not pid.isdigit():
        return None
    return int(pid), path


def install(reporter: Reporter) -> Forwarder | None:
    """Make a starting sanitizer forward its violations, if a collector is announced.

    First among the steps added to the pipeline: a later one may raise (per test).
    """
    found = announced()
    if found is None:
        return None
    forwarder = Forwarder(reporter, *found)
    reporter.add(forwarder)
    return forwarder


# -- the child's side ---------------------------------------------------------------------

class Forwarder:
    """A pipeline step: in any process but the collector, appends each violation to the channel.

    Inert in the collecting process itself; after fork() the same step
    forwards from the child. Each line is one ``os.write`` on an O_APPEND
    descriptor, opened by path at the first record: lines from many processes
    never interleave, and an ``os._exit`` right after loses nothing. It never
    raises.
    """

    def __init__(self, reporter: Reporter, collector: int, path: str) -> None:
        self.reporter = reporter
        self.collector = collector
        self.path = path
        self._lock = fork_safe(threading.Lock())
        self._pid = 0  # the process that the state below belongs to
        # Opened by path at the first record; no O_CREAT: once the collector has
        # removed the channel, nothing is written.
        self._out = OwnDescriptor(
            lambda: os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC), now=False)
        self._refs: dict[tuple[object, ...], str] = {}  # violation key -> its record's ref

    def __call__(self, occurrence: Occurrence) -> Occurrence:
        pid = os.getpid()
        if pid != self.collector:
            self.forward(occurrence.violation, pid)
        return occurrence

    def forward(self, violation: Violation, pid: int) -> None:
        try:
            self._forward(violation, pid)
        except OSError:
            pass  # the collector is gone (its session ended), or the disk is full: nothing to say
        except Exception as exc:
            try:
                self.reporter.internal_error(exc, "forwarding a violation to the parent process")
            except Exception:  # pragma: no cover - never raise into the guarded call
                pass

    def _forward(self, violation: Violation, pid: int) -> None:
        with self._lock:
            if self._pid != pid:  # a new process: the records of its own
                self._pid = pid
                self._refs = {}
            key = violation.key
            ref = self._refs.get(key)
            if ref is not None:
                self._write({"again": ref})
                return
            ref = f"{pid}-{len(self._refs) + 1}"
            access, creation = violation.access_site, violation.creation_site
            self._write({
                "ref": ref,
                "child_pid": pid,
                "thread_name": threading.current_thread().name,
                "origin": os.environ.get(ORIGIN_VAR),
                "access_site": stacks.frame_dict(access) if access else None,
                "creation_site": stacks.frame_dict(creation) if creation else None,
                "violation": violation.event(),
            })
            self._refs[key] = ref  # after the write: a failed one is retried in full

    def _write(self, record: dict[str, Any]) -> None:
        import json

        data = (json.dumps(record, default=repr, separators=(",", ":")) + "\n").encode(
            "utf-8", "replace")
        self._out.write(data)  # one write per line: whole, and before any os._exit


# -- the collector's side -----------------------------------------------------------------


class ForwardedViolation(Violation):
    """A violation that a child process forwarded: its fields, pid, thread, origin and sites.

    Its stacks are rebuilt from file, line and function (stand-in code objects),
    so that suppression rules, ``key`` and the reports treat it like a local one;
    ``event()`` gives the child's own fields.
    """

    def __init__(self, *, child_pid: int, thread_name: str, origin: str | None,
                 fields: dict[str, Any], sites: tuple[stacks.Frame | None, stacks.Frame | None],
                 **values: Any) -> None:
        super().__init__(**values)
        self.child_pid = child_pid
        self.thread_name = thread_name
        self.origin = origin  # the child's PYTEST_CURRENT_TEST when it was started
        self.fields = fields
        self.sites = sites  # (creation, access)

    @property
    def creation_site(self) -> stacks.Frame | None:
        return self.sites[0]

    @property
    def access_site(self) -> stacks.Frame | None:
        return self.sites[1]

    def event(self) -> dict[str, Any]:
        return dict(self.fields)

    @property
    def origin_test(self) -> tuple[str, str] | None:
        """(nodeid, phase) from the origin, if it names a test."""
        if not self.origin:
            return None
        nodeid, sep, phase = self.origin.rpartition(" (")
        return (nodeid, phase.rstrip(")")) if sep and nodeid else None


_STACK_FIELDS = ("creation_stack", "access_stack", "holder_stack")
_codes: dict[tuple[str, int, str], CodeType] = {}


def _frame(data: Any) -> stacks.Frame | None:
    """A stand-in for a captured frame: offset -1 makes its line co_firstlineno."""
    if not isinstance(data, dict):
        return None
    where = (str(data.get("file", "<unknown>")), int(data.get("line") or 0),
             str(data.get("function", "<unknown>")))
    code = _codes.get(where)
    if code is None:
        code = compile("", "<forwarded>", "exec").replace(
            co_filename=where[0], co_firstlineno=max(where[1], 0), co_name=where[2])
        if sys.version_info >= (3, 11):  # the child wrote co_qualname: "Class.method"
            code = code.replace(co_name=where[2].rpartition(".")[2], co_qualname=where[2])
        _codes[where] = code
    return (code, -1)


def violation_of(record: dict[str, Any]) -> ForwardedViolation:
    """The ForwardedViolation that a full record describes (ValueError etc. if it is not one)."""
    fields = record["violation"]
    names = {f.name for f in dataclasses.fields(Violation)}
    values = {k: v for k, v in fields.items() if k in names}
    for name in _STACK_FIELDS:
        frames = (_frame(f) for f in fields.get(name) or ())
        values[name] = tuple(f for f in frames if f is not None)
    values["object_id"] = int(str(fields.get("object_id", "0")), 0)
    return ForwardedViolation(
        **values,
        child_pid=int(record["child_pid"]),
        thread_name=str(record.get("thread_name") or ""),
        origin=record.get("origin"),
        fields=dict(fields),
        sites=(_frame(record.get("creation_site")), _frame(record.get("access_site"))),
    )


class Channel:
    """The collecting side: a file in a private directory, announced in the environment.

    ``poll()`` returns one ForwardedViolation per occurrence forwarded since the
    last call (repeats are the same object). It is meant to be called often:
    when nothing is new it costs one ``lseek``.
    """

    def __init__(self) -> None:
        import tempfile

        self.pid = os.getpid()
        self.directory = tempfile.mkdtemp(prefix="sanitize-threads-")
        self.path = os.path.join(self.directory, "forwarded.jsonl")
        self.skipped = 0  # lines that were not records (nothing should write those)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o600)
        self._offset = 0
        self._partial = b""
        self._records: dict[str, ForwardedViolation] = {}
        self._reading = fork_safe(threading.Lock())
        self._previous = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = f"{self.pid}:{self.path}"
        atexit.register(self.close)  # a collector that ends without close() leaves nothing

    def poll(self) -> list[ForwardedViolation]:
        fd = self._fd
        if fd < 0:
            return []
        size = os.lseek(fd, 0, os.SEEK_END)  # the size, a third of what os.fstat costs
        if size <= self._offset:
            return []
        with self._reading:  # taken only when there is something to read
            data = os.pread(fd, max(size - self._offset, 0), self._offset)
            self._offset += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            return [v for v in map(self._parse, lines) if v is not None]

    def _parse(self, line: bytes) -> ForwardedViolation | None:
        import json

        try:
            item = json.loads(line)
            if "again" in item:
                return self._records[item["again"]]
            violation = violation_of(item)
        except Exception:
            self.skipped += 1
            return None
        self._records[str(item["ref"])] = violation
        return violation

    def close(self) -> None:
        """Remove the file, and announce again what was announced before; safe to call twice."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        atexit.unregister(self.close)
        if os.getpid() != self.pid:
            return  # a forked copy: the file is the collector's
        if self._previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = self._previous
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)
