"""Which pytest fixture made an object, and the loop_scope advice for loop violations.

pytest-asyncio runs each test in a loop of its ``loop_scope`` (a new one per
test by default). An object a session-scoped fixture made belongs to the loop it
was made or first used in, and the next test's loop is another: "attached to a
different loop". The owner's context then says which fixture made it, and the
violation gets a hint naming the fixture's scope and loop scope, the test's, and
the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sanitizer.report import Violation


@dataclasses.dataclass(frozen=True)
class Fixture:
    name: str
    scope: str
    #: The scope of the loop an async fixture runs in (None for a plain fixture).
    loop_scope: str | None

    @property
    def phrase(self) -> str:
        loop = f", loop_scope '{self.loop_scope}'" if self.loop_scope else ""
        return f"made by pytest fixture '{self.name}' (scope '{self.scope}'{loop})"


class Fixtures:
    """The fixtures being set up in each thread, and the phrases they left in records."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._by_phrase: dict[str, Fixture] = {}

    @contextlib.contextmanager
    def setting_up(self, fixturedef: Any, config: pytest.Config) -> Iterator[None]:
        stack = self._stack()
        stack.append(_fixture(fixturedef, config))
        try:
            yield
        finally:
            stack.pop()

    def _stack(self) -> list[Fixture]:
        stack: list[Fixture] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def describe(self) -> str | None:
        """A thread describer: the innermost fixture being set up in this thread."""
        stack = getattr(self._local, "stack", None)
        if not stack:
            return None
        fixture: Fixture = stack[-1]
        self._by_phrase.setdefault(fixture.phrase, fixture)
        return fixture.phrase

    def hint(self, violation: Violation, item: pytest.Item) -> str | None:
        """How to fix a loop violation on an object a fixture made, in pytest-asyncio's
        terms; None when no fixture made it."""
        fixture = next((self._by_phrase[c] for c in violation.owner_context
                        if c in self._by_phrase), None)
        if fixture is None or fixture.scope == "function":
            return None
        test_scope = _test_loop_scope(item)
        what = violation.root_type or violation.object_type
        shared = fixture.loop_scope or fixture.scope
        return (f"the {what} was made by fixture '{fixture.name}' (scope '{fixture.scope}'"
                + (f", loop_scope '{fixture.loop_scope}'" if fixture.loop_scope else "")
                + f") and belongs to the loop it first ran in, but this test runs in a "
                f"'{test_scope}'-scoped loop: run the test in that loop "
                f"(@pytest.mark.asyncio(loop_scope=\"{shared}\"), or "
                f"asyncio_default_test_loop_scope = {shared}), or give the fixture "
                f"scope=\"function\"")


def _fixture(fixturedef: Any, config: pytest.Config) -> Fixture:
    func = getattr(fixturedef, "func", None)
    loop_scope = getattr(func, "_loop_scope", None)  # pytest-asyncio's, on async fixtures
    if loop_scope is None and (inspect.iscoroutinefunction(func)
                               or inspect.isasyncgenfunction(func)):
        loop_scope = _ini(config, "asyncio_default_fixture_loop_scope") or None
        if loop_scope in (None, "match_fixture_scope"):
            loop_scope = fixturedef.scope
    return Fixture(fixturedef.argname, str(fixturedef.scope), loop_scope)


def _test_loop_scope(item: pytest.Item) -> str:
    marker = item.get_closest_marker("asyncio")
    if marker is not None:
        scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
        if scope:
            return str(scope)
    return _ini(item.config, "asyncio_default_test_loop_scope") or "function"


def _ini(config: pytest.Config, name: str) -> str | None:
    try:
        value = config.getini(name)
    except ValueError:  # pytest-asyncio is not installed (or too old to know it)
        return None
    return str(value) if value else None
