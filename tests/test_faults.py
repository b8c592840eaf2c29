"""Faults inside the sanitizer itself: a bug at any stage is contained, and the sqlite3 deadlock.

Each stage of a report (record creation, stack capture, the policy's check, its
message, suppression matching, rendering, the logging sink, the pytest hooks) is
made to fail for real, by replacing the stage's own function with one that raises;
sqlite3 stays real. In every case the program's call goes on with its own result
(sqlite3's ProgrammingError for a strict connection used from another thread), and
the bug is said once per kind (``sanitizer_internal_error``), however often it happens.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
from support import in_thread, tracked

import sanitizer
from sanitizer import ownership, render, report, stacks, suppressions


class Bug(Exception):
    """What the broken stage raises."""


def broken(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise Bug("a bug in the sanitizer, on purpose")


def internal_errors(log: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [e for e in lines if e["event"] == "sanitizer_internal_error"]


def use_from_another_thread(conn: sqlite3.Connection) -> str:
    """A strict violation; sqlite3's own refusal is the call's own result."""
    def use() -> str:
        try:
            conn.execute("select 1")
        except sqlite3.ProgrammingError as exc:
            return "refused" if "same thread" in str(exc) else str(exc)
        return "ran"
    result: str = in_thread(use)
    return result


REFUSED = "refused"  # sqlite3's own ProgrammingError


class Account:
    def __init__(self) -> None:
        self.balance = 0

    def deposit(self, amount: int) -> int:
        self.balance += amount
        return self.balance


class TestEveryStageIsContained:
    def test_record_creation(self, enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        run = enable()
        monkeypatch.setattr(ownership, "new_record", broken)
        conns = [sqlite3.connect(":memory:") for _ in range(2)]  # a plugin's record
        assert [c.execute("select 41 + 1").fetchone() for c in conns] == [(42,), (42,)]
        account = sanitizer.track(Account())  # the core's own
        assert in_thread(lambda: account.deposit(2)) == 2
        [error] = internal_errors(run.log)
        assert error["where"] == "creating a record"
        assert error["error"] == "Bug: a bug in the sanitizer, on purpose"
        assert error["at"].startswith("test_faults.py:")
        assert sanitizer.violations() == []  # untracked: nothing to report

    def test_stack_capture(self, enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        run = enable()
        conn = sqlite3.connect(":memory:")
        monkeypatch.setattr(stacks, "capture", broken)
        assert [use_from_another_thread(conn) for _ in range(3)] == [REFUSED] * 3
        made = sqlite3.connect(":memory:")
        assert made.execute("select 1").fetchone() == (1,)
        assert sorted(e["where"] for e in internal_errors(run.log)) == [
            "building a report", "creating a record"]

    def test_the_policys_check(self, enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        run = enable()
        conn = sqlite3.connect(":memory:")
        monkeypatch.setattr(type(tracked(conn).policy), "violated", broken)
        assert [use_from_another_thread(conn) for _ in range(3)] == [REFUSED] * 3
        assert conn.execute("select 1").fetchone() == (1,)  # its owner, untouched
        [error] = internal_errors(run.log)
        assert error["where"] == "checking the strict policy"

    def test_the_message(self, enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        run = enable()
        conn = sqlite3.connect(":memory:")
        monkeypatch.setattr(type(tracked(conn).policy), "describe", broken)
        assert [use_from_another_thread(conn) for _ in range(3)] == [REFUSED] * 3
        [error] = internal_errors(run.log)
        assert error["where"] == "building a report"

    def test_suppression_matching(self, enable: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
        # A rule that cannot be matched suppresses nothing: the violation is reported.
        rules = tmp_path / "sanitizer.supp"
        rules.write_text("object:sqlite3.Connection\n")
        run = enable(suppressions=str(rules))
        conn = sqlite3.connect(":memory:")
        monkeypatch.setattr(suppressions.Rule, "matches", broken)
        assert [use_from_another_thread(conn) for _ in range(2)] == [REFUSED] * 2
        assert [(r["policy"], r["count"]) for r in run.records()] == [("strict", 1)]
        assert sanitizer.violations()[0].count == 2
        [error] = internal_errors(run.log)
        assert error["where"] == "matching suppressions"

    def test_rendering_json(self, enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        # The steps after the output still run: the call is refused (action=raise).
        run = enable(action="log+raise")
        conn = sqlite3.connect(":memory:")
        monkeypatch.setattr(report.Violation, "event", broken)
        for _ in range(2):
            with pytest.raises(sanitizer.ThreadAffinityError):
                in_thread(lambda: conn.execute("select 1"))
        [error] = internal_errors(run.log)
        assert error["where"] == "rendering a report"

    def test_rendering_console(self, enable: Any, monkeypatch: pytest.MonkeyPatch,
                               capfd: pytest.CaptureFixture[str]) -> None:
        # The renderer of the internal error's own event is broken too: one plain line
        # on stderr says it.
        monkeypatch.setattr(render, "render_console", broken)
        run = enable(format="console")
        conn = sqlite3.connect(":memory:")
        assert [use_from_another_thread(conn) for _ in range(3)] == [REFUSED] * 3
        assert len(sanitizer.violations()) == 1
        said = [line for line in capfd.readouterr().err.splitlines() if "internal error" in line]
        assert len(said) == 1, said
        assert said[0].startswith("sanitizer: internal error in rendering a report: Bug: a bug "
                                  "in the sanitizer, on purpose (at test_faults.py:")
        assert said[0].endswith("; the original call went ahead; please report this")
        assert not run.log.read_text()  # nothing half-written into the log

    def test_the_logging_sink(self, enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        run = enable(sink="output+logging")
        conn = sqlite3.connect(":memory:")
        monkeypatch.setattr(report.ToLogging, "send", broken)
        conn2 = sqlite3.connect(":memory:")
        assert [use_from_another_thread(c) for c in (conn, conn2, conn)] == [REFUSED] * 3
        assert [r["operation"] for r in run.records()] == ["execute", "execute"]  # the output
        [error] = internal_errors(run.log)
        assert error["where"] == "the logging sink"

    def test_a_bug_in_the_internal_error_itself_is_silent(
            self, enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        # The last resort: even then, the program's call goes on.
        enable()
        conn = sqlite3.connect(":memory:")
        monkeypatch.setattr(type(tracked(conn).policy), "violated", broken)
        monkeypatch.setattr(render.LineWriter, "tell", broken)
        monkeypatch.setattr(report.Reporter, "logger", property(broken))
        assert use_from_another_thread(conn) == REFUSED


# -- the pytest hooks: a pytest run in a subprocess, one of the plugin's functions broken --

PYTEST_TESTS = '''
import sqlite3, threading
import pytest

conn = sqlite3.connect(":memory:")

def violate():
    def use():
        try:
            conn.execute("select 1")
        except sqlite3.ProgrammingError:
            pass
    t = threading.Thread(target=use); t.start(); t.join()

@pytest.fixture
def value():
    return 42

def test_violates(value):
    violate()
    assert value == 42

def test_violates_again(value):
    violate()

def test_clean(value):
    assert value == 42
'''

# The plugin's functions that are made to fail (in conftest.py), by the hook they serve,
# and the stage the error is said for. Where the violations could still be attributed,
# both violating tests fail; where the step that attributes them is the broken one,
# the tests pass and the violations are in the log all the same.
HOOKS = {
    "session._Plugin._patch_thread_start": "pytest plugin: sessionstart",
    "fixtures._fixture": "pytest plugin: fixture_setup",  # a wrapper around every fixture
    "session._Plugin._parent_marked": "pytest plugin: runtest_setup",
    "session._Plugin._fail": "pytest plugin: reporting a violation",  # runtest_logreport
    "session._Plugin._attach_records": "pytest plugin: recording violations",
    "render.write_report": "pytest plugin: sessionfinish",
    "render.summary": "pytest plugin: terminal summary",
    # not attributed to their tests:
    "session._TestRun.add": "the pipeline step _Plugin.on_violation",
    "session._TestRun.take_pending": "pytest plugin: taking a test's violations",
}
UNATTRIBUTED = {"session._TestRun.add", "session._TestRun.take_pending"}


def outcomes(output: str) -> dict[str, int]:
    """pytest's last line: {"passed": 1, "failed": 2, ...}."""
    last = output.strip().splitlines()[-1] if output.strip() else ""
    return {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", last)}


@pytest.mark.parametrize("target", list(HOOKS))
def test_a_pytest_hook(tmp_path: Path, target: str) -> None:
    module, _, attribute = target.partition(".")
    owner, _, name = attribute.rpartition(".")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        from sanitizer.plugins.pytest_plugin import {module} as module

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in the plugin, on purpose")

        setattr({"module." + owner if owner else "module"}, {name!r}, broken)
    """))
    (tmp_path / "test_hooks.py").write_text(PYTEST_TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    log = tmp_path / "violations.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
         f"--sanitize-threads=log_file={log}", "--sanitize-threads-report=report.json",
         "test_hooks.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert "INTERNALERROR" not in output, output
    assert "Traceback" not in proc.stderr, output
    if target in UNATTRIBUTED:
        assert (proc.returncode, outcomes(proc.stdout)) == (0, {"passed": 3}), output
    else:
        assert (proc.returncode, outcomes(proc.stdout)) == (1, {"failed": 2, "passed": 1}), output
        assert "FAILED test_hooks.py::test_violates " in proc.stdout
        assert "FAILED test_hooks.py::test_violates_again " in proc.stdout
    [error] = internal_errors(log)  # said once, however many tests met it
    assert error["where"] == HOOKS[target]
    assert error["error"] == "RuntimeError: a bug in the plugin, on purpose"
    violations = [e for e in map(json.loads, log.read_text().splitlines())
                  if e["event"] == "thread_affinity_violation"]
    assert [v["operation"] for v in violations] == ["execute"]  # one kind, logged once


# -- the sqlite3 deadlock ----------------------------------------------------------------

# A check_same_thread=False connection with a Python function, shared by two threads.
# Thread A is inside SQLite (holding the connection's mutex) in that function, waiting
# on a pipe with the GIL released. Thread B calls create_function, which waits for the
# mutex holding the GIL. When A is let go, it needs the GIL: plain CPython deadlocks.
# B tells the parent its thread id and that it is on its way to the call through a
# shared mapping (a memory write: it keeps the GIL), and a long switch interval keeps it
# from giving the GIL up anywhere but where it blocks.
DEADLOCK = """
import mmap, os, sqlite3, struct, sys, threading
sys.setswitchinterval(60)
go = int(sys.argv[1])
with open("mark", "r+b") as f:
    mark = mmap.mmap(f.fileno(), 16)
conn = sqlite3.connect(":memory:", check_same_thread=False)
inside = threading.Event()

def slow():
    inside.set()  # A holds SQLite's connection mutex
    os.read(go, 1)  # the GIL released until the parent says go; then A needs it
    return 1

conn.create_function("slow", 0, slow)
outcome = []

def query():
    outcome.append(conn.execute("select slow()").fetchone())

def intrude():
    mark[0:8] = struct.pack("q", threading.get_native_id())
    inside.wait()
    mark[8:16] = struct.pack("q", 1)  # on the way to the call (no I/O: the GIL kept)
    try:
        conn.create_function("other", 0, lambda: 2)  # holds the GIL, waits for the mutex
        outcome.append("created")
    except Exception as exc:
        outcome.append(type(exc).__name__)

a = threading.Thread(target=query, name="A")
b = threading.Thread(target=intrude, name="B")
a.start(); b.start(); b.join(); a.join()
print(outcome, flush=True)
"""


class Deadlock:
    """The deadlocking program in a subprocess, and what the parent sees of it."""

    def __init__(self, tmp_path: Path, setting: str | None) -> None:
        (tmp_path / "deadlock.py").write_text(DEADLOCK)
        self.mark = tmp_path / "mark"
        self.mark.write_bytes(bytes(16))
        self.log = tmp_path / "violations.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
        if setting is not None:
            env["SANITIZE_THREADS"] = f"{setting},log_file={self.log}"
        read, self.go = os.pipe()
        self.child = subprocess.Popen(
            [sys.executable, "deadlock.py", str(read)], cwd=tmp_path, env=env,
            pass_fds=(read,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(read)
        self.until = time.monotonic() + 60

    def poll(self, ready: Callable[[], Any]) -> Any:
        """``ready()``'s first true value, polled until the deadline; the child must live."""
        while time.monotonic() < self.until:
            value = ready()
            if value:
                return value
            assert self.child.poll() is None, self.child.communicate()
            time.sleep(0.005)
        raise AssertionError("not ready within the deadline")

    def report(self) -> dict[str, Any]:
        """The first whole line of the log, once it is there."""
        def line() -> str | None:
            text = self.log.read_text() if self.log.exists() else ""
            return text.split("\n")[0] if "\n" in text else None
        event: dict[str, Any] = json.loads(self.poll(line))
        return event

    def on_its_way(self) -> bool:
        return bool(struct.unpack("q", self.mark.read_bytes()[8:16])[0])

    def blocked(self) -> None:
        """Until B sleeps: after its last signal, that is in SQLite's mutex (Linux /proc)."""
        def asleep() -> bool:
            tid = struct.unpack("q", self.mark.read_bytes()[:8])[0]
            try:
                stat = Path(f"/proc/{self.child.pid}/task/{tid}/stat").read_text()
            except OSError:
                return False
            return stat.rsplit(")", 1)[1].split()[0] == "S"
        self.poll(asleep)

    def let_a_go(self) -> None:
        os.write(self.go, b"g")

    def hangs(self) -> bool:
        """Whether it is still running after a while: a hang only shows as time passing."""
        try:
            self.child.wait(timeout=1.5)
        except subprocess.TimeoutExpired:
            return True
        return False

    def end(self) -> tuple[str, str]:
        os.close(self.go)
        self.child.kill()
        return self.child.communicate()


def assert_the_deadlock(event: dict[str, Any]) -> None:
    assert event["event"] == "thread_affinity_violation"
    assert (event["policy"], event["operation"]) == ("exclusive", "create_function")
    assert event["thread"]["name"] == "B"
    assert event["holder_thread"]["name"] == "A"
    assert any(f["function"] == "slow" for f in event["holder_stack"])


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")


class TestTheSqlite3Deadlock:
    @needs_proc
    def test_plain_cpython_deadlocks(self, tmp_path: Path) -> None:
        # The premise: without the sanitizer, the same program never ends.
        program = Deadlock(tmp_path, None)
        try:
            program.poll(program.on_its_way)
            program.blocked()
            program.let_a_go()
            assert program.hangs()
        finally:
            program.end()

    def test_raise_refuses_the_call_before_it_reaches_sqlite(self, tmp_path: Path) -> None:
        program = Deadlock(tmp_path, "action=log+raise")
        try:
            assert_the_deadlock(program.report())  # written before B's call was refused
            program.let_a_go()  # under plain CPython, this is the deadlock
            stdout, stderr = program.child.communicate(timeout=60)
        finally:
            program.end()
        assert program.child.returncode == 0, stderr
        assert stdout == "['ThreadAffinityError', (1,)]\n"  # B refused; A's query done

    @needs_proc
    def test_log_writes_the_report_before_the_call_hangs(self, tmp_path: Path) -> None:
        # The call goes on into the deadlock; the evidence is already in the file.
        program = Deadlock(tmp_path, "action=log")
        try:
            event = program.report()
            program.blocked()
            program.let_a_go()
            assert program.hangs()
        finally:
            program.end()  # killed: nothing of the sanitizer's runs after this
        assert_the_deadlock(event)
        lines = program.log.read_text().splitlines(keepends=True)
        assert len(lines) == 1 and lines[0].endswith("\n")  # whole, and nothing else
        assert json.loads(lines[0]) == event
