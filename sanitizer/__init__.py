"""A runtime thread-affinity sanitizer: reports objects used from the wrong thread, loop or process.

Switch it on with ``SANITIZE_THREADS=1`` (no code change), ``sanitize-threads run``,
``pytest --sanitize-threads`` or ``sanitizer.enable()``.

PYTEST_DONT_REWRITE: the .pth imports this package before pytest, whose pytest11
entry point would otherwise warn that it cannot rewrite it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

from sanitizer.exceptions import ConfigError, ThreadAffinityError, ThreadAffinityWarning

if TYPE_CHECKING:
    from sanitizer.policies import Policy
    from sanitizer.report import Violation

__all__ = [
    "ConfigError",
    "ThreadAffinityError",
    "ThreadAffinityWarning",
    "disable",
    "enable",
    "is_enabled",
    "shared",
    "thread_affine",
    "track",
    "transfer",
    "violations",
]

T = TypeVar("T")
C = TypeVar("C", bound=type)


def enable(**options: Any) -> None:
    """Start the sanitizer. Idempotent: a second call keeps the one running.

    Takes the same keys as ``SANITIZE_THREADS`` (``action="raise"``,
    ``log_file=...``); a bad one raises ConfigError naming it.
    """
    from sanitizer import control
    from sanitizer import options as opts

    control.enable(opts.from_kwargs(options))


def disable() -> None:
    """Stop the sanitizer and restore every attribute it patched."""
    from sanitizer import control

    control.disable()


def is_enabled() -> bool:
    from sanitizer import control

    return control.running() is not None


def track(obj: T, policy: str | Policy = "strict", name: str | None = None) -> T:
    """Track ``obj``: the calling thread owns it. Use the return value.

    Instances of Python classes are tracked in place and returned as they are;
    others (C types) come back wrapped in a transparent proxy. Does nothing while
    the sanitizer is off.
    """
    from sanitizer import control, policies

    sanitizer = control.running()
    if sanitizer is None:
        return obj
    result: T = sanitizer.track(obj, policies.get(policy), name)
    return result


@overload
def thread_affine(cls: C, /) -> C: ...
@overload
def thread_affine(*, policy: str | Policy = "strict") -> Callable[[C], C]: ...


def thread_affine(cls: C | None = None, /, *, policy: str | Policy = "strict") -> Any:
    """Class decorator: instances belong to the thread that made them.

    Public methods and use-dunders (``__enter__``, ``__iter__`` ...) are checked
    while the sanitizer runs; the class is left as it was while it is off.
    """
    from sanitizer import control, policies

    chosen = policies.get(policy)

    def decorate(klass: C) -> C:
        control.register_affine(klass, chosen)
        return klass

    return decorate(cls) if cls is not None else decorate


def transfer(obj: object) -> None:
    """Make the calling thread the owner of ``obj`` (like Qt's moveToThread)."""
    from sanitizer.ownership import record_of

    record = record_of(obj)
    if record is not None:
        record.transfer_to_current_thread()


@contextlib.contextmanager
def shared(obj: object) -> Iterator[None]:
    """Allow use of ``obj`` from other threads inside the block (counted, may nest)."""
    from sanitizer.ownership import record_of

    record = record_of(obj)
    if record is None:
        yield
        return
    record.share()
    try:
        yield
    finally:
        record.unshare()


def violations() -> list[Violation]:
    """The distinct violations seen so far in this process, with their counts."""
    from sanitizer import control

    sanitizer = control.running()
    return sanitizer.reporter.unique_violations() if sanitizer is not None else []
