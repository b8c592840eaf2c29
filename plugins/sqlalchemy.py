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

from sanitizer.plugin import EXCLUSIVE, OWN, Context, Methods, OwnerRecord, Plugin

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


def _session_of(frame: FrameType | None, connect: CodeType | None) -> Any:
    """The Session opening a Connection, found a few frames up (once per Connection,
    which costs nothing per statement, unlike a wrapper around _connection_for_bind)."""
    for _ in range(12):
        if frame is None or connect is None:
            return None
        if frame.f_code is connect:
            return getattr(frame.f_locals.get("self"), "session", None)
        frame = frame.f_back
    return None


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
        record = context.record_of(_session_of(sys._getframe(1), connect[0]))
        return record if record is not None else context.record(conn, EXCLUSIVE)

    context.patch_class(module.Connection, EXCLUSIVE, CONNECTION_METHODS,
                        make_record=make_record)


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
