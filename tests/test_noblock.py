"""The noblock policy: blocking driver calls on a thread whose event loop is running.

Real PostgreSQL and MariaDB servers (tests/dbservers.py), real drivers, real loops.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import found, in_thread, line_in, line_of, line_of_file, only, run_program, tracked

import sanitizer
from sanitizer.ownership import record_of
from sanitizer.plugin import NOBLOCK, STRICT, Check, Context, Policy, new_record
from sanitizer.state import STATE

HERE = Path(__file__)
TIMEOUT = 30
# driver module -> its server fixture
NETWORK_DRIVERS = {
    "psycopg2": "postgresql_server",
    "psycopg": "postgresql_server",
    "pymysql": "mariadb_server",
    "MySQLdb": "mariadb_server",
}


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "violations.jsonl"


@pytest.fixture
def start(log_file: Path) -> Iterator[Callable[..., None]]:
    """Enable with these options (the dbapi, sqlite3, duckdb and asyncio plugins)."""
    def enable(**options: Any) -> None:
        if sanitizer.is_enabled():
            sanitizer.disable()
        options.setdefault("plugins", "dbapi+sqlite3+duckdb+asyncio")
        sanitizer.enable(log_file=str(log_file), **options)
    try:
        yield enable
    finally:
        sanitizer.disable()


class Driver:
    def __init__(self, name: str, module: Any, server: Any) -> None:
        self.name, self.module, self.server = name, module, server

    def connect(self, **extra: Any) -> Any:
        return self.module.connect(**self.server.kwargs, **extra)


@pytest.fixture(params=list(NETWORK_DRIVERS))
def driver(request: pytest.FixtureRequest, start: Callable[..., None]) -> Driver:
    module = pytest.importorskip(request.param)
    server = request.getfixturevalue(NETWORK_DRIVERS[request.param])
    start()
    return Driver(request.param, module, server)


def line(frame: Any) -> int:
    """The line in this file of a captured frame (a report's site)."""
    return line_in(HERE, frame)


def assert_on_the_loop(violation: Any, coroutine: str) -> None:
    """The loop and task fields of a noblock report made in ``coroutine`` under asyncio.run."""
    assert violation.loop is not None and violation.loop["state"] == "running"
    assert isinstance(violation.loop["serial"], int)
    assert violation.loop["thread"]["name"] == threading.current_thread().name
    assert violation.task is not None and violation.task["coroutine"].endswith(coroutine)
    assert violation.task["name"].startswith("Task-")  # asyncio.run's main task
    assert "which runs event loop L" in violation.message
    assert "(noblock policy)" in violation.message


# -- network drivers: reported by default -----------------------------------------------


def test_a_statement_on_the_loop_is_reported_once(driver: Driver) -> None:
    conn = driver.module.connect(**driver.server.kwargs)  # nb-made
    cur = conn.cursor()

    async def handler() -> list[Any]:
        cur.execute("SELECT 1")  # nb-statement
        return list(cur.fetchall())  # a client-side cursor's rows came with execute()

    assert [tuple(r) for r in asyncio.run(handler())] == [(1,)]
    violation = only()
    assert (violation.policy, violation.operation) == ("noblock", "execute")
    assert line(violation.access_site) == line_of_file(HERE, "# nb-statement")
    assert violation.hint == "await an async driver, or run the call in asyncio.to_thread()"
    assert line(violation.creation_site) == line_of_file(HERE, "# nb-made")
    assert_on_the_loop(violation, "handler")
    assert violation.resource["host"] == driver.server.host
    conn.rollback()
    conn.close()


def test_connecting_on_the_loop_is_reported_before_it_blocks(driver: Driver) -> None:
    async def handler() -> Any:
        return driver.module.connect(**driver.server.kwargs)  # nb-connect

    conn = asyncio.run(handler())
    tracked(conn)
    violation = only()
    assert (violation.policy, violation.operation) == ("noblock", "connect")
    assert line(violation.access_site) == line_of_file(HERE, "# nb-connect")
    assert line(violation.creation_site) == line_of_file(HERE, "# nb-connect")
    assert violation.object_type.endswith(("connection", "Connection"))
    assert_on_the_loop(violation, "handler")
    conn.close()


def test_a_commit_on_the_loop_is_reported(driver: Driver) -> None:
    conn = driver.connect()

    async def handler() -> None:
        conn.commit()  # nb-commit

    asyncio.run(handler())
    violation = only()
    assert (violation.policy, violation.operation) == ("noblock", "commit")
    assert line(violation.access_site) == line_of_file(HERE, "# nb-commit")
    conn.close()


def test_action_raise_refuses_the_call_before_it_runs(driver: Driver,
                                                      start: Callable[..., None]) -> None:
    conn = driver.connect()
    cur = conn.cursor()
    cur.execute("CREATE TEMPORARY TABLE nb_raise (n INTEGER)")
    start(action="raise")

    async def handler() -> None:
        cur.execute("INSERT INTO nb_raise VALUES (1)")

    with pytest.raises(sanitizer.ThreadAffinityError, match="noblock policy"):
        asyncio.run(handler())
    cur.execute("SELECT count(*) FROM nb_raise")  # no loop now: allowed
    assert tuple(cur.fetchone()) == (0,)  # the INSERT never ran
    conn.close()


# -- sqlite3 and DuckDB: only with asyncio.noblock=all -------------------------------------


def sqlite_control(conn: Any) -> None:
    """The control of a silence test: ``conn`` is watched (another thread's use is caught)."""
    import sqlite3

    tracked(conn)
    with pytest.raises(sqlite3.ProgrammingError):  # sqlite3's own, after our report
        in_thread(lambda: conn.execute("SELECT 1"), "other")
    assert found() == [("strict", "execute")]


def test_sqlite3_is_silent_by_default(start: Callable[..., None]) -> None:
    import sqlite3

    start()
    conn = sqlite3.connect(":memory:")

    async def handler() -> Any:
        return conn.execute("SELECT 1").fetchall()

    assert asyncio.run(handler()) == [(1,)]
    assert sanitizer.violations() == []
    sqlite_control(conn)


def test_sqlite3_is_reported_with_noblock_all(start: Callable[..., None]) -> None:
    import sqlite3

    start(**{"asyncio.noblock": "all"})
    conn = sqlite3.connect(":memory:")  # nb-sqlite-made

    async def handler() -> Any:
        return conn.execute("SELECT 1").fetchall()  # nb-sqlite

    assert asyncio.run(handler()) == [(1,)]
    # Each blocking operation once: the statement, and the fetch that steps it.
    assert found() == [("noblock", "execute"), ("noblock", "fetchall")]
    violation = sanitizer.violations()[0]
    assert violation.object_type == "sqlite3.Connection"
    assert line(violation.access_site) == line_of_file(HERE, "# nb-sqlite")
    assert line(violation.creation_site) == line_of_file(HERE, "# nb-sqlite-made")
    assert_on_the_loop(violation, "handler")


def test_duckdb_follows_the_same_setting(start: Callable[..., None]) -> None:
    duckdb = pytest.importorskip("duckdb")

    start()
    con = duckdb.connect(":memory:")

    async def handler() -> Any:
        return con.execute("SELECT 42").fetchall()  # nb-duckdb

    assert asyncio.run(handler()) == [(42,)]
    assert sanitizer.violations() == []  # default: in-process work is not reported
    tracked(con)
    start(**{"asyncio.noblock": "all"})
    con = duckdb.connect(":memory:")  # nb-duckdb-made
    assert asyncio.run(handler()) == [(42,)]
    assert found() == [("noblock", "execute"), ("noblock", "fetchall")]
    violation = sanitizer.violations()[0]
    assert line(violation.access_site) == line_of_file(HERE, "# nb-duckdb")
    assert line(violation.creation_site) == line_of_file(HERE, "# nb-duckdb-made")
    assert_on_the_loop(violation, "handler")
    con.close()


# -- the setting -------------------------------------------------------------------------


def test_noblock_off_silences_every_driver(start: Callable[..., None],
                                            postgresql_server: Any) -> None:
    import sqlite3

    psycopg2 = pytest.importorskip("psycopg2")
    start(**{"asyncio.noblock": "off"})
    lite = sqlite3.connect(":memory:")

    async def handler() -> None:
        conn = psycopg2.connect(**postgresql_server.kwargs)
        tracked(conn)
        conn.cursor().execute("SELECT 1")
        conn.close()
        lite.execute("SELECT 1")

    asyncio.run(handler())
    assert sanitizer.violations() == []
    sqlite_control(lite)


def test_a_bad_value_is_one_clear_error(start: Callable[..., None], tmp_path: Path) -> None:
    with pytest.raises(sanitizer.ConfigError) as raised:
        start(**{"asyncio.noblock": "sometimes"})
    assert raised.value.key == "asyncio.noblock" and raised.value.value == "sometimes"
    assert "\n" not in str(raised.value)
    assert "asyncio.noblock='sometimes'" in str(raised.value)
    assert "network, all or off" in str(raised.value)
    assert not sanitizer.is_enabled()
    # From the environment: one line on stderr, and the program runs unsanitized.
    proc, records = run_program(tmp_path, "print('ran')\n", "asyncio.noblock=sometimes")
    assert proc.stdout == "ran\n"
    assert proc.stderr.splitlines() == [
        "sanitizer: asyncio.noblock='sometimes': expected network, all or off; running "
        "without the sanitizer"]
    assert records == []


# -- silent: off the loop's thread, and outside the loop's run ------------------------------


def _misuse_on_the_loop(work: Callable[[], Any]) -> None:
    """The control: the same work on the loop's own thread is reported."""
    async def handler() -> None:
        work()

    asyncio.run(handler())


def test_worker_threads_are_silent(start: Callable[..., None], postgresql_server: Any) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    start()
    conn = psycopg2.connect(**postgresql_server.kwargs)
    tracked(conn)
    # One thread at a time: the connection goes from worker to worker, as a pool hands it.
    lock = threading.Lock()

    def work() -> Any:
        with lock:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            row = cur.fetchone()
            conn.commit()
            return row

    async def handler() -> list[Any]:
        loop = asyncio.get_running_loop()
        return [await asyncio.to_thread(work), await loop.run_in_executor(None, work)]

    assert asyncio.run(handler()) == [(1,), (1,)]
    assert sanitizer.violations() == []
    _misuse_on_the_loop(work)
    assert found() == [("noblock", "execute"), ("noblock", "commit")]


def test_sync_to_async_is_silent(start: Callable[..., None], mariadb_server: Any) -> None:
    pymysql = pytest.importorskip("pymysql")
    asgiref_sync = pytest.importorskip("asgiref.sync")
    start()
    conn = pymysql.connect(**mariadb_server.kwargs)
    tracked(conn)

    def work() -> Any:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone()

    async def handler() -> list[Any]:
        return [await asgiref_sync.sync_to_async(work)(),
                await asgiref_sync.sync_to_async(work, thread_sensitive=False)()]

    assert asyncio.run(handler()) == [(1,), (1,)]
    assert sanitizer.violations() == []
    _misuse_on_the_loop(work)
    assert found() == [("noblock", "execute")]
    conn.close()


def test_before_the_loop_starts_and_after_it_stops_is_silent(
        start: Callable[..., None], postgresql_server: Any) -> None:
    psycopg = pytest.importorskip("psycopg")
    start()
    conn = psycopg.connect(**postgresql_server.kwargs)
    tracked(conn)
    loop = asyncio.new_event_loop()
    conn.execute("SELECT 1")  # made, idle: not running
    ran = loop.run_until_complete(asyncio.sleep(0, result="ran"))
    conn.execute("SELECT 2")  # stopped (run_until_complete returned)
    loop.close()
    conn.execute("SELECT 3")  # closed
    conn.rollback()
    assert ran == "ran"
    assert sanitizer.violations() == []

    async def on_the_loop() -> None:
        conn.execute("SELECT 4")

    loop = asyncio.new_event_loop()
    loop.run_until_complete(on_the_loop())  # the control
    loop.close()
    assert found() == [("noblock", "execute")]
    conn.close()


def test_a_real_program_under_uvloop(tmp_path: Path, postgresql_server: Any) -> None:
    """End to end: SANITIZE_THREADS=1, a psycopg2 query inside a coroutine run by uvloop
    (imported after the sanitizer started, as it is in a real program)."""
    pytest.importorskip("uvloop")
    pytest.importorskip("psycopg2")
    source = f"""
        import psycopg2, uvloop

        conn = psycopg2.connect(**{postgresql_server.kwargs!r})  # made at import

        async def handler():
            cur = conn.cursor()
            cur.execute("SELECT 1")  # on the loop
            return cur.fetchone()

        print(uvloop.run(handler()))
    """
    proc, records = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "(1,)\n"
    (record,) = records
    assert (record["policy"], record["operation"]) == ("noblock", "execute")
    app = str(tmp_path / "app.py")
    access = [f for f in record["access_stack"] if f["file"] == app]
    creation = [f for f in record["creation_stack"] if f["file"] == app]
    assert access[0]["line"] == line_of(source, "on the loop")
    assert creation[0]["line"] == line_of(source, "made at import")
    assert record["loop"]["state"] == "running" and record["loop"]["type"] == "Loop"
    assert record["task"]["coroutine"].endswith("wrapper")  # uvloop.run's own coroutine


def test_trio_runs_no_asyncio_loop(start: Callable[..., None], postgresql_server: Any) -> None:
    anyio = pytest.importorskip("anyio")
    pytest.importorskip("trio")
    psycopg2 = pytest.importorskip("psycopg2")
    start()
    conn = psycopg2.connect(**postgresql_server.kwargs)
    tracked(conn)

    async def handler() -> None:
        conn.cursor().execute("SELECT 1")

    anyio.run(handler, backend="trio")  # blocking trio, but no asyncio loop to see
    assert sanitizer.violations() == []
    anyio.run(handler, backend="asyncio")  # the control
    assert found() == [("noblock", "execute")]
    conn.close()


# -- which calls: server-side fetches wait, client-side ones do not -------------------------


def server_side_cursor(driver: Driver, conn: Any) -> Any:
    if driver.name == "psycopg2":
        return conn.cursor(name="nb_named")  # a named cursor: DECLARE, then FETCH
    if driver.name == "psycopg":
        return conn.cursor(name="nb_server")  # a ServerCursor
    if driver.name == "pymysql":
        return conn.cursor(driver.module.cursors.SSCursor)  # unbuffered
    return conn.cursor(driver.module.cursors.SSCursor)  # MySQLdb: use_result


def test_server_side_fetches_are_reported(driver: Driver) -> None:
    conn = driver.connect()
    cur = server_side_cursor(driver, conn)
    cur.execute("SELECT 1")  # no loop yet

    async def handler() -> Any:
        return cur.fetchall()  # rows come over the wire now: # nb-server-fetch

    assert [tuple(r) for r in asyncio.run(handler())] == [(1,)]
    violation = only()
    assert (violation.policy, violation.operation) == ("noblock", "fetchall")
    assert line(violation.access_site) == line_of_file(HERE, "# nb-server-fetch")
    cur.close()
    conn.rollback()
    conn.close()


def test_reported_calls_keep_the_transaction_bookkeeping(start: Callable[..., None],
                                                        postgresql_server: Any) -> None:
    """A statement reported by noblock runs on quietly, but through the transaction policy
    all the same: the transaction it opened is still known to be the loop thread's."""
    psycopg2 = pytest.importorskip("psycopg2")
    start()
    conn = psycopg2.connect(**postgresql_server.kwargs)

    async def handler() -> None:
        conn.cursor().execute("SELECT 1")  # opens a transaction (noblock reported)

    asyncio.run(handler())
    assert found() == [("noblock", "execute")]
    in_thread(conn.commit, "committer")  # ends the main thread's transaction
    assert found() == [("noblock", "execute"), ("transaction", "commit")]
    holder = sanitizer.violations()[1].holder_thread
    assert holder is not None and holder["name"] == threading.current_thread().name
    conn.close()


# -- Django: its async_unsafe check covers its own database work ---------------------------


@pytest.fixture
def django_db(request: pytest.FixtureRequest, postgresql_server: Any) -> Iterator[Any]:
    """Settings for a DatabaseWrapper on the PostgreSQL server (Django's psycopg backend);
    database access allowed if pytest-django blocks it."""
    django = pytest.importorskip("django")
    pytest.importorskip("asgiref")
    from django.conf import settings

    if not settings.configured:  # as tests/test_django.py does, whichever runs first
        settings.configure(
            DEBUG=False, SECRET_KEY="test",
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            INSTALLED_APPS=[], MIDDLEWARE=[], ROOT_URLCONF="django_project.urls",
            ALLOWED_HOSTS=["*"], STATIC_URL="/static/", USE_TZ=True)
    django.setup()
    try:
        blocker = request.getfixturevalue("django_db_blocker")
    except pytest.FixtureLookupError:
        blocker = None
    if blocker is None:
        yield postgresql_server
        return
    with blocker.unblock():
        yield postgresql_server


def pg_wrapper(server: Any) -> Any:
    """A fresh DatabaseWrapper of Django's postgresql backend, owned by the calling thread."""
    from django.db import connections
    from django.db.backends.postgresql.base import DatabaseWrapper

    return DatabaseWrapper({**connections.settings["default"],
                            "ENGINE": "django.db.backends.postgresql", "NAME": server.dbname,
                            "USER": server.user, "PASSWORD": server.password,
                            "HOST": server.host, "PORT": str(server.port)}, alias="pg")


def django_view(wrapper: Any) -> Callable[[], Any]:
    async def view() -> Any:
        with wrapper.cursor() as cursor:  # forgot sync_to_async # nb-django
            cursor.execute("SELECT 1")  # nb-django-execute
            return cursor.fetchone()
    return view


class TestDjango:
    def test_one_report_when_django_lets_it_through(
            self, start: Callable[..., None], django_db: Any,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # as in Jupyter
        start(plugins="dbapi+django+asyncio")
        wrapper = pg_wrapper(django_db)
        assert asyncio.run(django_view(wrapper)()) == (1,)
        # Django's report names the user's cursor(); the driver's connect and execute
        # beneath it, which noblock would report on their own, are the same misuse.
        violation = only()
        assert (violation.policy, violation.operation) == ("async_unsafe", "cursor")
        assert line(violation.access_site) == line_of_file(HERE, "# nb-django")
        assert "DJANGO_ALLOW_ASYNC_UNSAFE is set" in violation.message
        tracked(wrapper.connection)  # the driver connection beneath was watched
        wrapper.close()

    def test_djangos_own_error_comes_first(
            self, start: Callable[..., None], django_db: Any,
            monkeypatch: pytest.MonkeyPatch) -> None:
        from django.core.exceptions import SynchronousOnlyOperation

        monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE", raising=False)
        start(plugins="dbapi+django+asyncio")
        wrapper = pg_wrapper(django_db)
        with pytest.raises(SynchronousOnlyOperation):
            asyncio.run(django_view(wrapper)())
        assert found() == [("async_unsafe", "cursor")]
        assert wrapper.connection is None  # Django raised before any driver call

    def test_with_async_unsafe_off_noblock_reports_the_driver(
            self, start: Callable[..., None], django_db: Any,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        start(plugins="dbapi+django+asyncio", **{"django.async_unsafe": "off"})
        wrapper = pg_wrapper(django_db)
        assert asyncio.run(django_view(wrapper)()) == (1,)
        # Each blocking call of the driver's, at the user's line (Django's frames are passed
        # over): connecting and setting the connection up, in cursor(); the statement.
        sites = {(v.policy, v.operation, line(v.access_site)) for v in sanitizer.violations()}
        assert ("noblock", "connect", line_of_file(HERE, "# nb-django")) in sites
        assert ("noblock", "execute", line_of_file(HERE, "# nb-django-execute")) in sites
        assert {policy for policy, _, _ in sites} == {"noblock"}
        wrapper.close()

    def test_sqlite_backend_with_noblock_all_is_reported_once(
            self, start: Callable[..., None], django_db: Any,
            monkeypatch: pytest.MonkeyPatch) -> None:
        from django.db import connections
        from django.db.backends.sqlite3.base import DatabaseWrapper

        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        start(plugins="sqlite3+django+asyncio", **{"asyncio.noblock": "all"})
        wrapper = DatabaseWrapper({**connections.settings["default"], "NAME": ":memory:"},
                                  alias="lite")
        assert asyncio.run(django_view(wrapper)()) == (1,)
        assert found() == [("async_unsafe", "cursor")]
        assert record_of(wrapper.connection) is record_of(wrapper)  # the sqlite3 connection
        wrapper.close()


# -- the core: NOBLOCK.over(policy, kind) composes with any policy's guards ----------------


class CountingPolicy(Policy):
    """An enter/exit policy that counts its calls (its bookkeeping must never be skipped)."""

    name = "counting"

    def __init__(self) -> None:
        self.entered = self.exited = 0

    def enter(self, obj: object, record: Any, operation: str) -> Any:
        self.entered += 1

    def exit(self, obj: object, record: Any, state: Any) -> None:
        self.exited += 1


def guarded_object(policy: Any, kind: str = "network") -> Any:
    """An object whose ``query()`` is guarded by NOBLOCK over ``policy``, and whose
    ``outer()`` calls ``query()`` beneath its own such guard."""
    blocking = NOBLOCK.over(policy, kind)

    class Resource:
        query = Context.guard(blocking, lambda self: "rows", "query", "")
        outer = Context.guard(blocking, lambda self: self.query(), "outer", "")

    obj = Resource()
    obj._sanitizer_record = new_record(obj, policy)  # type: ignore[attr-defined]
    return obj


def on_a_loop(call: Callable[[], Any]) -> Any:
    async def main() -> Any:
        return call()
    return asyncio.run(main())


def test_core_one_report_the_layers_beneath_quiet(start: Callable[..., None]) -> None:
    start(plugins="asyncio")
    obj = guarded_object(STRICT)
    assert obj.outer() == "rows" and sanitizer.violations() == []  # no loop: nothing
    assert on_a_loop(obj.outer) == "rows"
    assert found() == [("noblock", "outer")]  # not again for query() beneath it
    assert on_a_loop(obj.query) == "rows"
    assert found() == [("noblock", "outer"), ("noblock", "query")]
    # The base's own rule still holds after a report: another thread is refused by strict.
    in_thread(obj.query, "other")
    assert found()[-1] == ("strict", "query")


def test_core_the_base_policys_bookkeeping_runs_when_reported(
        start: Callable[..., None]) -> None:
    counting = CountingPolicy()
    start(plugins="asyncio")
    obj = guarded_object(counting)
    on_a_loop(obj.outer)
    assert found() == [("noblock", "outer")]
    assert (counting.entered, counting.exited) == (2, 2)  # outer's and query's, quietly


def test_core_kinds_follow_the_setting(start: Callable[..., None]) -> None:
    start(plugins="asyncio")
    local = guarded_object(STRICT, "local")
    on_a_loop(local.query)
    assert sanitizer.violations() == []  # "local" is off by default
    start(plugins="asyncio", **{"asyncio.noblock": "all"})
    local = guarded_object(STRICT, "local")
    on_a_loop(local.query)
    assert found() == [("noblock", "query")]


def test_core_a_base_with_its_own_verdict_decides_its_own(start: Callable[..., None]) -> None:
    """Over CONCURRENT (its own verdict: only while another thread is inside), a use from
    another thread with nobody inside is allowed, though the record's policy is strict."""
    start(plugins="asyncio")
    concurrent = Check.CONCURRENT.under(STRICT)
    assert concurrent is not None
    obj = guarded_object(concurrent)
    obj._sanitizer_record = guarded_object(STRICT)._sanitizer_record  # a strict record
    in_thread(obj.query, "other")
    assert sanitizer.violations() == []


def test_core_bad_kind_and_excuses(start: Callable[..., None]) -> None:
    with pytest.raises(ValueError, match="sometimes"):
        NOBLOCK.over(STRICT, "sometimes")
    start(plugins="asyncio")
    excused = {"now": True}
    Context.excuse_blocking(lambda: excused["now"])
    obj = guarded_object(STRICT)
    on_a_loop(obj.query)
    assert sanitizer.violations() == []  # the library checks this itself
    excused["now"] = False
    on_a_loop(obj.query)
    assert found() == [("noblock", "query")]
    sanitizer.disable()
    assert STATE.blocking_excuses == []  # restored with the rest of the configuration
