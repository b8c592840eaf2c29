"""Cheap stack capture (code objects and line numbers), formatting, and frame filtering."""

from __future__ import annotations

import dataclasses
import linecache
import os
import site
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from types import CodeType, FrameType

import wrapt

from sanitizer.state import STATE

# (code, bytecode offset): the line number is looked up only when a report needs
# it. Reading ``f_lineno`` walks the code's line table on every capture.
Frame = tuple[CodeType, int]
Stack = tuple[Frame, ...]

GUARD_FILENAME = "<sanitizer-guard>"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_WRAPT_DIR = os.path.dirname(os.path.abspath(wrapt.__file__)) + os.sep
# For warnings.warn(skip_file_prefixes=...): a warning about the user's call
# names the user's line, not the wrapper that passed it on.
INTERNAL_DIRS = (_PACKAGE_DIR, _WRAPT_DIR)
# What capture() does with a frame, by file name: str caches its hash (a code
# object recomputes its own on every lookup), and one lookup per frame decides.
# (STATE.kinds caches it per file name.) Instrumented libraries' frames
# (STATE.library_prefixes) stay in stacks but are skipped when choosing the
# *site* of an access, so that reports and dedup point at the user's line, not
# at django/db/.... Capture stops at the first frame of a program's runner
# (STATE.boundaries: pytest, pluggy): nothing above it is about the object, and
# walking it costs microseconds per tracked object in a test suite's deep stacks.
# importlib's bootstrap frames are left out as INTERNAL ones are (CPython's
# tracebacks drop them too): an import says nothing about the object.
USER, INTERNAL, BOUNDARY = 0, 1, 2

#: The pseudo file names of importlib's frozen bootstrap (3.11+; ``<frozen
#: importlib._bootstrap_external>`` too), left out of stacks.
IMPORTLIB_BOOTSTRAP = "<frozen importlib._bootstrap"
#: Frozen standard-library modules (``<frozen runpy>``, ``<frozen os>``): library code.
FROZEN = "<frozen "


def kind_of(filename: str) -> int:
    """INTERNAL for the sanitizer's own files (core, plugins, generated guards), wrapt's
    and importlib's bootstrap, BOUNDARY for a registered runner's, USER for the rest
    (cached)."""
    try:
        return STATE.kinds[filename]
    except KeyError:
        if filename == GUARD_FILENAME or filename.startswith(INTERNAL_DIRS) \
                or filename.startswith(IMPORTLIB_BOOTSTRAP):
            kind = INTERNAL
        elif filename.startswith(tuple(STATE.boundaries)):
            kind = BOUNDARY
        else:
            kind = USER
        STATE.kinds[filename] = kind
        return kind


def is_internal(code: CodeType) -> bool:
    """True for frames stacks leave out: the sanitizer's own (core, plugins, generated
    guards), wrapt's and importlib's bootstrap."""
    return kind_of(code.co_filename) == INTERNAL


def add_boundary(directory: str) -> None:
    """Stop stack capture at frames from files under ``directory`` (a runner's package)."""
    directory = os.path.join(os.path.abspath(directory), "")
    if directory not in STATE.boundaries:
        STATE.boundaries.append(directory)
        STATE.kinds.clear()


def capture(limit: int, frame: FrameType | None = None) -> Stack:
    """The caller's stack, innermost first, without the frames ``is_internal`` leaves out.

    Stops at the first frame of a registered runner once it has the user's frames.
    At most ``limit`` frames, and the first frame of the user's code among them however
    deep the library calls above it: when the limit is reached before it, the stack is
    the innermost ``limit - 1`` frames and then that one.
    """
    if frame is None:
        frame = sys._getframe(1)
    frames: list[Frame] = []
    kinds = STATE.kinds
    while frame is not None:  # runs for every tracked object made: kept lean
        code = frame.f_code
        kind = kinds.get(code.co_filename)
        if kind is None:
            kind = kind_of(code.co_filename)
        if kind != INTERNAL:
            if kind == BOUNDARY and frames:
                return tuple(frames)
            frames.append((code, frame.f_lasti))
            if len(frames) == limit:
                frame = frame.f_back
                break
        frame = frame.f_back
    if frame is not None and frames and all(is_library(code) for code, _ in frames):
        # A deep library stack (an ORM call reaching the driver, an import in
        # django.setup()) filled the limit before the user's frame: walk on to the
        # innermost one, so that the site is theirs.
        while frame is not None:
            code = frame.f_code
            kind = kind_of(code.co_filename)
            if kind == BOUNDARY:
                break
            if kind == USER and not is_library(code):
                del frames[max(limit - 1, 0):]
                frames.append((code, frame.f_lasti))
                break
            frame = frame.f_back
    return tuple(frames)


def frames_of(frame: FrameType | None) -> Iterator[FrameType]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def add_library(module_prefix: str) -> None:
    """Mark a library's modules so that sites skip past them to the user's code.

    A prefix starting with ``<`` matches the pseudo filename of code the library
    generates at run time (``<sqlalchemy generated`` ...) instead of a module.
    """
    if module_prefix.startswith("<"):
        prefixes: tuple[str, ...] = (module_prefix,)
    else:
        path = module_prefix.replace(".", os.sep)
        prefixes = (os.sep + path + os.sep, os.sep + path + ".py")
    for prefix in prefixes:
        if prefix not in STATE.library_prefixes:
            STATE.library_prefixes.append(prefix)
            STATE.library_cache.clear()


def _installed_dirs() -> tuple[str, ...]:
    """The standard library's and site-packages' directories: code the user did not write."""
    paths = sysconfig.get_paths()
    found = [paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    found += getattr(site, "getsitepackages", list)()
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    dirs: list[str] = []
    for path in filter(None, found):
        for form in (os.path.abspath(path), os.path.realpath(path)):
            form = os.path.join(form, "")
            if form not in dirs:
                dirs.append(form)
    return tuple(dirs)


# Frames in these count as library frames even when no plugin names them: the
# summary line and the dedup key then name the first line of the user's code.
INSTALLED_DIRS = _installed_dirs()
# library_of names a file by the most specific of them (site-packages inside stdlib's).
_INSTALLED_LONGEST_FIRST = sorted(INSTALLED_DIRS, key=len, reverse=True)


def is_library_file(filename: str) -> bool:
    """Whether a frame's file is a library's: the standard library (frozen modules
    included), site-packages, or an instrumented library's (STATE.library_prefixes)."""
    return filename.startswith(INSTALLED_DIRS) or filename.startswith(FROZEN) or any(
        prefix in filename for prefix in STATE.library_prefixes)


def is_library(code: CodeType) -> bool:
    filename = code.co_filename
    try:
        return STATE.library_cache[filename]
    except KeyError:
        found = STATE.library_cache[filename] = is_library_file(filename)
        return found


def line_of(frame: Frame) -> int:
    """The source line of a captured frame (what ``f_lineno`` said when it was taken)."""
    code, offset = frame
    if offset >= 0:
        for start, end, line in code.co_lines():
            if start <= offset < end:
                return code.co_firstlineno if line is None else line
    return code.co_firstlineno


def location(frame: Frame | None) -> tuple[str, int]:
    """``(filename, line)`` of a captured frame, for warnings and suppressions."""
    if frame is None:
        return ("<unknown>", 0)
    return (frame[0].co_filename, line_of(frame))


def site_of(stack: Stack) -> Frame | None:
    """The frame a report is about: the innermost frame outside libraries (instrumented
    ones, the standard library and site-packages), else the innermost frame."""
    for frame in stack:
        if not is_library(frame[0]):
            return frame
    return stack[0] if stack else None


def frame_dict(frame: Frame) -> dict[str, object]:
    code = frame[0]
    return {"file": code.co_filename, "line": line_of(frame), "function": code.co_qualname
            if hasattr(code, "co_qualname") else code.co_name}


def as_dicts(stack: Iterable[Frame]) -> list[dict[str, object]]:
    return [frame_dict(frame) for frame in stack]


def describe_site(frame: Frame | None) -> str:
    if frame is None:
        return "<unknown>"
    info = frame_dict(frame)
    return f"{info['file']}:{info['line']} in {info['function']}"


# -- reading stacks back (the console report, logs.py, the HTML report) -----------------


def library_of(filename: str) -> str | None:
    """The name of the library a frame's file belongs to ("django", "the standard
    library"), or None for the user's own code."""
    if not is_library_file(filename):
        return None
    if filename.startswith(FROZEN):
        return STDLIB
    for base in _INSTALLED_LONGEST_FIRST:
        if filename.startswith(base):
            parts = filename[len(base):].split(os.sep)
            if "site-packages" in base or "dist-packages" in base:
                return parts[0].removesuffix(".py")
            if len(parts) > 1 and parts[0] in ("site-packages", "dist-packages"):
                return parts[1].removesuffix(".py")  # the base interpreter's
            return STDLIB
    for prefix in STATE.library_prefixes:
        if prefix in filename:
            name = prefix.strip(os.sep + "<").split(os.sep)[0].split()[0]
            return name.removesuffix(".py")
    return "a library"


STDLIB = "the standard library"


#: Library runs longer than this are folded by renderers.
FOLD_OVER = 2


@dataclasses.dataclass
class Run:
    """Consecutive frames of one library (``library``), or of the user's code (None)."""

    library: str | None
    frames: list[dict[str, object]]


def fold(stack: Sequence[dict[str, object]]) -> list[Run]:
    """A stack (frame dicts, innermost first) as runs of user frames (``library`` None)
    and of one library's frames: renderers show a library run of more than FOLD_OVER
    frames folded, as its first frame and "... 7 frames in django"."""
    runs: list[Run] = []
    for frame in stack:
        library = library_of(str(frame.get("file", "")))
        if runs and runs[-1].library == library:
            runs[-1].frames.append(frame)
        else:
            runs.append(Run(library, [frame]))
    return runs


def source_lines(filename: str, line: int, context: int = 0) -> list[tuple[int, str]]:
    """``(number, text)`` of ``line`` and ``context`` lines either side, read from the
    file if it exists here (empty when it does not: a log read on another machine)."""
    if not filename or filename.startswith("<") or line <= 0:
        return []
    found = []
    for number in range(max(1, line - context), line + context + 1):
        text = linecache.getline(filename, number)
        if not text and number >= line:
            break
        found.append((number, text.rstrip("\n")))
    return found if any(n == line for n, _ in found) else []
