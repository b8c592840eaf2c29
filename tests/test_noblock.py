"""The noblock policy: blocking driver calls on a thread whose event loop is running.

Real PostgreSQL and MariaDB servers (tests/dbservers.py), real drivers, real loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import found, in_thread

import sanitizer
from sanitizer.plugin import NOBLOCK, STRICT, Check, Context, Policy, new_record
from sanitizer.state import STATE


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "violations.jsonl"


@pytest.fixture
def start(log_file: Path) -> Iterator[Callable[..., None]]:
    """Enable with these options (the dbapi, sqlite3, duckdb and asyncio plugins)."""
    def enable(**options: Any) -> None:
        if sanitizer.is_enabled():
            sanitizer.disable()
        options.setdefault("plugins", "dbapi+sqlite3+duckdb+asyncio")
        sanitizer.enable(log_file=str(log_file), **options)
    try:
        yield enable
    finally:
        sanitizer.disable()


# -- the core: NOBLOCK.over(policy, kind) composes with any policy's guards ----------------


class CountingPolicy(Policy):
    """An enter/exit policy that counts its calls (its bookkeeping must never be skipped)."""

    name = "counting"

    def __init__(self) -> None:
        self.entered = self.exited = 0

    def enter(self, obj: object, record: Any, operation: str) -> Any:
        self.entered += 1

    def exit(self, obj: object, record: Any, state: Any) -> None:
        self.exited += 1


def guarded_object(policy: Any, kind: str = "network") -> Any:
    """An object whose ``query()`` is guarded by NOBLOCK over ``policy``, and whose
    ``outer()`` calls ``query()`` beneath its own such guard."""
    blocking = NOBLOCK.over(policy, kind)

    class Resource:
        query = Context.guard(blocking, lambda self: "rows", "query", "")
        outer = Context.guard(blocking, lambda self: self.query(), "outer", "")

    obj = Resource()
    obj._sanitizer_record = new_record(obj, policy)  # type: ignore[attr-defined]
    return obj


def on_a_loop(call: Callable[[], Any]) -> Any:
    async def main() -> Any:
        return call()
    return asyncio.run(main())


def test_core_one_report_the_layers_beneath_quiet(start: Callable[..., None]) -> None:
    start(plugins="asyncio")
    obj = guarded_object(STRICT)
    assert obj.outer() == "rows" and sanitizer.violations() == []  # no loop: nothing
    assert on_a_loop(obj.outer) == "rows"
    assert found() == [("noblock", "outer")]  # not again for query() beneath it
    assert on_a_loop(obj.query) == "rows"
    assert found() == [("noblock", "outer"), ("noblock", "query")]
    # The base's own rule still holds after a report: another thread is refused by strict.
    in_thread(obj.query, "other")
    assert found()[-1] == ("strict", "query")


def test_core_the_base_policys_bookkeeping_runs_when_reported(
        start: Callable[..., None]) -> None:
    counting = CountingPolicy()
    start(plugins="asyncio")
    obj = guarded_object(counting)
    on_a_loop(obj.outer)
    assert found() == [("noblock", "outer")]
    assert (counting.entered, counting.exited) == (2, 2)  # outer's and query's, quietly


def test_core_kinds_follow_the_setting(start: Callable[..., None]) -> None:
    start(plugins="asyncio")
    local = guarded_object(STRICT, "local")
    on_a_loop(local.query)
    assert sanitizer.violations() == []  # "local" is off by default
    start(plugins="asyncio", **{"asyncio.noblock": "all"})
    local = guarded_object(STRICT, "local")
    on_a_loop(local.query)
    assert found() == [("noblock", "query")]


def test_core_a_base_with_its_own_verdict_decides_its_own(start: Callable[..., None]) -> None:
    """Over CONCURRENT (its own verdict: only while another thread is inside), a use from
    another thread with nobody inside is allowed, though the record's policy is strict."""
    start(plugins="asyncio")
    concurrent = Check.CONCURRENT.under(STRICT)
    assert concurrent is not None
    obj = guarded_object(concurrent)
    obj._sanitizer_record = guarded_object(STRICT)._sanitizer_record  # a strict record
    in_thread(obj.query, "other")
    assert sanitizer.violations() == []


def test_core_bad_kind_and_excuses(start: Callable[..., None]) -> None:
    with pytest.raises(ValueError, match="sometimes"):
        NOBLOCK.over(STRICT, "sometimes")
    start(plugins="asyncio")
    excused = {"now": True}
    Context.excuse_blocking(lambda: excused["now"])
    obj = guarded_object(STRICT)
    on_a_loop(obj.query)
    assert sanitizer.violations() == []  # the library checks this itself
    excused["now"] = False
    on_a_loop(obj.query)
    assert found() == [("noblock", "query")]
    sanitizer.disable()
    assert STATE.blocking_excuses == []  # restored with the rest of the configuration
