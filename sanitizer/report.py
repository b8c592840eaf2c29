"""Violation records, suppressions, dedup, and the sanitizer's private structlog pipeline."""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from sanitizer import stacks
from sanitizer.exceptions import ConfigError, ThreadAffinityError, ThreadAffinityWarning
from sanitizer.options import Options

EVENT = "thread_affinity_violation"


@dataclasses.dataclass
class Violation:
    """One kind of misuse: a (policy, object type, operation, creation site, access site),
    and how often it happened."""

    policy: str
    object_type: str
    object_id: int
    operation: str
    owner_thread: dict[str, Any]
    thread: dict[str, Any]
    pid: int
    owner_pid: int
    creation_stack: stacks.Stack
    access_stack: stacks.Stack
    message: str
    count: int = 1
    object_name: str | None = None
    root_type: str | None = None
    owner_alive: bool = True
    owner_context: list[str] = dataclasses.field(default_factory=list)
    context: list[str] = dataclasses.field(default_factory=list)
    holder_thread: dict[str, Any] | None = None
    holder_stack: stacks.Stack = ()
    resource: dict[str, Any] | None = None
    args: dict[str, str] | None = None
    #: How the object took part, when not as the one whose method was called.
    role: str | None = None

    @property
    def creation_site(self) -> stacks.Frame | None:
        return stacks.site_of(self.creation_stack)

    @property
    def access_site(self) -> stacks.Frame | None:
        return stacks.site_of(self.access_stack)

    @property
    def key(self) -> tuple[object, ...]:
        def where(frame: stacks.Frame | None) -> tuple[str, int] | None:
            return stacks.location(frame) if frame else None

        # Different operations or types met on one line are different findings.
        return (self.policy, self.object_type, self.operation, where(self.creation_site),
                where(self.access_site))

    @property
    def summary(self) -> str:
        return f"thread-affinity ({self.policy}) {stacks.describe_site(self.access_site)}"

    def event(self) -> dict[str, Any]:
        """The JSON fields, in a stable order, without timestamp and level (structlog adds them)."""
        fields: dict[str, Any] = {
            "policy": self.policy,
            "object_type": self.object_type,
            "object_id": f"{self.object_id:#x}",
            "operation": self.operation,
            "owner_thread": self.owner_thread,
            "thread": self.thread,
            "pid": self.pid,
            "owner_pid": self.owner_pid,
            "creation_stack": stacks.as_dicts(self.creation_stack),
            "access_stack": stacks.as_dicts(self.access_stack),
            "count": self.count,
            "message": self.message,
            "owner_alive": self.owner_alive,
        }
        optional = {
            "object_name": self.object_name,
            "root_type": self.root_type,
            "owner_context": self.owner_context,
            "context": self.context,
            "holder_thread": self.holder_thread,
            "holder_stack": stacks.as_dicts(self.holder_stack) if self.holder_stack else None,
            "resource": self.resource,
            "args": self.args,
            "role": self.role,
        }
        fields.update((k, v) for k, v in optional.items() if v)
        return fields


# -- suppressions -----------------------------------------------------------------


@dataclasses.dataclass
class Rule:
    """One suppression: ``kind:pattern`` (``site``-like kinds may end in ``:LINE``)."""

    kind: str
    pattern: str
    line: int | None
    origin: str
    hits: int = 0

    def matches(self, violation: Violation) -> bool:
        if self.kind == "object":
            return fnmatch.fnmatchcase(violation.object_type, self.pattern)
        if self.kind == "policy":
            return fnmatch.fnmatchcase(violation.policy, self.pattern)
        scope, _, what = self.kind.rpartition("-")
        frames = {"access": violation.access_stack, "creation": violation.creation_stack,
                  "": (*violation.access_stack, *violation.creation_stack)}[scope]
        if what == "site":
            return any(self._site_matches(*stacks.location(frame)) for frame in frames)
        return any(fnmatch.fnmatchcase(name, self.pattern)
                   for code, _ in frames for name in _function_names(code))

    def _site_matches(self, filename: str, line: int) -> bool:
        if self.line is not None and self.line != line:
            return False
        return fnmatch.fnmatchcase(filename, self.pattern) or fnmatch.fnmatchcase(
            filename, "*/" + self.pattern.lstrip("/"))

    def __str__(self) -> str:
        return f"{self.kind}:{self.pattern}" + (f":{self.line}" if self.line is not None else "")


# access-*: a frame of the stack that touched the object; creation-*: of the stack
# that made it. site and function match either stack: a rule meant for the line of
# a use also matches every object created there, so the scoped forms are better.
RULE_KINDS = ("access-site", "creation-site", "access-function", "creation-function",
              "object", "policy", "site", "function")


def _function_names(code: Any) -> tuple[str, ...]:
    qualname = getattr(code, "co_qualname", code.co_name)
    module = _module_of(code.co_filename)
    return (qualname, f"{module}.{qualname}") if module else (qualname,)


def _module_of(filename: str) -> str | None:
    best = ""
    for entry in sys.path:
        entry = os.path.abspath(entry or ".") + os.sep
        if filename.startswith(entry) and len(entry) > len(best):
            best = entry
    if not best or not filename.endswith(".py"):
        return None
    module = filename[len(best):-3].replace(os.sep, ".")
    return module.removesuffix(".__init__")


def load_suppressions(path: str) -> list[Rule]:
    """Parse a suppressions file: ``kind:pattern`` per line, ``#`` comments."""
    rules = []
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"suppressions={path!r}: cannot read file: {exc.strerror}",
                          key="suppressions", value=path) from None
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        kind, _, pattern = text.partition(":")
        if kind not in RULE_KINDS or not pattern:
            raise ConfigError(
                f"suppressions={path}:{number}: bad rule {text!r}; expected KIND:PATTERN "
                f"with KIND one of: {', '.join(RULE_KINDS)}", key="suppressions", value=text)
        line = None
        if kind.endswith("site"):
            head, sep, tail = pattern.rpartition(":")
            if sep and tail.isdigit():
                pattern, line = head, int(tail)
        rules.append(Rule(kind, pattern, line, f"{path}:{number}"))
    return rules


# -- output -----------------------------------------------------------------------


class LineWriter:
    """structlog's logger at the end of our pipeline: one ``os.write`` per event.

    A single write of a whole line, on an O_APPEND descriptor, keeps lines from
    many threads and processes whole, and survives a following ``os._exit``.

    It writes only to the descriptor it opened itself: a program may close it or
    reuse its number (a daemon's ``closerange``, a ``dup2``), so the descriptor is
    checked before each write (writes are rare: one per unique violation) and
    reopened if it is no longer ours. A line that cannot be written is counted as
    lost, said once on fd 2, and never raised into the program.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path  # None: stderr
        self.name = path or "stderr"
        self.lost = 0
        self.failure: OSError | None = None
        # One check-reopen-write at a time (no leaked reopens); reentrant, so that a
        # signal handler reporting in the middle of a write cannot deadlock the program.
        self._lock = threading.RLock()
        self.fd = self._open()  # an OSError here, at start, is a bad path failing early
        self._identity = _identity(self.fd)

    def _open(self) -> int:
        """A new descriptor for our destination, close-on-exec: children never inherit it."""
        if self.path is None:
            # Reports go to stderr, even if the program later rebinds sys.stderr;
            # os.dup's copy is non-inheritable (PEP 446), i.e. close-on-exec.
            return os.dup(2)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return os.open(self.path, flags, 0o644)

    def _ensure_ours(self) -> None:
        """Reopen if the program closed our descriptor or put a file of its own under it."""
        try:
            if _identity(self.fd) == self._identity:
                return
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
        # The old number is the program's now (or free): never write to it or close it.
        self.fd = self._open()
        self._identity = _identity(self.fd)

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` to our destination, or raise the OSError."""
        self._ensure_ours()
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def msg(self, message: str) -> None:
        """Write one event line; if it cannot be written, count it as lost instead."""
        data = _line(message)
        with self._lock:
            if self.failure is None:
                try:
                    self._write(data)
                    return
                except OSError as exc:  # ENOSPC, EPIPE, EIO, a failed reopen, ...
                    self.failure = exc
                    self._say_failure(exc)
            self.lost += 1

    warning = error = info = critical = debug = msg

    def write_text(self, text: str) -> None:
        """Lines that are not reports (the exit summary): best effort, not counted."""
        with self._lock:
            if self.failure is None:
                try:
                    self._write(_line(text))
                except OSError:
                    pass

    def _say_failure(self, exc: OSError) -> None:
        """The first loss is said once, on fd 2; later ones only count."""
        notice = (f"sanitizer: cannot write reports to {self.name}: {exc}; "
                  "further reports are counted, not written")
        try:
            os.write(2, _line(notice))
        except OSError:
            pass  # stderr may be the very destination that broke

    def reset_after_fork(self) -> None:
        """A child counts (and says) its own losses; the lock may have been held at fork."""
        self._lock = threading.RLock()
        self.lost = 0
        self.failure = None


def _line(text: str) -> bytes:
    """One line, encoded: what a single write sends."""
    return (text.rstrip("\n") + "\n").encode("utf-8", "replace")


def _identity(fd: int) -> tuple[int, int]:
    """Which file a descriptor is open on."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def render_console(_logger: object, _method: str, event_dict: dict[str, Any]) -> str:
    """A ThreadSanitizer-like report for people."""
    if event_dict.get("event") != EVENT:
        import structlog

        return structlog.dev.ConsoleRenderer(colors=False)(_logger, _method, event_dict)
    e = event_dict

    def thread(info: dict[str, Any], pid: int, alive: bool = True) -> str:
        state = "" if alive else ", exited"
        return (f"thread T{info['serial']} '{info['name']}' (ident {info['ident']}, "
                f"native {info['native_id']}{state}) in pid {pid}")

    def frames(stack: list[dict[str, Any]]) -> list[str]:
        if not stack:
            return ["    <no Python frames>"]
        return [f"    #{i} {f['file']}:{f['line']} in {f['function']}"
                for i, f in enumerate(stack)]

    what = e["object_type"] + (f" {e['object_name']!r}" if e.get("object_name") else "")
    lines = [
        "=" * 18,
        f"WARNING: thread-affinity violation ({e['policy']}) on {what} at {e['object_id']}",
        f"  {e['message']}",
        f"  {e['operation']} by {thread(e['thread'], e['pid'])}:",
        *frames(e["access_stack"]),
    ]
    lines += [f"    ({c})" for c in e.get("context", ())]
    if e.get("holder_thread"):
        lines.append(f"  At the same time in use by {thread(e['holder_thread'], e['pid'])}:")
        lines += frames(e.get("holder_stack") or [])
    created = e.get("root_type") or e["object_type"]
    lines.append(f"  {created} created by "
                 f"{thread(e['owner_thread'], e['owner_pid'], e['owner_alive'])}:")
    lines += frames(e["creation_stack"])
    lines += [f"    ({c})" for c in e.get("owner_context", ())]
    if e.get("resource"):
        lines.append("  resource: " + ", ".join(f"{k}={v}" for k, v in e["resource"].items()))
    if e.get("args"):
        lines.append("  arguments: " + ", ".join(f"{k}={v}" for k, v in e["args"].items()))
    user = [f for f in e["access_stack"] if not stacks.is_library_file(str(f["file"]))]
    site = (user or e["access_stack"] or [None])[0]
    where = f"{site['file']}:{site['line']} in {site['function']}" if site else "<unknown>"
    lines += [f"SUMMARY: thread-affinity ({e['policy']}) {where}", "=" * 18]
    return "\n".join(lines)


def _json_default(value: object) -> str:
    return repr(value)


def processors(fmt: str) -> list[Callable[..., Any]]:
    """The pipeline, top to bottom: level, timestamp, then one renderer."""
    import structlog  # only once there is something to report: ~15 ms of start-up

    renderer: Callable[..., Any] = (
        render_console if fmt == "console"
        else structlog.processors.JSONRenderer(default=_json_default)
    )
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        renderer,
    ]


def open_output(options: Options) -> tuple[LineWriter, str]:
    """Where events go, and their format (opened at start: a bad path fails early)."""
    writer = LineWriter(options.log_file or None)
    fmt = options.format or ("console" if not options.log_file and os.isatty(writer.fd)
                             else "json")
    return writer, fmt


def build_logger(writer: LineWriter, fmt: str) -> Any:
    """Our own pipeline: never ``structlog.configure()``, the app's logging is not ours."""
    import structlog

    return structlog.wrap_logger(
        writer,
        processors=processors(fmt),
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )


# -- the reporter -----------------------------------------------------------------

# (this occurrence, whether it is the first of its kind): every unsuppressed one.
Listener = Callable[[Violation, bool], None]


class Reporter:
    """Takes violations, drops suppressed ones, dedups, logs, warns and raises."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.rules = load_suppressions(options.suppressions) if options.suppressions else []
        self.output, self._format = open_output(options)
        self._logger: Any = None
        self.unique: dict[tuple[object, ...], Violation] = {}
        self.listeners: list[Listener] = []
        self.total = 0
        self._lock = threading.Lock()
        self._internal_errors: set[tuple[str, str]] = set()

    @property
    def logger(self) -> Any:
        """The structlog pipeline, built at the first event."""
        if self._logger is None:
            self._logger = build_logger(self.output, self._format)
        return self._logger

    def handle(self, violation: Violation) -> None:
        if self.suppressed(violation):
            return
        with self._lock:
            seen = self.unique.get(violation.key)
            if seen is not None:
                seen.count += 1
            else:
                self.unique[violation.key] = violation
            self.total += 1
        first = seen is None
        current = violation if first else seen
        assert current is not None
        # Listeners see this occurrence (its thread, object and stacks), not the
        # first one of its kind; ``first`` says whether it is new.
        for listener in list(self.listeners):
            listener(violation, first)
        actions = self.options.action
        if first and "log" in actions:
            self.logger.warning(EVENT, **violation.event())
        if first and "warn" in actions:
            filename, line = stacks.location(violation.access_site)
            warnings.warn_explicit(ThreadAffinityWarning(violation.message),
                                   ThreadAffinityWarning, filename, line)
        if "raise" in actions:
            raise ThreadAffinityError(current)

    def suppressed(self, violation: Violation) -> bool:
        for rule in self.rules:
            if rule.matches(violation):
                rule.hits += 1
                return True
        return False

    def internal_error(self, exc: BaseException, where: str) -> None:
        """Report a bug in the sanitizer once per kind; never raise."""
        key = (type(exc).__name__, where)
        if key in self._internal_errors:
            return
        self._internal_errors.add(key)
        try:
            self.logger.error("sanitizer_internal_error", where=where,
                              error=f"{type(exc).__name__}: {exc}",
                              hint="the original call went ahead; please report this")
        except Exception:  # pragma: no cover - the log itself is broken
            pass

    def exit_summary(self) -> list[str]:
        """Lines for stderr at exit: counts, sites and unused suppressions."""
        lines = []
        if self.unique:
            lines.append(
                f"sanitizer: {self.total} thread-affinity violation(s), "
                f"{len(self.unique)} unique, in pid {os.getpid()}:")
            lines += [f"  {v.count:>5} x {v.summary}" for v in self.unique.values()]
        unused = [r for r in self.rules if not r.hits]
        if unused and (self.unique or self.total or self.rules):
            lines.append("sanitizer: suppressions that never matched:")
            lines += [f"  {r.origin}: {r}" for r in unused]
        if self.output.lost:
            lines.append(f"sanitizer: {self.output.lost} report(s) could not be written "
                         f"to {self.output.name}")
        return lines

    def write_summary(self, lines: list[str]) -> None:
        """The exit summary, to stderr, by the same checked path as reports; never raises."""
        stderr = self.output
        if self.output.path is not None:
            try:
                stderr = LineWriter(None)  # the log file is elsewhere; at exit, once
            except OSError:
                return  # fd 2 is closed: nowhere to say it
        stderr.write_text("\n".join(lines))

    def reset_after_fork(self) -> None:
        """A child reports its own violations; the parent's are not repeated at its exit."""
        self._lock = threading.Lock()
        self.unique = {}
        self.total = 0
        self.output.reset_after_fork()
        for rule in self.rules:
            rule.hits = 0

    def unique_violations(self) -> list[Violation]:
        return list(self.unique.values())


def quote_args(values: Iterable[tuple[str, object]]) -> dict[str, str]:
    return {name: repr(value)[:200] for name, value in values}
