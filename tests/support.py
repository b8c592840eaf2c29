"""Helpers for the test suite: run real programs under the sanitizer and read their records."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

    from sanitizer.ownership import OwnerRecord

Records = list[dict[str, Any]]


def run_program(tmp_path: Path, source: str, env_value: str | None = "1", *,
                args: list[str] | None = None, extra_options: str = "",
                timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], Records]:
    """Run ``source`` as a script with SANITIZE_THREADS set; return the process and JSON records."""
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(source))
    log = tmp_path / "violations.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    if env_value is not None:
        value = env_value if env_value not in ("1", "") else ""
        items = [i for i in (value, f"log_file={log}", extra_options) if i]
        env["SANITIZE_THREADS"] = ",".join(items)
    command = args if args is not None else [sys.executable, str(script)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, read_records(log)


def read_records(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "thread_affinity_violation"]


def line_of(source: str, marker: str) -> int:
    """1-based line number of the line containing ``# marker`` in dedented source."""
    for number, line in enumerate(textwrap.dedent(source).splitlines(), 1):
        if f"# {marker}" in line:
            return number
    raise AssertionError(f"marker {marker!r} not in source")


def started(target: Callable[[], Any], name: str = "other"
            ) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``target`` in a thread; the dict gets its result ("value") or exception ("error")."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = target()
        except BaseException as exc:
            outcome["error"] = exc
    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, outcome


def in_thread(target: Callable[[], Any], name: str = "other") -> Any:
    """Run ``target`` in a new thread; return its result or re-raise its exception."""
    thread, outcome = started(target, name)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# -- positive controls: a silence test shows that the sanitizer was watching ---------------


def tracked(obj: object) -> OwnerRecord:
    """The owner record of ``obj``; fails if it is not tracked (a silence test could not fail)."""
    from sanitizer.ownership import record_of

    record = record_of(obj)
    assert record is not None, f"{obj!r} is not tracked"
    return record


def only() -> Any:
    """The one distinct violation the running sanitizer has seen (fails on none or more)."""
    import sanitizer

    violations = sanitizer.violations()
    assert len(violations) == 1, [v.message for v in violations]
    return violations[0]


def line_in(path: str | Path, frame: Any) -> int:
    """The line of a captured frame (a report's site), which must be in ``path``."""
    from sanitizer import stacks

    where, number = stacks.location(frame)
    assert where == str(path), where
    return number


def found() -> list[tuple[str, str]]:
    """(policy, operation) of each distinct violation the running sanitizer has seen."""
    import sanitizer

    return [(v.policy, v.operation) for v in sanitizer.violations()]


@contextlib.contextmanager
def held(call: Callable[[Callable[[], int]], object], name: str = "holder"
         ) -> Iterator[threading.Thread]:
    """Run the block while a thread ``name`` is inside a call on some object.

    ``call(wait)`` runs in that thread and must call ``wait()`` from inside the call
    it holds; ``wait`` returns 1 once the block is over. Events only, no sleeps: the
    block starts once the holder is inside, and the holder is joined after it; what
    the holder raised is raised here.
    """
    inside, release, settled = threading.Event(), threading.Event(), threading.Event()

    def wait() -> int:
        inside.set()
        settled.set()
        assert release.wait(30), "the holder was never released"
        return 1

    def run() -> object:
        try:
            return call(wait)
        finally:
            settled.set()  # also when it failed before getting inside

    thread, outcome = started(run, name)
    try:
        assert settled.wait(30), "the holder never got inside"
        if not inside.is_set():
            thread.join()
            raise outcome.get("error") or AssertionError("the holder returned without waiting")
        yield thread
    finally:
        release.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]


def inside_query(conn: Any, name: str = "holder") -> contextlib.AbstractContextManager[Any]:
    """``held`` for a sqlite3 connection: thread ``name`` is inside ``conn.execute()``.

    The holder uses ``conn`` itself (it registers a waiting SQL function and runs a
    query calling it), so ``conn`` must allow that thread: an exclusive connection
    (check_same_thread=False), or one that ``name``'s thread owns. A statement on
    ``conn`` from the block would wait for SQLite's connection mutex: stop it with
    ``raising()``, or misuse it in a way that does not block (setting an option).
    """
    def query(wait: Callable[[], int]) -> object:
        conn.create_function("held_by_test", 0, wait)
        return conn.execute("select held_by_test()").fetchall()
    return held(query, name)


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """Switch the running sanitizer to action=log+raise for the block (fresh options).

    A misuse that would otherwise wait for a lock the holder keeps (SQLite's
    connection mutex, a server connection's socket) is stopped before the library.
    """
    from sanitizer import control

    running = control.running()
    assert running is not None
    options = running.options
    running.options = running.reporter.options = options.replace(action="log+raise")
    try:
        yield
    finally:
        running.options = running.reporter.options = options


def pytester_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, helpers: str,
                   *ini_lines: str) -> pytest.Pytester:
    """A pytester directory with ``helpers.py``, an ini file, and no sanitizer, xdist or
    PYTEST_ADDOPTS settings inherited from the environment this suite runs in."""
    for name in list(os.environ):
        if name.startswith(("SANITIZE_THREADS", "PYTEST_XDIST", "PYTEST_ADDOPTS")):
            monkeypatch.delenv(name)
    pytester.makepyfile(helpers=helpers)
    make_ini(pytester, *ini_lines)
    return pytester


def make_ini(pytester: pytest.Pytester, *lines: str) -> None:
    """The pytester run's ini file; pytest-asyncio's default loop scope set, if installed."""
    import importlib.util

    if importlib.util.find_spec("pytest_asyncio") is not None:
        lines += ("asyncio_default_fixture_loop_scope = function",)
    pytester.makeini("\n".join(("[pytest]", *lines, "")))


def line_of_file(path: str | Path, marker: str) -> int:
    """The line of a file that ends with ``marker`` (for tests that mark their own lines)."""
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.rstrip().endswith(marker):
            return number
    raise AssertionError(marker)
