"""Run Django's own thread-, async- and server-related test modules under SANITIZE_THREADS.

Usage: python tests/django_project/django_suite.py [--source DIR] [--parallel N] [MODULE ...]

Django's test suite is not in its wheel: the sdist of the installed version is
fetched with ``pip download`` (or pass ``--source`` to an unpacked checkout).
The run must pass, and its reports must be exactly the misuses those tests
commit on purpose (EXPECTED); anything else is a false positive or a miss.
Exit status: 0 when both hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MODULES = ["backends", "servers", "asgi", "transactions", "get_or_create", "test_utils",
           "async", "basic", "select_for_update", "handlers"]

# (policy, test file, test function): what these modules do wrong deliberately.
EXPECTED = {
    ("strict", "backends/tests.py",
     "ThreadTests.test_closing_non_shared_connections.<locals>.runner1.<locals>.runner2"),
    ("strict", "backends/tests.py",
     "ThreadTests.test_pass_connection_between_threads.<locals>.do_thread.<locals>.runner"),
    ("async_unsafe", "async/tests.py", "AsyncUnsafeTest.test_async_unsafe"),
    ("async_unsafe", "async/tests.py", "AsyncUnsafeTest.test_async_unsafe_suppressed"),
    ("async_unsafe", "async/tests.py", "DatabaseConnectionTest.test_get_async_connection"),
}


def fetch_source(workdir: Path) -> Path:
    import django

    version = django.get_version()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", ":all:", f"django=={version}", "-d", str(workdir)],
                   check=True)
    archive = next(workdir.glob("[dD]jango-*.tar.gz"))
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(workdir, filter="data")
        except TypeError:  # Python without extraction filters (before 3.10.12)
            tar.extractall(workdir)  # Django's own sdist, from the index
    return next(p for p in workdir.iterdir() if p.is_dir() and (p / "tests").is_dir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="an unpacked Django source tree")
    parser.add_argument("--parallel", default="1", help="runtests.py --parallel (fork: 2+)")
    parser.add_argument("modules", nargs="*", default=MODULES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or fetch_source(Path(tmp))
        log = Path(tmp) / "violations.jsonl"
        env = {**os.environ, "SANITIZE_THREADS": f"log_file={log}"}
        run = subprocess.run([sys.executable, "runtests.py", "--parallel", args.parallel,
                              *args.modules], cwd=source / "tests", env=env)
        records = [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []
    found = set()
    for record in records:
        if record.get("event") == "thread_affinity_summary":
            continue
        if record.get("event") != "thread_affinity_violation":
            print(f"sanitizer error: {record}")
            found.add(("internal", "", str(record.get("where"))))
            continue
        site = next((f for f in record["access_stack"] if "/tests/" in f["file"]), None)
        where = site["file"].split("/tests/", 1)[1] if site else "?"
        found.add((record["policy"], where, site["function"] if site else "?"))
    expected = {e for e in EXPECTED if e[1].split("/")[0] in args.modules}
    for item in sorted(found - expected):
        print("UNEXPECTED report:", *item)
    for item in sorted(expected - found):
        print("MISSED:", *item)
    print(f"{len(found)} distinct reports, {len(found & expected)} of {len(expected)} expected; "
          f"Django's tests {'passed' if run.returncode == 0 else 'FAILED'}")
    return 0 if run.returncode == 0 and found == expected else 1


if __name__ == "__main__":
    sys.exit(main())
