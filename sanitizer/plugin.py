"""The plugin API: everything a plugin may use. The rest of the core is internal.

A plugin teaches the sanitizer one library. It is a module with a ``plugin``
value, a :class:`Plugin`, registered under the ``sanitizer.plugins`` entry point
group (the built-in ones are listed in ``sanitizer.plugins``). It declares which
modules to hook; each hook, an *installer*, runs when its module is imported
(never earlier: the sanitizer never imports a library itself) and receives the
module and a :class:`Context`, through which it does everything else: patch,
make records, build tracked classes, report. Whatever it does is undone by
``sanitizer.disable()``.

**Records.** Each tracked object has an :class:`OwnerRecord`: the thread that
made it, where, its policy, and who is inside a call on it now. Objects that
belong to another (a connection's cursors) share its record or derive their
own from it.

**Policies** say how an object may be used across threads: ``STRICT`` (the
owner thread only), ``EXCLUSIVE`` (any thread, one at a time), ``PROCESS`` (not
in a forked child), or a :class:`Policy` subclass of the plugin's own.

**Method tables** say which methods of a class a guard checks, and how. Each
entry maps a method name to its parameter list, as written in a ``def`` without
``self``, or to a pair of that and a :class:`Check`::

    {"execute": "sql, parameters=(), /",   # exactly these: the cheapest call
     "close": "",                          # no parameters
     "fetchmany": OWN,                     # the method's own (C methods: *args, **kwargs)
     "row_factory": ("value", Check.CONCURRENT)}

A check is ``Check.POLICY`` unless the entry says otherwise: ``CONCURRENT``
(only while another thread is inside a call on the object), ``RELEASE`` (the
policy, but closing an inherited object in a forked child is fine) or
``NONE`` (not checked). Follow what the library itself allows.

**Tracked classes**, cheapest first: :meth:`Context.patch_class` guards a
Python class in place; :meth:`Context.subclass` makes a guarded subclass of a C
class, for a factory the plugin swaps in (``factory=`` arguments, a
``connect()`` wrapper); :meth:`Context.proxy` wraps one object that can be
neither (a transparent wrapt proxy: the dearest).

See ``sanitizer/plugins/pyzmq.py`` for a short, complete plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from sanitizer import (
    claims,
    inline,
    instrument,
    loops,
    ownership,
    policies,
    proxy,
    stacks,
    threads,
)
from sanitizer.exceptions import ConfigError, ThreadAffinityError
from sanitizer.loops import LoopToken, TaskSupport
from sanitizer.masking import mask_resource
from sanitizer.ownership import FORKED, UNTRACKED, OwnerRecord, qualified_type
from sanitizer.patching import Patcher
from sanitizer.policies import (
    Check,
    EventLoopThread,
    Exclusive,
    LoopBound,
    NoBlock,
    Policy,
    Process,
    Strict,
    TaskPolicy,
)
from sanitizer.proxy import TrackedProxy
from sanitizer.report import Violation
from sanitizer.state import STATE, fork_safe
from sanitizer.threads import ThreadDescriber, ThreadToken

if TYPE_CHECKING:
    from sanitizer.control import Sanitizer

#: Directories of the sanitizer's own code (and wrapt's): for warnings.warn's
#: skip_file_prefixes, so that a warning about the user's call names their line.
INTERNAL_DIRS = stacks.INTERNAL_DIRS

#: The built-in policies: the owner thread only; one thread at a time; not after fork.
STRICT = policies.STRICT_POLICY
EXCLUSIVE = policies.EXCLUSIVE_POLICY
PROCESS = policies.PROCESS_POLICY
#: Event loops: the object's loop only (``LoopBound(hint)`` for one with advice of its
#: own); an event loop's own methods (only from the thread running it); one task at a
#: time inside async operations, on the object's loop.
LOOP = policies.LOOP_POLICY
EVENT_LOOP = policies.EVENT_LOOP_POLICY
TASK = policies.TASK_POLICY
#: ``NOBLOCK.over(policy, kind)``: ``policy``'s guards, also reporting calls made while
#: an event loop runs in the thread (``kind``: "network" or "local", see ``Blocking``).
NOBLOCK = policies.NOBLOCK_POLICY

__all__ = [
    "EVENT_LOOP",
    "EXCLUSIVE",
    "FORKED",
    "INTERNAL_DIRS",
    "LOOP",
    "NOBLOCK",
    "OWN",
    "PROCESS",
    "STRICT",
    "TASK",
    "UNTRACKED",
    "Check",
    "ConfigError",
    "Context",
    "EventLoopThread",
    "Exclusive",
    "Installer",
    "LoopBound",
    "LoopToken",
    "Methods",
    "NoBlock",
    "OwnerRecord",
    "Plugin",
    "Policy",
    "Process",
    "Strict",
    "TaskPolicy",
    "TaskSupport",
    "ThreadAffinityError",
    "ThreadDescriber",
    "ThreadToken",
    "TrackedProxy",
    "Violation",
    "fork_safe",
    "internal_error",
    "mask_resource",
    "new_record",
    "qualified_type",
    "record_of",
]

Installer = Callable[[ModuleType, "Context"], None]

#: In a method table: the method's own parameter list.
OWN = None
Methods = Mapping[str, "str | tuple[str | None, Check] | None"]


def record_of(obj: object) -> OwnerRecord | None:
    """The record of a tracked object (or of a tracked proxy), or None."""
    return ownership.record_of(obj)


def new_record(obj: object, policy: Policy, *, object_type: str | None = None,
               name: str | None = None, resource: dict[str, Any] | None = None,
               _frame: FrameType | None = None) -> OwnerRecord:
    """A new record for ``obj``, owned by the calling thread, created at the user's
    line; inside ``Context.deriving(parent)``, the parent's record; UNTRACKED (never
    checked) while the sanitizer is off.

    For the ``__init__`` of classes a plugin builds once and caches (their
    instances are made later, by whichever sanitizer runs then); installers use
    ``Context.record``, the same.
    """
    running = STATE.running
    if running is None:
        return UNTRACKED
    parent: OwnerRecord | None = getattr(STATE.deriving, "record", None)
    if parent is not None:
        return parent
    try:
        # The capture starts at the plugin's frame: the ones above it are ours.
        return ownership.new_record(policy, obj, object_type, running.options.stack_depth,
                                    name, resource, None, _frame or sys._getframe(1))
    except Exception as exc:  # a bug: the object is made all the same, untracked
        running.reporter.internal_error(exc, "creating a record")
        return UNTRACKED


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


def split(methods: Methods) -> tuple[dict[str, str | None], dict[str, Check]]:
    """A method table as parameter lists and checks (the grammar above)."""
    params: dict[str, str | None] = {}
    checks: dict[str, Check] = {}
    for name, spec in methods.items():
        if isinstance(spec, tuple):
            params[name], checks[name] = spec
        else:
            params[name] = spec
    return params, checks


class Context:
    """What a plugin's installers may do while the sanitizer runs; all of it is undone
    by disable(). One per plugin, handed to its setup and installers.

    The static methods need no instance: classes that a plugin builds once and
    caches call them as ``Context.subclass(...)`` and so on.
    """

    #: The thread-token local, for guards written by hand: ``context.local.token`` is
    #: the calling thread's token; compare it with ``record.owner`` by identity.
    #: ``context.local.ident()`` is ``threading.get_ident()``, cheaper in the C core.
    local = threads.local
    #: Exclusive's claims, for guards written by hand over several objects at once (see
    #: claims.py): ``claim(record, me)`` is None when ``me`` is now the first inside, else
    #: who is (report it); ``release(record, me)`` ends any call that claim let in. Put the
    #: claim inside the ``try`` whose ``finally`` releases, and skip records whose ``busy``
    #: is already ``me`` (a nested call).
    claim = staticmethod(claims.claim)
    release = staticmethod(claims.release)

    def __init__(self, sanitizer: Sanitizer, plugin: Plugin, patcher: Patcher) -> None:
        self._sanitizer = sanitizer
        self.plugin = plugin
        self.patcher = patcher
        #: The plugin's own options (``PLUGIN.KEY=value``), by key.
        self.options: Mapping[str, str] = sanitizer.options.for_plugin(plugin.name)
        self.stack_depth: int = sanitizer.options.stack_depth

    # -- patching ------------------------------------------------------------------------

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name = value``; return what it was."""
        return self.patcher.replace(owner, name, value)

    def wrap(self, owner: Any, path: str, wrapper: Callable[..., Any]) -> Any:
        """Wrap ``owner.path`` with a wrapt wrapper ``(wrapped, instance, args, kwargs)``."""
        return self.patcher.wrap(owner, path, wrapper)

    def prologue(self, owner: type, name: str, source: str, names: Mapping[str, Any]) -> bool:
        """Replace ``owner.name`` (a function ``owner`` defines) with a copy compiled from
        its own source that runs ``source`` first (``{self}`` in it: the first parameter;
        other names it uses: ``names``, each starting with ``_g_``): a check that costs no
        frame of its own (undone by disable()). Where it cannot be copied faithfully (no
        source, a closure, a decorator ...), a wrapper runs the same ``source``, a frame
        dearer. True: it was copied."""
        func = vars(owner)[name]
        copy = inline.with_prologue(func, source, dict(names))
        self.patcher.replace(owner, name, copy or inline.wrapped_with_prologue(
            func, source, dict(names)))
        return copy is not None

    def when_imported(self, module_name: str, installer: Installer) -> None:
        """Also run ``installer(module, self)`` when that module is imported."""
        sanitizer = self._sanitizer
        sanitizer._on_import(module_name,
                             sanitizer._guarded_installer(self.plugin, installer, self))

    def add_library(self, module_prefix: str) -> None:
        """Also skip this module's frames when choosing a report's site."""
        stacks.add_library(module_prefix)

    def enabled(self, plugin_name: str) -> bool:
        """Whether another plugin runs in this sanitizer."""
        return any(p.name == plugin_name for p in self._sanitizer.plugins)

    # -- records -------------------------------------------------------------------------

    def record(self, obj: object, policy: Policy, *, object_type: str | None = None,
               name: str | None = None, resource: dict[str, Any] | None = None
               ) -> OwnerRecord:
        """A new record for ``obj``, owned by the calling thread, created at the user's
        line; or, inside ``deriving(parent)``, the parent's record (``new_record``)."""
        return new_record(obj, policy, object_type=object_type, name=name, resource=resource,
                          _frame=sys._getframe(1))

    @staticmethod
    def derived_record(obj: object, parent: OwnerRecord, policy: Policy
                       ) -> OwnerRecord | None:
        """A record of its own for an object made from a tracked one (a cursor checked on
        its own): ``parent``'s creation stack and resource, and the object's own site (the
        first user frame, ``derived_site`` in reports), not a stack of its own."""
        if parent.policy is None:
            return None
        try:
            record = ownership.new_record(policy, obj, resource=parent.resource,
                                          creation_stack=parent.creation_stack)
            record.derived_site = stacks.site_of(stacks.capture(1, sys._getframe(1)))
        except Exception as exc:  # a bug: the object is made all the same, untracked
            internal_error(exc, "creating a record")
            return None
        return record

    @contextlib.contextmanager
    def deriving(self, parent: OwnerRecord) -> Iterator[None]:
        """Objects any plugin records in this block (on this thread) share ``parent``'s
        record: they are parts of it (Django's driver connection of its wrapper)."""
        local = STATE.deriving
        previous = getattr(local, "record", None)
        local.record = parent
        try:
            yield
        finally:
            local.record = previous

    def parent_record(self) -> OwnerRecord | None:
        """The record objects made now join (see ``deriving``), if any."""
        found: OwnerRecord | None = getattr(STATE.deriving, "record", None)
        return found

    @staticmethod
    def record_of(obj: object) -> OwnerRecord | None:
        """The record of a tracked object (or of a tracked proxy), or None."""
        return ownership.record_of(obj)

    @staticmethod
    def attach(obj: object, record: OwnerRecord) -> bool:
        """Give ``obj`` this record (in its slot, or its ``__dict__``); False if it
        cannot hold one."""
        try:  # not obj.__dict__ first: on 3.11+ that slows every attribute access after
            object.__setattr__(obj, "_sanitizer_record", record)
        except (AttributeError, TypeError):
            try:  # C types with a __setattr__ of their own refuse the generic one
                obj.__dict__["_sanitizer_record"] = record
            except (AttributeError, TypeError):
                return False
        return True

    # -- tracked classes -----------------------------------------------------------------

    @staticmethod
    def subclass(base: type, policy: Policy, methods: Methods, *,
                 extra: Mapping[str, Any] | None = None, record_from: str | None = None
                 ) -> type:
        """A guarded subclass of ``base`` (cached), for a factory swap: instances are
        ``base`` to isinstance(), repr() and reports. Its instances hold their own
        record, or, with ``record_from="connection"``, read their parent's
        (``self.connection``'s) on each call."""
        params, checks = split(methods)
        record = (policies.RECORD if record_from is None
                  else f"self.{record_from}._sanitizer_record")
        return instrument.tracked_subclass(base, policy, tuple(params.items()),
                                           tuple((extra or {}).items()), record,
                                           tuple(checks.items()))

    def patch_class(self, cls: type, policy: Policy, methods: Methods, *,
                    make_record: Callable[[Any], OwnerRecord] | None = None,
                    own_only: bool = False,
                    after_init: Callable[[Any], None] | None = None) -> None:
        """Guard a Python class in place (undone by disable()). With ``make_record``,
        instances made from now on get a record when created; the others are not
        checked. ``own_only`` guards only the methods ``cls`` defines itself.
        ``after_init(obj)`` runs after the class's own ``__init__`` (to read what it
        set up, e.g. ``bind`` to the loop it keeps)."""
        params, checks = split(methods)
        if own_only:
            params = {name: p for name, p in params.items() if name in vars(cls)}
        instrument.patch_class(cls, policy, self.patcher.replace, make_record, params, checks,
                               after_init)

    @staticmethod
    def proxy(obj: Any, record: OwnerRecord, methods: Methods) -> Any:
        """Wrap ``obj`` in a transparent proxy whose listed methods are guarded."""
        params, checks = split(methods)
        return proxy.make_proxy(obj, record, params, checks)

    @staticmethod
    def concurrent_call(obj: object, operation: str, role: str, func: Callable[..., Any],
                        /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` as a Check.CONCURRENT use of ``obj`` in ``role``
        ("the target of backup()"): reported only if another thread is inside a call."""
        return policies.concurrent_call(obj, operation, role, func, *args, **kwargs)

    @staticmethod
    def guard(policy: Policy, func: Callable[..., Any], name: str,
              params: str | None = OWN, *, record_from: str | None = None) -> Callable[..., Any]:
        """One guarded method ``(self, ...)`` that checks ``policy``, then calls ``func``."""
        record = (policies.RECORD if record_from is None
                  else f"self.{record_from}._sanitizer_record")
        return policy.guard(func, name, params, name=name, record=record)

    @staticmethod
    def guards(base: type, policy: Policy, methods: Methods) -> dict[str, Callable[..., Any]]:
        """Guarded versions of ``base``'s listed methods (those it has), for ``extra=`` of
        a subclass whose methods follow more than one policy."""
        params, checks = split(methods)
        return instrument.guards(base, policy, params, policies.RECORD, checks)

    @staticmethod
    def guarded_class(cls: type) -> bool:
        """Whether a class's methods are guarded (a tracked subclass, a patched class)."""
        return getattr(cls, "__sanitizer_policy__", None) is not None

    @staticmethod
    def can_subclass(factory: object, stock: type) -> bool:
        """Whether ``factory`` is ``stock`` or a subclass of it (a user's factory class)
        that is not tracked yet: then ``subclass()`` of it can be swapped in."""
        return instrument.trackable_factory(factory, stock)

    def track(self, obj: Any, policy: Policy, *, name: str | None = None) -> Any:
        """Track an object a patched factory returned, cheapest first (in place if its
        class is a Python class, else a proxy); use the return value."""
        return self._sanitizer.track(obj, policy, name)

    # -- event loops and tasks -----------------------------------------------------------

    @staticmethod
    def loop_running(loop: object | None) -> None:
        """The calling thread now runs ``loop`` (None: it stopped): the library's own
        "set the running loop" calls this."""
        loops.running(loop)

    def loop_closed(self, loop: object) -> None:
        """``loop`` was closed at the caller's line."""
        loops.closed(loop, sys._getframe(1), self.stack_depth)

    def loop_token(self, loop: object) -> LoopToken:
        """The token of ``loop`` (its serial, creation site and state)."""
        return loops.token_for(loop, sys._getframe(1), self.stack_depth)

    @staticmethod
    def running_loop() -> LoopToken | None:
        """The token of the loop running in the calling thread, or None."""
        return threads.local.token.loop

    def bind(self, record: OwnerRecord, loop: object, *, here: bool = False) -> None:
        """The object of ``record`` now belongs to ``loop`` (the loop policies check it
        from now on). ``here``: say in reports that it was bound at the caller's line
        (for objects that bind after they were made, as asyncio's locks do)."""
        if record.policy is None or loop is None:
            return
        stack = stacks.capture(self.stack_depth, sys._getframe(1)) if here else ()
        record.bind(loops.token_for(loop), stack)

    @staticmethod
    def bind_running(record: OwnerRecord) -> None:
        """Bind the object of ``record`` to the loop running in the calling thread, if
        any (objects that keep no loop, when their transport opens)."""
        loop = threads.local.token.loop
        if record.policy is not None and loop is not None and record.loop is None:
            record.bind(loop)

    @staticmethod
    def lend_tasks(support: TaskSupport) -> None:
        """How to read the current task and describe tasks (the event-loop plugin's)."""
        STATE.tasks = support

    @staticmethod
    def report_blocking(*, network: bool, local: bool) -> None:
        """Which blocking calls made while a loop runs in the thread ``NOBLOCK`` reports."""
        STATE.noblock.network = network
        STATE.noblock.local = local

    @staticmethod
    def excuse_blocking(excused: Callable[[], bool]) -> None:
        """``NOBLOCK`` reports nothing while ``excused()`` is true: for a library that
        checks blocking calls on a loop's thread itself (Django's ``async_unsafe``), beneath
        the calls its check covers. Asked only when ``NOBLOCK`` would report (cold path)."""
        STATE.blocking_excuses.append(excused)

    @staticmethod
    def current_task() -> object:
        """The task running now in the calling thread, or None."""
        return loops.current_task()

    # -- checking and reporting ---------------------------------------------------------

    @staticmethod
    def check(obj: object, record: OwnerRecord, operation: str, holder: object = None, *,
              policy: Policy | None = None) -> bool:
        """The slow path of a guard written by hand: the record's policy (or ``policy``)
        decides whether this use breaks it, and reports. True: it did (run the call
        ``quiet()``)."""
        return policies.slow_path(obj, record, operation, holder, policy)

    @staticmethod
    def report(obj: object, record: OwnerRecord, operation: str, verdict: str, policy: Policy,
               *, holder: object = None) -> bool:
        """Report a violation the plugin found itself (``policy.describe`` words it).
        Nothing is reported beneath a call already reported. True: reported."""
        token = threads.local.token
        if token.quiet:
            return False
        policies.report(obj, record, operation, verdict, token, holder, policy)
        return True

    @staticmethod
    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        """Run a reported call quietly: the layers beneath it (a driver under an ORM)
        do not report the same misuse again."""
        token = threads.local.token
        token.quiet += 1
        try:
            yield
        finally:
            token.quiet -= 1

    def internal_error(self, exc: BaseException, where: str) -> None:
        """A bug in the plugin: said once per kind; the program goes on."""
        internal_error(exc, f"{self.plugin.name}: {where}")


def internal_error(exc: BaseException, where: str) -> None:
    """A bug in a plugin, found outside an installer (in a class it built): said once
    per kind by the running sanitizer; the program goes on."""
    running = STATE.running
    if running is not None:
        running.reporter.internal_error(exc, where)
