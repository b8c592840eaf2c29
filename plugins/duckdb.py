"""Thread-affinity checks for DuckDB: a connection is used by one thread at a time.

A ``DuckDBPyConnection`` is not thread-safe; DuckDB's way to serve threads is
``con.cursor()``, a new connection to the same database for another thread. So
connections are ``exclusive`` (any thread, one at a time: a handoff is fine, two
threads inside one connection at once is not), and every cursor is a connection
of its own, with its own record, owned by the thread that called ``cursor()``.
What a connection returns and that runs on it underneath shares its record:
relations (they bind as they are built and run when read) and appenders.

The module-level functions (``duckdb.sql``, ``duckdb.execute`` ...) run on the
default connection, which is one connection like any other: from two threads at
once they race (duckdb/duckdb#13498). It is tracked from its first use through
the module (or ``default_connection()``, ``connect(":default:")``), and each
module-level function is checked as that connection's method of the same name.

Mechanism: ``duckdb.connect`` and ``cursor()`` return objects made in C++ (a
nanobind class: no ``__dict__``, no room for a slot), so each tracked one gets a
one-off subclass of a guarded subclass, holding its record, by ``__class__``
assignment. The object stays itself: C++ accepts it wherever it type-checks
(``connection=con``, ``from_df``, relations of the same connection) and
``isinstance`` holds; a call costs one exact-signature guard frame. Relations
and grouped relations are Python classes, patched in place; their guards read
the record of their connection (``rel._con``). Reports name the database (its
path or ``:memory:``), never query text (unless ``include_args``) or config.

``noblock`` (kind "local", reported only with ``asyncio.noblock=all``): what runs
queries or reads files (statements, fetches, transactions, file readers, extensions,
a relation's fetches and writes) on a thread whose event loop is running.

Not tracked: connections made before ``enable()``, Arrow readers and streams
(``to_arrow_reader()``, ``__arrow_c_stream__``: pyarrow's objects, read later),
calls through the private ``_duckdb`` module, and DuckDB 1 (pybind11 refuses the
``__class__`` assignment; the plugin says so on stderr and tracks nothing).
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from sanitizer.plugin import (
    EXCLUSIVE,
    NOBLOCK,
    UNTRACKED,
    Check,
    Context,
    Methods,
    OwnerRecord,
    Plugin,
    Policy,
    fork_safe,
    internal_error,
    new_record,
)

POLICY, NONE = Check.POLICY, Check.NONE

# Each check below agrees with DuckDB itself (tests/test_duckdb.py asks it): a
# connection refuses a second thread's call while one is inside ("busy with
# another call") for exactly the operations checked here.
# Uses: everything that runs on the connection's one DuckDB context: statements,
# fetches of its pending result, transactions, building relations (they bind),
# registrations, UDFs, extensions, profiling, parsing, and type names (parsed
# against its catalog). close() too, also in a forked child: closing the last
# connection checkpoints into the database file the parent still writes.
USES = ("execute", "executemany", "fetchone", "fetchmany", "fetchall", "fetchnumpy", "fetchdf",
    "fetch_df", "df", "fetch_df_chunk", "tf", "torch", "complete", "abort", "begin", "commit",
    "rollback", "checkpoint", "close", "__exit__", "sql", "query", "from_query", "table", "view",
    "values", "table_function", "read_csv", "from_csv_auto", "read_json", "read_parquet",
    "from_parquet", "from_df", "from_arrow", "to_arrow_table", "to_arrow_reader", "register",
    "unregister", "append", "appender", "query_appender", "create_function", "remove_function",
    "install_extension", "load_extension", "enable_profiling", "disable_profiling",
    "get_profiling_information", "extract_statements", "get_table_names", "sqltype", "dtype",
    "type")
# Not uses: interrupt() and query_progress() are meant to be called from other
# threads; cursor() and duplicate() open a new connection (DuckDB's way to serve
# threads); type constructors build values; filesystems belong to the database,
# shared by all its connections; __enter__ returns the connection.
FREE = ("interrupt", "query_progress", "cursor", "duplicate", "__enter__", "array_type",
    "list_type", "map_type", "struct_type", "row_type", "union_type", "enum_type", "decimal_type",
    "string_type", "register_filesystem", "unregister_filesystem", "list_filesystems",
    "filesystem_is_registered")
CONNECTION_CHECKS: dict[str, Check] = {**dict.fromkeys(USES, POLICY), **dict.fromkeys(FREE, NONE)}
# Properties: both read the pending result.
CONNECTION_ATTRIBUTES: dict[str, Check] = {"description": POLICY, "rowcount": POLICY}
# Relations: every public method and property is a use, and these dunders
# (__str__ and __repr__ run the query), except the ones below, which read only
# the relation itself. Schema reads (columns, types ...) are uses: they answer
# from the schema bound when the relation was built, but bind it again on the
# connection once a statement has changed the catalog, which may be the very
# call another thread is inside. iter_rows() runs its query at the first batch.
RELATION_DUNDERS = ("__len__", "__contains__", "__getitem__", "__getattr__", "__str__",
                    "__repr__", "_repr_mimebundle_", "__arrow_c_stream__")
RELATION_CHECKS: dict[str, Check] = {"alias": NONE, "sql_query": NONE, "close": NONE,
                                     "group_by": NONE}
# GroupedRelation.agg() builds (binds) the aggregate relation.
GROUPED_CHECKS: dict[str, Check] = {"agg": POLICY}
# Appenders: buffering rows is the appender's own memory (DuckDB allows it while
# the connection is busy); a flush runs a statement on the connection.
APPENDER_CHECKS: dict[str, Check] = {"flush": POLICY, "__exit__": POLICY, "append_row": NONE,
                                     "append_rows": NONE, "clear": NONE, "__enter__": NONE}
# Module-level functions that exist only there: a relation over a DataFrame.
MODULE_ONLY = ("project", "distinct", "write_csv", "aggregate", "alias", "filter", "limit",
               "order", "query_df", "arrow")

# What runs queries or reads files (noblock, "local": reported only with asyncio.noblock=all,
# DuckDB works in-process): statements, fetches, transactions, file readers, extensions, and
# what a relation runs. Not building or binding relations, registrations or type names.
CONNECTION_BLOCKING = frozenset({
    "execute", "executemany", "fetchone", "fetchmany", "fetchall", "fetchnumpy", "fetchdf",
    "fetch_df", "df", "fetch_df_chunk", "tf", "torch", "to_arrow_table", "to_arrow_reader",
    "begin", "commit", "rollback", "checkpoint", "sql", "query", "read_csv", "from_csv_auto",
    "read_json", "read_parquet", "from_parquet", "install_extension", "load_extension",
    "append", "write_csv", "query_df", "arrow"})
RELATION_BLOCKING = frozenset({
    "fetchone", "fetchmany", "fetchall", "fetchdf", "fetchnumpy", "fetch_arrow_reader",
    "fetch_arrow_table", "fetch_record_batch", "df", "to_df", "to_dicts", "arrow", "pl", "tf",
    "torch", "to_arrow_table", "to_arrow_reader", "execute", "show", "write_csv", "to_csv",
    "write_parquet", "to_parquet", "create", "to_table", "insert", "insert_into", "update",
    "materialize", "iter_rows"})


def blocking(policy: Policy, name: str, names: frozenset[str]) -> Policy:
    """The policy of ``name``'s guard: ``policy``, and NOBLOCK's check if it runs queries."""
    return NOBLOCK.over(policy, "local") if name in names else policy


# Exact parameter lists where a call is hot (else the method's own, or *args, **kwargs).
SIGNATURES: dict[str, str] = {
    "execute": "query, parameters=None", "executemany": "query, parameters=None",
    "fetchone": "", "fetchall": "", "fetchmany": "size=1", "fetchnumpy": "", "close": "",
    "commit": "", "rollback": "", "begin": "", "df": "*, date_as_object=False",
    "fetchdf": "*, date_as_object=False", "fetch_df": "*, date_as_object=False",
    "__exit__": "exc_type, exc, traceback",
}
RELATION_SIGNATURES: dict[str, str] = {
    "fetchall": "", "fetchnumpy": "", "df": "*, date_as_object=False",
    "fetchdf": "*, date_as_object=False", "to_df": "*, date_as_object=False",
}

# What returns a new connection (tracked on its own), and what returns an appender.
NEW_CONNECTIONS = ("cursor", "duplicate")
APPENDERS = ("appender", "query_appender")
# Where a tracked object's guards find its record: on its one-off class.
OWN_CLASS = "__class__"
_DONE = object()
_adopting = fork_safe(threading.Lock())  # renewed in a forked child


def adopt(obj: Any, tracked: type, record: OwnerRecord) -> Any:
    """Make ``obj``, an instance of ``tracked``'s base, an instance of a one-off subclass
    of ``tracked`` that holds ``record`` (the one place such an object can keep one)."""
    if record.policy is None:  # the sanitizer is off
        return obj
    one_off = type(tracked.__name__, (tracked,), {
        "__slots__": (), "__module__": tracked.__module__, "__qualname__": tracked.__qualname__,
        "__doc__": tracked.__doc__, "_sanitizer_record": record})
    with _adopting:  # the default connection may be met by two threads at once
        if type(obj) is tracked.__base__:
            try:
                obj.__class__ = one_off
            except TypeError as exc:  # a build whose objects cannot change class: untracked
                internal_error(exc, f"duckdb: tracking a {tracked.__name__}")
    return obj


def _database(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """connect()'s database, as reports name it; never its config (it may hold tokens)."""
    value = args[0] if args else kwargs.get("database", ":memory:")
    text = os.fsdecode(value) if isinstance(value, bytes | os.PathLike) else str(value)
    # A URI's query string may carry credentials (md:db?motherduck_token=...).
    return text.partition("?")[0] or ":memory:"


def _guarded(check: Check, member: Any, name: str, params: str | None, record_from: str,
             waits: frozenset[str] = frozenset()) -> Any:
    """``member`` (a method, or a property's getter) guarded as ``check`` says (None: not
    checked), reading the record of ``self.<record_from>``; NOBLOCK too if in ``waits``."""
    policy = check.under(EXCLUSIVE)
    if policy is None:
        return None
    policy = blocking(policy, name, waits)
    is_property = isinstance(member, property)
    func = member.fget if is_property else member
    python = isinstance(func, types.FunctionType)
    # DuckDB's Python code warns at the first frame outside its module (_caller_level):
    # a guard of one of its functions stands in that module, so warnings name the user's
    # line, not <sanitizer-guard>.
    scope = {"__name__": func.__module__} if python else {}
    # A C property's getter has no __qualname__ to copy: call it through the property.
    guard = policy.guard(member.__get__ if is_property and not python else func, name,
                         "" if is_property else params, name=name, defaults=scope,
                         record=f"self.{record_from}._sanitizer_record")
    return property(guard, doc=member.__doc__) if is_property else guard


@functools.cache
def appender_class(stock: type) -> type:
    """Guarded subclass of duckdb.Appender (instances share their connection's record)."""
    table: Methods = {name: (None, check) for name, check in APPENDER_CHECKS.items()}
    return Context.subclass(stock, EXCLUSIVE, table, record_from=OWN_CLASS)


@functools.cache
def connection_class(stock: type, appender: type) -> type:
    """Guarded subclass of DuckDBPyConnection; each tracked connection gets a one-off
    subclass of it holding its record."""
    tracked_appender = appender_class(appender)
    cell: list[type] = []

    def new_connection(method: Any) -> Callable[..., Any]:
        @functools.wraps(method)
        def make(self: Any) -> Any:  # cursor(), duplicate(): a connection of its own
            con = method(self)
            return adopt(con, cell[0], new_record(con, EXCLUSIVE,
                                                  resource=self._sanitizer_record.resource))
        return make

    def new_appender(method: Any) -> Callable[..., Any]:
        @functools.wraps(method)
        def make(self: Any, *args: Any, **kwargs: Any) -> Any:
            return adopt(method(self, *args, **kwargs), tracked_appender,
                         self._sanitizer_record)
        return make

    extra: dict[str, Any] = {}
    for name, check in {**CONNECTION_CHECKS, **CONNECTION_ATTRIBUTES}.items():
        member = inspect.getattr_static(stock, name, None)
        if member is not None and name in NEW_CONNECTIONS:
            member = new_connection(member)
        elif member is not None and name in APPENDERS:
            member = new_appender(member)
        elif not isinstance(member, property | types.FunctionType):
            continue  # a C method: in the table below
        extra[name] = _guarded(check, member, name, None, OWN_CLASS,
                               CONNECTION_BLOCKING) or member
    # The C methods: exact parameter lists where a call is hot.
    for name in CONNECTION_BLOCKING - extra.keys():
        method = getattr(stock, name, None)
        if method is not None and CONNECTION_CHECKS.get(name) is POLICY:
            extra[name] = Context.guard(NOBLOCK.over(EXCLUSIVE, "local"), method, name,
                                        SIGNATURES.get(name), record_from=OWN_CLASS)
    table: Methods = {name: (SIGNATURES.get(name), check)
                      for name, check in CONNECTION_CHECKS.items() if name not in extra}
    cell.append(Context.subclass(stock, EXCLUSIVE, table, extra=extra, record_from=OWN_CLASS))
    return cell[0]


def _iter_rows(method: Any) -> Callable[..., Iterator[Any]]:
    """iter_rows() is a generator: its query runs at the first batch, checked then."""
    first = Context.guard(blocking(EXCLUSIVE, "iter_rows", RELATION_BLOCKING),
                          lambda _self, rows: next(rows, _DONE), "iter_rows", "rows",
                          record_from="_con")

    @functools.wraps(method)
    def iter_rows(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        rows = method(self, *args, **kwargs)
        row = first(self, rows)
        if row is not _DONE:
            yield row
            yield from rows
    return iter_rows


def _install_relations(relation: type, grouped: type | None, context: Context) -> None:
    # A relation's record is its connection's (what record_of() answers; guards read it).
    context.replace(relation, "_sanitizer_record",
                    property(operator.attrgetter("_con._sanitizer_record")))
    for name, member in list(vars(relation).items()):
        if name.startswith("_") and name not in RELATION_DUNDERS:
            continue
        if not callable(member) and not isinstance(member, property):
            continue
        guard = (_iter_rows(member) if name == "iter_rows" else
                 _guarded(RELATION_CHECKS.get(name, POLICY), member, name,
                          RELATION_SIGNATURES.get(name), "_con", RELATION_BLOCKING))
        if guard is not None:
            context.replace(relation, name, guard)
    for name, check in GROUPED_CHECKS.items() if grouped is not None else ():
        guard = _guarded(check, vars(grouped)[name], name, None, "_relation._con")
        context.replace(grouped, name, guard)


def install(duckdb: ModuleType, context: Context) -> None:
    relation = duckdb.DuckDBPyRelation
    if "_con" not in getattr(relation, "__slots__", ()):
        # DuckDB 1 (pybind11): __class__ assignment is refused, connect() cannot make a
        # subclass, and proxies would fail its C++ type checks (connection=con).
        print(f"sanitizer: duckdb {getattr(duckdb, '__version__', '?')} is not tracked: its "
              "objects cannot hold a record (the duckdb plugin needs DuckDB 2)", file=sys.stderr)
        return
    stock: type = duckdb.DuckDBPyConnection
    tracked = connection_class(stock, duckdb.Appender)
    # Relations of untracked connections read this one (UNTRACKED: never checked).
    context.replace(stock, "_sanitizer_record", UNTRACKED)
    default_connection = duckdb.default_connection

    def default(connection: Any = None) -> Any:
        con = default_connection() if connection is None else connection
        if type(con) is stock and connection is None:  # met here first: in memory
            adopt(con, tracked, new_record(con, EXCLUSIVE, name="default_connection",
                                           resource={"database": ":memory:"}))
        return con

    def connect(wrapped: Any, _instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Any:
        con = wrapped(*args, **kwargs)
        try:
            if type(con) is stock:  # new, or the default connection not met yet
                adopt(con, tracked, context.record(con, EXCLUSIVE, resource={
                    "database": _database(args, kwargs)}))
        except Exception as exc:
            context.internal_error(exc, "duckdb.connect")
        return con

    def module_function(name: str, function: Any) -> Callable[..., Any]:
        # (connection, function, *args, **kwargs)
        guard = blocking(EXCLUSIVE, name, CONNECTION_BLOCKING).call_guard(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return guard(default(kwargs.get("connection", kwargs.get("conn"))), function,
                         *args, **kwargs)

        def call_adopting(*args: Any, **kwargs: Any) -> Any:  # appender(): shares it
            con = default(kwargs.get("connection"))
            made = guard(con, function, *args, **kwargs)
            return adopt(made, appender_class(duckdb.Appender), con._sanitizer_record)

        return functools.wraps(function)(call_adopting if name in APPENDERS else call)

    def new_connection(name: str, function: Any) -> Callable[..., Any]:
        method = getattr(tracked, name)  # cursor(), duplicate(): adopts the new one

        def call(*, connection: Any = None) -> Any:
            return method(default(connection))
        return functools.wraps(function)(call)

    context.wrap(duckdb, "connect", connect)
    context.replace(duckdb, "default_connection",
                    functools.wraps(default_connection)(lambda: default()))
    checked = [name for name, check in {**CONNECTION_CHECKS, **CONNECTION_ATTRIBUTES}.items()
               if check is POLICY and not name.startswith("_")]
    for name in (*checked, *MODULE_ONLY, *NEW_CONNECTIONS):
        function = getattr(duckdb, name, None)
        if callable(function):
            context.replace(duckdb, name, new_connection(name, function)
                            if name in NEW_CONNECTIONS else module_function(name, function))
    grouped = getattr(getattr(duckdb, "_relation", None), "GroupedRelation", None)
    _install_relations(relation, grouped, context)


plugin = Plugin(name="duckdb", hooks={"duckdb": install}, libraries=("duckdb",))
