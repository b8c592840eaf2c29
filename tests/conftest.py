"""Shared fixtures: an enabled sanitizer per test, and throwaway database servers (dbservers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sanitizer

pytest_plugins = ["dbservers"]


@pytest.fixture(autouse=True)
def _leaves_no_sanitizer_state() -> Iterator[None]:
    """Every test leaves the sanitizer's state (sanitizer.state) as it found it:
    disable() is the exact inverse of enable(), plugins' registrations included."""
    import sqlite3
    import threading

    import sanitizer.control  # noqa: F401 - the built-in policies are registered on import
    from sanitizer.state import STATE

    before = STATE.configuration()
    patched = (sqlite3.connect, threading.Thread.start)
    yield
    assert STATE.configuration() == before, "sanitizer state left behind"
    assert (sqlite3.connect, threading.Thread.start) == patched, "patches left behind"


class Sanitized:
    """The sanitizer running for one test, logging JSON lines to a file."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def records(self) -> list[dict[str, Any]]:
        from support import read_records

        return read_records(self.log)

    def policies(self) -> list[str]:
        return [v.policy for v in sanitizer.violations()]


@pytest.fixture
def sanitized(tmp_path: Path) -> Iterator[Sanitized]:
    """Enable the sanitizer (action=log, JSON to a file) for one test."""
    if sanitizer.is_enabled():  # started by the environment: tests need their own
        sanitizer.disable()
    log = tmp_path / "violations.jsonl"
    sanitizer.enable(log_file=str(log))
    try:
        yield Sanitized(log)
    finally:
        sanitizer.disable()


@pytest.fixture
def enable(tmp_path: Path) -> Iterator[Any]:
    """Enable with custom options: ``enable(action="raise")``; disabled after the test."""
    def start(**options: Any) -> Sanitized:
        if sanitizer.is_enabled():
            sanitizer.disable()
        log = tmp_path / "violations.jsonl"
        options.setdefault("log_file", str(log))
        sanitizer.enable(**options)
        return Sanitized(log)
    try:
        yield start
    finally:
        sanitizer.disable()
