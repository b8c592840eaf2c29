"""Where reports go, and what happens when they cannot go there: real programs, no mocks.

The sanitizer runs inside other people's programs. It writes only to the
descriptor it opened (re-opened by path, or stderr re-dup'ed, when the program
closed or reused it), and a report it cannot write is counted and said once,
never raised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import run_program

# A strict violation: a connection made in the main thread, used from another one
# (sqlite3's own ProgrammingError is swallowed there). One per operation name.
VIOLATE = """
    import os, sqlite3, sys, threading
    conn = sqlite3.connect(":memory:")
    def violate(operation, *args):
        def use():
            try:
                getattr(conn, operation)(*args)
            except sqlite3.ProgrammingError:
                pass
        t = threading.Thread(target=use, name="intruder"); t.start(); t.join()
    def sanitizers_fds(identity):
        # The descriptors (3 and up) open on this (st_dev, st_ino): the sanitizer's own.
        found = []
        for fd in range(3, 256):
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == identity:
                found.append(fd)
        return found
    def identity_of(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino
"""

# What a daemon does: close everything above stderr, then open files of its own.
SIX_FILES = """
    os.closerange(3, 256)
    files = [open(f"data{i}.txt", "w") for i in range(6)]
    for i, f in enumerate(files):
        f.write(f"first {i}\\n"); f.flush()
    violate("execute", "select 1")
    for i, f in enumerate(files):
        f.write(f"second {i}\\n"); f.close()
    print("done")
"""


def program(*parts: str) -> str:
    return "".join(textwrap.dedent(part) for part in parts)


def run(tmp_path: Path, source: str, setting: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` with SANITIZE_THREADS=setting (stdout and stderr are pipes)."""
    (tmp_path / "app.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = setting
    return subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def assert_quiet(stderr: str) -> None:
    """Nothing of ours escaped into the program: no traceback, no atexit noise."""
    assert "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr


def app_files(tmp_path: Path) -> list[str]:
    return [(tmp_path / f"data{i}.txt").read_text() for i in range(6)]


EXPECTED_FILES = [f"first {i}\nsecond {i}\n" for i in range(6)]


class TestTheProgramsDescriptors:
    def test_log_file_is_reopened_by_path_after_closerange(self, tmp_path: Path) -> None:
        proc, records = run_program(tmp_path, program(VIOLATE, SIX_FILES))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "done\n"
        assert app_files(tmp_path) == EXPECTED_FILES
        assert [(r["policy"], r["operation"]) for r in records] == [("strict", "execute")]
        assert_quiet(proc.stderr)
        assert "1 x thread-affinity (strict)" in " ".join(proc.stderr.split())
        # the summary event went to the reopened log as well
        events = [json.loads(line)["event"]
                  for line in (tmp_path / "violations.jsonl").read_text().splitlines()]
        assert events == ["thread_affinity_violation", "thread_affinity_summary"]

    def test_a_file_dup2ed_over_the_log_descriptor_does_not_get_the_report(
            self, tmp_path: Path) -> None:
        source = program(VIOLATE, """
            log = os.path.abspath("violations.jsonl")
            [ours] = sanitizers_fds(identity_of(log))
            app = os.open("data.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(app, ours)  # the program now owns that number
            os.write(ours, b"before\\n")
            violate("execute", "select 1")
            os.write(ours, b"after\\n")  # still the program's: not closed under it
            print("done")
        """)
        proc, records = run_program(tmp_path, source)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "done\n"
        assert (tmp_path / "data.txt").read_text() == "before\nafter\n"
        assert [r["operation"] for r in records] == ["execute"]
        assert_quiet(proc.stderr)

    def test_default_destination_stays_stderr_after_closerange(self, tmp_path: Path) -> None:
        proc = run(tmp_path, program(VIOLATE, SIX_FILES), "format=json")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "done\n"
        assert app_files(tmp_path) == EXPECTED_FILES
        events = [json.loads(line) for line in proc.stderr.splitlines()
                  if line.startswith("{")]
        assert [(e["event"], e.get("operation")) for e in events] == [
            ("thread_affinity_violation", "execute"), ("thread_affinity_summary", None)]
        assert "1 x thread-affinity (strict)" in " ".join(proc.stderr.split())
        assert_quiet(proc.stderr)

    @pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
    @pytest.mark.parametrize("destination", ["log_file", "stderr"])
    def test_the_descriptor_is_not_inherited(self, tmp_path: Path, destination: str) -> None:
        # Checked as opened at start and again as reopened (closerange, then a report);
        # an exec'd child that keeps every inheritable descriptor lists what it got.
        (tmp_path / "lister.py").write_text(LISTER)
        source = program(VIOLATE, f"""
            import json, subprocess
            st = os.stat("violations.jsonl") if {destination == "log_file"} else os.fstat(2)
            identity = st.st_dev, st.st_ino
            [first] = sanitizers_fds(identity)
            inheritable = [os.get_inheritable(first)]
            os.closerange(3, 256)
            violate("execute", "select 1")
            [second] = sanitizers_fds(identity)
            inheritable.append(os.get_inheritable(second))
            env = {{k: v for k, v in os.environ.items() if k != "SANITIZE_THREADS"}}
            child = subprocess.run([sys.executable, "lister.py"], close_fds=False, pass_fds=(),
                                   env=env, capture_output=True, text=True, check=True)
            print(json.dumps({{"inheritable": inheritable,
                              "ours": os.readlink(f"/proc/self/fd/{{second}}"),
                              "child": json.loads(child.stdout)}}))
        """)
        if destination == "log_file":
            proc, records = run_program(tmp_path, source)
            assert [r["operation"] for r in records] == ["execute"]
        else:
            proc = run(tmp_path, source, "format=json")
            assert '"thread_affinity_violation"' in proc.stderr
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout)
        assert seen["inheritable"] == [False, False]
        if destination == "log_file":
            assert seen["ours"] == str(tmp_path / "violations.jsonl")
        else:
            assert seen["ours"].startswith("pipe:")
        assert seen["ours"] not in seen["child"]
        assert_quiet(proc.stderr)


# What an exec'd child has open above stderr.
LISTER = """\
import json, os
links = []
for fd in os.listdir("/proc/self/fd"):
    if int(fd) > 2:
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own descriptor, closed by now
print(json.dumps(links))
"""


class TestReportsThatCannotBeWritten:
    TWO_VIOLATIONS = program(VIOLATE, """
        print("result", sum(range(10)))
        violate("execute", "select 1")
        violate("cursor")
        print("still running")
    """)

    def test_a_full_disk_loses_reports_with_one_line_and_a_count(self, tmp_path: Path) -> None:
        proc = run(tmp_path, self.TWO_VIOLATIONS, "log_file=/dev/full")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "result 45\nstill running\n"
        notices = [line for line in proc.stderr.splitlines() if "cannot write reports" in line]
        assert notices == ["sanitizer: cannot write reports to /dev/full: [Errno 28] No space "
                           "left on device; further reports are counted, not written"]
        assert "sanitizer: 2 thread-affinity violation(s), 2 unique" in proc.stderr
        assert "sanitizer: 2 report(s) could not be written to /dev/full" in proc.stderr
        assert_quiet(proc.stderr)

    def test_a_lost_report_still_warns_and_raises(self, tmp_path: Path) -> None:
        source = program(VIOLATE, """
            import warnings
            from sanitizer import ThreadAffinityError
            seen = []
            def use():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        conn.execute("select 1")
                    except ThreadAffinityError as exc:
                        seen.append(f"raised {exc.violation.policy}")
                    except sqlite3.ProgrammingError:
                        seen.append("reached sqlite3")
                seen.extend(w.category.__name__ for w in caught)
            t = threading.Thread(target=use); t.start(); t.join()
            print(seen)
        """)
        proc = run(tmp_path, source, "action=log+warn+raise,log_file=/dev/full")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "['raised strict', 'ThreadAffinityWarning']\n"
        assert proc.stderr.count("cannot write reports to /dev/full") == 1
        assert "1 report(s) could not be written to /dev/full" in proc.stderr
        assert_quiet(proc.stderr)

    def test_a_lost_report_still_fails_the_pytest_test(self, tmp_path: Path) -> None:
        # The pytest plugin is a step of the Reporter's pipeline.
        (tmp_path / "test_shared.py").write_text(program(VIOLATE, """
            def test_shares_a_connection():
                violate("execute", "select 1")

            def test_clean():
                pass
        """))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
             "--sanitize-threads=log_file=/dev/full", "test_shared.py"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "1 failed, 1 passed" in proc.stdout
        assert "FAILED test_shared.py::test_shares_a_connection" in proc.stdout
        # said once, on fd 2, which pytest captures and shows in the failed test's section
        said = proc.stdout + proc.stderr
        assert said.count("cannot write reports to /dev/full") == 1, said
        assert "Exception ignored" not in said

    def test_a_log_pipe_whose_reader_has_gone(self, tmp_path: Path) -> None:
        # log_file=/dev/stdout, and stdout a pipe whose reader is gone at the violation.
        status, stderr = run_with_a_closed_pipe(tmp_path, "stdout", "log_file=/dev/stdout")
        assert status == 7, stderr
        assert stderr.count("cannot write reports to /dev/stdout: [Errno 32] Broken pipe") == 1
        assert "1 report(s) could not be written to /dev/stdout" in stderr
        assert_quiet(stderr)

    def test_a_stderr_pipe_whose_reader_has_gone(self, tmp_path: Path) -> None:
        # The default destination is the broken one: nothing can be said, but the
        # program goes on, and the exit steps after the summary still run (exitcode).
        status, stdout = run_with_a_closed_pipe(tmp_path, "stderr", "exitcode=66")
        assert stdout == "done\n"
        assert status == 66


def run_with_a_closed_pipe(tmp_path: Path, closed: str, setting: str) -> tuple[int, str]:
    """Run a program whose ``closed`` pipe ("stdout" or "stderr") loses its reader before
    a violation; return its exit status and what the other pipe got after that."""
    (tmp_path / "app.py").write_text(program(VIOLATE, f"""
        print("ready", flush=True)
        sys.stdin.readline()  # the parent has closed its end by now
        violate("execute", "select 1")
        if {closed == "stderr"}:
            print("done", flush=True)
        sys.exit(7)
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = setting
    with subprocess.Popen([sys.executable, "app.py"], cwd=tmp_path, env=env, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as child:
        assert child.stdin and child.stdout and child.stderr
        assert child.stdout.readline() == "ready\n"
        gone, other = (child.stdout, child.stderr) if closed == "stdout" else (
            child.stderr, child.stdout)
        gone.close()
        child.stdin.write("go\n")
        child.stdin.close()
        rest = other.read()
        return child.wait(timeout=60), rest
