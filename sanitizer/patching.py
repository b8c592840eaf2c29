"""Installing and removing patches, and post-import hooks that never import a library."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import wrapt

from sanitizer.state import STATE

_MISSING = object()

ImportHook = Callable[[ModuleType], None]
# wrapt cannot unregister a post-import hook, so each module name gets one
# trampoline for the life of the process; enable/disable edit the list behind
# it (STATE.import_hooks).


class Patcher:
    """Records every attribute it sets so that ``restore()`` is an exact inverse."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name = value``; return what the attribute was."""
        original = vars(owner).get(name, _MISSING)
        self._undo.append((owner, name, original))
        setattr(owner, name, value)
        return original if original is not _MISSING else getattr(owner, name, None)

    def wrap(self, owner: Any, path: str, wrapper: Callable[..., Any]) -> Any:
        """``wrapt.wrap_function_wrapper``, remembered for ``restore()``."""
        parent, attribute, _original = wrapt.resolve_path(owner, path)
        self._undo.append((parent, attribute, vars(parent).get(attribute, _MISSING)))
        return wrapt.wrap_function_wrapper(parent, attribute, wrapper)

    def restore(self) -> None:
        while self._undo:
            owner, name, original = self._undo.pop()
            if original is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, original)


def when_imported(module_name: str, hook: ImportHook) -> None:
    """Run ``hook(module)`` when the module is imported, or now if it already is."""
    keep_hook_finder_first()
    hooks = STATE.import_hooks.get(module_name)
    if hooks is None:
        hooks = STATE.import_hooks[module_name] = [hook]
        # Fires at once if the module is already imported.
        wrapt.register_post_import_hook(_trampoline(module_name), module_name)
        return
    hooks.append(hook)
    module = sys.modules.get(module_name)
    if module is not None:
        hook(module)


def keep_hook_finder_first() -> None:
    """Put wrapt's post-import finder first in ``sys.meta_path`` (adding it back if gone).

    A finder ahead of it (pytest's assertion rewriter, for modules it rewrites)
    would import modules without our hooks firing, and code that restores
    ``sys.meta_path`` (pytester) drops it for good: wrapt adds it only once. It
    asks the finders behind it and only wraps their loader, so first is safe.
    """
    from wrapt.importer import ImportHookFinder  # type: ignore[import-untyped]

    finders = [f for f in sys.meta_path if isinstance(f, ImportHookFinder)]
    if finders and sys.meta_path[0] is finders[0]:
        return
    for finder in finders:
        sys.meta_path.remove(finder)
    sys.meta_path.insert(0, finders[0] if finders else ImportHookFinder())


def forget(hook: ImportHook) -> None:
    for hooks in STATE.import_hooks.values():
        while hook in hooks:
            hooks.remove(hook)


def _trampoline(module_name: str) -> ImportHook:
    def fire(module: ModuleType) -> None:
        for hook in list(STATE.import_hooks.get(module_name, ())):
            hook(module)
    return fire
