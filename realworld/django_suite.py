"""Run Django's own thread-, async- and server-related tests plain and under SANITIZE_THREADS.

Usage: python realworld/django_suite.py [--source DIR] [--parallel N] [MODULE ...]

Django's test suite is not in its wheel: the sdist of the installed version is
fetched with ``pip download`` (or pass ``--source`` to an unpacked checkout).
The modules run twice with runtests.py, plain and sanitized; each test's outcome
must be the same in both, and the reports must be exactly the misuses those
tests commit on purpose (EXPECTED). Exit status: 0 when both hold.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from pathlib import Path

from common import (
    Run,
    environment,
    fetch_sdist,
    read_log,
    require_sanitizer,
    timed,
    timestamp,
    verdict,
)

HERE = Path(__file__).resolve().parent
MODULES = ["backends", "servers", "asgi", "transactions", "get_or_create", "test_utils",
           "async", "basic", "select_for_update", "handlers"]

# (policy, test file, test function): what these modules do wrong deliberately.
EXPECTED = {
    ("strict", "backends/tests.py",
     "ThreadTests.test_closing_non_shared_connections.<locals>.runner1.<locals>.runner2"):
        "runner2 closes the DatabaseWrapper of runner1's thread, not shared; the test "
        "asserts Django's DatabaseError",
    ("strict", "backends/tests.py",
     "ThreadTests.test_pass_connection_between_threads.<locals>.do_thread.<locals>.runner"):
        "a new thread queries through the main thread's DatabaseWrapper before "
        "inc_thread_sharing(); the test asserts Django's DatabaseError",
    ("async_unsafe", "async/tests.py", "AsyncUnsafeTest.test_async_unsafe"):
        "an @async_unsafe method called on the event-loop thread; the test asserts "
        "SynchronousOnlyOperation",
    ("async_unsafe", "async/tests.py", "AsyncUnsafeTest.test_async_unsafe_suppressed"):
        "the same call with DJANGO_ALLOW_ASYNC_UNSAFE set: Django stays silent on purpose, "
        "the sanitizer reports it by design (django.async_unsafe=always)",
    ("async_unsafe", "async/tests.py", "DatabaseConnectionTest.test_get_async_connection"):
        "a queryset evaluated in an async test body, on the event-loop thread; the test "
        "asserts SynchronousOnlyOperation",
}


def run_once(run: Run, source: Path, modules: list[str], parallel: str, tmp: Path,
             log: Path | None) -> dict[str, dict]:
    results = tmp / f"{run.label}-results.json"
    results.unlink(missing_ok=True)  # a stale one from --keep would hide a crash
    env = environment(log, pythonpath=HERE)
    env["REALWORLD_RESULTS"] = str(results)
    timed(run, [sys.executable, "runtests.py", "--settings", "django_settings",
                "--parallel", parallel, *modules],
          source / "tests", env, tmp / f"{run.label}.log")
    tests = json.loads(results.read_text()) if results.exists() else {}
    for test_id, entry in tests.items():
        for outcome in entry["outcomes"]:
            run.record(test_id, outcome)
    if not results.exists():
        run.record("<runtests.py did not finish>", "error")
    return tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="an unpacked Django source tree")
    parser.add_argument("--parallel", default="1", help="runtests.py --parallel (fork: 2+)")
    parser.add_argument("--keep", type=Path, help="keep logs and results in this directory")
    parser.add_argument("modules", nargs="*", default=MODULES)
    args = parser.parse_args()
    import django

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        source = (args.source or fetch_sdist("django", django.get_version(), tmp)).resolve()
        log = tmp / "violations.jsonl"
        log.unlink(missing_ok=True)
        require_sanitizer(environment(log))
        print(f"== Django {django.get_version()} tests in {source}: {' '.join(args.modules)}")
        plain, sanitized = Run("plain"), Run("sanitized")
        run_once(plain, source, args.modules, args.parallel, tmp, None)
        tests = run_once(sanitized, source, args.modules, args.parallel, tmp, log)
        sanitized.reports = read_log(log)

    # A report belongs to the test running when it was written, else to the one before
    # (a thread that outlived its test). Forked workers (--parallel 2+) replay their
    # results later, so there only the stack (the access site) tells.
    windows = sorted((entry["start"], test_id) for test_id, entry in tests.items()
                     if "start" in entry)

    def test_of(record: dict) -> str:
        if args.parallel != "1" or not windows:
            return "? (see the access site)"
        index = bisect.bisect_right(windows, (timestamp(record), "\uffff")) - 1
        return windows[index][1] if index >= 0 else "? (before the first test)"

    expected = {k: v for k, v in EXPECTED.items() if k[1].split("/")[0] in args.modules}
    return verdict(plain, sanitized, source / "tests", expected, test_of)


if __name__ == "__main__":
    sys.exit(main())
