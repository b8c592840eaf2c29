"""The running pytest plugin: attributes each violation to a test and fails it.

Loaded only when a form switches the sanitizer on (see the package's entry
module). It takes part in the sanitizer's report pipeline as one step (after
dedup: attribute the occurrence to the running test, give it that test's
actions); reports are rendered by ``render``, workers and the controller of
pytest-xdist exchange records through ``xdist``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest

from sanitizer.plugins.pytest_plugin import MARKER, _say, fixtures, xdist
from sanitizer.plugins.pytest_plugin import render as rendering

if TYPE_CHECKING:
    from sanitizer.control import Sanitizer
    from sanitizer.forward import Channel, ForwardedViolation
    from sanitizer.options import Options
    from sanitizer.report import Occurrence, Violation
    from sanitizer.suppressions import Rule

MARKER_KEYS = ("action", "suppressions", "policy")
_ORIGIN = "_sanitize_threads_origin"  # on threading.Thread objects: (nodeid, phase)
_OURS = "_sanitize_threads_recorded"  # on ThreadAffinityErrors the plugin raised

# Active instances in this process, innermost last: pytester's in-process runs nest.
_stack: list[_Plugin] = []


def active() -> bool:
    """Whether a plugin of this process is on (pytester's in-process runs nest)."""
    return bool(_stack)


class ThreadViolation:
    """One violation (one access site, creation site and policy) in one test, with its count."""

    def __init__(self, violation: Violation, when: str, thread: str,
                 origin: tuple[str, str] | None, seq: int) -> None:
        self.violation = violation
        self.when = when
        self.thread = thread
        self.origin = origin  # (nodeid, phase) of the test that started the thread, if earlier
        self.count = 1
        self.seq = seq  # order of the latest occurrence
        self.id = f"{os.getpid()}-{seq}"  # unique across xdist workers
        self.expected = False

    @property
    def child_pid(self) -> int | None:
        """The pid of the child process it happened in, if it was forwarded from one."""
        return getattr(self.violation, "child_pid", None)

    @property
    def policy(self) -> str:
        return self.violation.policy

    @property
    def object_type(self) -> str:
        return self.violation.object_type

    @property
    def operation(self) -> str:
        return self.violation.operation

    @property
    def message(self) -> str:
        return self.violation.message

    def matches(self, policy: str | None, object_type: str | None, operation: str | None,
                match: str | re.Pattern[str] | None) -> bool:
        return ((policy is None or self.policy == policy)
                and (object_type is None or fnmatch.fnmatchcase(self.object_type, object_type))
                and (operation is None or self.operation == operation)
                and (match is None or re.search(match, self.message) is not None))

    def __repr__(self) -> str:
        return (f"<ThreadViolation ({self.policy}) {self.object_type}.{self.operation} "
                f"in {self.when}, {self.count}x>")


class ThreadViolations(list[ThreadViolation]):
    """The ``thread_violations`` fixture: the test's violations not expected so far."""

    def __init__(self, run: _TestRun) -> None:
        super().__init__()
        self.expected: list[ThreadViolation] = []
        self._run = run

    def expect(self, policy: str | None = None, object_type: str | None = None,
               operation: str | None = None, match: str | re.Pattern[str] | None = None
               ) -> _Expectation:
        """Assert that a matching violation happens inside the block, and consume it.

        ``object_type`` is a glob (``sqlite3.*``), ``match`` a regex searched in
        the message. Threads must have done their work before the block ends.
        """
        criteria = {"policy": policy, "object_type": object_type, "operation": operation,
                    "match": match}
        return _Expectation(self, {k: v for k, v in criteria.items() if v is not None})

    def _consume(self, since: int, criteria: dict[str, Any]) -> list[ThreadViolation]:
        self._run.plugin.poll_children(self._run)  # what children forwarded so far
        with self._run.plugin.lock:
            found = [v for v in self if v.seq > since and v.matches(
                criteria.get("policy"), criteria.get("object_type"),
                criteria.get("operation"), criteria.get("match"))]
            for record in found:
                record.expected = True
                self.remove(record)
                self.expected.append(record)
                self._run.forget(record)
        return found


class _Expectation:
    def __init__(self, violations: ThreadViolations, criteria: dict[str, Any]) -> None:
        self.violations = violations
        self.criteria = criteria
        self.start = 0

    def __enter__(self) -> ThreadViolations:
        self.start = self.violations._run.plugin.seq
        return self.violations

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        found = self.violations._consume(self.start, self.criteria)
        if not found:
            if exc is not None:
                return False  # the block's own error says more
            wanted = ", ".join(f"{k}={v!r}" for k, v in self.criteria.items()) or "any"
            seen = "; ".join(f"({v.policy}) {v.message}" for v in self.violations) or "none"
            note = ("" if self.violations._run.settings.enabled
                    else " (the sanitizer is off for this test)")
            pytest.fail(f"expected a thread-affinity violation matching {wanted} inside the "
                        f"block, but none happened{note}; other violations so far: {seen}",
                        pytrace=False)
        from sanitizer.exceptions import ThreadAffinityError

        return (isinstance(exc, ThreadAffinityError)
                and exc.violation.key in {v.violation.key for v in found})


# -- per-test settings ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    enabled: bool = True
    action: tuple[str, ...] = ("log",)
    rules: tuple[Rule, ...] = ()  # beyond the session's, which the Reporter applies
    policies: tuple[str, ...] = ()  # like Options.plugins: names, "-name" ignores
    error: str | None = None

    def admits(self, violation: Violation) -> bool:
        if not self.enabled:
            return False
        if self.policies:
            name = violation.policy
            wanted = [p for p in self.policies if not p.startswith("-")]
            if "-" + name in self.policies or (wanted and name not in wanted):
                return False
        for rule in self.rules:
            if rule.matches(violation):
                rule.hits += 1
                return False
        return True


def _settings_for(item: pytest.Item, base: _Settings, options: Options,
                  load: Callable[[str], tuple[Rule, ...]]) -> _Settings:
    """The test's settings from its markers; ``load`` reads a suppressions file."""
    markers = list(item.iter_markers(MARKER))
    if not markers:
        return base
    enabled = True
    values: dict[str, Any] = {}
    where = f"@pytest.mark.{MARKER} on {item.nodeid}"
    for mark in reversed(markers):  # the closest marker wins
        if len(mark.args) > 1 or (mark.args and not isinstance(mark.args[0], bool)):
            return _Settings(error=f"{where}: takes one positional argument, True or False; "
                                   f"got {mark.args!r}")
        if mark.args:
            enabled = mark.args[0]
        values.update(mark.kwargs)
    unknown = sorted(set(values) - set(MARKER_KEYS))
    if unknown:
        return _Settings(error=f"{where}: unknown argument {unknown[0]!r}; accepted: "
                               f"{', '.join(MARKER_KEYS)} (other options are for the whole "
                               "session: command line, ini option or SANITIZE_THREADS)")
    if not enabled:
        return _Settings(enabled=False)
    from sanitizer import options as opts
    from sanitizer import policies

    try:
        action = opts.from_kwargs({"action": values["action"]}, base=options,
                                  source=where).action if "action" in values else base.action
        rules = base.rules
        if values.get("suppressions"):
            path = Path(item.path).parent / str(values["suppressions"])
            rules = (*rules, *load(str(path)))
        names = base.policies
        if values.get("policy"):
            text = values["policy"]
            items = text.split("+") if isinstance(text, str) else list(text)
            names = tuple(n.strip() for n in items if n.strip())
            for name in names:
                policies.get(name.removeprefix("-"))
    except ValueError as exc:  # ConfigError
        message = str(exc)
        return _Settings(error=message if message.startswith(where) else f"{where}: {message}")
    return _Settings(True, action, rules, names)


# -- the plugin while on ---------------------------------------------------------------


class _TestRun:
    """Violations attributed to one test (or, with nodeid None, to the session)."""

    __slots__ = ("_violations", "all", "item", "location", "nodeid", "pending", "plugin",
                 "raised", "records", "settings", "when")

    def __init__(self, plugin: _Plugin, nodeid: str | None, settings: _Settings,
                 item: pytest.Item | None = None) -> None:
        self.plugin = plugin
        self.nodeid = nodeid
        self.item = item
        self.location = item.location if item is not None else None
        self.settings = settings
        self.when = "setup" if nodeid is not None else "collection"
        self.records: dict[tuple[object, ...], ThreadViolation] = {}  # by key, not yet expected
        self.all: list[ThreadViolation] = []
        self.pending: list[ThreadViolation] = []  # not yet in a report
        self.raised: list[BaseException] = []  # ThreadAffinityErrors raised (action=raise)
        self._violations: ThreadViolations | None = None

    @property
    def violations(self) -> ThreadViolations:
        """The fixture's list, made on first use (most tests never ask)."""
        if self._violations is None:
            with self.plugin.lock:
                if self._violations is None:
                    self._violations = ThreadViolations(self)
                    self._violations += [r for r in self.all if not r.expected]
        return self._violations

    def add(self, violation: Violation, thread: str, origin: tuple[str, str] | None,
            seq: int) -> ThreadViolation:
        """Count one occurrence (called with the plugin's lock held)."""
        record = self.records.get(violation.key)
        if record is not None:
            record.count += 1
            record.seq = seq
            return record
        record = ThreadViolation(violation, self.when, thread, origin, seq)
        self.records[violation.key] = record
        self.all.append(record)
        self.pending.append(record)
        if self._violations is not None:
            self._violations.append(record)
        return record

    def take_pending(self) -> list[ThreadViolation]:
        """The records not yet in a report that still fail the test (lock held)."""
        new = [r for r in self.pending if not r.expected]
        self.pending.clear()
        return new

    def forget(self, record: ThreadViolation) -> None:
        """An expected record no longer fails the test; a new occurrence starts a new one."""
        if self.records.get(record.violation.key) is record:
            del self.records[record.violation.key]
        if record in self.pending:
            self.pending.remove(record)


class _Plugin:
    """Registered while the sanitizer is on for a pytest session."""

    def __init__(self, config: pytest.Config, options: Options, sources: list[str]) -> None:
        self.config = config
        self.options = options
        self.sources = sources
        self.base = _Settings(action=options.action)
        self.lock = threading.Lock()
        self.seq = 0
        self.worker = False
        self.controller = False
        self.sanitizer: Sanitizer | None = None
        self._control: Any = None  # sanitizer.control, once started
        self._state: Any = None  # sanitizer.state.STATE, once started
        self.pid = os.getpid()  # a forked child has a copy of this object
        self.channel: Channel | None = None  # where child processes forward their violations
        self.session_run = _TestRun(self, None, self.base)
        self.current: _TestRun | None = None
        self.records: list[dict[str, Any]] = []  # what the summary and the JSON report show
        self.seen_records: set[object] = set()
        self._restore: list[Callable[[], None]] = []
        self._marked_parents: dict[pytest.Collector, bool] = {}
        self._internal_errors: set[tuple[str, str]] = set()
        # Suppressions: markers' files, read once (their rules count hits across
        # tests), and how often each rule matched (origin -> [rule, hits]).
        self._rule_files: dict[str, tuple[Rule, ...]] = {}
        self.rule_hits: dict[str, list[Any]] = {}
        # Fixtures being set up now (outermost first), and what each phrase in an owner's
        # context says about its fixture: for the loop_scope hint (fixtures.py).
        self.fixtures = fixtures.Fixtures()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def runtime_options(self) -> Options:
        """What the sanitizer itself runs with: the session's options, but the exit code
        is pytest's (the plugin's step in its pipeline gives each test its actions), and
        without a log_file the output is the test report: the logging sink, if chosen,
        is the only one left to the core."""
        sink = self.options.sink
        if not self.options.log_file and "logging" in sink:
            sink = ("logging",)
        return dataclasses.replace(self.options, exitcode=None, sink=sink)

    def start(self) -> None:
        from sanitizer import control, forward, state

        self._control = control
        self._state = state.STATE
        if _stack:
            _stack[-1].detach()
        control.disable()  # the .pth's, or an outer session's: exactly one runs
        _stack.append(self)
        # Announced before the sanitizer starts, which then forwards from forked
        # children; spawned ones with SANITIZE_THREADS inherit the announcement.
        try:
            self.channel = forward.Channel()
        except OSError as exc:  # no usable temporary directory: the rest still works
            _say(self.config, f"sanitize-threads: violations in child processes will not be "
                              f"collected: {exc}")
        self.attach(control.enable(self.runtime_options))

    def attach(self, sanitizer: Sanitizer) -> None:
        from sanitizer import stacks, threads

        if self.sanitizer is not None and self.sanitizer is not sanitizer:
            self.count_rules(self.sanitizer.reporter.rules)  # a test switched it off
        self.sanitizer = sanitizer
        for directory in _pytest_dirs():  # stacks stop at pytest's machinery
            stacks.add_boundary(directory)  # (the sanitizer forgets them when it stops)
        threads.add_describer(self.fixtures.describe)  # forgotten when it stops, too
        sanitizer.reporter.add(self.on_violation)

    def _resume(self) -> None:
        """A test switched the sanitizer off (or swapped it): on again for the next one."""
        if _stack and _stack[-1] is self and self._control.running() is None:
            self.attach(self._control.enable(self.runtime_options))

    def detach(self) -> None:
        from sanitizer import control

        if self.sanitizer is not None:
            self.count_rules(self.sanitizer.reporter.rules)  # a new sanitizer counts anew
            if self.sanitizer is control.running():
                control.disable()
        self.sanitizer = None

    def rules_in(self, path: str) -> tuple[Rule, ...]:
        """A marker's suppressions file, read once per session."""
        rules = self._rule_files.get(path)
        if rules is None:
            from sanitizer.suppressions import load_suppressions

            rules = self._rule_files[path] = tuple(load_suppressions(path))
        return rules

    def count_rules(self, rules: Iterable[Rule]) -> None:
        """Add these rules' hits to the session's tally, and reset them."""
        for rule in rules:
            entry = self.rule_hits.setdefault(rule.origin, [str(rule), 0])
            entry[1] += rule.hits
            rule.hits = 0

    def _tally_rules(self) -> None:
        if self.sanitizer is not None:
            self.count_rules(self.sanitizer.reporter.rules)
        for rules in self._rule_files.values():
            self.count_rules(rules)

    def configure(self) -> None:
        self.worker, self.controller = xdist.roles(self.config)
        if self.controller:  # the workers run the tests, each with its own sanitizer
            self.stop()

    def stop(self) -> None:
        """Undo start() and the session's patches; safe to call twice."""
        while self._restore:
            self._restore.pop()()
        if self.channel is not None:  # before an outer session's sanitizer starts again
            self.channel.close()
            self.channel = None
        if self not in _stack:
            return
        innermost = _stack[-1] is self
        _stack.remove(self)
        self.detach()
        if innermost and _stack:
            from sanitizer import control

            outer = _stack[-1]
            outer.attach(control.enable(outer.runtime_options))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.stop()

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.controller:
            return
        try:
            self._patch_thread_start()
            self._wrap_excepthook()
        except Exception as exc:
            self.internal_error(exc, "sessionstart")

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.poll_children(self.current or self.session_run)  # children started while collecting

    def internal_error(self, exc: Exception, where: str) -> None:
        """A bug in this plugin: said once per kind, and the test run goes on.

        The hooks catch everything but pytest's own outcomes (BaseExceptions), and
        a test whose violations could not be reported still fails.
        """
        key = (type(exc).__name__, where)
        if key in self._internal_errors:
            return
        self._internal_errors.add(key)
        if self.sanitizer is not None:
            self.sanitizer.reporter.internal_error(exc, f"pytest plugin: {where}")
            return
        _say(self.config, f"sanitize-threads: internal error in the pytest plugin ({where}): "
                          f"{type(exc).__name__}: {exc}")

    def _patch_thread_start(self) -> None:
        original = threading.Thread.start
        plugin = self

        def start(thread: threading.Thread) -> None:
            if _stack and _stack[-1] is plugin:  # an in-process run inside ours does it
                origin = getattr(threading.current_thread(), _ORIGIN, None)
                if origin is None:
                    run = plugin.current
                    origin = (run.nodeid, run.when) if run is not None else None
                if origin is not None:
                    with contextlib.suppress(AttributeError):
                        setattr(thread, _ORIGIN, origin)
            original(thread)

        threading.Thread.start = start  # type: ignore[method-assign,assignment]

        def restore() -> None:
            if threading.Thread.start is start:
                threading.Thread.start = original  # type: ignore[method-assign]
        self._restore.append(restore)

    def _wrap_excepthook(self) -> None:
        # After pytest's threadexception plugin set its own: a ThreadAffinityError
        # that ends a thread is already this plugin's report, not another warning.
        previous = threading.excepthook

        def excepthook(args: threading.ExceptHookArgs, /) -> Any:
            if getattr(args.exc_value, _OURS, False):
                return None
            return previous(args)

        threading.excepthook = excepthook

        def restore() -> None:
            if threading.excepthook is excepthook:
                threading.excepthook = previous
        self._restore.append(restore)

    # -- attribution -------------------------------------------------------------------

    def on_violation(self, occurrence: Occurrence) -> Occurrence:
        """A step of the sanitizer's pipeline, after dedup: attributes the occurrence to
        the running test and gives it that test's actions (in the violating thread)."""
        violation = occurrence.violation
        thread = threading.current_thread()
        origin = getattr(thread, _ORIGIN, None)
        record: ThreadViolation | None = None
        # The core's own log line: written only to a log_file, or sent to logging, once
        # per kind (otherwise the test report carries it).
        keep = self.options.log_file or "logging" in self.options.sink
        log = {"log"} & occurrence.actions if keep else set()
        if os.getpid() != self.pid:
            # A forked child's copy of the plugin: the sanitizer forwards the
            # violation to this process's original, where it counts. Here only
            # the test's action applies, without the lock (a thread of the
            # parent may have held it at fork()).
            run = self.current or self.session_run
            settings = run.settings
            admitted = settings.admits(violation)
        else:
            with self.lock:
                run = self.current or self.session_run
                settings = run.settings
                admitted = settings.admits(violation)
                if admitted:
                    if origin is not None and origin[0] == run.nodeid:
                        origin = None
                    self.seq += 1
                    record = run.add(violation, thread.name, origin, self.seq)
        if not admitted:
            occurrence.actions = log
            return occurrence
        if violation.policy == "loop" and run.item is not None:
            # More specific than the policy's hint, which it replaces.
            violation.hint = self.fixtures.hint(violation, run.item) or violation.hint
        actions = set(settings.action) - {"log"} | log
        if not (occurrence.first if record is None else record.count == 1):
            actions.discard("warn")  # once per kind and test
        if "raise" in actions:
            from sanitizer.exceptions import ThreadAffinityError

            error = ThreadAffinityError(violation)
            setattr(error, _OURS, True)
            if record is not None:
                with self.lock:
                    run.raised.append(error)
            occurrence.error = error
        occurrence.actions = actions
        return occurrence

    def poll_children(self, run: _TestRun) -> None:
        """Take what child processes forwarded since the last look (never raises)."""
        channel = self.channel
        if channel is None:
            return
        try:
            found = channel.poll()  # one lseek when there is nothing: runs every phase
            if found:
                self._take_forwarded(run, found)
        except Exception as exc:
            self.internal_error(exc, "taking violations from child processes")

    def _take_forwarded(self, run: _TestRun, found: list[ForwardedViolation]) -> None:
        """Attribute children's violations as a thread's: to ``run``, in its current phase,
        marked with the test that started the child if that was an earlier one."""
        rules = self.sanitizer.reporter if self.sanitizer is not None else None
        settings = run.settings
        for violation in found:
            # The session's suppressions too: a spawned child may run with other options.
            if not settings.admits(violation) or (rules is not None
                                                  and rules.suppressed(violation)):
                continue
            origin = violation.origin_test
            if origin is not None and origin[0] == run.nodeid:
                origin = None
            with self.lock:
                self.seq += 1
                run.add(violation, violation.thread_name, origin, self.seq)

    # A test without violations costs two plain hooks (setup, and logreport per
    # phase), each a few attribute reads, and per phase one lseek on the channel
    # (about 3.5K instructions): this runs for every test of a suite.
    # (A makereport wrapper would hand over the call, but pluggy's generator
    # protocol costs twice as much as a plain hook.)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any],
                             request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.fixtures.setting_up(fixturedef, request.config))
            except Exception as exc:  # the fixture is set up all the same
                self.internal_error(exc, "fixture_setup")
            return (yield)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        settings = self.base
        try:
            sanitizer = self.sanitizer
            if sanitizer is None or sanitizer is not self._state.running:
                self._resume()
            for mark in item.own_markers:
                if mark.name == MARKER:
                    settings = _settings_for(item, self.base, self.options, self.rules_in)
                    break
            else:
                if self._parent_marked(item.parent):
                    settings = _settings_for(item, self.base, self.options, self.rules_in)
        except Exception as exc:
            self.internal_error(exc, "runtest_setup")
        # A plain assignment: a violation in another thread sees either no test
        # (the session's, between tests) or this one.
        self.current = _TestRun(self, item.nodeid, settings, item)
        if settings.error:
            pytest.fail(settings.error, pytrace=False)

    def _parent_marked(self, node: pytest.Collector | None) -> bool:
        """Whether a module, class or package above the test has the marker (cached)."""
        if node is None:
            return False
        marked = self._marked_parents.get(node)
        if marked is None:
            marked = self._marked_parents[node] = node.get_closest_marker(MARKER) is not None
        return marked

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Amend the report before pytest's terminal, JUnit XML or xdist see it."""
        run = self.current
        # The report's location is the item's own (cached) tuple: identity is the
        # cheap test; parametrized tests share a location, so equality needs the id.
        if run is None or (report.location is not run.location and (
                report.location != run.location or report.nodeid != run.nodeid)):
            if self.controller:  # the xdist controller runs no tests: workers' reports
                try:
                    xdist.take_report(self, report)
                except Exception as exc:
                    self.internal_error(exc, "taking a worker's records")
            return
        when = report.when
        if self.channel is not None:
            self.poll_children(run)  # before the phase's failures are decided
        new: list[ThreadViolation] = []
        if when == "teardown":
            with self.lock:  # later violations are the next test's, or the session's
                new = self._take_pending(run)
                self.current = None
                self.session_run.when = "between tests"
        else:
            run.when = "call" if when == "setup" and report.outcome == "passed" else "teardown"
            if run.pending:
                with self.lock:
                    new = self._take_pending(run)
        if new:
            try:
                self._fail(report, run, new)
            except Exception as exc:
                self.internal_error(exc, "reporting a violation")
                # Fail closed, as _fail would: the violation did happen.
                if not (report.failed or (getattr(report, "wasxfail", None) and report.skipped)):
                    report.outcome = "failed"
                    report.longrepr = (f"{len(new)} thread-affinity violation(s); the report "
                                       f"could not be built ({type(exc).__name__}: {exc})")
        if when == "teardown" and run.all:
            try:
                self._attach_records(report, run)
            except Exception as exc:
                self.internal_error(exc, "recording violations")

    def _take_pending(self, run: _TestRun) -> list[ThreadViolation]:
        try:
            return run.take_pending()
        except Exception as exc:
            self.internal_error(exc, "taking a test's violations")
            return []

    def _attach_records(self, report: pytest.TestReport, run: _TestRun) -> None:
        """Every record of the test, as JSON user properties (JUnit XML, xdist, the report)."""
        item = run.item
        for record in run.all:
            data = rendering.record(self, record, run.nodeid)
            value = json.dumps(data, default=repr)
            report.user_properties.append((rendering.PROPERTY, value))
            if item is not None:
                item.user_properties.append((rendering.PROPERTY, value))
            if not self.worker:
                self.take(data)

    def _fail(self, report: pytest.TestReport, run: _TestRun,
              records: list[ThreadViolation]) -> None:
        raised = _failure_keys(report, run.raised) if run.raised else set()
        records = [r for r in records if r.child_pid is not None or r.violation.key not in raised]
        if not records:
            return  # the ThreadAffinityError that failed the test says it already
        report.sections.append((f"Thread-affinity violations ({report.when})",
                                "\n".join(self._render(r) for r in records)))
        if report.failed or (getattr(report, "wasxfail", None) and report.skipped):
            return
        report.outcome = "failed"
        with contextlib.suppress(AttributeError):
            del report.wasxfail
        report.longrepr = rendering.reason(self, records)

    # -- records ---------------------------------------------------------------------------

    def _render(self, record: ThreadViolation) -> str:
        return rendering.section(self, record)

    def take(self, data: dict[str, Any]) -> None:
        """Keep a record for the summary and the JSON report (once, by its id)."""
        if data.get("id") not in self.seen_records:  # reports may repeat the item's properties
            self.seen_records.add(data.get("id"))
            self.records.append(data)

    def session_records(self) -> list[dict[str, Any]]:
        """The records of violations outside any test."""
        with self.lock:
            records = list(self.session_run.all)
        return [rendering.record(self, r, None) for r in records]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        try:
            xdist.take_node_output(self, node)
        except Exception as exc:
            self.internal_error(exc, "taking a worker's session records")

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Generator[None, None, None]:
        # Innermost wrapper: after every plain sessionfinish (conftests may still
        # violate), before the terminal summary and xdist's sending of the worker output.
        with self.lock:
            self.session_run.when = "session end"
        yield
        self.poll_children(self.current or self.session_run)  # children that outlived the tests
        if self.channel is not None and self.channel.skipped:
            self.internal_error(ValueError(f"{self.channel.skipped} line(s) were not violation "
                                           "records"), "reading what child processes forwarded")
        try:
            self._tally_rules()
            if self.worker:
                xdist.send_output(self)
            else:
                self._finish(session)
        except Exception as exc:
            self.internal_error(exc, "sessionfinish")

    def _finish(self, session: pytest.Session) -> None:
        for data in self.session_records():
            self.take(data)
        failing = [r for r in self.records if not r.get("expected")]
        if any(r["nodeid"] is None for r in failing) and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if failing and self.options.exitcode is not None:
            session.exitstatus = self.options.exitcode
        rendering.write_report(self, session)

    # -- terminal ----------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> str:
        return (f"sanitize-threads: {self.options.to_string()} "
                f"(from {', '.join(reversed(self.sources))})")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.worker:
            return
        try:
            rendering.summary(self, terminalreporter)
        except Exception as exc:
            self.internal_error(exc, "terminal summary")


def _failure_keys(report: pytest.TestReport, raised: list[BaseException]
                  ) -> set[tuple[object, ...]]:
    """Keys of the ThreadAffinityErrors this plugin raised that made this phase fail."""
    if not report.failed:
        return set()
    if report.when == "call":
        # pytest keeps the exception that failed the call for post-mortem debugging.
        return _raised_keys(getattr(sys, "last_value", None))
    # Setup and teardown keep no exception: match the crash lines of the report's
    # (chained) traceback against the messages of the errors raised in this test.
    longrepr = report.longrepr
    chain = getattr(longrepr, "chain", None)
    crashes = ([crash for _tb, crash, _descr in chain] if chain is not None
               else [getattr(longrepr, "reprcrash", None)])
    messages = [str(getattr(crash, "message", "")) for crash in crashes]
    return {error.violation.key for error in raised  # type: ignore[attr-defined]
            if any(str(error).partition("\n")[0] in message for message in messages)}


def _raised_keys(error: BaseException | None) -> set[tuple[object, ...]]:
    """Keys of the ThreadAffinityErrors this plugin raised that are in an exception's chain."""
    keys: set[tuple[object, ...]] = set()
    todo = [error]
    seen: set[int] = set()
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if getattr(exc, _OURS, False):
            keys.add(exc.violation.key)  # type: ignore[attr-defined]
        todo += [exc.__cause__, exc.__context__]
        group = getattr(exc, "exceptions", None)  # an ExceptionGroup's members
        if isinstance(group, tuple):
            todo += [e for e in group if isinstance(e, BaseException)]
    return keys


def _pytest_dirs() -> tuple[str, ...]:
    import _pytest
    import pluggy

    return tuple(os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep
                 for m in (_pytest, pluggy))
