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

from sanitizer.plugin import (
    UNTRACKED,
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
from sanitizer.plugin import Check as _Check

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

# Most loop methods that are not thread-safe start with ``self._check_closed()``
# (call_soon, call_at, call_later, create_task, run_until_complete, run_forever,
# run_in_executor, add_reader, add_writer, add_signal_handler): the check is compiled
# into it (_CHECK_CLOSED), so a call costs no frame of ours. These others are guarded.
# (call_soon_threadsafe calls it too, and is let through by name.)
LOOP_METHODS: Methods = {name: None for name in (
    "stop", "set_default_executor", "set_exception_handler", "set_task_factory")}
SELECTOR_METHODS: Methods = {name: None for name in ("remove_reader", "remove_writer")}

_CHECK_CLOSED = """\
try:
    _g_loop = {self}._sanitizer_record.loop
except AttributeError:  # a loop made before the sanitizer was on
    _g_loop = None
if _g_loop is not None and _g_loop.ident != _g_ident():
    _g_off_loop({self}, {self}._sanitizer_record)
"""
# A lock, queue ... asks for its loop when it first waits: asyncio binds it then, and
# the binding is noted here (where, in which task). Asked for under another loop, it
# is reported first, before asyncio raises "is bound to a different event loop".
_GET_LOOP = """\
try:
    _g_record = {self}._sanitizer_record
except AttributeError:  # not tracked (made before the sanitizer was on)
    _g_record = _g_untracked
if _g_record.policy is not None and (_g_record.loop is None
                                     or _g_record.loop.ident != _g_ident()):
    _g_binding({self}, _g_record)
"""

READS = ("locked", "is_set", "qsize", "empty", "full")
# Only the entry points are checked: put() and get() go through put_nowait() and
# get_nowait() (or, when they wait, _get_loop()); task_done() or clear() from another
# thread wakes nobody wrongly by itself, and one that does is seen as its future completes.
PRIMITIVES: dict[str, tuple[str, ...]] = {
    "Lock": ("acquire", "release", "locked"),
    "Event": ("wait", "set", "is_set"),
    # (A Condition's acquire, release and locked are its lock's, set on each instance.)
    "Condition": ("wait", "wait_for", "notify", "notify_all"),
    "Semaphore": ("acquire", "release", "locked"),
    "BoundedSemaphore": ("release",),
    "Barrier": ("wait", "reset", "abort"),
    "Queue": ("put_nowait", "get_nowait", "join", "shutdown", "qsize", "empty", "full"),
}
STREAMS: dict[str, tuple[str, ...]] = {
    "StreamWriter": ("write", "writelines", "write_eof", "close", "start_tls"),
    "StreamReader": ("read", "readline", "readexactly", "readuntil"),
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
    names = {"_g_ident": context.local.ident, "_g_off_loop": _off_loop}
    context.prologue(base, "_check_closed", _CHECK_CLOSED, names)

    def close(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        result = wrapped(*args, **kwargs)
        context.loop_closed(instance)
        return result

    context.wrap(base, "close", close)


def _off_loop(loop: Any, record: OwnerRecord) -> None:
    """A loop method (its ``_check_closed()``) called where the loop's own thread and
    loop are not: decide which call it is, and check it."""
    try:
        caller = sys._getframe(1)
        while caller.f_code.co_name == "_check_closed":  # the copy, or its wrapper
            caller = caller.f_back  # type: ignore[assignment]
        if "threadsafe" in caller.f_code.co_name:
            return  # call_soon_threadsafe, the way across
        outer = caller
        while outer.f_back is not None and _loop_method(outer.f_back, loop):
            outer = outer.f_back  # call_later -> call_at: the call the user made
        if outer is not caller and "_check_closed" in outer.f_code.co_names:
            return  # create_task -> call_soon: the outer call was checked itself
        completed = _completed_future(loop, caller) if caller.f_code.co_name == "call_soon" \
            else None
        if completed is not None and _inside_checked_call(caller, record):
            return  # queue.put_nowait() waking a getter: that call was checked itself
        operation = outer.f_code.co_name
    except Exception as exc:
        internal_error(exc, "asyncio: a loop method")
        return
    if completed is not None:
        future, how, holder = completed
        Context.check(future, record, how, holder, policy=COMPLETED)
    else:
        Context.check(loop, record, operation)


def _inside_checked_call(frame: Any, record: OwnerRecord) -> bool:
    """Whether ``frame`` runs inside a checked call on an object of the same loop (the
    checks keep its record in ``_g_record``): what it does is part of that call."""
    frame = frame.f_back
    while frame is not None:
        checked = frame.f_locals.get("_g_record")
        if checked is not None and getattr(checked, "loop", None) is record.loop:
            return True
        frame = frame.f_back
    return False


def _loop_method(frame: Any, loop: Any) -> bool:
    """Whether ``frame`` runs a public method of ``loop`` on it."""
    code = frame.f_code
    return (not code.co_name.startswith("_") and frame.f_locals.get("self") is loop
            and callable(getattr(type(loop), code.co_name, None)))


def _completed_future(loop: Any, call_soon: Any) -> tuple[Any, str, Any] | None:
    """``(future, how it completed, its waiting task)`` when a done future of ``loop``
    schedules its callback (C futures call ``loop.call_soon(callback, future)`` by name),
    else None."""
    arguments = call_soon.f_locals
    args, callback = arguments.get("args", ()), arguments.get("callback")
    future = args[0] if len(args) == 1 else None
    if future is None or not _is_future_of(future, loop) or not future.done():
        return None
    task = getattr(callback, "__self__", None)
    holder = task if _is_task(task) else None
    if future.cancelled():
        return future, "cancel", holder
    how = "set_exception" if future.exception() is not None else "set_result"
    return future, how, holder


def _is_future_of(obj: Any, loop: Any) -> bool:
    asyncio = sys.modules["asyncio"]
    try:
        return bool(asyncio.isfuture(obj) and obj.get_loop() is loop)
    except Exception:
        return False


def _is_task(obj: Any) -> bool:
    return isinstance(obj, sys.modules["asyncio"].Task)


def _patch_binding(mixin: type, context: Context) -> None:
    """Note where and in which task asyncio binds a primitive to its loop, and report its
    use under another loop before asyncio raises."""
    def binding(obj: Any, record: OwnerRecord) -> None:
        if record.loop is not None:  # bound: asked for in another thread or loop
            caller = sys._getframe(2)
            Context.check(obj, record, caller.f_code.co_name)
            return
        loop = context.local.token.running_loop  # what _get_loop() binds it to
        if loop is not None and getattr(obj, "_loop", None) is None:
            try:
                context.bind(record, loop, here=True)
            except Exception as exc:
                context.internal_error(exc, "binding a primitive to its loop")

    names = {"_g_binding": binding, "_g_ident": context.local.ident,
             "_g_untracked": UNTRACKED}
    context.prologue(mixin, "_get_loop", _GET_LOOP, names)


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
