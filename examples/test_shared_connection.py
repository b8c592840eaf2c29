"""A test that passes on its own and fails under ``pytest --sanitize-threads``.

The audit writer runs in a background thread and uses the connection the test
made. sqlite3 refuses (check_same_thread), the writer logs the error and goes on,
so the audit row is silently lost and the test stays green. The sanitizer fails
the test and names the two threads and the two lines::

    pytest examples/test_shared_connection.py --sanitize-threads
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.execute("create table if not exists audit (event text)")

    def write_later(self, event: str) -> threading.Thread:
        """Write in the background, so that requests are not slowed down."""
        def write() -> None:
            try:
                self.conn.execute("insert into audit values (?)", (event,))  # wrong thread
            except sqlite3.Error:
                log.exception("audit write failed")  # and nobody looks at the log

        thread = threading.Thread(target=write, name="audit-writer")
        thread.start()
        return thread


def login(conn: sqlite3.Connection, audit: AuditLog, user: str) -> bool:
    conn.execute("create table if not exists users (name text)")
    conn.execute("insert into users values (?)", (user,))
    audit.write_later(f"login {user}").join()
    return True


def test_login() -> None:
    conn = sqlite3.connect(":memory:")  # owned by the test's thread
    assert login(conn, AuditLog(conn), "ada")
    assert conn.execute("select count(*) from users").fetchone() == (1,)
