"""Making classes tracked: guarded subclasses for C types, in-place patching for Python classes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from sanitizer.ownership import UNTRACKED
from sanitizer.policies import RECORD, Check, Policy, checked

# Method name -> parameter list of its guard ("" for none; None: the method's own
# if it is a Python function, else *args, **kwargs).
Methods = Mapping[str, "str | None"]
# Method name -> how it is checked; methods not named are checked by the policy.
Checks = Mapping[str, Check]

# Dunders that are uses of the object; the rest (__repr__, __del__, __init__ ...) are not.
USE_DUNDERS = frozenset({
    "__enter__", "__exit__", "__aenter__", "__aexit__", "__iter__", "__next__",
    "__aiter__", "__anext__", "__call__", "__getitem__", "__setitem__", "__delitem__",
    "__len__", "__contains__",
})


def public_methods(cls: type) -> dict[str, str | None]:
    """The methods of a class that count as uses: public ones and the USE_DUNDERS."""
    names: dict[str, str | None] = {}
    for name in dir(cls):
        if name.startswith("_") and name not in USE_DUNDERS:
            continue
        attr = inspect.getattr_static(cls, name, None)
        if isinstance(attr, (staticmethod, classmethod, property, type)):
            continue
        if callable(attr) and getattr(object, name, None) is not attr:
            names[name] = None
    return names


def guards(
    base: type, policy: Policy, methods: Methods, record: str = RECORD,
    checks: Checks | None = None,
) -> dict[str, Callable[..., Any]]:
    """Guarded versions of ``base``'s methods, calling the originals through.

    Methods that ``checks`` marks Check.NONE, and those ``base`` lacks, are left out.
    """
    namespace: dict[str, Callable[..., Any]] = {}
    for name, params in methods.items():
        original = getattr(base, name, None)
        chosen = checked(policy, checks.get(name, Check.POLICY)) if checks else policy
        if original is None or chosen is None:
            continue
        # A pure-Python method with its own parameters may get the check compiled in.
        inlined = (chosen.inlined(original, name)
                   if params is None and record == RECORD else None)
        namespace[name] = inlined or chosen.guard(original, name, params, name=name,
                                                  record=record)
    return namespace


def trackable_factory(factory: object, stock: type) -> bool:
    """Whether ``factory`` is a class we can subclass for tracking: ``stock`` or a
    subclass of it (a user's factory), and not one of our tracked classes already."""
    return (isinstance(factory, type) and issubclass(factory, stock)
            and getattr(factory, "__sanitizer_policy__", None) is None)


@functools.cache
def tracked_subclass(
    base: type,
    policy: Policy,
    methods: tuple[tuple[str, str | None], ...],
    extra: tuple[tuple[str, Any], ...] = (),
    record: str = RECORD,
    checks: tuple[tuple[str, Check], ...] = (),
) -> type:
    """A subclass of ``base`` whose methods check ``policy`` (each as ``checks``
    says, by default Check.POLICY); cached per arguments.

    Instances hold their record in the ``_sanitizer_record`` slot, unless
    ``record`` reads it from elsewhere (a derived object's parent), and report
    ``base`` as their type. ``type(obj)`` is this subclass: isinstance() against
    ``base`` and its bases holds.
    """
    namespace: dict[str, Any] = {
        "__slots__": ("_sanitizer_record",) if record == RECORD else (),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "__sanitizer_public_type__": getattr(base, "__sanitizer_public_type__", base),
        "__sanitizer_policy__": policy,
    }
    namespace.update(guards(base, policy, dict(methods), record, dict(checks)))
    namespace.update(extra)
    return type(base.__name__, (base,), namespace)


def patch_class(
    cls: type,
    policy: Policy,
    patch: Callable[[Any, str, Any], Any],
    make_record: Callable[[Any], Any] | None,
    methods: Methods | None = None,
    checks: Checks | None = None,
    after_init: Callable[[Any], None] | None = None,
) -> None:
    """Guard a Python class in place.

    ``patch(owner, name, value)`` sets attributes (a Patcher, so that they can be
    restored). With ``make_record``, instances made from now on get a record in
    ``__init__``; other instances have none and are not checked (the guards read a
    missing record as UNTRACKED: a class-level default would slow every read of it).
    ``after_init(obj)`` runs after the original ``__init__`` (to read what it set up,
    such as the loop the object keeps; it may run more than once per object).
    """
    if "__sanitizer_policy__" not in vars(cls):
        patch(cls, "__sanitizer_policy__", policy)  # the guards are compiled for it
        for name, guard in guards(cls, policy, methods or public_methods(cls), RECORD,
                                  checks).items():
            patch(cls, name, guard)
    if make_record is None or "__sanitizer_init__" in vars(cls):
        return
    original_init = cls.__init__  # type: ignore[misc]

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # Once per instance, however many __init__s of the hierarchy run. (Not by
        # reading self.__dict__: on 3.11+ that turns the instance's inline attribute
        # values into a dict for good, and every attribute access gets slower.)
        try:
            record = object.__getattribute__(self, "_sanitizer_record")
        except AttributeError:
            record = UNTRACKED
        if record is UNTRACKED:
            try:
                object.__setattr__(self, "_sanitizer_record", make_record(self))
            except AttributeError:  # no __dict__: stays untracked
                pass
        original_init(self, *args, **kwargs)
        if after_init is not None:
            after_init(self)

    patch(cls, "__init__", __init__)
    patch(cls, "__sanitizer_init__", True)
