"""The sqlite3 plugin: transparency of tracked connections, and what it reports."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from support import in_thread

import sanitizer


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
                                            "commit", "close", "__enter__")),
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
        in_thread(lambda: shared.execute("select 1"))  # a handoff: exclusive allows it
        with pytest.raises(sqlite3.ProgrammingError):
            in_thread(lambda: mine.execute("select 1"))
        assert sanitized.policies() == ["strict"]

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

    def test_cursor_shares_its_connections_record(self, sanitized: Sanitized) -> None:
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
        in_thread(conn.interrupt)
        assert sanitized.records() == []

    def test_per_thread_connections_are_silent(self, sanitized: Sanitized,
                                               tmp_path: Path) -> None:
        path = tmp_path / "db.sqlite"
        sqlite3.connect(path).execute("create table t(x)").connection.commit()
        barrier = threading.Barrier(4)

        def work() -> None:
            conn = sqlite3.connect(path, timeout=30)
            barrier.wait(10)
            conn.execute("select count(*) from t").fetchall()
            conn.close()
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sanitized.records() == []

    def test_attribute_access_is_checked(self, sanitized: Sanitized) -> None:
        conn = sqlite3.connect(":memory:")

        def set_factory() -> None:
            conn.row_factory = sqlite3.Row
        in_thread(set_factory)
        assert [r["operation"] for r in sanitized.records()] == ["row_factory"]

    def test_backup_checks_the_target_too(self, sanitized: Sanitized) -> None:
        source = sqlite3.connect(":memory:", check_same_thread=False)
        holder: dict[str, sqlite3.Connection] = {}
        in_thread(lambda: holder.setdefault("t", sqlite3.connect(":memory:")), name="maker")
        source.backup(holder["t"])  # sqlite3 does not check the target's thread; we do
        [record] = sanitized.records()
        assert record["operation"] == "backup" and record["owner_thread"]["name"] == "maker"

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
        in_thread(box.clear)  # the last reference dies in another thread
        assert sanitized.records() == []
