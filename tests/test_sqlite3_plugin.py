"""The sqlite3 plugin: transparency of tracked connections, and what it reports."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from support import found, in_thread, inside_query, line_of_file, raising, started, tracked

import sanitizer
from sanitizer.ownership import record_of
from sanitizer.policies import Check


def line_of_here(marker: str) -> int:
    """The line of this file that ends with ``marker``."""
    return line_of_file(__file__, marker)


class Busy:
    """A connection owned by a thread named "owner", which can be held inside a query."""

    def __init__(self) -> None:
        self.made, self.go = threading.Event(), threading.Event()
        self.entered, self.release = threading.Event(), threading.Event()
        self.conn: Any = None
        self.thread, self.outcome = started(self._own, "owner")
        self.made.wait(10)

    def _own(self) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.create_function("hold", 0, self.hold)
        self.made.set()
        self.go.wait(10)
        self.conn.execute("select hold()").fetchall()

    def hold(self) -> int:
        self.entered.set()
        self.release.wait(10)
        return 1

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """The owner thread is inside ``conn.execute(...)`` for the block."""
        self.go.set()
        self.entered.wait(10)
        try:
            yield
        finally:
            self.release.set()
            self.thread.join()
        assert "error" not in self.outcome, self.outcome


class TestTransparency:
    def test_isinstance_and_documented_type(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        assert isinstance(conn, sqlite3.Connection)
        # type() is a generated subclass that keeps the factory's name and module
        assert type(conn) is not sqlite3.Connection
        assert issubclass(type(conn), sqlite3.Connection)
        assert type(conn).__name__ == "Connection" and type(conn).__module__ == "sqlite3"

    def test_context_manager_iteration_and_derived_identity(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        with conn:
            conn.execute("create table t(x)")
            conn.executemany("insert into t values (?)", [(1,), (2,)])
        cur = conn.execute("select x from t order by x")
        assert isinstance(cur, sqlite3.Cursor)
        assert cur.connection is conn
        assert [row for row in cur] == [(1,), (2,)]
        cur2 = conn.cursor()
        assert cur2.execute("select 1") is cur2
        assert cur2.fetchone() == (1,)

    def test_row_factory_and_attributes(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        conn.row_factory = sqlite3.Row
        row = conn.execute("select 1 as x").fetchone()
        assert isinstance(row, sqlite3.Row) and row["x"] == 1
        assert conn.row_factory is sqlite3.Row
        conn.row_factory = None
        assert conn.in_transaction is False
        assert conn.total_changes == 0
        conn.isolation_level = None
        assert conn.isolation_level is None

    def test_backup_and_iterdump(self, sanitized: Sanitized) -> None:
        source = sqlite3.connect(":memory:")
        source.execute("create table t(x)")
        source.execute("insert into t values (42)")
        source.commit()
        target = sqlite3.connect(":memory:")
        source.backup(target)
        assert target.execute("select x from t").fetchone() == (42,)
        plain = sqlite3.Connection(":memory:")  # an untracked target works too
        source.backup(plain)
        assert "INSERT INTO \"t\" VALUES(42);" in list(source.iterdump())

    def test_cursor_constructor_accepts_a_tracked_connection(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        cursor = sqlite3.Cursor(conn)
        assert cursor.execute("select 7").fetchone() == (7,)

    def test_checked_methods_keep_their_names_and_docstrings(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        cursor = conn.cursor()
        for obj, stock, names in (
                (conn, sqlite3.Connection, ("execute", "executemany", "executescript", "cursor",
                                            "commit", "close", "__exit__")),
                (cursor, sqlite3.Cursor, ("execute", "fetchone", "fetchall", "close"))):
            for name in names:
                method = getattr(type(obj), name)
                assert method is not getattr(stock, name)  # checked ...
                assert method.__name__ == name  # ... and help() reads the same
                assert method.__doc__ == getattr(stock, name).__doc__, name

    def test_library_errors_are_unchanged(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        with pytest.raises(sqlite3.OperationalError, match="no such column: nope"):
            conn.execute("select nope")
        with pytest.raises(TypeError):
            conn.execute()  # type: ignore[call-arg]
        conn.close()
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("select 1")

    def test_user_factory_classes(self, sanitized: Sanitized) -> None:
        class MyConnection(sqlite3.Connection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.execute("create table made_in_init(x)")  # uses self during init

            def hello(self) -> str:
                return "hi"

        conn = sqlite3.connect(":memory:", factory=MyConnection)
        assert isinstance(conn, MyConnection) and conn.hello() == "hi"
        conn.execute("select * from made_in_init")
        with pytest.raises(sqlite3.ProgrammingError):
            in_thread(lambda: conn.execute("select 1"))
        assert sanitized.policies() == ["strict"]

    @pytest.mark.filterwarnings("ignore:Passing more than 1 positional:DeprecationWarning")
    def test_positional_arguments_choose_the_policy_and_factory(
            self, sanitized: Sanitized) -> None:
        class MyConnection(sqlite3.Connection):
            pass

        # connect(database, timeout, detect_types, isolation_level, check_same_thread, factory)
        shared = sqlite3.connect(":memory:", 5.0, 0, "", False)
        mine = sqlite3.connect(":memory:", 5.0, 0, "", True, MyConnection)
        assert isinstance(mine, MyConnection)
        tracked(shared)
        in_thread(lambda: shared.execute("select 1"))  # a handoff: exclusive allows it
        with pytest.raises(sqlite3.ProgrammingError):
            in_thread(lambda: mine.execute("select 1"))
        assert sanitized.policies() == ["strict"]
        # The control: what exclusive forbids, an overlap, is reported on ``shared``.
        with inside_query(shared), raising(), pytest.raises(sanitizer.ThreadAffinityError):
            shared.execute("select 1")
        assert found() == [("strict", "execute"), ("exclusive", "execute")]

    def test_blob(self, sanitized: Sanitized) -> None:
        if not hasattr(sqlite3.Connection, "blobopen"):
            pytest.skip("blobopen needs Python 3.11")
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        conn.execute("create table b(data blob)")
        conn.execute("insert into b values (zeroblob(4))")
        with conn.blobopen("b", "data", 1) as blob:
            assert isinstance(blob, sqlite3.Blob)
            blob.write(b"ab")
            assert len(blob) == 4
        assert conn.execute("select data from b").fetchone()[0] == b"ab\x00\x00"

    def test_pandas_read_sql_and_to_sql(self, sanitized: Sanitized) -> None:
        pandas = pytest.importorskip("pandas")
        conn = sqlite3.connect(":memory:")
        frame = pandas.DataFrame({"x": [1, 2, 3]})
        frame.to_sql("numbers", conn, index=False)
        back = pandas.read_sql("select x from numbers order by x", conn)
        assert back["x"].tolist() == [1, 2, 3]
        assert sanitized.records() == []
        tracked(conn)  # the control: the connection pandas used is watched
        with pytest.raises(sqlite3.ProgrammingError):
            in_thread(lambda: conn.execute("select 1"))
        assert found() == [("strict", "execute")]

    def test_disable_restores_connect(self, sanitized: Sanitized) -> None:
        sanitizer.disable()
        assert type(sqlite3.connect(":memory:")) is sqlite3.Connection
        from sqlite3 import dbapi2
        assert type(dbapi2.connect(":memory:")) is sqlite3.Connection


class TestReports:
    def test_strict_report_is_written_before_sqlite3_raises(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        seen: list[int] = []

        def use() -> None:
            try:
                conn.execute("select 1")
            except sqlite3.ProgrammingError:
                seen.append(len(sanitized.records()))  # already on disk
                raise
        with pytest.raises(sqlite3.ProgrammingError, match="same thread"):
            in_thread(use)
        assert seen == [1]

    def test_cursor_shares_its_connections_record(self, enable: Any) -> None:
        # raise: the call would otherwise wait for SQLite's connection mutex, which
        # the holder keeps until it is released.
        sanitized = enable(action="log+raise")
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        cursor = conn.cursor()
        cursor.execute("select 1")
        handed_over = threading.Event()
        inside, release = threading.Event(), threading.Event()

        def slow(x: int) -> int:
            inside.set()
            release.wait(10)
            return x
        conn.create_function("slow", 1, slow)

        def hold() -> None:
            handed_over.set()
            conn.execute("select slow(1)").fetchall()
        thread = threading.Thread(target=hold)
        thread.start()
        inside.wait(10)
        with pytest.raises(sanitizer.ThreadAffinityError):
            cursor.fetchall()  # the cursor is derived from the busy connection
        release.set()
        thread.join()
        [record] = sanitized.records()
        assert record["object_type"] == "sqlite3.Cursor"
        assert record["root_type"] == "sqlite3.Connection"
        assert record["operation"] == "fetchall"

    def test_cursor_iteration_in_another_thread_is_strict(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        cursor = conn.execute("select 1 union select 2")
        with pytest.raises(sqlite3.ProgrammingError):
            in_thread(lambda: next(iter(cursor)))
        assert [r["operation"] for r in sanitized.records()] == ["__next__"]

    def test_interrupt_is_a_thread_safe_entry_point(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")
        tracked(conn)
        in_thread(conn.interrupt)
        assert sanitized.records() == []
        with pytest.raises(sqlite3.ProgrammingError):  # the control: a statement is not
            in_thread(lambda: conn.execute("select 1"))
        assert found() == [("strict", "execute")]

    def test_per_thread_connections_are_silent(self, sanitized: Sanitized,
                                               tmp_path: Path) -> None:
        path = tmp_path / "db.sqlite"
        sqlite3.connect(path).execute("create table t(x)").connection.commit()
        barrier = threading.Barrier(4)
        watched: list[bool] = []

        def work() -> None:
            conn = sqlite3.connect(path, timeout=30)
            watched.append(record_of(conn) is not None)
            barrier.wait(10)
            conn.execute("select count(*) from t").fetchall()
            conn.close()
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert watched == [True] * 4
        assert sanitized.records() == []
        # The control: a connection made the same way, used from another thread.
        made = in_thread(lambda: sqlite3.connect(path, timeout=30), name="maker")
        with pytest.raises(sqlite3.ProgrammingError):
            made.execute("select count(*) from t")
        assert found() == [("strict", "execute")]

    def test_attribute_reads_and_idle_sets_from_another_thread_are_silent(
            self, sanitized: Sanitized) -> None:
        # aiosqlite's properties, read and set from the event loop's thread while
        # its worker (the owner) is idle: plain sqlite3 allows all of these.
        conn = in_thread(lambda: sqlite3.connect(":memory:"), name="worker")
        assert record_of(conn) is not None  # tracked, so that this could fail
        assert (conn.in_transaction, conn.total_changes, conn.isolation_level) == (False, 0, "")
        conn.row_factory = sqlite3.Row
        conn.text_factory = bytes
        conn.isolation_level = "DEFERRED"
        assert conn.row_factory is sqlite3.Row and conn.text_factory is bytes
        assert sanitized.records() == []
        with pytest.raises(sqlite3.ProgrammingError):  # the control: a statement is not
            conn.execute("select 1")
        assert found() == [("strict", "execute")]

    def test_setting_an_option_while_the_owner_is_inside_a_call_is_reported(
            self, sanitized: Sanitized) -> None:
        owner = Busy()
        with owner.inside():  # the owner fetches rows; this thread changes how they decode
            owner.conn.text_factory = bytes  # concurrent
            owner.conn.row_factory = sqlite3.Row  # each cursor has its own: not a race
        [record] = sanitized.records()
        assert (record["policy"], record["operation"]) == ("exclusive", "text_factory")
        assert record["holder_thread"]["name"] == "owner"
        assert record["owner_thread"]["name"] == "owner"
        assert "while thread T" in record["message"] and "'owner' is inside a call" in \
            record["message"]
        assert any(f["function"] in ("Busy.hold", "hold") for f in record["holder_stack"])
        assert record["access_stack"][0]["line"] == line_of_here("# concurrent")

    def test_a_statement_while_the_owner_is_inside_a_call_is_strict(
            self, sanitized: Sanitized) -> None:
        owner = Busy()
        with owner.inside(), pytest.raises(sqlite3.ProgrammingError):
            owner.conn.execute("select 1")
        [record] = sanitized.records()
        assert (record["policy"], record["operation"]) == ("strict", "execute")

    def test_backup_target_of_an_idle_thread_is_silent(self, sanitized: Sanitized) -> None:
        # aiosqlite's backup tests: the source's owner backs up into a connection
        # that belongs to another (idle) worker thread; sqlite3 checks only the source.
        source = sqlite3.connect(":memory:")
        source.execute("create table t(x)")
        target = in_thread(lambda: sqlite3.connect(":memory:"), name="maker")
        assert record_of(target) is not None
        source.backup(target)
        assert sanitized.records() == []
        with pytest.raises(sqlite3.ProgrammingError):  # the control: the target's own use
            target.execute("select 1")
        assert found() == [("strict", "execute")]

    def test_backup_target_in_use_by_its_owner_is_reported_in_its_role(
            self, enable: Any) -> None:
        run = enable(action="log+raise")  # raise: never reach the busy target's mutex
        source = sqlite3.connect(":memory:")
        owner = Busy()
        with owner.inside(), pytest.raises(sanitizer.ThreadAffinityError):
            source.backup(owner.conn)
        [record] = run.records()
        assert (record["policy"], record["operation"]) == ("exclusive", "backup")
        assert record["role"] == "the target of backup()"
        assert record["message"].startswith(
            "sqlite3.Connection used as the target of backup() called by thread T0 "
            "'MainThread' while thread T")
        assert record["holder_thread"]["name"] == "owner"

    def test_backup_source_is_checked_as_strict(self, sanitized: Sanitized) -> None:
        source = sqlite3.connect(":memory:")
        target = sqlite3.connect(":memory:", check_same_thread=False)
        with pytest.raises(sqlite3.ProgrammingError):
            in_thread(lambda: source.backup(target))
        [record] = sanitized.records()
        assert (record["policy"], record["operation"]) == ("strict", "backup")
        assert "role" not in record

    def test_include_args_is_off_by_default(self, enable: Any) -> None:
        run = enable()
        conn = sqlite3.connect(":memory:")
        with pytest.raises(sqlite3.ProgrammingError):
            in_thread(lambda: conn.execute("select 'secret'"))
        [record] = run.records()
        assert "args" not in record and "secret" not in run.log.read_text()

    def test_include_args_logs_sql(self, enable: Any) -> None:
        run = enable(include_args=True)
        conn = sqlite3.connect(":memory:")
        with pytest.raises(sqlite3.ProgrammingError):
            in_thread(lambda: conn.execute("select 'visible'", ()))
        [record] = run.records()
        assert "visible" in record["args"]["sql"]

    def test_gc_finalization_on_another_thread_is_silent(self, sanitized: Sanitized) -> None:
        class Owner:
            def __init__(self) -> None:
                self.conn = sqlite3.connect(":memory:", check_same_thread=False)
                self.conn.execute("create table t(x)")

            def __del__(self) -> None:
                self.conn.close()  # a use, but during finalization

        box = [Owner()]
        tracked(box[0].conn)
        in_thread(box.clear)  # the last reference dies in another thread
        assert sanitized.records() == []
        # The control: the same close, not by finalization, while another thread is
        # inside a query (raised before it would wait for SQLite's connection mutex).
        box.append(Owner())
        with inside_query(box[0].conn), raising(), pytest.raises(
                sanitizer.ThreadAffinityError):
            box[0].conn.close()
        assert found() == [("exclusive", "close")]
        box.clear()  # closes it here, idle: still only the one report
        assert found() == [("exclusive", "close")]


# -- the check table agrees with CPython --------------------------------------------------

SCHEMA = "create table t(x blob); insert into t values (zeroblob(4));"


def _image() -> bytes:
    conn = sqlite3.Connection(":memory:")
    conn.executescript(SCHEMA)
    return bytes(conn.serialize())


# How to perform each operation of the plugin's tables, on a connection, cursor
# or blob that the owner thread made and left idle. Every name in the tables needs one.
CONNECTION_OPERATIONS: dict[str, Any] = {
    "close": lambda c: c.close(), "commit": lambda c: c.commit(),
    "rollback": lambda c: c.rollback(), "cursor": lambda c: c.cursor(),
    "execute": lambda c: c.execute("select 1"),
    "executemany": lambda c: c.executemany("select ?", [(1,)]),
    "executescript": lambda c: c.executescript("select 1;"),
    "__enter__": lambda c: c.__enter__(), "__exit__": lambda c: c.__exit__(None, None, None),
    "__call__": lambda c: c("select 1"),
    "create_function": lambda c: c.create_function("f", 0, int),
    "create_aggregate": lambda c: c.create_aggregate("a", 0, object),
    "create_collation": lambda c: c.create_collation("k", lambda a, b: 0),
    "create_window_function": lambda c: c.create_window_function("w", 0, None),
    "set_authorizer": lambda c: c.set_authorizer(None),
    "set_progress_handler": lambda c: c.set_progress_handler(None, 1),
    "set_trace_callback": lambda c: c.set_trace_callback(None),
    "enable_load_extension": lambda c: c.enable_load_extension(False),
    "load_extension": lambda c: c.load_extension("/nonexistent/extension"),
    "getlimit": lambda c: c.getlimit(0), "setlimit": lambda c: c.setlimit(0, 1_000_000),
    "getconfig": lambda c: c.getconfig(1002), "setconfig": lambda c: c.setconfig(1002, True),
    "serialize": lambda c: c.serialize(),
    "deserialize": lambda c: c.deserialize(_image()),
    "iterdump": lambda c: list(c.iterdump()),
    "blobopen": lambda c: c.blobopen("t", "x", 1),
    "backup": lambda c: c.backup(sqlite3.Connection(":memory:")),
    "interrupt": lambda c: c.interrupt(),
}
SETTINGS = {"isolation_level": "DEFERRED", "row_factory": sqlite3.Row, "text_factory": bytes,
            "autocommit": True}
CURSOR_OPERATIONS: dict[str, Any] = {
    "execute": lambda k: k.execute("select 1"),
    "executemany": lambda k: k.executemany("select ?", [(1,)]),
    "executescript": lambda k: k.executescript("select 1;"), "fetchone": lambda k: k.fetchone(),
    "fetchmany": lambda k: k.fetchmany(), "fetchall": lambda k: k.fetchall(),
    "__next__": lambda k: next(k), "close": lambda k: k.close(), "__iter__": lambda k: iter(k),
    "setinputsizes": lambda k: k.setinputsizes([]), "setoutputsize": lambda k: k.setoutputsize(1),
}
CURSOR_SETTINGS = {"arraysize": 3, "row_factory": None}  # the cursor attributes one may set
BLOB_OPERATIONS: dict[str, Any] = {
    "read": lambda b: b.read(), "write": lambda b: b.write(b"x"), "seek": lambda b: b.seek(0),
    "tell": lambda b: b.tell(), "close": lambda b: b.close(),
    "__enter__": lambda b: b.__enter__(), "__exit__": lambda b: b.__exit__(None, None, None),
    "__getitem__": lambda b: b[0], "__setitem__": lambda b: b.__setitem__(0, 1),
    "__len__": lambda b: len(b),
}


def _connection(connect: Any) -> Any:
    conn = connect(":memory:")
    conn.executescript(SCHEMA)
    return conn


def _cursor(connect: Any) -> Any:
    return _connection(connect).execute("select 1 union select 2")


def _blob(connect: Any) -> Any:
    return _connection(connect).blobopen("t", "x", 1)


# An operation that CPython refuses from another thread, per kind of object.
CONTROLS: dict[Any, tuple[str, Any]] = {
    _connection: ("execute", CONNECTION_OPERATIONS["execute"]),
    _cursor: ("fetchone", CURSOR_OPERATIONS["fetchone"]),
    _blob: ("read", BLOB_OPERATIONS["read"]),
}


def _table_cases() -> list[Any]:
    """A case per entry of the plugin's tables: (make, operation, the table's check)."""
    from sanitizer.plugins import sqlite3 as plugin

    cases: list[tuple[str, type | None, str, Any, Any, Check]] = []
    for name, check in plugin.CONNECTION_CHECKS.items():
        cases.append(("Connection", sqlite3.Connection, name, _connection,
                      CONNECTION_OPERATIONS[name], check))
    for name, (read, write) in plugin.CONNECTION_ATTRIBUTES.items():
        cases.append(("Connection", sqlite3.Connection, name, _connection,
                      lambda c, n=name: getattr(c, n), read))
        if write is not None:
            cases.append(("Connection", sqlite3.Connection, f"{name} = ...", _connection,
                          lambda c, n=name: setattr(c, n, SETTINGS[n]), write))
    cases.append(("Connection", sqlite3.Connection, "isolation_level = None", _connection,
                  lambda c: setattr(c, "isolation_level", None), plugin.ISOLATION_LEVEL_NONE))
    cases.append(("Connection", sqlite3.Connection, "backup target", _connection,
                  lambda c: sqlite3.Connection(":memory:").backup(c), plugin.BACKUP_TARGET))
    for name, check in plugin.CURSOR_CHECKS.items():
        cases.append(("Cursor", sqlite3.Cursor, name, _cursor, CURSOR_OPERATIONS[name], check))
    for name in plugin.CURSOR_ATTRIBUTES:
        cases.append(("Cursor", sqlite3.Cursor, name, _cursor,
                      lambda k, n=name: getattr(k, n), Check.NONE))
        if name in CURSOR_SETTINGS:
            cases.append(("Cursor", sqlite3.Cursor, f"{name} = ...", _cursor,
                          lambda k, n=name: setattr(k, n, CURSOR_SETTINGS[n]), Check.NONE))
    blob = getattr(sqlite3, "Blob", None)
    for name, check in plugin.BLOB_CHECKS.items():
        cases.append(("Blob", blob, name, _blob, BLOB_OPERATIONS[name], check))
    return [pytest.param(make, operation, check, id=f"{kind}.{name}", marks=pytest.mark.skipif(
        kind_class is None or not hasattr(kind_class, name.split(" ")[0])
        or ((name == "blobopen" or kind == "Blob") and not hasattr(sqlite3.Connection, "blobopen")),
        reason="not in this Python's sqlite3"))
        for kind, kind_class, name, make, operation, check in cases]


def _from_another_thread(operation: Any, target: Any) -> BaseException | None:
    thread, outcome = started(lambda: operation(target), "other")
    thread.join()
    error: BaseException | None = outcome.get("error")
    return error


class TestCheckTable:
    """Each operation is checked as CPython's sqlite3 checks it itself, on this Python."""

    @pytest.mark.parametrize(("make", "operation", "check"), _table_cases())
    def test_agrees_with_cpython(self, sanitized: Sanitized, make: Any, operation: Any,
                                 check: Check) -> None:
        # Plain sqlite3 (the stock class: never tracked), from another thread.
        error = _from_another_thread(operation, make(sqlite3.Connection))
        if isinstance(error, AttributeError | sqlite3.NotSupportedError):
            pytest.skip(f"not in this build of sqlite3: {error}")
        refuses = isinstance(error, sqlite3.ProgrammingError) and "same thread" in str(error)
        assert refuses == (check in (Check.POLICY, Check.RELEASE)), error
        # Tracked, with an idle owner: the sanitizer reports exactly where CPython refuses.
        tracked = make(sqlite3.connect)
        assert record_of(getattr(tracked, "connection", tracked)) is not None
        _from_another_thread(operation, tracked)
        policies = {r["policy"] for r in sanitized.records()}
        assert policies == ({"strict"} if refuses else set())
        if not refuses:  # the control: what CPython refuses on the same object is reported
            name, refused = CONTROLS[make]
            _from_another_thread(refused, tracked)
            assert [(r["policy"], r["operation"]) for r in sanitized.records()] == [
                ("strict", name)]

    @pytest.mark.parametrize("kind", ["Connection", "Cursor", "Blob"])
    def test_every_public_operation_is_in_the_table(self, kind: str) -> None:
        from sanitizer.plugins import sqlite3 as plugin

        cls = getattr(sqlite3, kind, None)
        if cls is None:
            pytest.skip(f"no sqlite3.{kind} on this Python")
        # Public names, without PEP 249's exception attributes (Connection.Error ...).
        names = {n for n in dir(cls)
                 if not n.startswith("_") and not n.endswith(("Error", "Warning"))}
        names |= {n for n in ("__enter__", "__exit__", "__call__", "__iter__", "__next__",
                              "__getitem__", "__setitem__", "__len__") if n in vars(cls)}
        tables = {"Connection": {*plugin.CONNECTION_CHECKS, *plugin.CONNECTION_ATTRIBUTES},
                  "Cursor": {*plugin.CURSOR_CHECKS, *plugin.CURSOR_ATTRIBUTES},
                  "Blob": set(plugin.BLOB_CHECKS)}[kind]
        assert names - tables == set(), "operations the plugin's tables do not know"
