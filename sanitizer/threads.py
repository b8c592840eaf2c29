"""Thread identity that survives ident reuse, and descriptions of threads for reports."""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from sanitizer.state import STATE

if TYPE_CHECKING:
    from sanitizer.loops import LoopToken

# Plugins add describers (e.g. "asgiref thread-sensitive executor"); each returns a
# short phrase about the calling thread, or None.
ThreadDescriber = Callable[[], "str | None"]


class ThreadToken:
    """One per thread per process. Compared by identity on the hot path."""

    __slots__ = ("__weakref__", "ident", "loop", "name", "native_id", "pid", "quiet",
                 "running_loop", "serial", "thread")

    def __init__(self) -> None:
        thread = threading.current_thread()
        self.ident = threading.get_ident()
        self.native_id = threading.get_native_id()
        self.pid = os.getpid()
        # Serials are never reused within a process, unlike idents.
        self.serial = 0 if thread is threading.main_thread() else next(STATE.serials)
        self.name = thread.name
        self.thread: weakref.ref[threading.Thread] = weakref.ref(thread)
        self.quiet = 0  # > 0 inside a call already reported: nested layers stay silent
        #: The LoopToken of the event loop running in this thread, and the loop (loops.py).
        self.loop: LoopToken | None = None
        self.running_loop: object = None
        STATE.tokens[self.ident] = self

    @property
    def label(self) -> str:
        return f"T{self.serial}"

    @property
    def alive(self) -> bool:
        thread = self.thread()
        # Not thread.is_alive(): before 3.13, an exception a signal handler raises inside
        # it (Ctrl-C during a report) marks the thread stopped, the main one included.
        return (thread is not None and self.pid == os.getpid()
                and any(t is thread for t in threading.enumerate()))

    def current_name(self) -> str:
        thread = self.thread()
        return thread.name if thread is not None else self.name

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.current_name(),
            "ident": self.ident,
            "native_id": self.native_id,
            "serial": self.serial,
        }

    def __repr__(self) -> str:
        return f"<ThreadToken {self.label} {self.current_name()!r} pid={self.pid}>"


def token_of(ident: int) -> ThreadToken | None:
    """The token of the live thread with this ident, if it has one (cold path)."""
    return STATE.tokens.get(ident)


class _TokenLocal(threading.local):
    """The Python core's per-thread token: ``local.token`` and ``local.ident()``, the
    calling thread's token and ident. (_speedups.Local is the same in C.)"""

    # threading.local calls __init__ on first access in each thread, so the hot
    # path can read ``local.token`` without a miss check.
    def __init__(self) -> None:
        self.token = ThreadToken()

    ident = staticmethod(threading.get_ident)


class TokenLocal(Protocol):
    """What both cores' per-thread object offers."""

    token: ThreadToken

    def ident(self) -> int: ...


def _core() -> tuple[str, TokenLocal]:
    """The C core if it built and is not turned off (SANITIZE_THREADS_CORE=python)."""
    wanted = os.environ.get("SANITIZE_THREADS_CORE", "").strip().lower()
    if wanted != "python":
        try:
            from sanitizer import _speedups  # type: ignore[attr-defined]
        except ImportError:
            pass
        else:
            return "c", cast(TokenLocal, _speedups.Local(ThreadToken))
    return "python", _TokenLocal()


#: Which core keeps the tokens ("c" or "python"), and the per-thread token itself.
CORE, local = _core()
#: Whether threads run without the GIL (a free-threaded build, with the GIL left off).
FREE_THREADED = not getattr(sys, "_is_gil_enabled", lambda: True)()
STATE.local = local
#: The calling thread's ident: threading.get_ident(), cheaper where the C core has it.
get_ident: Callable[[], int] = local.ident


def current() -> ThreadToken:
    """The calling thread's token."""
    return local.token


def renew_after_fork() -> None:
    """In a forked child: its only thread must not pass for its parent-side self."""
    STATE.tokens.clear()
    local.token = ThreadToken()


def add_describer(describer: ThreadDescriber) -> None:
    if describer not in STATE.describers:
        STATE.describers.append(describer)


def describe_current() -> list[str]:
    """Short phrases about what the calling thread is doing (cold path only)."""
    loops = sys.modules.get("sanitizer.loops")
    phrases: list[str] = loops.describe_current() if loops is not None else []
    for describer in STATE.describers:
        try:
            phrase = describer()
        except Exception:  # a describer must never break a report
            phrase = None
        if phrase:
            phrases.append(phrase)
    return phrases
