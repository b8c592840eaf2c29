"""Stress: many threads in many processes misuse shared objects from many sites at once,
all appending to one log file; every line is whole, every kind reported once per
process, and the counts add up exactly.

The program is generated: one function per creation site and one per access site,
so that each (policy, creation site, access site) is a kind of its own. Each worker
process makes its objects in its main thread; its threads wait on a Barrier and then
misuse every object, so that they really run at once; the processes wait on a
cross-process Barrier before they start, so that they really append at once. Half of
the workers are children of os.fork() (they also use objects inherited from the
parent: the ``process`` policy), half are started by multiprocessing's ``spawn``.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from sanitizer import logs

#: Access and creation sites per policy, threads per process, calls per thread and site.
SITES, THREADS, REPEATS = 24, 64, 2
#: Worker processes: FORKED children of os.fork(), the rest spawned by multiprocessing.
PROCESSES, FORKED = 8, 4
TIMEOUT = 120

# Each policy: the class (or connect call) its objects come from, and the use of one.
KINDS = {
    "strict": ("Box()", "obj.touch()"),
    "exclusive": ("Slot()", "obj.touch()"),
    # sqlite3 raises its own ProgrammingError after the report: caught at the site.
    "sqlite": ('sqlite3.connect(":memory:")',
               'try:\n        obj.execute("select 1")\n    except sqlite3.ProgrammingError:\n'
               '        pass'),
    "inherited": ("Box()", "obj.touch()"),
}
POLICY = {"strict": "strict", "exclusive": "exclusive", "sqlite": "strict",
          "inherited": "process"}

HEADER = '''\
"""Generated: one function per creation site and one per access site."""
import sqlite3

import sanitizer


@sanitizer.thread_affine
class Box:
    def touch(self):
        return 1


@sanitizer.thread_affine(policy="exclusive")
class Slot:
    def hold(self, entered, release):
        entered.set()
        release.wait(60)

    def touch(self):
        return 1

'''

DRIVER = '''\
"""The stress program: PROCESSES workers, THREADS threads each, all misusing at once."""
import json
import multiprocessing
import os
import sys
import threading
import traceback

import sites

SITES, THREADS, REPEATS, PROCESSES, FORKED = (int(a) for a in sys.argv[1:6])
WAIT = 60  # a Barrier that is never met breaks instead of hanging: no silent deadlock


def worker(gate, inherited):
    boxes = [make() for make in sites.MAKE["strict"]]
    slots = [make() for make in sites.MAKE["exclusive"]]
    conns = [make() for make in sites.MAKE["sqlite"]]
    # One thread inside each exclusive object for the whole run: every other use is
    # an overlap, so that its count is exact.
    entered = [threading.Event() for _ in slots]
    release = threading.Event()
    holders = [threading.Thread(target=slot.hold, args=(event, release))
               for slot, event in zip(slots, entered)]
    for holder in holders:
        holder.start()
    for event in entered:
        assert event.wait(WAIT)
    uses = [(sites.USE["strict"], boxes), (sites.USE["exclusive"], slots),
            (sites.USE["sqlite"], conns)]
    together = threading.Barrier(THREADS)
    failures = []

    def misuse():
        try:
            together.wait(WAIT)
            for _ in range(REPEATS):
                for functions, objects in uses:
                    for use, obj in zip(functions, objects):
                        use(obj)
        except BaseException as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=misuse) for _ in range(THREADS)]
    gate.wait(WAIT)  # every process is ready: now they all write at once
    for thread in threads:
        thread.start()
    for _ in range(REPEATS):  # objects made before the fork, in this child's main thread
        for use, obj in zip(sites.USE["inherited"], inherited):
            use(obj)
    for thread in threads:
        thread.join()
    release.set()
    for holder in holders:
        holder.join()
    assert not failures, failures


def spawned(gate):
    worker(gate, [])


if __name__ == "__main__":
    spawn = multiprocessing.get_context("spawn")
    gate = spawn.Barrier(PROCESSES)
    inherited = [make() for make in sites.MAKE["inherited"]]
    forked = []
    for _ in range(FORKED):
        pid = os.fork()
        if pid == 0:
            try:
                worker(gate, inherited)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            sys.exit(0)  # a normal exit: atexit runs, the summary is written
        forked.append(pid)
    children = [spawn.Process(target=spawned, args=(gate,)) for _ in range(PROCESSES - FORKED)]
    for child in children:
        child.start()
    statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in forked]
    for child in children:
        child.join()
    statuses += [child.exitcode for child in children]
    print(json.dumps({"forked": forked, "spawned": [c.pid for c in children],
                      "statuses": statuses}))
'''


def generate(sites: int) -> tuple[str, dict[tuple[str, int], tuple[int, int]]]:
    """The sites module, and each (kind, index)'s creation and access lines."""
    lines = HEADER.splitlines()
    where: dict[tuple[str, int], tuple[int, int]] = {}
    for kind, (make, use) in KINDS.items():
        for i in range(sites):
            lines += ["", "", f"def make_{kind}_{i}():", f"    return {make}"]
            made = len(lines)
            lines += ["", "", f"def use_{kind}_{i}(obj):"]
            used = len(lines) + 1 + use.startswith("try:")  # the line of the call
            lines += f"    {use}".splitlines()
            where[kind, i] = (made, used)
    lines += ["", ""]
    for table, prefix in (("MAKE", "make"), ("USE", "use")):
        lines.append(f"{table} = {{")
        for kind in KINDS:
            names = ", ".join(f"{prefix}_{kind}_{i}" for i in range(sites))
            lines.append(f"    {kind!r}: [{names}],")
        lines.append("}")
    return "\n".join(lines) + "\n", where


Kind = tuple[str, int, int]  # (policy, creation line, access line), in sites.py


def expected_counts(where: dict[tuple[str, int], tuple[int, int]], forked: bool
                    ) -> dict[Kind, int]:
    counts = {}
    for (kind, _), (made, used) in where.items():
        if kind == "inherited":
            if forked:
                counts[POLICY[kind], made, used] = REPEATS
        else:
            counts[POLICY[kind], made, used] = THREADS * REPEATS
    return counts


def kind_of(event: dict[str, Any], sites_file: str) -> Kind:
    creation, access = event["creation_site"], event["access_site"]
    assert creation["file"] == access["file"] == sites_file, event
    return event["policy"], creation["line"], access["line"]


@pytest.fixture(scope="module")
def stress_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("stress")
    source, where = generate(SITES)
    (root / "sites.py").write_text(source)
    (root / "stress.py").write_text(DRIVER)
    log = root / "violations.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = f"log_file={log}"
    args = [str(n) for n in (SITES, THREADS, REPEATS, PROCESSES, FORKED)]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "stress.py", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    pids = json.loads(proc.stdout.splitlines()[-1])
    assert pids["statuses"] == [0] * PROCESSES, proc.stderr
    return {"root": root, "log": log, "where": where, "pids": pids, "stderr": proc.stderr,
            "elapsed": elapsed, "sites": str(root / "sites.py")}


def _lines(run: dict[str, Any]) -> list[dict[str, Any]]:
    text = run["log"].read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_every_line_is_whole_json(stress_run: dict[str, Any]) -> None:
    events = _lines(stress_run)  # json.loads raises on a cut or interleaved line
    names = collections.Counter(event["event"] for event in events)
    kinds = PROCESSES * (3 * SITES) + FORKED * SITES
    assert names == {"thread_affinity_violation": kinds, "thread_affinity_summary": PROCESSES}
    reading = logs.read([str(stress_run["log"])])
    assert not reading.skipped and not reading.unreadable
    assert reading.events == kinds + PROCESSES


def test_each_kind_is_reported_once_per_process(stress_run: dict[str, Any]) -> None:
    pids = stress_run["pids"]
    by_pid: dict[int, list[Kind]] = collections.defaultdict(list)
    for event in _lines(stress_run):
        if event["event"] == "thread_affinity_violation":
            by_pid[event["pid"]].append(kind_of(event, stress_run["sites"]))
    assert set(by_pid) == set(pids["forked"]) | set(pids["spawned"])
    for pid, kinds in by_pid.items():
        expected = expected_counts(stress_run["where"], forked=pid in pids["forked"])
        assert len(kinds) == len(set(kinds)), f"a kind reported twice in pid {pid}"
        assert set(kinds) == set(expected), pid


def test_counts_add_up_exactly(stress_run: dict[str, Any]) -> None:
    pids, sites_file = stress_run["pids"], stress_run["sites"]
    events = _lines(stress_run)
    kind_by_fingerprint = {e["fingerprint"]: kind_of(e, sites_file) for e in events
                           if e["event"] == "thread_affinity_violation"}
    summaries = [e for e in events if e["event"] == "thread_affinity_summary"]
    assert sorted(s["pid"] for s in summaries) == sorted(pids["forked"] + pids["spawned"])
    grand_total = 0
    for summary in summaries:
        expected = expected_counts(stress_run["where"], forked=summary["pid"] in pids["forked"])
        counted = {kind_by_fingerprint[t["fingerprint"]]: t["count"]
                   for t in summary["violations"]}
        assert counted == expected, summary["pid"]
        assert summary["total"] == sum(expected.values())
        assert summary["lost"] == 0
        grand_total += summary["total"]
    # The reader merges the processes into one finding per kind, with exact counts.
    reading = logs.read([str(stress_run["log"])])
    assert reading.total == grand_total
    for finding in reading.findings:
        policy = kind_of(finding.event, sites_file)[0]
        per_process = REPEATS if policy == "process" else THREADS * REPEATS
        processes = FORKED if policy == "process" else PROCESSES
        assert finding.count == per_process * processes
        assert len(finding.processes) == processes


def test_the_threads_really_ran_at_once(stress_run: dict[str, Any]) -> None:
    # From the summaries' occurrences: in every process, every thread met every kind
    # its threads misuse, and some threads were misusing at the same time as others.
    for summary in (e for e in _lines(stress_run) if e["event"] == "thread_affinity_summary"):
        spans: dict[int, list[str]] = collections.defaultdict(list)
        for tally in summary["violations"]:
            seen = {o["thread"] for o in tally["occurrences"]}
            assert len(seen) in (1, THREADS), tally["summary"]  # 1: the process policy
            for occurrence in tally["occurrences"]:
                spans[occurrence["thread"]].append(occurrence["at"])
        intervals = sorted((min(ats), max(ats)) for ats in spans.values())
        overlapping = sum(1 for (_, end), (start, _) in itertools.pairwise(intervals)
                          if start < end)
        assert overlapping > 0, summary["pid"]


def test_no_deadlock_and_nothing_said_on_stderr_but_the_summaries(
        stress_run: dict[str, Any]) -> None:
    # The run finished (no barrier broke, no process hung) well inside its timeout.
    assert stress_run["elapsed"] < TIMEOUT / 2
    stderr = stress_run["stderr"]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    summaries = [line for line in stderr.splitlines() if line.startswith("sanitizer: ")]
    assert len(summaries) == PROCESSES, stderr


if __name__ == "__main__":  # pragma: no cover - prints the generated program, to read it
    print(textwrap.indent(generate(2)[0], "    "))
