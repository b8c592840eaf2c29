"""Interpreter shutdown: daemon threads, atexit order, os._exit in children, sys.exit in a thread.

Each test runs a real program under the sanitizer and asserts that it ends as it
would without it (its exit code), that stderr holds nothing but the sanitizer's
own exit summary (no "Exception ignored", no traceback, no fatal error), and
that every report made before the end is a whole line in the log.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
from support import run_program

# The sanitizer's exit summary: its header lines and its "  <count> x <site>" lines.
SUMMARY = re.compile(r"sanitizer: .*|\s+\d+ x thread-affinity .*")

PRELUDE = """
import atexit, os, sys, threading
import sanitizer


@sanitizer.thread_affine
class Thing:
    def use(self):
        return 1


def made_in_a_thread():
    box = []
    maker = threading.Thread(target=lambda: box.append(Thing()), name="maker")
    maker.start()
    maker.join()
    return box[0]
"""


def program(body: str) -> str:
    return PRELUDE + textwrap.dedent(body)


def noise(stderr: str) -> list[str]:
    """What stderr holds besides the sanitizer's summary."""
    return [line for line in stderr.splitlines() if line.strip() and not SUMMARY.fullmatch(line)]


def events(tmp_path: Path) -> list[dict[str, object]]:
    """Every line of the log, each of which must be whole JSON."""
    log = tmp_path / "violations.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def violations_at(tmp_path: Path) -> dict[str, int]:
    """Reported access sites' function names, with how often each was reported."""
    found: dict[str, int] = {}
    for event in events(tmp_path):
        if event.get("event") == "thread_affinity_violation":
            site = event["access_site"]
            assert isinstance(site, dict)
            found[str(site["function"])] = found.get(str(site["function"]), 0) + 1
    return found


def test_daemon_threads_reporting_while_the_interpreter_finalizes(tmp_path: Path) -> None:
    source = program("""
    thing = Thing()  # the main thread's
    started = threading.Event()

    def daemon(n):
        site = 0
        while True:  # until the interpreter stops it
            site += 1
            space = {}
            exec(compile("def used(thing):\\n    thing.use()\\n", f"d{n}-{site}.py", "exec"),
                 space)
            space["used"](thing)
            started.set()

    for n in range(4):
        threading.Thread(target=daemon, args=(n,), daemon=True).start()
    assert started.wait(60)
    print("main done")
    """)
    proc, _ = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "main done\n"
    assert noise(proc.stderr) == []
    assert sum(violations_at(tmp_path).values()) >= 1  # whole lines, however many


def test_atexit_handlers_before_and_after_the_sanitizer_report(tmp_path: Path) -> None:
    source = program("""
    thing = None

    def registered_before():
        thing.use()

    atexit.register(registered_before)  # runs after the sanitizer's own
    sanitizer.enable(log_file=sys.argv[1])
    thing = made_in_a_thread()

    def registered_after():
        thing.use()

    atexit.register(registered_after)  # runs before the sanitizer's
    print("main done")
    """)
    script = tmp_path / "app.py"
    log = tmp_path / "violations.jsonl"
    proc, _ = run_program(tmp_path, source, env_value=None,
                          args=[sys.executable, str(script), str(log)])
    assert proc.returncode == 0, proc.stderr
    assert noise(proc.stderr) == []
    assert violations_at(tmp_path) == {"registered_before": 1,
                                       "registered_after": 1}
    assert "1 thread-affinity violation(s)" in proc.stderr  # the summary saw the earlier one


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_child_that_ends_with_os_exit_leaves_its_report(tmp_path: Path) -> None:
    source = program("""
    thing = made_in_a_thread()
    pid = os.fork()
    if pid == 0:
        thing.use()
        os._exit(7)  # no atexit, no flush: the report is on disk already
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), pid)
    """)
    proc, _ = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    code, pid = map(int, proc.stdout.split())
    assert code == 7
    assert noise(proc.stderr) == []
    (event,) = [e for e in events(tmp_path) if e.get("event") == "thread_affinity_violation"]
    assert event["pid"] == pid
    assert event["policy"] == "process"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_multiprocessing_child_leaves_its_reports_on_disk(tmp_path: Path, method: str) -> None:
    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"no {method} start method")
    source = program(f"""
    import multiprocessing

    def work():
        made_in_a_thread().use()  # a violation in the child, which ends with os._exit

    if __name__ == "__main__":
        child = multiprocessing.get_context("{method}").Process(target=work)
        child.start()
        child.join(120)
        print(child.exitcode, child.pid)
    """)
    proc, _ = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    code, pid = map(int, proc.stdout.split())
    assert code == 0
    assert noise(proc.stderr) == []
    reported = [e for e in events(tmp_path) if e.get("event") == "thread_affinity_violation"]
    assert [e["pid"] for e in reported] == [pid]
    assert reported[0]["access_site"]["function"] == "work"  # type: ignore[index]


def test_sys_exit_in_a_thread(tmp_path: Path) -> None:
    source = program("""
    thing = Thing()

    def leave():
        thing.use()
        sys.exit(3)  # ends the thread only, silently

    thread = threading.Thread(target=leave)
    thread.start()
    thread.join()
    print("main done")
    """)
    proc, _ = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "main done\n"
    assert noise(proc.stderr) == []
    assert violations_at(tmp_path) == {"leave": 1}
