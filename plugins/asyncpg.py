"""Thread-affinity checks for asyncpg: a connection serves one task at a time, on its own loop.

What is checked:

* **Connections** (``asyncpg.connect()``, a pool's, a ``connection_class=`` of your
  own) get the ``task`` policy, bound to the loop asyncpg itself keeps
  (``Connection._loop``). Their coroutine methods (``execute``, ``fetch*``,
  ``executemany``, ``copy_*``, ``prepare``, ``set_type_codec``, ``add_listener``,
  ``reset``, ``close`` ...) let one task in at a time, nested calls of the same
  task included: a second task entering while one is inside is reported, naming
  the holder, its coroutine and where it waits, *before* the statement is sent
  (asyncpg itself says only "another operation is in progress", or nothing); with
  ``action=raise`` the intruding task gets the ThreadAffinityError instead, and the
  holder's statement goes on undisturbed.
  Used under another loop, or from a thread other than its loop's, is reported
  under the ``loop`` rule, which the sync methods follow too (``transaction()``,
  ``cursor()``, ``terminate()``, the listener and logger registrations). From
  another thread, asyncpg's C protocol races with the loop's thread, which reads
  the same socket: such a program may crash right after the report (it is written
  first); ``action=raise`` stops the call before it.
* **An open transaction or cursor is a span of its own**: from ``start()``
  (``async with conn.transaction()``) until ``commit()``/``rollback()``/
  ``__aexit__``, and from opening a cursor until it is exhausted or its
  transaction ends, the task that opened it holds the connection between its
  statements. Another task's statement then would run inside that transaction:
  reported, though asyncpg lets it through silently. A span whose task finished
  (a fixture's transaction used by the test, then rolled back by its teardown)
  or whose transaction is gone (rolled back by the pool's reset, ended by SQL)
  is let go when the next task comes.
* **Transactions, cursors and prepared statements** share their connection's
  record: their methods are checked as the connection's.
* **Pools** (``asyncpg.create_pool()``) belong to the loop asyncpg recorded
  (``Pool._loop``), under the ``loop`` policy; acquire and release from any task
  of that loop are a handoff. A pooled connection (``PoolConnectionProxy``) is
  checked through its Connection.

Allowed: a connection handed from task to task (one after the other), the pool's
release in its ``shield()``-ed task, ``wait_for()``'s inner task (3.10/3.11) and
other helper tasks the holder starts inside its span, loop callbacks with no
task, setup before the loop runs and teardown after it stops, and ``__del__``.

Not checked: reads (``is_closed()``, ``is_in_transaction()``, ``get_server_pid()``,
``get_server_version()``, ``get_settings()``, ``get_reset_query()``, a prepared
statement's ``get_*()``), which touch nothing a running operation changes.
Not seen: connections and pools made before the sanitizer started, and pools
made by calling ``asyncpg.Pool(...)`` directly (``create_pool()`` is seen).
Two helper tasks of one holder, both inside its transaction (``gather()`` of two
queries there), are not told apart: the task policy lets a holder's helpers in
without a span of their own (asyncpg's "another operation is in progress" still
says so when their queries overlap).

asyncpg's classes have ``__slots__`` and no room for a record: the methods are
guarded in place (undone by ``disable()``), and the connections and pools made
while the sanitizer runs are of a subclass that only adds the record's slot
(``type()`` differs, ``isinstance()`` and reports do not), swapped in where
asyncpg makes them (``connect_utils._connect``'s ``connection_class``, the
``Pool`` that ``create_pool()`` calls: while the sanitizer runs, ``asyncpg.pool.Pool``
is that subclass; ``asyncpg.Pool`` stays asyncpg's own).

Reports carry ``resource`` = host, port and database, never a query.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from types import ModuleType
from typing import Any

from sanitizer.plugin import (
    OWN,
    UNTRACKED,
    Context,
    LoopBound,
    Methods,
    OwnerRecord,
    Plugin,
    TaskPolicy,
    ThreadToken,
    Violation,
    internal_error,
)

TASK_HINT = ("asyncpg runs one operation at a time on a connection: give each task its own "
             "(pool.acquire())")
HELD_HINT = ("a transaction takes the whole connection: give each task its own "
             "(pool.acquire()), or hand it over once the transaction ended")
LOOP_HINT = ("a connection belongs to the event loop it was made in: connect in the loop that "
             "uses it")
POOL_HINT = ("a pool belongs to the event loop it was created in: create it in the loop that "
             "uses it")


class Holds:
    """The spans one task holds on a connection across calls (open transactions and
    cursors, by ``id()``: asyncpg's are neither weak-referenceable nor to be kept alive)."""

    __slots__ = ("connection", "entries", "task")

    def __init__(self, connection: Any, task: object) -> None:
        self.connection = weakref.ref(connection)
        self.task = task
        self.entries: list[tuple[int, str]] = []


#: Per connection record, its held spans. Weak: a connection dropped with an open
#: transaction takes its entry along.
HOLDS: weakref.WeakKeyDictionary[OwnerRecord, Holds] = weakref.WeakKeyDictionary()
#: Where a holder's helper tasks (``wait_for``'s inner task, the pool's ``shield()``-ed
#: release) learn that it holds a connection: (record, task) weak references noted in the
#: holder's context when it opens a transaction or cursor, which asyncio copies into each
#: task it starts from then on. A variable of its own: the task guards reset theirs as
#: each call returns, and a guard of another layer around ``start()`` (an ORM's) would
#: take the note with it.
HELD: ContextVar[tuple[tuple[weakref.ref[Any], weakref.ref[Any]], ...]] = ContextVar(
    "sanitizer_asyncpg_held", default=())
HELD_LIMIT = 16  # notes kept per context: the latest


class ConnectionTasks(TaskPolicy):
    """The task policy, knowing when an asyncpg connection's held span is over."""

    def violated(
        self, record: OwnerRecord, token: ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if holder is not None and (_span_over(record, holder) or _helper_of(record, holder)):
            return None
        return super().violated(record, token, holder, obj, operation)

    def describe(self, violation: Violation, record: OwnerRecord, token: ThreadToken) -> str:
        held = _held_kind(record)
        if violation.policy == self.name and held is not None:
            root = violation.root_type or violation.object_type
            return (f"{violation.object_type}.{violation.operation} called"
                    f"{_in_task(violation.task)} while task "
                    f"{_task_phrase(violation.holder_task)} has an open {held} on the same "
                    f"{root}: the statement would run inside it ({self.name} policy)")
        return super().describe(violation, record, token)

    def advice_for(self, violation: Violation, record: OwnerRecord) -> str:
        if violation.policy == self.name and _held_kind(record) is not None:
            return HELD_HINT
        return {"task": TASK_HINT, "loop": LOOP_HINT}.get(violation.policy) or \
            super().advice_for(violation, record)


def _task_phrase(task: dict[str, Any] | None) -> str:
    task = task or {}
    coroutine = task.get("coroutine")
    return f"'{task.get('name')}'" + (f" ({coroutine}())" if coroutine else "")


def _in_task(task: dict[str, Any] | None) -> str:
    return f" in task {_task_phrase(task)}" if task else ""


CONNECTION = ConnectionTasks()
POOL = LoopBound(POOL_HINT)


def _held_kind(record: OwnerRecord) -> str | None:
    holds = HOLDS.get(record)
    if holds is None or holds.task is not record.task or not holds.entries:
        return None
    return holds.entries[-1][1]


def _span_over(record: OwnerRecord, holder: object) -> bool:
    """Whether ``holder``'s span on ``record`` ended without a let-go (cold path): its task
    finished (a handoff), or its transaction is gone (the pool's reset rolled it back, a
    COMMIT in SQL, the connection closed). Then it is forgotten; True if no task is inside."""
    try:
        done = getattr(holder, "done", None)
        if callable(done) and done():
            # A finished task is inside nothing: whatever it left open is handed over.
            HOLDS.pop(record, None)
            record.task, record.depth = None, 0
            return True
        holds = HOLDS.get(record)
        if holds is None or holds.task is not holder:
            return False
        conn = holds.connection()
        if conn is not None and not conn.is_closed() and conn.is_in_transaction():
            return False
        del HOLDS[record]
        _end_spans(record, holder, len(holds.entries))
        return record.task is None
    except Exception as exc:
        internal_error(exc, "asyncpg: checking a held span")
        return False


def _hold(obj: object, conn: Any, kind: str) -> None:
    """The current task holds ``conn`` while ``obj`` (a transaction, a cursor) is open."""
    record = getattr(conn, "_sanitizer_record", None)
    if not isinstance(record, OwnerRecord) or record.policy is None:
        return
    holds = HOLDS.get(record)
    key = id(obj)
    if holds is not None and any(entry[0] == key for entry in holds.entries):
        return  # an iterator's next batch: held already
    task = Context.current_task()
    if task is None or record.task not in (None, task):
        return  # a loop callback holds nothing; another task inside was reported
    # A span, as a task guard's: the template nests its own calls in it.
    record.task = task
    record.depth += 1
    if holds is None or holds.task is not task:
        holds = HOLDS[record] = Holds(conn, task)
        _note(record, task)
    holds.entries.append((key, kind))


def _let_go(obj: object, conn: Any) -> None:
    """``obj`` is closed: its span (if it holds one) ends."""
    record = getattr(conn, "_sanitizer_record", None)
    holds = HOLDS.get(record) if isinstance(record, OwnerRecord) else None
    if holds is None:
        return
    key = id(obj)
    for index, entry in enumerate(holds.entries):
        if entry[0] == key:
            del holds.entries[index]
            break
    else:
        return
    assert record is not None
    try:
        idle = conn.is_closed() or not conn.is_in_transaction()
    except Exception:
        idle = True
    ended = 1
    if idle:  # the transaction ended: its cursors with it
        ended += len(holds.entries)
        holds.entries.clear()
    if not holds.entries:
        del HOLDS[record]
    _end_spans(record, holds.task, ended)


def _end_spans(record: OwnerRecord, task: object, count: int) -> None:
    """``count`` spans that ``task`` held on ``record`` are over."""
    if record.task is task:
        record.depth = max(record.depth - count, 0)
        if not record.depth:
            record.task = None
    if HOLDS.get(record) is None:
        _forget(record, task)


def _note(record: OwnerRecord, task: object) -> None:
    """Note in the current (the holder's) context that ``task`` holds ``record``."""
    try:
        kept = tuple(entry for entry in HELD.get() if entry[0]() not in (None, record))
        HELD.set(((weakref.ref(record), weakref.ref(task)), *kept)[:HELD_LIMIT])
    except TypeError:  # a task that cannot be weakly referenced: no helpers then
        pass


def _forget(record: OwnerRecord, task: object) -> None:
    """Drop the note from the current context (the holder's, usually: elsewhere there is
    none, and the holder's own goes with its task)."""
    notes = HELD.get()
    if any(entry[0]() is record for entry in notes):
        HELD.set(tuple(entry for entry in notes if entry[0]() is not record))


def _helper_of(record: OwnerRecord, holder: object) -> bool:
    """Whether the current task was started by ``holder`` while it held ``record``."""
    return any(entry[0]() is record and entry[1]() is holder for entry in HELD.get())


# -- method tables ---------------------------------------------------------------------

# Coroutine methods get task guards (one task at a time, nested by the same task),
# the others the loop rule (TaskPolicy.template_for tells them apart). The hot
# ones get their exact parameter lists (OWN: the method's own).
CONNECTION_METHODS: Methods = {name: OWN for name in (
    "execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany", "prepare",
    "copy_from_table", "copy_from_query", "copy_to_table", "copy_records_to_table",
    "set_type_codec", "reset_type_codec", "set_builtin_type_codec", "add_listener",
    "remove_listener", "reload_schema_state", "reset", "close",
    # Sync, the loop rule. transaction() and cursor() make objects for this loop's
    # statements; terminate() aborts the transport (transport.abort() and call_soon on
    # the connection's loop: from another loop or thread it breaks that loop, or raises
    # "Event loop is closed"); asyncpg's own __del__ -> terminate() is finalization,
    # not reported; the listener and logger sets are read by the loop's callbacks.
    "transaction", "cursor", "terminate", "add_log_listener", "remove_log_listener",
    "add_termination_listener", "remove_termination_listener", "add_query_logger",
    "remove_query_logger", "query_logger",
)}
# Not guarded: is_closed(), is_in_transaction(), get_server_pid(), get_server_version(),
# get_settings(), get_reset_query(): reads of fields a running operation does not
# change (asyncpg's pool and __del__ call is_closed() from callbacks and the GC).

# Transaction.__aenter__ is left unguarded: it only marks the block and awaits start(),
# which is guarded (and holds the span: a guard around __aenter__ would end the note
# of it in the task's context when it returned).
TRANSACTION_METHODS = ("start", "commit", "rollback", "__aexit__")
CURSOR_FACTORY_METHODS = ("__aiter__", "__await__")  # sync: the loop rule
CURSOR_METHODS = ("_init", "fetch", "fetchrow", "forward")  # _init: `await conn.cursor()`
CURSOR_ITERATOR_METHODS = ("__aiter__", "__anext__")
STATEMENT_METHODS = ("cursor", "explain", "fetch", "fetchval", "fetchrow", "fetchmany",
                     "executemany")

POOL_METHODS: Methods = {name: OWN for name in (
    "acquire", "release", "close", "terminate", "expire_connections", "execute",
    "executemany", "fetch", "fetchval", "fetchrow", "fetchmany", "copy_from_table",
    "copy_from_query", "copy_to_table", "copy_records_to_table", "__aenter__", "__aexit__",
    "__await__",
)}
# Not guarded: get_size() and the other reads, is_closing(), set_connect_args().


# -- installing ------------------------------------------------------------------------


def install(asyncpg: ModuleType, context: Context) -> None:
    # Its submodules, all loaded by then (asyncpg/__init__ imports connection and pool,
    # which import the others).
    connect_utils, connection, connresource, cursor, pool, prepared_stmt, transaction = (
        getattr(asyncpg, name) for name in ("connect_utils", "connection", "connresource",
                                            "cursor", "pool", "prepared_stmt", "transaction"))
    base: type = connection.Connection
    context.patch_class(base, CONNECTION, CONNECTION_METHODS)
    _patch_connect(connect_utils, base, context)
    _patch_resources(connresource, cursor, prepared_stmt, transaction, context)
    _patch_pool(pool, context)


def _patch_connect(connect_utils: ModuleType, base: type, context: Context) -> None:
    """Connections are made of a subclass with the record's slot: asyncpg takes any
    ``connection_class`` subclass, and every way to connect passes one to ``_connect``."""
    made: dict[type, type] = {}

    def tracked(cls: Any) -> Any:
        if not isinstance(cls, type) or not issubclass(cls, base) or cls in made.values():
            return cls
        found = made.get(cls)
        if found is None:
            # A subclass of the user's own: guard its overrides of the table's methods too.
            own = {name: spec for name, spec in CONNECTION_METHODS.items()
                   if any(name in vars(k) for k in cls.__mro__[:cls.__mro__.index(base)])}
            found = made[cls] = Context.subclass(cls, CONNECTION, own,
                                                 extra={"__init__": _connection_init(cls)})
        return found

    def _connection_init(cls: type) -> Callable[..., None]:
        original = cls.__init__  # type: ignore[misc]

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            self._sanitizer_record = UNTRACKED  # until made: the slot is never empty
            original(self, *args, **kwargs)
            record = context.record(self, CONNECTION, resource=_resource(self))
            context.bind(record, self._loop)
            self._sanitizer_record = record
        return __init__

    original = connect_utils._connect

    @functools.wraps(original)
    async def _connect(*args: Any, **kwargs: Any) -> Any:
        if "connection_class" in kwargs:
            try:
                kwargs["connection_class"] = tracked(kwargs["connection_class"])
            except Exception as exc:
                context.internal_error(exc, "tracking a connection class")
        return await original(*args, **kwargs)

    context.replace(connect_utils, "_connect", _connect)


def _resource(conn: Any) -> dict[str, Any] | None:
    """What the connection is to; never credentials or queries."""
    try:
        addr, database = conn._addr, conn._params.database
        host, port = (addr, None) if isinstance(addr, str) else (addr[0], addr[1])
    except Exception:
        return None
    return {"driver": "asyncpg", "host": host, "port": port, "database": database}


def _patch_resources(connresource: ModuleType, cursor: ModuleType, prepared_stmt: ModuleType,
                     transaction: ModuleType, context: Context) -> None:
    """Transactions, cursors and prepared statements: checked as their connection."""
    started = transaction.TransactionState.STARTED
    check_code = connresource.guarded(lambda self: None).__code__

    def patch(cls: type, name: str, around: Callable[[Any], Any] | None = None) -> None:
        method = getattr(cls, name, None)
        if method is None:
            return
        # asyncpg's connresource.guarded (the "released to the pool" check) wraps the
        # coroutine function in a plain one: guard the coroutine inside, so that it gets a
        # task guard, and wrap it again, so that asyncpg's check still comes first.
        checked = getattr(method, "__code__", None) is check_code
        inner = method.__wrapped__ if checked else method
        guard = Context.guard(CONNECTION, inner, name, OWN, record_from="_connection")
        if around is not None:
            guard = functools.wraps(guard)(around(guard))
        context.replace(cls, name, connresource.guarded(guard) if checked else guard)

    def starting(guard: Any) -> Any:
        async def start(self: Any) -> Any:
            result = await guard(self)
            if self._state is started:
                _hold(self, self._connection, "transaction")
            return result
        return start

    def ending(guard: Any) -> Any:
        async def end(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await guard(self, *args, **kwargs)
            finally:
                if self._state is not started:  # committed, rolled back or failed
                    _let_go(self, self._connection)
        return end

    def opening(guard: Any) -> Any:
        async def _init(self: Any, timeout: Any) -> Any:
            result = await guard(self, timeout)
            if self._portal_name:
                _hold(self, self._connection, "cursor")
            return result
        return _init

    def iterating(guard: Any) -> Any:
        async def __anext__(self: Any) -> Any:
            try:
                row = await guard(self)
            except BaseException:  # StopAsyncIteration: done; an error ends it too
                _let_go(self, self._connection)
                raise
            if self._portal_name:
                _hold(self, self._connection, "cursor")
            else:  # exhausted: the portal is closed
                _let_go(self, self._connection)
            return row
        return __anext__

    # record_of(a transaction, cursor or statement) is its connection's (the guards read
    # it from the connection directly).
    context.replace(connresource.ConnectionResource, "_sanitizer_record",
                    property(lambda self: self._connection._sanitizer_record))
    tx = transaction.Transaction
    patch(tx, "start", starting)
    for name in TRANSACTION_METHODS[1:]:
        patch(tx, name, ending)
    for name in CURSOR_FACTORY_METHODS:
        patch(cursor.CursorFactory, name)
    patch(cursor.Cursor, "_init", opening)
    for name in CURSOR_METHODS[1:]:
        patch(cursor.Cursor, name)
    patch(cursor.CursorIterator, "__aiter__")
    patch(cursor.CursorIterator, "__anext__", iterating)
    for name in STATEMENT_METHODS:
        patch(prepared_stmt.PreparedStatement, name)


def _patch_pool(pool: ModuleType, context: Context) -> None:
    """Pools are made of a subclass with the record's slot (``create_pool()`` calls the
    module's ``Pool``), bound to the loop asyncpg gave them."""
    base: type = pool.Pool
    context.patch_class(base, POOL, POOL_METHODS)
    original = base.__init__  # type: ignore[misc]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self._sanitizer_record = UNTRACKED  # until made: the slot is never empty
        original(self, *args, **kwargs)
        record = context.record(self, POOL)
        context.bind(record, self._loop)
        self._sanitizer_record = record

    context.replace(pool, "Pool", Context.subclass(base, POOL, {}, extra={"__init__": __init__}))


plugin = Plugin(name="asyncpg", hooks={"asyncpg": install}, libraries=("asyncpg",))
