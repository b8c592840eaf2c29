"""Suppression rules: which violations a user has said are known, and how often each matched."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
from typing import TYPE_CHECKING, Any

from sanitizer import stacks
from sanitizer.exceptions import ConfigError

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

    def matches(self, violation: Violation) -> bool:
        if self.kind == "object":
            return fnmatch.fnmatchcase(violation.object_type, self.pattern)
        if self.kind == "policy":
            return fnmatch.fnmatchcase(violation.policy, self.pattern)
        scope, _, what = self.kind.rpartition("-")
        frames = {"access": violation.access_stack, "creation": violation.creation_stack,
                  "": (*violation.access_stack, *violation.creation_stack)}[scope]
        if what == "site":
            return any(self._site_matches(*stacks.location(frame)) for frame in frames)
        return any(fnmatch.fnmatchcase(name, self.pattern)
                   for code, _ in frames for name in _function_names(code))

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


def _module_of(filename: str) -> str | None:
    best = ""
    for entry in sys.path:
        entry = os.path.abspath(entry or ".") + os.sep
        if filename.startswith(entry) and len(entry) > len(best):
            best = entry
    if not best or not filename.endswith(".py"):
        return None
    module = filename[len(best):-3].replace(os.sep, ".")
    return module.removesuffix(".__init__")


def load_suppressions(path: str) -> list[Rule]:
    """Parse a suppressions file: ``kind:pattern`` per line, ``#`` comments."""
    rules = []
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"suppressions={path!r}: cannot read file: {exc.strerror}",
                          key="suppressions", value=path) from None
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        kind, _, pattern = text.partition(":")
        if kind not in RULE_KINDS or not pattern:
            raise ConfigError(
                f"suppressions={path}:{number}: bad rule {text!r}; expected KIND:PATTERN "
                f"with KIND one of: {', '.join(RULE_KINDS)}", key="suppressions", value=text)
        line = None
        if kind.endswith("site"):
            head, sep, tail = pattern.rpartition(":")
            if sep and tail.isdigit():
                pattern, line = head, int(tail)
        rules.append(Rule(kind, pattern, line, f"{path}:{number}"))
    return rules
