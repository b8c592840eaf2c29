"""Who may import whom: library plugins only the plugin API, the core no plugin.

Read from the installed package's source with ``ast``, so that a new plugin or
core module is checked without being listed here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import sanitizer
import sanitizer.plugins

CORE = Path(sanitizer.__file__).parent
PLUGINS = Path(sanitizer.plugins.__file__).parent
# Not library plugins: the registry, and the pytest integration (a runner, which
# drives the sanitizer itself).
NOT_LIBRARY_PLUGINS = {"__init__", "pytest_plugin"}


def imports(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (``from a import b`` gives a.b
    too, since b may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def library_plugins() -> list[Path]:
    return sorted(p for p in PLUGINS.glob("*.py") if p.stem not in NOT_LIBRARY_PLUGINS)


def test_there_are_library_plugins_to_check() -> None:
    assert {p.stem for p in library_plugins()} >= {"sqlite3", "dbapi", "django", "sqlalchemy"}


@pytest.mark.parametrize("path", library_plugins(), ids=lambda p: p.stem)
def test_a_library_plugin_imports_only_the_plugin_api_and_the_standard_library(
        path: Path) -> None:
    bad = set()
    for name in imports(path):
        top = name.partition(".")[0]
        if top == "sanitizer":
            if not (name == "sanitizer.plugin" or name.startswith("sanitizer.plugin.")):
                bad.add(name)
        elif top not in sys.stdlib_module_names and top != "__future__":
            bad.add(name)  # the library itself is never imported: hooks receive it
    assert bad == set(), f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.stem)
def test_the_core_reaches_plugins_only_through_the_registry(path: Path) -> None:
    # The registry is the package sanitizer.plugins (its built-in list and the
    # entry points); no core module imports a plugin module itself.
    bad = {name for name in imports(path)
           if name.startswith("sanitizer.plugins.") and name != "sanitizer.plugins.load"}
    assert bad == set(), f"{path.name} imports {sorted(bad)}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    # What the two checks above look for, in a source that has it.
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from sanitizer.policies import STRICT_POLICY\n"
                      "import sanitizer.plugins.sqlite3\n")
    assert imports(source) >= {"sanitizer.policies.STRICT_POLICY", "sanitizer.plugins.sqlite3"}
