"""The DB-API plugin on real PostgreSQL and MariaDB servers, driven from real threads."""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import found, in_thread, raising, tracked

import sanitizer
from sanitizer.ownership import record_of

TIMEOUT = 30

# driver module -> its server fixture. pg8000 is not built in: it is enabled by
# the dbapi.drivers option and tracked through proxies.
DRIVERS = {
    "psycopg2": "postgresql_server",
    "psycopg": "postgresql_server",
    "pymysql": "mariadb_server",
    "MySQLdb": "mariadb_server",
    "pg8000": "postgresql_server",
}
# Drivers that convert result values while executing (the others while fetching).
CONVERT_IN_EXECUTE = ("pymysql", "MySQLdb", "pg8000")


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "violations.jsonl"


@pytest.fixture
def sanitized(log_file: Path) -> Iterator[None]:
    # include_args: SQL text goes into the log, so the tests see what a user would.
    sanitizer.enable(plugins="dbapi", log_file=str(log_file), include_args=True,
                     **{"dbapi.drivers": "pg8000"})
    try:
        yield
    finally:
        sanitizer.disable()


@pytest.fixture(params=list(DRIVERS))
def driver(request: pytest.FixtureRequest, sanitized: None) -> Driver:
    module = pytest.importorskip(request.param)
    server = request.getfixturevalue(DRIVERS[request.param])
    return Driver(request.param, module, server)


class Driver:
    def __init__(self, name: str, module: Any, server: Any) -> None:
        self.name, self.module, self.server = name, module, server

    @property
    def postgres(self) -> bool:
        return self.name in ("psycopg2", "psycopg", "pg8000")

    def connect(self, **extra: Any) -> Any:
        kwargs = dict(self.server.kwargs)
        if self.name == "pg8000":
            kwargs["database"] = kwargs.pop("dbname")
        return self.module.connect(**kwargs, **extra)

    def table(self, conn: Any) -> str:
        """A fresh table for this test, made in autocommit-free mode and committed."""
        name = f"t_{threading.get_ident() % 100000}_{os.getpid()}"
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {name}")
        cur.execute(f"CREATE TABLE {name} (n INTEGER)")
        conn.commit()
        cur.close()
        return name


def run(*targets: Callable[[], None]) -> None:
    """Run each target in its own thread; re-raise the first failure."""
    errors: list[BaseException] = []

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)
        return body

    threads = [threading.Thread(target=wrap(t), name=f"worker-{i}")
               for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


def rows(fetched: Any) -> list[tuple[Any, ...]]:
    """Rows as a list of tuples, whatever sequence types the driver returns."""
    return [tuple(row) for row in fetched]


def policies() -> list[str]:
    return [v.policy for v in sanitizer.violations()]


# -- correct patterns stay silent ----------------------------------------------------------


def test_pool_handoff_is_silent(driver: Driver) -> None:
    conn = driver.connect()
    table = driver.table(conn)
    returned = threading.Event()

    def a() -> None:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (1)")
        conn.commit()
        cur.close()
        returned.set()  # back in the pool

    def b() -> None:
        assert returned.wait(TIMEOUT)
        cur = conn.cursor()
        cur.execute(f"SELECT n FROM {table}")
        assert rows(cur.fetchall()) == [(1,)]
        conn.rollback()
        cur.close()

    run(a, b)
    assert sanitizer.violations() == []
    _overlap_is_caught(driver, conn)  # the control
    conn.close()
    assert found() == [("exclusive", "fetchall")]  # closing it was silent


def test_connection_per_thread_is_silent(driver: Driver) -> None:
    barrier = threading.Barrier(3)
    watched: list[bool] = []

    def worker() -> None:
        conn = driver.connect()
        watched.append(record_of(conn) is not None)
        cur = conn.cursor()
        barrier.wait(TIMEOUT)  # all three are in flight together
        for _ in range(20):
            cur.execute("SELECT 1")
            assert tuple(cur.fetchone()) == (1,)
        conn.commit()
        conn.close()

    run(worker, worker, worker)
    assert sanitizer.violations() == []
    assert watched == [True] * 3
    conn = in_thread(driver.connect, "maker")  # the control, on one made the same way
    _overlap_is_caught(driver, conn)
    conn.close()
    assert found() == [("exclusive", "fetchall")]


def test_records_are_tracked_with_resource(driver: Driver) -> None:
    conn = driver.connect()
    record = record_of(conn)
    assert record is not None
    level = driver.module.threadsafety
    assert record.policy is not None
    assert record.policy.name == ("transaction" if level >= 2 else "exclusive")
    cur = conn.cursor()
    cursor_record = record_of(cur)
    assert cursor_record is not None
    assert (cursor_record is record) == (level < 2)  # level 1: one record for both
    resource = record.resource
    assert resource is not None
    assert resource["host"] == driver.server.host
    assert int(resource["port"]) == driver.server.port
    assert resource["database"] == driver.server.dbname
    assert driver.server.password not in repr(resource)
    conn.close()


# -- misuse is caught ----------------------------------------------------------------------


def _pausing(inside: threading.Event, release: threading.Event) -> Callable[..., int]:
    """An integer converter that signals ``inside`` and waits for ``release``, once."""

    def convert(value: Any, *_: Any) -> int:
        if not release.is_set():
            inside.set()
            assert release.wait(TIMEOUT)
        return int(value)
    return convert


def _pause_inside_conversion(driver: Driver, inside: threading.Event,
                             release: threading.Event) -> Any:
    """A connection whose driver calls back into Python, and waits, converting an integer."""
    convert = _pausing(inside, release)
    if driver.name in ("pymysql", "MySQLdb"):
        constants = __import__(f"{driver.name}.constants", fromlist=["FIELD_TYPE"])
        converters = __import__(f"{driver.name}.converters", fromlist=["conversions"])
        conv = dict(converters.conversions)
        conv[constants.FIELD_TYPE.LONGLONG] = conv[constants.FIELD_TYPE.LONG] = convert
        return driver.connect(conv=conv)
    conn = driver.connect()
    _install_converter(driver, conn, convert)
    return conn


def _install_converter(driver: Driver, conn: Any, convert: Callable[..., int]) -> None:
    """Make an open connection convert integers with ``convert``."""
    if driver.name in ("pymysql", "MySQLdb"):
        constants = __import__(f"{driver.name}.constants", fromlist=["FIELD_TYPE"])
        # The converters that the driver's result sets read as they are made.
        table = conn.decoders if driver.name == "pymysql" else conn.converter
        table[constants.FIELD_TYPE.LONGLONG] = table[constants.FIELD_TYPE.LONG] = convert
    elif driver.name == "psycopg2":
        ext = driver.module.extensions
        ext.register_type(ext.new_type((23,), "SLOWINT4", convert), conn)
    elif driver.name == "psycopg":
        from psycopg.adapt import Loader

        class SlowLoader(Loader):
            def load(self, data: Any) -> int:
                return convert(bytes(data))

        conn.adapters.register_loader("int4", SlowLoader)
    else:
        conn.register_in_adapter(23, convert)


def _race_on_a_cursor(driver: Driver, conn: Any, inside: threading.Event,
                      release: threading.Event) -> list[sanitizer.ThreadAffinityError]:
    """worker-0 pauses inside one cursor of ``conn`` (execute() or fetchall(), in the
    driver's converter) while worker-1 calls fetchall() on it, under action=raise;
    the ThreadAffinityErrors worker-1 got."""
    query = "SELECT CAST(1 AS INTEGER)" if driver.postgres else "SELECT 1"
    cur = conn.cursor()
    in_execute = driver.name in CONVERT_IN_EXECUTE
    if not in_execute:
        cur.execute(query)  # this thread's transaction, if any: closing it here is silent
    caught: list[sanitizer.ThreadAffinityError] = []

    def a() -> None:  # pauses inside execute() or fetchall(), in the driver
        try:
            if in_execute:
                cur.execute(query)
            assert rows(cur.fetchall()) == [(1,)]
        finally:
            release.set()

    def b() -> None:
        try:
            assert inside.wait(TIMEOUT)
            cur.fetchall()  # action=raise: stopped before it reaches the driver
        except sanitizer.ThreadAffinityError as exc:
            caught.append(exc)
        finally:
            release.set()

    with raising():
        run(a, b)
    cur.close()
    return caught


def _overlap_is_caught(driver: Driver, conn: Any) -> None:
    """The control after a silent part: two threads inside one cursor of ``conn`` at once
    (exclusive at every threadsafety level) are reported, and only that. As in
    test_concurrent_cursor_use_is_caught, on a connection that is already open."""
    assert sanitizer.violations() == []
    tracked(conn)
    inside, release = threading.Event(), threading.Event()
    _install_converter(driver, conn, _pausing(inside, release))
    caught = _race_on_a_cursor(driver, conn, inside, release)
    assert len(caught) == 1
    assert found() == [("exclusive", "fetchall")]


def test_concurrent_cursor_use_is_caught(driver: Driver, log_file: Path) -> None:
    """Two threads inside one cursor at once: exclusive at every threadsafety level."""
    inside, release = threading.Event(), threading.Event()
    conn = _pause_inside_conversion(driver, inside, release)
    caught = _race_on_a_cursor(driver, conn, inside, release)
    conn.close()
    assert policies() == ["exclusive"]
    assert len(caught) == 1
    assert caught[0].violation.holder_thread is not None
    assert caught[0].violation.holder_thread["name"] == "worker-0"
    text = log_file.read_text()
    assert driver.server.password not in text  # never, not even with include_args=1
    event = json.loads(text.splitlines()[0])
    assert event["policy"] == "exclusive"
    assert event["resource"]["host"] == driver.server.host
    assert int(event["resource"]["port"]) == driver.server.port
    assert event["resource"]["database"] == driver.server.dbname


# -- the transaction-aware policy (threadsafety >= 2) ----------------------------------------

PG_DRIVERS = ["psycopg2", "psycopg"]


@pytest.fixture(params=PG_DRIVERS)
def pg_driver(request: pytest.FixtureRequest, sanitized: None,
              postgresql_server: Any) -> Driver:
    return Driver(request.param, pytest.importorskip(request.param), postgresql_server)


def _two_threads_one_connection(driver: Driver, conn: Any, table: str) -> None:
    opened, done = threading.Event(), threading.Event()

    def a() -> None:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (1)")  # opens a transaction unless autocommit
        opened.set()
        assert done.wait(TIMEOUT)  # paused mid-transaction
        conn.commit()

    def b() -> None:
        assert opened.wait(TIMEOUT)
        try:
            cur = conn.cursor()
            cur.execute(f"INSERT INTO {table} VALUES (2)")
        finally:
            done.set()

    run(a, b)


def test_statement_inside_another_threads_transaction_is_caught(
        pg_driver: Driver, log_file: Path) -> None:
    conn = pg_driver.connect()
    table = pg_driver.table(conn)
    _two_threads_one_connection(pg_driver, conn, table)
    conn.close()
    found = sanitizer.violations()
    assert [v.policy for v in found] == ["transaction"]
    violation = found[0]
    assert violation.operation == "execute"
    assert violation.thread["name"] == "worker-1"
    assert violation.holder_thread is not None and violation.holder_thread["name"] == "worker-0"
    assert "open transaction" in violation.message
    event = json.loads(log_file.read_text().splitlines()[0])
    assert event["policy"] == "transaction"
    assert event["resource"]["database"] == pg_driver.server.dbname


def test_commit_of_another_threads_transaction_is_caught(pg_driver: Driver) -> None:
    conn = pg_driver.connect()
    table = pg_driver.table(conn)
    opened, done = threading.Event(), threading.Event()

    def a() -> None:
        conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")
        opened.set()
        assert done.wait(TIMEOUT)

    def b() -> None:
        assert opened.wait(TIMEOUT)
        try:
            conn.commit()  # commits worker-0's half-done work
        finally:
            done.set()

    run(a, b)
    conn.close()
    found = sanitizer.violations()
    assert [(v.policy, v.operation) for v in found] == [("transaction", "commit")]


def test_commit_racing_the_first_statement_is_caught(pg_driver: Driver) -> None:
    """worker-1 commits while worker-0's first INSERT of a transaction is still running."""
    conn = pg_driver.connect()
    table = pg_driver.table(conn)
    noisy = f"{table}_noisy"
    conn.cursor().execute(f"CREATE OR REPLACE FUNCTION {noisy}() RETURNS integer LANGUAGE plpgsql "
                          "AS $$ BEGIN RAISE NOTICE 'inside'; RETURN 1; END $$")
    conn.commit()
    inside, release = threading.Event(), threading.Event()

    def pause(*_: Any) -> None:  # the driver calls this from inside execute()
        if not release.is_set():
            inside.set()
            assert release.wait(TIMEOUT)

    if pg_driver.name == "psycopg2":
        class Notices(list):  # type: ignore[type-arg]
            def append(self, notice: Any) -> None:
                pause()
                super().append(notice)

        conn.notices = Notices()
    else:
        conn.add_notice_handler(pause)
    caught: list[sanitizer.ThreadAffinityError] = []

    def a() -> None:
        try:
            conn.cursor().execute(f"INSERT INTO {table} VALUES ({noisy}())")
        finally:
            release.set()
        conn.rollback()  # its own transaction: silent

    def b() -> None:
        try:
            assert inside.wait(TIMEOUT)
            conn.commit()  # would commit worker-0's half-done transaction
        except sanitizer.ThreadAffinityError as exc:
            caught.append(exc)
        finally:
            release.set()

    with raising():
        run(a, b)
    conn.close()
    assert [(v.policy, v.operation) for v in sanitizer.violations()] == [
        ("transaction", "commit")]
    assert len(caught) == 1


def test_autocommit_sharing_is_silent(pg_driver: Driver) -> None:
    conn = pg_driver.connect()
    table = pg_driver.table(conn)
    conn.autocommit = True
    _two_threads_one_connection(pg_driver, conn, table)
    assert sanitizer.violations() == []
    tracked(conn)
    conn.autocommit = False  # the control: the same two threads, inside a transaction
    _two_threads_one_connection(pg_driver, conn, table)
    conn.close()
    assert found() == [("transaction", "execute")]


def test_explicit_sharing_is_silent(pg_driver: Driver) -> None:
    conn = pg_driver.connect()
    table = pg_driver.table(conn)
    with sanitizer.shared(conn):
        _two_threads_one_connection(pg_driver, conn, table)
    assert sanitizer.violations() == []
    tracked(conn)
    _two_threads_one_connection(pg_driver, conn, table)  # the control: not shared
    conn.close()
    assert found() == [("transaction", "execute")]


def test_transaction_holder_clears_on_rollback(pg_driver: Driver) -> None:
    conn = pg_driver.connect()
    record = record_of(conn)
    assert record is not None
    cur = conn.cursor()
    cur.execute("SELECT 1")
    assert record.busy is not None  # this thread opened a transaction
    conn.rollback()
    assert record.busy is None
    conn.close()


# -- driver integration keeps working ---------------------------------------------------------


def test_psycopg2_integration(sanitized: None, postgresql_server: Any) -> None:
    pytest.importorskip("psycopg2")
    import psycopg2.extras

    conn = psycopg2.connect(**postgresql_server.kwargs)
    assert isinstance(conn, psycopg2.extensions.connection)
    psycopg2.extras.register_uuid(conn_or_curs=conn)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE u (n INTEGER)")
        psycopg2.extras.execute_values(cur, "INSERT INTO u VALUES %s", [(1,), (2,)])
        cur.execute("SELECT n FROM u ORDER BY n")
        assert [row[0] for row in cur] == [1, 2]
    dict_conn = psycopg2.connect(**postgresql_server.kwargs,
                                 connection_factory=psycopg2.extras.RealDictConnection)
    cur = dict_conn.cursor()
    assert record_of(cur) is not None  # tracked through the factory's own cursor()
    cur.execute("SELECT 1 AS one")
    assert cur.fetchone() == {"one": 1}
    named = conn.cursor(name="server_side", cursor_factory=psycopg2.extras.DictCursor)
    named.execute("SELECT generate_series(1, 3) AS n")
    assert [row["n"] for row in named] == [1, 2, 3]
    conn.close()
    dict_conn.close()
    assert sanitizer.violations() == []


def test_psycopg_integration(sanitized: None, postgresql_server: Any) -> None:
    psycopg = pytest.importorskip("psycopg")
    from psycopg.rows import dict_row

    with psycopg.connect(**postgresql_server.kwargs, row_factory=dict_row) as conn:
        assert isinstance(conn, psycopg.Connection)
        assert record_of(conn) is not None
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT 2 AS two")
            assert record_of(cur) is not None
            assert list(cur) == [{"two": 2}]
        with conn.cursor(name="server_side") as named:
            named.execute("SELECT generate_series(1, 3) AS n")
            assert [row["n"] for row in named] == [1, 2, 3]
    assert sanitizer.violations() == []


@pytest.mark.parametrize("name", list(DRIVERS))
def test_disable_restores_drivers(name: str, request: pytest.FixtureRequest) -> None:
    module = pytest.importorskip(name)
    driver = Driver(name, module, request.getfixturevalue(DRIVERS[name]))
    sanitizer.enable(plugins="dbapi", **{"dbapi.drivers": "pg8000"})
    tracked = driver.connect()
    tracked_type = type(tracked)
    assert record_of(tracked) is not None
    sanitizer.disable()
    conn = driver.connect()
    assert record_of(conn) is None
    assert type(conn).__dict__.get("__sanitizer_policy__") is None
    assert "_sanitizer_record" not in type(conn).__dict__
    for method in ("commit", "close"):  # guards carry __sanitizer_policy__; originals do not
        assert not hasattr(getattr(type(conn), method), "__sanitizer_policy__")
    if name not in ("pymysql", "MySQLdb"):  # those two are patched in place
        assert type(conn) is not tracked_type
    cur = conn.cursor()
    cur.execute("SELECT 1")
    assert record_of(cur) is None
    conn.close()
    tracked.close()  # still works after disable; nothing reported, nothing raised


def test_psycopg2_pool_handoff_is_silent(sanitized: None, postgresql_server: Any) -> None:
    """A real pool of one connection, passed from thread to thread; putconn() rolls back."""
    pytest.importorskip("psycopg2")
    import psycopg2.pool

    pool = psycopg2.pool.ThreadedConnectionPool(1, 1, **postgresql_server.kwargs)
    first_done = threading.Event()
    seen: list[Any] = []

    def a() -> None:
        conn = pool.getconn()
        seen.append(conn)
        conn.cursor().execute("SELECT 1")  # leaves a transaction open...
        pool.putconn(conn)  # ...which the pool rolls back, in this thread
        first_done.set()

    def b() -> None:
        assert first_done.wait(TIMEOUT)
        conn = pool.getconn()
        seen.append(conn)
        cur = conn.cursor()
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
        conn.commit()
        pool.putconn(conn)

    run(a, b)
    assert seen[0] is seen[1] and record_of(seen[0]) is not None
    assert sanitizer.violations() == []
    # The control: the pooled connection, used by two threads inside one transaction.
    driver = Driver("psycopg2", psycopg2, postgresql_server)
    conn = pool.getconn()
    _two_threads_one_connection(driver, conn, driver.table(conn))
    pool.putconn(conn)
    pool.closeall()
    assert found() == [("transaction", "execute")]


# -- fork, logs, generic drivers ----------------------------------------------------------------


@pytest.mark.parametrize("inherited_cursor", [False, True])
def test_fork_is_caught(sanitized: None, postgresql_server: Any, log_file: Path,
                        inherited_cursor: bool) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    conn = psycopg2.connect(**postgresql_server.kwargs)
    conn.autocommit = True
    before = conn.cursor()
    with raising():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                (before if inherited_cursor else conn.cursor()).execute("SELECT 1")
            except sanitizer.ThreadAffinityError:
                code = 0  # raised before anything reached the parent's socket
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(e["policy"], e["pid"]) for e in events] == [("process", pid)]
    cur = conn.cursor()  # the parent's connection is intact and its use silent
    cur.execute("SELECT 1")
    assert cur.fetchone() == (1,)
    conn.close()
    assert sanitizer.violations() == []


def test_closing_an_inherited_connection_in_a_child_is_reported_with_why(
        driver: Driver, log_file: Path) -> None:
    # Unlike sqlite3's, closing a server connection in a forked child speaks the
    # protocol (terminate / COM_QUIT) over the parent's socket.
    conn = driver.connect()
    assert record_of(conn) is not None
    with raising():  # stopped before anything reaches the parent's socket
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                conn.close()
            except sanitizer.ThreadAffinityError:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    [event] = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (event["policy"], event["operation"], event["pid"]) == ("process", "close", pid)
    assert "inherited across fork()" in event["message"]
    assert "terminate message over the socket the parent still uses" in event["message"]
    cur = conn.cursor()  # the parent's session is intact
    cur.execute("SELECT 1")
    assert rows(cur.fetchall()) == [(1,)]
    conn.close()


def test_generic_driver_keeps_its_type(sanitized: None, postgresql_server: Any) -> None:
    pg8000 = pytest.importorskip("pg8000")
    kwargs = dict(postgresql_server.kwargs)
    kwargs["database"] = kwargs.pop("dbname")
    with pg8000.connect(**kwargs) as conn:  # the proxy stays in the with block
        assert isinstance(conn, pg8000.Connection)
        assert record_of(conn) is not None
        cur = conn.cursor()
        assert record_of(cur) is record_of(conn)
        cur.execute("SELECT generate_series(1, 3)")
        assert [row[0] for row in cur] == [1, 2, 3]
    assert sanitizer.violations() == []


def test_bad_driver_option() -> None:
    with pytest.raises(sanitizer.ConfigError, match=r"dbapi\.drivers"):
        sanitizer.enable(plugins="dbapi", **{"dbapi.drivers": "not a module!"})
    assert not sanitizer.is_enabled()


def test_finalizer_on_another_thread_is_silent(sanitized: None, postgresql_server: Any) -> None:
    """A wrapper's __del__ closing the connection, run by the GC in another thread."""
    psycopg2 = pytest.importorskip("psycopg2")
    opened, collected = threading.Event(), threading.Event()

    class Repository:
        def __init__(self) -> None:
            self.conn = psycopg2.connect(**postgresql_server.kwargs)
            self.cycle = self  # only the cyclic GC frees it

        def __del__(self) -> None:
            self.conn.close()  # ends worker-0's open transaction, from worker-1

    def a() -> None:
        repo = Repository()
        tracked(repo.conn)
        repo.conn.cursor().execute("SELECT 1")  # worker-0 holds a transaction
        del repo
        opened.set()
        assert collected.wait(TIMEOUT)  # still alive while the GC runs elsewhere

    def b() -> None:
        try:
            assert opened.wait(TIMEOUT)
            gc.collect()
        finally:
            collected.set()

    gc.disable()  # the collection must happen in worker-1, not wherever it would
    try:
        run(a, b)
    finally:
        gc.enable()
    assert sanitizer.violations() == []
    # The control: the same close by worker-1, not in a finalizer, is reported.
    box: list[Repository] = []
    opened, closed = threading.Event(), threading.Event()

    def a2() -> None:
        box.append(Repository())
        box[0].conn.cursor().execute("SELECT 1")
        opened.set()
        assert closed.wait(TIMEOUT)

    def b2() -> None:
        try:
            assert opened.wait(TIMEOUT)
            box[0].conn.close()  # ends worker-0's open transaction
        finally:
            closed.set()

    run(a2, b2)
    box[0].cycle = None
    box.clear()  # its __del__ closes it again, here: a finalizer, silent
    assert found() == [("transaction", "close")]


def test_thread_that_exited_mid_transaction_is_named(pg_driver: Driver) -> None:
    conn = pg_driver.connect()
    table = pg_driver.table(conn)

    def a() -> None:
        conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")  # and never commits

    run(a)
    conn.cursor().execute(f"INSERT INTO {table} VALUES (2)")
    conn.close()
    found = sanitizer.violations()
    # The statement joins worker-0's transaction, and close() then rolls it back.
    assert [(v.policy, v.operation) for v in found] == [("transaction", "execute"),
                                                        ("transaction", "close")]
    assert "worker-0' (which exited without ending it)" in found[0].message


GENERIC_LEVEL_2 = '''"""A threadsafety 2 DB-API module the plugin does not know."""
from psycopg2 import _connect, extensions, threadsafety  # noqa: F401


def connect(dsn):
    return _connect(dsn)
'''


@pytest.mark.parametrize("autocommit", [False, True])
def test_generic_driver_at_level_2_infers_transactions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_file: Path,
        postgresql_server: Any, autocommit: bool) -> None:
    pytest.importorskip("psycopg2")
    # A fresh name per run: post-import hooks fire once per module name and process.
    name = f"pg_direct_{autocommit}_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(GENERIC_LEVEL_2)
    monkeypatch.syspath_prepend(str(tmp_path))
    sanitizer.enable(plugins="dbapi", log_file=str(log_file), **{"dbapi.drivers": name})
    try:
        pg_direct = importlib.import_module(name)

        conn = pg_direct.connect(postgresql_server.dsn)
        record = record_of(conn)
        assert record is not None and record.policy is not None
        assert record.policy.name == "transaction"
        assert isinstance(conn, pg_direct.extensions.connection)
        conn.autocommit = autocommit  # set on the real connection, through the proxy
        cur = conn.cursor()
        assert record_of(cur) is not record  # level 2: cursors are objects of their own
        cur.execute("CREATE TEMP TABLE g (n INTEGER)")
        conn.commit()
        table = "g"
        direct = Driver("pg_direct", pg_direct, postgresql_server)
        _two_threads_one_connection(direct, conn, table)
        silent = [(v.policy, v.operation) for v in sanitizer.violations()]
        if autocommit:  # the control: the same two threads, inside a transaction
            conn.autocommit = False
            _two_threads_one_connection(direct, conn, table)
        conn.close()
        reported = [(v.policy, v.operation) for v in sanitizer.violations()]
    finally:
        sanitizer.disable()
        sys.modules.pop(name, None)
    assert silent == ([] if autocommit else [("transaction", "execute")])
    assert reported == [("transaction", "execute")]
    assert postgresql_server.password not in (log_file.read_text() if log_file.exists() else "")
