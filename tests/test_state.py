"""state: all global state in one place; enable() and disable() exact inverses of each other."""

from __future__ import annotations

import os

import pytest
from conftest import Sanitized

import sanitizer
from sanitizer import threads
from sanitizer.state import STATE


def test_save_and_restore_round_trip() -> None:
    saved = STATE.save()
    STATE.library_prefixes.append("/somewhere/")
    STATE.describers.append(lambda: "a phrase")
    STATE.kinds["cached.py"] = 0
    STATE.restore(saved)
    assert STATE.save() == saved
    assert "cached.py" not in STATE.kinds  # caches of what changed are dropped


def test_enable_then_disable_leaves_the_configuration_as_it_was() -> None:
    before = STATE.configuration()
    sanitizer.enable(plugins="sqlite3+dbapi+django+sqlalchemy")
    import sqlite3  # noqa: F401

    import django.db.backends.base.base  # noqa: F401 - the django plugin's hooks fire
    during = STATE.configuration()
    assert during["running"] is not None and during["sink"] is not None
    assert "transaction" in during["policies"]  # dbapi's, while it runs
    assert during["library_prefixes"] != before["library_prefixes"]
    sanitizer.disable()
    assert STATE.configuration() == before


def test_the_running_sanitizer_lives_in_the_state(sanitized: Sanitized) -> None:
    from sanitizer import control

    assert control.running() is STATE.running is not None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_one_fork_handler_renews_the_child(sanitized: Sanitized) -> None:
    parent = threads.current()
    reporter = STATE.running.reporter  # type: ignore[union-attr]
    reporter.dedup.total = 3  # the parent's count
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = (threads.current() is not parent and threads.current().serial == 0
              and reporter.total == 0 and len(STATE.tokens) == 1)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert reporter.total == 3
    reporter.dedup.total = 0
