"""Thread-affinity checks for DB-API 2.0 drivers: psycopg2, psycopg, PyMySQL, mysqlclient and more.

Policies follow each driver's PEP 249 ``threadsafety``:

* level < 2 (PyMySQL, mysqlclient, most pure-Python drivers): connections may
  not be shared between threads, so a connection and its cursors share one
  ``exclusive`` record: any thread may use them, one at a time (handing a
  connection through a pool is fine, two threads inside it at once is not).
* level >= 2 (psycopg2, psycopg 3): threads may share a connection, so its
  record gets the ``transaction`` policy: a statement, commit or rollback from
  thread B while thread A has an open transaction on the connection is a
  violation (B's work joins A's transaction, or B commits A's half-done work).
  The holder is the thread whose statement opened the transaction (claimed
  when a statement starts outside autocommit, so a commit racing with the first
  INSERT is seen too); commit, rollback and close clear it. Cursors get their
  own ``exclusive`` record, which reports their connection's creation site.

Calls that wait on the server are also ``noblock``: made on a thread whose
event loop is running (inside ``async def``), they stop every task on the loop
until they return. Reported (unless ``asyncio.noblock=off``): ``connect()``
itself, before it blocks (the commonest case), statements, commits and
rollbacks, the other calls that send a command, and fetches from server-side
cursors (psycopg2's named cursors, psycopg's ServerCursor, the MySQL drivers'
SSCursor); not attribute reads, closing, or fetches from client-side cursors,
whose rows came with ``execute()``. Each is reported once, at the user's line;
what the call runs beneath it stays quiet, but its bookkeeping (the transaction
holder) goes on. Calls from ``asyncio.to_thread``, executors and asgiref's
``sync_to_async`` run on worker threads, and are not reported; neither is Django's
own database work, which its ``async_unsafe`` check covers (plugins/django.py).

psycopg 3's ``AsyncConnection`` is bound to the loop it was opened in (the
``loop`` policy: used under another loop, or from another thread, is reported)
and gets the transaction rule at task level (``AsyncTransactionPolicy``):
psycopg's own lock serializes statements, so tasks taking turns on one
connection are fine, but a statement, commit or rollback from task B while task
A has an open transaction is reported, naming A (``holder_task``, and where it
waits). Tasks that A starts inside its transaction (``gather``, ``wait_for``)
are its helpers. Its cursors and transaction blocks are checked against the
connection's record.

Every connection also reports use in a child after ``fork()``, closing
included: unlike an inherited sqlite3 connection, closing a connection to a
server in the child sends the protocol's terminate message over the socket the
parent still uses, and the report says so. Records carry ``resource`` =
driver, host, port and database, never the password.

Mechanisms, cheapest first: psycopg2 and psycopg 3 get generated subclasses of
the requested connection and cursor factories (``isinstance`` holds and the
objects go back into the C code as themselves); PyMySQL and mysqlclient are
Python classes, patched in place. Drivers named in ``dbapi.drivers=a+b`` are
wrapped at ``module.connect`` in transparent proxies (wrapt); at level >= 2
their transactions are inferred (a statement outside ``autocommit`` opens one).

Not tracked: connections from factories that are not classes (a function
passed as psycopg2's ``connection_factory``), and connections made before
``enable()``. Drivers named in ``dbapi.drivers`` are not checked for ``noblock``
(whether they wait on a server is not known); neither are psycopg's generator
methods (``stream()``, ``notifies()``, ``copy()``: calling one does not block;
iterating it does, unseen).
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import Any, cast

from sanitizer.plugin import (
    EXCLUSIVE,
    FORKED,
    LOOP,
    NOBLOCK,
    OWN,
    PROCESS,
    UNTRACKED,
    ConfigError,
    Context,
    Exclusive,
    LoopBound,
    Methods,
    OwnerRecord,
    Plugin,
    Policy,
    ThreadToken,
    TrackedProxy,
    Violation,
    internal_error,
    mask_resource,
    new_record,
    record_of,
)

# connection -> its libpq-style transaction status (PG_OPEN says which ones are open).
Status = Callable[[Any], int]
ConnectionOf = Callable[[Any], Any]

# Operations that end the connection's transaction (when they succeed).
ENDS_TRANSACTION = frozenset({
    "commit", "rollback", "close", "__exit__", "reset", "tpc_commit", "tpc_rollback",
})
# libpq PGTransactionStatusType: ACTIVE, INTRANS, INERROR (IDLE=0 and UNKNOWN=4 are not open).
PG_OPEN = frozenset({1, 2, 3})

# -- the transaction-aware policies (threadsafety >= 2) ---------------------------------


def check_transaction(obj: object, record: OwnerRecord, operation: str,
                      me: ThreadToken) -> bool:
    """Report ``operation`` if another thread holds an open transaction on the connection."""
    holder = record.busy
    if (holder is None or holder is me or holder is FORKED or record.sharing
            or record.policy is None or me.pid != record.pid):
        return False  # a forked child is reported by the process checks, once
    assert record.policy is not None
    # Not beneath a call (a Session's, say) already reported.
    return Context.report(obj, record, operation, "transaction", record.policy, holder=holder)


def _hush(me: ThreadToken) -> bool:
    """Run a reported call quietly, so that layers beneath it do not report it again."""
    me.quiet += 1
    return True


def is_open(status: Status | None, conn: Any, operation: str) -> bool:
    """Whether a transaction is open on ``conn`` after ``operation``."""
    try:
        if status is not None:
            return status(conn) in PG_OPEN
        # A driver we cannot ask: PEP 249 opens a transaction with the first statement.
        if operation in ENDS_TRANSACTION:
            return False
        autocommit = getattr(conn, "autocommit", False)
        return not (isinstance(autocommit, bool) and autocommit)
    except Exception:  # a broken or closed connection has no transaction to hold
        return False


def _transaction_message(violation: Violation, me: ThreadToken,
                         holder: object) -> str:
    them = "another thread"
    if isinstance(holder, ThreadToken):
        them = f"thread {holder.label} '{holder.current_name()}'"
        if not holder.alive:
            them += " (which exited without ending it)"
    operation = violation.operation
    effect = ("ends that thread's transaction" if operation in ENDS_TRANSACTION
              else "runs inside that thread's transaction")
    return (f"{violation.object_type}.{operation} called by thread {me.label} "
            f"'{me.current_name()}' while {them} has an open transaction on the same "
            f"connection: it {effect} (transaction policy)")


# Closing in a forked child is not letting go (as for sqlite3): it speaks the protocol.
CLOSES = frozenset({"close"})
CLOSE_IN_CHILD = ("closing it there sends the server the protocol's terminate message over "
                  "the socket the parent still uses, which ends the parent's session; in the "
                  "child, open new connections and leave inherited ones alone")


def with_fork_note(message: str, violation: Violation) -> str:
    """Why closing an inherited connection in a child is reported at all."""
    if violation.policy == "process" and violation.operation in CLOSES:
        return f"{message}: {CLOSE_IN_CHILD}"
    return message


class DriverExclusive(Exclusive):
    """Exclusive, for connections to a server: says why closing in a forked child harms."""

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: ThreadToken) -> str:
        return with_fork_note(super().describe(violation, record, token), violation)


# Connections of drivers at threadsafety < 2 (their cursors share the record).
DRIVER_EXCLUSIVE = DriverExclusive()


TRANSACTION_ADVICE = ("give each thread its own connection (a pool), or commit or roll back "
                      "before another thread uses it")
ASYNC_TRANSACTION_ADVICE = ("give each task its own connection (a pool), or end the "
                            "transaction before handing the connection over")


class TransactionPolicy(Policy):
    """Connections of drivers at threadsafety >= 2: shared, but not inside another's transaction.

    ``record.busy`` holds the token of the thread whose statement opened the
    transaction (None when there is none, FORKED in a forked child). ``status``
    reads the driver's libpq-style transaction status; None infers it.
    """

    name = "transaction"
    advice = TRANSACTION_ADVICE

    def __init__(self, status: Status | None = None) -> None:
        self.status = status

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: ThreadToken) -> str:
        if violation.policy == self.name:
            return _transaction_message(violation, token, record.busy)
        return with_fork_note(super().describe(violation, record, token), violation)

    def enter(self, obj: object, record: OwnerRecord, operation: str) -> Any:
        me = Context.local.token
        if me.pid != record.pid:
            reported = Context.check(obj, record, operation, FORKED)  # "process"
        else:
            reported = check_transaction(obj, record, operation, me)
        return me, operation, reported and _hush(me)

    def exit(self, obj: object, record: OwnerRecord, state: Any) -> None:
        me, operation, hushed = state
        if hushed:
            me.quiet -= 1
        if record.policy is None or me.pid != record.pid:
            return
        if not is_open(self.status, obj, operation):
            record.busy = None
        elif record.busy is None and operation not in ENDS_TRANSACTION:
            record.busy = me  # e.g. tpc_begin; a transaction open after commit is not ours


class StatementPolicy(Policy):
    """Statements on cursors of threadsafety >= 2 drivers (the hot path: kept flat).

    The cursor itself is exclusive (its own record, whose policy is
    EXCLUSIVE); its connection is checked as by TransactionPolicy.
    """

    name = "statement"
    advice = TRANSACTION_ADVICE

    def __init__(self, status: Status | None, connection_of: ConnectionOf,
                 autocommit: Callable[[Any], Any]) -> None:
        self.status = status
        self.connection_of = connection_of
        self.autocommit = autocommit

    def enter(self, obj: object, record: OwnerRecord, operation: str) -> Any:
        me = Context.local.token
        holder = record.busy
        entered = holder is None
        reported = False
        if entered:
            record.busy = me
        elif holder is not me:
            reported = Context.check(obj, record, operation, holder)
        try:
            conn = self.connection_of(obj)
            # The hot path: the attribute itself, not record_of().
            conn_record = getattr(conn, "_sanitizer_record", UNTRACKED)
            held = conn_record.busy
            if held is None:
                # Outside autocommit every statement runs in a transaction: claim it
                # now, so that a commit racing with this first statement is seen.
                if conn_record.policy is not None and not self.autocommit(conn):
                    conn_record.busy = me
            elif held is not me:
                reported = check_transaction(obj, conn_record, operation, me) or reported
        except BaseException:  # action=raise: the guard's finally will not run
            if entered:
                record.busy = None
            raise
        return entered, me, conn, conn_record, operation, reported and _hush(me)

    def exit(self, obj: object, record: OwnerRecord, state: Any) -> None:
        entered, me, conn, conn_record, operation, hushed = state
        if entered:
            record.busy = None
        if hushed:
            me.quiet -= 1
        if conn_record.policy is None or me.pid != conn_record.pid:
            return
        status = self.status
        if status is None:
            opened = is_open(None, conn, operation)
        else:
            try:
                opened = status(conn) in PG_OPEN
            except Exception:
                opened = False
        if not opened:
            conn_record.busy = None
        elif conn_record.busy is None:
            conn_record.busy = me  # this thread's statement opened it


# For track=module:factory@transaction: transactions inferred from PEP 249 semantics.
TRANSACTION_POLICY = TransactionPolicy()


# -- blocking calls on a loop's thread (noblock) -----------------------------------------

# Operations that wait on the server are checked by NOBLOCK too: a call on a thread whose
# event loop is running stops every task on it. Not what answers from the client's own
# memory: attribute reads, fetches from client-side cursors (their rows came with
# execute()), closing.


def blocking(policy: Policy) -> Policy:
    """``policy``'s guards, also reporting a call made while an event loop runs here."""
    return NOBLOCK.over(policy, "network")


def split_blocking(methods: Methods, names: frozenset[str]) -> tuple[Methods, Methods]:
    """A method table as (the ones that wait on the server, the others)."""
    return ({k: v for k, v in methods.items() if k in names},
            {k: v for k, v in methods.items() if k not in names})


def connect_reported(obj: object, record: OwnerRecord) -> bool:
    """Report connecting, the commonest blocking call, before it blocks (a loop runs in this
    thread); True: reported (connect quietly, so that what it runs is not reported again)."""
    if Context.local.token.loop is None or record.policy is None:
        return False
    return Context.check(obj, record, "connect", policy=NOBLOCK)


class Opening:
    """Stands for the connection that a classmethod connect() is about to make, in the
    report of that connect (the object itself is made only once connected)."""

    __slots__ = ("__weakref__",)


@functools.cache
def _opening(cls: type) -> type:
    return type(cls.__name__, (Opening,), {"__slots__": (), "__sanitizer_public_type__":
                                           getattr(cls, "__sanitizer_public_type__", cls)})


def class_connect_reported(cls: type, policy: Policy) -> bool:
    """``connect_reported`` for a classmethod connect(), before the connection exists."""
    if Context.local.token.loop is None:
        return False
    opening = _opening(cls)()
    return connect_reported(opening, new_record(opening, policy))


# -- records ----------------------------------------------------------------------------


def _resource(driver: str, host: Any, port: Any, database: Any) -> dict[str, Any]:
    """What the connection is to; never credentials (a host or database taken from
    connect()'s arguments may be a DSN or URL with a password: masked)."""
    if isinstance(database, bytes):
        database = database.decode("utf-8", "replace")
    return mask_resource({"driver": driver, "host": host, "port": port, "database": database})


def _cursor_record(cursor: object, connection: Any) -> OwnerRecord:
    """A cursor of a threadsafety >= 2 connection: its own exclusive record."""
    parent = record_of(connection)
    # Cursors are made per query: capturing a stack for each would make
    # conn.cursor() cost ~15 us, so a cursor reports its connection's creation stack,
    # and its own site (one frame, derived_site) beside it.
    found = Context.derived_record(cursor, parent, EXCLUSIVE) if parent is not None else None
    return found or UNTRACKED


def _fill_resource(record: OwnerRecord, make: Callable[[], dict[str, Any]]) -> None:
    if record.policy is None:
        return
    try:
        record.resource = make()
    except Exception as exc:
        internal_error(exc, "dbapi: reading the connection's host/port/database")


def _libpq_init(base: type, policy: Policy, driver: str, *, connects: bool = False,
                after: Callable[[OwnerRecord], None] | None = None) -> Any:
    """``__init__`` of a tracked psycopg2/psycopg connection: record first, then the
    resource from libpq's ``conn.info`` once connected. ``connects``: this ``__init__``
    opens the connection (psycopg2's; psycopg's classmethod connect() has already)."""
    base_init = base.__init__  # type: ignore[misc]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        record = self._sanitizer_record = new_record(self, policy)
        if connects and connect_reported(self, record):
            with Context.quiet():
                base_init(self, *args, **kwargs)
        else:
            base_init(self, *args, **kwargs)
        _fill_resource(record, lambda: _resource(
            driver, self.info.host, self.info.port, self.info.dbname))
        if after is not None:
            after(record)

    return __init__


# -- psycopg2 ---------------------------------------------------------------------------

PSYCOPG2_TRANSACTION_METHODS: Methods = {
    "commit": "", "rollback": "", "close": "", "reset": "",
    "__exit__": "exc_type, exc_value, traceback, /",
    "tpc_begin": OWN, "tpc_prepare": "", "tpc_commit": OWN, "tpc_rollback": OWN,
}
# Only fork detection. Not guarded: cancel() (meant for other threads), fileno(), poll().
PSYCOPG2_OTHER_METHODS: Methods = {
    "cursor": OWN, "__enter__": "", "set_session": OWN, "set_isolation_level": OWN,
    "set_client_encoding": OWN, "lobject": OWN, "get_parameter_status": OWN,
    "get_backend_pid": "", "get_dsn_parameters": "", "xid": OWN, "tpc_recover": "",
}
PSYCOPG2_STATEMENTS: Methods = {
    "execute": "query, vars=None", "executemany": "query, vars_list", "callproc": OWN,
    "copy_from": OWN, "copy_to": OWN, "copy_expert": OWN,
}
PSYCOPG2_CURSOR_METHODS: Methods = {
    "fetchone": "", "fetchmany": OWN, "fetchall": "", "scroll": OWN, "close": "",
    "nextset": "", "__enter__": "", "__exit__": "exc_type, exc_value, traceback, /",
    "__iter__": "", "__next__": "",
}
# What waits on the server (noblock): statements, transaction ends, and these; fetches
# only from named (server-side) cursors.
PSYCOPG2_BLOCKING = frozenset({
    "commit", "rollback", "reset", "__exit__", "tpc_begin", "tpc_prepare", "tpc_commit",
    "tpc_rollback", "tpc_recover", "set_client_encoding", "lobject",
})
SERVER_SIDE_FETCHES = frozenset({"fetchone", "fetchmany", "fetchall", "scroll", "__next__"})


@functools.cache
def _psycopg2_cursor_class(psycopg2: ModuleType, base: type, named: bool = False) -> type:
    """Tracked subclass of a cursor factory; ``named``: for server-side cursors, whose
    fetches wait on the server."""
    policy = _psycopg2_policies(psycopg2)[1]
    base_init = base.__init__  # type: ignore[misc]

    def __init__(self: Any, connection: Any, /, *args: Any, **kwargs: Any) -> None:
        self._sanitizer_record = _cursor_record(self, connection)
        base_init(self, connection, *args, **kwargs)

    fetches, others = split_blocking(PSYCOPG2_CURSOR_METHODS,
                                     SERVER_SIDE_FETCHES if named else frozenset())
    extra = {"__init__": __init__, **Context.guards(base, blocking(policy), PSYCOPG2_STATEMENTS),
             **Context.guards(base, blocking(EXCLUSIVE), fetches)}
    return Context.subclass(base, EXCLUSIVE, others, extra=extra)


@functools.cache
def _psycopg2_policies(psycopg2: ModuleType) -> tuple[TransactionPolicy, StatementPolicy]:
    # The unguarded C method (and C attrgetters): no Python frame on the hot path.
    status = psycopg2.extensions.connection.get_transaction_status
    return TransactionPolicy(status), StatementPolicy(
        status, operator.attrgetter("connection"), operator.attrgetter("autocommit"))


@functools.cache
def _psycopg2_hook(psycopg2: ModuleType) -> type:
    """Sits just above the C connection in the MRO: every cursor() ends here, with a factory."""
    stock = psycopg2.extensions.connection
    stock_cursor_type = psycopg2.extensions.cursor
    stock_cursor = stock.cursor

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        # C signature: cursor(name=None, cursor_factory=None, withhold=False, scrollable=None)
        positional = len(args) > 1
        factory = args[1] if positional else kwargs.get("cursor_factory")
        factory = factory or self.cursor_factory or stock_cursor_type
        if Context.can_subclass(factory, stock_cursor_type):
            named = (args[0] if args else kwargs.get("name")) is not None
            factory = _psycopg2_cursor_class(psycopg2, factory, named)
        if positional:
            args = (args[0], factory, *args[2:])
        else:
            kwargs["cursor_factory"] = factory
        return stock_cursor(self, *args, **kwargs)

    return type("connection", (stock,), {
        "__slots__": (), "cursor": cursor, "__module__": stock.__module__,
        "__qualname__": stock.__qualname__, "__sanitizer_public_type__": stock,
    })


@functools.cache
def _psycopg2_connection_class(psycopg2: ModuleType, base: type) -> type:
    transaction, _statement = _psycopg2_policies(psycopg2)
    hook = _psycopg2_hook(psycopg2)
    # A factory that overrides cursor() (psycopg2.extras.DictConnection ...) calls
    # super().cursor(): putting the hook between it and the C type catches that too.
    hooked = hook if base is psycopg2.extensions.connection else type(
        base.__name__, (base, hook), {"__slots__": (), "__module__": base.__module__,
                                      "__qualname__": base.__qualname__,
                                      "__sanitizer_public_type__": base})
    waits, ends = split_blocking(PSYCOPG2_TRANSACTION_METHODS, PSYCOPG2_BLOCKING)
    other_waits, others = split_blocking(PSYCOPG2_OTHER_METHODS, PSYCOPG2_BLOCKING)
    extra = {"__init__": _libpq_init(base, transaction, "psycopg2", connects=True),
             **Context.guards(hooked, blocking(transaction), waits),
             **Context.guards(hooked, transaction, ends),
             **Context.guards(hooked, blocking(PROCESS), other_waits)}
    return Context.subclass(hooked, PROCESS, others, extra=extra)


def install_psycopg2(psycopg2: ModuleType, context: Context) -> None:
    stock = psycopg2.extensions.connection

    def connect(wrapped: Any, _instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Any:
        # psycopg2.connect(dsn=None, connection_factory=None, cursor_factory=None, **kwargs)
        try:
            positional = len(args) > 1
            factory = (args[1] if positional else kwargs.get("connection_factory")) or stock
            if Context.can_subclass(factory, stock):
                tracked = _psycopg2_connection_class(psycopg2, factory)
                if positional:
                    args = (args[0], tracked, *args[2:])
                else:
                    kwargs = {**kwargs, "connection_factory": tracked}
        except Exception as exc:
            context.internal_error(exc, "psycopg2.connect")
        return wrapped(*args, **kwargs)

    context.wrap(psycopg2, "connect", connect)


# -- psycopg 3 --------------------------------------------------------------------------

PSYCOPG_TRANSACTION_METHODS: Methods = {
    "commit": "", "rollback": "", "close": "", "transaction": OWN,
    "__exit__": "exc_type, exc_val, exc_tb",
    "tpc_begin": OWN, "tpc_prepare": "", "tpc_commit": OWN, "tpc_rollback": OWN,
}
# Only fork detection. Not guarded: cancel() and cancel_safe() (meant for other threads).
PSYCOPG_OTHER_METHODS: Methods = {
    "cursor": OWN, "execute": OWN, "pipeline": "", "__enter__": "", "notifies": OWN,
    "set_autocommit": "value", "set_isolation_level": "value", "set_read_only": "value",
    "set_deferrable": "value", "tpc_recover": "", "xid": OWN,
}
PSYCOPG_STATEMENTS: Methods = {
    "execute": OWN, "executemany": OWN, "copy": OWN,  # ServerCursor's differ from Cursor's
}
PSYCOPG_CURSOR_METHODS: Methods = {
    "fetchone": "", "fetchmany": OWN, "fetchall": "", "scroll": OWN, "close": "",
    "nextset": "", "results": "", "stream": OWN, "__enter__": "",
    "__exit__": "exc_type, exc_val, exc_tb", "__iter__": "",
}
# What waits on the server (noblock), besides statements; fetches only from ServerCursors.
# Not generator functions (stream, results, notifies, copy): calling one does not block.
PSYCOPG_BLOCKING = frozenset({
    "commit", "rollback", "__exit__", "execute", "tpc_begin", "tpc_prepare", "tpc_commit",
    "tpc_rollback", "tpc_recover",
})
PSYCOPG_STATEMENT_BLOCKING = frozenset({"execute", "executemany"})


_psycopg_status = operator.attrgetter("pgconn.transaction_status")
_PSYCOPG_TRANSACTION = TransactionPolicy(_psycopg_status)
_PSYCOPG_STATEMENT = StatementPolicy(_psycopg_status, operator.attrgetter("_conn"),
                                     operator.attrgetter("_autocommit"))


@functools.cache
def _psycopg_cursor_class(base: Any, server: bool = False) -> type:
    """Tracked subclass of a cursor factory; ``server``: a ServerCursor, whose fetches
    wait on the server."""
    base_init = base.__init__

    def __init__(self: Any, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._sanitizer_record = _cursor_record(self, connection)
        base_init(self, connection, *args, **kwargs)

    statements, copies = split_blocking(PSYCOPG_STATEMENTS, PSYCOPG_STATEMENT_BLOCKING)
    fetches, others = split_blocking(PSYCOPG_CURSOR_METHODS,
                                     SERVER_SIDE_FETCHES if server else frozenset())
    extra = {"__init__": __init__,
             **Context.guards(base, blocking(_PSYCOPG_STATEMENT), statements),
             **Context.guards(base, _PSYCOPG_STATEMENT, copies),
             **Context.guards(base, blocking(EXCLUSIVE), fetches)}
    return Context.subclass(base, EXCLUSIVE, others, extra=extra)


def _tracked_factory(name: str, cursor_base: type, server: bool = False,
                     make: Callable[[Any, bool], type] | None = None) -> property:
    """``cursor_factory`` that hands out tracked subclasses of whatever class is set
    (made by ``make``, the sync cursors' by default)."""
    tracked = make or _psycopg_cursor_class

    def get(self: Any) -> Any:
        factory = self.__dict__.get(name)
        if Context.can_subclass(factory, cursor_base):
            return tracked(cast(Any, factory), server)
        return factory

    def set_(self: Any, value: Any) -> None:
        self.__dict__[name] = getattr(value, "__sanitizer_public_type__", value)

    return property(get, set_)


@functools.cache
def _psycopg_connection_class(psycopg: ModuleType, base: type) -> type:
    waits, ends = split_blocking(PSYCOPG_TRANSACTION_METHODS, PSYCOPG_BLOCKING)
    other_waits, others = split_blocking(PSYCOPG_OTHER_METHODS, PSYCOPG_BLOCKING)
    extra: dict[str, Any] = {
        "__init__": _libpq_init(base, _PSYCOPG_TRANSACTION, "psycopg"),
        "cursor_factory": _tracked_factory("cursor_factory", psycopg.Cursor),
        "server_cursor_factory": _tracked_factory("server_cursor_factory", psycopg.Cursor,
                                                  server=True),
        **Context.guards(base, blocking(_PSYCOPG_TRANSACTION), waits),
        **Context.guards(base, _PSYCOPG_TRANSACTION, ends),
        **Context.guards(base, blocking(PROCESS), other_waits),
    }
    return Context.subclass(base, PROCESS, others, extra=extra)


def _class_connect(context: Context, stock: type, tracked_class: Callable[[type], Any],
                   reported: Callable[[type], bool] = lambda cls: False
                   ) -> Callable[..., Any]:
    """A wrapper of the classmethod ``stock.connect``: the connection is made from the
    tracked subclass of the class it was called on (a user's subclass too). After
    ``reported(cls)`` (a violation said before connecting), it connects quietly."""
    def connect(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Any:
        cls = instance if isinstance(instance, type) else stock
        if Context.can_subclass(cls, stock):
            try:
                tracked: Any = tracked_class(cls)
            except Exception as exc:
                package = stock.__module__.partition(".")[0]
                context.internal_error(exc, f"{package}.{stock.__qualname__}.connect")
            else:
                if reported(cls):
                    with Context.quiet():
                        return tracked.connect(*args, **kwargs)
                return tracked.connect(*args, **kwargs)
        return wrapped(*args, **kwargs)

    return connect


def install_psycopg(psycopg: ModuleType, context: Context) -> None:
    stock = psycopg.Connection

    def reported(cls: type) -> bool:  # blocking on a loop's thread: said before it blocks
        return class_connect_reported(cls, _PSYCOPG_TRANSACTION)

    connect = _class_connect(context, stock, functools.partial(_psycopg_connection_class,
                                                               psycopg), reported)
    context.wrap(stock, "connect", connect)
    if getattr(psycopg, "connect", None) is not None:
        context.wrap(psycopg, "connect", connect)
    install_psycopg_async(psycopg, context)


# -- psycopg 3's AsyncConnection: its loop, and transactions at task level -----------------

# Operations that start a transaction whatever autocommit says (a transaction block's BEGIN).
OPENS_TRANSACTION = frozenset({"__aenter__", "tpc_begin"})
# Statements: they start one outside autocommit.
STATEMENTS = frozenset({"execute", "executemany"})
# Where helper tasks learn that their creator holds a transaction: (record, task) weak
# references, noted in the holder's context when it claims one, and copied into the
# context of each task it starts from then on (asyncio copies the context).
_HOLDING: ContextVar[tuple[tuple[weakref.ref[Any], weakref.ref[Any]], ...]] = ContextVar(
    "sanitizer_psycopg_holding", default=())
HOLDING_LIMIT = 16  # notes kept per context: the latest claims


def _note_holding(record: OwnerRecord, task: Any) -> None:
    """Note in the current (the holder's) context that ``task`` holds ``record``'s transaction."""
    try:
        kept = tuple(entry for entry in _HOLDING.get()
                     if entry[0]() is not None and entry[0]() is not record)
        _HOLDING.set(((weakref.ref(record), weakref.ref(task)), *kept)[:HOLDING_LIMIT])
    except TypeError:  # a task that cannot be weakly referenced: no helpers then
        pass


def _helper_of(record: OwnerRecord, holder: object) -> bool:
    """Whether the current task was started by ``holder`` while it held the transaction."""
    return any(entry[0]() is record and entry[1]() is holder for entry in _HOLDING.get())


def _task_phrase(task: Mapping[str, Any] | None) -> str:
    if not task:
        return "another task"
    coroutine = task.get("coroutine")
    return f"task '{task.get('name')}'" + (f" ({coroutine}())" if coroutine else "")


class AsyncTransactionPolicy(Policy):
    """psycopg 3's AsyncConnection (and its cursors and transaction blocks, which read its
    record): bound to the loop it was opened in (the ``loop`` policy), shared by tasks, but
    not inside another task's transaction.

    The async counterpart of TransactionPolicy and StatementPolicy, with the same shape:
    psycopg's own lock serializes statements, so tasks taking turns on the connection is
    no bug; a statement, commit or rollback from task B while task A has an open
    transaction is (B's work joins A's transaction, or B ends A's half-done work).
    ``record.task`` names the holder (the task policy's field, here the task inside the
    transaction rather than inside a call): claimed when a statement starts outside
    autocommit (so that a commit racing with the first INSERT is seen) or a transaction
    block is entered, and cleared when libpq's transaction status says none is open after
    the holder's call, or after a commit, rollback or close. The holder's helper tasks
    (``gather`` inside the transaction, ``wait_for``'s inner task on 3.10/3.11) are not
    intruders. Not checked: loop callbacks outside any task.
    """

    name = "transaction"  # its guards: enter/exit around a coroutine method's run
    advice = ASYNC_TRANSACTION_ADVICE

    def violated(
        self, record: OwnerRecord, token: ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if holder is FORKED or record.pid != token.pid:
            return "process"
        if holder is None:  # the loop's rule (the LOOP guards', and enter()'s own check)
            return LOOP.violated(record, token, holder, obj, operation)
        if record.sharing > 0 or _helper_of(record, holder):
            return None
        return "transaction"

    def describe(self, violation: Violation, record: OwnerRecord, token: ThreadToken) -> str:
        if violation.policy != "transaction":
            return LOOP.describe(violation, record, token)
        effect = ("ends that task's transaction" if violation.operation in ENDS_TRANSACTION
                  else "runs inside that task's transaction")
        return (f"{violation.object_type}.{violation.operation} called in "
                f"{_task_phrase(violation.task)} while {_task_phrase(violation.holder_task)} "
                f"has an open transaction on the same connection: it {effect} "
                "(transaction policy)")

    def enter(self, obj: object, record: OwnerRecord, operation: str) -> Any:
        if record.policy is None:
            return None
        me = Context.local.token
        if me.pid != record.pid or record.busy is FORKED:
            Context.check(obj, record, operation, FORKED)  # "process"
            return None
        if record.loop is not me.loop and record.loop is not None and Context.check(
                obj, record, operation, None):
            return None  # under another loop: that is the report
        task = Context.current_task()
        if task is None:  # a loop callback: no task to hold anything
            return None
        holder = record.task
        if holder is None:
            if operation in OPENS_TRANSACTION or (
                    operation in STATEMENTS and not _connection(obj)._autocommit):
                record.task = task
                _note_holding(record, task)
        elif holder is not task:
            Context.check(obj, record, operation, holder)
        return task, operation

    def exit(self, obj: object, record: OwnerRecord, state: Any) -> None:
        if state is None or record.policy is None:
            return
        task, operation = state
        try:
            opened = _psycopg_status(_connection(obj)) in PG_OPEN
        except Exception:  # a broken or closed connection has no transaction to hold
            opened = False
        holder = record.task
        if not opened:
            # Not another task's claim made for a statement still waiting for the lock.
            if holder is task or holder is None or operation in ENDS_TRANSACTION:
                record.task = None
        elif holder is None and operation not in ENDS_TRANSACTION:
            record.task = task  # this task's call opened it
            _note_holding(record, task)


ASYNC_TRANSACTION = AsyncTransactionPolicy()


class GuardedLoop(LoopBound):
    """The loop policy through guards, never a prologue compiled into the method: a guard
    runs a reported call quietly, so that what it calls (the cursor beneath
    AsyncConnection.execute()) does not report the same misuse again."""

    def inlined(self, func: Callable[..., Any], operation: str) -> Any:
        return None


ASYNC_LOOP = GuardedLoop()


def _connection(obj: Any) -> Any:
    """The AsyncConnection of a connection, cursor or transaction block."""
    return getattr(obj, "_conn", None) or obj


# Ends and starts of transactions; the other coroutine methods follow the loop's rule.
ASYNC_TRANSACTION_METHODS: Methods = {
    "commit": "", "rollback": "", "close": "", "tpc_begin": OWN, "tpc_prepare": "",
    "tpc_commit": OWN, "tpc_rollback": OWN,
}
# Not guarded: cancel(), cancel_safe() (meant for other tasks and threads), fileno().
# execute() runs its cursor's, which checks the transaction.
ASYNC_OTHER_METHODS: Methods = {
    "cursor": OWN, "execute": OWN, "transaction": OWN, "pipeline": "", "notifies": OWN,
    "set_autocommit": "value", "set_isolation_level": "value", "set_read_only": "value",
    "set_deferrable": "value", "tpc_recover": "", "xid": OWN, "__aenter__": "",
    "__aexit__": "exc_type, exc_val, exc_tb",
}
ASYNC_STATEMENTS: Methods = {"execute": OWN, "executemany": OWN}
ASYNC_CURSOR_METHODS: Methods = {
    "fetchone": "", "fetchmany": OWN, "fetchall": "", "scroll": OWN, "close": "",
    "stream": OWN, "results": "", "set_result": OWN, "copy": OWN, "__aenter__": "",
    "__aexit__": "exc_type, exc_val, exc_tb", "__aiter__": "",
}


@functools.cache
def _psycopg_async_cursor_class(base: Any, server: bool = False) -> type:
    """Tracked subclass of an async cursor factory: its guards read its connection's record."""
    del server  # the same for server cursors: their fetches are awaited like any
    extra = {name: Context.guard(ASYNC_TRANSACTION, getattr(base, name), name, OWN,
                                 record_from="_conn")
             for name in ASYNC_STATEMENTS if hasattr(base, name)}
    return Context.subclass(base, ASYNC_LOOP, ASYNC_CURSOR_METHODS, extra=extra,
                            record_from="_conn")


@functools.cache
def _psycopg_async_connection_class(psycopg: ModuleType, base: type) -> type:
    extra: dict[str, Any] = {
        # Made inside AsyncConnection.connect(), on the loop that awaits it: bound to it.
        "__init__": _libpq_init(base, ASYNC_TRANSACTION, "psycopg", after=Context.bind_running),
        "cursor_factory": _tracked_factory("cursor_factory", psycopg.AsyncCursor,
                                           make=_psycopg_async_cursor_class),
        "server_cursor_factory": _tracked_factory("server_cursor_factory", psycopg.AsyncCursor,
                                                  server=True, make=_psycopg_async_cursor_class),
        **Context.guards(base, ASYNC_TRANSACTION, ASYNC_TRANSACTION_METHODS),
    }
    return Context.subclass(base, ASYNC_LOOP, ASYNC_OTHER_METHODS, extra=extra)


def install_psycopg_async(psycopg: ModuleType, context: Context) -> None:
    stock = getattr(psycopg, "AsyncConnection", None)
    transaction = getattr(psycopg, "AsyncTransaction", None)
    if stock is None or transaction is None:
        return
    # Transaction blocks of untracked connections read this (never checked).
    context.replace(stock, "_sanitizer_record", UNTRACKED)
    for name in ("__aenter__", "__aexit__"):
        context.replace(transaction, name, Context.guard(
            ASYNC_TRANSACTION, vars(transaction)[name], name, OWN, record_from="_conn"))

    # A classmethod coroutine: the instance is made, and bound, when it is awaited.
    context.wrap(stock, "connect", _class_connect(
        context, stock, functools.partial(_psycopg_async_connection_class, psycopg)))


# -- PyMySQL and mysqlclient: Python classes, patched in place ---------------------------


def _patch_in_place(context: Context, cls: type, methods: Methods,
                    init: Callable[[Callable[..., None]], Callable[..., None]] | None = None,
                    *, own_only: bool = True, waits: frozenset[str] = frozenset()) -> None:
    """Guard ``cls``'s methods (those it defines itself, if ``own_only``) with EXCLUSIVE,
    those in ``waits`` also with NOBLOCK; ``init`` wraps its ``__init__`` (to give instances
    their records)."""
    blocking_methods, others = split_blocking(methods, waits)
    context.patch_class(cls, EXCLUSIVE, others, own_only=own_only)
    for name, params in blocking_methods.items():
        original = vars(cls).get(name) if own_only else getattr(cls, name, None)
        if original is not None:
            context.replace(cls, name, Context.guard(blocking(EXCLUSIVE), original, name,
                                                     cast(Any, params)))
    if init is not None:
        original = cls.__init__  # type: ignore[misc]
        context.replace(cls, "__init__", functools.wraps(original)(init(original)))


def _share_connection_record(original: Callable[..., None]) -> Callable[..., None]:
    """Cursor __init__ of a threadsafety < 2 driver: the cursor shares its connection's record."""

    def __init__(self: Any, connection: Any, *args: Any, **kwargs: Any) -> None:
        record = record_of(connection)
        if record is not None and "_sanitizer_record" not in self.__dict__:
            Context.attach(self, record)
        original(self, connection, *args, **kwargs)
    return __init__


def _connection_init(resource: Callable[[Any, tuple[Any, ...], dict[str, Any]], dict[str, Any]],
                     *, connects: bool) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``connects``: ``__init__`` connects in C (MySQLdb; PyMySQL's connect() is guarded)."""
    def make(original: Callable[..., None]) -> Callable[..., None]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if "_sanitizer_record" in self.__dict__:  # a subclass's __init__ ran ours already
                original(self, *args, **kwargs)
                return
            # Set before the driver connects: __init__ calls guarded methods itself.
            record = new_record(self, DRIVER_EXCLUSIVE)
            if record.policy is not None:
                Context.attach(self, record)
            if connects and connect_reported(self, record):
                with Context.quiet():
                    original(self, *args, **kwargs)
            else:
                original(self, *args, **kwargs)
            _fill_resource(record, lambda: resource(self, args, kwargs))
        return __init__
    return make


PYMYSQL_CONNECTION_METHODS: Methods = {
    "connect": "sock=None", "close": "", "commit": "", "rollback": "", "begin": "", "query": OWN,
    "next_result": OWN, "ping": OWN, "select_db": "db", "set_charset": "charset",
    "set_character_set": OWN, "show_warnings": "", "autocommit": "value", "kill": "thread_id",
    "affected_rows": "", "insert_id": "", "__enter__": "", "__exit__": "*exc_info",
}
PYMYSQL_CURSOR_METHODS: Methods = {
    "execute": "query, args=None", "executemany": "query, args", "callproc": OWN,
    "fetchone": "", "fetchmany": "size=None", "fetchall": "", "fetchall_unbuffered": "",
    "read_next": "", "scroll": OWN, "close": "", "nextset": "", "__enter__": "",
    "__exit__": "*exc_info", "__iter__": "", "__next__": "",
}
# What waits on the server (noblock). nextset() reads only if more results are pending,
# through next_result(); fetches wait only on an unbuffered SSCursor.
PYMYSQL_BLOCKING = frozenset({
    "connect", "commit", "rollback", "begin", "query", "next_result", "ping", "select_db",
    "set_charset", "set_character_set", "show_warnings", "autocommit", "kill", "execute",
    "executemany", "callproc",
})
UNBUFFERED_FETCHES = frozenset({"fetchone", "fetchmany", "fetchall", "read_next", "scroll"})


def install_pymysql(pymysql: ModuleType, context: Context) -> None:
    connections, cursors = pymysql.connections, pymysql.cursors

    def resource(conn: Any, _args: tuple[Any, ...], _kwargs: dict[str, Any]) -> dict[str, Any]:
        return _resource("pymysql", conn.host, conn.port, conn.db)

    _patch_in_place(context, connections.Connection, PYMYSQL_CONNECTION_METHODS,
                    _connection_init(resource, connects=False), waits=PYMYSQL_BLOCKING)
    _patch_in_place(context, cursors.Cursor, PYMYSQL_CURSOR_METHODS, _share_connection_record,
                    waits=PYMYSQL_BLOCKING)
    _patch_in_place(context, cursors.SSCursor, PYMYSQL_CURSOR_METHODS,
                    waits=PYMYSQL_BLOCKING | UNBUFFERED_FETCHES)


MYSQLDB_CONNECTION_METHODS: Methods = {
    "close": "", "commit": "", "rollback": "", "begin": "", "query": "query",
    "next_result": "", "store_result": "", "use_result": "", "ping": OWN,
    "select_db": OWN, "set_character_set": OWN, "set_sql_mode": "sql_mode",
    "set_server_option": OWN, "show_warnings": "", "autocommit": "on", "kill": OWN,
    "affected_rows": "", "insert_id": "", "change_user": OWN, "shutdown": OWN,
    "__enter__": "", "__exit__": "exc_type, exc_value, traceback",
}
MYSQLDB_CURSOR_METHODS: Methods = {
    "execute": "query, args=None", "executemany": "query, args", "callproc": OWN,
    "fetchone": "", "fetchmany": "size=None", "fetchall": "", "scroll": OWN, "close": "",
    "nextset": "", "__enter__": "", "__exit__": "*exc_info", "__iter__": "", "__next__": "",
}
# What waits on the server (noblock). Not next_result(): libmysqlclient answers it from
# memory when no more results are pending, as after every close(); store_result() reads
# them. Fetches wait only on an unbuffered (use_result) cursor.
MYSQLDB_BLOCKING = frozenset({
    "commit", "rollback", "begin", "query", "store_result", "ping", "select_db",
    "set_character_set", "set_sql_mode", "set_server_option", "show_warnings", "autocommit",
    "kill", "change_user", "shutdown", "execute", "executemany", "callproc",
})


def install_mysqldb(connections: ModuleType, context: Context) -> None:
    """Hooked on MySQLdb.connections (MySQLdb.connect builds that module's Connection)."""

    def resource(_conn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        # _mysql.connect(host, user, passwd, db, port, ...): never look at the password.
        def arg(index: int, *names: str) -> Any:
            for name in names:
                if name in kwargs:
                    return kwargs[name]
            return args[index] if len(args) > index else None
        return _resource("MySQLdb", arg(0, "host"), arg(4, "port"), arg(3, "database", "db"))

    # The C base defines most methods: guard them all on the Python class.
    _patch_in_place(context, connections.Connection, MYSQLDB_CONNECTION_METHODS,
                    _connection_init(resource, connects=True), own_only=False,
                    waits=MYSQLDB_BLOCKING)
    cursors = connections.cursors
    _patch_in_place(context, cursors.BaseCursor, MYSQLDB_CURSOR_METHODS,
                    _share_connection_record, waits=MYSQLDB_BLOCKING)
    _patch_in_place(context, cursors.CursorStoreResultMixIn, MYSQLDB_CURSOR_METHODS)
    _patch_in_place(context, cursors.CursorUseResultMixIn, MYSQLDB_CURSOR_METHODS,
                    waits=UNBUFFERED_FETCHES)


# -- any other driver, by name: proxies --------------------------------------------------

GENERIC_TRANSACTION_METHODS = ("commit", "rollback", "close", "__exit__")
GENERIC_OTHER_METHODS = ("tpc_begin", "tpc_prepare", "tpc_commit", "tpc_rollback", "tpc_recover")
GENERIC_STATEMENTS = ("execute", "executemany", "callproc")
GENERIC_CURSOR_METHODS = ("fetchone", "fetchmany", "fetchall", "nextset", "scroll", "close",
                          "setinputsizes", "setoutputsize", "__next__", "__exit__")


def _self_or(proxy: Any, result: Any) -> Any:
    """Keep ``with conn as c`` and ``iter(cursor)`` on the proxy when the driver returns self."""
    return proxy if result is proxy.__wrapped__ else result


def _proxy_methods(target: type, policy: Policy, names: tuple[str, ...],
                   returns_self: tuple[str, ...] = ()) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    for name in names:
        if not hasattr(target, name):
            continue
        call = f"self.__wrapped__.{name}(*args, **kwargs)"
        if name in returns_self:
            call = f"_self_or(self, {call})"
        namespace[name] = policy.guard_expression(call, name, "*args, **kwargs",
                                                  {"_self_or": _self_or})
    return namespace


# Cursors of generic drivers at threadsafety >= 2 know their connection proxy.
_GENERIC_STATEMENT = StatementPolicy(None, operator.attrgetter("_sanitizer_connection"),
                                     lambda conn: getattr(conn, "autocommit", False) is True)


class GenericCursorProxy(TrackedProxy):
    """A cursor of a driver named in ``dbapi.drivers``."""

    __slots__ = ("_sanitizer_connection",)


class GenericConnectionProxy(TrackedProxy):
    """A connection of a driver named in ``dbapi.drivers``."""

    __slots__ = ()


@functools.cache
def _generic_cursor_class(target: Any, shared: bool) -> type:
    statement = EXCLUSIVE if shared else _GENERIC_STATEMENT
    namespace = {
        "__slots__": (), "__sanitizer_public_type__": target,
        **_proxy_methods(target, EXCLUSIVE, GENERIC_CURSOR_METHODS),
        **_proxy_methods(target, EXCLUSIVE, ("__enter__", "__iter__"),
                         returns_self=("__enter__", "__iter__")),
        **_proxy_methods(target, statement, GENERIC_STATEMENTS),
    }
    return type(f"Tracked{target.__name__}Proxy", (GenericCursorProxy,), namespace)


@functools.cache
def _generic_connection_class(target: Any, shared: bool) -> type:
    transaction = EXCLUSIVE if shared else TRANSACTION_POLICY
    other = EXCLUSIVE if shared else PROCESS

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        raw = self.__wrapped__.cursor(*args, **kwargs)
        record = self._sanitizer_record
        if not shared:  # threadsafety >= 2: each cursor is its own exclusive object
            record = _cursor_record(raw, self)
        if record.policy is None:
            return raw
        proxy = _generic_cursor_class(cast(Any, type(raw)), shared)(raw)
        proxy._sanitizer_record = record
        proxy._sanitizer_connection = self
        return proxy

    namespace = {
        "__slots__": (), "__sanitizer_public_type__": target,
        # Making a cursor is no use of the connection; at level >= 2 forks are still caught.
        "cursor": cursor if shared else Context.guard(PROCESS, cursor, "cursor"),
        **_proxy_methods(target, transaction, GENERIC_TRANSACTION_METHODS),
        **_proxy_methods(target, other, GENERIC_OTHER_METHODS),
        **_proxy_methods(target, other, ("__enter__",), returns_self=("__enter__",)),
    }
    return type(f"Tracked{target.__name__}Proxy", (GenericConnectionProxy,), namespace)


def _generic_installer(module_name: str) -> Callable[[ModuleType, Context], None]:
    def install(module: ModuleType, context: Context) -> None:
        level = getattr(module, "threadsafety", 1)
        shared = not isinstance(level, int) or level < 2
        policy = DRIVER_EXCLUSIVE if shared else TRANSACTION_POLICY
        context.add_library(module_name)

        def connect(wrapped: Any, _instance: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
            conn = wrapped(*args, **kwargs)
            if isinstance(conn, TrackedProxy):
                return conn
            try:
                record = context.record(conn, policy,
                                        resource=_generic_resource(module_name, wrapped,
                                                                   args, kwargs))
                proxy = _generic_connection_class(cast(Any, type(conn)), shared)(conn)
                proxy._sanitizer_record = record
            except Exception as exc:
                context.internal_error(exc, f"{module_name}.connect")
                return conn
            return proxy

        context.wrap(module, "connect", connect)
    return install


def _generic_resource(driver: str, connect: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> dict[str, Any]:
    """host/port/database from connect()'s arguments, its defaults included; no password."""
    values = dict(kwargs)
    try:
        bound = inspect.signature(connect).bind(*args, **kwargs)
        bound.apply_defaults()
        values = {**bound.arguments, **bound.arguments.get("kwargs", {})}
    except (TypeError, ValueError):  # no signature (C function) or unusual arguments
        pass
    database = next((values[k] for k in ("database", "dbname", "db") if values.get(k)), None)
    return _resource(driver, values.get("host"),
                     values.get("port"), database)


_DRIVER_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*$")
BUILTIN_DRIVERS: Mapping[str, Callable[[ModuleType, Context], None]] = {
    "psycopg2": install_psycopg2,
    "psycopg": install_psycopg,
    "pymysql": install_pymysql,
    "MySQLdb.connections": install_mysqldb,
}


def setup(context: Context) -> None:
    """Hook the drivers named in ``dbapi.drivers``."""
    names = context.options.get("drivers", "")
    for name in (n.strip() for n in names.split("+")):
        if not name:
            continue
        if not _DRIVER_NAME.match(name):
            raise ConfigError(f"dbapi.drivers: bad module name {name!r}; expected module "
                              "names joined by '+'", key="dbapi.drivers", value=names)
        if name in BUILTIN_DRIVERS or name in ("MySQLdb", "sqlite3"):
            continue  # built in here, or by the sqlite3 plugin
        context.when_imported(name, _generic_installer(name))


plugin = Plugin(
    name="dbapi",
    hooks=BUILTIN_DRIVERS,
    libraries=("psycopg2", "psycopg", "pymysql", "MySQLdb"),
    options={"drivers": "more DB-API 2.0 driver modules to track, joined by '+' "
                        "(e.g. dbapi.drivers=pg8000+mydriver); their connect() is wrapped"},
    setup=setup,
    policies=(TRANSACTION_POLICY,),
)
