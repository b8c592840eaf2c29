"""Run SQLAlchemy's own threading, pool and session tests plain and under SANITIZE_THREADS.

Usage: python realworld/sqlalchemy_suite.py [--source DIR] [--db NAME] [--keep DIR] [FILE ...]

The tests are not in SQLAlchemy's wheel: the sdist of the installed version is
fetched with ``pip download`` (or pass ``--source`` to an unpacked one). Each
file runs with SQLAlchemy's own pytest setup (its conftest and sqla_testing
plugin), on each database of DBS from its setup.cfg, twice: plain and sanitized,
one pytest per file so that each report names its file. Each test's outcome must
be the same in both, and every report must be in EXPECTED. Exit status: 0 when both hold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from common import Run, environment, fetch_sdist, read_log, require_sanitizer, site, timed, verdict

# SQLAlchemy's default, sqlite in memory, skips 7 of the 10 tests in test_threading.py
# ("multithreading_support"); its sqlite_file runs them, with a QueuePool of
# check_same_thread=False connections handed between threads. Neither needs a server.
DBS = ["sqlite", "sqlite_file"]
FILES = ["test/aaa_profiling/test_threading.py", "test/engine/test_pool.py",
         "test/orm/test_session.py"]

# (policy, test file under test/, function): the misuses these tests commit on purpose.
# None so far: the threading tests give each thread its own Session or Connection, and
# the pool tests hand connections between threads one at a time (checkout, checkin).
EXPECTED: dict[tuple[str, str, str], str] = {}

# -s: SQLAlchemy's conftest then leaves the sdist's lib/ off sys.path, so the tests
# exercise the installed SQLAlchemy (compiled extensions and all), the one we patch.
# no:sanitize_threads: what is measured is the .pth path alone; our pytest plugin
# would fail every test with a report, by design, and so change outcomes.
PYTEST = ["-s", "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:sanitize_threads"]

# junit <testcase> children -> outcome; pytest writes xfail as a skip of type pytest.xfail.
JUNIT = {"failure": "failed", "error": "error", "skipped": "skipped"}


def record_junit(run: Run, xml: Path, db: str) -> None:
    if not xml.exists():
        run.record(f"<no junit xml: {xml.name}>", "error")
        return
    for case in ET.parse(xml).getroot().iter("testcase"):
        test_id = f"[{db}] {case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in JUNIT:
                outcome = JUNIT[child.tag]
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfail"
        run.record(test_id, outcome)


def run_once(run: Run, source: Path, dbs: list[str], files: list[str], tmp: Path,
             sanitized: bool) -> None:
    for db in dbs:
        for path in files:
            name = f"{db}-{Path(path).stem}"
            xml = tmp / f"{run.label}-{name}.xml"
            xml.unlink(missing_ok=True)  # a stale one from --keep would hide a crash
            log = tmp / f"{name}.jsonl" if sanitized else None
            timed(run, [sys.executable, *PYTEST, "--db", db, f"--junitxml={xml}", path],
                  source, environment(log), tmp / f"{run.label}-{name}.log")
            record_junit(run, xml, db)
            if log is not None:
                for record in read_log(log):
                    record["_file"] = f"[{db}] {path}"  # one pytest per file: certain
                    run.reports.append(record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="an unpacked SQLAlchemy sdist")
    parser.add_argument("--db", action="append", help=f"a [db] name of setup.cfg "
                        f"(repeatable; default: {' '.join(DBS)})")
    parser.add_argument("--keep", type=Path, help="keep logs and results in this directory")
    parser.add_argument("files", nargs="*", default=FILES)
    args = parser.parse_args()
    import sqlalchemy

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for old in tmp.glob("*.jsonl"):
            old.unlink()  # SANITIZE_THREADS appends
        source = (args.source or fetch_sdist("sqlalchemy", sqlalchemy.__version__, tmp)
                  ).resolve()
        require_sanitizer(environment(tmp / "probe.jsonl"), ("-s",))
        dbs = args.db or DBS
        print(f"== SQLAlchemy {sqlalchemy.__version__} tests in {source} on {' '.join(dbs)}: "
              f"{' '.join(args.files)}")
        plain, sanitized = Run("plain"), Run("sanitized")
        run_once(plain, source, dbs, args.files, tmp, sanitized=False)
        run_once(sanitized, source, dbs, args.files, tmp, sanitized=True)

    def test_of(record: dict) -> str:
        # The test is the class and method that the access site's function starts with.
        where = site(record["access_stack"], source / "test")
        if where is None:
            return f"{record['_file']} (no frame of it on the access stack)"
        return f"{record['_file']}::{'::'.join(where[2].split('.<locals>')[0].split('.')[:2])}"

    expected = {k: v for k, v in EXPECTED.items() if f"test/{k[1]}" in args.files}
    return verdict(plain, sanitized, source / "test", expected, test_of)


if __name__ == "__main__":
    sys.exit(main())
