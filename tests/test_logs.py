"""logs.read: merging real logs of many processes, and bad input counted, never raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support import line_of

from sanitizer import logs
from sanitizer.render import SCHEMA

# Three kinds: one used from a thread N times, one once, and (with --other) one more.
PROGRAM = """
    import sqlite3, sys, threading

    def from_thread(target, times):
        for _ in range(times):
            thread = threading.Thread(target=target, name="writer")
            thread.start()
            thread.join()

    db = sqlite3.connect(":memory:")  # db made
    def use():
        try:
            db.execute("select 1")  # db used
        except sqlite3.ProgrammingError:
            pass
    from_thread(use, int(sys.argv[1]))

    other = sqlite3.connect(":memory:")  # other made
    def commit():
        try:
            other.commit()  # other used
        except sqlite3.ProgrammingError:
            pass
    from_thread(commit, 1)
"""

# Two runs of the sanitizer in one process: two summaries, which add up.
TWO_RUNS = """
    import sqlite3, sys, threading
    import sanitizer

    for run in range(2):
        sanitizer.enable(log_file=sys.argv[1])
        db = sqlite3.connect(":memory:")  # made
        def use():
            try:
                db.execute("select 1")  # used
            except sqlite3.ProgrammingError:
                pass
        for _ in range(run + 2):
            thread = threading.Thread(target=use)
            thread.start()
            thread.join()
        sanitizer.disable()
"""


def run(tmp_path: Path, log: Path, *args: str, source: str = PROGRAM) -> int:
    """Run ``source`` under the sanitizer, logging to ``log``; its pid."""
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    if source is PROGRAM:
        env["SANITIZE_THREADS"] = f"log_file={log}"
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return proc.pid


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """One log appended to by two processes: 5 and 3 uses of ``db``, one of ``other``."""
    tmp_path = tmp_path_factory.mktemp("logs")
    log = tmp_path / "shared.jsonl"
    first, second = run(tmp_path, log, "5"), run(tmp_path, log, "3")
    return log, first, second


def lines_of(log: Path) -> list[str]:
    return log.read_text().splitlines(keepends=True)


def test_merged_across_processes_with_exact_counts(two_processes: tuple[Path, int, int]
                                                   ) -> None:
    log, first, second = two_processes
    reading = logs.read([str(log)])
    assert reading.problems() == [] and reading.events == 6  # 2 events + 1 summary each
    db, other = reading.findings  # most frequent first
    assert db.count == 8 and db.counts == {(os.uname().nodename, first): 5,
                                           (os.uname().nodename, second): 3}
    assert db.processes == {(os.uname().nodename, first), (os.uname().nodename, second)}
    assert db.hosts == {os.uname().nodename}
    assert (db.policy, db.object_type, db.operation) == ("strict", "sqlite3.Connection",
                                                         "execute")
    assert db.access_site is not None and db.access_site["line"] == line_of(PROGRAM, "db used")
    assert db.creation_site is not None and db.creation_site["line"] == line_of(
        PROGRAM, "db made")
    assert other.count == 2 and other.operation == "commit"
    assert len(db.occurrences) == 8 and {o["pid"] for o in db.occurrences} == {first, second}
    assert [o["at"] for o in db.occurrences] == sorted(o["at"] for o in db.occurrences)
    assert db.first_at == db.occurrences[0]["at"] and db.last_at >= db.occurrences[-1]["at"]
    # Threads by process and serial: the owner and each writer thread of each process.
    assert sorted(info["name"] for info in db.threads.values()) == (
        ["MainThread"] * 2 + ["writer"] * 8)
    assert db.event["pid"] == first and "access_stack" in db.event  # the first full event
    assert reading.total == 10


def test_events_alone_count_one_each(two_processes: tuple[Path, int, int],
                                     tmp_path: Path) -> None:
    """Without the summaries (a killed process), each event counts once."""
    log, _, _ = two_processes
    cut = tmp_path / "no-summaries.jsonl"
    cut.write_text("".join(line for line in lines_of(log)
                           if '"thread_affinity_summary"' not in line))
    reading = logs.read([str(cut)])
    assert [f.count for f in reading.findings] == [2, 2] and reading.problems() == []


def test_summaries_of_two_runs_in_one_process_add_up(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    run(tmp_path, log, str(log), source=TWO_RUNS)
    records = [json.loads(line) for line in lines_of(log)]
    assert [r["event"] for r in records].count("thread_affinity_summary") == 2
    [finding] = logs.read([str(log)]).findings
    assert finding.count == 2 + 3 and len(finding.processes) == 1


def test_corrupt_truncated_mixed_and_binary_lines_are_counted(
        two_processes: tuple[Path, int, int], tmp_path: Path) -> None:
    log, _, _ = two_processes
    good = lines_of(log)
    bad = tmp_path / "bad.jsonl"
    with bad.open("wb") as file:
        file.write(b"plain text from the application\n")
        file.write(json.dumps({"event": "request_finished", "level": "info"}).encode() + b"\n")
        file.write(b"[1, 2, 3]\n")
        file.write(b"\x00\xff\xfe\x89PNG\r\n\x1a\n\xde\xad\xbe\xef\n")
        file.write("".join(good).encode())
        file.write(json.dumps({"event": "thread_affinity_violation"}).encode() + b"\n")
        file.write(json.dumps({"event": "thread_affinity_summary",
                               "violations": [{"fingerprint": "x"}, 7]}).encode() + b"\n")
        file.write(good[0].encode()[: len(good[0]) // 2])  # a line cut off by a crash
    reading = logs.read([str(bad)])
    assert reading.skipped == {"not JSON (a truncated or foreign line)": 5,
                               "not a sanitizer event": 2,
                               "a sanitizer event with malformed fields": 2}
    assert [f.count for f in reading.findings] == [8, 2]  # what was good is all there
    problems = reading.problems()
    assert problems == ["skipped 2 line(s): a sanitizer event with malformed fields",
                        "skipped 5 line(s): not JSON (a truncated or foreign line)",
                        "skipped 2 line(s): not a sanitizer event"]


def test_a_newer_schema_is_read_as_far_as_it_goes(two_processes: tuple[Path, int, int],
                                                  tmp_path: Path) -> None:
    log, _, _ = two_processes
    newer = tmp_path / "newer.jsonl"
    records: list[dict[str, Any]] = [json.loads(line) for line in lines_of(log)]
    for record in records:
        record["schema"] = SCHEMA + 1
        record["a_field_from_the_future"] = {"nested": [1, 2]}
    newer.write_text("".join(json.dumps(r) + "\n" for r in records))
    reading = logs.read([str(newer)])
    assert [f.count for f in reading.findings] == [8, 2]
    assert reading.newer == len(records)
    [line] = reading.problems()
    assert f"newer schema than {SCHEMA}" in line and "upgrade" in line


def test_globs_stdin_and_unreadable_files(two_processes: tuple[Path, int, int],
                                          tmp_path: Path) -> None:
    log, _, _ = two_processes
    good = lines_of(log)
    split = tmp_path / "split"
    split.mkdir()
    (split / "a.jsonl").write_text("".join(good[:3]))  # the first process's lines
    (split / "b.jsonl").write_text("".join(good[3:]))
    reading = logs.read([str(split / "*.jsonl"), str(split / "a.jsonl")])  # a: once
    assert reading.sources == 2 and [f.count for f in reading.findings] == [8, 2]
    missing = logs.read([str(tmp_path / "none-*.jsonl"), str(tmp_path / "gone.jsonl")])
    assert missing.sources == 0 and missing.findings == []
    assert missing.problems() == [
        f"cannot read {tmp_path}/none-*.jsonl: No such file or directory",
        f"cannot read {tmp_path}/gone.jsonl: No such file or directory"]
    script = ("import json, sys; from sanitizer import logs; r = logs.read(['-']); "
              "print(json.dumps([[f.count for f in r.findings], r.sources]))")
    proc = subprocess.run([sys.executable, "-c", script], input="".join(good),
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert json.loads(proc.stdout) == [[8, 2], 1], proc.stderr


def test_a_directory_is_unreadable_not_a_traceback(tmp_path: Path) -> None:
    reading = logs.read([str(tmp_path)])
    [line] = reading.problems()
    assert line.startswith(f"cannot read {tmp_path}: ") and reading.sources == 0
