"""`sanitize-threads report`: every format, --fail, --suppressions (as live), -o, bad input."""

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
from sanitizer.suppressions import load_suppressions

BIN = Path(sys.executable).parent

# Four kinds, used from other threads 4, 3, 2 and 1 times.
PROGRAM = """
    import sqlite3, threading
    import sanitizer

    def times(n, target):
        for _ in range(n):
            thread = threading.Thread(target=target, name="job")
            thread.start()
            thread.join()

    def quietly(call):
        try:
            call()
        except sqlite3.ProgrammingError:
            pass

    def make():
        return sqlite3.connect(":memory:")  # made in make

    first = make()
    times(4, lambda: quietly(lambda: first.execute("select 1")))  # first used
    second = sqlite3.connect(":memory:")  # second made
    times(3, lambda: quietly(lambda: second.execute("select 2")))  # second used
    third = sqlite3.connect(":memory:")  # third made
    times(2, lambda: quietly(lambda: third.execute("select 3")))  # third used

    @sanitizer.thread_affine
    class Cache:
        def get(self):
            return 1

    cache = Cache()  # cache made
    times(1, lambda: cache.get())  # cache used
"""


def rules_text() -> str:
    return (f"creation-function:app.make   # first\n"
            f"access-site:app.py:{line_of(PROGRAM, 'third used')}\n"
            f"object:Cache\n"
            f"policy:noblock               # never matches\n")


def run_program(root: Path, log: Path, extra: str = "") -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = f"log_file={log}" + extra
    proc = subprocess.run([sys.executable, "app.py"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("textreport")
    (root / "app.py").write_text(textwrap.dedent(PROGRAM))
    (root / "rules.supp").write_text(rules_text())
    run_program(root, root / "all.jsonl")
    run_program(root, root / "live.jsonl", f",suppressions={root / 'rules.supp'}")
    return root


def report(root: Path, *args: str, stdin: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "sanitize-threads"), "report", *args], cwd=root,
                          capture_output=True, text=True, input=stdin, timeout=120)


def as_json(root: Path, *args: str) -> dict[str, Any]:
    proc = report(root, "--format", "json", *args)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_text_table_most_frequent_first(root: Path) -> None:
    proc = report(root, "all.jsonl")
    assert proc.returncode == 0 and proc.stderr == ""
    head, columns, *rows = proc.stdout.splitlines()
    assert head == ("sanitize-threads: 10 thread-affinity violation(s), 4 unique, in 1 process "
                    "on 1 host")
    assert columns.split("  ")[0:2] == ["count", "policy"]
    assert [row.split()[0] for row in rows[:4]] == ["4", "3", "2", "1"]
    assert f"app.py:{line_of(PROGRAM, 'first used')} in <lambda>.<locals>.<lambda>" in rows[0]
    assert f"app.py:{line_of(PROGRAM, 'made in make')} in make" in rows[0]
    assert "job, MainThread (owner)" in rows[0]
    assert rows[4] == "" and rows[5].startswith("1. sqlite3.Connection.execute called by thread")
    # Columns line up: each row's access site starts where its header does.
    start = columns.index("access site")
    assert all(row[start:].startswith("app.py:") for row in rows[:4])


def test_markdown_for_a_job_summary(root: Path) -> None:
    proc = report(root, "--format", "markdown", "all.jsonl")
    lines = proc.stdout.splitlines()
    assert lines[0] == ("### sanitize-threads: 10 thread-affinity violation(s), 4 unique, "
                        "in 1 process on 1 host")
    assert lines[2] == ("| count | policy | object | access site | creation site | threads "
                        "| processes | hosts |")
    assert lines[3] == "|---:|---|---|---|---|---|---:|---:|"
    first = lines[4].split(" | ")
    assert first[:3] == ["| 4", "strict", "sqlite3.Connection"]
    assert first[3] == f"`app.py:{line_of(PROGRAM, 'first used')} in <lambda>.<locals>.<lambda>`"
    assert "<details><summary>Messages</summary>" in lines


def test_json_is_stable_and_complete(root: Path) -> None:
    data = as_json(root, "all.jsonl")
    assert sorted(data) == ["findings", "hosts", "processes", "read", "schema",
                            "suppressed", "total", "unique"]
    assert (data["total"], data["unique"], data["processes"]) == (10, 4, 1)
    assert data["read"] == {"events": 5, "skipped": {}, "newer": 0, "unreadable": []}
    first = data["findings"][0]
    assert sorted(first) == ["access_site", "count", "creation_site", "event", "fingerprint",
                             "first_at", "hosts", "last_at", "message", "object_type",
                             "occurrences", "operation", "policy", "processes", "threads"]
    assert first["event"]["access_stack"][0]["line"] == line_of(PROGRAM, "first used")
    assert first["processes"][0]["count"] == 4 and len(first["occurrences"]) == 4
    assert first["first_at"] < first["last_at"]
    assert as_json(root, "all.jsonl") == data  # the same log, the same bytes


def test_sarif_and_output_file(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.sarif"
    proc = report(root, "--format", "sarif", "-o", str(out), "all.jsonl")
    assert proc.returncode == 0 and proc.stdout == ""
    document = json.loads(out.read_text())
    assert [r["properties"]["count"] for r in document["runs"][0]["results"]] == [4, 3, 2, 1]
    text = tmp_path / "out.txt"
    assert report(root, "-o", str(text), "all.jsonl").returncode == 0
    assert text.read_text() == report(root, "all.jsonl").stdout
    failed = report(root, "-o", str(tmp_path / "no" / "dir.txt"), "all.jsonl")
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    assert failed.stderr.startswith("sanitize-threads report: cannot write ")


def test_fail_exits_1_only_when_something_is_left(root: Path, tmp_path: Path) -> None:
    assert report(root, "--fail", "all.jsonl").returncode == 1
    assert report(root, "all.jsonl").returncode == 0
    everything = tmp_path / "all.supp"
    everything.write_text("policy:*\n")
    proc = report(root, "--fail", "--suppressions", str(everything), "all.jsonl")
    assert proc.returncode == 0
    assert proc.stdout == "sanitize-threads: no thread-affinity violations (10 suppressed)\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert report(root, "--fail", str(empty)).returncode == 0


def test_suppressions_after_the_fact_mean_what_they_mean_live(root: Path) -> None:
    live = as_json(root, "live.jsonl")
    after = as_json(root, "--suppressions", "rules.supp", "all.jsonl")
    [kept] = live["findings"]  # only "second" is in no rule
    assert kept["access_site"]["line"] == line_of(PROGRAM, "second used")
    assert [f["fingerprint"] for f in after["findings"]] == [kept["fingerprint"]]
    assert after["total"] == live["total"] == 3
    assert [(s["rule"], s["count"]) for s in after["suppressed"]] == [
        ("creation-function:app.make", 4),
        (f"access-site:app.py:{line_of(PROGRAM, 'third used')}", 2),
        ("object:Cache", 1), ("policy:noblock", 0)]
    proc = report(root, "--suppressions", "rules.supp", "all.jsonl")
    assert proc.stderr == ("sanitize-threads report: suppression never matched: "
                           f"{root / 'rules.supp'}:4: policy:noblock\n".replace(
                               str(root) + "/", ""))


def test_rules_match_logged_findings_and_events(root: Path) -> None:
    reading = logs.read([str(root / "all.jsonl")])
    rules = load_suppressions(str(root / "rules.supp"))
    matched = [[rule.matches(finding) for rule in rules] for finding in reading.findings]
    assert matched == [[True, False, False, False], [False, False, False, False],
                       [False, True, False, False], [False, False, True, False]]
    events = [[rule.matches(finding.event) for rule in rules] for finding in reading.findings]
    assert events == matched  # a bare event dict, the same
    [bare, line, other_line] = load_suppressions(_write(root, "kinds.supp", (
        "access-function:quietly\n"
        f"site:app.py:{line_of(PROGRAM, 'second made')}\n"
        f"creation-site:app.py:{line_of(PROGRAM, 'second used')}\n")))
    first, second, _, cache = reading.findings
    assert bare.matches(first) and not bare.matches(cache)  # a frame further up the stack
    assert line.matches(second) and not line.matches(first)
    assert not other_line.matches(second)  # a use's line is not a creation's


def _write(root: Path, name: str, text: str) -> str:
    (root / name).write_text(text)
    return str(root / name)


def test_bad_input_gets_one_line_and_status_2(root: Path, tmp_path: Path) -> None:
    bad_rules = tmp_path / "bad.supp"
    bad_rules.write_text("sight:app.py\n")
    proc = report(root, "--suppressions", str(bad_rules), "all.jsonl")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "bad rule 'sight:app.py'" in proc.stderr and "Traceback" not in proc.stderr
    missing = report(root, "--suppressions", str(tmp_path / "none.supp"), "all.jsonl")
    assert missing.returncode == 2 and "cannot read file" in missing.stderr
    nothing = report(root, "gone.jsonl", "gone-*.jsonl")
    assert nothing.returncode == 2 and nothing.stdout == ""
    assert nothing.stderr == ("sanitize-threads report: nothing could be read: gone.jsonl: "
                              "No such file or directory; gone-*.jsonl: No such file or "
                              "directory\n")
    usage = report(root, "--format", "html", "all.jsonl")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_stdin_globs_and_problems_said_once(root: Path, tmp_path: Path) -> None:
    text = (root / "all.jsonl").read_text()
    proc = report(root, "--format", "json", "-", stdin="not json\n" + text + "\x00\x01\n")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["total"] == 10
    assert proc.stderr == ("sanitize-threads report: skipped 2 line(s): not JSON "
                           "(a truncated or foreign line)\n")
    partly = report(root, "*.jsonl", "gone.jsonl")  # all and live, and one that is not
    assert partly.returncode == 0
    assert partly.stderr == ("sanitize-threads report: cannot read gone.jsonl: "
                             "No such file or directory\n")
    assert partly.stdout.startswith("sanitize-threads: 13 thread-affinity violation(s), 4 "
                                    "unique, in 2 processes on 1 host")


def test_a_logged_frame_is_named_by_its_package(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Read elsewhere (not under the current directory), the module comes from the
    ``__init__.py`` files around the file, as Python named it when it ran."""
    package = tmp_path / "src" / "shop"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "views.py").write_text("def checkout():\n    pass\n")
    frame = {"file": str(package / "views.py"), "line": 2, "function": "checkout"}
    event = {"policy": "strict", "object_type": "x", "access_stack": [frame]}
    monkeypatch.chdir(tmp_path.parent)
    [qualified, wrong, bare] = load_suppressions(_write(tmp_path, "f.supp", (
        "access-function:shop.views.checkout\naccess-function:src.shop.views.checkout\n"
        "access-function:checkout\n")))
    assert qualified.matches(event) and bare.matches(event) and not wrong.matches(event)
