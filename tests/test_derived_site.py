"""The derived object's own site: a DB-API cursor's report names where the cursor was made
(``derived_site``) beside its connection's creation stack; sqlite3's cursors, which share
their connection's record, name the connection's only."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import in_thread, line_of_file

import sanitizer
from sanitizer import stacks

TIMEOUT = 30


@pytest.fixture
def psycopg2(postgresql_server: Any, tmp_path: Path) -> Iterator[Any]:
    module = pytest.importorskip("psycopg2")
    sanitizer.enable(plugins="dbapi", action="raise", log_file=str(tmp_path / "log.jsonl"))
    try:
        yield module
    finally:
        sanitizer.disable()


def _waiting_on_lock(watcher: Any, pid: int) -> bool:
    with watcher.cursor() as cur:
        cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
        found = cur.fetchone()
    return found is not None and found[0] == "Lock"


def test_a_cursor_used_by_two_threads_names_where_it_was_made(
        psycopg2: Any, postgresql_server: Any) -> None:
    kwargs = postgresql_server.kwargs
    blocker = psycopg2.connect(**kwargs)  # holds the lock the cursor's query waits for
    blocker.autocommit = True
    blocker.cursor().execute("SELECT pg_advisory_lock(4711)")
    conn = psycopg2.connect(**kwargs)  # connection made
    conn.autocommit = True
    cur = conn.cursor()  # cursor made
    inside = threading.Thread(target=lambda: cur.execute("SELECT pg_advisory_lock(4711)"),
                              name="holder")
    inside.start()
    watcher = psycopg2.connect(**kwargs)
    watcher.autocommit = True
    try:
        # Until the holder's query waits on the lock, inside cur.execute (a condition, not
        # a timing: each look is a query).
        for _ in range(10_000):
            if _waiting_on_lock(watcher, conn.get_backend_pid()):
                break
        else:
            raise AssertionError("the holder never waited on the lock")
        raised = in_thread(lambda: _intrude(cur))
    finally:
        blocker.cursor().execute("SELECT pg_advisory_unlock(4711)")
        inside.join(TIMEOUT)
        for c in (watcher, blocker, conn):
            c.close()
    assert isinstance(raised, sanitizer.ThreadAffinityError)
    violation = raised.violation
    assert violation.policy == "exclusive"
    here = __file__
    assert stacks.location(violation.creation_site) == (here, line_of_file(here,
                                                                           "# connection made"))
    assert stacks.location(violation.derived_site) == (here, line_of_file(here,
                                                                          "# cursor made"))
    event = violation.event()
    assert event["derived_site"]["line"] == line_of_file(here, "# cursor made")
    assert event["derived_site"]["function"] == (
        "test_a_cursor_used_by_two_threads_names_where_it_was_made")


def _intrude(cur: Any) -> Any:
    try:
        cur.execute("SELECT 1")
    except sanitizer.ThreadAffinityError as exc:
        return exc
    return None


def test_sqlite3_cursors_share_their_connections_site(tmp_path: Path) -> None:
    sanitizer.enable(log_file=str(tmp_path / "log.jsonl"))
    try:
        conn = sqlite3.connect(":memory:")
        cur = conn.cursor()

        def use() -> None:
            try:
                cur.execute("select 1")
            except sqlite3.ProgrammingError:
                pass
        in_thread(use)
        (violation,) = sanitizer.violations()
    finally:
        sanitizer.disable()
    assert violation.object_type == "sqlite3.Cursor"
    assert violation.derived_site is None  # no per-cursor cost: the connection's site only
    assert "derived_site" not in violation.event()
