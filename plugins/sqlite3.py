"""Thread-affinity checks for the standard library's sqlite3 module.

``sqlite3.connect`` is patched to pass a generated subclass of the requested
``factory`` (sqlite3.Connection by default): ``isinstance`` holds, the object
goes back into C as itself (``backup``, ``sqlite3.Cursor(conn)``), and a call
costs one exact-signature Python frame. ``type(conn)`` is that subclass; it
keeps the factory's name, module and docstring. Cursors are a subclass of
sqlite3.Cursor likewise; only ``Blob``, which cannot be subclassed, is a proxy.

Policy: ``strict`` with ``check_same_thread=True`` (the default), written before
sqlite3 raises its own ProgrammingError; ``exclusive`` with
``check_same_thread=False``. Both report use in a child after ``fork()``. The
tables below say how each operation is checked under that policy, following
what CPython's sqlite3 itself allows from another thread.

``noblock`` (kind "local"): statements, fetches (they step the statement),
commits, rollbacks and ``backup()`` on a thread whose event loop is running are
reported only with ``asyncio.noblock=all``: an in-memory database in async code is
common and harmless, so the default leaves sqlite3 alone. With no loop running the
check costs one attribute read per call. Not checked for it: settings,
``cursor()``, ``close()`` and blobs.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from sanitizer.plugin import (
    EXCLUSIVE,
    INTERNAL_DIRS,
    NOBLOCK,
    STRICT,
    Check,
    Context,
    Methods,
    Plugin,
    Policy,
    new_record,
)

POLICY, CONCURRENT, RELEASE, NONE = Check.POLICY, Check.CONCURRENT, Check.RELEASE, Check.NONE

# How each operation is checked: as CPython's sqlite3 checks it itself, on every
# supported version (tests/test_sqlite3_plugin.py asks CPython). POLICY where
# sqlite3 refuses other threads (its check_thread), CONCURRENT where it lets any
# thread in but another thread's call may be using the same state, NONE where
# nothing is shared (interrupt() is documented as safe from any thread), and
# RELEASE for close(): in a forked child, closing is how libraries let go of an
# inherited connection, and dropping the reference closes it just the same.
CONNECTION_CHECKS: dict[str, Check] = {
    "close": RELEASE, "commit": POLICY, "rollback": POLICY, "cursor": POLICY,
    "execute": POLICY, "executemany": POLICY, "executescript": POLICY,
    "__enter__": NONE, "__exit__": POLICY, "__call__": POLICY,
    "create_function": POLICY, "create_aggregate": POLICY, "create_collation": POLICY,
    "create_window_function": POLICY, "set_authorizer": POLICY,
    "set_progress_handler": POLICY, "set_trace_callback": POLICY,
    "enable_load_extension": POLICY, "load_extension": POLICY, "getlimit": POLICY,
    "setlimit": POLICY, "getconfig": POLICY, "setconfig": POLICY, "serialize": POLICY,
    "deserialize": POLICY, "iterdump": POLICY, "blobopen": POLICY, "backup": POLICY,
    "interrupt": NONE,
}
# Attributes: (read, set); None for read-only ones. Reads of plain settings and
# counters touch nothing a call in progress is using. A call in progress reads
# text_factory for every row it fetches, and isolation_level for the transaction
# it opens; row_factory is copied into each new cursor, so a query under way
# keeps its own.
CONNECTION_ATTRIBUTES: dict[str, tuple[Check, Check | None]] = {
    "row_factory": (NONE, NONE), "text_factory": (NONE, CONCURRENT),
    "isolation_level": (NONE, CONCURRENT), "in_transaction": (NONE, None),
    "total_changes": (NONE, None), "autocommit": (POLICY, POLICY),
}
# ``isolation_level = None`` commits: Python 3.11 added the thread check to it.
ISOLATION_LEVEL_NONE = POLICY if sys.version_info >= (3, 11) else CONCURRENT
# The target of ``source.backup(target)``: sqlite3 checks only the source's thread.
BACKUP_TARGET = CONCURRENT
CURSOR_CHECKS: dict[str, Check] = {
    "execute": POLICY, "executemany": POLICY, "executescript": POLICY, "fetchone": POLICY,
    "fetchmany": POLICY, "fetchall": POLICY, "__next__": POLICY, "close": RELEASE,
    "__iter__": NONE, "setinputsizes": NONE, "setoutputsize": NONE,
}
# Cursor attributes (arraysize, description, rowcount, lastrowid, row_factory,
# connection) are the cursor's own plain state: NONE, read or set.
CURSOR_ATTRIBUTES = ("arraysize", "connection", "description", "lastrowid", "row_factory",
                     "rowcount")
BLOB_CHECKS: dict[str, Check] = {
    "read": POLICY, "write": POLICY, "seek": POLICY, "tell": POLICY, "close": RELEASE,
    "__enter__": POLICY, "__exit__": POLICY, "__getitem__": POLICY, "__setitem__": POLICY,
    "__len__": POLICY,
}

# What runs the database (noblock, "local": reported only with asyncio.noblock=all, since
# an in-memory database in async code is common and harmless): statements, fetches (they
# step the statement), transactions, backup. Not settings, cursor(), close(), or blobs.
CONNECTION_BLOCKING = frozenset({"execute", "executemany", "executescript", "commit",
                                 "rollback", "__exit__", "backup"})
CURSOR_BLOCKING = frozenset({"execute", "executemany", "executescript", "fetchone",
                             "fetchmany", "fetchall", "__next__"})


def blocking(policy: Policy, name: str, names: frozenset[str]) -> Policy:
    """The policy of ``name``'s guard: ``policy``, and NOBLOCK's check if it runs the database."""
    return NOBLOCK.over(policy, "local") if name in names else policy


# Exact parameter lists where a call is hot (else the method's own, or *args, **kwargs).
SIGNATURES: dict[str, str] = {
    "close": "", "commit": "", "rollback": "", "__exit__": "exc_type, exc_value, traceback, /",
    "execute": "sql, parameters=(), /", "executemany": "sql, seq_of_parameters, /",
    "executescript": "sql_script, /", "fetchone": "", "fetchall": "", "__next__": "",
    "tell": "", "__len__": "", "__enter__": "",
}


def methods(checks: dict[str, Check], names: Iterable[str] | None = None) -> Methods:
    """A table of checks as a method table (``names`` only, if given)."""
    return {name: (SIGNATURES.get(name), check) for name, check in checks.items()
            if names is None or name in names}


# A cursor reads its connection's record: derived objects share it, and no
# per-cursor Python __init__ is needed (that alone would cost ~225 ns a cursor).
@functools.cache
def cursor_class(sqlite3: ModuleType, base: Any, policy: Policy) -> type:
    """Tracked subclass of a cursor factory; instances share their connection's record."""
    # A factory's own overrides keep their defaults: Django's execute(query, params=None)
    # treats None and () differently ("SELECT '%s'" would otherwise become "SELECT '?'").
    stock = sqlite3.Cursor

    def params(name: str) -> str | None:
        return SIGNATURES.get(name) if getattr(base, name, None) is getattr(
            stock, name, None) else None

    table: Methods = {name: (params(name), check) for name, check in CURSOR_CHECKS.items()
                      if name not in CURSOR_BLOCKING}
    extra = {name: Context.guard(blocking(policy, name, CURSOR_BLOCKING), getattr(base, name),
                                 name, params(name), record_from="connection")
             for name in CURSOR_BLOCKING if hasattr(base, name)}
    return Context.subclass(base, policy, table, extra=extra, record_from="connection")


def _attribute(descriptor: Any, name: str, policy: Policy, read: Check, write: Check | None
               ) -> property | None:
    """A property checking reads and writes of a C attribute as the table says
    (None: nothing to check, the C descriptor stays as it is)."""
    get = read.under(policy)
    set_ = write.under(policy) if write is not None else None
    if get is None and set_ is None:
        return None
    getter = get.guard(descriptor.__get__, name, "", name=name) if get else descriptor.__get__
    setter = (set_.guard(descriptor.__set__, name, "value", name=name) if set_
              else descriptor.__set__)
    if name == "isolation_level" and ISOLATION_LEVEL_NONE is not write:
        commits = ISOLATION_LEVEL_NONE.under(policy)
        assert commits is not None
        setter = _by_value(commits.guard(descriptor.__set__, name, "value", name=name), setter)
    return property(getter, setter, doc=descriptor.__doc__)


def _by_value(to_none: Any, other: Any) -> Any:
    """``isolation_level = None`` commits: checked like commit(), other values as set."""
    def set_isolation_level(self: Any, value: Any) -> None:
        (to_none if value is None else other)(self, value)
    return set_isolation_level


@functools.cache
def connection_class(sqlite3: ModuleType, base: Any, policy: Policy) -> type:
    """Tracked subclass of a connection factory, for one policy."""
    stock = sqlite3.Connection
    base_init = base.__init__
    base_blobopen = getattr(base, "blobopen", None)
    base_backup = base.backup

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # Before any user __init__ code runs (UNTRACKED if the sanitizer is off).
        self._sanitizer_record = new_record(self, policy)
        base_init(self, *args, **kwargs)

    def tracked_cursor(factory: Any) -> Any:
        if Context.can_subclass(factory, sqlite3.Cursor):
            return cursor_class(sqlite3, factory, policy)
        return factory

    def blobopen(self: Any, *args: Any, **kwargs: Any) -> Any:
        assert base_blobopen is not None
        blob = base_blobopen(self, *args, **kwargs)
        return Context.proxy(blob, self._sanitizer_record, methods(BLOB_CHECKS))

    def backup(self: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        # The source is checked by this guard; sqlite3 lets any thread's connection
        # be the target, as long as no other thread is using it meanwhile.
        return Context.concurrent_call(target, "backup", "the target of backup()",
                                       base_backup, self, target, *args, **kwargs)

    # conn.execute() in C would call the guarded cursor() and cursor.execute()
    # again; one check is enough, so the guard builds the cursor and runs the
    # statement in C directly (Cursor.execute* return the cursor itself).
    scope = {"base_cursor": base.cursor,
             "cursor_cls": cursor_class(sqlite3, sqlite3.Cursor, policy),
             "default_cursor": sqlite3.Cursor, "tracked_cursor": tracked_cursor,
             "cursor_execute": sqlite3.Cursor.execute,
             "cursor_executemany": sqlite3.Cursor.executemany,
             "cursor_executescript": sqlite3.Cursor.executescript}
    expressions = {
        "cursor": ("factory=default_cursor", "base_cursor(self, cursor_cls if factory is "
                   "default_cursor else tracked_cursor(factory))"),
        "execute": ("sql, parameters=(), /",
                    "cursor_execute(base_cursor(self, cursor_cls), sql, parameters)"),
        "executemany": ("sql, seq_of_parameters, /", "cursor_executemany(base_cursor(self, "
                        "cursor_cls), sql, seq_of_parameters)"),
        "executescript": ("sql_script, /",
                          "cursor_executescript(base_cursor(self, cursor_cls), sql_script)"),
    }
    extra: dict[str, Any] = {"__init__": __init__}
    for name, (params, call) in expressions.items():
        guard = CONNECTION_CHECKS[name].under(policy)
        assert guard is not None
        guard = blocking(guard, name, CONNECTION_BLOCKING)
        if getattr(base, name) is stock.__dict__[name]:
            extra[name] = guard.guard_expression(call, name, params, scope,
                                                 wrapped=stock.__dict__[name])
        else:  # the user's factory overrides it: honour theirs
            extra[name] = guard.guard(getattr(base, name), name, name=name)
    for name, func in (("blobopen", blobopen), ("backup", backup)):
        guard = CONNECTION_CHECKS[name].under(policy)
        if hasattr(base, name) and guard is not None:
            extra[name] = blocking(guard, name, CONNECTION_BLOCKING).guard(func, name, name=name)
    for name, (read, write) in CONNECTION_ATTRIBUTES.items():
        descriptor = inspect.getattr_static(base, name, None)
        attribute = (_attribute(descriptor, name, policy, read, write)
                     if descriptor is not None else None)
        if attribute is not None:
            extra[name] = attribute
    waits = [name for name in CONNECTION_BLOCKING if name not in extra]
    extra.update(Context.guards(base, NOBLOCK.over(policy, "local"),
                                methods(CONNECTION_CHECKS, waits)))
    plain = [name for name in CONNECTION_CHECKS if name not in extra]
    return Context.subclass(base, policy, methods(CONNECTION_CHECKS, plain), extra=extra)


# sqlite3.connect()'s parameters after the database, in order.
CONNECT_PARAMETERS = ("timeout", "detect_types", "isolation_level", "check_same_thread",
                      "factory", "cached_statements", "uri")
# Python 3.13 and 3.14 deprecate passing them by position (3.15 makes them
# keyword-only). sqlite3 warns about the innermost Python frame, which would be
# the connect wrapper: the warning would name the sanitizer's file, and Python's
# default filter, which shows DeprecationWarnings only for __main__, would hide it.
POSITIONAL_DEPRECATED = (3, 13) <= sys.version_info < (3, 15)
POSITIONAL_WARNING = ("Passing more than 1 positional argument to {}() is deprecated. Parameters "
                      + ", ".join(f"'{name}'" for name in CONNECT_PARAMETERS[:-1])
                      + f" and '{CONNECT_PARAMETERS[-1]}' will become keyword-only parameters "
                      "in Python 3.15.")


def _warn_positional(function: str) -> None:
    if sys.version_info >= (3, 12):  # always, where POSITIONAL_DEPRECATED holds
        warnings.warn(POSITIONAL_WARNING.format(function), DeprecationWarning,
                      skip_file_prefixes=INTERNAL_DIRS)


def _as_keywords(stock: type, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Warn at the caller's line as plain sqlite3 does; pass the arguments by keyword."""
    _warn_positional("sqlite3.connect")
    factory = args[5] if len(args) > 5 else kwargs.get("factory", stock)
    if getattr(factory, "__init__", None) is vars(stock)["__init__"]:
        # sqlite3 passes the same arguments on to the factory, whose C __init__ warns
        # again; a factory with its own __init__ now gets keywords and stays quiet.
        _warn_positional("_sqlite3.Connection")
    named = dict(zip(CONNECT_PARAMETERS, args[1:], strict=False))
    if named.keys() & kwargs.keys():
        return args, kwargs  # a duplicate: sqlite3's own TypeError says so
    return args[:1], {**named, **kwargs}


def _patch_connect(sqlite3: ModuleType, context: Context) -> Any:
    stock = sqlite3.Connection
    stock_classes: dict[bool, type] = {}  # the common case, by check_same_thread

    def tracked(factory: Any, same_thread: Any) -> Any:
        if factory is stock or Context.can_subclass(factory, stock):
            # A connection made as part of another tracked object (Django's wrapper)
            # is guarded by that object's policy, and will join its record.
            parent = context.parent_record()
            policy = (parent.policy if parent is not None and parent.policy is not None
                      else STRICT if same_thread else EXCLUSIVE)
            return connection_class(sqlite3, factory, policy)
        return factory

    def connect(wrapped: Any, _instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Any:
        if POSITIONAL_DEPRECATED and 1 < len(args) <= len(CONNECT_PARAMETERS) + 1:
            args, kwargs = _as_keywords(stock, args, kwargs)  # may raise under -W error
        try:
            # Positional layout of sqlite3.connect(): check_same_thread 5th, factory 6th.
            if len(args) > 4:
                same_thread = args[4]
                if len(args) > 5:
                    args = (*args[:5], tracked(args[5], same_thread), *args[6:])
                else:
                    kwargs = {**kwargs, "factory": tracked(kwargs.get("factory", stock),
                                                           same_thread)}
            elif "factory" in kwargs:
                kwargs = {**kwargs, "factory": tracked(kwargs["factory"],
                                                       kwargs.get("check_same_thread", True))}
            elif context.parent_record() is not None:
                kwargs = {**kwargs, "factory": tracked(stock, True)}
            else:
                same_thread = bool(kwargs.get("check_same_thread", True))
                cls = stock_classes.get(same_thread)
                if cls is None:
                    cls = stock_classes[same_thread] = tracked(stock, same_thread)
                kwargs = {**kwargs, "factory": cls}
        except Exception as exc:
            context.internal_error(exc, "sqlite3.connect")
        return wrapped(*args, **kwargs)

    return connect


def install(sqlite3: ModuleType, context: Context) -> None:
    connect = _patch_connect(sqlite3, context)
    context.wrap(sqlite3, "connect", connect)
    dbapi2 = getattr(sqlite3, "dbapi2", None)
    if dbapi2 is not None and "connect" in vars(dbapi2):
        context.wrap(dbapi2, "connect", connect)


plugin = Plugin(name="sqlite3", hooks={"sqlite3": install})
