"""Thread-affinity checks for the standard library's sqlite3 module.

``sqlite3.connect`` is patched to pass a generated subclass of the requested
``factory`` (sqlite3.Connection by default): ``isinstance`` holds, the object
goes back into C as itself (``backup``, ``sqlite3.Cursor(conn)``), and a call
costs one exact-signature Python frame. ``type(conn)`` is that subclass; it
keeps the factory's name, module and docstring. Cursors are a subclass of
sqlite3.Cursor likewise; only ``Blob``, which cannot be subclassed, is a proxy.

Policy: ``strict`` with ``check_same_thread=True`` (the default), written before
sqlite3 raises its own ProgrammingError; ``exclusive`` with
``check_same_thread=False``. Both report use in a child after ``fork()``.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from types import ModuleType
from typing import Any

from sanitizer import stacks
from sanitizer.instrument import trackable_factory, tracked_subclass
from sanitizer.ownership import UNTRACKED
from sanitizer.plugin import Context, Plugin
from sanitizer.policies import EXCLUSIVE_POLICY, STRICT_POLICY, Policy, guarded_call
from sanitizer.proxy import make_proxy

# Guarded as they are. Parameter lists are exact where the call is hot.
CONNECTION_METHODS: dict[str, str | None] = {
    "close": "", "commit": "", "rollback": "",
    "__enter__": "", "__exit__": "exc_type, exc_value, traceback, /",
    "create_function": None, "create_aggregate": None, "create_collation": None,
    "create_window_function": None, "set_authorizer": None, "set_progress_handler": None,
    "set_trace_callback": None, "enable_load_extension": None, "load_extension": None,
    "getlimit": None, "setlimit": None, "getconfig": None, "setconfig": None,
    "serialize": None, "deserialize": None, "iterdump": None,
}
# Not guarded: interrupt(), which SQLite documents as safe from any thread.
CONNECTION_ATTRIBUTES = ("row_factory", "text_factory", "isolation_level", "in_transaction",
                         "total_changes", "autocommit")
CURSOR_METHODS: dict[str, str | None] = {
    "execute": "sql, parameters=(), /", "executemany": "sql, seq_of_parameters, /",
    "executescript": "sql_script, /", "fetchone": "", "fetchall": "", "fetchmany": None,
    "close": "", "setinputsizes": None, "setoutputsize": None, "__next__": "",
}
BLOB_METHODS: dict[str, str | None] = {
    "read": None, "write": None, "seek": None, "tell": "", "close": "",
    "__enter__": "", "__exit__": None, "__getitem__": None, "__setitem__": None, "__len__": "",
}

_context: Context | None = None


# A cursor reads its connection's record: derived objects share it, and no
# per-cursor Python __init__ is needed (that alone would cost ~225 ns a cursor).
CURSOR_RECORD = "self.connection._sanitizer_record"


@functools.cache
def cursor_class(sqlite3: ModuleType, base: Any, policy: Policy) -> type:
    """Tracked subclass of a cursor factory; instances share their connection's record."""
    # A factory's own overrides keep their defaults: Django's execute(query, params=None)
    # treats None and () differently ("SELECT '%s'" would otherwise become "SELECT '?'").
    stock = sqlite3.Cursor
    methods = tuple((name, params if getattr(base, name, None) is getattr(stock, name, None)
                     else None) for name, params in CURSOR_METHODS.items())
    return tracked_subclass(base, policy, methods, record=CURSOR_RECORD)


@functools.cache
def connection_class(sqlite3: ModuleType, base: Any, policy: Policy) -> type:
    """Tracked subclass of a connection factory, for one policy."""
    stock = sqlite3.Connection
    base_init = base.__init__
    base_blobopen = getattr(base, "blobopen", None)
    base_backup = base.backup

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        context = _context  # None: made by type(conn)(...) after the plugin was unloaded
        # Before any user __init__ code runs.
        self._sanitizer_record = (UNTRACKED if context is None
                                  else context.new_record(self, policy))
        base_init(self, *args, **kwargs)

    def tracked_cursor(factory: Any) -> Any:
        if trackable_factory(factory, sqlite3.Cursor):
            return cursor_class(sqlite3, factory, policy)
        return factory

    def blobopen(self: Any, *args: Any, **kwargs: Any) -> Any:
        assert base_blobopen is not None
        return make_proxy(base_blobopen(self, *args, **kwargs), self._sanitizer_record,
                          BLOB_METHODS)

    def backup(self: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        # Either side may be tracked; the target is checked under its own policy.
        return guarded_call(target, "backup", base_backup, self, target, *args, **kwargs)

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
        if getattr(base, name) is stock.__dict__[name]:
            extra[name] = policy.guard_expression(call, name, params, scope,
                                                  wrapped=stock.__dict__[name])
        else:  # the user's factory overrides it: honour theirs
            extra[name] = policy.guard(getattr(base, name), name, name=name)
    for name, func in (("blobopen", blobopen), ("backup", backup)):
        if hasattr(base, name):
            extra[name] = policy.guard(func, name, name=name)
    for name in CONNECTION_ATTRIBUTES:
        descriptor = inspect.getattr_static(base, name, None)
        if descriptor is not None:
            extra[name] = property(policy.guard(descriptor.__get__, name, "", name=name),
                                   policy.guard(descriptor.__set__, name, "value", name=name))
    return tracked_subclass(base, policy, tuple(CONNECTION_METHODS.items()),
                            tuple(extra.items()))


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
                      skip_file_prefixes=stacks.INTERNAL_DIRS)


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
        if factory is stock or trackable_factory(factory, stock):
            policy = STRICT_POLICY if same_thread else EXCLUSIVE_POLICY
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
    global _context
    _context = context
    connect = _patch_connect(sqlite3, context)
    context.wrap(sqlite3, "connect", connect)
    dbapi2 = getattr(sqlite3, "dbapi2", None)
    if dbapi2 is not None and "connect" in vars(dbapi2):
        context.wrap(dbapi2, "connect", connect)


plugin = Plugin(name="sqlite3", hooks={"sqlite3": install})
