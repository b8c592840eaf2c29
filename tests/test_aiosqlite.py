"""aiosqlite, as its README uses it: a worker thread owns each connection; the loop's thread
reads and sets its options. Silent where plain sqlite3 allows it, caught where it races."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from conftest import Sanitized
from support import found, line_of, run_program

import sanitizer
from sanitizer.ownership import record_of

HERE = str(Path(__file__).resolve())


class Held:
    """A query that the worker thread stays inside until ``release`` is set."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def hold(self) -> int:
        self.entered.set()
        self.release.wait(10)
        return 1


def test_options_and_counters_from_the_loop_are_silent(sanitized: Sanitized) -> None:
    async def main() -> None:
        async with aiosqlite.connect(":memory:") as db:
            assert record_of(db._conn) is not None  # tracked, so that this could fail
            db.row_factory = aiosqlite.Row
            db.text_factory = str
            db.isolation_level = "DEFERRED"
            assert (db.in_transaction, db.total_changes) == (False, 0)
            await db.execute("create table t(x)")
            await db.execute("insert into t values (1)")
            assert db.in_transaction and db.total_changes == 1
            await db.commit()
            async with db.execute("select x from t") as cursor:
                assert [tuple(row) for row in await cursor.fetchall()] == [(1,)]
            assert sanitized.records() == []
            with pytest.raises(sqlite3.ProgrammingError):  # the control: a statement is not
                db._conn.execute("select 1")
    asyncio.run(main())
    assert found() == [("strict", "execute")]  # and closing it in its worker is silent


def test_backup_between_two_workers_is_silent(sanitized: Sanitized) -> None:
    async def main() -> None:
        async with aiosqlite.connect(":memory:") as source, \
                aiosqlite.connect(":memory:") as target:
            await source.execute("create table t(x)")
            await source.execute("insert into t values (7)")
            await source.commit()
            assert record_of(target._conn) is not None
            await source.backup(target)  # in source's worker; target is another worker's
            assert await target.execute_fetchall("select x from t") == [(7,)]
            assert sanitized.records() == []
            with pytest.raises(sqlite3.ProgrammingError):  # the control: the loop's statement
                target._conn.execute("select 1")
    asyncio.run(main())
    assert found() == [("strict", "execute")]


def test_the_loop_using_the_connection_during_a_query_is_caught(sanitized: Sanitized) -> None:
    held = Held()

    async def main() -> None:
        async with aiosqlite.connect(":memory:") as db:
            await db.create_function("hold", 0, held.hold)
            query = asyncio.ensure_future(db.execute_fetchall("select hold()"))
            await asyncio.to_thread(held.entered.wait, 10)  # the worker is inside the query
            try:
                with pytest.raises(sqlite3.ProgrammingError):
                    db._conn.execute("select 1")  # statement on the loop's thread
                db.text_factory = bytes  # changes how the rows under way decode
            finally:
                held.release.set()
            assert await query == [(1,)]
    asyncio.run(main())
    found = [(r["policy"], r["operation"]) for r in sanitized.records()]
    assert found == [("strict", "execute"), ("exclusive", "text_factory")]
    strict, concurrent = sanitized.records()
    assert strict["access_stack"][0]["file"] == HERE
    assert strict["thread"]["name"] == "MainThread"
    assert "_connection_worker_thread" in strict["owner_thread"]["name"]
    assert concurrent["holder_thread"]["name"] == strict["owner_thread"]["name"]


class TestScopedSuppressions:
    """A rule about aiosqlite's own uses must not hide a race in the user's code."""

    def race(self, enable: Any, tmp_path: Path, rule: str) -> list[dict[str, Any]]:
        rules = tmp_path / "rules.txt"
        rules.write_text(rule + "\n")
        run = enable(suppressions=str(rules))
        held = Held()

        async def main() -> None:
            async with aiosqlite.connect(":memory:") as db:
                assert record_of(db._conn) is not None
                await db.create_function("hold", 0, held.hold)
                query = asyncio.ensure_future(db.execute_fetchall("select hold()"))
                await asyncio.to_thread(held.entered.wait, 10)
                try:
                    with pytest.raises(sqlite3.ProgrammingError):
                        db._conn.execute("select 1")  # the genuine race
                finally:
                    held.release.set()
                await query
        asyncio.run(main())
        records: list[dict[str, Any]] = run.records()
        return records

    def test_access_site_rule_keeps_the_race(self, enable: Any, tmp_path: Path) -> None:
        records = self.race(enable, tmp_path, "access-site:*/aiosqlite/core.py")
        assert [(r["policy"], r["operation"]) for r in records] == [("strict", "execute")]
        unused = "\n".join(sanitizer_running().reporter.exit_summary())
        assert "access-site:*/aiosqlite/core.py" in unused  # it never matched

    def test_creation_site_rule_hides_it(self, enable: Any, tmp_path: Path) -> None:
        # Every aiosqlite connection is created in aiosqlite/core.py.
        assert self.race(enable, tmp_path, "creation-site:*/aiosqlite/core.py") == []
        assert unused_rules() == ""  # it hid the race, which did happen

    def test_unscoped_site_rule_matches_either_stack(self, enable: Any, tmp_path: Path) -> None:
        assert self.race(enable, tmp_path, "site:*/aiosqlite/core.py") == []
        assert unused_rules() == ""

    def test_access_function_rule(self, enable: Any, tmp_path: Path) -> None:
        name = "TestScopedSuppressions.race.<locals>.main"
        assert self.race(enable, tmp_path, f"access-function:{name}") == []
        assert unused_rules() == ""
        sanitizer.disable()
        records = self.race(enable, tmp_path, f"creation-function:{name}")
        assert records != []
        assert [(r["policy"], r["operation"]) for r in records] == [("strict", "execute")]


def test_scoped_rule_in_a_program_under_sanitize_threads(tmp_path: Path) -> None:
    (tmp_path / "rules.txt").write_text("access-site:*/aiosqlite/core.py\n")
    source = """
        import asyncio, sqlite3, threading
        import aiosqlite
        entered, release = threading.Event(), threading.Event()
        def hold():
            entered.set(); release.wait(10); return 1
        async def main():
            async with aiosqlite.connect(":memory:") as db:
                db.row_factory = aiosqlite.Row  # aiosqlite's own: silent
                await db.create_function("hold", 0, hold)
                query = asyncio.ensure_future(db.execute_fetchall("select hold()"))
                await asyncio.to_thread(entered.wait, 10)
                try:
                    db._conn.execute("select 1")  # the race
                except sqlite3.ProgrammingError:
                    pass
                release.set()
                await query
        asyncio.run(main())
    """
    proc, records = run_program(tmp_path, source, "suppressions=rules.txt")
    assert proc.returncode == 0, proc.stderr
    assert [(r["policy"], r["operation"]) for r in records] == [("strict", "execute")]
    assert records[0]["access_stack"][0]["line"] == line_of(source, "the race")
    assert "suppressions that never matched" in proc.stderr
    assert "access-site:*/aiosqlite/core.py" in proc.stderr


def sanitizer_running() -> Any:
    from sanitizer import control
    return control.running()


def unused_rules() -> str:
    """The exit summary's list of suppressions that never matched, if any."""
    summary = "\n".join(sanitizer_running().reporter.exit_summary())
    return summary.partition("suppressions that never matched:")[2]


def test_one_connection_across_several_event_loops_is_silent(sanitized: Sanitized) -> None:
    # aiosqlite keeps no loop: each call resolves the future of the loop awaiting it.
    async def open_() -> aiosqlite.Connection:
        db = await aiosqlite.connect(":memory:")
        await db.execute("create table t(x)")
        return db

    async def use(db: aiosqlite.Connection, value: int) -> list[Any]:
        await db.execute("insert into t values (?)", (value,))
        async with db.execute("select x from t order by x") as cursor:
            return [row[0] for row in await cursor.fetchall()]

    db = asyncio.run(open_())
    assert record_of(db._conn) is not None  # the sqlite3 connection its thread owns
    assert asyncio.run(use(db, 1)) == [1]
    assert asyncio.run(use(db, 2)) == [1, 2]

    def in_own_loop(value: int) -> list[Any]:
        return asyncio.run(use(db, value))

    # From threads that each run their own loop, one after another (a handoff).
    for value in (3, 4):
        outcome: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda v=value, out=outcome: out.update(rows=in_own_loop(v)))
        thread.start()
        thread.join(10)
        assert outcome["rows"][-1] == value
    asyncio.run(db.close())
    assert sanitized.records() == []
