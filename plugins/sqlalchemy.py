"""Thread-affinity checks for SQLAlchemy: a Session or a Connection is used by one thread at a time.

``Session`` and ``Connection`` are patched in place (``patch_class``): instances
made while the sanitizer runs get an ``exclusive`` record, so any thread may use
them, one at a time, and a sequential handoff is fine. Engines, pools and
``sessionmaker`` are thread-safe and stay untracked. DB-API connections are the
DB-API plugins' business (sqlite3: strict with ``check_same_thread=True``,
exclusive with ``False``, which SQLAlchemy's pysqlite dialect passes itself for
file databases); a pool handing one from thread to thread is a handoff.

A Connection that a Session opens shares the Session's record (derived
objects share their parent's): the pair is one unit of work.

One race is reported once, at its outermost tracked layer (a Session): the core
runs a reported call quietly, so the Connection, DB-API connection and cursor
beneath it do not report the same race again.

The pool's ``_finalize_fairy`` is exempt only on its garbage-collection path;
an ordinary checkin from the wrong thread is a use like any other.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from types import CodeType, FrameType, ModuleType
from typing import Any

from sanitizer.instrument import patch_class
from sanitizer.ownership import UNTRACKED, OwnerRecord
from sanitizer.plugin import Context, Plugin
from sanitizer.policies import EXCLUSIVE_POLICY

# Method name -> exact parameter list of its guard (None: *args, **kwargs).
# Uses of the unit of work and the transaction; not the read-only introspection
# (is_active, in_transaction(), info, dirty/new/deleted, get_bind()).
SESSION_METHODS: dict[str, str | None] = {
    "execute": "statement, params=None, **kw",
    "scalar": "statement, params=None, **kw",
    "scalars": "statement, params=None, **kw",
    "get": None, "get_one": None, "query": None,
    "add": None, "add_all": None, "delete": None, "delete_all": None,
    "merge": None, "merge_all": None, "refresh": None,
    "expire": None, "expire_all": "", "expunge": None, "expunge_all": "",
    "flush": "objects=None", "commit": "", "rollback": "", "prepare": "", "close": "", "reset": "",
    "invalidate": "", "begin": None, "begin_nested": "", "connection": None,
    "bulk_save_objects": None, "bulk_insert_mappings": None, "bulk_update_mappings": None,
    "is_modified": None, "enable_relationship_loading": None,
    "__enter__": "", "__exit__": "type_, value, traceback", "__iter__": "",
    "__contains__": "instance",
}
CONNECTION_METHODS: dict[str, str | None] = {
    "execute": "statement, parameters=None, **kw",
    "scalar": "statement, parameters=None, **kw",
    "scalars": "statement, parameters=None, **kw",
    "exec_driver_sql": None,
    "begin": "", "begin_nested": "", "begin_twophase": None,
    "commit": "", "rollback": "", "close": "", "invalidate": None, "detach": "",
    "execution_options": None,  # changes this Connection in place
    "get_isolation_level": "", "recover_twophase": "", "commit_prepared": None,
    "rollback_prepared": None, "__enter__": "", "__exit__": "type_, value, traceback",
}

GC_FINALIZER = "_sanitizer_gc_finalize_fairy"

_context: Context | None = None


# The code of SessionTransaction._connection_for_bind, through which every
# Connection a Session opens is made (set when sqlalchemy.orm.session loads).
_session_connects: set[CodeType] = set()


def _make_record(obj: Any) -> OwnerRecord:
    if _context is None:  # pragma: no cover - a patch outlived its plugin
        return UNTRACKED
    return _context.new_record(obj, EXCLUSIVE_POLICY)


def _make_connection_record(conn: Any) -> OwnerRecord:
    # A Session's Connection is derived from it and shares its record: using
    # either is using the Session, and no stack is captured per transaction.
    # Found by looking up the stack once per Connection, which costs nothing
    # per statement (unlike a wrapper around _connection_for_bind).
    frame: FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        if frame.f_code in _session_connects:
            session = getattr(frame.f_locals.get("self"), "session", None)
            record = getattr(session, "_sanitizer_record", None)
            if isinstance(record, OwnerRecord):
                return record
            break
        frame = frame.f_back
    return _make_record(conn)


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
    global _context
    _context = context
    patch_class(module.Session, EXCLUSIVE_POLICY, context.replace, _make_record,
                SESSION_METHODS)
    connect = getattr(getattr(module, "SessionTransaction", None), "_connection_for_bind", None)
    if connect is not None:
        _session_connects.add(inspect.unwrap(connect).__code__)


def _install_connection(module: ModuleType, context: Context) -> None:
    global _context
    _context = context
    patch_class(module.Connection, EXCLUSIVE_POLICY, context.replace, _make_connection_record,
                CONNECTION_METHODS)


plugin = Plugin(
    name="sqlalchemy",
    hooks={
        "sqlalchemy.orm.session": _install_session,
        "sqlalchemy.engine.base": _install_connection,
        "sqlalchemy.pool.base": _install_pool,
    },
    libraries=("sqlalchemy", "<sqlalchemy generated"),
    # The pool returning a garbage-collected connection, on any thread the GC ran.
    finalizers=(GC_FINALIZER,),
)
