"""The Violation record, and the pipeline each one runs through: suppress, dedup, act."""

from __future__ import annotations

import dataclasses
import hashlib
import json  # now, not in a report: a forked child may need it (Reporter.logger)
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from sanitizer import loops, masking, stacks, threads
from sanitizer.exceptions import ThreadAffinityError, ThreadAffinityWarning
from sanitizer.options import Options
from sanitizer.ownership import CROWD, FORKED, NEVER, OwnerRecord, qualified_type
from sanitizer.policies import RESERVED_PREFIX, Policy
from sanitizer.render import (
    EVENT,
    HOST,
    SCHEMA,
    SUMMARY_EVENT,
    LineWriter,
    build_logger,
    iso,
    open_output,
    render_console,
)
from sanitizer.state import STATE, fork_safe
from sanitizer.suppressions import Rule, load_suppressions

_FINALIZER_CODES = {weakref.finalize.__call__.__code__}

#: Occurrences of one kind whose time and thread are kept (for the HTML timeline);
#: the count goes on past it.
OCCURRENCE_LIMIT = 1000


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
    # -- event loops and tasks (loops.py), where they take part --
    #: The loop running in the accessing thread, and the loop the object belongs to.
    loop: dict[str, Any] | None = None
    owner_loop: dict[str, Any] | None = None
    #: The accessing task, the task inside an operation on the object, the task that made it.
    task: dict[str, Any] | None = None
    holder_task: dict[str, Any] | None = None
    owner_task: dict[str, Any] | None = None
    #: Where (and in which task) the object was bound to its loop, if not where it was made.
    bound_stack: stacks.Stack = ()
    bound_task: dict[str, Any] | None = None
    #: Seen only after the state changed: reported, never raised (policies.Policy).
    after_the_fact: bool = False
    #: How such a bug is usually fixed, in one line: the policy's words (Policy.advice_for),
    #: or an integration's where it knows better (the pytest plugin: loop scopes).
    hint: str | None = None
    #: Where the object itself was made, when its creation stack is its parent's (a
    #: DB-API cursor's own record: OwnerRecord.derived_site).
    derived_site: stacks.Frame | None = None
    # -- for the timeline (cold path only) --
    #: When this occurrence happened (time.time()), and when the object was made.
    at: float = 0.0
    created_at: float = 0.0
    #: The object's changes of hands (OwnerRecord.note) and last accesses (``history``).
    story: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: Of the first of a kind (Dedup): every occurrence's (time, thread, task), the
    #: first OCCURRENCE_LIMIT, and the last one's time.
    occurrences: list[tuple[float, dict[str, Any], dict[str, Any] | None]] = dataclasses.field(
        default_factory=list, repr=False)
    last_at: float = 0.0

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
    def fingerprint(self) -> str:
        """The key as 16 hex digits: the same kind has the same one in every process."""
        return hashlib.sha1(repr(self.key).encode(), usedforsecurity=False).hexdigest()[:16]

    def occurred(self, other: Violation) -> None:
        """Count ``other``, an occurrence of this kind (this one's own included)."""
        if len(self.occurrences) < OCCURRENCE_LIMIT:
            self.occurrences.append((other.at, other.thread, other.task))
        self.last_at = max(self.last_at, other.at)

    def tally(self) -> dict[str, Any]:
        """This kind's entry in the exit summary event."""
        threads_seen: dict[object, dict[str, Any]] = {}
        for _, thread, _task in self.occurrences:
            threads_seen.setdefault(thread.get("serial"), thread)
        return {
            "fingerprint": self.fingerprint,
            "summary": self.summary,
            "count": self.count,
            "first_at": iso(self.at),
            "last_at": iso(self.last_at or self.at),
            "threads": list(threads_seen.values()),
            "occurrences": [{"at": iso(at), "thread": thread.get("serial"),
                             **({"task": task.get("name")} if task else {})}
                            for at, thread, task in self.occurrences],
        }

    @property
    def summary(self) -> str:
        return f"thread-affinity ({self.policy}) {stacks.describe_site(self.access_site)}"

    def event(self) -> dict[str, Any]:
        """The JSON fields, in a stable order, without timestamp and level (structlog adds them)."""
        fields: dict[str, Any] = {
            "schema": SCHEMA,
            "fingerprint": self.fingerprint,
            "policy": self.policy,
            "object_type": self.object_type,
            "object_id": f"{self.object_id:#x}",
            "operation": self.operation,
            "owner_thread": self.owner_thread,
            "thread": self.thread,
            "host": HOST,
            "pid": self.pid,
            "owner_pid": self.owner_pid,
            "created_at": iso(self.created_at),
            "access_site": _site_dict(self.access_site),
            "creation_site": _site_dict(self.creation_site),
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
            "loop": self.loop,
            "owner_loop": self.owner_loop,
            "task": self.task,
            "holder_task": self.holder_task,
            "owner_task": self.owner_task,
            "bound_stack": stacks.as_dicts(self.bound_stack) if self.bound_stack else None,
            "bound_task": self.bound_task,
            "after_the_fact": self.after_the_fact,
            "hint": self.hint,
            "derived_site": _site_dict(self.derived_site),
            "story": self.story,
            "history": self.history,
        }
        fields.update((k, v) for k, v in optional.items() if v)
        return fields


def _step_name(step: Processor) -> str:
    """A pipeline step's name, as internal errors say it."""
    name = getattr(step, "__qualname__", None) or type(step).__qualname__
    return str(name)


def _raised_at(exc: BaseException) -> str:
    """Where ``exc`` was raised: the innermost frame of its traceback, ``file:line in f``."""
    tb = exc.__traceback__
    if tb is None:
        return "<unknown>"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name}"


def _site_dict(frame: stacks.Frame | None) -> dict[str, object] | None:
    return stacks.frame_dict(frame) if frame is not None else None


# -- building one ---------------------------------------------------------------------


def build(obj: object, record: OwnerRecord, operation: str, verdict: str,
          token: threads.ThreadToken, holder: object, policy: Policy, role: str | None,
          caller: FrameType, options: Options) -> Violation:
    """The Violation for a use that ``policy`` found to break ``verdict`` (cold path).

    ``caller`` is where the access stack starts (the sanitizer's own frames are
    left out); the policy words the message.
    """
    depth = options.stack_depth
    owner = record.owner
    assert isinstance(owner, threads.ThreadToken)
    holder_thread = holder if isinstance(holder, threads.ThreadToken) else None
    holder_stack: stacks.Stack = ()
    holder_task = None
    if holder_thread is not None and holder_thread is not token:
        frame = sys._current_frames().get(holder_thread.ident)
        holder_stack = stacks.capture(depth, frame) if frame is not None else ()
    elif holder is not None and holder_thread is None and holder is not FORKED \
            and holder is not NEVER and holder is not CROWD:
        holder_task = loops.describe_task(holder)  # the task policy's holder: a task
        holder_stack = loops.task_stack(holder, depth)
    binding = record.binding
    object_type = qualified_type(obj)
    violation = Violation(
        policy=verdict,
        object_type=object_type,
        object_id=id(obj),
        operation=operation,
        owner_thread=owner.as_dict(),
        thread=token.as_dict(),
        pid=token.pid,
        owner_pid=record.pid,
        creation_stack=record.creation_stack,
        access_stack=stacks.capture(depth, caller),
        message="",
        object_name=record.name,
        root_type=record.object_type if record.object_type != object_type else None,
        # Another process's threads cannot be seen from here: say nothing.
        owner_alive=owner.alive if owner.pid == token.pid else True,
        owner_context=list(record.owner_context),
        context=threads.describe_current(),
        holder_thread=holder_thread.as_dict() if holder_thread else None,
        holder_stack=holder_stack,
        resource=record.resource,
        role=role,
        loop=token.loop.as_dict() if token.loop is not None else None,
        owner_loop=record.loop.as_dict() if record.loop is not None else None,
        task=loops.describe_task(loops.current_task(token)),
        holder_task=holder_task,
        owner_task=record.origin_task,
        bound_stack=binding.stack if binding is not None else (),
        bound_task=binding.task if binding is not None else None,
        after_the_fact=policy.after_the_fact,
        at=time.time(),
        created_at=record.created,
        story=[_story_entry(*entry) for entry in record.story or ()],
        history=_history(record),
        derived_site=record.derived_site,
    )
    if options.include_args:
        violation.args = quote_args(_guard_arguments(caller))
    violation.message = policy.describe(violation, record, token)
    # Every event carries a hint; an integration may put a more specific one instead
    # (the pytest plugin: the fixture's and the test's loop scopes).
    violation.hint = policy.advice_for(violation, record) or Policy.advice
    return violation


def _story_entry(at: float, what: str, who: threads.ThreadToken, previous: object
                 ) -> dict[str, Any]:
    entry = {"at": iso(at), "what": what, "thread": who.as_dict()}
    if isinstance(previous, threads.ThreadToken):
        entry["from"] = previous.as_dict()  # a transfer's previous owner
    return entry


def _history(record: OwnerRecord) -> list[dict[str, Any]]:
    """The record's last accesses (the ``history`` option), oldest first."""
    if not record.history:
        return []
    return [{"at": iso(at), "thread": who.as_dict(), "site": stacks.frame_dict((code, offset))}
            for who, at, code, offset in list(record.history)]


def _guard_arguments(frame: FrameType) -> list[tuple[str, object]]:
    """The arguments of the guarded call: the innermost guard frame's locals."""
    for f in stacks.frames_of(frame):
        if f.f_code.co_filename == stacks.GUARD_FILENAME:
            return [(k, v) for k, v in f.f_locals.items()
                    if k != "self" and not k.startswith(RESERVED_PREFIX)]
    return []


def quote_args(values: Iterable[tuple[str, object]]) -> dict[str, str]:
    """Arguments as the event shows them: reprs cut to 200 characters, credentials masked
    (an argument named like a password, a DSN's password, SQL's PASSWORD '...')."""
    return {name: masking.MASK if masking.is_secret_name(name) else masking.masked_repr(value)
            for name, value in values}


# -- the pipeline -------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Occurrence:
    """One violation on its way through the pipeline, and what the last steps will do.

    ``violation`` is this occurrence (its thread, object and stacks); ``kind``,
    set by Dedup, is the first of its kind, whose ``count`` it raises. The steps
    before the actors may change ``actions`` (Dedup logs and warns once per kind;
    the pytest plugin applies each test's own) and ``error``, what Raise raises.
    """

    violation: Violation
    actions: set[str]
    kind: Violation | None = None
    first: bool = True
    error: ThreadAffinityError | None = None


# A step: returns the occurrence (perhaps changed) to go on, or None to drop it.
Processor = Callable[[Occurrence], "Occurrence | None"]


class Suppress:
    """Drops what a suppression rule matches, and counts the rule's hits. A rule that
    fails to match (a bug) suppresses nothing: the violation is reported."""

    def __init__(self, rules: list[Rule],
                 on_error: Callable[[BaseException, str], None] | None = None) -> None:
        self.rules = rules
        self.on_error = on_error

    def __call__(self, occurrence: Occurrence) -> Occurrence | None:
        return None if self.suppressed(occurrence.violation) else occurrence

    def suppressed(self, violation: Violation) -> bool:
        for rule in self.rules:
            try:
                matched = rule.matches(violation)
            except Exception as exc:
                if self.on_error is not None:
                    self.on_error(exc, "matching suppressions")
                continue
            if matched:
                rule.hits += 1
                return True
        return False


class Dedup:
    """Counts occurrences by kind (Violation.key); logs and warns only the first of each."""

    def __init__(self) -> None:
        self.unique: dict[tuple[object, ...], Violation] = {}
        self.total = 0
        self._lock = fork_safe(threading.Lock())  # renewed in a forked child

    def __call__(self, occurrence: Occurrence) -> Occurrence:
        violation = occurrence.violation
        key = violation.key  # a property: Python code, where a signal handler may raise
        with self._lock:
            seen = self.unique.get(key)
            # Nothing that runs Python code (where a signal handler may raise) between
            # the two counts: they cannot come apart.
            self.total += 1
            if seen is not None:
                seen.count += 1
            else:
                self.unique[key] = violation
            (seen or violation).occurred(violation)
        occurrence.kind = seen or violation
        occurrence.first = seen is None
        if seen is not None:
            occurrence.actions -= {"log", "warn"}
        return occurrence

    def reset_after_fork(self) -> None:
        """A child counts its own; the parent's are not repeated at its exit. (The lock
        was renewed already, by the fork handler.)"""
        self.unique = {}
        self.total = 0


class Log:
    """Writes the event line through the structlog pipeline (render.py): the ``output``
    sink (log_file or stderr)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def __call__(self, occurrence: Occurrence) -> Occurrence:
        if "log" in occurrence.actions:
            try:
                self.reporter.logger.warning(EVENT, **occurrence.violation.event())
            except Exception as exc:  # rendering (the writer itself never raises): the
                # steps after it (other sinks, warn, raise) still run
                self.reporter.internal_error(exc, "rendering a report")
                return occurrence
            self.reporter.logged += 1
        return occurrence


#: The logger the ``logging`` sink sends to, and the ``extra`` key holding the event.
LOGGER_NAME = "sanitizer"
EXTRA_KEY = "thread_affinity"


class ToLogging:
    """The ``logging`` sink: what Log writes goes to the standard ``logging`` module as a
    WARNING on the ``sanitizer`` logger, to whatever handlers the application has (Sentry,
    a log shipper, pytest's caplog). Never configures logging: no handler, no level.

    The record's message is the violation's, its location the access site (not this
    file), and ``extra`` holds the whole event under EXTRA_KEY plus flat ``policy``,
    ``object_type`` and ``fingerprint`` for filters (none of them a LogRecord attribute).
    """

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def __call__(self, occurrence: Occurrence) -> Occurrence:
        if "log" in occurrence.actions:
            try:
                self.send(occurrence.violation)
            except Exception as exc:  # a filter's or a Logger subclass's (handlers' are
                # caught by logging itself, in Handler.handleError)
                self.reporter.internal_error(exc, "the logging sink")
        return occurrence

    @staticmethod
    def send(violation: Violation) -> None:
        import logging

        logger = logging.getLogger(LOGGER_NAME)
        if not logger.isEnabledFor(logging.WARNING):
            return
        event = violation.event()
        site = violation.access_site
        filename, line = stacks.location(site)
        function = str(stacks.frame_dict(site)["function"]) if site is not None else None
        extra = {EXTRA_KEY: event, "policy": violation.policy,
                 "object_type": violation.object_type, "fingerprint": event["fingerprint"]}
        record = logger.makeRecord(logger.name, logging.WARNING, filename, line,
                                   violation.message, (), None, function, extra)
        logger.handle(record)


def warn(occurrence: Occurrence) -> Occurrence:
    """Issues a ThreadAffinityWarning at the user's line."""
    if "warn" in occurrence.actions:
        violation = occurrence.violation
        filename, line = stacks.location(violation.access_site)
        warnings.warn_explicit(ThreadAffinityWarning(violation.message),
                               ThreadAffinityWarning, filename, line)
    return occurrence


def raise_(occurrence: Occurrence) -> Occurrence:
    """Raises ThreadAffinityError in the offending thread, before the call goes on (never
    for what was seen after the fact: the state changed already, and raising could only
    leave the program hanging)."""
    if "raise" in occurrence.actions and not occurrence.violation.after_the_fact:
        raise occurrence.error or ThreadAffinityError(occurrence.kind or occurrence.violation)
    return occurrence


def _half_imported(name: str) -> bool:
    """Whether ``name`` is being imported (in a forked child: by a thread that is gone)."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return getattr(spec, "_initializing", False) is True


class PlainLogger:
    """The events as the structlog pipeline writes them (render.processors), without
    structlog: for a child forked while its parent was importing it."""

    def __init__(self, writer: LineWriter, fmt: str) -> None:
        self.writer = writer
        self.format = fmt

    def _log(self, level: str, event: str, **fields: Any) -> None:
        fields.update(event=event, level=level, timestamp=iso(time.time()))
        if self.format == "console" and event == EVENT:
            line = render_console(None, level, fields)
        else:
            line = json.dumps(fields, default=repr)
        self.writer.msg(line)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, **fields)


class Reporter:
    """The pipeline, top to bottom: suppress, dedup, the integrations' steps, the sinks
    (``sink``: Log for output, ToLogging for logging), warn, raise.

    ``report`` is what the guards call, through the sink the running sanitizer
    hands them; it builds the Violation and runs it through the steps.
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self.rules = load_suppressions(options.suppressions) if options.suppressions else []
        self.output, self._format = open_output(options)
        self._logger: Any = None
        self.suppress = Suppress(self.rules, self.internal_error)
        self.dedup = Dedup()
        #: Events this process wrote to the output (Log): the exit summary goes with them.
        self.logged = 0
        # Integrations (the pytest plugin, forwarding from children) go between.
        sinks: list[Processor] = [Log(self)] if "output" in options.sink else []
        if "logging" in options.sink:
            sinks.append(ToLogging(self))
        self.steps: list[Processor] = [self.suppress, self.dedup, *sinks, warn, raise_]
        self._added = 0
        #: Names of functions that finalize objects: uses inside them are no uses.
        self.finalizers: set[str] = {"__del__"}
        self._local = threading.local()
        self._internal_errors: set[tuple[str, str, str]] = set()

    @property
    def logger(self) -> Any:
        """The structlog pipeline, built at the first event (which imports structlog)."""
        if self._logger is None:
            with STATE.importing:  # held while importing: the fork handler can tell
                if self._logger is None:
                    self._logger = build_logger(self.output, self._format)
        return self._logger

    @property
    def unique(self) -> dict[tuple[object, ...], Violation]:
        return self.dedup.unique

    @property
    def total(self) -> int:
        return self.dedup.total

    def add(self, step: Processor) -> None:
        """Run ``step`` after dedup and the steps added before it, before the actors."""
        self._added += 1
        self.steps.insert(1 + self._added, step)

    def remove(self, step: Processor) -> None:
        if step in self.steps[2:2 + self._added]:
            self.steps.remove(step)
            self._added -= 1

    # -- the entry -----------------------------------------------------------------------

    def report(self, obj: object, record: OwnerRecord, operation: str, verdict: str,
               token: threads.ThreadToken, holder: object, policy: Policy,
               role: str | None, caller: FrameType) -> None:
        """Build the Violation and run it through the steps; a bug in either is contained."""
        local = self._local
        if getattr(local, "reporting", False):
            return  # something in our own reporting touched a tracked object
        # Also while the steps run: the logging sink calls the application's handlers,
        # which may touch tracked objects (a handler writing to another thread's sqlite3
        # connection); those uses are not reported, so a report cannot loop.
        local.reporting = True
        try:
            try:
                if self.finalizing(caller):
                    return
                violation = build(obj, record, operation, verdict, token, holder, policy,
                                  role, caller, self.options)
            except Exception as exc:
                self.internal_error(exc, "building a report")
                return
            try:
                self.handle(violation)
            except (ThreadAffinityError, Warning):
                raise  # asked for: action=raise, or warnings turned into errors
            except Exception as exc:
                self.internal_error(exc, "reporting")
        finally:
            local.reporting = False

    def handle(self, violation: Violation) -> None:
        occurrence = Occurrence(violation, set(self.options.action))
        for step in list(self.steps):
            try:
                went_on = step(occurrence)
            except (ThreadAffinityError, Warning):
                raise  # asked for: action=raise, or warnings turned into errors
            except Exception as exc:  # a step's bug (an integration's): the others still run
                self.internal_error(exc, f"the pipeline step {_step_name(step)}")
                continue
            if went_on is None:
                return
            occurrence = went_on

    def finalizing(self, frame: FrameType) -> bool:
        """GC-driven finalization is not a use, whichever thread it happens on."""
        if getattr(self._local, "in_gc", False):
            return True
        names = self.finalizers
        return any(f.f_code.co_name in names or f.f_code in _FINALIZER_CODES
                   for f in stacks.frames_of(frame))

    def gc_phase(self, phase: str, _info: dict[str, Any]) -> None:
        """A gc.callbacks entry: uses during a collection are finalization."""
        self._local.in_gc = phase == "start"

    def suppressed(self, violation: Violation) -> bool:
        return self.suppress.suppressed(violation)

    # -- the rest ------------------------------------------------------------------------

    def internal_error(self, exc: BaseException, where: str) -> None:
        """Report a bug in the sanitizer once per kind (its type, stage and the line that
        raised it); never raise. If the event cannot be rendered, one plain line on stderr."""
        at = _raised_at(exc)
        key = (type(exc).__name__, where, at)
        if key in self._internal_errors:
            return
        self._internal_errors.add(key)
        error = f"{type(exc).__name__}: {exc}"
        hint = "the original call went ahead; please report this"
        try:
            self.logger.error("sanitizer_internal_error", where=where, error=error, at=at,
                              hint=hint)
        except Exception:  # the renderer is what broke
            try:
                self.output.tell(f"sanitizer: internal error in {where}: {error} (at {at}); "
                                 f"{hint}")
            except Exception:  # pragma: no cover - never raise into the program
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

    def log_summary(self) -> None:
        """At exit, for the machines: each kind's count, times and threads, in the log
        (a JSON log, or any log file), by which readers (logs.py) merge processes. Only
        where this process's events went: not when none was written (``sink=logging``
        alone; pytest without a log_file, whose events are the test report's)."""
        if not self.logged or not (self.options.log_file or self._format == "json"):
            return
        self.logger.info(SUMMARY_EVENT, schema=SCHEMA, host=HOST, pid=os.getpid(),
                         total=self.total, lost=self.output.lost,
                         violations=[v.tally() for v in self.unique_violations()])

    def write_summary(self, lines: list[str]) -> None:
        """The exit summary, to stderr (never to a file the program put on fd 2); never
        raises."""
        if self.output.path is None:
            self.output.write_text("\n".join(lines))  # by the same checked path as reports
        else:
            self.output.tell("\n".join(lines))  # the log file is elsewhere

    def reset_after_fork(self, import_cut_short: bool = False) -> None:
        """A child reports its own violations; the parent's are not repeated at its exit.

        If fork() came while a thread of the parent imported structlog (its first
        report), the child cannot import it: the module's import lock belongs to a
        thread that is gone. It writes its events without structlog instead."""
        if self._logger is None and (import_cut_short or _half_imported("structlog")):
            self._logger = PlainLogger(self.output, self._format)
        self.dedup.reset_after_fork()
        self.logged = 0
        self._local = threading.local()
        self.output.reset_after_fork()
        for rule in self.rules:
            rule.hits = 0

    def unique_violations(self) -> list[Violation]:
        return list(self.unique.values())
