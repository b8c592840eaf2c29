"""Run aiosqlite's own test suite with plain pytest and with ``pytest --sanitize-threads``.

Usage: python realworld/aiosqlite_suite.py [--source DIR] [--keep DIR]

aiosqlite's tests come with its sdist: the one of the installed version is
fetched with ``pip download`` (or pass ``--source`` to an unpacked one). They run
twice, from the sdist's directory: plain, and under the pytest plugin (which
fails every test that causes a violation). Each test's outcome must be the same
in both, and the sanitized run must report nothing: every report would be false,
since aiosqlite only ever uses its connections as plain sqlite3 allows. It takes
seconds, so .ci/run runs it. Exit status: 0 when both hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import Run, environment, fetch_sdist, timed, verdict
from sqlalchemy_suite import record_junit

TESTS = "aiosqlite/tests/smoke.py"
# The sdist has no pytest settings: pytest-asyncio would warn about its default.
PYTEST = ["-m", "pytest", "-p", "no:cacheprovider", "-o",
          "asyncio_default_fixture_loop_scope=function"]


def run_once(run: Run, source: Path, tmp: Path, sanitized: bool) -> None:
    xml = tmp / f"{run.label}.xml"
    xml.unlink(missing_ok=True)  # a stale one from --keep would hide a crash
    report = tmp / "sanitized.json"
    flags = ["--sanitize-threads", f"--sanitize-threads-report={report}"] if sanitized else []
    output = tmp / f"{run.label}.log"
    # From the sdist's directory: its aiosqlite (the installed version) is imported.
    timed(run, [sys.executable, *PYTEST, *flags, f"--junitxml={xml}", TESTS], source,
          environment(None), output)
    record_junit(run, xml, "sqlite")
    if sanitized:
        if "sanitize-threads: " not in output.read_text():  # the plugin's header line
            sys.exit(f"the pytest plugin did not switch on (see {output})")
        run.reports += json.loads(report.read_text())["records"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="an unpacked aiosqlite sdist")
    parser.add_argument("--keep", type=Path, help="keep logs and results in this directory")
    args = parser.parse_args()
    import aiosqlite

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        source = (args.source or fetch_sdist("aiosqlite", aiosqlite.__version__, tmp)
                  ).resolve()
        print(f"== aiosqlite {aiosqlite.__version__} tests in {source}")
        plain, sanitized = Run("plain"), Run("sanitized")
        run_once(plain, source, tmp, sanitized=False)
        run_once(sanitized, source, tmp, sanitized=True)
        return verdict(plain, sanitized, source / "aiosqlite" / "tests", {},
                       lambda record: str(record.get("nodeid")))


if __name__ == "__main__":
    sys.exit(main())
