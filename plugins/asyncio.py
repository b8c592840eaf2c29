"""Thread-affinity checks for asyncio: objects belong to their event loop and its thread.

No debug mode is needed. What is checked (the ``loop`` policy):

* **Event loops** (``BaseEventLoop``, so every pure-Python loop): the methods that
  are not thread-safe (``call_soon``, ``call_later``, ``call_at``, ``create_task``,
  ``create_future``, ``run_until_complete``, ``run_in_executor``, ``stop``,
  ``add_reader`` ...) only from the thread running the loop. Before the loop
  runs and after it stops, any thread may set it up or tear it down. The
  thread-safe entry points (``call_soon_threadsafe``, ``run_coroutine_threadsafe``,
  ``wrap_future``, executors) are not guarded.
* **Futures and tasks** are C objects and cannot be patched. They are seen where
  they call the loop by name: a future completed from another thread
  (``fut.set_result()`` from a worker) schedules its waiters' wakeups through
  ``loop.call_soon`` from that thread. That is reported, naming the waiting task
  and where it waits, but never raised: the future is already done, and raising
  then would leave its waiter hanging. A future completed from a thread before
  anyone awaits it schedules nothing, and is not seen.
* **Locks, events, conditions, semaphores, barriers and queues** bind to a loop
  when asyncio binds them (the first wait, ``_LoopBoundMixin._get_loop``); the
  report says where and in which task that happened. Once bound, they are
  checked under another loop even uncontended (before asyncio would raise "is
  bound to a different event loop", which it does only when they wait) and from
  threads other than the loop's. Reads (``locked()``, ``is_set()``, ``qsize()``,
  ``empty()``, ``full()``) are not checked.
* **Streams and selector transports** belong to the loop they keep (``_loop``).

Coroutine methods (``await queue.get()``) are checked when awaited, in the task
that awaits them: a worker thread may make the coroutine for
``run_coroutine_threadsafe``. Loops are reported as ``L1``, ``L2`` ... (serials
that are never reused, unlike a closed loop's ``id()``), with their state.

Not covered: uvloop's loop methods (compiled: uvloop still reports its running
loop, so the loop policy of everything else holds under it), SSL transports, and
Windows' proactor transports. anyio's trio backend never runs an asyncio loop,
so nothing here takes part.

The ``noblock`` option says which blocking driver calls on a loop's thread the
driver plugins report: ``network`` (the default: network database drivers),
``all`` (also sqlite3 and DuckDB, in-process) or ``off``.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from sanitizer.plugin import Check as _Check
from sanitizer.plugin import (
    ConfigError,
    Context,
    EventLoopThread,
    LoopBound,
    Methods,
    OwnerRecord,
    Plugin,
    TaskSupport,
    internal_error,
    record_of,
)

NONE = _Check.NONE

THREADSAFE = ("hand it over with loop.call_soon_threadsafe() or "
              "asyncio.run_coroutine_threadsafe()")
#: The loop's own methods: only from the thread running it.
LOOP_THREAD = EventLoopThread(THREADSAFE)
#: Objects bound to a loop (primitives, streams, transports).
BOUND = LoopBound(THREADSAFE)
#: A future completed from another thread: seen only once it is done.
COMPLETED = LoopBound("complete it with loop.call_soon_threadsafe(fut.set_result, value)",
                      after_the_fact=True)

# call_soon is guarded by hand (_guard_call_soon); close() is followed, not checked
# (CPython refuses to close a running loop itself).
LOOP_METHODS: Methods = {name: None for name in (
    "call_later", "call_at", "create_task", "create_future", "run_until_complete",
    "run_in_executor", "stop", "set_default_executor", "set_exception_handler",
    "set_task_factory",
)}
# The selector loop's file-descriptor watchers (BaseSelectorEventLoop's own).
SELECTOR_METHODS: Methods = {name: None for name in (
    "add_reader", "remove_reader", "add_writer", "remove_writer")}

READS = ("locked", "is_set", "qsize", "empty", "full")
PRIMITIVES: dict[str, tuple[str, ...]] = {
    "Lock": ("acquire", "release", "locked"),
    "Event": ("wait", "set", "clear", "is_set"),
    "Condition": ("acquire", "release", "locked", "wait", "wait_for", "notify", "notify_all"),
    "Semaphore": ("acquire", "release", "locked"),
    "BoundedSemaphore": ("release",),
    "Barrier": ("wait", "reset", "abort"),
    "Queue": ("put", "get", "put_nowait", "get_nowait", "task_done", "join", "shutdown",
              "qsize", "empty", "full"),
}
STREAMS: dict[str, tuple[str, ...]] = {
    "StreamWriter": ("write", "writelines", "write_eof", "close", "drain", "wait_closed",
                     "start_tls"),
    "StreamReader": ("read", "readline", "readexactly", "readuntil", "feed_data", "feed_eof"),
}
TRANSPORT_METHODS = ("write", "writelines", "write_eof", "close", "abort", "pause_reading",
                     "resume_reading", "sendto")


def _methods(names: tuple[str, ...], cls: type) -> Methods:
    return {name: (None, NONE) if name in READS else None
            for name in names if name in vars(cls)}


def _setup(context: Context) -> None:
    value = context.options.get("noblock", "network")
    if value not in ("network", "all", "off"):
        raise ConfigError(f"asyncio.noblock={value!r}: expected network, all or off",
                          key="asyncio.noblock", value=value)
    context.report_blocking(network=value != "off", local=value == "all")


def _install(asyncio: ModuleType, context: Context) -> None:
    from asyncio import base_events, events, selector_events, tasks

    _follow_running_loops(asyncio, events, context)
    current = getattr(tasks, "_current_tasks", None)
    context.lend_tasks(TaskSupport(
        current=current.get if isinstance(current, dict) else _current_task(asyncio),
        describe=_describe_task, frames=lambda task: task.get_stack()))
    _patch_loops(base_events.BaseEventLoop, selector_events.BaseSelectorEventLoop, context)
    mixins = sys.modules.get("asyncio.mixins")
    if mixins is not None:  # 3.10+: primitives bind when they first wait
        _patch_binding(mixins._LoopBoundMixin, context)
    for name, names in PRIMITIVES.items():
        cls = getattr(asyncio, name, None)
        if cls is not None:
            _patch_bound(cls, _methods(names, cls), context)
    for name, names in STREAMS.items():
        _patch_bound(getattr(asyncio, name), _methods(names, getattr(asyncio, name)), context,
                     keeps_loop=True)
    for name in ("_SelectorTransport", "_SelectorSocketTransport",
                 "_SelectorDatagramTransport"):
        cls = getattr(selector_events, name, None)
        if cls is not None:
            _patch_bound(cls, _methods(TRANSPORT_METHODS, cls), context, keeps_loop=True)


def _follow_running_loops(asyncio: ModuleType, events: ModuleType, context: Context) -> None:
    """The loop running in each thread, from asyncio's own "set the running loop"."""
    original = events._set_running_loop

    def _set_running_loop(loop: Any) -> None:
        original(loop)
        try:
            context.loop_running(loop)
        except Exception as exc:  # never break the loop itself
            context.internal_error(exc, "following the running loop")

    context.replace(events, "_set_running_loop", _set_running_loop)
    if getattr(asyncio, "_set_running_loop", None) is original:
        context.replace(asyncio, "_set_running_loop", _set_running_loop)
    running = events._get_running_loop()
    if running is not None:  # enabled from inside a running loop
        context.loop_running(running)


def _current_task(asyncio: ModuleType) -> Any:
    def current(loop: Any) -> Any:
        return asyncio.current_task(loop)
    return current


def _describe_task(task: Any) -> dict[str, Any]:
    coroutine = task.get_coro()
    name = getattr(coroutine, "__qualname__", None) or type(coroutine).__name__
    return {"name": task.get_name(), "coroutine": name}


def _patch_loops(base: type, selector: type, context: Context) -> None:
    def make_record(loop: Any) -> OwnerRecord:
        record = context.record(loop, LOOP_THREAD)
        context.bind(record, loop)
        return record

    context.patch_class(base, LOOP_THREAD, LOOP_METHODS, make_record=make_record, own_only=True)
    context.patch_class(selector, LOOP_THREAD, SELECTOR_METHODS, own_only=True)
    context.replace(base, "call_soon", _guard_call_soon(vars(base)["call_soon"], context))

    def close(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        result = wrapped(*args, **kwargs)
        context.loop_closed(instance)
        return result

    context.wrap(base, "close", close)


def _guard_call_soon(original: Any, context: Context) -> Any:
    """call_soon, checked by hand: C futures call it by name as they complete."""
    local = context.local

    def call_soon(self: Any, callback: Any, *args: Any, **kwargs: Any) -> Any:
        record = self._sanitizer_record
        if record.loop is not local.token.loop and record.loop is not None and _off_thread(
                self, record, callback, args):
            with Context.quiet():
                return original(self, callback, *args, **kwargs)
        return original(self, callback, *args, **kwargs)

    call_soon.__doc__ = original.__doc__
    call_soon.__wrapped__ = original  # type: ignore[attr-defined]
    return _keep_signature(call_soon, original)


def _keep_signature(func: Any, original: Any) -> Any:
    func.__name__ = func.__qualname__ = original.__name__
    func.__module__ = original.__module__
    return func


def _off_thread(loop: Any, record: OwnerRecord, callback: Any, args: tuple[Any, ...]) -> bool:
    """A call_soon that may be from the wrong thread: a future completing, or a plain one."""
    try:
        completed = _completed_future(loop, args)
        task = getattr(callback, "__self__", None) if completed is not None else None
        holder = task if _is_task(task) else None
    except Exception as exc:
        internal_error(exc, "asyncio: call_soon")
        return False
    if completed is not None:
        future, operation = completed
        return Context.check(future, record, operation, holder, policy=COMPLETED)
    return Context.check(loop, record, "call_soon")


def _completed_future(loop: Any, args: tuple[Any, ...]) -> tuple[Any, str] | None:
    """``(future, how it completed)`` when a done future of ``loop`` schedules its callback
    (C futures call ``loop.call_soon(callback, future)`` by name), else None."""
    future = args[0] if len(args) == 1 else None
    if future is None or not _is_future_of(future, loop) or not future.done():
        return None
    if future.cancelled():
        return future, "cancel"
    return future, "set_exception" if future.exception() is not None else "set_result"


def _is_future_of(obj: Any, loop: Any) -> bool:
    asyncio = sys.modules["asyncio"]
    try:
        return bool(asyncio.isfuture(obj) and obj.get_loop() is loop)
    except Exception:
        return False


def _is_task(obj: Any) -> bool:
    return isinstance(obj, sys.modules["asyncio"].Task)


def _patch_binding(mixin: type, context: Context) -> None:
    """Record where and in which task asyncio binds a primitive to its loop."""
    original = mixin._get_loop  # type: ignore[attr-defined]

    def _get_loop(self: Any) -> Any:
        loop = original(self)
        record = getattr(self, "_sanitizer_record", None)
        if record is not None and record.loop is None and record.policy is not None:
            try:
                context.bind(record, loop, here=True)
            except Exception as exc:
                context.internal_error(exc, "binding a primitive to its loop")
        return loop

    context.replace(mixin, "_get_loop", _keep_signature(_get_loop, original))


def _patch_bound(cls: type, methods: Methods, context: Context, *,
                 keeps_loop: bool = False) -> None:
    def make_record(obj: Any) -> OwnerRecord:
        return context.record(obj, BOUND)

    def bind(obj: Any) -> None:
        record = record_of(obj)
        loop = getattr(obj, "_loop", None)
        if record is not None and record.loop is None and loop is not None:
            context.bind(record, loop)

    context.patch_class(cls, BOUND, methods, make_record=make_record, own_only=True,
                        after_init=bind if keeps_loop else None)


plugin = Plugin(
    name="asyncio",
    hooks={"asyncio": _install},
    libraries=("asyncio",),
    options={"noblock": "blocking driver calls on a loop's thread to report: network "
                        "(default), all (also sqlite3 and DuckDB) or off"},
    setup=_setup,
)
