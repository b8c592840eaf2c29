"""patching: every patch undone exactly, and post-import hooks that never import."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from sanitizer.patching import Patcher, forget, when_imported
from sanitizer.state import STATE


class Target:
    kept = "class value"

    def method(self) -> str:
        return "original"


def test_restore_is_an_exact_inverse() -> None:
    patcher = Patcher()
    assert patcher.replace(Target, "kept", "patched") == "class value"
    patcher.replace(Target, "added", 1)  # did not exist
    patcher.wrap(Target, "method", lambda wrapped, instance, args, kwargs: "wrapped")
    assert (Target.kept, Target.added, Target().method()) == (  # type: ignore[attr-defined]
        "patched", 1, "wrapped")
    patcher.restore()
    assert Target.kept == "class value"
    assert "added" not in vars(Target)
    assert Target().method() == "original" and "method" in vars(Target)


def test_a_hook_runs_when_its_module_is_imported_and_not_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hooked_module_for_test.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[types.ModuleType] = []
    when_imported("hooked_module_for_test", seen.append)
    try:
        assert seen == [] and "hooked_module_for_test" not in sys.modules
        import hooked_module_for_test  # type: ignore[import-not-found]
        assert seen == [hooked_module_for_test]
    finally:
        forget(seen.append)
        sys.modules.pop("hooked_module_for_test", None)
    assert STATE.import_hooks.get("hooked_module_for_test") == []


def test_a_hook_for_a_module_already_imported_runs_at_once() -> None:
    seen: list[types.ModuleType] = []
    when_imported("json", seen.append)
    forget(seen.append)
    assert seen == [sys.modules["json"]]
