"""Transparent proxies (wrapt.ObjectProxy) for objects whose class cannot be subclassed."""

from __future__ import annotations

import functools
from typing import Any

import wrapt

from sanitizer.instrument import Checks, Methods, public_methods
from sanitizer.ownership import OwnerRecord
from sanitizer.policies import Check, Policy, call_arguments, checked, compile_guard


class TrackedProxy(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """Base of generated proxy classes. Holds the record; everything else is the target's."""

    __slots__ = ("_sanitizer_record",)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__wrapped__.__reduce_ex__(protocol)


@functools.cache
def proxy_class(target: type, policy: Policy, methods: tuple[tuple[str, str | None], ...],
                checks: tuple[tuple[str, Check], ...] = ()) -> type:
    """A TrackedProxy subclass whose listed methods check ``policy`` (each as
    ``checks`` says, by default Check.POLICY) and forward."""
    namespace: dict[str, Any] = {"__slots__": (), "__sanitizer_public_type__": target}
    how = dict(checks)
    for name, params in methods:
        chosen = checked(policy, how.get(name, Check.POLICY))
        if chosen is None:
            continue
        params = params if params is not None else "*args, **kwargs"
        call = f"self.__wrapped__.{name}({call_arguments(params)})"
        namespace[name] = compile_guard(chosen, call, name, params, name, {})
    return type(f"Tracked{target.__name__}Proxy", (TrackedProxy,), namespace)


def make_proxy(obj: Any, record: OwnerRecord, methods: Methods | None = None,
               checks: Checks | None = None) -> Any:
    """Wrap ``obj`` in a proxy that checks ``record.policy`` on the given (or public) methods."""
    assert record.policy is not None
    chosen = methods if methods is not None else public_methods(type(obj))
    cls = proxy_class(type(obj), record.policy,  # type: ignore[arg-type]
                      tuple(sorted(chosen.items())), tuple(sorted((checks or {}).items())))
    proxy = cls(obj)
    proxy._sanitizer_record = record
    return proxy


def unwrap(obj: Any) -> Any:
    """The real object behind a tracked proxy, for handing to C code that type-checks."""
    while isinstance(obj, TrackedProxy):
        obj = obj.__wrapped__
    return obj
