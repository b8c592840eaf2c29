"""Pytest plugin: session fixtures that run throwaway PostgreSQL and MariaDB servers."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import quote

import pytest

HOST = "127.0.0.1"
USER = "sanitizer"
DBNAME = "sanitizer_test"
START_TIMEOUT = 60.0  # generous: a loaded 2-core CI box can be slow
STOP_TIMEOUT = 30.0

# Seconds spent per server, shown in the terminal summary.
TIMINGS: dict[str, dict[str, float]] = {}

Owner = tuple[int, int] | None  # (uid, gid) to run servers as, or None to stay as we are


@dataclass(frozen=True)
class DBServer:
    """Where a running test server listens and how to log in; repr never shows the password."""

    engine: Literal["postgresql", "mariadb"]
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    dbname: str
    log_path: Path

    @property
    def kwargs(self) -> dict[str, Any]:
        """connect() keywords: psycopg2/psycopg take dbname=, PyMySQL/MySQLdb take database=."""
        db_key = "dbname" if self.engine == "postgresql" else "database"
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            db_key: self.dbname,
        }

    @property
    def dsn(self) -> str:
        """A URL: postgresql:// works as-is with psycopg2/psycopg; mysql:// for URL-based tools."""
        scheme = "postgresql" if self.engine == "postgresql" else "mysql"
        return (
            f"{scheme}://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.dbname, safe='')}"
        )


def server_env() -> dict[str, str]:
    """Environment for server processes: without the sanitizer's switches, in a fixed locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["LC_ALL"] = "C"
    return env


def missing(binary: str, package: str) -> NoReturn:
    """Skip locally, but fail on CI: a CI run must never quietly lose its database tests."""
    reason = f"{binary} not found: install Debian's {package!r} (apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _which(name: str) -> str | None:
    # Server binaries live in sbin, which a non-root PATH often lacks.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


def _pg_bindir() -> Path | None:
    # Debian keeps initdb/postgres off PATH in /usr/lib/postgresql/<major>/bin; newest wins.
    def major(p: Path) -> int:
        name = p.parent.parent.name
        return int(name) if name.isdigit() else -1

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=major, reverse=True)
    on_path = _which("postgres")
    if on_path:
        found.append(Path(on_path))
    for postgres in found:
        if (postgres.parent / "initdb").exists():
            return postgres.parent
    return None


def _owner(account: str) -> Owner:
    # PostgreSQL refuses to run as root and MariaDB needs --user=root: as root, run both as
    # an unprivileged account instead; a developer's own account needs no change.
    if os.geteuid() != 0:
        return None
    for name in (account, "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
    raise RuntimeError(f"running as root but neither {account!r} nor 'nobody' exists")


def _as(owner: Owner) -> dict[str, Any]:
    if owner is None:
        return {}
    return {"user": owner[0], "group": owner[1], "extra_groups": []}


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "<password>")


def _run(argv: list[str], *, cwd: Path, owner: Owner, secret: str, stdin: str = "") -> None:
    """Run a set-up step; its output is shown only on failure, with the password redacted."""
    done = subprocess.run(
        argv,
        input=stdin,
        cwd=cwd,  # as another user, initdb must be able to stat its working directory
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
        **_as(owner),
    )
    if done.returncode != 0:
        output = _redact(done.stdout + done.stderr, secret)[-4000:]
        raise RuntimeError(f"{argv[0]} exited {done.returncode}:\n{output}")


@contextlib.contextmanager
def _workdir(engine: str, owner: Owner) -> Iterator[Path]:
    """A private temp dir owned by the server's account, removed afterwards whatever happens."""
    base = Path(tempfile.mkdtemp(prefix=f"dbservers-{engine}-"))
    pid = os.getpid()
    try:
        if owner is not None:
            os.chown(base, *owner)
        yield base
    finally:
        # A forked test child must not delete the parent's server from under it.
        if os.getpid() == pid:
            shutil.rmtree(base, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    pass


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _serve(
    argv_for: Callable[[int], list[str]],
    ready: Callable[[int], bool],
    *,
    cwd: Path,
    log_path: Path,
    owner: Owner,
    secret: str,
    stop_signal: signal.Signals,
) -> Iterator[int]:
    """Start the server on a free port, yield the port once it takes connections, then stop it."""
    # The port is free when picked but may be grabbed before the server binds: pick again.
    for _attempt in range(3):
        port = _free_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv_for(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=server_env(),
                **_as(owner),
            )
        pid = os.getpid()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not ready(port):
                if proc.poll() is not None:
                    tail = _redact(log_path.read_text(errors="replace"), secret)[-4000:]
                    if "Address already in use" in tail:
                        raise _PortTaken
                    raise RuntimeError(f"{argv_for(port)[0]} exited {proc.returncode}:\n{tail}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv_for(port)[0]} not ready after {START_TIMEOUT}s")
                time.sleep(0.02)
        except _PortTaken:
            continue
        except BaseException:
            _stop(proc, stop_signal)
            raise
        try:
            yield port
        finally:
            if os.getpid() == pid:
                _stop(proc, stop_signal)
        return
    raise RuntimeError("server could not bind a free port in 3 attempts")


def _timed(engine: str) -> Callable[[str], None]:
    mark = time.perf_counter()
    TIMINGS[engine] = {}

    def lap(what: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        TIMINGS[engine][what] = now - mark
        mark = now

    return lap


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[DBServer]:
    """A PostgreSQL server on 127.0.0.1 with database DBNAME owned by a password user."""
    bindir = _pg_bindir()
    if bindir is None:
        missing("PostgreSQL server (initdb, postgres in /usr/lib/postgresql/*/bin)", "postgresql")
    lap = _timed("postgresql")
    owner = _owner("postgres")
    password = secrets.token_hex(16)
    with _workdir("postgresql", owner) as base:
        data = base / "data"
        # Trust is only the initial setting: pg_hba.conf is replaced below before any start.
        _run(
            [
                str(bindir / "initdb"),
                f"--pgdata={data}",
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=base,
            owner=owner,
            secret=password,
        )
        # TCP only, with a password: the tests must exercise real authentication.
        (data / "pg_hba.conf").write_text(f"host all all {HOST}/32 scram-sha-256\n")
        # Single-user mode creates role and database without a client driver (those are under
        # test) and keeps the password off the command line; each line is one statement.
        _run(
            [str(bindir / "postgres"), "--single", "-D", str(data), "--fsync=off", "postgres"],
            stdin=f"CREATE ROLE {USER} LOGIN PASSWORD '{password}'\n"
            f"CREATE DATABASE {DBNAME} OWNER {USER}\n",
            cwd=base,
            owner=owner,
            secret=password,
        )
        lap("init")

        def argv(port: int) -> list[str]:
            return [
                str(bindir / "postgres"),
                "-D",
                str(data),
                f"--port={port}",
                f"--listen_addresses={HOST}",
                "--unix_socket_directories=",  # /run/postgresql may be missing or not ours
                "--fsync=off",  # durability is worthless for a throwaway cluster
                "--synchronous_commit=off",
                "--full_page_writes=off",
                "--autovacuum=off",
            ]

        def ready(_port: int) -> bool:
            # pg_ctl's own test: the postmaster writes "ready" as line 8 of postmaster.pid.
            try:
                lines = (data / "postmaster.pid").read_text().splitlines()
            except OSError:
                return False
            return len(lines) >= 8 and lines[7].strip() == "ready"

        log_path = base / "postgresql.log"
        with _serve(
            argv,
            ready,
            cwd=base,
            log_path=log_path,
            owner=owner,
            secret=password,
            stop_signal=signal.SIGINT,  # "fast" shutdown: no waiting for clients
        ) as port:
            lap("start")
            yield DBServer("postgresql", HOST, port, USER, password, DBNAME, log_path)
            lap("session")
    lap("stop")


def _mysql_greets(port: int) -> bool:
    # MariaDB accepts TCP before it serves; the protocol-10 handshake means it does.
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            head = s.recv(5)
    except OSError:
        return False
    return len(head) == 5 and head[4] == 10


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[DBServer]:
    """A MariaDB server on 127.0.0.1 with database DBNAME and a password user."""
    mariadbd = _which("mariadbd")
    install_db = _which("mariadb-install-db")
    if mariadbd is None or install_db is None:
        missing("MariaDB server (mariadbd, mariadb-install-db)", "mariadb-server")
    lap = _timed("mariadb")
    owner = _owner("mysql")
    password = secrets.token_hex(16)
    with _workdir("mariadb", owner) as base:
        data = base / "data"
        # --no-defaults everywhere: a developer's /etc/mysql or ~/.my.cnf must not leak in.
        # A private tmpdir for every step: set-ups running side by side (xdist workers)
        # in a shared /tmp failed now and then ("Error on delete of '/tmp/#sql-temptable-...").
        common = [
            "--no-defaults",
            f"--tmpdir={base}",
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
            "--innodb-use-native-aio=0",  # io_setup/io_uring are often refused in containers
            "--innodb-flush-log-at-trx-commit=0",
            "--skip-log-bin",
        ]
        _run(
            [
                install_db,
                *common,
                f"--datadir={data}",
                "--skip-test-db",
                "--skip-name-resolve",
                "--auth-root-authentication-method=normal",
            ],
            cwd=base,
            owner=owner,
            secret=password,
        )
        # Bootstrap mode runs with grant tables off: FLUSH PRIVILEGES turns them on so that
        # CREATE USER works. The SQL goes through stdin, so the password stays off argv.
        _run(
            [mariadbd, *common, "--bootstrap", f"--datadir={data}"],
            stdin="FLUSH PRIVILEGES;\n"
            f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{password}';\n"
            f"CREATE DATABASE {DBNAME};\n"
            f"GRANT ALL ON {DBNAME}.* TO '{USER}'@'%';\n",
            cwd=base,
            owner=owner,
            secret=password,
        )
        lap("init")

        def argv(port: int) -> list[str]:
            return [
                mariadbd,
                *common,
                f"--datadir={data}",
                f"--port={port}",
                "--skip-networking=0",
                f"--bind-address={HOST}",
                "--skip-name-resolve",
                f"--socket={base / 'mariadbd.sock'}",
                f"--pid-file={base / 'mariadbd.pid'}",
                "--performance-schema=OFF",
            ]

        log_path = base / "mariadb.log"
        with _serve(
            argv,
            _mysql_greets,
            cwd=base,
            log_path=log_path,
            owner=owner,
            secret=password,
            stop_signal=signal.SIGTERM,
        ) as port:
            lap("start")
            yield DBServer("mariadb", HOST, port, USER, password, DBNAME, log_path)
            lap("session")
    lap("stop")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Report what the servers cost, so slow start-ups show up in CI logs."""
    for engine, laps in TIMINGS.items():
        own = sum(v for k, v in laps.items() if k != "session")
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in laps.items() if k != "session")
        terminalreporter.write_line(f"dbservers: {engine} {parts} (overhead {own:.2f}s)")
