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


# -- stacks that reach the user's code ---------------------------------------------------

STDLIB_FILE = os.path.join(sysconfig.get_paths()["stdlib"], "sanitizer_test_library.py")


def _functions_in(filename: str, source: str) -> dict[str, object]:
    """Functions whose frames carry ``filename``: a library's, or importlib's bootstrap."""
    namespace: dict[str, object] = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


LIBRARY = _functions_in(STDLIB_FILE, """
from sanitizer import stacks

def library(depth, through, limit):
    if depth == 0:
        return stacks.capture(limit)
    return through(lambda: library(depth - 1, through, limit))
""")
BOOTSTRAP = _functions_in("<frozen importlib._bootstrap>", """
def _call_with_frames_removed(f):
    return f()
""")


def deep_library_call(depth: int, limit: int) -> stacks.Stack:
    through = BOOTSTRAP["_call_with_frames_removed"]
    return LIBRARY["library"](depth, through, limit)  # type: ignore[operator]  # line: user


def user_middle(depth: int, limit: int) -> stacks.Stack:
    return deep_library_call(depth, limit)  # line: user middle


def user_outer(depth: int, limit: int) -> stacks.Stack:
    return user_middle(depth, limit)  # line: user outer


def test_importlibs_bootstrap_frames_are_left_out() -> None:
    assert stacks.kind_of("<frozen importlib._bootstrap>") == stacks.INTERNAL
    assert stacks.kind_of("<frozen importlib._bootstrap_external>") == stacks.INTERNAL
    stack = user_outer(3, 64)
    assert not [c for c, _ in stack if c.co_filename.startswith("<frozen importlib")]
    # The control: those frames are there, between the library's.
    assert BOOTSTRAP["_call_with_frames_removed"].__code__.co_filename == (  # type: ignore[attr-defined]
        "<frozen importlib._bootstrap>")
    assert [stacks.location(f) for f in stack].count((HERE, line_of("line: user middle"))) == 1


def test_a_real_import_leaves_no_importlib_frames(tmp_path: Path) -> None:
    import importlib
    import sys

    (tmp_path / "captures_on_import.py").write_text(
        "from sanitizer import stacks\nSTACK = stacks.capture(16)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("captures_on_import")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("captures_on_import", None)
    files = [code.co_filename for code, _ in module.STACK]
    assert files[0] == str(tmp_path / "captures_on_import.py")
    assert not [f for f in files if f.startswith("<frozen importlib")], files
    assert HERE in files  # this test's own frame, the importer's


def test_the_innermost_user_frame_is_kept_within_the_limit_past_deep_libraries() -> None:
    stack = user_outer(20, 4)
    assert len(stack) == 4
    assert all(stacks.is_library(code) for code, _ in stack[:3])
    # The innermost frame of user code (not the outer ones), right after them.
    assert stacks.location(stack[3]) == (HERE, line_of("line: user"))
    assert stacks.location(stacks.site_of(stack)) == (HERE, line_of("line: user"))


def test_a_limit_of_one_keeps_the_users_frame() -> None:
    (frame,) = user_outer(5, 1)
    assert stacks.location(frame) == (HERE, line_of("line: user"))


def test_a_stack_with_the_user_frame_within_the_limit_is_as_captured() -> None:
    stack = user_outer(1, 16)
    lines = [stacks.location(f) for f in stack]
    first = lines.index((HERE, line_of("line: user")))
    assert all(stacks.is_library(code) for code, _ in stack[:first])
    assert lines[first + 1:first + 3] == [(HERE, line_of("line: user middle")),
                                          (HERE, line_of("line: user outer"))]  # all kept


def test_frozen_modules_and_installed_packages_are_libraries() -> None:
    assert stacks.is_library_file("<frozen runpy>")
    assert stacks.library_of("<frozen runpy>") == "the standard library"
    assert stacks.library_of(STDLIB_FILE) == "the standard library"
    assert stacks.library_of(HERE) is None
    purelib = sysconfig.get_paths()["purelib"]
    assert stacks.library_of(os.path.join(purelib, "django", "db", "utils.py")) == "django"
    assert stacks.library_of(os.path.join(purelib, "six.py")) == "six"


def test_fold_groups_runs_by_library() -> None:
    purelib = sysconfig.get_paths()["purelib"]
    django = [{"file": os.path.join(purelib, "django", f"m{i}.py"), "line": 1,
               "function": "f"} for i in range(3)]
    user = {"file": HERE, "line": 1, "function": "g"}
    runs = stacks.fold([*django, user, {"file": STDLIB_FILE, "line": 2, "function": "h"}])
    assert [(run.library, len(run.frames)) for run in runs] == [
        ("django", 3), (None, 1), ("the standard library", 1)]


def test_source_lines_reads_the_line_and_its_context() -> None:
    number = line_of("line: user outer")
    [(found, text)] = stacks.source_lines(HERE, number)
    assert found == number and text.strip().endswith("# line: user outer")
    around = stacks.source_lines(HERE, number, 1)
    assert [n for n, _ in around] == [number - 1, number, number + 1]
    assert stacks.source_lines("<frozen runpy>", 3) == []
    assert stacks.source_lines("/nonexistent/file.py", 3) == []
