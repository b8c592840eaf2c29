"""Policies (strict, exclusive, process, ...), per-operation checks, and the guards on calls.

A guard is a small function generated from its policy's template with the exact
signature of the method it protects, the way ``dataclasses`` generates
``__init__``: forwarding ``*args, **kwargs`` alone would double the overhead.
The hot path reads the thread token, compares it with the record and calls
through; anything unusual goes to ``_slow_path``, which decides and reports.
"""

from __future__ import annotations

import ast
import contextvars
import enum
import functools
import inspect
import os
import re
import sys
import time
from collections.abc import Callable
from types import CodeType, FrameType, FunctionType
from typing import TYPE_CHECKING, Any, ClassVar

from sanitizer import claims, inline, loops, stacks, threads
from sanitizer.exceptions import ConfigError
from sanitizer.ownership import CROWD, FORKED, UNTRACKED, OwnerRecord, record_of
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

# One thread at a time (claims.py): the first thread in marks ``busy``; one that finds
# another inside is counted in ``inside`` while its call lasts, and the first leaving
# then leaves CROWD behind, so that every overlapping entry is seen. The steps between
# a read and its write, and between a claim and its ``try``, make no call: nothing lets
# another thread or a signal handler (KeyboardInterrupt) run in between under the GIL.
EXCLUSIVE = """\
_g_record = {record}
_g_me = _g_local.token
_g_holder = _g_record.busy
if _g_holder is None:
    _g_record.busy = _g_me
    try:
        return {call}
    finally:
        if _g_record.inside:
            _g_record.busy = _g_crowd
        else:
            _g_record.busy = None
if _g_holder is _g_me:
    return {call}
_g_record.inside += 1
try:
    if _g_slow(self, _g_record, {operation!r}, _g_holder):
        {reported}
    return {call}
finally:
    _g_record.inside -= 1
    if not _g_record.inside and _g_record.busy is _g_crowd:
        _g_record.busy = None
"""

# The same through claims.claim/release, atomic without the GIL. The claim is the
# ``try``'s first step, and release reads from the record what the claim did: a signal
# handled as the claim returns leaves nothing held. (``busy`` is this thread only while
# its own first call lasts, so a nested call is told apart before the claim.)
EXCLUSIVE_CALLED = """\
_g_record = {record}
_g_me = _g_local.token
if _g_record.busy is _g_me:
    return {call}
try:
    _g_holder = _g_claim(_g_record, _g_me)
    if _g_holder is not None and _g_slow(self, _g_record, {operation!r}, _g_holder):
        {reported}
    return {call}
finally:
    _g_release(_g_record, _g_me)
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

# -- event loops (loops.py). ``_g_me.loop`` is the loop running in this thread. --

# The object belongs to the loop it is bound to (``record.loop``; None: unbound,
# anything goes). Used in the thread running that loop, which is all a correct
# program does, it costs an ident() call (threads.get_ident: the C core's cached
# ident, else threading.get_ident) and a compare (``loop.ident`` is the ident of the
# thread running it, None when idle).
LOOP = """\
_g_record = {record}
_g_loop = _g_record.loop
if _g_loop is not None and _g_loop.ident != _g_ident() and _g_slow(
        self, _g_record, {operation!r}, None):
    {reported}
return {call}
"""

# The same for a coroutine method: checked when the coroutine is awaited, not when it
# is made (a worker thread may make one for run_coroutine_threadsafe()).
LOOP_AWAITED = """\
_g_record = {record}
_g_loop = _g_record.loop
if _g_loop is not None and _g_loop.ident != _g_ident():
    return _g_awaited(self, _g_record, {operation!r}, {call})
return {call}
"""

# The same as the first statements of a copy of a pure-Python method (inline.py): no
# frame of its own, so the hottest methods of asyncio cost a few attribute reads. A
# coroutine's first statements run when it is awaited, as LOOP_AWAITED checks.
LOOP_PROLOGUE = """\
try:
    _g_record = {self}._sanitizer_record
except AttributeError:  # made before the sanitizer was on
    _g_record = _g_untracked
_g_loop = _g_record.loop
if _g_loop is not None and _g_loop.ident != _g_ident():
    _g_slow({self}, _g_record, _g_operation, None)
"""

# One task at a time inside the object's async operations (spans), nested by the same
# task; the loop's rule first. A span is also noted in the task's context, so that
# helper tasks the holder starts inside it (and awaits) are not intruders. Its note
# goes when it ends, and only its own: a note pushed meanwhile and kept (a span that
# outlasts its call, as an open transaction's, beneath a Session's) stays.
TASK = """\
_g_record = {record}
_g_me = _g_local.token
_g_loop = _g_record.loop
if _g_loop is not None and _g_loop is not _g_me.loop and _g_slow(
        self, _g_record, {operation!r}, None):
    {reported}
_g_task = _g_me.running_loop
if _g_task is not None:  # loops.current_task(), without its frame
    _g_task = _g_state.tasks.current(_g_task) if _g_state.tasks is not None else None
_g_holder = _g_record.task
if _g_holder is None or _g_holder is _g_task:
    _g_record.task = _g_task
    _g_record.depth += 1
    _g_mine = None
    try:
        _g_mine = (_g_record, _g_task, _g_spans.get())
        _g_spans.set(_g_mine)
        return await {call}
    finally:
        if _g_mine is not None and _g_spans.get() is _g_mine:
            _g_spans.set(_g_mine[2])
        else:  # notes kept after ours (a span that outlasts its call): only ours goes
            _g_unspan(_g_record, _g_task)
        _g_record.depth -= 1
        if not _g_record.depth:
            _g_record.task = None
if _g_task is not None and _g_slow(self, _g_record, {operation!r}, _g_holder):
    {reported}
return await {call}
"""

# Put before another policy's body (NoBlock): a blocking call while a loop runs in this
# thread. Reported, the call goes on quietly (one misuse, one report), but through the
# policy's own body all the same: its bookkeeping (who is inside, who holds a transaction)
# must not miss a call. With no loop running it costs one slot read: the token read is
# the body's own, moved up.
NOBLOCK = """\
_g_me = _g_local.token
if _g_me.loop is not None and _g_noblock.{kind}:
    _g_record = {record}
    if _g_blocking_{kind}(self, _g_record, {operation!r}, None):
        {hush}
        try:
{quiet_body}
        finally:
            {unhush}
"""
# Reading the record tolerates objects without one (made before the sanitizer was on;
# a subclass whose __init__ skips its base's): untracked, never checked. Not a class-level
# default record, which would make every read of the instance's own slower (3.11 does not
# specialize an attribute whose class holds an instance of a Python class, 3.12+ any
# attribute that shadows one of its class). A try costs nothing on 3.11+.
_READS_RECORD = re.compile(r"^( *)_g_record = \{record\}$", re.MULTILINE)
_TOLERANT_READ = (r"\1try:\n\1    _g_record = {record}\n"
                  r"\1except AttributeError:\n\1    _g_record = _g_untracked")

# Where a template's reported block goes, and how deep.
_REPORTED_MARK = "_g_reported_block_"
_REPORTED_AT = re.compile(rf"^( *){_REPORTED_MARK}$", re.MULTILINE)

# The body's own token read, which NOBLOCK's takes over.
_READS_TOKEN = re.compile(r"^_g_me = _g_local\.token\n", re.MULTILINE)

# Put before every body when the ``history`` option is on: the record keeps this
# access (thread, time, the first caller frame that is not the sanitizer's) in its
# bounded deque. Off, guards are compiled without it and cost nothing more.
HISTORY = """\
try:
    _g_history = {record}.history
except AttributeError:
    _g_history = None
if _g_history is not None:
    _g_f = _g_frame(1)
    while _g_kinds.get(_g_f.f_code.co_filename) == _g_internal and _g_f.f_back is not None:
        _g_f = _g_f.f_back  # a proxy's frame, a wrapt wrapper's
    _g_history.append((_g_local.token, _g_clock(), _g_f.f_code, _g_f.f_lasti))
"""

# For policies written as enter/exit methods (usually by plugins): slower, general.
# enter() is the ``try``'s first step: a signal handled as it returns still gets its
# exit() (a Python enter's return is no such point; only a C one's is).
ENTER_EXIT = """\
_g_record = {record}
_g_state = _g_unentered
try:
    _g_state = _g_policy.enter(self, _g_record, {operation!r})
    return {call}
finally:
    if _g_state is not _g_unentered:
        _g_policy.exit(self, _g_record, _g_state)
"""

# The same for a coroutine method: around the call's run, when awaited, not its creation.
ENTER_EXIT_AWAITED = """\
_g_record = {record}
_g_state = _g_unentered
try:
    _g_state = _g_policy.enter(self, _g_record, {operation!r})
    return await {call}
finally:
    if _g_state is not _g_unentered:
        _g_policy.exit(self, _g_record, _g_state)
"""

# An async guard's reported call: quiet for this task only (a thread's ``quiet`` would
# leak into the other tasks that run while it waits).
REPORTED_ASYNC = """\
_g_hushed = _g_hush.set(True)
try:
    return await {call}
finally:
    _g_hush.reset(_g_hushed)
"""

#: True inside an async call already reported: the layers beneath stay silent.
HUSH: contextvars.ContextVar[bool] = contextvars.ContextVar("sanitizer_hush", default=False)
#: The task policy's spans entered in this context: linked (record, task, next) tuples.
SPANS: contextvars.ContextVar[tuple[Any, ...] | None] = contextvars.ContextVar(
    "sanitizer_spans", default=None)

#: ENTER_EXIT's state before enter() returned (it was refused, or never ran).
_UNENTERED = object()

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
    #: Whether this policy sees its violations only after the state changed (a future
    #: already completed): they are reported, never raised, since raising then could
    #: only leave the program hanging.
    after_the_fact: bool = False
    #: How such a bug is usually fixed, in one line: the report's ``hint``.
    advice: ClassVar[str] = ("keep the object to the thread, loop or task the policy gives "
                             "it, or hand it over explicitly (sanitizer.transfer)")

    def advice_for(self, violation: Violation, record: OwnerRecord) -> str:
        """The hint for a violation this policy found (cold path): its own ``advice``, or
        for a verdict of another policy (a strict object used after fork: ``process``),
        that policy's."""
        if violation.policy != self.name:
            other = _ADVISERS.get(violation.policy) or STATE.policies.get(violation.policy)
            if other is not None and other is not self:
                return other.advice_for(violation, record)
        return self.advice

    def template_for(self, func: Callable[..., Any] | None) -> str:
        """The template of the guard of ``func`` (policies may tell coroutines apart)."""
        if self.template is ENTER_EXIT and inspect.iscoroutinefunction(func):
            return ENTER_EXIT_AWAITED
        return self.template

    def inlined(self, func: Callable[..., Any], operation: str) -> FunctionType | None:
        """A copy of the pure-Python ``func`` with this policy's check as its first
        statements (inline.py), where the policy has one and ``func`` allows it; else None
        (a guard then)."""
        return None

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
                             wrapped=func, record=record, template=self.template_for(func))

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
    advice = "give each thread its own: a connection per thread, or a pool"

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
    template = EXCLUSIVE_CALLED if claims.CALLED else EXCLUSIVE
    marks_inside = True
    advice = ("one thread at a time: give each thread its own (a pool), or hold a lock "
              "around each use")

    def holder(self, record: OwnerRecord, token: threads.ThreadToken, holder: object) -> object:
        return crowd_member(record, token) if holder is CROWD else holder

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if holder is FORKED or record.pid != token.pid:
            return "process"
        if record.sharing > 0 or holder is None or holder is token:
            return None
        return self.name  # a thread inside, or a CROWD whose threads left meanwhile

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: threads.ThreadToken) -> str:
        if violation.policy == self.name:
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
    holder = violation.holder_thread
    other = (f"thread T{holder.get('serial')} '{holder.get('name')}'" if holder
             else "another thread")
    root = violation.root_type or violation.object_type
    return (f"{_what(violation)} called by {_who(token)} while {other} is inside a call on "
            f"the same {root}")


class Process(Policy):
    """Any thread may use the object, but not a child process that inherited it."""

    name = "process"
    template = PROCESS
    advice = ("reconnect in the child after fork (os.register_at_fork(after_in_child=...)), "
              "and leave the parent's object to the parent")


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
    advice = Exclusive.advice  # the rule it breaks

    def holder(self, record: OwnerRecord, token: threads.ThreadToken, holder: object) -> object:
        if record.policy is not None and record.policy.marks_inside:
            return crowd_member(record, token) if holder is CROWD else holder
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

    def template_for(self, func: Callable[..., Any] | None) -> str:
        return self.base.template_for(func)

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

    def advice_for(self, violation: Violation, record: OwnerRecord) -> str:
        return (record.policy or self.base).advice_for(violation, record)

    def __repr__(self) -> str:
        return f"<policy {self.name}, releasing>"


class LoopBound(Policy):
    """The object belongs to the event loop it is bound to (``record.loop``).

    Bound when the library binds it (a future to its loop at creation, a lock when it
    first waits); unbound objects are not checked. Violations: used under another
    loop running in this thread, or from a thread other than the one running its
    loop. Setup before its loop runs and teardown after it stops are allowed.
    """

    name = "loop"
    template = LOOP
    #: Whether use under another loop counts (False: only use from a thread other
    #: than the one running the loop, for the loop's own methods).
    other_loops: ClassVar[bool] = True
    advice = ("from other threads, use loop.call_soon_threadsafe() or "
              "asyncio.run_coroutine_threadsafe(); create it in the loop that uses it")

    def __init__(self, hint: str = "", *, after_the_fact: bool = False) -> None:
        #: The report's hint for this policy's own verdicts, in the library's words
        #: (instead of ``advice``).
        self.hint = hint
        self.after_the_fact = after_the_fact

    def advice_for(self, violation: Violation, record: OwnerRecord) -> str:
        # Its verdicts say "loop" (EventLoopThread's too): the plugin's words, else its own.
        if violation.policy in ("loop", self.name):
            return self.hint or self.advice
        return super().advice_for(violation, record)

    def template_for(self, func: Callable[..., Any] | None) -> str:
        return LOOP_AWAITED if inspect.iscoroutinefunction(func) else LOOP

    def inlined(self, func: Callable[..., Any], operation: str) -> FunctionType | None:
        if type(self).template_for is not LoopBound.template_for:
            return None  # a subclass with guards of its own (task)
        copy = inline.with_prologue(func, LOOP_PROLOGUE, {
            "_g_ident": threads.get_ident, "_g_slow": _slow_path_for(self),
            "_g_operation": operation, "_g_untracked": UNTRACKED})
        if copy is not None:
            copy.__sanitizer_policy__ = self  # type: ignore[attr-defined]
        return copy

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if record.pid != token.pid:
            return "process"
        loop = record.loop
        if loop is None or record.sharing > 0 or token.loop is loop:
            return None
        if token.loop is not None and self.other_loops:
            return "loop"  # under another loop
        if loop.thread is None or loop.thread is token:
            return None  # its loop is not running: setup, or teardown
        return "loop"  # from a thread other than the one running its loop

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: threads.ThreadToken) -> str:
        if violation.policy != "loop" or record.loop is None:
            return super().describe(violation, record, token)
        what, root = _what(violation), violation.root_type or violation.object_type
        loop, mine = record.loop, token.loop
        if mine is not None and mine is not loop:
            text = (f"{what} called {_in_task(violation)}under {mine.describe()}, but the "
                    f"{root} is bound to {loop.describe()}")
        else:
            text = (f"{what} called by {_who(token)}, but the {root} belongs to "
                    f"{loop.describe()}")
        if record.binding is not None:
            site = stacks.describe_site(stacks.site_of(record.binding.stack))
            text += f" (bound there at {site})"
        return f"{text} ({violation.policy} policy)"


class EventLoopThread(LoopBound):
    """An event loop's own methods: only the thread running it may call those that are
    not thread-safe (at other times, any thread may set it up or tear it down)."""

    name = "event-loop"
    other_loops = False
    advice = ("from other threads, use loop.call_soon_threadsafe() or "
              "asyncio.run_coroutine_threadsafe()")


class TaskPolicy(LoopBound):
    """One task at a time inside the object's async operations, on its loop.

    A task is inside from the moment it enters an async method until it returns
    (nested calls by the same task count once), or while a span the plugin opened
    for it lasts (an open transaction). A second task entering then is a violation;
    tasks the holder started inside the span (its helpers) are not. Sync methods
    follow the loop rule.
    """

    name = "task"
    advice = ("one task at a time: give each task its own (a pool), or serialize its uses "
              "with an asyncio.Lock")

    def advice_for(self, violation: Violation, record: OwnerRecord) -> str:
        if violation.policy == "loop" and not self.hint:
            return LoopBound.advice  # the loop's rule, which its sync methods follow
        return super().advice_for(violation, record)

    def template_for(self, func: Callable[..., Any] | None) -> str:
        return TASK if inspect.iscoroutinefunction(func) else LOOP

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if holder is None:  # the guard's loop check
            return super().violated(record, token, holder, obj, operation)
        if record.sharing > 0 or _helper_of(record, holder):
            return None
        return self.name

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: threads.ThreadToken) -> str:
        if violation.policy != self.name:
            return super().describe(violation, record, token)
        root = violation.root_type or violation.object_type
        holder = loops.task_phrase(violation.holder_task or {})
        return (f"{_what(violation)} called {_in_task(violation)}while task {holder} is "
                f"inside an operation on the same {root} ({self.name} policy)")


def _helper_of(record: OwnerRecord, holder: object) -> bool:
    """Whether the calling task was started by ``holder`` inside its span on ``record``."""
    span = SPANS.get()
    while span is not None:
        if span[0] is record and span[1] is holder:
            return True
        span = span[2]
    return False


def unspan(record: OwnerRecord, task: object) -> None:
    """Take the note of ``task``'s span on ``record`` out of the calling task's context,
    keeping the notes pushed after it (a TASK guard's exit, when the note is not on top)."""
    kept: list[tuple[Any, Any]] = []
    span = SPANS.get()
    while span is not None and (span[0] is not record or span[1] is not task):
        kept.append((span[0], span[1]))
        span = span[2]
    if span is None:
        return
    rest = span[2]
    for entry in reversed(kept):
        rest = (*entry, rest)
    SPANS.set(rest)


def _in_task(violation: Violation) -> str:
    task = violation.task
    return f"in task {loops.task_phrase(task)} " if task else ""


class NoBlock(Policy):
    """A blocking call (a driver's query) on a thread whose event loop is running.

    It stops every task on the loop until it returns. Composed with the object's own
    policy (``over``), whose guards it prefixes; ``kind`` says which setting switches it
    on (``state.Blocking``). Without a base it is the check itself, which plugins may
    also ask by hand (``Context.check(obj, record, "connect", policy=NOBLOCK)``).
    """

    name = "noblock"
    own_verdict = True
    advice = "await an async driver, or run the call in asyncio.to_thread()"
    KINDS: ClassVar[tuple[str, ...]] = ("network", "local")

    def __init__(self, base: Policy | None = None, kind: str = "network") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"noblock kind {kind!r}: expected one of {self.KINDS}")
        self.base = base
        self.kind = kind
        if base is not None:
            self.name = base.name  # type: ignore[misc]

    def over(self, base: Policy, kind: str = "network") -> NoBlock:
        """``base``'s guards with this check before them."""
        return _noblocking(base, kind)

    def template_for(self, func: Callable[..., Any] | None) -> str:
        if self.base is None:
            return Policy.template
        return _noblock_template(self.base.template_for(func), self.kind)

    @property
    def template(self) -> str:  # type: ignore[override]
        return self.template_for(None)

    def _decider(self, record: OwnerRecord) -> Policy:
        """Who decides everything but the blocking check: as slow_path would choose for
        the base's own guards (the record's policy, unless the base decides itself)."""
        base = self.base
        assert base is not None
        return base if base.own_verdict else (record.policy or base)

    def holder(self, record: OwnerRecord, token: threads.ThreadToken, holder: object) -> object:
        if self.base is None:
            return holder
        return self._decider(record).holder(record, token, holder)

    def violated(
        self, record: OwnerRecord, token: threads.ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        if self.base is not None:
            return self._decider(record).violated(record, token, holder, obj, operation)
        # The check itself (_g_blocking_*, or a plugin's by hand).
        if token.loop is None or not getattr(STATE.noblock, self.kind):
            return None
        for excused in STATE.blocking_excuses:
            if excused():  # the library checks this itself, and has reported it
                return None
        return "noblock"

    # The base's guards, when it is written as enter/exit (ENTER_EXIT calls _g_policy's).
    def enter(self, obj: object, record: OwnerRecord, operation: str) -> Any:
        assert self.base is not None
        return self.base.enter(obj, record, operation)

    def exit(self, obj: object, record: OwnerRecord, state: Any) -> None:
        assert self.base is not None
        self.base.exit(obj, record, state)

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: threads.ThreadToken) -> str:
        if violation.policy != "noblock":
            decider = self._decider(record) if self.base is not None else (
                record.policy or STRICT_POLICY)
            return decider.describe(violation, record, token)
        loop = token.loop
        where = loop.describe() if loop is not None else "an event loop"
        return (f"{_what(violation)} called {_in_task(violation)}on thread {token.label} "
                f"'{token.current_name()}', which runs {where}: the blocking call stops every "
                f"task on the loop until it returns (noblock policy)")

    def advice_for(self, violation: Violation, record: OwnerRecord) -> str:
        if violation.policy != "noblock" and self.base is not None:
            return self._decider(record).advice_for(violation, record)
        return super().advice_for(violation, record)

    def __repr__(self) -> str:
        if self.base is None:
            return f"<policy noblock ({self.kind})>"
        return f"<policy noblock ({self.kind}) over {self.base!r}>"


@functools.cache
def _noblock_template(body: str, kind: str) -> str:
    """NOBLOCK before ``body``: the body once quietly (after a report), once as it is."""
    body = _READS_TOKEN.sub("", body, count=1)
    if "await " in body:  # a task's quiet: a thread's would leak into the tasks meanwhile
        hush, unhush = "_g_hushed = _g_hush.set(True)", "_g_hush.reset(_g_hushed)"
    else:
        hush, unhush = "_g_me.quiet += 1", "_g_me.quiet -= 1"
    # Quiet, the body's slow paths find nothing to report: its report block is never run.
    quiet = "".join(f"            {line}\n" for line in body.replace("{reported}", "pass")
                    .splitlines())
    return NOBLOCK.replace("{kind}", kind).replace("{hush}", hush).replace(
        "{unhush}", unhush).replace("{quiet_body}\n", quiet) + body


@functools.cache
def _noblocking(base: Policy, kind: str) -> NoBlock:
    return NoBlock(base, kind)


STRICT_POLICY = Strict()
EXCLUSIVE_POLICY = Exclusive()
PROCESS_POLICY = Process()
CONCURRENT_USE = ConcurrentUse()
LOOP_POLICY = LoopBound()
EVENT_LOOP_POLICY = EventLoopThread()
TASK_POLICY = TaskPolicy()
#: The blocking checks themselves, one per kind (NoBlock.over prefixes guards with them).
NOBLOCK_POLICY = NoBlock()
NOBLOCK_LOCAL = NoBlock(kind="local")


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


def crowd_member(record: OwnerRecord, me: threads.ThreadToken) -> object:
    """One of the threads inside when ``busy`` says only CROWD (cold path): from their
    frames, or CROWD itself if they left meanwhile."""
    return thread_inside(record, me) or CROWD


BUILTIN = (STRICT_POLICY, EXCLUSIVE_POLICY, PROCESS_POLICY, LOOP_POLICY, TASK_POLICY)
#: Whose advice a verdict gets when another policy found it (Policy.advice_for).
_ADVISERS: dict[str, Policy] = {p.name: p for p in (
    *BUILTIN, EVENT_LOOP_POLICY, NOBLOCK_POLICY)}
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
    if token.quiet or HUSH.get():  # beneath a call that was already reported
        return False
    if token.pid != os.getpid():  # pragma: no cover - fork handler did not run
        token = threads.local.token = threads.ThreadToken()
    try:
        holder = policy.holder(record, token, holder)
        violated = policy.violated(record, token, holder, obj, operation)
    except Exception as exc:  # a bug in a policy: the call goes on, unchecked
        running = STATE.running
        if running is not None:
            running.reporter.internal_error(exc, f"checking the {policy.name} policy")
        return False
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


def _awaited_check_for(policy: Policy) -> Callable[..., Any]:
    """What LOOP_AWAITED guards return when the loop looks wrong: the check, when awaited."""
    return functools.partial(checked_when_awaited, policy if policy.own_verdict else None)


async def checked_when_awaited(deciding: Policy | None, obj: object, record: OwnerRecord,
                               operation: str, coroutine: Any) -> Any:
    """Await ``coroutine`` after checking its object, in the thread and loop that await it."""
    try:
        violated = slow_path(obj, record, operation, None, deciding)
    except BaseException:
        coroutine.close()  # refused (action=raise): it never ran, and must not warn so
        raise
    if not violated:
        return await coroutine
    hushed = HUSH.set(True)
    try:
        return await coroutine
    finally:
        HUSH.reset(hushed)


# What NOBLOCK's prefix calls, by kind: report a blocking call (True: reported).
_BLOCKING_CHECKS = {
    "_g_blocking_network": functools.partial(slow_path, deciding=NOBLOCK_POLICY),
    "_g_blocking_local": functools.partial(slow_path, deciding=NOBLOCK_LOCAL),
}


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
    template: str | None = None,
) -> FunctionType:
    scope = {"_g_local": threads.local, "_g_slow": _slow_path_for(policy), "_g_policy": policy,
             "_g_operation": operation, "_g_awaited": _awaited_check_for(policy),
             "_g_state": STATE, "_g_spans": SPANS, "_g_unspan": unspan,
             "_g_hush": HUSH,
             "_g_noblock": STATE.noblock, **_BLOCKING_CHECKS,
             "_g_ident": threads.get_ident, "_g_untracked": UNTRACKED,
             "_g_frame": sys._getframe, "_g_clock": time.time, "_g_kinds": STATE.kinds,
             "_g_internal": stacks.INTERNAL,
             "_g_crowd": CROWD, "_g_unentered": _UNENTERED,
             "_g_claim": claims.claim, "_g_release": claims.release,
             **namespace}
    template = template or policy.template
    if STATE.history:
        template = HISTORY + template
    exec(_guard_module(template, call, params, record), scope)
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
    asynchronous = "await " in template
    template = _READS_RECORD.sub(_TOLERANT_READ, template)
    reported = (REPORTED_ASYNC if asynchronous else REPORTED).format(call=call).rstrip()
    body = template.format(call=call, operation=_Name("_g_operation"), record=record,
                           reported=_REPORTED_MARK)
    # Every line of the block as deep as ``{reported}`` stands (guard bodies nest it).
    body = _REPORTED_AT.sub(lambda m: m[1] + reported.replace("\n", "\n" + m[1]), body)
    define = "async def" if asynchronous else "def"
    source = f"{define} _g_guard(self, {params}):\n" + "".join(
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
