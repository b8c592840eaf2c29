"""The log destination fails, or the program takes its descriptors: real processes, real faults.

Each program makes two violations of different kinds, and prints its own result. The
destination breaks for real (/dev/full, a pipe whose reader is gone, fd 2 closed, a
file size limit reached, a log whose folder is deleted). Whatever breaks: the program
goes on with its own result and exit status, each lost report is counted (the count
is printed by the program's own atexit handler, which runs before the sanitizer's),
the loss is said once, the exit summary gives the count, and nothing is raised at
exit (sys.unraisablehook, which atexit errors go to, writes into a file: stderr may be
the broken destination). The program's own files never get a line of ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PRELUDE = """\
import atexit, os, sqlite3, sys, threading

def _noise(unraisable):  # what "Exception ignored" would have said, kept where we can read it
    with open("noise.txt", "a") as f:
        f.write(f"{unraisable.exc_type.__name__}: {unraisable.exc_value}\\n")
sys.unraisablehook = _noise

def _crash(*exc_info):
    import traceback
    with open("noise.txt", "a") as f:
        f.write("".join(traceback.format_exception(*exc_info)))
sys.excepthook = _crash

def said(text):  # into a file: stdout and stderr may be what broke
    with open("out.txt", "a") as f:
        f.write(text + "\\n")

def _lost():  # the program's own atexit handler runs before the sanitizer's
    from sanitizer import control
    said(f"lost {control.running().reporter.output.lost}")
atexit.register(_lost)

conn = sqlite3.connect(":memory:")

def violate(operation, *args):
    # A strict violation: sqlite3's own ProgrammingError is the call's own result.
    def use():
        try:
            getattr(conn, operation)(*args)
        except sqlite3.ProgrammingError:
            results.append("refused")
    t = threading.Thread(target=use, name="intruder"); t.start(); t.join()

def ours():
    from sanitizer import control
    return control.running().reporter.output.fd

results = []
"""

EPILOGUE = """
said(f"results {results} {sum(range(10))}")
sys.exit(7)
"""

NOTICE = "cannot write reports to"


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    tmp_path: Path
    log: Path

    def read(self, name: str) -> str:
        path = self.tmp_path / name
        return path.read_text() if path.exists() else ""

    @property
    def noise(self) -> str:
        return self.read("noise.txt")

    @property
    def said(self) -> str:
        return self.read("out.txt")

    @property
    def lost(self) -> int:
        [line] = [line for line in self.said.splitlines() if line.startswith("lost ")]
        return int(line.split()[1])

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def assert_the_program_went_on(self) -> None:
        assert self.status == 7, self.stderr + self.noise
        assert "results ['refused', 'refused'] 45\n" in self.said, self.stderr
        assert self.noise == "", self.noise  # nothing raised at exit, even unseen
        assert "Traceback" not in self.stderr, self.stderr
        assert "Exception ignored" not in self.stderr, self.stderr


def environment(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = setting
    return env


def run(tmp_path: Path, body: str, setting: str, *, shell: str = "{cmd}",
        log: str = "violations.jsonl") -> Outcome:
    """Run PRELUDE + body + EPILOGUE with SANITIZE_THREADS=setting, through ``sh -c shell``
    (where ``{cmd}`` is the python command), stdout and stderr pipes unless redirected."""
    (tmp_path / "app.py").write_text(PRELUDE + textwrap.dedent(body) + EPILOGUE)
    command = shell.format(cmd=f"exec {sys.executable} app.py")
    proc = subprocess.run(["sh", "-c", command], cwd=tmp_path, env=environment(setting),
                          capture_output=True, text=True, timeout=60)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, tmp_path, tmp_path / log)


def run_with_a_closed_pipe(tmp_path: Path, closed: str, setting: str) -> Outcome:
    """Run TWO with stdout and stderr pipes, the ``closed`` one ("stdout" or "stderr")
    closed by its reader before the first violation (a handshake on stdin)."""
    (tmp_path / "app.py").write_text(PRELUDE + textwrap.dedent("""
        said("ready")
        sys.stdin.readline()  # the parent has closed its end by now
    """) + textwrap.dedent(TWO) + EPILOGUE)
    with subprocess.Popen([sys.executable, "app.py"], cwd=tmp_path, env=environment(setting),
                          text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as child:
        assert child.stdin and child.stdout and child.stderr
        gone, other = ((child.stdout, child.stderr) if closed == "stdout"
                       else (child.stderr, child.stdout))
        gone.close()
        child.stdin.write("go\n")  # the program waits for it: its reader is gone by now
        child.stdin.close()
        rest = other.read()
        status = child.wait(timeout=60)
    stdout, stderr = ("", rest) if closed == "stdout" else (rest, "")
    return Outcome(status, stdout, stderr, tmp_path, tmp_path / "violations.jsonl")


# Indented as the bodies it is added to (a body is dedented as a whole).
TWO = """
            violate("execute", "select 1")
            violate("cursor")
"""


class TestTheLogDestinationFails:
    def test_a_full_disk(self, tmp_path: Path) -> None:
        out = run(tmp_path, TWO, "log_file=/dev/full")
        out.assert_the_program_went_on()
        assert out.lost == 2
        assert [line for line in out.stderr.splitlines() if NOTICE in line] == [
            "sanitizer: cannot write reports to /dev/full: [Errno 28] No space left on "
            "device; further reports are counted, not written"]
        assert "sanitizer: 2 report(s) could not be written to /dev/full" in out.stderr
        assert "2 thread-affinity violation(s), 2 unique" in out.stderr

    def test_the_disk_fills_up_after_the_first_report(self, tmp_path: Path) -> None:
        # A file size limit at the log's current size (Python ignores SIGXFSZ, so a
        # write past it fails with EFBIG, as on a full disk): the first report is in.
        out = run(tmp_path, """
            import resource
            violate("execute", "select 1")
            size = os.path.getsize("violations.jsonl")
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
            violate("cursor")
        """, "log_file=violations.jsonl")
        out.assert_the_program_went_on()
        assert out.lost == 1
        assert [e["operation"] for e in out.events()] == ["execute"]  # and no summary
        notices = [line for line in out.stderr.splitlines() if NOTICE in line]
        assert notices == ["sanitizer: cannot write reports to violations.jsonl: [Errno 27] "
                           "File too large; further reports are counted, not written"]
        assert "sanitizer: 1 report(s) could not be written to violations.jsonl" in out.stderr

    def test_stderr_is_a_full_device_from_the_start(self, tmp_path: Path) -> None:
        # The default destination; nothing can be said anywhere, and nothing raises.
        out = run(tmp_path, TWO, "1", shell="{cmd} 2>/dev/full")
        out.assert_the_program_went_on()
        assert out.lost == 2

    def test_a_log_pipe_whose_reader_has_gone(self, tmp_path: Path) -> None:
        # log_file=/dev/stdout, a pipe whose reader is gone: EPIPE (Python ignores SIGPIPE).
        out = run_with_a_closed_pipe(tmp_path, "stdout", "log_file=/dev/stdout")
        out.assert_the_program_went_on()
        assert out.lost == 2
        assert out.stderr.count(NOTICE) == 1
        assert "cannot write reports to /dev/stdout: [Errno 32] Broken pipe" in out.stderr
        assert "2 report(s) could not be written to /dev/stdout" in out.stderr

    def test_a_stderr_pipe_whose_reader_has_gone(self, tmp_path: Path) -> None:
        # The default destination: nothing can be said, and nothing raises.
        out = run_with_a_closed_pipe(tmp_path, "stderr", "1")
        out.assert_the_program_went_on()
        assert out.lost == 2
        assert out.stdout == ""

    def test_a_closed_stderr_at_start(self, tmp_path: Path) -> None:
        # fd 2 closed before the interpreter starts: while the sanitizer starts, fd 2 is
        # site.py's .pth file, open for reading. Then the program opens a file of its own,
        # which gets number 2: no report, notice or summary goes into it.
        out = run(tmp_path, """
            app = open("data.txt", "w")
            assert app.fileno() == 2, app.fileno()
            app.write("mine\\n"); app.flush()
        """ + TWO + """
            app.write("still mine\\n"); app.flush()  # and open until the end
        """, "1", shell="{cmd} 2>&-")
        out.assert_the_program_went_on()
        assert out.lost == 2
        assert (tmp_path / "data.txt").read_text() == "mine\nstill mine\n"

    def test_stderr_closed_by_the_program_before_the_first_report(self, tmp_path: Path) -> None:
        # The default destination: the sanitizer's own copy of stderr still reaches it.
        out = run(tmp_path, """
            os.close(2)
            app = open("data.txt", "w")  # gets number 2
        """ + TWO + """
            app.write("mine\\n"); app.flush()  # and open until the exit summary is done
        """, "format=json")
        out.assert_the_program_went_on()
        assert out.lost == 0
        events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
        assert [e.get("operation") for e in events] == ["execute", "cursor", None]
        assert "2 thread-affinity violation(s), 2 unique" in out.stderr
        assert (tmp_path / "data.txt").read_text() == "mine\n"

    def test_stderr_closed_and_our_copy_too(self, tmp_path: Path) -> None:
        # As a daemon does: close everything, then open files of its own (fd 2 among them).
        out = run(tmp_path, """
            os.closerange(2, 256)
            files = [open(f"data{i}.txt", "w") for i in range(3)]
            assert files[0].fileno() == 2
        """ + TWO + """
            for i, f in enumerate(files):
                f.write(f"mine {i}\\n"); f.close()
        """, "format=json")
        out.assert_the_program_went_on()
        assert out.lost == 2  # stderr is gone: counted, never written into data0.txt
        assert [(tmp_path / f"data{i}.txt").read_text() for i in range(3)] == [
            f"mine {i}\n" for i in range(3)]
        assert out.stderr == ""

    def test_a_log_whose_reopen_fails(self, tmp_path: Path) -> None:
        # The file becomes unwritable: the program closes our descriptor (closerange) and
        # deletes the log's folder, so the reopen by path fails.
        (tmp_path / "logs").mkdir()
        out = run(tmp_path, """
            import shutil
            violate("execute", "select 1")
            os.closerange(3, 256)
            shutil.rmtree("logs")
            violate("cursor")
        """, "log_file=logs/violations.jsonl")
        out.assert_the_program_went_on()
        assert out.lost == 1
        assert [line for line in out.stderr.splitlines() if NOTICE in line] == [
            "sanitizer: cannot write reports to logs/violations.jsonl: [Errno 2] No such "
            "file or directory: 'logs/violations.jsonl'; further reports are counted, not "
            "written"]
        assert "1 report(s) could not be written to logs/violations.jsonl" in out.stderr

    def test_the_logs_folder_is_deleted(self, tmp_path: Path) -> None:
        # Our descriptor stays open on a file nobody can read any more: that is a loss.
        (tmp_path / "logs").mkdir()
        out = run(tmp_path, """
            import shutil
            violate("execute", "select 1")
            shutil.rmtree("logs")
            violate("cursor")
            os.mkdir("logs")  # too late for the summary: once lost, reports are counted
        """, "log_file=logs/violations.jsonl")
        out.assert_the_program_went_on()
        assert out.lost == 1
        assert out.stderr.count(NOTICE) == 1
        assert "1 report(s) could not be written to logs/violations.jsonl" in out.stderr
        assert not (tmp_path / "logs" / "violations.jsonl").exists()

    def test_a_deleted_log_file_is_made_again(self, tmp_path: Path) -> None:
        # Its folder is still there: the next report re-creates the file by path.
        out = run(tmp_path, """
            violate("execute", "select 1")
            os.unlink("violations.jsonl")
            violate("cursor")
        """, "log_file=violations.jsonl")
        out.assert_the_program_went_on()
        assert out.lost == 0
        assert [e["event"] for e in out.events()] == ["thread_affinity_violation",
                                                      "thread_affinity_summary"]
        assert [e.get("operation") for e in out.events()] == ["cursor", None]
        assert NOTICE not in out.stderr


class TestTheProgramTakesOurDescriptors:
    """The program closes or reuses descriptors: never a line of ours in its files."""

    @pytest.mark.parametrize("destination", ["log_file=violations.jsonl", "format=json"])
    def test_closed_and_its_number_reused(self, tmp_path: Path, destination: str) -> None:
        out = run(tmp_path, """
            fd = ours()
            os.close(fd)
            app = -1
            while app != fd:  # the lowest free number: lower ones first, then ours
                app = os.open("data.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(app, b"before\\n")
        """ + TWO + """
            os.write(app, b"after\\n")  # still the program's: not closed under it
        """, destination)
        out.assert_the_program_went_on()
        assert out.lost == 0
        assert (tmp_path / "data.txt").read_text() == "before\nafter\n"
        self.assert_reported(out, destination)

    @pytest.mark.parametrize("destination", ["log_file=violations.jsonl", "format=json"])
    def test_dup2_over_ours(self, tmp_path: Path, destination: str) -> None:
        out = run(tmp_path, """
            fd = ours()
            app = os.open("data.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(app, fd)
            os.write(fd, b"before\\n")
        """ + TWO + """
            os.write(fd, b"after\\n")
        """, destination)
        out.assert_the_program_went_on()
        assert out.lost == 0
        assert (tmp_path / "data.txt").read_text() == "before\nafter\n"
        self.assert_reported(out, destination)

    def test_dup2_of_a_full_device_over_ours(self, tmp_path: Path) -> None:
        # Ours is reopened by path: the reports are written, the program keeps its /dev/full.
        out = run(tmp_path, """
            fd = ours()
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
        """ + TWO + """
            said(f"still {os.readlink(f'/proc/self/fd/{fd}')}")
        """, "log_file=violations.jsonl")
        out.assert_the_program_went_on()
        assert out.lost == 0
        assert "still /dev/full\n" in out.said
        self.assert_reported(out, "log_file")

    def test_dup2_of_a_full_device_over_stderr(self, tmp_path: Path) -> None:
        # The program silences its stderr; the sanitizer's copy still reaches the original.
        out = run(tmp_path, """
            os.dup2(os.open("/dev/full", os.O_WRONLY), 2)
        """ + TWO, "format=json")
        out.assert_the_program_went_on()
        assert out.lost == 0
        self.assert_reported(out, "format=json")

    @pytest.mark.parametrize("destination", ["log_file=violations.jsonl", "format=json"])
    def test_closerange_then_open(self, tmp_path: Path, destination: str) -> None:
        out = run(tmp_path, """
            os.closerange(3, 256)
            files = [open(f"data{i}.txt", "w") for i in range(6)]
        """ + TWO + """
            for i, f in enumerate(files):
                f.write(f"mine {i}\\n"); f.close()
        """, destination)
        out.assert_the_program_went_on()
        assert out.lost == 0
        assert [(tmp_path / f"data{i}.txt").read_text() for i in range(6)] == [
            f"mine {i}\n" for i in range(6)]
        self.assert_reported(out, destination)

    def test_stderr_closed_and_its_number_reused_with_a_log_file(self, tmp_path: Path) -> None:
        # The first-loss notice and the exit summary are stderr's: not the program's file
        # that got number 2.
        out = run(tmp_path, """
            os.close(2)
            app = open("data.txt", "w")
            assert app.fileno() == 2
        """ + TWO + """
            app.write("mine\\n"); app.flush()  # and open until the exit summary is done
        """, "log_file=violations.jsonl")
        out.assert_the_program_went_on()
        assert (tmp_path / "data.txt").read_text() == "mine\n"
        self.assert_reported(out, "log_file")

    def test_stderr_redirected_into_a_file_of_the_programs(self, tmp_path: Path) -> None:
        # dup2 of the program's file onto fd 2, and our copy closed: stderr is then that
        # file, which is the program's: the reports are counted as lost, not written there.
        out = run(tmp_path, """
            app = os.open("data.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(app, 2)
            os.close(ours())
        """ + TWO + """
            os.write(app, b"mine\\n")
        """, "format=json")
        out.assert_the_program_went_on()
        assert out.lost == 2
        assert (tmp_path / "data.txt").read_text() == "mine\n"

    @staticmethod
    def assert_reported(out: Outcome, destination: str) -> None:
        if destination.startswith("log_file"):
            lines = out.log.read_text().splitlines()
        else:
            lines = [line for line in out.stderr.splitlines() if line.startswith("{")]
        events = [json.loads(line) for line in lines]
        assert [e.get("operation") for e in events] == ["execute", "cursor", None]
        assert events[-1]["event"] == "thread_affinity_summary"
