"""Event loops and tasks as owners: loop serials that survive id() reuse, and task descriptions.

The core knows no event-loop library. A plugin (the asyncio one) says when a
loop starts and stops running in a thread (``running``) and when it closes
(``closed``), and lends a reader of the current task and a describer of tasks
(``TaskSupport``). Everything else reads the thread token: ``token.loop`` is the
LoopToken of the loop running in that thread, or None, one attribute read on
the hot path (``asyncio.get_running_loop()`` makes a system call per call on
Python 3.10 and 3.11).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

from sanitizer import stacks, threads
from sanitizer.state import STATE

RUNNING, IDLE, CLOSED = "running", "idle", "closed"


class LoopToken:
    """One per event loop per process. Compared by identity on the hot path."""

    __slots__ = ("__weakref__", "closed_stack", "creation_stack", "creator", "ident", "loop",
                 "serial", "thread", "type_name")

    def __init__(self, loop: object, creation_stack: stacks.Stack) -> None:
        # Serials are never reused, unlike a closed loop's id().
        self.serial = next(STATE.loop_serials)
        self.loop: weakref.ref[Any] | None = _weak(loop)
        self.type_name = type(loop).__qualname__
        self.creation_stack = creation_stack
        self.creator = threads.local.token
        #: The thread running the loop now, or None, and its ident (the hot path's test).
        self.thread: threads.ThreadToken | None = None
        self.ident: int | None = None
        self.closed_stack: stacks.Stack | None = None

    @property
    def label(self) -> str:
        return f"L{self.serial}"

    @property
    def state(self) -> str:
        if self.closed_stack is not None:
            return CLOSED
        return RUNNING if self.thread is not None else IDLE

    def describe(self) -> str:
        """``event loop L1 (running in thread T0 'MainThread')``, for messages."""
        state = self.state
        if state == RUNNING:
            assert self.thread is not None
            where = f"running in thread {self.thread.label} '{self.thread.current_name()}'"
        elif state == CLOSED:
            where = f"closed at {stacks.describe_site(stacks.site_of(self.closed_stack or ()))}"
        else:
            where = "idle"
        return f"event loop {self.label} ({where})"

    def as_dict(self) -> dict[str, Any]:
        info: dict[str, Any] = {"serial": self.serial, "type": self.type_name,
                                "state": self.state,
                                "created": stacks.describe_site(stacks.site_of(
                                    self.creation_stack))}
        if self.thread is not None:
            info["thread"] = self.thread.as_dict()
        if self.closed_stack is not None:
            info["closed"] = stacks.describe_site(stacks.site_of(self.closed_stack))
        return info

    def __repr__(self) -> str:
        return f"<LoopToken {self.label} {self.type_name} {self.state}>"


def _weak(obj: object) -> weakref.ref[Any] | None:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def token_for(loop: Any, frame: FrameType | None = None, stack_depth: int = 16) -> LoopToken:
    """The loop's token, made (with the caller's stack as its creation site) when first seen."""
    tokens = STATE.loop_tokens
    try:
        return tokens[loop]
    except KeyError:
        pass
    except TypeError:  # unhashable or not weak-referenceable: one token per call
        return LoopToken(loop, ())
    with STATE.loop_lock:
        found = tokens.get(loop)
        if found is None:
            found = tokens[loop] = LoopToken(loop, stacks.capture(stack_depth, frame))
        return found


def running(loop: Any | None) -> None:
    """The calling thread now runs ``loop`` (None: no loop any more)."""
    token = threads.local.token
    previous = token.loop
    if loop is None:
        token.loop = None
        token.running_loop = None
        if previous is not None and previous.thread is token:
            previous.thread = previous.ident = None
        return
    found = token_for(loop)
    if previous is not None and previous is not found and previous.thread is token:
        previous.thread = previous.ident = None  # another loop, without a stop between
    found.thread = token
    found.ident = token.ident
    token.loop = found
    token.running_loop = loop


def closed(loop: Any, frame: FrameType | None = None, stack_depth: int = 16) -> None:
    """``loop`` was closed here."""
    found = token_for(loop, frame, stack_depth)
    found.closed_stack = stacks.capture(stack_depth, frame)


@dataclasses.dataclass(frozen=True)
class TaskSupport:
    """What a plugin lends the core about its library's tasks."""

    #: The task running now on ``loop`` (the loop object), or None (a plain callback).
    current: Callable[[Any], object]
    #: ``{"name": ..., "coroutine": ...}`` of a task, for reports.
    describe: Callable[[Any], dict[str, Any]]
    #: The frames where a suspended task waits, outermost first (asyncio's get_stack()).
    frames: Callable[[Any], list[FrameType]]


def current_task(token: threads.ThreadToken | None = None) -> object:
    """The task running now in the calling thread, or None."""
    if token is None:
        token = threads.local.token
    loop = token.running_loop
    support = STATE.tasks
    if loop is None or support is None:
        return None
    return support.current(loop)


def describe_task(task: object) -> dict[str, Any] | None:
    """A task's name and coroutine, for reports (cold path); None if none is known."""
    support = STATE.tasks
    if task is None or support is None:
        return None
    try:
        return support.describe(task)
    except Exception:  # a task describer must never break a report
        return {"name": repr(task)}


def task_stack(task: object, limit: int) -> stacks.Stack:
    """Where a suspended task waits, innermost first, without the sanitizer's frames."""
    support = STATE.tasks
    if task is None or support is None:
        return ()
    try:
        frames = support.frames(task)
    except Exception:
        return ()
    found = [(f.f_code, f.f_lasti) for f in reversed(frames)
             if not stacks.is_internal(f.f_code)]
    return tuple(found[:limit])


def describe_current() -> list[str]:
    """Phrases about the calling thread's loop and task (cold path), for owner context."""
    token = threads.local.token
    loop = token.loop
    if loop is None:
        return []
    task = describe_task(current_task(token))
    if task is None:
        return [f"in a callback of event loop {loop.label}"]
    return [f"in task {task_phrase(task)} on event loop {loop.label}"]


def task_phrase(task: dict[str, Any]) -> str:
    """``'Task-3' (main())``."""
    coroutine = task.get("coroutine")
    return f"'{task.get('name')}'" + (f" ({coroutine}())" if coroutine else "")


def renew_after_fork() -> None:
    """In a forked child no loop runs yet, and the parent's threads are gone (the
    fork handler renewed STATE.loop_lock already)."""
    for token in list(STATE.loop_tokens.values()):
        token.thread = token.ident = None

