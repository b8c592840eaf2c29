"""The SQLAlchemy plugin under asyncio: an AsyncSession (or AsyncConnection) serves one task at a
time, and the loop of the connection it holds; with aiosqlite, asyncpg and psycopg, for real."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from sqlalchemy import ForeignKey, NullPool, event, select, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import (  # needs greenlet: sqlalchemy[asyncio]
    AsyncAttrs,
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from support import found, line_of, line_of_file, run_program, tracked

import sanitizer
from sanitizer import control

HERE = str(Path(__file__).resolve())
SESSION = "sqlalchemy.ext.asyncio.session.AsyncSession"
CONNECTION = "sqlalchemy.ext.asyncio.engine.AsyncConnection"
DRIVERS = ("aiosqlite", "asyncpg", "psycopg")


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sqla_async_author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "sqla_async_book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(ForeignKey("sqla_async_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def mark(marker: str) -> int:
    return line_of_file(HERE, f"# {marker}")


def user_line(stack: list[dict[str, Any]]) -> int:
    """The line of this file nearest the top of a JSON stack."""
    return next(f["line"] for f in stack if f["file"] == HERE)


# -- the databases, and a statement a task stays inside until the test lets it go -----------


class Hold:
    """``statement`` waits until ``release()``; ``inside`` is set when a task sends it."""

    statement = ""

    def __init__(self, engine: AsyncEngine) -> None:
        self.inside = asyncio.Event()

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement == self.statement:
                self.inside.set()  # in the holder's greenlet: its task is inside execute()

    async def start(self) -> None:
        pass

    async def release(self) -> None:
        raise NotImplementedError


class SqliteHold(Hold):
    """A function that waits in aiosqlite's worker thread."""

    statement = "select hold()"

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.released = threading.Event()

        @event.listens_for(engine.sync_engine, "connect")
        def add_hold(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.create_function("hold", 0, self.wait)

    def wait(self) -> int:
        assert self.released.wait(30), "never released"
        return 1

    async def release(self) -> None:
        self.released.set()


class PostgresHold(Hold):
    """An advisory lock that a task of the test holds on a connection of its own (one
    task throughout: the drivers' plugins report a transaction handed between tasks)."""

    statement = "select pg_advisory_xact_lock(4242)"

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.engine = engine
        self.locked, self.unlock = asyncio.Event(), asyncio.Event()
        self.locker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.locker = asyncio.create_task(self.lock(), name="locker")
        await self.locked.wait()

    async def lock(self) -> None:
        conn = await self.engine.connect()
        await conn.execute(text("select pg_advisory_lock(4242)"))
        self.locked.set()
        await self.unlock.wait()
        await conn.execute(text("select pg_advisory_unlock(4242)"))
        await conn.close()

    async def release(self) -> None:
        assert self.locker is not None
        self.unlock.set()
        await self.locker


class Database:
    def __init__(self, driver: str, url: str) -> None:
        self.driver = driver
        self.url = url

    def engine(self, **kwargs: Any) -> AsyncEngine:
        return create_async_engine(self.url, **kwargs)

    def hold(self, engine: AsyncEngine) -> Hold:
        return SqliteHold(engine) if self.driver == "aiosqlite" else PostgresHold(engine)

    def __repr__(self) -> str:
        return self.driver


def database(driver: str, request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if driver == "aiosqlite":
        return Database(driver, f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    server = request.getfixturevalue("postgresql_server")
    return Database(driver, server.dsn.replace("postgresql://", f"postgresql+{driver}://", 1))


@pytest.fixture(params=DRIVERS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    return database(request.param, request, tmp_path)


@pytest.fixture(params=("asyncpg", "psycopg"))
def pg(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    return database(request.param, request, tmp_path)


@pytest.fixture
def sqlite(tmp_path: Path, request: pytest.FixtureRequest) -> Database:
    return database("aiosqlite", request, tmp_path)


def report_event() -> asyncio.Event:
    """Set when the running sanitizer reports a violation (a synchronisation point)."""
    reported = asyncio.Event()
    running = control.running()
    assert running is not None
    running.reporter.add(lambda occurrence: (reported.set(), occurrence)[1])
    return reported


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


# -- two tasks inside one session -------------------------------------------------------------


async def gather_over_one_session(db: Database, engine: AsyncEngine) -> list[Any]:
    """Task 'holder' connects a session and stays inside a statement; task 'intruder' runs
    one on the same session meanwhile. The holder closes the session once the intruder
    is done (one task's transaction throughout, for the drivers' own plugins)."""
    session = AsyncSession(engine)  # session made
    hold = db.hold(engine)
    await hold.start()
    reported = report_event()
    intruder_done = asyncio.Event()

    async def holder() -> None:
        await session.execute(text("select 1"))  # connected: a connection, a transaction
        await session.execute(text(hold.statement))  # holder waits
        await intruder_done.wait()
        await session.close()

    async def intruder() -> Any:
        try:
            await hold.inside.wait()
            return (await session.execute(text("select 2"))).scalar()  # intruder
        finally:
            intruder_done.set()

    async def release() -> None:
        try:
            await asyncio.wait_for(reported.wait(), 30)
        finally:
            await hold.release()

    outcome = await asyncio.gather(
        asyncio.create_task(holder(), name="holder"),
        asyncio.create_task(intruder(), name="intruder"),
        release(), return_exceptions=True)
    tracked(session)
    await engine.dispose()
    return outcome


class TestTwoTasksInOneSession:
    @pytest.mark.parametrize("action", ["log", "log+raise"])
    def test_gather_over_a_connected_session_names_the_holder(
            self, db: Database, action: str, enable: Any) -> None:
        log = enable(action=action)
        held, intruded, released = run(lambda: gather_over_one_session(db, db.engine()))
        assert held is None and released is None
        if action == "log+raise":  # refused before SQLAlchemy ran any of it
            assert isinstance(intruded, sanitizer.ThreadAffinityError)
        else:  # SQLAlchemy's adapters serialize the statement after the holder's
            assert intruded == 2
        (record,) = log.records()  # the only report: the layers beneath stayed silent
        assert (record["policy"], record["object_type"], record["operation"]) == (
            "task", SESSION, "execute")
        assert user_line(record["access_stack"]) == mark("intruder")
        assert user_line(record["creation_stack"]) == mark("session made")
        assert record["task"] == {"name": "intruder",
                                  "coroutine": "gather_over_one_session.<locals>.intruder"}
        assert record["holder_task"] == {"name": "holder",
                                         "coroutine": "gather_over_one_session.<locals>.holder"}
        waits = record["holder_stack"][0]
        assert (waits["file"], waits["line"]) == (HERE, mark("holder waits"))
        assert record["loop"]["state"] == "running"
        if db.driver == "aiosqlite":  # its connections serve any loop: the session too
            assert "owner_loop" not in record
        else:  # bound to the loop it checked its connection out under
            assert record["owner_loop"]["serial"] == record["loop"]["serial"]
        assert "while task 'holder' (gather_over_one_session.<locals>.holder()) is inside" \
            in record["message"]
        assert "give each task its own (async_sessionmaker)" in record["hint"]

    def test_a_fresh_session_is_reported_before_sqlalchemy_refuses(
            self, sqlite: Database, sanitized: Sanitized) -> None:
        async def main() -> list[Any]:
            engine = sqlite.engine()
            session = AsyncSession(engine)

            async def query(n: int) -> Any:
                return (await session.execute(text(f"select {n}"))).scalar()  # fresh

            # The first task provisions the connection (awaiting aiosqlite's thread) when
            # the second enters: SQLAlchemy itself refuses that, after our report.
            outcome = await asyncio.gather(query(1), query(2), return_exceptions=True)
            await session.close()
            await engine.dispose()
            return outcome

        first, second = run(main)
        assert first == 1
        assert isinstance(second, InvalidRequestError)
        (record,) = sanitized.records()
        assert (record["policy"], record["operation"]) == ("task", "execute")
        assert user_line(record["access_stack"]) == mark("fresh")

    def test_a_shared_async_connection(self, db: Database, enable: Any) -> None:
        log = enable(action="log+raise")

        async def main() -> Any:
            engine = db.engine()
            hold = db.hold(engine)
            await hold.start()
            conn = await engine.connect()  # connection made
            tracked(conn)

            async def other() -> Any:
                await hold.inside.wait()
                try:
                    return await conn.execute(text("select 2"))  # second task
                finally:
                    await hold.release()

            task = asyncio.create_task(other(), name="other")
            await conn.execute(text(hold.statement))
            outcome = await asyncio.gather(task, return_exceptions=True)
            await conn.close()
            await engine.dispose()
            return outcome[0]

        assert isinstance(run(main), sanitizer.ThreadAffinityError)
        (record,) = log.records()
        assert (record["policy"], record["object_type"], record["operation"]) == (
            "task", CONNECTION, "execute")
        assert user_line(record["access_stack"]) == mark("second task")
        assert user_line(record["creation_stack"]) == mark("connection made")
        assert record["holder_task"]["coroutine"].endswith("main")
        assert "an AsyncConnection is for one task at a time" in record["hint"]

    def test_a_sessions_connection_is_part_of_the_session(self, sqlite: Database,
                                                          enable: Any) -> None:
        log = enable(action="log+raise")

        async def main() -> Any:
            engine = sqlite.engine()
            hold = sqlite.hold(engine)
            session = AsyncSession(engine)
            conn = await session.connection()
            assert tracked(conn) is tracked(session)

            async def other() -> Any:
                await hold.inside.wait()
                try:
                    return await conn.execute(text("select 2"))  # through its connection
                finally:
                    await hold.release()

            task = asyncio.create_task(other())
            await session.execute(text(hold.statement))
            outcome = await asyncio.gather(task, return_exceptions=True)
            await session.close()
            await engine.dispose()
            return outcome[0]

        assert isinstance(run(main), sanitizer.ThreadAffinityError)
        (record,) = log.records()
        assert (record["object_type"], record["root_type"], record["operation"]) == (
            CONNECTION, SESSION, "execute")
        assert user_line(record["access_stack"]) == mark("through its connection")

    def test_a_transaction_committed_by_another_task(self, sqlite: Database,
                                                     enable: Any) -> None:
        log = enable(action="log+raise")

        async def main() -> Any:
            engine = sqlite.engine()
            hold = sqlite.hold(engine)
            session = AsyncSession(engine)
            transaction = await session.begin()

            async def other() -> Any:
                await hold.inside.wait()
                try:
                    await transaction.commit()  # commits another task's work
                finally:
                    await hold.release()

            task = asyncio.create_task(other())
            await session.execute(text(hold.statement))
            outcome = await asyncio.gather(task, return_exceptions=True)
            await session.close()
            await engine.dispose()
            return outcome[0]

        assert isinstance(run(main), sanitizer.ThreadAffinityError)
        (record,) = log.records()
        assert (record["object_type"], record["root_type"], record["operation"]) == (
            "sqlalchemy.ext.asyncio.session.AsyncSessionTransaction", SESSION, "commit")
        assert user_line(record["access_stack"]) == mark("commits another task's work")


# -- loops --------------------------------------------------------------------------------------


class TestLoops:
    def test_a_session_holding_a_connection_under_another_loop(self, pg: Database,
                                                               enable: Any) -> None:
        log = enable(action="log+raise")
        engine = pg.engine(poolclass=NullPool)
        session = AsyncSession(engine)  # made outside any loop
        record = tracked(session)
        assert record.loop is None
        old = asyncio.new_event_loop()
        try:
            # One task of the old loop opens the transaction and, later, ends it (a task
            # of the session's own: the driver's transaction rule stays out of this).
            connected, release = asyncio.Event(), old.create_future()

            async def first() -> None:
                await session.execute(text("select 1"))  # bound here
                connected.set()
                await release  # the old loop stands idle meanwhile
                await session.close()  # its own loop: fine

            task = old.create_task(first())
            old.run_until_complete(connected.wait())
            bound = record.loop
            assert bound is not None and bound.loop is not None and bound.loop() is old

            async def under_another_loop() -> None:
                await session.execute(text("select 2"))  # another loop

            with pytest.raises(sanitizer.ThreadAffinityError):
                run(under_another_loop)
            release.set_result(None)
            old.run_until_complete(task)

            # Between transactions it keeps nothing of a loop: the next one binds it anew.
            async def after_close() -> None:
                await session.execute(text("select 3"))
                assert record.loop is not bound and record.loop is not None
                await session.close()

            run(after_close)
            old.run_until_complete(engine.dispose())
        finally:
            old.close()
        (violation,) = log.records()
        assert (violation["policy"], violation["object_type"], violation["operation"]) == (
            "loop", SESSION, "execute")
        assert user_line(violation["access_stack"]) == mark("another loop")
        assert violation["owner_loop"]["serial"] == bound.serial
        assert violation["owner_loop"]["state"] == "idle"
        assert violation["loop"]["serial"] > bound.serial
        assert violation["loop"]["state"] == "running"
        assert "commit or close the session before its loop ends" in violation["hint"]

    def test_an_async_connection_under_another_loop(self, pg: Database, enable: Any) -> None:
        log = enable(action="log+raise")
        engine = pg.engine(poolclass=NullPool)
        old = asyncio.new_event_loop()
        try:
            conn = old.run_until_complete(engine.connect())
            assert tracked(conn).loop is not None

            async def elsewhere() -> None:
                await conn.execute(text("select 1"))  # not its loop

            with pytest.raises(sanitizer.ThreadAffinityError):
                run(elsewhere)
            old.run_until_complete(conn.close())
            old.run_until_complete(engine.dispose())
        finally:
            old.close()
        (violation,) = log.records()
        assert (violation["policy"], violation["object_type"]) == ("loop", CONNECTION)
        assert user_line(violation["access_stack"]) == mark("not its loop")

    def test_aiosqlite_sessions_serve_any_loop(self, sqlite: Database,
                                              sanitized: Sanitized) -> None:
        # aiosqlite runs each connection in a thread of its own and answers each call on
        # the calling loop: a session holding one may go on under the next loop.
        engine = sqlite.engine()
        session = AsyncSession(engine)
        for n in (1, 2):
            assert run(lambda n=n: session.scalar(text(f"select {n}"))) == n
        assert tracked(session).loop is None and session.in_transaction()
        run(session.close)
        run(engine.dispose)
        assert sanitized.records() == []


# -- what is allowed ---------------------------------------------------------------------------


class TestAllowed:
    def test_orm_round_trip(self, db: Database, sanitized: Sanitized) -> None:
        async def main() -> None:
            engine = db.engine()
            await create_tables(engine)
            maker = async_sessionmaker(engine, expire_on_commit=False)
            async with maker.begin() as session:
                assert tracked(session).policy is not None
                session.add_all([Author(name="a", books=[Book(title="t1"), Book(title="t2")])])
            async with maker() as session:
                author = await session.get(Author, 1)
                assert author is not None and author.name == "a"
                assert [b.title for b in await author.awaitable_attrs.books] == ["t1", "t2"]
                await session.refresh(author)
                assert await session.scalar(select(Author.name)) == "a"
                assert (await session.scalars(select(Book.title))).all() == ["t1", "t2"]
                result = await session.stream(select(Book.title).order_by(Book.id))
                assert [row.title async for row in result] == ["t1", "t2"]
                titles = await session.stream_scalars(select(Book.title).order_by(Book.id))
                assert [t async for t in titles] == ["t1", "t2"]
                merged = await session.merge(Author(id=1, name="b"))
                await session.flush()
                async with session.begin_nested():
                    await session.delete(await session.get_one(Book, 2))
                conn = await session.connection()
                assert tracked(conn) is tracked(session)
                assert await conn.scalar(text("select count(*) from sqla_async_book")) == 1
                assert await session.run_sync(lambda s: s.get(Author, 1).name) == "b"
                await session.commit()
                assert merged.name == "b"
            async with engine.connect() as conn:
                assert tracked(conn).policy is not None
                async with conn.begin():
                    await conn.execute(text("delete from sqla_async_book"))
                assert await conn.scalar(text("select count(*) from sqla_async_book")) == 0
                await conn.run_sync(Base.metadata.drop_all)
                await conn.commit()
            await engine.dispose()

        run(main)
        assert sanitized.records() == []

    def test_sequential_use_by_different_tasks(self, db: Database,
                                              sanitized: Sanitized) -> None:
        async def main() -> None:
            engine = db.engine()
            session = AsyncSession(engine)
            record = tracked(session)

            async def use(n: int) -> Any:
                value = await session.scalar(text(f"select {n}"))
                await session.commit()  # each task's transaction its own
                return value

            for n in range(3):
                assert await asyncio.create_task(use(n), name=f"user-{n}") == n
                assert record.task is None and record.depth == 0
            await session.close()
            await engine.dispose()

        run(main)
        assert sanitized.records() == []

    def test_a_fixture_task_hands_an_open_transaction_to_the_test_task(
            self, sqlite: Database, sanitized: Sanitized) -> None:
        async def main() -> None:
            engine = sqlite.engine()
            session = AsyncSession(engine)

            async def fixture() -> None:
                await session.execute(text("create table t(x)"))
                await session.execute(text("insert into t values (1)"))

            await asyncio.create_task(fixture(), name="fixture")
            assert session.in_transaction() and tracked(session).task is None
            assert await session.scalar(text("select x from t")) == 1
            await session.rollback()
            await session.close()
            await engine.dispose()

        run(main)
        assert sanitized.records() == []

    def test_async_with_closes_in_a_shielded_task(self, db: Database,
                                                 sanitized: Sanitized) -> None:
        closers: list[str] = []

        async def main() -> None:
            engine = db.engine()

            @event.listens_for(engine.sync_engine, "checkin")
            def checkin(*_args: Any) -> None:
                task = asyncio.current_task()
                closers.append(task.get_name() if task else "")

            async with AsyncSession(engine) as session:
                record = tracked(session)
                await session.execute(text("select 1"))
            # __aexit__ closed it in a task of its own, which entered close() while this
            # task was inside __aexit__ (its helper, through the span in its context).
            assert closers and closers[0] != asyncio.current_task().get_name()  # type: ignore[union-attr]
            assert record.task is None
            async with async_sessionmaker(engine).begin() as session:
                tracked(session)
                await session.execute(text("select 1"))
            await engine.dispose()

        run(main)
        assert sanitized.records() == []

    def test_a_session_per_task_under_gather(self, db: Database,
                                            sanitized: Sanitized) -> None:
        async def main() -> list[Any]:
            engine = db.engine()
            maker = async_sessionmaker(engine)
            hold = db.hold(engine)
            await hold.start()
            records = []

            async def work(n: int) -> Any:
                async with maker() as session:
                    records.append(tracked(session))
                    if n == 0:  # inside a statement while the others run theirs
                        await session.execute(text(hold.statement))
                        return 0
                    await hold.inside.wait()
                    return await session.scalar(text(f"select {n}"))

            async def release_when_done(tasks: list[asyncio.Task[Any]]) -> None:
                await asyncio.gather(*tasks)
                await hold.release()

            tasks = [asyncio.create_task(work(n)) for n in range(1, 4)]
            outcome = await asyncio.gather(work(0), release_when_done(tasks))
            assert len({id(r) for r in records}) == 4
            await engine.dispose()
            return [outcome[0], *(t.result() for t in tasks)]

        assert run(main) == [0, 1, 2, 3]
        assert sanitized.records() == []

    def test_run_sync_and_greenlet_spawn_stay_in_the_task(self, db: Database,
                                                         sanitized: Sanitized) -> None:
        async def main() -> None:
            engine = db.engine()
            async with AsyncSession(engine) as session:
                tracked(session)

                def work(sync_session: Any) -> Any:
                    # Each sync call here awaits the driver in this task, from a greenlet.
                    sync_session.execute(text("select 1"))
                    return sync_session.execute(text("select 2")).scalar()

                assert await session.run_sync(work) == 2
                conn = await session.connection()
                assert await conn.run_sync(lambda c: c.exec_driver_sql("select 3").scalar()) == 3
            await engine.dispose()

        run(main)
        assert sanitized.records() == []

    def test_shield_and_wait_for_run_the_call_in_a_task_of_their_own(
            self, sqlite: Database, sanitized: Sanitized) -> None:
        async def main() -> None:
            engine = sqlite.engine()
            session = AsyncSession(engine)
            tracked(session)
            assert await asyncio.wait_for(session.scalar(text("select 1")), 30) == 1
            await asyncio.shield(session.commit())
            await session.close()
            await engine.dispose()

        run(main)
        assert sanitized.records() == []


class TestNoBlock:
    def test_async_adapters_never_report_blocking(self, pg: Database, enable: Any) -> None:
        log = enable(**{"asyncio.noblock": "network"})

        async def main() -> None:
            engine = pg.engine()
            async with AsyncSession(engine) as session:
                tracked(session)
                assert await session.scalar(text("select 1")) == 1
                await session.commit()
            async with engine.begin() as conn:
                assert await conn.scalar(text("select 2")) == 2
            await engine.dispose()

        run(main)
        assert log.records() == []
        assert sanitizer.violations() == []


# -- the switch ---------------------------------------------------------------------------------


class TestSwitch:
    def test_objects_made_before_enable_stay_untracked(self, sqlite: Database,
                                                       tmp_path: Path) -> None:
        if sanitizer.is_enabled():
            sanitizer.disable()
        engine = sqlite.engine()
        early = AsyncSession(engine)
        sanitizer.enable(log_file=str(tmp_path / "log.jsonl"))
        try:
            async def gather_over(session: AsyncSession) -> None:
                await asyncio.gather(session.scalar(text("select 1")),
                                     session.scalar(text("select 2")),  # the control
                                     return_exceptions=True)
                await session.close()

            async def main() -> None:
                await gather_over(early)
                assert sanitizer.violations() == []
                # The control: a session made the same way after enable() is watched.
                await gather_over(AsyncSession(engine))
                await engine.dispose()

            run(main)
            assert found() == [("task", "scalar")]
        finally:
            sanitizer.disable()

    def test_disable_restores_sqlalchemy(self, tmp_path: Path) -> None:
        from sqlalchemy.ext.asyncio import AsyncSessionTransaction, AsyncTransaction

        if sanitizer.is_enabled():
            sanitizer.disable()
        classes = (AsyncSession, AsyncConnection, AsyncSessionTransaction, AsyncTransaction)
        before = [dict(vars(cls)) for cls in classes]
        sanitizer.enable(log_file=str(tmp_path / "log.jsonl"))
        assert AsyncSession.execute is not before[0]["execute"]
        assert "_sanitizer_record" in vars(AsyncConnection)
        sanitizer.disable()
        assert [dict(vars(cls)) for cls in classes] == before


# -- a real program -----------------------------------------------------------------------------


def test_program_importing_sqlalchemy_asyncio_after_start(tmp_path: Path) -> None:
    source = f"""
        import asyncio, threading
        from sqlalchemy import event, text
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        released = threading.Event()
        engine = create_async_engine("sqlite+aiosqlite:///{tmp_path / 'app.sqlite'}")

        @event.listens_for(engine.sync_engine, "connect")
        def connect(dbapi_connection, _record):
            dbapi_connection.create_function("slow", 0, lambda: released.wait(30) and 1)

        async def report(session, inside):
            await session.execute(text("select 1"))
            inside.set()
            return (await session.execute(text("select slow()"))).scalar()  # holder

        async def main():
            session = AsyncSession(engine)  # made
            inside = asyncio.Event()
            holder = asyncio.create_task(report(session, inside), name="report")
            await inside.wait()  # the holder is inside its statement now
            asyncio.get_running_loop().call_soon(released.set)  # runs after the next line
            total = await session.scalar(text("select 2"))  # meanwhile
            print([await holder, total])
            await session.close()
            await engine.dispose()

        asyncio.run(main())
    """
    proc, records = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert "[1, 2]" in proc.stdout
    (record,) = records
    assert (record["policy"], record["object_type"], record["operation"]) == (
        "task", SESSION, "scalar")
    app = str(tmp_path / "app.py")
    access = next(f for f in record["access_stack"] if f["file"] == app)
    creation = next(f for f in record["creation_stack"] if f["file"] == app)
    assert access["line"] == line_of(source, "meanwhile")
    assert creation["line"] == line_of(source, "made")
    assert record["task"]["name"] == "Task-1" and record["task"]["coroutine"] == "main"
    assert record["holder_task"] == {"name": "report", "coroutine": "report"}
    assert record["holder_stack"][0]["line"] == line_of(source, "holder")
    assert record["loop"]["serial"] == 1 and record["loop"]["state"] == "running"
    assert "thread-affinity (task)" in proc.stderr

