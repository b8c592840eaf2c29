"""`sanitize-threads report` on logs written by real multi-process runs: gunicorn, xdist."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from support import line_of

pytest.importorskip("gunicorn")
pytest.importorskip("xdist")

BIN = Path(sys.executable).parent
SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
TIMEOUT = 120

# A module-level connection and tracked object, made in each worker's main thread
# at import, used by its request threads (gthread).
APP = """
    import os, socket, sqlite3
    import sanitizer

    DB = sqlite3.connect(":memory:")  # db made

    @sanitizer.thread_affine
    class Cache:
        def get(self, key):
            return key

    CACHE = Cache()  # cache made

    def app(environ, start_response):
        try:
            DB.execute("select 1")  # db used
        except sqlite3.ProgrammingError:
            pass
        if environ["PATH_INFO"] == "/hold":
            # Held at the test's gate until every request has reached one: with two
            # connections per worker, the six are spread over the three workers.
            with socket.socket(socket.AF_UNIX) as gate:
                gate.connect(os.environ["GATE"])
                gate.sendall(str(os.getpid()).encode())
                gate.recv(1)
        else:
            CACHE.get("key")  # cache used
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
"""
WORKERS, HELD = 3, 6


def env_with(options: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    if options is not None:
        env["SANITIZE_THREADS"] = options
    env.update(extra)
    return env


def report(*args: str, cwd: Path, stdin: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "sanitize-threads"), "report", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, input=stdin,
                          timeout=TIMEOUT)


class Gunicorn:
    """What one gunicorn run left: its log, and which worker served which request."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "violations.jsonl"
        self.held_pids: list[int] = []
        self.cache_pids: list[int] = []
        self.stderr = ""


def _listening(server: subprocess.Popen[str], lines: list[str]) -> int:
    """The port gunicorn says it listens on (its own readiness line), read from stderr."""
    assert server.stderr is not None
    for line in server.stderr:
        lines.append(line)
        found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError("gunicorn ended before listening:\n" + "".join(lines))


@pytest.fixture(scope="module")
def gunicorn_run(tmp_path_factory: pytest.TempPathFactory) -> Gunicorn:
    root = tmp_path_factory.mktemp("gunicorn")
    (root / "wsgi.py").write_text(textwrap.dedent(APP))
    run = Gunicorn(root)
    gate_path = root / "gate.sock"
    gate = socket.socket(socket.AF_UNIX)
    gate.bind(str(gate_path))
    gate.listen(HELD)
    gate.settimeout(TIMEOUT)
    command = [str(BIN / "gunicorn"), "--workers", str(WORKERS), "--threads", "2",
               "--worker-class", "gthread", "--worker-connections", "2", "--keep-alive", "0",
               "-b", "127.0.0.1:0", "wsgi:app"]
    server = subprocess.Popen(command, cwd=root, stderr=subprocess.PIPE, text=True,
                              env=env_with(f"log_file={run.log}", GATE=str(gate_path)))
    lines: list[str] = []
    drain: threading.Thread | None = None
    try:
        port = _listening(server, lines)
        assert server.stderr is not None
        stream = server.stderr
        drain = threading.Thread(target=lambda: lines.extend(stream))  # never fills the pipe
        drain.start()
        url = f"http://127.0.0.1:{port}"

        responses: list[bytes] = []

        def get(path: str) -> None:
            with urllib.request.urlopen(url + path, timeout=TIMEOUT) as response:
                responses.append(response.read())

        clients = [threading.Thread(target=get, args=("/hold",)) for _ in range(HELD)]
        for client in clients:
            client.start()
        held = []
        for _ in range(HELD):
            connection, _ = gate.accept()
            held.append(connection)
            run.held_pids.append(int(connection.recv(32)))
        for connection in held:  # all six are inside the app: let them go
            connection.sendall(b"x")
            connection.close()
        for client in clients:
            client.join(TIMEOUT)
        assert sorted(int(r) for r in responses) == sorted(run.held_pids)
        for _ in range(3):
            with urllib.request.urlopen(url + "/cache", timeout=TIMEOUT) as response:
                run.cache_pids.append(int(response.read()))
    finally:
        gate.close()
        server.send_signal(signal.SIGTERM)  # workers stop, each writing its summary
        server.wait(TIMEOUT)
        if drain is not None:
            drain.join(TIMEOUT)
        run.stderr = "".join(lines)
    assert server.returncode == 0, run.stderr
    return run


def test_gunicorn_workers_merged_as_processes(gunicorn_run: Gunicorn) -> None:
    run = gunicorn_run
    # The gate saw each worker hold two requests: three processes took part.
    assert sorted(collections.Counter(run.held_pids).values()) == [2, 2, 2]
    proc = report("--format", "json", str(run.log), cwd=run.root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing skipped
    data = json.loads(proc.stdout)
    db, cache = data["findings"]  # most frequent first
    assert (db["policy"], db["object_type"], db["operation"]) == (
        "strict", "sqlite3.Connection", "execute")
    assert db["access_site"]["line"] == line_of(APP, "db used")
    assert db["creation_site"]["line"] == line_of(APP, "db made")
    # Every request used the connection: each worker's exact count, from its summary
    # (one event per worker: counting events would say 3).
    expected = collections.Counter(run.held_pids + run.cache_pids)
    assert {p["pid"]: p["count"] for p in db["processes"]} == dict(expected)
    assert db["count"] == HELD + 3 == sum(expected.values())
    assert cache["count"] == 3 and cache["access_site"]["line"] == line_of(APP, "cache used")
    assert {p["pid"]: p["count"] for p in cache["processes"]} == dict(
        collections.Counter(run.cache_pids))
    assert data["processes"] == WORKERS and data["total"] == HELD + 6
    assert len(data["hosts"]) == 1 and db["hosts"] == data["hosts"]
    assert db["first_at"] <= db["last_at"]
    assert any(name.startswith("ThreadPoolExecutor") for name in db["threads"])
    assert "MainThread (owner)" in db["threads"]
    # The first full event, with its stacks.
    assert db["event"]["access_stack"][0]["line"] == line_of(APP, "db used")
    assert db["event"]["pid"] in expected


def test_gunicorn_report_text_markdown_and_fail(gunicorn_run: Gunicorn) -> None:
    run = gunicorn_run
    text = report(str(run.log), cwd=run.root)
    assert text.returncode == 0
    assert text.stdout.splitlines()[0] == (
        f"sanitize-threads: {HELD + 6} thread-affinity violation(s), 2 unique, in "
        f"{WORKERS} processes on 1 host")
    db_row, cache_row = text.stdout.splitlines()[2:4]
    assert db_row.split()[:3] == [str(HELD + 3), "strict", "sqlite3.Connection"]
    assert f"wsgi.py:{line_of(APP, 'db used')} in app" in db_row
    assert db_row.split()[-2:] == [str(WORKERS), "1"]
    assert cache_row.split()[0] == "3" and "Cache" in cache_row
    markdown = report("--format", "markdown", "--fail", str(run.log), cwd=run.root)
    assert markdown.returncode == 1  # there is something to report
    lines = markdown.stdout.splitlines()
    assert lines[0].startswith(f"### sanitize-threads: {HELD + 6} thread-affinity")
    assert lines[2].startswith("| count | policy | object | access site |")
    assert lines[4].startswith(f"| {HELD + 3} | strict | sqlite3.Connection | `wsgi.py:")


def test_gunicorn_sarif_is_valid_and_points_at_the_lines(gunicorn_run: Gunicorn) -> None:
    run = gunicorn_run
    out = run.root / "report.sarif"
    proc = report("--format", "sarif", "-o", str(out), str(run.log), cwd=run.root)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    sarif = json.loads(out.read_text())
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text())).validate(sarif)
    [result_db, result_cache] = sarif["runs"][0]["results"]
    assert result_db["ruleId"] == "strict" and result_db["properties"]["processes"] == WORKERS
    location = result_db["locations"][0]["physicalLocation"]
    assert location["artifactLocation"] == {"uri": "wsgi.py", "uriBaseId": "%SRCROOT%"}
    assert location["region"]["startLine"] == line_of(APP, "db used")
    [created] = result_db["relatedLocations"]
    assert created["message"]["text"] == "created here"
    assert created["physicalLocation"]["region"]["startLine"] == line_of(APP, "db made")
    assert result_cache["relatedLocations"][0]["physicalLocation"]["region"][
        "startLine"] == line_of(APP, "cache made")


# -- pytest-xdist -------------------------------------------------------------------------

TESTS = """
    import os, sqlite3, threading

    def misuse():
        conn = sqlite3.connect(":memory:")  # made
        def use():
            try:
                conn.execute("select 1")  # used
            except sqlite3.ProgrammingError:
                pass
        thread = threading.Thread(target=use, name="helper")
        thread.start()
        thread.join()
        with open(os.environ["PIDS"], "a") as file:  # which worker ran it
            file.write(f"{os.getpid()}\\n")

    def test_{n}():
        misuse()
"""


@pytest.fixture(scope="module")
def xdist_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[int]]]:
    root = tmp_path_factory.mktemp("xdist")
    head, test = textwrap.dedent(TESTS).split("def test_{n}")
    source = head + "".join(f"def test_{n}" + test.replace("{n}", str(n)) for n in range(8))
    (root / "test_generated.py").write_text(source)
    log, pids = root / "violations.jsonl", root / "pids.txt"
    proc = subprocess.run(
        [str(BIN / "pytest"), "-p", "no:cacheprovider", "-q", "-n", "2",
         f"--sanitize-threads=log_file={log}", "test_generated.py"],
        cwd=root, capture_output=True, text=True, timeout=TIMEOUT,
        env=env_with(None, PIDS=str(pids)))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # each test failed: a violation
    assert "8 failed" in proc.stdout
    yield log, [int(line) for line in pids.read_text().split()]


def test_xdist_workers_merged(xdist_run: tuple[Path, list[int]]) -> None:
    log, pids = xdist_run
    proc = report("--format", "json", str(log), cwd=log.parent)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    [finding] = data["findings"]
    assert finding["count"] == 8 == data["total"]
    assert {p["pid"]: p["count"] for p in finding["processes"]} == dict(
        collections.Counter(pids))
    assert data["processes"] == len(set(pids)) == len(finding["processes"])
    assert finding["access_site"]["line"] == line_of(TESTS, "used")
    assert finding["threads"][0] == "helper"


def test_xdist_report_suppressed_and_fail(xdist_run: tuple[Path, list[int]],
                                          tmp_path: Path) -> None:
    log, _ = xdist_run
    rules = tmp_path / "known.supp"
    rules.write_text("creation-function:test_generated.misuse  # known\n")
    proc = report("--fail", "--suppressions", str(rules), str(log), cwd=log.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == (
        "sanitize-threads: no thread-affinity violations (8 suppressed)")
    sarif = report("--format", "sarif", str(log), cwd=log.parent)
    document: dict[str, Any] = json.loads(sarif.stdout)
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text())).validate(document)
    [result] = document["runs"][0]["results"]
    assert result["properties"]["count"] == 8
