"""stacks: cheap capture, the sanitizer's own frames left out, sites past library frames."""

from __future__ import annotations

import contextlib
import os
import sysconfig
from pathlib import Path

from sanitizer import stacks
from sanitizer.state import STATE

HERE = str(Path(__file__).resolve())


def inner(depth: int = 16) -> stacks.Stack:
    return stacks.capture(depth)  # line: inner


def outer() -> stacks.Stack:
    return inner()


def test_capture_is_innermost_first_with_offsets_and_lines() -> None:
    stack = outer()
    assert [code.co_name for code, _ in stack[:2]] == ["inner", "outer"]
    assert stacks.location(stack[0]) == (HERE, line_of("line: inner"))
    assert all(isinstance(offset, int) for _, offset in stack)


def test_capture_stops_at_the_limit() -> None:
    assert len(inner(1)) == 1


def test_the_sanitizers_own_frames_are_left_out() -> None:
    assert stacks.kind_of(stacks.GUARD_FILENAME) == stacks.INTERNAL
    assert stacks.kind_of(stacks.__file__) == stacks.INTERNAL
    assert stacks.kind_of(HERE) == stacks.USER


def test_a_boundary_stops_capture_once_it_has_user_frames(tmp_path: Path) -> None:
    saved = STATE.save()
    try:
        stacks.add_boundary(os.path.dirname(contextlib.__file__))
        # contextlib's frames are above ours here: capture stops there.
        with contextlib.ExitStack() as stack:
            frames = stack.enter_context(_capture_inside())
        assert all(code.co_filename != contextlib.__file__ for code, _ in frames)
    finally:
        STATE.restore(saved)
    assert STATE.boundaries == saved["boundaries"]


@contextlib.contextmanager
def _capture_inside() -> object:
    yield outer()


def test_sites_pass_over_library_frames() -> None:
    stdlib = os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py")
    assert stacks.is_library_file(stdlib)
    assert not stacks.is_library_file(HERE)
    library = compile("", stdlib, "exec")
    user = compile("", HERE, "exec")
    assert stacks.site_of(((library, 0), (user, 0))) == (user, 0)
    assert stacks.site_of(((library, 0),)) == (library, 0)  # nothing else: the innermost
    assert stacks.site_of(()) is None


def test_add_library_skips_a_plugins_library(tmp_path: Path) -> None:
    path = str(tmp_path / "mylib" / "core.py")
    saved = STATE.save()
    try:
        assert not stacks.is_library_file(path)
        stacks.add_library("mylib")
        assert stacks.is_library_file(path)
    finally:
        STATE.restore(saved)
    assert not stacks.is_library_file(path)


def test_frame_dicts_name_file_line_and_function() -> None:
    frame = outer()[0]
    assert stacks.frame_dict(frame) == {"file": HERE, "line": line_of("line: inner"),
                                        "function": "inner"}
    assert stacks.describe_site(frame) == f"{HERE}:{line_of('line: inner')} in inner"
    assert stacks.describe_site(None) == "<unknown>"


def line_of(marker: str) -> int:
    for number, line in enumerate(Path(HERE).read_text().splitlines(), 1):
        if line.rstrip().endswith(marker) and "line_of" not in line:
            return number
    raise AssertionError(marker)
