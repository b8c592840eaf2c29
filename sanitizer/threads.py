"""Thread identity that survives ident reuse, and descriptions of threads for reports."""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable

from sanitizer.state import STATE

# Plugins add describers (e.g. "asgiref thread-sensitive executor"); each returns a
# short phrase about the calling thread, or None.
ThreadDescriber = Callable[[], "str | None"]


class ThreadToken:
    """One per thread per process. Compared by identity on the hot path."""

    __slots__ = ("__weakref__", "ident", "name", "native_id", "pid", "quiet", "serial", "thread")

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
        STATE.tokens[self.ident] = self

    @property
    def label(self) -> str:
        return f"T{self.serial}"

    @property
    def alive(self) -> bool:
        thread = self.thread()
        return thread is not None and thread.is_alive() and self.pid == os.getpid()

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
    # threading.local calls __init__ on first access in each thread, so the hot
    # path can read ``local.token`` without a miss check.
    def __init__(self) -> None:
        self.token = ThreadToken()


local = STATE.local = _TokenLocal()


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
    phrases: list[str] = []
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        loop = asyncio.events._get_running_loop()
        if loop is not None:
            phrases.append(f"running event loop {type(loop).__name__} at {id(loop):#x}")
    for describer in STATE.describers:
        try:
            phrase = describer()
        except Exception:  # a describer must never break a report
            phrase = None
        if phrase:
            phrases.append(phrase)
    return phrases
