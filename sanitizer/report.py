"""The Violation record, and the pipeline each one runs through: suppress, dedup, act."""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from sanitizer import stacks
from sanitizer.exceptions import ThreadAffinityError, ThreadAffinityWarning
from sanitizer.options import Options
from sanitizer.render import EVENT, LineWriter, build_logger, open_output
from sanitizer.suppressions import load_suppressions


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
