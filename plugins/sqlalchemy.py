"""SQLAlchemy's Sessions serve one thread at a time, its AsyncSessions one task at a time.

**Sync.** ``Session`` and ``Connection`` are patched in place (``patch_class``):
instances made while the sanitizer runs get an ``exclusive`` record, so any
thread may use them, one at a time, and a sequential handoff is fine. Engines,
pools and ``sessionmaker`` are thread-safe and stay untracked. DB-API
connections are the DB-API plugins' business (sqlite3: strict with
``check_same_thread=True``, exclusive with ``False``, which SQLAlchemy's pysqlite
dialect passes itself for file databases); a pool handing one from thread to
thread is a handoff. A Connection that a Session opens shares the Session's
record (derived objects share their parent's): the pair is one unit of work.

**asyncio** (``sqlalchemy.ext.asyncio``, hooked when the program imports it: it
needs greenlet). ``AsyncSession`` and ``AsyncConnection`` get the ``task``
policy: one task at a time inside their coroutine methods (``execute``,
``scalar(s)``, ``stream...``, ``get``, ``refresh``, ``merge``, ``delete``,
``flush``, ``commit``, ``rollback``, ``close``, ``connection``, ``run_sync``,
``async with`` ...) and those of their transactions (``AsyncSessionTransaction``,
``AsyncTransaction``: ``start``, ``commit``, ``rollback``, ``close``, ``async
with`` exit), which count as uses of their session or connection. A task that
enters while another is inside (``asyncio.gather()`` over one session) is
reported before SQLAlchemy runs any of its call: on a fresh session, where
SQLAlchemy refuses it afterwards, and on a connected one, where SQLAlchemy says
nothing (its adapters serialize the statements, and the two tasks' work
interleaves in one transaction). The report names the holder task, its
coroutine and where it waits, and where the session was made; with
``action=raise`` the intruder gets the error before any of its call ran.
Allowed: handing a session from task to task; the task in which ``async with``
closes it (a helper started inside the holder's span, ``policies.SPANS``);
greenlet_spawn and ``run_sync`` (the same task); a session per task;
``async_sessionmaker``'s sessions. The AsyncConnection a session hands out
(``await session.connection()``) is part of the session and shares its record.
AsyncConnection has ``__slots__``: its records are kept beside it (``RecordBeside``).

*Loops.* Engines, pools and ``async_sessionmaker`` are loop-agnostic and never
bound. An AsyncSession or AsyncConnection binds to the running loop at its
first I/O, when it checks out a connection (a session: when it opens one after
holding none; between transactions it keeps nothing of a loop, and may go on
under the next). While it holds that connection, a use under another loop is
reported (``loop``): it holds a driver connection of the old loop. Those of
aiosqlite never bind: it runs each connection in a thread of its own and answers
each call on the calling loop.

*Not checked here.* The pooled DB-API connections themselves: whether one belongs
to a loop is the driver's matter (asyncpg's keep the loop they were made under,
psycopg's wait on whichever loop runs, aiosqlite's serve any), so the driver
plugins check them, and the asyncio plugin checks the adapter's own
``asyncio.Lock`` once it bound to a loop. A module-level engine whose pool hands
a connection made under a loop that has ended to a new session under the next
(pytest-asyncio's loop per test) is theirs to report, not the session's (use
``NullPool`` or ``await engine.dispose()`` per loop). Also not checked: iterating
an ``AsyncResult`` after ``stream()`` returned, ``AsyncAttrs.awaitable_attrs``,
``session.sync_session`` used directly, the in-memory sync methods (``add``,
``expunge`` ...), and the loop of an AsyncSession bound to an AsyncConnection
(the connection's is). The task policy needs the asyncio plugin (it lends the
current task). ``noblock`` never applies here: the async adapters' I/O is awaited
under greenlet_spawn, so it blocks no loop.

One race is reported once, at its outermost tracked layer (a Session, an
AsyncSession): the core runs a reported call quietly (an async one for its task
only, ``policies.HUSH``), so the Connection, DB-API connection and cursor
beneath it do not report the same race again.

The pool's ``_finalize_fairy`` is exempt only on its garbage-collection path;
an ordinary checkin from the wrong thread is a use like any other.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable
from types import CodeType, FrameType, ModuleType
from typing import Any

from sanitizer.plugin import (
    EXCLUSIVE,
    OWN,
    UNTRACKED,
    Context,
    Methods,
    OwnerRecord,
    Plugin,
    TaskPolicy,
    ThreadToken,
    Violation,
)

# Uses of the unit of work and the transaction; not the read-only introspection
# (is_active, in_transaction(), info, dirty/new/deleted, get_bind()).
SESSION_METHODS: Methods = {
    "execute": "statement, params=None, **kw",
    "scalar": "statement, params=None, **kw",
    "scalars": "statement, params=None, **kw",
    "get": OWN, "get_one": OWN, "query": OWN,
    "add": OWN, "add_all": OWN, "delete": OWN, "delete_all": OWN,
    "merge": OWN, "merge_all": OWN, "refresh": OWN,
    "expire": OWN, "expire_all": "", "expunge": OWN, "expunge_all": "",
    "flush": "objects=None", "commit": "", "rollback": "", "prepare": "", "close": "", "reset": "",
    "invalidate": "", "begin": OWN, "begin_nested": "", "connection": OWN,
    "bulk_save_objects": OWN, "bulk_insert_mappings": OWN, "bulk_update_mappings": OWN,
    "is_modified": OWN, "enable_relationship_loading": OWN,
    "__enter__": "", "__exit__": "type_, value, traceback", "__iter__": "",
    "__contains__": "instance",
}
CONNECTION_METHODS: Methods = {
    "execute": "statement, parameters=None, **kw",
    "scalar": "statement, parameters=None, **kw",
    "scalars": "statement, parameters=None, **kw",
    "exec_driver_sql": OWN,
    "begin": "", "begin_nested": "", "begin_twophase": OWN,
    "commit": "", "rollback": "", "close": "", "invalidate": OWN, "detach": "",
    "execution_options": OWN,  # changes this Connection in place
    "get_isolation_level": "", "recover_twophase": "", "commit_prepared": OWN,
    "rollback_prepared": OWN, "__enter__": "", "__exit__": "type_, value, traceback",
}

GC_FINALIZER = "_sanitizer_gc_finalize_fairy"


def _session_connect_code() -> CodeType | None:
    """The code of SessionTransaction._connection_for_bind, through which a Session
    opens each of its Connections (None until sqlalchemy.orm.session is loaded)."""
    session = sys.modules.get("sqlalchemy.orm.session")
    connect = getattr(getattr(session, "SessionTransaction", None), "_connection_for_bind",
                      None)
    return inspect.unwrap(connect).__code__ if connect is not None else None


def _opening(frame: FrameType | None, connect: CodeType | None) -> tuple[Any, Any]:
    """The Session opening a Connection, and the bind it opens it on, found a few frames
    up (once per Connection, which costs nothing per statement, unlike a wrapper around
    _connection_for_bind); (None, None) for a Connection no Session opens."""
    for _ in range(12):
        if frame is None or connect is None:
            break
        if frame.f_code is connect:
            local = frame.f_locals
            return getattr(local.get("self"), "session", None), local.get("bind")
        frame = frame.f_back
    return None, None


def _sanitizer_gc_finalize_fairy(wrapped: Callable[..., Any], args: tuple[Any, ...],
                                 kwargs: dict[str, Any]) -> Any:
    """The pool returning a garbage-collected connection, on whatever thread the GC ran."""
    return wrapped(*args, **kwargs)


def _finalize_fairy(wrapped: Callable[..., Any], _instance: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    # _finalize_fairy also runs every ordinary checkin (Connection.close()), which
    # is a use like any other; only its garbage-collection path is exempt. There
    # the fairy is gone, so its DB-API connection comes as None (SQLAlchemy 2.0
    # and 2.1); 2.1 also says is_gc_cleanup=True.
    if kwargs.get("is_gc_cleanup") or (args and args[0] is None):
        return _sanitizer_gc_finalize_fairy(wrapped, args, kwargs)
    return wrapped(*args, **kwargs)


def _install_pool(module: ModuleType, context: Context) -> None:
    if callable(getattr(module, "_finalize_fairy", None)):
        context.wrap(module, "_finalize_fairy", _finalize_fairy)


def _install_session(module: ModuleType, context: Context) -> None:
    context.patch_class(module.Session, EXCLUSIVE, SESSION_METHODS,
                        make_record=lambda session: context.record(session, EXCLUSIVE))


def _install_connection(module: ModuleType, context: Context) -> None:
    connect: list[CodeType | None] = []  # looked up at the first Connection

    def make_record(conn: Any) -> OwnerRecord:
        # A Session's Connection is derived from it and shares its record: using
        # either is using the Session, and no stack is captured per transaction.
        if not connect or connect[0] is None:
            connect[:] = [_session_connect_code()]
        session, bind = _opening(sys._getframe(1), connect[0])
        record = context.record_of(session)
        if record is None:
            return context.record(conn, EXCLUSIVE)
        owner = getattr(session, ASYNC_OWNER, None)
        if owner is not None:  # an AsyncSession's
            vars(conn)[ASYNC_OWNER] = owner  # for the AsyncConnection proxy, if one is made
            # Its first I/O, or the first since it let go of its last connection.
            if _loop_bound(bind) and (owner.loop is None or not _session_holds(session)):
                _bind_running(owner)
        return record

    context.patch_class(module.Connection, EXCLUSIVE, CONNECTION_METHODS,
                        make_record=make_record)


# -- sqlalchemy.ext.asyncio ----------------------------------------------------------------

#: In a sync Session's (and its Connections') __dict__: the record of the AsyncSession over it.
ASYNC_OWNER = "_sanitizer_async_owner"

# The coroutine methods: each runs its sync counterpart under greenlet_spawn, in the
# calling task, and suspends that task while the driver waits. Sync methods (add,
# expunge, begin() which only builds the transaction object ...) touch no connection.
ASYNC_SESSION_METHODS: Methods = {name: OWN for name in (
    "execute", "scalar", "scalars", "stream", "stream_scalars", "get", "get_one",
    "refresh", "merge", "merge_all", "delete", "delete_all", "flush", "connection",
    "commit", "rollback", "close", "aclose", "reset", "invalidate", "run_sync",
    "__aenter__", "__aexit__",
)}
ASYNC_CONNECTION_METHODS: Methods = {name: OWN for name in (
    "start", "execute", "scalar", "scalars", "stream", "stream_scalars",
    "exec_driver_sql", "execution_options", "get_raw_connection", "get_isolation_level",
    "invalidate", "commit", "rollback", "close", "aclose", "run_sync",
    "__aenter__", "__aexit__",
)}
LOOP_AGNOSTIC_DRIVERS = frozenset({"aiosqlite"})
# Their transactions are parts of them: checked against the session's (connection's) record.
TRANSACTION_METHODS = ("start", "commit", "rollback", "close", "__aexit__")


class AsyncTasks(TaskPolicy):
    """The task policy for AsyncSession and AsyncConnection: one task at a time inside
    their coroutine methods; and their loop's, but only while they hold a connection.

    Between transactions an AsyncSession keeps nothing of its loop: the connection
    it checks out next is bound to it again (``_bind_running``).
    """

    def __init__(self, task_hint: str, loop_hint: str) -> None:
        super().__init__()
        self.hints = {"task": task_hint, "loop": loop_hint}

    def violated(
        self, record: OwnerRecord, token: ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        verdict = super().violated(record, token, holder, obj, operation)
        if verdict == "loop" and not _holds_connection(obj):
            return None
        return verdict

    def advice_for(self, violation: Violation, record: OwnerRecord) -> str:
        return self.hints.get(violation.policy) or super().advice_for(violation, record)


SESSION_TASKS = AsyncTasks(
    "an AsyncSession is for one task at a time: give each task its own "
    "(async_sessionmaker), or await its operations one after another",
    "it holds a connection checked out under that loop: commit or close the session "
    "before its loop ends")
CONNECTION_TASKS = AsyncTasks(
    "an AsyncConnection is for one task at a time: open one per task (engine.connect())",
    "its DB-API connection was checked out under that loop: close it before the loop ends")


def _loop_bound(bind: Any) -> bool:
    """Whether connections of this Engine (or Connection) belong to the loop they were
    checked out under: an async driver's, but aiosqlite's serve any loop (a thread
    per connection, a future of the calling loop per call)."""
    dialect = getattr(bind, "dialect", None)
    return bool(getattr(dialect, "is_async", False)) and \
        getattr(dialect, "driver", None) not in LOOP_AGNOSTIC_DRIVERS


def _session_holds(session: Any) -> bool:
    """Whether a sync Session holds a connection now (its root transaction has one)."""
    root = session.get_transaction()
    return root is not None and bool(getattr(root, "_connections", True))


def _holds_connection(obj: Any) -> bool:
    """Whether an AsyncSession or AsyncConnection (or one of their transactions) holds a
    DB-API connection now (cold path: a use under another loop)."""
    session = getattr(obj, "sync_session", None)  # AsyncSession
    if session is None:
        session = getattr(getattr(obj, "session", None), "sync_session", None)
    if session is not None:  # ... or AsyncSessionTransaction
        return _session_holds(session)
    if not hasattr(obj, "sync_connection"):  # AsyncTransaction
        obj = getattr(obj, "connection", obj)
    connection = getattr(obj, "sync_connection", None)
    return connection is not None and not connection.closed


def _bind_running(record: OwnerRecord) -> None:
    """Bind to the loop running now (again, if it let go of the one before)."""
    loop = Context.running_loop()
    if loop is not None and record.policy is not None and record.loop is not loop:
        record.bind(loop)


class RecordBeside:
    """AsyncConnection's ``_sanitizer_record``: the class has ``__slots__`` and no room for
    one, so its records are kept here, by identity (AsyncConnection defines ``__eq__``,
    which a WeakKeyDictionary would call) until the connection is gone."""

    def __init__(self) -> None:
        self.records: dict[int, tuple[weakref.ref[Any], OwnerRecord]] = {}

    def __get__(self, obj: Any, owner: type | None = None) -> OwnerRecord:
        entry = self.records.get(id(obj)) if obj is not None else None
        return entry[1] if entry is not None and entry[0]() is obj else UNTRACKED

    def __set__(self, obj: Any, record: OwnerRecord) -> None:
        key = id(obj)
        if record is UNTRACKED:
            self.records.pop(key, None)
            return
        records = self.records
        self.records[key] = (weakref.ref(obj, lambda _ref: records.pop(key, None)), record)


def _install_async_session(module: ModuleType, context: Context) -> None:
    cls = module.AsyncSession

    def note_owner(session: Any) -> None:
        record = context.record_of(session)
        sync = getattr(session, "sync_session", None)
        if record is not None and sync is not None and hasattr(sync, "__dict__"):
            vars(sync)[ASYNC_OWNER] = record

    context.patch_class(cls, SESSION_TASKS, ASYNC_SESSION_METHODS,
                        make_record=lambda session: context.record(session, SESSION_TASKS),
                        after_init=note_owner)
    _guard_transaction(module.AsyncSessionTransaction, "session", context)


def _install_async_connection(module: ModuleType, context: Context) -> None:
    cls = module.AsyncConnection
    context.patch_class(cls, CONNECTION_TASKS, ASYNC_CONNECTION_METHODS)
    context.replace(cls, "_sanitizer_record", RecordBeside())

    def made(conn: Any) -> None:
        # A proxy of an AsyncSession's connection is part of the session (one unit of
        # work, as the sync Connection is of its Session); any other has its own record.
        sync = conn.sync_connection
        owner = getattr(sync, ASYNC_OWNER, None)
        if owner is None:
            owner = context.record(conn, CONNECTION_TASKS)
            if sync is not None and _loop_bound(sync):  # a proxy for one checked out
                _bind_running(owner)
        Context.attach(conn, owner)

    context.patch_class(cls, CONNECTION_TASKS, {}, make_record=lambda _conn: UNTRACKED,
                        after_init=made)
    original = cls._assign_proxied

    def _assign_proxied(self: Any, target: Any) -> Any:
        # start() checks out the DB-API connection: the AsyncConnection's first I/O.
        if target is not None and _loop_bound(target):
            _bind_running(self._sanitizer_record)
        return original(self, target)

    _assign_proxied.__wrapped__ = original  # type: ignore[attr-defined]
    context.replace(cls, "_assign_proxied", _assign_proxied)
    _guard_transaction(module.AsyncTransaction, "connection", context)


def _guard_transaction(cls: type, parent: str, context: Context) -> None:
    """A transaction's coroutine methods, checked against its parent's record."""
    for name in TRANSACTION_METHODS:
        method = vars(cls).get(name)
        if inspect.iscoroutinefunction(method):
            context.replace(cls, name, Context.guard(
                SESSION_TASKS if parent == "session" else CONNECTION_TASKS, method, name,
                record_from=parent))


plugin = Plugin(
    name="sqlalchemy",
    hooks={
        "sqlalchemy.orm.session": _install_session,
        "sqlalchemy.engine.base": _install_connection,
        "sqlalchemy.pool.base": _install_pool,
        # Never imported by the sanitizer (it needs greenlet): hooked when the program does.
        "sqlalchemy.ext.asyncio.engine": _install_async_connection,
        "sqlalchemy.ext.asyncio.session": _install_async_session,
    },
    libraries=("sqlalchemy", "<sqlalchemy generated"),
    # The pool returning a garbage-collected connection, on any thread the GC ran.
    finalizers=(GC_FINALIZER,),
)
