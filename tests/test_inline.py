"""inline.with_prologue: a copy of a method with a check compiled in, or None when not faithful."""

from __future__ import annotations

import asyncio
import functools
import inspect
import traceback
from typing import Any

import pytest
from support import line_of_file

from sanitizer import inline, stacks

CALLS: list[str] = []


def note(obj: object, where: str) -> None:
    CALLS.append(where)


PROLOGUE = "_g_note({self}, 'here')\n"
NAMES = {"_g_note": note}


class Sample:
    """A class whose methods are copied."""

    def plain(self, a: int, b: list[int] | None = None, *rest: int, key: str = "k",
              **more: Any) -> tuple[Any, ...]:
        """Its docstring."""
        return (a, b, rest, key, more)

    def spread(
        self,
        a: int,
    ) -> int:
        total = sum(
            [a,
             1]
        )
        return total

    def fails(this) -> None:  # the first parameter need not be "self"
        raise ValueError("from the original line")  # the raising line

    async def later(self, value: int) -> int:
        await asyncio.sleep(0)
        return value

    def gen(self) -> Any:
        yield 1

    def private(self) -> int:
        return self.__hidden()

    def __hidden(self) -> int:
        return 1

    @functools.lru_cache  # noqa: B019
    def decorated(self) -> int:
        return 1


def copy_of(name: str) -> Any:
    return inline.with_prologue(vars(Sample)[name], PROLOGUE, NAMES)


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    CALLS.clear()


def test_the_copy_runs_the_prologue_then_the_method_with_its_own_signature() -> None:
    copy = copy_of("plain")
    original = vars(Sample)["plain"]
    assert inspect.signature(copy) == inspect.signature(original)
    assert copy.__defaults__ is original.__defaults__
    assert copy.__kwdefaults__ is original.__kwdefaults__
    assert (copy.__name__, copy.__qualname__, copy.__doc__, copy.__module__) == (
        "plain", "Sample.plain", "Its docstring.", __name__)
    assert copy.__wrapped__ is original
    assert copy(Sample(), 1, None, 2, 3, key="x", z=4) == (1, None, (2, 3), "x", {"z": 4})
    assert CALLS == ["here"]


def test_multi_line_signatures_and_statements_are_copied_whole() -> None:
    copy = copy_of("spread")
    assert copy is not None and copy(Sample(), 2) == 3 and CALLS == ["here"]


def test_tracebacks_name_the_original_file_and_line() -> None:
    copy = copy_of("fails")
    with pytest.raises(ValueError) as caught:
        copy(Sample())
    frame = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert frame.filename == __file__
    assert frame.lineno == line_of_file(__file__, "# the raising line")
    assert CALLS == ["here"]  # the first parameter's own name was used


def test_a_coroutine_runs_its_prologue_when_awaited() -> None:
    copy = copy_of("later")
    coroutine = copy(Sample(), 5)
    assert CALLS == []  # made, not yet awaited
    assert asyncio.run(coroutine) == 5
    assert CALLS == ["here"]


@pytest.mark.parametrize("name", ["gen", "private", "decorated"])
def test_what_cannot_be_copied_faithfully_is_refused(name: str) -> None:
    func = vars(Sample)[name]
    assert inline.with_prologue(func, PROLOGUE, NAMES) is None


def test_closures_code_without_source_and_our_own_names_are_refused() -> None:
    outer = 1

    def closure(self: object) -> int:
        return outer

    namespace: dict[str, Any] = {}
    exec("def made(self):\n    return 1\n", namespace)  # no file to read

    def ours(self: object) -> int:
        _g_mine = 1
        return _g_mine

    for func in (closure, namespace["made"], ours, len):
        assert inline.with_prologue(func, PROLOGUE, NAMES) is None


def test_the_fallback_wrapper_runs_the_same_prologue_then_the_function() -> None:
    outer = 10

    def closure(self: object, a: int, *, b: int = 1) -> int:
        return outer + a + b

    assert inline.with_prologue(closure, PROLOGUE, NAMES) is None
    wrapper = inline.wrapped_with_prologue(closure, PROLOGUE, NAMES)
    assert (wrapper.__name__, wrapper.__wrapped__) == ("closure", closure)
    assert wrapper(object(), 2, b=3) == 15
    assert CALLS == ["here"]
    assert wrapper.__code__.co_filename == stacks.GUARD_FILENAME  # never a report's site
