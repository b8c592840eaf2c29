"""The asyncpg plugin, against a real PostgreSQL: one task at a time on a connection, on its loop.

Every misuse is shown with both sides; every allowed pattern is silent while its objects are
tracked. Tasks meet at asyncio.Events; a query is kept inside the server, where one is
needed, by an advisory lock that a second connection holds (never a sleep).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from support import found, line_of, line_of_file, pytester_suite, run_program, tracked

import sanitizer

asyncpg = pytest.importorskip("asyncpg")

pytest_plugins = ["pytester"]

HERE = str(Path(__file__).resolve())
LOCK = 4242  # the advisory lock that keeps a holder's query inside the server


@pytest.fixture
def dsn(postgresql_server: Any) -> str:
    return str(postgresql_server.dsn)


def run(coroutine: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(coroutine())


def site(stack: list[dict[str, Any]], path: str = "app.py") -> int:
    """The line of the innermost frame of ``path`` in a JSON stack."""
    return next(frame["line"] for frame in stack if frame["file"].endswith(path))


class Blocker:
    """A second connection holding an advisory lock: a query asking for it waits in the
    server (its task inside the guarded call) until ``release()``."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None

    async def __aenter__(self) -> Blocker:
        self.conn = await asyncpg.connect(self.dsn)
        await self.conn.execute(f"SELECT pg_advisory_lock({LOCK})")
        return self

    async def release(self) -> None:
        await self.conn.execute(f"SELECT pg_advisory_unlock({LOCK})")

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()


WAIT_FOR_LOCK = f"SELECT pg_advisory_lock({LOCK})::text || 'locked'"


# -- allowed: silent, while the objects are tracked ------------------------------------------


class TestAllowed:
    def test_sequential_handoff_between_tasks(self, sanitized: Sanitized, dsn: str) -> None:
        async def main() -> list[int]:
            conn = await asyncpg.connect(dsn)
            tracked(conn)

            async def use(n: int) -> int:
                async with conn.transaction():
                    return int(await conn.fetchval("SELECT $1::int", n))

            first = await asyncio.ensure_future(use(1))  # one task, finished
            second = await asyncio.ensure_future(use(2))  # then another
            third = await use(3)  # and the main task
            await conn.close()
            return [first, second, third]

        assert run(main) == [1, 2, 3]
        assert found() == []

    def test_pool_acquire_and_release_across_many_tasks(self, sanitized: Sanitized,
                                                         dsn: str) -> None:
        async def main() -> list[int]:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
            tracked(pool)

            async def use(n: int) -> int:
                async with pool.acquire() as conn:
                    assert tracked(conn) is tracked(conn._con)  # the proxy's is its Connection's
                    async with conn.transaction():
                        value = await conn.fetchval("SELECT $1::int", n)
                return int(value) + int(await pool.fetchval("SELECT 0"))

            values = await asyncio.gather(*(use(n) for n in range(30)))
            await pool.close()
            return values

        assert run(main) == list(range(30))
        assert found() == []

    def test_release_in_its_shielded_task_rolls_back_a_transaction_left_open(
            self, sanitized: Sanitized, dsn: str) -> None:
        """``async with pool.acquire()`` releases in a ``shield()``-ed task of its own, which
        resets the connection: here it rolls back the transaction the task left open (the
        holder still alive), and the next task gets the connection."""
        messages: list[str] = []

        async def main() -> int:
            asyncio.get_running_loop().set_exception_handler(
                lambda _loop, context: messages.append(context["message"]))
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
            released = asyncio.Event()
            done = asyncio.Event()

            async def leaves_it_open() -> None:
                async with pool.acquire() as conn:
                    await conn.transaction().start()  # never committed
                    await conn.execute("SELECT 1")
                    assert tracked(conn).task is asyncio.current_task()  # held
                released.set()
                await done.wait()  # still alive while the next one uses it

            async def next_one() -> int:
                await released.wait()
                async with pool.acquire() as conn:
                    assert not conn.is_in_transaction()
                    value = int(await conn.fetchval("SELECT 7"))
                done.set()
                return value

            _, value = await asyncio.gather(leaves_it_open(), next_one())
            async with pool.acquire() as conn:  # a plain release, in its shield()-ed task too
                await conn.fetchval("SELECT 1")
            await pool.close()
            return value

        assert run(main) == 7
        assert any("Resetting connection with an active transaction" in m for m in messages)
        assert found() == []

    def test_nested_calls_of_one_task_in_transactions_and_cursors(
            self, sanitized: Sanitized, dsn: str) -> None:
        async def main() -> list[Any]:
            conn = await asyncpg.connect(dsn)
            record = tracked(conn)
            me = asyncio.current_task()
            got: list[Any] = []
            async with conn.transaction():
                got.append(await conn.fetchval("SELECT 1"))
                async with conn.transaction():  # a savepoint
                    await conn.execute("SELECT 2")
                stmt = await conn.prepare("SELECT generate_series(1, $1::int)")
                assert tracked(stmt) is record
                got.append(await stmt.fetchval(3))
                got.append(len([row async for row in stmt.cursor(120, prefetch=50)]))
                cur = await conn.cursor("SELECT generate_series(1, 10)")
                got.append(len(await cur.fetch(3)))
                got.append(await cur.forward(2))
                got.append((await cur.fetchrow())[0])
                assert (record.task, record.depth) == (me, 2)  # the transaction, the cursor
            assert (record.task, record.depth) == (None, 0)  # the cursor went with it
            await conn.close()
            return got

        assert run(main) == [1, 1, 120, 3, 2, 6]
        assert found() == []

    def test_wait_for_runs_the_query_in_an_inner_task_on_310_and_311(
            self, sanitized: Sanitized, dsn: str) -> None:
        async def main() -> list[int]:
            conn = await asyncpg.connect(dsn)
            tracked(conn)
            values = [await asyncio.wait_for(conn.fetchval("SELECT 1"), 30)]
            async with conn.transaction():  # the inner task is the holder's helper
                values.append(await asyncio.wait_for(conn.fetchval("SELECT 2"), 30))
            await conn.close()
            return values

        assert run(main) == [1, 2]
        assert found() == []

    def test_helper_tasks_of_a_transaction_opened_beneath_another_layers_guard(
            self, sanitized: Sanitized, dsn: str) -> None:
        """An ORM's session over the connection, task-guarded as its plugin would guard it,
        opens the transaction: the note of it outlives that guard, so a task the holder
        starts inside the transaction is still its helper."""
        from sanitizer.plugin import TASK, Context, new_record

        class Session:
            def __init__(self, conn: Any) -> None:
                self.conn = conn
                self.transaction: Any = None

            async def begin(self) -> None:
                self.transaction = self.conn.transaction()
                await self.transaction.start()

        guarded = type("Session", (Session,), {"begin": Context.guard(TASK, Session.begin,
                                                                      "begin")})

        async def main() -> int:
            conn = await asyncpg.connect(dsn)
            session = guarded(conn)
            assert Context.attach(session, new_record(session, TASK))
            await session.begin()
            assert tracked(conn).task is asyncio.current_task()  # held past begin()
            value = await asyncio.ensure_future(conn.fetchval("SELECT 5"))  # a helper task
            await session.transaction.rollback()
            await conn.close()
            return int(value)

        assert run(main) == 5
        assert found() == []

    def test_loop_callbacks_with_no_task(self, sanitized: Sanitized, dsn: str) -> None:
        seen: list[Any] = []

        async def main() -> None:
            conn = await asyncpg.connect(dsn)
            tracked(conn)
            loop = asyncio.get_running_loop()
            called = asyncio.Event()

            def on_end(_conn: Any) -> None:
                pass

            def callback() -> None:  # while the task holds the connection's transaction
                seen.append(asyncio.current_task())
                seen.append(conn.is_in_transaction())
                conn.add_termination_listener(on_end)
                conn.remove_termination_listener(on_end)
                seen.append(type(conn.transaction()).__name__)
                called.set()

            async with conn.transaction():
                await conn.fetchval("SELECT 1")
                loop.call_soon(callback)
                await called.wait()
            loop.call_soon(conn.terminate)  # asyncpg's pool does so from call_later
            await asyncio.sleep(0)
            assert conn.is_closed()

        run(main)
        assert seen == [None, True, "Transaction"]
        assert found() == []

    def test_a_fixtures_transaction_used_by_the_test_and_rolled_back_by_its_teardown(
            self, sanitized: Sanitized, dsn: str) -> None:
        """pytest-asyncio runs a fixture's setup, the test and the teardown as tasks one
        after the other: the setup task's open transaction is handed over."""
        async def main() -> list[Any]:
            conn = await asyncpg.connect(dsn)
            record = tracked(conn)
            await conn.execute("CREATE TEMP TABLE handed (n int)")

            async def setup() -> Any:
                transaction = conn.transaction()
                await transaction.start()
                return transaction

            async def test() -> None:
                await conn.execute("INSERT INTO handed VALUES (1)")
                assert conn.is_in_transaction()

            transaction = await asyncio.ensure_future(setup())
            assert record.task is not None  # held by the finished setup task
            await asyncio.ensure_future(test())
            await asyncio.ensure_future(transaction.rollback())  # the teardown
            rows = await conn.fetch("SELECT n FROM handed")
            await conn.close()
            return [record.task, rows]

        assert run(main) == [None, []]
        assert found() == []

    def test_coroutines_made_in_a_worker_thread_run_on_the_loop(
            self, sanitized: Sanitized, dsn: str) -> None:
        """run_coroutine_threadsafe(): the worker only makes the coroutines; the loop's task
        runs them (checked when awaited, there)."""
        async def main() -> list[int]:
            loop = asyncio.get_running_loop()
            conn = await asyncpg.connect(dsn)
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
            tracked(conn), tracked(pool)

            def worker() -> list[int]:
                return [asyncio.run_coroutine_threadsafe(call, loop).result(30)
                        for call in (conn.fetchval("SELECT 1"), pool.fetchval("SELECT 2"))]

            values = await asyncio.to_thread(worker)
            await pool.close()
            await conn.close()
            return values

        assert run(main) == [1, 2]
        assert found() == []

    def test_a_connection_class_of_your_own(self, sanitized: Sanitized, dsn: str) -> None:
        class Mine(asyncpg.Connection):  # type: ignore[misc]
            async def answer(self) -> int:
                return int(await self.fetchval("SELECT 42"))

        async def main() -> int:
            conn = await asyncpg.connect(dsn, connection_class=Mine)
            assert isinstance(conn, Mine) and type(conn).__qualname__.endswith("Mine")
            tracked(conn)
            value = await conn.answer()
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, connection_class=Mine)
            async with pool.acquire() as pooled:
                assert isinstance(pooled._con, Mine)
                tracked(pooled)
            await pool.close()
            await conn.close()
            return value

        assert run(main) == 42
        assert found() == []

    def test_disable_puts_asyncpg_back(self, enable: Any) -> None:
        from asyncpg import connect_utils, connection, pool, transaction

        before = (connect_utils._connect, pool.Pool, connection.Connection.fetchval,
                  transaction.Transaction.start)
        enable()
        assert pool.Pool is not asyncpg.Pool and issubclass(pool.Pool, asyncpg.Pool)
        assert connection.Connection.fetchval is not before[2]
        sanitizer.disable()
        assert (connect_utils._connect, pool.Pool, connection.Connection.fetchval,
                transaction.Transaction.start) == before
        assert not hasattr(connection.Connection, "_sanitizer_record")


# -- violations -----------------------------------------------------------------------------


class TestTwoTasksAtOnce:
    def test_an_intruder_is_refused_before_its_query_is_sent(self, enable: Any,
                                                               dsn: str) -> None:
        enable(action="log+raise")

        async def main() -> list[Any]:
            async with Blocker(dsn) as blocker:
                conn = await asyncpg.connect(dsn)
                inside = asyncio.Event()

                async def holder() -> Any:
                    inside.set()
                    return await conn.fetchval(WAIT_FOR_LOCK)

                async def intruder() -> Any:
                    await inside.wait()
                    try:
                        await conn.fetchval("SELECT 1")
                    except Exception as exc:
                        await blocker.release()
                        return exc
                    return None

                result, error = await asyncio.gather(holder(), intruder())
                after = await conn.fetchval("SELECT 2")  # the connection still works
                await conn.close()
                return [result, error, after]

        result, error, after = run(main)
        assert isinstance(error, sanitizer.ThreadAffinityError)  # not asyncpg's InterfaceError
        assert (result, after) == ("locked", 2)  # the holder's query completed
        (violation,) = sanitizer.violations()
        assert (violation.policy, violation.operation) == ("task", "fetchval")

    def test_an_intruder_in_an_open_transaction_is_refused_and_it_commits_alone(
            self, enable: Any, dsn: str) -> None:
        enable(action="log+raise")

        async def main() -> list[Any]:
            conn = await asyncpg.connect(dsn)
            await conn.execute("CREATE TEMP TABLE t (n int)")
            opened, tried = asyncio.Event(), asyncio.Event()
            outcome: list[Any] = []

            async def holder() -> None:
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (1)")
                    opened.set()
                    await tried.wait()

            async def intruder() -> None:
                await opened.wait()
                try:
                    await conn.execute("INSERT INTO t VALUES (2)")
                except sanitizer.ThreadAffinityError as exc:
                    outcome.append(exc)
                tried.set()

            await asyncio.gather(holder(), intruder())
            rows = [r["n"] for r in await conn.fetch("SELECT n FROM t ORDER BY n")]
            await conn.close()
            return [outcome, rows]

        outcome, rows = run(main)
        assert len(outcome) == 1 and rows == [1]  # only the holder's row, committed
        (violation,) = sanitizer.violations()
        assert (violation.policy, violation.operation) == ("task", "execute")
        assert "has an open transaction" in violation.message
        assert violation.hint.startswith("a transaction takes the whole connection")

    def test_derived_objects_are_checked_as_their_connection(
            self, sanitized: Sanitized, dsn: str) -> None:
        async def main() -> None:
            conn = await asyncpg.connect(dsn)
            stmt = await conn.prepare("SELECT $1::int")
            opened, tried = asyncio.Event(), asyncio.Event()

            async def holder() -> None:
                async with conn.transaction():
                    opened.set()
                    await tried.wait()

            async def intruder() -> None:
                await opened.wait()
                await stmt.fetchval(1)  # statement intrudes
                transaction = conn.transaction()
                await transaction.start()  # savepoint intrudes
                await transaction.rollback()
                tried.set()

            await asyncio.gather(holder(), intruder())
            await conn.close()

        run(main)
        assert sorted(found()) == [("task", "fetchval"), ("task", "rollback"),
                                   ("task", "start")]
        by_operation = {v.operation: v for v in sanitizer.violations()}
        statement = by_operation["fetchval"]
        assert statement.object_type == "asyncpg.prepared_stmt.PreparedStatement"
        assert statement.root_type == "asyncpg.Connection"
        assert statement.event()["access_stack"][0]["line"] == line_of_file(
            HERE, "# statement intrudes")
        assert by_operation["start"].object_type == "asyncpg.transaction.Transaction"

    def test_a_pooled_connection_shared_by_two_tasks(self, sanitized: Sanitized,
                                                     dsn: str) -> None:
        async def main() -> None:
            async with Blocker(dsn) as blocker:
                pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
                inside = asyncio.Event()
                async with pool.acquire() as conn:
                    async def holder() -> Any:
                        inside.set()
                        return await conn.fetchval(WAIT_FOR_LOCK)

                    async def intruder() -> None:
                        await inside.wait()
                        with pytest.raises(asyncpg.InterfaceError, match="another operation"):
                            await conn.fetch("SELECT 1")  # pooled intrudes
                        await blocker.release()

                    await asyncio.gather(holder(), intruder())
                await pool.close()

        run(main)
        (violation,) = sanitizer.violations()
        assert (violation.policy, violation.operation) == ("task", "fetch")
        assert violation.object_type == "asyncpg.Connection"  # the proxy's Connection
        assert violation.holder_task is not None
        assert violation.holder_task["coroutine"].endswith("holder")


class TestUvloop:
    def test_handoff_is_silent_and_two_tasks_at_once_are_reported(
            self, sanitized: Sanitized, dsn: str) -> None:
        uvloop = pytest.importorskip("uvloop")

        async def main() -> Any:
            conn = await asyncpg.connect(dsn)
            tracked(conn)
            await asyncio.ensure_future(conn.fetchval("SELECT 1"))
            await asyncio.ensure_future(conn.fetchval("SELECT 2"))  # a handoff
            assert found() == []
            async with Blocker(dsn) as blocker:
                inside = asyncio.Event()

                async def holder() -> Any:
                    inside.set()
                    return await conn.fetchval(WAIT_FOR_LOCK)

                async def intruder() -> None:
                    await inside.wait()
                    with pytest.raises(asyncpg.InterfaceError):
                        await conn.fetchval("SELECT 3")
                    await blocker.release()

                await asyncio.gather(holder(), intruder())
            await conn.close()

        uvloop.run(main())
        (violation,) = sanitizer.violations()
        assert (violation.policy, violation.operation) == ("task", "fetchval")
        assert violation.holder_task is not None
        assert violation.holder_task["coroutine"].endswith("holder")
        assert violation.owner_loop is not None and violation.owner_loop["type"] == "Loop"


class TestLoops:
    def test_a_pool_used_in_a_second_asyncio_run(self, enable: Any, dsn: str) -> None:
        enable(action="log+raise")

        async def make() -> Any:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)  # pool made
            await pool.close()
            return pool

        pool = run(make)

        async def again() -> None:
            with pytest.raises(sanitizer.ThreadAffinityError):
                pool.acquire()  # pool used

        run(again)
        (violation,) = sanitizer.violations()
        assert (violation.policy, violation.object_type, violation.operation) == (
            "loop", "asyncpg.Pool", "acquire")
        event = violation.event()
        assert event["owner_loop"]["state"] == "closed"
        assert event["loop"]["state"] == "running"
        assert event["loop"]["serial"] > event["owner_loop"]["serial"]
        assert site(event["access_stack"], "test_asyncpg.py") == line_of_file(
            HERE, "# pool used")
        assert site(event["creation_stack"], "test_asyncpg.py") == line_of_file(
            HERE, "# pool made")
        assert "create it in the loop that uses it" in violation.hint


# -- end to end: real programs, the JSON fields ---------------------------------------------


@pytest.fixture
def program_dsn(dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("APG_DSN", dsn)
    return dsn


GATHER = """\
import asyncio, os
import asyncpg
import sanitizer

DSN = os.environ["APG_DSN"]
LOCKED = "SELECT pg_advisory_lock(7)::text"

async def main():
    blocker = await asyncpg.connect(DSN)
    await blocker.execute("SELECT pg_advisory_lock(7)")
    conn = await asyncpg.connect(DSN)  # made here
    inside = asyncio.Event()

    async def holder():
        inside.set()
        return await conn.fetchval(LOCKED)  # holder waits here

    async def intruder():
        await inside.wait()
        try:
            await conn.fetchval("SELECT 1")  # intrudes
        except asyncpg.InterfaceError as exc:
            print("asyncpg said:", exc, "| reported before:", len(sanitizer.violations()))
        await blocker.execute("SELECT pg_advisory_unlock(7)")

    await asyncio.gather(holder(), intruder())
    await conn.close()
    await blocker.close()

asyncio.run(main())
"""

TRANSACTION = """\
import asyncio, os
import asyncpg

DSN = os.environ["APG_DSN"]

async def main():
    conn = await asyncpg.connect(DSN)  # made here
    await conn.execute("CREATE TEMP TABLE t (n int)")
    opened, done = asyncio.Event(), asyncio.Event()

    async def holder():
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1)")
            opened.set()
            await done.wait()  # holder waits here

    async def intruder():
        await opened.wait()
        await conn.execute("INSERT INTO t VALUES (2)")  # intrudes
        done.set()

    await asyncio.gather(holder(), intruder())
    print("rows:", [r["n"] for r in await conn.fetch("SELECT n FROM t ORDER BY n")])
    await conn.close()

asyncio.run(main())
"""

TWO_RUNS = """\
import asyncio, os
import asyncpg

DSN = os.environ["APG_DSN"]
conn = asyncio.run(asyncpg.connect(DSN))  # made here

async def second():
    try:
        await conn.fetchval("SELECT 1")  # used here
    except Exception as exc:
        print("asyncpg said:", type(exc).__name__)

asyncio.run(second())
"""

WORKER_LOOP = """\
import asyncio, os, threading
import asyncpg

DSN = os.environ["APG_DSN"]

async def main():
    conn = await asyncpg.connect(DSN)  # made here

    def worker():
        async def use():
            try:
                await conn.fetchval("SELECT 1")  # used here
            except Exception as exc:
                print("refused:", type(exc).__name__)
        asyncio.run(use())

    thread = threading.Thread(target=worker, name="worker")
    thread.start()
    await asyncio.to_thread(thread.join)
    conn.terminate()

asyncio.run(main())
"""


class TestEndToEnd:
    def test_two_tasks_in_gather_reported_before_asyncpg_refuses(
            self, tmp_path: Path, program_dsn: str, postgresql_server: Any) -> None:
        proc, records = run_program(tmp_path, GATHER)
        assert proc.returncode == 0, proc.stderr
        assert "another operation is in progress | reported before: 1" in proc.stdout
        (record,) = records
        assert (record["policy"], record["object_type"], record["operation"]) == (
            "task", "asyncpg.Connection", "fetchval")
        assert record["access_stack"][0]["line"] == line_of(GATHER, "intrudes")
        assert site(record["creation_stack"]) == line_of(GATHER, "made here")
        assert record["holder_task"]["coroutine"] == "main.<locals>.holder"
        assert record["holder_task"]["name"].startswith("Task-")
        assert site(record["holder_stack"]) == line_of(GATHER, "holder waits here")
        assert record["task"]["coroutine"] == "main.<locals>.intruder"
        assert record["loop"]["serial"] == record["owner_loop"]["serial"]
        assert record["owner_loop"]["state"] == "running"
        assert record["owner_task"]["coroutine"] == "main"
        assert record["resource"] == {"driver": "asyncpg", "host": postgresql_server.host,
                                      "port": postgresql_server.port,
                                      "database": postgresql_server.dbname}
        assert "is inside an operation on the same asyncpg.Connection" in record["message"]
        assert "thread-affinity (task)" in proc.stderr  # the exit summary

    def test_a_statement_inside_another_tasks_transaction(
            self, tmp_path: Path, program_dsn: str) -> None:
        proc, records = run_program(tmp_path, TRANSACTION)
        assert proc.returncode == 0, proc.stderr
        assert "rows: [1, 2]" in proc.stdout  # asyncpg let it in, silently
        (record,) = records
        assert (record["policy"], record["operation"]) == ("task", "execute")
        assert record["access_stack"][0]["line"] == line_of(TRANSACTION, "intrudes")
        assert site(record["creation_stack"]) == line_of(TRANSACTION, "made here")
        assert record["holder_task"]["coroutine"] == "main.<locals>.holder"
        assert site(record["holder_stack"]) == line_of(TRANSACTION, "holder waits here")
        assert record["task"]["coroutine"] == "main.<locals>.intruder"
        assert "has an open transaction on the same asyncpg.Connection" in record["message"]

    def test_a_connection_from_one_asyncio_run_used_in_the_next(
            self, tmp_path: Path, program_dsn: str) -> None:
        proc, records = run_program(tmp_path, TWO_RUNS)
        assert proc.returncode == 0, proc.stderr
        assert "asyncpg said:" in proc.stdout  # it failed, after the report
        (record,) = records
        assert (record["policy"], record["object_type"], record["operation"]) == (
            "loop", "asyncpg.Connection", "fetchval")
        assert record["access_stack"][0]["line"] == line_of(TWO_RUNS, "used here")
        assert site(record["creation_stack"]) == line_of(TWO_RUNS, "made here")
        assert record["owner_loop"]["state"] == "closed"
        assert record["loop"]["state"] == "running"
        assert record["loop"]["serial"] == record["owner_loop"]["serial"] + 1
        assert record["task"]["coroutine"] == "second"
        assert "connect in the loop that uses it" in record["hint"]

    def test_a_connection_used_from_a_worker_threads_own_loop(
            self, tmp_path: Path, program_dsn: str) -> None:
        # Refused (action=raise): let through, asyncpg's C protocol would race with the loop's
        # thread, which reads the same socket (a crash, now and then).
        proc, records = run_program(tmp_path, WORKER_LOOP, "action=log+raise")
        assert proc.returncode == 0, proc.stderr
        assert "refused: ThreadAffinityError" in proc.stdout
        (record,) = records
        assert (record["policy"], record["operation"]) == ("loop", "fetchval")
        assert record["access_stack"][0]["line"] == line_of(WORKER_LOOP, "used here")
        assert site(record["creation_stack"]) == line_of(WORKER_LOOP, "made here")
        assert record["thread"]["name"] == "worker"
        assert record["loop"]["thread"]["name"] == "worker"
        assert record["owner_loop"]["state"] == "running"
        assert record["owner_loop"]["thread"]["name"] == "MainThread"
        assert record["loop"]["serial"] != record["owner_loop"]["serial"]
        assert record["task"]["coroutine"] == "main.<locals>.worker.<locals>.use"


PYTEST_SUITE = """
import os
import asyncpg
import pytest
import pytest_asyncio

DSN = os.environ["APG_DSN"]

@pytest_asyncio.fixture
async def conn():
    conn = await asyncpg.connect(DSN)
    transaction = conn.transaction()
    await transaction.start()  # the setup's task opens it
    await conn.execute("CREATE TABLE items (n int)")
    yield conn
    await transaction.rollback()  # the teardown's task ends it
    await conn.close()

@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def shared():
    conn = await asyncpg.connect(DSN)  # made by the fixture
    yield conn
    conn.terminate()

@pytest.mark.asyncio
async def test_insert(conn):
    await conn.execute("INSERT INTO items VALUES (1)")  # the test's task uses it
    assert await conn.fetchval("SELECT count(*) FROM items") == 1

@pytest.mark.asyncio
async def test_rolled_back_before(conn):
    assert await conn.fetchval("SELECT count(*) FROM items") == 0

@pytest.mark.asyncio(loop_scope="session")
async def test_in_the_fixtures_loop(shared):
    assert await shared.fetchval("SELECT 1") == 1

@pytest.mark.asyncio
async def test_in_its_own_loop(shared):
    await shared.fetchval("SELECT 2")  # another loop
"""


@pytest.mark.skipif(not __import__("importlib").util.find_spec("pytest_asyncio"),
                    reason="needs pytest-asyncio")
def test_under_pytest_asyncio(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                              program_dsn: str) -> None:
    """A per-test connection whose transaction the fixture opens and rolls back is silent
    (setup, test and teardown are tasks one after the other); a session fixture's
    connection used in a test's own loop names the fixture."""
    suite = pytester_suite(pytester, monkeypatch, "")
    path = suite.makepyfile(test_pg=PYTEST_SUITE)
    result = suite.runpytest_subprocess("--sanitize-threads", "-p", "no:randomly")
    result.assert_outcomes(passed=3, failed=1)
    used, made = line_of_file(path, "# another loop"), line_of_file(path, "# made by the fixture")
    result.stdout.fnmatch_lines([
        "*_ test_in_its_own_loop _*",
        "*(made by pytest fixture 'shared' (scope 'session', loop_scope 'session'))*",
        "*hint: the asyncpg.Connection was made by fixture 'shared'*loop_scope=\"session\"*",
        "*thread-affinity violations*",
        "test_pg.py::test_in_its_own_loop (call)",
        "*(loop) asyncpg.Connection.fetchval called in task*bound to event loop L* (idle)*",
        f"*used at test_pg.py:{used} in test_in_its_own_loop",
        f"*created at test_pg.py:{made} in shared",
        "sanitize-threads: 1 violation(s) in 1 test(s)",
        "FAILED *::test_in_its_own_loop - *"])  # asyncpg's own error, after the report
    assert "(task)" not in result.stdout.str()
