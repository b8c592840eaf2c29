"""Smoke tests: each DB-API driver reaches its throwaway server, from one and from two threads."""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import dbservers
import pytest
from dbservers import DBServer


@dataclass(frozen=True)
class Driver:
    module: str
    server: str  # fixture name
    conn_id_sql: str  # per-connection id, so two threads can prove they had two sessions


DRIVERS = [
    Driver("psycopg2", "postgresql_server", "SELECT pg_backend_pid()"),
    Driver("psycopg", "postgresql_server", "SELECT pg_backend_pid()"),
    Driver("pymysql", "mariadb_server", "SELECT CONNECTION_ID()"),
    Driver("MySQLdb", "mariadb_server", "SELECT CONNECTION_ID()"),
]


def _import(name: str) -> ModuleType:
    # On CI a missing driver is a broken install, which must fail rather than skip.
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    module: ModuleType = pytest.importorskip(name)
    return module


@pytest.fixture(params=DRIVERS, ids=lambda d: d.module)
def setup(request: pytest.FixtureRequest) -> tuple[Driver, ModuleType, DBServer]:
    driver: Driver = request.param
    module = _import(driver.module)
    server: DBServer = request.getfixturevalue(driver.server)
    return driver, module, server


def _scalar(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return cur.fetchone()[0]
    finally:
        cur.close()


def test_connect_and_query(setup: tuple[Driver, ModuleType, DBServer]) -> None:
    _driver, module, server = setup
    conn = module.connect(**server.kwargs)
    try:
        assert _scalar(conn, "SELECT %s + 1", (41,)) == 42
        # The password user, not a superuser fallback, must be the one logged in.
        assert str(_scalar(conn, "SELECT CURRENT_USER")).split("@")[0] == server.user
    finally:
        conn.close()


def test_two_threads_two_connections(setup: tuple[Driver, ModuleType, DBServer]) -> None:
    driver, module, server = setup
    table = f"smoke_{driver.module.lower()}"
    conn = module.connect(**server.kwargs)
    try:
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute(f"CREATE TABLE {table} (worker INTEGER NOT NULL, conn_id BIGINT NOT NULL)")
        conn.commit()
        cur.close()
    finally:
        conn.close()

    # Both threads connect, then insert together: the barriers make the overlap certain.
    barrier = threading.Barrier(2, timeout=30)
    ids: dict[int, int] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            conn = module.connect(**server.kwargs)
            try:
                barrier.wait()
                conn_id = int(_scalar(conn, driver.conn_id_sql))
                cur = conn.cursor()
                cur.execute(f"INSERT INTO {table} VALUES (%s, %s)", (worker, conn_id))
                cur.close()
                conn.commit()
                ids[worker] = conn_id
                barrier.wait()  # nobody closes before both have written
            finally:
                conn.close()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()  # free the other thread at once instead of waiting for the timeout

    threads = [threading.Thread(target=work, args=(i,), name=f"db-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    # The first error is the cause; the other thread then sees only BrokenBarrierError.
    if errors:
        raise errors[0]
    assert len(set(ids.values())) == 2

    conn = module.connect(**server.kwargs)
    try:
        rows = _scalar(conn, f"SELECT COUNT(DISTINCT conn_id) FROM {table}")
        assert rows == 2
    finally:
        conn.close()


def test_dsn_works_for_psycopg(postgresql_server: DBServer) -> None:
    psycopg = _import("psycopg")
    with psycopg.connect(postgresql_server.dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == postgresql_server.dbname


@pytest.mark.parametrize("fixture", ["postgresql_server", "mariadb_server"])
def test_password_stays_out_of_repr_and_server_log(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    server: DBServer = request.getfixturevalue(fixture)
    assert server.password not in repr(server)
    assert server.password not in server.log_path.read_text(errors="replace")


def test_server_env_drops_sanitizer_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANITIZE_THREADS", "1")
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    env = dbservers.server_env()
    assert "SANITIZE_THREADS" not in env
    assert env["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_binary_fails_on_ci_and_skips_locally(
    ci: str, outcome: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="apt-get install postgresql"):
        dbservers.missing("initdb", "postgresql")
