"""Suppression rules: which violations a user has said are known, and how often each matched.

A rule means the same live (a ``Violation``, its captured frames) and after the fact
(a logged event or ``logs.Finding``, its frame dicts ``{file, line, function}``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sanitizer import stacks
from sanitizer.exceptions import ConfigError
from sanitizer.logs import Finding
from sanitizer.options import shown

if TYPE_CHECKING:
    from sanitizer.report import Violation


@dataclasses.dataclass
class Rule:
    """One suppression: ``kind:pattern`` (``site``-like kinds may end in ``:LINE``)."""

    kind: str
    pattern: str
    line: int | None
    origin: str
    hits: int = 0

    def matches(self, violation: Violation | Finding | Mapping[str, Any]) -> bool:
        """Whether this rule covers ``violation``: a live one, or a logged finding or event."""
        try:
            if self.kind == "object":
                return fnmatch.fnmatchcase(violation.object_type, self.pattern)  # type: ignore[union-attr]
            if self.kind == "policy":
                return fnmatch.fnmatchcase(violation.policy, self.pattern)  # type: ignore[union-attr]
            scope, _, what = self.kind.rpartition("-")
            live: Violation = violation  # type: ignore[assignment]
            frames = {"access": live.access_stack, "creation": live.creation_stack,
                      "": (*live.access_stack, *live.creation_stack)}[scope]
            if what == "site":
                return any(self._site_matches(*stacks.location(frame)) for frame in frames)
            return any(fnmatch.fnmatchcase(name, self.pattern)
                       for code, _ in frames for name in _function_names(code))
        except AttributeError:
            # After the fact: an event dict, or a Finding (no stacks of code objects).
            # Told apart by the failing attribute: the live path pays no check for it.
            if isinstance(violation, Finding):
                return self._matches_logged(violation.event)
            if isinstance(violation, dict):
                return self._matches_logged(violation)
            raise

    def _matches_logged(self, event: Mapping[str, Any]) -> bool:
        if self.kind in ("object", "policy"):
            value = event.get("object_type" if self.kind == "object" else "policy")
            return isinstance(value, str) and fnmatch.fnmatchcase(value, self.pattern)
        scope, _, what = self.kind.rpartition("-")
        frames = [frame for name in {"access": ("access",), "creation": ("creation",),
                                     "": ("access", "creation")}[scope]
                  for frame in _logged_frames(event, name)]
        if what == "site":
            return any(self._site_matches(str(frame.get("file", "")), _line(frame))
                       for frame in frames)
        return any(fnmatch.fnmatchcase(name, self.pattern)
                   for frame in frames for name in _logged_function_names(frame))

    def _site_matches(self, filename: str, line: int) -> bool:
        if self.line is not None and self.line != line:
            return False
        return fnmatch.fnmatchcase(filename, self.pattern) or fnmatch.fnmatchcase(
            filename, "*/" + self.pattern.lstrip("/"))

    def __str__(self) -> str:
        return f"{self.kind}:{self.pattern}" + (f":{self.line}" if self.line is not None else "")


# access-*: a frame of the stack that touched the object; creation-*: of the stack
# that made it. site and function match either stack: a rule meant for the line of
# a use also matches every object created there, so the scoped forms are better.
RULE_KINDS = ("access-site", "creation-site", "access-function", "creation-function",
              "object", "policy", "site", "function")


def _function_names(code: Any) -> tuple[str, ...]:
    qualname = getattr(code, "co_qualname", code.co_name)
    module = _module_of(code.co_filename)
    return (qualname, f"{module}.{qualname}") if module else (qualname,)


def _logged_frames(event: Mapping[str, Any], which: str) -> list[Mapping[str, Any]]:
    """A logged stack (the whole captured one, as live rules see it), else its site."""
    stack = event.get(f"{which}_stack")
    if not isinstance(stack, list) or not stack:
        site = event.get(f"{which}_site")
        stack = [site] if isinstance(site, dict) else []
    return [frame for frame in stack if isinstance(frame, dict)]


def _line(frame: Mapping[str, Any]) -> int:
    line = frame.get("line")
    return line if isinstance(line, int) else 0


def _logged_function_names(frame: Mapping[str, Any]) -> set[str]:
    """A logged frame's function, bare and qualified by its module.

    The writing process's sys.path is not in the log: the module is found from
    this one's (with the current directory) and, when the file is here, from the
    packages around it (as Python would name it), either naming it.
    """
    qualname = str(frame.get("function", ""))
    filename = str(frame.get("file", ""))
    names = {qualname}
    for module in (_module_of(filename, (*sys.path, os.getcwd())), _package_module_of(filename)):
        if module:
            names.add(f"{module}.{qualname}")
    return names


def _package_module_of(filename: str) -> str | None:
    """The dotted name of ``filename`` by the ``__init__.py`` files above it, if it exists."""
    if not filename.endswith(".py") or not os.path.isfile(filename):
        return None
    directory, base = os.path.split(os.path.abspath(filename))
    parts = [] if base == "__init__.py" else [base[:-3]]
    while os.path.isfile(os.path.join(directory, "__init__.py")):
        directory, package = os.path.split(directory)
        parts.insert(0, package)
    return ".".join(parts) or None


def _module_of(filename: str, path: Iterable[str] | None = None) -> str | None:
    best = ""
    for entry in sys.path if path is None else path:
        entry = os.path.abspath(entry or ".") + os.sep
        if filename.startswith(entry) and len(entry) > len(best):
            best = entry
    if not best or not filename.endswith(".py"):
        return None
    module = filename[len(best):-3].replace(os.sep, ".")
    return module.removesuffix(".__init__")


#: Line numbers a site rule may name (more digits are a typo, not a line).
MAX_LINE = 10**9


def load_suppressions(path: str) -> list[Rule]:
    """Parse a suppressions file: ``kind:pattern`` per line, ``#`` comments.

    Any fault (unreadable, not UTF-8, a bad rule) is a ConfigError of one line
    naming the file and, for a bad rule, its line.
    """
    # A name with odd characters (a newline, say) is shown escaped: one line.
    where = path if isinstance(path, str) and path.isprintable() else shown(path)
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"suppressions={shown(path)}: cannot read file: {exc.strerror}",
                          key="suppressions", value=path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"suppressions={shown(path)}: not UTF-8 text (byte {exc.start})",
                          key="suppressions", value=path) from None
    except ValueError:  # a NUL byte or a lone surrogate in the name
        raise ConfigError(f"suppressions={shown(path)}: not a file name",
                          key="suppressions", value=path) from None
    rules = []
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        kind, _, pattern = text.partition(":")
        line = None
        if kind.endswith("site"):
            head, sep, tail = pattern.rpartition(":")
            if sep and tail.isascii() and tail.isdigit():
                line = int(tail) if len(tail) < 10 else MAX_LINE
                pattern = head
        if kind not in RULE_KINDS or not pattern or line == MAX_LINE:
            raise ConfigError(
                f"suppressions={where}:{number}: bad rule {shown(text)}; expected KIND:PATTERN "
                f"with KIND one of: {', '.join(RULE_KINDS)}"
                + ("" if line != MAX_LINE else f", and a line number below {MAX_LINE}"),
                key="suppressions", value=text)
        rules.append(Rule(kind, pattern, line, f"{where}:{number}"))
    return rules
