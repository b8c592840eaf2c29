"""suppressions: the rule file's grammar, and which stack each kind of rule reads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sanitizer import stacks
from sanitizer.exceptions import ConfigError
from sanitizer.report import Violation
from sanitizer.suppressions import RULE_KINDS, load_suppressions


def frame(filename: str, function: str = "f") -> stacks.Frame:
    code = compile("", filename, "exec").replace(co_name=function)
    if sys.version_info >= (3, 11):
        code = code.replace(co_qualname=function)
    return (code, -1)


def violation(access: str, creation: str, **fields: object) -> Violation:
    values: dict[str, object] = dict(
        policy="strict", object_type="sqlite3.Connection", object_id=1, operation="execute",
        owner_thread={}, thread={}, pid=1, owner_pid=1,
        creation_stack=(frame(creation, "make"),), access_stack=(frame(access, "use"),),
        message="")
    values.update(fields)
    return Violation(**values)  # type: ignore[arg-type]


def rules(tmp_path: Path, text: str) -> list:  # type: ignore[type-arg]
    path = tmp_path / "rules.txt"
    path.write_text(text)
    return load_suppressions(str(path))


def test_each_kind_reads_its_stack(tmp_path: Path) -> None:
    v = violation("/app/views.py", "/lib/pool.py")
    [access, creation, either] = rules(tmp_path, "access-site:*/views.py\n"
                                                 "creation-site:*/pool.py\nsite:*/pool.py\n")
    assert access.matches(v) and creation.matches(v) and either.matches(v)
    [wrong_access, wrong_creation] = rules(tmp_path, "access-site:*/pool.py\n"
                                                     "creation-site:*/views.py\n")
    assert not wrong_access.matches(v) and not wrong_creation.matches(v)


def test_functions_objects_policies_and_lines(tmp_path: Path) -> None:
    v = violation("/app/views.py", "/lib/pool.py")
    matching = rules(tmp_path, "access-function:use\ncreation-function:make\n"
                               "object:sqlite3.*\npolicy:str*\nfunction:make\n")
    assert all(rule.matches(v) for rule in matching)
    [line] = rules(tmp_path, "access-site:/app/views.py:7\n")
    assert (line.pattern, line.line) == ("/app/views.py", 7)
    assert not line.matches(v)  # the frame is at line 0 (offset -1: co_firstlineno)


def test_bad_rules_name_the_file_line_and_the_kinds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules.txt:2: bad rule 'sight:x'.*access-site"):
        rules(tmp_path, "# fine\nsight:x\n")
    with pytest.raises(ConfigError, match="cannot read file"):
        load_suppressions(str(tmp_path / "missing.txt"))
    assert "access-site" in RULE_KINDS and "site" in RULE_KINDS


def test_a_rule_prints_as_written(tmp_path: Path) -> None:
    [rule] = rules(tmp_path, "  access-site:a/b.py:12   # why\n")
    assert str(rule) == "access-site:a/b.py:12" and rule.origin.endswith("rules.txt:1")
