"""Policies (strict, exclusive, process, ...), per-operation checks, and the guards on calls.

A guard is a small function generated from its policy's template with the exact
signature of the method it protects, the way ``dataclasses`` generates
``__init__``: forwarding ``*args, **kwargs`` alone would double the overhead.
The hot path reads the thread token, compares it with the record and calls
through; anything unusual goes to ``_slow_path``, which decides and reports.
"""

from __future__ import annotations

import ast
import enum
import functools
import inspect
import os
import sys
from collections.abc import Callable
from types import CodeType, FrameType, FunctionType
from typing import TYPE_CHECKING, Any, ClassVar

from sanitizer import stacks, threads
from sanitizer.exceptions import ConfigError
from sanitizer.ownership import FORKED, OwnerRecord, record_of
from sanitizer.state import STATE

if TYPE_CHECKING:
    from sanitizer.report import Violation

# Guard bodies. ``{record}`` reads the owner record (usually the object's own
# slot; a derived object may read its parent's), ``{call}`` calls through to the
# real method and ``{operation}`` names it in reports. The guard's own names all
# start with ``_g_`` so that they never shadow a parameter of the method.
#
# One misuse, one report: a call that was reported runs on "quietly" (the
# ``{reported}`` block), so the layers beneath it (Django's wrapper over
# sqlite3, a Session over its DB-API connection) do not report it again.
REPORTED = """\
_g_me.quiet += 1
try:
    return {call}
finally:
    _g_me.quiet -= 1
"""

STRICT = """\
_g_record = {record}
_g_me = _g_local.token
if _g_me is not _g_record.owner and _g_slow(self, _g_record, {operation!r}, None):
    {reported}
return {call}
"""

EXCLUSIVE = """\
_g_record = {record}
_g_me = _g_local.token
_g_holder = _g_record.busy
if _g_holder is None:
    _g_record.busy = _g_me
    try:
        return {call}
    finally:
        _g_record.busy = None
if _g_holder is not _g_me and _g_slow(self, _g_record, {operation!r}, _g_holder):
    {reported}
return {call}
"""

PROCESS = """\
_g_record = {record}
if _g_record.busy is not None and _g_slow(self, _g_record, {operation!r}, _g_record.busy):
    _g_me = _g_local.token
    {reported}
return {call}
"""

# Operations a library allows from any thread, but not while another thread is
# inside a call on the object: checked only when someone else may be inside.
CONCURRENT = """\
_g_record = {record}
_g_me = _g_local.token
_g_holder = _g_record.busy
if (_g_holder is not None or _g_me is not _g_record.owner) and _g_slow(
        self, _g_record, {operation!r}, _g_holder):
    {reported}
return {call}
"""

# For policies written as enter/exit methods (usually by plugins): slower, general.
ENTER_EXIT = """\
_g_record = {record}
_g_state = _g_policy.enter(self, _g_record, {operation!r})
try:
    return {call}
finally:
    _g_policy.exit(self, _g_record, _g_state)
"""

RESERVED_PREFIX = "_g_"
RECORD = "self._sanitizer_record"


class Check(enum.Enum):
    """How one operation of a tracked object is checked, under the object's policy.

    Plugins choose per operation, following what the library itself allows.
    """

    #: The policy's own rule (strict: the owner thread only).
    POLICY = "policy"
    #: Allowed from any thread, but not while another thread is inside a call on
    #: the object (reading and setting plain options, a backup's target).
    CONCURRENT = "concurrent"
    #: The policy's rule, except in a forked child, where it lets go of an
    #: inherited object (close()) and is no more a use than finalization is.
    RELEASE = "release"
    #: Not checked: it touches nothing another thread's call could be using.
    NONE = "none"

    def under(self, policy: Policy) -> Policy | None:
        """The policy whose guards check an operation this way under ``policy`` (None:
        leave it unguarded)."""
        return checked(policy, self)


class Policy:
    """How a tracked object may be used across threads. Subclasses set ``template``."""

    name: ClassVar[str] = "policy"
    template: ClassVar[str] = ENTER_EXIT
    #: Whether this policy's guards decide by it rather than by the record's
    #: policy (derived objects' guards normally follow the record they read).
    own_verdict: ClassVar[bool] = False
    #: Whether ``record.busy`` names the thread inside a call while one is (exclusive's
    #: guards keep it so); other policies' records say nothing of who is inside.
    marks_inside: ClassVar[bool] = False

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        """Name of the policy this use breaks, or None if it is allowed (cold path).

        ``obj`` is the object touched (the record may be its parent's) and
        ``operation`` the method or attribute.
        """
        if holder is FORKED or record.pid != token.pid:
            return "process"
        return None

    def holder(self, record: OwnerRecord, token: threads.ThreadToken, holder: object) -> object:
        """Who else is using the object, given what the guard saw (cold path)."""
        return holder

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: threads.ThreadToken) -> str:
        """The message of a violation this policy found (cold path): what was used, by
        whom, and why that breaks the rule. Subclasses word their own verdicts."""
        what, me = _what(violation), _who(token)
        root = violation.root_type or violation.object_type
        if violation.policy == "process":
            return (f"{what} used in process {violation.pid}, but the {root} was created in "
                    f"process {violation.owner_pid} and inherited across fork()")
        owner = record.owner
        assert isinstance(owner, threads.ThreadToken)
        text = f"{what} called by {me}, but the {root} belongs to {_who(owner)}"
        if not violation.owner_alive:
            text += ", which has exited"
            if owner.ident == token.ident:
                text += f" (its ident {token.ident} was reused)"
        return f"{text} ({violation.policy} policy)"

    def enter(self, obj: object, record: OwnerRecord, operation: str) -> Any:
        """Called before each call by ENTER_EXIT guards; reports through ``slow_path``."""
        raise NotImplementedError

    def exit(self, obj: object, record: OwnerRecord, state: Any) -> None:
        """Called after each call by ENTER_EXIT guards, even when it raised."""

    def guard(
        self,
        func: Callable[..., Any],
        operation: str,
        params: str | None = None,
        *,
        name: str | None = None,
        defaults: dict[str, Any] | None = None,
        record: str = RECORD,
    ) -> FunctionType:
        """A function ``(self, <params>)``: check this policy, then call ``func(self, ...)``.

        Without ``params``, a Python function's own parameter list is copied
        (code that inspects it sees no difference, and calls stay positional);
        anything else gets ``*args, **kwargs``.
        """
        namespace = {"_g_func": func, **(defaults or {})}
        if params is None:
            params, own_defaults = parameters_of(func) or ("*args, **kwargs", {})
            namespace.update(own_defaults)
        call = f"_g_func(self, {call_arguments(params)})"
        return compile_guard(self, call, operation, params, name or operation, namespace,
                             wrapped=func, record=record)

    def guard_expression(
        self,
        call: str,
        operation: str,
        params: str,
        namespace: dict[str, Any],
        *,
        record: str = RECORD,
        wrapped: Callable[..., Any] | None = None,
    ) -> FunctionType:
        """Like ``guard``, but the call through is an expression over ``namespace``.

        For hot paths that can reach C directly without an extra Python frame.
        ``wrapped`` is the method it stands for: its docstring and metadata are copied.
        """
        return compile_guard(self, call, operation, params, operation, namespace,
                             wrapped=wrapped, record=record)

    @functools.cache  # noqa: B019 - policies are few and live for the process
    def call_guard(self, operation: str, role: str | None = None) -> FunctionType:
        """A guard ``(obj, func, *args, **kwargs)`` for checking one-off calls.

        ``role`` names how the object takes part, when it is not the one whose
        method was called ("the target of backup()").
        """
        namespace = {} if role is None else {"_g_slow": _slow_path_for(self, role)}
        return compile_guard(self, "_g_func(*args, **kwargs)", operation,
                             "_g_func, /, *args, **kwargs", operation, namespace)

    def __repr__(self) -> str:
        return f"<policy {self.name}>"


class Strict(Policy):
    """Only the owner thread may touch the object."""

    name = "strict"
    template = STRICT

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if record.pid != token.pid:
            return "process"
        if record.sharing > 0 or token is record.owner:
            return None
        return self.name


class Exclusive(Policy):
    """Any thread may use the object, but only one at a time: handoff is fine."""

    name = "exclusive"
    template = EXCLUSIVE
    marks_inside = True

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if holder is FORKED or record.pid != token.pid:
            return "process"
        if record.sharing > 0 or holder is None or holder is token:
            return None
        return self.name

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: threads.ThreadToken) -> str:
        if violation.policy == self.name and violation.holder_thread:
            return while_inside(violation, token)
        return super().describe(violation, record, token)


def _what(violation: Violation) -> str:
    """What was used: ``Type.operation``, or the object in its role."""
    if violation.role:
        return f"{violation.object_type} used as {violation.role}"
    return f"{violation.object_type}.{violation.operation}"


def _who(token: threads.ThreadToken) -> str:
    return f"thread {token.label} '{token.current_name()}'"


def while_inside(violation: Violation, token: threads.ThreadToken) -> str:
    """The message of a use while another thread was inside a call on the object."""
    holder = violation.holder_thread or {}
    other = f"thread T{holder.get('serial')} '{holder.get('name')}'"
    root = violation.root_type or violation.object_type
    return (f"{_what(violation)} called by {_who(token)} while {other} is inside a call on "
            f"the same {root}")


class Process(Policy):
    """Any thread may use the object, but not a child process that inherited it."""

    name = "process"
    template = PROCESS


class ConcurrentUse(Policy):
    """The CONCURRENT check: a violation only while another thread is inside a call.

    Who is inside: objects whose policy marks it (exclusive) say so in ``busy``,
    set by their policy-checked calls. For the others (strict), only the owner
    may be inside a call, so only another thread's use is checked, and the other
    threads' frames tell, on the cold path: a guard frame on the same record is
    a call in progress. (The owner's use while another thread is inside is not:
    that thread's own use was reported already.) Reported as ``exclusive``, the
    rule it breaks. Use after fork is left to the operations that really touch
    the object.
    """

    name = "concurrent"
    template = CONCURRENT
    own_verdict = True

    def holder(self, record: OwnerRecord, token: threads.ThreadToken, holder: object) -> object:
        if record.policy is not None and record.policy.marks_inside:
            return holder
        return None if token is record.owner else thread_inside(record, token)

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if record.sharing > 0 or not isinstance(holder, threads.ThreadToken):
            return None
        return None if holder is token else "exclusive"

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: threads.ThreadToken) -> str:
        return while_inside(violation, token)


class Releasing(Policy):
    """The RELEASE check: guards like ``base``'s, and the record's policy decides,
    except that letting go of an inherited object in a forked child is allowed."""

    own_verdict = True

    def __init__(self, base: Policy) -> None:
        self.base = base
        self.template = base.template  # type: ignore[misc]
        self.name = base.name  # type: ignore[misc]

    def holder(self, record: OwnerRecord, token: threads.ThreadToken, holder: object) -> object:
        return (record.policy or self.base).holder(record, token, holder)

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        verdict = (record.policy or self.base).violated(record, token, holder, obj, operation)
        return None if verdict == "process" else verdict

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: threads.ThreadToken) -> str:
        return (record.policy or self.base).describe(violation, record, token)

    def __repr__(self) -> str:
        return f"<policy {self.name}, releasing>"


STRICT_POLICY = Strict()
EXCLUSIVE_POLICY = Exclusive()
PROCESS_POLICY = Process()
CONCURRENT_USE = ConcurrentUse()


@functools.cache
def checked(policy: Policy, check: Check) -> Policy | None:
    """The policy that guards an operation checked as ``check`` under ``policy``
    (None: leave it unguarded)."""
    if check is Check.POLICY:
        return policy
    if check is Check.CONCURRENT:
        return CONCURRENT_USE
    if check is Check.RELEASE:
        return Releasing(policy)
    return None


def thread_inside(record: OwnerRecord, me: threads.ThreadToken) -> threads.ThreadToken | None:
    """Another thread now inside a guarded call on ``record``, from its frames (cold path)."""
    for ident, frame in sys._current_frames().items():
        if ident == me.ident:
            continue
        for f in stacks.frames_of(frame):
            if f.f_code.co_filename == stacks.GUARD_FILENAME and \
                    f.f_locals.get("_g_record") is record:
                return threads.token_of(ident)
    return None


BUILTIN = (STRICT_POLICY, EXCLUSIVE_POLICY, PROCESS_POLICY)
STATE.policies.update((p.name, p) for p in BUILTIN)


def register(policy: Policy) -> Policy:
    """Make a plugin's policy available by name (e.g. for ``track=...@name``) while the
    sanitizer runs (it is forgotten when it stops)."""
    STATE.policies.setdefault(policy.name, policy)
    return STATE.policies[policy.name]


def get(policy: str | Policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    try:
        return STATE.policies[policy]
    except KeyError:
        accepted = ", ".join(sorted(STATE.policies))
        raise ConfigError(
            f"unknown policy {policy!r}; expected one of: {accepted}", key="policy", value=policy
        ) from None


def slow_path(obj: object, record: OwnerRecord, operation: str, holder: object,
              deciding: Policy | None = None, role: str | None = None) -> bool:
    """Decide whether an unusual call is a violation, and report it.

    The record's policy decides, unless the guard's own does (``deciding``, for
    a per-operation check). True means the call is a violation (reported, or
    deduplicated, suppressed or finalizing): guards then run it quietly, so that
    nested layers stay silent.
    """
    if record.policy is None:  # untracked instance of a patched class
        return False
    policy = deciding or record.policy
    token = threads.local.token
    if token.quiet:  # beneath a call that was already reported
        return False
    if token.pid != os.getpid():  # pragma: no cover - fork handler did not run
        token = threads.local.token = threads.ThreadToken()
    holder = policy.holder(record, token, holder)
    violated = policy.violated(record, token, holder, obj, operation)
    if violated is None:
        return False
    report(obj, record, operation, violated, token, holder, policy, role)
    return True


# Where violations go: the running sanitizer's Reporter.report, handed over when it
# starts (Sanitizer.start) and taken back when it stops. Nothing here calls back up.
Sink = Callable[[object, OwnerRecord, str, str, threads.ThreadToken, object, Policy,
                 "str | None", FrameType], None]


def connect(sink: Sink | None) -> None:
    """Hand the guards their sink (None: the sanitizer stopped)."""
    STATE.sink = sink


def report(obj: object, record: OwnerRecord, operation: str, verdict: str,
           token: threads.ThreadToken, holder: object, policy: Policy,
           role: str | None = None) -> None:
    """Report a violation that ``policy`` found (it words the message); the one way in."""
    sink = STATE.sink
    if sink is not None:
        sink(obj, record, operation, verdict, token, holder, policy, role, sys._getframe(1))


def _slow_path_for(policy: Policy, role: str | None = None) -> Callable[..., bool]:
    """The slow path a policy's guards call: deciding by that policy where it says so."""
    if not policy.own_verdict and role is None:
        return slow_path
    return functools.partial(slow_path, deciding=policy if policy.own_verdict else None,
                             role=role)


def compile_guard(
    policy: Policy,
    call: str,
    operation: str,
    params: str,
    name: str,
    namespace: dict[str, Any],
    *,
    wrapped: Callable[..., Any] | None = None,
    record: str = RECORD,
) -> FunctionType:
    scope = {"_g_local": threads.local, "_g_slow": _slow_path_for(policy), "_g_policy": policy,
             "_g_operation": operation, **namespace}
    exec(_guard_module(policy.template, call, params, record), scope)
    guard: FunctionType = scope["_g_guard"]
    # Tracebacks show the code's name: the method's, not the shared source's.
    if sys.version_info >= (3, 11):
        guard.__code__ = guard.__code__.replace(co_name=name, co_qualname=name)
    else:
        guard.__code__ = guard.__code__.replace(co_name=name)
    if wrapped is not None:
        # Not update_wrapper's names: some C methods (nanobind's) have a None
        # __qualname__, which a function refuses; the guard's own name is set below.
        for attribute in ("__module__", "__doc__", "__annotations__", "__dict__"):
            value = getattr(wrapped, attribute, None)
            if attribute == "__dict__" and isinstance(value, dict):
                guard.__dict__.update(value)
            elif isinstance(value, (str, dict)):
                setattr(guard, attribute, value)
        guard.__wrapped__ = wrapped  # type: ignore[attr-defined]
    guard.__name__ = guard.__qualname__ = name
    guard.__sanitizer_policy__ = policy  # type: ignore[attr-defined]
    return guard


@functools.cache
def _guard_module(template: str, call: str, params: str, record: str) -> CodeType:
    """Compiled once per shape: a class's methods mostly share a few parameter lists."""
    reported = REPORTED.format(call=call).replace("\n", "\n    ").rstrip()
    body = template.format(call=call, operation=_Name("_g_operation"), record=record,
                           reported=reported)
    source = f"def _g_guard(self, {params}):\n" + "".join(
        "    " + line + "\n" for line in body.splitlines()
    )
    return compile(source, stacks.GUARD_FILENAME, "exec")


class _Name:
    """Renders as a bare name in a signature: a default passed by reference."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def parameters_of(func: Callable[..., Any]) -> tuple[str, dict[str, Any]] | None:
    """The parameter list of a Python method without ``self``, and its defaults by name.

    None for what has no Python signature to copy (C methods), or that uses the
    guards' reserved names.
    """
    if not isinstance(func, FunctionType):  # a C method, or already bound
        return None
    try:
        signature = inspect.signature(func, follow_wrapped=False)
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    copied, defaults = [], {}
    for index, parameter in enumerate(parameters[1:]):
        if parameter.name.startswith(RESERVED_PREFIX):
            return None
        default = parameter.default
        if default is not parameter.empty:
            defaults[f"_g_default{index}"] = default
            default = _Name(f"_g_default{index}")
        copied.append(parameter.replace(annotation=parameter.empty, default=default))
    text = str(inspect.Signature(copied))
    return text[1:-1], defaults


@functools.cache
def call_arguments(params: str) -> str:
    """The arguments that forward a parameter list: ``a, b=1, *c, d`` -> ``a, b, *c, d=d``."""
    spec = ast.parse(f"def f({params}): pass").body[0].args  # type: ignore[attr-defined]
    parts = [a.arg for a in (*spec.posonlyargs, *spec.args)]
    if spec.vararg:
        parts.append("*" + spec.vararg.arg)
    parts += [f"{a.arg}={a.arg}" for a in spec.kwonlyargs]
    if spec.kwarg:
        parts.append("**" + spec.kwarg.arg)
    return ", ".join(parts)


def concurrent_call(obj: object, operation: str, role: str, func: Callable[..., Any], /,
                    *args: Any, **kwargs: Any) -> Any:
    """Run ``func(*args, **kwargs)`` as a CONCURRENT use of ``obj`` in ``role`` (if tracked)."""
    record = record_of(obj)
    if record is None:
        return func(*args, **kwargs)
    return CONCURRENT_USE.call_guard(operation, role)(obj, func, *args, **kwargs)
