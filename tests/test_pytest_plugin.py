"""The pytest plugin (sanitizer.plugins.pytest_plugin), run on generated suites with pytester.

Suites use real threads and real sqlite3 connections, made deterministic with
joins and Events. Runs that must load the plugin through its entry
point in a fresh interpreter, or the .pth line, or xdist workers, are
subprocesses; the rest run in-process, which also loads it through the entry point.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3  # noqa: F401 - see below
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from support import make_ini, pytester_suite

# pytester's in-process runs drop from sys.modules what was first imported during
# a run. sqlite3 (above) and the sanitizer's modules are imported here, before any
# run, so that every run patches the same sqlite3 module (a post-import hook fires
# once per module name).
import sanitizer.control
import sanitizer.plugins.sqlite3
import sanitizer.report  # noqa: F401

pytest_plugins = ["pytester"]

HAS_XDIST = importlib.util.find_spec("xdist") is not None
HAS_ASYNCIO = importlib.util.find_spec("pytest_asyncio") is not None

# Imported by the generated tests: real threads, real connections.
HELPERS = '''
import sqlite3
import threading

def in_thread(fn, name="worker"):
    """Run fn in a new thread, wait for it; return what it raised, if anything."""
    raised = []
    def target():
        try:
            fn()
        except Exception as exc:   # sqlite3's own ProgrammingError, ThreadAffinityError
            raised.append(exc)
    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    return raised

def connect():
    return sqlite3.connect(":memory:")

def violate():
    """A strict violation: this thread's connection used from another one."""
    conn = connect()
    return in_thread(lambda: conn.execute("select 1"))
'''

# A strict violation: a connection made in the test's thread used from another.
SHARED = '''
import sqlite3
from helpers import in_thread

def test_shared():
    conn = sqlite3.connect(":memory:")  # created
    in_thread(lambda: conn.execute("select 1"))  # used
'''


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory with the helpers, and no sanitizer or xdist settings inherited."""
    return pytester_suite(pytester, monkeypatch, HELPERS)


def line_of(path: Path, marker: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if f"# {marker}" in line:
            return number
    raise AssertionError(marker)


def section_count(result: pytest.RunResult) -> int:
    return len([line for line in result.outlines if "Thread-affinity violations (" in line])


# -- switching on -------------------------------------------------------------------------


class TestSwitchingOn:
    def test_off_by_default_imports_and_patches_nothing(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_shared=SHARED)
        suite.makeconftest('''
            import sys, threading
            START = threading.Thread.start
            def pytest_sessionfinish(session):
                heavy = ("sanitizer.control", "sanitizer.report", "sanitizer.plugin",
                         "sanitizer.ownership", "structlog")
                loaded = sorted(m for m in heavy if m in sys.modules)
                print("LOADED", loaded, threading.Thread.start is START)
        ''')
        result = suite.runpytest_subprocess("-s")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*LOADED [[][]] True"])
        assert "sanitize-threads:" not in result.stdout.str()

    @pytest.mark.parametrize("args", [
        ["--sanitize-threads"],
        ["--sanitize-threads=1"],
        ["--sanitize-threads", "stack_depth=8"],
        ["--sanitize-threads=log"],
    ])
    def test_command_line_forms(self, suite: pytest.Pytester, args: list[str]) -> None:
        suite.makepyfile(test_shared=SHARED)
        result = suite.runpytest(*args)
        result.assert_outcomes(failed=1)
        expected = "1" if args[-1] in ("--sanitize-threads", "--sanitize-threads=1",
                                       "--sanitize-threads=log") else "stack_depth=8"
        result.stdout.fnmatch_lines([f"sanitize-threads: {expected} (from --sanitize-threads)"])

    def test_flag_followed_by_a_path_keeps_the_path(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_one=SHARED, test_other="def test_fine(): pass")
        result = suite.runpytest("--sanitize-threads", "test_one.py")
        result.assert_outcomes(failed=1)  # test_other.py was not collected
        result = suite.runpytest("--sanitize-threads", "test_one.py::test_shared")
        result.assert_outcomes(failed=1)

    def test_ini_option(self, suite: pytest.Pytester) -> None:
        make_ini(suite, "sanitize_threads = action=raise")
        suite.makepyfile(test_shared=SHARED)
        result = suite.runpytest()
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["sanitize-threads: action=raise (from ini option "
                                     "sanitize_threads)"])

    def test_relative_paths_in_the_ini_option_are_relative_to_the_ini_file(
            self, suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        make_ini(suite, "sanitize_threads = suppressions=known.txt")
        (suite.path / "known.txt").write_text("object:sqlite3.Connection\n")
        (suite.path / "sub").mkdir()
        (suite.path / "sub" / "__init__.py").touch()
        suite.makepyfile(**{"sub/test_shared": SHARED})
        monkeypatch.chdir(suite.path / "sub")
        result = suite.runpytest()
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([
            f"sanitize-threads: suppressions={suite.path / 'known.txt'} (from ini option*"])
        assert "never matched" not in result.stdout.str()  # it hid the test's violation

    def test_environment_through_the_pth(self, suite: pytest.Pytester,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SANITIZE_THREADS", "1")
        suite.makepyfile(test_shared=SHARED)
        # pytest must not warn that it cannot rewrite the package the .pth imported
        result = suite.runpytest_subprocess("-W", "error::pytest.PytestAssertRewriteWarning")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["sanitize-threads: 1 (from SANITIZE_THREADS)"])
        # Exactly one sanitizer: the .pth's would have logged JSON to stderr and
        # printed its own summary at exit.
        assert "thread_affinity_violation" not in result.stderr.str()
        assert "sanitizer:" not in result.stderr.str()
        assert section_count(result) == 1

    def test_precedence_command_line_over_ini_over_environment(
            self, suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SANITIZE_THREADS", "action=warn,stack_depth=3,include_args=1")
        make_ini(suite, "sanitize_threads = action=log,stack_depth=5")
        suite.makepyfile(test_shared=SHARED)
        suite.makeconftest('''
            def pytest_sessionstart(session):
                from sanitizer import control
                print("RUNNING", control.running().options.stack_depth)
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads=action=raise", "-s")
        result.stdout.fnmatch_lines_random([
            "sanitize-threads: action=raise,stack_depth=5,include_args=1 (from "
            "--sanitize-threads, ini option sanitize_threads, SANITIZE_THREADS)",
            "RUNNING 5",
        ])

    def test_off_word_in_a_higher_layer_switches_the_pth_sanitizer_off(
            self, suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SANITIZE_THREADS", "raise")
        suite.makepyfile(test_shared=SHARED)
        suite.makeconftest('''
            def pytest_sessionstart(session):
                from sanitizer import control
                print("RUNNING", control.running())
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads=off", "-s")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["RUNNING None"])
        assert "sanitize-threads:" not in result.stdout.str()

    @pytest.mark.parametrize("where", ["command line", "ini", "environment"])
    def test_bad_option_string_is_a_usage_error(self, suite: pytest.Pytester,
                                                monkeypatch: pytest.MonkeyPatch,
                                                where: str) -> None:
        suite.makepyfile(test_shared=SHARED)
        args = []
        if where == "command line":
            args = ["--sanitize-threads=action=explode"]
            source = "--sanitize-threads"
        elif where == "ini":
            make_ini(suite, "sanitize_threads = action=explode")
            source = "ini option sanitize_threads"
        else:
            monkeypatch.setenv("SANITIZE_THREADS", "action=explode")
            source = "SANITIZE_THREADS"
        result = suite.runpytest_subprocess(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        message = (f"ERROR: {source}: bad value 'explode' for 'action'; expected one or more "
                   "of log, warn, raise joined by '+'")
        assert message in result.stderr.lines
        assert "Traceback" not in result.stderr.str()

    def test_unreadable_suppressions_file_is_a_usage_error(self, suite: pytest.Pytester
                                                           ) -> None:
        suite.makepyfile(test_shared=SHARED)
        result = suite.runpytest("--sanitize-threads=suppressions=missing.txt")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert any("suppressions='missing.txt': cannot read file" in line
                   for line in result.errlines)

    def test_help(self, suite: pytest.Pytester) -> None:
        result = suite.runpytest_subprocess("--sanitize-threads=help")
        assert result.ret == 0
        result.stdout.fnmatch_lines(["SANITIZE_THREADS: switch the thread-affinity sanitizer*"])

    def test_a_test_that_disables_the_sanitizer_affects_only_itself(
            self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_toggles='''
            import sanitizer
            from helpers import violate

            def test_switches_off():
                sanitizer.disable()
                violate()

            def test_checked_again():
                violate()
        ''')
        result = suite.runpytest("--sanitize-threads", "-p", "no:randomly")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["FAILED test_toggles.py::test_checked_again*"])

    def test_sanitizer_is_off_and_patches_undone_after_an_in_process_run(
            self, suite: pytest.Pytester) -> None:
        import sanitizer

        suite.makepyfile(test_shared=SHARED)
        start, hook = threading.Thread.start, threading.excepthook
        was_enabled = sanitizer.is_enabled()
        suite.runpytest("--sanitize-threads").assert_outcomes(failed=1)
        assert sanitizer.is_enabled() == was_enabled
        assert threading.Thread.start is start
        assert threading.excepthook is hook


# -- attribution ---------------------------------------------------------------------------


class TestAttribution:
    def test_background_thread_violation_fails_its_test(self, suite: pytest.Pytester) -> None:
        path = suite.makepyfile(test_shared=SHARED)
        suite.makepyfile(test_clean="def test_clean(): pass")
        result = suite.runpytest("--sanitize-threads", "-rf")
        result.assert_outcomes(failed=1, passed=1)
        used, created = line_of(path, "used"), line_of(path, "created")
        result.stdout.fnmatch_lines([
            "*_ test_shared _*",
            "thread-affinity violation (strict): sqlite3.Connection.execute called by thread "
            "T* 'worker', but the sqlite3.Connection belongs to thread T0 'MainThread' "
            "(strict policy)",
            f"  used at test_shared.py:{used} in *<lambda>",  # qualified from Python 3.11
            f"  created at test_shared.py:{created} in test_shared",
            "*- Thread-affinity violations (call) -*",
            "WARNING: thread-affinity violation (strict) on sqlite3.Connection at 0x*",
            f"    #0 */test_shared.py:{used} in *<lambda>",
            "*= thread-affinity violations =*",
            "test_shared.py::test_shared (call)",
            "  (strict) sqlite3.Connection.execute called by thread T* 'worker'*",
            f"      used at test_shared.py:{used} in *<lambda>",
            f"      created at test_shared.py:{created} in test_shared",
            "sanitize-threads: 1 violation(s) in 1 test(s)",
            "FAILED test_shared.py::test_shared - thread-affinity violation (strict)*",
        ])
        # pytest's frames are left out of the report
        assert "_pytest" not in result.stdout.str()

    def test_log_action_writes_no_log_of_its_own_without_log_file(self, suite: pytest.Pytester
                                                                 ) -> None:
        suite.makepyfile(test_shared=SHARED)
        result = suite.runpytest_subprocess("--sanitize-threads=log")
        result.assert_outcomes(failed=1)
        output = result.stdout.str() + result.stderr.str()
        # Nor the exit summary event that goes with a log: the test report is the output.
        assert "thread_affinity_violation" not in output
        assert "thread_affinity_summary" not in output

    def test_log_file_still_gets_the_json_lines(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_shared=SHARED)
        log = suite.path / "log.jsonl"
        result = suite.runpytest(f"--sanitize-threads=log_file={log}")
        result.assert_outcomes(failed=1)
        [record, summary] = [json.loads(line) for line in log.read_text().splitlines()]
        assert record["event"] == "thread_affinity_violation"
        assert record["thread"]["name"] == "worker"
        # Written as the session stops the sanitizer: its exact counts, for readers.
        assert summary["event"] == "thread_affinity_summary" and summary["total"] == 1

    def test_executor_and_swallowed_exception(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            from concurrent.futures import ThreadPoolExecutor
            from helpers import connect

            def test_executor():
                conn = connect()
                with ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:
                    future = pool.submit(conn.execute, "select 1")
                    future.exception()   # sqlite3's ProgrammingError, never looked at

            def test_unrelated():
                pass
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(failed=1, passed=1)
        result.stdout.fnmatch_lines(["*called by thread T* 'pool_0'*"])

    def test_server_thread(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import threading, urllib.request
            from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
            import pytest
            from helpers import connect

            @pytest.fixture
            def server():
                conn = connect()   # created
                conn.execute("create table hits (n)")
                class Handler(BaseHTTPRequestHandler):
                    def do_GET(self):
                        try:
                            conn.execute("insert into hits values (1)")   # served
                        except Exception:
                            pass
                        self.send_response(204)
                        self.end_headers()
                    def log_message(self, *args):
                        pass
                httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
                thread = threading.Thread(target=httpd.serve_forever, name="server")
                thread.start()
                yield f"http://127.0.0.1:{httpd.server_address[1]}/"
                httpd.shutdown()
                thread.join()
                httpd.server_close()

            def test_request(server):
                urllib.request.urlopen(server, timeout=10).close()
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([
            "FAILED test_server_thread.py::test_request - thread-affinity violation*"])
        assert "started during" not in result.stdout.str()  # the test's own server

    def test_setup_and_teardown_violations_are_errors(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import pytest
            from helpers import connect, in_thread

            @pytest.fixture
            def bad_setup():
                conn = connect()
                in_thread(lambda: conn.execute("select 1"))
                yield

            @pytest.fixture
            def bad_teardown():
                conn = connect()
                yield
                in_thread(lambda: conn.execute("select 2"))

            def test_setup(bad_setup):
                pass

            def test_teardown(bad_teardown):
                pass
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(errors=2, passed=1)
        result.stdout.fnmatch_lines_random([
            "*ERROR at setup of test_setup*",
            "*ERROR at teardown of test_teardown*",
            "*Thread-affinity violations (setup)*",
            "*Thread-affinity violations (teardown)*",
            "test_setup_and_teardown_violations_are_errors.py::test_setup (setup)",
            "test_setup_and_teardown_violations_are_errors.py::test_teardown (teardown)",
        ])

    def test_a_failing_test_keeps_its_failure_and_gains_the_section(
            self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_both='''
            from helpers import connect, in_thread

            def test_both():
                conn = connect()
                in_thread(lambda: conn.execute("select 1"))
                assert 1 == 2
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["E       assert 1 == 2", "*Thread-affinity violations (call)*",
                                     "FAILED *::test_both - assert 1 == 2"])

    def test_skip_fails_and_xfail_stays_xfailed(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_outcomes='''
            import pytest
            from helpers import violate

            def test_skipped_after_violating():
                violate()
                pytest.skip("not today")

            @pytest.mark.xfail(reason="known bug")
            def test_expected_to_fail():
                violate()
                assert False
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(failed=1, xfailed=1)
        result.stdout.fnmatch_lines(["FAILED test_outcomes.py::test_skipped_after_violating*"])

    def test_clean_tests_are_untouched(self, suite: pytest.Pytester,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        suite.makepyfile('''
            import os, sqlite3, threading
            from helpers import in_thread

            def note(conn):  # out of band: the output must not change
                from sanitizer.ownership import record_of
                with open("tracked.txt", "a") as file:
                    file.write(f"{record_of(conn) is not None} ")

            def test_own_connection():
                conn = sqlite3.connect(":memory:")
                note(conn)
                assert conn.execute("select 1").fetchone() == (1,)
                if os.environ.get("MISUSE"):  # the outer test's control
                    in_thread(lambda: conn.execute("select 1"))
            def test_connection_per_thread():
                def work():
                    conn = sqlite3.connect(":memory:")
                    note(conn)
                    conn.execute("select 1")
                t = threading.Thread(target=work); t.start(); t.join()
            def test_prints():
                print("hello")
        ''')
        suite.makeconftest('''
            SEEN = []
            def pytest_runtest_logreport(report):
                SEEN.append((report.when, report.outcome, report.sections, report.user_properties,
                             report.longrepr))
            def pytest_sessionfinish(session):
                print("REPORTS", SEEN)
        ''')
        plain = suite.runpytest("-s", "-rA", "-p", "no:randomly")
        (suite.path / "tracked.txt").unlink()
        sanitized = suite.runpytest("-s", "-rA", "-p", "no:randomly", "--sanitize-threads")
        sanitized.assert_outcomes(passed=3)

        def lines(result: pytest.RunResult) -> list[str]:
            return [re.sub(r" in [\d.]+s", "", line) for line in result.outlines
                    if not line.startswith(("sanitize-threads:", "rootdir:"))]
        assert lines(plain) == lines(sanitized)
        # Both connections were watched: the runs are alike because the tests are clean ...
        assert (suite.path / "tracked.txt").read_text().split() == ["True", "True"]
        # ... and one misuse of the first test's connection, all else equal, fails it.
        monkeypatch.setenv("MISUSE", "1")
        misused = suite.runpytest("-p", "no:randomly", "--sanitize-threads")
        misused.assert_outcomes(passed=2, failed=1)
        misused.stdout.fnmatch_lines([
            "*::test_own_connection (call)",
            "  (strict) sqlite3.Connection.execute called by thread T* 'worker'*",
            "sanitize-threads: 1 violation(s) in 1 test(s)",
            "FAILED *::test_own_connection*"])

    def test_thread_that_outlives_its_test(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import threading
            from helpers import connect

            conn = connect()
            go, done = threading.Event(), threading.Event()

            def linger():
                go.wait(30)
                try:
                    conn.execute("select 1")   # late
                except Exception:
                    pass
                done.set()

            lingering = []

            def test_starts_thread():
                lingering.append(threading.Thread(target=linger, name="lingerer"))
                lingering[0].start()

            def test_innocent():
                go.set()
                assert done.wait(30)
                lingering[0].join()
        ''')
        result = suite.runpytest("--sanitize-threads", "-p", "no:randomly")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines([
            "*_ test_innocent _*",
            "thread-affinity violation (strict):*'lingerer'*",
            "  in thread 'lingerer' started during call of "
            "test_thread_that_outlives_its_test.py::test_starts_thread",
        ])

    def test_violation_outside_any_test_fails_the_session(self, suite: pytest.Pytester) -> None:
        suite.makeconftest('''
            import threading
            from helpers import connect

            def pytest_sessionfinish(session):
                conn = connect()
                def use():
                    try:
                        conn.execute("select 1")
                    except Exception:
                        pass
                t = threading.Thread(target=use, name="at-exit"); t.start(); t.join()
        ''')
        suite.makepyfile("def test_fine(): pass")
        report = suite.path / "report.json"
        result = suite.runpytest("--sanitize-threads", f"--sanitize-threads-report={report}")
        result.assert_outcomes(passed=1)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines([
            "*= thread-affinity violations =*",
            "outside any test (session end)",
            "  (strict) *'at-exit'*",
            "sanitize-threads: 1 violation(s) in 0 test(s), 1 outside any test",
        ])
        [record] = json.loads(report.read_text())["records"]
        assert record["nodeid"] is None
        assert record["when"] == "session end"

    def test_violation_during_collection(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            from helpers import connect, in_thread
            conn = connect()
            in_thread(lambda: conn.execute("select 1"), name="importer")

            def test_fine():
                pass
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(passed=1)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(["outside any test (collection)"])


class TestActions:
    def test_raise_in_the_test_thread_is_reported_once(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_raises='''
            import threading
            from helpers import connect

            def test_raises():
                made = []
                t = threading.Thread(target=lambda: made.append(connect())); t.start(); t.join()
                made[0].execute("select 1")
        ''')
        result = suite.runpytest("--sanitize-threads=raise")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([
            "E *ThreadAffinityError: sqlite3.Connection.execute called by thread T0 "
            "'MainThread', but the sqlite3.Connection belongs to thread T* which has exited "
            "(strict policy)",
            "FAILED test_raises.py::test_raises - sanitizer.exceptions.ThreadAffinityError*"])
        assert section_count(result) == 0  # not reported twice

    def test_raise_in_a_fixture_is_reported_once(self, suite: pytest.Pytester) -> None:
        # Setup and teardown keep no exception for the plugin to look at (pytest keeps
        # the call's only): the error that failed them is recognised in the report.
        suite.makepyfile(test_fixture_raises='''
            import pytest
            from helpers import connect, in_thread

            @pytest.fixture
            def broken_setup():
                conn = connect()
                [error] = in_thread(lambda: conn.execute("select 1"))
                conn.execute("select 1")  # fine: the owner
                raise error

            @pytest.fixture
            def broken_teardown():
                made = []
                in_thread(lambda: made.append(connect()))
                yield
                made[0].execute("select 1")

            def test_setup(broken_setup):
                pass

            def test_teardown(broken_teardown):
                pass
        ''')
        result = suite.runpytest("--sanitize-threads=raise")
        result.assert_outcomes(passed=1, errors=2)
        result.stdout.fnmatch_lines(["ERROR *test_setup - sanitizer.exceptions.Thread*",
                                     "ERROR *test_teardown - sanitizer.exceptions.Thread*"])
        assert section_count(result) == 0  # not reported twice

    def test_raise_in_a_background_thread_is_not_also_a_thread_warning(
            self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import threading
            from helpers import connect

            def test_thread_dies():
                conn = connect()
                t = threading.Thread(target=conn.execute, args=("select 1",), name="dies")
                t.start(); t.join()

            def test_other_thread_errors_are_still_pytests():
                t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join()
        ''')
        result = suite.runpytest("--sanitize-threads=raise", "-W",
                                 "default::pytest.PytestUnhandledThreadExceptionWarning")
        result.assert_outcomes(failed=1, passed=1)
        text = result.stdout.str()
        assert text.count("Exception in thread") == 1
        assert "ZeroDivisionError" in text
        assert "Exception in thread dies" not in text
        assert section_count(result) == 1

    def test_raise_caught_by_the_test_still_fails_it(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import pytest
            from sanitizer import ThreadAffinityError
            from helpers import connect, in_thread

            def test_catches():
                conn = connect()
                [error] = in_thread(lambda: conn.execute("select 1"))
                assert isinstance(error, ThreadAffinityError)
        ''')
        result = suite.runpytest("--sanitize-threads=raise")
        result.assert_outcomes(failed=1)
        assert section_count(result) == 1

    def test_warn(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_shared=SHARED)
        result = suite.runpytest("--sanitize-threads=warn")
        result.assert_outcomes(failed=1, warnings=1)
        result.stdout.fnmatch_lines(["*ThreadAffinityWarning: sqlite3.Connection.execute*"])

    def test_exitcode_option_sets_the_exit_status(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_shared=SHARED)
        result = suite.runpytest("--sanitize-threads=exitcode=66")
        assert result.ret == 66


class TestRobustness:
    def test_an_internal_error_is_said_once_and_its_tests_still_fail(
            self, suite: pytest.Pytester) -> None:
        suite.makeconftest('''
            from sanitizer.plugins import pytest_plugin
            import sanitizer.plugins.pytest_plugin.session

            def broken(self, record):
                raise RuntimeError("renderer broke")

            pytest_plugin.session._Plugin._render = broken  # a bug in the plugin, on purpose
        ''')
        suite.makepyfile(test_bug='''
            from helpers import violate

            def test_first():
                violate()

            def test_second():
                violate()

            def test_clean():
                pass
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads")
        result.assert_outcomes(passed=1, failed=2)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        output = result.stdout.str() + result.stderr.str()
        assert "INTERNALERROR" not in output
        assert output.count("sanitizer_internal_error") == 1, output  # said once
        result.stdout.fnmatch_lines([
            "1 thread-affinity violation(s); the report could not be built "
            "(RuntimeError: renderer broke)",
            "FAILED test_bug.py::test_first - 1 thread-affinity violation(s)*",
            "FAILED test_bug.py::test_second - 1 thread-affinity violation(s)*",
        ])

    def test_a_report_path_that_cannot_be_written_is_one_line_and_exit_status_4(
            self, suite: pytest.Pytester) -> None:
        suite.makepyfile(SHARED)
        (suite.path / "blocker").write_text("a file, not a directory")
        result = suite.runpytest("--sanitize-threads", "--sanitize-threads-report=blocker/v.json")
        result.assert_outcomes(failed=1)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stdout.fnmatch_lines(
            ["sanitize-threads: cannot write the --sanitize-threads-report file: *blocker*"])


# -- the marker ------------------------------------------------------------------------------


class TestMarker:
    def test_opt_out(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import pytest
            from helpers import connect, in_thread

            @pytest.mark.sanitize_threads(False)
            def test_opted_out():
                conn = connect()
                assert [type(e).__name__ for e in in_thread(lambda: conn.execute("select 1"))
                        ] == ["ProgrammingError"]   # sqlite3's own, not ours

            def test_checked():
                conn = connect()
                in_thread(lambda: conn.execute("select 1"))
        ''')
        result = suite.runpytest("--sanitize-threads=raise", "--strict-markers")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["FAILED *::test_checked*"])

    def test_action_per_test(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import pytest
            from sanitizer import ThreadAffinityError
            from helpers import connect, in_thread

            @pytest.mark.sanitize_threads(action="raise")
            def test_raises_here(thread_violations):
                conn = connect()
                with thread_violations.expect(policy="strict"):
                    [error] = in_thread(lambda: conn.execute("select 1"))
                assert isinstance(error, ThreadAffinityError)

            def test_logs_here():
                conn = connect()
                [error] = in_thread(lambda: conn.execute("select 1"))
                assert not isinstance(error, ThreadAffinityError)
        ''')
        result = suite.runpytest("--sanitize-threads=log")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["FAILED *::test_logs_here*"])

    def test_suppressions_per_test(self, suite: pytest.Pytester) -> None:
        (suite.path / "sub").mkdir()
        (suite.path / "sub" / "__init__.py").touch()
        (suite.path / "sub" / "known.txt").write_text("# known issue\nobject:sqlite3.*\n")
        (suite.path / "sub" / "test_s.py").write_text(
            "import pytest\n"
            "from helpers import connect, in_thread\n"
            "@pytest.mark.sanitize_threads(suppressions='known.txt')\n"
            "def test_known():\n"
            "    conn = connect()\n"
            "    in_thread(lambda: conn.execute('select 1'))\n"
            "def test_not_known():\n"
            "    conn = connect()\n"
            "    in_thread(lambda: conn.execute('select 1'))\n")
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["FAILED sub/test_s.py::test_not_known*"])

    @pytest.mark.parametrize("workers", [[], ["-n", "2"]] if HAS_XDIST else [[]],
                             ids=["in-process", "xdist"][:2 if HAS_XDIST else 1])
    def test_suppressions_that_never_matched_are_listed(self, suite: pytest.Pytester,
                                                        workers: list[str]) -> None:
        (suite.path / "session.txt").write_text(
            "access-function:test_session_rule.*\naccess-site:*/nowhere.py\n")
        (suite.path / "marker.txt").write_text("object:sqlite3.*\npolicy:no-such-policy\n")
        suite.makepyfile(test_rules='''
            import pytest
            from helpers import connect, in_thread

            def test_session_rule():
                conn = connect()
                in_thread(lambda: conn.execute("select 1"))

            @pytest.mark.sanitize_threads(suppressions="marker.txt")
            def test_marker_rule():
                conn = connect()
                in_thread(lambda: conn.execute("select 1"))
        ''')
        result = suite.runpytest(*workers, "--sanitize-threads=suppressions=session.txt")
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines([
            "sanitize-threads: suppressions that never matched:",
            "  *session.txt:2: access-site:[*]/nowhere.py",
            "  *marker.txt:2: policy:no-such-policy",
        ])
        listed = result.stdout.str().split("never matched:")[1]
        assert "test_session_rule" not in listed and "object:sqlite3" not in listed

    def test_policy_per_test(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import pytest
            from helpers import violate

            @pytest.mark.sanitize_threads(policy="-strict")
            def test_ignores_strict():
                violate()

            @pytest.mark.sanitize_threads(policy="exclusive+process")
            def test_only_exclusive_and_process():
                violate()

            @pytest.mark.sanitize_threads(policy="strict")
            def test_only_strict():
                violate()
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["FAILED *::test_only_strict*"])

    def test_closest_marker_wins(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import pytest
            from helpers import violate

            @pytest.mark.sanitize_threads(False)
            class TestQuiet:
                def test_quiet(self):
                    violate()

                @pytest.mark.sanitize_threads(True)
                def test_loud(self):
                    violate()
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["FAILED *::TestQuiet::test_loud*"])

    @pytest.mark.parametrize(("marker", "message"), [
        ("sanitize_threads('yes')", "takes one positional argument, True or False; got ('yes',)"),
        ("sanitize_threads(log_file='x')", "unknown argument 'log_file'; accepted: action, "
         "suppressions, policy (other options are for the whole session: command line, ini "
         "option or SANITIZE_THREADS)"),
        ("sanitize_threads(action='loud')", "bad value 'loud' for 'action'; expected one or more "
         "of log, warn, raise joined by '+'"),
        ("sanitize_threads(policy='lenient')", "unknown policy 'lenient'; expected one of:*"),
        ("sanitize_threads(suppressions='nope.txt')", "suppressions='*nope.txt': cannot read "
         "file*"),
    ])
    def test_bad_marker_is_a_setup_error(self, suite: pytest.Pytester, marker: str,
                                         message: str) -> None:
        suite.makepyfile(f'''
            import pytest

            @pytest.mark.{marker}
            def test_marked():
                pass
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([
            f"@pytest.mark.sanitize_threads on test_bad_marker_is_a_setup_error.py::test_marked: "
            f"{message}"])

    def test_marker_is_registered_when_off(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import pytest

            @pytest.mark.sanitize_threads(action="raise")
            def test_marked():
                pass
        ''')
        suite.runpytest("--strict-markers").assert_outcomes(passed=1)
        suite.runpytest("--markers").stdout.fnmatch_lines(["@pytest.mark.sanitize_threads(*"])


# -- the fixture -----------------------------------------------------------------------------


class TestFixture:
    def test_list_and_expect(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            from helpers import connect, in_thread

            def test_expected(thread_violations):
                assert thread_violations == []
                conn = connect()
                with thread_violations.expect(policy="strict", object_type="sqlite3.*",
                                              operation="execute", match="belongs to"):
                    in_thread(lambda: conn.execute("select 1"), name="helper")
                    assert len(thread_violations) == 1
                    [seen] = thread_violations
                    assert (seen.policy, seen.object_type, seen.operation, seen.when,
                            seen.thread, seen.count) == (
                        "strict", "sqlite3.Connection", "execute", "call", "helper", 1)
                assert thread_violations == []
                assert len(thread_violations.expected) == 1

            def test_unexpected_after_the_block(thread_violations):
                conn = connect()
                with thread_violations.expect():
                    in_thread(lambda: conn.execute("select 1"))
                in_thread(lambda: conn.execute("select 2"))
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["FAILED *::test_unexpected_after_the_block*"])

    def test_expect_fails_when_nothing_matches(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            from helpers import connect, in_thread

            def test_nothing(thread_violations):
                with thread_violations.expect(policy="strict"):
                    pass

            def test_other_policy(thread_violations):
                conn = connect()
                with thread_violations.expect(policy="exclusive"):
                    in_thread(lambda: conn.execute("select 1"))
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(failed=2)
        result.stdout.fnmatch_lines([
            "*expected a thread-affinity violation matching policy='strict' inside the block, "
            "but none happened; other violations so far: none",
            "*expected a thread-affinity violation matching policy='exclusive' inside the "
            "block, but none happened; other violations so far: (strict) sqlite3.Connection*",
        ])

    def test_expect_swallows_the_matching_error(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import threading
            from helpers import connect

            def test_in_main_thread(thread_violations):
                made = []
                t = threading.Thread(target=lambda: made.append(connect())); t.start(); t.join()
                with thread_violations.expect(object_type="sqlite3.Connection"):
                    made[0].execute("select 1")
                    raise AssertionError("not reached")
        ''')
        result = suite.runpytest("--sanitize-threads=raise")
        result.assert_outcomes(passed=1)

    def test_exclusive_policy_overlapping_calls(self, suite: pytest.Pytester) -> None:
        # check_same_thread=False: handing over is fine, overlapping calls are not.
        # action=raise stops the second call before it waits for sqlite3's own lock.
        suite.makepyfile('''
            import sqlite3, threading
            import pytest
            from sanitizer import ThreadAffinityError
            from helpers import in_thread

            @pytest.mark.sanitize_threads(action="raise")
            def test_overlap(thread_violations):
                conn = sqlite3.connect(":memory:", check_same_thread=False)
                inside, release = threading.Event(), threading.Event()
                def slow(x):
                    inside.set()
                    release.wait(30)
                    return x
                conn.create_function("slow", 1, slow)
                holder = threading.Thread(target=lambda: conn.execute("select slow(1)"))
                holder.start()
                try:
                    assert inside.wait(30)
                    with thread_violations.expect(policy="exclusive"):
                        [error] = in_thread(lambda: conn.execute("select 1"), name="second")
                    assert isinstance(error, ThreadAffinityError)
                    assert "while thread" in str(error)
                finally:
                    release.set()
                    holder.join()

            def test_handoff_is_fine():  # test_overlap is its control: the same connection
                from sanitizer.ownership import record_of
                conn = sqlite3.connect(":memory:", check_same_thread=False)
                assert record_of(conn) is not None
                t = threading.Thread(target=lambda: conn.execute("select 1")); t.start(); t.join()
                conn.execute("select 2")
        ''')
        result = suite.runpytest("--sanitize-threads")
        result.assert_outcomes(passed=2)

    def test_skips_when_off(self, suite: pytest.Pytester) -> None:
        suite.makepyfile("def test_uses(thread_violations): pass")
        result = suite.runpytest("-rs")
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["*thread_violations needs the sanitizer*"])


# -- reports -----------------------------------------------------------------------------------


class TestReports:
    def test_json_report_and_junit_properties(self, suite: pytest.Pytester) -> None:
        path = suite.makepyfile('''
            import sqlite3
            from helpers import connect, in_thread

            def test_bad():
                conn = sqlite3.connect(":memory:")   # created
                for _ in range(2):
                    in_thread(lambda: conn.execute("select 1"))   # used

            def test_expected(thread_violations):
                conn = connect()
                with thread_violations.expect():
                    in_thread(lambda: conn.execute("select 1"))

            def test_good():
                pass
        ''')
        result = suite.runpytest("--sanitize-threads", "--sanitize-threads-report=out/v.json",
                                 "--junitxml=junit.xml")
        result.assert_outcomes(passed=2, failed=1)
        document = json.loads((suite.path / "out" / "v.json").read_text())
        assert document["options"] == "1"
        records = {r["nodeid"]: r for r in document["records"]}
        assert set(records) == {"test_json_report_and_junit_properties.py::test_bad",
                                "test_json_report_and_junit_properties.py::test_expected"}
        bad = records["test_json_report_and_junit_properties.py::test_bad"]
        assert bad["event"] == "thread_affinity_violation"
        assert (bad["when"], bad["expected"], bad["policy"], bad["count"]) == (
            "call", False, "strict", 2)
        assert bad["access_site"]["line"] == line_of(path, "used")
        assert bad["creation_site"]["line"] == line_of(path, "created")
        assert bad["origin"] is None and bad["worker"] is None
        assert records["test_json_report_and_junit_properties.py::test_expected"]["expected"]

        tree = ET.parse(suite.path / "junit.xml")
        properties = {case.get("name"): [json.loads(p.get("value", ""))
                                         for p in case.iter("property")
                                         if p.get("name") == "thread_affinity_violation"]
                      for case in tree.iter("testcase")}
        assert [p["nodeid"] for p in properties["test_bad"]] == [
            "test_json_report_and_junit_properties.py::test_bad"]
        assert properties["test_good"] == []


# -- other plugins ---------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_XDIST, reason="needs pytest-xdist")
class TestXdist:
    def test_workers_attribute_and_controller_reports(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(
            test_a=SHARED,
            test_b=SHARED.replace("test_shared", "test_shared_too"),
            test_c="def test_fine(): pass",
            test_d='''
                import threading
                from helpers import connect, in_thread
                conn = connect()
                in_thread(lambda: conn.execute("select 1"), name="at-import")
                def test_fine_too(): pass
            ''',
        )
        result = suite.runpytest_subprocess(
            "-n", "2", "--sanitize-threads", "--sanitize-threads-report=v.json")
        result.assert_outcomes(failed=2, passed=2)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines_random([
            "sanitize-threads: 1 (from --sanitize-threads)",
            "FAILED test_a.py::test_shared - thread-affinity violation (strict)*",
            "FAILED test_b.py::test_shared_too - thread-affinity violation (strict)*",
            "test_a.py::test_shared (call) [[]gw?[]]",
            "outside any test (collection) [[]gw?[]]",
        ])
        records = json.loads((suite.path / "v.json").read_text())["records"]
        by_test = sorted(str(r["nodeid"]) for r in records)
        # each worker imports test_d.py while collecting: one session record per worker
        assert by_test == ["None", "None", "test_a.py::test_shared", "test_b.py::test_shared_too"]
        assert {r["worker"] for r in records} == {"gw0", "gw1"}

    def test_env_with_workers(self, suite: pytest.Pytester,
                              monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SANITIZE_THREADS", "raise")
        suite.makepyfile(test_shared=SHARED)
        result = suite.runpytest_subprocess("-n", "2")
        result.assert_outcomes(failed=1)
        assert "thread_affinity_violation" not in result.stderr.str()


@pytest.mark.skipif(not HAS_ASYNCIO, reason="needs pytest-asyncio")
class TestAsyncio:
    def test_async_tests(self, suite: pytest.Pytester) -> None:
        suite.makepyfile('''
            import asyncio
            import pytest
            from helpers import connect

            @pytest.mark.asyncio
            async def test_to_thread():
                conn = connect()
                with pytest.raises(Exception):
                    await asyncio.to_thread(conn.execute, "select 1")

            @pytest.mark.asyncio
            async def test_expected(thread_violations):
                conn = connect()
                loop = asyncio.get_running_loop()
                with thread_violations.expect(policy="strict"):
                    with pytest.raises(Exception):
                        await loop.run_in_executor(None, conn.execute, "select 1")

            @pytest.mark.asyncio
            async def test_clean():
                conn = connect()
                conn.execute("select 1")
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["*_ test_to_thread _*",
                                     "*(in task 'Task-*' (test_to_thread()) on event loop L*)",
                                     "FAILED *::test_to_thread - thread-affinity violation*"])


    def test_a_session_fixtures_object_in_a_function_loop_names_the_fixture(
            self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_loops='''
            import asyncio
            import pytest
            import pytest_asyncio

            @pytest_asyncio.fixture(scope="session", loop_scope="session")
            async def jobs():
                return asyncio.Queue()  # made by the fixture

            async def bind(queue):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.sleep(0)
                queue.put_nowait(1)  # bound to this test's loop
                await getter

            @pytest.mark.asyncio
            async def test_first(jobs):
                await bind(jobs)

            @pytest.mark.asyncio
            async def test_second(jobs):
                jobs.put_nowait(2)  # another test's loop

            @pytest.mark.asyncio(loop_scope="session")
            async def test_in_the_fixtures_loop(jobs):
                own = asyncio.Queue()
                await bind(own)
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads", "--sanitize-threads-report",
                                            "report.json", "-p", "no:randomly")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines([
            "*_ test_second _*",
            "*made by pytest fixture 'jobs' (scope 'session', loop_scope 'session')*",
            "*hint: the asyncio.Queue was made by fixture 'jobs'*'function'-scoped loop*"
            "loop_scope=\"session\"*",
            "FAILED *::test_second - thread-affinity violation (loop)*"])
        (record,) = json.loads((suite.path / "report.json").read_text())["records"]
        assert record["operation"] == "put_nowait"
        assert record["access_site"]["line"] == line_of(suite.path / "test_loops.py",
                                                        "another test's loop")
        assert record["creation_site"]["line"] == line_of(suite.path / "test_loops.py",
                                                          "made by the fixture")
        assert record["owner_loop"]["state"] == "closed"
        assert record["loop"]["serial"] != record["owner_loop"]["serial"]
        assert "loop_scope" in record["hint"]
        # The same under xdist, the file's tests in one worker (in two, each makes its own).
        result = suite.runpytest_subprocess("--sanitize-threads", "-n", "2", "--dist",
                                            "loadfile", "-p", "no:randomly")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["FAILED *::test_second - thread-affinity violation (loop)*"])


# Its first, unsanitized in-process run violates on purpose: if this suite itself
# runs under --sanitize-threads, that is this test's violation.
@pytest.mark.sanitize_threads(False)
def test_example_fails_under_the_sanitizer(suite: pytest.Pytester) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "test_shared_connection.py"
    suite.makepyfile(test_example=example.read_text())
    suite.runpytest().assert_outcomes(passed=1)
    result = suite.runpytest("--sanitize-threads")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*thread-affinity violation (strict)*"])


def test_module_docstring_documents_the_choices() -> None:
    from sanitizer.plugins import pytest_plugin

    doc = pytest_plugin.__doc__ or ""
    for phrase in ("command line > ini option > environment", "started during",
                   "outside any test", "policy=\"-exclusive\""):
        assert phrase in doc
    assert sys.modules["sanitizer.plugins.pytest_plugin"] is pytest_plugin
