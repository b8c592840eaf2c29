"""Real programs run as subprocesses with SANITIZE_THREADS set; the JSON records are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import line_of, run_program

DEAD_OWNER = """
    import sqlite3, threading
    holder = {}
    def make():
        holder["conn"] = sqlite3.connect(":memory:", check_same_thread=False)  # created
    t = threading.Thread(target=make, name="maker"); t.start(); t.join()
    def use():
        holder["conn"].execute("select 1")  # used
    u = threading.Thread(target=use, name="user"); u.start(); u.join()
"""


# Appended to DEAD_OWNER: the handed-over connection is tracked ...
HANDED_OVER_IS_TRACKED = """
    from sanitizer.ownership import record_of
    print("tracked", record_of(holder["conn"]) is not None)
"""
# ... and, with action=raise, one real misuse of it: a statement while a thread is
# inside one (raised before it would wait for SQLite's connection mutex).
OVERLAP_ON_HANDED_OVER = """
    inside, release = threading.Event(), threading.Event()
    def hold():
        inside.set()
        release.wait(10)
        return 1
    holder["conn"].create_function("hold", 0, hold)
    h = threading.Thread(target=lambda: holder["conn"].execute("select hold()").fetchall())
    h.start(); inside.wait(10)
    try:
        holder["conn"].execute("select 2")  # overlapping
    except Exception as exc:
        print(type(exc).__name__)
    release.set(); h.join()
"""


def test_connection_made_by_exited_thread_is_not_owned_by_a_later_one(tmp_path: Path) -> None:
    # check_same_thread=True would let sqlite3 itself catch this unless idents are
    # reused; the sanitizer compares thread tokens, which are never reused.
    source = DEAD_OWNER.replace("check_same_thread=False", "check_same_thread=True")
    proc, records = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    [record] = records
    assert record["policy"] == "strict"
    assert record["object_type"] == "sqlite3.Connection"
    assert record["operation"] == "execute"
    assert record["owner_thread"]["name"] == "maker"
    assert record["thread"]["name"] == "user"
    assert record["owner_thread"]["serial"] != record["thread"]["serial"]
    assert record["owner_alive"] is False
    assert "which has exited" in record["message"]
    assert record["creation_stack"][0]["line"] == line_of(source, "created")
    assert record["creation_stack"][0]["function"] == "make"
    assert record["access_stack"][0]["line"] == line_of(source, "used")
    assert record["access_stack"][0]["function"] == "use"
    assert record["creation_stack"][0]["file"].endswith("app.py")


def test_record_has_exactly_the_documented_fields(tmp_path: Path) -> None:
    _, [record] = run_program(tmp_path, DEAD_OWNER.replace("=False", "=True"))
    required = {"event", "policy", "object_type", "object_id", "operation", "owner_thread",
                "thread", "pid", "owner_pid", "creation_stack", "access_stack", "count",
                "message", "timestamp", "level"}
    assert required <= set(record)
    assert record["event"] == "thread_affinity_violation"
    assert record["level"] == "warning"
    assert set(record["thread"]) == {"name", "ident", "native_id", "serial"}
    assert set(record["access_stack"][0]) == {"file", "line", "function"}
    assert record["pid"] == record["owner_pid"]
    # the sanitizer's own frames are removed
    assert not any("/sanitizer/" in f["file"] for f in record["access_stack"])


def test_sequential_handoff_with_check_same_thread_false_is_silent(tmp_path: Path) -> None:
    source = DEAD_OWNER + HANDED_OVER_IS_TRACKED
    proc, records = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert records == []
    assert "violation" not in proc.stderr
    assert proc.stdout.split() == ["tracked", "True"]
    # The control: the same program, then an overlap on the same connection.
    source += OVERLAP_ON_HANDED_OVER
    (control := tmp_path / "control").mkdir()
    proc, records = run_program(control, source, "action=log+raise")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tracked", "True", "ThreadAffinityError"]
    assert [(r["policy"], r["operation"], r["access_stack"][0]["line"]) for r in records] == [
        ("exclusive", "execute", line_of(source, "overlapping"))]


OVERLAP = """
    import sqlite3, threading
    conn = sqlite3.connect(":memory:", check_same_thread=False)  # created
    inside, release = threading.Event(), threading.Event()
    def slow(x):
        inside.set()
        release.wait(10)
        return x
    conn.create_function("slow", 1, slow)
    def first():
        conn.execute("select slow(1)").fetchall()  # holder
    t = threading.Thread(target=first, name="first"); t.start()
    inside.wait(10)
    try:
        conn.execute("select 2")  # overlapping
    except Exception as exc:  # ThreadAffinityError: never waits for SQLite's mutex
        print(type(exc).__name__)
    release.set(); t.join()
"""


def test_overlapping_use_from_two_threads_is_caught(tmp_path: Path) -> None:
    # action=raise stops the call before it reaches SQLite, whose connection
    # mutex the holder keeps until it is released.
    proc, records = run_program(tmp_path, OVERLAP, "action=log+raise")
    assert proc.stdout.strip() == "ThreadAffinityError"
    assert proc.returncode == 0, proc.stderr
    [record] = records
    assert record["policy"] == "exclusive"
    assert record["thread"]["name"] == "MainThread"
    assert record["holder_thread"]["name"] == "first"
    assert record["access_stack"][0]["line"] == line_of(OVERLAP, "overlapping")
    assert record["creation_stack"][0]["line"] == line_of(OVERLAP, "created")
    holder_lines = [f["line"] for f in record["holder_stack"]]
    assert line_of(OVERLAP, "holder") in holder_lines


FORK = """
    import os, sqlite3
    conn = sqlite3.connect(":memory:")  # created
    conn.execute("select 1")
    pid = os.fork()
    if pid == 0:
        conn.execute("select 1")  # in child
        os._exit(0)
    os.waitpid(pid, 0)
    conn.execute("select 1")  # parent keeps using it: fine
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_is_caught_in_the_child_and_written_before_os_exit(tmp_path: Path) -> None:
    proc, records = run_program(tmp_path, FORK)
    assert proc.returncode == 0, proc.stderr
    [record] = records
    assert record["policy"] == "process"
    assert record["pid"] != record["owner_pid"]
    assert record["access_stack"][0]["line"] == line_of(FORK, "in child")
    assert record["creation_stack"][0]["line"] == line_of(FORK, "created")
    assert "inherited across fork()" in record["message"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_closing_an_inherited_connection_in_a_child_is_letting_go(tmp_path: Path) -> None:
    # diskcache: "If the process ID changes, close the connection". Dropping the
    # reference would close it the same way, silently.
    source = """
        import os, sqlite3
        from sanitizer.ownership import record_of
        conn = sqlite3.connect(":memory:")
        cur = conn.execute("select 1")
        pid = os.fork()
        if pid == 0:
            assert record_of(conn) is not None  # tracked in the child too
            cur.close()
            conn.close()  # let go
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        print(conn.execute("select 2").fetchone()[0])
    """
    proc, records = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"
    assert records == []
    # Using it in the child is still reported (the same program otherwise).
    used = source.replace("cur.close()", "cur.fetchall()  # used")
    _, [record] = run_program(tmp_path, used)
    assert (record["policy"], record["operation"]) == ("process", "fetchall")
    assert record["access_stack"][0]["line"] == line_of(used, "used")


def test_what_sqlite3_allows_from_another_thread_is_silent(tmp_path: Path) -> None:
    # The reproduction (aiosqlite's properties), and backup() into a
    # connection that another, idle, thread owns; then one real cross-thread use.
    source = """
        import sqlite3, threading
        from sanitizer.ownership import record_of
        box = {}
        t = threading.Thread(target=lambda: box.update(conn=sqlite3.connect(":memory:")))
        t.start(); t.join()
        conn = box["conn"]
        assert record_of(conn) is not None
        print(conn.in_transaction, conn.total_changes, repr(conn.isolation_level))
        conn.row_factory = sqlite3.Row
        source = sqlite3.connect(":memory:")
        source.execute("create table t(x)")
        source.backup(conn)
        try:
            conn.execute("select 1")  # used
        except sqlite3.ProgrammingError as exc:
            print(type(exc).__name__)
    """
    proc, records = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "0", "''", "ProgrammingError"]
    [record] = records
    assert (record["policy"], record["operation"]) == ("strict", "execute")
    assert record["access_stack"][0]["line"] == line_of(source, "used")


def test_dedup_counts_repeats_of_one_site(tmp_path: Path) -> None:
    source = """
        import sqlite3, threading
        conn = sqlite3.connect(":memory:")
        def use():
            for _ in range(5):
                try:
                    conn.execute("select 1")
                except sqlite3.ProgrammingError:
                    pass
        t = threading.Thread(target=use); t.start(); t.join()
    """
    proc, records = run_program(tmp_path, source)
    assert len(records) == 1
    assert "5 x thread-affinity (strict)" in proc.stderr.replace("    ", " ").replace("  ", " ")


def test_dedup_keeps_operations_and_types_on_one_line_apart(tmp_path: Path) -> None:
    source = """
        import sqlite3, threading
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        cur = conn.cursor()
        busy, done = threading.Event(), threading.Event()
        def hold(x):
            busy.set()
            done.wait(10)
            return x
        conn.create_function("hold", 1, hold)
        t = threading.Thread(target=lambda: conn.execute("select hold(1)").fetchall())
        t.start(); busy.wait(10)
        conn.commit(); conn.rollback(); cur.close()  # three uses
        done.set(); t.join()
    """
    proc, records = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    found = [(r["policy"], r["object_type"], r["operation"], r["count"]) for r in records]
    assert found == [("exclusive", "sqlite3.Connection", "commit", 1),
                     ("exclusive", "sqlite3.Connection", "rollback", 1),
                     ("exclusive", "sqlite3.Cursor", "close", 1)]
    assert {r["access_stack"][0]["line"] for r in records} == {line_of(source, "three uses")}


def test_sites_pass_over_standard_library_frames(tmp_path: Path) -> None:
    # contextlib.closing calls close() from the standard library: the summary and
    # the dedup key name the user's line one frame below, not contextlib.py.
    source = """
        import contextlib, sqlite3, threading
        conn = sqlite3.connect(":memory:")
        def use():
            try:
                with contextlib.closing(conn):  # closing
                    pass
            except sqlite3.ProgrammingError:
                pass
        t = threading.Thread(target=use, name="user"); t.start(); t.join()
    """
    (tmp_path / "app.py").write_text(__import__("textwrap").dedent(source))
    log = tmp_path / "violations.jsonl"
    env = {**os.environ, "SANITIZE_THREADS": f"format=console,log_file={log}"}
    out = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = log.read_text()
    assert "contextlib.py" in text  # the frame stays in the stack
    here = f"{tmp_path / 'app.py'}:{line_of(source, 'closing')} in use"
    assert f"SUMMARY: thread-affinity (strict) {here}" in text
    assert f"1 x thread-affinity (strict) {here}" in " ".join(out.stderr.split())


def test_warnings_about_the_callers_arguments_name_the_callers_line(tmp_path: Path) -> None:
    # Python 3.13 deprecates sqlite3.connect()'s options given by position. The
    # warnings must read as without the sanitizer: at the user's line, where the
    # default filter shows them for __main__, not at the wrapper that passed them on.
    source = """
        import sqlite3
        class Mine(sqlite3.Connection):
            pass
        plain = sqlite3.connect(":memory:", 5.0)
        mine = sqlite3.connect(":memory:", 5.0, 0, "", True, Mine)
        print(isinstance(mine, Mine), mine.execute("select 1").fetchone(),
              plain.execute("select 2").fetchone())
        from sanitizer.ownership import record_of  # out of band: stdout must stay the same
        with open("tracked.txt", "w") as out:
            out.write(f"{record_of(plain) is not None} {record_of(mine) is not None}")
    """
    plain, _ = run_program(tmp_path, source, env_value=None)
    assert (tmp_path / "tracked.txt").read_text() == "False False"
    sanitized, records = run_program(tmp_path, source)
    # Both were wrapped by the sanitizer: otherwise the warnings would be right trivially.
    assert (tmp_path / "tracked.txt").read_text() == "True True"
    assert plain.returncode == sanitized.returncode == 0, sanitized.stderr
    assert sanitized.stdout == plain.stdout == "True (1,) (2,)\n"
    assert sanitized.stderr == plain.stderr
    assert records == []
    if sys.version_info[:2] in ((3, 13), (3, 14)):
        assert plain.stderr.count("app.py:5: DeprecationWarning") == 2  # connect, Connection
        assert plain.stderr.count("app.py:6: DeprecationWarning") == 2


def test_unset_variable_imports_and_patches_nothing(tmp_path: Path) -> None:
    source = """
        import sys, sqlite3
        print(sorted(m for m in sys.modules if m.startswith(("sanitizer", "wrapt", "structlog"))))
        print(type(sqlite3.connect(":memory:")) is sqlite3.Connection)
    """
    proc, _ = run_program(tmp_path, source, env_value=None)
    assert proc.stdout.split() == ["[]", "True"]


@pytest.mark.parametrize("value", ["0", "off"])
def test_off_words_switch_it_off(tmp_path: Path, value: str) -> None:
    source = "import sys; print(any(m.startswith('sanitizer') for m in sys.modules))"
    (tmp_path / "app.py").write_text(source)
    env = {**os.environ, "SANITIZE_THREADS": value}
    out = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_bad_option_is_one_line_and_program_runs_unsanitized(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("print('ran')")
    env = {**os.environ, "SANITIZE_THREADS": "format=fancy"}
    out = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "ran"
    assert out.returncode == 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "'format'" in lines[0] and "json, console" in lines[0] and "fancy" in lines[0]


def test_unknown_key_names_the_key_and_the_accepted_ones(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("pass")
    env = {**os.environ, "SANITIZE_THREADS": "stack_dept=3"}
    out = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    [line] = out.stderr.strip().splitlines()
    assert "'stack_dept'" in line and "stack_depth" in line


def test_help_prints_every_option_and_exits(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("print('should not run')")
    env = {**os.environ, "SANITIZE_THREADS": "help"}
    out = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert "should not run" not in out.stdout
    for key in ("action", "log_file", "format", "stack_depth", "suppressions", "exitcode",
                "plugins", "track", "include_args"):
        assert key in out.stdout
    # Each option's block says its default once, in one wording.
    from sanitizer.options import SPECS

    lines = out.stdout.splitlines()
    for spec in SPECS:
        start = next(i for i, line in enumerate(lines) if line.startswith(f"  {spec.name} "))
        block = [lines[start]]
        for line in lines[start + 1:]:
            if not line.startswith(" " * 16):
                break
            block.append(line)
        assert " ".join(block).lower().count("default") == 1, block
        assert block[-1].strip().startswith("default: "), block
    assert "default: console on a TTY, JSON otherwise" in out.stdout
    assert "default: the program's own" in out.stdout


def test_subprocesses_inherit_the_sanitizer(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(DEAD_OWNER.replace("check_same_thread=False", "check_same_thread=True")
                     .replace("\n    ", "\n"))
    source = f"""
        import subprocess, sys
        subprocess.run([sys.executable, {str(child)!r}], check=True)
    """
    proc, records = run_program(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert [r["policy"] for r in records] == ["strict"]
    assert records[0]["creation_stack"][0]["file"] == str(child)


def test_python_dash_m_works(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(DEAD_OWNER.replace("=False", "=True")
                                     .replace("\n    ", "\n"))
    proc, records = run_program(tmp_path, "", args=[sys.executable, "-m", "pkg"])
    assert proc.returncode == 0, proc.stderr
    assert len(records) == 1


class TestCli:
    def test_exit_code_is_the_programs_own(self, tmp_path: Path) -> None:
        source = "import sys; sys.exit(3)"
        proc, _ = run_program(tmp_path, source, env_value=None, args=[
            sys.executable, "-m", "sanitizer", "run", "app.py"])
        assert proc.returncode == 3

    def test_exitcode_option_applies_when_violations_were_found(self, tmp_path: Path) -> None:
        log = tmp_path / "v.jsonl"
        proc, _ = run_program(tmp_path, DEAD_OWNER.replace("=False", "=True"), env_value=None,
                              args=[sys.executable, "-m", "sanitizer", "run", "--exitcode",
                                    "66", "--log-file", str(log), "app.py"])
        assert proc.returncode == 66, proc.stderr
        assert json.loads(log.read_text().splitlines()[0])["policy"] == "strict"

    def test_exitcode_is_untouched_without_violations(self, tmp_path: Path) -> None:
        source = DEAD_OWNER + HANDED_OVER_IS_TRACKED
        proc, _ = run_program(tmp_path, source, env_value=None, args=[
            sys.executable, "-m", "sanitizer", "run", "--exitcode", "66", "app.py"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["tracked", "True"]
        # The control: the same program with one misuse at the end exits with 66.
        proc, _ = run_program(tmp_path, source + OVERLAP_ON_HANDED_OVER, env_value=None, args=[
            sys.executable, "-m", "sanitizer", "run", "--exitcode", "66", "--action",
            "log+raise", "app.py"])
        assert proc.returncode == 66, proc.stderr
        assert proc.stdout.split() == ["tracked", "True", "ThreadAffinityError"]

    def test_bad_flag_value_exits_2_with_one_line(self, tmp_path: Path) -> None:
        proc, _ = run_program(tmp_path, "print('ran')", env_value=None, args=[
            sys.executable, "-m", "sanitizer", "run", "--action", "explode", "app.py"])
        assert proc.returncode == 2
        assert "ran" not in proc.stdout
        [line] = proc.stderr.strip().splitlines()
        assert "'action'" in line and "log, warn, raise" in line

    def test_console_script_and_module_mode(self, tmp_path: Path) -> None:
        pkg = tmp_path / "mod.py"
        pkg.write_text("import sys; print('args', sys.argv[1:])")
        script = Path(sys.executable).parent / "sanitize-threads"
        proc = subprocess.run([str(script), "run", "-m", "mod", "a", "b"], cwd=tmp_path,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "args ['a', 'b']" in proc.stdout

    @staticmethod
    def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
        return subprocess.run([sys.executable, "-m", "sanitizer", "run", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True)

    def test_a_missing_script_is_one_line_and_status_2_as_python_says(
            self, tmp_path: Path) -> None:
        proc = self.cli(tmp_path, "missing.py")
        python = subprocess.run([sys.executable, "missing.py"], cwd=tmp_path,
                                capture_output=True, text=True)
        assert proc.returncode == python.returncode == 2
        [line] = proc.stderr.strip().splitlines()
        assert line == (f"sanitize-threads: can't open file {str(tmp_path / 'missing.py')!r}: "
                        "[Errno 2] No such file or directory")
        assert line.split(": ", 1)[1] == python.stderr.strip().split(": ", 1)[1]

    def test_a_missing_module_or_main_is_one_line_as_python_says(
            self, tmp_path: Path) -> None:
        proc = self.cli(tmp_path, "-m", "no_such_module_here")
        assert proc.returncode == 1
        assert proc.stderr.strip() == "sanitize-threads: No module named no_such_module_here"
        (tmp_path / "adir").mkdir()
        proc = self.cli(tmp_path, "adir")
        assert proc.returncode == 1
        assert proc.stderr.strip() == "sanitize-threads: can't find '__main__' module in 'adir'"
        # The control: with a __main__.py, the directory runs, as under python.
        (tmp_path / "adir" / "__main__.py").write_text("import sys; print('ran', sys.argv)")
        proc = self.cli(tmp_path, "adir", "x")
        assert proc.returncode == 0, proc.stderr
        assert "ran ['adir', 'x']" in proc.stdout

    def test_a_syntax_error_in_the_script_reads_as_pythons_own(self, tmp_path: Path) -> None:
        (tmp_path / "bad.py").write_text("x = 1\ny = (\n")
        proc = self.cli(tmp_path, "bad.py")
        python = subprocess.run([sys.executable, "bad.py"], cwd=tmp_path,
                                capture_output=True, text=True)
        assert proc.returncode == python.returncode == 1
        assert proc.stderr == python.stderr
        assert "Traceback" not in proc.stderr and "sanitizer" not in proc.stderr

    def test_the_programs_own_exceptions_stay_the_programs(self, tmp_path: Path) -> None:
        (tmp_path / "helper.py").write_text("import no_such_module_here\n")
        (tmp_path / "app.py").write_text("def main():\n    import helper\n\nmain()\n")
        for args in (["app.py"], ["-m", "app"]):
            proc = self.cli(tmp_path, *args)
            assert proc.returncode == 1
            lines = proc.stderr.strip().splitlines()
            assert lines[0] == "Traceback (most recent call last):"
            assert lines[-1] == "ModuleNotFoundError: No module named 'no_such_module_here'"
            assert "app.py\", line 4, in <module>" in proc.stderr
            assert "sanitizer" not in proc.stderr and "runpy" not in proc.stderr, proc.stderr

    def test_children_of_the_cli_are_sanitized(self, tmp_path: Path) -> None:
        log = tmp_path / "v.jsonl"
        child = tmp_path / "child.py"
        child.write_text(DEAD_OWNER.replace("=False", "=True").replace("\n    ", "\n"))
        source = f"import subprocess, sys; subprocess.run([sys.executable, {str(child)!r}])"
        proc, _ = run_program(tmp_path, source, env_value=None, args=[
            sys.executable, "-m", "sanitizer", "run", "--log-file", str(log), "app.py"])
        assert proc.returncode == 0, proc.stderr
        assert json.loads(log.read_text().splitlines()[0])["policy"] == "strict"


def test_console_format_reads_like_a_thread_sanitizer_report(tmp_path: Path) -> None:
    source = DEAD_OWNER.replace("=False", "=True")
    (tmp_path / "app.py").write_text(__import__("textwrap").dedent(source))
    env = {**os.environ, "SANITIZE_THREADS": "format=console"}
    out = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    text = out.stderr
    assert "WARNING: thread-affinity violation (strict) on sqlite3.Connection" in text
    assert "execute by thread T" in text and "'user'" in text
    assert "created by thread T" in text and "'maker'" in text and "exited" in text
    used = line_of(source, "used")
    assert f"SUMMARY: thread-affinity (strict) {tmp_path / 'app.py'}:{used} in use" in text
    headline = text.index("WARNING:")
    assert text.index("execute by") > headline
    assert text.index("created by") > text.index("execute by")
    assert text.index("SUMMARY:") > text.index("created by")
