"""The django plugin: DatabaseWrapper, cursors, async_unsafe and asgiref roles, with real Django."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from support import found, in_thread, started, tracked

import sanitizer
from sanitizer import control
from sanitizer.ownership import record_of

django = pytest.importorskip("django")
pytest.importorskip("asgiref")

from asgiref.sync import sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def django_settings() -> None:
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="test",
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            ROOT_URLCONF="django_project.urls",
            ALLOWED_HOSTS=["*"],
            STATIC_URL="/static/",
            USE_TZ=True,
        )
    django.setup()


@pytest.fixture(autouse=True)
def db_access(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let these tests use the database if pytest-django is installed and blocks it."""
    try:
        blocker = request.getfixturevalue("django_db_blocker")
    except pytest.FixtureLookupError:
        blocker = None
    if blocker is None:  # no pytest-django, or it found no settings at startup
        yield
        return
    with blocker.unblock():
        yield


def new_wrapper(name: str = ":memory:", alias: str = "default") -> Any:
    """A fresh DatabaseWrapper (the sqlite backend), owned by the calling thread."""
    from django.db import connections
    from django.db.backends.sqlite3.base import DatabaseWrapper

    return DatabaseWrapper({**connections.settings["default"], "NAME": name}, alias=alias)


def only(sanitized: Sanitized) -> Any:
    found = sanitizer.violations()
    assert len(found) == 1, [v.message for v in found]
    return found[0]


class TestSilence:
    def test_same_thread_work_is_silent(self, sanitized: Sanitized) -> None:
        from django.db import transaction

        conn = new_wrapper()
        with conn.cursor() as cursor:
            cursor.execute("CREATE TABLE item (x integer)")
            cursor.executemany("INSERT INTO item VALUES (%s)", [(1,), (2,)])
        with transaction.atomic(using="default"):
            pass
        conn.set_autocommit(False)
        sid = conn.savepoint()
        with conn.cursor() as cursor:
            cursor.execute("INSERT INTO item VALUES (%s)", [3])
        conn.savepoint_commit(sid)
        conn.commit()
        conn.set_autocommit(True)
        cursor = conn.cursor()
        cursor.execute("SELECT x FROM item ORDER BY x")
        assert [row for row in cursor] == [(1,), (2,), (3,)]
        cursor.close()
        conn.close()
        assert sanitizer.violations() == []
        # The control: a cursor of the same connection, used by another thread.
        tracked(conn)
        cursor = conn.cursor()
        in_thread(lambda: cursor.execute("SELECT 1"))  # Django itself does not check this
        cursor.close()
        conn.close()
        assert found() == [("strict", "execute")]

    def test_thread_local_connections_in_many_threads_are_silent(
            self, sanitized: Sanitized, tmp_path: Path) -> None:
        from django.db import connections

        db = str(tmp_path / "db.sqlite3")
        setup = new_wrapper(db)
        with setup.cursor() as cursor:
            cursor.execute("CREATE TABLE item (x integer)")
        setup.close()
        barrier = threading.Barrier(4)
        watched: list[bool] = []

        def work() -> None:
            conn = connections["default"] = new_wrapper(db)
            watched.append(record_of(conn) is not None)
            barrier.wait()  # all four at once, each on its own connection
            with conn.cursor() as cursor:
                cursor.execute("INSERT INTO item VALUES (1)")
            connections.close_all()  # what Django does at the end of a request thread

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        check = new_wrapper(db)
        with check.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM item")
            assert cursor.fetchone() == (4,)
        check.close()
        assert watched == [True] * 4
        assert sanitizer.violations() == []
        # The control: a cursor of a thread's connection, made the same way, used from
        # this thread while its owner waits; the owner closes both afterwards.
        made, used = threading.Event(), threading.Event()
        cursors: list[Any] = []

        def own() -> None:
            conn = connections["default"] = new_wrapper(db)
            cursors.append(conn.cursor())
            made.set()
            used.wait(10)
            cursors[0].close()
            connections.close_all()
        owner, outcome = started(own, "owner")
        made.wait(10)
        try:
            cursors[0].execute("SELECT count(*) FROM item")
        finally:
            used.set()
            owner.join()
        assert "error" not in outcome, outcome
        assert found() == [("strict", "execute")]

    def test_gc_on_another_thread_is_silent(self, sanitized: Sanitized) -> None:
        holder: list[Any] = []

        def make() -> None:
            conn = new_wrapper()
            cursor = conn.cursor()
            cursor.execute("SELECT 1")
            cycle: dict[str, Any] = {"conn": conn, "cursor": cursor}
            cycle["self"] = cycle  # only the cycle collector frees it, on this thread
            holder.append(cycle)

        in_thread(make, "maker")
        assert record_of(holder[0]["conn"]) is not None  # it was tracked
        holder.clear()
        gc.collect()
        assert sanitizer.violations() == []
        # The control: one made the same way, used by this thread outside the collector.
        in_thread(make, "maker")
        holder[0]["cursor"].execute("SELECT 1")
        assert found() == [("strict", "execute")]
        holder.clear()
        gc.collect()
        assert found() == [("strict", "execute")]  # its collection is still silent

    def test_closing_a_dead_threads_driver_connection_is_silent(
            self, sanitized: Sanitized) -> None:
        # As Django's own backends.sqlite.tests.ThreadSharing cleans up after its thread.
        drivers: list[Any] = []
        ready, release = threading.Event(), threading.Event()

        def work() -> None:
            conn = new_wrapper()
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
            drivers.append(conn.connection)
            ready.set()
            release.wait()

        thread = threading.Thread(target=work)
        thread.start()
        ready.wait()
        tracked(drivers[0])
        drivers[0].cursor()  # the owner is alive: a real cross-thread use
        release.set()
        thread.join()
        drivers[0].close()  # the owner has exited: cleanup
        assert [(v.policy, v.operation) for v in sanitizer.violations()] == [
            ("strict", "cursor")]

    def test_closing_a_dead_threads_wrapper_is_still_djangos_error(
            self, sanitized: Sanitized, tmp_path: Path) -> None:
        from django.db import DatabaseError

        wrappers: list[Any] = []

        def work() -> None:
            conn = new_wrapper(str(tmp_path / "db.sqlite3"))
            conn.ensure_connection()
            wrappers.append(conn)

        in_thread(work)
        with pytest.raises(DatabaseError):
            wrappers[0].close()
        assert [(v.policy, v.operation) for v in sanitizer.violations()] == [("strict", "close")]

    def test_inc_thread_sharing_is_honoured_and_dec_restores(self, sanitized: Sanitized) -> None:
        from django.db import DatabaseError

        conn = new_wrapper()
        with conn.cursor() as cursor:
            cursor.execute("CREATE TABLE item (x integer)")
        conn.inc_thread_sharing()
        record = record_of(conn)
        assert record is not None and record.sharing == 1

        def use() -> Any:
            with conn.cursor() as cursor:
                cursor.execute("INSERT INTO item VALUES (1)")
                cursor.execute("SELECT count(*) FROM item")
                return cursor.fetchone()

        assert in_thread(use) == (1,)
        assert sanitizer.violations() == []
        conn.dec_thread_sharing()
        assert record.sharing == 0
        with pytest.raises(DatabaseError):
            in_thread(use)
        assert only(sanitized).policy == "strict"
        assert found() == [("strict", "cursor")]

    def test_dec_below_zero_raises_as_before(self, sanitized: Sanitized) -> None:
        conn = new_wrapper()
        with pytest.raises(RuntimeError, match="below zero"):
            conn.dec_thread_sharing()
        record = record_of(conn)
        assert record is not None and record.sharing == 0


class TestCrossThread:
    def test_cursor_handed_to_another_thread_is_reported_once(
            self, sanitized: Sanitized) -> None:
        conn = new_wrapper()
        cursor = conn.cursor()

        def use() -> Any:
            return cursor.execute("SELECT 41 + 1")  # Django itself does not check this

        in_thread(use, "borrower")  # nothing raised: the gap we close
        assert cursor.fetchone() == (42,)
        violation = only(sanitized)
        assert violation.policy == "strict"
        assert violation.object_type == "django.db.backends.utils.CursorWrapper"
        assert violation.operation == "execute"
        assert violation.count == 1  # the driver cursor beneath did not report again
        assert violation.thread["name"] == "borrower"
        assert "exclusive" not in sanitized.policies()
        site = violation.access_site
        assert site is not None and site[0].co_filename == __file__

    def test_fetch_on_another_thread_is_reported(self, sanitized: Sanitized) -> None:
        conn = new_wrapper()
        cursor = conn.cursor()
        cursor.execute("SELECT 1")
        assert in_thread(cursor.fetchone) == (1,)
        violation = only(sanitized)
        assert violation.policy == "strict" and violation.operation == "fetchone"

    def test_raw_driver_connection_is_checked_strictly(self, sanitized: Sanitized) -> None:
        conn = new_wrapper()
        conn.ensure_connection()
        driver = conn.connection
        # Django connects with check_same_thread=False; the Django layer owns the verdict.
        assert record_of(driver) is record_of(conn)
        in_thread(lambda: driver.execute("SELECT 1").fetchone())
        # Two operations on one line are two findings (the dedup key has both).
        violation, fetch = sanitizer.violations()
        assert (violation.policy, violation.object_type, violation.operation) == (
            "strict", "sqlite3.Connection", "execute")
        assert violation.root_type == "django.db.backends.sqlite3.base.DatabaseWrapper"
        assert (fetch.policy, fetch.object_type, fetch.operation) == (
            "strict", "sqlite3.Cursor", "fetchone")

    def test_cursor_and_driver_share_the_wrapper_record(self, sanitized: Sanitized) -> None:
        conn = new_wrapper()
        cursor = conn.cursor()
        record = record_of(conn)
        assert record is not None and record.policy is not None
        assert record.policy.name == "strict" and record.name == "default"
        assert cursor.db._sanitizer_record is record  # CursorWrapper
        assert cursor.cursor.connection._sanitizer_record is record  # the sqlite3 cursor
        assert record_of(conn.connection) is record

    def test_django_error_is_unchanged_and_reported_first(self, sanitized: Sanitized) -> None:
        from django.db import DatabaseError

        conn = new_wrapper()
        conn.ensure_connection()
        order: list[str] = []
        running = control.running()
        assert running is not None
        running.reporter.add(lambda occurrence: (order.append("report"), occurrence)[1])

        def use() -> None:
            try:
                conn.cursor()
            except DatabaseError:
                order.append("raised")
                raise

        with pytest.raises(DatabaseError) as info:
            in_thread(use)
        assert type(info.value) is DatabaseError
        assert str(info.value).startswith(
            "DatabaseWrapper objects created in a thread can only be used in that same thread")
        assert order == ["report", "raised"]
        violation = only(sanitized)
        assert violation.policy == "strict" and violation.operation == "cursor"

    def test_close_from_another_thread_is_reported_with_djangos_error(
            self, sanitized: Sanitized, tmp_path: Path) -> None:
        from django.db import DatabaseError

        conn = new_wrapper(str(tmp_path / "db.sqlite3"))
        conn.ensure_connection()
        with pytest.raises(DatabaseError):
            in_thread(conn.close)
        assert only(sanitized).operation == "close"
        conn.close()


@dataclasses.dataclass
class Served:
    status: int
    body: str
    thread_errors: list[tuple[str, BaseException]]  # (thread name, error) escaping threads
    tracked: bool  # the served connection was tracked, so that a silent run could fail


class TestLiveServer:
    def run_server(self, share: bool) -> Served:
        from django.db import connections
        from django.test.testcases import LiveServerThread, _StaticFilesHandler

        conn = connections["default"] = new_wrapper()  # in-memory: must be shared
        # Without sharing, closing the connection fails with Django's DatabaseError in
        # the request thread and in the server thread, outside any handler: recorded
        # here, not left to pytest's unhandled-thread-exception warning (an error here).
        thread_errors: list[tuple[str, BaseException]] = []
        hook = threading.excepthook
        threading.excepthook = lambda args: thread_errors.append(
            (args.thread.name if args.thread else "", args.exc_value))
        try:
            with conn.cursor() as cursor:
                cursor.execute("CREATE TABLE item (x integer)")
                cursor.execute("INSERT INTO item VALUES (1)")
            if share:
                conn.inc_thread_sharing()  # what LiveServerTestCase does
            server = LiveServerThread("localhost", _StaticFilesHandler,
                                      connections_override={"default": conn})
            server.daemon = True
            server.start()
            server.is_ready.wait()
            assert server.error is None
            try:
                url = f"http://localhost:{server.port}/count/"
                with urllib.request.urlopen(url) as response:
                    status, body = response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, ""
            finally:
                server.terminate()  # joins the server and its request threads
                if share:
                    conn.dec_thread_sharing()
        finally:
            threading.excepthook = hook
            del connections["default"]
        return Served(status, body, thread_errors, record_of(conn) is not None)

    def test_live_server_sharing_is_silent(self, sanitized: Sanitized) -> None:
        served = self.run_server(share=True)
        assert (served.status, served.body) == (200, "1")
        assert served.thread_errors == []
        assert sanitizer.violations() == []
        assert served.tracked
        # The control: the same server without inc_thread_sharing(), on a connection
        # made the same way, is reported (test_live_server_without_sharing_is_reported).
        unshared = self.run_server(share=False)
        assert unshared.status == 500 and len(unshared.thread_errors) == 2
        assert found() == [("strict", "close")]

    def test_live_server_without_sharing_is_reported(self, sanitized: Sanitized) -> None:
        from django.db import DatabaseError

        served = self.run_server(share=False)
        assert served.status == 500  # Django's own DatabaseError in the request thread
        assert "strict" in sanitized.policies()
        assert found() == [("strict", "close")]  # closing the connection it may not use
        escaped = sorted((("process_request_thread" in name, type(error))
                          for name, error in served.thread_errors), key=lambda e: e[0])
        assert escaped == [(False, DatabaseError), (True, DatabaseError)], served.thread_errors


class TestAsgiref:
    def test_sync_to_async_work_is_silent(self, sanitized: Sanitized) -> None:
        watched: list[bool] = []

        def work() -> Any:
            from django.db import connections

            connection = connections["default"]
            watched.append(record_of(connection) is not None)
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                return cursor.fetchone()

        async def main() -> list[Any]:
            return [await sync_to_async(work)(),
                    await sync_to_async(work)(),  # the same thread-sensitive thread
                    await sync_to_async(work, thread_sensitive=False)()]

        assert asyncio.run(main()) == [(1,), (1,), (1,)]
        assert sanitizer.violations() == []
        assert watched == [True] * 3

        # The control: a cursor of the thread-sensitive thread's connection, used
        # from a thread_sensitive=False thread.
        def make() -> Any:
            from django.db import connection

            return connection.cursor()

        async def misuse() -> None:
            cursor = await sync_to_async(make)()
            await sync_to_async(cursor.execute, thread_sensitive=False)("SELECT 1")
            await sync_to_async(cursor.close)()  # back on its own thread

        asyncio.run(misuse())
        assert found() == [("strict", "execute")]

    def test_thread_sensitive_cursor_used_under_thread_sensitive_false(
            self, sanitized: Sanitized) -> None:
        def make() -> Any:
            from django.db import connection

            return connection.cursor()

        def use(cursor: Any) -> Any:
            return cursor.execute("SELECT 1")

        async def main() -> Any:
            cursor = await sync_to_async(make)()
            await sync_to_async(use, thread_sensitive=False)(cursor)
            return await sync_to_async(cursor.fetchone)()  # back on its own thread

        assert asyncio.run(main()) == (1,)
        violation = only(sanitized)
        assert violation.policy == "strict"
        assert any("sync_to_async(thread_sensitive=True)" in c and "single-thread executor" in c
                   for c in violation.owner_context), violation.owner_context
        assert any("sync_to_async(thread_sensitive=False)" in c
                   for c in violation.context), violation.context
        record = sanitized.records()[0]
        assert record["owner_context"] == violation.owner_context

    def test_async_to_sync_thread_is_described(self, sanitized: Sanitized) -> None:
        from asgiref.sync import async_to_sync

        made: list[Any] = []

        async def outer() -> None:
            await sync_to_async(lambda: made.append(new_wrapper()))()

        in_thread(lambda: async_to_sync(outer)(), "requester")
        record = record_of(made[0])
        assert record is not None
        assert any("async_to_sync" in c for c in record.owner_context), record.owner_context


    def test_thread_sensitive_context_thread_is_described(self, sanitized: Sanitized) -> None:
        from asgiref.sync import ThreadSensitiveContext

        async def request() -> Any:
            async with ThreadSensitiveContext():  # what Django's ASGIHandler does per request
                return await sync_to_async(new_wrapper)()

        record = record_of(asyncio.run(request()))
        assert record is not None
        assert any("ThreadSensitiveContext" in c for c in record.owner_context), \
            record.owner_context


    def test_asgi_requests_are_silent(self, sanitized: Sanitized) -> None:
        """Real ASGIHandler requests: a ThreadSensitiveContext thread each, with its own
        connection. (Django's AsyncClient would not do: it runs every request's view on
        asgiref's one global thread, on one connection that other tests use too.)"""
        from django.core.handlers.asgi import ASGIHandler
        from django.db.backends.signals import connection_created

        opened: list[tuple[str, Any]] = []  # (thread, connection) of each request's view

        def note(sender: object, connection: Any, **kwargs: object) -> None:
            opened.append((threading.current_thread().name, connection))

        async def requests() -> list[tuple[int, bytes]]:
            return [await asgi_get(ASGIHandler(), "/one/") for _ in range(3)]

        connection_created.connect(note)
        try:
            responses = asyncio.run(requests())
        finally:
            connection_created.disconnect(note)
        assert responses == [(200, b"1")] * 3
        assert sanitizer.violations() == []
        threads = {name for name, _ in opened}
        assert len(opened) == len(threads) == 3, opened  # a thread and connection each
        assert all(record_of(conn) is not None for _, conn in opened)
        # The control: a request's connection (in-memory: still open), used from here.
        opened[0][1].connection.execute("SELECT 1")
        assert found() == [("strict", "execute")]


async def asgi_get(handler: Any, path: str) -> tuple[int, bytes]:
    """GET ``path`` from an ASGI application, as a server would: (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"host", b"testserver")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    requested = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the handler cancels this when done
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await handler(scope, receive, send)
    start, *body = messages
    return start["status"], b"".join(m.get("body", b"") for m in body)


class TestAsyncUnsafe:
    def test_reported_even_when_django_allows_it(
            self, sanitized: Sanitized, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # as in Jupyter

        async def view() -> Any:
            conn = new_wrapper()
            with conn.cursor() as cursor:  # forgot sync_to_async
                cursor.execute("SELECT 1")
                return cursor.fetchone()

        assert asyncio.run(view()) == (1,)  # Django let it through
        violation = only(sanitized)
        assert violation.policy == "async_unsafe"
        assert violation.operation == "cursor"  # not ensure_connection, connect ... below it
        assert "sync_to_async" in violation.hint
        assert violation.count == 1
        assert "DJANGO_ALLOW_ASYNC_UNSAFE is set" in violation.message
        assert any("on event loop L" in c for c in violation.context)
        assert "asgiref: on the event-loop thread" in violation.context

    def test_djangos_own_error_still_raised(
            self, sanitized: Sanitized, monkeypatch: pytest.MonkeyPatch) -> None:
        from django.core.exceptions import SynchronousOnlyOperation

        monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE", raising=False)
        conn = new_wrapper()

        async def view() -> None:
            conn.cursor()

        with pytest.raises(SynchronousOnlyOperation):
            asyncio.run(view())
        assert only(sanitized).policy == "async_unsafe"

    @pytest.mark.parametrize("allowed", [True, False])
    def test_allowed_mode_reports_only_what_django_lets_through(
            self, enable: Any, monkeypatch: pytest.MonkeyPatch, allowed: bool) -> None:
        from django.core.exceptions import SynchronousOnlyOperation

        enable(**{"django.async_unsafe": "allowed"})
        if allowed:
            monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
        else:
            monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE", raising=False)
        conn = new_wrapper()

        async def view() -> None:
            conn.cursor()

        with contextlib.nullcontext() if allowed else pytest.raises(SynchronousOnlyOperation):
            asyncio.run(view())
        assert [v.policy for v in sanitizer.violations()] == (["async_unsafe"] if allowed else [])
        misuse_from_another_thread(conn)  # the control: the connection is watched
        assert found() == [*(("async_unsafe", "cursor"),) * allowed, ("strict", "execute")]

    def test_off_mode(self, enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        from django.utils import asyncio as django_asyncio

        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
        enable(**{"django.async_unsafe": "off"})
        assert django_asyncio.get_running_loop is asyncio.get_running_loop
        conn = new_wrapper()

        async def view() -> None:
            conn.cursor()

        asyncio.run(view())
        assert sanitizer.violations() == []
        misuse_from_another_thread(conn)  # the control: the connection is watched
        assert found() == [("strict", "execute")]

    def test_no_loop_is_silent(self, sanitized: Sanitized,
                               monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        conn = new_wrapper()
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert sanitizer.violations() == []

        async def view() -> None:  # the control: the same use, in a running loop
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")

        asyncio.run(view())
        assert found() == [("async_unsafe", "cursor")]


def misuse_from_another_thread(conn: Any) -> None:
    """One real misuse of ``conn``: a cursor made here, used by another thread."""
    cursor = conn.cursor()
    in_thread(lambda: cursor.execute("SELECT 1"), "borrower")  # Django does not check this
    cursor.close()


def test_disable_restores_django(sanitized: Sanitized) -> None:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.utils import CursorWrapper
    from django.utils import asyncio as django_asyncio

    patched = (BaseDatabaseWrapper.validate_thread_sharing, CursorWrapper.execute,
               django_asyncio.get_running_loop)
    sanitizer.disable()
    restored = (BaseDatabaseWrapper.validate_thread_sharing, CursorWrapper.execute,
                django_asyncio.get_running_loop)
    assert all(a is not b for a, b in zip(patched, restored, strict=True))
    assert django_asyncio.get_running_loop is asyncio.get_running_loop
    assert "_sanitizer_record" not in vars(BaseDatabaseWrapper)
    conn = new_wrapper()
    assert record_of(conn) is None
    assert sys.modules["sanitizer.plugins.django"] is not None


PYTEST_DJANGO_SETTINGS = """
SECRET_KEY = "test"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_project.urls"
ALLOWED_HOSTS = ["*"]
STATIC_URL = "/static/"
USE_TZ = True
"""

PYTEST_DJANGO_TESTS = """
import threading
import urllib.request

import pytest


@pytest.mark.django_db(transaction=True)
def test_live_server(live_server):
    from django.db import connection, connections
    from sanitizer.ownership import record_of

    assert record_of(connections["default"]) is not None  # the shared connection is watched
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE item (x integer)")
        cursor.execute("INSERT INTO item VALUES (1), (2)")
    with urllib.request.urlopen(live_server.url + "/count/") as response:
        assert response.read() == b"2"


@pytest.mark.django_db
def test_cursor_handed_over():
    from django.db import connection

    cursor = connection.cursor()
    thread = threading.Thread(target=cursor.execute, args=("SELECT 1",))
    thread.start()
    thread.join()
"""


def test_pytest_django_live_server_is_silent(tmp_path: Path) -> None:
    """pytest-django's live_server, in a real pytest run under SANITIZE_THREADS."""
    import os
    import subprocess

    pytest.importorskip("pytest_django")
    (tmp_path / "tsettings.py").write_text(PYTEST_DJANGO_SETTINGS)
    (tmp_path / "test_app.py").write_text(PYTEST_DJANGO_TESTS)
    log = tmp_path / "violations.jsonl"
    tests_dir = str(Path(__file__).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env.update(SANITIZE_THREADS=f"log_file={log}", DJANGO_SETTINGS_MODULE="tsettings",
               PYTHONPATH=os.pathsep.join([str(tmp_path), tests_dir]))
    proc = subprocess.run(
        # Not "-p django": pytest would import Django itself as a plugin and mark it
        # for assertion rewriting, whose import hook runs before the sanitizer's.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    # SANITIZE_THREADS switches the pytest plugin on too: the misuse fails its test.
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED test_app.py::test_cursor_handed_over" in proc.stdout
    assert "1 failed, 1 passed" in proc.stdout
    from support import read_records

    records = read_records(log)
    # Only the deliberate misuse: the live server's shared connection is silent.
    assert [(r["policy"], r["operation"]) for r in records] == [("strict", "execute")], records
    assert records[0]["access_stack"][0]["function"] == "Thread.run"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
class TestFork:
    def run_child(self, sanitized: Sanitized, child: Callable[[], None]) -> list[dict[str, Any]]:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                child()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return sanitized.records()

    def test_closed_wrapper_reconnected_in_child_is_silent(
            self, sanitized: Sanitized, tmp_path: Path) -> None:
        conn = new_wrapper(str(tmp_path / "db.sqlite3"))
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        conn.close()  # as Django's parallel runner leaves it; the child reconnects

        def child() -> None:
            conn.close()  # setup_worker_connection() does this in each worker
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
                assert cursor.fetchone() == (1,)
            conn.close()

        assert self.run_child(sanitized, child) == []
        # The control: the same connection, open in the parent, used in a child.
        tracked(conn)
        cursor = conn.cursor()
        records = self.run_child(sanitized, lambda: cursor.execute("SELECT 1"))
        assert [(r["policy"], r["operation"]) for r in records] == [("process", "execute")]
        conn.close()

    def test_in_memory_database_is_the_childs_own_copy(self, sanitized: Sanitized) -> None:
        # Django's parallel runner (fork) keeps using in-memory SQLite in each worker.
        conn = new_wrapper()
        with conn.cursor() as cursor:
            cursor.execute("CREATE TABLE item (x integer)")

        def child() -> None:
            conn.close()  # a no-op for in-memory SQLite, as in setup_worker_connection()
            with conn.cursor() as cursor:
                cursor.execute("INSERT INTO item VALUES (1)")
                cursor.execute("SELECT count(*) FROM item")
                assert cursor.fetchone() == (1,)
            conn.connection.execute("SELECT 1")  # the driver, too

        assert self.run_child(sanitized, child) == []
        with conn.cursor() as cursor:  # the parent's copy is untouched
            cursor.execute("SELECT count(*) FROM item")
            assert cursor.fetchone() == (0,)
        assert sanitized.records() == []
        misuse_from_another_thread(conn)  # the control: the connection is watched
        assert found() == [("strict", "execute")]

    def test_open_connection_used_in_child_is_reported(
            self, sanitized: Sanitized, tmp_path: Path) -> None:
        conn = new_wrapper(str(tmp_path / "db.sqlite3"))
        cursor = conn.cursor()

        def child() -> None:
            cursor.execute("SELECT 1")

        records = self.run_child(sanitized, child)
        assert [(r["policy"], r["operation"]) for r in records] == [("process", "execute")]
        conn.close()


def test_sql_without_params_is_passed_as_is(sanitized: Sanitized) -> None:
    """Django runs SQL without params unconverted; the tracked driver cursor must too."""
    conn = new_wrapper()
    tracked(conn)
    with conn.cursor() as cursor:
        cursor.execute("SELECT '%s', '100%%'")
        assert cursor.fetchone() == ("%s", "100%%")
        cursor.execute("SELECT %s", [1])
        assert cursor.fetchone() == (1,)
    assert sanitizer.violations() == []


SETUP_MAKES_A_CONNECTION = """\
import threading
import django
from django.conf import settings

settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
)
django.setup()  # auth's models make the connection, deep in model loading
from django.db import connections

wrapper = connections["default"]


def use():
    try:
        wrapper.cursor()  # used
    except Exception as exc:  # Django refuses it too
        print(type(exc).__name__)


thread = threading.Thread(target=use)
thread.start()
thread.join()
"""


def test_a_connection_made_during_django_setup_names_the_callers_line(
        tmp_path: Path) -> None:
    """Its creation stack is model loading beneath imports: importlib's frames are left
    out, and the caller's line is in it, within stack_depth, as its creation site."""
    import subprocess

    from support import read_records

    script = tmp_path / "app.py"
    script.write_text(SETUP_MAKES_A_CONNECTION)
    log = tmp_path / "violations.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = f"log_file={log}"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [r for r in read_records(log) if r["object_type"].endswith("DatabaseWrapper")]
    assert records, proc.stderr
    record = records[0]
    stack = record["creation_stack"]
    assert not [f for f in stack if str(f["file"]).startswith("<frozen importlib")], stack
    setup_line = SETUP_MAKES_A_CONNECTION.splitlines().index(
        "django.setup()  # auth's models make the connection, deep in model loading") + 1
    assert len(stack) <= 16
    assert {"file": str(script), "line": setup_line, "function": "<module>"} in stack
    assert record["creation_site"] == {"file": str(script), "line": setup_line,
                                       "function": "<module>"}
    # Django's model loading is above it: the stack is as deep as the import made it.
    assert any("django/db/models" in str(f["file"]) for f in stack)
