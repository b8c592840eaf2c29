"""Overhead of ``pytest --sanitize-threads`` on a suite of small sqlite3 tests without violations.

Generates a suite (default 2,000 tests: connections made by fixtures and by the
tests, queries, cursors, transactions, a few worker threads with their own
connections), then runs it in the same run as plain pytest, with the flag, and
as plain pytest again, reversing that order each round, and prints the medians
and the ratios. Target: at most 5% overhead.

Three ratios are printed, each against the plain runs: the median of each
round's own ratio (the sanitized run against the mean of the two plain runs
around it, so slow drift of a shared machine cancels out); of the medians; and
of the fastest runs (for CPU-bound work, the run least disturbed by anything
else on the machine). The two identical plain runs compared with each other (an
A/A control) show how far this machine's timings wander in this run, which is
what a difference of a few percent has to be read against. ``--breakdown`` adds
the suite without the plugin loaded and the sanitizer alone (SANITIZE_THREADS,
plugin off), to see who costs what.

``--instructions`` also runs each variant once under valgrind's callgrind and
prints the ratio of instructions executed: a count, not a time, so it is the
same however busy the machine is (timings on a shared 2-core machine drift by
a few percent between runs, which is the size of the effect measured here).

    .venv/bin/python benchmarks/bench_pytest.py [--tests 2000] [--rounds 11] [--breakdown]
                                                [--instructions]

Needs the package installed with its pytest11 entry point (``make install``).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TESTS_PER_FILE = 50

FILE = '''
import sqlite3
import threading

import pytest


@pytest.fixture
def db():
    conn = sqlite3.connect(":memory:")
    conn.execute("create table items (id integer primary key, name text, qty integer)")
    conn.executemany("insert into items (name, qty) values (?, ?)",
                     [("item%d" % i, i) for i in range(20)])
    yield conn
    conn.close()


@pytest.mark.parametrize("n", range({half}))
def test_query(db, n):
    cur = db.cursor()
    cur.execute("select sum(qty) from items where id <= ?", (n % 20 + 1,))
    assert cur.fetchone()[0] == sum(range(n % 20 + 1))
    with db:
        db.execute("update items set qty = qty + 1 where id = ?", (n % 20 + 1,))
    assert db.execute("select count(*) from items").fetchone() == (20,)


@pytest.mark.parametrize("n", range({rest}))
def test_own_connection(n):
    conn = sqlite3.connect(":memory:")
    conn.execute("create table t (x)")
    conn.execute("insert into t values (?)", (n,))
    rows = conn.execute("select x from t").fetchall()
    if n % 10 == 0:  # a worker thread with a connection of its own: no violation
        out = []
        def work():
            own = sqlite3.connect(":memory:")
            out.append(own.execute("select ?", (n,)).fetchone()[0])
            own.close()
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        assert out == [n]
    conn.close()
    assert rows == [(n,)]
'''


def make_suite(root: Path, tests: int) -> int:
    files = max(1, tests // TESTS_PER_FILE)
    per_file = -(-tests // files)
    for index in range(files):
        half = per_file // 2
        source = FILE.replace("{half}", str(half)).replace("{rest}", str(per_file - half))
        (root / f"test_bench_{index:03d}.py").write_text(textwrap.dedent(source))
    (root / "pytest.ini").write_text("[pytest]\n")
    return files * per_file


def command_and_env(extra: list[str]) -> tuple[list[str], dict[str, str]]:
    # As users run pytest: with .pyc files (some CI images set PYTHONDONTWRITEBYTECODE,
    # which makes every run compile the sanitizer, structlog and pytest from source).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SANITIZE_THREADS", "PYTEST_ADDOPTS", "PYTEST_XDIST",
                                "PYTHONDONTWRITEBYTECODE"))}
    if extra and extra[0].startswith("SANITIZE_THREADS="):
        env["SANITIZE_THREADS"] = extra[0].partition("=")[2]
        extra = extra[1:]
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra], env


def instructions(root: Path, variants: dict[str, list[str]]) -> dict[str, int]:
    """Instructions each variant executes, counted by callgrind (all variants at once)."""
    running = {}
    for name, extra in variants.items():
        command, env = command_and_env(extra)
        env["PYTHONHASHSEED"] = "0"  # dict layouts, and so instruction counts, repeat
        running[name] = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    counts = {}
    for name, proc in running.items():
        _, stderr = proc.communicate()
        match = re.search(r"I\s+refs:\s+([\d,]+)", stderr)
        if proc.returncode != 0 or not match:
            sys.exit(f"callgrind run of {name!r} failed:\n{stderr[-2000:]}")
        counts[name] = int(match.group(1).replace(",", ""))
    return counts


def run(root: Path, extra: list[str]) -> tuple[float, float, float, str]:
    command, env = command_and_env(extra)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    match = re.search(r"(\d+) passed in ([\d.]+)s", last)
    if not match:
        sys.exit(f"unexpected summary line: {last!r}")
    return wall, cpu, float(match.group(2)), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions with valgrind (callgrind)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the suite without the plugin, and the sanitizer alone")
    args = parser.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (apt install valgrind)")

    # "off again" is the same command as "off", run last in a round whose order
    # reverses every time: each round's sanitized run is compared with the mean of
    # the two plain runs around it (slow drift of the machine cancels out), and
    # their ratio to each other is this run's noise floor (an A/A control).
    variants = {"off": [], "--sanitize-threads": ["--sanitize-threads"]}
    if args.breakdown:
        variants["plugin not loaded"] = ["-p", "no:sanitize_threads"]
        # The sanitizer without the pytest plugin: what the plugin itself adds is the rest.
        variants["sanitizer alone"] = ["SANITIZE_THREADS=1", "-p", "no:sanitize_threads"]
    variants["off again"] = []
    with tempfile.TemporaryDirectory(prefix="bench_pytest_") as tmp:
        root = Path(tmp)
        count = make_suite(root, args.tests)
        print(f"{count} tests in {root}; {args.rounds} rounds, order alternating; "
              f"Python {sys.version.split()[0]}")
        run(root, ["--sanitize-threads"])  # warm the file cache and the .pyc files
        run(root, [])
        walls: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        sessions: dict[str, list[float]] = {name: [] for name in variants}
        counts = (instructions(root, {k: v for k, v in variants.items() if k != "off again"})
                  if args.instructions else {})
        for round_number in range(args.rounds):
            order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
            for name in order:
                wall, cpu, session, last = run(root, variants[name])
                if not last.startswith(f"{count} passed"):
                    sys.exit(f"{name}: {last}")
                walls[name].append(wall)
                cpus[name].append(cpu)
                sessions[name].append(session)

    print(f"{'variant':<22}{'wall':>10}{'CPU':>10}{'session':>10}   (medians)")
    for name in variants:
        print(f"{name:<22}{statistics.median(walls[name]):>9.3f}s"
              f"{statistics.median(cpus[name]):>9.3f}s{statistics.median(sessions[name]):>9.3f}s")

    def show(r: float) -> str:
        return f"{r:.3f} ({(r - 1) * 100:+.1f}%)"

    def ratios(values: dict[str, list[float]], name: str = "--sanitize-threads") -> str:
        """Per round against the mean of that round's plain runs; of medians; of the fastest."""
        base = [(a + b) / 2 for a, b in zip(values["off"], values["off again"], strict=True)]
        plain = values["off"] + values["off again"]
        per_round = statistics.median(v / b for v, b in zip(values[name], base, strict=True))
        medians = statistics.median(values[name]) / statistics.median(plain)
        fastest = min(values[name]) / min(plain)
        return f"paired {show(per_round)}, medians {show(medians)}, fastest {show(fastest)}"

    print(f"wall time, --sanitize-threads / plain: {ratios(walls)}; target <= +5%")
    print(f"CPU time: {ratios(cpus)}")
    print(f"pytest's session time ('in Ns'): {ratios(sessions)}")
    first, again = walls["off"], walls["off again"]
    print("noise floor, the same plain command twice (off again / off): wall paired "
          f"{show(statistics.median(b / a for a, b in zip(first, again, strict=True)))}, "
          f"medians {show(statistics.median(again) / statistics.median(first))}")
    if counts:
        r = counts["--sanitize-threads"] / counts["off"]
        print("instructions (callgrind): " + ", ".join(
            f"{name} {count / 1e9:.3f}G" for name, count in counts.items())
            + f"; ratio {r:.3f} ({(r - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
