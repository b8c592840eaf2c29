"""The duckdb plugin: connections, their cursors, relations and appenders, and the default
connection, on real databases (in memory and in files) from real threads.

Two threads meet deterministically: a "holder" thread runs a query calling a Python UDF
that waits on an Event, so it is inside a call on the connection until released.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from support import in_thread, line_of_file, run_program, started

import sanitizer
from sanitizer.plugin import Check, record_of

duckdb = pytest.importorskip("duckdb")
_duckdb = pytest.importorskip("_duckdb")  # its connect() is not patched: untracked connections
pandas = pytest.importorskip("pandas")
if "_con" not in getattr(duckdb.DuckDBPyRelation, "__slots__", ()):
    pytest.skip("the duckdb plugin tracks DuckDB 2 (relations in Python)", allow_module_level=True)

TIMEOUT = 10
_functions = itertools.count()


def line_of_here(marker: str) -> int:
    """The line of this file that ends with ``marker``."""
    return line_of_file(__file__, marker)


class Busy:
    """A thread named "holder" inside a call on ``con`` for the ``inside()`` block: a query
    whose Python UDF waits. ``run(con, sql)`` is how it runs the query."""

    def __init__(self, con: Any, run: Callable[[Any, str], Any] | None = None) -> None:
        self.con = con
        self.run = run or (lambda c, sql: c.execute(sql).fetchall())
        self.entered, self.release = threading.Event(), threading.Event()
        self.function = f"hold_{next(_functions)}"
        self.outcome: dict[str, Any] = {}
        con.create_function(self.function, self.hold, ["BIGINT"], "BIGINT")

    def hold(self, x: int) -> int:
        self.entered.set()
        self.release.wait(TIMEOUT)
        return x

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        thread, self.outcome = started(
            lambda: self.run(self.con, f"select {self.function}(1)"), "holder")
        assert self.entered.wait(TIMEOUT), self.outcome
        try:
            yield
        finally:
            self.release.set()
            thread.join(TIMEOUT)
            assert not thread.is_alive()
            with contextlib.suppress(duckdb.Error):
                self.con.remove_function(self.function)


def table_connection(connect: Callable[..., Any] | None = None, *args: Any) -> Any:
    """A connection (from duckdb.connect as it is now, by default) with a table t."""
    con = (connect or duckdb.connect)(*args)
    con.execute("create table t(x bigint, y varchar)")
    con.execute("insert into t values (1, 'a'), (2, 'b')")
    return con


def refused(error: BaseException | None) -> bool:
    """Whether DuckDB refused a call because another thread was inside one."""
    return isinstance(error, duckdb.ResourceInUseException) and "busy" in str(error)


@pytest.fixture
def fresh_default() -> Iterator[Any]:
    """A new (untracked) default connection for the test; the previous one afterwards."""
    previous = _duckdb.default_connection()
    fresh = _duckdb.connect()
    _duckdb.set_default_connection(fresh)
    try:
        yield fresh
    finally:
        _duckdb.set_default_connection(previous)


class TestTransparency:
    def test_a_tracked_connection_is_itself_to_duckdb(self, sanitized: Sanitized) -> None:
        con = table_connection()
        assert record_of(con) is not None
        assert isinstance(con, duckdb.DuckDBPyConnection)
        assert type(con) is not duckdb.DuckDBPyConnection
        assert (type(con).__name__, type(con).__module__) == ("DuckDBPyConnection", "_duckdb")
        assert con.execute("select 42").fetchall() == [(42,)]
        assert con.execute("select 1") is con and con.fetchall() == [(1,)]
        # C++ type-checks these connection= arguments: the object passes as itself.
        frame = pandas.DataFrame({"a": [1, 2]})
        assert duckdb.from_df(frame, connection=con).fetchall() == [(1,), (2,)]
        assert duckdb.execute("select 7", connection=con).fetchall() == [(7,)]
        left, right = con.table("t"), con.sql("select 1 as x, 'z' as w")
        assert left.join(right, "x").fetchall() == [(1, "a", "z")]
        con.register("frame", frame)
        assert con.sql("select sum(a) from frame").fetchall() == [(3,)]
        with con.cursor() as cursor:
            assert record_of(cursor) is not None
            assert cursor.sql("select count(*) from t").fetchall() == [(2,)]
        assert sanitized.records() == []

    def test_relations_appenders_and_iter_rows_work(self, sanitized: Sanitized) -> None:
        con = table_connection()
        rel = con.table("t").filter("x > 1")
        assert record_of(rel) is record_of(con) is not None
        assert rel.columns == ["x", "y"] and "x" in rel and len(rel) == 1
        assert rel.fetchall() == [(2, "b")] and rel.df()["y"].tolist() == ["b"]
        assert list(con.table("t").order("x").iter_rows(batch_size=1)) == [(1, "a"), (2, "b")]
        assert con.table("t").group_by("y").agg("count(*)").order("y").fetchall() == [
            ("a", 1), ("b", 1)]
        with con.appender("t") as appender:
            assert record_of(appender) is record_of(con)
            appender.append_row(3, "c")
        assert con.execute("select count(*) from t").fetchall() == [(3,)]
        assert sanitized.records() == []

    def test_file_databases_and_the_database_they_report(self, sanitized: Sanitized,
                                                         tmp_path: Path) -> None:
        path = tmp_path / "shop.duckdb"
        con = duckdb.connect(path)
        con.execute("create table t as select 1 as x")
        con.close()
        with duckdb.connect(str(path), read_only=True) as again:
            assert again.execute("select x from t").fetchall() == [(1,)]
            record = record_of(again)
            assert record is not None and record.resource == {"database": str(path)}
        # A URI's query string may carry credentials: never in the record.
        con = duckdb.connect(f"{path}?access_mode=read_only")
        assert record_of(con).resource == {"database": str(path)}  # type: ignore[union-attr]
        assert record_of(duckdb.connect()).resource == {  # type: ignore[union-attr]
            "database": ":memory:"}

    def test_duckdb_warnings_name_the_users_line(self, sanitized: Sanitized) -> None:
        # DuckDB warns at the first frame outside its own module: not at the guard.
        con = table_connection()
        with pytest.warns(UserWarning, match="also a column name") as caught:
            con.table("t").filter(duckdb.col("x") == "y")  # warns here
        assert (caught[0].filename, caught[0].lineno) == (__file__, line_of_here("# warns here"))

    def test_checked_methods_keep_their_names_and_docstrings(self, sanitized: Sanitized) -> None:
        con = duckdb.connect()
        stock = duckdb.DuckDBPyConnection
        for name in ("execute", "fetchall", "sql", "cursor", "close", "commit"):
            method = getattr(type(con), name)
            assert method is not getattr(stock, name), name
            assert method.__name__ == name and method.__doc__ == getattr(stock, name).__doc__

    def test_library_errors_are_unchanged(self, sanitized: Sanitized) -> None:
        con = duckdb.connect()
        with pytest.raises(duckdb.BinderException, match="nope"):
            con.execute("select nope")
        with pytest.raises(TypeError):
            con.execute()
        con.close()
        with pytest.raises(duckdb.ConnectionException, match="closed"):
            con.execute("select 1")
        assert sanitized.records() == []

    def test_disable_restores_duckdb(self, enable: Any) -> None:
        if sanitizer.is_enabled():
            sanitizer.disable()
        module = dict(vars(duckdb))
        classes = {cls: dict(vars(cls)) for cls in (
            duckdb.DuckDBPyConnection, duckdb.DuckDBPyRelation, duckdb.Appender,
            duckdb._relation.GroupedRelation)}
        enable()
        assert duckdb.sql is not module["sql"] and duckdb.connect is not module["connect"]
        assert vars(duckdb.DuckDBPyRelation)["fetchall"] is not classes[
            duckdb.DuckDBPyRelation]["fetchall"]
        assert type(duckdb.connect()) is not duckdb.DuckDBPyConnection
        sanitizer.disable()
        assert {k: v for k, v in vars(duckdb).items() if k in module} == module
        for cls, namespace in classes.items():
            assert dict(vars(cls)) == namespace, cls
        assert type(duckdb.connect()) is duckdb.DuckDBPyConnection

    def test_duckdb_1_is_not_tracked_and_says_so(self, capsys: pytest.CaptureFixture[str]
                                                 ) -> None:
        from sanitizer.plugins import duckdb as plugin

        old = types.ModuleType("duckdb")
        old.__version__ = "1.5.6"  # type: ignore[attr-defined]
        old.DuckDBPyRelation = type("DuckDBPyRelation", (), {})  # type: ignore[attr-defined]
        plugin.install(old, None)  # type: ignore[arg-type] # returns before using a context
        assert "duckdb 1.5.6 is not tracked" in capsys.readouterr().err

    def test_tracked_only_once_imported_and_never_imported_by_the_plugin(
            self, tmp_path: Path) -> None:
        source = """
            import sys
            import sanitizer
            sanitizer.enable()
            assert "duckdb" not in sys.modules, "imported by the sanitizer"
            import duckdb
            con = duckdb.connect()
            print(type(con) is not duckdb.DuckDBPyConnection)
        """
        proc, records = run_program(tmp_path, source, None)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["True"] and records == []


class TestReports:
    def test_two_threads_inside_one_connection_with_both_stacks(self, enable: Any,
                                                                 tmp_path: Path) -> None:
        # raise: the second call never reaches DuckDB.
        run = enable(action="log+raise")
        path = tmp_path / "orders.duckdb"
        con = duckdb.connect(str(path))
        busy = Busy(con)
        with busy.inside(), pytest.raises(sanitizer.ThreadAffinityError):
            con.execute("select 'secret'")  # second thread
        assert busy.outcome == {"value": [(1,)]}  # the holder's query was not disturbed
        [record] = run.records()
        assert (record["policy"], record["operation"]) == ("exclusive", "execute")
        assert record["object_type"] == "duckdb.DuckDBPyConnection"
        assert record["access_stack"][0]["line"] == line_of_here("# second thread")
        assert record["holder_thread"]["name"] == "holder"
        assert any(f["function"] == "Busy.hold" for f in record["holder_stack"])
        assert "while thread T" in record["message"]
        assert "'holder' is inside a call" in record["message"]
        assert record["resource"] == {"database": str(path)}
        assert "args" not in record and "secret" not in run.log.read_text()

    def test_include_args_logs_the_query(self, enable: Any) -> None:
        run = enable(action="log+raise", include_args=True)
        con = duckdb.connect()
        with Busy(con).inside(), pytest.raises(sanitizer.ThreadAffinityError):
            con.execute("select 'visible'")
        [record] = run.records()
        assert "visible" in record["args"]["query"]

    def test_a_call_while_a_relation_of_the_connection_runs(self, enable: Any) -> None:
        run = enable(action="log+raise")
        con = table_connection()
        with Busy(con, lambda c, sql: c.sql(sql).fetchall()).inside(), \
                pytest.raises(sanitizer.ThreadAffinityError):
            con.sql("select 1")
        [record] = run.records()
        assert (record["operation"], record["holder_thread"]["name"]) == ("sql", "holder")

    def test_relations_grouped_relations_appenders_and_row_iterators_are_checked(
            self, enable: Any) -> None:
        run = enable(action="log+raise")
        con = table_connection()
        rel = con.table("t").filter("x > 0")
        grouped = con.table("t").group_by("y")
        appender = con.appender("t")
        rows = rel.iter_rows()  # runs nothing until the first batch
        with Busy(con).inside():
            for use in (rel.fetchall, lambda: rel.project("x"), lambda: grouped.agg("count(*)"),
                        appender.flush, lambda: next(rows)):
                with pytest.raises(sanitizer.ThreadAffinityError):
                    use()
            appender.append_row(3, "c")  # buffering is the appender's own
            assert rel.alias and rel.sql_query()  # the relation's own state
        records = run.records()
        assert [r["operation"] for r in records] == [
            "fetchall", "project", "agg", "flush", "iter_rows"]
        assert {r["object_type"] for r in records} == {
            "duckdb.DuckDBPyRelation", "duckdb._relation.GroupedRelation",
            "duckdb.Appender"}
        assert {r["root_type"] for r in records} == {"duckdb.DuckDBPyConnection"}

    def test_module_level_functions_race_on_the_default_connection(
            self, enable: Any, fresh_default: Any) -> None:
        # duckdb/duckdb#13498: duckdb.sql() from two threads at once.
        run = enable(action="log+raise")
        con = duckdb.default_connection()
        assert con is fresh_default
        record = record_of(con)
        assert record is not None and record.name == "default_connection"
        busy = Busy(con, lambda _con, sql: duckdb.sql(sql).fetchall())
        with busy.inside():
            for use in (lambda: duckdb.execute("select 1"), lambda: duckdb.sql("select 1"),
                        lambda: duckdb.from_df(pandas.DataFrame({"a": [1]}))):
                with pytest.raises(sanitizer.ThreadAffinityError):
                    use()
        records = run.records()
        assert [r["operation"] for r in records] == ["execute", "sql", "from_df"]
        assert {r["object_name"] for r in records} == {"default_connection"}
        assert {tuple(r["resource"].items()) for r in records} == {(("database", ":memory:"),)}

    def test_the_first_use_of_the_default_connection_tracks_it(
            self, sanitized: Sanitized, fresh_default: Any) -> None:
        assert record_of(fresh_default) is None
        assert duckdb.sql("select 1").fetchall() == [(1,)]
        assert record_of(fresh_default) is not None
        assert record_of(duckdb.sql("select 1")) is record_of(fresh_default)

    def test_interrupt_and_query_progress_are_for_other_threads(
            self, sanitized: Sanitized) -> None:
        con = duckdb.connect()
        busy = Busy(con)
        with busy.inside():
            assert isinstance(con.query_progress(), float)
            con.interrupt()
        assert isinstance(busy.outcome.get("error"), duckdb.InterruptException)
        assert sanitized.records() == []
        assert record_of(con) is not None
        with Busy(con).inside(), pytest.raises(duckdb.ResourceInUseException):
            con.execute("select 1")  # positive control
        assert [r["operation"] for r in sanitized.records()] == ["execute"]


class TestSilence:
    """Correct patterns stay silent; each test then makes one real misuse, reported."""

    @staticmethod
    def misuse(con: Any, sanitized: Sanitized) -> None:
        assert record_of(con) is not None
        with Busy(con).inside(), pytest.raises(duckdb.ResourceInUseException):
            con.execute("select 1")  # log only: DuckDB refuses it itself afterwards
        assert [r["policy"] for r in sanitized.records()] == ["exclusive"]

    def test_a_sequential_handoff(self, sanitized: Sanitized, tmp_path: Path) -> None:
        con = duckdb.connect(tmp_path / "db.duckdb")
        con.execute("create table t(x bigint)")
        in_thread(lambda: con.execute("insert into t values (1)"), "worker")
        con.execute("insert into t values (2)")
        rel = con.table("t")
        assert in_thread(lambda: rel.order("x").fetchall(), "worker") == [(1,), (2,)]
        assert in_thread(lambda: con.sql("select count(*) from t").fetchall()) == [(2,)]
        assert sanitized.records() == []
        self.misuse(con, sanitized)

    @pytest.mark.parametrize("made_by", ["main thread", "workers"])
    def test_a_cursor_per_thread(self, sanitized: Sanitized, tmp_path: Path,
                                 made_by: str) -> None:
        con = table_connection(duckdb.connect, str(tmp_path / "db.duckdb"))
        workers = 3
        meet = threading.Barrier(workers, timeout=TIMEOUT)

        def meeting(x: int) -> int:  # all workers are inside their queries at once
            meet.wait()
            return x
        con.create_function("meet", meeting, ["BIGINT"], "BIGINT")
        cursors = [con.cursor() for _ in range(workers)] if made_by == "main thread" else []

        def work(index: int) -> Any:
            cursor = cursors[index] if cursors else con.cursor()
            return record_of(cursor), cursor.execute("select meet(count(*)) from t").fetchall()

        busy = Busy(con)
        with busy.inside():  # cursor() is free while another thread is inside con
            runs = [started(lambda i=i: work(i), f"worker-{i}") for i in range(workers)]
            for thread, _ in runs:
                thread.join(TIMEOUT)
        outcomes = [outcome for _, outcome in runs]
        assert all(outcome.get("value", (None, None))[1] == [(2,)] for outcome in outcomes), \
            outcomes
        records = [outcome["value"][0] for outcome in outcomes]
        assert None not in records and record_of(con) not in records
        assert len({id(r) for r in records}) == workers  # a connection, and a record, each
        owners = {r.owner.current_name() for r in records}
        assert owners == ({"MainThread"} if cursors else {f"worker-{i}" for i in range(workers)})
        assert records[0].resource == {"database": str(tmp_path / "db.duckdb")}
        assert sanitized.records() == []
        self.misuse(cursors[0] if cursors else con.cursor(), sanitized)

    def test_a_cursor_per_thread_of_the_default_connection(
            self, sanitized: Sanitized, fresh_default: Any) -> None:
        meet = threading.Barrier(2, timeout=TIMEOUT)
        duckdb.create_function("meet_default", lambda x: (meet.wait(), x)[1], ["BIGINT"],
                               "BIGINT")

        def work() -> Any:
            return duckdb.cursor().sql("select meet_default(1)").fetchall()
        runs = [started(work, f"worker-{i}") for i in range(2)]
        for thread, _ in runs:
            thread.join(TIMEOUT)
        assert [outcome for _, outcome in runs] == [{"value": [(1,)]}] * 2
        duckdb.remove_function("meet_default")
        assert sanitized.records() == []
        self.misuse(fresh_default, sanitized)

    def test_gc_finalization_on_another_thread(self, sanitized: Sanitized) -> None:
        con = duckdb.connect()

        class Owner:
            def __del__(self) -> None:
                with contextlib.suppress(duckdb.ResourceInUseException):
                    con.close()  # a use, but during finalization

        box = [Owner()]
        with Busy(con).inside():  # the finalizer runs while the holder is inside
            in_thread(box.clear, "finalizer")
        assert sanitized.records() == []
        self.misuse(con, sanitized)


# -- the check tables agree with DuckDB ------------------------------------------------------


class Stream:
    """An Arrow stream (what from_arrow reads) over a relation of another database."""

    def __init__(self) -> None:
        self.relation = _duckdb.connect().sql("select 1 as a")

    def __arrow_c_stream__(self, requested_schema: object = None) -> Any:
        return self.relation.__arrow_c_stream__(requested_schema)


class FileSystem:
    protocol = "sanitizer-test"


FSSPEC = types.ModuleType("fsspec")
FSSPEC.AbstractFileSystem = FileSystem  # type: ignore[attr-defined]


def _int() -> Any:
    return duckdb.sqltypes.INTEGER


# How to perform each operation of the plugin's tables on a connection (with table t) that
# another thread is inside. Every name in the tables needs one.
CONNECTION_OPERATIONS: dict[str, Callable[[Any], Any]] = {
    "execute": lambda c: c.execute("select 1"),
    "executemany": lambda c: c.executemany("insert into t values (?, ?)", [(3, "c")]),
    "fetchone": lambda c: c.fetchone(), "fetchall": lambda c: c.fetchall(),
    "fetchmany": lambda c: c.fetchmany(), "fetchnumpy": lambda c: c.fetchnumpy(),
    "fetchdf": lambda c: c.fetchdf(), "fetch_df": lambda c: c.fetch_df(), "df": lambda c: c.df(),
    "fetch_df_chunk": lambda c: c.fetch_df_chunk(), "tf": lambda c: c.tf(),
    "torch": lambda c: c.torch(), "complete": lambda c: c.complete(),
    "abort": lambda c: c.abort(), "begin": lambda c: c.begin(), "commit": lambda c: c.commit(),
    "rollback": lambda c: c.rollback(), "checkpoint": lambda c: c.checkpoint(),
    "close": lambda c: c.close(), "__enter__": lambda c: c.__enter__(),
    "__exit__": lambda c: c.__exit__(None, None, None),
    "cursor": lambda c: c.cursor(), "duplicate": lambda c: c.duplicate(),
    "interrupt": lambda c: c.interrupt(), "query_progress": lambda c: c.query_progress(),
    "sql": lambda c: c.sql("select 1"), "query": lambda c: c.query("select 1"),
    "from_query": lambda c: c.from_query("select 1"), "table": lambda c: c.table("t"),
    "view": lambda c: c.view("t"), "values": lambda c: c.values(1, 2),
    "table_function": lambda c: c.table_function("range", [3]),
    "read_csv": lambda c: c.read_csv("/nonexistent.csv"),
    "from_csv_auto": lambda c: c.from_csv_auto("/nonexistent.csv"),
    "read_json": lambda c: c.read_json("/nonexistent.json"),
    "read_parquet": lambda c: c.read_parquet("/nonexistent.parquet"),
    "from_parquet": lambda c: c.from_parquet("/nonexistent.parquet"),
    "from_df": lambda c: c.from_df(pandas.DataFrame({"a": [1]})),
    "from_arrow": lambda c: c.from_arrow(Stream()),
    "to_arrow_table": lambda c: c.to_arrow_table(),
    "to_arrow_reader": lambda c: c.to_arrow_reader(),
    "register": lambda c: c.register("v", pandas.DataFrame({"a": [1]})),
    "unregister": lambda c: c.unregister("v"),
    "append": lambda c: c.append("t", pandas.DataFrame({"x": [5], "y": ["e"]})),
    "appender": lambda c: c.appender("t"),
    "query_appender": lambda c: c.query_appender("insert into t select * from src",
                                                 {"x": "BIGINT", "y": "VARCHAR"}, source="src"),
    "create_function": lambda c: c.create_function("f1", lambda: 1, [], "BIGINT"),
    "remove_function": lambda c: c.remove_function("kept"),
    "install_extension": lambda c: c.install_extension("/nonexistent/extension"),
    "load_extension": lambda c: c.load_extension("/nonexistent/extension"),
    "enable_profiling": lambda c: c.enable_profiling(),
    "disable_profiling": lambda c: c.disable_profiling(),
    "get_profiling_information": lambda c: c.get_profiling_information(),
    "extract_statements": lambda c: c.extract_statements("select 1"),
    "get_table_names": lambda c: c.get_table_names("select * from t"),
    "description": lambda c: c.description, "rowcount": lambda c: c.rowcount,
    "sqltype": lambda c: c.sqltype("INT"), "dtype": lambda c: c.dtype("INT"),
    "type": lambda c: c.type("INT"), "array_type": lambda c: c.array_type(_int(), 2),
    "list_type": lambda c: c.list_type(_int()),
    "map_type": lambda c: c.map_type(_int(), duckdb.sqltypes.VARCHAR),
    "struct_type": lambda c: c.struct_type({"a": _int()}),
    "row_type": lambda c: c.row_type({"a": _int()}),
    "union_type": lambda c: c.union_type({"a": _int()}),
    "enum_type": lambda c: c.enum_type("e", duckdb.sqltypes.VARCHAR, ["a"]),
    "decimal_type": lambda c: c.decimal_type(3, 2), "string_type": lambda c: c.string_type(),
    "register_filesystem": lambda c: c.register_filesystem(FileSystem()),
    "unregister_filesystem": lambda c: c.unregister_filesystem("nope"),
    "list_filesystems": lambda c: c.list_filesystems(),
    "filesystem_is_registered": lambda c: c.filesystem_is_registered("x"),
}
# On a relation over table t whose schema a later statement made stale (so that reads of
# it bind again); the exceptions of the plugin's table, and a sample of the rest.
RELATION_OPERATIONS: dict[str, Callable[[Any], Any]] = {
    "alias": lambda r: r.alias, "sql_query": lambda r: r.sql_query(), "close": lambda r: r.close(),
    "group_by": lambda r: r.group_by("x"), "columns": lambda r: r.columns,
    "types": lambda r: r.types, "dtypes": lambda r: r.dtypes,
    "description": lambda r: r.description, "type": lambda r: r.type, "shape": lambda r: r.shape,
    "__contains__": lambda r: "x" in r, "__len__": lambda r: len(r),
    "__getitem__": lambda r: r["x"], "__getattr__": lambda r: r.x, "__str__": lambda r: str(r),
    "__repr__": lambda r: repr(r), "_repr_mimebundle_": lambda r: r._repr_mimebundle_(),
    "__arrow_c_stream__": lambda r: r.__arrow_c_stream__(),
    "fetchall": lambda r: r.fetchall(), "df": lambda r: r.df(), "to_df": lambda r: r.to_df(),
    "fetchnumpy": lambda r: r.fetchnumpy(), "to_dicts": lambda r: r.to_dicts(),
    "iter_rows": lambda r: next(r.iter_rows()), "preview": lambda r: r.preview(),
    "explain": lambda r: r.explain(), "materialize": lambda r: r.materialize(),
    "filter": lambda r: r.filter("x > 1"), "project": lambda r: r.project("x"),
    "limit": lambda r: r.limit(1), "set_alias": lambda r: r.set_alias("q"),
    "order": lambda r: r.order("x"), "aggregate": lambda r: r.aggregate("sum(x)"),
    "join": lambda r: r.join(r.set_alias("b"), "x"), "union": lambda r: r.union(r),
    "describe": lambda r: r.describe(), "create": lambda r: r.create("t2"),
    "insert_into": lambda r: r.insert_into("t"), "insert": lambda r: r.insert((9, "z")),
    "update": lambda r: r.update({"x": 3}), "create_view": lambda r: r.create_view("v2"),
    "query": lambda r: r.query("rel", "select * from rel"),
    "map": lambda r: r.map(lambda frame: frame),
}
APPENDER_OPERATIONS: dict[str, Callable[[Any], Any]] = {
    "append_row": lambda a: a.append_row(7, "q"), "append_rows": lambda a: a.append_rows([]),
    "clear": lambda a: a.clear(), "flush": lambda a: a.flush(),
    "__enter__": lambda a: a.__enter__(), "__exit__": lambda a: a.__exit__(None, None, None),
}


Made = tuple[Any, Any]  # (the connection another thread will be inside, the target)


def _connection(connect: Callable[[], Any]) -> Made:
    con = table_connection(connect)
    return con, con


def _relation(connect: Callable[[], Any]) -> Made:
    con = table_connection(connect)
    relation = con.table("t")
    con.execute("create table stale(z bigint)")  # the relation's schema predates this
    return con, relation


def _appender(connect: Callable[[], Any]) -> Made:
    con = table_connection(connect)
    appender = con.appender("t")
    appender.append_row(1, "x")
    return con, appender


def _while_inside(con: Any, operation: Callable[[Any], Any], target: Any
                  ) -> BaseException | None:
    """``operation(target)`` from another thread while the holder is inside a call on con."""
    with Busy(con).inside():
        thread, outcome = started(lambda: operation(target), "other")
        thread.join(TIMEOUT)
    error: BaseException | None = outcome.get("error")
    return error


def _cases() -> list[Any]:
    """A case per operation: (make the connection and target, the operation, its check)."""
    from sanitizer.plugins import duckdb as plugin

    cases: list[tuple[str, Callable[..., Made], Callable[[Any], Any], Check]] = []
    for name, check in {**plugin.CONNECTION_CHECKS, **plugin.CONNECTION_ATTRIBUTES}.items():
        cases.append((f"Connection.{name}", _connection, CONNECTION_OPERATIONS[name], check))
    for name, operation in RELATION_OPERATIONS.items():
        cases.append((f"Relation.{name}", _relation, operation,
                      plugin.RELATION_CHECKS.get(name, Check.POLICY)))
    for name, check in plugin.APPENDER_CHECKS.items():
        cases.append((f"Appender.{name}", _appender, APPENDER_OPERATIONS[name], check))
    return [pytest.param(make, operation, check, id=case)
            for case, make, operation, check in cases]


def _with_a_function(factory: Callable[[], Any]) -> Callable[[], Any]:
    """Connections with a UDF that remove_function() can remove."""
    def connect() -> Any:
        con = factory()
        con.create_function("kept", lambda: 1, [], "BIGINT")
        return con
    return connect


def _checked(member: Any) -> bool:
    """Whether a class attribute is one of the sanitizer's guards (or a property's getter is)."""
    if isinstance(member, property):
        member = member.fget
    return getattr(member, "__sanitizer_policy__", None) is not None


class TestCheckTable:
    """Each operation is checked exactly where DuckDB refuses it while another thread is
    inside a call on the connection ("busy with another call")."""

    @pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning")
    @pytest.mark.parametrize(("make", "operation", "check"), _cases())
    def test_agrees_with_duckdb(self, sanitized: Sanitized, monkeypatch: pytest.MonkeyPatch,
                                make: Any, operation: Any, check: Check) -> None:
        # register_filesystem() wants an fsspec.AbstractFileSystem: this one.
        monkeypatch.setitem(sys.modules, "fsspec", FSSPEC)
        # Plain DuckDB (a connection from the C module: never tracked).
        con, target = make(_with_a_function(_duckdb.connect))
        error = _while_inside(con, operation, target)
        if isinstance(error, duckdb.NotImplementedException | ImportError):
            pytest.skip(f"not in this build of duckdb: {error}")
        assert refused(error) == (check is Check.POLICY), error
        # Tracked: the sanitizer reports exactly where DuckDB refuses.
        con, target = make(_with_a_function(duckdb.connect))
        assert record_of(con) is not None
        _while_inside(con, operation, target)
        policies = {r["policy"] for r in sanitized.records()}
        assert policies == ({"exclusive"} if check is Check.POLICY else set())

    @pytest.mark.parametrize("kind", ["DuckDBPyConnection", "DuckDBPyRelation", "Appender"])
    def test_every_public_operation_is_in_the_tables(self, sanitized: Sanitized,
                                                     kind: str) -> None:
        from sanitizer.plugins import duckdb as plugin

        cls = getattr(duckdb, kind)
        names = {n for n in vars(cls) if not n.startswith("_")} | (
            {"__enter__", "__exit__"} & set(vars(cls)))
        if kind == "DuckDBPyConnection":
            assert names - {*plugin.CONNECTION_CHECKS, *plugin.CONNECTION_ATTRIBUTES} == set()
            assert set(CONNECTION_OPERATIONS) == {*plugin.CONNECTION_CHECKS,
                                                  *plugin.CONNECTION_ATTRIBUTES}
        elif kind == "Appender":
            assert names == set(plugin.APPENDER_CHECKS) == set(APPENDER_OPERATIONS)
        else:
            # Every public method and property is checked, but the table's exceptions.
            names |= set(plugin.RELATION_DUNDERS)
            unchecked = {name for name in names if not _checked(vars(cls)[name])}
            # iter_rows() is a generator: its first batch is checked, not the call.
            assert unchecked == {n for n, c in plugin.RELATION_CHECKS.items() if c is Check.NONE
                                 } | {"iter_rows"}
            assert set(plugin.RELATION_CHECKS) <= set(RELATION_OPERATIONS)
