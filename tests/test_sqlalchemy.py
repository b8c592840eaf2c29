"""The SQLAlchemy plugin: Sessions and Connections are exclusive; pools hand connections over."""

from __future__ import annotations

import gc
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from support import found, in_thread, inside_query, line_of_file, raising, started, tracked

import sanitizer
from sanitizer import control, stacks
from sanitizer.ownership import record_of

HERE = __file__
SESSION = "sqlalchemy.orm.session.Session"
CONNECTION = "sqlalchemy.Connection"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Gate:
    """``slow()`` in SQL: signals that a thread is inside a statement, then waits to be released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.intruder_deep = threading.Event()  # thread B got down to the DB-API cursor

    def slow(self) -> int:
        self.entered.set()
        self.release.wait(10)
        return 1


def make_engine(tmp_path: Path, gate: Gate | None = None, **kwargs: Any) -> Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", **kwargs)
    if gate is not None:
        @event.listens_for(engine, "connect")
        def add_slow(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.create_function("slow", 0, gate.slow)

        @event.listens_for(engine, "before_cursor_execute")
        def note_intruder(*_args: Any) -> None:
            if threading.current_thread().name == "B":
                gate.intruder_deep.set()
    return engine


def line_of(marker: str) -> int:
    return line_of_file(HERE, f"# {marker}")


def report_event() -> threading.Event:
    """Set when the running sanitizer reports a violation (a synchronisation point)."""
    reported = threading.Event()
    running = control.running()
    assert running is not None
    running.reporter.add(lambda occurrence: (reported.set(), occurrence)[1])
    return reported


def dbapi_of(conn: Connection) -> Any:
    return conn.connection.dbapi_connection


def policy_of(obj: object) -> str | None:
    record = record_of(obj)
    return record.policy.name if record is not None and record.policy is not None else None


def sites(sanitized: Sanitized) -> list[tuple[str, str, int]]:
    """(object type, access file, access line) of each record in the log."""
    result = []
    for record in sanitized.records():
        user = [f for f in record["access_stack"] if not stacks.is_library_file(f["file"])]
        result.append((record["object_type"], user[0]["file"], user[0]["line"]))
    return result


def race(gate: Gate, hold: Callable[[], Any], intrude: Callable[[], Any],
         deep: bool = True) -> dict[str, Any]:
    """Thread A is inside ``hold`` (in slow()) while thread B calls ``intrude``.

    With ``deep``, A is released only once B has got through every layer down
    to the DB-API cursor, so that each layer had its chance to report.
    """
    reported = report_event()
    a, _ = started(hold, "A")

    def after_a_entered() -> Any:
        gate.entered.wait(10)
        return intrude()
    b, b_outcome = started(after_a_entered, "B")
    try:
        assert reported.wait(10), "no violation reported"
        assert not deep or gate.intruder_deep.wait(10)
    finally:
        gate.release.set()
        a.join()
        b.join()
    return b_outcome


def overlap_is_caught(dbapi_connection: Any) -> None:
    """The control after a pool's silent handoffs: a statement on the same DB-API
    connection while another thread is inside one is reported, and only that (raised,
    before it would wait for SQLite's connection mutex)."""
    assert found() == []
    with inside_query(dbapi_connection), raising(), pytest.raises(
            sanitizer.ThreadAffinityError):
        dbapi_connection.execute("select 1")
    assert found() == [("exclusive", "execute")]


class TestTransparency:
    def test_orm_round_trip(self, sanitized: Sanitized, tmp_path: Path) -> None:
        engine = make_engine(tmp_path)
        Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            session.add_all([Item(name="a"), Item(name="b")])
        with Session(engine) as session:
            assert isinstance(session, Session) and policy_of(session) == "exclusive"
            item = session.get(Item, 1)
            assert item is not None and item in session
            session.refresh(item)
            assert list(session) == [item]
            names = session.scalars(select(Item.name).order_by(Item.name)).all()
            assert names == ["a", "b"]
            assert session.scalar(statement=text("select count(*) from item")) == 2
            result = session.execute(text("select name from item where id = :i"),
                                     params={"i": 2}, execution_options={"x": 1})
            assert result.scalar_one() == "b"
            merged = session.merge(Item(id=2, name="c"))
            session.delete(item)
            session.flush()
            assert session.query(Item).count() == 1
            session.commit()
            assert merged.name == "c"
            session.expire_all()
            assert policy_of(session.connection()) == "exclusive"
        assert sanitized.records() == []

    def test_connection_round_trip(self, sanitized: Sanitized, tmp_path: Path) -> None:
        engine = make_engine(tmp_path)
        with engine.begin() as conn:
            assert isinstance(conn, Connection) and policy_of(conn) == "exclusive"
            conn.exec_driver_sql("create table t(x)")
            conn.execute(text("insert into t values (:x)"), parameters=[{"x": 1}, {"x": 2}])
        with engine.connect() as conn:
            assert conn.scalar(text("select sum(x) from t")) == 3
            assert conn.scalars(text("select x from t order by x")).all() == [1, 2]
            assert conn.execution_options(stream_results=False) is conn
        assert sanitized.records() == []

    def test_a_sessions_connection_shares_its_record(self, sanitized: Sanitized,
                                                     tmp_path: Path) -> None:
        engine = make_engine(tmp_path)
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add(Item(name="a"))
            session.flush()  # connects through the unit of work
            assert record_of(session.connection()) is record_of(session)
            session.commit()
            session.execute(text("select 1"))  # a new transaction, a new Connection
            assert record_of(session.connection()) is record_of(session)
        with engine.connect() as conn:  # not a Session's: its own record
            assert record_of(conn) is not None and record_of(conn) is not record_of(session)
        assert sanitized.records() == []

    def test_engine_and_pool_are_not_tracked(self, sanitized: Sanitized, tmp_path: Path) -> None:
        engine = make_engine(tmp_path)
        assert record_of(engine) is None and record_of(engine.pool) is None
        assert record_of(sessionmaker(engine)) is None

    def test_objects_made_before_enable_stay_untracked(self, tmp_path: Path) -> None:
        if sanitizer.is_enabled():
            sanitizer.disable()
        engine = make_engine(tmp_path)
        early = Session(engine)
        sanitizer.enable(log_file=str(tmp_path / "log.jsonl"))
        try:
            assert record_of(early) is None
            assert in_thread(lambda: early.scalar(text("select 7"))) == 7
            early.close()
            assert sanitizer.violations() == []
            # The control: a Session made the same way after enable() is watched.
            gate = Gate()
            late = Session(make_engine(tmp_path, gate))
            race(gate, lambda: late.execute(text("select slow()")),
                 lambda: late.execute(text("select 2")))
            late.close()
            assert found() == [("exclusive", "execute")]
        finally:
            sanitizer.disable()

    def test_disable_restores_sqlalchemy(self, tmp_path: Path) -> None:
        import sqlalchemy.pool.base as pool_base

        if sanitizer.is_enabled():
            sanitizer.disable()
        original = (Session.execute, Connection.execute, pool_base._finalize_fairy)
        sanitizer.enable(log_file=str(tmp_path / "log.jsonl"))
        assert Session.execute is not original[0] and Connection.execute is not original[1]
        sanitizer.disable()
        assert (Session.execute, Connection.execute, pool_base._finalize_fairy) == original
        assert "_sanitizer_record" not in vars(Session)
        assert record_of(Session(make_engine(tmp_path))) is None


class TestEndToEnd:
    def test_program_importing_sqlalchemy_after_start(self, tmp_path: Path) -> None:
        # SANITIZE_THREADS switches the sanitizer on before the program imports
        # SQLAlchemy: the post-import hooks must patch it then.
        from support import run_program

        source = f"""
            import threading
            from sqlalchemy import create_engine, event, text
            from sqlalchemy.orm import Session

            entered, release = threading.Event(), threading.Event()
            engine = create_engine("sqlite:///{tmp_path / 'app.sqlite'}")

            @event.listens_for(engine, "connect")
            def connect(dbapi_connection, _record):
                def slow():
                    entered.set()
                    return release.wait(10)
                dbapi_connection.create_function("slow", 0, slow)

            session = Session(engine)
            worker = threading.Thread(target=session.execute, args=(text("select slow()"),))
            worker.start()
            entered.wait(10)
            try:
                session.add_all([])  # race
            finally:
                release.set()
                worker.join()
        """
        proc, records = run_program(tmp_path, source)
        assert proc.returncode == 0, proc.stderr
        [record] = records
        assert (record["object_type"], record["operation"]) == (SESSION, "add_all")
        assert record["access_stack"][0]["file"].endswith("app.py")


class TestSilent:
    def test_scoped_session_per_thread_overlapping(self, sanitized: Sanitized,
                                                   tmp_path: Path) -> None:
        gate = Gate()  # for the control
        engine = make_engine(tmp_path, gate)
        both_inside = threading.Barrier(2)

        @event.listens_for(engine, "connect")
        def add_meet(dbapi_connection: Any, _record: Any) -> None:
            # Returns only once both threads are inside a statement at the same time.
            dbapi_connection.create_function("meet", 0, lambda: both_inside.wait(10) * 0)
        registry = scoped_session(sessionmaker(engine))
        sessions: list[Session] = []

        def work() -> int:
            sessions.append(registry())
            value = registry.scalar(text("select meet() + 1"))
            registry.remove()
            return int(value)
        threads = [started(work, f"worker-{i}") for i in range(2)]
        for thread, _ in threads:
            thread.join()
        assert [outcome.get("value") for _, outcome in threads] == [1, 1]
        assert sessions[0] is not sessions[1]
        assert [policy_of(s) for s in sessions] == ["exclusive", "exclusive"]
        assert sanitized.records() == []
        # The control: a registry session given to a second thread while it is in use.
        session = registry()
        race(gate, lambda: session.execute(text("select slow()")),
             lambda: session.execute(text("select 2")))
        registry.remove()
        assert found() == [("exclusive", "execute")]

    def test_queue_pool_hands_a_dbapi_connection_to_another_thread(
            self, sanitized: Sanitized, tmp_path: Path) -> None:
        engine = make_engine(tmp_path, pool_size=1, max_overflow=0, pool_timeout=10)
        seen: list[Any] = []
        a_has_it = threading.Event()

        def use() -> None:
            with engine.connect() as conn:
                seen.append(dbapi_of(conn))
                a_has_it.set()
                conn.execute(text("select 1"))

        def wait_then_use() -> None:
            a_has_it.wait(10)
            use()  # blocks in the pool until thread A checks the connection in
        threads = [started(use, "A"), started(wait_then_use, "B")]
        for thread, outcome in threads:
            thread.join()
            assert "error" not in outcome
        assert seen[0] is seen[1]  # one DB-API connection, used by A then B
        # The pysqlite dialect passes check_same_thread=False for file databases.
        assert policy_of(seen[0]) == "exclusive"
        assert sanitized.records() == []
        overlap_is_caught(seen[0])

    def test_session_handed_from_thread_to_thread(self, sanitized: Sanitized,
                                                  tmp_path: Path) -> None:
        gate = Gate()  # for the control
        engine = make_engine(tmp_path, gate)
        Base.metadata.create_all(engine)
        session = Session(engine)
        tracked(session)

        def write() -> None:
            session.add(Item(name="x"))
            session.commit()
        in_thread(write, "A")
        assert in_thread(lambda: session.scalars(select(Item.name)).all(), "B") == ["x"]
        session.close()
        assert sanitized.records() == []
        # The control: two threads in the same session at once.
        race(gate, lambda: session.execute(text("select slow()")),
             lambda: session.execute(text("select 2")))
        session.close()
        assert found() == [("exclusive", "execute")]

    def test_connection_handed_from_thread_to_thread(self, sanitized: Sanitized,
                                                     tmp_path: Path) -> None:
        gate = Gate()  # for the control
        engine = make_engine(tmp_path, gate)
        conn = engine.connect()
        tracked(conn)
        in_thread(lambda: conn.execute(text("create table t(x)")), "A")
        in_thread(conn.commit, "B")
        assert sanitized.records() == []
        # The control: two threads in the same connection at once.
        race(gate, lambda: conn.execute(text("select slow()")),
             lambda: conn.execute(text("select 2")))
        conn.close()
        assert found() == [("exclusive", "execute")]  # closing it here stays silent

    def test_engine_disposed_by_another_thread(self, sanitized: Sanitized,
                                               tmp_path: Path) -> None:
        engine = make_engine(tmp_path)
        seen: list[Any] = []

        def use() -> None:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
                seen.append(dbapi_of(conn))
        in_thread(use, "worker")
        closed: list[str] = []
        event.listen(engine, "close", lambda *_: closed.append("closed"))
        engine.dispose()  # closes the worker's pooled connection from this thread
        assert closed == ["closed"] and policy_of(seen[0]) == "exclusive"
        assert sanitized.records() == []
        in_thread(use, "worker")  # the control: a pooled connection made the same way ...
        overlap_is_caught(seen[1])  # ... is watched
        engine.dispose()

    def test_static_pool_sequential_use_by_threads(self, sanitized: Sanitized,
                                                   tmp_path: Path) -> None:
        engine = make_engine(tmp_path, poolclass=StaticPool)
        seen: list[Any] = []

        def use() -> None:
            with Session(engine) as session:
                session.execute(text("select 1"))
                seen.append(dbapi_of(session.connection()))
        in_thread(use, "A")
        in_thread(use, "B")
        assert seen[0] is seen[1] and policy_of(seen[0]) == "exclusive"
        assert sanitized.records() == []
        overlap_is_caught(seen[0])

    def test_gc_finalization_on_another_thread(self, sanitized: Sanitized,
                                               tmp_path: Path) -> None:
        # A strict DB-API connection: any use from thread B would be reported.
        engine = make_engine(tmp_path, connect_args={"check_same_thread": True})
        resets: list[str] = []

        @event.listens_for(engine, "reset")
        def on_reset(*_args: Any) -> None:
            resets.append(threading.current_thread().name)
        box: list[Connection] = []

        def hand_over(name: str) -> tuple[threading.Thread, threading.Event]:
            """Thread ``name`` puts a connection in the box and stays alive until ``done``,
            so that B has another thread ident."""
            handed, done = threading.Event(), threading.Event()

            def open_and_hand_over() -> None:
                conn = engine.connect()
                conn.execute(text("select 1"))
                assert policy_of(dbapi_of(conn)) == "strict"
                box.append(conn)
                del conn
                handed.set()
                done.wait(10)
            owner, _ = started(open_and_hand_over, name)
            handed.wait(10)
            return owner, done
        owner, done = hand_over("A")

        def drop() -> None:
            box.clear()
            gc.collect()  # Connection and transaction form a cycle
        in_thread(drop, "B")
        done.set()
        owner.join()
        assert resets == ["B"]  # the pool's finalizer ran, in B
        assert sanitized.records() == []
        # The control: B uses a connection handed over the same way, not in a finalizer.
        owner, done = hand_over("A2")

        def use_then_drop() -> None:
            with pytest.raises(sqlite3.ProgrammingError):  # sqlite3 refuses it too
                dbapi_of(box[0]).execute("select 1")
            drop()
        in_thread(use_then_drop, "B")
        done.set()
        owner.join()
        assert resets == ["B", "B"]
        assert found() == [("strict", "execute")]


class TestCaught:
    def test_session_used_by_two_threads_at_once(self, sanitized: Sanitized,
                                                 tmp_path: Path) -> None:
        gate = Gate()
        session = Session(make_engine(tmp_path, gate))  # session-created
        race(gate, lambda: session.execute(text("select slow()")),
                  lambda: session.execute(text("select 2")))  # session-race
        [violation] = sanitizer.violations()
        assert (violation.policy, violation.object_type, violation.operation) == (
            "exclusive", SESSION, "execute")
        assert violation.holder_thread is not None and violation.holder_thread["name"] == "A"
        assert violation.thread["name"] == "B"
        assert violation.access_site is not None
        assert stacks.line_of(violation.access_site) == line_of("session-race")
        assert violation.creation_site is not None
        assert stacks.line_of(violation.creation_site) == line_of("session-created")
        # Reported once: not again by the Connection and sqlite3 layers beneath.
        assert sites(sanitized) == [(SESSION, HERE, line_of("session-race"))]

    def test_connection_used_by_two_threads_at_once(self, sanitized: Sanitized,
                                                       tmp_path: Path) -> None:
        gate = Gate()
        conn = make_engine(tmp_path, gate).connect()
        race(gate, lambda: conn.execute(text("select slow()")),
                  lambda: conn.execute(text("select 2")))  # connection-race
        conn.close()
        assert sites(sanitized) == [(CONNECTION, HERE, line_of("connection-race"))]
        [violation] = sanitizer.violations()
        assert violation.policy == "exclusive" and violation.operation == "execute"
        assert violation.count == 1  # the sqlite3 connection, made on the same line, is quiet

    def test_sessions_connection_used_while_the_session_is_busy(
            self, sanitized: Sanitized, tmp_path: Path) -> None:
        gate = Gate()
        session = Session(make_engine(tmp_path, gate))
        conn = session.connection()
        race(gate, lambda: session.execute(text("select slow()")),
                  lambda: conn.execute(text("select 2")))  # session-connection-race
        session.close()
        [violation] = sanitizer.violations()
        assert (violation.object_type, violation.root_type) == (CONNECTION, SESSION)
        assert violation.count == 1
        assert sites(sanitized) == [(CONNECTION, HERE, line_of("session-connection-race"))]

    def test_session_flush_racing_a_query(self, sanitized: Sanitized,
                                          tmp_path: Path) -> None:
        gate = Gate()
        engine = make_engine(tmp_path, gate)
        Base.metadata.create_all(engine)
        session = Session(engine)
        session.add(Item(name="pending"))

        def intrude() -> None:
            session.add(Item(name="more"))  # session-add
        race(gate, lambda: session.execute(text("select slow()")), intrude, deep=False)
        session.rollback()
        session.close()
        assert sites(sanitized) == [(SESSION, HERE, line_of("session-add"))]
        assert [v.operation for v in sanitizer.violations()] == ["add"]

    def test_raise_stops_the_intruder_before_the_database(self, enable: Any,
                                                          tmp_path: Path) -> None:
        run = enable(action="log+raise")
        gate = Gate()
        session = Session(make_engine(tmp_path, gate))
        statements: list[str] = []
        event.listen(session.get_bind(), "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        a, _ = started(lambda: session.execute(text("select slow()")), "A")
        gate.entered.wait(10)
        with pytest.raises(sanitizer.ThreadAffinityError, match="inside a call"):
            in_thread(lambda: session.execute(text("select 2")), "B")
        gate.release.set()
        a.join()
        session.close()
        assert statements == ["select slow()"]
        assert [r["object_type"] for r in run.records()] == [SESSION]

    def test_static_pool_shared_dbapi_connection(self, sanitized: Sanitized,
                                                 tmp_path: Path) -> None:
        gate = Gate()
        engine = make_engine(tmp_path, gate, poolclass=StaticPool)
        a_done, b_done = threading.Event(), threading.Event()

        # Once its statement ran, A waits for B's to end: A's next calls on the shared
        # connection (its result's) would overlap B's, and be reported too, if B were
        # still inside one. Exact counting sees that overlap; this test is about B's.
        @event.listens_for(engine, "after_cursor_execute")
        def a_waits_for_b(*_args: Any) -> None:
            if threading.current_thread().name == "A":
                b_done.wait(10)

        def hold() -> None:
            with Session(engine) as session:  # a deep stack down to sqlite3.connect()
                session.execute(text("select slow()"))  # static-created
            a_done.set()

        def intrude() -> None:
            session = Session(engine)
            try:
                session.execute(text("select 2"))  # static-race
            finally:
                b_done.set()
                a_done.wait(10)  # then checking in is a handoff, not a second race
                session.close()
        outcome = race(gate, hold, intrude)
        assert "error" not in outcome
        # Two Sessions, one DB-API connection: caught by the sqlite3 layer, once per
        # operation (making the cursor, then its statement).
        assert {s for s in sites(sanitized)} == {
            ("sqlite3.Connection", HERE, line_of("static-race")),
            ("sqlite3.Cursor", HERE, line_of("static-race"))}
        violation, statement = sanitizer.violations()
        assert (violation.policy, violation.operation) == ("exclusive", "cursor")
        assert (statement.policy, statement.operation) == ("exclusive", "execute")
        # The creation site is the user's line, past SQLAlchemy's deep pool stack.
        assert violation.creation_site is not None
        assert violation.creation_site[0].co_filename == HERE
        assert stacks.line_of(violation.creation_site) == line_of("static-created")

    def test_singleton_pool_closing_a_connection_in_use(self, enable: Any,
                                                        tmp_path: Path) -> None:
        # pool_size=1: B's checkout closes A's connection while A is using it, which
        # can crash CPython's sqlite3; action=raise stops the close before sqlite3
        # (the pool logs and swallows the error) and keeps this test alive.
        sanitized = enable(action="log+raise")
        gate = Gate()
        engine = make_engine(tmp_path, gate, poolclass=SingletonThreadPool, pool_size=1)

        def hold() -> None:
            with engine.connect() as conn:
                conn.execute(text("select slow()"))

        def intrude() -> None:
            with engine.connect() as conn:  # singleton-cleanup
                conn.execute(text("select 2"))
        outcome = race(gate, hold, intrude)
        assert "error" not in outcome  # the pool swallowed ThreadAffinityError
        assert sites(sanitized) == [("sqlite3.Connection", HERE, line_of("singleton-cleanup"))]
        [violation] = sanitizer.violations()
        assert (violation.policy, violation.operation) == ("exclusive", "close")

    def test_checkin_is_a_use_unlike_gc(self, sanitized: Sanitized, tmp_path: Path) -> None:
        # Returning A's strict DB-API connection to the pool from B runs the pool's
        # _finalize_fairy outside garbage collection: a use like any other.
        engine = make_engine(tmp_path, connect_args={"check_same_thread": True})
        box: list[Any] = []
        handed, done = threading.Event(), threading.Event()

        def open_and_hand_over() -> None:
            raw = engine.raw_connection()
            raw.cursor().execute("select 1")
            box.append(raw)
            handed.set()
            done.wait(10)  # stays alive, so that B has another thread ident
        owner, _ = started(open_and_hand_over, "A")
        handed.wait(10)
        in_thread(lambda: box[0].close(), "B")  # checkin-in-b
        done.set()
        owner.join()
        assert set(sites(sanitized)) == {("sqlite3.Connection", HERE, line_of("checkin-in-b"))}
        # The pool's rollback fails (sqlite3 raises too), so it closes the connection:
        # two operations, two findings.
        assert [(v.policy, v.operation) for v in sanitizer.violations()] == [
            ("strict", "rollback"), ("strict", "close")]
