"""The plugin API: what a plugin declares, and the context it installs patches through."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sanitizer import ownership
from sanitizer.exceptions import ConfigError
from sanitizer.patching import Patcher
from sanitizer.policies import Policy
from sanitizer.threads import ThreadDescriber

if TYPE_CHECKING:
    from sanitizer.control import Sanitizer

Installer = Callable[[ModuleType, "Context"], None]


@dataclasses.dataclass(frozen=True)
class Plugin:
    """A library's instrumentation, declared as data.

    ``hooks`` maps module names to installers, which run when the module is
    imported (never earlier, and the sanitizer never imports it itself).
    """

    name: str
    hooks: Mapping[str, Installer]
    #: Module prefixes whose frames are skipped when choosing a report's site.
    libraries: tuple[str, ...] = ()
    #: Names of functions that finalize objects: uses inside them are not reported.
    finalizers: tuple[str, ...] = ()
    #: Adds a phrase about the current thread to reports (e.g. its asgiref role);
    #: called from the first hook on, when the library has been imported.
    describe_thread: ThreadDescriber | None = None
    #: The plugin's own option keys (``PLUGIN.KEY=value``), with their help.
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Runs once when the sanitizer starts, before any hook (e.g. to hook modules named in options).
    setup: Callable[[Context], None] | None = None
    #: Policies of its own, known by name (``track=...@name``) while the sanitizer runs.
    policies: tuple[Policy, ...] = ()

    def check_options(self, values: Mapping[str, str]) -> None:
        for key, value in values.items():
            if key not in self.options:
                accepted = ", ".join(f"{self.name}.{k}" for k in self.options) or "none"
                raise ConfigError(
                    f"unknown option {self.name}.{key}={value!r}; {self.name} accepts: {accepted}",
                    key=f"{self.name}.{key}", value=value)


class Context:
    """What an installer may do: patch (undone by disable()), and make records."""

    def __init__(self, sanitizer: Sanitizer, plugin: Plugin, patcher: Patcher) -> None:
        self._sanitizer = sanitizer
        self.plugin = plugin
        self.patcher = patcher
        self.options: Mapping[str, str] = sanitizer.options.for_plugin(plugin.name)
        self.stack_depth: int = sanitizer.options.stack_depth

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        return self.patcher.replace(owner, name, value)

    def wrap(self, owner: Any, path: str, wrapper: Callable[..., Any]) -> Any:
        return self.patcher.wrap(owner, path, wrapper)

    def new_record(
        self,
        obj: object,
        policy: Policy,
        *,
        object_type: str | None = None,
        name: str | None = None,
        resource: dict[str, Any] | None = None,
    ) -> ownership.OwnerRecord:
        """A record owned by the calling thread; its creation site is the user's caller."""
        # The capture starts at the plugin's frame: the two above it are ours.
        return ownership.new_record(policy, obj, object_type, self.stack_depth, name, resource,
                                    None, sys._getframe(1))

    def when_imported(self, module_name: str, installer: Installer) -> None:
        """Also run ``installer(module, self)`` when that module is imported (until disable)."""
        sanitizer = self._sanitizer
        sanitizer._on_import(module_name,
                             sanitizer._guarded_installer(self.plugin, installer, self))

    def track(self, obj: Any, policy: Policy, *, name: str | None = None) -> Any:
        """Track an object a patched factory returned; use the return value (maybe a proxy)."""
        return self._sanitizer.track(obj, policy, name)

    def internal_error(self, exc: BaseException, where: str) -> None:
        self._sanitizer.reporter.internal_error(exc, f"{self.plugin.name}: {where}")
