"""The running Sanitizer: the lifecycle that glues options, plugins and the report together."""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sanitizer import ownership, policies, stacks, threads
from sanitizer.exceptions import ConfigError
from sanitizer.instrument import patch_class
from sanitizer.options import Options
from sanitizer.patching import Patcher, forget, when_imported
from sanitizer.plugin import Context, Plugin
from sanitizer.state import STATE

if TYPE_CHECKING:
    from sanitizer.report import Reporter

HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement, patchable


class Sanitizer:
    """Everything the sanitizer changed in this process, so that stop() undoes it exactly:
    the patches (its Patcher), its import hooks, and the shared configuration in
    STATE (saved at start, restored at stop)."""

    def __init__(self, options: Options) -> None:
        from sanitizer import plugins as plugin_registry
        from sanitizer.report import Reporter  # structlog is imported only when enabled

        self.options = options
        self.reporter: Reporter = Reporter(options)
        self.patcher = Patcher()
        self.plugins: list[Plugin] = plugin_registry.load(options)
        self._hooks: list[Callable[[ModuleType], None]] = []
        self._saved: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        from sanitizer import forward

        self._saved = STATE.save()
        STATE.history = self.options.history  # before any guard is compiled
        forward.install(self.reporter)  # a collecting parent announced: children forward to it
        policies.connect(self.reporter.report)  # the guards' sink
        for plugin in self.plugins:
            self._activate(plugin)
        for spec in self.options.track:
            self._track_by_name(spec)
        for cls, policy in list(STATE.affine_classes.items()):
            self.instrument_class(cls, policy)
        gc.callbacks.append(self.reporter.gc_phase)
        atexit.register(self._at_exit)

    def stop(self) -> None:
        try:  # stopped before exit (pytest's session end): its counts are logged all the same
            self.reporter.log_summary()
        except Exception as exc:
            self.reporter.internal_error(exc, "logging the summary")
        for hook in self._hooks:
            forget(hook)
        self._hooks.clear()
        self.patcher.restore()
        if self.reporter.gc_phase in gc.callbacks:
            gc.callbacks.remove(self.reporter.gc_phase)
        if self._saved is not None:  # sink, policies, describers, libraries, boundaries
            STATE.restore(self._saved)
            self._saved = None
        atexit.unregister(self._at_exit)

    def _activate(self, plugin: Plugin) -> None:
        context = Context(self, plugin, self.patcher)
        for prefix in plugin.libraries:
            stacks.add_library(prefix)
        for policy in plugin.policies:
            policies.register(policy)
        self.reporter.finalizers.update(plugin.finalizers)
        if plugin.setup is not None:
            plugin.setup(context)  # a ConfigError here (bad plugin option) stops enable()
        for module_name, installer in plugin.hooks.items():
            self._on_import(module_name, self._guarded_installer(plugin, installer, context))

    def _guarded_installer(
        self, plugin: Plugin, installer: Callable[[ModuleType, Context], None], context: Context
    ) -> Callable[[ModuleType], None]:
        def install(module: ModuleType) -> None:
            # A describer runs for every record made: only once its library is in use.
            if plugin.describe_thread is not None:
                threads.add_describer(plugin.describe_thread)
            try:
                installer(module, context)
            except Exception as exc:  # a plugin bug must not break the import
                self.reporter.internal_error(exc, f"installing {plugin.name} on {module.__name__}")
        return install

    def _on_import(self, module_name: str, hook: Callable[[ModuleType], None]) -> None:
        self._hooks.append(hook)
        when_imported(module_name, hook)

    def _track_by_name(self, spec: str) -> None:
        target, _, policy_name = spec.partition("@")
        module_name, _, attr_path = target.partition(":")
        try:
            policy = policies.get(policy_name or "strict")
        except ConfigError as exc:  # the spec is the option the user gave: name it
            raise ConfigError(f"track={spec}: {exc}", key="track", value=spec) from None

        def install(module: ModuleType) -> None:
            owner: Any = module
            *parents, name = attr_path.split(".")
            try:
                for part in parents:
                    owner = getattr(owner, part)
                value = getattr(owner, name)
            except AttributeError:
                raise ConfigError(f"{module_name} has no {attr_path}",
                                  key="track", value=spec) from None
            if isinstance(value, type):
                self.instrument_class(value, policy)
            elif callable(value):
                def track_result(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
                    return self.track(wrapped(*args, **kwargs), policy)
                self.patcher.wrap(owner, name, track_result)
            else:
                raise ConfigError(f"{target} is neither a class nor a callable",
                                  key="track", value=spec)

        def guarded(module: ModuleType) -> None:
            try:
                install(module)
            except ConfigError as exc:  # the user's spec, not our bug: one line, not tracked
                try:
                    sys.stderr.write(f"sanitizer: track={spec}: {exc}; not tracked\n")
                except Exception:  # no stderr (pythonw), or a closed one
                    pass
            except Exception as exc:
                self.reporter.internal_error(exc, f"track={spec}")
        self._on_import(module_name, guarded)

    # -- tracking ------------------------------------------------------------------

    def new_record(self, obj: object, policy: policies.Policy, name: str | None = None
                   ) -> ownership.OwnerRecord:
        """A record for ``obj``; UNTRACKED (never checked) if making it failed (a bug)."""
        try:
            return ownership.new_record(policy, obj, name=name,
                                        stack_depth=self.options.stack_depth)
        except Exception as exc:
            self.reporter.internal_error(exc, "creating a record")
            return ownership.UNTRACKED

    def instrument_class(self, cls: type, policy: policies.Policy, *,
                         track_instances: bool = True) -> None:
        """Guard ``cls`` in place; with ``track_instances``, every new instance is tracked."""
        if not hasattr(cls, "__dict__") or not cls.__flags__ & HEAP_TYPE:
            raise ConfigError(f"cannot patch built-in type {cls.__qualname__}; track the "
                              "factory that returns its instances instead",
                              key="track", value=cls.__qualname__)
        make_record = (lambda obj: self.new_record(obj, policy)) if track_instances else None
        patch_class(cls, policy, self.patcher.replace, make_record)

    def track(self, obj: Any, policy: policies.Policy, name: str | None = None) -> Any:
        from sanitizer.proxy import make_proxy

        if ownership.record_of(obj) is not None:
            return obj
        cls = type(obj)
        patched_for = vars(cls).get("__sanitizer_policy__", policy)
        if "__dict__" in dir(obj) and cls.__flags__ & HEAP_TYPE and patched_for is policy:
            self.instrument_class(cls, policy, track_instances=False)
            obj.__dict__["_sanitizer_record"] = self.new_record(obj, policy, name)
            return obj
        return make_proxy(obj, self.new_record(obj, policy, name))

    # -- exit and fork ---------------------------------------------------------------

    def _at_exit(self) -> None:
        # Inside the program's exit: each step is guarded on its own, nothing escapes.
        reporter = self.reporter
        try:
            lines = reporter.exit_summary()
            if lines:
                reporter.write_summary(lines)
        except Exception as exc:
            reporter.internal_error(exc, "writing the exit summary")
        try:
            reporter.log_summary()
        except Exception as exc:
            reporter.internal_error(exc, "logging the exit summary")
        code = self.options.exitcode
        if reporter.total and code is not None:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)  # like ThreadSanitizer's exitcode=66; we run last among atexit

    def renew_after_fork(self, import_cut_short: bool = False) -> None:
        """In a forked child (state's fork handler): the child reports its own."""
        self.reporter.reset_after_fork(import_cut_short)


def running() -> Sanitizer | None:
    return STATE.running


def enable(options: Options) -> Sanitizer:
    """Start the sanitizer with these options, or keep the one running (idempotent)."""
    with STATE.lifecycle:
        if STATE.running is not None:
            return STATE.running
        sanitizer = STATE.running = Sanitizer(options)
        try:
            sanitizer.start()
        except BaseException:
            STATE.running = None
            sanitizer.stop()
            raise
        return sanitizer


def disable() -> None:
    """Stop the sanitizer: an exact inverse of enable()."""
    with STATE.lifecycle:
        sanitizer, STATE.running = STATE.running, None
        if sanitizer is not None:
            sanitizer.stop()


def register_affine(cls: type, policy: policies.Policy) -> None:
    """A @thread_affine class: patched now if the sanitizer runs, and whenever it starts."""
    STATE.affine_classes[cls] = policy
    if STATE.running is not None:
        STATE.running.instrument_class(cls, policy)
