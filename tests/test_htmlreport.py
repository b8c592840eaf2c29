"""sanitize-threads html: the report's pages on logs written by real runs of a buggy program."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import pytest

# Hostile names: an object name and a thread name that are markup.
HOSTILE_NAME = '<script>alert("name")</script>&amp;'
HOSTILE_THREAD = "<img src=x onerror=alert(1)>"

PROGRAM = textwrap.dedent(f'''
    import sqlite3
    import threading

    import sanitizer


    class Account:
        def deposit(self, n):
            return n


    def run(target, name):
        thread = threading.Thread(target=target, name=name)
        thread.start()
        thread.join()


    conn = sqlite3.connect(":memory:")  # created conn
    account = sanitizer.track(Account(), "strict", name={HOSTILE_NAME!r})  # created account


    def use_conn():
        for _ in range(3):
            try:
                conn.execute("select 1")  # access conn
            except sqlite3.ProgrammingError:
                pass


    def deposit():
        account.deposit(1)  # access account


    def take():
        sanitizer.transfer(account)
        account.deposit(2)


    run(use_conn, {HOSTILE_THREAD!r})
    account.deposit(0)
    with sanitizer.shared(account):
        run(lambda: account.deposit(1), "sharer")  # allowed: inside the shared window
    run(deposit, "late")
    run(take, "taker")
    account.deposit(3)  # access after transfer

    # Two threads inside one object at once (exclusive), the holder waiting inside a call.
    class Pool:
        def query(self, wait):
            if wait:
                inside.set()
                done.wait(10)  # holder waits
            return 1


    pool = sanitizer.track(Pool(), "exclusive")  # created pool
    inside, done = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: pool.query(True), name="holder")
    holder.start()
    inside.wait(10)
    pool.query(False)  # access pool
    done.set()
    holder.join()
''')


def line_of(marker: str) -> int:
    for number, line in enumerate(PROGRAM.splitlines(), 1):
        if f"# {marker}" in line:
            return number
    raise AssertionError(marker)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}


def html(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command, run where the program ran (sites are shown relative to it)."""
    return subprocess.run([sys.executable, "-m", "sanitizer", "html", *args], cwd=cwd,
                          env=clean_env(), capture_output=True, text=True, input=stdin,
                          timeout=60)


@dataclass
class Report:
    """Two real runs of PROGRAM logging to one file, and the HTML written from it."""

    root: Path
    log: Path
    out: Path
    events: list[dict[str, Any]]
    stdout: str

    def page(self, marker: str) -> tuple[dict[str, Any], str]:
        """The event whose access site is the line marked ``marker``, and its page's HTML."""
        line = line_of(marker)
        event = next(e for e in self.events if e["access_site"]["line"] == line)
        return event, (self.out / f"v-{event['fingerprint']}.html").read_text()


def make_report(root: Path) -> Report:
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(PROGRAM)
    log = root / "violations.jsonl"
    for _ in range(2):  # two processes: one finding each, merged
        env = {**clean_env(), "SANITIZE_THREADS": f"log_file={log},history=8"}
        proc = subprocess.run([sys.executable, "app.py"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    events = [e for e in lines if e["event"] == "thread_affinity_violation"]
    first_pid = events[0]["pid"]
    out = root / "report"
    done = html(str(log), "-o", str(out), "--title", "Nightly <run>", cwd=root)
    assert done.returncode == 0, done.stderr
    return Report(root, log, out, [e for e in events if e["pid"] == first_pid], done.stdout)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return make_report(tmp_path_factory.mktemp("html"))


def rows(index: str) -> list[str]:
    return re.findall(r'<tr class="finding".*?</tr>', index, re.S)


def test_index_lists_each_finding_once_with_counts_and_processes(report: Report) -> None:
    index = (report.out / "index.html").read_text()
    assert f"Wrote the HTML report: {report.out / 'index.html'}" in report.stdout
    found = rows(index)
    assert len(found) == 4  # conn (strict), account late, account after transfer, pool
    conn = next(r for r in found if f"app.py:{line_of('access conn')}" in r)
    assert 'data-value="6"' in conn  # 3 occurrences in each of the 2 processes
    assert "2 processes" in conn
    assert f"app.py:{line_of('created conn')}" in conn
    assert 'data-policy="strict"' in conn and 'data-type="sqlite3.Connection"' in conn
    pool = next(r for r in found if f"app.py:{line_of('access pool')}" in r)
    assert 'data-policy="exclusive"' in pool
    assert re.search(r"<option value=\"exclusive\">", index)
    assert re.search(r"<option value=\"Account\">", index)
    assert "12 violation(s), 4 unique, in 2 process(es)" in index
    assert '<script src="report.js"' in index
    for name in ("style.css", "report.js"):  # copied beside the pages: no network
        assert (report.out / name).stat().st_size > 0
    assert "http://" not in index and "https://" not in index


def test_a_finding_page_shows_both_stacks_with_the_lines_marked(report: Report) -> None:
    event, page = report.page("access conn")
    assert escape(event["message"]) in page
    access = page.split('id="access-stack"')[1].split("</section>")[0]
    creation = page.split('id="creation-stack"')[1].split("</section>")[0]
    marked = re.findall(r'<tr class="marked"><td class="lineno">(\d+)</td><td><code>(.*?)</code>',
                        access)
    assert (str(line_of("access conn")), '            conn.execute(&quot;select 1&quot;)'
            "  # access conn") in marked
    # Context lines either side, not marked.
    assert f'<td class="lineno">{line_of("access conn") - 1}</td>' in access
    marked = re.findall(r'<tr class="marked"><td class="lineno">(\d+)</td>', creation)
    assert marked == [str(line_of("created conn"))]
    # The standard library's threading frames are folded, expandable.
    assert "<details><summary>&#8230; 3 frames in the standard library</summary>" in access
    assert 'id="holder-stack"' not in page


def test_the_holder_has_its_stack_and_its_interval_from_the_history(report: Report) -> None:
    event, page = report.page("access pool")
    assert event["holder_thread"]["name"] == "holder" and event["history"]
    holder = page.split('id="holder-stack"')[1].split("</section>")[0]
    assert re.search(rf'<tr class="marked"><td class="lineno">{line_of("holder waits")}</td>',
                     holder)
    svg = page.split("<svg")[1].split("</svg>")[0]
    assert svg.count('class="mark holder"') == 1
    assert "from the access history" in svg
    assert "starts at its last access in the history" in page


def test_the_timeline_draws_lanes_marks_windows_and_transfers(report: Report) -> None:
    event, page = report.page("access conn")
    svg = page.split("<svg")[1].split("</svg>")[0]
    assert svg.count('<g class="lane"') == 2  # the owner (MainThread) and the worker
    assert svg.count('class="mark violation"') == 3  # this process's occurrences
    assert svg.count('class="mark created"') == 1
    assert svg.count('class="mark access"') == len(event["history"]) >= 1
    assert "1 other process(es) reported it too" in page
    assert svg.count('class="axis-label"') >= 3

    event, page = report.page("access account")  # after the sharing window closed
    svg = page.split("<svg")[1].split("</svg>")[0]
    assert [s["what"] for s in event["story"]] == ["shared", "unshared"]
    assert svg.count('class="shared-window"') == 1
    assert "shared by T0 &#x27;MainThread&#x27;" in svg
    assert 'data-lane="T0"' in svg and "late" in svg and "sharer" in svg

    event, page = report.page("access after transfer")
    svg = page.split("<svg")[1].split("</svg>")[0]
    assert svg.count('class="mark transfer"') == 1
    assert "transferred to T" in svg and "taker" in svg
    # The maker is the first transfer's previous owner: its lane has the creation mark.
    [transfer] = [s for s in event["story"] if s["what"] == "transfer"]
    assert transfer["from"]["name"] == "MainThread"
    assert "created at" in svg and "by T0 &#x27;MainThread&#x27;" in svg
    assert "thread not logged" not in svg


def test_hostile_names_are_escaped_everywhere(report: Report) -> None:
    pages = [p.read_text() for p in report.out.glob("*.html")]
    assert len(pages) == 5
    for text in pages:
        assert "<script>alert" not in text
        assert "<img src=x" not in text
        assert "Nightly <run>" not in text
    everything = "".join(pages)
    assert "&lt;img src=x onerror=alert(1)&gt;" in everything
    assert "&lt;script&gt;alert(&quot;name&quot;)&lt;/script&gt;&amp;amp;" in everything
    assert "Nightly &lt;run&gt;" in everything


def test_a_crafted_event_cannot_name_a_page_or_inject_markup(report: Report,
                                                             tmp_path: Path) -> None:
    event = dict(report.events[0])
    event.update(fingerprint="../../evil", policy='"><b>x', object_type="<svg onload=x>",
                 operation="<i>op")
    log = tmp_path / "crafted.jsonl"
    log.write_text(json.dumps(event) + "\n")
    done = html(str(log), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["index.html", "report.js", "style.css", "v-evil.html"]
    for page in (tmp_path / "out").glob("*.html"):
        text = page.read_text()
        assert "<svg onload" not in text and '"><b>' not in text and "<i>op" not in text
        assert "&lt;svg onload=x&gt;" in text


def test_bad_input_is_one_line_and_an_exit_status(tmp_path: Path) -> None:
    done = html(str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"sanitize-threads html: cannot read {tmp_path / 'missing.jsonl'}: "
        "No such file or directory"]
    assert not (tmp_path / "out").exists()


def test_logs_without_violations_still_give_a_report_that_says_so(tmp_path: Path) -> None:
    log = tmp_path / "junk.jsonl"
    log.write_text('not json\n{"event": "something else"}\n{"truncated": \n')
    done = html(str(log), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0
    assert "Traceback" not in done.stderr
    assert "skipped 2 line(s): not JSON" in done.stderr
    assert "skipped 1 line(s): not a sanitizer event" in done.stderr
    index = (tmp_path / "out" / "index.html").read_text()
    assert "No thread-affinity violations in these logs" in index
    assert "skipped 2 line(s)" in index


def test_globs_and_stdin_are_read(report: Report, tmp_path: Path) -> None:
    done = html(str(report.root / "*.jsonl"), "-o", str(tmp_path / "glob"), cwd=report.root)
    assert done.returncode == 0 and len(rows((tmp_path / "glob/index.html").read_text())) == 4
    done = html("-", "-o", str(tmp_path / "stdin"), cwd=report.root,
                stdin=report.log.read_text())
    assert done.returncode == 0 and len(rows((tmp_path / "stdin/index.html").read_text())) == 4


def test_the_default_output_directory(report: Report, tmp_path: Path) -> None:
    done = html(str(report.log), cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == "Wrote the HTML report: sanitizer-html/index.html"
    assert (tmp_path / "sanitizer-html" / "index.html").exists()
