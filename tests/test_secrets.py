"""Logs hold no secrets: the log file is owner-only and never reached through a symlink,
and passwords (DSNs, connect() keywords, SQL's PASSWORD '...') never reach ``args``,
``resource`` or a message, on real PostgreSQL and MariaDB servers (tests/dbservers.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sanitizer
from sanitizer import masking
from sanitizer.exceptions import ConfigError
from sanitizer.report import quote_args

SECRET = "s3cr3t-Pa55"


# -- the log file --------------------------------------------------------------------------


@pytest.fixture
def no_umask() -> Iterator[None]:
    """umask 0: what the sanitizer asks for is what the file gets."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _restart(**options: Any) -> None:
    if sanitizer.is_enabled():  # started by the environment: these tests need their own
        sanitizer.disable()
    sanitizer.enable(**options)


@pytest.mark.parametrize("include_args", [True, False])
def test_the_log_file_is_created_owner_only(tmp_path: Path, no_umask: None,
                                            include_args: bool) -> None:
    """0600 whether or not include_args is on: processes appending to one log may differ in
    their options, and the first one to create the file sets its mode."""
    log = tmp_path / "violations.jsonl"
    try:
        _restart(log_file=str(log), include_args=include_args)
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
    finally:
        sanitizer.disable()


def test_a_symlink_as_log_file_is_one_line_naming_it_and_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    link = tmp_path / "violations.jsonl"
    link.symlink_to(target)  # dangling: following it would create the target
    with pytest.raises(ConfigError) as info:
        _restart(log_file=str(link))
    assert str(info.value) == f"log_file={str(link)!r}: is a symbolic link (not followed)"
    assert info.value.key == "log_file"
    assert not sanitizer.is_enabled()
    assert not target.exists()
    target.write_text("the program's own\n")  # a link to an existing file: the same
    with pytest.raises(ConfigError, match="symbolic link"):
        _restart(log_file=str(link))
    assert target.read_text() == "the program's own\n"


def test_a_symlink_as_log_file_leaves_the_program_unsanitized_with_its_exit_code(
        tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("")
    (tmp_path / "link.jsonl").symlink_to(target)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = "log_file=link.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, sanitizer; print(sanitizer.is_enabled()); sys.exit(7)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7
    assert proc.stdout == "False\n"
    assert proc.stderr.splitlines() == [
        "sanitizer: log_file='link.jsonl': is a symbolic link (not followed); "
        "running without the sanitizer"]
    assert target.read_text() == ""


def test_a_symlink_planted_later_is_not_followed_on_reopen(tmp_path: Path) -> None:
    """The program closes our descriptor (a daemon's closerange) and someone swaps the log
    for a link: the reopen refuses it, the report is counted as lost, the target untouched."""
    import threading

    log = tmp_path / "violations.jsonl"
    target = tmp_path / "target.txt"
    target.write_text("")
    try:
        _restart(log_file=str(log))
        from sanitizer import control

        running = control.running()
        assert running is not None
        writer = running.reporter.output
        os.close(writer.fd)
        log.unlink()
        log.symlink_to(target)

        @sanitizer.thread_affine
        class Thing:
            def use(self) -> None:
                pass

        thing = Thing()
        worker = threading.Thread(target=thing.use)
        worker.start()
        worker.join()
        assert len(sanitizer.violations()) == 1
        assert writer.lost == 1
    finally:
        sanitizer.disable()
    assert target.read_text() == ""


# -- masking -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "kept"), [
    (f"postgresql://app:{SECRET}@db.example:5432/shop", "postgresql://app:***@db.example:5432/shop"),
    (f"postgresql+psycopg2://app:{SECRET}@db/shop?sslmode=require", "app:***@db/shop"),
    (f"mysql+pymysql://app:p@ss{SECRET}@db/shop", "app:***@db/shop"),
    (f"host=db password={SECRET} dbname=shop", "host=db password=*** dbname=shop"),
    (f"host=db password='{SECRET} x\\'y' dbname=shop", "host=db password=*** dbname=shop"),
    (f"DRIVER={{PG}};SERVER=db;UID=app;PWD={{{SECRET};x}};", "UID=app;PWD=***;"),
    (f"ALTER ROLE app PASSWORD '{SECRET}'", "ALTER ROLE app PASSWORD '***'"),
    (f"CREATE USER 'app'@'%' IDENTIFIED BY '{SECRET}'", "IDENTIFIED BY '***'"),
    (f"SET PASSWORD FOR app = PASSWORD('{SECRET}')", "SET PASSWORD FOR app = "),
    ({"user": "app", "password": SECRET, "host": "db"}, "'user': 'app'"),
    ({"passwd": SECRET.encode()}, "'passwd': '***'"),
    ([("app", {"db_password": SECRET})], "'db_password': '***'"),
    (SECRET.encode().join([b"password=", b""]), "b'password=***'"),
])
def test_masked_repr_hides_the_password_and_keeps_the_rest(value: object, kept: str) -> None:
    shown = masking.masked_repr(value, limit=10_000)
    assert SECRET not in shown
    assert kept in shown


def test_what_is_not_a_secret_is_shown_as_it_is() -> None:
    for value in ("select 1", "postgresql://app@db/shop", "http://db:80/x", ("a", 1, None),
                  "password", {"user": "app"}):
        assert masking.masked_repr(value) == repr(value)


def test_quote_args_masks_arguments_named_as_secrets_and_cuts_after_masking() -> None:
    args = quote_args([("password", SECRET), ("passwd", SECRET), ("query", "select 1"),
                       ("kwargs", {"token": SECRET}),
                       ("dsn", "x" * 190 + f" password={SECRET}")])
    assert args["password"] == args["passwd"] == "***"
    assert args["query"] == "'select 1'"
    assert args["kwargs"] == "{'token': '***'}"
    assert len(args["dsn"]) == 200 and SECRET[:3] not in args["dsn"]


def test_a_failing_repr_is_said_not_raised() -> None:
    class Odd:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert quote_args([("x", Odd())]) == {"x": "<Odd object (repr failed)>"}


# -- real servers --------------------------------------------------------------------------


class Server:
    """A driver and its server: the connect() forms that carry the password."""

    def __init__(self, name: str, module: Any, server: Any) -> None:
        self.name, self.module, self.server = name, module, server
        self.password = server.password

    def connect_forms(self) -> list[Callable[[], Any]]:
        s, m = self.server, self.module
        if self.name in ("psycopg2", "psycopg"):
            conninfo = (f"host={s.host} port={s.port} user={s.user} password={s.password} "
                        f"dbname={s.dbname}")
            return [lambda: m.connect(s.dsn), lambda: m.connect(conninfo),
                    lambda: m.connect(**s.kwargs)]
        kwargs = dict(s.kwargs)
        if self.name == "pymysql":
            passwd = {k: v for k, v in kwargs.items() if k != "password"}
            passwd["passwd"] = s.password
            return [lambda: m.connect(**kwargs), lambda: m.connect(**passwd)]
        # MySQLdb: connect(host, user, passwd, db, port), and keywords.
        return [lambda: m.connect(s.host, s.user, s.password, s.dbname, s.port),
                lambda: m.connect(host=s.host, port=s.port, user=s.user, passwd=s.password,
                                  db=s.dbname)]


SERVERS = {"psycopg2": "postgresql_server", "psycopg": "postgresql_server",
           "pymysql": "mariadb_server", "MySQLdb": "mariadb_server"}


@pytest.fixture(params=list(SERVERS))
def driver(request: pytest.FixtureRequest) -> Server:
    module = pytest.importorskip(request.param)
    return Server(request.param, module, request.getfixturevalue(SERVERS[request.param]))


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "violations.jsonl"
    _restart(log_file=str(path), include_args=True, plugins="dbapi+asyncio+sqlalchemy")
    try:
        yield path
    finally:
        sanitizer.disable()  # writes the summary event too: it is read below


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.filterwarnings("ignore:'passwd' is deprecated:DeprecationWarning")  # PyMySQL's
def test_passwords_are_nowhere_in_the_log(driver: Server, log: Path) -> None:
    """Every connect() form, on the event loop's thread (noblock: reported with its
    arguments), then statements whose arguments hold the DSN and the password."""
    s = driver.server
    placeholder = "%s"

    async def handler() -> None:
        for connect in driver.connect_forms():
            conn = connect()
            cur = conn.cursor()
            cur.execute(f"SELECT {placeholder}", (s.dsn,))  # the DSN as a parameter
            cur.execute(f"SELECT {placeholder}", (f"host={s.host} password={s.password}",))
            if driver.name in ("psycopg2", "psycopg"):  # transactional DDL: rolled back
                cur.execute(f"ALTER ROLE {s.user} PASSWORD '{s.password}'")
            conn.rollback()
            conn.close()

    asyncio.run(handler())
    sanitizer.disable()
    text = log.read_text()
    events = _events(log)
    violations = [e for e in events if e["event"] == "thread_affinity_violation"]
    assert {e["policy"] for e in violations} == {"noblock"}
    executes = [e for e in violations if e["operation"] == "execute"]
    assert len(executes) >= 2
    assert any("***" in json.dumps(e["args"]) for e in executes)
    assert any(f"@{s.host}:{s.port}/" in json.dumps(e["args"]) for e in executes)  # the rest shows
    assert any(e.get("resource", {}).get("host") == s.host for e in violations)
    assert driver.password not in text
    assert events[-1]["event"] == "thread_affinity_summary"


def test_sqlalchemy_urls_are_masked(postgresql_server: Any, log: Path) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg2")
    s = postgresql_server
    url = s.dsn.replace("postgresql://", "postgresql+psycopg2://")
    engine = sqlalchemy.create_engine(url)

    async def handler() -> None:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT :url, :password"),
                         {"url": url, "password": s.password})
            conn.rollback()

    asyncio.run(handler())
    engine.dispose()
    sanitizer.disable()
    violations = [e for e in _events(log) if e["event"] == "thread_affinity_violation"]
    assert any(e["operation"] == "execute" and "***" in json.dumps(e["args"])
               for e in violations)
    assert s.password not in log.read_text()


def test_a_dbapi_resource_taken_from_arguments_is_masked() -> None:
    """A generic driver's host/database come from connect()'s arguments as given."""
    from sanitizer.plugins.dbapi import _resource

    resource = _resource("pg8000", "db", 5432, f"postgresql://app:{SECRET}@db/shop")
    assert resource == {"driver": "pg8000", "host": "db", "port": 5432,
                        "database": "postgresql://app:***@db/shop"}
