"""Built-in plugins, and third-party ones found through the ``sanitizer.plugins`` entry point."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from sanitizer.exceptions import ConfigError

if TYPE_CHECKING:  # importing this package (e.g. for the pytest plugin) stays light
    from sanitizer.options import Options
    from sanitizer.plugin import Plugin

ENTRY_POINT_GROUP = "sanitizer.plugins"

# name -> module in this package whose ``plugin`` attribute is the Plugin.
# Importing these modules never imports the library they instrument.
BUILTIN = {
    "sqlite3": "sanitizer.plugins.sqlite3",
    "dbapi": "sanitizer.plugins.dbapi",
    "django": "sanitizer.plugins.django",
    "sqlalchemy": "sanitizer.plugins.sqlalchemy",
    "pyzmq": "sanitizer.plugins.pyzmq",
    "duckdb": "sanitizer.plugins.duckdb",
    "asyncio": "sanitizer.plugins.asyncio",
    "asyncpg": "sanitizer.plugins.asyncpg",
}


def _builtin(module_name: str) -> Callable[[], Plugin]:
    def load() -> Plugin:
        plugin: Plugin = importlib.import_module(module_name).plugin
        return plugin
    return load


def available() -> dict[str, Callable[[], Plugin]]:
    """Plugin names and loaders: built-ins, then entry points (which may not shadow them)."""
    found = {name: _builtin(module) for name, module in BUILTIN.items()}
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name, entry_point.load)
    return found


def load(options: Options) -> list[Plugin]:
    """The enabled plugins. Unknown names are configuration errors; broken plugins are skipped."""
    loaders = available()
    for item in options.plugins:
        name = item.removeprefix("-")
        if name not in loaders:
            raise ConfigError(f"plugins: unknown plugin {name!r}; available: "
                              f"{', '.join(sorted(loaders))}", key="plugins", value=item)
    plugins = []
    for name, loader in loaders.items():
        if not options.plugin_enabled(name):
            continue
        try:
            plugin = loader()
        except Exception as exc:  # a broken third-party plugin must not break the program
            print(f"sanitizer: plugin {name!r} failed to load and is skipped: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        plugin.check_options(options.for_plugin(name))
        plugins.append(plugin)
    for key, _value in options.plugin_options:
        owner = key.partition(".")[0]
        if owner not in loaders:
            raise ConfigError(f"unknown option {key!r}: there is no plugin named {owner!r}",
                              key=key, value=_value)
    return plugins
