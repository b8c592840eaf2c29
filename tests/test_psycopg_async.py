"""psycopg 3's AsyncConnection on a real PostgreSQL server: its loop, and transactions by task."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import found, line_in, line_of_file, only, tracked

import sanitizer
from sanitizer import stacks
from sanitizer.ownership import record_of

psycopg = pytest.importorskip("psycopg")

TIMEOUT = 30
HERE = Path(__file__)


@pytest.fixture
def sanitized(tmp_path: Path) -> Iterator[None]:
    sanitizer.enable(plugins="dbapi+asyncio", log_file=str(tmp_path / "violations.jsonl"))
    try:
        yield
    finally:
        sanitizer.disable()


@pytest.fixture
def server(postgresql_server: Any, sanitized: None) -> Any:
    return postgresql_server


async def connect(server: Any, **extra: Any) -> Any:
    return await psycopg.AsyncConnection.connect(**server.kwargs, **extra)


async def fresh_table(server: Any, name: str) -> str:
    async with await connect(server, autocommit=True) as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {name}")
        await conn.execute(f"CREATE TABLE {name} (n INTEGER)")
    return name


def line(frame: Any) -> int:
    """The line in this file of a captured frame (a report's site)."""
    return line_in(HERE, frame)


# -- the misuse: a statement from one task inside another task's transaction ---------------


def test_statement_inside_another_tasks_transaction_is_caught(server: Any) -> None:
    async def main() -> list[Any]:
        table = await fresh_table(server, "t_async_intruder")
        conn = await psycopg.AsyncConnection.connect(**server.kwargs)  # async-creation
        opened, done = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")  # opens a transaction
            opened.set()
            await done.wait()  # the holder is suspended here, transaction open
            await conn.commit()

        async def intruder() -> None:
            await opened.wait()
            await conn.execute(f"SELECT n FROM {table}")  # async-intrusion
            done.set()

        await asyncio.gather(asyncio.create_task(holder(), name="holder"),
                             asyncio.create_task(intruder(), name="intruder"))
        async with conn.cursor() as cur:  # the holder's work was committed, with B's inside
            await cur.execute(f"SELECT n FROM {table}")
            rows = await cur.fetchall()
        await conn.close()
        return rows

    assert asyncio.run(main()) == [(1,)]
    violation = only()
    assert violation.policy == "transaction"
    assert violation.operation == "execute"
    assert violation.hint.startswith("give each task its own connection (a pool)")
    assert line(violation.access_site) == line_of_file(HERE, "# async-intrusion")
    assert line(violation.creation_site) == line_of_file(HERE, "# async-creation")
    assert violation.task == {"name": "intruder", "coroutine": "test_statement_inside_another_"
                              "tasks_transaction_is_caught.<locals>.main.<locals>.intruder"}
    assert violation.holder_task["name"] == "holder"
    assert violation.holder_task["coroutine"].endswith("main.<locals>.holder")
    # Where the holder waits: its own line, with its transaction open.
    waits = [stacks.location(f)[1] for f in violation.holder_stack]
    assert line_of_file(HERE, "# the holder is suspended here, transaction open") in waits
    assert violation.loop["state"] == "running"
    assert violation.owner_loop["serial"] == violation.loop["serial"]
    assert "task 'holder'" in violation.message and "open transaction" in violation.message


def test_commit_of_another_tasks_transaction_is_caught(server: Any) -> None:
    async def main() -> None:
        table = await fresh_table(server, "t_async_commit")
        conn = await psycopg.AsyncConnection.connect(**server.kwargs)
        inserted, committed = asyncio.Event(), asyncio.Event()

        async def inserting() -> None:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            inserted.set()
            await committed.wait()  # not done yet: its second row goes in on its own
            await conn.execute(f"INSERT INTO {table} VALUES (2)")
            await conn.rollback()

        async def committing() -> None:
            await inserted.wait()
            await conn.commit()  # async-foreign-commit
            committed.set()

        await asyncio.gather(asyncio.create_task(inserting(), name="inserting"),
                             asyncio.create_task(committing(), name="committing"))
        await conn.close()

    asyncio.run(main())
    violation = only()
    assert (violation.policy, violation.operation) == ("transaction", "commit")
    assert line(violation.access_site) == line_of_file(HERE, "# async-foreign-commit")
    assert violation.object_type == "psycopg.AsyncConnection"
    assert violation.task["name"] == "committing"
    assert violation.holder_task["name"] == "inserting"
    assert "ends that task's transaction" in violation.message


def test_statement_inside_another_tasks_transaction_block_is_caught(server: Any) -> None:
    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(**server.kwargs, autocommit=True)
        entered, done = asyncio.Event(), asyncio.Event()

        async def block() -> None:
            async with conn.transaction():  # autocommit: this opens the transaction
                entered.set()
                await done.wait()

        async def other() -> None:
            await entered.wait()
            await conn.execute("SELECT 1")  # async-inside-block
            done.set()

        await asyncio.gather(asyncio.create_task(block(), name="block"),
                             asyncio.create_task(other(), name="other"))
        await conn.close()

    asyncio.run(main())
    violation = only()
    assert (violation.policy, violation.operation) == ("transaction", "execute")
    assert line(violation.access_site) == line_of_file(HERE, "# async-inside-block")
    assert (violation.task["name"], violation.holder_task["name"]) == ("other", "block")


def test_use_under_another_loop_is_caught(server: Any) -> None:
    async def make() -> Any:
        return await psycopg.AsyncConnection.connect(**server.kwargs)  # made-in-first-loop

    conn = asyncio.run(make())
    record = tracked(conn)
    assert record.loop is not None and record.loop.state == "closed"

    async def use() -> None:
        await conn.execute("SELECT 1")  # used-in-second-loop
        await conn.close()

    asyncio.run(use())
    # Each operation once; the statement its execute() runs beneath is not reported again.
    assert found() == [("loop", "execute"), ("loop", "close")]
    violation = sanitizer.violations()[0]
    assert line(violation.access_site) == line_of_file(HERE, "# used-in-second-loop")
    assert line(violation.creation_site) == line_of_file(HERE, "# made-in-first-loop")
    assert violation.owner_loop["state"] == "closed"
    assert violation.loop["state"] == "running"
    assert violation.loop["serial"] != violation.owner_loop["serial"]


# -- correct patterns stay silent (each with its connection tracked) -----------------------


async def control(conn: Any) -> None:
    """The positive control, on a connection a silence test used: another task's statement
    inside this task's transaction is reported (as ``("transaction", "execute")``)."""
    opened, done = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        await conn.execute("SELECT 1")
        opened.set()
        await done.wait()
        await conn.rollback()

    async def intruder() -> None:
        await opened.wait()
        await conn.execute("SELECT 2")
        done.set()

    assert tracked(conn).loop is not None  # bound to the loop it was opened in
    await asyncio.gather(asyncio.create_task(holder()), asyncio.create_task(intruder()))


def test_sequential_handoff_between_tasks_is_silent(server: Any) -> None:
    async def main() -> None:
        table = await fresh_table(server, "t_async_handoff")
        conn = await psycopg.AsyncConnection.connect(**server.kwargs)

        async def step(n: int) -> None:
            await conn.execute(f"INSERT INTO {table} VALUES ({n})")
            await conn.commit()  # handed over with no transaction open

        for n in range(3):
            await asyncio.create_task(step(n), name=f"step-{n}")
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT count(*) FROM {table}")
            assert await cur.fetchone() == (3,)
        await conn.rollback()
        assert sanitizer.violations() == []
        await control(conn)
        await conn.close()

    asyncio.run(main())
    assert found() == [("transaction", "execute")]  # the control only


def test_connection_per_task_is_silent(server: Any) -> None:
    async def main() -> None:
        together = asyncio.Barrier(3) if sys.version_info >= (3, 11) else None
        conns: list[Any] = []

        async def worker() -> None:
            conn = await psycopg.AsyncConnection.connect(**server.kwargs)
            conns.append(conn)
            if together is not None:
                await together.wait()  # all three in flight together
            for _ in range(10):
                await conn.execute("SELECT 1")
            await conn.commit()

        await asyncio.gather(*(asyncio.create_task(worker()) for _ in range(3)))
        assert sanitizer.violations() == []
        assert all(tracked(c).loop is not None for c in conns)
        await control(conns[0])
        for conn in conns:
            await conn.close()

    asyncio.run(main())
    assert found() == [("transaction", "execute")]


def test_autocommit_connection_shared_by_tasks_is_silent(server: Any) -> None:
    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(**server.kwargs, autocommit=True)

        async def worker(n: int) -> None:
            for _ in range(10):  # psycopg's lock takes them in turn; none opens a transaction
                cur = await conn.execute("SELECT %s::int", (n,))
                assert await cur.fetchone() == (n,)

        await asyncio.gather(*(asyncio.create_task(worker(n)) for n in range(4)))
        assert sanitizer.violations() == []
        await conn.set_autocommit(False)
        await control(conn)
        await conn.close()

    asyncio.run(main())
    assert found() == [("transaction", "execute")]


def test_one_tasks_transaction_block_with_nested_statements_is_silent(server: Any) -> None:
    async def main() -> None:
        table = await fresh_table(server, "t_async_block")
        conn = await psycopg.AsyncConnection.connect(**server.kwargs, autocommit=True)
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            async with conn.transaction():  # a savepoint
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
            async with conn.cursor() as cur:
                await cur.execute(f"SELECT count(*) FROM {table}")
                assert await cur.fetchone() == (2,)
        assert tracked(conn).task is None  # the block ended: nobody holds it
        other = asyncio.create_task(conn.execute(f"SELECT count(*) FROM {table}"))
        assert await (await other).fetchone() == (2,)  # another task, after the block
        assert sanitizer.violations() == []
        await conn.set_autocommit(False)
        await control(conn)
        await conn.close()

    asyncio.run(main())
    assert found() == [("transaction", "execute")]


def test_helper_tasks_of_the_holder_are_silent(server: Any) -> None:
    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(**server.kwargs)
        async with conn.transaction():
            # gather() and wait_for() run these in tasks of their own (wait_for on 3.10
            # and 3.11): helpers the holder started, and awaits, inside its transaction.
            await asyncio.gather(conn.execute("SELECT 1"), conn.execute("SELECT 2"))
            await asyncio.wait_for(conn.execute("SELECT 3"), TIMEOUT)
        await conn.execute("SELECT 4")  # an implicit transaction, then helpers again
        await asyncio.gather(conn.execute("SELECT 5"))
        await conn.commit()
        assert sanitizer.violations() == []
        await control(conn)
        await conn.close()

    asyncio.run(main())
    assert found() == [("transaction", "execute")]


def test_pipeline_in_one_task_is_silent(server: Any) -> None:
    async def main() -> None:
        table = await fresh_table(server, "t_async_pipeline")
        conn = await psycopg.AsyncConnection.connect(**server.kwargs)
        async with conn.pipeline():
            for n in range(5):
                await conn.execute(f"INSERT INTO {table} VALUES ({n})")
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
        assert await cur.fetchone() == (5,)
        await conn.commit()
        assert sanitizer.violations() == []
        await control(conn)
        await conn.close()

    asyncio.run(main())
    assert found() == [("transaction", "execute")]


def test_tracked_connections_and_untracked_ones(server: Any) -> None:
    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(**server.kwargs)
        record = tracked(conn)
        assert isinstance(conn, psycopg.AsyncConnection)
        assert type(conn).__name__ == "AsyncConnection"
        assert record.resource is not None and record.resource["driver"] == "psycopg"
        assert server.password not in repr(record.resource)
        await conn.close()

    asyncio.run(main())
    sanitizer.disable()  # made while off: untracked, and its transaction blocks too

    async def untracked() -> None:
        conn = await psycopg.AsyncConnection.connect(**server.kwargs)
        assert record_of(conn) is None
        async with conn.transaction():
            await conn.execute("SELECT 1")
        await conn.close()

    asyncio.run(untracked())
    sanitizer.enable(plugins="dbapi+asyncio")

    async def made_before_enable(conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SELECT 1")
        await conn.close()

    async def make() -> Any:
        return await psycopg.AsyncConnection.connect(**server.kwargs)

    sanitizer.disable()
    conn = asyncio.run(make())
    sanitizer.enable(plugins="dbapi+asyncio")
    asyncio.run(made_before_enable(conn))
    assert sanitizer.violations() == []
