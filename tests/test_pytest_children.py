"""Violations in child processes under pytest: forwarded to the test that started the child.

Real children: os.fork(), multiprocessing's fork context, and interpreters spawned
with SANITIZE_THREADS in their environment, each with real sqlite3 connections,
synchronised with waitpid, join and pipes. The pytest runs are subprocesses, so
that forking never copies this suite's own process; the channel itself is
checked in a script of its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from support import pytester_suite

pytest_plugins = ["pytester"]

HAS_XDIST = importlib.util.find_spec("xdist") is not None

HELPERS = '''
import os
from pathlib import Path

def fork(fn):
    """Run fn in a forked child that ends with os._exit() right after; wait; return its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid

def note(name, pid):
    """Tell the test that ran pytest which pid a child had."""
    Path(name + ".pid").write_text(str(pid))
'''


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory with the helpers, and no sanitizer or xdist settings inherited."""
    return pytester_suite(pytester, monkeypatch, HELPERS)


def pid_of(suite: pytest.Pytester, name: str) -> int:
    return int((suite.path / f"{name}.pid").read_text())


def records_of(suite: pytest.Pytester, report: str = "v.json") -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads((suite.path / report).read_text())["records"]
    return records


def line_of(path: Path, marker: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if f"# {marker}" in line:
            return number
    raise AssertionError(marker)


def junit_properties(path: Path) -> dict[str, list[dict[str, Any]]]:
    tree = ET.parse(path)
    return {case.get("name", ""): [json.loads(p.get("value", "")) for p in case.iter("property")
                                   if p.get("name") == "thread_affinity_violation"]
            for case in tree.iter("testcase")}


REPORT = "--sanitize-threads-report=v.json"
REPORTS = (REPORT, "--junitxml=junit.xml")


class TestForked:
    def test_os_fork_child_fails_its_test(self, suite: pytest.Pytester) -> None:
        path = suite.makepyfile(test_fork='''
            import sqlite3
            from helpers import fork, note

            def test_fork():
                conn = sqlite3.connect(":memory:")   # created
                note("child", fork(lambda: conn.execute("select 1")))   # used

            def test_after():
                pass
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads", "-s", *REPORTS)
        result.assert_outcomes(failed=1, passed=1)
        pid = pid_of(suite, "child")
        used, created = line_of(path, "used"), line_of(path, "created")
        result.stdout.fnmatch_lines([
            "*_ test_fork _*",
            f"thread-affinity violation (process): sqlite3.Connection.execute used in process "
            f"{pid}, but the sqlite3.Connection was created in process * and inherited across "
            "fork()",
            f"  used at test_fork.py:{used} in *",
            f"  created at test_fork.py:{created} in test_fork",
            f"  in child process {pid}",
            "*- Thread-affinity violations (call) -*",
            "WARNING: thread-affinity violation (process) on sqlite3.Connection at 0x*",
            f"  (in child process {pid})",
            "*= thread-affinity violations =*",
            "test_fork.py::test_fork (call)",
            "  (process) sqlite3.Connection.execute used in process*",
            f"      in child process {pid}",
            "sanitize-threads: 1 violation(s) in 1 test(s)",
            "FAILED test_fork.py::test_fork - thread-affinity violation (process): *",
        ])
        [record] = records_of(suite)
        assert record["nodeid"] == "test_fork.py::test_fork"
        assert (record["child_pid"], record["pid"], record["policy"], record["when"],
                record["count"], record["expected"]) == (pid, pid, "process", "call", 1, False)
        assert record["owner_pid"] != pid and record["origin"] is None
        assert record["access_site"]["line"] == used
        assert record["creation_site"]["line"] == created
        assert record["thread_name"] == "MainThread"
        properties = junit_properties(suite.path / "junit.xml")
        assert [(p["nodeid"], p["child_pid"]) for p in properties["test_fork"]] == [
            ("test_fork.py::test_fork", pid)]
        assert properties["test_after"] == []

    def test_multiprocessing_fork_context(self, suite: pytest.Pytester) -> None:
        path = suite.makepyfile(test_mp='''
            import multiprocessing
            import sqlite3
            from helpers import note

            def use(conn):
                for _ in range(3):
                    conn.execute("select 1")   # used

            def test_process():
                conn = sqlite3.connect(":memory:")
                process = multiprocessing.get_context("fork").Process(target=use, args=(conn,))
                process.start()
                process.join()
                note("child", process.pid)
                assert process.exitcode == 0
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads", *REPORTS)
        result.assert_outcomes(failed=1)
        pid = pid_of(suite, "child")
        result.stdout.fnmatch_lines([
            "FAILED test_mp.py::test_process - thread-affinity violation (process): *",
        ])
        result.stdout.fnmatch_lines([
            "test_mp.py::test_process (call)",
            "  (process) sqlite3.Connection.execute used in process * [[]3x[]]",
            f"      used at test_mp.py:{line_of(path, 'used')} in use",
            f"      in child process {pid}",
            "sanitize-threads: 3 violation(s) in 1 test(s)",
        ])
        [record] = records_of(suite)
        assert (record["nodeid"], record["child_pid"], record["count"]) == (
            "test_mp.py::test_process", pid, 3)
        assert [p["child_pid"] for p in junit_properties(suite.path / "junit.xml")[
            "test_process"]] == [pid]

    def test_action_raise_raises_in_the_child_and_reports_once(
            self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_raise='''
            import os
            import sqlite3
            from sanitizer.exceptions import ThreadAffinityError

            def test_child_raises():
                conn = sqlite3.connect(":memory:")
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    try:
                        conn.execute("select 1")
                        os.write(write_end, b"went ahead")
                    except ThreadAffinityError:
                        os.write(write_end, b"raised")
                    finally:
                        os._exit(0)
                os.waitpid(pid, 0)
                print("CHILD", os.read(read_end, 100))
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads=raise", "-s", REPORT)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*CHILD b'raised'*"])
        [record] = records_of(suite)
        assert (record["policy"], record["count"]) == ("process", 1)

    def test_thread_violations_fixture_expects_a_childs_violation(
            self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_expect='''
            import sqlite3
            from helpers import fork

            def test_expected(thread_violations):
                conn = sqlite3.connect(":memory:")
                with thread_violations.expect(policy="process"):
                    fork(lambda: conn.execute("select 1"))
                assert thread_violations == []
                assert [v.child_pid is not None for v in thread_violations.expected] == [True]
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads", REPORT)
        result.assert_outcomes(passed=1)
        [record] = records_of(suite)
        assert record["expected"] and record["child_pid"] is not None


class TestSpawned:
    def test_spawned_child_with_sanitize_threads_in_its_environment(
            self, suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SANITIZE_THREADS", "1")
        suite.makepyfile(test_spawn='''
            import subprocess
            import sys

            CHILD = """
            import os, sqlite3, threading
            open("spawned.pid", "w").write(str(os.getpid()))
            conn = sqlite3.connect(":memory:")
            def use():
                try:
                    conn.execute("select 1")
                except sqlite3.ProgrammingError:  # sqlite3's own check, after the report
                    pass
            worker = threading.Thread(target=use, name="child-worker")
            worker.start()
            worker.join()
            """

            def test_spawns():
                subprocess.run([sys.executable, "-c", CHILD], check=True)

            def test_clean():
                pass
        ''')
        result = suite.runpytest_subprocess(*REPORTS)
        result.assert_outcomes(failed=1, passed=1)
        pid = pid_of(suite, "spawned")
        result.stdout.fnmatch_lines([
            "sanitize-threads: 1 (from SANITIZE_THREADS)",
            "*= thread-affinity violations =*",
            "test_spawn.py::test_spawns (call)",
            "  (strict) sqlite3.Connection.execute called by thread T1 'child-worker'*",
            f"      in child process {pid}",
            "FAILED test_spawn.py::test_spawns - thread-affinity violation (strict): *",
        ])
        [record] = records_of(suite)
        assert (record["nodeid"], record["child_pid"], record["pid"], record["owner_pid"],
                record["policy"], record["thread_name"]) == (
            "test_spawn.py::test_spawns", pid, pid, pid, "strict", "child-worker")
        assert [p["child_pid"] for p in junit_properties(suite.path / "junit.xml")[
            "test_spawns"]] == [pid]


class TestAttribution:
    def test_child_that_outlives_its_test(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_outlives='''
            import os
            import select
            import sqlite3
            from helpers import note

            conn = sqlite3.connect(":memory:")
            read_end, write_end = os.pipe()
            children = []

            def test_starts_child():
                pid = os.fork()
                if pid == 0:
                    try:
                        select.select([read_end], [], [], 60)
                        conn.execute("select 1")   # late
                    finally:
                        os._exit(0)
                children.append(pid)
                note("child", pid)

            def test_innocent():
                os.write(write_end, b"go")
                os.waitpid(children[0], 0)
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads", "-p", "no:randomly", *REPORTS)
        result.assert_outcomes(passed=1, failed=1)
        pid = pid_of(suite, "child")
        started = "started during call of test_outlives.py::test_starts_child"
        result.stdout.fnmatch_lines([
            "*_ test_innocent _*",
            "thread-affinity violation (process):*",
            f"  in child process {pid} {started}",
            "*- Thread-affinity violations (call) -*",
            f"  (in child process {pid}, {started})",
            "*= thread-affinity violations =*",
            "test_outlives.py::test_innocent (call)",
            f"      in child process {pid} {started}",
            "FAILED test_outlives.py::test_innocent - thread-affinity violation (process)*",
        ])
        [record] = records_of(suite)
        assert (record["nodeid"], record["child_pid"]) == ("test_outlives.py::test_innocent", pid)
        assert record["origin"] == {"nodeid": "test_outlives.py::test_starts_child",
                                    "when": "call"}

    def test_child_that_outlives_every_test_fails_the_session(
            self, suite: pytest.Pytester) -> None:
        suite.makeconftest('''
            import os
            import sqlite3

            conn = sqlite3.connect(":memory:")
            read_end, write_end = os.pipe()
            children = []

            def pytest_sessionfinish(session):
                os.write(write_end, b"go")
                os.waitpid(children[0], 0)
        ''')
        suite.makepyfile(test_last='''
            import os
            import select
            from conftest import conn, read_end, children
            from helpers import note

            def test_starts_child():
                pid = os.fork()
                if pid == 0:
                    try:
                        select.select([read_end], [], [], 60)
                        conn.execute("select 1")
                    finally:
                        os._exit(0)
                children.append(pid)
                note("child", pid)
        ''')
        result = suite.runpytest_subprocess("--sanitize-threads", REPORT)
        result.assert_outcomes(passed=1)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        pid = pid_of(suite, "child")
        result.stdout.fnmatch_lines([
            "outside any test (session end)",
            "  (process) *",
            f"      in child process {pid} started during call of test_last.py::test_starts_child",
            "sanitize-threads: 1 violation(s) in 0 test(s), 1 outside any test",
        ])
        [record] = records_of(suite)
        assert (record["nodeid"], record["when"], record["child_pid"]) == (
            None, "session end", pid)

    def test_quiet_child_leaves_its_test_alone(self, suite: pytest.Pytester) -> None:
        suite.makepyfile(test_children='''
            import sqlite3
            import threading
            from pathlib import Path
            from helpers import fork
            from sanitizer.ownership import record_of

            def child(loud):
                own = sqlite3.connect(":memory:")  # the child's own
                Path("child-tracked").write_text(str(record_of(own) is not None))
                own.execute("select 1")
                if loud:  # the one difference: tracked in the child, forwarded from it
                    worker = threading.Thread(target=use, args=(own,))
                    worker.start()
                    worker.join()

            def use(conn):
                try:
                    conn.execute("select 1")
                except sqlite3.ProgrammingError:  # sqlite3's own check, after the report
                    pass

            def test_silent():
                conn = sqlite3.connect(":memory:")
                assert record_of(conn) is not None
                conn.execute("select 1")
                fork(lambda: child(False))
                conn.execute("select 1")

            def test_loud():
                fork(lambda: child(True))
        ''')
        quiet = suite.runpytest_subprocess("--sanitize-threads", "-k", "silent",
                                           "--sanitize-threads-report=quiet.json")
        quiet.assert_outcomes(passed=1)
        assert quiet.ret == pytest.ExitCode.OK
        assert records_of(suite, "quiet.json") == []
        assert "thread-affinity violation" not in quiet.stdout.str()
        assert (suite.path / "child-tracked").read_text() == "True"  # watched in the child

        both = suite.runpytest_subprocess("--sanitize-threads", REPORT)
        both.assert_outcomes(passed=1, failed=1)
        assert [(r["nodeid"], r["policy"]) for r in records_of(suite)] == [
            ("test_children.py::test_loud", "strict")]

    def test_the_tests_settings_apply_to_its_children(self, suite: pytest.Pytester) -> None:
        path = suite.makepyfile(test_settings='''
            import sqlite3
            import pytest
            from helpers import fork

            def use_known(conn):
                conn.execute("select 1")   # known

            @pytest.mark.sanitize_threads(False)
            def test_opted_out():
                conn = sqlite3.connect(":memory:")
                fork(lambda: conn.execute("select 1"))

            @pytest.mark.sanitize_threads(policy="-process")
            def test_ignores_process():
                conn = sqlite3.connect(":memory:")
                fork(lambda: conn.execute("select 1"))

            @pytest.mark.sanitize_threads(suppressions="known.supp")
            def test_suppressed():
                conn = sqlite3.connect(":memory:")
                fork(lambda: use_known(conn))

            def test_checked():
                conn = sqlite3.connect(":memory:")
                fork(lambda: use_known(conn))
        ''')
        known = line_of(path, "known")
        (suite.path / "known.supp").write_text(f"site:test_settings.py:{known}\n")
        result = suite.runpytest_subprocess("--sanitize-threads", REPORT)
        result.assert_outcomes(passed=3, failed=1)
        assert [r["nodeid"] for r in records_of(suite)] == ["test_settings.py::test_checked"]


@pytest.mark.skipif(not HAS_XDIST, reason="needs pytest-xdist")
def test_xdist_workers_collect_their_own_tests_children(suite: pytest.Pytester) -> None:
    fork_test = '''
        import sqlite3
        from helpers import fork, note

        def test_forks():
            conn = sqlite3.connect(":memory:")
            note("{name}", fork(lambda: conn.execute("select 1")))
    '''
    suite.makepyfile(
        test_a=fork_test.format(name="a"),
        test_b=fork_test.format(name="b"),
        test_c='''
            import os
            from helpers import fork, note

            def test_quiet_fork():
                fork(lambda: None)
                collector = os.environ["SANITIZE_THREADS_FORWARD"].partition(":")[0]
                note("announced", int(collector))
                note("worker", os.getpid())
        ''',
    )
    result = suite.runpytest_subprocess("-n", "2", "--sanitize-threads", *REPORTS)
    result.assert_outcomes(failed=2, passed=1)
    a, b = pid_of(suite, "a"), pid_of(suite, "b")
    records = records_of(suite)
    assert {r["nodeid"]: r["child_pid"] for r in records} == {
        "test_a.py::test_forks": a, "test_b.py::test_forks": b}
    assert {r["worker"] for r in records} <= {"gw0", "gw1"}
    result.stdout.fnmatch_lines_random([
        "test_a.py::test_forks (call) [[]gw?[]]",
        f"      in child process {a}",
        f"      in child process {b}",
        "FAILED test_a.py::test_forks - thread-affinity violation (process)*",
        "FAILED test_b.py::test_forks - thread-affinity violation (process)*",
    ])
    properties = junit_properties(suite.path / "junit.xml")
    assert properties["test_quiet_fork"] == []
    # the worker that ran the test collects (the controller runs no tests, and no channel)
    assert pid_of(suite, "announced") == pid_of(suite, "worker")


def test_an_in_process_run_restores_the_announcement_and_removes_its_channel(
        suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANITIZE_THREADS_FORWARD", "1:/an/outer/collector")
    suite.makepyfile('''
        import os
        from pathlib import Path

        def test_records_the_announcement():
            Path("announced").write_text(os.environ["SANITIZE_THREADS_FORWARD"])
    ''')
    suite.runpytest("--sanitize-threads").assert_outcomes(passed=1)
    collector, _, path = (suite.path / "announced").read_text().partition(":")
    assert (int(collector), Path(path).name) == (os.getpid(), "forwarded.jsonl")
    assert not Path(path).parent.exists()
    assert os.environ["SANITIZE_THREADS_FORWARD"] == "1:/an/outer/collector"


# -- the channel itself ---------------------------------------------------------------------

CHANNEL_SCRIPT = '''
import json, os, select, sqlite3, threading
import sanitizer
from sanitizer import forward

os.environ[forward.ENV_VAR] = "outer"
channel = forward.Channel()
sanitizer.enable(log_file=os.devnull)
out = {"announced": os.environ[forward.ENV_VAR] == f"{os.getpid()}:{channel.path}"}
conn = sqlite3.connect(":memory:", check_same_thread=False)

# The collector's own violations are not forwarded: a strict connection of this
# thread, used by another one (a handoff of the exclusive conn would be no violation).
mine = sqlite3.connect(":memory:")
def misuse():
    try:
        mine.execute("select 1")
    except sqlite3.ProgrammingError:
        pass
worker = threading.Thread(target=misuse)
worker.start(); worker.join()
out["own_seen"] = [v.policy for v in sanitizer.violations()]
out["own"] = len(channel.poll())

# Many children at once, each with many occurrences, two threads each.
def child():
    def use():
        for _ in range(50):
            conn.execute("select 1")
    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()

pids = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
found = channel.poll()
records = {id(v): v for v in found}.values()  # repeats are the same object
out["occurrences"] = sorted((pids.index(v.child_pid), sum(f is v for f in found))
                            for v in records)
out["policies"] = sorted({v.policy for v in found})
out["skipped"] = channel.skipped

# A line that is not complete yet waits for the rest.
ref = next(iter(channel._records))
with open(channel.path, "a") as f:
    f.write('{"again": ')
    f.flush()
    out["partial"] = len(channel.poll())
    f.write(json.dumps(ref) + "}\\n")
again = channel.poll()
out["completed"] = [v is channel._records[ref] for v in again]

# A child that outlives the channel writes nothing and does not fail.
read_end, write_end = os.pipe()
status_read, status_write = os.pipe()
late = os.fork()
if late == 0:
    try:
        select.select([read_end], [], [], 60)
        conn.execute("select 1")
        os.write(status_write, b"ok")
    finally:
        os._exit(0)
channel.close()
os.write(write_end, b"go")
os.waitpid(late, 0)
out["late"] = os.read(status_read, 10).decode()
out["removed"] = not os.path.exists(channel.directory)
out["restored"] = os.environ.get(forward.ENV_VAR)
print(json.dumps(out))
'''


def test_channel_collects_whole_lines_from_many_children(tmp_path: Path) -> None:
    script = tmp_path / "channel.py"
    script.write_text(textwrap.dedent(CHANNEL_SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SANITIZE_THREADS",
                                                                    "PYTEST_"))}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["announced"] and out["own_seen"] == ["strict"] and out["own"] == 0
    # one record per child, counting each of its 100 occurrences; no line torn or lost
    assert out["occurrences"] == [[i, 100] for i in range(8)]
    assert out["policies"] == ["process"] and out["skipped"] == 0
    assert out["partial"] == 0 and out["completed"] == [True]
    assert out["late"] == "ok" and out["removed"] and out["restored"] == "outer"


def test_a_collector_that_ends_without_close_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent('''
        import os
        from sanitizer import forward

        channel = forward.Channel()
        print(channel.directory, flush=True)
        pid = os.fork()
        if pid == 0:
            raise SystemExit(0)  # a forked copy's exit handlers leave the collector's file alone
        os.waitpid(pid, 0)
        print(os.path.exists(channel.path), flush=True)
        raise RuntimeError("the collector ends without close()")
    '''))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert "RuntimeError" in proc.stderr
    directory, still_there = proc.stdout.split()
    assert still_there == "True"
    assert not Path(directory).exists()
