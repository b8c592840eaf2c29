"""The logging sink (``sink=logging``): violations as WARNINGs on the ``sanitizer`` logger."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import in_thread, line_of, pytester_suite, run_program

import sanitizer

pytest_plugins = ["pytester"]


def strict_misuse() -> sqlite3.Connection:
    """A strict violation: this thread's connection used from another (sqlite3 raises)."""
    conn = sqlite3.connect(":memory:")
    thread_raised = []

    def use() -> None:
        try:
            conn.execute("select 1")  # the access site
        except sqlite3.ProgrammingError as exc:
            thread_raised.append(exc)
    in_thread(use)
    assert thread_raised, "sqlite3's own check did not run"
    return conn


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sanitizer"]


@pytest.fixture
def handler() -> Iterator[list[logging.LogRecord]]:
    """An application's own handler on the ``sanitizer`` logger, taken off after the test."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logger = logging.getLogger("sanitizer")
    logger.addHandler(keep)
    try:
        yield records
    finally:
        logger.removeHandler(keep)


def test_a_violation_reaches_caplog_as_a_warning_with_the_event(
        enable: Any, caplog: pytest.LogCaptureFixture) -> None:
    run = enable(sink="logging")
    caplog.set_level(logging.WARNING)
    strict_misuse()
    (record,) = ours(caplog)
    violation = sanitizer.violations()[0]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == violation.message
    event: dict[str, Any] = record.thread_affinity  # type: ignore[attr-defined]
    assert event["policy"] == record.policy == "strict"  # type: ignore[attr-defined]
    assert event["object_type"] == record.object_type == "sqlite3.Connection"  # type: ignore[attr-defined]
    assert event["fingerprint"] == record.fingerprint == violation.fingerprint  # type: ignore[attr-defined]
    assert event["access_stack"] and event["creation_stack"]
    # The record points at the user's line, as a warning would, not at the sanitizer.
    assert (record.pathname, record.lineno) == (__file__, event["access_site"]["line"])
    assert record.funcName == "strict_misuse.<locals>.use"
    assert run.records() == []  # sink=logging alone: nothing in the log file


def test_only_the_first_of_each_kind_is_logged(enable: Any,
                                               caplog: pytest.LogCaptureFixture) -> None:
    enable(sink="logging")
    for _ in range(3):
        strict_misuse()
    assert len(ours(caplog)) == 1
    assert sanitizer.violations()[0].count == 3


def test_output_and_logging_get_the_same_violation(
        enable: Any, handler: list[logging.LogRecord]) -> None:
    run = enable(sink="output+logging")
    strict_misuse()
    (line,) = run.records()
    (record,) = handler
    assert line["fingerprint"] == record.fingerprint  # type: ignore[attr-defined]
    assert line["message"] == record.getMessage()


def test_the_default_sink_leaves_logging_alone(enable: Any,
                                               handler: list[logging.LogRecord]) -> None:
    run = enable()
    strict_misuse()
    assert len(run.records()) == 1
    assert handler == []


def test_a_handler_that_touches_a_tracked_object_does_not_loop(
        enable: Any, handler: list[logging.LogRecord]) -> None:
    """A handler storing records in a database owned by another thread: its own use of
    that connection happens inside our report, and is not reported in turn."""
    enable(sink="logging")
    store = sqlite3.connect(":memory:")  # tracked, owned by this thread
    store.execute("create table log (message text)")
    refused: list[Exception] = []

    class ToDatabase(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                store.execute("insert into log values (?)", (record.getMessage(),))
            except sqlite3.ProgrammingError as exc:  # sqlite3's own check, in the worker
                refused.append(exc)

    to_database = ToDatabase()
    logging.getLogger("sanitizer").addHandler(to_database)
    try:
        strict_misuse()
    finally:
        logging.getLogger("sanitizer").removeHandler(to_database)
    assert len(refused) == 1  # the handler did touch the connection, from the worker
    assert len(handler) == 1
    assert [v.object_type for v in sanitizer.violations()] == ["sqlite3.Connection"]
    assert sanitizer.violations()[0].count == 1


def test_a_failing_handler_is_contained(enable: Any) -> None:
    """logging's own Handler.handleError takes it: the program goes on, the report counts."""
    enable(sink="logging")
    called: list[str] = []

    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            called.append(record.getMessage())
            raise RuntimeError("the handler broke")

    broken = Broken()
    logging.getLogger("sanitizer").addHandler(broken)
    try:
        strict_misuse()  # sqlite3's own error, not the handler's, reached the thread
    finally:
        logging.getLogger("sanitizer").removeHandler(broken)
    assert len(called) == 1
    assert len(sanitizer.violations()) == 1


def test_a_failing_filter_is_one_internal_error(enable: Any) -> None:
    run = enable(sink="logging")

    def refuse(record: logging.LogRecord) -> bool:
        raise ValueError("the filter broke")

    logger = logging.getLogger("sanitizer")
    logger.addFilter(refuse)
    try:
        strict_misuse()
        strict_misuse()  # the same kind: not logged again
        conn = sqlite3.connect(":memory:")
        in_thread(lambda: _quietly(conn))  # another kind, the same error: said once
    finally:
        logger.removeFilter(refuse)
    lines = [json.loads(line) for line in run.log.read_text().splitlines()]
    errors = [line for line in lines if line["event"] == "sanitizer_internal_error"]
    assert [(e["where"], e["error"]) for e in errors] == [
        ("the logging sink", "ValueError: the filter broke")]
    assert len(sanitizer.violations()) == 2


def _quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("select 2")
    except sqlite3.ProgrammingError:
        pass


def test_a_disabled_logger_gets_nothing(enable: Any, handler: list[logging.LogRecord]) -> None:
    enable(sink="logging")
    logger = logging.getLogger("sanitizer")
    logger.setLevel(logging.ERROR)
    try:
        strict_misuse()
    finally:
        logger.setLevel(logging.NOTSET)
    assert handler == []
    assert len(sanitizer.violations()) == 1  # counted all the same


# -- real programs --------------------------------------------------------------------------

APP = """
import logging, logging.handlers, sqlite3, sys, threading
handler = logging.handlers.WatchedFileHandler(sys.argv[1])
handler.setFormatter(FORMATTER)
logging.getLogger().addHandler(handler)
conn = sqlite3.connect(":memory:", check_same_thread=False)
inside, done = threading.Event(), threading.Event()
def slow(x):
    inside.set()
    done.wait(30)
    return x
conn.create_function("slow", 1, slow)
holder = threading.Thread(target=lambda: conn.execute("select slow(1)").fetchall())
holder.start()
inside.wait(30)
conn.text_factory = str  # intrudes (no wait: sqlite3 would block on the holder)
done.set()
holder.join()
"""


FILTERABLE = ('logging.Formatter("%(levelname)s %(name)s %(policy)s %(fingerprint)s '
              '%(filename)s:%(lineno)d %(message)s")')
# A formatter writing the record's event, as a JSON log shipper would.
AS_JSON = ('type("J", (logging.Formatter,), '
           '{"format": lambda self, r: __import__("json").dumps(r.thread_affinity)})()')


def app(formatter: str = FILTERABLE) -> str:
    return APP.replace("FORMATTER", formatter)


def test_app_file_handler_and_json_output_get_the_same_violation(tmp_path: Path) -> None:
    app_log = tmp_path / "app.log"
    proc, records = run_program(tmp_path, app(), args=[sys.executable, "app.py", str(app_log)],
                                extra_options="sink=output+logging")
    assert proc.returncode == 0, proc.stderr
    (record,) = records
    (line,) = app_log.read_text().splitlines()
    level, name, policy, fingerprint, where, message = line.split(" ", 5)
    assert (level, name, policy) == ("WARNING", "sanitizer", "exclusive")
    assert fingerprint == record["fingerprint"]
    assert where == f"app.py:{line_of(app(), 'intrudes')}"
    assert message == record["message"]
    summaries = [json.loads(text) for text in (tmp_path / "violations.jsonl").read_text()
                 .splitlines() if '"thread_affinity_summary"' in text]
    assert len(summaries) == 1  # the output still gets the exit summary event


def test_logging_alone_writes_nothing_to_the_log_file(tmp_path: Path) -> None:
    app_log = tmp_path / "app.log"
    proc, _ = run_program(tmp_path, app(), args=[sys.executable, "app.py", str(app_log)],
                          extra_options="sink=logging")
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "violations.jsonl"
    assert not log.exists() or log.read_text() == ""  # not even the summary event
    assert " exclusive " in app_log.read_text()
    # The exit summary on stderr still gives the counts.
    assert "sanitizer: 1 thread-affinity violation(s), 1 unique" in proc.stderr


def test_without_handlers_logging_last_resort_prints_the_warning(tmp_path: Path) -> None:
    source = app().replace("logging.getLogger().addHandler(handler)", "")
    proc, _ = run_program(tmp_path, source, args=[sys.executable, "app.py", os.devnull],
                          extra_options="sink=logging")
    # logging.lastResort: the bare message on stderr; the sanitizer configured nothing.
    assert "while thread T1" in proc.stderr
    assert proc.stderr.count("is inside a call on the same sqlite3.Connection") == 1


def test_a_bad_sink_is_one_line_naming_key_and_value(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = "sink=bogus"
    proc = subprocess.run([sys.executable, "-c", "print('ran')"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout == "ran\n"  # runs unsanitized
    (line,) = proc.stderr.splitlines()
    assert "'sink'" in line and "'bogus'" in line and "output, logging" in line


def test_records_read_back_as_events(tmp_path: Path) -> None:
    """The event in extra is the JSON line's content: it survives json round trips."""
    app_log = tmp_path / "app.jsonl"
    proc, records = run_program(tmp_path, app(AS_JSON),
                                args=[sys.executable, "app.py", str(app_log)],
                                extra_options="sink=output+logging")
    assert proc.returncode == 0, proc.stderr
    (event,) = [json.loads(line) for line in app_log.read_text().splitlines()]
    (record,) = records
    record.pop("event"), record.pop("level"), record.pop("timestamp")
    assert event == record


# -- pytest --------------------------------------------------------------------------------

CAPLOG_SUITE = '''
import logging, sqlite3, threading

def misuse():
    conn = sqlite3.connect(":memory:")
    thread = threading.Thread(target=lambda: _try(conn))
    thread.start()
    thread.join()

def _try(conn):
    try:
        conn.execute("select 1")
    except sqlite3.ProgrammingError:
        pass

def test_caplog_sees_it(caplog):
    misuse()
    (record,) = [r for r in caplog.records if r.name == "sanitizer"]
    assert record.levelname == "WARNING"
    assert record.policy == "strict" and record.thread_affinity["operation"] == "execute"
    print("FINGERPRINT", record.fingerprint)
'''


def test_pytest_sanitize_threads_sink_logging_with_caplog(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = pytester_suite(pytester, monkeypatch, "")
    suite.makepyfile(test_caplog=CAPLOG_SUITE)
    result = suite.runpytest_subprocess("--sanitize-threads=sink=logging", "-s")
    # The test's own assertions passed; the sanitizer still fails it for the violation.
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "FINGERPRINT" in out
    assert "AssertionError" not in out and "ValueError" not in out
    assert "Thread-affinity violations (" in out
